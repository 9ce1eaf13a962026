"""Checks that a run can work, made before TensorFlow loads and before anything is written.

`checked(config)` finds, in well under a second, what would otherwise fail
minutes later or leave a run directory that no corrected command can reuse:
- counts that are zero or negative, and an image size the network cannot
  pool down;
- flags that conflict with the dataset or with each other;
- data that is missing or in no known layout, a class folder with no images,
  and tasks that ask for more classes than a split has or more images than
  its smallest class holds. Folder data sets are checked on their file index
  (image_folders.py): no image is decoded. Omniglot's splits are known.
Each raises a one-line ValueError naming the flag, or a DataError naming the
path. Errors that need the pixels (a corrupt image) come when the data loads.
"""

import dataclasses
import os

from absl import logging

from tf_mamlpp.data import image_folders
from tf_mamlpp.data.class_images import DataError

# Classes per split as omniglot.split_classes divides the 1623 characters (20
# drawings each); episodes.episode_dataset checks the loaded data again.
OMNIGLOT_SPLITS = {"mamlpp": {"train": 1150, "val": 50, "test": 423},
                   "lake": {"train": 914, "val": 50, "test": 659}}
OMNIGLOT_IMAGES_PER_CLASS = 20
MINI_IMAGENET_CLASSES = {"train": 64, "val": 16, "test": 20}

POSITIVE = ("way", "shot", "query", "batch_size", "filters", "num_stages", "inner_steps",
            "eval_inner_steps", "epochs", "iters_per_epoch", "val_tasks", "test_tasks",
            "image_size")
NON_NEGATIVE = ("msl_epochs", "first_order_epochs", "in_memory_limit_gb")


def checked(config):
    """`config` checked against itself and the data's file index.

    Returns:
      `config`, with `channels` read from the images where it is None.

    Raises:
      ValueError: an impossible or conflicting setting, naming the flag.
      DataError: missing or malformed data, naming the path.
    """
    check_settings(config)
    if config.dataset == "omniglot":
        _check_omniglot(config)
        return config
    splits = image_folders.index_splits(config.data_dir, config.split_ratios,
                                        allow_unsplit=config.dataset == "folder")
    check_tasks_fit(config, splits)
    if config.dataset == "mini_imagenet":
        counts = {name: files.num_classes for name, files in splits.items()}
        if counts != MINI_IMAGENET_CLASSES:
            logging.warning("%s has %s train/val/test classes, not mini-ImageNet's 64/16/20.",
                            config.data_dir, "/".join(map(str, counts.values())))
    if config.channels is None:
        channels = image_folders.detect_channels(splits)
        logging.info("Images of %s read as %s (--channels=%d).", config.data_dir,
                     "RGB" if channels == 3 else "grayscale", channels)
        config = dataclasses.replace(config, channels=channels)
    return config


def check_settings(config):
    """Checks what needs no data: counts, image size, conflicting flags.

    Raises:
      ValueError: naming the flag.
    """
    for name in POSITIVE:
        if getattr(config, name) < 1:
            raise ValueError(f"--{name}={getattr(config, name)}: must be at least 1")
    for name in NON_NEGATIVE:
        if getattr(config, name) < 0:
            raise ValueError(f"--{name}={getattr(config, name)}: must not be negative")
    if config.meta_lr <= 0:
        raise ValueError(f"--meta_lr={config.meta_lr}: must be positive")
    if config.image_size // 2 ** config.num_stages < 1:
        raise ValueError(f"--image_size={config.image_size} cannot be pooled by the "
                         f"{config.num_stages} conv stages, each of which halves it; use at "
                         f"least {2 ** config.num_stages}")
    if config.channels not in (None, 1, 3):
        raise ValueError(f"--channels={config.channels}: must be 1 (grayscale) or 3 (RGB)")
    if config.dataset == "omniglot":
        conflicts = [f"--{name}={getattr(config, name)}"
                     for name, value in (("image_size", 28), ("channels", 1))
                     if getattr(config, name) != value]
        if conflicts:
            raise ValueError(f"{' '.join(conflicts)} conflicts with --dataset=omniglot, whose "
                             "images are 28x28 grayscale; leave it out")
    if config.split_ratios is not None:
        if config.dataset != "folder":
            raise ValueError(f"--split_ratios conflicts with --dataset={config.dataset}, "
                             "which has fixed splits; it applies to --dataset=folder only")
        image_folders.parse_split_ratios(config.split_ratios)
    if config.data_dir is None:
        raise ValueError(f"--dataset={config.dataset} needs --data_dir=DIR, a folder with "
                         f"{image_folders.ALL_LAYOUTS}")


def check_tasks_fit(config, splits):
    """Checks that every split has --way classes and --shot + --query images in each.

    Args:
      config: the run's configuration.
      splits: split name -> its `image_folders.ClassFiles`.

    Raises:
      ValueError: naming the flags, the split and, for too few images, the class.
    """
    for split, files in splits.items():
        if config.way > files.num_classes:
            raise ValueError(f"--way={config.way}: more than the {files.num_classes} classes "
                             f"of the {split} split ({files.source})")
        counts = files.class_counts
        smallest = int(counts.argmin())
        if config.shot + config.query > counts[smallest]:
            raise ValueError(f"--shot={config.shot} plus --query={config.query}: more than "
                             f"the {counts[smallest]} images of class {files.names[smallest]}, "
                             f"the smallest of the {split} split ({files.source})")


def _check_omniglot(config):
    if not os.path.isdir(os.path.expanduser(config.data_dir)):
        raise DataError(f"{config.data_dir}: no such directory (expected the Omniglot zips "
                        "or folders; check --data_dir)")
    for split, classes in OMNIGLOT_SPLITS[config.omniglot_split].items():
        if config.way > classes:
            raise ValueError(f"--way={config.way}: more than the {classes} classes of the "
                             f"{split} split (--omniglot_split={config.omniglot_split})")
    if config.shot + config.query > OMNIGLOT_IMAGES_PER_CLASS:
        raise ValueError(f"--shot={config.shot} plus --query={config.query}: more than the "
                         f"{OMNIGLOT_IMAGES_PER_CLASS} images of every Omniglot character")
