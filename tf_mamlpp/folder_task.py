"""A new task from image folders, classified by an exported model.

The support folder holds one sub-folder per class (its name is the class's
name, sorted names give labels 0..N-1); the query folder holds the images to
classify. Images are decoded and resized exactly as training images were.
"""

import pathlib

import numpy as np
import tensorflow as tf

from tf_mamlpp.class_images import DataError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif")


def decode_image_file(path, image_shape):
    """One image file as float32 (height, width, channels) in [0, 1].

    Resized with 'area', as the training images were.

    Raises:
      DataError: the file is not a readable image, naming it.
    """
    height, width, channels = image_shape
    try:
        image = tf.io.decode_image(pathlib.Path(path).read_bytes(), channels=channels,
                                   expand_animations=False)
    except (tf.errors.InvalidArgumentError, OSError) as error:
        raise DataError(f"{path}: not a readable image") from error
    image = tf.cast(image, tf.float32) / 255.0
    return tf.image.resize(image, (height, width), method="area").numpy()


def image_files(folder):
    """The image files directly in `folder`, sorted by name."""
    return sorted(path for path in pathlib.Path(folder).iterdir()
                  if path.suffix.lower() in IMAGE_SUFFIXES)


def read_support(folder, image_shape, way):
    """Support images and labels from one sub-folder per class.

    Returns:
      (images (n, h, w, c), labels (n,) int32, class names in label order).

    Raises:
      DataError: the folder is missing, the number of classes is not `way`,
        or a class has no image.
    """
    folder = pathlib.Path(folder)
    if not folder.is_dir():
        raise DataError(f"--support_dir {folder}: no such folder")
    classes = sorted(path for path in folder.iterdir() if path.is_dir())
    if len(classes) != way:
        raise DataError(f"--support_dir {folder}: {len(classes)} class folders, but the "
                        f"exported model is {way}-way")
    images, labels = [], []
    for label, class_folder in enumerate(classes):
        files = image_files(class_folder)
        if not files:
            raise DataError(f"{class_folder}: no images ({', '.join(IMAGE_SUFFIXES)})")
        images += [decode_image_file(path, image_shape) for path in files]
        labels += [label] * len(files)
    return np.stack(images), np.array(labels, np.int32), [path.name for path in classes]


def read_query(folder, image_shape):
    """Query images and their file names.

    Raises:
      DataError: the folder is missing or holds no image.
    """
    folder = pathlib.Path(folder)
    if not folder.is_dir():
        raise DataError(f"--query_dir {folder}: no such folder")
    files = image_files(folder)
    if not files:
        raise DataError(f"--query_dir {folder}: no images ({', '.join(IMAGE_SUFFIXES)})")
    return np.stack([decode_image_file(path, image_shape) for path in files]), files


def classify_folders(export_dir, support_dir, query_dir):
    """Adapts the SavedModel in `export_dir` to the support folder and classifies the queries.

    Returns:
      [(query file, predicted class name, probability)].
    """
    model = tf.saved_model.load(str(export_dir))
    image_shape = tuple(int(d) for d in model.image_shape.numpy())
    support_images, support_labels, class_names = read_support(
        support_dir, image_shape, int(model.way.numpy()))
    query_images, files = read_query(query_dir, image_shape)
    probabilities = model.signatures["adapt_and_predict"](
        support_images=tf.constant(support_images), support_labels=tf.constant(support_labels),
        query_images=tf.constant(query_images))["probabilities"].numpy()
    return [(path, class_names[row.argmax()], float(row.max()))
            for path, row in zip(files, probabilities)]
