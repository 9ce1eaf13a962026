"""A new task from image folders, classified by an exported model.

The support folder holds one sub-folder per class (its name is the class's
name, sorted names give labels 0..N-1); the query folder holds the images to
classify. The files go to the export's `adapt_and_predict_files` signature
unchanged, so they are decoded and resized as training images were, by the
model itself (saved_model.py, with image_decoding.py's `decode_image`, the one
training used); each is first checked to decode by that function, so that an
unreadable file is named.
"""

import pathlib

import numpy as np
import tensorflow as tf

from tf_mamlpp.data.class_images import DataError
from tf_mamlpp.data.image_decoding import decode_image
from tf_mamlpp.data.image_folders import IMAGE_SUFFIXES, image_files


def read_image_file(path, image_shape):
    """The contents of one image file, checked to decode as the export decodes it.

    Args:
      path: the image file.
      image_shape: the exported model's (h, w, c).

    Raises:
      DataError: the file is not a readable image, naming it (the export's
        error would name none).
    """
    try:
        contents = pathlib.Path(path).read_bytes()
        decode_image(contents, image_shape)
    except (tf.errors.InvalidArgumentError, OSError) as error:
        raise DataError(f"{path}: not a readable image") from error
    return contents


def read_support(folder, way, image_shape):
    """Support image files and labels from one sub-folder per class.

    Args:
      folder: the support folder.
      way: the exported model's number of classes.
      image_shape: the exported model's (h, w, c).

    Returns:
      (file contents [n], labels (n,) int32, class names in label order).

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
    contents, labels = [], []
    for label, class_folder in enumerate(classes):
        files = image_files(class_folder)
        if not files:
            raise DataError(f"{class_folder}: no images ({', '.join(IMAGE_SUFFIXES)})")
        contents += [read_image_file(path, image_shape) for path in files]
        labels += [label] * len(files)
    return contents, np.array(labels, np.int32), [path.name for path in classes]


def read_query(folder, image_shape):
    """Query image files' contents and paths, given the exported model's (h, w, c).

    Raises:
      DataError: the folder is missing or holds no image.
    """
    folder = pathlib.Path(folder)
    if not folder.is_dir():
        raise DataError(f"--query_dir {folder}: no such folder")
    files = image_files(folder)
    if not files:
        raise DataError(f"--query_dir {folder}: no images ({', '.join(IMAGE_SUFFIXES)})")
    return [read_image_file(path, image_shape) for path in files], files


def classify_folders(export_dir, support_dir, query_dir):
    """Adapts the SavedModel in `export_dir` to the support folder and classifies the queries.

    Returns:
      [(query file, predicted class name, probability)].
    """
    model = tf.saved_model.load(str(export_dir))
    if "adapt_and_predict_files" not in model.signatures:
        raise DataError(f"--export_dir {export_dir}: exported before models decoded image "
                        "files themselves; export its run again with --mode=export")
    image_shape = tuple(int(size) for size in model.image_shape[0].numpy())
    support, support_labels, class_names = read_support(support_dir, int(model.way[0].numpy()),
                                                        image_shape)
    queries, files = read_query(query_dir, image_shape)
    probabilities = model.signatures["adapt_and_predict_files"](
        support_image_bytes=tf.constant(support), support_labels=tf.constant(support_labels),
        query_image_bytes=tf.constant(queries))["probabilities"].numpy()
    return [(path, class_names[row.argmax()], float(row.max()))
            for path, row in zip(files, probabilities)]
