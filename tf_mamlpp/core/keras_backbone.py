"""Any Keras 3 backbone as a MAML++ learner, adapted through stateless calls.

The user's model (Sequential or functional, built from standard layers) is
run layer by layer with explicit fast weights:
- a layer with weights (Conv2D, Dense, ...) through `Layer.stateless_call`
  with the fast weights' values, so the user's layer computes as written;
- a BatchNormalization layer through a `PerStepBatchNorm` created for it,
  which gives it BNRS, BNWB and the batch-norm modes; the banks start from
  the layer's gamma and beta, and the layer's own weights are frozen;
- any other layer (pooling, activations, Flatten, GlobalAveragePooling, Add)
  as it is.
LSLR gets one rate per inner step for every layer with weights. The class
is a `FastWeightsModel` (fast_weights.py), so the inner loop and the
meta-step take it as they take `MamlppNetwork`.
Tasks run one after another; the forward pass computes in float32.
"""

import keras
import tensorflow as tf

from tf_mamlpp.core.batch_norm_modes import TASK_NORM, TRANSDUCTIVE, check_mode
from tf_mamlpp.core.fast_weights import FastWeightsModel
from tf_mamlpp.core.per_step_batch_norm import Moments, PerStepBatchNorm


class KerasBackbone(FastWeightsModel):
    """MAML++'s meta-parameters around a user's Keras model that outputs logits.

    Args:
      model: a built Keras 3 model, (batch, h, w, c) images -> (batch, way) logits.
      inner_steps: inner steps; the banks have inner_steps + 1 rows, the rates
        inner_steps.
      bnrs, bnwb, lslr, inner_lr, bn_momentum, bn_mode: as for `MamlppNetwork`.
    """

    def __init__(self, model, inner_steps, bnrs=True, bnwb=True, lslr=True, inner_lr=0.1, bn_momentum=0.1, bn_mode=TRANSDUCTIVE,
                 **kwargs):
        super().__init__(**kwargs)
        if not model.built:
            raise ValueError(f"model {model.name!r} must be built (give it an Input) before "
                             "it is wrapped")
        self.backbone = model
        self.bn_mode = check_mode(bn_mode)
        self.inner_steps = inner_steps
        self.image_shape = tuple(int(d) for d in model.input_shape[1:])
        self.way = int(model.output_shape[-1])
        self.lslr = lslr
        layers = _leaf_layers(model)
        self._norm_of = {}
        norms = []
        for layer in layers:
            if isinstance(layer, keras.layers.BatchNormalization):
                self._norm_of[id(layer)] = len(norms)
                norms.append(_per_step_norm(layer, inner_steps, bnrs, bnwb, bn_momentum,
                                            bn_mode))
                layer.trainable = False  # its role is the per-step norm's
        self._norms = norms
        self._weighted = [layer for layer in layers
                          if layer.trainable_weights and id(layer) not in self._norm_of]
        self._rates = [self.add_weight(
            name=f"{layer.name}_inner_rate", shape=(inner_steps,),
            initializer=keras.initializers.Constant(inner_lr), trainable=lslr)
            for layer in self._weighted]
        self.built = True

    @property
    def norms(self):
        return list(self._norms)

    @property
    def fast_variables(self):
        """The weights the inner loop adapts: "layer/index" -> variable."""
        return {f"{layer.name}/{index}": variable for layer in self._weighted
                for index, variable in enumerate(layer.trainable_weights)}

    @property
    def inner_rates(self):
        return {layer.name: rate for layer, rate in zip(self._weighted, self._rates)}

    def forward(self, images, fast_weights, state, bn_mode=TRANSDUCTIVE,
                compute_dtype=tf.float32, support=None):
        """Logits of a batch of tasks; see `MamlppNetwork.forward`.

        `images` needs a static number of tasks (the meta-step passes one).
        """
        if compute_dtype != tf.float32:
            raise ValueError("a KerasBackbone computes in float32; mixed precision is for "
                             "the built-in network")
        tasks = images.shape[0]
        if tasks is None:
            raise ValueError("KerasBackbone.forward needs a static number of tasks")
        logits, moments = [], []
        for task in range(tasks):
            task_support = None if support is None else [
                _task_moments(m, task, norm) for m, norm in zip(support, self._norms)]
            task_logits, task_moments = self._task_forward(
                images[task], {name: w[task] for name, w in fast_weights.items()}, state,
                bn_mode, task_support)
            logits.append(task_logits)
            moments.append(task_moments)
        logits = tf.cast(tf.stack(logits), tf.float32)
        if support is not None:
            return logits, None
        return logits, [Moments(tf.concat([m[i].mean for m in moments], 0),
                                tf.concat([m[i].variance for m in moments], 0), moments[0][i].size)
                         for i in range(len(self._norms))]

    def _task_forward(self, images, weights, state, bn_mode, support):
        """One task's (batch, way) logits and, for a support pass, its per-norm moments."""
        moments = [None] * len(self._norms)
        target = support is not None
        names = {id(layer): [f"{layer.name}/{i}" for i in range(len(layer.trainable_weights))]
                 for layer in self._weighted}

        def run_layer(layer, *args, **kwargs):
            if isinstance(layer, keras.Model):
                return _run_graph(layer, args[0], run_layer)
            if id(layer) in self._norm_of:
                index = self._norm_of[id(layer)]
                x = args[0]
                rank = len(x.shape)
                x4 = x if rank == 4 else tf.reshape(x, (-1, 1, 1, x.shape[-1]))
                y, moments[index] = self._norms[index](
                    x4, state=state, mode=bn_mode, target=target,
                    support=support[index] if target else None)
                return y if rank == 4 else tf.reshape(y, tf.shape(x))
            if id(layer) in names:
                values = [weights[name] for name in names[id(layer)]]
                non_trainable = [v.value for v in layer.non_trainable_variables]
                outputs, _ = layer.stateless_call(values, non_trainable, *args, **kwargs)
                return outputs
            return layer(*args, **kwargs)

        return _run_graph(self.backbone, images, run_layer), moments


