"""Specification of tf_mamlpp.core.inner_loop: adaptation and its meta-gradient.

The meta-gradient is checked three ways: second order against central finite
differences of the outer loss (in every batch-norm mode, so the derivative
paths through the support statistics into the target pass, and TaskNorm's
blend, are checked too), first order against the gradient of a stopped
copy (the adapted weights taken as leaves, learn2learn's check), and the
learned rates' first-order gradient against its closed form. The finite
differences run in float64 on the plain path (tf_mamlpp.ops.plain_tensorflow),
and the fast path's meta-gradients are shown equal to the plain path's in
float32; the other checks run in float32 on the fast path (see conftest.py).
"""

import keras
import numpy as np
import pytest
import tensorflow as tf

from conftest import (SMALL_IMAGE_SHAPE as IMAGE_SHAPE, SMALL_STEPS as STEPS, SMALL_WAY as WAY,
                      lacks_grouped_convolution_gradients, needs_grouped_convolution_gradients,
                      small_network, smooth_problem)
from tf_mamlpp.core.batch_norm_modes import BN_MODES, RUNNING, SUPPORT, TASK_NORM, TRANSDUCTIVE
from tf_mamlpp.core.inner_loop import (adapt_and_evaluate, cross_entropy, inner_update,
                                        support_states)
from tf_mamlpp.core.meta_learner import MetaLearner
from tf_mamlpp.core.per_step_batch_norm import Moments
from tf_mamlpp.ops import plain_tensorflow

# float64 central differences: the truncation error, epsilon^2 / 6 times a third
# derivative of order ten here, is about 1e-9, the rounding error, the loss's
# 1e-16 over epsilon, about 1e-11.
FD_EPSILON, FD_RTOL, FD_ATOL = 1e-5, 1e-6, 1e-8


@pytest.fixture
def tasks(make_tasks):
    return make_tasks(1, WAY, shot=3, query=2, image_shape=IMAGE_SHAPE)


def outer_loss(network, tasks, second_order, target_steps, msl_weights):
    """The multi-step target loss, adapted and scored in the network's batch-norm mode."""
    result = adapt_and_evaluate(network, tasks, network.inner_steps, second_order, target_steps,
                                network.bn_mode)
    return tf.reduce_sum(result["target_losses"] * msl_weights)


def gradients_of(loss_fn, network):
    """{variable path: gradient} of loss_fn() for every trainable variable."""
    with tf.GradientTape() as tape:
        loss = loss_fn()
    variables = network.trainable_variables
    gradients = tape.gradient(loss, variables, unconnected_gradients=tf.UnconnectedGradients.ZERO)
    return {v.path: g.numpy() for v, g in zip(variables, gradients)}


def meta_gradients(network, tasks, second_order, target_steps=(STEPS - 1,), msl_weights=(1.0,)):
    """{variable path: gradient} of the outer loss for every trainable variable."""
    return gradients_of(
        lambda: outer_loss(network, tasks, second_order, list(target_steps), msl_weights), network)


def finite_differences(network, tasks, target_steps, msl_weights):
    """Central differences of the outer loss for every entry of every trainable variable."""
    # Traced once; each call reads the variables' current values.
    loss = tf.function(lambda: outer_loss(network, tasks, True, target_steps, msl_weights))
    estimates = {}
    for variable in network.trainable_variables:
        original = np.array(variable.numpy())  # an array also for scalar variables
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


def score_by_hand(network, tasks, weights, state, bn_mode):
    """Target logits at `weights` (weight state `state`), normalised as `bn_mode` says
    with the support set's moments at the same weights."""
    _, support = network.forward(tasks["support_images"], weights, state, bn_mode)
    logits, _ = network.forward(tasks["target_images"], weights, state, bn_mode, support=support)
    return logits


@pytest.mark.parametrize("bn_mode", BN_MODES)
@pytest.mark.parametrize("target_steps, msl_weights", [([1], [1.0]), ([0, 1], [0.3, 0.7])],
                         ids=["last step", "multi-step loss"])
