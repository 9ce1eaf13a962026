"""Episodes per second of the image-folder pipeline, against what the meta-step consumes.

    python -m benchmarks.episode_pipeline          # 60,000 84x84 JPEGs, as mini-ImageNet
    python -m benchmarks.episode_pipeline --classes=20 --meta_step=false    # a quick look

Generates a mini-ImageNet-sized data set once (100 classes of 600 84x84 RGB
JPEGs in train/, val/, test/ of 64/16/20 classes; kept in --work_dir for the
next run), then measures, each in this process:
- indexing the files and decoding them into the cache (the first start);
- training tasks per second as the trainer draws them (5-way, 15 target
  images per class, 2 tasks per batch: the paper's mini-ImageNet setting),
  from the images held in memory, from the memory-mapped cache with the
  cache files in the page cache (warm) and evicted from it (cold), and, for
  comparison, decoding the drawn JPEG files for every task (no cache);
- with --meta_step, seconds per meta-iteration of the paper's 5-way 1-shot
  configuration (48 filters, 5 inner steps, second order, 2 tasks), whose
  inverse times 2 is the tasks per second the pipeline must sustain.
"""

import json
import os
import pathlib
import time

from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_string("work_dir", "/tmp/tf_mamlpp_episode_benchmark", "Where the generated data "
                    "set and its cache go (about 0.3 GB at the defaults). Default "
                    "/tmp/tf_mamlpp_episode_benchmark.")
flags.DEFINE_integer("classes", 100, "Classes, split 64/16/20 like mini-ImageNet. Default 100.")
flags.DEFINE_integer("images_per_class", 600, "Images per class. Default 600.")
flags.DEFINE_integer("source_size", 84, "Side of the generated JPEGs (84: pre-resized "
                     "mini-ImageNet; ~400 for the full-size images of the csv layout). "
                     "Default 84.")
flags.DEFINE_integer("tasks", 400, "Training tasks timed per variant, after 20 warm-up. "
                     "Default 400.")
flags.DEFINE_list("variants", ["in_memory", "mapped_warm", "mapped_cold", "decode_every_task"],
                  "Pipelines to time. Default all four.")
flags.DEFINE_bool("meta_step", True, "Also time the mini-ImageNet 5-way 1-shot meta-step. "
                  "Default true.")
flags.DEFINE_bool("fold_tasks", False, "Time the meta-step with --fold_tasks. Default false, "
                  "as main.py.")

WAY, QUERY, BATCH_SIZE = 5, 15, 2
SPLIT_FRACTIONS = {"train": 0.64, "val": 0.16, "test": 0.2}


def generate(root, classes, per_class, size):
    """Writes the data set unless it is there; smooth images with a colour per class."""
    import numpy as np
    import tensorflow as tf
    marker = root / "complete.json"
    wanted = {"classes": classes, "images_per_class": per_class, "size": size}
    if marker.is_file() and json.loads(marker.read_text()) == wanted:
        return 0.0
    started = time.monotonic()
    rng = np.random.default_rng(0)
    ramp = np.linspace(0, 1, size, dtype=np.float32)
    names = [f"n{c:08d}" for c in range(classes)]
    bounds = np.cumsum([0] + [round(classes * f) for f in SPLIT_FRACTIONS.values()])
    bounds[-1] = classes
    for split, start, end in zip(SPLIT_FRACTIONS, bounds[:-1], bounds[1:]):
        for name in names[start:end]:
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            colour = rng.uniform(0, 255, 3).astype(np.float32)
            for index in range(per_class):
                angle = rng.uniform(0, 2 * np.pi)
                field = np.cos(angle) * ramp[None, :] + np.sin(angle) * ramp[:, None]
                image = colour * (0.5 + 0.5 * field[..., None]) + rng.normal(0, 12, (size, size, 3))
                image = np.clip(image, 0, 255).astype(np.uint8)
                (folder / f"{name}_{index:04d}.jpg").write_bytes(
                    tf.io.encode_jpeg(image, quality=90).numpy())
    marker.write_text(json.dumps(wanted))
    return time.monotonic() - started


