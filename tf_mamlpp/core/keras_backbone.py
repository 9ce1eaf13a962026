"""Any Keras 3 backbone as a MAML++ learner, adapted through stateless calls.

The user's model (Sequential or functional, nested or not, built from
standard layers) runs with explicit fast weights. `keras.models.clone_model`
copies its graph with every layer wrapped (`_Routed`): the copy shares the
user's layers and weights, and each wrapped call is routed here:
- a layer with weights (Conv2D, Dense, ...) runs through `Layer.stateless_call`
  with the fast weights' values, so the user's layer computes as written;
- a BatchNormalization layer runs as a `PerStepBatchNorm` created for it,
  which gives it BNRS, BNWB and the batch-norm modes; the banks start from
  the layer's gamma and beta, and the layer's own weights are frozen;
- a 2x2 MaxPooling2D through the closed-form max-pool derivatives of
  ops/max_pool_kernel.py, as in the built-in network; in a Sequential model
  a LeakyReLU or ReLU right before it is taken into the same kernel, whose
  activation derivative then runs on the pooled values;
- any other layer (activations, Flatten, GlobalAveragePooling, Add) through
  `Layer.stateless_call` too.
Under mixed precision the copy's wrappers take Keras's mixed dtype policy
("mixed_bfloat16", "mixed_float16"), so Keras casts each layer's inputs
and weights to the 16-bit dtype as it does for a mixed-precision model.
LSLR gets one rate per inner step for every layer with weights. The class
is a `FastWeightsModel` (fast_weights.py), so the inner loop, the meta-step,
`MetaLearner` (task by task, `parallel_tasks` at once, in mixed precision)
and the export take it as they take `MamlppNetwork`. Only public Keras API
is used.
"""

import keras
import tensorflow as tf

from tf_mamlpp.core.batch_norm_modes import (DEFAULT_MODE, REPTILE_START, RUNNING, SIZE_ALPHA,
                                             TASK_NORM, TRANSDUCTIVE, check_mode,
                                             check_task_norm_options)
from tf_mamlpp.core.fast_weights import FastWeightsModel
from tf_mamlpp.core.per_step_batch_norm import Moments, PerStepBatchNorm
from tf_mamlpp.ops.max_pool_kernel import leaky_relu_max_pool_2x2