def test_second_order_meta_gradient_matches_finite_differences(target_steps, msl_weights,
                                                               bn_mode):
    # This is the check that catches batch-norm statistics computed with
    # tf.nn.moments: it stops the gradient through the mean inside the
    # variance, exact to first order but wrong to second. Outside the
    # transductive mode it also covers the target pass's dependence on the
    # support pass's statistics (SUPPORT, TASK_NORM) and on the running bank
    # (RUNNING, no gradient there), and TaskNorm's blend weights. In float64
    # on the plain path, where every derivative is TensorFlow's own.
    network, tasks = smooth_problem(bn_mode=bn_mode, dtype="float64")
    with plain_tensorflow():
        analytic = meta_gradients(network, tasks, True, target_steps, msl_weights)
        numeric = finite_differences(network, tasks, target_steps, msl_weights)
        first_order = meta_gradients(network, tasks, False, target_steps, msl_weights)
    # Every entry of every meta-parameter: conv and head weights, the three
    # weight states' gamma/beta rows, both steps' rates of each layer and,
    # for TaskNorm, the blend weights.
    norm = network.norms[0]
    expected = {norm.gamma.path, norm.beta.path, network.inner_rates["conv0"].path,
                network.fast_variables["conv0/kernel"].path}
    if bn_mode == TASK_NORM:
        expected |= {norm.blend_scale.path, norm.blend_offset.path}
    assert expected <= set(analytic)
    assert norm.gamma.shape[0] == STEPS + 1
    for path in analytic:
        assert analytic[path].dtype == np.float64, path
        np.testing.assert_allclose(analytic[path], numeric[path], rtol=FD_RTOL, atol=FD_ATOL,
                                   err_msg=path)
    if bn_mode == TASK_NORM:
        # The blend is really checked: its gradient is not within the tolerance of zero.
        for variable in (norm.blend_scale, norm.blend_offset):
            assert abs(analytic[variable.path]) > 2 * FD_ATOL, variable.path
    # The check can tell the orders apart: the first-order gradient misses,
    # by far more than the tolerance.
    worst = max(np.abs(first_order[path] - numeric[path]).max() for path in numeric)
    assert worst > 1000 * FD_ATOL


@pytest.mark.parametrize("bn_mode", BN_MODES)
def test_a_float64_network_adapts_in_float64_end_to_end_on_the_plain_path(bn_mode):
    """No op of the second-order meta-gradient rounds to a narrower float, so the
    finite-difference check above holds float64's derivatives to float64's tolerance."""
    network, tasks = smooth_problem(bn_mode=bn_mode, dtype="float64")

    def meta_gradient():
        with tf.GradientTape() as tape:
            loss = outer_loss(network, tasks, True, [0, 1], [0.3, 0.7])
        return tape.gradient(loss, network.trainable_variables)

    with plain_tensorflow():
        graph = tf.function(meta_gradient).get_concrete_function().graph
    floats = {output.dtype for op in graph.get_operations() for output in op.outputs
              if output.dtype.is_floating}
    assert floats == {tf.float64}


@pytest.mark.parametrize("bn_mode", BN_MODES)
@pytest.mark.parametrize("second_order", [True, False], ids=["second order", "first order"])
def test_the_fast_path_gives_the_plain_paths_meta_gradients(tasks, bn_mode, second_order):
    """The closed-form kernels (tf_mamlpp.ops) change the meta-gradient by float32 rounding only.

    The two paths round in different orders, through batch norm's centring
    among other cancellations, so each gradient is compared to 1e-4 of the
    variable's largest entry, about a thousand float32 epsilons.
    """
    network = small_network(bn_mode=bn_mode)
    fast = meta_gradients(network, tasks, second_order, [0, 1], [0.3, 0.7])
    with plain_tensorflow():
        plain = meta_gradients(network, tasks, second_order, [0, 1], [0.3, 0.7])
    assert fast.keys() == plain.keys()
    for path, gradient in plain.items():
        np.testing.assert_allclose(fast[path], gradient, rtol=1e-4,
                                   atol=1e-4 * np.abs(gradient).max(), err_msg=path)