def _per_step_norm(layer, inner_steps, per_step_statistics, per_step_affine, momentum, bn_mode):
    """A `PerStepBatchNorm` for a Keras BatchNormalization layer, from its gamma and beta."""
    if layer.axis not in (-1, len(layer.input.shape) - 1):
        raise ValueError(f"BatchNormalization layer {layer.name!r} normalises axis "
                         f"{layer.axis}; only the channels-last axis is supported")
    norm = PerStepBatchNorm(inner_steps + 1, per_step_statistics, per_step_affine,
                            momentum=momentum, epsilon=layer.epsilon,
                            task_norm=bn_mode == TASK_NORM, name=f"{layer.name}_per_step")
    channels = int(layer.input.shape[-1])
    norm.build((None, 1, 1, channels))
    for bank, source in ((norm.gamma, layer.gamma), (norm.beta, layer.beta)):
        if source is not None:
            bank.assign(tf.tile(source.value[tf.newaxis], [bank.shape[0], 1]))
    return norm


def _task_moments(moments, task, norm):
    """Task `task`'s slice of (tasks*channels,) support moments."""
    if moments is None:
        return None
    channels = norm.gamma.shape[-1]
    part = slice(task * channels, (task + 1) * channels)
    return Moments(moments.mean[part], moments.variance[part], moments.size)


def _leaf_layers(model):
    """The model's layers in call order, nested models flattened."""
    layers = []
    for layer in model.layers:
        layers.extend(_leaf_layers(layer) if isinstance(layer, keras.Model) else [layer])
    return layers


def _run_graph(model, inputs, run_layer):
    """`model` on `inputs` with every layer call replaced by `run_layer(layer, *args)`.

    A Sequential model is its layers in order; a functional one is walked by
    Keras's own graph runner, the one `Functional.call` uses.
    """
    if isinstance(model, keras.Sequential):
        x = inputs
        for layer in model.layers:
            x = run_layer(layer, x)
        return x
    return model._run_through_graph(
        inputs, operation_fn=lambda layer: lambda *args, **kwargs: run_layer(
            layer, *args, **kwargs))
