"""A SavedModel that adapts: the learned inner loop as serving signatures.

The export carries everything adaptation needs (the initialisation, the
per-step batch-norm banks, the learned rates and the trained number of
steps), so `tf.saved_model.load` in a process without this package, or
TensorFlow Serving, adapts to a new task:

    model = tf.saved_model.load(DIR)
    out = model.signatures["adapt_and_predict"](
        support_images=..., support_labels=..., query_images=...)
    out["probabilities"]  # (queries, way)

Signatures (`serving_default` is `adapt_and_predict`):
- adapt_and_predict: support_images float32 (n, h, w, c), support_labels
  int32 (n,) in [0, way), query_images float32 (m, h, w, c) ->
  {"logits", "probabilities"}, each (m, way).
- adapt_and_predict_files: the same from the contents of image files,
  support_image_bytes and query_image_bytes string (n,) and (m,), each a
  whole PNG, JPEG, GIF or BMP file; it prepares them as below.
- embed: images float32 (n, h, w, c) -> {"features"}, (n, feature size).
`model.way[0]` and `model.image_shape[0]` hold the number of classes and
(h, w, c).

Images for the float signatures are prepared as training prepared its own,
and the file signature prepares them so, with image_decoding.decode_image:
8-bit RGB made grayscale for a one-channel model by tf.image.rgb_to_grayscale,
divided by 255 to [0, 1] (never inverted: Omniglot's white background is 1),
and stretched to (h, w) by tf.image.resize with method="area". A model
trained on image folders (`rounded_to_uint8`) was trained on images resized
first and rounded to 8 bits before the division (image_decoding.py).
"""

import functools
import os
import pathlib
import shutil
import tempfile

import keras
import tensorflow as tf

from tf_mamlpp.core.batch_norm_modes import SERVING_MODES
from tf_mamlpp.core.inner_loop import adapt_and_evaluate
from tf_mamlpp.data.image_decoding import decode_image
from tf_mamlpp.ops import plain_tensorflow

# The first is also `serving_default`, the one TensorFlow Serving needs.
SIGNATURES = ("adapt_and_predict", "adapt_and_predict_files", "embed")
# The folder beside the export that it is written in before it is moved into place.
STAGING_PREFIX = ".export-"


class ExportError(ValueError):
    """The export directory cannot be written without losing something."""


def decode_files(contents, image_shape, rounded_to_uint8=False):
    """The file signature's decoding: (n,) image files' contents -> float32 (n, h, w, c).

    Each file as `image_decoding.decode_image` decodes it, the way training did.
    """
    return tf.map_fn(lambda one: decode_image(one, image_shape, rounded_to_uint8), contents,
                     fn_output_signature=tf.TensorSpec(image_shape, tf.float32))