@pytest.mark.parametrize("bn_mode", BN_MODES)
@pytest.mark.parametrize("num_steps", [1, 2])
def test_first_order_meta_gradient_is_the_gradient_of_a_stopped_copy(
        tasks, adapt_by_hand, num_steps, bn_mode):
    network = small_network(num_steps=num_steps, bn_mode=bn_mode)
    analytic = meta_gradients(network, tasks, False, target_steps=(num_steps - 1,))
    adapted = adapt_by_hand(network, tasks, 0, num_steps, bn_mode)
    final = adapted["weights"][-1]
    norm = network.norms[0]
    with tf.GradientTape(persistent=True) as tape:
        tape.watch(final)
        # The adapted weights are state num_steps; in SUPPORT and TASK_NORM
        # modes the leaves' gradient includes the path through the support
        # statistics taken at them.
        logits = score_by_hand(network, tasks, final, num_steps, bn_mode)
        loss = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(
            tasks["target_labels"][0], logits[0]))
    np.testing.assert_allclose(logits.numpy(), adapted["logits"].numpy(), rtol=1e-5, atol=1e-6)
    leaf_gradients = tape.gradient(loss, final)
    # The initial weights get the gradient at the adapted weights.
    for name, variable in network.fast_variables.items():
        np.testing.assert_allclose(analytic[variable.path], leaf_gradients[name].numpy()[0],
                                   rtol=1e-4, atol=1e-6, err_msg=name)
    # Batch-norm weights (and TaskNorm's blend) get only their direct part,
    # from the passes at the adapted weights.
    assert len(norm.trainable_variables) == (4 if bn_mode == TASK_NORM else 2)
    for variable in norm.trainable_variables:
        direct = tape.gradient(loss, variable)
        np.testing.assert_allclose(analytic[variable.path], direct.numpy(),
                                   rtol=1e-4, atol=1e-6, err_msg=variable.path)
    # Only the adapted weights' gamma row is used there.
    assert np.all(analytic[norm.gamma.path][:num_steps] == 0)
    assert np.all(np.abs(analytic[norm.gamma.path][num_steps]) > 1e-6)
    # Rates, by hand: theta' = theta_k - alpha_k * stop(g_k), so
    # dL/dalpha_k = -sum over the layer's weights of g_k * dL/dtheta'.
    for layer, rates in network.inner_rates.items():
        expected = [-sum(float(tf.reduce_sum(adapted["gradients"][k][name] * leaf_gradients[name]))
                         for name in final if name.split("/")[0] == layer)
                    for k in range(num_steps)]
        np.testing.assert_allclose(analytic[rates.path], expected, rtol=1e-4, atol=1e-6,
                                   err_msg=layer)
        assert np.all(np.abs(expected) > 1e-6)


@pytest.mark.parametrize("bn_mode", BN_MODES)
def test_first_and_second_order_differ_for_the_initial_weights(tasks, bn_mode):
    network = small_network(bn_mode=bn_mode)
    second = meta_gradients(network, tasks, True)
    first = meta_gradients(network, tasks, False)
    for variable in network.fast_variables.values():
        difference = np.linalg.norm(second[variable.path] - first[variable.path])
        assert difference > 0.05 * np.linalg.norm(second[variable.path]), variable.path
    # Under first order the gamma rows of the states before the adapted one
    # have no path to the last step's loss (only the support gradients,
    # stopped, read them); under second order they have one, through the
    # inner gradient. The adapted state's row has its direct path in both.
    gamma = network.norms[0].gamma.path
    assert np.all(first[gamma][:STEPS] == 0)
    assert np.all(np.abs(second[gamma][:STEPS]) > 1e-5)
    assert np.all(np.abs(first[gamma][STEPS]) > 1e-5)


