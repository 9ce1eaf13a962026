"""The MAML++ meta-update compiled, distributed and in mixed precision, as a Keras model.

The outer loss is meta_step.py's. One function adapts a replica's tasks and applies the meta-gradient:
`_replica_step`, reached from `fit` (`train_step`) and from the trainer
(`meta_update`) alike. Its graph holds one inner loop however many tasks there are
(tracing a loop unrolled over eight tasks takes over a minute): either
`tf.map_fn` runs the tasks one after another, or they are folded into
grouped convolutions and run together (see network.py). `tf.map_fn` runs
`parallel_tasks` tasks at a time (see cpu_threads.py). The derivative
order and whether the multi-step loss is active are Python arguments, so the
function is traced once per combination in force, at most three times in a
run, never per step; the MSL weights are a tensor. Under mixed precision (a `DynamicLossScale`) the
meta-step computes in its 16-bit dtype with scaled losses, and an update whose
meta-gradient is not finite is skipped; evaluation stays float32.

As a `keras.Model`, `fit` runs `train_step` (a meta-update in the phase of
the epoch, which the `FollowSchedule` callback sets) and `evaluate` runs
`test_step` (adaptation and the target accuracy).
"""

import keras
import tensorflow as tf

from tf_mamlpp.config_error import ConfigError
from tf_mamlpp.core.inner_loop import adapt_and_evaluate, support_states
from tf_mamlpp.core.meta_step import fills_adapted_bank, outer_loss
from tf_mamlpp.core.mixed_precision import all_finite
from tf_mamlpp.core.schedules import Schedule, meta_optimizer
from tf_mamlpp.hardware.devices import grouped_convolution_gradients

TASK_KEYS = ("support_images", "support_labels", "target_images", "target_labels")


