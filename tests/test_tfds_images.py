"""Specification of tf_mamlpp.data.tfds_source and tfds_images, and `main.py --dataset=tfds:NAME`.

No mock: tiny `tfds.core.GeneratorBasedBuilder`s, defined here, are prepared
with `download_and_prepare` into a temporary tfds data directory, and the
project reads them through tfds's real reading path. main.py, in a process
of its own that lacks these classes, finds them by name in that directory,
as it finds a data set copied there from a machine with internet.
"""

import concurrent.futures
import dataclasses
import re
import shutil

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from conftest import MAIN, run_main, run_python
from synthetic_images import class_image, write_image
from test_bad_input import assert_one_line_error, snapshot
from tf_mamlpp.config_error import ConfigError
from tf_mamlpp.data import tfds_images
from tf_mamlpp.data.class_images import ClassImages, DataError
from tf_mamlpp.data.image_folders import split_by_ratios
from tf_mamlpp.data.mapped_class_images import MappedClassImages
from tf_mamlpp.data.tfds_source import open_tfds
from tf_mamlpp.run import preflight, run_lock, task_streams
from tf_mamlpp.run.config import resolve
from tf_mamlpp.serving import saved_model

CLASSES, PER_SPLIT = 12, 3  # a class has PER_SPLIT images in each of the two splits


class TinyShapes(tfds.core.GeneratorBasedBuilder):
    """Twelve classes of striped RGB images of 10 to 14 pixels, a coarse label of three
    classes, and a thirteenth class that no image has."""

    VERSION = tfds.core.Version("1.0.0")
    CHANNELS = 3

    def _info(self):
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(None, None, self.CHANNELS)),
            "label": tfds.features.ClassLabel(num_classes=CLASSES + 1),
            "coarse": tfds.features.ClassLabel(names=["a", "b", "c"])}))

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples(0), "test": self._generate_examples(1)}

    def _generate_examples(self, part):
        for label in range(CLASSES):
            for index in range(part * PER_SPLIT, (part + 1) * PER_SPLIT):
                image = class_image(label, index, size=14, channels=self.CHANNELS)
                yield f"{label}_{index}", {"image": image[:10 + index % 5, :14 - index % 3],
                                           "label": label, "coarse": label % 3}


class TinyGray(TinyShapes):
    """TinyShapes in grayscale."""

    CHANNELS = 1


class TinyFrames(tfds.core.GeneratorBasedBuilder):
    """Stacks of three frames under the name "image": not 2-D images."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
            "image": tfds.features.Tensor(shape=(3, 8, 8, 3), dtype=np.uint8),
            "label": tfds.features.ClassLabel(num_classes=2)}))

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples()}

    def _generate_examples(self):
        for label in range(2):
            yield str(label), {"image": np.zeros((3, 8, 8, 3), np.uint8), "label": label}


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """A tfds data directory with the three data sets prepared."""
    data_dir = tmp_path_factory.mktemp("prepared") / "tensorflow_datasets"
    for builder in (TinyShapes, TinyGray, TinyFrames):
        builder(data_dir=str(data_dir)).download_and_prepare()
    shutil.rmtree(data_dir / "downloads")
    return data_dir


@pytest.fixture
def tfds_dir(prepared, tmp_path):
    """A copy of the prepared data directory, for this test to cache in or damage."""
    return shutil.copytree(prepared, tmp_path / "tensorflow_datasets")


def records_by_class(tfds_dir, name):
    """label -> the data set's own uint8 images of that class, all splits, in order."""
    builder = tfds.builder(name, data_dir=str(tfds_dir))
    images = {}
    for example in builder.as_dataset(split="+".join(builder.info.splits), shuffle_files=False):
        images.setdefault(int(example["label"]), []).append(example["image"].numpy())
    return images


def test_splits_are_pooled_into_classes_decoded_once_then_read_from_the_cache(tfds_dir):
    first = tfds_images.load_tfds("tiny_shapes", image_size=16, tfds_data_dir=str(tfds_dir))
    assert isinstance(first, ClassImages)
    assert first.class_names == [str(label) for label in range(CLASSES)]  # no empty class
    assert first.class_counts.tolist() == [2 * PER_SPLIT] * CLASSES
    assert first.images.dtype == np.uint8 and first.image_shape == (16, 16, 3)
    for record_file in tfds_dir.glob("tiny_shapes/1.0.0/*.tfrecord*"):
        record_file.unlink()
    again = tfds_images.load_tfds("tiny_shapes", image_size=16, tfds_data_dir=str(tfds_dir))
    np.testing.assert_array_equal(again.images, first.images)
    mapped = tfds_images.load_tfds("tiny_shapes", image_size=16, tfds_data_dir=str(tfds_dir),
                                   in_memory=False)
    assert isinstance(mapped, MappedClassImages) and isinstance(mapped.arrays[0], np.memmap)
    np.testing.assert_array_equal(np.concatenate(mapped.arrays), first.images)
    with pytest.raises(DataError, match="tiny_shapes 1.0.0 in .*: unreadable records"):
        tfds_images.load_tfds("tiny_shapes", image_size=20, tfds_data_dir=str(tfds_dir))


