"""Specification of tf_mamlpp.run.trainer: checkpoints, the best-k ensemble test, fail-fast on NaN.

One tiny run is trained in-process for the module (5 epochs of 2 meta-
iterations, 3-way 1-shot, 2 inner steps so that every bank has a step axis),
with the values of every network and optimizer variable recorded at each
epoch's save, so that what is on disk can be checked against what was trained.
"""

import dataclasses
import json
import shutil

import numpy as np
import pytest
import tensorflow as tf

from conftest import run_main
from tf_mamlpp.run import task_streams
from tf_mamlpp.run import config as config_module
from tf_mamlpp.core import evaluation
from tf_mamlpp.run.run_directory import RunDirectory
from tf_mamlpp.run.trainer import NonFiniteLossError, Trainer

pytestmark = pytest.mark.slow
INNER_STEPS = 2
EPOCHS = 5
ITERS_PER_EPOCH = 2


def tiny_config(**overrides):
    values = dict(way=3, shot=1, inner_steps=INNER_STEPS, filters=8, batch_size=2,
                  iters_per_epoch=ITERS_PER_EPOCH, epochs=EPOCHS, msl_epochs=2, val_tasks=8,
                  test_tasks=8, second_order=False, bn_mode="transductive",
                  mixed_precision=False)
    return config_module.resolve("omniglot", **{**values, **overrides})


def skip_export(run_dir):
    """Export is tested in test_export.py; the trainer leaves an empty export folder alone."""
    (run_dir.path / "export").mkdir(exist_ok=True)


def values_of(variables):
    return [np.array(variable.numpy()) for variable in variables]


@dataclasses.dataclass
class TrainedRun:
    trainer: Trainer
    run_dir: RunDirectory
    # epoch -> values at its save, in the order of network.variables / optimizer.variables.
    network_values: dict
    optimizer_values: dict
    initial_network_values: list
    results: dict


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    config = tiny_config()
    run_dir = RunDirectory.open(tmp_path_factory.mktemp("runs"), "run", config)
    skip_export(run_dir)
    trainer = Trainer(config, run_dir)
    initial = values_of(trainer.network.variables)
    network_values, optimizer_values = {}, {}
    save_epoch = run_dir.save_epoch

    def recording_save_epoch(checkpoint, history):
        epoch = history[-1]["epoch"]
        network_values[epoch] = values_of(trainer.network.variables)
        optimizer_values[epoch] = values_of(trainer.optimizer.variables)
        save_epoch(checkpoint, history)

    run_dir.save_epoch = recording_save_epoch
    results = trainer.train()
    return TrainedRun(trainer, run_dir, network_values, optimizer_values, initial, results)


@pytest.fixture(scope="module")
def fresh(trained):
    """A second trainer on the same run, as a new process would build it."""
    return Trainer(trained.trainer.config, RunDirectory.existing(
        trained.run_dir.path.parent, trained.run_dir.path.name))


def scramble(variables):
    """Sets every variable to values no checkpoint holds, so a restore must overwrite them."""
    for variable in variables:
        variable.assign(tf.fill(variable.shape, tf.cast(-7, variable.dtype)))


def latest_checkpoint(run_dir):
    return tf.train.latest_checkpoint(run_dir.path / "checkpoints" / "latest")


def checkpoint_key(network, variable):
    """Where tf.train.Checkpoint(network=...) stores `variable` (see network.py)."""
    name = variable.path.removeprefix(network.name + "/")
    return f"network/{name}/.ATTRIBUTES/VARIABLE_VALUE"


def test_training_moved_every_kind_of_variable(trained):
    """Else the checkpoint checks below could pass on untrained values."""
    network = trained.trainer.network
    final = trained.network_values[EPOCHS]
    for variable, before, after in zip(network.variables, trained.initial_network_values, final):
        assert not np.array_equal(before, after), variable.path
    assert network.norm0.moving_mean.shape == (INNER_STEPS + 1, 8)  # one row per weight state
    assert network.conv0_inner_rate.shape == (INNER_STEPS,)


def test_latest_checkpoint_holds_every_network_variable(trained):
    network = trained.trainer.network
    latest = latest_checkpoint(trained.run_dir)
    assert latest.endswith(f"ckpt-{EPOCHS * ITERS_PER_EPOCH}")
    listed = dict(tf.train.list_variables(latest))
    names = [checkpoint_key(network, variable) for variable in network.variables]
    # Conv kernels, head, BN gamma/beta/moving statistics, LSLR rates: all 27.
    assert len(names) == 4 * 1 + 2 + 4 * 4 + 5
    for variable, name, value in zip(network.variables, names, trained.network_values[EPOCHS]):
        assert listed.get(name) == list(variable.shape), name
        np.testing.assert_array_equal(tf.train.load_variable(latest, name), value, err_msg=name)


