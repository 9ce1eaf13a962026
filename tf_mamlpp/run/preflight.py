"""Checks that a run can work, made before TensorFlow loads and before anything is written.

`checked(config)` finds, in well under a second, what would otherwise fail
minutes later or leave a run directory that no corrected command can reuse:
- settings that break the constraint their field declares (config.py), and
  an image size the network cannot pool down;
- settings that conflict with the dataset or with each other;
- data that is missing or in no known layout, a class folder with no images,
  and tasks that ask for more classes than a split has or more images than
  its smallest class holds. Folder data sets are checked on their file index
  (image_folders.py): no image is decoded. Omniglot's splits are known.
  TensorFlow Datasets sets are checked on tfds's metadata (tfds_source.py):
  that tfds knows the name, the data set is prepared, and it has 2-D images
  and the label; their class sizes need a pass over the records' labels,
  which task_streams.prepare makes with `check_tasks_fit` once TensorFlow
  has loaded, still before the run directory is written.
Each raises a one-line ConfigError naming the settings (`way=7`, which main.py
spells `--way=7`), or a DataError naming the path. Errors that need the pixels
(a corrupt image) come when the data loads.
"""

import dataclasses
import os

from absl import logging

from tf_mamlpp.config_error import ConfigError
from tf_mamlpp.core.batch_norm_modes import check_task_norm_options
from tf_mamlpp.data import benchmark_splits, image_folders, omniglot_splits, tfds_source
from tf_mamlpp.data.class_images import DataError
from tf_mamlpp.run.config import NON_NEGATIVE, POSITIVE, TFDS, TFDS_PREFIX, value_type



def checked(config):
    """`config` checked against itself and the data's file index.

    Returns:
      `config`, with `channels` read from the images where it is None.

    Raises:
      ConfigError: an impossible or conflicting setting, naming it.
      DataError: missing or malformed data, naming the path.
    """
    check_settings(config)
    if config.dataset == "omniglot":
        _check_omniglot(config)
        return config
    if config.tfds_name is not None:
        return _checked_tfds(config)
    splits = image_folders.index_splits(config.data_dir, config.split_ratios,
                                        allow_unsplit=config.dataset == "folder")
    check_tasks_fit(config, splits)
    if config.dataset == "mini_imagenet":
        counts = {name: files.num_classes for name, files in splits.items()}
        if counts != image_folders.MINI_IMAGENET_CLASSES:
            logging.warning("%s has %s train/val/test classes, not mini-ImageNet's 64/16/20.",
                            config.data_dir, "/".join(map(str, counts.values())))
    if config.channels is None:
        config = _with_channels_read(config, image_folders.detect_channels(splits),
                                     config.data_dir)
    return config


def _with_channels_read(config, channels, source):
    """`config` with the channels read from the images of `source`, as the log says."""
    logging.info("Images of %s read as %s (--channels=%d).", source,
                 "RGB" if channels == 3 else "grayscale", channels)
    return dataclasses.replace(config, channels=channels)


def check_settings(config):
    """Checks what needs no data: constraints, image size, conflicting settings.

    Raises:
      ConfigError: naming the settings.
    """
    for field in dataclasses.fields(config):
        check_constraint(field, getattr(config, field.name))
    if config.image_size // 2 ** config.num_stages < 1:
        raise ConfigError(f"image_size={config.image_size} cannot be pooled by the "
                          f"{config.num_stages} conv stages, each of which halves it; use at "
                          f"least {2 ** config.num_stages}", "image_size")
    if config.dataset == "omniglot":
        conflicts = [name for name, value in (("image_size", 28), ("channels", 1))
                     if getattr(config, name) != value]
        if conflicts:
            settings = " ".join(f"{name}={getattr(config, name)}" for name in conflicts)
            raise ConfigError(f"{settings} conflicts with dataset=omniglot, whose images are "
                              "28x28 grayscale; leave it out", *conflicts, "dataset")
    if config.split_ratios is not None:
        if config.dataset != "folder" and not config.dataset.startswith(TFDS_PREFIX):
            raise ConfigError(f"split_ratios={config.split_ratios} conflicts with "
                              f"dataset={config.dataset}, which has fixed splits; it applies "
                              f"to dataset=folder and {TFDS} only", "split_ratios", "dataset")
        image_folders.parse_split_ratios(config.split_ratios)
    check_task_norm_options(config.bn_mode, config.task_norm_alpha, config.task_norm_unbiased,
                            config.task_norm_start)
    if config.tfds_name is not None:
        _check_tfds_settings(config)
    elif config.data_dir is None:
        raise ConfigError(f"dataset={config.dataset} needs data_dir=DIR, a folder with "
                          f"{image_folders.ALL_LAYOUTS}", "dataset", "data_dir")


