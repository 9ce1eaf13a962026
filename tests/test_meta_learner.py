"""Specification of tf_mamlpp.core.meta_learner: the MAML++ meta-update and evaluation step.

Each MAML++ technique is checked for its wiring: MSL (the per-step loss
weights reach the outer loss), DA (the derivative order reaches the inner
loop), BNRS/BNWB (the per-state banks are updated and trained, row s for
weight state s), LSLR (the rates are trained, or left alone when switched
off); every batch-norm mode trains every meta-parameter (TaskNorm's blend
weights too); evaluation takes batches of any number of tasks; and the
meta-step is traced once per combination of Python switches, not per call.

A network adapted for S = STEPS inner steps passes through S + 1 weight
states; the target set after step k is scored at state k + 1.

Multi-task gradients go through `_task_by_task` (one task at a time), which
runs everywhere; folding the tasks into grouped convolutions needs their
gradients (`grouped_convolution_gradients()`), and where TensorFlow lacks them
(a CPU without AVX-512) `fold_tasks=True` must be refused with a clear error.
"""

import keras
import numpy as np
import pytest
import tensorflow as tf

from conftest import lacks_grouped_convolution_gradients, needs_grouped_convolution_gradients
from tf_mamlpp.core.batch_norm_modes import (BN_MODES, DIRECT_ALPHA, PER_STEP_ALPHA, RUNNING,
                                             SUPPORT, TASK_NORM, TRANSDUCTIVE)
from tf_mamlpp.core.inner_loop import adapt_and_evaluate
from tf_mamlpp.core.meta_learner import MetaLearner
from tf_mamlpp.core.network import MamlppNetwork
from tf_mamlpp.core.schedules import Phase

WAY, IMAGE_SHAPE, STEPS, TASKS = 2, (4, 4, 1), 2, 2
STATES = STEPS + 1
MSL_WEIGHTS = [0.4, 0.6]
MOMENTUM = 0.1


def tiny_network(seed=0, **kwargs):
    keras.utils.set_random_seed(seed)
    return MamlppNetwork(way=WAY, image_shape=IMAGE_SHAPE, inner_steps=STEPS, filters=2,
                         num_stages=1, bn_momentum=MOMENTUM, **kwargs)


def meta_learner(network, **kwargs):
    return MetaLearner(network, keras.optimizers.Adam(1e-2), **kwargs)


@pytest.fixture(scope="module")
def batch(make_tasks):
    return make_tasks(TASKS, WAY, shot=2, query=2, image_shape=IMAGE_SHAPE)


def values(variables):
    return {v.path: v.numpy().copy() for v in variables}


def name_of(variable):
    return variable.path.split("/", 1)[1]


def task_slice(tasks, start, stop):
    return {key: value[start:stop] for key, value in tasks.items()}


def task_gradients(learner, batch, second_order, multi_step, msl_weights=MSL_WEIGHTS):
    """{path: gradient summed over the tasks} from one eager meta-gradient computation."""
    sums = learner._task_by_task(
        batch, Phase(tf.constant(msl_weights, tf.float32), multi_step, second_order))
    return {v.path: g.numpy() for v, g in zip(learner.network.trainable_variables,
                                              sums["gradients"])}


def rows(array):
    """The entries that must each move on their own: rows of a bank, entries of rates."""
    return list(array) if array.ndim in (1, 2) else [array]


def per_task_reference(network, batch, target_steps):
    """`adapt_and_evaluate` one task at a time, its losses and accuracies stacked over tasks."""
    results = [adapt_and_evaluate(network, task_slice(batch, t, t + 1), STEPS, False,
                                  target_steps, network.bn_mode)
               for t in range(batch["support_images"].shape[0])]
    return {name: np.concatenate([r[name].numpy() for r in results])
            for name in ("target_losses", "target_accuracies")}


