"""Omniglot (Lake et al., Science 2015) in memory as 28x28 grayscale ClassImages.

`load_omniglot` takes the first of these that `data_dir` offers:
1. a cache of the decoded arrays, `omniglot_28x28.npz` (or one in `cache_dir`);
2. the dataset authors' archives `images_background.zip` and
   `images_evaluation.zip`, or the same folders extracted;
3. TensorFlow Datasets' "omniglot", when `data_dir` holds neither.
The cache is keyed by location only: delete it after replacing the archives.

`split_classes` divides the 1623 characters into train, validation and test
classes as MAML++ does, or as Lake et al. do.
"""

import itertools
import os
import pathlib
import zipfile

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds
from absl import logging

from tf_mamlpp.data.class_images import ClassImages, DataError, ImageCache, from_class_arrays
from tf_mamlpp.data.image_decoding import decode_image, resized_to_unit_range
from tf_mamlpp.data.omniglot_splits import split_sizes
from tf_mamlpp.error_text import tensorflow_error_text

PARTS = ("images_background", "images_evaluation")
IMAGE_SIZE = 28
IMAGE_SHAPE = (IMAGE_SIZE, IMAGE_SIZE, 1)
CACHE_NAME = f"omniglot_{IMAGE_SIZE}x{IMAGE_SIZE}.npz"
DEFAULT_CACHE_DIR = "~/.cache/tf_mamlpp"
_DECODE_BATCH = 512


def load_omniglot(data_dir: os.PathLike, cache_dir: os.PathLike | None = None) -> ClassImages:
    """Loads all 1623 Omniglot characters, 20 drawings each, as 28x28x1 float32.

    Classes come background first, then evaluation, each sorted by alphabet
    then character; images within a class by file name. Pixel values are the
    files' own (white background = 1), resized, not inverted.

    Args:
      data_dir: folder holding the two zips, the two extracted folders, or
        neither (then TensorFlow Datasets is asked).
      cache_dir: where the cache goes when `data_dir` is read-only; default
        `~/.cache/tf_mamlpp`.

    Returns:
      The images as a ClassImages.

    Raises:
      DataError: `data_dir` is missing, holds only one of the two parts, or an
        archive or image in it is unreadable.
    """
    data_dir = pathlib.Path(data_dir).expanduser()
    if not data_dir.is_dir():
        raise DataError(f"{data_dir}: no such directory (expected the Omniglot zips or folders)")
    cache = ImageCache(data_dir, pathlib.Path(cache_dir or DEFAULT_CACHE_DIR).expanduser(),
                       CACHE_NAME)
    cached = cache.read()
    if cached is not None:
        return cached
    sources = _find_sources(data_dir)
    if sources is None:
        return _load_from_tfds(data_dir)
    class_images = from_class_arrays(*_decode_classes(sources))
    cache.write(class_images)
    return class_images


def _find_sources(data_dir: pathlib.Path) -> list[pathlib.Path] | None:
    """Each part's zip (preferred: one file to read) or folder; None if none."""
    found = {part: next((path for path in (data_dir / f"{part}.zip", data_dir / part)
                         if path.exists()), None) for part in PARTS}
    missing = [part for part, path in found.items() if path is None]
    if len(missing) == len(PARTS):
        return None
    if missing:
        raise DataError(f"{data_dir}: no {missing[0]}.zip or {missing[0]}/ folder, "
                        "though the other part is there")
    return list(found.values())


def _decode_classes(sources: list[pathlib.Path]) -> tuple[list[np.ndarray], list[str]]:
    """Decodes every part into one (20, 28, 28, 1) array and name per character."""
    arrays, names = [], []
    for source in sources:
        files = _read_zip(source) if source.suffix == ".zip" else _read_folder(source)
        if not files:
            raise DataError(f"{source}: no <alphabet>/<character>/<drawing>.png images in it")
        files.sort(key=lambda item: item[0])
        images = _decode_pngs([data for _, data in files], source)
        part = source.name.removesuffix(".zip")
        start = 0
        for (alphabet, character), group in itertools.groupby(files, key=lambda item: item[0][:2]):
            count = len(list(group))
            arrays.append(images[start:start + count])
            names.append(f"{part}/{alphabet}/{character}")
            start += count
    return arrays, names


def _read_zip(path: pathlib.Path) -> list[tuple[tuple[str, str, str], bytes]]:
    """((alphabet, character, file name), PNG bytes) of every image in the zip."""
    part = path.name.removesuffix(".zip")
    try:
        with zipfile.ZipFile(path) as archive:
            return [(tuple(name.split("/")[1:]), archive.read(name))
                    for name in archive.namelist()
                    if name.startswith(f"{part}/") and name.endswith(".png")
                    and name.count("/") == 3]
    except (zipfile.BadZipFile, EOFError, OSError) as error:
        raise DataError(f"{path}: corrupt or truncated zip archive ({error})") from error


