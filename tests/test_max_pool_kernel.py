"""The derivatives of leaky ReLU then max-pooling equal TensorFlow's own, to second order.

Every check runs with the network's slope (0.01) and with the plain ReLU (0).
The plain path (tf_mamlpp.ops.plain_tensorflow) is TensorFlow's own ops.
"""

import contextlib
import functools

import numpy as np
import pytest
import tensorflow as tf

from tf_mamlpp.ops import plain_tensorflow
from tf_mamlpp.ops.max_pool_kernel import (FIRST_DERIVATIVE_SCOPE, NEGATIVE_SLOPE,
                                           SECOND_DERIVATIVE_SCOPE, leaky_relu_max_pool_2x2)

SLOPES = pytest.mark.parametrize("slope", [NEGATIVE_SLOPE, 0.0], ids=["leaky", "relu"])


def tensorflow_leaky_relu_max_pool(x, slope):
    return tf.nn.max_pool2d(tf.nn.leaky_relu(x, slope), 2, 2, "VALID")


def first_and_second_derivatives(pool, x, seed=1, dtype=tf.float32):
    """An inner gradient of a loss of the pooled input, and the gradient of a loss of it.

    The inner loss is smooth in the pooled values, so the upstream gradient
    depends on x; it also has a term linear in them, whose weights reach the
    upstream gradient by another path than x, as a network's weights do.
    The losses are taken in `dtype`. Returns the pooled values, dx, and the
    outer gradients for x and those weights.
    """
    rng = np.random.default_rng(seed)
    probe = tf.constant(rng.normal(size=x.shape), dtype)
    pooled_shape = (x.shape[0], x.shape[1] // 2, x.shape[2] // 2, x.shape[3])
    weights = tf.constant(rng.normal(size=pooled_shape), dtype)
    with tf.GradientTape() as outer:
        outer.watch([x, weights])
        with tf.GradientTape() as inner:
            inner.watch(x)
            pooled = tf.cast(pool(x), dtype)
            loss = tf.reduce_sum(tf.sin(pooled) * tf.cos(2 * pooled) + pooled * weights)
        dx = inner.gradient(loss, x)
        outer_loss = tf.reduce_sum(tf.cast(dx, dtype) * probe)
    return (pool(x), dx, *outer.gradient(outer_loss, [x, weights]))


def ties(shape, dtype=tf.float32):
    """Integers from a narrow range: many 2x2 windows hold their maximum twice or more,
    many are all zero after the ReLU, and many have a negative maximum."""
    rng = np.random.default_rng(0)
    return tf.constant(rng.integers(-2, 3, size=shape), dtype)


@SLOPES
@pytest.mark.parametrize("shape", [(3, 6, 6, 4), (2, 7, 5, 3), (1, 2, 2, 1)])
@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "tf.function"])
def test_derivatives_equal_tensorflows_with_ties(shape, compiled, slope):
    x = ties(shape)
    run = tf.function(first_and_second_derivatives) if compiled else first_and_second_derivatives
    actual = run(functools.partial(leaky_relu_max_pool_2x2, negative_slope=slope), x)
    expected = first_and_second_derivatives(
        functools.partial(tensorflow_leaky_relu_max_pool, slope=slope), x)
    for second_derivative in expected[2:]:  # both are exercised
        assert float(tf.reduce_max(tf.abs(second_derivative))) > 0
    for name, got, want in zip(["pooled", "dx", "d2 x", "d2 weights"], actual, expected):
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6, err_msg=name)


@SLOPES
def test_float16_inputs(slope):
    x = ties((2, 6, 6, 3))
    pool = functools.partial(leaky_relu_max_pool_2x2, negative_slope=slope)
    expected = first_and_second_derivatives(pool, x)
    actual = first_and_second_derivatives(pool, tf.cast(x, tf.float16))
    assert actual[1].dtype == actual[2].dtype == tf.float16
    for got, want in zip(actual, expected):
        np.testing.assert_allclose(tf.cast(got, tf.float32), want, rtol=1e-2, atol=1e-2)


@pytest.mark.slow
def test_the_second_order_meta_step_uses_the_mask(second_order_meta_step_ops):
    assert any(SECOND_DERIVATIVE_SCOPE in op.name for op in second_order_meta_step_ops)
    assert not any(op.type == "MaxPoolGradGrad" for op in second_order_meta_step_ops)


@SLOPES
@pytest.mark.parametrize("switched", [False, True], ids=["closed form", "plain path"])
def test_float64_derivatives_equal_tensorflows_on_both_paths(slope, switched):
    x = ties((3, 6, 6, 4), tf.float64)
    expected = first_and_second_derivatives(
        functools.partial(tensorflow_leaky_relu_max_pool, slope=slope), x, dtype=tf.float64)
    run = tf.function(first_and_second_derivatives)
    pool = functools.partial(leaky_relu_max_pool_2x2, negative_slope=slope)
    with plain_tensorflow() if switched else contextlib.nullcontext():
        graph = run.get_concrete_function(pool, x, dtype=tf.float64).graph
        actual = run(pool, x, dtype=tf.float64)
    # The plain path is TensorFlow's ops with their registered gradients,
    # MaxPoolGradGrad included, and no custom gradient (exports need none).
    closed_form = any(FIRST_DERIVATIVE_SCOPE in op.name or SECOND_DERIVATIVE_SCOPE in op.name
                      for op in graph.get_operations())
    grad_grad = any(op.type == "MaxPoolGradGrad" for op in graph.get_operations())
    assert (closed_form, grad_grad) == ((False, True) if switched else (True, False))
    for name, got, want in zip(["pooled", "dx", "d2 x", "d2 weights"], actual, expected):
        assert got.dtype == tf.float64, name
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12, err_msg=name)