def support_statistics_by_hand(network, batch, adapt_by_hand):
    """(states, filters) means and biased variances of the first stage's support activations.

    The weights of each state come from conftest's hand-written adaptation; the
    statistics are those of the convolution's output (what the first batch
    norm normalises), computed here with numpy, averaged over the tasks.
    """
    means, variances = [], []
    for task in range(batch["support_images"].shape[0]):
        record = adapt_by_hand(network, batch, task, STEPS, network.bn_mode)
        activations = [tf.nn.conv2d(batch["support_images"][task],
                                    record["weights"][state]["conv0/kernel"][0], 1,
                                    "SAME").numpy().astype(np.float64)
                       for state in range(STATES)]
        means.append([a.mean(axis=(0, 1, 2)) for a in activations])
        variances.append([a.var(axis=(0, 1, 2)) for a in activations])  # ddof=0: biased
    return np.mean(means, axis=0), np.mean(variances, axis=0)


def randomise_banks(network, seed=0):
    """Distinct values in every bank row, so that reading or writing a wrong row shows."""
    rng = np.random.default_rng(seed)
    for norm in network.norms:
        norm.moving_mean.assign(rng.uniform(-0.2, 0.2, norm.moving_mean.shape))
        norm.moving_variance.assign(rng.uniform(0.5, 1.5, norm.moving_variance.shape))
        norm.gamma.assign(rng.uniform(0.5, 1.5, norm.gamma.shape))
        norm.beta.assign(rng.uniform(-0.3, 0.3, norm.beta.shape))
        if norm.task_norm:
            norm.blend_scale.assign(0.3)
            norm.blend_offset.assign(-0.5)


@pytest.mark.parametrize("second_order", [True, False])
def test_every_trainable_variable_gets_a_meta_gradient_under_msl(batch, second_order):
    """Every row of the per-state affine banks and every step's rate is trained.

    Weight state 0 is normalised only in step 0's support pass (no target set
    is scored before a step), so under first order, which stops the inner
    gradient, affine row 0 gets exactly no meta-gradient; under second order
    it shapes step 0's inner gradient.
    """
    learner = meta_learner(tiny_network())
    gradients = task_gradients(learner, batch, second_order, multi_step=True)
    network = learner.network
    norm = network.norms[0]
    assert set(gradients) == {v.path for v in network.trainable_variables}
    assert {norm.gamma.path, norm.beta.path, network.inner_rates["conv0"].path,
            network.inner_rates["head"].path} <= set(gradients)
    assert norm.gamma.shape == (STATES, 2)
    for path, gradient in gradients.items():
        for index, row in enumerate(rows(gradient)):
            if not second_order and path in (norm.gamma.path, norm.beta.path) and index == 0:
                assert np.all(row == 0), path
            else:
                assert np.abs(row).max() > 1e-6, (path, index)


@pytest.mark.parametrize("alpha, rows", [(DIRECT_ALPHA, 1), (PER_STEP_ALPHA, STATES)])
def test_every_row_of_a_learned_alpha_gets_a_meta_gradient(batch, alpha, rows):
    """TaskNorm's direct alpha, and under second order each weight state's own (per_step)."""
    network = tiny_network(bn_mode=TASK_NORM, task_norm_alpha=alpha)
    gradients = task_gradients(meta_learner(network), batch, True, multi_step=True)
    logit = network.norms[0].blend_logit
    assert tuple(logit.shape) == (rows,)
    assert np.abs(gradients[logit.path]).min() > 1e-6, gradients[logit.path]


@pytest.fixture(scope="module")
def one_step(batch):
    """One second-order, multi-step meta-update, with everything needed to check it."""
    network = tiny_network()
    learner = meta_learner(network)
    weights = tf.constant(MSL_WEIGHTS)
    reference = per_task_reference(network, batch, [0, 1])
    gradients = task_gradients(learner, batch, True, True)
    before = values(network.variables)
    measurements = learner.meta_update(batch, Phase(weights, True, True))
    return {"network": network, "learner": learner, "reference": reference,
            "gradients": gradients, "before": before, "after": values(network.variables),
            "measurements": {name: float(value) for name, value in measurements.items()}}


