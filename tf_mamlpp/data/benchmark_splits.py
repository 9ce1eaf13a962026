"""The few-shot benchmarks read through TensorFlow Datasets, with their published class splits.

A benchmark is a tfds image set plus the list of classes that its paper
assigns to training, validation and test. The lists are the published ones,
shipped as data in class_lists/ (each file says where it was copied from),
never a shuffle of our own, so that results compare with the papers':
- cifar_fs: CIFAR-FS (Bertinetto et al., ICLR 2019), 64/16/20 of CIFAR-100's
  fine classes, as the authors' split files list them (copied from
  tristandeleu/pytorch-meta's assets);
- fc100: FC100 (Oreshkin et al., NeurIPS 2018), CIFAR-100 split by
  superclass, 12/4/4 superclasses (60/20/20 classes), TADAM's `class_split`;
- cub: CUB-200-2011, the 100/50/50 split of Chen et al. (ICLR 2019, "A Closer
  Look at Few-shot Classification"), by CloserLookFewShot's
  write_CUB_filelist.py.
A published class is found among the tfds set's classes by name, so a tfds
set whose classes are named or numbered otherwise fails with the class named.
"""

import dataclasses
import json
import pathlib
from collections.abc import Callable

from tf_mamlpp.data.class_images import DataError
from tf_mamlpp.data.image_folders import SPLITS

CLASS_LISTS = pathlib.Path(__file__).with_name("class_lists")


@dataclasses.dataclass(frozen=True)
class Benchmark:
    """Where a benchmark's images are in TensorFlow Datasets.

    Attributes:
      title: as its paper names it, for messages.
      tfds_name, tfds_label: the tfds set and its class-label feature.
      tfds_class: a published class name -> that class's name in the label.
    """

    title: str
    tfds_name: str
    tfds_label: str
    tfds_class: Callable[[str], str] = str


def _cub_label_name(folder):
    """tfds names caltech_birds2011's classes by number alone: "001.Black_footed_Albatross",
    the first folder, is label 0, named "0" (its caltech_birds.py reads int(NNN) - 1)."""
    return str(int(folder.split(".", 1)[0]) - 1)


BENCHMARKS = {
    "cifar_fs": Benchmark("CIFAR-FS", "cifar100", "label"),
    "fc100": Benchmark("FC100", "cifar100", "label"),
    "cub": Benchmark("CUB", "caltech_birds2011", "label", _cub_label_name),
}


def published_classes(benchmark: str) -> dict[str, list[str]]:
    """train/val/test -> the class names that the benchmark's paper assigns to it."""
    lists = json.loads((CLASS_LISTS / f"{benchmark}.json").read_text())
    return {split: lists[split] for split in SPLITS}


def class_indices(benchmark: str, label_names: list[str]) -> dict[str, list[int]]:
    """train/val/test -> the indices of its published classes among `label_names`.

    Args:
      benchmark: a key of BENCHMARKS.
      label_names: the class names of the tfds set's label feature, in index order.

    Raises:
      DataError: a published class is not among them, naming it.
    """
    spec = BENCHMARKS[benchmark]
    index = {name: position for position, name in enumerate(label_names)}
    splits = {}
    for split, names in published_classes(benchmark).items():
        missing = [name for name in names if spec.tfds_class(name) not in index]
        if missing:
            raise DataError(f"{spec.tfds_name}'s {spec.tfds_label} has no class "
                            f"{spec.tfds_class(missing[0])!r} ({spec.title}'s {split} class "
                            f"{missing[0]}), so it is not the data set {spec.title} is made of")
        splits[split] = [index[spec.tfds_class(name)] for name in names]
    return splits
