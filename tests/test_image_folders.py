"""Specification of tf_mamlpp.data.image_folders, and a short run through main.py on each layout."""

import concurrent.futures
import json

import numpy as np
import pytest

from conftest import run_main
from synthetic_images import (class_image, write_class_folders, write_image, write_split_files,
                              write_split_folders)
from tf_mamlpp.data.class_images import DataError
from tf_mamlpp.data.image_folders import (detect_channels, image_channels, index_splits,
                                     parse_split_ratios, split_sizes)


def test_split_folders_give_one_class_per_folder_with_its_sorted_images(tmp_path):
    root = write_split_folders(tmp_path / "data", classes=(3, 2, 2), per_class=4,
                               suffixes=(".png", ".JPG"))
    (root / "train" / "n0000" / "notes.txt").write_text("not an image")
    (root / "train" / ".hidden").mkdir()
    (root / ".tf_mamlpp_cache").mkdir()
    splits = index_splits(root)
    assert splits["train"].names == ["train/n0000", "train/n0001", "train/n0002"]
    assert splits["test"].names == ["test/n0005", "test/n0006"]
    for files in splits.values():
        np.testing.assert_array_equal(files.class_counts, [4] * files.num_classes)
    assert [path.name for path in splits["train"].files[0]] == [
        "000.png", "001.JPG", "002.png", "003.JPG"]


def test_split_files_group_each_csv_by_label(tmp_path):
    root = write_split_files(tmp_path / "data", classes=(3, 2, 2), per_class=5)
    splits = index_splits(root)
    assert splits["val"].names == ["n0003", "n0004"]
    assert splits["val"].source == root / "val.csv"
    np.testing.assert_array_equal(splits["train"].class_counts, [5, 5, 5])
    assert all(path.parent == root / "images" for files in splits["test"].files for path in files)


def test_a_split_file_row_without_its_image_is_named(tmp_path):
    root = write_split_files(tmp_path / "data", classes=(3, 2, 2), per_class=5)
    (root / "images" / "n00030002.jpg").unlink()
    with pytest.raises(DataError, match=r"n00030002\.jpg: no such file \(listed in .*val\.csv "
                                        r"line 4\)"):
        index_splits(root)


def test_class_folders_are_split_by_ratios_with_a_fixed_shuffle(tmp_path):
    root = write_class_folders(tmp_path / "data", num_classes=10, per_class=2, size=8)
    splits = index_splits(root)  # 0.64,0.16,0.2 of 10
    assert [files.num_classes for files in splits.values()] == [6, 2, 2]
    names = [name for files in splits.values() for name in files.names]
    assert sorted(names) == [f"class{c:02d}" for c in range(10)]
    assert names != sorted(names)  # shuffled, not cut in order
    assert index_splits(root) == splits
    other = index_splits(root, split_ratios="0.5,0.3,0.2")
    assert [files.num_classes for files in other.values()] == [5, 3, 2]


def test_split_sizes_give_every_split_a_class_or_name_the_flag():
    assert split_sizes(100, (0.64, 0.16, 0.2)) == (64, 16, 20)
    with pytest.raises(ValueError, match="split_ratios=.*0/1/2"):
        split_sizes(3, (0.1, 0.3, 0.6))


@pytest.mark.parametrize("text", ["0.5,0.5", "0.7,0.3,0", "a,b,c", "0.5,0.3,0.3", "-0.2,0.6,0.6"])
def test_malformed_split_ratios_name_the_flag(text):
    with pytest.raises(ValueError, match="split_ratios="):
        parse_split_ratios(text)


def test_split_ratios_conflict_with_a_split_layout(tmp_path):
    root = write_split_folders(tmp_path / "data", classes=(2, 1, 1), per_class=2, size=8)
    with pytest.raises(ValueError, match="split_ratios=0.5,0.25,0.25 conflicts"):
        index_splits(root, split_ratios="0.5,0.25,0.25")


@pytest.mark.parametrize("make, message", [
    (lambda root: None, "no such directory"),
    (lambda root: root.mkdir(), "no class folders"),
    (lambda root: (root / "train").mkdir(parents=True), "has train/ but no val/"),
    (lambda root: (root / "images").mkdir(parents=True), "images/ without train.csv"),
])
def test_missing_or_partial_layouts_name_the_path(tmp_path, make, message):
    root = tmp_path / "data"
    make(root)
    with pytest.raises(DataError, match=message) as error:
        index_splits(root)
    assert str(root) in str(error.value) and "\n" not in str(error.value)


def test_mini_imagenet_asks_for_a_split_layout(tmp_path):
    root = write_class_folders(tmp_path / "data", num_classes=4, per_class=2, size=8)
    with pytest.raises(DataError, match=r"no train/, val/, test/ .*train\.csv, val\.csv"):
        index_splits(root, allow_unsplit=False)


