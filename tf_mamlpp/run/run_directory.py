"""A run's directory: configuration, history, checkpoints and results.

Every file is written whole or not at all (a temporary file, then a rename),
so a run killed at any moment leaves a directory it can resume from, and a
bad command never overwrites what an earlier run wrote.
"""

import contextlib
import itertools
import json
import pathlib
import re
import shutil

import tensorflow as tf

from tf_mamlpp.atomic_files import leftover_temporary_files, write_atomically
from tf_mamlpp.error_text import tensorflow_error_text
from tf_mamlpp.run.config import ExperimentConfig
from tf_mamlpp.serving import saved_model

CONFIG = "config.json"
HISTORY = "history.json"
BEST = "best.json"
PARTIAL_EPOCH = "partial_epoch.json"
UNVALIDATED_EPOCH = "unvalidated_epoch.json"
# Latest checkpoints kept (the newest is resumed from; the one before stays
# while the newest is written).
LATEST_KEPT = 2


class RunDirectoryError(ValueError):
    """The run directory cannot be used for this command."""


def write_json_atomically(path, value):
    """Writes `value` as JSON to `path`, whole or not at all (atomic_files.py)."""
    text = json.dumps(value, indent=2, sort_keys=True)
    write_atomically(path, lambda file: file.write(text.encode()))


def _reason(error):
    """Why a write failed, e.g. "File too large", from an OSError or TensorFlow's message."""
    if isinstance(error, OSError) and error.strerror:
        return error.strerror
    return tensorflow_error_text(error).rsplit("; ", 1)[-1]


def saved_config(path):
    """The configuration of the run in `path`, or None where there is no run."""
    config_file = pathlib.Path(path) / CONFIG
    return ExperimentConfig.from_json(config_file.read_text()) if config_file.exists() else None


