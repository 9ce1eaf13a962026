"""Specification of what a run writes for TensorBoard, read back with TensorBoard's reader.

The session's tiny run through main.py (conftest.TINY_RUN), every schedule
changing within it: MSL over the first 2 epochs, first order for 1 epoch then
second order (DA), cosine-annealed meta-learning rate (CA). TF2 summaries are
stored as tensors; each tag is read as {step: value}.
"""

import json
import math
import re

import numpy as np
import pytest
from conftest import TINY_RUN, scalars, tensorboard_events
from tf_mamlpp.core.batch_norm_modes import DEFAULT_MODE, evaluation_modes

pytestmark = pytest.mark.slow

EPOCHS, ITERS, STEPS = (TINY_RUN[name] for name in ("epochs", "iters_per_epoch", "inner_steps"))
LAYERS = ["conv0", "conv1", "conv2", "conv3", "head"]
META_LR, MIN_META_LR, INNER_LR = (TINY_RUN[name] for name in ("meta_lr", "min_meta_lr",
                                                              "inner_lr"))
EPOCH_STARTS = [epoch * ITERS for epoch in range(EPOCHS)]  # steps of once-an-epoch figures
ITERATIONS = list(range(1, EPOCHS * ITERS + 1))  # steps of per-iteration figures
EPOCH_ENDS = [(epoch + 1) * ITERS for epoch in range(EPOCHS)]  # steps of validation figures
# The tiny run's batch-norm modes (the default): as trained, and as exported where it
# differs. A transductive run's two are test_main.py's.
MODES = evaluation_modes(DEFAULT_MODE)


@pytest.fixture(scope="module")
def events(tiny_run):
    return tensorboard_events(tiny_run.path)


def test_training_loss_and_accuracy_every_iteration(events):
    loss = scalars(events, "train/loss")
    assert list(loss) == ITERATIONS
    assert all(math.isfinite(value) and value > 0 for value in loss.values())
    accuracy = scalars(events, "train/accuracy")
    assert list(accuracy) == ITERATIONS
    assert all(0.0 <= value <= 1.0 for value in accuracy.values())


def test_per_step_target_losses_during_msl_epochs_weighted_into_the_loss(events):
    """While MSL is on (epochs 1-2) the loss is the MSL-weighted sum of the step losses."""
    loss = scalars(events, "train/loss")
    per_step = [scalars(events, f"train/target_loss_step_{step}") for step in range(STEPS)]
    weights = [scalars(events, f"schedule/msl_weight_step_{step}") for step in range(STEPS)]
    msl_iterations = ITERATIONS[:2 * ITERS]
    for losses in per_step:
        assert list(losses) == msl_iterations
        assert all(math.isfinite(value) and value > 0 for value in losses.values())
    for iteration in msl_iterations:
        epoch_start = (iteration - 1) // ITERS * ITERS
        weighted = sum(w[epoch_start] * losses[iteration] for w, losses in zip(weights, per_step))
        assert loss[iteration] == pytest.approx(weighted, rel=1e-5)


def test_health_figures_every_iteration(events):
    for name in ("gradient_norm", "parameter_norm", "update_norm", "seconds_per_iteration"):
        values = scalars(events, f"train/{name}")
        assert list(values) == ITERATIONS, name
        assert all(math.isfinite(value) and value > 0 for value in values.values()), name


def test_meta_learning_rate_follows_the_cosine_schedule(events):
    rates = scalars(events, "schedule/meta_learning_rate")
    assert list(rates) == ITERATIONS
    total = EPOCHS * ITERS
    for step, rate in rates.items():
        cosine = 0.5 * (1 + math.cos(math.pi * step / total))
        expected = MIN_META_LR + (META_LR - MIN_META_LR) * cosine
        assert rate == pytest.approx(expected, rel=1e-5), step
    assert all(later < earlier for earlier, later in zip(rates.values(), list(rates.values())[1:]))


def test_derivative_order_switches_to_second_after_the_first_epoch(events):
    assert scalars(events, "schedule/second_order") == dict(zip(EPOCH_STARTS, [0.0, 1.0, 1.0]))


def test_msl_weights_each_epoch_sum_to_one_and_shift_to_the_last_step(events):
    weights = [scalars(events, f"schedule/msl_weight_step_{step}") for step in range(STEPS)]
    for start in EPOCH_STARTS:
        assert sum(w[start] for w in weights) == pytest.approx(1.0, abs=1e-6)
    # Uniform at first; each epoch the first step loses 1/(steps * msl_epochs), down
    # to the floor of 0.03/steps; the last step gains what it loses.
    assert [weights[0][start] for start in EPOCH_STARTS] == pytest.approx([0.5, 0.25, 0.015])


