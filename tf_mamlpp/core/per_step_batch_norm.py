"""Batch normalisation with one bank of statistics and affine weights per weight state.

MAML++ (Antoniou et al., 2019, section 4, BNRS and BNWB) gives every inner
step its own running mean/variance and its own gamma/beta, because the
activations after step i of adaptation differ in distribution from those
after step j. A network adapted for S steps passes through S + 1 weight
states (the initialisation, then one after each step), and every state is
normalised, so each bank is one variable of shape (states, channels) and
state i reads row i only.

How a target (query) batch is normalised is the mode, the same in training
and evaluation (Bronskill et al., "TaskNorm", ICML 2020, compare them):

- TRANSDUCTIVE: every batch by its own statistics, as the reference code
  does; a query's answer depends on the other queries sent with it.
- SUPPORT (MetaBN): the support set's statistics at the same weights
  normalise the support and the target pass.
- TASK_NORM (TaskNorm-I): the support moments blended with each image's own
  instance moments by a weight alpha, sigmoid(a * support size + b) learned per
  layer, or another of the `task_norm_alpha` forms (batch_norm_modes.py); the
  REPTILE_ALPHA form, n / (n + 1) for n support images, normalises each target
  image with the moments of the support set and itself (Nichol et al., 2018).
  A learned alpha starts there too under REPTILE_START: log n is added to its
  logit, so zero weights give RN's blend, and the weights learn a correction.
- RUNNING (BNRS): the target pass by the state's running bank.

Outside TRANSDUCTIVE no target image is normalised by another target image.
The support pass always uses the support set's statistics (TASK_NORM blends
them with instance moments, as the official TaskNorm code, except under
REPTILE_ALPHA: a support image is already one of the support set). TASK_NORM's
variances are biased, or with `task_norm_unbiased` Bessel-corrected as the
official code's torch.var: the support set's over n*H*W - 1, an image's over
H*W - 1; the running banks then take the corrected support variance.

The reference PyTorch implementation shares one running-statistics buffer
across steps whenever per-step statistics are requested without per-step
weights; here the two switches are independent and each does what it says.
"""

import collections
import math

import keras
import tensorflow as tf

from tf_mamlpp.core.batch_norm_modes import (PER_STEP_ALPHA, REPTILE_ALPHA, REPTILE_START,
                                             SIZE_ALPHA, SUPPORT, TASK_NORM, TRANSDUCTIVE,
                                             check_mode, check_task_norm_alpha,
                                             check_task_norm_start)
from tf_mamlpp.ops.batch_norm_kernel import (batch_norm_inference, batch_norm_training, moments,
                                             normalise)

# A support set's per-channel statistics at one weight state, which its
# target pass is normalised with: mean and variance (biased, or Bessel-corrected
# under `task_norm_unbiased`), (tasks*channels,) in the variables' dtype,
# differentiable; `size` is the number of support images.
Moments = collections.namedtuple("Moments", ["mean", "variance", "size"])


def per_task(row, tasks):
    """A (channels,) bank row repeated for `tasks` tasks folded into the channel axis.

    One task (tf.map_fn's) takes the row as it is: a smaller graph traces faster.
    """
    return row if tasks == 1 else tf.tile(row, [tasks])


def positions(inputs, axes):
    """The number of values over `axes` of `inputs`: a Python int where the shape is static."""
    sizes = [inputs.shape[axis] for axis in axes]
    if None not in sizes:
        return math.prod(sizes)
    return tf.reduce_prod(tf.gather(tf.shape(inputs), axes))


