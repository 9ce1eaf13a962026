"""Specification of tf_mamlpp.inner_loop: adaptation and its meta-gradient.

The meta-gradient is checked three ways: second order against central finite
differences of the outer loss, first order against the gradient of a stopped
copy (the adapted weights taken as leaves, learn2learn's check), and the
learned rates' first-order gradient against its closed form. The network
runs in float32 (see conftest.py), hence the tolerances.
"""

import keras
import numpy as np
import pytest
import tensorflow as tf

from tf_mamlpp.inner_loop import adapt_and_evaluate, inner_update
from tf_mamlpp.network import MamlppNetwork
from tf_mamlpp.per_step_batch_norm import BATCH, RUNNING

WAY, IMAGE_SHAPE, STEPS = 2, (4, 4, 1), 2
FD_EPSILON, FD_RTOL, FD_ATOL = 2e-3, 2e-3, 3e-4


def tiny_network(num_steps=STEPS, seed=0, **kwargs):
    """One conv stage of 2 filters on 4x4 images, with distinct per-step banks and rates."""
    keras.utils.set_random_seed(seed)
    network = MamlppNetwork(way=WAY, image_shape=IMAGE_SHAPE, num_steps=num_steps, filters=2,
                            num_stages=1, **kwargs)
    rng = np.random.default_rng(seed + 1)
    for norm in network.norms:
        norm.gamma.assign(rng.uniform(0.5, 1.5, norm.gamma.shape).astype(np.float32))
        norm.beta.assign(rng.uniform(-0.5, 0.5, norm.beta.shape).astype(np.float32))
        norm.moving_mean.assign(rng.uniform(-0.2, 0.2, norm.moving_mean.shape).astype(np.float32))
        norm.moving_variance.assign(
            rng.uniform(0.5, 1.5, norm.moving_variance.shape).astype(np.float32))
    for rates in network.inner_rates.values():
        rates.assign(rng.uniform(0.05, 0.3, rates.shape).astype(np.float32))
    return network


def smooth_problem(seed=0):
    """A network and one task near which the outer loss is smooth.

    ReLU and max-pool make the support gradient jump where a pre-activation
    crosses zero or a pool's maximum changes hands, so the adapted weights,
    and the outer loss, jump there too; a finite difference across a jump
    measures the jump, not the derivative. Here every 2x2 window of every
    image has one bright pixel and the kernel a dominant centre tap, so each
    pool's maximum is clear and positive after batch norm.
    """
    network = tiny_network(seed=seed)
    rng = np.random.default_rng(seed + 2)
    kernel = rng.uniform(-0.1, 0.1, (3, 3, 1, 2))
    kernel[1, 1] = 1.0
    network.fast_variables["conv0/kernel"].assign(kernel.astype(np.float32))
    norm = network.norms[0]
    norm.gamma.assign(rng.uniform(0.8, 1.2, norm.gamma.shape).astype(np.float32))
    norm.beta.assign(rng.uniform(-0.3, 0.3, norm.beta.shape).astype(np.float32))

    def split(per_class):
        images = rng.uniform(0, 0.1, (WAY * per_class, *IMAGE_SHAPE))
        for image in images:
            for i in (0, 2):
                for j in (0, 2):
                    di, dj = rng.integers(0, 2, 2)
                    image[i + di, j + dj, 0] = rng.uniform(0.9, 1.1)
        labels = np.tile(np.arange(WAY, dtype=np.int32), per_class)
        return tf.constant(images[None], tf.float32), tf.constant(labels[None])

    support_images, support_labels = split(3)
    target_images, target_labels = split(2)
    return network, {"support_images": support_images, "support_labels": support_labels,
                     "target_images": target_images, "target_labels": target_labels}


@pytest.fixture
def tasks(make_tasks):
    return make_tasks(1, WAY, shot=3, query=2, image_shape=IMAGE_SHAPE)


def outer_loss(network, tasks, second_order, target_steps, msl_weights):
    result = adapt_and_evaluate(network, tasks, network.num_steps, second_order, target_steps)
    return tf.reduce_sum(result["target_losses"] * msl_weights)


def meta_gradients(network, tasks, second_order, target_steps=(STEPS - 1,), msl_weights=(1.0,)):
    """{variable path: gradient} of the outer loss for every trainable variable."""
    with tf.GradientTape() as tape:
        loss = outer_loss(network, tasks, second_order, list(target_steps), msl_weights)
    variables = network.trainable_variables
    gradients = tape.gradient(loss, variables, unconnected_gradients=tf.UnconnectedGradients.ZERO)
    return {v.path: g.numpy() for v, g in zip(variables, gradients)}


def finite_differences(network, tasks, target_steps, msl_weights):
    """Central differences of the outer loss for every entry of every trainable variable."""
    # Traced once; each call reads the variables' current values.
    loss = tf.function(lambda: outer_loss(network, tasks, True, target_steps, msl_weights))
    estimates = {}
    for variable in network.trainable_variables:
        original = variable.numpy()
        estimate = np.zeros(original.shape)
        for index in np.ndindex(original.shape):
            losses = []
            for sign in (1, -1):
                shifted = original.copy()
                shifted[index] += sign * FD_EPSILON
                variable.assign(shifted)
                losses.append(float(loss()))
            estimate[index] = (losses[0] - losses[1]) / (2 * FD_EPSILON)
        variable.assign(original)
        estimates[variable.path] = estimate
    return estimates


