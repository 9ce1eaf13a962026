"""Training-mode batch norm whose second derivative is a closed form.

Second-order MAML differentiates the inner loop's gradient, so batch norm's
backward pass is itself differentiated. TensorFlow does that for
FusedBatchNormGrad by rebuilding the backward pass from element-wise ops and
differentiating them: about thirty passes over the activations, the largest
share of a second-order meta-step on a CPU. Here the fused kernels do the
forward and first backward passes, and the derivative of the backward pass
is written out so that the fused kernels do most of it too: about eight
passes over the activations, every other term a per-channel coefficient.

Derivation, per channel over the M = N*H*W positions, with xh the normalised
input, inv = 1/sqrt(biased variance + eps) and a = gamma * inv. The backward
pass is

    db = sum(dy),  dg = sum(dy * xh),  dx = a * (dy - db/M - xh * dg/M).

Given the upstream gradients (ddx, ddg, ddb) of (dx, dg, db), write
p = mean(ddx * xh), q = sum(ddx * (dy - db/M - xh * dg/M)) and
c = ddg - a * p. Then

    d dy    = a * ddx + c * xh + ddb - a * mean(ddx)
    d gamma = inv * q
    d x     = inv * (G - mean(G) - xh * mean(G * xh)) - gamma * q * inv^2 * xh / M,
              with G = c * dy - a * dg/M * ddx,

where mean(G) and mean(G * xh) follow from per-channel sums already taken.
The backward pass is linear in its upstream gradient, so the fused backward
kernel fed ddx returns a * (ddx - mean(ddx) - xh * p) together with sum(ddx)
and sum(ddx * xh): d dy is that plus ddg * xh + ddb, which the fused
inference kernel computes from x in one pass, as it does the xh term of d x.
The one sum left, sum(ddx * dy), is the filter gradient of a 1x1 depthwise
convolution. tests/test_batch_norm_kernel.py checks all of it against
TensorFlow's own second derivatives. A third derivative is not provided
(MAML needs two).

On the plain path (`tf_mamlpp.ops.plain_tensorflow()`) the outputs are the
fused kernel's with TensorFlow's registered derivatives, and the statistics
plain reductions. The fused kernels have no float64 version, so in float64,
on either path, batch norm is `moments` then `normalise`: element-wise ops
that TensorFlow differentiates to any order. Normalising with running
statistics (`batch_norm_inference`) needs no custom gradient: the fused
inference kernel, or in float64 `normalise`.
"""

import functools

import numpy as np
import tensorflow as tf

from tf_mamlpp.ops import uses_plain_tensorflow

# Name scopes of the derivative ops, which GradientTape's naming does not
# reach inside custom gradients; benchmarks/profile_meta_step.py reads them.
FIRST_DERIVATIVE_SCOPE = "batch_norm_first_derivative"
SECOND_DERIVATIVE_SCOPE = "batch_norm_second_derivative"