class KerasBackbone(FastWeightsModel):
    """MAML++'s meta-parameters around a user's Keras model that outputs logits.

    Args:
      model: a built Keras 3 model, (batch, h, w, c) images -> (batch, way) logits.
      inner_steps: inner steps; the banks have inner_steps + 1 rows, the rates
        inner_steps.
      bnrs, bnwb, lslr, inner_lr, bn_momentum, bn_mode, task_norm_alpha,
        task_norm_unbiased, task_norm_start: as for `MamlppNetwork`.
    """

    def __init__(self, model, inner_steps, bnrs=True, bnwb=True, lslr=True, inner_lr=0.1,
                 bn_momentum=0.1, bn_mode=DEFAULT_MODE, task_norm_alpha=SIZE_ALPHA,
                 task_norm_unbiased=False, task_norm_start=REPTILE_START, **kwargs):
        super().__init__(**kwargs)
        if not isinstance(model, keras.Model):
            raise ValueError(f"the backbone must be a Keras model, got {type(model).__name__}")
        if not model.built:
            raise ValueError(f"model {model.name!r} must be built (give it an Input) before "
                             "it is wrapped")
        self.backbone = model
        self.bn_mode = check_mode(bn_mode)
        check_task_norm_options(bn_mode, task_norm_alpha, task_norm_unbiased, task_norm_start)
        self.task_norm_alpha, self.task_norm_unbiased = task_norm_alpha, task_norm_unbiased
        self.task_norm_start = task_norm_start
        self.inner_steps = inner_steps
        self.image_shape = tuple(int(d) for d in model.input_shape[1:])
        self.way = int(model.output_shape[-1])
        self.bnrs, self.bnwb, self.lslr = bnrs, bnwb, lslr
        self.inner_lr, self.bn_momentum = inner_lr, bn_momentum
        layers = _leaf_layers(model)
        self._norm_of = {}
        norms = []
        norm_settings = dict(
            num_states=inner_steps + 1, per_step_statistics=bnrs, per_step_affine=bnwb,
            momentum=bn_momentum, task_norm=bn_mode == TASK_NORM,
            task_norm_alpha=task_norm_alpha, task_norm_unbiased=task_norm_unbiased,
            task_norm_start=task_norm_start)
        for layer in layers:
            if isinstance(layer, keras.layers.BatchNormalization):
                self._norm_of[id(layer)] = len(norms)
                norms.append(_per_step_norm(layer, norm_settings))
                layer.trainable = False  # its role is the per-step norm's
        self._norms = norms
        self._weighted = [layer for layer in layers
                          if layer.trainable_weights and id(layer) not in self._norm_of]
        self._pool_slopes, self._folded_activations = _fast_pools(model)
        self._rates = [self.add_weight(
            name=f"{layer.name}_inner_rate", shape=(inner_steps,),
            initializer=keras.initializers.Constant(inner_lr), trainable=lslr)
            for layer in self._weighted]
        self._router = _Router(self)
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

    def forward(self, images, fast_weights, state, bn_mode=TRANSDUCTIVE, compute_dtype=None,
                support=None):
        """Logits of a batch of tasks; see `MamlppNetwork.forward`.

        `images` needs a static number of tasks (the meta-step passes one).
        """
        logits, moments, _ = self._forward(images, fast_weights, state, bn_mode, compute_dtype,
                                           support)
        return logits, moments

    def running_embed(self, images):
        """(n, features) inputs of the model's last layer for (n, h, w, c) images.

        Under the initialisation, normalised by its running banks: each
        image's features are its own. The export's `embed` signature serves it.
        """
        _, _, features = self._forward(images[tf.newaxis], self.initial_fast_weights(), 0,
                                       RUNNING, None, [None] * len(self._norms))
        return tf.reshape(features[0], (tf.shape(images)[0], -1))

    def call(self, images):
        """Logits of (batch, h, w, c) images under the initialisation, before adaptation."""
        return self.forward(images[tf.newaxis], self.initial_fast_weights(), 0, RUNNING,
                            support=[None] * len(self._norms))[0][0]

    def get_config(self):
        """The MAML++ settings around the model (the model is the user's own object)."""
        return {"model": self.backbone.name, "way": self.way, "image_shape": self.image_shape,
                "inner_steps": self.inner_steps, "bnrs": self.bnrs, "bnwb": self.bnwb,
                "lslr": self.lslr, "inner_lr": self.inner_lr, "bn_momentum": self.bn_momentum,
                "bn_mode": self.bn_mode, "task_norm_alpha": self.task_norm_alpha,
                "task_norm_unbiased": self.task_norm_unbiased,
                "task_norm_start": self.task_norm_start}

    def _forward(self, images, fast_weights, state, bn_mode, compute_dtype, support):
        """(logits, support moments or None, inputs of the last layer), one task at a time."""
        compute_dtype = tf.as_dtype(compute_dtype or self.variable_dtype)
        graph = self._router.graph(compute_dtype)
        tasks = images.shape[0]
        if tasks is None:
            raise ValueError("KerasBackbone.forward needs a static number of tasks")
        logits, moments, features = [], [], []
        for task_images, weights, task_support in zip(
                tf.unstack(images, num=tasks), _task_weights(fast_weights, tasks),
                _task_supports(support, tasks), strict=True):
            with self._router.routing(weights, state, bn_mode, task_support) as task_pass:
                logits.append(tf.cast(graph(task_images), self.variable_dtype))
            moments.append(task_pass.moments)
            features.append(task_pass.last_input)
        logits, features = tf.stack(logits), tf.stack(features)
        if support is not None:
            return logits, None, features
        return logits, [Moments(tf.concat([m[i].mean for m in moments], 0),
                                tf.concat([m[i].variance for m in moments], 0), moments[0][i].size)
                        for i in range(len(self._norms))], features


