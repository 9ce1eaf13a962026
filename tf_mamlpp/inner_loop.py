"""Task adaptation: the inner loop of MAML++.

Adaptation is a function: it takes the network, fast weights and a support
set and returns new fast weights, changing no variable. Differentiating its
result under an outer tape gives the meta-gradient: second order when the
inner gradients stay on the tape, first order when they are stopped (Finn et
al., 2017, section 5.2; MAML++ derivative-order annealing switches between
the two). Under mixed precision each step's support loss is scaled before it
is differentiated and its gradient divided back in float32 (see
mixed_precision.py).
"""

import tensorflow as tf

from tf_mamlpp.per_step_batch_norm import BATCH


def cross_entropy(labels, logits):
    """Per-task mean softmax cross-entropy: (tasks, n) labels, (tasks, n, way) logits -> (tasks,)."""
    return tf.reduce_mean(
        tf.nn.sparse_softmax_cross_entropy_with_logits(labels=labels, logits=logits), axis=-1)


def accuracy(labels, logits):
    """Per-task fraction of (tasks, n) labels that the (tasks, n, way) logits rank first."""
    predictions = tf.argmax(logits, axis=-1, output_type=labels.dtype)
    return tf.reduce_mean(tf.cast(tf.equal(predictions, labels), logits.dtype), axis=-1)


def inner_update(network, fast_weights, support_images, support_labels, step,
                 second_order, bn_mode=BATCH, compute_dtype=tf.float32, loss_scale=None):
    """One step of gradient descent on each task's support loss.

    The tasks' losses are summed before differentiating: each task's weights
    affect only its own loss, so every task gets exactly its own gradient.

    Args:
      network: a `MamlppNetwork`.
      fast_weights: dict name -> (tasks, ...) tensor, the weights before this step.
      support_images: (tasks, way*shot, height, width, channels).
      support_labels: (tasks, way*shot) int32.
      step: Python int, selects the step's batch-norm banks and rates (LSLR).
      second_order: keep the inner gradient on any enclosing tape, so the
        meta-gradient includes its derivative; stop it otherwise.
      bn_mode: batch-norm statistics to normalise with.
      compute_dtype: dtype of the forward and backward passes (float16 or
        bfloat16 under mixed precision); the weights and their gradients stay float32.
      loss_scale: None, or a float32 scalar that the support loss is
        multiplied by before differentiating, and the gradients divided by
        after: a float16 backward pass of the unscaled loss underflows.

    Returns:
      (new_fast_weights, statistics): the updated weights and the support
      pass's per-stage (mean, variance) batch statistics, each (tasks, filters).
    """
    with tf.GradientTape(watch_accessed_variables=False) as tape:
        tape.watch(fast_weights)
        logits, statistics = network.forward(
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
    return new_weights, statistics


def adapt_and_evaluate(network, tasks, num_steps, second_order, target_steps, bn_mode=BATCH,
                       compute_dtype=tf.float32, loss_scale=None):
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
      bn_mode: batch-norm statistics to normalise with.
      compute_dtype, loss_scale: see `inner_update`; the target losses are
        returned unscaled.

    Returns:
      dict with `target_losses` and `target_accuracies` (tasks, len(target_steps)),
      `logits` (tasks, way*query, way) after the last step, and `bn_means`,
      `bn_variances`: per stage, (num_steps, filters) support statistics
      averaged over the tasks.
    """
    if num_steps - 1 not in target_steps:
        raise ValueError(f"target_steps {list(target_steps)} must include the last step "
                         f"{num_steps - 1}")
    num_tasks = tf.shape(tasks["support_images"])[0]
    weights = network.initial_fast_weights(num_tasks)
    losses, accuracies, means, variances = [], [], [], []
    for step in range(num_steps):
        weights, statistics = inner_update(
            network, weights, tasks["support_images"], tasks["support_labels"], step,
            second_order, bn_mode, compute_dtype, loss_scale)
        means.append([tf.reduce_mean(mean, axis=0) for mean, _ in statistics])
        variances.append([tf.reduce_mean(variance, axis=0) for _, variance in statistics])
        if step in target_steps:
            logits, _ = network.forward(
                tasks["target_images"], weights, step, bn_mode, compute_dtype)
            losses.append(cross_entropy(tasks["target_labels"], logits))
            accuracies.append(accuracy(tasks["target_labels"], logits))
    return {
        "target_losses": tf.stack(losses, axis=1),
        "target_accuracies": tf.stack(accuracies, axis=1),
        "logits": logits,
        # (stages, num_steps, filters)
        "bn_means": [tf.stack(stage) for stage in zip(*means)],
        "bn_variances": [tf.stack(stage) for stage in zip(*variances)],
    }
