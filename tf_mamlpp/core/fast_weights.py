"""The fast-weights protocol: what the inner loop, the meta-step and the meta-learner ask of a learner.

`MamlppNetwork` (network.py) and `KerasBackbone` (keras_backbone.py) are
`FastWeightsModel`s. A subclass provides:
- `inner_steps`, `way`, `bn_mode`, `image_shape`: inner steps, classes, the
  batch-norm mode, (h, w, c) of the images.
- `fast_variables`: name ("layer/weight") -> the variable the inner loop adapts.
- `inner_rates`: LSLR's layer name -> (inner_steps,) variable of rates.
- `norms`: the `PerStepBatchNorm` layers, in `forward`'s order.
- `forward(images, fast_weights, state, bn_mode, compute_dtype, support)`:
  (tasks, batch, way) logits at weight state `state`, and for a support pass
  (`support` None) each norm's `Moments`, which the target pass then takes.
- `trainable_variables`: every meta-parameter.
- `running_embed(images)`: (n, features) of (n, h, w, c) images under the
  initialisation, each normalised on its own (the export's `embed`).
This class derives the rest from them: `initial_fast_weights`, `inner_rate`
and `update_running_statistics`.
"""

import keras
import tensorflow as tf


class FastWeightsModel(keras.Model):
    """A learner whose forward pass takes explicit fast weights (see the module docstring)."""

    def initial_fast_weights(self, num_tasks=1):
        """The meta-learned initialisation, one copy per task.

        Returns:
          dict name -> tensor of shape (num_tasks, *variable shape); the
          copies' gradients sum into the variables' under an outer tape.
        """
        return {name: tf.tile(var[tf.newaxis], [num_tasks] + [1] * len(var.shape))
                for name, var in self.fast_variables.items()}

    def inner_rate(self, weight_name, step):
        """The learning rate for `weight_name` at inner step `step` (a Python int).

        Steps past the trained number reuse the last step's rate.
        """
        if step < 0:
            raise ValueError(f"inner step must be non-negative, got {step}")
        layer = weight_name.rsplit("/", 1)[0]
        return self.inner_rates[layer][min(step, self.inner_steps - 1)]

    def update_running_statistics(self, per_stage_means, per_stage_variances):
        """Folds (norms, states, channels) support statistics into the batch-norm banks."""
        for norm, means, variances in zip(self.norms, per_stage_means, per_stage_variances):
            norm.update_running_statistics(means, variances)