@pytest.mark.parametrize("bn_mode", BN_MODES)
def test_inner_update_is_one_gradient_step_with_the_steps_rates_and_changes_no_variable(
        tasks, bn_mode):
    network = small_network(bn_mode=bn_mode)
    before = variable_values(network)
    weights = network.initial_fast_weights()
    with tf.GradientTape() as tape:
        tape.watch(weights)
        logits, moments = network.forward(tasks["support_images"], weights, 1, bn_mode)
        loss = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(
            tasks["support_labels"], logits))
    gradients = tape.gradient(loss, weights)
    for second_order in (True, False):
        updated, statistics = inner_update(network, weights, tasks["support_images"],
                                           tasks["support_labels"], 1, second_order, bn_mode)
        for name, value in updated.items():
            rate = network.inner_rates[name.split("/")[0]].numpy()[1]
            expected = (weights[name] - rate * gradients[name]).numpy()
            np.testing.assert_allclose(value.numpy(), expected, rtol=1e-5, atol=1e-7,
                                       err_msg=name)
        # The support pass's moments at the weights before the step.
        assert len(statistics) == 1
        for field in ("mean", "variance", "size"):
            np.testing.assert_allclose(getattr(statistics[0], field).numpy(),
                                       getattr(moments[0], field).numpy(), rtol=1e-6, atol=1e-7)
    after = variable_values(network)
    assert all(np.array_equal(before[name], after[name]) for name in before)


@pytest.mark.parametrize("bn_mode, final_statistics",
                         [(TRANSDUCTIVE, False), (SUPPORT, False), (TASK_NORM, False),
                          (RUNNING, False), (RUNNING, True)])
