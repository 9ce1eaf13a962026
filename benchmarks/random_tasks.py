"""Meta-batches of random Omniglot-sized images, the benchmarks' input.

The step's cost does not depend on the pixels, so random images stand in for
the data and keep the episode pipeline out of the measurement.
"""

# The paper's Omniglot meta-batch: 8 tasks, 5 inner steps, 1 target image per class.
BATCH_SIZE, INNER_STEPS, QUERY = 8, 5, 1


def random_batch(way, shot, query, batch_size, image_shape=(28, 28, 1), seed=0):
    """A meta-batch of random images with balanced labels, as the episode pipeline gives."""
    # Imported here so that benchmark parents, which only read the constants,
    # stay free of TensorFlow and cannot raise their children's peak memory.
    import numpy as np
    import tensorflow as tf
    rng = np.random.default_rng(seed)

    def labels(per_class):
        return tf.constant(np.tile(np.repeat(np.arange(way), per_class), (batch_size, 1)),
                           tf.int32)

    def images(per_class):
        return tf.constant(rng.random((batch_size, way * per_class, *image_shape), np.float32))

    return {"support_images": images(shot), "support_labels": labels(shot),
            "target_images": images(query), "target_labels": labels(query)}