class MetaLearner(keras.Model):
    """Meta-trains a `MamlppNetwork`, or any learner with its protocol, with Adam.

    Args:
      network: the `MamlppNetwork` (or `KerasBackbone`) holding every
        meta-parameter.
      optimizer: a Keras optimizer; the model is compiled with it. Default:
        `meta_optimizer()`, Adam with the paper's learning rate (pass one with
        the CA schedule, see `schedules.meta_optimizer`, for cosine annealing).
      strategy: a `tf.distribute.Strategy`; the default strategy if None.
      jit_compile: compile the steps with XLA.
      fold_tasks: run the tasks of a meta-batch together, folded into grouped
        convolutions; False runs each task's graph on its own.
      parallel_tasks: with fold_tasks False, how many tasks run at once; the
        memory of that many tasks' graphs is alive at a time.
      loss_scale: None (float32), or the `DynamicLossScale` of a mixed-precision
        run: the meta-step then computes in its `compute_dtype` and scales its
        losses.
      schedule: the MSL and DA `Schedule`; the paper's by default. `fit`
        follows it epoch by epoch; `phase_at` gives an epoch's phase for
        `meta_update`.
      eval_inner_steps: inner steps of `evaluate`; the trained number by default.
    Meta-training normalises in the network's `bn_mode` (see
    per_step_batch_norm.py), and takes the network's `inner_steps`.
    """

    def __init__(self, network, optimizer=None, strategy=None, jit_compile=False,
                 fold_tasks=False, loss_scale=None, parallel_tasks=1, schedule=None,
                 eval_inner_steps=None, **kwargs):
        super().__init__(**kwargs)
        compute_dtype = loss_scale.compute_dtype if loss_scale is not None else tf.float32
        if fold_tasks and not grouped_convolution_gradients(compute_dtype):
            raise ConfigError(f"fold_tasks=True needs gradients of grouped convolutions in "
                              f"{compute_dtype.name}, which TensorFlow lacks on this device (on "
                              f"a CPU they need oneDNN, and AVX-512 for bfloat16); pass "
                              f"fold_tasks=False", "fold_tasks")
        self.network = network
        self.fold_tasks = fold_tasks
        self.parallel_tasks = parallel_tasks
        self.loss_scale = loss_scale
        self.strategy = strategy or tf.distribute.get_strategy()
        self.schedule = schedule or Schedule()
        self.eval_inner_steps = eval_inner_steps or network.inner_steps
        self.phase = self.phase_at(0)
        # fit reads the MSL weights from here, so a new epoch's need no retrace.
        self.msl_weights = self.add_weight(
            name="msl_weights", shape=(network.inner_steps,), trainable=False,
            initializer=keras.initializers.Constant(self.phase.msl_weights))
        self.loss_mean = keras.metrics.Mean(name="loss")
        self.accuracy_mean = keras.metrics.Mean(name="accuracy")
        optimizer = optimizer or meta_optimizer()
        # Slots created now, not inside the first trace (which would trace twice).
        optimizer.build(network.trainable_variables)
        self.compile(optimizer=optimizer, jit_compile=jit_compile)
        # autograph=False: the steps' Python loops (inner steps, stages) are
        # meant to unroll; converting them cost 40% of the first trace.
        self._compiled_replica_step = tf.function(self._replica_step, jit_compile=jit_compile,
                                                  autograph=False)
        # A last, smaller batch of tasks is traced once more, with its own static shape.
        self.evaluate_batch = tf.function(self._evaluate_batch_fn, jit_compile=jit_compile,
                                          autograph=False)
        self.built = True

    @property
    def metrics(self):
        return [self.loss_mean, self.accuracy_mean]

    def fit(self, *args, callbacks=None, **kwargs):
        """`keras.Model.fit`, with MSL and DA following the epoch (`FollowSchedule`)."""
        kwargs.setdefault("shuffle", False)  # episodes come shuffled
        return super().fit(*args, callbacks=[FollowSchedule(), *(callbacks or [])], **kwargs)

    def phase_at(self, epoch):
        """The schedule's `Phase` of `epoch` (from 0) for this network's inner steps."""
        return self.schedule.at(epoch, self.network.inner_steps)

    def train_step(self, data):
        """`fit`'s step: a meta-update on this replica's tasks in the epoch's `phase`."""
        tasks = {key: data[key] for key in TASK_KEYS}
        local_tasks = tf.cast(tf.shape(tasks["support_images"])[0], tf.float32)
        sums = self._replica_step(tasks, self.phase._replace(msl_weights=self.msl_weights))[
            "task_sums"]
        self.loss_mean.update_state(sums["loss"] / local_tasks)
        self.accuracy_mean.update_state(sums["accuracy"] / local_tasks)
        return {metric.name: metric.result() for metric in self.metrics}

    def test_step(self, data):
        """`evaluate`'s step: adaptation to each task, and its target accuracy."""
        result = self._evaluate_batch_fn(data, self.eval_inner_steps, self.network.bn_mode)
        self.accuracy_mean.update_state(tf.reduce_mean(result["accuracies"][:, -1]))
        return {"accuracy": self.accuracy_mean.result()}

    @property
    def trace_count(self):
        """Traces of the meta-step so far (bounded by the schedule's combinations)."""
        return self._compiled_replica_step.experimental_get_tracing_count()

    def meta_update(self, batch, phase):
        """One meta-update on a meta-batch, outside `fit`.

        Args:
          batch: dict of tensors (see TASK_KEYS) holding the whole global
            meta-batch, leading axis tasks; each replica takes a contiguous
            share. Every worker builds the same global batch (tasks are a pure
            function of the seed and index), so no input pipeline needs to be
            distributed.
          phase: the `Phase` in force (`phase_at`); its derivative order and
            MSL switch are Python values, traced once per combination.

        Returns:
          dict of measurement tensors, means over the global meta-batch; under
          mixed precision also `loss_scale`, the scale this step used, and
          `skipped_updates`, 1.0 when its meta-gradient was not finite and
          nothing was updated (the iteration counter still advances).
        """
        global_batch_size = int(batch["support_images"].shape[0])
        shares = self.strategy.experimental_distribute_values_from_function(
            lambda context: _share(batch, context))
        per_replica = self.strategy.run(self._compiled_replica_step, args=(
            shares, phase._replace(msl_weights=tf.constant(phase.msl_weights))))
        reduce = self.strategy.reduce
        measurements = {
            name: reduce(tf.distribute.ReduceOp.SUM, value, axis=None) / global_batch_size
            for name, value in per_replica["task_sums"].items()}
        measurements.update({
            name: reduce(tf.distribute.ReduceOp.MEAN, value, axis=None)
            for name, value in per_replica["replicated"].items()})
        return measurements

    def _tasks_step(self, tasks, phase):
        """Summed outer loss of a batch of tasks and its gradient for every trainable variable.

        Returns:
          dict of sums over the tasks (`gradients`, `loss`, `accuracy`,
          `target_losses` per scored step) and of batch-norm statistics
          averaged over them (`bn_means`, `bn_variances`, per stage (steps, filters)).
          Losses and gradients are unscaled under mixed precision.
        """
        variables = self.network.trainable_variables
        mixed = self.loss_scale is not None
        scale = self.loss_scale.scale.read_value() if mixed else None
        with tf.GradientTape() as tape:
            loss, result = outer_loss(
                self.network, tasks, phase, compute_dtype=self.loss_scale.compute_dtype if mixed else tf.float32,
                loss_scale=scale)
            # The inner losses carry the same scale (see mixed_precision.py).
            scaled_loss = loss * scale if mixed else loss
        gradients = tape.gradient(
            scaled_loss, variables, unconnected_gradients=tf.UnconnectedGradients.ZERO)
        if mixed:
            gradients = [gradient / scale for gradient in gradients]
        return {
            "gradients": [tf.convert_to_tensor(g) for g in gradients],
            "loss": loss,
            "target_losses": tf.reduce_sum(result["target_losses"], axis=0),
            "accuracy": tf.reduce_sum(result["target_accuracies"][:, -1]),
            "bn_means": result["bn_means"],
            "bn_variances": result["bn_variances"],
        }

    def _task_by_task(self, tasks, phase):
        """`_tasks_step` over the tasks, `parallel_tasks` of them at a time."""
        per_task = tf.map_fn(
            lambda task: self._tasks_step(
                tf.nest.map_structure(lambda t: t[tf.newaxis], task), phase),
            tasks, fn_output_signature=self._tasks_step_signature(phase.multi_step),
            parallel_iterations=self.parallel_tasks)
        return {name: [tf.reduce_mean(v, axis=0) for v in value] if name.startswith("bn_")
                else tf.nest.map_structure(lambda v: tf.reduce_sum(v, axis=0), value)
                for name, value in per_task.items()}

    def _replica_step(self, tasks, phase):
        """The meta-update from this replica's `tasks`; sums over them and replicated figures.

        The one route into a meta-update: `train_step` and `meta_update` both
        call it in replica context, with this replica's share of the tasks.
        """
        variables = self.network.trainable_variables
        replica_context = tf.distribute.get_replica_context()
        global_batch_size = tf.cast(
            tf.shape(tasks["support_images"])[0] * replica_context.num_replicas_in_sync,
            tf.float32)
        step = self._tasks_step if self.fold_tasks else self._task_by_task
        sums = step(tasks, phase)
        # Each replica sums its tasks' gradients over the global task count;
        # the optimizer all-reduces the sum across replicas into a global mean.
        gradients = [g / global_batch_size for g in sums["gradients"]]
        update = (gradients, sums["bn_means"], sums["bn_variances"])
        # The global meta-gradient, the same on every replica.
        reduced = replica_context.all_reduce(tf.distribute.ReduceOp.SUM, gradients)
        before = [tf.identity(v) for v in variables]
        replicated = {}
        if self.loss_scale is None:
            self._apply_update(*update)
        else:
            finite = all_finite(reduced)
            replicated["loss_scale"] = self.loss_scale.scale.read_value()
            replicated["skipped_updates"] = 1.0 - tf.cast(finite, tf.float32)
            self._apply_update_if(finite, *update)
            self.loss_scale.update(finite)
        task_sums = {"loss": sums["loss"], "accuracy": sums["accuracy"]}
        if phase.multi_step:
            for step_index in range(self.network.inner_steps):
                task_sums[f"target_loss_step_{step_index}"] = sums["target_losses"][step_index]
        # Figures of the whole update, the same on every replica.
        replicated.update({
            "gradient_norm": tf.linalg.global_norm(reduced),
            "parameter_norm": tf.linalg.global_norm(variables),
            "update_norm": tf.linalg.global_norm([v - b for v, b in zip(variables, before)]),
        })
        return {"task_sums": task_sums, "replicated": replicated}

    def _apply_update(self, gradients, bn_means, bn_variances):
        """Adam on this replica's share of the meta-gradient; the statistics into the banks."""
        self.optimizer.apply_gradients(zip(gradients, self.network.trainable_variables))
        self.network.update_running_statistics(bn_means, bn_variances)

    def _apply_update_if(self, finite, *update):
        """`_apply_update(*update)` where `finite`; else a skipped update that still counts.

        `finite` is computed from the all-reduced meta-gradient, so every
        replica takes the same branch. The branch is chosen in cross-replica
        context: under MirroredStrategy a tf.cond in replica context cannot
        hold the update's synchronisation (the optimizer's all-reduce, the
        mean-aggregated banks). keras.optimizers.LossScaleOptimizer does the
        same, but tests only the first replica's gradients, before they are
        reduced (a NaN on another replica reaches the variables), and leaves
        the iteration counter behind on a skipped step; here that counter is
        the run's position (task stream, epoch, schedules), so it advances.
        """
        def cross_replica(strategy, finite, *update):
            def apply():
                strategy.extended.call_for_each_replica(self._apply_update, args=update)

            def skip():
                self.optimizer.iterations.assign_add(1)

            tf.cond(strategy.experimental_local_results(finite)[0], apply, skip)

        tf.distribute.get_replica_context().merge_call(cross_replica, args=(finite, *update))

    def _tasks_step_signature(self, multi_step):
        spec = lambda shape: tf.TensorSpec(shape, tf.float32)
        inner_steps, bn_mode = self.network.inner_steps, self.network.bn_mode
        states = support_states(inner_steps, bn_mode, fills_adapted_bank(bn_mode))
        stat_specs = [spec((states, norm.moving_mean.shape[-1])) for norm in self.network.norms]
        return {
            "gradients": [spec(v.shape) for v in self.network.trainable_variables],
            "loss": spec(()),
            "target_losses": spec((inner_steps if multi_step else 1,)),
            "accuracy": spec(()),
            "bn_means": stat_specs,
            "bn_variances": list(stat_specs),
        }

    def _evaluate_batch_fn(self, batch, num_steps, bn_mode):
        """Adapts to each task of `batch` and scores its target set after every step.

        The tasks run as the meta-step runs them: folded into grouped
        convolutions with `fold_tasks`, else `parallel_tasks` at a time.

        Args:
          batch: dict (see TASK_KEYS) with a leading tasks axis.
          num_steps: Python int, inner steps to take (steps past the trained
            number reuse the last step's banks and rates).
          bn_mode: the batch-norm mode (see per_step_batch_norm.py).

        Returns:
          dict with `accuracies` (tasks, num_steps) and `probabilities`
          (tasks, way*query, way) after the last step.
        """
        def evaluate(tasks):
            result = adapt_and_evaluate(
                self.network, tasks, num_steps, second_order=False,
                target_steps=list(range(num_steps)), bn_mode=bn_mode)
            return {"accuracies": result["target_accuracies"],
                    "probabilities": tf.nn.softmax(result["logits"])}

        tasks = {key: batch[key] for key in TASK_KEYS}
        if self.fold_tasks:
            return evaluate(tasks)
        queries, way = batch["target_labels"].shape[-1], self.network.way
        per_task = tf.map_fn(
            lambda task: evaluate(tf.nest.map_structure(lambda t: t[tf.newaxis], task)),
            tasks, parallel_iterations=self.parallel_tasks, fn_output_signature={
                "accuracies": tf.TensorSpec((1, num_steps), tf.float32),
                "probabilities": tf.TensorSpec((1, queries, way), tf.float32)})
        return {name: value[:, 0] for name, value in per_task.items()}


class FollowSchedule(keras.callbacks.Callback):
    """Sets a `MetaLearner`'s phase at each epoch of `fit`: MSL weights, MSL, DA.

    A change of derivative order or of MSL rebuilds the train function (at
    most three traces a run); the MSL weights are a variable, read by the
    traced step.
    """

    def on_epoch_begin(self, epoch, logs=None):
        learner = self.model
        phase = learner.phase_at(epoch)
        learner.msl_weights.assign(phase.msl_weights)
        changed = phase[1:] != learner.phase[1:]
        learner.phase = phase
        if changed:
            learner.make_train_function(force=True)


def _share(batch, context):
    """Replica `context`'s share of the global meta-batch: a contiguous slice of its tasks."""
    share = int(batch["support_images"].shape[0]) // context.num_replicas_in_sync
    start = context.replica_id_in_sync_group * share
    return {key: batch[key][start:start + share] for key in TASK_KEYS}
