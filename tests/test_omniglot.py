"""Specification of tf_mamlpp.data.omniglot and tf_mamlpp.data.class_images."""

import collections
import os
import pathlib
import zipfile

import numpy as np
import pytest
import tensorflow_datasets as tfds

from tf_mamlpp.data.class_images import ClassImages, DataError, from_class_arrays, read_npz
from tf_mamlpp.data.omniglot import (CACHE_NAME, PARTS, load_omniglot, num_background_classes,
                                split_classes)
from tf_mamlpp.data.omniglot_splits import BACKGROUND_CLASSES, CLASSES, split_sizes

OMNIGLOT_DIR = pathlib.Path(__file__).resolve().parents[1] / "datasets" / "omniglot"
TINY_ALPHABETS = 2
TINY_CHARACTERS = 3


def _require_archives():
    if not all((OMNIGLOT_DIR / f"{part}.zip").is_file() for part in PARTS):
        pytest.fail(f"the shipped Omniglot archives are missing from {OMNIGLOT_DIR}")


@pytest.fixture(scope="module")
def omniglot():
    """The shipped data set, decoded once (and cached beside it for later runs)."""
    _require_archives()
    return load_omniglot(OMNIGLOT_DIR)


@pytest.fixture(scope="module")
def tiny_members():
    """{part: {zip member name: PNG bytes}}: first 3 characters of the first 2 alphabets."""
    _require_archives()
    members = {}
    for part in PARTS:
        with zipfile.ZipFile(OMNIGLOT_DIR / f"{part}.zip") as archive:
            names = [name for name in archive.namelist() if name.endswith(".png")]
            alphabets = sorted({name.split("/")[1] for name in names})[:TINY_ALPHABETS]
            characters = {f"character{i:02d}" for i in range(1, TINY_CHARACTERS + 1)}
            members[part] = {name: archive.read(name) for name in names
                             if name.split("/")[1] in alphabets
                             and name.split("/")[2] in characters}
    return members


def write_zips(directory, members):
    """Writes the parts as zips, members in reverse order so the loader must sort."""
    directory.mkdir(parents=True, exist_ok=True)
    for part, files in members.items():
        with zipfile.ZipFile(directory / f"{part}.zip", "w") as archive:
            for name in sorted(files, reverse=True):
                archive.writestr(name, files[name])
    return directory


def write_folders(directory, members):
    for files in members.values():
        for name, data in files.items():
            (directory / name).parent.mkdir(parents=True, exist_ok=True)
            (directory / name).write_bytes(data)
    return directory


def test_shipped_omniglot_has_1623_classes_of_20_images(omniglot):
    assert omniglot.num_classes == 1623
    np.testing.assert_array_equal(omniglot.class_counts, np.full(1623, 20))
    np.testing.assert_array_equal(omniglot.class_offsets, np.arange(1623) * 20)
    assert omniglot.images.shape == (1623 * 20, 28, 28, 1)
    assert omniglot.images.dtype == np.float32
    assert omniglot.images.min() >= 0.0 and omniglot.images.max() <= 1.0


def test_classes_come_background_first_sorted_by_alphabet_then_character(omniglot):
    names = omniglot.class_names
    assert num_background_classes(omniglot) == 964
    assert all(name.startswith("images_background/") for name in names[:964])
    assert all(name.startswith("images_evaluation/") for name in names[964:])
    for part in (names[:964], names[964:]):
        assert part == sorted(part, key=lambda name: name.split("/"))
    assert names[0] == "images_background/Alphabet_of_the_Magi/character01"


def test_pixels_keep_the_files_white_background(omniglot):
    corners = omniglot.images[:, 0, 0, 0]
    assert (corners == 1.0).mean() > 0.99
    assert omniglot.images.mean() > 0.8


def test_zipped_and_extracted_layouts_give_identical_arrays(tmp_path, tiny_members, omniglot):
    zipped = load_omniglot(write_zips(tmp_path / "zipped", tiny_members), tmp_path / "cache")
    extracted = load_omniglot(write_folders(tmp_path / "extracted", tiny_members),
                              tmp_path / "cache")
    assert zipped.num_classes == 2 * TINY_ALPHABETS * TINY_CHARACTERS
    assert zipped.class_names == extracted.class_names
    np.testing.assert_array_equal(zipped.images, extracted.images)
    np.testing.assert_array_equal(zipped.class_counts, extracted.class_counts)
    in_full_set = [omniglot.class_names.index(name) for name in zipped.class_names]
    assert in_full_set == sorted(in_full_set)
    np.testing.assert_array_equal(zipped.images, omniglot.select(in_full_set).images)


