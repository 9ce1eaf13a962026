"""Specification of tf_mamlpp.core.network: the learner's meta-parameters and forward pass.

The forward pass is checked against a NumPy re-implementation of one task's
network (3x3 SAME convolution, batch norm in each mode, leaky ReLU with slope
0.01, 2x2 max-pool, linear head), support and target passes alike.
"""

import numpy as np
import pytest
import tensorflow as tf

from tf_mamlpp.config_error import ConfigError
from tf_mamlpp.core.batch_norm_modes import BN_MODES, RUNNING, SUPPORT, TASK_NORM, TRANSDUCTIVE
from tf_mamlpp.core.network import MamlppNetwork
from tf_mamlpp.core.per_step_batch_norm import Moments

WAY, IMAGE_SHAPE, STEPS, FILTERS, STAGES = 3, (8, 8, 1), 2, 4, 2
SLOPE = 0.01  # the reference code's F.leaky_relu default
STATES = STEPS + 1  # one weight state before adaptation and one after each step


def tiny_network(**kwargs):
    settings = dict(way=WAY, image_shape=IMAGE_SHAPE, inner_steps=STEPS, filters=FILTERS,
                    num_stages=STAGES)
    settings.update(kwargs)
    return MamlppNetwork(**settings)


def randomise_banks(network, seed=0):
    """Distinct, non-trivial values in every row of every batch-norm bank (and blend)."""
    rng = np.random.default_rng(seed)
    for norm in network.norms:
        for variable, low, high in ((norm.gamma, 0.5, 2.0), (norm.beta, -1.0, 1.0),
                                    (norm.moving_mean, -0.5, 0.5),
                                    (norm.moving_variance, 0.5, 2.0)):
            variable.assign(rng.uniform(low, high, variable.shape).astype(np.float32))
        if norm.task_norm:
            norm.blend_scale.assign(rng.uniform(0.1, 0.4))
            norm.blend_offset.assign(rng.uniform(-2.0, -1.0))


def images(tasks, batch, seed=0):
    return np.random.default_rng(seed).random((tasks, batch, *IMAGE_SHAPE)).astype(np.float32)


def variable_values(network):
    return {v.path: v.numpy().copy() for v in network.variables}


def conv3x3_same(x, kernel):
    padded = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    height, width = x.shape[1:3]
    out = np.zeros((*x.shape[:3], kernel.shape[-1]))
    for di in range(3):
        for dj in range(3):
            out += np.einsum("bhwc,co->bhwo", padded[:, di:di + height, dj:dj + width],
                             kernel[di, dj])
    return out


