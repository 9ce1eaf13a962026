"""From a run's configuration to its three task streams.

Each split has its own seed, so the validation and test task sets are fixed
lists of tasks that every evaluation sees alike, and the training stream is a
pure function of the iteration: resuming at iteration i needs only i.
"""

from tf_mamlpp import omniglot
from tf_mamlpp.episodes import EpisodeSpec, episode_dataset

SPLIT_STREAMS = {"train": 0, "val": 1, "test": 2}


def load_splits(config):
    """The train/val/test `ClassImages` of the configured dataset.

    Raises:
      DataError: missing or unreadable data, naming the path.
    """
    images = omniglot.load_omniglot(config.data_dir)
    indices = omniglot.split_classes(
        omniglot.num_background_classes(images), images.num_classes,
        scheme=config.omniglot_split)
    return {name: images.select(classes) for name, classes in indices.items()}


def stream_seed(config, split):
    """The episode seed of `split`; distinct splits never share a stream."""
    return config.seed * len(SPLIT_STREAMS) + SPLIT_STREAMS[split]


def training_tasks(config, train_images, start_iteration=0):
    """Endless augmented meta-batches, starting at meta-iteration `start_iteration`."""
    return episode_dataset(
        train_images, EpisodeSpec(config.way, config.shot, config.query), config.batch_size,
        seed=stream_seed(config, "train"), augment=True,
        start_index=start_iteration * config.batch_size)


def evaluation_tasks(config, images, split, num_tasks):
    """The fixed, unaugmented task set of `split` ("val" or "test")."""
    return episode_dataset(
        images, EpisodeSpec(config.way, config.shot, config.query), config.batch_size,
        seed=stream_seed(config, split), augment=False, num_tasks=num_tasks)
