"""2x2 max-pooling whose second derivative is a mask and a window sum.

Max-pooling's backward pass routes each window's gradient to the window's
maximum: it is linear in the upstream gradient, dx = P dy, with P fixed by
the input. Second-order MAML differentiates it, and TensorFlow does that with
MaxPoolGradGrad, which searches every window for its maximum again, on one
core. Because the windows do not overlap, P's transpose is simpler: the
backward kernel fed ones marks where P routes (the mask), and P^T ddx is the
sum over each window of mask * ddx. That is exact whatever the kernel does
with ties (the first maximum, or each of them), since the mask comes from
the same kernel as the first derivative; on this CPU it is about three times
faster than MaxPoolGradGrad. tests/test_max_pool_kernel.py checks both
derivatives against TensorFlow's, ties included. A third derivative is not
provided (MAML needs two).
"""

import tensorflow as tf
from tensorflow.python.ops import gen_nn_ops

WINDOW = [1, 2, 2, 1]  # NHWC: 2x2 windows, stride 2
SECOND_DERIVATIVE_SCOPE = "max_pool_second_derivative"


@tf.autograph.experimental.do_not_convert  # AutoGraph would drop the custom gradients
def max_pool_2x2(inputs):
    """2x2 max-pooling with stride 2 and VALID padding of NHWC `inputs`."""

    @tf.custom_gradient
    def pool(x):
        y = tf.nn.max_pool2d(x, 2, 2, "VALID")

        def gradient(dy):
            return backward(dy, x, y)

        return y, gradient

    @tf.custom_gradient
    def backward(dy, x, y):
        dx = gen_nn_ops.max_pool_grad(x, y, dy, WINDOW, WINDOW, "VALID")

        def second_derivative(ddx):
            with tf.name_scope(SECOND_DERIVATIVE_SCOPE):
                mask = gen_nn_ops.max_pool_grad(x, y, tf.ones_like(y), WINDOW, WINDOW, "VALID")
                # The window mean of a 2x2 window times 4 is its sum, exactly.
                d_dy = tf.nn.avg_pool2d(mask * ddx, 2, 2, "VALID") * 4
            return d_dy, None, None  # dx is piecewise constant in x and y

        return dx, second_derivative

    return pool(inputs)