def test_cache_is_written_beside_the_data_and_reused(tmp_path, tiny_members):
    data_dir = write_zips(tmp_path / "data", tiny_members)
    first = load_omniglot(data_dir, tmp_path / "cache")
    assert (data_dir / CACHE_NAME).is_file()
    assert not (tmp_path / "cache").exists()
    for part in PARTS:
        (data_dir / f"{part}.zip").unlink()
    second = load_omniglot(data_dir, tmp_path / "cache")
    assert second.class_names == first.class_names
    np.testing.assert_array_equal(second.images, first.images)


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_an_unreadable_cache_is_rebuilt(tmp_path, tiny_members, damage):
    data_dir = write_zips(tmp_path / "data", tiny_members)
    expected = load_omniglot(data_dir)
    cache = data_dir / CACHE_NAME
    content = cache.read_bytes()
    cache.write_bytes(b"not a cache" if damage == "garbage" else content[:len(content) // 2])
    rebuilt = load_omniglot(data_dir)
    np.testing.assert_array_equal(rebuilt.images, expected.images)
    np.testing.assert_array_equal(read_npz(cache).images, expected.images)


def test_a_read_only_data_dir_is_cached_in_cache_dir(tmp_path, tiny_members):
    data_dir = write_zips(tmp_path / "data", tiny_members)
    cache_dir = tmp_path / "cache"
    data_dir.chmod(0o555)
    try:
        first = load_omniglot(data_dir, cache_dir)
        assert not (data_dir / CACHE_NAME).exists()
        [cache] = cache_dir.glob("*.npz")
        written = cache.stat()
        second = load_omniglot(data_dir, cache_dir)
        assert cache.stat().st_ino == written.st_ino  # read, not replaced
        np.testing.assert_array_equal(second.images, first.images)
    finally:
        data_dir.chmod(0o755)


def test_a_missing_data_dir_raises_data_error_naming_it(tmp_path):
    missing = tmp_path / "no_such_dir"
    with pytest.raises(DataError, match="no_such_dir") as error:
        load_omniglot(missing)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("damage", ["truncated", "overwritten"])
def test_a_damaged_zip_raises_data_error_naming_it(tmp_path, tiny_members, damage):
    data_dir = write_zips(tmp_path / "data", tiny_members)
    archive = data_dir / "images_background.zip"
    content = bytearray(archive.read_bytes())
    if damage == "truncated":
        content = content[:len(content) // 2]
    else:
        content[100:400] = bytes(300)  # inside the first members: CRC or header check fails
    archive.write_bytes(bytes(content))
    with pytest.raises(DataError) as error:
        load_omniglot(data_dir, tmp_path / "cache")
    assert str(archive) in str(error.value)
    assert "\n" not in str(error.value)


def test_a_member_that_is_not_a_png_raises_data_error_naming_the_zip(tmp_path, tiny_members):
    background = dict(tiny_members[PARTS[0]])
    background[next(iter(background))] = b"not a png"
    data_dir = write_zips(tmp_path / "data", {**tiny_members, PARTS[0]: background})
    with pytest.raises(DataError, match="images_background.zip") as error:
        load_omniglot(data_dir, tmp_path / "cache")
    assert "\n" not in str(error.value)


def test_one_missing_part_raises_data_error_naming_it(tmp_path, tiny_members):
    data_dir = write_zips(tmp_path / "data", {PARTS[0]: tiny_members[PARTS[0]]})
    with pytest.raises(DataError, match="images_evaluation"):
        load_omniglot(data_dir, tmp_path / "cache")


def _mock_class_counts(split):
    """Images per label of a mocked TFDS split, labels ordered by (alphabet, character)."""
    examples = [(int(example["alphabet"]), int(example["alphabet_char_id"]), int(example["label"]))
                for example in tfds.load("omniglot", split=split)]
    first_seen = {}
    for alphabet, character, label in examples:
        first_seen.setdefault(label, (alphabet, character, label))
    counts = collections.Counter(label for *_, label in examples)
    return [counts[label] for *_, label in sorted(first_seen.values())]


@pytest.mark.slow
def test_an_empty_data_dir_falls_back_to_tfds(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with tfds.testing.mock_data(num_examples=150):  # random labels: some repeat
        class_images = load_omniglot(empty, tmp_path / "cache")
        expected_counts = _mock_class_counts("train") + _mock_class_counts("test")
    assert class_images.images.shape == (2 * 150, 28, 28, 1)
    assert class_images.images.dtype == np.float32
    assert class_images.images.min() >= 0.0 and class_images.images.max() <= 1.0
    assert max(expected_counts) > 1
    np.testing.assert_array_equal(class_images.class_counts, expected_counts)
    parts = [name.split("/")[0] for name in class_images.class_names]
    assert parts == sorted(parts) and set(parts) == set(PARTS)
    assert not list(empty.iterdir())


def test_select_returns_the_classes_in_the_given_order():
    arrays = [np.full((count, 2, 2, 1), value, np.float32)
              for count, value in [(3, 0.1), (1, 0.2), (4, 0.3)]]
    class_images = from_class_arrays(arrays, ["a", "b", "c"])
    chosen = class_images.select([2, 0])
    assert chosen.num_classes == 2 and chosen.class_names == ["c", "a"]
    np.testing.assert_array_equal(chosen.class_counts, [4, 3])
    np.testing.assert_array_equal(chosen.class_offsets, [0, 4])
    np.testing.assert_array_equal(chosen.images_of(0), arrays[2])
    np.testing.assert_array_equal(chosen.images_of(1), arrays[0])


def test_class_images_rejects_classes_beyond_its_images():
    with pytest.raises(ValueError, match="within the 4 images"):
        ClassImages(np.zeros((4, 2, 2, 1), np.float32), np.array([0, 2]), np.array([2, 3]),
                    ["a", "b"])


def _assert_partition(splits, num_classes):
    together = np.concatenate(list(splits.values()))
    assert len(together) == num_classes
    np.testing.assert_array_equal(np.sort(together), np.arange(num_classes))


def test_mamlpp_split_is_1150_50_423_and_a_partition():
    splits = split_classes(964, 1623, "mamlpp", seed=0)
    assert {name: len(indices) for name, indices in splits.items()} == {
        "train": 1150, "val": 50, "test": 423}
    _assert_partition(splits, 1623)
    assert 964 <= splits["test"].max()  # classes of both parts mix


def test_lake_split_holds_out_background_classes_and_tests_on_evaluation():
    splits = split_classes(964, 1623, "lake", seed=0)
    assert len(splits["train"]) == 914 and len(splits["val"]) == 50
    np.testing.assert_array_equal(splits["test"], np.arange(964, 1623))
    _assert_partition(splits, 1623)


@pytest.mark.parametrize("scheme", ["mamlpp", "lake"])
def test_a_split_is_fixed_by_its_seed(scheme):
    first, again = split_classes(964, 1623, scheme, 3), split_classes(964, 1623, scheme, 3)
    other = split_classes(964, 1623, scheme, 4)
    for name in ("train", "val"):
        np.testing.assert_array_equal(first[name], again[name])
        assert not np.array_equal(first[name], other[name])


@pytest.mark.parametrize("scheme", ["mamlpp", "lake"])
def test_split_sizes_are_those_split_classes_draws(scheme):
    """preflight.py checks the way setting against `split_sizes` before the data loads."""
    drawn = split_classes(BACKGROUND_CLASSES, CLASSES, scheme)
    assert split_sizes(scheme) == {name: len(indices) for name, indices in drawn.items()}
    assert list(split_sizes(scheme)) == ["train", "val", "test"]


@pytest.mark.parametrize("scheme, num_background, num_classes", [
    ("mamlpp", 964, 1200), ("lake", 50, 1623), ("lake", 1623, 1623)])
def test_too_few_classes_for_a_split_scheme_name_the_setting(scheme, num_background,
                                                             num_classes):
    with pytest.raises(ValueError, match=f"omniglot_split={scheme} needs over"):
        split_classes(num_background, num_classes, scheme)


def test_an_unknown_split_scheme_names_the_flag():
    with pytest.raises(ValueError, match="omniglot_split="):
        split_classes(964, 1623, "vinyals")


def test_default_scheme_is_mamlpp():
    default, mamlpp = split_classes(964, 1623), split_classes(964, 1623, "mamlpp")
    for name in default:
        np.testing.assert_array_equal(default[name], mamlpp[name])


def test_cache_file_is_readable_by_others(tmp_path, tiny_members):
    data_dir = write_zips(tmp_path / "data", tiny_members)
    load_omniglot(data_dir)
    assert os.stat(data_dir / CACHE_NAME).st_mode & 0o044 == 0o044
