"""The MAML++ meta-update and the batched evaluation step.

One compiled function adapts to every task of a meta-batch and returns the
meta-gradient. Its graph holds one inner loop however many tasks there are
(tracing a loop unrolled over eight tasks takes over a minute): either
`tf.map_fn` runs the tasks one after another, or they are folded into
grouped convolutions and run together (see network.py). The derivative
order and whether the multi-step loss is active are Python arguments, so the
function is traced once per combination in force, at most three times in a
run, never per step.
"""

import tensorflow as tf

from tf_mamlpp.inner_loop import adapt_and_evaluate
from tf_mamlpp.per_step_batch_norm import BATCH

TASK_KEYS = ("support_images", "support_labels", "target_images", "target_labels")


class MetaLearner:
    """Meta-trains a `MamlppNetwork` with Adam.

    Args:
      network: the `MamlppNetwork` holding every meta-parameter.
      optimizer: a Keras optimizer (Adam with the CA schedule, as built by the
        trainer).
      global_batch_size: tasks per meta-batch over all replicas; per-task
        losses are divided by it, so the all-reduced sum of replica gradients
        is the mean over tasks.
      strategy: a `tf.distribute.Strategy`; the default strategy if None.
      jit_compile: compile the steps with XLA.
      fold_tasks: run the tasks of a meta-batch together, folded into grouped
        convolutions (fast); False runs them one at a time (less memory).
    """

    def __init__(self, network, optimizer, global_batch_size, strategy=None, jit_compile=False,
                 fold_tasks=False):
        self.network = network
        self.fold_tasks = fold_tasks
        self.optimizer = optimizer
        self.global_batch_size = global_batch_size
        self.strategy = strategy or tf.distribute.get_strategy()
        self.num_steps = network.num_steps
        # Slots created now, not inside the first trace (which would trace twice).
        optimizer.build(network.trainable_variables)
        self._replica_train_step = tf.function(self._replica_train_step_fn, jit_compile=jit_compile)
        self.evaluate_batch = tf.function(
            self._evaluate_batch_fn, jit_compile=jit_compile, reduce_retracing=True)

    @property
    def trace_count(self):
        """Traces of the meta-step so far (bounded by the schedule's combinations)."""
        return self._replica_train_step.experimental_get_tracing_count()

    def train_step(self, batch, msl_weights, second_order, multi_step):
        """One meta-update on a meta-batch.

        Args:
          batch: dict of tensors (see TASK_KEYS) holding the whole global
            meta-batch, leading axis tasks; each replica takes its share.
          msl_weights: (num_steps,) float32 multi-step loss weights.
          second_order: Python bool, the derivative order in force (DA).
          multi_step: Python bool, whether the outer loss sums every step (MSL).

        Returns:
          dict of measurement tensors, means over the global meta-batch.
        """
        per_replica = self.strategy.run(
            self._replica_train_step, args=(batch, msl_weights, second_order, multi_step))
        reduce = self.strategy.reduce
        measurements = {
            name: reduce(tf.distribute.ReduceOp.SUM, value, axis=None) / self.global_batch_size
            for name, value in per_replica["task_sums"].items()}
        measurements.update({
            name: reduce(tf.distribute.ReduceOp.MEAN, value, axis=None)
            for name, value in per_replica["replicated"].items()})
        return measurements

    def _tasks_step(self, tasks, msl_weights, second_order, multi_step):
        """Summed outer loss of a batch of tasks and its gradient for every trainable variable.

        Returns:
          dict of sums over the tasks (`gradients`, `loss`, `accuracy`,
          `target_losses` per scored step) and of batch-norm statistics
          averaged over them (`bn_means`, `bn_variances`, per stage (steps, filters)).
        """
        last = self.num_steps - 1
        target_steps = list(range(self.num_steps)) if multi_step else [last]
        weights = msl_weights if multi_step else tf.ones([1])
        variables = self.network.trainable_variables
        with tf.GradientTape() as tape:
            result = adapt_and_evaluate(
                self.network, tasks, self.num_steps, second_order, target_steps)
            loss = tf.reduce_sum(result["target_losses"] * weights)
        gradients = tape.gradient(
            loss, variables, unconnected_gradients=tf.UnconnectedGradients.ZERO)
        return {
            "gradients": [tf.convert_to_tensor(g) for g in gradients],
            "loss": loss,
            "target_losses": tf.reduce_sum(result["target_losses"], axis=0),
            "accuracy": tf.reduce_sum(result["target_accuracies"][:, -1]),
            "bn_means": result["bn_means"],
            "bn_variances": result["bn_variances"],
        }

    def _one_task_at_a_time(self, tasks, msl_weights, second_order, multi_step):
        """`_tasks_step` over the tasks one by one: less memory, more time."""
        per_task = tf.map_fn(
            lambda task: self._tasks_step(
                tf.nest.map_structure(lambda t: t[tf.newaxis], task),
                msl_weights, second_order, multi_step),
            tasks, fn_output_signature=self._tasks_step_signature(multi_step),
            # On a few cores, overlapping tasks only contend for them.
            parallel_iterations=1)
        return {name: [tf.reduce_mean(v, axis=0) for v in value] if name.startswith("bn_")
                else tf.nest.map_structure(lambda v: tf.reduce_sum(v, axis=0), value)
                for name, value in per_task.items()}

    def _replica_tasks(self, batch):
        """This replica's share of the global meta-batch: a contiguous slice of tasks.

        Every worker builds the same global batch (tasks are a pure function of
        the seed and index), so no input pipeline needs to be distributed.
        """
        context = tf.distribute.get_replica_context()
        share = self.global_batch_size // context.num_replicas_in_sync
        start = context.replica_id_in_sync_group * share
        return {key: batch[key][start:start + share] for key in TASK_KEYS}

    def _replica_train_step_fn(self, batch, msl_weights, second_order, multi_step):
        tasks = self._replica_tasks(batch)
        variables = self.network.trainable_variables
        step = self._tasks_step if self.fold_tasks else self._one_task_at_a_time
        sums = step(tasks, msl_weights, second_order, multi_step)
        # Each replica sums its tasks' gradients over the global task count;
        # the optimizer all-reduces the sum across replicas into a global mean.
        gradients = [g / self.global_batch_size for g in sums["gradients"]]
        before = [tf.identity(v) for v in variables]
        self.optimizer.apply_gradients(zip(gradients, variables))
        self.network.update_running_statistics(sums["bn_means"], sums["bn_variances"])
        replica_context = tf.distribute.get_replica_context()
        task_sums = {"loss": sums["loss"], "accuracy": sums["accuracy"]}
        if multi_step:
            for step_index in range(self.num_steps):
                task_sums[f"target_loss_step_{step_index}"] = sums["target_losses"][step_index]
        # Figures of the whole update, the same on every replica.
        replicated = {
            "gradient_norm": tf.linalg.global_norm(
                replica_context.all_reduce(tf.distribute.ReduceOp.SUM, gradients)),
            "parameter_norm": tf.linalg.global_norm(variables),
            "update_norm": tf.linalg.global_norm([v - b for v, b in zip(variables, before)]),
        }
        return {"task_sums": task_sums, "replicated": replicated}

    def _tasks_step_signature(self, multi_step):
        spec = lambda shape: tf.TensorSpec(shape, tf.float32)
        stat_specs = [spec((self.num_steps, norm.moving_mean.shape[-1]))
                      for norm in self.network.norms]
        return {
            "gradients": [spec(v.shape) for v in self.network.trainable_variables],
            "loss": spec(()),
            "target_losses": spec((self.num_steps if multi_step else 1,)),
            "accuracy": spec(()),
            "bn_means": stat_specs,
            "bn_variances": list(stat_specs),
        }

    def _evaluate_batch_fn(self, batch, num_steps, bn_mode=BATCH):
        """Adapts to each task of `batch` and scores its target set after every step.

        Args:
          batch: dict (see TASK_KEYS) with a leading tasks axis.
          num_steps: Python int, inner steps to take (steps past the trained
            number reuse the last step's banks and rates).
          bn_mode: BATCH (transductive) or RUNNING batch-norm statistics.

        Returns:
          dict with `accuracies` (tasks, num_steps) and `probabilities`
          (tasks, way*query, way) after the last step.
        """
        tasks = {key: batch[key] for key in TASK_KEYS}
        result = adapt_and_evaluate(
            self.network, tasks, num_steps, second_order=False,
            target_steps=list(range(num_steps)), bn_mode=bn_mode)
        return {"accuracies": result["target_accuracies"],
                "probabilities": tf.nn.softmax(result["logits"])}