@pytest.mark.slow
def test_meta_update_applies_the_meta_gradient(one_step):
    """The first Adam step moves each entry by about the rate, against its gradient's sign."""
    network, before, after = one_step["network"], one_step["before"], one_step["after"]
    for variable in network.trainable_variables:
        gradient = one_step["gradients"][variable.path]
        moved = after[variable.path] - before[variable.path]
        large = np.abs(gradient) > 1e-4
        assert large.any(), variable.path
        np.testing.assert_allclose(moved[large], -1e-2 * np.sign(gradient[large]), rtol=0.05,
                                   err_msg=variable.path)


@pytest.mark.parametrize("bn_mode", BN_MODES)
@pytest.mark.slow
def test_a_meta_update_gives_every_trainable_variable_a_meta_gradient_in_every_mode(
        batch, bn_mode):
    """Under second order every row of every trainable variable moves (Adam's first
    step moves an entry only where its gradient is non-zero); TaskNorm's blend
    weights exist, and are trained, in the task_norm mode only."""
    network = tiny_network(bn_mode=bn_mode)
    learner = meta_learner(network)
    names = {name_of(v) for v in network.trainable_variables}
    blend = {"blend_scale", "blend_offset"}
    assert (blend <= names) if bn_mode == TASK_NORM else not blend & names
    before = values(network.trainable_variables)
    measurements = learner.meta_update(batch, Phase(tf.constant(MSL_WEIGHTS), True, True))
    assert float(measurements["gradient_norm"]) > 0
    for variable in network.trainable_variables:
        for index, (old, new) in enumerate(zip(rows(before[variable.path]),
                                               rows(variable.numpy()))):
            assert np.abs(new - old).max() > 1e-3, (variable.path, index)


@pytest.mark.parametrize("bn_mode, filled", [(TRANSDUCTIVE, STEPS), (SUPPORT, STATES),
                                             (TASK_NORM, STATES), (RUNNING, STATES)])
@pytest.mark.slow
def test_meta_update_folds_each_states_support_statistics_into_its_bank_row(
        batch, adapt_by_hand, bn_mode, filled):
    """BNRS: bank row s moves towards the support statistics at weight state s.

    The transductive mode passes the support set only through states
    0..S-1 (the steps' passes), so row S keeps its value; the running mode
    (which reads row S for the adapted weights' target pass) and the modes
    that normalise the target by the support statistics pass it once more
    through the adapted weights and fill rows 0..S.
    """
    network = tiny_network(bn_mode=bn_mode)
    randomise_banks(network)
    norm = network.norms[0]
    old_mean, old_variance = norm.moving_mean.numpy(), norm.moving_variance.numpy()
    means, variances = support_statistics_by_hand(network, batch, adapt_by_hand)
    # Each state's statistics differ, so a shifted row would show.
    assert np.abs(np.diff(means, axis=0)).min() > 1e-4
    meta_learner(network).meta_update(batch, Phase(tf.constant(MSL_WEIGHTS), True, False))
    new_mean, new_variance = norm.moving_mean.numpy(), norm.moving_variance.numpy()
    # The statistics each row was moved towards.
    towards_mean = (new_mean - (1 - MOMENTUM) * old_mean) / MOMENTUM
    towards_variance = (new_variance - (1 - MOMENTUM) * old_variance) / MOMENTUM
    np.testing.assert_allclose(towards_mean[:filled], means[:filled], rtol=2e-3, atol=1e-4)
    # Biased variances: the unbiased ones are 64/63 larger here.
    np.testing.assert_allclose(towards_variance[:filled], variances[:filled], rtol=2e-3)
    np.testing.assert_array_equal(new_mean[filled:], old_mean[filled:])
    np.testing.assert_array_equal(new_variance[filled:], old_variance[filled:])