class RunDirectory:
    """One run's files under `path`.

    Args:
      path: the run's directory; it must exist and hold `config.json`, whose
        `ensemble_top_k` says how many best-validation checkpoints to keep.
    """

    def __init__(self, path):
        self.path = pathlib.Path(path)
        self.config = ExperimentConfig.from_json((self.path / CONFIG).read_text())
        self.keep_best = self.config.ensemble_top_k

    @classmethod
    def open(cls, logdir, name, config, fresh=False, owner=None):
        """Creates the run directory for `config`, or reopens it to resume.

        Args:
          logdir: parent of all runs.
          name: the run's directory name.
          config: the resolved configuration of this command.
          fresh: start over in a new directory (name_2, name_3, ...) when one
            exists; the old one is never touched, and two commands started
            together get two directories.
          owner: a `run_lock.RunLock` that takes the directory before anything
            is written in it (see `_own`).

        Raises:
          RunDirectoryError: the existing run was made with another network or
            task, naming the differing flags (nothing is written), or the
            directory cannot be written.
          run_lock.RunLockError: a live process owns the directory.
        """
        path = pathlib.Path(logdir) / name
        previous = None if fresh else saved_config(path)
        if previous is not None:
            differences = config.architecture_differences(previous)
            if differences:
                flags = ", ".join(
                    f"--{field}={getattr(config, field)} (run has {getattr(previous, field)})"
                    for field in differences)
                raise RunDirectoryError(
                    f"{path} holds a run with other settings: {flags}; pass --fresh to start "
                    f"a new run, or --experiment=NAME for another directory")
        try:
            if fresh:
                path = _new_directory(path)
            else:
                path.mkdir(parents=True, exist_ok=True)
            _own(path, owner)
            write_json_atomically(path / CONFIG, json.loads(config.to_json()))
        except OSError as error:
            raise RunDirectoryError(f"{path}: cannot write the run directory "
                                    f"({error.strerror or error}); check --logdir") from error
        return cls(path)

    @classmethod
    def existing(cls, logdir, name, owner=None):
        """Reopens a run to test or export it, with the configuration it was trained with.

        Args:
          owner: as `open`'s.

        Raises:
          RunDirectoryError: there is no run at logdir/name.
          run_lock.RunLockError: a live process owns the directory.
        """
        path = pathlib.Path(logdir) / name
        if not (path / CONFIG).exists():
            raise RunDirectoryError(f"{path}: no run there (no {CONFIG}); check --logdir and "
                                    "--experiment")
        _own(path, owner)
        return cls(path)

    def _manager(self, checkpoint):
        return tf.train.CheckpointManager(checkpoint, self.path / "checkpoints" / "latest",
                                          max_to_keep=LATEST_KEPT)

    def restore_latest(self, checkpoint):
        """Restores the newest checkpoint into `checkpoint`; returns whether there was one.

        Raises:
          RunDirectoryError: the checkpoint is corrupt, truncated, or holds
            another network's variables, naming it and what to do.
        """
        latest = tf.train.latest_checkpoint(self.path / "checkpoints" / "latest")
        if latest is None:
            return False
        _restore(checkpoint, latest, "pass --fresh to start a new run beside this one")
        return True

    def restore_best(self, network, prefix):
        """Restores the network of a `best_checkpoints` entry into `network`.

        Raises:
          RunDirectoryError: the checkpoint is missing, corrupt or foreign.
        """
        _restore(tf.train.Checkpoint(network=network), self.checkpoint_path(prefix),
                 f"remove its entry from {BEST} or train again with --fresh", partial=True)

    def read_history(self, epochs=None):
        """Per-epoch records, cut to the first `epochs` (those the checkpoint holds)."""
        file = self.path / HISTORY
        history = json.loads(file.read_text()) if file.exists() else []
        return history if epochs is None else history[:epochs]

    def save_checkpoint(self, checkpoint, iteration):
        """Writes the latest checkpoint, numbered by the meta-iterations done.

        Raises:
          RunDirectoryError: it cannot be written (a full disk); the previous
            checkpoint stays the latest, and loadable.
        """
        with self._reporting_write_errors(f"the checkpoint of iteration {iteration}"):
            self._manager(checkpoint).save(checkpoint_number=iteration)

    def save_trained_epoch(self, checkpoint, iteration, record):
        """Writes an epoch's checkpoint and training figures before it is validated.

        A failure or a kill during validation then costs no training: the run
        resumes with the epoch's validation (`read_unvalidated_epoch`).

        Raises:
          RunDirectoryError: a file cannot be written (a full disk); the
            previous checkpoint stays the latest, and loadable.
        """
        with self._reporting_write_errors(f"epoch {record['epoch']}"):
            write_json_atomically(self.path / UNVALIDATED_EPOCH,
                                  {"iteration": iteration, "record": record})
            self.save_checkpoint(checkpoint, iteration)

    def read_unvalidated_epoch(self, iteration):
        """The record `save_trained_epoch` wrote at `iteration`, else None."""
        file = self.path / UNVALIDATED_EPOCH
        if file.exists():
            unvalidated = json.loads(file.read_text())
            if unvalidated["iteration"] == iteration:
                return unvalidated["record"]
        return None

    def save_epoch(self, checkpoint, history):
        """Keeps the validated epoch's checkpoint if it is among the best, then writes the history.

        The history goes last: a run killed before it resumes by validating
        the epoch again, replacing its best-checkpoint entry.

        Raises:
          RunDirectoryError: a file cannot be written (a full disk); the
            epoch's checkpoint stays the latest, and loadable.
        """
        with self._reporting_write_errors(f"epoch {history[-1]['epoch']}"):
            self._keep_if_best(checkpoint, history[-1]["epoch"], history[-1]["val_accuracy"])
            write_json_atomically(self.path / HISTORY, history)

    @contextlib.contextmanager
    def _reporting_write_errors(self, what):
        """Turns a failed write into a one-line RunDirectoryError and removes its debris.

        TensorFlow writes a checkpoint into `<prefix>_temp/` and renames it
        into place, and the checkpoint list is updated last, so a failed save
        leaves the previous checkpoint in force; only the temporary folder is
        left to remove.
        """
        try:
            yield
        except (tf.errors.OpError, OSError) as error:
            for temporary in (self.path / "checkpoints").glob("*/*_temp"):
                shutil.rmtree(temporary, ignore_errors=True)
            raise RunDirectoryError(
                f"{self.path}: cannot write {what} ({_reason(error)}); the previous checkpoint "
                "is kept: free space there and run the same command again to resume") from error

    def best_checkpoints(self):
        """[(val_accuracy, epoch, prefix)] of the kept checkpoints, best first.

        Prefixes are relative to the run directory; `checkpoint_path` resolves one.
        """
        file = self.path / BEST
        return [tuple(entry) for entry in json.loads(file.read_text())] if file.exists() else []

    def checkpoint_path(self, prefix):
        """The absolute checkpoint prefix of a `best_checkpoints` entry."""
        return str(self.path / prefix)

    def write_partial_epoch(self, iteration, sums, count):
        """Keeps the training figures of an epoch stopped at `iteration`, for its resumption."""
        write_json_atomically(self.path / PARTIAL_EPOCH,
                              {"iteration": iteration, "sums": sums, "count": count})

    def read_partial_epoch(self, iteration):
        """(sums, count) written by `write_partial_epoch` at `iteration`, else ({}, 0)."""
        file = self.path / PARTIAL_EPOCH
        if file.exists():
            partial = json.loads(file.read_text())
            if partial["iteration"] == iteration:
                return partial["sums"], partial["count"]
        return {}, 0

    def _keep_if_best(self, checkpoint, epoch, val_accuracy):
        # An epoch run again after a kill replaces its earlier entry.
        best = [entry for entry in self.best_checkpoints() if entry[1] != epoch]
        # Ties go to the earlier epoch, which was seen first.
        ranked = sorted(best + [(val_accuracy, epoch, None)], key=lambda e: (-e[0], e[1]))
        if (val_accuracy, epoch, None) not in ranked[:self.keep_best]:
            return
        name = f"epoch_{epoch:04d}"
        checkpoint.write(str(self.path / "checkpoints" / "best" / name))
        # Prefixes relative to the run, so a moved or copied run still finds them.
        kept = [(a, e, f"checkpoints/best/{name}" if p is None else p)
                for a, e, p in ranked[:self.keep_best]]
        write_json_atomically(self.path / BEST, kept)
        for _, _, dropped in ranked[self.keep_best:]:
            dropped = self.path / dropped
            for file in dropped.parent.glob(dropped.name + ".*"):
                file.unlink()

    def write_json(self, name, value):
        write_json_atomically(self.path / name, value)


