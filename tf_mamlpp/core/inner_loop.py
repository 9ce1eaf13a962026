"""Task adaptation: the inner loop of MAML++.

Adaptation is a function: it takes the network, fast weights and a support
set and returns new fast weights, changing no variable. The target set is
scored at a weight state with the support pass at that state (whose
statistics normalise it outside the transductive mode, see
per_step_batch_norm.py), so the loop visits the S + 1 states in order and,
where the mode needs it, passes the support set once more through the
adapted weights. Differentiating its
result under an outer tape gives the meta-gradient: second order when the
inner gradients stay on the tape, first order when they are stopped (Finn et
al., 2017, section 5.2; MAML++ derivative-order annealing switches between
the two). Under mixed precision each step's support loss is scaled before it
is differentiated and its gradient divided back in float32 (see
mixed_precision.py).
"""

import tensorflow as tf

from tf_mamlpp.core.batch_norm_modes import SUPPORT, TASK_NORM, TRANSDUCTIVE


def cross_entropy(labels, logits):
    """Per-task mean softmax cross-entropy: (tasks, n) labels, (tasks, n, way) logits -> (tasks,)."""
    return tf.reduce_mean(
        tf.nn.sparse_softmax_cross_entropy_with_logits(labels=labels, logits=logits), axis=-1)


def accuracy(labels, logits):
    """Per-task fraction of (tasks, n) labels that the (tasks, n, way) logits rank first."""
    predictions = tf.argmax(logits, axis=-1, output_type=labels.dtype)
    return tf.reduce_mean(tf.cast(tf.equal(predictions, labels), logits.dtype), axis=-1)


def inner_update(network, fast_weights, support_images, support_labels, step,
                 second_order, bn_mode=TRANSDUCTIVE, compute_dtype=tf.float32, loss_scale=None):
    """One step of gradient descent on each task's support loss.

    The tasks' losses are summed before differentiating: each task's weights
    affect only its own loss, so every task gets exactly its own gradient.

    Args:
      network: a `MamlppNetwork`.
      fast_weights: dict name -> (tasks, ...) tensor, the weights before this
        step (weight state `step`).
      support_images: (tasks, way*shot, height, width, channels).
      support_labels: (tasks, way*shot) int32.
      step: Python int, selects the step's batch-norm banks and rates (LSLR).
      second_order: keep the inner gradient on any enclosing tape, so the
        meta-gradient includes its derivative; stop it otherwise.
      bn_mode: one of per_step_batch_norm.MODES.
      compute_dtype: dtype of the forward and backward passes (float16 or
        bfloat16 under mixed precision); the weights and their gradients stay float32.
      loss_scale: None, or a float32 scalar that the support loss is
        multiplied by before differentiating, and the gradients divided by
        after: a float16 backward pass of the unscaled loss underflows.

    Returns:
      (new_fast_weights, moments): the updated weights and the support
      pass's per-stage `Moments` at `fast_weights`.
    """
    with tf.GradientTape(watch_accessed_variables=False) as tape:
        tape.watch(fast_weights)
        logits, moments = network.forward(
            support_images, fast_weights, step, bn_mode, compute_dtype)
        loss = tf.reduce_sum(cross_entropy(support_labels, logits))
        if loss_scale is not None:
            loss = loss * loss_scale
    gradients = tape.gradient(loss, fast_weights)
    if loss_scale is not None:
        # float32, like the fast weights: the casts in the forward pass
        # return their gradients in the weights' dtype.
        gradients = {name: gradient / loss_scale for name, gradient in gradients.items()}
    if not second_order:
        gradients = tf.nest.map_structure(tf.stop_gradient, gradients)
    new_weights = {
        name: weight - network.inner_rate(name, step) * gradients[name]
        for name, weight in fast_weights.items()}
    return new_weights, moments


def adapt_and_evaluate(network, tasks, num_steps, second_order, target_steps,
                       bn_mode=TRANSDUCTIVE, compute_dtype=tf.float32, loss_scale=None,
                       final_statistics=False):
    """Adapts to each task's support set and scores its target set.

    Args:
      network: a `MamlppNetwork`.
      tasks: dict with `support_images` (tasks, way*shot, h, w, c),
        `support_labels` (tasks, way*shot), `target_images`
        (tasks, way*query, h, w, c) and `target_labels` (tasks, way*query).
      num_steps: inner steps to take.
      second_order: see `inner_update`.
      target_steps: Python ints, the steps after which the target set is
        scored (the multi-step loss needs all of them, plain MAML the last);
        must include the last step.
      bn_mode: one of per_step_batch_norm.MODES, for every pass.
      compute_dtype, loss_scale: see `inner_update`; the target losses are
        returned unscaled.
      final_statistics: take the support set's statistics at the adapted
        weights too, for the running bank of the last state, where the
        mode does not need them anyway.

    Returns:
      dict with `target_losses` and `target_accuracies` (tasks, len(target_steps)),
      `logits` (tasks, way*query, way) after the last step, and `bn_means`,
      `bn_variances`: per stage, (states, filters) support statistics
      averaged over the tasks, one row for each weight state the support
      set passed through (`support_states`), without gradient.
    """
    if num_steps - 1 not in target_steps:
        raise ValueError(f"target_steps {list(target_steps)} must include the last step "
                         f"{num_steps - 1}")
    scored_states = [step + 1 for step in target_steps]
    final_pass = support_states(num_steps, bn_mode, final_statistics) > num_steps
    num_tasks = tf.shape(tasks["support_images"])[0]
    weights = network.initial_fast_weights(num_tasks)
    losses, accuracies, support_moments = [], [], []
    for state in range(num_steps + 1):
        moments = None
        if state < num_steps:
            new_weights, moments = inner_update(
                network, weights, tasks["support_images"], tasks["support_labels"], state,
                second_order, bn_mode, compute_dtype, loss_scale)
        elif final_pass:
            _, moments = network.forward(
                tasks["support_images"], weights, state, bn_mode, compute_dtype)
        if moments is not None:
            support_moments.append(moments)
        if state in scored_states:
            logits, _ = network.forward(
                tasks["target_images"], weights, state, bn_mode, compute_dtype,
                support=moments or [None] * len(network.norms))
            losses.append(cross_entropy(tasks["target_labels"], logits))
            accuracies.append(accuracy(tasks["target_labels"], logits))
        if state < num_steps:
            weights = new_weights
    means, variances = _bank_statistics(support_moments, network.filters)
    return {
        "target_losses": tf.stack(losses, axis=1),
        "target_accuracies": tf.stack(accuracies, axis=1),
        "logits": logits,
        "bn_means": means,  # per stage, (states, filters)
        "bn_variances": variances,
    }


def _bank_statistics(support_moments, channels):
    """Per stage, the (states, channels) support means and variances averaged over the tasks."""
    def task_mean(values):  # (tasks*channels,) -> (channels,)
        return tf.reduce_mean(tf.reshape(tf.stop_gradient(values), (-1, channels)), axis=0)

    per_stage = list(zip(*support_moments))  # per stage, one Moments per state
    return ([tf.stack([task_mean(m.mean) for m in stage]) for stage in per_stage],
            [tf.stack([task_mean(m.variance) for m in stage]) for stage in per_stage])


def support_states(num_steps, bn_mode, final_statistics=False):
    """Weight states the support set passes through: the S steps', and the adapted
    weights' where the target pass is normalised by it (or `final_statistics`)."""
    final_pass = final_statistics or bn_mode in (SUPPORT, TASK_NORM)
    return num_steps + int(final_pass)
