"""Mixed precision for the meta-step: 16-bit arithmetic, float32 variables, a dynamic loss scale.

Under `--mixed_precision` the meta-step's forward and backward passes compute
in 16 bits (`compute_dtype`) while every variable, fast weight, learning rate
and loss stays float32 (Micikevicius et al., 2018, "Mixed Precision
Training"): in float16 on a GPU, whose float16 units are its fast ones, and
in bfloat16 on a CPU, where oneDNN runs bfloat16 convolutions on the CPU's
bfloat16 instructions (AVX512-BF16, AMX) and TensorFlow has next to no
float16 kernels. Gradients of a few-shot loss are small enough to underflow in
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
steps in a row it is doubled. bfloat16 keeps float32's exponent range and
would need no scale; the scale is kept there too (multiplying by a power of
two is exact), so that one update rule and one checkpoint serve both.

Validation, test and the SavedModel compute in float32: they have no update
to skip when a scaled inner gradient overflows, adaptation without an outer
gradient is a small part of a run, and the export then adapts alike on any
device.
"""

import tensorflow as tf


def compute_dtype():
    """The 16-bit dtype of a mixed-precision meta-step here: float16 with a GPU, else bfloat16."""
    return tf.float16 if tf.config.list_physical_devices("GPU") else tf.bfloat16


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
      compute_dtype: the meta-step's 16-bit dtype, float16 or bfloat16 (see
        `compute_dtype()`).
    """

    def __init__(self, initial_scale=2.0**15, growth_steps=2000, compute_dtype=tf.float16,
                 name="loss_scale"):
        super().__init__(name=name)
        self.growth_steps = growth_steps
        self.compute_dtype = compute_dtype
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
