"""Mixed precision for the meta-step: float16 arithmetic, float32 variables, a dynamic loss scale.

Under `--mixed_precision` the meta-step's forward and backward passes compute
in float16 (`COMPUTE_DTYPE`) while every variable, fast weight, learning rate
and loss stays float32 (Micikevicius et al., 2018, "Mixed Precision
Training"). Gradients of a few-shot loss are small enough to underflow in
float16, and second-order MAML differentiates through the inner gradients, so
both losses are scaled before their tapes differentiate them and the
gradients are divided back in float32:

- each inner step's support loss, so that its float16 backward pass, and the
  outer backward pass through it, keep their digits;
- the outer (target) loss, so that the meta-gradient does.

One scale serves both. The second-order part of the outer backward pass then
runs through the inner one at the ratio of the two scales, 1; on a tiny
network an outer scale 32 or 64 times the inner one agreed no better with
float32 than one scale did. The scale is dynamic: a step whose
meta-gradient is not finite (a scaled gradient overflowed, in the inner loop
or outside it) is skipped and the scale halved; after `growth_steps` finite
steps in a row it is doubled.

Validation, test and the SavedModel compute in float32: they have no update
to skip when a scaled inner gradient overflows, adaptation without an outer
gradient is a small part of a run, and the export then adapts alike on any
device.
"""

import tensorflow as tf
from absl import logging

COMPUTE_DTYPE = tf.float16


class DynamicLossScale(tf.Module):
    """The loss scale of a mixed-precision run and its update rule.

    Both variables are checkpointed with the run. Every replica computes the
    same update (from all-reduced gradients), so the first replica's value is
    kept.

    Args:
      initial_scale: the scale of the first step; high, because a scale too
        high costs one skipped step per halving and one too low loses digits
        for `growth_steps` steps.
      growth_steps: finite steps in a row after which the scale doubles.
    """

    def __init__(self, initial_scale=2.0**15, growth_steps=2000, name="loss_scale"):
        super().__init__(name=name)
        self.growth_steps = growth_steps
        variable = lambda value, dtype, name: tf.Variable(
            value, dtype=dtype, trainable=False, name=name,
            aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA)
        self.scale = variable(initial_scale, tf.float32, "scale")
        self.finite_steps = variable(0, tf.int64, "finite_steps")

    def update(self, finite):
        """Halves the scale after a non-finite step, doubles it after `growth_steps` finite ones.

        Args:
          finite: scalar bool tensor, whether this step's gradients were all
            finite (and so applied).
        """
        steps = self.finite_steps + 1
        grow = steps >= self.growth_steps
        self.scale.assign(tf.where(finite, tf.where(grow, 2.0 * self.scale, self.scale),
                                   0.5 * self.scale))
        self.finite_steps.assign(tf.where(finite & ~grow, steps, tf.zeros_like(steps)))


def all_finite(tensors):
    """Scalar bool tensor: no element of any of `tensors` is NaN or infinite."""
    return tf.reduce_all([tf.reduce_all(tf.math.is_finite(t)) for t in tensors])


def check_support(fold_tasks):
    """Refuses settings that TensorFlow cannot run in float16; warns that a CPU is slow at it.

    Raises:
      ValueError: naming the conflicting flag: a host without a GPU has no
        float16 gradients of grouped convolutions.
    """
    if tf.config.list_physical_devices("GPU"):
        return
    if fold_tasks:
        raise ValueError("--fold_tasks with --mixed_precision needs a GPU: TensorFlow has no "
                         "float16 gradients of grouped convolutions on CPU")
    logging.warning("--mixed_precision without a GPU: float16 is slower than float32 on CPU.")
