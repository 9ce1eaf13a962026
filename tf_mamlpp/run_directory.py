"""A run's directory: configuration, history, checkpoints and results.

Every file is written whole or not at all (a temporary file, then a rename),
so a run killed at any moment leaves a directory it can resume from, and a
bad command never overwrites what an earlier run wrote.
"""

import json
import os
import pathlib
import tempfile

import tensorflow as tf

from tf_mamlpp.config import ExperimentConfig

CONFIG = "config.json"
HISTORY = "history.json"
BEST = "best.json"


class RunDirectoryError(ValueError):
    """The run directory cannot be used for this command."""


def experiment_name(config):
    """The default name of a run: dataset, way, shot and seed."""
    return f"{config.dataset}_{config.way}way_{config.shot}shot_seed{config.seed}"


def write_json_atomically(path, value):
    """Writes `value` as JSON to `path` through a temporary file and a rename."""
    path = pathlib.Path(path)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, prefix=f".{path.name}.",
                                     delete=False) as temporary:
        temporary.write(json.dumps(value, indent=2, sort_keys=True))
    os.replace(temporary.name, path)


class RunDirectory:
    """One run's files under `path`.

    Args:
      path: the run's directory; it must exist and hold `config.json`.
      keep_best: how many best-validation checkpoints to keep.
    """

    def __init__(self, path, keep_best=3):
        self.path = pathlib.Path(path)
        self.keep_best = keep_best
        self.config = ExperimentConfig.from_json((self.path / CONFIG).read_text())

    @classmethod
    def open(cls, logdir, name, config, fresh=False, keep_best=3):
        """Creates the run directory for `config`, or reopens it to resume.

        Args:
          logdir: parent of all runs.
          name: the run's directory name.
          config: the resolved configuration of this command.
          fresh: start over in a new directory (name_2, name_3, ...) when one
            exists; the old one is never touched.
          keep_best: best-validation checkpoints to keep.

        Raises:
          RunDirectoryError: the existing run was made with another network or
            task, naming the differing flags; nothing is written.
        """
        path = pathlib.Path(logdir) / name
        if fresh:
            suffix = 2
            while path.exists():
                path = pathlib.Path(logdir) / f"{name}_{suffix}"
                suffix += 1
        config_file = path / CONFIG
        if config_file.exists():
            previous = ExperimentConfig.from_json(config_file.read_text())
            differences = config.architecture_differences(previous)
            if differences:
                flags = ", ".join(
                    f"--{field}={getattr(config, field)} (run has {getattr(previous, field)})"
                    for field in differences)
                raise RunDirectoryError(
                    f"{path} holds a run with other settings: {flags}; pass --fresh to start "
                    f"a new run, or --experiment=NAME for another directory")
        path.mkdir(parents=True, exist_ok=True)
        write_json_atomically(config_file, json.loads(config.to_json()))
        return cls(path, keep_best)

    @classmethod
    def existing(cls, logdir, name, keep_best=3):
        """Reopens a run to test or export it, with the configuration it was trained with.

        Raises:
          RunDirectoryError: there is no run at logdir/name.
        """
        path = pathlib.Path(logdir) / name
        if not (path / CONFIG).exists():
            raise RunDirectoryError(f"{path}: no run there (no {CONFIG}); check --logdir and "
                                    "--experiment")
        return cls(path, keep_best)

    def _manager(self, checkpoint):
        return tf.train.CheckpointManager(checkpoint, self.path / "checkpoints" / "latest",
                                          max_to_keep=2)

    def restore_latest(self, checkpoint):
        """Restores the newest checkpoint into `checkpoint`; returns whether there was one."""
        latest = tf.train.latest_checkpoint(self.path / "checkpoints" / "latest")
        if latest is None:
            return False
        checkpoint.restore(latest).assert_existing_objects_matched()
        return True

    def read_history(self, epochs=None):
        """Per-epoch records, cut to the first `epochs` (those the checkpoint holds)."""
        file = self.path / HISTORY
        history = json.loads(file.read_text()) if file.exists() else []
        return history if epochs is None else history[:epochs]

    def save_checkpoint(self, checkpoint, iteration):
        """Writes the latest checkpoint, numbered by the meta-iterations done."""
        self._manager(checkpoint).save(checkpoint_number=iteration)

    def save_epoch(self, checkpoint, iteration, history):
        """Writes the history and the end-of-epoch checkpoint, and keeps the best ones.

        The history goes first: a run killed between the two resumes from the
        previous checkpoint and cuts the history back to it.
        """
        write_json_atomically(self.path / HISTORY, history)
        self.save_checkpoint(checkpoint, iteration)
        self._keep_if_best(checkpoint, history[-1]["epoch"], history[-1]["val_accuracy"])

    def best_checkpoints(self):
        """[(val_accuracy, epoch, prefix)] of the kept checkpoints, best first."""
        file = self.path / BEST
        return [tuple(entry) for entry in json.loads(file.read_text())] if file.exists() else []

    def _keep_if_best(self, checkpoint, epoch, val_accuracy):
        best = self.best_checkpoints()
        # Ties go to the earlier epoch, which was seen first.
        ranked = sorted(best + [(val_accuracy, epoch, None)], key=lambda e: (-e[0], e[1]))
        if (val_accuracy, epoch, None) not in ranked[:self.keep_best]:
            return
        prefix = checkpoint.write(str(self.path / "checkpoints" / "best" / f"epoch_{epoch:04d}"))
        kept = [(a, e, prefix if p is None else p) for a, e, p in ranked[:self.keep_best]]
        write_json_atomically(self.path / BEST, kept)
        for _, _, dropped in ranked[self.keep_best:]:
            for file in pathlib.Path(dropped).parent.glob(pathlib.Path(dropped).name + ".*"):
                file.unlink()

    def write_json(self, name, value):
        write_json_atomically(self.path / name, value)
