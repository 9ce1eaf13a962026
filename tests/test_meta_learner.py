"""Specification of tf_mamlpp.meta_learner: the MAML++ meta-update and evaluation step.

Each MAML++ technique is checked for its wiring: MSL (the per-step loss
weights reach the outer loss), DA (the derivative order reaches the inner
loop), BNRS/BNWB (per-step banks are updated and trained), LSLR (the rates
are trained, or left alone when switched off); and the meta-step is traced
once per combination of Python switches, not per call.
"""

import keras
import numpy as np
import pytest
import tensorflow as tf

from tf_mamlpp.inner_loop import adapt_and_evaluate
from tf_mamlpp.meta_learner import MetaLearner
from tf_mamlpp.network import MamlppNetwork
from tf_mamlpp.per_step_batch_norm import BATCH, RUNNING

WAY, IMAGE_SHAPE, STEPS, TASKS = 2, (4, 4, 1), 2, 2
MSL_WEIGHTS = [0.4, 0.6]


def tiny_network(seed=0, **kwargs):
    keras.utils.set_random_seed(seed)
    return MamlppNetwork(way=WAY, image_shape=IMAGE_SHAPE, num_steps=STEPS, filters=2,
                         num_stages=1, **kwargs)


def meta_learner(network, **kwargs):
    return MetaLearner(network, keras.optimizers.Adam(1e-2), global_batch_size=TASKS, **kwargs)


@pytest.fixture(scope="module")
def batch(make_tasks):
    return make_tasks(TASKS, WAY, shot=2, query=2, image_shape=IMAGE_SHAPE)


def values(variables):
    return {v.path: v.numpy().copy() for v in variables}


def task_gradients(learner, batch, second_order, multi_step, msl_weights=MSL_WEIGHTS):
    """{path: summed gradient over the tasks} from one eager meta-gradient computation."""
    sums = learner._tasks_step(batch, tf.constant(msl_weights, tf.float32), second_order,
                               multi_step)
    return {v.path: g.numpy() for v, g in zip(learner.network.trainable_variables,
                                              sums["gradients"])}


def rows(array):
    """The entries that must each move on their own: rows of a bank, entries of rates."""
    return list(array) if array.ndim in (1, 2) else [array]


@pytest.mark.parametrize("second_order", [True, False])
def test_every_trainable_variable_gets_a_meta_gradient_under_msl(batch, second_order):
    learner = meta_learner(tiny_network())
    gradients = task_gradients(learner, batch, second_order, multi_step=True)
    network = learner.network
    assert set(gradients) == {v.path for v in network.trainable_variables}
    # Every row of the per-step banks and every step's rate included.
    assert {network.norms[0].gamma.path, network.norms[0].beta.path,
            network.inner_rates["conv0"].path, network.inner_rates["head"].path} <= set(gradients)
    for path, gradient in gradients.items():
        for row in rows(gradient):
            assert np.abs(row).max() > 1e-6, path


@pytest.fixture(scope="module")
def one_step(batch):
    """One second-order, multi-step train_step, with everything needed to check it."""
    network = tiny_network()
    learner = meta_learner(network)
    weights = tf.constant(MSL_WEIGHTS)
    reference = adapt_and_evaluate(network, batch, STEPS, False, [0, 1])
    gradients = task_gradients(learner, batch, True, True)
    before = values(network.variables)
    measurements = learner.train_step(batch, weights, True, True)
    return {"network": network, "learner": learner, "reference": reference,
            "gradients": gradients, "before": before, "after": values(network.variables),
            "measurements": {name: float(value) for name, value in measurements.items()}}


def test_train_step_changes_every_trainable_variable(one_step):
    network, before, after = one_step["network"], one_step["before"], one_step["after"]
    for variable in network.trainable_variables:
        for old, new in zip(rows(before[variable.path]), rows(after[variable.path])):
            assert np.abs(new - old).max() > 1e-4, variable.path


