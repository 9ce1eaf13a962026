"""Specification of a run directory opened by its owner: locked first, then rid of a kill's debris.

A process killed in the middle of a write leaves the write's temporary file
or folder, or a checkpoint written but not yet listed, or one listed for
deletion but not deleted; each would stay forever. The crash soak
(tools/crash_soak.py) compares the files of killed runs with an uninterrupted
one's (without this removal, kills in the export left its staging folder);
here each kind is made by hand.
"""

import json
import os
import socket
import subprocess

import numpy as np
import pytest
import tensorflow as tf

from tf_mamlpp.run.config import resolve
from tf_mamlpp.run.run_directory import RunDirectory
from tf_mamlpp.run.run_lock import LOCK, RunLock, RunLockError, process_start


@pytest.fixture
def config():
    return resolve("omniglot", way=5, shot=1, epochs=10)


@pytest.fixture
def owner():
    with RunLock() as lock:
        yield lock


def files(folder):
    return sorted(str(path.relative_to(folder)) for path in folder.rglob("*"))


def trained_run(tmp_path, config, saves=(3, 6)):
    """A run with latest checkpoints after `saves` iterations and one best checkpoint."""
    run = RunDirectory.open(tmp_path, "exp", config)
    checkpoint = tf.train.Checkpoint(weights=tf.Variable(np.zeros(3, np.float32)))
    for iteration in saves:
        run.save_checkpoint(checkpoint, iteration)
    run.save_epoch(checkpoint, [{"epoch": 1, "val_accuracy": 0.5}])
    return run


def test_open_by_its_owner_takes_the_lock_before_writing(tmp_path, config, owner):
    run = RunDirectory.open(tmp_path, "exp", config, owner=owner)
    assert json.loads((run.path / LOCK).read_text())["pid"] == os.getpid()
    owner.release()
    assert files(run.path) == ["config.json"]


def test_a_live_owner_refuses_open_and_existing_and_nothing_is_written(tmp_path, config):
    RunDirectory.open(tmp_path, "exp", config)
    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        (tmp_path / "exp" / LOCK).write_text(json.dumps({
            "pid": sleeper.pid, "host": socket.gethostname(),
            "process_start": process_start(sleeper.pid), "started": 0, "command": "x"}))
        before = {name: (tmp_path / "exp" / name).read_bytes() for name in ("config.json", LOCK)}
        (tmp_path / "exp" / ".history.json.a1.tmp").write_text("half")
        for opening in (lambda lock: RunDirectory.open(tmp_path, "exp", config, owner=lock),
                        lambda lock: RunDirectory.existing(tmp_path, "exp", owner=lock)):
            with RunLock() as lock, pytest.raises(RunLockError, match="in use by process"):
                opening(lock)
        assert {name: (tmp_path / "exp" / name).read_bytes() for name in before} == before
        assert (tmp_path / "exp" / ".history.json.a1.tmp").exists()  # not the owner's to remove
    finally:
        sleeper.kill()
        sleeper.wait()


def test_the_owner_removes_what_killed_writes_left(tmp_path, config, owner):
    run = trained_run(tmp_path, config)
    kept = files(run.path)
    debris = [".history.json.x8kq2.tmp", ".export-3fz9/model/saved_model.pb",
              "checkpoints/latest/ckpt-9_temp/part-00000-of-00001.index",
              "checkpoints/latest/checkpoint.tmp5e1f", "checkpoints/latest/ckpt-9.index",
              "checkpoints/latest/ckpt-6.data-00000-of-00001.tempstate123",
              "checkpoints/best/epoch_0002.index", "checkpoints/best/epoch_0002_temp/part"]
    for name in debris:
        (run.path / name).parent.mkdir(parents=True, exist_ok=True)
        (run.path / name).write_text("debris")
    RunDirectory.existing(tmp_path, "exp", owner=owner)
    owner.release()
    assert files(run.path) == kept
    assert tf.train.latest_checkpoint(run.path / "checkpoints" / "latest").endswith("ckpt-6")


def test_a_checkpoint_listed_for_deletion_is_deleted_and_unlisted(tmp_path, config, owner):
    """TensorFlow lists a new checkpoint before it deletes the oldest: a kill between
    leaves three listed, the third's files on disk."""
    run = trained_run(tmp_path, config, saves=(3, 6, 9))
    latest = run.path / "checkpoints" / "latest"
    state = tf.train.get_checkpoint_state(latest)
    for name in ("index", "data-00000-of-00001"):
        (latest / f"ckpt-3.{name}").write_bytes((latest / f"ckpt-6.{name}").read_bytes())
    tf.compat.v1.train.update_checkpoint_state(
        str(latest), "ckpt-9", all_model_checkpoint_paths=["ckpt-3", "ckpt-6", "ckpt-9"],
        all_model_checkpoint_timestamps=[*state.all_model_checkpoint_timestamps[:1],
                                         *state.all_model_checkpoint_timestamps],
        last_preserved_timestamp=state.last_preserved_timestamp)
    RunDirectory.open(tmp_path, "exp", config, owner=owner)
    listed = tf.train.get_checkpoint_state(latest).all_model_checkpoint_paths
    assert [os.path.basename(path) for path in listed] == ["ckpt-6", "ckpt-9"]
    assert not list(latest.glob("ckpt-3*"))
    # The next save goes on deleting the oldest.
    run.save_checkpoint(tf.train.Checkpoint(weights=tf.Variable(np.zeros(3, np.float32))), 12)
    assert sorted({path.name.split(".")[0] for path in latest.glob("ckpt-*")}) == [
        "ckpt-12", "ckpt-9"]


def test_nothing_is_removed_without_an_owner(tmp_path, config):
    run = trained_run(tmp_path, config)
    (run.path / ".results.json.q1.tmp").write_text("a live write, for all we know")
    before = files(run.path)
    RunDirectory.open(tmp_path, "exp", config)
    RunDirectory.existing(tmp_path, "exp")
    assert files(run.path) == before


def test_fresh_claims_a_directory_that_another_command_has_just_created(tmp_path, config):
    """A directory is claimed by creating it: one made (empty) by a racing --fresh is skipped."""
    (tmp_path / "exp").mkdir()
    (tmp_path / "exp_2").mkdir()
    assert RunDirectory.open(tmp_path, "exp", config, fresh=True).path == tmp_path / "exp_3"
    assert files(tmp_path / "exp_2") == []
