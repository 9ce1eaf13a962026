"""A prepared TensorFlow Datasets image set: found, and its features checked, without reading it.

`open_tfds` finds the data set in a tfds data directory and checks that it
can serve few-shot tasks: a 2-D image feature of 8-bit pixels and a
`ClassLabel` feature that names each image's class. Only tfds's metadata is
read (dataset_info.json, features.json), never a record, and TensorFlow is
not loaded, so that a wrong name, an unprepared data set or a missing label
ends the command in about a second, before anything is written.

Reading is always `download=False`: a data set that is not prepared is an
error that says how to prepare it (`tfds build NAME` where there is
internet, then copy the data directory), unless the caller asked for the
download (`tfds_download`); nothing waits on a network that is not there.
tensorflow_datasets itself is imported on first use, as it takes most of a
second and only these data sets need it.
"""

import contextlib
import dataclasses

import numpy as np
from absl import logging

from tf_mamlpp.config_error import ConfigError
from tf_mamlpp.data.class_images import DataError

IMAGE_KEY = "image"  # the image feature's name in most tfds image sets
DEFAULT_LABEL = "label"


@dataclasses.dataclass(frozen=True)
class TfdsSource:
    """A tfds data set, opened and checked.

    Attributes:
      name: as given, e.g. "cifar100" or "cifar10_corrupted/fog_1:1.0.0".
      data_dir: the tfds data directory it was looked for in.
      builder: its `tfds.core.DatasetBuilder`, which reads the prepared records.
      image_key, label_key: the features read.
      channels: 1 or 3, the images' own (alpha is dropped).
    """

    name: str
    data_dir: str
    builder: object
    image_key: str
    label_key: str
    channels: int

    @property
    def label_names(self) -> list[str]:
        """One name per class of the label ("0", "1", ... where the data set names none,
        and, for some data sets, until they are prepared: tfds reads the names then)."""
        return list(self.builder.info.features[self.label_key].names)

    @property
    def prepared(self) -> bool:
        """Whether its records are on disk; if not, the caller asked to download them."""
        return self.builder.is_prepared()

    @property
    def description(self) -> str:
        """`cifar100 3.0.2 in DIR`, for messages."""
        return f"{self.name} {self.builder.info.version} in {self.data_dir}"


@contextlib.contextmanager
def tfds_quiet():
    """Runs the block with tfds's log lines left out.

    tfds reports each step (dataset info loaded, a version folder skipped)
    through absl, the project's own logger, where its lines would read as
    the project's; its errors still show.
    """
    verbosity = logging.get_verbosity()
    logging.set_verbosity(logging.ERROR)
    try:
        yield
    finally:
        logging.set_verbosity(verbosity)


def open_tfds(name, tfds_label=DEFAULT_LABEL, tfds_data_dir=None, tfds_download=False):
    """The prepared tfds data set `name` in `tfds_data_dir`, checked for few-shot use.

    Args:
      name: a tfds name, with a config or version if need be ("mnist:3.0.1").
      tfds_label: the `ClassLabel` feature that gives each image's class.
      tfds_data_dir: where tfds keeps prepared data sets; None is tfds's own
        default (~/tensorflow_datasets or $TFDS_DATA_DIR).
      tfds_download: accept a data set that is not prepared, for the caller
        to download with `builder.download_and_prepare()`.

    Raises:
      DataError: tfds knows no such data set, or it has no 2-D 8-bit image.
      ConfigError: it is not prepared (naming tfds_data_dir and tfds_download),
        or it has no such label (naming tfds_label).
    """
    import tensorflow_datasets as tfds

    data_dir = tfds_data_dir or tfds.core.constants.DATA_DIR
    with tfds_quiet():
        try:
            builder = tfds.builder(name, data_dir=data_dir)
        except tfds.core.registered.DatasetNotFoundError:
            raise DataError(f"TensorFlow Datasets knows no data set {name!r}, and {data_dir} "
                            "holds none prepared under that name") from None
        except (ValueError, OSError) as error:  # a malformed name or unreadable metadata
            raise DataError(f"TensorFlow Datasets cannot open {name!r} in {data_dir} "
                            f"({str(error).splitlines()[0]})") from None
        prepared = builder.is_prepared()
        if not prepared:
            builder = _another_prepared_version(name, data_dir) or builder
            prepared = builder.is_prepared()
    if not prepared and not tfds_download:
        raise ConfigError(
            f"TensorFlow Datasets' {name} {builder.info.version} is not prepared in "
            f"{data_dir}; prepare it on a machine with internet (`tfds build {name} "
            f"--data_dir=DIR`), copy DIR here and pass tfds_data_dir=DIR, or pass "
            f"tfds_download=true to let tfds download it", "tfds_data_dir", "tfds_download")
    features = builder.info.features
    image_key = _image_key(name, features)
    label = features[tfds_label] if tfds_label in features else None
    if not isinstance(label, tfds.features.ClassLabel):
        labels = [key for key, feature in features.items()
                  if isinstance(feature, tfds.features.ClassLabel)]
        raise ConfigError(f"tfds_label={tfds_label}: {name} has no class label of that name "
                          f"(its class labels: {', '.join(labels) or 'none'})", "tfds_label")
    return TfdsSource(name, str(data_dir), builder, image_key, tfds_label,
                      1 if features[image_key].shape[-1] in (1, 2) else 3)


def _another_prepared_version(name, data_dir):
    """The newest prepared version of `name` when the code's own version is not prepared."""
    import tensorflow_datasets as tfds

    try:
        return tfds.core.read_only_builder.builder_from_files(name, data_dir=data_dir)
    except (tfds.core.registered.DatasetNotFoundError, ValueError, OSError):
        return None


def _image_key(name, features):
    """The feature that holds the images: "image", else the data set's only image feature.

    Raises:
      DataError: there is none, or it is no 2-D 8-bit image of 1 to 4 channels.
    """
    import tensorflow_datasets as tfds

    images = [key for key, feature in features.items()
              if isinstance(feature, tfds.features.Image)]
    key = IMAGE_KEY if IMAGE_KEY in features else images[0] if len(images) == 1 else None
    if key is None:
        raise DataError(f"{name} has no feature {IMAGE_KEY!r} and not one image feature but "
                        f"{len(images)} (its features: {', '.join(features)})")
    feature = features[key]
    if not isinstance(feature, tfds.features.Image):
        raise DataError(f"{name}'s {key!r} is not a 2-D image but a {type(feature).__name__} "
                        f"of shape {feature.shape}")
    if np.dtype(feature.np_dtype) != np.uint8 or feature.shape[-1] not in (1, 2, 3, 4):
        raise DataError(f"{name}'s {key!r} images are {feature.np_dtype.__name__} with "
                        f"{feature.shape[-1]} channels; 8-bit images of 1 to 4 channels "
                        "can be read")
    return key
