"""What TensorFlow can compute on this process's default device, found by trying it once."""

import functools

import tensorflow as tf


@functools.cache
def grouped_convolution_gradients(dtype=tf.float32):
    """Whether TensorFlow differentiates grouped convolutions in `dtype` on its default device.

    Folded tasks (`fold_tasks`) need them. TensorFlow's CPU kernels have them
    only through oneDNN, in bfloat16 only on CPUs with AVX-512; elsewhere the
    gradient fails at run time, so it is tried once on two tiny groups.
    """
    x = tf.zeros((1, 3, 3, 2), dtype)
    kernel = tf.zeros((1, 1, 1, 2), dtype)
    try:
        with tf.GradientTape() as tape:
            tape.watch(x)
            loss = tf.reduce_sum(tf.nn.conv2d(x, kernel, 1, "SAME"))
        tape.gradient(loss, x).numpy()
    except tf.errors.InvalidArgumentError:
        return False
    return True
