"""MAML++ top to bottom: one meta-update on a batch of tasks, float32, one device.

Read this file first. Where each technique of Antoniou et al. (2019) acts:
- LSLR: the inner loop steps each layer by its own learned rate for that
  step (`inner_loop.inner_update`, with `FastWeightsModel.inner_rate` of
  fast_weights.py).
- BNWB and BNRS: every weight state normalises with its own gamma/beta row
  and, in the `running` mode, its own running statistics; the support
  statistics of the update are folded into those banks after it
  (per_step_batch_norm.py).
- MSL: the outer loss weights the target loss after every inner step
  (`outer_loss`); the weights anneal towards the last step (`Schedule`).
- DA: the first epochs differentiate the inner gradients as constants, so
  the meta-gradient is first order; later ones keep them on the tape
  (`inner_loop.inner_update`; the epoch's order is `Schedule`'s, schedules.py).
- CA: the optimizer's learning rate follows a cosine schedule
  (`schedules.meta_learning_rate`).
meta_learner.py runs the same `outer_loss` compiled, distributed, task by
task, and in mixed precision.
"""

import tensorflow as tf

from tf_mamlpp.core.batch_norm_modes import RUNNING
from tf_mamlpp.core.inner_loop import adapt_and_evaluate


def outer_loss(network, tasks, phase, compute_dtype=tf.float32, loss_scale=None):
    """The MAML++ outer loss summed over `tasks`, and what adaptation measured.

    Args:
      network: a `FastWeightsModel` (see fast_weights.py).
      tasks: dict of (tasks, ...) tensors, the batch format of episodes.py.
      phase: a `schedules.Phase`: MSL weights, whether MSL is in force, and
        the derivative order.
      compute_dtype, loss_scale: see `inner_loop.inner_update`.

    Returns:
      (loss, result): the weighted sum of target losses over the tasks, and
      `adapt_and_evaluate`'s result.
    """
    inner_steps = network.inner_steps
    target_steps = list(range(inner_steps)) if phase.multi_step else [inner_steps - 1]
    weights = phase.msl_weights if phase.multi_step else tf.ones([1])
    result = adapt_and_evaluate(
        network, tasks, inner_steps, phase.second_order, target_steps, network.bn_mode,
        compute_dtype, loss_scale, final_statistics=fills_adapted_bank(network.bn_mode))
    return tf.reduce_sum(result["target_losses"] * weights), result


def fills_adapted_bank(bn_mode):
    """Whether meta-training passes the support set through the adapted weights too.

    The running mode normalises the last target pass by the bank of the
    adapted weights, so training fills that bank; the support and TaskNorm
    modes make that pass anyway, and the transductive mode needs no bank.
    """
    return bn_mode == RUNNING


def meta_step(network, optimizer, tasks, phase):
    """One meta-update of `network` on a batch of tasks, taken one task at a time.

    Returns:
      dict with the mean outer `loss` and the mean target `accuracy` after
      the last inner step.
    """
    num_tasks = tasks["support_images"].shape[0]
    variables = network.trainable_variables
    with tf.GradientTape() as tape:
        per_task = [outer_loss(network, {key: value[i:i + 1] for key, value in tasks.items()},
                               phase) for i in range(num_tasks)]
        loss = tf.add_n([task_loss for task_loss, _ in per_task]) / num_tasks
    gradients = tape.gradient(loss, variables,
                              unconnected_gradients=tf.UnconnectedGradients.ZERO)
    optimizer.apply_gradients(zip(gradients, variables))
    results = [result for _, result in per_task]
    network.update_running_statistics(*[
        [tf.reduce_mean(tf.stack(per_norm), axis=0) for per_norm in zip(*statistics)]
        for statistics in ([r["bn_means"] for r in results], [r["bn_variances"] for r in results])])
    accuracies = [result["target_accuracies"][0, -1] for result in results]
    return {"loss": loss, "accuracy": tf.reduce_mean(accuracies)}
