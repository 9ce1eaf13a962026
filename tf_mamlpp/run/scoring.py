"""A run's model scored on its fixed task sets: validation each epoch, and the final test.

Antoniou et al. (2019) report the ensemble of the three best validation
checkpoints: the mean of their predicted probabilities. Each kept model and
the ensemble are scored over the same fixed test tasks in the trained
batch-norm mode, the headline; a transductive run is also scored as its
export serves (`evaluation_modes`), under `serving` in results.json.

What a user deploys is neither: it is the best checkpoint alone, exported,
in its serving mode, where no query is normalised by another. Its figure is
`served` in results.json, with its accuracy on each test task, which the
SavedModel gives task for task.
"""

from absl import logging

from tf_mamlpp.core import evaluation
from tf_mamlpp.core.batch_norm_modes import SERVING_MODES, evaluation_modes
from tf_mamlpp.run import task_streams
from tf_mamlpp.run.progress import Progress


class Scoring:
    """Validates and tests one run's model.

    Args:
      config: the run's `ExperimentConfig`.
      meta_learner: the run's `MetaLearner`.
      images: {"val", "test", ...} -> the split's class images.
      run_dir: the `RunDirectory`, for the best checkpoints and results.json.
      summaries: the run's `Summaries`.
    """

    def __init__(self, config, meta_learner, images, run_dir, summaries):
        self.config = config
        self.meta_learner = meta_learner
        self.images = images
        self.run_dir = run_dir
        self.summaries = summaries

    @property
    def evaluation_modes(self):
        """This run's `batch_norm_modes.evaluation_modes`; the first ranks."""
        return evaluation_modes(self.config.bn_mode)

    def evaluate_split(self, split, num_tasks, bn_mode):
        """Accuracy of the current model on the fixed task set of `split`."""
        progress = Progress(num_tasks, f"{split} tasks ({bn_mode} batch norm)", unit="task")
        tasks = task_streams.evaluation_tasks(self.config, self.images[split], split, num_tasks)
        result = evaluation.evaluate(
            self.meta_learner, tasks, self.config.eval_inner_steps, bn_mode, progress)
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
            self.summaries.validation(step, bn_mode, mean, interval,
                                      result["accuracies"].mean(axis=0))
        record["val_accuracy"] = record[f"val_accuracy_{self.config.bn_mode}"]
        record["val_interval"] = record[f"val_interval_{self.config.bn_mode}"]
        logging.info("epoch %d: validation accuracy %s", epoch + 1, "; ".join(
            f"{100 * record[f'val_accuracy_{mode}']:.2f}% ± "
            f"{100 * record[f'val_interval_{mode}']:.2f} ({mode} batch norm)"
            for mode in self.evaluation_modes))
        return record

    def test(self, step):
        """Tests the best validation checkpoints, each alone and as an ensemble.

        Args:
          step: the run's iteration, for TensorBoard.

        Returns:
          the results, as written to results.json and logged as a table.
        """
        config = self.config
        best = self.run_dir.best_checkpoints()
        if not best:
            raise ValueError(f"{self.run_dir.path} has no validated checkpoint to test yet")
        results = {mode: {"models": [], "probabilities": []} for mode in self.evaluation_modes}
        served = None
        for val_accuracy, epoch, prefix in best:
            self.run_dir.restore_best(self.meta_learner.network, prefix)
            for mode, scores in results.items():
                result = self.evaluate_split("test", config.test_tasks, mode)
                task_accuracies = result["accuracies"][:, -1]
                mean, interval = evaluation.mean_and_interval(task_accuracies)
                scores["models"].append({"epoch": epoch, "val_accuracy": val_accuracy,
                                         "test_accuracy": mean, "test_interval": interval})
                scores["probabilities"].append(result.pop("probabilities"))
                if served is None and mode == SERVING_MODES[config.bn_mode]:
                    served = {"epoch": epoch, "bn_mode": mode, "test_accuracy": mean,
                              "test_interval": interval,
                              "task_accuracies": task_accuracies.tolist()}
        for mode, scores in results.items():
            scores["test_accuracy"], scores["test_interval"] = evaluation.mean_and_interval(
                evaluation.ensemble_accuracies(scores.pop("probabilities"), result["labels"]))
            scores["bn_mode"] = mode
            self._log_test(scores)
        headline, *serving = results.values()
        results = {**headline, "test_tasks": config.test_tasks,
                   "test_seed": task_streams.stream_seed(config, "test"), "confidence": 0.95,
                   "inner_steps": config.eval_inner_steps,
                   **({"serving": serving[0]} if serving else {}), "served": served}
        self.run_dir.write_json("results.json", results)
        self.summaries.test(step, [headline, *serving])
        return results

    def _log_test(self, scores):
        rows = [f"epoch {m['epoch']:4d}  val {100 * m['val_accuracy']:6.2f}%  test "
                f"{100 * m['test_accuracy']:6.2f}% ± {100 * m['test_interval']:.2f}"
                for m in scores["models"]]
        logging.info("test accuracy over %d tasks, %s batch norm:\n%s\nensemble of %d: "
                     "%.2f%% ± %.2f", self.config.test_tasks, scores["bn_mode"], "\n".join(rows),
                     len(rows), 100 * scores["test_accuracy"], 100 * scores["test_interval"])