def tasks_per_second(dataset, tasks):
    """Tasks per second over `tasks` tasks of a batched dataset, after 20 warm-up tasks."""
    iterator = iter(dataset)
    for _ in range(20 // BATCH_SIZE):
        next(iterator)
    started = time.monotonic()
    for _ in range(tasks // BATCH_SIZE):
        next(iterator)
    return tasks // BATCH_SIZE * BATCH_SIZE / (time.monotonic() - started)


def evict(paths):
    """Drops the files' pages from the page cache, as after a reboot."""
    for path in paths:
        descriptor = os.open(path, os.O_RDONLY)
        os.posix_fadvise(descriptor, 0, 0, os.POSIX_FADV_DONTNEED)
        os.close(descriptor)


def decoding_every_task(class_files, image_size, shot):
    """Training tasks whose files are read and decoded for each task, as without a cache.

    Draws way classes per task and decodes shot + query files of each: the
    cost of the images, not the sampler's exact choice.
    """
    import tensorflow as tf
    from tf_mamlpp.data.decoded_images import decode_resized

    files = tf.ragged.constant([[str(f) for f in fs] for fs in class_files.files])
    num_classes = class_files.num_classes

    def task(index):
        seed = tf.stack([tf.constant(0, tf.int64), index])
        classes = tf.random.experimental.stateless_shuffle(
            tf.range(num_classes, dtype=tf.int64), seed)[:WAY]
        paths = tf.gather(files, classes)[:, :shot + QUERY].flat_values
        images = tf.map_fn(lambda p: decode_resized(tf.io.read_file(p), image_size, 3), paths,
                           fn_output_signature=tf.uint8)
        return tf.cast(images, tf.float32) / 255.0  # (way*(shot+query), H, W, 3)

    return (tf.data.Dataset.counter().map(task, num_parallel_calls=tf.data.AUTOTUNE)
            .batch(BATCH_SIZE).prefetch(tf.data.AUTOTUNE))


def meta_step_seconds(iterations=5):
    """Median seconds of the paper's mini-ImageNet 5-way 1-shot meta-iteration."""
    import keras
    import numpy as np
    import tensorflow as tf
    from tf_mamlpp.core.meta_learner import MetaLearner
    from tf_mamlpp.core.network import MamlppNetwork
    from tf_mamlpp.core.schedules import Phase

    network = MamlppNetwork(WAY, (84, 84, 3), 5, filters=48, inner_lr=0.01)
    learner = MetaLearner(network, keras.optimizers.Adam(1e-3),
                          fold_tasks=FLAGS.fold_tasks)
    rng = np.random.default_rng(0)  # the step's cost does not depend on the pixels
    batch = {f"{kind}_images": tf.constant(rng.random((BATCH_SIZE, WAY * n, 84, 84, 3),
                                                      np.float32))
             for kind, n in (("support", 1), ("target", QUERY))}
    batch.update({f"{kind}_labels": tf.constant(np.tile(np.repeat(np.arange(WAY), n),
                                                        (BATCH_SIZE, 1)), tf.int32)
                  for kind, n in (("support", 1), ("target", QUERY))})
    phase = Phase(tf.constant(np.full(5, 0.2, np.float32)), multi_step=True, second_order=True)
    started = time.monotonic()
    for _ in range(2):
        float(learner.meta_update(batch, phase)["loss"])
    first_two = time.monotonic() - started
    times = []
    for _ in range(iterations):
        started = time.monotonic()
        float(learner.meta_update(batch, phase)["loss"])
        times.append(time.monotonic() - started)
    return float(np.median(times)), first_two


def main(argv):
    del argv
    import tensorflow as tf
    from tf_mamlpp.data import decoded_images, image_folders
    from tf_mamlpp.run import task_streams
    from tf_mamlpp.run import config as config_module

    root = pathlib.Path(FLAGS.work_dir) / "data"
    results = {"generate_seconds": generate(root, FLAGS.classes, FLAGS.images_per_class,
                                            FLAGS.source_size)}
    started = time.monotonic()
    folders = image_folders.index_splits(root)
    results["index_seconds"] = time.monotonic() - started
    images = sum(int(files.class_counts.sum()) for files in folders.values())
    directory = decoded_images.cache_dir(root, 84, 3)
    for stale in directory.glob("*.npy"):
        stale.unlink()
    started = time.monotonic()
    for files in folders.values():
        decoded_images.fill_cache(files, 84, 3, directory)
    results["cache_build_seconds"] = time.monotonic() - started
    print(f"decoded {images} images into the cache in {results['cache_build_seconds']:.1f} s",
          flush=True)
    results["images"] = images
    results["decoded_gib"] = images * 84 * 84 * 3 / 2 ** 30
    for shot in (1, 5):
        config = config_module.resolve("mini_imagenet", data_dir=str(root), way=WAY, shot=shot)
        for variant in FLAGS.variants:
            if variant == "decode_every_task":
                dataset = decoding_every_task(folders["train"], 84, shot)
            else:
                train = decoded_images.load_split(folders["train"], 84, 3, directory,
                                                  in_memory=variant == "in_memory")
                if variant == "mapped_cold":
                    evict(directory.glob("*.npy"))
                dataset = task_streams.training_tasks(config, train)
            tasks = FLAGS.tasks if variant != "decode_every_task" else FLAGS.tasks // 4
            results[f"{shot}shot_{variant}_tasks_per_second"] = tasks_per_second(dataset, tasks)
            print(f"{shot}-shot {variant}: "
                  f"{results[f'{shot}shot_{variant}_tasks_per_second']:.1f} tasks/s", flush=True)
    if FLAGS.meta_step:
        seconds, first_two = meta_step_seconds()
        results["meta_step_seconds_5way_1shot"] = seconds
        results["meta_step_first_two_calls_seconds"] = first_two
        results["tasks_per_second_needed"] = BATCH_SIZE / seconds
    results["tensorflow"] = tf.__version__
    results["cpus"] = os.cpu_count()
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    app.run(main)
