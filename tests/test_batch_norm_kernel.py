"""The fused batch-norm kernel's derivatives equal TensorFlow's own.

The closed-form second derivative of the outputs, and the first derivative
of the returned batch mean and biased variance, are checked against
TensorFlow's autodiff of batch norm written from element-wise ops. The plain
path (tf_mamlpp.ops.plain_tensorflow) holds no custom gradient, and in
float64, which the fused kernels lack, is those element-wise ops.
"""

import contextlib

import numpy as np
import pytest
import tensorflow as tf

from tf_mamlpp.ops import batch_norm_kernel, plain_tensorflow
from tf_mamlpp.ops.batch_norm_kernel import (FIRST_DERIVATIVE_SCOPE, SECOND_DERIVATIVE_SCOPE,
                                             batch_norm_inference, batch_norm_training)

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
    dtype = gamma.dtype  # the losses', as the network's (float32 for 16-bit inputs)
    weights, probe = (tf.constant(rng.normal(size=x.shape), dtype) for _ in range(2))
    channel_probe = tf.constant(rng.normal(size=(2, x.shape[-1])), dtype)
    with tf.GradientTape() as outer:
        outer.watch([x, gamma, beta])
        with tf.GradientTape() as inner:
            inner.watch([x, gamma, beta])
            outputs = tf.cast(batch_norm(x, gamma, beta), dtype)
            loss = tf.reduce_sum(tf.square(outputs) * weights + tf.sin(outputs))
        dx, dgamma, dbeta = inner.gradient(loss, [x, gamma, beta])
        outer_loss = tf.reduce_sum(tf.cast(dx, dtype) * probe)
        if affine_in_outer_loss:
            outer_loss += (tf.reduce_sum(dgamma * channel_probe[0])
                           + tf.reduce_sum(dbeta * channel_probe[1]))
    return [dx, dgamma, dbeta, *outer.gradient(outer_loss, [x, gamma, beta])]


def random_inputs(shape, dtype=tf.float32, seed=0):
    rng = np.random.default_rng(seed)
    x = tf.constant(rng.normal(size=shape) * 2 + 1, dtype)
    gamma = tf.constant(rng.normal(size=shape[-1]) + 1, dtype)
    beta = tf.constant(rng.normal(size=shape[-1]), dtype)
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


