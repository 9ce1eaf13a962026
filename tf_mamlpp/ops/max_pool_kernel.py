"""Leaky ReLU then 2x2 max-pooling, with derivatives that touch the full-size input least.

Max-pooling's backward pass routes each window's gradient to the window's
maximum: it is linear in the upstream gradient, dx = P dy, with P fixed by
the input. Two consequences make a stage's derivatives cheaper than
TensorFlow's:

- The leaky ReLU's derivative can be taken on the pooled values. The
  activation is increasing, so the position a window routes to holds the
  window's maximum, which is positive exactly when the pooled value is:
  LeakyReluGrad(P dy, act(x)) = P LeakyReluGrad(dy, pooled), a quarter of the
  values, in the first and in the second derivative.
- Second-order MAML differentiates the backward pass, and TensorFlow does
  that with MaxPoolGradGrad, which searches every window for its maximum
  again, on one core. Because the windows do not overlap, P's transpose is
  simpler: the backward kernel fed ones marks where P routes (the mask), and
  P^T ddx is the sum over each window of mask * ddx. That is exact whatever
  the kernel does with ties (the first maximum, or each of them), since the
  mask comes from the same kernel as the first derivative; on this CPU it
  is about three times faster than MaxPoolGradGrad.

The slope for negative inputs is 0.01, the reference code's F.leaky_relu
default. The forward pass is TensorFlow's. tests/test_max_pool_kernel.py
checks both derivatives against TensorFlow's, ties included. A third
derivative is not provided (MAML needs two). On the plain path
(`tf_mamlpp.ops.plain_tensorflow()`) it is the plain ops, differentiated by
TensorFlow.
"""

import tensorflow as tf
from tensorflow.python.ops import gen_nn_ops

from tf_mamlpp.ops import uses_plain_tensorflow

WINDOW = [1, 2, 2, 1]  # NHWC: 2x2 windows, stride 2
NEGATIVE_SLOPE = 0.01
# Name scopes of the derivative ops, which GradientTape's naming does not
# reach inside custom gradients; benchmarks/profile_meta_step.py reads them.
FIRST_DERIVATIVE_SCOPE = "max_pool_first_derivative"
SECOND_DERIVATIVE_SCOPE = "max_pool_second_derivative"


@tf.autograph.experimental.do_not_convert  # AutoGraph would drop the custom gradients
def leaky_relu_max_pool_2x2(inputs, negative_slope=NEGATIVE_SLOPE):
    """max_pool(leaky_relu(inputs)), 2x2 windows, stride 2, VALID padding, NHWC.

    `negative_slope` 0 is the plain ReLU.
    """
    if uses_plain_tensorflow():
        return tf.nn.max_pool2d(tf.nn.leaky_relu(inputs, negative_slope), 2, 2, "VALID")

    def activation_gradient(gradients, pooled):
        return tf.raw_ops.LeakyReluGrad(gradients=gradients, features=pooled,
                                        alpha=negative_slope)

    @tf.custom_gradient
    def relu_pool(x):
        rectified = tf.nn.leaky_relu(x, negative_slope)
        pooled = tf.nn.max_pool2d(rectified, 2, 2, "VALID")

        def gradient(d_pooled):
            with tf.name_scope(FIRST_DERIVATIVE_SCOPE):
                return backward(d_pooled, rectified, pooled)

        return pooled, gradient

    @tf.custom_gradient
    def backward(d_pooled, rectified, pooled):
        dx = _route(rectified, pooled, activation_gradient(d_pooled, pooled))

        def second_derivative(ddx):
            with tf.name_scope(SECOND_DERIVATIVE_SCOPE):
                mask = _route(rectified, pooled, tf.ones_like(pooled))
                # The mean of a 2x2 window times 4 is its sum, exactly.
                routed_back = tf.nn.avg_pool2d(mask * ddx, 2, 2, "VALID") * 4
                d_d_pooled = activation_gradient(routed_back, pooled)
            return d_d_pooled, None, None  # dx is piecewise constant in x

        return dx, second_derivative

    return relu_pool(inputs)


def _route(rectified, pooled, d_pooled):
    """P d_pooled: each window's gradient to the position of its maximum."""
    return gen_nn_ops.max_pool_grad(rectified, pooled, d_pooled, WINDOW, WINDOW, "VALID")