def check_constraint(field, value):
    """Checks `value` of an ExperimentConfig field against the field's constraint.

    Raises:
      ConfigError: naming the setting.
    """
    constraint, name = field.metadata["constraint"], field.name
    if value is None or constraint is None:
        return
    if constraint == POSITIVE and value <= 0:
        bound = "at least 1" if value_type(field) is int else "positive"
        raise ConfigError(f"{name}={value}: must be {bound}", name)
    if constraint == NON_NEGATIVE and value < 0:
        raise ConfigError(f"{name}={value}: must not be negative", name)
    if isinstance(constraint, tuple) and value not in constraint:
        raise ConfigError(f"{name}={value!r}: must be one of {', '.join(map(str, constraint))}",
                          name)


def check_tasks_fit(config, splits):
    """Checks that every split has `way` classes and `shot` + `query` images in each.

    Args:
      config: the run's configuration.
      splits: split name -> its `image_folders.ClassFiles`.

    Raises:
      ConfigError: naming the settings, the split and, for too few images, the class.
    """
    for split, files in splits.items():
        if config.way > files.num_classes:
            raise ConfigError(f"way={config.way}: more than the {files.num_classes} classes "
                              f"of the {split} split ({files.source})", "way")
        counts = files.class_counts
        smallest = int(counts.argmin())
        if config.shot + config.query > counts[smallest]:
            raise ConfigError(f"shot={config.shot} plus query={config.query}: more than "
                              f"the {counts[smallest]} images of class {files.names[smallest]}, "
                              f"the smallest of the {split} split ({files.source})",
                              "shot", "query")


def _check_tfds_settings(config):
    if not config.tfds_name:
        raise ConfigError(f"dataset={config.dataset}: name the TensorFlow Datasets set, e.g. "
                          f"dataset={TFDS_PREFIX}cifar100", "dataset")
    if config.data_dir is not None:
        raise ConfigError(f"data_dir={config.data_dir} conflicts with dataset={config.dataset}, "
                          "which TensorFlow Datasets reads; pass tfds_data_dir=DIR instead",
                          "data_dir", "dataset", "tfds_data_dir")
    benchmark = benchmark_splits.BENCHMARKS.get(config.dataset)
    if benchmark and config.tfds_label != benchmark.tfds_label:
        raise ConfigError(f"tfds_label={config.tfds_label} conflicts with "
                          f"dataset={config.dataset}, whose classes are {benchmark.tfds_name}'s "
                          f"{benchmark.tfds_label}; it applies to {TFDS} only", "tfds_label",
                          "dataset")


def _checked_tfds(config):
    """`config`, its TensorFlow Datasets set found and checked, `channels` its images' own
    where it is None; any error names the dataset."""
    try:
        source = tfds_source.open_tfds(config.tfds_name, config.tfds_label,
                                       config.tfds_data_dir, config.tfds_download)
        if config.dataset in benchmark_splits.BENCHMARKS and source.prepared:
            benchmark_splits.class_indices(config.dataset, source.label_names)
    except (ConfigError, DataError) as error:
        fields = error.fields if isinstance(error, ConfigError) else ()
        raise ConfigError(f"dataset={config.dataset}: {error}", "dataset", *fields) from error
    if config.channels is None:
        config = _with_channels_read(config, source.channels, source.description)
    return config


def _check_omniglot(config):
    if not os.path.isdir(os.path.expanduser(config.data_dir)):
        raise DataError(f"{config.data_dir}: no such directory (expected the Omniglot zips "
                        "or folders there)")
    for split, classes in omniglot_splits.split_sizes(config.omniglot_split).items():
        if config.way > classes:
            raise ConfigError(f"way={config.way}: more than the {classes} classes of the "
                              f"{split} split (omniglot_split={config.omniglot_split})",
                              "way", "omniglot_split")
    if config.shot + config.query > omniglot_splits.IMAGES_PER_CLASS:
        raise ConfigError(f"shot={config.shot} plus query={config.query}: more than the "
                          f"{omniglot_splits.IMAGES_PER_CLASS} images of every Omniglot character",
                          "shot", "query")