class PerStepBatchNorm(keras.layers.Layer):
    """Per-state batch norm over the channel axis of NHWC activations.

    Args:
      num_states: weight states the banks are kept for (inner steps + 1).
      per_step_statistics: BNRS; one running-statistics bank per state when
        True, one shared bank otherwise.
      per_step_affine: BNWB; one gamma/beta bank per state when True, one
        shared pair otherwise.
      momentum: weight of the new batch statistics in a running update.
      epsilon: added to the variance before its square root; 1e-5 as in the
        reference code (the first stage's activations have a variance of
        about 3e-3, so a larger epsilon would flatten them).
      task_norm: create TaskNorm-I's blend weights (only TASK_NORM reads them).
      task_norm_alpha: the form of TaskNorm-I's alpha, one of
        batch_norm_modes.TASK_NORM_ALPHAS.
      task_norm_unbiased: TaskNorm-I with Bessel-corrected variances.
      task_norm_start: where a learned alpha starts, one of
        batch_norm_modes.TASK_NORM_STARTS.
    """

    def __init__(self, num_states, per_step_statistics=True, per_step_affine=True,
                 momentum=0.1, epsilon=1e-5, task_norm=False, task_norm_alpha=SIZE_ALPHA,
                 task_norm_unbiased=False, task_norm_start=REPTILE_START, **kwargs):
        super().__init__(**kwargs)
        if num_states < 1:
            raise ValueError(f"num_states must be at least 1, got {num_states}")
        self.num_states = num_states
        self.per_step_statistics = per_step_statistics
        self.per_step_affine = per_step_affine
        self.momentum = momentum
        self.epsilon = epsilon
        self.task_norm = task_norm
        self.task_norm_alpha = check_task_norm_alpha(task_norm_alpha)
        self.task_norm_unbiased = task_norm_unbiased
        self.task_norm_start = check_task_norm_start(task_norm_start)

    def build(self, input_shape):
        channels = int(input_shape[-1])
        affine_banks = self.num_states if self.per_step_affine else 1
        stat_banks = self.num_states if self.per_step_statistics else 1
        self.gamma = self.add_weight(
            name="gamma", shape=(affine_banks, channels), initializer="ones")
        self.beta = self.add_weight(
            name="beta", shape=(affine_banks, channels), initializer="zeros")
        if self.task_norm:
            self._build_blend()
        # Replicas average their assignments, so banks stay identical across
        # devices under tf.distribute.
        self.moving_mean = self.add_weight(
            name="moving_mean", shape=(stat_banks, channels), initializer="zeros",
            trainable=False, aggregation="mean")
        self.moving_variance = self.add_weight(
            name="moving_variance", shape=(stat_banks, channels), initializer="ones",
            trainable=False, aggregation="mean")

    def _build_blend(self):
        """TaskNorm-I's learned alpha, zero weights at first; REPTILE_ALPHA's is fixed."""
        if self.task_norm_alpha == SIZE_ALPHA:
            # alpha = sigmoid(a * support size + b)
            self.blend_scale = self.add_weight(name="blend_scale", shape=(), initializer="zeros")
            self.blend_offset = self.add_weight(name="blend_offset", shape=(),
                                                initializer="zeros")
        elif self.task_norm_alpha != REPTILE_ALPHA:
            # alpha = sigmoid(w): a bank of one row (DIRECT_ALPHA) or of one per state.
            rows = self.num_states if self.task_norm_alpha == PER_STEP_ALPHA else 1
            self.blend_logit = self.add_weight(name="blend_logit", shape=(rows,),
                                               initializer="zeros")

    @staticmethod
    def bank_index(state, banks):
        """Row of a bank that weight state `state` reads.

        States past the trained number reuse the last bank, so a model trained
        with S steps can be evaluated with more.
        """
        if state < 0:
            raise ValueError(f"weight state must be non-negative, got {state}")
        return min(state, banks - 1)

    def call(self, inputs, state=0, mode=TRANSDUCTIVE, target=False, support=None):
        """Normalises `inputs` at weight state `state`, each task on its own.

        Args:
          inputs: (batch, height, width, tasks*channels) activations, the tasks
            of a meta-batch folded into the channel axis, task-major (see
            network.py); with one task this is plain NHWC.
          state: Python int, the weight state whose banks are read.
          mode: one of batch_norm_modes.BN_MODES.
          target: False when `inputs` is the support set, True for a target
            batch.
          support: for a target batch, the `Moments` its support pass
            returned at the same weights (unused in TRANSDUCTIVE and RUNNING
            modes).

        Returns:
          (outputs, moments): the normalised activations, and for a support
          pass the support set's `Moments` (None for a target pass); the
          layer itself changes no variable.
        """
        check_mode(mode)
        channels = self.gamma.shape[-1]
        tasks = inputs.shape[-1] // channels
        affine_row = self.bank_index(state, self.gamma.shape[0])
        gamma = per_task(self.gamma[affine_row], tasks)
        beta = per_task(self.beta[affine_row], tasks)
        size = tf.cast(positions(inputs, [0]), gamma.dtype)
        if mode == TASK_NORM:
            return self._task_norm(inputs, state, support, target, gamma, beta, size)
        if not target or mode == TRANSDUCTIVE:
            outputs, mean, variance = batch_norm_training(inputs, gamma, beta, self.epsilon)
            return outputs, (None if target else Moments(mean, variance, size))
        if mode == SUPPORT:
            return normalise(inputs, support.mean, support.variance, gamma, beta,
                             self.epsilon), None
        row = self.bank_index(state, self.moving_mean.shape[0])
        return batch_norm_inference(
            inputs, per_task(self.moving_mean[row], tasks),
            per_task(self.moving_variance[row], tasks), gamma, beta, self.epsilon), None

    def _task_norm(self, inputs, state, support, target, gamma, beta, size):
        """TaskNorm-I: (outputs, the support set's `Moments` for a support pass, else None)."""
        if not target and self.task_norm_alpha == REPTILE_ALPHA:
            # The support set and one of its images are the support set.
            mean, variance = moments(inputs, [0, 1, 2], gamma.dtype)
            support = Moments(mean, self._corrected(variance, inputs, [0, 1, 2]), size)
            return normalise(inputs, mean, support.variance, gamma, beta, self.epsilon), support
        instance_mean, instance_variance = moments(inputs, [1, 2], gamma.dtype, keepdims=True)
        if not target:
            support = self._pooled(instance_mean, instance_variance, inputs, size)
        instance_variance = self._corrected(instance_variance, inputs, [1, 2])
        alpha = self._alpha(state, support.size)
        mean = alpha * support.mean + (1 - alpha) * instance_mean
        variance = (alpha * (support.variance + tf.square(support.mean - mean))
                    + (1 - alpha) * (instance_variance + tf.square(instance_mean - mean)))
        outputs = normalise(inputs, mean, variance, gamma, beta, self.epsilon)
        return outputs, (None if target else support)

    def _pooled(self, instance_mean, instance_variance, inputs, size):
        """The support set's `Moments` from its images' biased instance moments.

        Pooled by the law of total variance, they are the batch moments without
        another two passes over the activations and their derivatives.
        """
        mean = tf.reduce_mean(instance_mean, axis=[0, 1, 2])
        variance = tf.reduce_mean(instance_variance + tf.square(instance_mean - mean),
                                  axis=[0, 1, 2])
        return Moments(mean, self._corrected(variance, inputs, [0, 1, 2]), size)

    def _alpha(self, state, size):
        """The support moments' weight at weight state `state`, for `size` support images."""
        if self.task_norm_alpha == REPTILE_ALPHA:
            return size / (size + 1)
        if self.task_norm_alpha == SIZE_ALPHA:
            logit = self.blend_scale * size + self.blend_offset
        else:
            logit = self.blend_logit[self.bank_index(state, self.blend_logit.shape[0])]
        if self.task_norm_start == REPTILE_START:
            logit += tf.math.log(size)  # sigmoid(log n) = n / (n + 1)
        return tf.sigmoid(logit)

    def _corrected(self, variance, inputs, axes):
        """Biased `variance` over `axes` of `inputs`; Bessel-corrected under task_norm_unbiased."""
        if not self.task_norm_unbiased:
            return variance
        count = positions(inputs, axes)
        if isinstance(count, int) and count < 2:
            raise ValueError(f"{self.name}: task_norm_unbiased needs two or more values per "
                             f"channel over axes {axes} of its {tuple(inputs.shape)} inputs")
        count = tf.cast(count, variance.dtype)
        return variance * (count / (count - 1))

    def update_running_statistics(self, means, variances):
        """Moves the first rows of the running banks towards new statistics.

        Args:
          means, variances: (states, channels), the support set's statistics
            at the first `states` weight states; rows past them are kept. With
            one shared bank their mean over states is used.
        """
        if not self.per_step_statistics:
            means = tf.reduce_mean(means, axis=0, keepdims=True)
            variances = tf.reduce_mean(variances, axis=0, keepdims=True)
        for bank, new in ((self.moving_mean, means), (self.moving_variance, variances)):
            rows = new.shape[0]
            moved = bank[:rows] * (1 - self.momentum) + new * self.momentum
            bank.assign(tf.concat([moved, bank[rows:]], axis=0))

    def get_config(self):
        return {**super().get_config(), "num_states": self.num_states,
                "per_step_statistics": self.per_step_statistics,
                "per_step_affine": self.per_step_affine,
                "momentum": self.momentum, "epsilon": self.epsilon, "task_norm": self.task_norm,
                "task_norm_alpha": self.task_norm_alpha,
                "task_norm_unbiased": self.task_norm_unbiased,
                "task_norm_start": self.task_norm_start}

