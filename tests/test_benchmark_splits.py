"""Specification of tf_mamlpp.data.benchmark_splits: the published class splits, as runs read them.

There is no internet here to prepare CIFAR-100 or CUB-200-2011, so the loaders
run under `tfds.testing.mock_data` on tfds's real builders: the test writes
their metadata (split sizes, label names) into a tfds data directory with
tfds's own `DatasetInfo.write_to_directory`, and the mock hands over records
whose labels fill every class, each image's pixels holding its label index.
A split then must hold exactly its published classes, each class exactly the
images of the tfds label it names, and no image may be in two splits.
"""

import itertools
import json
import pathlib

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds
from absl import flags

from tf_mamlpp.data.benchmark_splits import (BENCHMARKS, CLASS_LISTS, class_indices,
                                             published_classes)
from tf_mamlpp.data.class_images import DataError
from tf_mamlpp.run import config_flags, preflight, task_streams
from tf_mamlpp.run.config import resolve

REPOSITORY = pathlib.Path(__file__).resolve().parents[1]
IMAGES_PER_CLASS = 2
# The sizes and settings each benchmark's papers use: (image size, target images per class).
PAPER_SETTINGS = {"cifar_fs": (32, 15), "fc100": (32, 15), "cub": (84, 16)}
SPLIT_SIZES = {"cifar_fs": (64, 16, 20), "fc100": (60, 20, 20), "cub": (100, 50, 50)}


def all_classes(benchmark):
    return list(itertools.chain(*published_classes(benchmark).values()))


def fc100_superclasses():
    return json.loads((CLASS_LISTS / "fc100.json").read_text())["superclasses"]


def cifar100_label_names():
    """CIFAR-100's 100 fine and 20 coarse names, in an order of their own (not tfds's), so
    that a loader that went by position rather than by name would pick wrong classes."""
    fine = sorted(all_classes("cifar_fs"))
    coarse = sorted(itertools.chain(*fc100_superclasses().values()))
    order = np.random.RandomState(7)
    return {"label": [fine[i] for i in order.permutation(100)],
            "coarse_label": [coarse[i] for i in order.permutation(20)]}


def write_metadata(data_dir, name, label_names, split_sizes):
    """tfds's metadata files of `name` in `data_dir`, as `tfds build` writes them."""
    builder = tfds.builder(name, data_dir=str(data_dir))
    for key, names in label_names.items():
        builder.info.features[key].names = names
    builder.info.set_splits(tfds.core.SplitDict([tfds.core.SplitInfo(
        name=split, shard_lengths=[size], num_bytes=0,
        filename_template=tfds.core.ShardedFileTemplate(
            data_dir=builder.data_path, template="{DATASET}-{SPLIT}.{FILEFORMAT}-{SHARD_INDEX}",
            dataset_name=name, split=split, filetype_suffix="tfrecord"))
        for split, size in split_sizes.items()]))
    builder.data_path.mkdir(parents=True)
    builder.info.write_to_directory(builder.data_path)