def test_restoring_into_a_fresh_trainer_gives_the_trained_state(trained, fresh):
    scramble(fresh.network.variables)
    scramble(fresh.optimizer.variables)
    assert fresh.run_dir.restore_latest(fresh.checkpoint)
    for variable, value in zip(fresh.network.variables, trained.network_values[EPOCHS]):
        np.testing.assert_array_equal(variable.numpy(), value, err_msg=variable.path)
    # The iteration counter (the run's position) and Adam's two slots per variable.
    assert fresh.iterations_done == EPOCHS * ITERS_PER_EPOCH
    assert len(fresh.optimizer.variables) == 1 + 2 * len(fresh.network.trainable_variables)
    for variable, value in zip(fresh.optimizer.variables, trained.optimizer_values[EPOCHS]):
        np.testing.assert_array_equal(variable.numpy(), value, err_msg=variable.path)
    # The meta-learning rate follows from the counter: CA continues where it was.
    np.testing.assert_allclose(float(fresh.optimizer.learning_rate),
                               float(trained.trainer.optimizer.learning_rate), rtol=1e-6)


def best_by_history(history, k):
    """Epochs of the k best validation accuracies; ties go to the earlier epoch."""
    ranked = sorted(history, key=lambda record: (-record["val_accuracy"], record["epoch"]))
    return [record["epoch"] for record in ranked[:k]]


def test_exactly_the_three_best_epochs_are_kept(trained):
    history = trained.run_dir.read_history()
    assert [record["epoch"] for record in history] == list(range(1, EPOCHS + 1))
    best = trained.run_dir.best_checkpoints()
    assert [epoch for _, epoch, _ in best] == best_by_history(history, 3)
    assert [accuracy for accuracy, _, _ in best] == [
        history[epoch - 1]["val_accuracy"] for _, epoch, _ in best]
    on_disk = sorted(path.name for path in (trained.run_dir.path / "checkpoints" / "best")
                     .glob("*.index"))
    assert on_disk == sorted(f"epoch_{epoch:04d}.index" for _, epoch, _ in best)


def test_each_kept_checkpoint_holds_its_epochs_weights(trained, fresh):
    for _, epoch, prefix in trained.run_dir.best_checkpoints():
        scramble(fresh.network.variables)
        tf.train.Checkpoint(network=fresh.network).read(
            trained.run_dir.checkpoint_path(prefix)).assert_existing_objects_matched()
        for variable, value in zip(fresh.network.variables, trained.network_values[epoch]):
            np.testing.assert_array_equal(variable.numpy(), value,
                                          err_msg=f"epoch {epoch} {variable.path}")


def test_results_record_each_kept_model_and_the_ensemble(trained):
    results = json.loads((trained.run_dir.path / "results.json").read_text())
    assert results == trained.results
    best = trained.run_dir.best_checkpoints()
    assert [model["epoch"] for model in results["models"]] == [epoch for _, epoch, _ in best]
    assert [model["val_accuracy"] for model in results["models"]] == [a for a, _, _ in best]
    assert results["test_tasks"] == 8
    assert results["test_seed"] == task_streams.stream_seed(trained.trainer.config, "test")
    assert results["test_seed"] not in (task_streams.stream_seed(trained.trainer.config, "train"),
                                        task_streams.stream_seed(trained.trainer.config, "val"))
    assert results["confidence"] == 0.95
    assert results["inner_steps"] == INNER_STEPS
    assert results["bn_mode"] == "transductive"


def test_ensemble_is_the_mean_of_the_kept_models_probabilities(trained, fresh):
    """Recomputed here: each kept model on the fixed test tasks, then numpy."""
    config = trained.trainer.config
    results = trained.results
    probabilities, labels = [], None
    for (_, epoch, prefix), model in zip(trained.run_dir.best_checkpoints(), results["models"]):
        tf.train.Checkpoint(network=fresh.network).read(
            trained.run_dir.checkpoint_path(prefix)).expect_partial()
        outcome = evaluation.evaluate(
            fresh.meta_learner, task_streams.evaluation_tasks(config, fresh.splits["test"], "test", 8),
            INNER_STEPS, "transductive")
        assert outcome["probabilities"].shape == (8, 3, 3)
        np.testing.assert_allclose(outcome["probabilities"].sum(-1), 1.0, rtol=1e-5)
        if labels is not None:
            np.testing.assert_array_equal(outcome["labels"], labels)  # the same tasks
        labels = outcome["labels"]
        alone = (outcome["probabilities"].argmax(-1) == labels).mean(-1)
        assert model["test_accuracy"] == pytest.approx(alone.mean(), abs=1e-7)
        probabilities.append(outcome["probabilities"])
    per_task = (np.mean(probabilities, axis=0).argmax(-1) == labels).mean(-1)  # (tasks,)
    assert results["test_accuracy"] == pytest.approx(per_task.mean(), abs=1e-7)
    assert results["test_interval"] == pytest.approx(
        1.96 * per_task.std() / np.sqrt(len(per_task)), abs=1e-7)
    np.testing.assert_allclose(evaluation.ensemble_accuracies(probabilities, labels), per_task)