def test_train_step_folds_every_steps_statistics_into_its_bank(one_step):
    """BNRS: bank row i moves from its initial value towards step i's support statistics."""
    norm = one_step["network"].norms[0]
    means = one_step["reference"]["bn_means"][0].numpy()  # (steps, filters), mean over tasks
    variances = one_step["reference"]["bn_variances"][0].numpy()
    assert not np.allclose(means[0], means[1])
    np.testing.assert_allclose(norm.moving_mean.numpy(), 0.9 * 0.0 + 0.1 * means,
                               rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(norm.moving_variance.numpy(), 0.9 * 1.0 + 0.1 * variances,
                               rtol=1e-4)


def test_train_step_measurements_are_means_over_the_tasks(one_step):
    measurements, reference = one_step["measurements"], one_step["reference"]
    losses = reference["target_losses"].numpy()  # (tasks, steps)
    assert measurements["loss"] == pytest.approx((losses @ MSL_WEIGHTS).mean(), rel=1e-4)
    for step in range(STEPS):
        assert measurements[f"target_loss_step_{step}"] == pytest.approx(
            losses[:, step].mean(), rel=1e-4)
    assert measurements["accuracy"] == pytest.approx(
        reference["target_accuracies"].numpy()[:, -1].mean())
    mean_gradient_norm = np.sqrt(sum(np.sum((g / TASKS) ** 2)
                                     for g in one_step["gradients"].values()))
    assert measurements["gradient_norm"] == pytest.approx(mean_gradient_norm, rel=1e-4)
    assert measurements["update_norm"] > 0
    assert np.isfinite(measurements["parameter_norm"])


def test_switched_off_techniques_remove_exactly_their_variables():
    full = tiny_network()
    shapes = lambda variables: {v.path.split("/", 1)[1]: tuple(v.shape) for v in variables}
    full_trainable = shapes(full.trainable_variables)
    full_banks = shapes(full.non_trainable_variables)
    rates = {name for name in full_trainable if name.endswith("_inner_rate")}
    assert len(rates) == 2
    no_lslr = tiny_network(learn_inner_rates=False)
    assert shapes(no_lslr.trainable_variables) == {
        name: shape for name, shape in full_trainable.items() if name not in rates}
    assert shapes(no_lslr.non_trainable_variables) == {
        **full_banks, **{name: full_trainable[name] for name in rates}}
    no_bnwb = tiny_network(per_step_bn_affine=False)
    assert shapes(no_bnwb.trainable_variables) == {
        **full_trainable, "gamma": (1, 2), "beta": (1, 2)}
    assert shapes(no_bnwb.non_trainable_variables) == full_banks
    no_bnrs = tiny_network(per_step_bn_statistics=False)
    assert shapes(no_bnrs.trainable_variables) == full_trainable
    assert shapes(no_bnrs.non_trainable_variables) == {"moving_mean": (1, 2),
                                                       "moving_variance": (1, 2)}
    assert full_banks == {"moving_mean": (STEPS, 2), "moving_variance": (STEPS, 2)}


def test_train_step_without_lslr_bnwb_bnrs(batch):
    network = tiny_network(learn_inner_rates=False, per_step_bn_affine=False,
                           per_step_bn_statistics=False, inner_lr=0.25)
    learner = meta_learner(network)
    reference = adapt_and_evaluate(network, batch, STEPS, False, [0, 1])
    before = values(network.variables)
    learner.train_step(batch, tf.constant(MSL_WEIGHTS), True, True)
    for rates in network.inner_rates.values():
        np.testing.assert_array_equal(rates.numpy(), [0.25] * STEPS)
    norm = network.norms[0]
    for variable in (norm.gamma, norm.beta, network.fast_variables["conv0/kernel"]):
        assert np.abs(variable.numpy() - before[variable.path]).min() > 1e-4, variable.path
    # One shared running bank, moved towards the statistics averaged over steps.
    means = reference["bn_means"][0].numpy().mean(axis=0, keepdims=True)
    variances = reference["bn_variances"][0].numpy().mean(axis=0, keepdims=True)
    np.testing.assert_allclose(norm.moving_mean.numpy(), 0.1 * means, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(norm.moving_variance.numpy(), 0.9 + 0.1 * variances, rtol=1e-4)


def test_msl_wiring_non_final_banks_learn_only_from_the_multi_step_loss(batch):
    """Under first order, gamma row 0 reaches the loss only through step 0's target loss."""
    learner = meta_learner(tiny_network())
    gamma = learner.network.norms[0].gamma.path
    last_only = task_gradients(learner, batch, second_order=False, multi_step=False)
    assert np.all(last_only[gamma][0] == 0)
    assert np.abs(last_only[gamma][1]).max() > 1e-6
    every_step = task_gradients(learner, batch, second_order=False, multi_step=True)
    assert np.abs(every_step[gamma][0]).max() > 1e-6
    # Under second order row 0 also shapes step 0's inner gradient.
    second_order = task_gradients(learner, batch, second_order=True, multi_step=False)
    assert np.abs(second_order[gamma][0]).max() > 1e-6


def test_msl_wiring_the_outer_loss_is_the_weighted_sum_of_step_losses(batch):
    learner = meta_learner(tiny_network())
    mixed = task_gradients(learner, batch, True, True, msl_weights=[0.3, 0.7])
    first = task_gradients(learner, batch, True, True, msl_weights=[1.0, 0.0])
    last = task_gradients(learner, batch, True, True, msl_weights=[0.0, 1.0])
    # Without MSL only the last step counts, whatever weights are passed.
    without = task_gradients(learner, batch, True, False, msl_weights=[5.0, 5.0])
    for path in mixed:
        np.testing.assert_allclose(mixed[path], 0.3 * first[path] + 0.7 * last[path],
                                   rtol=1e-4, atol=1e-6, err_msg=path)
        np.testing.assert_allclose(without[path], last[path], rtol=1e-5, atol=1e-7,
                                   err_msg=path)
    assert not np.allclose(first[learner.network.fast_variables["head/kernel"].path],
                           last[learner.network.fast_variables["head/kernel"].path], rtol=0.1)


def test_da_wiring_second_order_changes_the_meta_gradient(batch):
    learner = meta_learner(tiny_network())
    second = task_gradients(learner, batch, second_order=True, multi_step=True)
    first = task_gradients(learner, batch, second_order=False, multi_step=True)
    for variable in learner.network.fast_variables.values():
        difference = np.linalg.norm(second[variable.path] - first[variable.path])
        assert difference > 0.02 * np.linalg.norm(second[variable.path]), variable.path


def test_folded_and_one_at_a_time_tasks_give_the_same_sums(batch):
    learner = meta_learner(tiny_network())
    weights = tf.constant(MSL_WEIGHTS)
    folded = learner._tasks_step(batch, weights, True, True)
    sequential = learner._task_by_task(batch, weights, True, True)
    for name in ("loss", "accuracy", "target_losses"):
        np.testing.assert_allclose(folded[name].numpy(), sequential[name].numpy(), rtol=1e-5,
                                   err_msg=name)
    for a, b in zip(folded["gradients"], sequential["gradients"]):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-4, atol=1e-6)
    for name in ("bn_means", "bn_variances"):
        for a, b in zip(folded[name], sequential[name]):
            np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-5, atol=1e-6)


