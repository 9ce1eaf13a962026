"""The MAML++ learner network: four conv stages and a linear head.

Each stage is 3x3 convolution, per-step batch norm, leaky ReLU (slope 0.01,
as the reference code) and 2x2 max-pool (Antoniou et al., 2019, section 5;
the VGG-style network of Finn et al., 2017).
The model owns every meta-parameter: the conv and head weights that the inner
loop adapts, the per-step batch-norm banks, and the learned per-layer,
per-step inner learning rates (LSLR). Its forward pass is a function of
explicit fast weights, so the same model runs with its own variables or with
adapted ones, and evaluating it changes no variable. The forward pass
computes in the dtype each call asks for (float16 or bfloat16 under
--mixed_precision, see mixed_precision.py), by default the variables' own;
variables and fast weights stay in their dtype: float32, or float64 with
`dtype="float64"` for gradient checks (see tf_mamlpp.ops).

The model follows the fast-weights protocol (fast_weights.py).
"""

import keras
import tensorflow as tf

from tf_mamlpp.config_error import ConfigError
from tf_mamlpp.core.batch_norm_modes import (DEFAULT_MODE, REPTILE_START, RUNNING, SIZE_ALPHA,
                                             TASK_NORM, TRANSDUCTIVE, check_mode,
                                             check_task_norm_options)
from tf_mamlpp.core.fast_weights import FastWeightsModel
from tf_mamlpp.core.per_step_batch_norm import PerStepBatchNorm
from tf_mamlpp.ops.max_pool_kernel import leaky_relu_max_pool_2x2