def variable_values(network):
    return {v.path: v.numpy().copy() for v in network.variables}


@pytest.mark.parametrize("target_steps, msl_weights", [([1], [1.0]), ([0, 1], [0.3, 0.7])],
                         ids=["last step", "multi-step loss"])
def test_second_order_meta_gradient_matches_finite_differences(target_steps, msl_weights):
    # This is the check that catches batch-norm statistics computed with
    # tf.nn.moments: it stops the gradient through the mean inside the
    # variance, exact to first order but wrong to second.
    network, tasks = smooth_problem()
    analytic = meta_gradients(network, tasks, True, target_steps, msl_weights)
    numeric = finite_differences(network, tasks, target_steps, msl_weights)
    # Every entry of every meta-parameter: conv and head weights, both steps'
    # gamma/beta rows and both steps' rates of each layer.
    assert {network.norms[0].gamma.path, network.inner_rates["conv0"].path} <= set(analytic)
    for path in analytic:
        np.testing.assert_allclose(analytic[path], numeric[path], rtol=FD_RTOL, atol=FD_ATOL,
                                   err_msg=path)
    # The check can tell the orders apart: the first-order gradient misses.
    first_order = meta_gradients(network, tasks, False, target_steps, msl_weights)
    worst = max(np.abs(first_order[path] - numeric[path]).max() for path in numeric)
    assert worst > 10 * FD_ATOL


@pytest.mark.parametrize("num_steps", [1, 2])
def test_first_order_meta_gradient_is_the_gradient_of_a_stopped_copy(
        tasks, adapt_by_hand, num_steps):
    network = tiny_network(num_steps=num_steps)
    analytic = meta_gradients(network, tasks, False, target_steps=(num_steps - 1,))
    adapted = adapt_by_hand(network, tasks, 0, num_steps)
    final = adapted["weights"][-1]
    norm = network.norms[0]
    with tf.GradientTape(persistent=True) as tape:
        tape.watch(final)
        logits, _ = network.forward(tasks["target_images"], final, num_steps - 1)
        loss = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(
            tasks["target_labels"][0], logits[0]))
    leaf_gradients = tape.gradient(loss, final)
    # The initial weights get the gradient at the adapted weights.
    for name, variable in network.fast_variables.items():
        np.testing.assert_allclose(analytic[variable.path], leaf_gradients[name].numpy()[0],
                                   rtol=1e-4, atol=1e-6, err_msg=name)
    # Batch-norm weights get only their direct part, from the target pass.
    for variable in (norm.gamma, norm.beta):
        np.testing.assert_allclose(analytic[variable.path],
                                   tape.gradient(loss, variable).numpy(),
                                   rtol=1e-4, atol=1e-6, err_msg=variable.path)
    # Rates, by hand: theta' = theta_k - alpha_k * stop(g_k), so
    # dL/dalpha_k = -sum over the layer's weights of g_k * dL/dtheta'.
    for layer, rates in network.inner_rates.items():
        expected = [-sum(float(tf.reduce_sum(adapted["gradients"][k][name] * leaf_gradients[name]))
                         for name in final if name.split("/")[0] == layer)
                    for k in range(num_steps)]
        np.testing.assert_allclose(analytic[rates.path], expected, rtol=1e-4, atol=1e-6,
                                   err_msg=layer)
        assert np.all(np.abs(expected) > 1e-6)


def test_first_and_second_order_differ_for_the_initial_weights(tasks):
    network = tiny_network()
    second = meta_gradients(network, tasks, True)
    first = meta_gradients(network, tasks, False)
    for variable in network.fast_variables.values():
        difference = np.linalg.norm(second[variable.path] - first[variable.path])
        assert difference > 0.05 * np.linalg.norm(second[variable.path]), variable.path
    # Under first order the non-final gamma row has no path to the last
    # step's loss; under second order it has one, through the inner gradient.
    gamma = network.norms[0].gamma.path
    assert np.all(first[gamma][0] == 0)
    assert np.all(np.abs(second[gamma][0]) > 1e-5)


def test_inner_update_is_one_gradient_step_with_the_steps_rates_and_changes_no_variable(tasks):
    network = tiny_network()
    before = variable_values(network)
    weights = network.initial_fast_weights()
    with tf.GradientTape() as tape:
        tape.watch(weights)
        logits, _ = network.forward(tasks["support_images"], weights, 1)
        loss = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(
            tasks["support_labels"], logits))
    gradients = tape.gradient(loss, weights)
    for second_order in (True, False):
        updated, statistics = inner_update(network, weights, tasks["support_images"],
                                           tasks["support_labels"], 1, second_order)
        for name, value in updated.items():
            rate = network.inner_rates[name.split("/")[0]].numpy()[1]
            expected = (weights[name] - rate * gradients[name]).numpy()
            np.testing.assert_allclose(value.numpy(), expected, rtol=1e-5, atol=1e-7,
                                       err_msg=name)
        assert len(statistics) == 1
    after = variable_values(network)
    assert all(np.array_equal(before[name], after[name]) for name in before)