def _new_directory(path):
    """Creates the first of `path`, path_2, path_3, ... that does not exist, and returns it.

    Creating is claiming: of two commands that look for a new name at once,
    each gets its own directory.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    numbered = (path.parent / f"{path.name}_{suffix}" for suffix in itertools.count(2))
    for candidate in itertools.chain([path], numbered):
        try:
            candidate.mkdir()
            return candidate
        except FileExistsError:
            continue


def _own(path, owner):
    """Takes `path` for `owner`, then removes what commands killed in it left half-written.

    Only the directory's owner may remove those: in a directory no one owns,
    a temporary file may be one that a live process is writing.
    """
    if owner is None:
        return
    owner.acquire(path)
    _remove_debris(path)


def _remove_debris(path):
    """Removes the files of writes a kill cut short, which no run would ever read or remove.

    Every write in a run directory is whole or not at all, through a temporary
    file or folder: write_atomically's files, the export's staging folder,
    TensorFlow's `<prefix>_temp/` and checkpoint list drafts, and checkpoints
    written in full but not yet listed (in `best.json`, or in the latest
    checkpoints' list, which TensorFlow updates before it deletes the oldest).
    A run resumes correctly beside them, but they would stay forever.
    """
    for temporary in leftover_temporary_files(path):
        temporary.unlink()
    for staging in path.glob(f"{saved_model.STAGING_PREFIX}*"):
        shutil.rmtree(staging, ignore_errors=True)
    latest = path / "checkpoints" / "latest"
    state = tf.train.get_checkpoint_state(latest) if latest.is_dir() else None
    listed = [pathlib.Path(prefix).name for prefix in state.all_model_checkpoint_paths
              ] if state else []
    if len(listed) > LATEST_KEPT:
        tf.compat.v1.train.update_checkpoint_state(
            str(latest), pathlib.Path(state.model_checkpoint_path).name,
            all_model_checkpoint_paths=listed[-LATEST_KEPT:],
            all_model_checkpoint_timestamps=state.all_model_checkpoint_timestamps[-LATEST_KEPT:],
            last_preserved_timestamp=state.last_preserved_timestamp)
    _keep_only(latest, listed[-LATEST_KEPT:], "checkpoint")
    best = path / BEST
    kept = json.loads(best.read_text()) if best.exists() else []
    _keep_only(path / "checkpoints" / "best", [pathlib.Path(entry[2]).name for entry in kept])


def _keep_only(folder, prefixes, *names):
    """Removes everything in `folder` but the checkpoints `prefixes` and the files `names`."""
    if not folder.is_dir():
        return
    kept = re.compile("|".join([*(re.escape(prefix) + r"\.(index|data-\d{5}-of-\d{5})"
                                  for prefix in prefixes), *map(re.escape, names)]) or "$^")
    for entry in folder.iterdir():
        if not kept.fullmatch(entry.name):
            if entry.is_dir():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink()


def _restore(checkpoint, prefix, remedy, partial=False):
    """Restores `prefix` into `checkpoint`, turning TensorFlow's errors into one line.

    Args:
      partial: the checkpoint was written by `Checkpoint.write` and may hold
        more than `checkpoint` tracks (the optimizer beside the network).
    """
    try:
        status = checkpoint.read(prefix) if partial else checkpoint.restore(prefix)
    except (tf.errors.OpError, IndexError) as error:  # IndexError: a truncated data file
        raise RunDirectoryError(f"{prefix}: corrupt or truncated checkpoint "
                                f"({tensorflow_error_text(error)}); {remedy}") from error
    except ValueError as error:  # a variable of another shape
        raise RunDirectoryError(f"{prefix}: checkpoint of another network "
                                f"({tensorflow_error_text(error)[:200]}); {remedy}") from error
    try:
        status.assert_existing_objects_matched()
    except AssertionError as error:
        status.expect_partial()  # the error says it all; no warnings at exit
        reason = tensorflow_error_text(error).split(". ")[0]
        raise RunDirectoryError(f"{prefix}: checkpoint of another network or program "
                                f"({reason}); {remedy}") from error
    if partial:
        status.expect_partial()
