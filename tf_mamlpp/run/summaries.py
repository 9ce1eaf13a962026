"""What a run writes for TensorBoard: training figures, schedules, weights, validation and test.

Only the chief writes (a no-op writer elsewhere), into the run directory,
so `tensorboard --logdir runs` shows every run side by side.
"""

import tensorflow as tf


class Summaries:
    """The TensorBoard writer of one run.

    Args:
      run_path: the run directory; the event files go there.
      is_chief: whether this process writes (see distribution.is_chief).
    """

    def __init__(self, run_path, is_chief=True):
        self.writer = (tf.summary.create_file_writer(str(run_path)) if is_chief
                       else tf.summary.create_noop_writer())

    def configuration(self, step, config):
        """The resolved configuration as text."""
        with self.writer.as_default(step=step):
            tf.summary.text("config", f"```\n{config.to_json()}\n```")

    def training(self, step, figures, learning_rate=None):
        """One meta-iteration's figures, and the meta learning rate it leaves."""
        with self.writer.as_default(step=step):
            for name, value in figures.items():
                tf.summary.scalar(f"train/{name}", value)
            if learning_rate is not None:
                tf.summary.scalar("schedule/meta_learning_rate", learning_rate)

    def epoch_start(self, step, network, phase):
        """Figures written once an epoch: schedules, learned rates, weight and bank histograms."""
        with self.writer.as_default(step=step):
            for variable in network.variables:
                tf.summary.histogram(f"weights/{variable.path}", variable)
            for norm in network.norms:
                for bank in (norm.moving_mean, norm.moving_variance, norm.gamma, norm.beta):
                    for row, values in enumerate(bank.numpy()):
                        tf.summary.histogram(f"batch_norm/{bank.path}_step_{row}", values)
            tf.summary.scalar("schedule/second_order", float(phase.second_order))
            for index, weight in enumerate(phase.msl_weights):
                tf.summary.scalar(f"schedule/msl_weight_step_{index}", weight)
            for layer, rates in network.inner_rates.items():
                for index, rate in enumerate(rates.numpy()):
                    tf.summary.scalar(f"lslr/{layer}_step_{index}", rate)

    def validation(self, step, bn_mode, mean, interval, accuracy_after_step):
        """Validation accuracy in `bn_mode`, its interval, and the accuracy after each inner step."""
        with self.writer.as_default(step=step):
            tf.summary.scalar(f"val_{bn_mode}/accuracy", mean)
            tf.summary.scalar(f"val_{bn_mode}/interval", interval)
            for inner_step, accuracy in enumerate(accuracy_after_step):
                tf.summary.scalar(f"val_{bn_mode}/accuracy_after_step_{inner_step}", accuracy)
        self.writer.flush()

    def test(self, step, scores):
        """The ensemble's test accuracy in each batch-norm mode scored."""
        with self.writer.as_default(step=step):
            for mode_scores in scores:
                tf.summary.scalar(f"test_{mode_scores['bn_mode']}/ensemble_accuracy",
                                  mode_scores["test_accuracy"])
        self.writer.flush()