def test_adapt_and_evaluate_scores_the_target_set_after_the_chosen_steps(
        tasks, adapt_by_hand, bn_mode, final_statistics):
    network = small_network(bn_mode=bn_mode)
    before = variable_values(network)
    result = adapt_and_evaluate(network, tasks, STEPS, second_order=True, target_steps=[0, 1],
                                bn_mode=bn_mode, final_statistics=final_statistics)
    assert tuple(result["target_losses"].shape) == (1, 2)
    assert tuple(result["target_accuracies"].shape) == (1, 2)
    for steps in (1, 2):
        by_hand = adapt_by_hand(network, tasks, 0, steps, bn_mode)
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
    # Support statistics of every weight state the support set passed
    # through, per stage (states, filters): the S steps' and, where the mode
    # normalises the target set with them (or final_statistics asks), the
    # adapted weights'.
    states = support_states(STEPS, bn_mode, final_statistics)
    assert states == (STEPS + 1 if bn_mode in (SUPPORT, TASK_NORM) or final_statistics
                      else STEPS)
    assert len(result["bn_means"]) == len(result["bn_variances"]) == 1
    assert tuple(result["bn_means"][0].shape) == tuple(result["bn_variances"][0].shape) \
        == (states, network.filters)
    _, final_moments = network.forward(tasks["support_images"], by_hand["weights"][-1], STEPS,
                                       bn_mode)
    support_moments = [stages[0] for stages in by_hand["statistics"]] + [final_moments[0]]
    for state in range(states):
        moments = support_moments[state]
        np.testing.assert_allclose(result["bn_means"][0].numpy()[state], moments.mean.numpy(),
                                   rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(result["bn_variances"][0].numpy()[state],
                                   moments.variance.numpy(), rtol=1e-5, atol=1e-6)
    # The biased variance of the support set's activations at state 0.
    activations = tf.nn.conv2d(tasks["support_images"][0],
                               network.fast_variables["conv0/kernel"], 1, "SAME").numpy()
    np.testing.assert_allclose(result["bn_variances"][0].numpy()[0],
                               activations.var(axis=(0, 1, 2)), rtol=1e-4, atol=1e-6)
    after = variable_values(network)
    assert all(np.array_equal(before[name], after[name]) for name in before)


def test_target_steps_must_include_the_last_step(tasks):
    with pytest.raises(ValueError, match="last step"):
        adapt_and_evaluate(small_network(), tasks, STEPS, second_order=False, target_steps=[0])


@pytest.mark.parametrize("bn_mode", BN_MODES)
def test_more_steps_than_trained_reuse_the_last_steps_rates_and_banks(
        tasks, adapt_by_hand, bn_mode):
    network = small_network(bn_mode=bn_mode)
    result = adapt_and_evaluate(network, tasks, 4, second_order=False,
                                target_steps=[0, 1, 2, 3], bn_mode=bn_mode)
    assert tuple(result["target_accuracies"].shape) == (1, 4)
    by_hand = adapt_by_hand(network, tasks, 0, 4, bn_mode)
    np.testing.assert_allclose(result["logits"].numpy(), by_hand["logits"].numpy(),
                               rtol=1e-4, atol=1e-5)
    # The by-hand run really did take the later steps at the last step's rate.
    assert by_hand["rates"][3] == by_hand["rates"][1] != by_hand["rates"][0]


@pytest.mark.parametrize("bn_mode", BN_MODES)
def test_a_target_images_logits_depend_on_the_other_targets_only_when_transductive(
        make_tasks, bn_mode):
    """Outside TRANSDUCTIVE no target image is normalised by another target image."""
    network = small_network(bn_mode=bn_mode)
    tasks = make_tasks(1, WAY, shot=3, query=3, image_shape=IMAGE_SHAPE, seed=3)
    alone = {**tasks, "target_images": tasks["target_images"][:, :1],
             "target_labels": tasks["target_labels"][:, :1]}
    logits = {}
    for name, batch in (("together", tasks), ("alone", alone)):
        result = adapt_and_evaluate(network, batch, STEPS, False, [0, 1], bn_mode)
        logits[name] = result["logits"].numpy()[0, 0]
    if bn_mode == TRANSDUCTIVE:
        assert np.abs(logits["together"] - logits["alone"]).max() > 1e-2
    else:
        np.testing.assert_allclose(logits["alone"], logits["together"], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("second_order", [True, False], ids=["second order", "first order"])
def test_support_mode_meta_gradient_flows_through_the_support_statistics(tasks, second_order):
    """MetaBN's target pass is differentiated through the support statistics too."""
    network = small_network(bn_mode=SUPPORT)

    def loss_by_hand(stop_statistics):
        weights = network.initial_fast_weights()
        for step in range(STEPS):
            weights, _ = inner_update(network, weights, tasks["support_images"],
                                      tasks["support_labels"], step, second_order, SUPPORT)
        _, support = network.forward(tasks["support_images"], weights, STEPS, SUPPORT)
        if stop_statistics:
            support = [Moments(tf.stop_gradient(m.mean), tf.stop_gradient(m.variance), m.size)
                       for m in support]
        logits, _ = network.forward(tasks["target_images"], weights, STEPS, SUPPORT,
                                    support=support)
        return tf.reduce_sum(cross_entropy(tasks["target_labels"], logits))

    analytic = meta_gradients(network, tasks, second_order)
    through = gradients_of(lambda: loss_by_hand(False), network)
    stopped = gradients_of(lambda: loss_by_hand(True), network)
    # The by-hand loss is the library's.
    for path, gradient in analytic.items():
        np.testing.assert_allclose(gradient, through[path], rtol=1e-5, atol=1e-7, err_msg=path)
    difference = {path: np.abs(analytic[path] - stopped[path]) for path in analytic}
    conv, rates = network.fast_variables["conv0/kernel"].path, network.inner_rates["conv0"].path
    head_rates = network.inner_rates["head"].path
    norm = network.norms[0]
    # The statistics are taken from the adapted kernel: stopping them
    # changes the gradient of the initial kernel and of every step's rate
    # for it...
    assert np.linalg.norm(difference[conv]) > 0.1 * np.linalg.norm(analytic[conv])
    assert np.all(difference[rates] > 0.1 * np.abs(analytic[rates]))
    # ...and, at second order, of what shapes the kernel's inner gradients:
    # the head, the head's rates of the steps before the last, and the
    # affine rows of the states before the adapted one.
    later = [network.fast_variables["head/kernel"].path, network.fast_variables["head/bias"].path]
    if second_order:
        for path in later:
            assert difference[path].max() > 1e-3, path
        assert np.all(difference[head_rates][:STEPS - 1] > 1e-4)
        for variable in (norm.gamma, norm.beta):
            assert difference[variable.path][:STEPS].max() > 1e-3, variable.path
    else:  # first order: their only path is the target pass, which the statistics do not touch
        for path in later + [norm.gamma.path, norm.beta.path]:
            np.testing.assert_allclose(analytic[path], stopped[path], rtol=1e-5, atol=1e-7,
                                       err_msg=path)
    # Nothing applied after the statistics is changed: the adapted state's
    # affine row and the head's last rate (the kernel does not depend on it).
    for variable in (norm.gamma, norm.beta):
        np.testing.assert_allclose(analytic[variable.path][STEPS], stopped[variable.path][STEPS],
                                   rtol=1e-5, atol=1e-7, err_msg=variable.path)
    np.testing.assert_allclose(analytic[head_rates][STEPS - 1], stopped[head_rates][STEPS - 1],
                               rtol=1e-5, atol=1e-7)


def folded_pair(make_tasks):
    """Two tasks, which adapt_and_evaluate folds into grouped convolutions."""
    return make_tasks(2, WAY, shot=3, query=2, image_shape=IMAGE_SHAPE, seed=5)


@lacks_grouped_convolution_gradients()
@pytest.mark.parametrize("bn_mode", BN_MODES)
def test_where_grouped_convolutions_have_no_gradients_folding_is_refused(make_tasks, bn_mode):
    """Folded adaptation fails deep in TensorFlow here, so the meta-learner refuses
    to fold, with a clear message, before it starts."""
    network = small_network(bn_mode=bn_mode)
    with pytest.raises(tf.errors.InvalidArgumentError):
        adapt_and_evaluate(network, folded_pair(make_tasks), STEPS, True, [0, 1], bn_mode)
    with pytest.raises(ValueError, match="fold_tasks=True"):
        MetaLearner(network, keras.optimizers.Adam(1e-3), fold_tasks=True)


@needs_grouped_convolution_gradients()
@pytest.mark.parametrize("bn_mode", BN_MODES)
def test_tasks_adapted_together_equal_each_adapted_alone(make_tasks, bn_mode):
    """Folded tasks (grouped convolutions) give each task its own loss and gradient."""
    network = small_network(bn_mode=bn_mode)
    pair = folded_pair(make_tasks)
    together = adapt_and_evaluate(network, pair, STEPS, True, [0, 1], bn_mode)
    gradients_together = meta_gradients(network, pair, True, [0, 1], [0.3, 0.7])
    alone = [{key: value[task:task + 1] for key, value in pair.items()} for task in range(2)]
    results_alone = []
    for task in range(2):
        result = adapt_and_evaluate(network, alone[task], STEPS, True, [0, 1], bn_mode)
        results_alone.append(result)
        np.testing.assert_allclose(together["target_losses"].numpy()[task],
                                   result["target_losses"].numpy()[0], rtol=1e-5)
        np.testing.assert_allclose(together["logits"].numpy()[task], result["logits"].numpy()[0],
                                   rtol=1e-5, atol=1e-6)
    gradients_alone = [meta_gradients(network, one, True, [0, 1], [0.3, 0.7]) for one in alone]
    for path, gradient in gradients_together.items():
        np.testing.assert_allclose(gradient, gradients_alone[0][path] + gradients_alone[1][path],
                                   rtol=1e-4, atol=1e-6, err_msg=path)
    # The batch-norm statistics are the tasks' mean.
    for key in ("bn_means", "bn_variances"):
        expected = np.mean([result[key][0].numpy() for result in results_alone], axis=0)
        assert expected.shape == (support_states(STEPS, bn_mode), network.filters)
        np.testing.assert_allclose(together[key][0].numpy(), expected, rtol=1e-5, atol=1e-6)