@pytest.fixture(scope="module")
def tfds_data_dir(tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("tensorflow_datasets")
    write_metadata(data_dir, "cifar100", cifar100_label_names(), {"train": 50000, "test": 10000})
    write_metadata(data_dir, "caltech_birds2011", {}, {"train": 5994, "test": 5794})
    return data_dir


def records_filling_every_class(builder, split, **_):
    """The mock's records: IMAGES_PER_CLASS of every class, each image filled with its label."""
    num_classes = builder.info.features["label"].num_classes
    labels = np.tile(np.arange(num_classes), IMAGES_PER_CLASS)
    image_shape = (32, 32, 3) if builder.name == "cifar100" else (13, 9, 3)  # CUB's vary
    return tf.data.Dataset.from_tensor_slices(labels).map(lambda label: {
        "image": tf.fill(image_shape, tf.cast(label, tf.uint8)), "label": label})


@pytest.fixture
def mocked(tfds_data_dir):
    with tfds.testing.mock_data(policy=tfds.testing.MockPolicy.USE_FILES,
                                data_dir=str(tfds_data_dir),
                                as_dataset_fn=records_filling_every_class):
        yield tfds_data_dir


@pytest.mark.parametrize("name", BENCHMARKS)
def test_the_published_lists_have_their_papers_sizes_and_are_disjoint(name):
    splits = published_classes(name)
    assert tuple(len(classes) for classes in splits.values()) == SPLIT_SIZES[name]
    assert len(set(all_classes(name))) == sum(SPLIT_SIZES[name])


def test_the_cub_split_is_chen_et_al_s_rule_over_the_sorted_folders():
    """write_CUB_filelist.py: folder i (0-based, sorted) is base if i % 2 == 0, val if
    i % 4 == 1, novel if i % 4 == 3."""
    splits = published_classes("cub")
    for split, remainders in (("train", {0, 2}), ("val", {1}), ("test", {3})):
        assert {(int(folder[:3]) - 1) % 4 for folder in splits[split]} == remainders, split
    assert sorted(all_classes("cub"))[:2] == ["001.Black_footed_Albatross",
                                             "002.Laysan_Albatross"]


def test_fc100_s_superclasses_are_tadams():
    """TADAM's class_split, as indices of CIFAR-100's coarse labels (alphabetical)."""
    superclasses = fc100_superclasses()
    coarse = sorted(itertools.chain(*superclasses.values()))
    assert {split: sorted(coarse.index(name) for name in names)
            for split, names in superclasses.items()} == {
        "train": [1, 2, 3, 4, 5, 6, 9, 10, 15, 17, 18, 19], "val": [8, 11, 13, 16],
        "test": [0, 7, 12, 14]}


@pytest.mark.parametrize("name", BENCHMARKS)
def test_each_split_holds_its_published_classes_and_their_images_only(mocked, name):
    config = preflight.checked(resolve(name, tfds_data_dir=str(mocked), image_size=16,
                                       way=5, shot=1, query=1))
    assert config.channels == 3
    splits = task_streams.load_splits(config)
    label_names = tfds.builder(BENCHMARKS[name].tfds_name).info.features["label"].names
    seen = []
    for split, images in splits.items():
        assert images.class_names == published_classes(name)[split]
        assert images.images.shape == (IMAGES_PER_CLASS * images.num_classes, 16, 16, 3)
        for c, class_name in enumerate(images.class_names):
            # caltech_birds2011's label is the folder's number less one; CIFAR's by name.
            label = (int(class_name[:3]) - 1 if name == "cub"
                     else label_names.index(class_name))
            assert (images.images_of(c) == label).all(), (split, class_name)
        seen.extend(np.unique(images.images))
    assert len(seen) == len(set(seen)) == sum(SPLIT_SIZES[name])  # disjoint, all there


def test_a_published_class_missing_from_the_label_is_named():
    names = [str(label) for label in range(200)]
    names[7] = "something else"  # 008.Rhinoceros_Auklet, a test class
    with pytest.raises(DataError, match=r"caltech_birds2011's label has no class '7' \(CUB's "
                                        r"test class 008\.Rhinoceros_Auklet\)"):
        class_indices("cub", names)


@pytest.mark.parametrize("name", BENCHMARKS)
def test_each_benchmark_takes_its_papers_settings(name):
    config = resolve(name)
    assert (config.image_size, config.query) == PAPER_SETTINGS[name]
    assert (config.channels, config.augment, config.data_dir) == (3, False, None)
    # The network's settings are the paper's for natural images (mini-ImageNet).
    assert (config.filters, config.batch_size, config.inner_lr) == (48, 2, 0.01)
    assert config.tfds_name == BENCHMARKS[name].tfds_name


@pytest.mark.parametrize("name", BENCHMARKS)
@pytest.mark.parametrize("shot", [1, 5])
def test_each_flag_file_is_its_benchmark_with_the_defaults_it_takes(name, shot):
    path = REPOSITORY / "experiments" / f"{name}_5way_{shot}shot.flags"
    lines = path.read_text().splitlines()
    assert lines[0] == f"#   python main.py --flagfile=experiments/{path.name} --tfds_data_dir=DIR"
    assert lines[1].startswith("# Published: ")
    arguments = [line for line in lines if line.startswith("--")]
    assert arguments[0] == f"--dataset={name}"
    flag_values = flags.FlagValues()
    config_flags.define_config_flags(flag_values)
    flag_values(["main.py", *arguments[1:]])
    assert resolve(name, **config_flags.config_values(flag_values)) == resolve(
        name, way=5, shot=shot, bn_mode="transductive")