class MamlppNetwork(FastWeightsModel):
    """Meta-parameters and the functional forward pass of the learner.

    Args:
      way: number of classes per task, the head's width.
      image_shape: (height, width, channels) of the input images.
      inner_steps: inner steps; the per-step banks have one row per weight
        state, inner_steps + 1, and the rates one per step.
      filters: channels of every conv stage.
      num_stages: conv stages; each halves the spatial size.
      bnrs: BNRS switch, per-step batch-norm running statistics.
      bnwb: BNWB switch, per-step batch-norm weights and biases.
      lslr: LSLR switch, learned per-layer, per-step inner learning rates;
        when False the rates stay at `inner_lr`.
      inner_lr: initial value of every inner learning rate.
      bn_momentum: weight of new statistics in a running-bank update.
      bn_mode: the batch-norm mode it is meta-trained in, and so evaluated and
        exported in (see per_step_batch_norm.py).
      task_norm_alpha: with bn_mode task_norm, the form of TaskNorm-I's
        blend weight, one of batch_norm_modes.TASK_NORM_ALPHAS.
      task_norm_unbiased: with bn_mode task_norm, Bessel-corrected variances.
      task_norm_start: with bn_mode task_norm, where a learned alpha starts, one
        of batch_norm_modes.TASK_NORM_STARTS.
      **kwargs: keras.Model's; `dtype` (a Keras dtype policy) sets the
        variables' dtype, float32 by default.
    """

    def __init__(self, way, image_shape, inner_steps, filters=64, num_stages=4,
                 bnrs=True, bnwb=True, lslr=True, inner_lr=0.1, bn_momentum=0.1,
                 bn_mode=DEFAULT_MODE, task_norm_alpha=SIZE_ALPHA, task_norm_unbiased=False,
                 task_norm_start=REPTILE_START, **kwargs):
        super().__init__(**kwargs)
        self.bn_mode = check_mode(bn_mode)
        check_task_norm_options(bn_mode, task_norm_alpha, task_norm_unbiased, task_norm_start)
        self.task_norm_alpha = task_norm_alpha
        self.task_norm_unbiased = task_norm_unbiased
        self.task_norm_start = task_norm_start
        self.way = way
        self.image_shape = tuple(int(d) for d in image_shape)
        self.inner_steps = inner_steps
        self.filters = filters
        self.num_stages = num_stages
        self.bnrs = bnrs
        self.bnwb = bnwb
        self.lslr = lslr
        self.inner_lr = inner_lr
        self.bn_momentum = bn_momentum
        self.feature_size = self._feature_size()
        self.layer_names = [f"conv{i}" for i in range(num_stages)] + ["head"]
        self._create_weights()
        self.built = True

    def _feature_size(self):
        height, width, _ = self.image_shape
        for stage in range(self.num_stages):
            height, width = height // 2, width // 2
            if height < 1 or width < 1:
                raise ConfigError(
                    f"image_size={self.image_shape[0]}x{self.image_shape[1]} cannot be pooled "
                    f"{self.num_stages} times; it reaches zero at stage {stage + 1}", "image_size")
        return height * width * self.filters

    def _create_weights(self):
        # Each variable and layer is an attribute of its own, which is how
        # tf.train.Checkpoint finds it; the dicts below are views of them.
        in_channels = self.image_shape[-1]
        size = self.image_shape[:2]
        for i in range(self.num_stages):
            setattr(self, f"conv{i}_kernel", self.add_weight(
                name=f"conv{i}_kernel", shape=(3, 3, in_channels, self.filters),
                initializer="glorot_uniform"))
            # autocast=False: Keras would cast a 16-bit input (see `embed`)
            # back to the layer's float32; the fused kernel takes either.
            norm = PerStepBatchNorm(
                self.inner_steps + 1, self.bnrs, self.bnwb,
                momentum=self.bn_momentum, task_norm=self.bn_mode == TASK_NORM,
                task_norm_alpha=self.task_norm_alpha, task_norm_unbiased=self.task_norm_unbiased,
                task_norm_start=self.task_norm_start,
                autocast=False, dtype=self.dtype_policy, name=f"norm{i}")
            norm.build((None, *size, self.filters))
            setattr(self, f"norm{i}", norm)
            in_channels = self.filters
            size = (size[0] // 2, size[1] // 2)
        self.head_kernel = self.add_weight(
            name="head_kernel", shape=(self.feature_size, self.way), initializer="glorot_uniform")
        self.head_bias = self.add_weight(name="head_bias", shape=(self.way,), initializer="zeros")
        # LSLR: one rate per layer and inner step, free to change sign.
        for layer in self.layer_names:
            setattr(self, f"{layer}_inner_rate", self.add_weight(
                name=f"{layer}_inner_rate", shape=(self.inner_steps,),
                initializer=keras.initializers.Constant(self.inner_lr),
                trainable=self.lslr))

    @property
    def fast_variables(self):
        """The weights the inner loop adapts: name -> variable."""
        names = [f"conv{i}/kernel" for i in range(self.num_stages)] + ["head/kernel", "head/bias"]
        return {name: getattr(self, name.replace("/", "_")) for name in names}

    @property
    def norms(self):
        """The per-step batch-norm layers, one per stage."""
        return [getattr(self, f"norm{i}") for i in range(self.num_stages)]

    @property
    def inner_rates(self):
        """LSLR: layer name -> (inner_steps,) variable of inner learning rates."""
        return {layer: getattr(self, f"{layer}_inner_rate") for layer in self.layer_names}

    def embed(self, images, fast_weights, state, bn_mode=TRANSDUCTIVE, compute_dtype=None,
              support=None):
        """Features before the head, for a batch of tasks at once.

        The tasks are folded into the channel axis and every convolution is a
        grouped convolution with one group per task: one op serves the whole
        meta-batch with each task's own weights, with no loop over tasks.

        Args:
          images: (tasks, batch, height, width, channels) in [0, 1].
          fast_weights: dict from `initial_fast_weights` or the inner loop,
            each with a leading tasks axis, in the variables' dtype.
          state: Python int, the weight state (0 before adaptation, i after
            i inner steps) whose batch-norm banks are used.
          bn_mode: one of batch_norm_modes.BN_MODES.
          compute_dtype: dtype of the convolutions and activations, None
            for the variables' dtype; images and kernels are cast to it.
            Batch norm keeps gamma, beta and statistics in the variables'.
          support: None when `images` are the support sets; for target
            images, the per-stage `Moments` their support pass returned at
            the same weights (entries may be None in TRANSDUCTIVE and
            RUNNING modes, which do not read them).

        Returns:
          (features, moments): (tasks, batch, feature_size) features in
          `compute_dtype`, and for a support pass one `Moments` of the
          (tasks*filters,) support statistics per stage (None for a target
          pass).
        """
        compute_dtype = compute_dtype or self.variable_dtype
        x = tf.cast(fold_tasks(images), compute_dtype)  # (batch, height, width, tasks*channels)
        target = support is not None
        moments = []
        for i, norm in enumerate(self.norms):
            kernel = tf.cast(grouped_kernel(fast_weights[f"conv{i}/kernel"]), compute_dtype)
            # No conv bias: batch norm subtracts the mean, so its gradient is zero.
            x = tf.nn.conv2d(x, kernel, 1, "SAME")
            x, stage_moments = norm(x, state=state, mode=bn_mode, target=target,
                                    support=support[i] if target else None)
            moments.append(stage_moments)
            x = leaky_relu_max_pool_2x2(x)
        features = unfold_tasks(x, self.filters)  # (tasks, batch, h, w, filters)
        tasks = features.shape[0] or tf.shape(features)[0]  # static where known: a smaller graph
        features = tf.reshape(features, (tasks, -1, self.feature_size))
        return features, (None if target else moments)

    def forward(self, images, fast_weights, state, bn_mode=TRANSDUCTIVE, compute_dtype=None,
                support=None):
        """Logits of a batch of tasks under `fast_weights`; see `embed`.

        Returns:
          (logits, moments): (tasks, batch, way) logits in the variables'
          dtype (the loss and softmax are taken in it whatever
          `compute_dtype` is) and the per-stage support moments (None for a
          target pass).
        """
        features, moments = self.embed(
            images, fast_weights, state, bn_mode, compute_dtype, support)
        head_kernel, head_bias = fast_weights["head/kernel"], fast_weights["head/bias"]
        logits = tf.cast(tf.matmul(features, tf.cast(head_kernel, features.dtype)), head_bias.dtype)
        return logits + head_bias[:, tf.newaxis, :], moments

    def running_embed(self, images):
        """(n, feature_size) features of (n, h, w, c) images under the initialisation.

        Normalised by the running banks of the initialisation, so each image's
        features are its own, whatever else is in the batch.
        """
        features, _ = self.embed(images[tf.newaxis], self.initial_fast_weights(), 0, RUNNING,
                                 support=[None] * self.num_stages)
        return features[0]

    def call(self, images):
        """Logits of (batch, h, w, c) images under the initialisation, before adaptation."""
        return tf.matmul(self.running_embed(images), self.head_kernel) + self.head_bias

    def get_config(self):
        return {"way": self.way, "image_shape": self.image_shape, "inner_steps": self.inner_steps,
                "filters": self.filters, "num_stages": self.num_stages,
                "bnrs": self.bnrs, "bnwb": self.bnwb, "lslr": self.lslr,
                "inner_lr": self.inner_lr,
                "bn_momentum": self.bn_momentum, "bn_mode": self.bn_mode,
                "task_norm_alpha": self.task_norm_alpha,
                "task_norm_unbiased": self.task_norm_unbiased,
                "task_norm_start": self.task_norm_start}


def fold_tasks(images):
    """(tasks, batch, h, w, c) -> (batch, h, w, tasks*c), task-major channels."""
    if images.shape[0] == 1:  # one task (tf.map_fn's): nothing to fold, and a smaller graph
        return tf.squeeze(images, 0)
    tasks, channels = tf.shape(images)[0], images.shape[-1]
    folded = tf.transpose(images, [1, 2, 3, 0, 4])
    shape = tf.shape(folded)
    return tf.reshape(folded, tf.concat([shape[:3], [tasks * channels]], 0))


def unfold_tasks(x, channels):
    """(batch, h, w, tasks*channels) -> (tasks, batch, h, w, channels)."""
    if x.shape[-1] == channels:
        return x[tf.newaxis]
    shape = tf.shape(x)
    x = tf.reshape(x, tf.concat([shape[:3], [-1, channels]], 0))
    return tf.transpose(x, [3, 0, 1, 2, 4])


def grouped_kernel(kernels):
    """(tasks, kh, kw, in, out) -> (kh, kw, in, tasks*out): one conv group per task."""
    if kernels.shape[0] == 1:
        return tf.squeeze(kernels, 0)
    shape = tf.shape(kernels)
    grouped = tf.transpose(kernels, [1, 2, 3, 0, 4])
    return tf.reshape(grouped, tf.concat([shape[1:4], [-1]], 0))