class AdaptingModel:
    """The SavedModel's signatures as tf.functions of the same names, for use in-process too.

    Args:
      network: a trained `MamlppNetwork`.
      num_steps: inner steps to take on a new task.
      rounded_to_uint8: see `image_decoding.decode_image`.

    The model serves in the non-transductive mode that matches the one the
    network was trained in (`SERVING_MODES`: a transductive model normalises
    its queries with the support set's statistics), so no query's answer
    depends on the other queries.
    """

    def __init__(self, network, num_steps, rounded_to_uint8=False):
        self.network = network
        self.num_steps = num_steps
        self.rounded_to_uint8 = rounded_to_uint8
        self.bn_mode = SERVING_MODES[network.bn_mode]
        images = tf.TensorSpec((None, *network.image_shape), tf.float32)
        labels = tf.TensorSpec((None,), tf.int32)
        files = tf.TensorSpec((None,), tf.string)
        self.adapt_and_predict = tf.function(
            self._adapt_and_predict, input_signature=[images, labels, images])
        self.adapt_and_predict_files = tf.function(
            self._adapt_and_predict_files, input_signature=[files, labels, files])
        self.embed = tf.function(self._embed, input_signature=[images])

    def _adapt_and_predict(self, support_images, support_labels, query_images):
        """Adapts to (support_images, support_labels) and classifies query_images.

        Images are prepared as the module docstring says; labels are in [0, way).

        Returns:
          {"logits": (queries, way), "probabilities": (queries, way)}.
        """
        return self._adapted_predictions(support_images, support_labels, query_images,
                                         "support_images", "query_images")

    def _adapt_and_predict_files(self, support_image_bytes, support_labels, query_image_bytes):
        """`_adapt_and_predict` of image files' contents, decoded as training decoded its images."""
        shape, rounded = self.network.image_shape, self.rounded_to_uint8
        return self._adapted_predictions(
            decode_files(support_image_bytes, shape, rounded), support_labels,
            decode_files(query_image_bytes, shape, rounded), "support_image_bytes",
            "query_image_bytes")

    def _adapted_predictions(self, support_images, support_labels, query_images, support_name,
                             query_name):
        """The adaptation behind both adapt signatures; the names are their inputs'."""
        support_images = self._check_image_shape(support_images)
        query_images = self._check_image_shape(query_images)
        checks = [
            tf.debugging.assert_positive(
                tf.size(support_labels), message="the support set is empty"),
            tf.debugging.assert_positive(
                tf.shape(query_images)[0], message=f"{query_name} is empty"),
            tf.debugging.assert_equal(
                tf.shape(support_images)[0], tf.shape(support_labels)[0],
                message=f"{support_name} and support_labels differ in length"),
            tf.debugging.assert_non_negative(
                support_labels, message="support_labels must be in [0, way)"),
            tf.debugging.assert_less(
                support_labels, self.network.way, message="support_labels must be in [0, way)"),
        ]
        with tf.control_dependencies(checks):
            logits = self._adapted_logits(support_images, support_labels, query_images)
        return {"logits": logits, "probabilities": tf.nn.softmax(logits)}

    @functools.cached_property
    def _adapted_logits(self):
        """The adaptation both adapt signatures call, one concrete function traced once.

        Being concrete, it is not traced again for each signature, nor when
        tf.saved_model.save retraces the signatures in its saving context:
        that halves an export's time.
        """
        images = tf.TensorSpec((None, *self.network.image_shape), tf.float32)
        return tf.function(self._adapted_logits_of).get_concrete_function(
            images, tf.TensorSpec((None,), tf.int32), images)

    def _adapted_logits_of(self, support_images, support_labels, query_images):
        """The queries' logits after adapting to the support set: (queries, way)."""
        tasks = {"support_images": support_images[tf.newaxis],
                 "support_labels": support_labels[tf.newaxis],
                 "target_images": query_images[tf.newaxis],
                 # Unused: only the logits are served.
                 "target_labels": tf.zeros_like(query_images[tf.newaxis, :, 0, 0, 0], tf.int32)}
        result = adapt_and_evaluate(
            self.network, tasks, self.num_steps, second_order=False,
            target_steps=[self.num_steps - 1], bn_mode=self.bn_mode)
        return result["logits"][0]

    def _check_image_shape(self, images):
        """A loaded signature checks dtypes but not shapes; this names the expected size."""
        return tf.ensure_shape(images, (None, *self.network.image_shape))

    def _embed(self, images):
        """Features before the head under the meta-learned initialisation: (n, features).

        Normalised by the initialisation's running banks: each image's own.
        """
        return {"features": self.network.running_embed(self._check_image_shape(images))}


def export(network, num_steps, export_dir, rounded_to_uint8=False, replace=False):
    """Writes the SavedModel to `export_dir`, which must not exist or be empty.

    It is written with Keras's ExportArchive: tf.saved_model.save of Keras 3
    variables held by a tf.Module gives a SavedModel that TensorFlow 1's
    loader (TensorFlow Serving's, saved_model_cli's) cannot find variables
    in. Its functions are traced with TensorFlow's derivatives (see
    tf_mamlpp.ops.plain_tensorflow). The model is written to a
    temporary folder beside `export_dir` and moved into place, so a failed
    export leaves nothing half-written.

    Args:
      rounded_to_uint8: whether the training images were rounded to 8 bits
        after resizing, as image folders' are (see `image_decoding.decode_image`).
      replace: replace what `export_dir` holds (a run's own, earlier export),
        by two renames once the new model is written.

    Raises:
      ExportError: `export_dir` exists and holds files, and `replace` is false.
    """
    export_dir = pathlib.Path(export_dir)
    if not replace and export_dir.exists() and any(export_dir.iterdir()):
        raise ExportError(f"--export_dir {export_dir} is not empty; choose a new folder "
                          "(an earlier export is never overwritten)")
    export_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = pathlib.Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=export_dir.parent))
    try:
        with plain_tensorflow():
            archive = keras.export.ExportArchive()
            archive.track(network)
            model = AdaptingModel(network, num_steps, rounded_to_uint8)
            for name in SIGNATURES:
                archive.add_endpoint(name, getattr(model, name))
            # Read by `main.py --mode=adapt`, and by anyone preparing float images.
            for name, value in (("way", network.way), ("image_shape", network.image_shape)):
                archive.add_variable_collection(
                    name, [tf.Variable(value, trainable=False, name=name)])
            archive.write_out(str(staging / "model"), verbose=False)
        if export_dir.exists():
            os.replace(export_dir, staging / "replaced")  # removed with the staging folder
        os.replace(staging / "model", export_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return export_dir