def test_adapt_and_evaluate_scores_the_target_set_after_the_chosen_steps(tasks, adapt_by_hand):
    network = tiny_network()
    before = variable_values(network)
    result = adapt_and_evaluate(network, tasks, STEPS, second_order=True, target_steps=[0, 1])
    assert tuple(result["target_losses"].shape) == (1, 2)
    assert tuple(result["target_accuracies"].shape) == (1, 2)
    for steps in (1, 2):
        by_hand = adapt_by_hand(network, tasks, 0, steps)
        np.testing.assert_allclose(result["target_losses"].numpy()[0, steps - 1],
                                   by_hand["target_loss"].numpy(), rtol=1e-5)
    np.testing.assert_allclose(result["logits"].numpy(), by_hand["logits"].numpy(),
                               rtol=1e-5, atol=1e-6)
    # Loss and accuracy of the last step, from the logits in NumPy.
    logits = result["logits"].numpy()[0].astype(np.float64)
    labels = tasks["target_labels"].numpy()[0]
    log_softmax = logits - np.log(np.exp(logits).sum(axis=-1, keepdims=True))
    np.testing.assert_allclose(result["target_losses"].numpy()[0, -1],
                               -log_softmax[np.arange(len(labels)), labels].mean(), rtol=1e-5)
    np.testing.assert_allclose(result["target_accuracies"].numpy()[0, -1],
                               (logits.argmax(axis=-1) == labels).mean())
    # Support statistics of every step, per stage (steps, filters).
    assert len(result["bn_means"]) == len(result["bn_variances"]) == 1
    for step in range(STEPS):
        mean, variance = by_hand["statistics"][step][0]
        np.testing.assert_allclose(result["bn_means"][0].numpy()[step], mean.numpy()[0],
                                   rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(result["bn_variances"][0].numpy()[step], variance.numpy()[0],
                                   rtol=1e-5, atol=1e-6)
    after = variable_values(network)
    assert all(np.array_equal(before[name], after[name]) for name in before)


def test_target_steps_must_include_the_last_step(tasks):
    with pytest.raises(ValueError, match="last step"):
        adapt_and_evaluate(tiny_network(), tasks, STEPS, second_order=False, target_steps=[0])


@pytest.mark.parametrize("bn_mode", [BATCH, RUNNING])
def test_more_steps_than_trained_reuse_the_last_steps_rates_and_banks(
        tasks, adapt_by_hand, bn_mode):
    network = tiny_network()
    result = adapt_and_evaluate(network, tasks, 4, second_order=False,
                                target_steps=[0, 1, 2, 3], bn_mode=bn_mode)
    assert tuple(result["target_accuracies"].shape) == (1, 4)
    by_hand = adapt_by_hand(network, tasks, 0, 4, bn_mode)
    np.testing.assert_allclose(result["logits"].numpy(), by_hand["logits"].numpy(),
                               rtol=1e-4, atol=1e-5)
    # The by-hand run really did take the later steps at the last step's rate.
    assert by_hand["rates"][3] == by_hand["rates"][1] != by_hand["rates"][0]


def test_tasks_adapted_together_equal_each_adapted_alone(make_tasks):
    """Folded tasks (grouped convolutions) give each task its own loss and gradient."""
    network = tiny_network()
    pair = make_tasks(2, WAY, shot=3, query=2, image_shape=IMAGE_SHAPE, seed=5)
    together = adapt_and_evaluate(network, pair, STEPS, True, [0, 1])
    gradients_together = meta_gradients(network, pair, True, [0, 1], [0.3, 0.7])
    alone = [{key: value[task:task + 1] for key, value in pair.items()} for task in range(2)]
    for task in range(2):
        result = adapt_and_evaluate(network, alone[task], STEPS, True, [0, 1])
        np.testing.assert_allclose(together["target_losses"].numpy()[task],
                                   result["target_losses"].numpy()[0], rtol=1e-5)
        np.testing.assert_allclose(together["logits"].numpy()[task], result["logits"].numpy()[0],
                                   rtol=1e-5, atol=1e-6)
    gradients_alone = [meta_gradients(network, one, True, [0, 1], [0.3, 0.7]) for one in alone]
    for path, gradient in gradients_together.items():
        np.testing.assert_allclose(gradient, gradients_alone[0][path] + gradients_alone[1][path],
                                   rtol=1e-4, atol=1e-6, err_msg=path)
    # The batch-norm statistics are the tasks' mean.
    for step in range(STEPS):
        expected = np.mean([adapt_and_evaluate(network, one, STEPS, False, [1])["bn_means"][0]
                            .numpy()[step] for one in alone], axis=0)
        np.testing.assert_allclose(together["bn_means"][0].numpy()[step], expected,
                                   rtol=1e-5, atol=1e-6)
