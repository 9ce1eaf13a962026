"""From a run's configuration to its three task streams.

Omniglot comes from omniglot.py. Mini-ImageNet and any other folder of images
(`--dataset=folder`) come from image_folders.py, which lists each class's
files, and decoded_images.py, which decodes them once into a cache; a data
set whose decoded images exceed `--in_memory_limit_gb` is read from that cache
as episodes need it instead of being loaded.

Each split has its own seed, so the validation and test task sets are fixed
lists of tasks that every evaluation sees alike, and the training stream is a
pure function of the iteration: resuming at iteration i needs only i.
"""

from absl import logging

from tf_mamlpp.data import decoded_images, image_folders, omniglot
from tf_mamlpp.data.episodes import EpisodeSpec, episode_dataset

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
    directory = decoded_images.cache_dir(config.data_dir, config.image_size, config.channels)
    for files in _index(config).values():
        decoded_images.fill_cache(files, config.image_size, config.channels, directory)


def _index(config):
    return image_folders.index_splits(config.data_dir, config.split_ratios,
                                      allow_unsplit=config.dataset == "folder")


def load_splits(config):
    """The train/val/test images of the configured dataset.

    Returns:
      {"train", "val", "test"} to `ClassImages`, or to `MappedClassImages`
      for a folder data set larger than `config.in_memory_limit_gb`.

    Raises:
      DataError: missing or unreadable data, naming the path.
    """
    if config.dataset == "omniglot":
        images = omniglot.load_omniglot(config.data_dir)
        indices = omniglot.split_classes(
            omniglot.num_background_classes(images), images.num_classes,
            scheme=config.omniglot_split)
        return {name: images.select(classes) for name, classes in indices.items()}
    splits = _index(config)
    size = sum(decoded_images.decoded_bytes(files, config.image_size, config.channels)
               for files in splits.values())
    in_memory = size <= config.in_memory_limit_gb * GIB
    logging.info("%s: %s classes, %.2f GiB decoded, %s.", config.data_dir,
                 "/".join(str(files.num_classes) for files in splits.values()), size / GIB,
                 "held in memory" if in_memory else
                 f"read from the cache as needed (over in_memory_limit_gb="
                 f"{config.in_memory_limit_gb:g})")
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
