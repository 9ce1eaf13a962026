"""Specification of tf_mamlpp.run.run_directory: a run's files, resumable and never clobbered."""

import dataclasses
import json
import os
import stat

import numpy as np
import pytest
import tensorflow as tf

from tf_mamlpp.run.config import ExperimentConfig, resolve
from tf_mamlpp.run.run_directory import RunDirectory, RunDirectoryError


@pytest.fixture
def config():
    return resolve("omniglot", way=5, shot=1, epochs=10)


ITERATIONS_PER_EPOCH = 10


def make_checkpoint():
    """A small checkpoint like the trainer's: some weights and a position counter."""
    return tf.train.Checkpoint(
        weights=tf.Variable(np.zeros(3, np.float32)),
        epoch=tf.Variable(0, dtype=tf.int64, trainable=False))


def run_epoch(run, checkpoint, history, epoch, val_accuracy):
    """What the trainer does at the end of `epoch` (from 1): save, validate, record."""
    checkpoint.weights.assign(np.full(3, epoch, np.float32))
    checkpoint.epoch.assign(epoch)
    run.save_trained_epoch(checkpoint, epoch * ITERATIONS_PER_EPOCH, {"epoch": epoch})
    history.append({"epoch": epoch, "val_accuracy": val_accuracy})
    run.save_epoch(checkpoint, history)


def test_open_creates_the_directory_and_its_config(tmp_path, config):
    run = RunDirectory.open(tmp_path / "runs", "exp", config)
    assert run.path == tmp_path / "runs" / "exp"
    written = ExperimentConfig.from_json((run.path / "config.json").read_text())
    assert written == config
    assert run.config == config


def test_reopening_with_the_same_network_resumes_with_new_settings(tmp_path, config):
    RunDirectory.open(tmp_path, "exp", config)
    longer = dataclasses.replace(config, epochs=20)
    run = RunDirectory.open(tmp_path, "exp", longer)
    assert run.path == tmp_path / "exp"
    assert run.config.epochs == 20


def test_reopening_with_another_task_raises_and_writes_nothing(tmp_path, config):
    RunDirectory.open(tmp_path, "exp", config)
    before = (tmp_path / "exp" / "config.json").read_bytes()
    with pytest.raises(RunDirectoryError) as raised:
        RunDirectory.open(tmp_path, "exp", dataclasses.replace(config, way=20, shot=5))
    message = str(raised.value)
    assert "--way=20" in message and "--shot=5" in message
    assert "--fresh" in message
    assert (tmp_path / "exp" / "config.json").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exp"]


@pytest.mark.parametrize("changed", [dict(task_norm_alpha="direct"),
                                     dict(task_norm_unbiased=True),
                                     dict(task_norm_start="half")], ids=str)
def test_reopening_with_other_task_norm_options_raises_naming_them(tmp_path, config, changed):
    """TaskNorm's options change the network, as --bn_mode does."""
    task_norm = dataclasses.replace(config, bn_mode="task_norm")
    RunDirectory.open(tmp_path, "exp", task_norm)
    (name, value), = changed.items()
    with pytest.raises(RunDirectoryError, match=f"--{name}={value} \\(run has "):
        RunDirectory.open(tmp_path, "exp", dataclasses.replace(task_norm, **changed))


def test_fresh_starts_a_new_directory_and_leaves_the_old_one_intact(tmp_path, config):
    old = RunDirectory.open(tmp_path, "exp", config)
    (old.path / "history.json").write_text("[]")
    before = {p.name: p.read_bytes() for p in old.path.iterdir()}
    other = dataclasses.replace(config, way=20)
    second = RunDirectory.open(tmp_path, "exp", other, fresh=True)
    assert second.path == tmp_path / "exp_2"
    assert second.config.way == 20
    third = RunDirectory.open(tmp_path, "exp", config, fresh=True)
    assert third.path == tmp_path / "exp_3"
    assert {p.name: p.read_bytes() for p in old.path.iterdir()} == before
    # With nothing in the way, fresh uses the name itself.
    assert RunDirectory.open(tmp_path, "new", config, fresh=True).path == tmp_path / "new"


def test_existing_reopens_a_run_with_its_own_config_and_refuses_a_missing_one(tmp_path, config):
    trained = dataclasses.replace(config, way=20, filters=32)
    RunDirectory.open(tmp_path, "exp", trained)
    run = RunDirectory.existing(tmp_path, "exp")
    assert run.path == tmp_path / "exp"
    assert run.config == trained
    with pytest.raises(RunDirectoryError, match="--experiment"):
        RunDirectory.existing(tmp_path, "nothing_here")
    assert not (tmp_path / "nothing_here").exists()


def test_restore_latest_without_checkpoints_restores_nothing(tmp_path, config):
    run = RunDirectory.open(tmp_path, "exp", config)
    checkpoint = make_checkpoint()
    assert run.restore_latest(checkpoint) is False
    assert int(checkpoint.epoch.numpy()) == 0
    assert run.read_history() == []