class _Pass:
    """One task's forward pass: what each routed layer call reads and leaves."""

    def __init__(self, weights, state, bn_mode, support, norms):
        self.weights = weights
        self.state = state
        self.bn_mode = bn_mode
        self.support = support
        self.moments = [None] * norms
        self.last_input = None  # the input of the latest layer called: the last one's, at the end


class _Router:
    """Runs each layer of the copied graph as the current pass asks (see the module docstring).

    A plain object, not a Keras layer, so that neither the copies nor the
    pass's tensors are tracked as the model's state.
    """

    def __init__(self, backbone):
        self.backbone = backbone
        self.task_pass = None
        self.graphs = {}  # compute dtype -> the copy of the user's graph that computes in it

    def graph(self, compute_dtype):
        """The copy of the user's model whose layers compute in `compute_dtype`."""
        if compute_dtype not in self.graphs:
            variable_dtype = self.backbone.variable_dtype
            policy = (variable_dtype if compute_dtype == variable_dtype
                      else keras.DTypePolicy(f"mixed_{compute_dtype.name}"))
            self.graphs[compute_dtype] = keras.models.clone_model(
                self.backbone.backbone, recursive=True,
                clone_function=lambda layer: _Routed(layer, self, policy))
        return self.graphs[compute_dtype]

    def routing(self, *pass_settings):
        """A context in which the copied graph runs one task's pass with `pass_settings`."""
        router = self

        class Routing:
            def __enter__(self):
                router.task_pass = _Pass(*pass_settings, len(router.backbone.norms))
                return router.task_pass

            def __exit__(self, *exc_info):
                router.task_pass = None

        return Routing()

    def run(self, layer, *args, **kwargs):
        task_pass, backbone = self.task_pass, self.backbone
        if task_pass is None:  # clone_model building the copy on symbolic inputs
            return layer(*args, **kwargs)
        task_pass.last_input = args[0]
        if id(layer) in backbone._folded_activations:
            return args[0]  # the max-pool after it applies it
        if id(layer) in backbone._pool_slopes:
            return leaky_relu_max_pool_2x2(args[0], backbone._pool_slopes[id(layer)])
        if id(layer) in backbone._norm_of:
            index = backbone._norm_of[id(layer)]
            y, task_pass.moments[index] = _batch_norm(
                backbone._norms[index], args[0], task_pass,
                None if task_pass.support is None else task_pass.support[index])
            return y
        values = [task_pass.weights[f"{layer.name}/{index}"]
                  for index in range(len(layer.trainable_weights))]
        outputs, _ = layer.stateless_call(
            values, [v.value for v in layer.non_trainable_variables], *args, **kwargs)
        return outputs


class _Routed(keras.layers.Layer):
    """A layer of the user's model in the copied graph; its calls go to the `_Router`.

    Its dtype policy is the copy's: a mixed one casts the layer's floating
    inputs, and the weights it reads, to the 16-bit dtype.
    """

    def __init__(self, layer, router, dtype_policy):
        super().__init__(name=f"{layer.name}_routed", dtype=dtype_policy)
        self.layer = layer
        self.router = router

    def call(self, *args, **kwargs):
        return self.router.run(self.layer, *args, **kwargs)


def _batch_norm(norm, x, task_pass, support):
    """A per-step norm on one task's (batch, ..., channels) activations of any rank."""
    rank = len(x.shape)
    x4 = x if rank == 4 else tf.reshape(x, (-1, 1, 1, x.shape[-1]))
    target = task_pass.support is not None
    y, moments = norm(x4, state=task_pass.state, mode=task_pass.bn_mode, target=target,
                      support=support)
    return (y if rank == 4 else tf.reshape(y, tf.shape(x))), moments


