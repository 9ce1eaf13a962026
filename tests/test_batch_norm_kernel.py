"""The closed-form second derivative of batch norm equals TensorFlow's own."""

import numpy as np
import pytest
import tensorflow as tf

from tf_mamlpp.batch_norm_kernel import batch_norm_training

EPSILON = 1e-3


def composite_batch_norm(x, gamma, beta):
    """Batch norm from element-wise ops, which TensorFlow differentiates to any order."""
    mean = tf.reduce_mean(x, [0, 1, 2])
    variance = tf.reduce_mean(tf.square(x - mean), [0, 1, 2])
    return gamma * (x - mean) * tf.math.rsqrt(variance + EPSILON) + beta


def kernel_batch_norm(x, gamma, beta):
    return batch_norm_training(x, gamma, beta, EPSILON)[0]


def first_and_second_derivatives(batch_norm, x, gamma, beta, seed=1, affine_in_outer_loss=True):
    """An inner gradient of a smooth loss, and the gradient of a loss of that gradient.

    The inner loss is smooth in the outputs, so the upstream gradient depends
    on x and the derivative of the backward pass with respect to it counts.
    Without `affine_in_outer_loss` the outer loss sees dx only, as in MAML,
    whose inner loop adapts no batch-norm weights.
    """
    rng = np.random.default_rng(seed)
    weights, probe = (tf.constant(rng.normal(size=x.shape), tf.float32) for _ in range(2))
    channel_probe = tf.constant(rng.normal(size=(2, x.shape[-1])), tf.float32)
    with tf.GradientTape() as outer:
        outer.watch([x, gamma, beta])
        with tf.GradientTape() as inner:
            inner.watch([x, gamma, beta])
            outputs = tf.cast(batch_norm(x, gamma, beta), tf.float32)
            loss = tf.reduce_sum(tf.square(outputs) * weights + tf.sin(outputs))
        dx, dgamma, dbeta = inner.gradient(loss, [x, gamma, beta])
        outer_loss = tf.reduce_sum(tf.cast(dx, tf.float32) * probe)
        if affine_in_outer_loss:
            outer_loss += (tf.reduce_sum(dgamma * channel_probe[0])
                           + tf.reduce_sum(dbeta * channel_probe[1]))
    return [dx, dgamma, dbeta, *outer.gradient(outer_loss, [x, gamma, beta])]


def random_inputs(shape, dtype=tf.float32, seed=0):
    rng = np.random.default_rng(seed)
    x = tf.constant(rng.normal(size=shape) * 2 + 1, dtype)
    gamma = tf.constant(rng.normal(size=shape[-1]) + 1, tf.float32)
    beta = tf.constant(rng.normal(size=shape[-1]), tf.float32)
    return x, gamma, beta


NAMES = ["dx", "dgamma", "dbeta", "d2 x", "d2 gamma", "d2 beta"]


@pytest.mark.parametrize("shape", [(4, 5, 5, 3), (7, 3, 2, 6), (2, 1, 1, 4)])
@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "tf.function"])
@pytest.mark.parametrize("affine", [True, False], ids=["affine_in_outer_loss", "dx_only"])
def test_first_and_second_derivatives_equal_tensorflows(shape, compiled, affine):
    x, gamma, beta = random_inputs(shape)
    expected = first_and_second_derivatives(composite_batch_norm, x, gamma, beta,
                                            affine_in_outer_loss=affine)
    run = first_and_second_derivatives
    if compiled:
        run = tf.function(run, autograph=True)
    actual = run(kernel_batch_norm, x, gamma, beta, affine_in_outer_loss=affine)
    for name, got, want in zip(NAMES, actual, expected):
        # The floor: float32 rounding of a sum, for a channel of two values (shape2).
        atol = max(2e-4 * np.abs(want).max(), 1e-6)
        np.testing.assert_allclose(got, want, rtol=2e-4, atol=atol, err_msg=name)


def test_outputs_and_statistics_equal_the_fused_kernels():
    x, gamma, beta = random_inputs((6, 4, 4, 3))
    expected = tf.compat.v1.nn.fused_batch_norm(x, gamma, beta, epsilon=EPSILON,
                                                is_training=True)
    for got, want in zip(batch_norm_training(x, gamma, beta, EPSILON), expected):
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


def test_float16_inputs_give_float16_gradients_close_to_float32():
    x, gamma, beta = random_inputs((4, 5, 5, 3))
    expected = first_and_second_derivatives(kernel_batch_norm, x, gamma, beta)
    actual = first_and_second_derivatives(kernel_batch_norm, tf.cast(x, tf.float16), gamma, beta)
    assert actual[0].dtype == actual[3].dtype == tf.float16
    for name, got, want in zip(NAMES, actual, expected):
        np.testing.assert_allclose(tf.cast(got, tf.float32), want, rtol=0.05,
                                   atol=0.02 * np.abs(want).max(), err_msg=name)


def test_the_second_order_meta_step_uses_the_closed_form(second_order_meta_step_ops):
    from tf_mamlpp.batch_norm_kernel import SECOND_DERIVATIVE_SCOPE

    assert any(SECOND_DERIVATIVE_SCOPE in op.name for op in second_order_meta_step_ops)
    assert not any(op.type == "FusedBatchNormGradGradV3" for op in second_order_meta_step_ops)
