"""Meta-batches of random images with balanced labels, in the batch format of episodes.py.

For what needs tasks of given shapes but no data set: timing a meta-step
(benchmarks/, the --mixed_precision=auto probe), whose cost does not depend
on the pixels, and the tests' small problems.
"""

import numpy as np
import tensorflow as tf


def random_tasks(num_tasks, way, shot, query, image_shape=(28, 28, 1), seed=0,
                 class_offset=0.0):
    """`num_tasks` random `way`-way tasks, the same ones for the same arguments.

    Each task's support labels are 0, 1, ..., way - 1 repeated `shot` times
    (every class equally often), its target labels likewise `query` times.
    Images are uniform in [0, 1) plus `class_offset` * label / way: with an
    offset the classes differ, and a network can learn to tell them apart.

    Returns:
      A dict of support_images (num_tasks, way * shot, *image_shape) float32,
      support_labels (num_tasks, way * shot) int32, and target_images and
      target_labels likewise with `query` images a class.
    """
    rng = np.random.default_rng(seed)

    def split(per_class):
        labels = np.tile(np.arange(way, dtype=np.int32), (num_tasks, per_class))
        images = rng.random((num_tasks, way * per_class, *image_shape))
        images += class_offset * labels.reshape(labels.shape + (1,) * len(image_shape)) / way
        return tf.constant(images, tf.float32), tf.constant(labels)

    support_images, support_labels = split(shot)
    target_images, target_labels = split(query)
    return {"support_images": support_images, "support_labels": support_labels,
            "target_images": target_images, "target_labels": target_labels}
