"""Specification of tf_mamlpp.data.decoded_images and of episodes from its two forms."""

import os

import numpy as np
import pytest
import tensorflow as tf

from synthetic_images import class_image, write_class_folders, write_image, write_split_folders
from tf_mamlpp.data import decoded_images, image_decoding
from tf_mamlpp.run import task_streams
from tf_mamlpp.data.class_images import ClassImages, DataError
from tf_mamlpp.data.episodes import EpisodeSpec, episode_dataset
from tf_mamlpp.data.image_folders import index_splits
from tf_mamlpp.data.mapped_class_images import MappedClassImages
from tf_mamlpp.run.config import resolve


@pytest.fixture
def split(tmp_path):
    """The train split (3 classes of 7 RGB 20x20 images, PNG and JPEG) and its cache folder."""
    root = write_split_folders(tmp_path / "data", classes=(3, 1, 1), per_class=7,
                               suffixes=(".png", ".jpg"))
    return index_splits(root)["train"], decoded_images.cache_dir(root, 16, 3)


def test_images_are_decoded_resized_and_kept_as_uint8(split):
    files, directory = split
    images = decoded_images.load_split(files, 16, 3, directory)
    assert isinstance(images, ClassImages)
    assert images.images.dtype == np.uint8 and images.images.shape == (21, 16, 16, 3)
    assert images.class_names == files.names
    for class_index, class_files in enumerate(files.files):
        for image, path in zip(images.images_of(class_index), class_files):
            expected = image_decoding.decode_resized(tf.io.read_file(str(path)), 16, 3)
            np.testing.assert_array_equal(image, expected.numpy())


def test_the_cache_is_reused_and_a_changed_class_alone_is_decoded_again(split, monkeypatch):
    files, directory = split
    first = decoded_images.load_split(files, 16, 3, directory)
    assert len(list(directory.glob("*.npy"))) == 3
    decoded = []
    original = decoded_images._decode_into_cache

    def recording(class_files, classes, paths, shape):
        decoded.extend(class_files.names[c] for c in classes)
        return original(class_files, classes, paths, shape)

    monkeypatch.setattr(decoded_images, "_decode_into_cache", recording)
    again = decoded_images.load_split(files, 16, 3, directory)
    assert decoded == []
    np.testing.assert_array_equal(again.images, first.images)
    write_image(files.files[1][0].parent / "extra.png", class_image(1, 99))
    changed = index_splits(files.source.parent)["train"]
    assert decoded_images.load_split(changed, 16, 3, directory).class_counts.tolist() == [7, 8, 7]
    assert decoded == [files.names[1]]


def test_a_read_only_data_folder_is_cached_elsewhere(tmp_path):
    root = write_class_folders(tmp_path / "data", num_classes=4, per_class=2, size=8)
    fallback = tmp_path / "home_cache"
    os.chmod(root, 0o555)
    try:
        directory = decoded_images.cache_dir(root, 8, 3, fallback=fallback)
        decoded_images.load_split(index_splits(root, "0.5,0.25,0.25")["train"], 8, 3, directory)
    finally:
        os.chmod(root, 0o755)
    assert directory.is_relative_to(fallback) and len(list(directory.glob("*.npy"))) == 2
    assert not (root / decoded_images.CACHE_FOLDER).exists()


@pytest.mark.parametrize("damage", [
    lambda path: path.write_text("not an image"),
    lambda path: path.write_bytes(path.read_bytes()[:len(path.read_bytes()) // 3]),
])
def test_an_undecodable_file_is_named_and_finished_classes_stay_cached(split, damage):
    files, directory = split
    bad = files.files[2][3]
    damage(bad)
    with pytest.raises(DataError, match=f"{bad}: not a readable image") as error:
        decoded_images.load_split(files, 16, 3, directory)
    assert "\n" not in str(error.value)
    assert len(list(directory.glob("*.npy"))) == 2  # the two classes before it


def test_mapped_images_read_the_same_pixels_from_disk(split):
    files, directory = split
    in_memory = decoded_images.load_split(files, 16, 3, directory, in_memory=True)
    mapped = decoded_images.load_split(files, 16, 3, directory, in_memory=False)
    assert isinstance(mapped, MappedClassImages)
    assert isinstance(mapped.arrays[0], np.memmap)
    np.testing.assert_array_equal(mapped.class_counts, in_memory.class_counts)
    picks = np.array([[6, 0], [1, 2]])
    np.testing.assert_array_equal(mapped.gather(np.array([2, 0]), picks),
                                  np.stack([in_memory.images_of(2)[[6, 0]],
                                            in_memory.images_of(0)[[1, 2]]]))


@pytest.mark.parametrize("augment", [False, True])
def test_in_memory_and_mapped_images_give_identical_tasks(split, augment):
    files, directory = split
    forms = [decoded_images.load_split(files, 16, 3, directory, in_memory=in_memory)
             for in_memory in (True, False)]
    spec = EpisodeSpec(way=3, shot=2, query=3)
    batches = [list(episode_dataset(images, spec, tasks_per_batch=4, seed=7, augment=augment,
                                    start_index=2, num_tasks=14)) for images in forms]
    assert len(batches[0]) == len(batches[1]) == 3
    for in_memory, mapped in zip(*batches):
        for key in in_memory:
            np.testing.assert_array_equal(in_memory[key].numpy(), mapped[key].numpy())
    images = batches[0][0]["support_images"].numpy()
    assert images.dtype == np.float32 and 0.0 <= images.min() and images.max() <= 1.0
    uint8_values = np.unique(np.round(images * 255))
    np.testing.assert_allclose(np.unique(images), uint8_values / 255, atol=1e-6)


def test_mapped_images_refuse_mismatched_classes():
    with pytest.raises(ValueError, match="class b: images must be uint8"):
        MappedClassImages([np.zeros((2, 4, 4, 3), np.uint8), np.zeros((2, 4, 4, 1), np.uint8)],
                          ["a", "b"])


@pytest.mark.parametrize("limit_gb, form", [(4.0, ClassImages), (0.0, MappedClassImages)])
def test_splits_over_the_memory_limit_stay_on_disk(split, limit_gb, form):
    files, _ = split
    config = resolve("folder", data_dir=str(files.source.parent), image_size=16, channels=3,
                     in_memory_limit_gb=limit_gb)
    loaded = task_streams.load_splits(config)
    assert all(isinstance(images, form) for images in loaded.values())
    assert [images.num_classes for images in loaded.values()] == [3, 1, 1]