@tf.autograph.experimental.do_not_convert  # AutoGraph would drop the custom gradients
def batch_norm_training(inputs, gamma, beta, epsilon):
    """Normalises NHWC `inputs` with their batch statistics.

    Args:
      inputs: (N, H, W, C) float32, float16 or bfloat16 activations, or
        float64 with float64 `gamma` and `beta`.
      gamma, beta: (C,) scale and offset in the variables' dtype, float32 or
        float64.
      epsilon: Python float added to the variance before its square root.

    Returns:
      (outputs, mean, variance): outputs like `inputs`; the batch mean and the
      biased batch variance per channel that normalised them, in `gamma`'s
      dtype. All three carry gradients: a target batch normalised with a
      support set's statistics reaches the support pass through them. Through
      the closed forms the statistics' gradient is first order only (the
      outer tape takes it).
    """
    if uses_plain_tensorflow() or not _has_fused_kernel(inputs, gamma):
        return _differentiated_by_tensorflow(inputs, gamma, beta, epsilon)

    @tf.custom_gradient
    def fused_batch_norm(inputs, gamma, beta):
        empty = tf.constant([], tf.float32)
        outputs, mean, variance, *reserve = tf.raw_ops.FusedBatchNormV3(
            x=inputs, scale=gamma, offset=beta, mean=empty, variance=empty, epsilon=epsilon,
            is_training=True)
        size = _positions(inputs)

        def gradient(d_outputs, d_mean, d_variance):
            with tf.name_scope(FIRST_DERIVATIVE_SCOPE):
                dx, dg, db = backward(d_outputs, inputs, gamma, mean, variance, *reserve)
                if not (_known_zero(d_mean) and _known_zero(d_variance)):
                    dx += _statistics_gradient(inputs, mean, size, d_mean, d_variance)
            return dx, dg, db

        # FusedBatchNormV3 returns the unbiased variance; it normalised with the biased one.
        return (outputs, mean, variance * ((size - 1) / size)), gradient

    @tf.custom_gradient
    def backward(dy, x, gamma, mean, variance, *reserve):
        dx, dg, db, _, _ = tf.raw_ops.FusedBatchNormGradV3(
            y_backprop=dy, x=x, scale=gamma, reserve_space_1=reserve[0],
            reserve_space_2=reserve[1], reserve_space_3=reserve[2], epsilon=epsilon,
            is_training=True)

        def second_derivative(ddx, ddg, ddb):
            with tf.name_scope(SECOND_DERIVATIVE_SCOPE):
                d_dy, d_x, d_gamma = _second_derivative(
                    dy, x, gamma, mean, variance, reserve, db, dg, ddx, ddg, ddb, epsilon)
            return (d_dy, d_x, d_gamma) + (None,) * (2 + len(reserve))

        return (dx, dg, db), second_derivative

    return fused_batch_norm(inputs, gamma, beta)


def _differentiated_by_tensorflow(inputs, gamma, beta, epsilon):
    """The same normalisation with TensorFlow's derivatives, exact to any order.

    FusedBatchNormV3's registered gradient ignores its statistics outputs, so
    the statistics are plain reductions; in float64, which it has no kernel
    for, so is the normalisation.
    """
    mean, variance = moments(inputs, [0, 1, 2], gamma.dtype)
    if not _has_fused_kernel(inputs, gamma):
        return normalise(inputs, mean, variance, gamma, beta, epsilon), mean, variance
    empty = tf.constant([], tf.float32)
    outputs = tf.raw_ops.FusedBatchNormV3(
        x=inputs, scale=gamma, offset=beta, mean=empty, variance=empty, epsilon=epsilon,
        is_training=True)[0]
    return outputs, mean, variance


def batch_norm_inference(inputs, mean, variance, gamma, beta, epsilon):
    """Normalises NHWC `inputs` with given statistics, a running bank's.

    Args:
      inputs: (N, H, W, C) activations, as for `batch_norm_training`.
      mean, variance, gamma, beta: (C,), in the variables' dtype.
      epsilon: Python float added to the variance before its square root.

    Returns:
      outputs like `inputs`, differentiated by TensorFlow on either path.
    """
    if not _has_fused_kernel(inputs, gamma):
        return normalise(inputs, mean, variance, gamma, beta, epsilon)
    return tf.raw_ops.FusedBatchNormV3(
        x=inputs, scale=gamma, offset=beta, mean=mean, variance=variance, epsilon=epsilon,
        is_training=False)[0]


def moments(inputs, axes, dtype, keepdims=False):
    """Mean and biased variance over `axes`, in `dtype`, differentiable to any order.

    tf.nn.moments stops the gradient through the mean inside the variance,
    which is exact to first order only.
    """
    inputs = tf.cast(inputs, dtype)
    mean = tf.reduce_mean(inputs, axis=axes, keepdims=True)
    variance = tf.reduce_mean(tf.square(inputs - mean), axis=axes, keepdims=keepdims)
    return (mean if keepdims else tf.squeeze(mean, axes)), variance


def normalise(inputs, mean, variance, gamma, beta, epsilon):
    """gamma * (inputs - mean) / sqrt(variance + epsilon) + beta, in `gamma`'s dtype, cast back.

    Element-wise ops: the gradient reaches the statistics too, and hence the
    pass they came from.
    """
    scale = gamma * tf.math.rsqrt(variance + epsilon)
    outputs = (tf.cast(inputs, gamma.dtype) - mean) * scale + beta
    return tf.cast(outputs, inputs.dtype)


