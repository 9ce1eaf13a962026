"""Task adaptation: the inner loop of MAML++.

Adaptation is a function: `adapt` takes the network and a support set and
returns every weight state's fast weights, changing no variable. Scoring is
separate (`adapt_and_evaluate`): the target set is scored at a weight state
with the support pass at that state (whose statistics normalise it outside
the transductive mode, see per_step_batch_norm.py), so where the mode needs
it the support set passes once more through the adapted weights.
Differentiating the result under an outer tape gives the meta-gradient: second order when the
inner gradients stay on the tape, first order when they are stopped (Finn et
al., 2017, section 5.2; MAML++ derivative-order annealing switches between
the two). Under mixed precision each step's support loss is scaled before it
is differentiated and its gradient divided back in float32 (see
mixed_precision.py). Without it everything computes in the network's
variables' dtype, float64 included.
"""

from typing import NamedTuple

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
                 second_order, bn_mode=TRANSDUCTIVE, compute_dtype=None, loss_scale=None):
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
      bn_mode: one of batch_norm_modes.BN_MODES.
      compute_dtype: dtype of the forward and backward passes (float16 or
        bfloat16 under mixed precision), None for the network's variables'
        dtype; the weights and their gradients stay in the variables' dtype.
      loss_scale: None, or a float32 scalar that the support loss is
        multiplied by before differentiating, and the gradients divided by
        after: a float16 backward pass of the unscaled loss underflows.

    Returns:
      (new_fast_weights, moments): the updated weights and the support
      pass's per-stage `Moments` at `fast_weights`.
    """
    compute_dtype = compute_dtype or network.variable_dtype
    with tf.GradientTape(watch_accessed_variables=False) as tape:
        tape.watch(fast_weights)
        logits, moments = network.forward(
            support_images, fast_weights, step, bn_mode, compute_dtype)
        loss = tf.reduce_sum(cross_entropy(support_labels, logits))
        if loss_scale is not None:
            loss = loss * loss_scale
    gradients = tape.gradient(loss, fast_weights)
    if loss_scale is not None:
        # float32, like the fast weights under mixed precision: the casts in
        # the forward pass return their gradients in the weights' dtype.
        gradients = {name: gradient / loss_scale for name, gradient in gradients.items()}
    if not second_order:
        gradients = tf.nest.map_structure(tf.stop_gradient, gradients)
    new_weights = {
        name: weight - network.inner_rate(name, step) * gradients[name]
        for name, weight in fast_weights.items()}
    return new_weights, moments


class Adaptation(NamedTuple):
    """What adapting to a batch of tasks went through."""

    weights: list  # the fast weights at each weight state 0..S, dicts of (tasks, ...) tensors
    support_moments: list  # per state the support pass passed through, per-norm `Moments`

    @property
    def adapted_weights(self):
        """The fast weights after the last step."""
        return self.weights[-1]


def adapt(network, support_images, support_labels, num_steps, second_order=False,
          bn_mode=TRANSDUCTIVE, compute_dtype=None, loss_scale=None, final_statistics=False):
    """Adapts the network's initialisation to each task's support set.

    Args:
      network: a `FastWeightsModel` (see fast_weights.py).
      support_images: (tasks, way*shot, h, w, c).
      support_labels: (tasks, way*shot) int32.
      num_steps: inner steps to take.
      second_order, bn_mode, compute_dtype, loss_scale: see `inner_update`.
      final_statistics: pass the support set through the adapted weights
        too, for the running bank of the last state, where the mode does not
        need it anyway (see `support_states`).

    Returns:
      an `Adaptation`: every weight state's fast weights, and the support
      moments of the `support_states` states.
    """
    compute_dtype = compute_dtype or network.variable_dtype
    weights = [network.initial_fast_weights(tf.shape(support_images)[0])]
    moments = []
    for step in range(num_steps):
        new_weights, step_moments = inner_update(
            network, weights[-1], support_images, support_labels, step, second_order, bn_mode,
            compute_dtype, loss_scale)
        weights.append(new_weights)
        moments.append(step_moments)
    if support_states(num_steps, bn_mode, final_statistics) > num_steps:
        _, final_moments = network.forward(
            support_images, weights[-1], num_steps, bn_mode, compute_dtype)
        moments.append(final_moments)
    return Adaptation(weights, moments)


def adapt_and_evaluate(network, tasks, num_steps, second_order, target_steps,
                       bn_mode=TRANSDUCTIVE, compute_dtype=None, loss_scale=None,
                       final_statistics=False):
    """Adapts to each task's support set and scores its target set.

    Args:
      network: a `FastWeightsModel` (see fast_weights.py).
      tasks: dict with `support_images` (tasks, way*shot, h, w, c),
        `support_labels` (tasks, way*shot), `target_images`
        (tasks, way*query, h, w, c) and `target_labels` (tasks, way*query).
      num_steps, second_order, bn_mode, compute_dtype, loss_scale,
        final_statistics: see `adapt`; the target losses are returned unscaled.
      target_steps: Python ints, the steps after which the target set is
        scored (the multi-step loss needs all of them, plain MAML the last);
        must include the last step.

    Returns:
      dict with `target_losses` and `target_accuracies` (tasks, len(target_steps)),
      `logits` (tasks, way*query, way) after the last step, and `bn_means`,
      `bn_variances`: per norm, (states, channels) support statistics
      averaged over the tasks, one row for each weight state the support
      set passed through (`support_states`), without gradient.
    """
    if num_steps - 1 not in target_steps:
        raise ValueError(f"target_steps {list(target_steps)} must include the last step "
                         f"{num_steps - 1}")
    compute_dtype = compute_dtype or network.variable_dtype
    adaptation = adapt(network, tasks["support_images"], tasks["support_labels"], num_steps,
                       second_order, bn_mode, compute_dtype, loss_scale, final_statistics)
    losses, accuracies = [], []
    for state in [step + 1 for step in target_steps]:
        # The target pass is normalised with the support pass at the same weights.
        moments = adaptation.support_moments
        support = moments[state] if state < len(moments) else [None] * len(network.norms)
        logits, _ = network.forward(tasks["target_images"], adaptation.weights[state], state,
                                    bn_mode, compute_dtype, support=support)
        losses.append(cross_entropy(tasks["target_labels"], logits))
        accuracies.append(accuracy(tasks["target_labels"], logits))
    means, variances = _bank_statistics(adaptation.support_moments, network.norms)
    return {
        "target_losses": tf.stack(losses, axis=1),
        "target_accuracies": tf.stack(accuracies, axis=1),
        "logits": logits,
        "bn_means": means,  # per norm, (states, channels)
        "bn_variances": variances,
    }


def _bank_statistics(support_moments, norms):
    """Per norm, the (states, channels) support means and variances averaged over the tasks."""
    def task_mean(values, norm):  # (tasks*channels,) -> (channels,)
        channels = norm.moving_mean.shape[-1]
        values = tf.stop_gradient(values)
        if values.shape[0] == channels:  # one task
            return values
        return tf.reduce_mean(tf.reshape(values, (-1, channels)), axis=0)

    per_norm = list(zip(*support_moments))  # per norm, one Moments per state
    return ([tf.stack([task_mean(m.mean, norm) for m in states])
             for states, norm in zip(per_norm, norms)],
            [tf.stack([task_mean(m.variance, norm) for m in states])
             for states, norm in zip(per_norm, norms)])


def support_states(num_steps, bn_mode, final_statistics=False):
    """Weight states the support set passes through: the S steps', and the adapted
    weights' where the target pass is normalised by it (or `final_statistics`)."""
    final_pass = final_statistics or bn_mode in (SUPPORT, TASK_NORM)
    return num_steps + int(final_pass)