def test_a_class_folder_without_images_is_named(tmp_path):
    root = write_class_folders(tmp_path / "data", num_classes=4, per_class=2, size=8)
    (root / "empty").mkdir()
    (root / "empty" / "readme.txt").write_text("no images here")
    with pytest.raises(DataError, match=f"{root / 'empty'}: class folder with no images"):
        index_splits(root)


@pytest.mark.parametrize("suffix", [".png", ".jpg"])
@pytest.mark.parametrize("channels", [1, 3])
def test_channels_are_read_from_the_file_header(tmp_path, suffix, channels):
    path = tmp_path / f"image{suffix}"
    write_image(path, class_image(0, 0, size=8, channels=channels))
    assert image_channels(path) == channels


def test_a_file_that_is_no_image_is_named(tmp_path):
    path = tmp_path / "fake.jpg"
    path.write_text("hello")
    with pytest.raises(DataError, match=f"{path}: not a PNG, JPEG"):
        image_channels(path)


def test_any_colour_class_makes_the_data_set_rgb(tmp_path):
    root = write_class_folders(tmp_path / "data", num_classes=5, per_class=2, size=8, channels=1)
    assert detect_channels(index_splits(root, split_ratios="0.6,0.2,0.2")) == 1
    for path in (root / "class00").iterdir():
        write_image(path, class_image(0, 0, size=8, channels=3))
    for path in (root / "class03").iterdir():
        write_image(path, class_image(0, 0, size=8, channels=3))
    assert detect_channels(index_splits(root, split_ratios="0.6,0.2,0.2")) == 3


# A few meta-iterations on a tiny network: the run must go through training,
# validation, test and export on every layout; learning is test_main.py's concern.
TINY_RUN = ["--filters=4", "--inner_steps=1", "--iters_per_epoch=2", "--epochs=1",
            "--val_tasks=4", "--test_tasks=4", "--batch_size=2", "--way=2", "--shot=1",
            "--query=2", "--image_size=16"]


@pytest.fixture(scope="module")
def layouts(tmp_path_factory):
    root = tmp_path_factory.mktemp("layouts")
    class_folders = write_class_folders(root / "class_folders", num_classes=8, per_class=5,
                                        size=20, channels=1, suffixes=(".png", ".jpg"))
    write_image(class_folders / "class01" / "large.png", class_image(1, 9, size=37, channels=1))
    return {"split_folders": write_split_folders(root / "split_folders", classes=(4, 2, 2),
                                                 per_class=5, suffixes=(".jpg", ".png")),
            "split_files": write_split_files(root / "split_files", classes=(4, 2, 2),
                                             per_class=5, size=24),
            "class_folders": class_folders}


# layout: (flags, channels the run must record); the split files run streams its images.
LAYOUT_RUNS = {"split_folders": (["--dataset=mini_imagenet"], 3),
               "split_files": (["--dataset=mini_imagenet", "--in_memory_limit_gb=0"], 3),
               "class_folders": (["--dataset=folder", "--split_ratios=0.5,0.25,0.25"], 1)}


@pytest.fixture(scope="module")
def short_runs(tmp_path_factory, layouts):
    """layout -> (run directory, completed process), two runs at a time."""
    logdir = tmp_path_factory.mktemp("runs")
    with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
        futures = {layout: pool.submit(
            run_main, *flags, f"--data_dir={layouts[layout]}", f"--logdir={logdir}",
            f"--experiment={layout}", *TINY_RUN)
            for layout, (flags, _) in LAYOUT_RUNS.items()}
        return {layout: (logdir / layout, future.result()) for layout, future in futures.items()}


@pytest.mark.parametrize("layout", LAYOUT_RUNS)
@pytest.mark.slow
def test_a_short_run_trains_and_tests_on_each_layout(short_runs, layout):
    run_dir, completed = short_runs[layout]
    assert completed.returncode == 0, completed.stderr[-3000:]
    config = json.loads((run_dir / "config.json").read_text())
    flags, channels = LAYOUT_RUNS[layout]
    assert f"--dataset={config['dataset']}" in flags
    assert config["channels"] == channels  # read from the images for a folder data set
    assert (config["image_size"], config["augment"]) == (16, False)
    history = json.loads((run_dir / "history.json").read_text())
    assert len(history) == 1 and 0.0 <= history[0]["val_accuracy"] <= 1.0
    results = json.loads((run_dir / "results.json").read_text())
    assert results["test_tasks"] == 4
    assert (run_dir / "export" / "saved_model.pb").is_file()
