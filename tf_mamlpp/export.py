"""A SavedModel that adapts: the learned inner loop as a serving signature.

The export carries everything adaptation needs (the initialisation, the
per-step batch-norm banks, the learned rates and the trained number of
steps), so `tf.saved_model.load` in a process without this package adapts to
a new task:

    model = tf.saved_model.load(DIR)
    out = model.signatures["adapt_and_predict"](
        support_images=..., support_labels=..., query_images=...)
    out["probabilities"]  # (queries, way)
"""

import os
import pathlib
import shutil
import tempfile

import tensorflow as tf

from tf_mamlpp.inner_loop import adapt_and_evaluate
from tf_mamlpp.per_step_batch_norm import SERVING_MODES


class ExportError(ValueError):
    """The export directory cannot be written without losing something."""


class AdaptingModel(tf.Module):
    """The module behind the SavedModel's signatures.

    Args:
      network: a trained `MamlppNetwork`.
      num_steps: inner steps to take on a new task.

    The model serves in the non-transductive mode that matches the one the
    network was trained in (`SERVING_MODES`: a transductive model normalises
    its queries with the support set's statistics), so no query's answer
    depends on the other queries.
    """

    def __init__(self, network, num_steps):
        super().__init__(name="mamlpp")
        self.network = network
        self.num_steps = num_steps
        self.bn_mode = SERVING_MODES[network.bn_mode]
        height, width, channels = network.image_shape
        # Read by `main.py --mode=adapt` to prepare images as training did.
        self.way = tf.Variable(network.way, trainable=False, name="way")
        self.image_shape = tf.Variable(network.image_shape, trainable=False, name="image_shape")
        images = tf.TensorSpec((None, height, width, channels), tf.float32)
        self.adapt_and_predict = tf.function(self._adapt_and_predict, input_signature=[
            images, tf.TensorSpec((None,), tf.int32), images])
        self.embed = tf.function(self._embed, input_signature=[images])

    def _adapt_and_predict(self, support_images, support_labels, query_images):
        """Adapts to (support_images, support_labels) and classifies query_images.

        Images are float32 in [0, 1], as decoded from their files and resized
        to the training size; labels are int32 in [0, way).

        Returns:
          {"logits": (queries, way), "probabilities": (queries, way)}.
        """
        support_images = self._check_image_shape(support_images)
        query_images = self._check_image_shape(query_images)
        checks = [
            tf.debugging.assert_positive(
                tf.size(support_labels), message="the support set is empty"),
            tf.debugging.assert_positive(
                tf.shape(query_images)[0], message="query_images is empty"),
            tf.debugging.assert_equal(
                tf.shape(support_images)[0], tf.shape(support_labels)[0],
                message="support_images and support_labels differ in length"),
            tf.debugging.assert_non_negative(
                support_labels, message="support_labels must be in [0, way)"),
            tf.debugging.assert_less(
                support_labels, self.network.way, message="support_labels must be in [0, way)"),
        ]
        with tf.control_dependencies(checks):
            tasks = {"support_images": support_images[tf.newaxis],
                     "support_labels": support_labels[tf.newaxis],
                     "target_images": query_images[tf.newaxis],
                     # Unused: only the logits are served.
                     "target_labels": tf.zeros_like(query_images[tf.newaxis, :, 0, 0, 0],
                                                    tf.int32)}
        result = adapt_and_evaluate(
            self.network, tasks, self.num_steps, second_order=False,
            target_steps=[self.num_steps - 1], bn_mode=self.bn_mode)
        logits = result["logits"][0]
        return {"logits": logits, "probabilities": tf.nn.softmax(logits)}

    def _check_image_shape(self, images):
        """A loaded signature checks dtypes but not shapes; this names the expected size."""
        return tf.ensure_shape(images, (None, *self.network.image_shape))

    def _embed(self, images):
        """Features before the head under the meta-learned initialisation: (n, features).

        Normalised by the initialisation's running banks: each image's own.
        """
        return {"features": self.network.running_embed(self._check_image_shape(images))}


def export(network, num_steps, export_dir):
    """Writes the SavedModel to `export_dir`, which must not exist or be empty.

    The model is written to a temporary folder beside `export_dir` and moved
    into place, so a failed export leaves nothing half-written.

    Raises:
      ExportError: `export_dir` exists and holds files.
    """
    export_dir = pathlib.Path(export_dir)
    if export_dir.exists() and any(export_dir.iterdir()):
        raise ExportError(f"--export_dir {export_dir} is not empty; choose a new folder "
                          "(an earlier export is never overwritten)")
    export_dir.parent.mkdir(parents=True, exist_ok=True)
    module = AdaptingModel(network, num_steps)
    staging = pathlib.Path(tempfile.mkdtemp(prefix=".export-", dir=export_dir.parent))
    try:
        tf.saved_model.save(module, str(staging / "model"), signatures={
            "adapt_and_predict": module.adapt_and_predict, "embed": module.embed})
        if export_dir.exists():
            export_dir.rmdir()
        os.replace(staging / "model", export_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return export_dir
