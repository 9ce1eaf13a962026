"""Specification of tf_mamlpp.core.per_step_batch_norm (MAML++ BNRS and BNWB).

Weight state i normalises with bank i of the affine weights, a support batch
with its own statistics, a target batch as the mode says: by itself
(TRANSDUCTIVE), by the support moments (SUPPORT), by those blended with its
instance moments (TASK_NORM, in each form of its alpha, with biased or unbiased
variances) or by running bank i (RUNNING). A running update moves each row
towards that state's statistics only. Expected values are computed in NumPy.
"""

import keras
import numpy as np
import pytest
import tensorflow as tf

from tf_mamlpp.core.batch_norm_modes import (DIRECT_ALPHA, HALF_START, PER_STEP_ALPHA,
                                             REPTILE_ALPHA, RUNNING, SIZE_ALPHA, SUPPORT,
                                             TASK_NORM, TASK_NORM_ALPHAS, TRANSDUCTIVE)
from tf_mamlpp.core.per_step_batch_norm import Moments, PerStepBatchNorm

STEPS, CHANNELS, EPSILON = 3, 4, 1e-3


def build_layer(per_step_statistics=True, per_step_affine=True, num_steps=STEPS, **kwargs):
    """A built layer whose banks hold a different value in every row."""
    layer = PerStepBatchNorm(num_steps, per_step_statistics, per_step_affine,
                             epsilon=EPSILON, **kwargs)
    layer.build((None, 5, 5, CHANNELS))
    rng = np.random.default_rng(1)
    for variable, low, high in ((layer.gamma, 0.5, 2.0), (layer.beta, -1.0, 1.0),
                                (layer.moving_mean, -1.0, 1.0),
                                (layer.moving_variance, 0.5, 3.0)):
        variable.assign(rng.uniform(low, high, variable.shape).astype(np.float32))
    return layer


def activations(seed=0, channels=CHANNELS):
    rng = np.random.default_rng(seed)
    return (rng.normal(size=(6, 5, 5, channels)) * 3 + 2).astype(np.float32)


def normalise(x, mean, variance, gamma, beta):
    return (x - mean) / np.sqrt(variance + EPSILON) * gamma + beta


def batch_moments(x):
    """Per-channel mean and biased variance, which TRANSDUCTIVE mode normalises with."""
    x = x.astype(np.float64)
    return x.mean(axis=(0, 1, 2)), x.var(axis=(0, 1, 2))


def variable_values(layer):
    return {v.path: v.numpy().copy() for v in layer.variables}


def test_banks_have_a_leading_step_axis():
    layer = build_layer()
    for variable in (layer.gamma, layer.beta, layer.moving_mean, layer.moving_variance):
        assert tuple(variable.shape) == (STEPS, CHANNELS)
    assert {v.path.split("/")[-1] for v in layer.trainable_variables} == {"gamma", "beta"}
    assert {v.path.split("/")[-1] for v in layer.non_trainable_variables} == {
        "moving_mean", "moving_variance"}