def test_outputs_and_mean_equal_the_fused_kernels_and_the_variance_is_biased():
    shape = (6, 4, 4, 3)
    x, gamma, beta = random_inputs(shape)
    outputs, mean, variance = batch_norm_training(x, gamma, beta, EPSILON)
    fused_outputs, fused_mean, unbiased = tf.compat.v1.nn.fused_batch_norm(
        x, gamma, beta, epsilon=EPSILON, is_training=True)
    np.testing.assert_allclose(outputs, fused_outputs, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(mean, fused_mean, rtol=1e-6, atol=1e-6)
    size = shape[0] * shape[1] * shape[2]
    np.testing.assert_allclose(variance, unbiased * (size - 1) / size, rtol=1e-6, atol=1e-6)
    # The statistics that normalised the batch, as tf.nn.moments gives them.
    for got, want in zip((mean, variance), tf.nn.moments(x, [0, 1, 2])):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert mean.dtype == variance.dtype == tf.float32


def composite_batch_norm_with_moments(x, gamma, beta):
    """Composite batch norm and the batch mean and biased variance it normalised with.

    tf.nn.moments stops the mean's gradient inside the variance, which leaves
    first derivatives exact (the variance is stationary in the mean) but not
    second ones; `exact_batch_norm_with_moments` is for those.
    """
    mean, variance = tf.nn.moments(tf.cast(x, tf.float32), [0, 1, 2])
    outputs = gamma * (tf.cast(x, tf.float32) - mean) * tf.math.rsqrt(variance + EPSILON) + beta
    return tf.cast(outputs, x.dtype), mean, variance


def exact_batch_norm_with_moments(x, gamma, beta):
    """`composite_batch_norm` and its statistics, exact to any order."""
    mean = tf.reduce_mean(x, [0, 1, 2])
    variance = tf.reduce_mean(tf.square(x - mean), [0, 1, 2])
    return composite_batch_norm(x, gamma, beta), mean, variance


def kernel_batch_norm_with_moments(x, gamma, beta):
    return batch_norm_training(x, gamma, beta, EPSILON)


def gradients_of_outputs_and_moments(batch_norm, x, gamma, beta, statistics=("mean", "variance"),
                                     use_outputs=True, seed=2):
    """Values and first derivatives of a smooth loss of the outputs and the statistics.

    `statistics` names which of the batch mean and variance the loss reads,
    as a target pass normalised with a support set's moments reads them.
    """
    rng = np.random.default_rng(seed)
    weights = tf.constant(rng.normal(size=x.shape), tf.float32)
    mean_probe, variance_probe = (tf.constant(rng.normal(size=x.shape[-1]) * 10, tf.float32)
                                  for _ in range(2))
    with tf.GradientTape() as tape:
        tape.watch([x, gamma, beta])
        outputs, mean, variance = batch_norm(x, gamma, beta)
        outputs = tf.cast(outputs, tf.float32)
        loss = tf.zeros(())
        if use_outputs:
            loss += tf.reduce_sum(tf.square(outputs) * weights + tf.sin(outputs))
        if "mean" in statistics:
            loss += tf.reduce_sum(mean * mean_probe + tf.sin(mean))
        if "variance" in statistics:
            # Nonlinear, as 1/sqrt(variance + eps) is in a target normalised by it.
            loss += tf.reduce_sum(variance * variance_probe
                                  + tf.math.rsqrt(variance + EPSILON))
    gradients = tape.gradient(loss, [x, gamma, beta],
                              unconnected_gradients=tf.UnconnectedGradients.ZERO)
    return [outputs, mean, variance, *gradients]


MOMENT_NAMES = ["outputs", "mean", "variance", "dx", "dgamma", "dbeta"]


@pytest.mark.parametrize("shape", [(4, 5, 5, 3), (7, 3, 2, 6), (2, 1, 1, 4)])
@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "tf.function"])
@pytest.mark.parametrize("statistics", [("mean", "variance"), ("mean",), ("variance",)],
                         ids=["mean_and_variance", "mean", "variance"])
@pytest.mark.parametrize("use_outputs", [True, False], ids=["with_outputs", "statistics_only"])
def test_first_derivatives_of_the_mean_and_biased_variance_equal_tensorflows(
        shape, compiled, statistics, use_outputs):
    x, gamma, beta = random_inputs(shape)
    expected = gradients_of_outputs_and_moments(composite_batch_norm_with_moments, x, gamma,
                                                beta, statistics, use_outputs)
    run = gradients_of_outputs_and_moments
    if compiled:
        run = tf.function(run, autograph=True)
    actual = run(kernel_batch_norm_with_moments, x, gamma, beta, statistics, use_outputs)
    for name, got, want in zip(MOMENT_NAMES, actual, expected):
        atol = max(2e-4 * np.abs(want).max(), 1e-6)
        np.testing.assert_allclose(got, want, rtol=2e-4, atol=atol, err_msg=name)
    # The statistics' share of dx is well above that tolerance: leaving it out fails.
    outputs_only = gradients_of_outputs_and_moments(composite_batch_norm_with_moments, x,
                                                    gamma, beta, (), use_outputs)
    share = np.abs(expected[3] - outputs_only[3]).max()
    assert share > 10 * max(2e-4 * np.abs(expected[3]).max(), 1e-6)


def test_float16_inputs_give_float16_statistics_gradients_close_to_float32():
    x, gamma, beta = random_inputs((4, 5, 5, 3))
    expected = gradients_of_outputs_and_moments(kernel_batch_norm_with_moments, x, gamma, beta)
    actual = gradients_of_outputs_and_moments(kernel_batch_norm_with_moments,
                                              tf.cast(x, tf.float16), gamma, beta)
    assert actual[3].dtype == tf.float16
    assert actual[1].dtype == actual[2].dtype == tf.float32
    for name, got, want in zip(MOMENT_NAMES, actual, expected):
        np.testing.assert_allclose(tf.cast(got, tf.float32), want, rtol=0.05,
                                   atol=0.02 * np.abs(want).max(), err_msg=name)


