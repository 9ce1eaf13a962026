"""The images of a folder data set, decoded once and kept on disk as one uint8 .npy per class.

Decoding is the slow part of reading images (a full-size ImageNet JPEG takes
milliseconds), so `load_split` decodes each file only the first time: with
tf.data, in parallel, resized to `image_size` x `image_size` and rounded to
uint8 (image_decoding.py), one cache file per class. Later loads read
the cache files, either into memory (`ClassImages`) or, for data sets larger
than `--in_memory_limit_gb`, memory-mapped (`MappedClassImages`).

The cache is `<data_dir>/.tf_mamlpp_cache/<size>x<size>x<channels>/`, or under
`~/.cache/tf_mamlpp/` when the data folder is read-only. A class's file name
carries a digest of its image file names, so adding or removing images
rebuilds that class; replacing an image under the same name does not:
delete the cache then. Each file is written whole or not at all, so an
interrupted first load resumes where it stopped.
"""

import hashlib
import pathlib
import re

import numpy as np
import tensorflow as tf
from absl import logging

from tf_mamlpp.atomic_files import write_atomically
from tf_mamlpp.data.class_images import DataError, from_class_arrays, is_writable
from tf_mamlpp.data.image_decoding import decode_resized
from tf_mamlpp.data.mapped_class_images import MappedClassImages
from tf_mamlpp.error_text import tensorflow_error_text

CACHE_FOLDER = ".tf_mamlpp_cache"
DEFAULT_CACHE_DIR = "~/.cache/tf_mamlpp"


def cache_dir(data_dir, image_size, channels, fallback=DEFAULT_CACHE_DIR) -> pathlib.Path:
    """Where the decoded images of `data_dir` at this size go (see the module docstring)."""
    data_dir = pathlib.Path(data_dir).expanduser().resolve()
    shape = f"{image_size}x{image_size}x{channels}"
    if is_writable(data_dir):
        return data_dir / CACHE_FOLDER / shape
    digest = hashlib.sha256(str(data_dir).encode()).hexdigest()[:12]
    return pathlib.Path(fallback).expanduser() / f"{data_dir.name}_{digest}" / shape


def decoded_bytes(class_files, image_size, channels) -> int:
    """Bytes the decoded uint8 images of `class_files` take."""
    return int(class_files.class_counts.sum()) * image_size * image_size * channels


def fill_cache(class_files, image_size, channels, directory):
    """Decodes into the cache the classes of `class_files` that it lacks.

    Args:
      class_files: one split's `image_folders.ClassFiles`.
      image_size: side of the square images, in pixels.
      channels: 1 (grayscale) or 3 (RGB); files are converted to it.
      directory: the cache folder, from `cache_dir`.

    Returns:
      The cache file of each class, in `class_files` order.

    Raises:
      DataError: a file does not decode as an image, or the cache cannot be
        written, naming the path.
    """
    directory = pathlib.Path(directory)
    paths = [directory / _cache_name(name, files) for name, files in
             zip(class_files.names, class_files.files)]
    shape = (image_size, image_size, channels)
    missing = [c for c, path in enumerate(paths)
               if open_cached(path, len(class_files.files[c]), shape) is None]
    if missing:
        logging.info("Decoding %d of the %d classes of %s into %s.", len(missing),
                     class_files.num_classes, class_files.source, directory)
        _decode_into_cache(class_files, missing, paths, shape)
    return paths


def load_split(class_files, image_size, channels, directory, in_memory=True):
    """The images of one split, decoding into the cache what it lacks.

    Args:
      class_files, image_size, channels, directory: as for `fill_cache`.
      in_memory: return a `ClassImages` held in memory; False returns a
        `MappedClassImages` that reads the cache files as episodes need them.

    Returns:
      uint8 images, class by class in `class_files` order.

    Raises:
      DataError: as `fill_cache`.
    """
    paths = fill_cache(class_files, image_size, channels, directory)
    return read_classes(paths, class_files.class_counts, class_files.names,
                        (image_size, image_size, channels), in_memory)


def read_classes(paths, counts, names, shape, in_memory=True):
    """Cache files of one uint8 (count, *shape) array per class, in memory or memory-mapped.

    Also for the caches of TensorFlow Datasets sets (tfds_images.py).

    Raises:
      DataError: a file is missing or not what is expected, naming it.
    """
    arrays = []
    for path, count in zip(paths, counts):
        arrays.append(open_cached(path, int(count), shape))
        if arrays[-1] is None:
            raise DataError(f"{path}: decoded-image cache file missing or changed while read")
    if in_memory:
        return from_class_arrays([np.asarray(array) for array in arrays], names)
    return MappedClassImages(arrays, names)


def _cache_name(class_name, files):
    """`<class>_<digest of its file names>.npy`, the class name made file-safe."""
    digest = hashlib.sha256("\n".join(path.name for path in files).encode()).hexdigest()[:12]
    return f"{re.sub(r'[^A-Za-z0-9_.-]', '_', class_name)}_{digest}.npy"


def open_cached(path, count, shape):
    """The memory-mapped cache file, or None when it is missing or not what is expected."""
    if not path.is_file():
        return None
    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError, EOFError) as error:
        logging.warning("Ignoring unreadable cache file %s (%s).", path, error)
        return None
    if array.dtype != np.uint8 or array.shape != (count, *shape):
        logging.warning("Ignoring cache file %s: %s %s, expected uint8 %s.", path, array.dtype,
                        array.shape, (count, *shape))
        return None
    return array


def _decode_into_cache(class_files, classes, paths, shape):
    """Decodes `classes` of `class_files` with tf.data and writes each class's cache file.

    Images come one at a time, in order, so each class is written as soon as
    it is complete, and a bad file costs only its own class's progress.
    """
    files = [file for c in classes for file in class_files.files[c]]
    image_size, _, channels = shape
    decoded = tf.data.Dataset.from_tensor_slices([str(file) for file in files]).map(
        lambda file: decode_resized(tf.io.read_file(file), image_size, channels),
        num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    images = iter(decoded.prefetch(tf.data.AUTOTUNE))
    for c in classes:
        try:
            arrays = [next(images).numpy() for _ in class_files.files[c]]
        except tf.errors.OpError as error:
            raise _first_bad_file(class_files.files[c], shape, error) from error
        _write_npy(paths[c], np.stack(arrays))


def _first_bad_file(files, shape, error):
    """The DataError naming the first of `files` that does not decode (tf.data names none)."""
    for file in files:
        try:
            decode_resized(tf.io.read_file(str(file)), shape[0], shape[2])
        except tf.errors.OpError as file_error:
            return DataError(f"{file}: not a readable image "
                             f"({tensorflow_error_text(file_error)})")
    return DataError(f"{files[0].parent}: decoding failed ({tensorflow_error_text(error)})")


def _write_npy(path, array):
    """Writes `array` to `path`, whole or not at all (atomic_files.py).

    Raises:
      DataError: the cache cannot be written (no space, read-only), naming it.
    """
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomically(path, lambda file: np.save(file, array, allow_pickle=False))
    except OSError as error:
        raise DataError(f"{path.parent}: cannot write the decoded-image cache "
                        f"({error.strerror or error})") from error
