"""Specification of tf_mamlpp.network: the learner's meta-parameters and forward pass.

The forward pass is checked against a NumPy re-implementation of one task's
network (3x3 SAME convolution, batch norm, ReLU, 2x2 max-pool, linear head).
"""

import numpy as np
import pytest
import tensorflow as tf

from tf_mamlpp.network import MamlppNetwork
from tf_mamlpp.per_step_batch_norm import BATCH, RUNNING

WAY, IMAGE_SHAPE, STEPS, FILTERS, STAGES = 3, (8, 8, 1), 2, 4, 2


def tiny_network(**kwargs):
    settings = dict(way=WAY, image_shape=IMAGE_SHAPE, num_steps=STEPS, filters=FILTERS,
                    num_stages=STAGES)
    settings.update(kwargs)
    return MamlppNetwork(**settings)


def randomise_banks(network, seed=0):
    """Distinct, non-trivial values in every row of every batch-norm bank."""
    rng = np.random.default_rng(seed)
    for norm in network.norms:
        for variable, low, high in ((norm.gamma, 0.5, 2.0), (norm.beta, -1.0, 1.0),
                                    (norm.moving_mean, -0.5, 0.5),
                                    (norm.moving_variance, 0.5, 2.0)):
            variable.assign(rng.uniform(low, high, variable.shape).astype(np.float32))


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


def reference_logits(network, task_images, weights, step, mode=BATCH):
    """One task's logits in NumPy; `weights` maps names to arrays without a tasks axis."""
    x = task_images.astype(np.float64)
    for i, norm in enumerate(network.norms):
        x = conv3x3_same(x, weights[f"conv{i}/kernel"])
        if f"conv{i}/bias" in weights:
            x = x + weights[f"conv{i}/bias"]
        if mode == BATCH:
            mean, variance = x.mean(axis=(0, 1, 2)), x.var(axis=(0, 1, 2))
        else:
            row = min(step, norm.moving_mean.shape[0] - 1)
            mean, variance = norm.moving_mean.numpy()[row], norm.moving_variance.numpy()[row]
        row = min(step, norm.gamma.shape[0] - 1)
        x = ((x - mean) / np.sqrt(variance + norm.epsilon) * norm.gamma.numpy()[row]
             + norm.beta.numpy()[row])
        x = max_pool2(np.maximum(x, 0))
    features = x.reshape(len(x), -1)
    return features @ weights["head/kernel"] + weights["head/bias"]


def variable_weights(network):
    return {name: variable.numpy() for name, variable in network.fast_variables.items()}


def test_feature_size_of_the_paper_networks():
    omniglot = MamlppNetwork(way=5, image_shape=(28, 28, 1), num_steps=5, filters=64)
    assert omniglot.feature_size == 64  # 28 -> 14 -> 7 -> 3 -> 1
    assert tuple(omniglot.fast_variables["head/kernel"].shape) == (64, 5)
    imagenet = MamlppNetwork(way=5, image_shape=(84, 84, 3), num_steps=5, filters=48)
    assert imagenet.feature_size == 1200  # 84 -> 42 -> 21 -> 10 -> 5; 5*5*48
    assert tuple(imagenet.fast_variables["conv0/kernel"].shape) == (3, 3, 3, 48)


@pytest.mark.parametrize("size, stages", [(8, 4), (1, 1), (15, 4)])
def test_an_image_that_pools_to_nothing_raises_naming_the_flag(size, stages):
    with pytest.raises(ValueError, match="--image_size"):
        MamlppNetwork(way=5, image_shape=(size, size, 1), num_steps=1, filters=2,
                      num_stages=stages)


def test_shapes_of_logits_features_and_statistics():
    network = tiny_network()
    assert network.feature_size == 2 * 2 * FILTERS
    fast_weights = network.initial_fast_weights(2)
    assert all(tuple(value.shape) == (2, *network.fast_variables[name].shape)
               for name, value in fast_weights.items())
    batch = tf.constant(images(2, 5))
    features, statistics = network.embed(batch, fast_weights, 0)
    assert tuple(features.shape) == (2, 5, network.feature_size)
    assert len(statistics) == STAGES
    assert all(tuple(m.shape) == tuple(v.shape) == (2, FILTERS) for m, v in statistics)
    logits, _ = network.forward(batch, fast_weights, 1)
    assert tuple(logits.shape) == (2, 5, WAY)
    assert tuple(network(batch[0]).shape) == (5, WAY)