@pytest.fixture
def statistics_gradient_spy(monkeypatch):
    """Records what the kernel's gradient is sent for the statistics.

    Returns a dict: `known_zero`, the verdicts of `_known_zero` on them, and
    `calls`, how often the statistics' term of dx was built.
    """
    record = {"known_zero": [], "calls": 0}
    known_zero, statistics_gradient = (batch_norm_kernel._known_zero,
                                       batch_norm_kernel._statistics_gradient)

    def spy_known_zero(tensor):
        verdict = known_zero(tensor)
        record["known_zero"].append(verdict)
        return verdict

    def spy_statistics_gradient(*args):
        record["calls"] += 1
        return statistics_gradient(*args)

    monkeypatch.setattr(batch_norm_kernel, "_known_zero", spy_known_zero)
    monkeypatch.setattr(batch_norm_kernel, "_statistics_gradient", spy_statistics_gradient)
    return record


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "tf.function"])
def test_a_loss_of_the_outputs_only_sends_known_zeros_for_the_statistics(
        compiled, statistics_gradient_spy):
    x, gamma, beta = random_inputs((4, 5, 5, 3))
    run = gradients_of_outputs_and_moments
    if compiled:
        run = tf.function(run, autograph=True)
    actual = run(kernel_batch_norm_with_moments, x, gamma, beta, statistics=())
    # Both statistics' gradients were zero before running, so no term was built.
    assert statistics_gradient_spy["known_zero"] == [True, True]
    assert statistics_gradient_spy["calls"] == 0
    expected = gradients_of_outputs_and_moments(composite_batch_norm_with_moments, x, gamma,
                                                beta, statistics=())
    for name, got, want in zip(MOMENT_NAMES, actual, expected):
        np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-4 * np.abs(want).max(),
                                   err_msg=name)


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "tf.function"])
def test_a_loss_of_a_statistic_builds_its_term(compiled, statistics_gradient_spy):
    x, gamma, beta = random_inputs((4, 5, 5, 3))
    run = gradients_of_outputs_and_moments
    if compiled:
        run = tf.function(run, autograph=True)
    run(kernel_batch_norm_with_moments, x, gamma, beta, statistics=("mean",), use_outputs=False)
    assert statistics_gradient_spy["known_zero"][0] is False
    assert statistics_gradient_spy["calls"] == 1


def test_outer_loss_of_the_statistics_and_the_inner_gradient_equals_tensorflows():
    """The MAML pattern: second order through a support loss of the outputs only,
    first order through an outer loss that also reads the support statistics."""
    x, gamma, beta = random_inputs((4, 5, 5, 3))
    rng = np.random.default_rng(3)
    weights, probe = (tf.constant(rng.normal(size=x.shape), tf.float32) for _ in range(2))
    moment_probe = tf.constant(rng.normal(size=(2, x.shape[-1])), tf.float32)

    def derivatives(batch_norm):
        with tf.GradientTape() as outer:
            outer.watch([x, gamma, beta])
            with tf.GradientTape() as inner:
                inner.watch([x, gamma, beta])
                outputs, mean, variance = batch_norm(x, gamma, beta)
                loss = tf.reduce_sum(tf.square(outputs) * weights + tf.sin(outputs))
            dx = inner.gradient(loss, x)
            outer_loss = (tf.reduce_sum(dx * probe) + tf.reduce_sum(tf.sin(mean) * moment_probe[0])
                          + tf.reduce_sum(tf.sqrt(variance) * moment_probe[1]))
        return [dx, *outer.gradient(outer_loss, [x, gamma, beta])]

    expected = derivatives(exact_batch_norm_with_moments)
    for actual in (derivatives(kernel_batch_norm_with_moments),
                   tf.function(derivatives)(kernel_batch_norm_with_moments)):
        for name, got, want in zip(["dx", "d2 x", "d2 gamma", "d2 beta"], actual, expected):
            atol = max(2e-4 * np.abs(want).max(), 1e-6)
            np.testing.assert_allclose(got, want, rtol=2e-4, atol=atol, err_msg=name)


