"""A TensorFlow Datasets image set as ClassImages, its images decoded once into a per-class cache.

Every split of the data set is pooled: few-shot splits divide classes, not
images (tfds's own train/test split of caltech_birds2011 divides each
class's images). The first time, the tfds records are read twice: once for
the labels alone, which gives each class's size, so that tasks too large for
a class fail before any image is decoded; then for the images, each resized
to `image_size` by area averaging, made grayscale or RGB and rounded to 8
bits as an image file is (image_decoding.resized_8bit), so that the export's
file signature gives a model the pixels it was trained on. Images labelled
-1 (no class, as in unlabelled splits) are left out.

The cache lies beside the prepared data set in the tfds data directory,
`<name>/<version>/.tf_mamlpp_cache/<size>x<size>x<channels>/<label>/`, or
under ~/.cache/tf_mamlpp when that folder is read-only (decoded_images.py's
`cache_dir`): one uint8 .npy per class and the class sizes, so a second start
reads no record. A tfds version's records never change, so the cache is keyed
by data set, version, label, size and channels alone. Loading reads it into
memory (`ClassImages`) or maps it (`MappedClassImages`), as for image folders.
"""

import dataclasses
import json
import os

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds
from absl import logging

from tf_mamlpp.atomic_files import write_atomically
from tf_mamlpp.data import decoded_images
from tf_mamlpp.data.class_images import DataError
from tf_mamlpp.data.image_decoding import resized_8bit
from tf_mamlpp.data.tfds_source import DEFAULT_LABEL, open_tfds, tfds_quiet
from tf_mamlpp.error_text import tensorflow_error_text

CLASS_COUNTS = "class_counts.json"
_BATCH = 256


@dataclasses.dataclass(frozen=True)
class TfdsClasses:
    """Some classes of a tfds set, e.g. one split's: what image_folders.ClassFiles is for folders.

    Attributes:
      indices: the classes' label indices.
      names: one name per class.
      class_counts: int64, images of each class.
      source: the data set, for messages.
    """

    indices: list[int]
    names: list[str]
    class_counts: np.ndarray
    source: str

    @property
    def num_classes(self) -> int:
        return len(self.indices)


