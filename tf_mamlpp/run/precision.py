"""--mixed_precision=auto: float32 or 16 bits, whichever meta-trains faster on this machine.

Whether 16-bit arithmetic pays depends on the hardware, not on the model.
bfloat16 made the meta-step 1.18x to 1.42x faster on an AMD EPYC with
AVX512-BF16, 0.68x to 0.73x as fast on an Intel Xeon with the same
instructions, and a CPU without them emulates it (README, Mixed precision).
So `auto` measures instead of reading CPU flags: a probe times one task's
meta-gradient (one inner step, the run's shapes and its first epochs'
derivative order) in each precision and keeps the faster. The timings are
cached per machine and shape (`cache_path()`), so only the first run of a
shape on a machine pays the probe's few seconds. A run forced into 16 bits
is probed the same way, to warn where it is the slower choice.
"""

import dataclasses
import json
import math
import os
import pathlib
import time
from typing import NamedTuple

import numpy as np
import tensorflow as tf
from absl import logging

from tf_mamlpp.atomic_files import write_atomically
from tf_mamlpp.core import mixed_precision
from tf_mamlpp.core.meta_step import outer_loss
from tf_mamlpp.core.schedules import Phase
from tf_mamlpp.data.random_tasks import random_tasks
from tf_mamlpp.hardware.machine import cpu_description
from tf_mamlpp.run.builders import build_network, build_schedule
from tf_mamlpp.run.config import AUTO, why_not_probed

# Timed probes of each precision, the fastest counting; fewer where one precision
# is CLEAR_RATIO times the other's speed already.
PROBE_REPEATS = 3
CLEAR_RATIO = 2.0


class Timings(NamedTuple):
    """Seconds of one probe meta-gradient in float32 and in the 16-bit dtype."""

    float32: float
    sixteen_bits: float
    sixteen_bit_dtype: str  # "bfloat16" on a CPU, "float16" on a GPU

    @property
    def speed_up(self):
        """How many times faster 16 bits is than float32 (below 1: slower)."""
        return self.float32 / self.sixteen_bits

    def __str__(self):
        return (f"a probe meta-step took {self.float32:.4f} s in float32 and "
                f"{self.sixteen_bits:.4f} s in {self.sixteen_bit_dtype} "
                f"({self.speed_up:.2f}x)")


def settled(config, previous=None, parallel_tasks=1, multi_worker=False):
    """`config` with its precision decided for meta-training.

    Args:
      config: the resolved ExperimentConfig; `mixed_precision` False, True or
        AUTO.
      previous: the configuration of the run this command resumes, if any: a
        run keeps the precision it began with (its checkpoint holds a loss
        scale or not).
      parallel_tasks: tasks the meta-step adapts at once (part of the key).
      multi_worker: the run spans several hosts; there, as in a
        deterministic run, AUTO becomes float32 unprobed (`why_not_probed`).

    Returns:
      `config` with `mixed_precision` a bool. AUTO becomes the faster
      precision, logged with both timings; True warns where 16 bits is slower.
    """
    if config.mixed_precision == AUTO and previous is not None:
        logging.info("--mixed_precision=auto: the run continues in %s, as it began.",
                     _precision_name(previous.mixed_precision))
        return dataclasses.replace(config, mixed_precision=previous.mixed_precision)
    unprobed = why_not_probed(config, multi_worker)
    if config.mixed_precision == AUTO and unprobed:
        logging.info("--mixed_precision=auto with %s; meta-training in float32.", unprobed)
        return dataclasses.replace(config, mixed_precision=False)
    if not config.mixed_precision:
        return config
    timings = measured_timings(config, parallel_tasks)
    if config.mixed_precision == AUTO:
        faster = timings.speed_up > 1
        logging.info("--mixed_precision=auto: %s; meta-training in %s.", timings,
                     _precision_name(faster))
        return dataclasses.replace(config, mixed_precision=faster)
    if timings.speed_up < 1:
        logging.warning("--mixed_precision: %s, slower than float32 on this machine; "
                        "--mixed_precision=auto would train in float32.", timings)
    return config


def _precision_name(mixed):
    return f"16 bits ({mixed_precision.compute_dtype().name})" if mixed else "float32"