def _per_step_norm(layer, norm_settings):
    """A `PerStepBatchNorm` of `norm_settings` (its keywords) for a Keras BatchNormalization
    layer, from its gamma and beta."""
    if layer.axis not in (-1, len(layer.input.shape) - 1):
        raise ValueError(f"BatchNormalization layer {layer.name!r} normalises axis "
                         f"{layer.axis}; only the channels-last axis is supported")
    # autocast=False: a 16-bit input stays 16-bit; the fused kernel takes either.
    norm = PerStepBatchNorm(**norm_settings, epsilon=layer.epsilon, autocast=False,
                            name=f"{layer.name}_per_step")
    channels = int(layer.input.shape[-1])
    norm.build((None, 1, 1, channels))
    for bank, source in ((norm.gamma, layer.gamma), (norm.beta, layer.beta)):
        if source is not None:
            bank.assign(tf.tile(source.value[tf.newaxis], [bank.shape[0], 1]))
    return norm


def _task_weights(fast_weights, tasks):
    """Per task, the dict of its fast weights, from (tasks, ...) tensors.

    Unstacked rather than indexed: the gradient of `weight[task]`
    (StridedSliceGrad) fills a zero tensor of every task's size and copies
    into it, once per weight, task and pass; that of an unstack is one
    stack. On a CPU the indexing took some 4% of a 5-way 1-shot meta-step's
    op time.
    """
    per_name = {name: tf.unstack(weight, num=tasks) for name, weight in fast_weights.items()}
    return [{name: rows[task] for name, rows in per_name.items()} for task in range(tasks)]


def _task_supports(support, tasks):
    """Per task, the per-norm support `Moments` (or None) from (tasks*channels,) ones; all None
    for a support pass (`support` None). Split, not indexed, as in `_task_weights`."""
    if support is None:
        return [None] * tasks
    per_norm = [[None] * tasks if moments is None else
                [Moments(mean, variance, moments.size) for mean, variance in
                 zip(tf.split(moments.mean, tasks), tf.split(moments.variance, tasks))]
                for moments in support]
    return [[norms[task] for norms in per_norm] for task in range(tasks)]


def _fast_pools(model):
    """The max-pools the closed-form kernel takes, and the activations taken into it.

    Returns:
      ({id of a 2x2 MaxPooling2D: the leaky ReLU slope it applies first, 1.0
      for none}, {ids of the activations taken into the max-pool after them}).
    """
    slopes, folded = {}, set()
    for layer in _leaf_layers(model):
        if _is_2x2_max_pool(layer):
            slopes[id(layer)] = 1.0  # a leaky ReLU of slope 1 is the identity
    for sequential in [model, *_nested_models(model)]:
        if not isinstance(sequential, keras.Sequential):
            continue
        for activation, pool in zip(sequential.layers, sequential.layers[1:]):
            slope = _leaky_relu_slope(activation)
            if id(pool) in slopes and slope is not None:
                slopes[id(pool)] = slope
                folded.add(id(activation))
    return slopes, folded


def _is_2x2_max_pool(layer):
    return (isinstance(layer, keras.layers.MaxPooling2D) and tuple(layer.pool_size) == (2, 2)
            and tuple(layer.strides) == (2, 2) and layer.padding == "valid"
            and layer.data_format == "channels_last")


def _leaky_relu_slope(layer):
    """The negative slope of a plain (leaky) ReLU layer, None for any other layer."""
    if isinstance(layer, keras.layers.LeakyReLU):
        return float(layer.negative_slope)
    if (isinstance(layer, keras.layers.ReLU) and layer.max_value is None
            and layer.threshold == 0):
        return float(layer.negative_slope)
    return None


def _nested_models(model):
    for layer in model.layers:
        if isinstance(layer, keras.Model):
            yield layer
            yield from _nested_models(layer)


def _leaf_layers(model):
    """The model's layers in call order, nested models flattened."""
    layers = []
    for layer in model.layers:
        layers.extend(_leaf_layers(layer) if isinstance(layer, keras.Model) else [layer])
    return layers