class TfdsImages:
    """One tfds set's images at one size and channel count, decoded once into the cache.

    Args:
      source: the data set, from tfds_source.open_tfds.
      image_size: side of the square images, in pixels.
      channels: 1 or 3; None takes the images' own.
      cache_dir: where the cache goes when the data set's folder is read-only.
    """

    def __init__(self, source, image_size, channels=None,
                 cache_dir=decoded_images.DEFAULT_CACHE_DIR):
        self.source = source
        self.shape = (image_size, image_size, channels or source.channels)
        self.cache_dir = cache_dir

    @property
    def directory(self):
        """The cache folder; asked each time, as the data set's folder may come with a download."""
        return decoded_images.cache_dir(self.source.builder.data_dir, self.shape[0],
                                        self.shape[2], self.cache_dir) / self.source.label_key

    def class_counts(self) -> np.ndarray:
        """int64, the images of each class of the label, all splits pooled.

        Read from the cache, else from the records' labels alone (downloading
        the data set first where it is not prepared: the caller asked to).

        Raises:
          DataError: the records cannot be read or downloaded, naming the data set.
        """
        if not self.source.prepared:
            self._download()
        path = self.directory / CLASS_COUNTS
        splits = {name: split.num_examples
                  for name, split in self.source.builder.info.splits.items()}
        try:
            cached = json.loads(path.read_text())
            if cached["splits"] == splits:
                return np.array(cached["counts"], dtype=np.int64)
        except (OSError, ValueError, KeyError, TypeError):
            pass
        label_key = self.source.label_key
        labels = self._records([label_key]).map(lambda example: example[label_key])
        try:
            labels = np.concatenate([np.zeros(0, np.int64)]
                                    + [batch.numpy() for batch in labels.batch(65536)])
        except tf.errors.OpError as error:
            raise self._unreadable(error) from error
        counts = np.bincount(labels[labels >= 0], minlength=len(self.source.label_names))
        if len(counts) > len(self.source.label_names):
            raise DataError(f"{self.source.description}: label {len(counts) - 1} is past its "
                            f"{len(self.source.label_names)} classes")
        text = json.dumps({"splits": splits, "counts": counts.tolist()})
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            write_atomically(path, lambda file: file.write(text.encode()))
        except OSError as error:
            raise DataError(f"{self.directory}: cannot write the decoded-image cache "
                            f"({error.strerror or error})") from error
        return counts.astype(np.int64)

    def classes(self, indices=None, names=None) -> TfdsClasses:
        """The classes `indices` (default: every class that has images), named `names`
        (default: the label's names)."""
        counts, label_names = self.class_counts(), self.source.label_names
        indices = [int(c) for c in (np.flatnonzero(counts) if indices is None else indices)]
        names = names or [label_names[c] for c in indices]
        return TfdsClasses(indices, list(names), counts[indices], self.source.description)

    def decoded_bytes(self, classes: TfdsClasses) -> int:
        return int(classes.class_counts.sum()) * int(np.prod(self.shape))

    def load(self, classes: TfdsClasses, in_memory=True):
        """The images of `classes`, decoding the data set into the cache if it lacks them.

        Returns:
          uint8 `ClassImages` in memory, or `MappedClassImages` read from the
          cache as episodes need them.

        Raises:
          DataError: a class has no images, or the records cannot be read.
        """
        empty = [name for name, count in zip(classes.names, classes.class_counts) if not count]
        if empty:
            raise DataError(f"{classes.source}: class {empty[0]} has no images")
        self.decode()
        return decoded_images.read_classes([self._path(c) for c in classes.indices],
                                           classes.class_counts, classes.names, self.shape,
                                           in_memory)

    def decode(self):
        """Decodes every image into the cache unless it holds them all already."""
        counts = self.class_counts()
        present = np.flatnonzero(counts)
        if all(decoded_images.open_cached(self._path(c), int(counts[c]), self.shape) is not None
               for c in present):
            return
        logging.info("Decoding the %d images of %s into %s.", counts.sum(),
                     self.source.description, self.directory)
        partial = {c: self.directory / f".{self._path(c).name}.partial" for c in present}
        arrays = {c: np.lib.format.open_memmap(partial[c], mode="w+", dtype=np.uint8,
                                               shape=(int(counts[c]), *self.shape))
                  for c in present}
        filled = np.zeros_like(counts)
        for images, labels in self._decoded_images():
            for c in np.unique(labels[labels >= 0]):
                chosen = images[labels == c]
                end = filled[c] + len(chosen)
                if c not in arrays or end > counts[c]:
                    raise self._changed()
                arrays[c][filled[c]:end] = chosen
                filled[c] = end
        if (filled != counts).any():
            raise self._changed()
        for c, array in arrays.items():
            array.flush()
            os.replace(partial[c], self._path(c))

    def _path(self, label):
        return self.directory / f"{label:05d}.npy"

    def _decoded_images(self):
        """(uint8 images, labels) numpy batches of every record, in the records' order."""
        image_key, label_key = self.source.image_key, self.source.label_key
        size, _, channels = self.shape
        batches = self._records([image_key, label_key]).map(
            lambda example: (resized_8bit(example[image_key], size, channels),
                             example[label_key]),
            num_parallel_calls=tf.data.AUTOTUNE, deterministic=True).batch(_BATCH)
        try:
            for images, labels in batches.prefetch(tf.data.AUTOTUNE):
                yield images.numpy(), labels.numpy()
        except tf.errors.OpError as error:
            raise self._unreadable(error) from error

    def _unreadable(self, error):
        return DataError(f"{self.source.description}: unreadable records "
                         f"({tensorflow_error_text(error)})")

    def _changed(self):
        return DataError(f"{self.source.description}: its records changed while read; run "
                         "the command again")

    def _records(self, features):
        """Every split's records in a fixed order, only `features` decoded."""
        builder = self.source.builder
        with tfds_quiet():
            return builder.as_dataset(
                split="+".join(builder.info.splits), shuffle_files=False,
                decoders=tfds.decode.PartialDecoding({key: True for key in features}),
                read_config=tfds.ReadConfig(try_autocache=False))

    def _download(self):
        builder = self.source.builder
        logging.info("Downloading and preparing %s (tfds_download).", self.source.description)
        try:
            builder.download_and_prepare()
        except Exception as error:  # tfds fails in many ways offline; name what was tried
            raise DataError(f"{self.source.description}: download failed "
                            f"({tensorflow_error_text(error)})") from error


def load_tfds(name, image_size, channels=None, tfds_label=DEFAULT_LABEL, tfds_data_dir=None,
              tfds_download=False, in_memory=True, cache_dir=None):
    """Every class of a prepared TensorFlow Datasets image set, as the command line reads it.

        images = tf_mamlpp.load_tfds("cifar100", image_size=32)

    Args:
      name: the tfds name, e.g. "cifar100" or "caltech_birds2011".
      image_size: side of the square images, in pixels (area averaging).
      channels: 1 (grayscale) or 3 (RGB); None keeps the images' own.
      tfds_label: the class-label feature, e.g. "coarse_label".
      tfds_data_dir: where tfds keeps prepared data sets (None: tfds's default).
      tfds_download: let tfds download a data set that is not prepared.
      in_memory: False maps the cache files instead of reading them.
      cache_dir: where the cache goes when the data set's folder is read-only.

    Returns:
      uint8 `ClassImages` of every class that has images, in label order,
      named by the label's names; `episode_dataset` takes it as it is.

    Raises:
      ConfigError, DataError: as tfds_source.open_tfds and `TfdsImages`.
    """
    images = TfdsImages(open_tfds(name, tfds_label, tfds_data_dir, tfds_download), image_size,
                        channels, cache_dir or decoded_images.DEFAULT_CACHE_DIR)
    return images.load(images.classes(), in_memory)