def test_learned_inner_rates_of_every_layer_and_step_each_epoch(events):
    for layer in LAYERS:
        for step in range(STEPS):
            rates = scalars(events, f"lslr/{layer}_step_{step}")
            assert list(rates) == EPOCH_STARTS
            assert rates[0] == pytest.approx(INNER_LR)  # the configured start
            assert all(math.isfinite(value) for value in rates.values())
    # LSLR learns: after two epochs some rate has moved.
    assert any(scalars(events, f"lslr/{layer}_step_{step}")[EPOCH_STARTS[-1]] != INNER_LR
               for layer in LAYERS for step in range(STEPS))


@pytest.mark.parametrize("mode", MODES)
def test_validation_accuracy_and_interval_each_epoch_as_trained_and_as_exported(
        events, tiny_run, mode):
    accuracy = scalars(events, f"val_{mode}/accuracy")
    interval = scalars(events, f"val_{mode}/interval")
    assert list(accuracy) == list(interval) == EPOCH_ENDS
    assert all(0.0 <= value <= 1.0 for value in accuracy.values())
    assert all(0.0 <= value < 1.0 for value in interval.values())
    for step in range(STEPS):
        after = scalars(events, f"val_{mode}/accuracy_after_step_{step}")
        assert list(after) == EPOCH_ENDS
    history = json.loads((tiny_run.path / "history.json").read_text())
    np.testing.assert_allclose([record[f"val_accuracy_{mode}"] for record in history],
                               list(accuracy.values()), rtol=1e-6)


def histogram_tags(events):
    return [tag for tag, plugin in events["plugins"].items() if plugin == "histograms"]


@pytest.mark.parametrize("weight", [f"conv{i}_kernel" for i in range(4)]
                         + ["head_kernel", "head_bias"]
                         + [f"norm{i}/{name}" for i in range(4) for name in ("gamma", "beta")])
def test_weight_histograms_each_epoch(events, weight):
    tags = [tag for tag in histogram_tags(events) if tag.endswith(weight)]
    assert len(tags) == 1, f"no single histogram of {weight}: {histogram_tags(events)}"
    assert sorted(events["tensors"][tags[0]]) == EPOCH_STARTS


@pytest.mark.parametrize("stage", range(4))
@pytest.mark.parametrize("statistic", ["moving_mean", "moving_variance"])
def test_per_step_batch_norm_statistics_histograms_each_epoch(events, stage, statistic):
    """One histogram per inner step of each stage's running statistics (BNRS)."""
    for step in range(STEPS):
        pattern = re.compile(rf"norm{stage}\b.*{statistic}.*step_{step}\b")
        tags = [tag for tag in histogram_tags(events) if pattern.search(tag)]
        assert len(tags) == 1, f"no single histogram of norm{stage} {statistic} step {step}"
        assert sorted(events["tensors"][tags[0]]) == EPOCH_STARTS


def test_resolved_configuration_as_text(events, tiny_run):
    texts = {tag: values for tag, values in events["tensors"].items()
             if events["plugins"][tag] == "text" and "config" in tag}
    assert texts, f"no text summary of the configuration; tags: {sorted(events['tensors'])}"
    (values,) = texts.values()
    text = values[min(values)].item().decode()
    saved = json.loads((tiny_run.path / "config.json").read_text())
    body = text.strip().strip("`").strip()
    assert json.loads(body) == saved


def test_progress_off_a_terminal_is_plain_lines(tiny_run):
    stderr = tiny_run.process.stderr
    assert "\r" not in stderr
    lines = stderr.splitlines()
    for epoch in range(1, EPOCHS + 1):
        assert any(line.startswith(f"epoch {epoch}/{EPOCHS} {ITERS}/{ITERS} ") for line in lines)
    tasks = TINY_RUN["test_tasks"]
    assert any(line.startswith(f"test tasks ({DEFAULT_MODE} batch norm) {tasks}/{tasks} ")
               for line in lines)


@pytest.mark.parametrize("mode", MODES)
def test_ensemble_test_accuracy_as_trained_and_as_exported(events, tiny_run, mode):
    results = json.loads((tiny_run.path / "results.json").read_text())
    expected = results if mode == results["bn_mode"] else results["serving"]
    assert expected["bn_mode"] == mode
    (accuracy,) = scalars(events, f"test_{mode}/ensemble_accuracy").values()
    assert accuracy == pytest.approx(expected["test_accuracy"], rel=1e-6)
