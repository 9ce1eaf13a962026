"""The benchmark's FLOP count: convolutions, their gradients and matrix products."""

import tensorflow as tf

from benchmarks.flops import graph_flops


def traced_graph(function, *specs):
    return tf.function(function).get_concrete_function(*specs).graph


def test_a_convolution_and_both_its_gradients_count_once_each():
    def conv_and_gradients(images, kernel):
        with tf.GradientTape() as tape:
            tape.watch([images, kernel])
            loss = tf.reduce_sum(tf.nn.conv2d(images, kernel, 1, "SAME"))
        return tape.gradient(loss, [images, kernel])

    graph = traced_graph(conv_and_gradients, tf.TensorSpec((5, 7, 7, 3)),
                         tf.TensorSpec((3, 3, 3, 4)))
    one_conv = 2 * (5 * 7 * 7 * 4) * (3 * 3 * 3)
    assert graph_flops(graph) == 3 * one_conv


def test_matrix_products_count_their_inner_dimension_transposed_or_not():
    graph = traced_graph(lambda a, b: (tf.matmul(a, b), tf.matmul(a, a, transpose_a=True)),
                         tf.TensorSpec((6, 5)), tf.TensorSpec((5, 2)))
    assert graph_flops(graph) == 2 * 6 * 2 * 5 + 2 * 5 * 5 * 6


def test_element_wise_ops_count_nothing():
    graph = traced_graph(lambda x: tf.nn.relu(x * 2 + 1), tf.TensorSpec((4, 4)))
    assert graph_flops(graph) == 0