@pytest.mark.slow
def test_meta_update_measurements_are_means_over_the_tasks(one_step):
    measurements, reference = one_step["measurements"], one_step["reference"]
    losses = reference["target_losses"]  # (tasks, steps)
    assert measurements["loss"] == pytest.approx((losses @ MSL_WEIGHTS).mean(), rel=1e-4)
    for step in range(STEPS):
        assert measurements[f"target_loss_step_{step}"] == pytest.approx(
            losses[:, step].mean(), rel=1e-4)
    assert not np.allclose(losses[:, 0], losses[:, 1])
    assert measurements["accuracy"] == pytest.approx(
        reference["target_accuracies"][:, -1].mean())
    mean_gradient_norm = np.sqrt(sum(np.sum((g / TASKS) ** 2)
                                     for g in one_step["gradients"].values()))
    assert measurements["gradient_norm"] == pytest.approx(mean_gradient_norm, rel=1e-4)
    assert measurements["update_norm"] > 0
    assert np.isfinite(measurements["parameter_norm"])


def test_switched_off_techniques_remove_exactly_their_variables():
    full = tiny_network()
    shapes = lambda variables: {name_of(v): tuple(v.shape) for v in variables}
    full_trainable = shapes(full.trainable_variables)
    full_banks = shapes(full.non_trainable_variables)
    rates = {name for name in full_trainable if name.endswith("_inner_rate")}
    assert len(rates) == 2
    assert {full_trainable[name] for name in rates} == {(STEPS,)}
    assert full_trainable["gamma"] == full_trainable["beta"] == (STATES, 2)
    no_lslr = tiny_network(lslr=False)
    assert shapes(no_lslr.trainable_variables) == {
        name: shape for name, shape in full_trainable.items() if name not in rates}
    assert shapes(no_lslr.non_trainable_variables) == {
        **full_banks, **{name: full_trainable[name] for name in rates}}
    no_bnwb = tiny_network(bnwb=False)
    assert shapes(no_bnwb.trainable_variables) == {
        **full_trainable, "gamma": (1, 2), "beta": (1, 2)}
    assert shapes(no_bnwb.non_trainable_variables) == full_banks
    no_bnrs = tiny_network(bnrs=False)
    assert shapes(no_bnrs.trainable_variables) == full_trainable
    assert shapes(no_bnrs.non_trainable_variables) == {"moving_mean": (1, 2),
                                                       "moving_variance": (1, 2)}
    assert full_banks == {"moving_mean": (STATES, 2), "moving_variance": (STATES, 2)}
    # TaskNorm adds its two blend weights and nothing else.
    task_norm = tiny_network(bn_mode=TASK_NORM)
    assert shapes(task_norm.trainable_variables) == {
        **full_trainable, "blend_scale": (), "blend_offset": ()}
    assert shapes(task_norm.non_trainable_variables) == full_banks


@pytest.mark.parametrize("bn_mode, states", [(TRANSDUCTIVE, STEPS), (RUNNING, STATES)])
@pytest.mark.slow
def test_meta_update_without_lslr_bnwb_bnrs(batch, adapt_by_hand, bn_mode, states):
    network = tiny_network(lslr=False, bnwb=False, bnrs=False, inner_lr=0.25, bn_mode=bn_mode)
    learner = meta_learner(network)
    means, variances = support_statistics_by_hand(network, batch, adapt_by_hand)
    before = values(network.variables)
    learner.meta_update(batch, Phase(tf.constant(MSL_WEIGHTS), True, True))
    for rates in network.inner_rates.values():
        np.testing.assert_array_equal(rates.numpy(), [0.25] * STEPS)
    norm = network.norms[0]
    for variable in (norm.gamma, norm.beta, network.fast_variables["conv0/kernel"]):
        assert np.abs(variable.numpy() - before[variable.path]).min() > 1e-4, variable.path
    # One shared running bank, moved towards the statistics averaged over the
    # states the support set passed through.
    mean = means[:states].mean(axis=0, keepdims=True)
    variance = variances[:states].mean(axis=0, keepdims=True)
    other = STATES + STEPS - states  # the other mode's number of states
    assert not np.allclose(mean, means[:other].mean(axis=0, keepdims=True), rtol=1e-3)
    np.testing.assert_allclose(norm.moving_mean.numpy(), MOMENTUM * mean, rtol=2e-3, atol=1e-5)
    np.testing.assert_allclose(norm.moving_variance.numpy(),
                               1 - MOMENTUM + MOMENTUM * variance, rtol=1e-4)


