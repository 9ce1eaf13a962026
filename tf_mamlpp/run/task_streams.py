"""From a run's configuration to its three task streams.

Omniglot comes from omniglot.py. Mini-ImageNet and any other folder of images
(`--dataset=folder`) come from image_folders.py, which lists each class's
files, and decoded_images.py, which decodes them once into a cache; a data
set whose decoded images exceed `--in_memory_limit_gb` is read from that cache
as episodes need it instead of being loaded. The benchmarks and `tfds:NAME`
come from TensorFlow Datasets through tfds_images.py, split by the published
class lists (benchmark_splits.py) or, for `tfds:NAME`, as a plain folder of
classes is, and cached and loaded the same way.

Each split has its own seed, so the validation and test task sets are fixed
lists of tasks that every evaluation sees alike, and the training stream is a
pure function of the iteration: resuming at iteration i needs only i.
"""

from absl import logging

from tf_mamlpp.data import (benchmark_splits, decoded_images, image_folders, omniglot,
                            tfds_images, tfds_source)
from tf_mamlpp.data.episodes import EpisodeSpec, episode_dataset
from tf_mamlpp.run import preflight

SPLIT_STREAMS = {"train": 0, "val": 1, "test": 2}
GIB = 2 ** 30


def prepare(config):
    """Decodes the configured data set into its cache, if need be, without loading it.

    Run before the run directory is written, so that a corrupt file fails
    the command before it changes anything; `load_splits` then reads the cache.

    Raises:
      DataError: missing or unreadable data, naming the path.
    """
    if config.dataset == "omniglot":
        omniglot.load_omniglot(config.data_dir)
        return
    if config.tfds_name is not None:
        _tfds_splits(config)[0].decode()
        return
    directory = decoded_images.cache_dir(config.data_dir, config.image_size, config.channels)
    for files in _index(config).values():
        decoded_images.fill_cache(files, config.image_size, config.channels, directory)


def _index(config):
    return image_folders.index_splits(config.data_dir, config.split_ratios,
                                      allow_unsplit=config.dataset == "folder")


def _tfds_splits(config):
    """The configured TensorFlow Datasets set's images and each split's `TfdsClasses`,
    checked to fit the tasks before any image is decoded.

    Raises:
      ConfigError: the tasks do not fit, as preflight.check_tasks_fit.
      DataError: the records cannot be read, naming the data set.
    """
    source = tfds_source.open_tfds(config.tfds_name, config.tfds_label, config.tfds_data_dir,
                                   config.tfds_download)
    images = tfds_images.TfdsImages(source, config.image_size, config.channels)
    images.class_counts()  # prepares the data set first where tfds_download asks for it
    if config.dataset in benchmark_splits.BENCHMARKS:
        names = benchmark_splits.published_classes(config.dataset)
        splits = {split: images.classes(indices, names[split]) for split, indices in
                  benchmark_splits.class_indices(config.dataset, source.label_names).items()}
    else:
        present = images.classes()
        splits = {split: images.classes([present.indices[c] for c in chosen])
                  for split, chosen in image_folders.split_by_ratios(
                      present.num_classes, config.split_ratios).items()}
    preflight.check_tasks_fit(config, splits)
    return images, splits


def _held_in_memory(config, source, splits, size):
    """Whether the decoded images (`size` bytes) fit in_memory_limit_gb, as the log says."""
    in_memory = size <= config.in_memory_limit_gb * GIB
    logging.info("%s: %s classes, %.2f GiB decoded, %s.", source,
                 "/".join(str(classes.num_classes) for classes in splits.values()), size / GIB,
                 "held in memory" if in_memory else
                 f"read from the cache as needed (over in_memory_limit_gb="
                 f"{config.in_memory_limit_gb:g})")
    return in_memory


def load_splits(config):
    """The train/val/test images of the configured dataset.

    Returns:
      {"train", "val", "test"} to `ClassImages`, or to `MappedClassImages`
      for a folder or tfds data set larger than `config.in_memory_limit_gb`.

    Raises:
      DataError: missing or unreadable data, naming the path.
    """
    if config.dataset == "omniglot":
        images = omniglot.load_omniglot(config.data_dir)
        indices = omniglot.split_classes(
            omniglot.num_background_classes(images), images.num_classes,
            scheme=config.omniglot_split)
        return {name: images.select(classes) for name, classes in indices.items()}
    if config.tfds_name is not None:
        images, splits = _tfds_splits(config)
        in_memory = _held_in_memory(config, images.source.description, splits, sum(
            images.decoded_bytes(classes) for classes in splits.values()))
        return {name: images.load(classes, in_memory) for name, classes in splits.items()}
    splits = _index(config)
    size = sum(decoded_images.decoded_bytes(files, config.image_size, config.channels)
               for files in splits.values())
    in_memory = _held_in_memory(config, config.data_dir, splits, size)
    directory = decoded_images.cache_dir(config.data_dir, config.image_size, config.channels)
    return {name: decoded_images.load_split(files, config.image_size, config.channels,
                                            directory, in_memory)
            for name, files in splits.items()}


def stream_seed(config, split):
    """The episode seed of `split`; distinct splits never share a stream."""
    return config.seed * len(SPLIT_STREAMS) + SPLIT_STREAMS[split]


def training_tasks(config, train_images, start_iteration=0):
    """Endless meta-batches, starting at meta-iteration `start_iteration`.

    Classes are rotated by multiples of 90 degrees where `config.augment`
    says (Omniglot's default; the paper does not rotate mini-ImageNet).
    """
    return episode_dataset(
        train_images, EpisodeSpec(config.way, config.shot, config.query), config.batch_size,
        seed=stream_seed(config, "train"), augment=config.augment,
        start_index=start_iteration * config.batch_size)


def evaluation_tasks(config, images, split, num_tasks):
    """The fixed, unaugmented task set of `split` ("val" or "test")."""
    return episode_dataset(
        images, EpisodeSpec(config.way, config.shot, config.query), config.batch_size,
        seed=stream_seed(config, split), augment=False, num_tasks=num_tasks)
