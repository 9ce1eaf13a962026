"""Images grouped by class that stay on disk: the streamed form of `ClassImages`.

A data set larger than `--in_memory_limit_gb` is not loaded; each class is a
memory-mapped uint8 array in the decoded-image cache (decoded_images.py), and
an episode reads only the images it draws. The operating system's page cache
keeps what is read often, so memory holds what fits and the disk serves the
rest. Episodes sample the same classes and images from either form (see
episodes.py): only where the pixels come from differs.
"""

import dataclasses
from collections.abc import Sequence

import numpy as np


@dataclasses.dataclass(frozen=True)
class MappedClassImages:
    """One uint8 (count, height, width, channels) array per class, usually a np.memmap.

    Attributes:
      arrays: per class, its images; pixel values 0..255, read as value / 255.
      class_names: one name per class, e.g. "train/n01532829".
    """

    arrays: Sequence[np.ndarray]
    class_names: list[str]

    def __post_init__(self):
        if not self.arrays or len(self.arrays) != len(self.class_names):
            raise ValueError(f"{len(self.arrays)} image arrays for {len(self.class_names)} "
                             "class names; need the same number, at least one")
        shape = self.arrays[0].shape[1:]
        for name, array in zip(self.class_names, self.arrays):
            if array.dtype != np.uint8 or array.ndim != 4 or array.shape[1:] != shape:
                raise ValueError(f"class {name}: images must be uint8 (count, *{shape}), "
                                 f"got {array.dtype} {array.shape}")
            if len(array) < 1:
                raise ValueError(f"class {name}: no images")

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def class_counts(self) -> np.ndarray:
        """int64 (num_classes,): images of each class."""
        return np.array([len(array) for array in self.arrays], dtype=np.int64)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(int(d) for d in self.arrays[0].shape[1:])

    def gather(self, classes: np.ndarray, picks: np.ndarray) -> np.ndarray:
        """Images `picks[i]` of class `classes[i]`, uint8 (len(classes), picks.shape[1], H, W, C).

        Reads only those images from disk (or the page cache).
        """
        return np.stack([self.arrays[c][p] for c, p in zip(classes, picks)])
