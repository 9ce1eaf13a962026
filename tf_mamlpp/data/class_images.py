"""Images grouped by class: the in-memory form of a few-shot data set.

A producer (omniglot.py, or decoded_images.py for image folders) decodes its
files into one array of images stored class after class, plus where each
class starts and how many images it has. One contiguous array lets the
episode sampler hold all images as a single tensor and gather by index;
per-class counts, rather than a fixed images-per-class axis, admit data sets
whose classes differ in size. Data sets too large for memory stay on disk as
`mapped_class_images.MappedClassImages` instead.

Decoding thousands of image files takes seconds; `ImageCache` keeps the
decoded arrays as one .npz so that later loads take a fraction of a second.
"""

import dataclasses
import hashlib
import os
import pathlib
import zipfile
from collections.abc import Sequence

import numpy as np
from absl import logging

from tf_mamlpp.atomic_files import write_atomically


class DataError(ValueError):
    """A data set on disk is missing or unreadable; the message names the path."""


@dataclasses.dataclass(frozen=True)
class ClassImages:
    """All images of a data set, grouped by class.

    Images of class `c` are `images[class_offsets[c]:class_offsets[c] + class_counts[c]]`.

    Attributes:
      images: (num_images, height, width, channels), float32 in [0, 1], or
        uint8 in 0..255 that episodes read as value / 255 (a quarter of the
        memory, for natural images decoded from 8-bit files).
      class_offsets: int64 (num_classes,), index of each class's first image.
      class_counts: int64 (num_classes,), number of images of each class.
      class_names: one name per class, e.g. "images_background/Latin/character01".
    """

    images: np.ndarray
    class_offsets: np.ndarray
    class_counts: np.ndarray
    class_names: list[str]

    def __post_init__(self):
        if self.images.ndim != 4 or self.images.dtype not in (np.float32, np.uint8):
            raise ValueError(
                "images must be float32 or uint8 (num_images, height, width, channels), "
                f"got {self.images.dtype} {self.images.shape}")
        num_classes = len(self.class_names)
        if num_classes == 0:
            raise ValueError("a ClassImages needs at least one class")
        for name in ("class_offsets", "class_counts"):
            array = getattr(self, name)
            if array.dtype != np.int64 or array.shape != (num_classes,):
                raise ValueError(
                    f"{name} must be int64 ({num_classes},) like class_names, "
                    f"got {array.dtype} {array.shape}")
        ends = self.class_offsets + self.class_counts
        if (self.class_counts < 1).any() or (self.class_offsets < 0).any() or (
                ends > len(self.images)).any():
            raise ValueError(
                "every class needs at least one image, within the "
                f"{len(self.images)} images")

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(int(d) for d in self.images.shape[1:])

    def images_of(self, class_index: int) -> np.ndarray:
        """The images of one class, (class_counts[class_index], H, W, C), a view."""
        start = self.class_offsets[class_index]
        return self.images[start:start + self.class_counts[class_index]]

    def select(self, class_indices: Sequence[int]) -> "ClassImages":
        """The given classes, in the given order, re-indexed 0..len(class_indices)-1.

        Returns a copy, so a split holds only its own images.
        """
        indices = [int(c) for c in np.asarray(class_indices, dtype=np.int64)]
        return from_class_arrays([self.images_of(c) for c in indices],
                                 [self.class_names[c] for c in indices])


def from_class_arrays(arrays: Sequence[np.ndarray],
                      class_names: Sequence[str]) -> ClassImages:
    """Packs one (count, H, W, C) float32 or uint8 array per class into a ClassImages."""
    if not arrays or len(arrays) != len(class_names):
        raise ValueError(
            f"{len(arrays)} image arrays for {len(class_names)} class names; "
            "need the same number, at least one")
    counts = np.array([len(a) for a in arrays], dtype=np.int64)
    offsets = np.cumsum(counts) - counts
    return ClassImages(np.concatenate(arrays), offsets, counts, list(class_names))


def write_npz(class_images: ClassImages, path: os.PathLike) -> None:
    """Writes `class_images` to `path`, whole or not at all (atomic_files.py).

    A killed process leaves the old cache or the new one, never a truncated
    one. Compressed: Omniglot's white background shrinks 100 MB of float32 to
    about 7 MB, and reading it back stays well under a second.
    """
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(path, lambda file: np.savez_compressed(
        file,
        images=class_images.images,
        class_offsets=class_images.class_offsets,
        class_counts=class_images.class_counts,
        class_names=np.array(class_images.class_names, dtype=str)))


def read_npz(path: os.PathLike) -> ClassImages:
    """Reads a file written by `write_npz`.

    Raises:
      OSError, ValueError, KeyError, EOFError or zipfile.BadZipFile when the
      file is missing, truncated or not such a file.
    """
    with np.load(path, allow_pickle=False) as arrays:
        return ClassImages(
            images=arrays["images"],
            class_offsets=arrays["class_offsets"],
            class_counts=arrays["class_counts"],
            class_names=[str(name) for name in arrays["class_names"]])


@dataclasses.dataclass(frozen=True)
class ImageCache:
    """Decoded images of `data_dir`, kept as `name` beside the data.

    Where `data_dir` is read-only, the cache goes to `cache_dir` instead, under
    a name carrying a digest of `data_dir`'s path so that two data sets cannot
    share it. It is keyed by location only: delete it after replacing the data.
    """

    data_dir: pathlib.Path
    cache_dir: pathlib.Path
    name: str

    @property
    def paths(self) -> tuple[pathlib.Path, pathlib.Path]:
        """(beside the data, in cache_dir), in the order they are read."""
        digest = hashlib.sha256(str(self.data_dir.resolve()).encode()).hexdigest()[:12]
        stem, suffix = os.path.splitext(self.name)
        return self.data_dir / self.name, self.cache_dir / f"{stem}_{digest}{suffix}"

    def read(self) -> ClassImages | None:
        """The first readable cache; an unreadable one is logged and skipped, to be rebuilt."""
        for path in self.paths:
            if not path.is_file():
                continue
            try:
                return read_npz(path)
            except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as error:
                logging.warning("Ignoring unreadable cache %s (%s).", path, error)
        return None

    def write(self, class_images: ClassImages) -> None:
        """Writes the cache; a failure costs only speed next time, so it is logged."""
        path = self.paths[0] if is_writable(self.data_dir) else self.paths[1]
        try:
            write_npz(class_images, path)
        except OSError as error:
            logging.warning("Could not write cache %s (%s).", path, error)


def is_writable(directory: pathlib.Path) -> bool:
    """Whether to write there: the OS allows it and its mode is not read-only.

    The mode bits are consulted too because root may write anywhere, yet a
    folder marked r-x (such as a shared data set) should stay untouched.
    """
    return os.access(directory, os.W_OK) and bool(directory.stat().st_mode & 0o222)