# Colour to grayscale and back; the images' own channels kept are the slow tests' concern.
@pytest.mark.parametrize("name, channels", [
    ("tiny_shapes", 1), ("tiny_gray", 3), pytest.param("tiny_shapes", 3, marks=pytest.mark.slow),
    pytest.param("tiny_gray", 1, marks=pytest.mark.slow)])
def test_training_images_are_their_files_as_the_export_decodes_them(tfds_dir, name, channels):
    """What --mode=adapt and the export's file signature make of an image's PNG file is,
    bit for bit, what training reads (uint8 / 255, as episodes.py divides)."""
    images = tfds_images.load_tfds(name, image_size=16, channels=channels,
                                   tfds_data_dir=str(tfds_dir))
    decode = tf.function(
        lambda files: saved_model.decode_files(files, (16, 16, channels), rounded_to_uint8=True),
        input_signature=[tf.TensorSpec((None,), tf.string)])
    originals = records_by_class(tfds_dir, name)
    files = tf.constant([tf.io.encode_png(image).numpy()
                         for label in sorted(originals) for image in originals[label]])
    np.testing.assert_array_equal(decode(files).numpy(),
                                  images.images.astype(np.float32) / np.float32(255))


def test_a_read_only_data_set_is_cached_elsewhere(tfds_dir, tmp_path):
    version = tfds_dir / "tiny_shapes" / "1.0.0"
    version.chmod(0o555)
    try:
        tfds_images.load_tfds("tiny_shapes", image_size=16, tfds_data_dir=str(tfds_dir),
                              cache_dir=tmp_path / "home_cache")
    finally:
        version.chmod(0o755)
    assert len(list((tmp_path / "home_cache").rglob("label/*.npy"))) == CLASSES
    assert not list(version.glob(".*"))