def test_call_is_the_initialisation_before_adaptation():
    network = tiny_network()
    randomise_banks(network)
    batch = images(1, 6)
    expected = reference_logits(network, batch[0], variable_weights(network), 0)
    np.testing.assert_allclose(network(tf.constant(batch[0])).numpy(), expected,
                               rtol=1e-4, atol=1e-5)
    logits, _ = network.forward(tf.constant(batch), network.initial_fast_weights(), 0)
    np.testing.assert_allclose(logits.numpy()[0], expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("mode", [BATCH, RUNNING])
def test_forward_with_other_fast_weights_runs_each_task_with_its_own_and_changes_nothing(mode):
    network = tiny_network()
    randomise_banks(network)
    rng = np.random.default_rng(1)
    per_task = [{name: value + rng.normal(scale=0.3, size=value.shape).astype(np.float32)
                 for name, value in variable_weights(network).items()} for _ in range(2)]
    fast_weights = {name: tf.constant(np.stack([w[name] for w in per_task]))
                    for name in per_task[0]}
    batch = images(2, 6, seed=2)
    before = variable_values(network)
    for step in (0, 1):
        logits, _ = network.forward(tf.constant(batch), fast_weights, step, mode)
        for task in range(2):
            expected = reference_logits(network, batch[task], per_task[task], step, mode)
            np.testing.assert_allclose(logits.numpy()[task], expected, rtol=1e-4, atol=1e-4)
        initial, _ = network.forward(tf.constant(batch), network.initial_fast_weights(2), step,
                                     mode)
        assert np.abs(logits.numpy() - initial.numpy()).max() > 1e-2
    after = variable_values(network)
    assert all(np.array_equal(before[name], after[name]) for name in before)


def test_batch_statistics_are_each_tasks_own():
    network = tiny_network(num_stages=1)
    batch = images(2, 4, seed=3)
    batch[1] = batch[1] * 3 + 1
    _, statistics = network.forward(tf.constant(batch), network.initial_fast_weights(2), 0)
    mean, variance = statistics[0]
    for task in range(2):
        conv = conv3x3_same(batch[task].astype(np.float64),
                            network.fast_variables["conv0/kernel"].numpy())
        np.testing.assert_allclose(mean.numpy()[task], conv.mean(axis=(0, 1, 2)),
                                   rtol=1e-4, atol=1e-5)
        n = conv.shape[0] * conv.shape[1] * conv.shape[2]  # unbiased, for the running banks
        np.testing.assert_allclose(variance.numpy()[task], conv.var(axis=(0, 1, 2)) * n / (n - 1),
                                   rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("learn_inner_rates", [True, False])
def test_lslr_rates_one_per_layer_and_step_starting_at_inner_lr(learn_inner_rates):
    network = tiny_network(learn_inner_rates=learn_inner_rates, inner_lr=0.37)
    assert sorted(network.inner_rates) == ["conv0", "conv1", "head"]
    trainable = {id(v) for v in network.trainable_variables}
    for rates in network.inner_rates.values():
        assert tuple(rates.shape) == (STEPS,)
        np.testing.assert_allclose(rates.numpy(), [0.37] * STEPS, rtol=1e-6)
        assert rates.trainable is learn_inner_rates
        assert (id(rates) in trainable) is learn_inner_rates
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


@pytest.mark.parametrize("per_step_bn_statistics", [True, False])
@pytest.mark.parametrize("per_step_bn_affine", [True, False])
def test_batch_norm_bank_shapes_follow_the_switches(per_step_bn_statistics, per_step_bn_affine):
    network = tiny_network(per_step_bn_statistics=per_step_bn_statistics,
                           per_step_bn_affine=per_step_bn_affine)
    assert len(network.norms) == STAGES
    affine_rows = STEPS if per_step_bn_affine else 1
    stat_rows = STEPS if per_step_bn_statistics else 1
    for norm in network.norms:
        assert tuple(norm.gamma.shape) == tuple(norm.beta.shape) == (affine_rows, FILTERS)
        assert tuple(norm.moving_mean.shape) == (stat_rows, FILTERS)
        assert tuple(norm.moving_variance.shape) == (stat_rows, FILTERS)


def test_variable_inventory():
    network = tiny_network()
    trainable = {id(v) for v in network.trainable_variables}
    non_trainable = {id(v) for v in network.non_trainable_variables}
    expected_trainable = ({id(v) for v in network.fast_variables.values()}
                          | {id(v) for v in network.inner_rates.values()}
                          | {id(v) for norm in network.norms for v in (norm.gamma, norm.beta)})
    assert trainable == expected_trainable
    assert non_trainable == {id(v) for norm in network.norms
                             for v in (norm.moving_mean, norm.moving_variance)}
    assert {"conv0/kernel", "conv1/kernel", "head/kernel", "head/bias"} <= set(
        network.fast_variables)
    assert tuple(network.fast_variables["conv1/kernel"].shape) == (3, 3, FILTERS, FILTERS)


def test_config_rebuilds_the_same_network():
    network = tiny_network(per_step_bn_affine=False, learn_inner_rates=False, inner_lr=0.2)
    clone = MamlppNetwork(**network.get_config())
    assert [(v.path, tuple(v.shape), v.trainable) for v in clone.variables] == [
        (v.path.replace(network.name, clone.name, 1), tuple(v.shape), v.trainable)
        for v in network.variables]
