"""Image files to the pixels the network sees: one decoding for training and serving alike.

Training (omniglot.py, decoded_images.py), the exported model's file
signature (serving/saved_model.py) and `--mode=adapt` (serving/folder_task.py)
all decode here, so a file gives the same pixels whichever of them reads it. The steps:
1. decoded to 8-bit RGB (alpha dropped, not blended; a GIF's first frame);
2. for a one-channel model, made grayscale by tf.image.rgb_to_grayscale
   (0.2989 R + 0.5870 G + 0.1140 B, back to 8 bits as
   tf.image.convert_image_dtype does; a grayscale file comes back unchanged);
3. divided by 255 to [0, 1] and never inverted: white is 1, and Omniglot's
   strokes are dark on a background of 1;
4. stretched to (h, w) whatever the aspect ratio, by tf.image.resize with
   method="area": each pixel the mean of those it covers, so values stay in
   range without the ringing of bicubic, and thin pen strokes survive a
   reduction that bilinear (4 input pixels per output pixel) would skip.
Image folders' images (`rounded_to_uint8`) take step 4 before step 3 and are
rounded to 8 bits between them, so that a large data set's cache holds uint8,
a quarter of float32's size; Omniglot's are not rounded. TensorFlow Datasets
hands its images over decoded; `resized_8bit` takes them from step 2 on, so
that such a data set's images are those of its files (tfds_images.py). All of
it is TensorFlow ops, traceable inside a tf.function and a SavedModel.
"""

import numpy as np
import tensorflow as tf


def decode_image(contents, image_shape, rounded_to_uint8=False):
    """One image file's contents as float32 (h, w, c) in [0, 1], by the steps above.

    Args:
      contents: a scalar string tensor, a whole PNG, JPEG, GIF or BMP file.
      image_shape: (h, w, c), c 1 (grayscale) or 3 (RGB); h == w when rounded.
      rounded_to_uint8: image folders' decoding (`decode_resized`, read as
        value / 255 as episodes read it); otherwise Omniglot's.
    """
    height, width, channels = image_shape
    if rounded_to_uint8:
        return unit_range(decode_resized(contents, height, channels))
    return resized_to_unit_range(_decode_8bit(contents, channels), (height, width))


def decode_resized(contents, image_size, channels):
    """Image file contents to uint8 (image_size, image_size, channels): an image folder's
    training image as the decoded-image cache keeps it (steps 1, 2 and 4, rounded)."""
    return resized_8bit(tf.io.decode_image(contents, channels=3, expand_animations=False),
                        image_size, channels)


def resized_8bit(image, image_size, channels):
    """A decoded uint8 (H, W, c) image, c 1 to 4, as `decode_resized` gives its file.

    Its alpha channel, if any, is dropped as step 1 drops a file's; a
    grayscale image is made RGB as decoding its file as RGB would.
    """
    without_alpha = {4: 3, 2: 1}.get(image.shape[-1])
    if without_alpha:
        image = image[..., :without_alpha]
    if image.shape[-1] == 1 and channels == 3:
        image = tf.image.grayscale_to_rgb(image)
    elif image.shape[-1] == 3 and channels == 1:
        image = tf.image.rgb_to_grayscale(image)
    image = tf.image.resize(image, (image_size, image_size), method="area")
    return tf.saturate_cast(tf.round(image), tf.uint8)


def resized_to_unit_range(images, size):
    """Decoded uint8 images (..., H, W, c) to float32 (..., *size, c) in [0, 1]: steps 3
    and 4, Omniglot's, also for the images TensorFlow Datasets hands over decoded."""
    return tf.image.resize(unit_range(images), size, method="area")


def unit_range(images):
    """uint8 to float32 value / 255 (step 3), the quotient exactly as numpy divides.

    Looked up in a table of the 256 quotients rather than divided: inside a
    tf.function, and so in the exported model, TensorFlow's graph optimiser
    turns x / 255 into x * (1 / 255), one float32 step off for half the
    values, while tf.data, where training reads the uint8 cache
    (episodes.py), divides exactly.
    """
    quotients = tf.constant(np.arange(256, dtype=np.float32) / np.float32(255))
    return tf.gather(quotients, tf.cast(images, tf.int32))


def _decode_8bit(contents, channels):
    """Steps 1 and 2: uint8 (H, W, channels) at the file's own size.

    Every format is decoded as RGB, then made grayscale if asked for, so that
    PNG, JPEG, GIF and BMP files of either kind mix in one data set.
    """
    image = tf.io.decode_image(contents, channels=3, expand_animations=False)
    return tf.image.rgb_to_grayscale(image) if channels == 1 else image
