"""Specification of tf_mamlpp.data.image_decoding: a file gives the same pixels on every path.

Three paths read an image file:
- training: image folders through the decoded-image cache (decoded_images.py,
  uint8 that episodes read as value / 255), Omniglot through its loader
  (omniglot.py), then both through a task of the episode pipeline;
- `--mode=adapt`: folder_task.py reads the support and query files and hands
  their bytes, unchanged, to the export's file signature;
- the export's file signature: saved_model.decode_files inside a tf.function of
  the signature's input type.
For PNG and JPEG files, grayscale and RGB, made grayscale or kept RGB, and
for Omniglot's drawings, every path must give bit-identical pixels.
"""

import functools
import pathlib
import zipfile

import numpy as np
import pytest
import tensorflow as tf

from synthetic_images import class_image, write_image, write_split_folders
from tf_mamlpp.data import decoded_images, image_decoding
from tf_mamlpp.data.episodes import EpisodeSpec, episode_dataset
from tf_mamlpp.data.image_folders import index_splits
from tf_mamlpp.data.omniglot import load_omniglot
from tf_mamlpp.serving import folder_task, saved_model

REPO = pathlib.Path(__file__).resolve().parents[1]
OMNIGLOT_DIR = REPO / "datasets" / "omniglot"
# One character of each part, three drawings each, from the shipped archives.
OMNIGLOT_CHARACTERS = {"images_background": "Greek/character05",
                       "images_evaluation": "Tibetan/character10"}
DRAWINGS = 3


@functools.cache
def signature_decoding(image_shape, rounded_to_uint8):
    """The file signature's decoding, traced as the export traces it."""
    return tf.function(lambda files: saved_model.decode_files(files, image_shape, rounded_to_uint8),
                       input_signature=[tf.TensorSpec((None,), tf.string)])


def training_images(class_images):
    """Every image of `class_images`, as a training task hands them to the network: one
    task of all classes and images, (images, h, w, c) in the task's order."""
    count = int(class_images.class_counts[0])
    assert (class_images.class_counts == count).all()
    spec = EpisodeSpec(way=class_images.num_classes, shot=1, query=count - 1)
    task = next(iter(episode_dataset(class_images, spec, tasks_per_batch=1, seed=0,
                                     augment=False, num_tasks=1)))
    return np.concatenate([task["support_images"][0], task["target_images"][0]])


def assert_the_same_images(training, decoded):
    """Each training image is bit-identical to a decoded file, and each file is one of them."""
    matches = [index for image in training
               for index, candidate in enumerate(decoded) if np.array_equal(image, candidate)]
    assert sorted(matches) == list(range(len(decoded)))


def test_resizing_averages_and_grayscale_is_the_luminance(tmp_path):
    image = np.zeros((4, 4, 3), np.uint8)
    image[:2, :2] = (200, 100, 0)  # one quarter coloured
    write_image(tmp_path / "image.png", image)
    resized = image_decoding.decode_resized(tf.io.read_file(str(tmp_path / "image.png")), 2, 3)
    np.testing.assert_array_equal(resized.numpy()[0, 0], [200, 100, 0])
    np.testing.assert_array_equal(resized.numpy()[1, 1], [0, 0, 0])
    gray = image_decoding.decode_resized(tf.io.read_file(str(tmp_path / "image.png")), 1, 1)
    assert gray.shape == (1, 1, 1)
    assert abs(int(gray.numpy()[0, 0, 0]) - round((0.2989 * 200 + 0.587 * 100) / 4)) <= 1


def test_unit_range_is_the_exact_quotient_inside_a_tf_function_too():
    """TensorFlow's graph optimiser would turn x / 255 into x * (1 / 255) in the export."""
    values = np.arange(256, dtype=np.uint8)
    exact = values.astype(np.float32) / np.float32(255)
    np.testing.assert_array_equal(image_decoding.unit_range(values).numpy(), exact)
    traced = tf.function(image_decoding.unit_range)(tf.constant(values))
    np.testing.assert_array_equal(traced.numpy(), exact)


@pytest.mark.parametrize("file_channels", [1, 3], ids=["gray_files", "rgb_files"])
@pytest.mark.parametrize("channels", [1, 3], ids=["gray_model", "rgb_model"])
def test_image_folder_files_decode_alike_in_training_adapt_and_the_export(
        tmp_path, file_channels, channels):
    root = write_split_folders(tmp_path / "data", classes=(2, 1, 1), per_class=4, size=21,
                               channels=file_channels, suffixes=(".png", ".jpg"))
    files = index_splits(root)["train"]
    paths = [path for class_files in files.files for path in class_files]
    assert {path.suffix for path in paths} == {".png", ".jpg"}
    image_shape = (16, 16, channels)
    cached = decoded_images.load_split(files, 16, channels,
                                       decoded_images.cache_dir(root, 16, channels))
    assert cached.images.dtype == np.uint8

    # --mode=adapt reads the split's folder as its support set.
    contents, labels, class_names = folder_task.read_support(root / "train", 2, image_shape)
    assert class_names == ["n0000", "n0001"] and labels.tolist() == [0] * 4 + [1] * 4
    assert contents == [path.read_bytes() for path in paths]
    adapt = signature_decoding(image_shape, rounded_to_uint8=True)(contents).numpy()

    assert_the_same_images(training_images(cached), adapt)
    eager = [image_decoding.decode_image(content, image_shape, rounded_to_uint8=True).numpy()
             for content in contents]
    np.testing.assert_array_equal(eager, adapt)


@pytest.fixture(scope="module")
def omniglot_dir(tmp_path_factory):
    """Omniglot's extracted layout: per part, a few shipped drawings of one character
    and an RGB PNG of another size."""
    root = tmp_path_factory.mktemp("omniglot")
    for label, (part, character) in enumerate(OMNIGLOT_CHARACTERS.items()):
        with zipfile.ZipFile(OMNIGLOT_DIR / f"{part}.zip") as archive:
            names = sorted(name for name in archive.namelist()
                           if name.startswith(f"{part}/{character}/") and name.endswith(".png"))
            for name in names[:DRAWINGS]:
                (root / name).parent.mkdir(parents=True, exist_ok=True)
                (root / name).write_bytes(archive.read(name))
        write_image(root / part / character / "zz_colour.png",
                    class_image(label, index=0, size=40)[:, :33])  # 40x33 RGB
    return root


def test_omniglot_drawings_decode_alike_in_its_loader_adapt_and_the_export(
        omniglot_dir, tmp_path):
    loaded = load_omniglot(omniglot_dir, tmp_path / "cache")
    assert loaded.class_names == [f"{part}/{character}"
                                  for part, character in OMNIGLOT_CHARACTERS.items()]
    assert loaded.class_counts.tolist() == [DRAWINGS + 1] * 2
    adapt = []
    for c, class_name in enumerate(loaded.class_names):
        # --mode=adapt reads a character's folder as its query folder.
        contents, paths = folder_task.read_query(omniglot_dir / class_name, (28, 28, 1))
        assert contents == [path.read_bytes() for path in paths]
        adapt.append(signature_decoding((28, 28, 1), rounded_to_uint8=False)(contents).numpy())
        np.testing.assert_array_equal(adapt[-1], loaded.images_of(c))
    assert_the_same_images(training_images(loaded), np.concatenate(adapt))
