"""N-way K-shot episodes (tasks) as a tf.data pipeline, each a pure function of (seed, index).

Task `i` of a stream depends on nothing but `(seed, i)`, through TF's
stateless random ops: a run resumed at iteration `it` rebuilds its stream with
`start_index = it * tasks_per_batch`, and a validation or test set of
`num_tasks` tasks is the same set every time it is built, without storing it.
Give train, validation and test streams different seeds.

The classes and images of a task are drawn by TensorFlow ops from the class
sizes alone; only reading the drawn pixels depends on where the images are:
a gather from one in-memory tensor (`ClassImages`) or a read of the
memory-mapped cache files (`MappedClassImages`). The two forms of one data set
therefore give identical tasks.
"""

import dataclasses

import numpy as np
import tensorflow as tf

from tf_mamlpp.config_error import ConfigError
from tf_mamlpp.data.class_images import ClassImages
from tf_mamlpp.data.mapped_class_images import MappedClassImages

_NUM_RANDOM_STREAMS = 3  # classes, images, rotations


@dataclasses.dataclass(frozen=True)
class EpisodeSpec:
    """The shape of a task: `way` classes, `shot` support and `query` target images each."""

    way: int
    shot: int
    query: int


def episode_dataset(class_images: ClassImages | MappedClassImages, spec: EpisodeSpec,
                    tasks_per_batch: int, seed: int, augment: bool = False, start_index: int = 0,
                    num_tasks: int | None = None) -> tf.data.Dataset:
    """A dataset of batches of tasks sampled from `class_images`.

    A task draws `spec.way` distinct classes and labels them 0..way-1 in the
    order drawn (a fresh label permutation per task), then `shot + query`
    distinct images of each class: the first `shot` are support, the rest
    target, so no image is in both. With `augment`, each class is rotated by
    its own random multiple of 90 degrees, all its images alike, making a new
    class (Santoro et al. 2016, as the MAML++ reference code does). Rotations
    draw from a random stream of their own, so `augment` changes no choice of
    class or image.

    Args:
      class_images: the classes of one split, in memory or memory-mapped.
      spec: way, shot and query.
      tasks_per_batch: tasks per element (meta-batch size).
      seed: names the stream.
      augment: rotate classes (training only).
      start_index: index of the first task; skips that many tasks of the stream.
      num_tasks: length of the stream (tasks 0..num_tasks-1, a final partial
        batch kept), or None for an endless one.

    Returns:
      A tf.data.Dataset of dicts, B = tasks_per_batch (fewer in a final batch):
      support_images (B, way*shot, H, W, C) float32, support_labels
      (B, way*shot) int32, target_images (B, way*query, H, W, C) float32,
      target_labels (B, way*query) int32; images class after class, in [0, 1]
      (uint8 images are divided by 255).

    Raises:
      ValueError: a count is not positive or does not fit the data, naming the
        argument (a ConfigError where it is a setting of the run).
    """
    _check_arguments(class_images, spec, tasks_per_batch, augment, start_index, num_tasks)
    read_images = _image_reader(class_images, spec)
    counts = tf.constant(class_images.class_counts)
    num_classes = class_images.num_classes
    max_count = int(class_images.class_counts.max())

    def make_task(index):
        task_seed = tf.stack([tf.constant(seed, tf.int64), index])
        return _sample_task(read_images, counts, num_classes, max_count,
                            class_images.image_shape, spec, augment, task_seed)

    if num_tasks is None:
        indices = tf.data.Dataset.counter(start_index)
    else:
        indices = tf.data.Dataset.range(start_index, num_tasks)
    tasks = indices.map(make_task, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return tasks.batch(tasks_per_batch, drop_remainder=False).prefetch(tf.data.AUTOTUNE)


def _check_arguments(class_images, spec, tasks_per_batch, augment, start_index, num_tasks):
    """Raises a one-line ValueError naming the argument for a count that cannot work."""
    for name, value in dataclasses.asdict(spec).items():
        if value < 1:
            raise ConfigError(f"{name}={value}: must be at least 1", name)
    if tasks_per_batch < 1:
        raise ValueError(f"tasks_per_batch={tasks_per_batch}: must be at least 1")
    if spec.way > class_images.num_classes:
        raise ConfigError(f"way={spec.way}: more than the {class_images.num_classes} "
                          "classes of this split", "way")
    smallest = int(class_images.class_counts.min())
    if spec.shot + spec.query > smallest:
        raise ConfigError(f"shot={spec.shot} plus query={spec.query}: more than the "
                          f"{smallest} images of the smallest class", "shot", "query")
    if num_tasks is not None and num_tasks < 1:
        raise ValueError(f"num_tasks={num_tasks}: must be at least 1, or None for endless")
    if start_index < 0 or (num_tasks is not None and start_index > num_tasks):
        raise ValueError(f"start_index={start_index}: must lie in 0..num_tasks ({num_tasks})")
    height, width = class_images.image_shape[:2]
    if augment and height != width:
        raise ConfigError(f"augment=True rotates by 90 degrees and needs square images, "
                          f"got {height}x{width}", "augment")


def _image_reader(class_images, spec):
    """The function that reads a task's drawn images, as float32 in [0, 1].

    It maps the drawn classes (way,) and image indices within each class
    (way, shot+query) to the images (way, shot+query, H, W, C).
    """
    shape = [spec.way, spec.shot + spec.query, *class_images.image_shape]
    if isinstance(class_images, MappedClassImages):
        def read(classes, picks):
            images = tf.numpy_function(class_images.gather, [classes, picks], tf.uint8,
                                       stateful=False)
            return tf.ensure_shape(images, shape)
    else:
        # Made once, eagerly: the map function captures these tensors by
        # reference instead of embedding a copy of the array in its graph.
        all_images = tf.constant(class_images.images)
        offsets = tf.constant(class_images.class_offsets)

        def read(classes, picks):
            return tf.gather(all_images, tf.gather(offsets, classes)[:, tf.newaxis] + picks)

    def read_unit_range(classes, picks):
        images = read(classes, picks)
        if images.dtype == tf.uint8:
            # tf.data divides exactly (image_decoding.unit_range's table is for
            # graphs that Grappler rewrites) and three times faster than the table.
            return tf.cast(images, tf.float32) / 255.0
        return images

    return read_unit_range


def _sample_task(read_images, counts, num_classes, max_count, image_shape, spec, augment,
                 task_seed):
    """One task's dict of unbatched tensors; see `episode_dataset`."""
    class_seed, image_seed, rotation_seed = tf.unstack(
        tf.random.experimental.stateless_split(task_seed, _NUM_RANDOM_STREAMS))
    classes = _random_distinct(class_seed, tf.constant([num_classes], tf.int64), num_classes,
                               spec.way)[0]  # (way,)
    picks = _random_distinct(image_seed, tf.gather(counts, classes), max_count,
                             spec.shot + spec.query)  # (way, shot+query), within each class
    task_images = read_images(classes, picks)  # (way, shot+query, H, W, C)
    if augment:
        turns = tf.random.stateless_uniform([spec.way], rotation_seed, minval=0, maxval=4,
                                            dtype=tf.int32)
        task_images = _rotate_classes(task_images, turns)
    labels = tf.range(spec.way, dtype=tf.int32)
    return {
        "support_images": tf.reshape(task_images[:, :spec.shot],
                                     [spec.way * spec.shot, *image_shape]),
        "support_labels": tf.repeat(labels, spec.shot),
        "target_images": tf.reshape(task_images[:, spec.shot:],
                                    [spec.way * spec.query, *image_shape]),
        "target_labels": tf.repeat(labels, spec.query),
    }


def _random_distinct(seed, counts, max_count, size):
    """Per row r of `counts`, `size` distinct int64 indices in 0..counts[r]-1, in random order.

    Uniform keys, those beyond a row's count pushed past every real key, and
    the `size` smallest taken: sampling without replacement from rows of
    different lengths (classes of different sizes) in one op.
    """
    keys = tf.random.stateless_uniform([tf.size(counts), max_count], seed)
    valid = tf.range(max_count, dtype=tf.int64)[tf.newaxis, :] < counts[:, tf.newaxis]
    keys = tf.where(valid, keys, 2.0)
    return tf.cast(tf.math.top_k(-keys, k=size).indices, tf.int64)


def _rotate_classes(task_images, turns):
    """Rotates class c's images (way, n, H, W, C) by turns[c] quarter turns (counter-clockwise).

    A rotation is a fixed permutation of pixels, so one gather with each
    class's permutation does it: half the time of stacking the four
    tf.image.rot90 results and picking one (1.2 vs 2.4 ms a 20-way 5-shot task).
    """
    way, per_class, height, width, channels = task_images.shape
    pixels = np.arange(height * width).reshape(height, width)
    permutations = tf.constant(np.stack([np.rot90(pixels, k).reshape(-1) for k in range(4)]))
    flat = tf.reshape(task_images, [way, per_class, height * width, channels])
    rotated = tf.gather(flat, tf.gather(permutations, turns), axis=2, batch_dims=1)
    return tf.reshape(rotated, task_images.shape)
