"""Small image data sets written in each layout that tf_mamlpp.data.image_folders reads.

Every class has its own brightness and stripe direction, so its images look
alike and unlike other classes' (a task can be learnt); every image has noise
of its own, so no two are equal.
"""

import pathlib

import numpy as np
import tensorflow as tf


def class_image(label, index, size=20, channels=3):
    """uint8 (size, size, channels): image `index` of class `label`."""
    rng = np.random.default_rng(1000 * label + index)
    ramp = np.linspace(0.0, 1.0, size)
    angle = label * 2.4
    stripes = np.cos(6 * (np.cos(angle) * ramp[None, :] + np.sin(angle) * ramp[:, None]))
    level = 40 + (label * 53) % 150
    image = level + 50 * stripes[..., None] + rng.normal(0, 8, (size, size, channels))
    return np.clip(image, 0, 255).astype(np.uint8)


def write_image(path, image):
    """Writes a uint8 (H, W, C) image as PNG or JPEG, after the path's suffix."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    encode = tf.io.encode_png if path.suffix == ".png" else tf.io.encode_jpeg
    path.write_bytes(encode(image).numpy())


def write_class_folder(folder, label, count, size=20, channels=3, suffixes=(".png",)):
    """`count` images of class `label` in `folder`, cycling through `suffixes`."""
    for index in range(count):
        write_image(pathlib.Path(folder) / f"{index:03d}{suffixes[index % len(suffixes)]}",
                    class_image(label, index, size, channels))


def write_split_folders(root, classes=(6, 3, 3), per_class=6, **image_options):
    """train/, val/, test/ with `classes` class folders each; returns `root`."""
    label = 0
    for split, count in zip(("train", "val", "test"), classes):
        for _ in range(count):
            write_class_folder(pathlib.Path(root) / split / f"n{label:04d}", label, per_class,
                               **image_options)
            label += 1
    return pathlib.Path(root)


def write_split_files(root, classes=(6, 3, 3), per_class=6, size=20, channels=3):
    """images/ with train.csv, val.csv, test.csv (filename,label) beside it; returns `root`."""
    root = pathlib.Path(root)
    label = 0
    for split, count in zip(("train", "val", "test"), classes):
        rows = ["filename,label"]
        for _ in range(count):
            for index in range(per_class):
                name = f"n{label:04d}{index:04d}.jpg"
                write_image(root / "images" / name, class_image(label, index, size, channels))
                rows.append(f"{name},n{label:04d}")
            label += 1
        (root / f"{split}.csv").write_text("\n".join(rows) + "\n")
    return root


def write_class_folders(root, num_classes=10, per_class=6, **image_options):
    """One folder of classes, no split; returns `root`."""
    for label in range(num_classes):
        write_class_folder(pathlib.Path(root) / f"class{label:02d}", label, per_class,
                           **image_options)
    return pathlib.Path(root)