def test_the_meta_step_traces_once_per_switch_combination(batch):
    learner = meta_learner(tiny_network(), fold_tasks=True)
    schedule = [[0.5, 0.5], [0.45, 0.55], [0.4, 0.6], [0.5, 0.5], [0.3, 0.7]]
    for weights in schedule:
        learner.train_step(batch, tf.constant(weights), False, True)
    assert learner.trace_count == 1
    # DA switches to second order once: one more trace, and another update.
    state = learner.network.variables + learner.optimizer.variables
    saved = [v.numpy() for v in state]
    learner.train_step(batch, tf.constant([0.3, 0.7]), True, True)
    assert learner.trace_count == 2
    second_order_update = values(learner.network.trainable_variables)
    for variable, value in zip(state, saved):
        variable.assign(value)
    learner.train_step(batch, tf.constant([0.3, 0.7]), False, True)
    first_order_update = values(learner.network.trainable_variables)
    kernel = learner.network.fast_variables["conv0/kernel"].path
    assert np.abs(second_order_update[kernel] - first_order_update[kernel]).max() > 1e-5
    for weights in schedule:
        learner.train_step(batch, tf.constant(weights), True, True)
    assert learner.trace_count == 2


@pytest.fixture(scope="module")
def evaluated(batch):
    network = tiny_network(seed=3)
    learner = meta_learner(network)
    for norm in network.norms:
        norm.moving_mean.assign(np.random.default_rng(0).uniform(-0.2, 0.2, norm.moving_mean.shape))
    return network, learner


@pytest.mark.parametrize("num_steps, bn_mode", [(4, BATCH), (2, RUNNING)])
def test_evaluate_batch_scores_every_step(evaluated, batch, adapt_by_hand, num_steps, bn_mode):
    """More evaluation steps than trained ones reuse the last step's banks and rates."""
    network, learner = evaluated
    result = learner.evaluate_batch(batch, num_steps, bn_mode)
    accuracies, probabilities = result["accuracies"].numpy(), result["probabilities"].numpy()
    assert accuracies.shape == (TASKS, num_steps)
    assert probabilities.shape == (TASKS, 2 * WAY, WAY)
    assert np.all((accuracies >= 0) & (accuracies <= 1))
    np.testing.assert_allclose(probabilities.sum(axis=-1), 1.0, rtol=1e-5)
    labels = batch["target_labels"].numpy()
    np.testing.assert_allclose(accuracies[:, -1],
                               (probabilities.argmax(axis=-1) == labels).mean(axis=-1))
    for task in range(TASKS):
        by_hand = adapt_by_hand(network, batch, task, num_steps, bn_mode)
        np.testing.assert_allclose(probabilities[task],
                                   tf.nn.softmax(by_hand["logits"][0]).numpy(),
                                   rtol=1e-4, atol=1e-5)