def test_another_label_gives_its_own_classes(tfds_dir):
    images = tfds_images.load_tfds("tiny_shapes", image_size=16, tfds_label="coarse",
                                   tfds_data_dir=str(tfds_dir))
    assert images.class_names == ["a", "b", "c"]
    assert images.class_counts.tolist() == [CLASSES // 3 * 2 * PER_SPLIT] * 3


def test_a_tfds_name_is_split_by_the_ratios_and_tasks_are_checked_before_decoding(tfds_dir):
    config = preflight.checked(resolve("tfds:tiny_gray", tfds_data_dir=str(tfds_dir),
                                       image_size=16, split_ratios="0.5,0.25,0.25", way=2,
                                       shot=1, query=2))
    assert config.channels == 1  # the images' own
    with pytest.raises(ConfigError, match=r"^shot=5 plus query=2: more than the 6 images of "
                                          r"class \d+, the smallest of the train split "
                                          r"\(tiny_gray 1.0.0 in "):
        task_streams.prepare(dataclasses.replace(config, shot=5))
    assert not list(tfds_dir.rglob("*.npy"))  # nothing decoded for tasks that cannot work
    splits = task_streams.load_splits(config)
    expected = split_by_ratios(CLASSES, "0.5,0.25,0.25")
    assert {split: images.class_names for split, images in splits.items()} == {
        split: [str(label) for label in labels] for split, labels in expected.items()}


@pytest.mark.parametrize("name, options, error, message", [
    ("no_such_set", {}, DataError, "TensorFlow Datasets knows no data set 'no_such_set', and "
                                   "{dir} holds none prepared under that name"),
    ("cifar100", {}, ConfigError, "cifar100 3.0.2 is not prepared in {dir}; prepare it on a "
                                  "machine with internet (`tfds build cifar100 --data_dir=DIR`)"),
    ("tiny_shapes", {"tfds_label": "fine"}, ConfigError,
     "tfds_label=fine: tiny_shapes has no class label of that name (its class labels: "
     "label, coarse)"),
    ("tiny_frames", {}, DataError, "tiny_frames's 'image' is not a 2-D image but a Tensor of "
                                   "shape (3, 8, 8, 3)"),
])
def test_a_data_set_that_cannot_serve_is_named_without_reading_it(tfds_dir, name, options,
                                                                  error, message):
    with pytest.raises(error) as raised:
        open_tfds(name, tfds_data_dir=str(tfds_dir), **options)
    assert message.format(dir=tfds_dir) in str(raised.value)
    if error is ConfigError:
        assert raised.value.fields in {("tfds_data_dir", "tfds_download"), ("tfds_label",)}


def test_a_data_set_not_prepared_is_prepared_where_the_download_is_asked_for(tmp_path):
    """TinyShapes's code is registered in this process, so tfds can "download" it offline."""
    with pytest.raises(ConfigError, match="tiny_shapes 1.0.0 is not prepared in"):
        tfds_images.load_tfds("tiny_shapes", image_size=16, tfds_data_dir=str(tmp_path))
    images = tfds_images.load_tfds("tiny_shapes", image_size=16, tfds_data_dir=str(tmp_path),
                                   tfds_download=True)
    assert images.class_counts.tolist() == [2 * PER_SPLIT] * CLASSES
    prepared = tmp_path / "tiny_shapes" / "1.0.0"
    assert (prepared / "dataset_info.json").is_file()
    assert len(list(prepared.glob(".tf_mamlpp_cache/16x16x3/label/*.npy"))) == CLASSES


@pytest.mark.parametrize("dataset, settings, message", [
    ("tfds:", {}, "dataset=tfds:: name the TensorFlow Datasets set, e.g. dataset=tfds:cifar100"),
    ("cub", {"data_dir": "/data"}, "data_dir=/data conflicts with dataset=cub, which "
                                   "TensorFlow Datasets reads; pass tfds_data_dir=DIR instead"),
    ("fc100", {"tfds_label": "coarse_label"}, "tfds_label=coarse_label conflicts with "
                                              "dataset=fc100, whose classes are cifar100's label"),
    ("cifar_fs", {"split_ratios": "0.5,0.25,0.25"}, "split_ratios=0.5,0.25,0.25 conflicts with "
                                                    "dataset=cifar_fs, which has fixed splits"),
])
def test_settings_that_conflict_with_a_tfds_set_are_named(dataset, settings, message):
    with pytest.raises(ConfigError) as raised:
        preflight.check_settings(resolve(dataset, **settings))
    assert str(raised.value).startswith(message)


def test_a_tfds_run_is_named_by_one_folder():
    config = resolve("tfds:cifar10_corrupted/fog_1:1.0.0", way=20)
    assert run_lock.experiment_name(config) == (
        "tfds_cifar10_corrupted_fog_1_1.0.0_20way_1shot_seed0")


@pytest.mark.slow
def test_a_benchmark_not_prepared_is_named_before_tensorflow_loads(tmp_path):
    # -X importtime lists every module imported; TensorFlow must not be one.
    completed = run_python("-X", "importtime", str(MAIN), "--dataset=cifar_fs", "--way=5",
                           "--shot=1", f"--tfds_data_dir={tmp_path}",
                           f"--logdir={tmp_path / 'runs'}")
    assert completed.returncode == 2
    lines = completed.stderr.strip().splitlines()
    assert lines[-1].startswith(f"error: --dataset=cifar_fs: TensorFlow Datasets' cifar100 "
                                f"3.0.2 is not prepared in {tmp_path}; "), lines[-1]
    imported = [line.split("|")[-1].strip() for line in lines if line.startswith("import time:")]
    assert "tensorflow_datasets" in imported
    assert not [name for name in imported if re.match(r"tensorflow(\.|$)", name)]
    assert [path.name for path in tmp_path.iterdir()] == []


# A few meta-iterations on a tiny network: end to end, not learning (test_main.py's).
TINY_NETWORK = ["--filters=4", "--inner_steps=1", "--iters_per_epoch=2", "--epochs=1",
                "--val_tasks=2", "--test_tasks=2", "--batch_size=2", "--way=2", "--shot=1",
                "--query=2", "--image_size=16"]
SPLIT = "--split_ratios=0.5,0.25,0.25"  # 6/3/3 classes
TINY_RUN = [*TINY_NETWORK, SPLIT]
RUN_NAME = "tfds_tiny_shapes_2way_1shot_seed0"


@pytest.fixture(scope="module")
def first_run(prepared, tmp_path_factory):
    """(tfds data directory, logdir, completed process) of a run on tfds:tiny_shapes."""
    tfds_dir = shutil.copytree(prepared, tmp_path_factory.mktemp("run") / "tensorflow_datasets")
    logdir = tfds_dir.parent / "runs"
    completed = run_main("--dataset=tfds:tiny_shapes", f"--tfds_data_dir={tfds_dir}",
                         f"--logdir={logdir}", *TINY_RUN)
    return tfds_dir, logdir, completed


@pytest.mark.slow
def test_main_trains_tests_and_exports_on_a_tfds_set(first_run):
    tfds_dir, logdir, completed = first_run
    assert completed.returncode == 0, completed.stderr[-3000:]
    run_dir = logdir / RUN_NAME
    config = resolve("omniglot").from_json((run_dir / "config.json").read_text())
    assert (config.dataset, config.channels, config.image_size) == ("tfds:tiny_shapes", 3, 16)
    assert (run_dir / "results.json").is_file()
    assert (run_dir / "export" / "saved_model.pb").is_file()
    cache = tfds_dir / "tiny_shapes" / "1.0.0" / ".tf_mamlpp_cache" / "16x16x3" / "label"
    assert len(list(cache.glob("*.npy"))) == CLASSES


@pytest.mark.slow
def test_a_second_start_reads_the_cache_and_no_record(first_run):
    tfds_dir, logdir, _ = first_run
    for record_file in tfds_dir.glob("tiny_shapes/1.0.0/*.tfrecord*"):
        record_file.unlink()
    completed = run_main("--dataset=tfds:tiny_shapes", f"--tfds_data_dir={tfds_dir}",
                         f"--logdir={logdir}", "--experiment=again", *TINY_RUN)
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert "Decoding" not in completed.stderr
    assert (logdir / "again" / "results.json").is_file()


@pytest.mark.slow
def test_adapt_classifies_the_files_of_a_tfds_set(first_run, prepared, tmp_path):
    _, logdir, _ = first_run
    originals = records_by_class(prepared, "tiny_shapes")
    for label in (0, 1):
        for index, image in enumerate(originals[label]):
            folder = tmp_path / ("query" if index == 0 else f"support/class{label}")
            write_image(folder / f"{label}_{index}.png", image)
    completed = run_main("--mode=adapt", f"--export_dir={logdir / RUN_NAME / 'export'}",
                         f"--support_dir={tmp_path / 'support'}",
                         f"--query_dir={tmp_path / 'query'}")
    assert completed.returncode == 0, completed.stderr[-3000:]
    lines = [line.split("\t") for line in completed.stdout.strip().splitlines()]
    assert sorted(line[0] for line in lines) == ["0_0.png", "1_0.png"]
    assert {line[1] for line in lines} <= {"class0", "class1"}


# name: (flags, with {tfds} for the data directory and {empty} for one without data sets;
# fragments the error line must hold)
BAD_INPUT = {
    "a benchmark not prepared": (["--dataset=cifar_fs", "--tfds_data_dir={empty}"], [
        "--dataset=cifar_fs: TensorFlow Datasets' cifar100 3.0.2 is not prepared in {empty}",
        "`tfds build cifar100 --data_dir=DIR`", "--tfds_data_dir=DIR", "--tfds_download=true"]),
    "a name tfds does not know": (["--dataset=tfds:no_such_set"], [
        "--dataset=tfds:no_such_set: TensorFlow Datasets knows no data set 'no_such_set'"]),
    "a label the data set lacks": (["--dataset=tfds:tiny_shapes", SPLIT, "--tfds_label=fine"], [
        "--tfds_label=fine: tiny_shapes has no class label of that name"]),
    "images that are not 2-D": (["--dataset=tfds:tiny_frames"], [
        "--dataset=tfds:tiny_frames: tiny_frames's 'image' is not a 2-D image"]),
    "too few classes": (["--dataset=tfds:tiny_shapes", SPLIT, "--way=4"], [
        "--way=4: more than the 3 classes of the val split (tiny_shapes 1.0.0 in {tfds})"]),
    "too small classes": (["--dataset=tfds:tiny_shapes", SPLIT, "--shot=5"], [
        "--shot=5 plus --query=2: more than the 6 images of class"]),
}


@pytest.fixture(scope="module")
def bad_input_outcomes(first_run, tmp_path_factory):
    """(BAD_INPUT name -> completed process, the earlier run's files before, and after)."""
    tfds_dir, logdir, completed = first_run
    assert completed.returncode == 0, completed.stderr[-3000:]
    folders = {"tfds": tfds_dir, "empty": tmp_path_factory.mktemp("empty")}
    before = snapshot(logdir)
    with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
        futures = {name: pool.submit(
            run_main, f"--tfds_data_dir={tfds_dir}", f"--logdir={logdir}", *TINY_NETWORK,
            f"--experiment={RUN_NAME}", *[flag.format(**folders) for flag in flags])
            for name, (flags, _) in BAD_INPUT.items()}
        outcomes = {name: future.result() for name, future in futures.items()}
    return outcomes, folders, before, snapshot(logdir)


@pytest.mark.slow
@pytest.mark.parametrize("case", BAD_INPUT)
def test_bad_tfds_input_ends_in_one_line_and_leaves_the_earlier_run(bad_input_outcomes, case):
    outcomes, folders, before, after = bad_input_outcomes
    assert_one_line_error(outcomes[case], [fragment.format(**folders)
                                           for fragment in BAD_INPUT[case][1]])
    assert after == before
