"""Meta-training from a configuration to a tested model, epoch by epoch.

Reads top to bottom: set-up, data, model and optimizer, checkpoint restore,
the loop (meta-updates, then validation and a checkpoint each epoch), and
the final test and export. Validation and the test are scoring.py's;
TensorBoard's figures are summaries.py's.

The loop is hand-written around `MetaLearner.meta_update`, not `Model.fit`,
because a run resumes at the iteration, not the epoch: a stop mid-epoch
continues the same task stream and the epoch's partial figures, so the
history equals an uninterrupted run's (BackupAndRestore restarts the epoch).
Validation in two batch-norm modes, the best-k checkpoints and their
ensemble, and the 95% intervals have no Keras counterpart either. Library
users get `fit` (see meta_learner.py).
"""

import hashlib
import math
import time

import keras
import numpy as np
import tensorflow as tf
from absl import logging

from tf_mamlpp.config_error import ConfigError
from tf_mamlpp.core import mixed_precision
from tf_mamlpp.core.meta_learner import MetaLearner
from tf_mamlpp.run import distribution, task_streams
from tf_mamlpp.run.builders import build_network, build_optimizer, build_schedule
from tf_mamlpp.run.config import AUTO
from tf_mamlpp.run.progress import Progress
from tf_mamlpp.run.scoring import Scoring
from tf_mamlpp.run.summaries import Summaries
from tf_mamlpp.serving import saved_model


class NonFiniteLossError(RuntimeError):
    """The loss or meta-gradient became NaN or infinite."""


class TrainingInterrupted(Exception):
    """Training stopped on request (SIGINT/SIGTERM) after writing a checkpoint."""


class RunComplete(Exception):
    """The run was trained, tested and exported already; nothing is redone."""


