"""Meta-training from a configuration to a tested model, epoch by epoch.

Reads top to bottom: set-up, data, model and optimizer, checkpoint restore,
the loop (meta-updates, then validation and a checkpoint each epoch), and
the final test.

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
from tf_mamlpp.core import mixed_precision, schedules
from tf_mamlpp.core.batch_norm_modes import SERVING_MODES
from tf_mamlpp.core.meta_learner import MetaLearner
from tf_mamlpp.core.network import MamlppNetwork
from tf_mamlpp.data import splits
from tf_mamlpp.run import distribution, evaluation, export
from tf_mamlpp.run.config import AUTO
from tf_mamlpp.run.progress import Progress


class NonFiniteLossError(RuntimeError):
    """The loss or meta-gradient became NaN or infinite."""


def build_network(config):
    """The `MamlppNetwork` that `config` describes."""
    return MamlppNetwork(
        way=config.way, image_shape=(config.image_size, config.image_size, config.channels),
        num_steps=config.inner_steps, filters=config.filters, num_stages=config.num_stages,
        per_step_bn_statistics=config.bnrs, per_step_bn_affine=config.bnwb,
        learn_inner_rates=config.lslr, inner_lr=config.inner_lr, bn_mode=config.bn_mode)


def build_schedule(config):
    """The MSL and DA `Schedule` that `config` describes."""
    return schedules.Schedule(config.inner_steps, config.msl, config.msl_epochs, config.da,
                              config.first_order_epochs, config.second_order)


def build_optimizer(config):
    """Adam with the cosine-annealed (CA) or constant meta-learning rate."""
    return schedules.meta_optimizer(config.meta_lr, config.min_meta_lr,
                                    config.total_iterations if config.ca else None)


class TrainingInterrupted(Exception):
    """Training stopped on request (SIGINT/SIGTERM) after writing a checkpoint."""


class RunComplete(Exception):
    """The run was trained, tested and exported already; nothing is redone."""


class Trainer:
    """Owns one run: its directory, data, model, optimizer and checkpoints.

    Args:
      config: the resolved `ExperimentConfig`.
      run_dir: a `run_directory.RunDirectory`.
      jit_compile: compile the meta-step with XLA.
      fold_tasks: run a meta-batch's tasks together as grouped convolutions.
      parallel_tasks: tasks adapted at once when they are not folded.
      strategy: a tf.distribute strategy (see distribution.py); only its chief
        writes checkpoints, summaries, results and the export.
    """

    def __init__(self, config, run_dir, jit_compile=False, fold_tasks=False, parallel_tasks=1,
                 strategy=None):
        if config.mixed_precision == AUTO:
            raise ConfigError("mixed_precision=auto must be decided before training: pass the "
                              "configuration through precision.settled", "mixed_precision")
        self.config = config
        self.run_dir = run_dir
        self.strategy = strategy or tf.distribute.get_strategy()
        distribution.check_batch_size(config.batch_size, self.strategy)
        self.is_chief = distribution.is_chief(self.strategy)
        keras.utils.set_random_seed(config.seed)
        self.splits = splits.load_splits(config)
        with self.strategy.scope():
            self.network = build_network(config)
            self.optimizer = build_optimizer(config)
            self.loss_scale = (
                mixed_precision.DynamicLossScale(compute_dtype=mixed_precision.compute_dtype())
                if config.mixed_precision else None)
            self.meta_learner = MetaLearner(
                self.network, self.optimizer, config.batch_size, strategy=self.strategy,
                jit_compile=jit_compile, fold_tasks=fold_tasks, loss_scale=self.loss_scale,
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
        self.writer = (tf.summary.create_file_writer(str(run_dir.path)) if self.is_chief
                       else tf.summary.create_noop_writer())
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
        with self.writer.as_default(step=done):
            tf.summary.text("config", f"```\n{config.to_json()}\n```")
        unvalidated = self.run_dir.read_unvalidated_epoch(done)
        if done and len(history) < start_epoch and unvalidated:
            self._validate_and_save(unvalidated, history)
        tasks = iter(splits.training_tasks(config, self.splits["train"], start_iteration=done))
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
        if not (self.run_dir.path / "export").exists():
            self.export_best(self.run_dir.path / "export")
        return results

    def _validate_and_save(self, record, history):
        """Validates the epoch `record` describes and writes it to the history."""
        history.append({**record, **self.validate(record["epoch"] - 1)})
        if self.is_chief:
            self.run_dir.save_epoch(self.checkpoint, history)

    def train_epoch(self, epoch, tasks):
        """Runs the rest of epoch `epoch` under the schedules in force at that epoch."""
        config = self.config
        weights, multi_step, second_order = self.meta_learner.schedule.at(epoch)
        self._write_schedule_summaries(self.iterations_done, weights, second_order)
        first = self.iterations_done - epoch * config.iters_per_epoch
        progress = Progress(config.iters_per_epoch, f"epoch {epoch + 1}/{config.epochs}",
                            done=first, units_after=(config.epochs - epoch - 1) *
                            config.iters_per_epoch)
        # An epoch resumed after a stop continues the figures of its first part.
        sums, counted = self.run_dir.read_partial_epoch(self.iterations_done) if first else ({}, 0)
        for iteration in range(first, config.iters_per_epoch):
            started = time.monotonic()
            figures = {name: float(value) for name, value in self.meta_learner.meta_update(
                next(tasks), tf.constant(weights), second_order, multi_step).items()}
            if figures.get("skipped_updates"):
                # Mixed precision: the meta-gradient overflowed, so nothing was
                # updated and the loss scale is halved. The step's other
                # figures describe no update and stay out of the epoch's means.
                self._check_loss_scale(figures["loss_scale"], epoch, iteration)
                self._write_training_summaries(self.iterations_done, {
                    name: figures[name] for name in ("skipped_updates", "loss_scale")})
                sums["skipped_updates"] = sums.get("skipped_updates", 0.0) + 1
                progress.update()
            else:
                self._check_finite(figures, epoch, iteration)
                figures["seconds_per_iteration"] = time.monotonic() - started
                self._write_training_summaries(self.iterations_done, figures)
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
        return {"epoch": epoch + 1, "second_order": second_order, "multi_step": multi_step,
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

    def _write_training_summaries(self, step, figures):
        with self.writer.as_default(step=step):
            for name, value in figures.items():
                tf.summary.scalar(f"train/{name}", value)
            tf.summary.scalar("schedule/meta_learning_rate", self.optimizer.learning_rate)

    def _write_schedule_summaries(self, step, weights, second_order):
        """Figures written once an epoch: schedules, learned rates, weight histograms."""
        with self.writer.as_default(step=step):
            for variable in self.network.variables:
                tf.summary.histogram(f"weights/{variable.path}", variable)
            for norm in self.network.norms:
                for bank in (norm.moving_mean, norm.moving_variance, norm.gamma, norm.beta):
                    for row, values in enumerate(bank.numpy()):
                        tf.summary.histogram(f"batch_norm/{bank.path}_step_{row}", values)
            tf.summary.scalar("schedule/second_order", float(second_order))
            for index, weight in enumerate(weights):
                tf.summary.scalar(f"schedule/msl_weight_step_{index}", weight)
            for layer, rates in self.network.inner_rates.items():
                for index, rate in enumerate(rates.numpy()):
                    tf.summary.scalar(f"lslr/{layer}_step_{index}", rate)

    @property
    def evaluation_modes(self):
        """The batch-norm modes a model is scored in: the trained one, and the exported one.

        A transductive model is exported to normalise its queries with the
        support statistics; both figures are recorded, the first ranks.
        """
        return list(dict.fromkeys([self.config.bn_mode, SERVING_MODES[self.config.bn_mode]]))

    def evaluate_split(self, split, num_tasks, bn_mode):
        """Accuracy of the current model on the fixed task set of `split`."""
        config = self.config
        progress = Progress(num_tasks, f"{split} tasks ({bn_mode} batch norm)", unit="task")
        tasks = splits.evaluation_tasks(config, self.splits[split], split, num_tasks)
        result = evaluation.evaluate(
            self.meta_learner, tasks, config.eval_inner_steps, bn_mode, progress)
        progress.close()
        return result

    def validate(self, epoch):
        """Validation accuracy after `epoch` in each of `evaluation_modes`; the first ranks."""
        record = {}
        step = (epoch + 1) * self.config.iters_per_epoch
        for bn_mode in self.evaluation_modes:
            result = self.evaluate_split("val", self.config.val_tasks, bn_mode)
            mean, interval = evaluation.mean_and_interval(result["accuracies"][:, -1])
            record[f"val_accuracy_{bn_mode}"] = mean
            record[f"val_interval_{bn_mode}"] = interval
            with self.writer.as_default(step=step):
                tf.summary.scalar(f"val_{bn_mode}/accuracy", mean)
                tf.summary.scalar(f"val_{bn_mode}/interval", interval)
                for inner_step, accuracy in enumerate(result["accuracies"].mean(axis=0)):
                    tf.summary.scalar(f"val_{bn_mode}/accuracy_after_step_{inner_step}", accuracy)
        self.writer.flush()
        record["val_accuracy"] = record[f"val_accuracy_{self.config.bn_mode}"]
        record["val_interval"] = record[f"val_interval_{self.config.bn_mode}"]
        logging.info("epoch %d: validation accuracy %s", epoch + 1, "; ".join(
            f"{100 * record[f'val_accuracy_{mode}']:.2f}% ± "
            f"{100 * record[f'val_interval_{mode}']:.2f} ({mode} batch norm)"
            for mode in self.evaluation_modes))
        return record

    def test(self):
        """Tests the best validation checkpoints, each alone and as an ensemble.

        Antoniou et al. (2019) report the ensemble of the three best validation
        checkpoints: the mean of their predicted probabilities. Each model and
        the ensemble are scored over the same fixed test tasks in the trained
        batch-norm mode, the headline; a transductive run is also scored as
        its export serves (`evaluation_modes`), under `serving`. The table is
        logged and written to results.json.
        """
        config = self.config
        best = self.run_dir.best_checkpoints()
        if not best:
            raise ValueError(f"{self.run_dir.path} has no validated checkpoint to test yet")
        results = {mode: {"models": [], "probabilities": []} for mode in self.evaluation_modes}
        for val_accuracy, epoch, prefix in best:
            self.run_dir.restore_best(self.network, prefix)
            for mode, scores in results.items():
                result = self.evaluate_split("test", config.test_tasks, mode)
                mean, interval = evaluation.mean_and_interval(result["accuracies"][:, -1])
                scores["models"].append({"epoch": epoch, "val_accuracy": val_accuracy,
                                         "test_accuracy": mean, "test_interval": interval})
                scores["probabilities"].append(result.pop("probabilities"))
        for mode, scores in results.items():
            scores["test_accuracy"], scores["test_interval"] = evaluation.mean_and_interval(
                evaluation.ensemble_accuracies(scores.pop("probabilities"), result["labels"]))
            scores["bn_mode"] = mode
            self._log_test(scores)
        headline, *serving = results.values()
        results = {**headline, "test_tasks": config.test_tasks,
                   "test_seed": splits.stream_seed(config, "test"), "confidence": 0.95,
                   "inner_steps": config.eval_inner_steps,
                   **({"serving": serving[0]} if serving else {})}
        self.run_dir.write_json("results.json", results)
        with self.writer.as_default(step=self.iterations_done):
            for scores in (headline, *serving):
                tf.summary.scalar(f"test_{scores['bn_mode']}/ensemble_accuracy",
                                  scores["test_accuracy"])
        return results

    def _log_test(self, scores):
        rows = [f"epoch {m['epoch']:4d}  val {100 * m['val_accuracy']:6.2f}%  test "
                f"{100 * m['test_accuracy']:6.2f}% ± {100 * m['test_interval']:.2f}"
                for m in scores["models"]]
        logging.info("test accuracy over %d tasks, %s batch norm:\n%s\nensemble of %d: "
                     "%.2f%% ± %.2f", self.config.test_tasks, scores["bn_mode"], "\n".join(rows),
                     len(rows), 100 * scores["test_accuracy"], 100 * scores["test_interval"])

    def export_best(self, export_dir):
        """Exports the best validation checkpoint as an adapting SavedModel."""
        best = self.run_dir.best_checkpoints()
        if not best:
            raise ValueError(f"{self.run_dir.path} has no validated checkpoint to export yet")
        self.run_dir.restore_best(self.network, best[0][2])
        # Image-folder training images are rounded to 8 bits after resizing; Omniglot's are not.
        path = export.export(self.network, self.config.eval_inner_steps, export_dir,
                             rounded_to_uint8=self.config.dataset != "omniglot")
        logging.info("exported the epoch-%d model to %s", best[0][1], path)
        return path