def test_mode_test_on_the_run_reproduces_its_results(trained):
    before = json.loads((trained.run_dir.path / "results.json").read_text())
    completed = run_main("--mode=test", f"--logdir={trained.run_dir.path.parent}",
                         f"--experiment={trained.run_dir.path.name}")
    assert completed.returncode == 0, completed.stderr[-3000:]
    after = json.loads((trained.run_dir.path / "results.json").read_text())
    assert [model["epoch"] for model in after["models"]] == [m["epoch"] for m in before["models"]]
    for key in ("test_accuracy", "test_interval"):
        assert after[key] == pytest.approx(before[key], abs=1e-9)
    for old, new in zip(before["models"], after["models"]):
        assert new == pytest.approx(old, abs=1e-9)
    assert f"{100 * before['test_accuracy']:.2f}%" in completed.stdout
    assert "ensemble of 3 checkpoints" in completed.stdout


def test_a_moved_run_directory_still_tests_its_own_checkpoints(trained, tmp_path):
    """A run copied elsewhere (another disk, another machine), its old place gone."""
    original = trained.run_dir.path
    shutil.copytree(original, tmp_path / "run")
    away = original.with_name("run-moved-away")
    original.rename(away)
    try:
        moved = Trainer(trained.trainer.config, RunDirectory.existing(tmp_path, "run"))
        results = moved.test()
    finally:
        away.rename(original)
    assert results["test_accuracy"] == pytest.approx(trained.results["test_accuracy"], abs=1e-9)


def test_nan_loss_stops_naming_epoch_and_iteration_and_keeps_the_last_checkpoint(tmp_path):
    config = tiny_config(epochs=2)
    run_dir = RunDirectory.open(tmp_path, "run", config)
    trainer = Trainer(config, run_dir)
    meta_update = trainer.meta_learner.meta_update
    calls = []

    def nan_on_the_third_call(*args):
        figures = meta_update(*args)
        calls.append(None)
        if len(calls) == 3:
            figures = {**figures, "loss": tf.constant(float("nan"))}
        return figures

    trainer.meta_learner.meta_update = nan_on_the_third_call
    with pytest.raises(NonFiniteLossError, match=r"loss became nan at epoch 2, iteration 1\b"):
        trainer.train()
    assert [record["epoch"] for record in run_dir.read_history()] == [1]
    assert not (run_dir.path / "results.json").exists()
    reopened = Trainer(config, RunDirectory.existing(tmp_path, "run"))
    assert reopened.run_dir.restore_latest(reopened.checkpoint)
    assert reopened.iterations_done == ITERS_PER_EPOCH
    for variable in reopened.network.variables:
        assert np.isfinite(variable.numpy()).all(), variable.path


def checkpointed_kernel(path):
    return tf.train.load_variable(path, "network/conv0_kernel/.ATTRIBUTES/VARIABLE_VALUE")


def exported_kernel(export_dir):
    (kernel,) = [variable for variable in tf.saved_model.load(str(export_dir)).variables
                 if variable.name.endswith("conv0_kernel:0")]
    return kernel.numpy()


def test_a_run_trained_further_exports_its_new_best(trained, tmp_path):
    """More --epochs for a finished run: its export follows the best checkpoint, whichever."""
    shutil.copytree(trained.run_dir.path, tmp_path / "run")
    finished = Trainer(trained.trainer.config, RunDirectory.existing(tmp_path, "run"))
    export = finished.export_best(tmp_path / "run" / "export", replace=True)
    before = exported_kernel(export)
    longer = dataclasses.replace(trained.trainer.config, epochs=EPOCHS + 1)
    trainer = Trainer(longer, RunDirectory.open(tmp_path, "run", longer))
    validate = trainer.scoring.validate

    def the_new_epoch_validates_best(epoch):
        record = validate(epoch)
        return {**record, "val_accuracy": 2.0} if epoch == EPOCHS else record

    trainer.scoring.validate = the_new_epoch_validates_best
    trainer.train()
    (_, epoch, prefix), *_ = trainer.run_dir.best_checkpoints()
    assert epoch == EPOCHS + 1
    after = exported_kernel(export)
    np.testing.assert_array_equal(after, checkpointed_kernel(trainer.run_dir.checkpoint_path(prefix)))
    assert not np.array_equal(after, before)
    assert sorted(path.name for path in (tmp_path / "run").iterdir()
                  if path.name.startswith(".export")) == []