def test_msl_wiring_non_final_banks_learn_only_from_the_multi_step_loss(batch):
    """Under first order, affine row 1 reaches the loss only through the target
    set scored after step 0 (at state 1), which only the multi-step loss counts."""
    learner = meta_learner(tiny_network())
    gamma = learner.network.norms[0].gamma.path
    last_only = task_gradients(learner, batch, second_order=False, multi_step=False)
    assert np.all(last_only[gamma][:2] == 0)
    assert np.abs(last_only[gamma][2]).max() > 1e-6
    every_step = task_gradients(learner, batch, second_order=False, multi_step=True)
    assert np.all(every_step[gamma][0] == 0)
    assert np.abs(every_step[gamma][1]).max() > 1e-6
    # Under second order rows 0 and 1 also shape the inner gradients of steps 0 and 1.
    second_order = task_gradients(learner, batch, second_order=True, multi_step=False)
    assert np.abs(second_order[gamma][0]).max() > 1e-6
    assert np.abs(second_order[gamma][1]).max() > 1e-6


@pytest.mark.slow
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


def test_task_by_task_sums_are_the_single_tasks_steps(batch):
    """`_task_by_task` sums each task's own meta-step and averages its statistics."""
    learner = meta_learner(tiny_network(bn_mode=TRANSDUCTIVE))  # statistics of STEPS states
    weights = tf.constant(MSL_WEIGHTS)
    together = learner._task_by_task(batch, Phase(weights, True, True))
    alone = [learner._tasks_step(task_slice(batch, t, t + 1), Phase(weights, True, True))
             for t in range(TASKS)]
    for name in ("loss", "accuracy", "target_losses"):
        np.testing.assert_allclose(together[name].numpy(),
                                   sum(a[name].numpy() for a in alone), rtol=1e-5,
                                   err_msg=name)
    for index, gradient in enumerate(together["gradients"]):
        np.testing.assert_allclose(gradient.numpy(),
                                   sum(a["gradients"][index].numpy() for a in alone),
                                   rtol=1e-4, atol=1e-6)
    for name in ("bn_means", "bn_variances"):
        for stage, statistics in enumerate(together[name]):
            assert statistics.shape == (STEPS, 2)
            np.testing.assert_allclose(statistics.numpy(),
                                       np.mean([a[name][stage].numpy() for a in alone], axis=0),
                                       rtol=1e-5, atol=1e-6)


@lacks_grouped_convolution_gradients()
def test_where_grouped_convolutions_have_no_gradients_folding_is_refused():
    with pytest.raises(ValueError, match="fold_tasks=True"):
        meta_learner(tiny_network(), fold_tasks=True)


@needs_grouped_convolution_gradients()
def test_folded_and_one_at_a_time_tasks_give_the_same_sums(batch):
    learner = meta_learner(tiny_network(), fold_tasks=True)
    weights = tf.constant(MSL_WEIGHTS)
    folded = learner._tasks_step(batch, Phase(weights, True, True))
    sequential = learner._task_by_task(batch, Phase(weights, True, True))
    for name in ("loss", "accuracy", "target_losses"):
        np.testing.assert_allclose(folded[name].numpy(), sequential[name].numpy(), rtol=1e-5,
                                   err_msg=name)
    for a, b in zip(folded["gradients"], sequential["gradients"]):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-4, atol=1e-6)
    for name in ("bn_means", "bn_variances"):
        for a, b in zip(folded[name], sequential[name]):
            np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("fold_tasks", [
    pytest.param(False, id="task by task"),
    pytest.param(True, id="folded", marks=needs_grouped_convolution_gradients())])