def max_pool2(x):
    batch, height, width, channels = x.shape
    x = x[:, :height // 2 * 2, :width // 2 * 2]
    return x.reshape(batch, height // 2, 2, width // 2, 2, channels).max(axis=(2, 4))


def leaky_relu(x, slope):
    return np.where(x > 0, x, slope * x)


def batch_moments(x):
    """Per-channel mean and biased variance over batch and positions."""
    return x.mean(axis=(0, 1, 2)), x.var(axis=(0, 1, 2))


def task_norm_moments(norm, x, support_mean, support_variance, support_size):
    """TaskNorm-I: support moments blended with each image's instance moments, alpha
    starting at RN's n / (n + 1)."""
    alpha = 1 / (1 + np.exp(-(norm.blend_scale.numpy() * support_size
                              + norm.blend_offset.numpy() + np.log(support_size))))
    instance_mean = x.mean(axis=(1, 2), keepdims=True)
    instance_variance = x.var(axis=(1, 2), keepdims=True)
    mean = alpha * support_mean + (1 - alpha) * instance_mean
    variance = (alpha * (support_variance + (support_mean - mean) ** 2)
                + (1 - alpha) * (instance_variance + (instance_mean - mean) ** 2))
    return mean, variance


def reference_logits(network, task_images, weights, state, mode=TRANSDUCTIVE,
                     support_images=None, slope=SLOPE):
    """One task's logits in NumPy; `weights` maps names to arrays without a tasks axis.

    Without `support_images`, `task_images` is a support pass: normalised by
    its own statistics (blended with instance moments in TASK_NORM). With
    them, `task_images` is a target pass at the same weights, normalised as
    `mode` says with the support set's statistics at each stage.
    """
    x = task_images.astype(np.float64)
    support = None if support_images is None else support_images.astype(np.float64)

    def support_pass(s, norm):
        mean, variance = batch_moments(s)
        if mode == TASK_NORM:
            mean, variance = task_norm_moments(norm, s, mean, variance, len(s))
        return mean, variance

    for i, norm in enumerate(network.norms):
        x = conv3x3_same(x, weights[f"conv{i}/kernel"])
        if support is not None:
            support = conv3x3_same(support, weights[f"conv{i}/kernel"])
        if support is None:
            mean, variance = support_pass(x, norm)
        elif mode == TRANSDUCTIVE:
            mean, variance = batch_moments(x)
        elif mode == SUPPORT:
            mean, variance = batch_moments(support)
        elif mode == TASK_NORM:
            mean, variance = task_norm_moments(norm, x, *batch_moments(support), len(support))
        else:
            row = min(state, norm.moving_mean.shape[0] - 1)
            mean, variance = norm.moving_mean.numpy()[row], norm.moving_variance.numpy()[row]
        row = min(state, norm.gamma.shape[0] - 1)
        gamma, beta = norm.gamma.numpy()[row], norm.beta.numpy()[row]

        def normalise(values, mean, variance):
            normalised = (values - mean) / np.sqrt(variance + norm.epsilon) * gamma + beta
            return max_pool2(leaky_relu(normalised, slope))

        if support is not None:
            support = normalise(support, *support_pass(support, norm))
        x = normalise(x, mean, variance)
    features = x.reshape(len(x), -1)
    return features @ weights["head/kernel"] + weights["head/bias"]


def variable_weights(network):
    return {name: variable.numpy() for name, variable in network.fast_variables.items()}


def test_feature_size_of_the_paper_networks():
    omniglot = MamlppNetwork(way=5, image_shape=(28, 28, 1), inner_steps=5, filters=64)
    assert omniglot.feature_size == 64  # 28 -> 14 -> 7 -> 3 -> 1
    assert tuple(omniglot.fast_variables["head/kernel"].shape) == (64, 5)
    imagenet = MamlppNetwork(way=5, image_shape=(84, 84, 3), inner_steps=5, filters=48)
    assert imagenet.feature_size == 1200  # 84 -> 42 -> 21 -> 10 -> 5; 5*5*48
    assert tuple(imagenet.fast_variables["conv0/kernel"].shape) == (3, 3, 3, 48)


@pytest.mark.parametrize("size, stages", [(8, 4), (1, 1), (15, 4)])
def test_an_image_that_pools_to_nothing_raises_naming_the_flag(size, stages):
    with pytest.raises(ValueError, match="image_size="):
        MamlppNetwork(way=5, image_shape=(size, size, 1), inner_steps=1, filters=2,
                      num_stages=stages)


def test_an_unknown_batch_norm_mode_is_refused():
    with pytest.raises(ValueError, match="batch-norm mode"):
        tiny_network(bn_mode="batch")


def test_shapes_of_logits_features_and_moments():
    network = tiny_network()
    assert network.feature_size == 2 * 2 * FILTERS
    fast_weights = network.initial_fast_weights(2)
    assert all(tuple(value.shape) == (2, *network.fast_variables[name].shape)
               for name, value in fast_weights.items())
    batch = tf.constant(images(2, 5))
    features, moments = network.embed(batch, fast_weights, 0)
    assert tuple(features.shape) == (2, 5, network.feature_size)
    assert len(moments) == STAGES
    for stage in moments:
        assert isinstance(stage, Moments)
        # Tasks folded into the channel axis, task-major.
        assert tuple(stage.mean.shape) == tuple(stage.variance.shape) == (2 * FILTERS,)
        assert float(stage.size) == 5
    logits, support_moments = network.forward(batch, fast_weights, 1)
    assert tuple(logits.shape) == (2, 5, WAY)
    assert len(support_moments) == STAGES
    target = tf.constant(images(2, 7, seed=1))
    target_logits, target_moments = network.forward(target, fast_weights, 1, SUPPORT,
                                                    support=support_moments)
    assert tuple(target_logits.shape) == (2, 7, WAY)
    assert target_moments is None  # a target pass returns no statistics
    assert tuple(network(batch[0]).shape) == (5, WAY)
    assert tuple(network.running_embed(batch[0]).shape) == (5, network.feature_size)


def test_call_is_the_initialisation_under_the_running_bank_of_state_0():
    network = tiny_network()
    randomise_banks(network)
    batch = images(1, 6)
    weights = variable_weights(network)
    expected = reference_logits(network, batch[0], weights, 0, RUNNING,
                                support_images=batch[0])
    got = network(tf.constant(batch[0])).numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)
    # No image depends on another: a sub-batch gives the same rows.
    np.testing.assert_allclose(network(tf.constant(batch[0, :2])).numpy(), got[:2],
                               rtol=1e-5, atol=1e-6)
    # The support pass of the initialisation is normalised by the batch itself instead.
    logits, _ = network.forward(tf.constant(batch), network.initial_fast_weights(), 0)
    transductive = reference_logits(network, batch[0], weights, 0)
    np.testing.assert_allclose(logits.numpy()[0], transductive, rtol=1e-4, atol=1e-5)
    assert np.abs(transductive - expected).max() > 1e-2


def test_the_activation_is_leaky_relu_with_slope_one_hundredth():
    network = tiny_network()
    randomise_banks(network)
    batch = images(1, 6, seed=4)
    weights = variable_weights(network)
    logits, _ = network.forward(tf.constant(batch), network.initial_fast_weights(), 1)
    leaky = reference_logits(network, batch[0], weights, 1)
    np.testing.assert_allclose(logits.numpy()[0], leaky, rtol=1e-4, atol=1e-5)
    # A plain ReLU, or another slope, gives logits the tolerance above tells apart.
    for other_slope in (0.0, 0.02, 0.2):
        other = reference_logits(network, batch[0], weights, 1, slope=other_slope)
        assert np.abs(other - leaky).max() > 1e-3, other_slope


@pytest.mark.parametrize("mode", BN_MODES)
def test_forward_with_other_fast_weights_runs_each_task_with_its_own_and_changes_nothing(mode):
    network = tiny_network(bn_mode=mode)
    randomise_banks(network)
    rng = np.random.default_rng(1)
    per_task = [{name: value + rng.normal(scale=0.3, size=value.shape).astype(np.float32)
                 for name, value in variable_weights(network).items()} for _ in range(2)]
    fast_weights = {name: tf.constant(np.stack([w[name] for w in per_task]))
                    for name in per_task[0]}
    support = images(2, 6, seed=2)
    target = images(2, 5, seed=5)
    before = variable_values(network)
    # States 0..STEPS have banks of their own; a later one reuses the last.
    for state in range(STATES + 1):
        logits, moments = network.forward(tf.constant(support), fast_weights, state, mode)
        target_logits, _ = network.forward(tf.constant(target), fast_weights, state, mode,
                                           support=moments)
        for task in range(2):
            expected = reference_logits(network, support[task], per_task[task], state, mode)
            np.testing.assert_allclose(logits.numpy()[task], expected, rtol=1e-4, atol=1e-4)
            expected = reference_logits(network, target[task], per_task[task], state, mode,
                                        support_images=support[task])
            np.testing.assert_allclose(target_logits.numpy()[task], expected, rtol=1e-4,
                                       atol=1e-4)
        initial, _ = network.forward(tf.constant(support), network.initial_fast_weights(2),
                                     state, mode)
        assert np.abs(logits.numpy() - initial.numpy()).max() > 1e-2
    after = variable_values(network)
    assert all(np.array_equal(before[name], after[name]) for name in before)


@pytest.mark.parametrize("mode", BN_MODES)
def test_only_the_transductive_mode_lets_a_target_depend_on_other_targets(mode):
    network = tiny_network(bn_mode=mode)
    randomise_banks(network)
    support = tf.constant(images(1, 6, seed=6))
    target = images(1, 6, seed=7)
    fast_weights = network.initial_fast_weights()
    _, moments = network.forward(support, fast_weights, 1, mode)
    full, _ = network.forward(tf.constant(target), fast_weights, 1, mode, support=moments)
    part, _ = network.forward(tf.constant(target[:, :2]), fast_weights, 1, mode, support=moments)
    difference = np.abs(full.numpy()[:, :2] - part.numpy()).max()
    if mode == TRANSDUCTIVE:
        assert difference > 1e-3
    else:
        assert difference < 1e-5


@pytest.mark.parametrize("mode", BN_MODES)
def test_target_logits_reach_the_support_set_exactly_where_the_mode_reads_it(mode):
    network = tiny_network(bn_mode=mode, num_stages=1)
    randomise_banks(network)
    support = tf.constant(images(1, 6, seed=8))
    target = tf.constant(images(1, 4, seed=9))
    fast_weights = network.initial_fast_weights()
    with tf.GradientTape() as tape:
        tape.watch(support)
        _, moments = network.forward(support, fast_weights, 0, mode)
        logits, _ = network.forward(target, fast_weights, 0, mode, support=moments)
        loss = tf.reduce_sum(tf.sin(logits))
    gradient = tape.gradient(loss, support)
    if mode in (SUPPORT, TASK_NORM):
        assert gradient is not None and np.abs(gradient.numpy()).max() > 1e-4
    else:
        assert gradient is None or not np.any(gradient.numpy())


@pytest.mark.parametrize("mode", BN_MODES)
def test_support_moments_are_each_tasks_own_mean_and_biased_variance(mode):
    network = tiny_network(num_stages=1, bn_mode=mode)
    batch = images(2, 4, seed=3)
    batch[1] = batch[1] * 3 + 1
    _, moments = network.forward(tf.constant(batch), network.initial_fast_weights(2), 0, mode)
    (stage,) = moments
    assert float(stage.size) == 4
    for task in range(2):
        conv = conv3x3_same(batch[task].astype(np.float64),
                            network.fast_variables["conv0/kernel"].numpy())
        channels = slice(task * FILTERS, (task + 1) * FILTERS)
        np.testing.assert_allclose(stage.mean.numpy()[channels], conv.mean(axis=(0, 1, 2)),
                                   rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(stage.variance.numpy()[channels], conv.var(axis=(0, 1, 2)),
                                   rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("lslr", [True, False])
def test_lslr_rates_one_per_layer_and_step_starting_at_inner_lr(lslr):
    network = tiny_network(lslr=lslr, inner_lr=0.37)
    assert sorted(network.inner_rates) == ["conv0", "conv1", "head"]
    trainable = {id(v) for v in network.trainable_variables}
    for rates in network.inner_rates.values():
        assert tuple(rates.shape) == (STEPS,)
        np.testing.assert_allclose(rates.numpy(), [0.37] * STEPS, rtol=1e-6)
        assert rates.trainable is lslr
        assert (id(rates) in trainable) is lslr
    # Every fast weight belongs to a layer that has rates.
    assert {name.split("/")[0] for name in network.fast_variables} == set(network.inner_rates)


def test_inner_rate_is_the_layers_rate_for_the_step_and_clamps_past_the_last():
    network = tiny_network()
    network.inner_rates["conv1"].assign([0.1, 0.2])
    network.inner_rates["head"].assign([0.3, 0.4])
    assert float(network.inner_rate("conv1/kernel", 0)) == pytest.approx(0.1)
    assert float(network.inner_rate("conv1/kernel", 1)) == pytest.approx(0.2)
    assert float(network.inner_rate("head/bias", 0)) == pytest.approx(0.3)
    assert float(network.inner_rate("head/kernel", 5)) == pytest.approx(0.4)
    assert float(network.inner_rate("conv1/kernel", 2)) == pytest.approx(0.2)
    with pytest.raises(ValueError, match="non-negative"):
        network.inner_rate("head/kernel", -1)


@pytest.mark.parametrize("bnrs", [True, False])
@pytest.mark.parametrize("bnwb", [True, False])
def test_batch_norm_bank_shapes_follow_the_switches(bnrs, bnwb):
    network = tiny_network(bnrs=bnrs, bnwb=bnwb)
    assert len(network.norms) == STAGES
    # One row per weight state: the initialisation and one after each of the steps.
    affine_rows = STEPS + 1 if bnwb else 1
    stat_rows = STEPS + 1 if bnrs else 1
    for norm in network.norms:
        assert tuple(norm.gamma.shape) == tuple(norm.beta.shape) == (affine_rows, FILTERS)
        assert tuple(norm.moving_mean.shape) == (stat_rows, FILTERS)
        assert tuple(norm.moving_variance.shape) == (stat_rows, FILTERS)


def test_the_last_weight_state_reads_its_own_bank_row():
    network = tiny_network()
    randomise_banks(network)
    batch = images(1, 6, seed=10)
    fast_weights = network.initial_fast_weights()
    last, _ = network.forward(tf.constant(batch), fast_weights, STEPS)
    before_last, _ = network.forward(tf.constant(batch), fast_weights, STEPS - 1)
    assert np.abs(last.numpy() - before_last.numpy()).max() > 1e-2
    for norm in network.norms:  # the same logits once rows STEPS and STEPS-1 agree
        norm.gamma.assign(tf.concat([norm.gamma[:STEPS], norm.gamma[STEPS - 1:STEPS]], 0))
        norm.beta.assign(tf.concat([norm.beta[:STEPS], norm.beta[STEPS - 1:STEPS]], 0))
    last, _ = network.forward(tf.constant(batch), fast_weights, STEPS)
    np.testing.assert_allclose(last.numpy(), before_last.numpy(), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("mode", BN_MODES)
def test_variable_inventory(mode):
    network = tiny_network(bn_mode=mode)
    assert network.bn_mode == mode
    trainable = {id(v) for v in network.trainable_variables}
    non_trainable = {id(v) for v in network.non_trainable_variables}
    blends = ({id(v) for norm in network.norms for v in (norm.blend_scale, norm.blend_offset)}
              if mode == TASK_NORM else set())
    assert all(norm.task_norm is (mode == TASK_NORM) for norm in network.norms)
    expected_trainable = ({id(v) for v in network.fast_variables.values()}
                          | {id(v) for v in network.inner_rates.values()}
                          | {id(v) for norm in network.norms for v in (norm.gamma, norm.beta)}
                          | blends)
    assert trainable == expected_trainable
    assert non_trainable == {id(v) for norm in network.norms
                             for v in (norm.moving_mean, norm.moving_variance)}
    assert {"conv0/kernel", "conv1/kernel", "head/kernel", "head/bias"} <= set(
        network.fast_variables)
    assert tuple(network.fast_variables["conv1/kernel"].shape) == (3, 3, FILTERS, FILTERS)


@pytest.mark.parametrize("settings", [
    dict(bn_mode=TRANSDUCTIVE), dict(bn_mode=TASK_NORM),
    dict(bn_mode=TASK_NORM, task_norm_alpha="per_step", task_norm_unbiased=True),
    dict(bn_mode=TASK_NORM, task_norm_start="half"),
    dict(bn_mode=TASK_NORM, task_norm_alpha="reptile")], ids=str)
def test_config_rebuilds_the_same_network(settings):
    network = tiny_network(bnwb=False, lslr=False, inner_lr=0.2, **settings)
    clone = MamlppNetwork(**network.get_config())
    for name, value in settings.items():
        assert getattr(clone, name) == value
        assert all(getattr(norm, name, value) == value for norm in clone.norms)
    assert [(v.path, tuple(v.shape), v.trainable) for v in clone.variables] == [
        (v.path.replace(network.name, clone.name, 1), tuple(v.shape), v.trainable)
        for v in network.variables]


@pytest.mark.parametrize("settings, named", [
    (dict(task_norm_alpha="direct"), "task_norm_alpha=direct"),
    (dict(task_norm_unbiased=True), "task_norm_unbiased=True"),
    (dict(task_norm_start="half"), "task_norm_start=half")])
def test_task_norm_options_outside_task_norm_are_refused_naming_them(settings, named):
    with pytest.raises(ConfigError, match=f"^{named} conflicts with bn_mode=support; it "
                                          "applies to bn_mode=task_norm only$") as raised:
        tiny_network(bn_mode=SUPPORT, **settings)
    assert raised.value.fields == (*settings, "bn_mode")


def test_a_start_for_the_fixed_reptile_alpha_is_refused():
    with pytest.raises(ConfigError, match="^task_norm_start=half conflicts with "
                                          "task_norm_alpha=reptile, whose alpha is fixed"):
        tiny_network(bn_mode=TASK_NORM, task_norm_alpha="reptile", task_norm_start="half")
