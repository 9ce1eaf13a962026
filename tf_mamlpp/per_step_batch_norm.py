"""Batch normalisation with one bank of statistics and affine weights per inner step.

MAML++ (Antoniou et al., 2019, section 4, BNRS and BNWB) gives every inner
step its own running mean/variance and its own gamma/beta, because the
activations after step i of adaptation differ in distribution from those
after step j. Each bank is one variable with a leading step axis, of shape
(banks, channels), and step i reads row i only.

The reference PyTorch implementation shares one running-statistics buffer
across steps whenever per-step statistics are requested without per-step
weights; here the two switches are independent and each does what it says.
"""

import keras
import tensorflow as tf

from tf_mamlpp.batch_norm_kernel import batch_norm_training

BATCH = "batch"
RUNNING = "running"


class PerStepBatchNorm(keras.layers.Layer):
    """Per-step batch norm over the channel axis of NHWC activations.

    Args:
      num_steps: inner steps the banks are kept for.
      per_step_statistics: BNRS; one running-statistics bank per step when
        True, one shared bank otherwise.
      per_step_affine: BNWB; one gamma/beta bank per step when True, one shared
        pair otherwise.
      momentum: weight of the new batch statistics in a running update.
      epsilon: added to the variance before its square root.
    """

    def __init__(self, num_steps, per_step_statistics=True, per_step_affine=True,
                 momentum=0.1, epsilon=1e-3, **kwargs):
        super().__init__(**kwargs)
        if num_steps < 1:
            raise ValueError(f"num_steps must be at least 1, got {num_steps}")
        self.num_steps = num_steps
        self.per_step_statistics = per_step_statistics
        self.per_step_affine = per_step_affine
        self.momentum = momentum
        self.epsilon = epsilon

    def build(self, input_shape):
        channels = int(input_shape[-1])
        affine_banks = self.num_steps if self.per_step_affine else 1
        stat_banks = self.num_steps if self.per_step_statistics else 1
        self.gamma = self.add_weight(
            name="gamma", shape=(affine_banks, channels), initializer="ones")
        self.beta = self.add_weight(
            name="beta", shape=(affine_banks, channels), initializer="zeros")
        # Replicas average their assignments, so banks stay identical across
        # devices under tf.distribute.
        self.moving_mean = self.add_weight(
            name="moving_mean", shape=(stat_banks, channels), initializer="zeros",
            trainable=False, aggregation="mean")
        self.moving_variance = self.add_weight(
            name="moving_variance", shape=(stat_banks, channels), initializer="ones",
            trainable=False, aggregation="mean")

    @staticmethod
    def bank_index(step, banks):
        """Row of a bank that inner step `step` reads.

        Steps past the trained number reuse the last bank, so a model trained
        with S steps can be evaluated with more.
        """
        if step < 0:
            raise ValueError(f"inner step must be non-negative, got {step}")
        return min(step, banks - 1)

    def call(self, inputs, step=0, mode=BATCH):
        """Normalises `inputs` for inner step `step`, each task on its own.

        Args:
          inputs: (batch, height, width, tasks*channels) activations, the tasks
            of a meta-batch folded into the channel axis, task-major (see
            network.py); with one task this is plain NHWC.
          step: Python int, the inner step whose banks are read.
          mode: BATCH normalises with each task's batch statistics (training,
            and transductive evaluation); RUNNING with the step's running bank.

        Returns:
          (outputs, mean, variance): the normalised activations and the
          statistics used, (tasks, channels): in BATCH mode each task's batch
          mean and unbiased variance, which the caller folds into the running
          banks; the layer itself changes no variable.
        """
        channels = self.gamma.shape[-1]
        tasks = inputs.shape[-1] // channels
        affine_row = self.bank_index(step, self.gamma.shape[0])
        gamma = tf.tile(self.gamma[affine_row], [tasks])
        beta = tf.tile(self.beta[affine_row], [tasks])
        if mode == BATCH:
            outputs, mean, variance = batch_norm_training(inputs, gamma, beta, self.epsilon)
        elif mode == RUNNING:
            row = self.bank_index(step, self.moving_mean.shape[0])
            mean = tf.tile(self.moving_mean[row], [tasks])
            variance = tf.tile(self.moving_variance[row], [tasks])
            outputs, _, _ = tf.compat.v1.nn.fused_batch_norm(
                inputs, gamma, beta, mean=mean, variance=variance, epsilon=self.epsilon,
                is_training=False)
        else:
            raise ValueError(f"unknown batch-norm mode {mode!r}; expected {BATCH!r} or {RUNNING!r}")
        return (outputs, tf.reshape(mean, (tasks, channels)),
                tf.reshape(variance, (tasks, channels)))

    def update_running_statistics(self, means, variances):
        """Moves the running banks towards new statistics.

        Args:
          means, variances: (num_steps, channels), the batch statistics seen at
            each inner step. With one shared bank their mean over steps is used.
        """
        if not self.per_step_statistics:
            means = tf.reduce_mean(means, axis=0, keepdims=True)
            variances = tf.reduce_mean(variances, axis=0, keepdims=True)
        self.moving_mean.assign(self.moving_mean * (1 - self.momentum) + means * self.momentum)
        self.moving_variance.assign(
            self.moving_variance * (1 - self.momentum) + variances * self.momentum)

    def get_config(self):
        return {**super().get_config(), "num_steps": self.num_steps,
                "per_step_statistics": self.per_step_statistics,
                "per_step_affine": self.per_step_affine,
                "momentum": self.momentum, "epsilon": self.epsilon}