def measured_timings(config, parallel_tasks):
    """This machine's `Timings` for `config`'s shapes: cached, or probed now and cached."""
    key = probe_key(config, parallel_tasks)
    cache = read_cache()
    if key in cache:
        return Timings(**cache[key])
    timings = probe(config)
    try:
        cache_path().parent.mkdir(parents=True, exist_ok=True)
        text = json.dumps({**cache, key: timings._asdict()}, indent=1, sort_keys=True)
        write_atomically(cache_path(), lambda file: file.write(text.encode()))
    except OSError as error:
        logging.warning("Cannot cache the precision probe in %s (%s); the next run probes "
                        "again.", cache_path(), error.strerror or error)
    return timings


def cache_path():
    """The probes' timings: $XDG_CACHE_HOME/tf_mamlpp/precision_probes.json (~/.cache by default)."""
    root = os.environ.get("XDG_CACHE_HOME") or pathlib.Path.home() / ".cache"
    return pathlib.Path(root) / "tf_mamlpp" / "precision_probes.json"


def read_cache():
    """The cached timings by key; empty where the file is missing or unreadable."""
    try:
        cache = json.loads(cache_path().read_text())
    except (OSError, ValueError):
        return {}
    return cache if isinstance(cache, dict) else {}


def probe_key(config, parallel_tasks):
    """The machine (GPU, else CPU), TensorFlow, its CPU kernels and the shapes the timings hold for.

    The shapes are the probe network's own settings (its `get_config()`, so a
    new network setting keys the cache without an edit here) and the task's.
    """
    gpus = [tf.config.experimental.get_device_details(gpu).get("device_name", gpu.name)
            for gpu in tf.config.list_physical_devices("GPU")]
    return json.dumps({
        "machine": gpus or cpu_description(), "tensorflow": tf.__version__,
        "onednn": os.environ.get("TF_ENABLE_ONEDNN_OPTS"),
        "parallel_tasks": parallel_tasks, "second_order": _first_order_of(config),
        "shot": config.shot, "query": config.query, "backbone": config.backbone,
        **_probe_network(config).get_config()}, sort_keys=True, default=str)


def _first_order_of(config):
    """The derivative order of the run's first epoch, the one the probe times."""
    return build_schedule(config).at(0, config.inner_steps).second_order


def _probe_network(config):
    """The run's network with one inner step.

    The ratio of the two precisions is the convolutions', and a five-step
    graph would trace five times longer.
    """
    return build_network(dataclasses.replace(config, inner_steps=1))


def _probe_task(config):
    """One random task of `config`'s shapes: the step's cost does not depend on the pixels."""
    return random_tasks(1, config.way, config.shot, config.query, config.image_shape)


def probe(config):
    """Times one random task's meta-gradient in float32 and in 16 bits, interleaved."""
    network = _probe_network(config)
    phase = Phase(np.ones(1, np.float32), multi_step=False, second_order=_first_order_of(config))
    sixteen_bits = mixed_precision.compute_dtype()
    steps = {dtype: _meta_gradient_norm(network, phase, dtype)
             for dtype in (tf.float32, sixteen_bits)}
    task = _probe_task(config)
    for step in steps.values():
        step.get_concrete_function(task)  # traced before the clock starts
    fastest = dict.fromkeys(steps, math.inf)
    for _ in range(PROBE_REPEATS):
        for dtype, step in steps.items():
            started = time.perf_counter()
            step(task).numpy()
            fastest[dtype] = min(fastest[dtype], time.perf_counter() - started)
        if max(fastest.values()) > CLEAR_RATIO * min(fastest.values()):
            break  # the choice is plain; more repeats would only delay the start
    return Timings(fastest[tf.float32], fastest[sixteen_bits], sixteen_bits.name)


def _meta_gradient_norm(network, phase, dtype):
    """A compiled meta-gradient of `network` computed in `dtype`, returning its norm."""
    loss_scale = None if dtype == tf.float32 else tf.constant(1.0)

    @tf.function(autograph=False)
    def step(tasks):
        with tf.GradientTape() as tape:
            loss, _ = outer_loss(network, tasks, phase, compute_dtype=dtype,
                                 loss_scale=loss_scale)
        return tf.linalg.global_norm(tape.gradient(
            loss, network.trainable_variables,
            unconnected_gradients=tf.UnconnectedGradients.ZERO))

    return step