@pytest.mark.parametrize("step", range(STEPS))
def test_support_pass_normalises_with_its_statistics_and_the_states_affine_bank(step):
    layer, x = build_layer(), activations()
    before = variable_values(layer)
    outputs, moments = layer(x, state=step, mode=TRANSDUCTIVE)
    batch_mean, batch_variance = batch_moments(x)
    expected = normalise(x, batch_mean, batch_variance,
                         layer.gamma.numpy()[step], layer.beta.numpy()[step])
    np.testing.assert_allclose(outputs.numpy(), expected, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(moments.mean.numpy(), batch_mean, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(moments.variance.numpy(), batch_variance, rtol=1e-5)
    assert float(moments.size) == x.shape[0]
    # The call changes no variable; the caller folds the statistics in.
    after = variable_values(layer)
    assert all(np.array_equal(before[name], after[name]) for name in before)


@pytest.mark.parametrize("step", range(STEPS))
def test_running_target_pass_normalises_with_the_states_running_bank(step):
    layer, x = build_layer(), activations()
    before = variable_values(layer)
    outputs, moments = layer(x, state=step, mode=RUNNING, target=True)
    bank_mean, bank_variance = layer.moving_mean.numpy()[step], layer.moving_variance.numpy()[step]
    expected = normalise(x, bank_mean, bank_variance,
                         layer.gamma.numpy()[step], layer.beta.numpy()[step])
    np.testing.assert_allclose(outputs.numpy(), expected, rtol=1e-4, atol=1e-4)
    assert moments is None  # a target pass has no statistics to give
    after = variable_values(layer)
    assert all(np.array_equal(before[name], after[name]) for name in before)


def test_steps_past_the_last_reuse_the_last_bank():
    layer, x = build_layer(), activations()
    last = STEPS - 1
    for mode in (TRANSDUCTIVE, RUNNING):
        expected = layer(x, state=last, mode=mode, target=True)[0].numpy()
        for state in (STEPS, STEPS + 4):
            np.testing.assert_array_equal(
                layer(x, state=state, mode=mode, target=True)[0].numpy(), expected)
    # ... and that bank is the last row, not the first.
    batch_mean, batch_variance = batch_moments(x)
    expected = normalise(x, batch_mean, batch_variance,
                         layer.gamma.numpy()[last], layer.beta.numpy()[last])
    np.testing.assert_allclose(layer(x, state=STEPS + 4)[0].numpy(), expected, rtol=1e-4,
                               atol=1e-4)


def test_negative_step_raises():
    layer = build_layer()
    with pytest.raises(ValueError, match="non-negative"):
        layer(activations(), state=-1)


def test_unknown_mode_raises():
    with pytest.raises(ValueError, match="mode"):
        build_layer()(activations(), state=0, mode="train")


@pytest.mark.parametrize("per_step_statistics, per_step_affine",
                         [(False, True), (True, False), (False, False)])
def test_switched_off_banks_are_one_row_shared_by_every_step(per_step_statistics, per_step_affine):
    layer, x = build_layer(per_step_statistics, per_step_affine), activations()
    affine_rows = STEPS if per_step_affine else 1
    stat_rows = STEPS if per_step_statistics else 1
    assert tuple(layer.gamma.shape) == tuple(layer.beta.shape) == (affine_rows, CHANNELS)
    assert tuple(layer.moving_mean.shape) == (stat_rows, CHANNELS)
    assert tuple(layer.moving_variance.shape) == (stat_rows, CHANNELS)
    step = 2
    outputs = layer(x, state=step, mode=RUNNING, target=True)[0].numpy()
    affine_row = step if per_step_affine else 0
    stat_row = step if per_step_statistics else 0
    expected = normalise(
        x, layer.moving_mean.numpy()[stat_row], layer.moving_variance.numpy()[stat_row],
        layer.gamma.numpy()[affine_row], layer.beta.numpy()[affine_row])
    np.testing.assert_allclose(outputs, expected, rtol=1e-4, atol=1e-4)


def test_running_update_is_the_closed_form_row_by_row():
    layer = build_layer(momentum=0.25)
    old_mean, old_variance = layer.moving_mean.numpy(), layer.moving_variance.numpy()
    rng = np.random.default_rng(2)
    new_mean = rng.normal(size=(STEPS, CHANNELS)).astype(np.float32)
    new_variance = rng.uniform(0.1, 2.0, (STEPS, CHANNELS)).astype(np.float32)
    layer.update_running_statistics(new_mean, new_variance)
    np.testing.assert_allclose(layer.moving_mean.numpy(), 0.75 * old_mean + 0.25 * new_mean,
                               rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(layer.moving_variance.numpy(),
                               0.75 * old_variance + 0.25 * new_variance, rtol=1e-6)


def test_running_update_of_one_step_leaves_the_other_rows_unchanged():
    layer = build_layer()
    old_mean, old_variance = layer.moving_mean.numpy(), layer.moving_variance.numpy()
    # New statistics equal to the banks everywhere except at step 1.
    new_mean, new_variance = old_mean.copy(), old_variance.copy()
    new_mean[1] += 5.0
    new_variance[1] += 2.0
    layer.update_running_statistics(new_mean, new_variance)
    mean, variance = layer.moving_mean.numpy(), layer.moving_variance.numpy()
    np.testing.assert_allclose(mean[[0, 2]], old_mean[[0, 2]], rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(variance[[0, 2]], old_variance[[0, 2]], rtol=1e-6)
    np.testing.assert_allclose(mean[1], old_mean[1] + 0.1 * 5.0, rtol=1e-5)
    np.testing.assert_allclose(variance[1], old_variance[1] + 0.1 * 2.0, rtol=1e-5)


def test_shared_running_bank_moves_towards_the_mean_over_steps():
    layer = build_layer(per_step_statistics=False)
    old_mean, old_variance = layer.moving_mean.numpy(), layer.moving_variance.numpy()
    rng = np.random.default_rng(3)
    new_mean = rng.normal(size=(STEPS, CHANNELS)).astype(np.float32)
    new_variance = rng.uniform(0.1, 2.0, (STEPS, CHANNELS)).astype(np.float32)
    layer.update_running_statistics(new_mean, new_variance)
    np.testing.assert_allclose(layer.moving_mean.numpy(),
                               0.9 * old_mean + 0.1 * new_mean.mean(axis=0, keepdims=True),
                               rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(layer.moving_variance.numpy(),
                               0.9 * old_variance + 0.1 * new_variance.mean(axis=0, keepdims=True),
                               rtol=1e-5)


def stock_batch_norm(layer):
    """keras.layers.BatchNormalization with the one-step layer's weights and banks."""
    stock = keras.layers.BatchNormalization(epsilon=layer.epsilon, momentum=1 - layer.momentum)
    stock.build((None, 5, 5, CHANNELS))
    stock.gamma.assign(layer.gamma.numpy()[0])
    stock.beta.assign(layer.beta.numpy()[0])
    stock.moving_mean.assign(layer.moving_mean.numpy()[0])
    stock.moving_variance.assign(layer.moving_variance.numpy()[0])
    return stock


def test_one_step_batch_mode_equals_keras_batch_normalization_in_training():
    layer, x = build_layer(num_steps=1), activations(seed=4)
    stock = stock_batch_norm(layer)
    assert not np.allclose(layer.gamma.numpy(), 1) and not np.allclose(layer.beta.numpy(), 0)
    outputs, moments = layer(x, state=0, mode=TRANSDUCTIVE)
    expected = stock(x, training=True)
    np.testing.assert_allclose(outputs.numpy(), expected.numpy(), rtol=1e-5, atol=1e-5)
    # Folding the statistics in moves the banks as far as the stock layer
    # moved its own: both take the biased variance, which normalised the batch.
    layer.update_running_statistics(moments.mean[None], moments.variance[None])
    np.testing.assert_allclose(layer.moving_mean.numpy()[0], stock.moving_mean.numpy(),
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(layer.moving_variance.numpy()[0], stock.moving_variance.numpy(),
                               rtol=1e-5)


def test_one_step_running_mode_equals_keras_batch_normalization_in_inference():
    layer, x = build_layer(num_steps=1), activations(seed=5)
    stock = stock_batch_norm(layer)
    np.testing.assert_allclose(layer(x, state=0, mode=RUNNING, target=True)[0].numpy(),
                               stock(x, training=False).numpy(), rtol=1e-5, atol=1e-5)


def test_tasks_folded_into_channels_are_normalised_each_on_its_own():
    layer = build_layer()
    first, second = activations(seed=6), activations(seed=7) * 0.2 - 3
    folded = np.concatenate([first, second], axis=-1)  # task-major channels
    outputs, moments = layer(folded, state=1, mode=TRANSDUCTIVE)
    gamma, beta = layer.gamma.numpy()[1], layer.beta.numpy()[1]
    for task, x in enumerate((first, second)):
        task_mean, task_variance = batch_moments(x)
        expected = normalise(x, task_mean, task_variance, gamma, beta)
        channels = slice(task * CHANNELS, (task + 1) * CHANNELS)
        np.testing.assert_allclose(outputs.numpy()[..., channels], expected, rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(moments.mean.numpy()[channels], task_mean, rtol=1e-5,
                                   atol=1e-5)
        np.testing.assert_allclose(moments.variance.numpy()[channels], task_variance, rtol=1e-5)
    outputs = layer(folded, state=1, mode=RUNNING, target=True)[0].numpy()
    for task, x in enumerate((first, second)):
        expected = normalise(x, layer.moving_mean.numpy()[1], layer.moving_variance.numpy()[1],
                             gamma, beta)
        channels = slice(task * CHANNELS, (task + 1) * CHANNELS)
        np.testing.assert_allclose(outputs[..., channels], expected, rtol=1e-4, atol=1e-4)


def test_config_round_trip():
    layer = PerStepBatchNorm(4, per_step_statistics=False, per_step_affine=True,
                             momentum=0.3, epsilon=1e-4, name="norm7")
    clone = PerStepBatchNorm.from_config(layer.get_config())
    assert (clone.num_states, clone.per_step_statistics, clone.per_step_affine) == (4, False, True)
    assert (clone.momentum, clone.epsilon, clone.name) == (0.3, 1e-4, "norm7")


def test_fewer_than_one_step_raises():
    with pytest.raises(ValueError, match="num_states"):
        PerStepBatchNorm(0)


def test_keras_layer_contract():
    """What Keras's own layer harness checks, through Keras's public API: the layer
    serialises and comes back the same, and a symbolic call (on keras.Input) and an
    eager one give the same structure and shapes, the eager one building the banks."""
    arguments = {"num_states": 3, "per_step_statistics": False}
    serialised = keras.saving.serialize_keras_object(PerStepBatchNorm(**arguments))
    clone = keras.saving.deserialize_keras_object(
        serialised, custom_objects={"PerStepBatchNorm": PerStepBatchNorm})
    assert isinstance(clone, PerStepBatchNorm)
    assert keras.saving.serialize_keras_object(clone) == serialised
    symbolic = PerStepBatchNorm(**arguments)(keras.Input((4, 4, 3), batch_size=2), state=1)
    layer = PerStepBatchNorm(**arguments)
    eager = layer(tf.random.uniform((2, 4, 4, 3)), state=1)
    for outputs, moments in (symbolic, eager):
        assert tuple(outputs.shape) == (2, 4, 4, 3)
        assert isinstance(moments, Moments)
        assert [tuple(moment.shape) for moment in moments] == [(3,), (3,), ()]
    assert layer.built
    assert (len(layer.trainable_weights), len(layer.non_trainable_weights)) == (2, 2)


def support_moments(x):
    mean, variance = batch_moments(x)
    return Moments(tf.constant(mean, tf.float32), tf.constant(variance, tf.float32),
                   tf.constant(float(x.shape[0])))


def test_support_target_pass_normalises_with_the_support_moments():
    layer, support, target = build_layer(), activations(seed=8), activations(seed=9)
    outputs, moments = layer(target, state=2, mode=SUPPORT, target=True,
                             support=support_moments(support))
    mean, variance = batch_moments(support)
    expected = normalise(target, mean, variance, layer.gamma.numpy()[2], layer.beta.numpy()[2])
    np.testing.assert_allclose(outputs.numpy(), expected, rtol=1e-4, atol=1e-4)
    assert moments is None


def task_norm_by_hand(images, batch_mean, batch_variance, alpha, gamma, beta, ddof=0):
    """`images` normalised with the batch moments blended with each image's own."""
    x = images.astype(np.float64)
    instance_mean = x.mean(axis=(1, 2), keepdims=True)
    instance_variance = x.var(axis=(1, 2), keepdims=True, ddof=ddof)
    mean = alpha * batch_mean + (1 - alpha) * instance_mean
    variance = (alpha * (batch_variance + (batch_mean - mean) ** 2)
                + (1 - alpha) * (instance_variance + (instance_mean - mean) ** 2))
    return normalise(x, mean, variance, gamma, beta)


def test_task_norm_blends_support_and_instance_moments():
    """TaskNorm-I (Bronskill et al., 2020, eq. 4-5) with alpha = sigmoid(a * support size + b),
    the paper's form: the half start."""
    layer = build_layer(task_norm=True, task_norm_start=HALF_START)
    support, target = activations(seed=10), activations(11)
    layer.blend_scale.assign(0.3)
    layer.blend_offset.assign(-1.2)
    outputs, _ = layer(target, state=1, mode=TASK_NORM, target=True,
                       support=support_moments(support))
    alpha = 1 / (1 + np.exp(-(0.3 * support.shape[0] - 1.2)))
    batch_mean, batch_variance = batch_moments(support)
    affine = layer.gamma.numpy()[1], layer.beta.numpy()[1]
    np.testing.assert_allclose(
        outputs.numpy(), task_norm_by_hand(target, batch_mean, batch_variance, alpha, *affine),
        rtol=1e-4, atol=1e-4)
    # The support pass blends its own batch moments the same way, and returns them.
    outputs, moments = layer(support, state=1, mode=TASK_NORM)
    np.testing.assert_allclose(moments.mean.numpy(), batch_mean, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(moments.variance.numpy(), batch_variance, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(
        outputs.numpy(), task_norm_by_hand(support, batch_mean, batch_variance, alpha, *affine),
        rtol=1e-4, atol=1e-4)
    assert not np.allclose(outputs.numpy(), normalise(support, batch_mean, batch_variance,
                                                      *affine), atol=1e-2)


@pytest.mark.parametrize("mode", [SUPPORT, TASK_NORM, RUNNING])
def test_a_target_images_outputs_do_not_depend_on_the_other_targets(mode):
    layer, support, target = build_layer(task_norm=True), activations(seed=12), activations(13)
    together, _ = layer(target, state=1, mode=mode, target=True, support=support_moments(support))
    alone, _ = layer(target[:1], state=1, mode=mode, target=True,
                     support=support_moments(support))
    np.testing.assert_allclose(alone.numpy(), together.numpy()[:1], rtol=1e-5, atol=1e-5)


def test_transductive_target_outputs_depend_on_the_other_targets():
    layer, target = build_layer(), activations(seed=14)
    together, _ = layer(target, state=1, mode=TRANSDUCTIVE, target=True)
    alone, _ = layer(target[:2], state=1, mode=TRANSDUCTIVE, target=True)
    assert not np.allclose(alone.numpy(), together.numpy()[:2], atol=1e-3)


def test_running_update_of_the_first_states_keeps_the_rest():
    layer = build_layer()
    old_mean = layer.moving_mean.numpy()
    new_mean = np.zeros((STEPS - 1, CHANNELS), np.float32)
    layer.update_running_statistics(new_mean, np.ones_like(new_mean))
    np.testing.assert_allclose(layer.moving_mean.numpy()[:-1], 0.9 * old_mean[:-1], rtol=1e-6)
    np.testing.assert_array_equal(layer.moving_mean.numpy()[-1], old_mean[-1])


def test_only_task_norm_has_blend_weights():
    assert not hasattr(build_layer(), "blend_scale")
    assert {v.path.split("/")[-1] for v in build_layer(task_norm=True).trainable_variables} == {
        "gamma", "beta", "blend_scale", "blend_offset"}


@pytest.mark.parametrize("alpha, blend_shapes", [
    (DIRECT_ALPHA, {"blend_logit": (1,)}), (PER_STEP_ALPHA, {"blend_logit": (STEPS,)}),
    (REPTILE_ALPHA, {})])
def test_each_alpha_form_has_exactly_its_blend_weights(alpha, blend_shapes):
    """direct: one logit per layer; per_step: one per weight state; reptile: none, fixed."""
    layer = build_layer(task_norm=True, task_norm_alpha=alpha)
    assert {v.path.split("/")[-1]: tuple(v.shape) for v in layer.trainable_variables} == {
        "gamma": (STEPS, CHANNELS), "beta": (STEPS, CHANNELS), **blend_shapes}


def task_norm_pass(layer, support, target, state):
    """A layer's TaskNorm support pass, then its target pass with those moments: the
    target outputs and the support `Moments`."""
    _, moments = layer(support, state=state, mode=TASK_NORM)
    outputs, _ = layer(target, state=state, mode=TASK_NORM, target=True, support=moments)
    return outputs.numpy(), moments


@pytest.mark.parametrize("state", range(STEPS + 2))
def test_reptile_normalises_each_target_with_the_support_set_and_itself(state):
    """RN (Nichol et al., 2018): alpha = n / (n + 1) is each target image normalised with
    the biased batch moments of the n support images and itself, taken here directly."""
    layer = build_layer(task_norm=True, task_norm_alpha=REPTILE_ALPHA)
    support, target = activations(seed=15), activations(seed=16)
    row = layer.bank_index(state, STEPS)
    gamma, beta = layer.gamma.numpy()[row], layer.beta.numpy()[row]
    outputs, _ = task_norm_pass(layer, support, target, state)
    for index, image in enumerate(target):
        mean, variance = tf.nn.moments(np.concatenate([support, image[None]]), [0, 1, 2])
        np.testing.assert_allclose(outputs[index], normalise(image, mean, variance, gamma, beta),
                                   rtol=1e-4, atol=1e-4)
    # A support image and the support set are the support set.
    np.testing.assert_allclose(layer(support, state=state, mode=TASK_NORM)[0].numpy(),
                               normalise(support, *batch_moments(support), gamma, beta),
                               rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("alpha", [SIZE_ALPHA, DIRECT_ALPHA, PER_STEP_ALPHA])
def test_learned_alphas_start_at_rns_blend(alpha):
    """Zero weights under the default start normalise each target as RN does."""
    support, target = activations(seed=17), activations(seed=18)
    for state in range(STEPS + 1):
        expected = task_norm_pass(build_layer(task_norm=True, task_norm_alpha=REPTILE_ALPHA),
                                  support, target, state)[0]
        np.testing.assert_allclose(
            task_norm_pass(build_layer(task_norm=True, task_norm_alpha=alpha), support, target,
                           state)[0], expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("alpha", [SIZE_ALPHA, DIRECT_ALPHA, PER_STEP_ALPHA])
def test_the_half_start_is_the_reptile_start_without_its_log_n(alpha):
    """alpha = 1/2 at zero weights, as the TaskNorm paper: the RN start's logit less log n."""
    support, target = activations(seed=25), activations(seed=26)
    half = build_layer(task_norm=True, task_norm_alpha=alpha, task_norm_start=HALF_START)
    shifted = build_layer(task_norm=True, task_norm_alpha=alpha)
    log_n = np.log(len(support))
    if alpha == SIZE_ALPHA:
        shifted.blend_offset.assign(-log_n)
    else:
        shifted.blend_logit.assign(np.full(shifted.blend_logit.shape, -log_n, np.float32))
    for state in range(STEPS):
        np.testing.assert_allclose(task_norm_pass(half, support, target, state)[0],
                                   task_norm_pass(shifted, support, target, state)[0],
                                   rtol=1e-5, atol=1e-5)
    assert not np.allclose(task_norm_pass(half, support, target, 0)[0],
                           task_norm_pass(build_layer(task_norm=True, task_norm_alpha=alpha),
                                          support, target, 0)[0], atol=1e-3)


def test_the_direct_alpha_is_the_sigmoid_of_its_logit():
    """sigmoid(w) is the size form's sigmoid(a * n + b) at a = 0, b = w."""
    support, target = activations(seed=19), activations(seed=20)
    direct = build_layer(task_norm=True, task_norm_alpha=DIRECT_ALPHA)
    direct.blend_logit.assign([1.3])
    size = build_layer(task_norm=True)
    size.blend_offset.assign(1.3)
    np.testing.assert_allclose(task_norm_pass(direct, support, target, 1)[0],
                               task_norm_pass(size, support, target, 1)[0], rtol=1e-5, atol=1e-5)


def test_per_step_alpha_state_i_reads_row_i():
    """As a direct alpha of row i's logit, at every state; past the last, the last row."""
    support, target = activations(seed=21), activations(seed=22)
    logits = [-1.5, 0.4, 2.0]
    per_step = build_layer(task_norm=True, task_norm_alpha=PER_STEP_ALPHA)
    per_step.blend_logit.assign(logits)
    direct = build_layer(task_norm=True, task_norm_alpha=DIRECT_ALPHA)
    for state in range(STEPS + 2):
        outputs = task_norm_pass(per_step, support, target, state)[0]
        for row, logit in enumerate(logits):
            direct.blend_logit.assign([logit])
            expected = task_norm_pass(direct, support, target, state)[0]
            if row == per_step.bank_index(state, STEPS):
                np.testing.assert_allclose(outputs, expected, rtol=1e-5, atol=1e-5)
            else:
                assert not np.allclose(outputs, expected, atol=1e-3), (state, row)


def test_unbiased_task_norm_corrects_the_support_and_instance_variances():
    """torch.var's correction, as the official TaskNorm code: n*H*W - 1 and H*W - 1."""
    layer = build_layer(task_norm=True, task_norm_unbiased=True)
    layer.blend_scale.assign(0.3)
    layer.blend_offset.assign(-1.2)
    support, target = activations(seed=23), activations(seed=24)
    outputs, moments = task_norm_pass(layer, support, target, 1)
    s = support.astype(np.float64)
    support_mean, support_variance = s.mean(axis=(0, 1, 2)), s.var(axis=(0, 1, 2), ddof=1)
    np.testing.assert_allclose(moments.variance.numpy(), support_variance, rtol=1e-5)
    alpha = 1 / (1 + np.exp(-(0.3 * len(s) - 1.2 + np.log(len(s)))))
    expected = task_norm_by_hand(target, support_mean, support_variance, alpha,
                                 layer.gamma.numpy()[1], layer.beta.numpy()[1], ddof=1)
    np.testing.assert_allclose(outputs, expected, rtol=1e-4, atol=1e-4)
    biased = build_layer(task_norm=True)
    biased.blend_scale.assign(0.3)
    biased.blend_offset.assign(-1.2)
    assert not np.allclose(task_norm_pass(biased, support, target, 1)[0], outputs, atol=1e-3)


def test_unbiased_task_norm_refuses_one_value_per_image_and_channel():
    layer = PerStepBatchNorm(STEPS, task_norm=True, task_norm_unbiased=True, name="norm3")
    with pytest.raises(ValueError, match="norm3: task_norm_unbiased needs two or more values"):
        layer(tf.ones((4, 1, 1, CHANNELS)), mode=TASK_NORM)


def test_an_unknown_alpha_form_is_refused_naming_it():
    with pytest.raises(ValueError, match="task_norm_alpha='learned': must be one of size"):
        PerStepBatchNorm(STEPS, task_norm=True, task_norm_alpha="learned")


@pytest.mark.parametrize("alpha", TASK_NORM_ALPHAS)
def test_task_norm_config_round_trip(alpha):
    layer = PerStepBatchNorm(STEPS, task_norm=True, task_norm_alpha=alpha,
                             task_norm_unbiased=True, task_norm_start=HALF_START)
    clone = PerStepBatchNorm.from_config(layer.get_config())
    assert (clone.task_norm, clone.task_norm_alpha, clone.task_norm_unbiased,
            clone.task_norm_start) == (True, alpha, True, HALF_START)