def test_float16_inputs_give_float16_gradients_close_to_float32():
    x, gamma, beta = random_inputs((4, 5, 5, 3))
    expected = first_and_second_derivatives(kernel_batch_norm, x, gamma, beta)
    actual = first_and_second_derivatives(kernel_batch_norm, tf.cast(x, tf.float16), gamma, beta)
    assert actual[0].dtype == actual[3].dtype == tf.float16
    for name, got, want in zip(NAMES, actual, expected):
        np.testing.assert_allclose(tf.cast(got, tf.float32), want, rtol=0.05,
                                   atol=0.02 * np.abs(want).max(), err_msg=name)


@pytest.mark.slow
def test_the_second_order_meta_step_uses_the_closed_form(second_order_meta_step_ops):
    from tf_mamlpp.ops.batch_norm_kernel import SECOND_DERIVATIVE_SCOPE

    assert any(SECOND_DERIVATIVE_SCOPE in op.name for op in second_order_meta_step_ops)
    assert not any(op.type == "FusedBatchNormGradGradV3" for op in second_order_meta_step_ops)


@pytest.mark.parametrize("dtype, switched", [(tf.float32, True), (tf.float64, True),
                                             (tf.float64, False)],
                         ids=["float32 plain path", "float64 plain path", "float64 unswitched"])
def test_the_plain_path_is_tensorflows_own_derivatives_and_exact_in_float64(dtype, switched):
    """Under plain_tensorflow() the kernel holds no custom gradient (exports need none):
    the fused kernels with TensorFlow's registered derivatives, or in float64, which
    they lack, element-wise ops on either path."""
    x, gamma, beta = random_inputs((4, 5, 5, 3), dtype)
    run = tf.function(first_and_second_derivatives)
    with plain_tensorflow() if switched else contextlib.nullcontext():
        graph = run.get_concrete_function(kernel_batch_norm, x, gamma, beta).graph
        actual = run(kernel_batch_norm, x, gamma, beta)
    names_and_types = [(op.name, op.type) for op in graph.get_operations()]
    assert not any(FIRST_DERIVATIVE_SCOPE in name or SECOND_DERIVATIVE_SCOPE in name
                   for name, _ in names_and_types)
    fused = any(kind.startswith("FusedBatchNorm") for _, kind in names_and_types)
    assert fused == (dtype == tf.float32)
    expected = first_and_second_derivatives(composite_batch_norm, x, gamma, beta)
    # Rounding in another order only: some ulps of the largest term.
    rtol = 1e-12 if dtype == tf.float64 else 1e-5
    for name, got, want in zip(NAMES, actual, expected):
        assert got.dtype == dtype, name
        np.testing.assert_allclose(got, want, rtol=rtol, atol=rtol * np.abs(want).max(),
                                   err_msg=name)


@pytest.mark.parametrize("switched", [False, True], ids=["fused", "plain path"])
def test_inference_normalises_with_the_given_statistics(switched):
    x, gamma, beta = random_inputs((4, 5, 5, 3))
    rng = np.random.default_rng(4)
    mean = tf.constant(rng.normal(size=3), tf.float32)
    variance = tf.constant(rng.uniform(0.5, 2, size=3), tf.float32)
    with plain_tensorflow() if switched else contextlib.nullcontext():
        with tf.GradientTape() as tape:
            tape.watch([x, gamma, beta])
            outputs = batch_norm_inference(x, mean, variance, gamma, beta, EPSILON)
            loss = tf.reduce_sum(tf.sin(outputs))
    gradients = tape.gradient(loss, [x, gamma, beta])
    scale = (gamma / np.sqrt(variance + EPSILON)).numpy()
    expected = (x.numpy() - mean.numpy()) * scale + beta.numpy()
    np.testing.assert_allclose(outputs, expected, rtol=1e-5, atol=1e-5)
    d_outputs = np.cos(expected)
    normalised = (x.numpy() - mean.numpy()) / np.sqrt(variance.numpy() + EPSILON)
    for name, got, want in zip(["dx", "dgamma", "dbeta"], gradients,
                               [d_outputs * scale, (d_outputs * normalised).sum((0, 1, 2)),
                                d_outputs.sum((0, 1, 2))]):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max(),
                                   err_msg=name)