@pytest.mark.slow
def test_the_meta_step_traces_once_per_switch_combination(batch, fold_tasks):
    learner = meta_learner(tiny_network(), fold_tasks=fold_tasks)
    schedule = [[0.5, 0.5], [0.45, 0.55], [0.4, 0.6], [0.5, 0.5], [0.3, 0.7]]
    for weights in schedule:
        learner.meta_update(batch, Phase(tf.constant(weights), True, False))
    assert learner.trace_count == 1
    # DA switches to second order once: one more trace, and another update.
    state = learner.network.variables + learner.optimizer.variables
    saved = [v.numpy() for v in state]
    learner.meta_update(batch, Phase(tf.constant([0.3, 0.7]), True, True))
    assert learner.trace_count == 2
    second_order_update = values(learner.network.trainable_variables)
    for variable, value in zip(state, saved):
        variable.assign(value)
    learner.meta_update(batch, Phase(tf.constant([0.3, 0.7]), True, False))
    first_order_update = values(learner.network.trainable_variables)
    kernel = learner.network.fast_variables["conv0/kernel"].path
    assert np.abs(second_order_update[kernel] - first_order_update[kernel]).max() > 1e-5
    for weights in schedule:
        learner.meta_update(batch, Phase(tf.constant(weights), True, True))
    assert learner.trace_count == 2


def evaluation_learner(bn_mode, seed=3):
    """A learner whose network has distinct values in every bank row and blend weight."""
    network = tiny_network(seed=seed, bn_mode=bn_mode)
    randomise_banks(network, seed)
    return network, meta_learner(network)


@pytest.mark.parametrize("num_steps, trained_mode, bn_mode", [
    (4, TRANSDUCTIVE, TRANSDUCTIVE), (2, TRANSDUCTIVE, SUPPORT), (2, TRANSDUCTIVE, RUNNING),
    (2, SUPPORT, SUPPORT), (3, TASK_NORM, TASK_NORM), (4, RUNNING, RUNNING)])
@pytest.mark.slow
def test_evaluate_batch_scores_every_step(batch, adapt_by_hand, num_steps, trained_mode,
                                          bn_mode):
    """Evaluation adapts as the hand-written loop does, in the mode it is asked for
    (a transductive network is served in another); more evaluation steps than
    trained ones reuse the last state's banks and the last step's rates."""
    network, learner = evaluation_learner(trained_mode)
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


@pytest.mark.parametrize("bn_mode", BN_MODES)
@pytest.mark.slow
def test_evaluate_batch_takes_any_number_of_tasks(batch, make_tasks, bn_mode):
    """After training on batches of TASKS tasks, batches of 5, 3, 1 and 2 tasks
    are evaluated, and each task gets the results it gets in the batch of 5."""
    network, learner = evaluation_learner(bn_mode)
    learner.meta_update(batch, Phase(tf.constant(MSL_WEIGHTS), True, False))
    tasks = make_tasks(5, WAY, shot=2, query=3, image_shape=IMAGE_SHAPE, seed=7)
    full = {name: value.numpy() for name, value in
            learner.evaluate_batch(tasks, STEPS, bn_mode).items()}
    assert full["accuracies"].shape == (5, STEPS)
    assert full["probabilities"].shape == (5, 3 * WAY, WAY)
    # The tasks' answers differ, so one task's answer given for another would show.
    for task in range(1, 5):
        assert not np.allclose(full["probabilities"][task], full["probabilities"][0],
                               atol=1e-3)
    for start, stop in [(0, 3), (3, 4), (1, 3), (4, 5), (0, 1)]:
        part = learner.evaluate_batch(task_slice(tasks, start, stop), STEPS, bn_mode)
        assert part["accuracies"].shape == (stop - start, STEPS)
        np.testing.assert_allclose(part["accuracies"].numpy(), full["accuracies"][start:stop],
                                   atol=1e-6, err_msg=f"tasks {start}:{stop}")
        np.testing.assert_allclose(part["probabilities"].numpy(),
                                   full["probabilities"][start:stop], rtol=1e-5, atol=1e-6,
                                   err_msg=f"tasks {start}:{stop}")