def _has_fused_kernel(inputs, gamma):
    """Whether FusedBatchNormV3 runs on these dtypes: float32 statistics with float32 or
    16-bit inputs; float64 it has no kernel for."""
    return tf.float64 not in (inputs.dtype, gamma.dtype)


def _positions(x):
    """M = N*H*W, the positions each channel's statistics are taken over, float32.

    A Python float where the shape is static, which keeps the traced graph small.
    """
    if x.shape.is_fully_defined():
        return float(x.shape.num_elements() // x.shape[-1])
    return tf.cast(tf.size(x) // tf.shape(x)[-1], tf.float32)


def _statistics_gradient(x, mean, size, d_mean, d_variance):
    """Gradient for x of the batch mean and biased variance, given theirs: dm/M + 2dv(x-m)/M."""
    d_mean = 0.0 if d_mean is None else d_mean
    d_variance = 0.0 if d_variance is None else d_variance
    gradient = (d_mean + 2 * d_variance * (_to_float32(x) - mean)) / size
    return tf.cast(gradient, x.dtype)


def _second_derivative(dy, x, gamma, mean, variance, reserve, db, dg, ddx, ddg, ddb, epsilon):
    """Gradients for (dy, x, gamma) of the backward pass, given (ddx, ddg, ddb); see above."""
    size = _positions(x)
    biased_variance = variance * ((size - 1) / size)
    inv = tf.math.rsqrt(biased_variance + epsilon)
    a = gamma * inv
    projected, ddx_xh_sum, ddx_sum, _, _ = tf.raw_ops.FusedBatchNormGradV3(
        y_backprop=ddx, x=x, scale=gamma, reserve_space_1=reserve[0], reserve_space_2=reserve[1],
        reserve_space_3=reserve[2], epsilon=epsilon, is_training=True)
    normalised = functools.partial(_scaled_normalised, x, mean, biased_variance, epsilon)
    d_dy = _to_float32(projected)
    if not (_known_zero(ddg) and _known_zero(ddb)):
        d_dy += normalised(ddg, ddb)
    dy, ddx = _to_float32(dy), _to_float32(ddx)
    dy_mean, dy_xh_mean = db / size, dg / size
    ddx_mean, p = ddx_sum / size, ddx_xh_sum / size
    q = _channel_dot(ddx, dy) - size * (dy_mean * ddx_mean + dy_xh_mean * p)
    c = ddg - a * p
    k = a * dy_xh_mean  # G = c * dy - k * ddx
    g_mean = c * dy_mean - k * ddx_mean
    g_xh_mean = c * dy_xh_mean - k * p
    d_x = (dy * (inv * c) - ddx * (inv * k)
           + normalised(-inv * (g_xh_mean + gamma * q * inv / size), -inv * g_mean))
    return tf.cast(d_dy, x.dtype), tf.cast(d_x, x.dtype), inv * q


def _scaled_normalised(x, mean, biased_variance, epsilon, scale, offset):
    """scale * xh + offset, float32, in one pass of the fused inference kernel."""
    outputs = tf.raw_ops.FusedBatchNormV3(
        x=x, scale=scale, offset=offset, mean=mean, variance=biased_variance, epsilon=epsilon,
        is_training=False)[0]
    return _to_float32(outputs)


def _known_zero(tensor):
    """Whether `tensor` is zero before it runs.

    MAML's inner loop adapts no batch-norm weights, so the outer tape sends
    constant zeros for the gradients of dg and db, and a support loss sends
    them for the batch statistics; their terms are left out.
    """
    if tensor is None:
        return True
    value = tf.get_static_value(tensor)
    return value is not None and not np.any(value)


def _to_float32(tensor):
    return tf.cast(tensor, tf.float32)


def _channel_dot(a, b):
    """sum(a * b) per channel of NHWC tensors, in one pass and no product tensor."""
    channels = a.shape[-1]
    filter_gradient = tf.nn.depthwise_conv2d_backprop_filter(
        a, [1, 1, channels, 1], b, strides=[1, 1, 1, 1], padding="VALID")
    return tf.reshape(filter_gradient, [channels])