class Trainer:
    """Owns one run: its directory, data, model, optimizer and checkpoints.

    Args:
      config: the resolved `ExperimentConfig`.
      run_dir: a `run_directory.RunDirectory`.
      parallel_tasks: tasks adapted at once when they are not folded.
      strategy: a tf.distribute strategy (see distribution.py); only its chief
        writes checkpoints, summaries, results and the export.
    """

    def __init__(self, config, run_dir, parallel_tasks=1, strategy=None):
        if config.mixed_precision == AUTO:
            raise ConfigError("mixed_precision=auto must be decided before training: pass the "
                              "configuration through precision.settled", "mixed_precision")
        self.config = config
        self.run_dir = run_dir
        self.strategy = strategy or tf.distribute.get_strategy()
        distribution.check_batch_size(config.batch_size, self.strategy)
        self.is_chief = distribution.is_chief(self.strategy)
        keras.utils.set_random_seed(config.seed)
        self.splits = task_streams.load_splits(config)
        with self.strategy.scope():
            self.network = build_network(config)
            self.optimizer = build_optimizer(config)
            self.loss_scale = (
                mixed_precision.DynamicLossScale(compute_dtype=mixed_precision.compute_dtype())
                if config.mixed_precision else None)
            self.meta_learner = MetaLearner(
                self.network, self.optimizer, strategy=self.strategy,
                jit_compile=config.jit_compile, fold_tasks=config.fold_tasks,
                loss_scale=self.loss_scale,
                parallel_tasks=parallel_tasks, schedule=build_schedule(config),
                eval_inner_steps=config.eval_inner_steps)
        # The optimizer's iteration counter is the run's position: the task
        # stream, the epoch and the schedules all follow from it.
        state = {"network": self.network, "optimizer": self.optimizer}
        if self.loss_scale is not None:
            state["loss_scale"] = self.loss_scale
            logging.info("Mixed precision: the meta-step computes in %s, the variables stay "
                         "float32.", self.loss_scale.compute_dtype.name)
        self.checkpoint = tf.train.Checkpoint(**state)
        self.summaries = Summaries(run_dir.path, self.is_chief)
        self.scoring = Scoring(config, self.meta_learner, self.splits, run_dir, self.summaries)
        self.stop_requested = False

    @property
    def iterations_done(self):
        return int(self.optimizer.iterations.numpy())

    def parameter_fingerprint(self):
        """A digest of every network variable, equal on workers that agree."""
        digest = hashlib.sha256()
        for variable in self.network.variables:
            digest.update(np.asarray(variable.numpy()).tobytes())
        return digest.hexdigest()[:16]

    def request_stop(self):
        """Asks the loop to stop after the current meta-iteration (signal-safe)."""
        self.stop_requested = True

    def train(self):
        """Meta-trains from the last checkpoint to the last epoch, then tests and exports.

        Raises:
          TrainingInterrupted: after `request_stop`, once a checkpoint is written.
          NonFiniteLossError: the loss or gradient became NaN or infinite.
          RunComplete: the run had finished already, tested and exported.
        """
        config = self.config
        self.run_dir.restore_latest(self.checkpoint)
        done = self.iterations_done
        start_epoch = done // config.iters_per_epoch
        history = self.run_dir.read_history(start_epoch)
        results = self.run_dir.path / "results.json"
        if (done == config.total_iterations and len(history) == config.epochs
                and results.exists() and (self.run_dir.path / "export").exists()):
            raise RunComplete(
                f"{self.run_dir.path} holds a finished run (results in {results}); test it "
                f"again with --mode=test, or train a new run beside it with --fresh")
        if done:
            logging.info("Resuming at epoch %d, iteration %d.", start_epoch + 1,
                         done % config.iters_per_epoch + 1)
        self.summaries.configuration(done, config)
        unvalidated = self.run_dir.read_unvalidated_epoch(done)
        if done and len(history) < start_epoch and unvalidated:
            self._validate_and_save(unvalidated, history)
        tasks = iter(task_streams.training_tasks(config, self.splits["train"],
                                                 start_iteration=done))
        for epoch in range(start_epoch, config.epochs):
            record = self.train_epoch(epoch, tasks)
            if self.is_chief:
                self.run_dir.save_trained_epoch(self.checkpoint, self.iterations_done, record)
            self._validate_and_save(record, history)
            if self.stop_requested and epoch + 1 < config.epochs:
                raise TrainingInterrupted(f"stopped after epoch {epoch + 1}; checkpoint written "
                                          f"to {self.run_dir.path}")
        logging.info("parameter fingerprint %s", self.parameter_fingerprint())
        if not self.is_chief:
            return None
        results = self.test()
        export = self.run_dir.path / "export"
        # A run trained further (more --epochs) may have a new best: its export follows.
        if not export.exists() or (start_epoch < config.epochs and any(export.iterdir())):
            self.export_best(export, replace=True)
        return results

    def _validate_and_save(self, record, history):
        """Validates the epoch `record` describes and writes it to the history."""
        history.append({**record, **self.scoring.validate(record["epoch"] - 1)})
        if self.is_chief:
            self.run_dir.save_epoch(self.checkpoint, history)

    def train_epoch(self, epoch, tasks):
        """Runs the rest of epoch `epoch` under the schedules in force at that epoch."""
        config = self.config
        phase = self.meta_learner.phase_at(epoch)
        self.summaries.epoch_start(self.iterations_done, self.network, phase)
        first = self.iterations_done - epoch * config.iters_per_epoch
        progress = Progress(config.iters_per_epoch, f"epoch {epoch + 1}/{config.epochs}",
                            done=first, units_after=(config.epochs - epoch - 1) *
                            config.iters_per_epoch)
        # An epoch resumed after a stop continues the figures of its first part.
        sums, counted = self.run_dir.read_partial_epoch(self.iterations_done) if first else ({}, 0)
        for iteration in range(first, config.iters_per_epoch):
            started = time.monotonic()
            figures = {name: float(value) for name, value in self.meta_learner.meta_update(
                next(tasks), phase).items()}
            if figures.get("skipped_updates"):
                # Mixed precision: the meta-gradient overflowed, so nothing was
                # updated and the loss scale is halved. The step's other
                # figures describe no update and stay out of the epoch's means.
                self._check_loss_scale(figures["loss_scale"], epoch, iteration)
                self.summaries.training(self.iterations_done, {
                    name: figures[name] for name in ("skipped_updates", "loss_scale")},
                    self.optimizer.learning_rate)
                sums["skipped_updates"] = sums.get("skipped_updates", 0.0) + 1
                progress.update()
            else:
                self._check_finite(figures, epoch, iteration)
                figures["seconds_per_iteration"] = time.monotonic() - started
                self.summaries.training(self.iterations_done, figures,
                                        self.optimizer.learning_rate)
                for name, value in figures.items():
                    sums[name] = sums.get(name, 0.0) + value
                counted += 1
                progress.update(loss=figures["loss"], acc=figures["accuracy"])
            # A stop at the last iteration lets the epoch validate and save first.
            if self.stop_requested and iteration + 1 < config.iters_per_epoch:
                progress.close()
                if self.is_chief:
                    self.run_dir.write_partial_epoch(self.iterations_done, sums, counted)
                    self.run_dir.save_checkpoint(self.checkpoint, self.iterations_done)
                raise TrainingInterrupted(
                    f"stopped at epoch {epoch + 1}, iteration {iteration + 1}; checkpoint "
                    f"written to {self.run_dir.path}")
        progress.close()
        # Means over the applied updates; skipped ones (mixed precision) as a count.
        return {"epoch": epoch + 1, "second_order": phase.second_order,
                "multi_step": phase.multi_step,
                **{f"train_{name}": int(total) if name == "skipped_updates" else total / counted
                   for name, total in sums.items()}}

    def _check_finite(self, figures, epoch, iteration):
        bad = [name for name in ("loss", "gradient_norm") if not math.isfinite(figures[name])]
        if bad:
            raise NonFiniteLossError(
                f"{' and '.join(bad)} became {figures[bad[0]]} at epoch {epoch + 1}, iteration "
                f"{iteration + 1}; the last good checkpoint is kept. Lower --meta_lr or "
                f"--inner_lr, or train first order longer (--first_order_epochs).")

    def _check_loss_scale(self, loss_scale, epoch, iteration):
        """Mixed precision: a step that overflows unscaled is not an overflow of the scale."""
        if loss_scale <= 1:
            raise NonFiniteLossError(
                f"the meta-gradient stayed NaN or infinite with the loss scale down to "
                f"{loss_scale:g} at epoch {epoch + 1}, iteration {iteration + 1}; the last good "
                f"checkpoint is kept. Lower --meta_lr or --inner_lr, train first order longer "
                f"(--first_order_epochs), or train without --mixed_precision.")

    def test(self):
        """Tests the best validation checkpoints and their ensemble (scoring.py)."""
        return self.scoring.test(self.iterations_done)

    def export_best(self, export_dir, replace=False):
        """Exports the best validation checkpoint as an adapting SavedModel.

        `replace`: replace the SavedModel `export_dir` holds (saved_model.export).
        """
        best = self.run_dir.best_checkpoints()
        if not best:
            raise ValueError(f"{self.run_dir.path} has no validated checkpoint to export yet")
        self.run_dir.restore_best(self.network, best[0][2])
        # Image-folder training images are rounded to 8 bits after resizing; Omniglot's are not.
        path = saved_model.export(self.network, self.config.eval_inner_steps, export_dir,
                                  rounded_to_uint8=self.config.dataset != "omniglot",
                                  replace=replace)
        logging.info("exported the epoch-%d model to %s", best[0][1], path)
        return path