def test_save_epoch_and_restore_latest_round_trip(tmp_path, config):
    run = RunDirectory.open(tmp_path, "exp", config)
    checkpoint, history = make_checkpoint(), []
    for epoch, accuracy in enumerate([0.3, 0.4, 0.35], start=1):
        run_epoch(run, checkpoint, history, epoch, accuracy)
    restored = make_checkpoint()
    reopened = RunDirectory.open(tmp_path, "exp", config)
    assert reopened.restore_latest(restored) is True
    assert int(restored.epoch.numpy()) == 3
    np.testing.assert_array_equal(restored.weights.numpy(), [3, 3, 3])
    assert reopened.read_history() == history
    # Only the last two checkpoints are kept, numbered by iterations done.
    latest = tf.train.get_checkpoint_state(str(run.path / "checkpoints" / "latest"))
    assert [path.rsplit("-", 1)[1] for path in latest.all_model_checkpoint_paths] == ["20", "30"]


def test_a_checkpoint_saved_mid_epoch_is_the_one_restored(tmp_path, config):
    run = RunDirectory.open(tmp_path, "exp", config)
    checkpoint, history = make_checkpoint(), []
    run_epoch(run, checkpoint, history, 1, 0.3)
    checkpoint.weights.assign([7.0, 7.0, 7.0])
    run.save_checkpoint(checkpoint, ITERATIONS_PER_EPOCH + 4)
    restored = make_checkpoint()
    assert run.restore_latest(restored) is True
    np.testing.assert_array_equal(restored.weights.numpy(), [7, 7, 7])
    # An interruption is not an epoch: neither the history nor the best move.
    assert run.read_history() == history
    assert [epoch for _, epoch, _ in run.best_checkpoints()] == [1]


def test_read_history_cuts_to_the_epochs_the_checkpoint_holds(tmp_path, config):
    run = RunDirectory.open(tmp_path, "exp", config)
    history = [{"epoch": epoch, "val_accuracy": 0.1 * epoch} for epoch in (1, 2, 3)]
    run.write_json("history.json", history)
    assert run.read_history(2) == history[:2]
    assert run.read_history(0) == []
    assert run.read_history() == history


def test_best_k_keeps_exactly_the_top_k_and_deletes_the_rest(tmp_path, config):
    run = RunDirectory.open(tmp_path, "exp", dataclasses.replace(config, ensemble_top_k=2))
    checkpoint, history = make_checkpoint(), []
    accuracies = {1: 0.5, 2: 0.7, 3: 0.6, 4: 0.8, 5: 0.4}
    for epoch, accuracy in accuracies.items():
        run_epoch(run, checkpoint, history, epoch, accuracy)
    best = run.best_checkpoints()
    assert [(accuracy, epoch) for accuracy, epoch, _ in best] == [(0.8, 4), (0.7, 2)]
    files = sorted(p.name for p in (run.path / "checkpoints" / "best").iterdir())
    assert files and all(name.startswith(("epoch_0004.", "epoch_0002.")) for name in files)
    assert any(name.startswith("epoch_0004.") for name in files)
    assert any(name.startswith("epoch_0002.") for name in files)
    # Each kept prefix holds its own epoch's weights.
    for _, epoch, prefix in best:
        restored = make_checkpoint()
        restored.read(run.checkpoint_path(prefix)).assert_existing_objects_matched()
        np.testing.assert_array_equal(restored.weights.numpy(), [epoch] * 3)
    # The record survives a reopen.
    assert RunDirectory(run.path).best_checkpoints() == best


def test_best_k_ties_go_to_the_earlier_epoch(tmp_path, config):
    run = RunDirectory.open(tmp_path, "exp", dataclasses.replace(config, ensemble_top_k=2))
    checkpoint, history = make_checkpoint(), []
    for epoch in (1, 2, 3):
        run_epoch(run, checkpoint, history, epoch, 0.5)
    assert [epoch for _, epoch, _ in run.best_checkpoints()] == [1, 2]
    files = [p.name for p in (run.path / "checkpoints" / "best").iterdir()]
    assert not any(name.startswith("epoch_0003.") for name in files)


def test_json_files_are_written_whole(tmp_path, config):
    run = RunDirectory.open(tmp_path, "exp", config)
    run.write_json("results.json", {"test_accuracy": 0.99})
    assert json.loads((run.path / "results.json").read_text()) == {"test_accuracy": 0.99}
    assert not list(run.path.glob("*.tmp"))


@pytest.mark.parametrize("umask", [0o022, 0o007])
def test_json_files_get_the_mode_open_would_give(tmp_path, config, umask):
    """0o666 less the umask, not the temporary file's 0o600."""
    previous = os.umask(umask)
    try:
        run = RunDirectory.open(tmp_path, "exp", config)
        run.write_json("results.json", {"test_accuracy": 0.99})
    finally:
        os.umask(previous)
    for name in ("config.json", "results.json"):
        assert stat.S_IMODE((run.path / name).stat().st_mode) == 0o666 & ~umask, name