def _read_folder(folder: pathlib.Path) -> list[tuple[tuple[str, str, str], bytes]]:
    """The same as `_read_zip`, from the extracted folder."""
    return [((path.parent.parent.name, path.parent.name, path.name), path.read_bytes())
            for path in folder.glob("*/*/*.png")]


def _decode_pngs(pngs: list[bytes], source: pathlib.Path) -> np.ndarray:
    """Decodes PNG bytes to (n, 28, 28, 1) float32 in parallel with tf.data.

    Through image_decoding.py, as the exported model decodes a file it is given.
    """
    decoded = tf.data.Dataset.from_tensor_slices(pngs).map(
        lambda png: decode_image(png, IMAGE_SHAPE),
        num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    try:
        return np.concatenate([batch.numpy() for batch in decoded.batch(_DECODE_BATCH)])
    except tf.errors.InvalidArgumentError as error:
        raise DataError(f"{source}: an image does not decode as PNG "
                        f"({tensorflow_error_text(error)})") from error


def _load_from_tfds(data_dir: pathlib.Path) -> ClassImages:
    """Omniglot from TensorFlow Datasets, in the same class order as the zips.

    Not cached here: TFDS keeps its own prepared copy. Within a class, images
    come in TFDS's order, as no feature names the drawer.
    """
    logging.info("%s holds no Omniglot zips or folders; loading TFDS 'omniglot'.", data_dir)
    try:
        splits, info = tfds.load("omniglot", split=["train", "test"], with_info=True)
    except Exception as error:  # TFDS fails in many ways offline; name what was tried.
        raise DataError(f"{data_dir}: no Omniglot zips or folders, and TFDS 'omniglot' "
                        f"failed to load ({tensorflow_error_text(error)})") from error
    alphabet_names = info.features["alphabet"].names
    arrays, names = [], []
    for part, split in zip(PARTS, splits):
        images, labels, alphabets, characters = _decode_tfds_split(split)
        classes, first = np.unique(labels, return_index=True)
        order = np.lexsort((classes, characters[first], alphabets[first]))
        for label, index in zip(classes[order], first[order]):
            arrays.append(images[labels == label])
            names.append(f"{part}/{alphabet_names[alphabets[index]]}/"
                         f"character{characters[index] + 1:02d}")
    return from_class_arrays(arrays, names)


def _decode_tfds_split(split: tf.data.Dataset) -> tuple[np.ndarray, ...]:
    """Images (n, 28, 28, 1) and per-image label, alphabet, alphabet_char_id."""
    def convert(example):
        gray = tf.image.rgb_to_grayscale(example["image"])
        return (gray, example["label"], example["alphabet"], example["alphabet_char_id"])

    batches = split.map(convert, num_parallel_calls=tf.data.AUTOTUNE).batch(_DECODE_BATCH)
    batches = batches.map(lambda gray, *ids: (resized_to_unit_range(gray, IMAGE_SHAPE[:2]), *ids),
                          num_parallel_calls=tf.data.AUTOTUNE)
    columns = zip(*[[tensor.numpy() for tensor in batch] for batch in batches])
    return tuple(np.concatenate(column) for column in columns)


def num_background_classes(class_images: ClassImages) -> int:
    """How many classes come from images_background: the first argument of split_classes."""
    return sum(name.startswith(f"{PARTS[0]}/") for name in class_images.class_names)


def split_classes(num_background: int, num_classes: int, scheme: str = "mamlpp",
                  seed: int = 0) -> dict[str, np.ndarray]:
    """Divides class indices 0..num_classes-1 into disjoint train/val/test sets.

    Each split gets `omniglot_splits.split_sizes(scheme, ...)` classes:
      mamlpp: as the MAML++ reference code (Antoniou et al. 2019): all classes
        shuffled, then 1150 train, 50 validation, the rest (423) test.
      lake: background classes shuffled, the last 50 of them validation (914
        train); the evaluation alphabets (659 classes) test, as Lake et al.

    The shuffle uses numpy's legacy RandomState, whose stream numpy keeps
    fixed across versions, so a seed names the same split forever.

    Args:
      num_background: classes from images_background (the first ones).
      num_classes: all classes.
      scheme: "mamlpp" or "lake" (the omniglot_split setting).
      seed: seed of the shuffle.

    Returns:
      {"train", "val", "test"} to sorted int64 class indices.

    Raises:
      ConfigError: as `omniglot_splits.split_sizes`.
    """
    sizes = split_sizes(scheme, num_background, num_classes)
    random = np.random.RandomState(seed)
    if scheme == "mamlpp":
        order = random.permutation(num_classes)
    else:  # lake: the evaluation classes, unshuffled, are the test split
        order = np.concatenate([random.permutation(num_background),
                                np.arange(num_background, num_classes)])
    ends = np.cumsum(list(sizes.values()))
    return {name: np.sort(order[end - size:end]).astype(np.int64)
            for (name, size), end in zip(sizes.items(), ends)}
