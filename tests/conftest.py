"""Shared fixtures: random few-shot task batches, adaptation done by hand, and the
ops of a traced second-order meta-step; and the one way tests start processes.

Most checks run the network in float32 on the fast path (the closed-form
kernels of tf_mamlpp.ops, around FusedBatchNormV3, which has no float64
kernel), with tolerances to match. The finite-difference checks of the
meta-gradient run in float64 on the plain path (tf_mamlpp.ops.plain_tensorflow)
with tolerances float64 justifies, on one task: more are folded into grouped
convolutions, which TensorFlow differentiates on few CPUs (test_inner_loop.py).

Tests of an export's answers share `noisy_episode` and `answers_alone_as_among_others`.

Tests that run main.py, a benchmark or any other program import `run_main`,
`MainProcess`, `run_python` or `run_command` from here (`from conftest import
...`): each starts it from the repository as a user would, with a bounded wait.
Tests that start one are marked `slow`. Tests that need a finished run and
nothing particular about it share one, `tiny_run`, trained once a session.
"""

import fcntl
import functools
import os
import pathlib
import shutil
import subprocess
import sys
import time
from typing import NamedTuple

import numpy as np
import pytest

from tf_mamlpp.hardware.onednn import prefer_onednn
from tf_mamlpp.run.quiet_start import start_tensorflow

prefer_onednn()  # before TensorFlow loads, so that the tests run main.py's kernels
# Quietly, as main.py starts it: pytest-xdist's workers load this file before pytest
# captures their output, so TensorFlow's native start-up notes would reach the terminal.
start_tensorflow()
import keras  # noqa: E402
import tensorflow as tf  # noqa: E402

from tf_mamlpp.core.batch_norm_modes import TRANSDUCTIVE  # noqa: E402
from tf_mamlpp.core.network import MamlppNetwork  # noqa: E402
from tf_mamlpp.data.random_tasks import random_tasks  # noqa: E402
from tf_mamlpp.hardware.devices import grouped_convolution_gradients  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]
MAIN = REPO / "main.py"
TIMEOUT = 300  # seconds; any one process or wait, on a loaded 2-core machine


@pytest.fixture(scope="session", autouse=True)
def own_cache_home(tmp_path_factory):
    """User caches (the precision probes') of this session's own, in-process and in programs."""
    os.environ["XDG_CACHE_HOME"] = str(tmp_path_factory.mktemp("cache_home"))


def run_command(command, timeout=TIMEOUT, cwd=REPO, **options):
    """Runs `command` (a list) to its end from the repository, its output captured as text.

    `options` go to subprocess.run (env, check, preexec_fn). Returns the
    CompletedProcess; raises subprocess.TimeoutExpired after `timeout` seconds.
    """
    return subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          **options)


def run_python(*arguments, **options):
    """`python ARGUMENTS` (a script, `-c CODE` or `-m MODULE`) through `run_command`."""
    return run_command([sys.executable, *arguments], **options)


def run_main(*flags, **options):
    """`python main.py FLAGS` as a user runs it, through `run_command`."""
    return run_python(str(MAIN), *flags, **options)


class MainProcess:
    """`python main.py FLAGS` in the background, its output in files readable while it runs.

    For tests that signal or coordinate running processes; `popen` is its
    subprocess.Popen.
    """

    def __init__(self, flags, output, env=None):
        """`output`: a path prefix; standard output goes to `output`.stdout, errors to .stderr."""
        self.stdout_path = pathlib.Path(f"{output}.stdout")
        self.stderr_path = pathlib.Path(f"{output}.stderr")
        with open(self.stdout_path, "w") as stdout, open(self.stderr_path, "w") as stderr:
            self.popen = subprocess.Popen([sys.executable, str(MAIN), *flags], cwd=REPO, env=env,
                                          stdout=stdout, stderr=stderr, text=True)

    @property
    def stdout(self):
        return self.stdout_path.read_text()

    @property
    def stderr(self):
        return self.stderr_path.read_text()

    def wait_until(self, condition, what):
        """Polls `condition()` until true; fails if the process exits first or time runs out."""
        deadline = time.monotonic() + TIMEOUT
        while not condition():
            if self.popen.poll() is not None:
                raise AssertionError(f"main.py exited ({self.popen.returncode}) before {what}:\n"
                                     f"{self.stderr[-3000:]}")
            if time.monotonic() > deadline:
                self.popen.kill()
                raise AssertionError(f"timed out waiting for {what}")
            time.sleep(0.02)

    def wait(self, timeout=TIMEOUT):
        """The exit status; kills the process if it runs past `timeout` seconds."""
        try:
            return self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            raise


# The session's tiny run (`tiny_run`): 3-way 1-shot Omniglot on an 8-filter
# network, 2 inner steps in training and 5 in evaluation (steps past the
# second reuse its rates and banks), 3 epochs of 8 meta-iterations with every
# schedule changing within them: MSL over the first 2 epochs, first order for
# 1 epoch then second order (DA), a cosine-annealed meta-learning rate (CA).
TINY_RUN = dict(way=3, shot=1, inner_steps=2, eval_inner_steps=5, filters=8, batch_size=2,
                iters_per_epoch=8, epochs=3, msl_epochs=2, first_order_epochs=1,
                second_order=True, val_tasks=4, test_tasks=4, meta_lr=1e-3, min_meta_lr=1e-5,
                inner_lr=0.1)


class FinishedRun(NamedTuple):
    """A run of main.py trained to its end: its run directory and the process."""

    path: pathlib.Path
    process: subprocess.CompletedProcess


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """TINY_RUN trained once for the session through main.py, exported to its run/export.

    Once for all of pytest-xdist's workers too: the first that asks trains it
    in the folder they share while the others wait on a lock. Shared: the
    tests that read it look, no more. A test that changes the run, or runs
    main.py on it, takes a copy (`copy_run`).
    """
    shared = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        shared = shared.parent  # above each worker's own folder
    logdir = shared / "tiny_run"
    output = {name: logdir / f"main.{name}" for name in ("stdout", "stderr")}
    with open(shared / "tiny_run.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not output["stderr"].exists():
            completed = run_main(f"--logdir={logdir}", "--experiment=run",
                                 *(f"--{name}={value}" for name, value in TINY_RUN.items()))
            assert completed.returncode == 0, completed.stderr[-3000:]
            for name, path in output.items():
                path.write_text(getattr(completed, name))
    process = subprocess.CompletedProcess(
        "main.py", 0, *(output[name].read_text() for name in ("stdout", "stderr")))
    return FinishedRun(logdir / "run", process)


def tensorboard_events(run_dir):
    """A run's summaries read with TensorBoard's reader: {"tensors": tag -> {step: ndarray},
    "plugins": tag -> plugin name} (TF2 summaries are stored as tensors)."""
    from tensorboard.backend.event_processing import event_accumulator
    from tensorboard.util import tensor_util
    accumulator = event_accumulator.EventAccumulator(
        str(run_dir), size_guidance={event_accumulator.TENSORS: 0})
    accumulator.Reload()
    tensors, plugins = {}, {}
    for tag in accumulator.Tags()["tensors"]:
        tensors[tag] = {event.step: tensor_util.make_ndarray(event.tensor_proto)
                        for event in accumulator.Tensors(tag)}
        plugins[tag] = accumulator.SummaryMetadata(tag).plugin_data.plugin_name
    return {"tensors": tensors, "plugins": plugins}


def scalars(events, tag):
    """{step: float} of a scalar tag of `tensorboard_events`; fails naming a tag not written."""
    assert tag in events["tensors"], f"{tag} not written; tags: {sorted(events['tensors'])}"
    assert events["plugins"][tag] == "scalars"
    return {step: float(value) for step, value in sorted(events["tensors"][tag].items())}


def copy_run(run_dir, folder):
    """A copy of the run directory `run_dir` in `folder`, of the same name: its path."""
    return pathlib.Path(shutil.copytree(run_dir, folder / run_dir.name))


def slow_tests_selected(request):
    """Whether a slow test of the requesting fixture's module is selected to run.

    A module that starts its slow tests' processes with itself, to run beside
    its other tests, starts them only then: `-m "not slow"` starts none.
    """
    return any(item.module is request.module and item.get_closest_marker("slow")
               for item in request.session.items)


def needs_grouped_convolution_gradients(dtype=tf.float32):
    """Marks a test of folded tasks: skipped, saying why, where they cannot run.

    Folding a meta-batch's tasks into grouped convolutions needs their
    gradients in `dtype`, which TensorFlow has on few CPUs; there the
    refusal is tested instead (`lacks_grouped_convolution_gradients`).
    """
    return pytest.mark.skipif(
        not grouped_convolution_gradients(dtype),
        reason=f"TensorFlow cannot differentiate grouped convolutions in {dtype.name} on this "
               "device: folded tasks are refused here, so their results go untested")


def lacks_grouped_convolution_gradients(dtype=tf.float32):
    """Marks a test of the refusal to fold tasks: skipped, saying why, where folding works."""
    return pytest.mark.skipif(
        grouped_convolution_gradients(dtype),
        reason=f"TensorFlow differentiates grouped convolutions in {dtype.name} on this device: "
               "folded tasks are not refused here")


@pytest.fixture(scope="session")
def make_tasks():
    """`random_tasks` (tf_mamlpp.data.random_tasks) with classes a network can tell apart.

    make_tasks(num_tasks, way, shot, query, image_shape, seed=0): each
    class's images are offset by half its label over `way`, so that the
    classes differ.
    """
    return functools.partial(random_tasks, class_offset=0.5)


def noisy_episode(way, image_shape, seed=5, num_queries=51):
    """A task of random images: (support, queries), one support image per class (label i at
    row i) and `num_queries` queries, each a support image with noise."""
    rng = np.random.default_rng(seed)
    support = rng.uniform(0, 1, (way, *image_shape)).astype(np.float32)
    per_class = -(-num_queries // way)
    queries = np.clip(np.repeat(support, per_class, axis=0)
                      + rng.normal(0, 0.2, (per_class * way, *image_shape)), 0, 1)
    return support, queries[:num_queries].astype(np.float32)


def answers_alone_as_among_others(adapt, support, queries, indices=(0, 25, 50)):
    """Checks that an export answers each query on its own: the probabilities that its
    `adapt_and_predict` signature `adapt` gives queries[index] alone equal its row among
    all `queries`, for a support set of one image per class (label i at row i).

    Returns:
      {index: the probabilities of queries[index] alone}.
    """

    def probabilities(query_images):
        return adapt(support_images=tf.constant(support, tf.float32),
                     support_labels=tf.range(len(support), dtype=tf.int32),
                     query_images=tf.constant(query_images, tf.float32))["probabilities"].numpy()

    together = probabilities(queries)
    alone = {index: probabilities(queries[index:index + 1])[0] for index in indices}
    for index, answer in alone.items():
        np.testing.assert_allclose(answer, together[index], rtol=1e-5, atol=1e-5)
    return alone


# The meta-gradient checks' problem (test_inner_loop.py, test_mixed_precision.py): tasks
# of 2 classes of 4x4 images, adapted in 2 inner steps.
SMALL_WAY, SMALL_IMAGE_SHAPE, SMALL_STEPS = 2, (4, 4, 1), 2


def small_network(num_steps=SMALL_STEPS, seed=0, **kwargs):
    """One conv stage of 2 filters on 4x4 images, with distinct per-state banks and rates."""
    keras.utils.set_random_seed(seed)
    network = MamlppNetwork(way=SMALL_WAY, image_shape=SMALL_IMAGE_SHAPE, inner_steps=num_steps,
                            filters=2, num_stages=1, **kwargs)
    rng = np.random.default_rng(seed + 1)
    for norm in network.norms:
        norm.gamma.assign(rng.uniform(0.5, 1.5, norm.gamma.shape))
        norm.beta.assign(rng.uniform(-0.5, 0.5, norm.beta.shape))
        norm.moving_mean.assign(rng.uniform(-0.2, 0.2, norm.moving_mean.shape))
        norm.moving_variance.assign(rng.uniform(0.5, 1.5, norm.moving_variance.shape))
    for rates in network.inner_rates.values():
        rates.assign(rng.uniform(0.05, 0.3, rates.shape))
    for norm in network.norms:
        if norm.task_norm:
            # Away from the initial alpha = sigmoid(0) = 1/2.
            norm.blend_scale.assign(rng.uniform(-0.2, 0.2))
            norm.blend_offset.assign(rng.uniform(-0.5, 0.5))
    return network


def smooth_problem(seed=0, bn_mode=TRANSDUCTIVE, dtype="float32"):
    """A network in `bn_mode` and `dtype`, and one task near which the outer loss is smooth.

    Leaky ReLU and max-pool make the support gradient jump where a
    pre-activation crosses zero or a pool's maximum changes hands, so the
    adapted weights, and the outer loss, jump there too; a finite difference
    across a jump measures the jump, not the derivative. Here every 2x2
    window of every image has one bright pixel and the kernel a dominant
    centre tap, so each pool's maximum is clear and positive after batch
    norm, whichever statistics (own, support, blended or running) normalise it.
    """
    network = small_network(seed=seed, bn_mode=bn_mode, dtype=dtype)
    rng = np.random.default_rng(seed + 2)
    kernel = rng.uniform(-0.1, 0.1, (3, 3, 1, 2))
    kernel[1, 1] = 1.0
    network.fast_variables["conv0/kernel"].assign(kernel)
    norm = network.norms[0]
    norm.gamma.assign(rng.uniform(0.8, 1.2, norm.gamma.shape))
    norm.beta.assign(rng.uniform(-0.3, 0.3, norm.beta.shape))

    def split(per_class):
        images = rng.uniform(0, 0.1, (SMALL_WAY * per_class, *SMALL_IMAGE_SHAPE))
        for image in images:
            for i in (0, 2):
                for j in (0, 2):
                    di, dj = rng.integers(0, 2, 2)
                    image[i + di, j + dj, 0] = rng.uniform(0.9, 1.1)
        labels = np.tile(np.arange(SMALL_WAY, dtype=np.int32), per_class)
        return tf.constant(images[None], dtype), tf.constant(labels[None])

    support_images, support_labels = split(3)
    target_images, target_labels = split(2)
    return network, {"support_images": support_images, "support_labels": support_labels,
                     "target_images": target_images, "target_labels": target_labels}


def mean_cross_entropy(labels, logits):
    return tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(labels, logits))


@pytest.fixture(scope="session")
def adapt_by_hand():
    """Plain gradient descent on one task, written out here and not in the package.

    adapt_by_hand(network, tasks, task, num_steps, bn_mode=TRANSDUCTIVE) adapts task
    `task` of the batch with fresh tapes, so nothing it returns is connected
    to the meta-parameters. Weight state k (after k steps) is normalised with
    the banks of state min(k, trained steps) and step k uses the rates of
    step min(k, trained steps - 1), the documented rule for evaluating with
    more steps than were trained; the target set is normalised at the adapted
    weights as `bn_mode` says, with the support set's statistics there where
    it needs them. Returns a dict with
      weights: name -> (1, ...) tensor after each step (list, num_steps + 1),
      gradients: name -> (1, ...) support-loss gradient at each step (list),
      rates: name -> Python float used at each step (list),
      statistics: per step, the support pass's per-stage `Moments`,
      logits: (1, way*query, way) target logits after the last step,
      target_loss: their mean cross-entropy.
    """

    def adapt(network, tasks, task, num_steps, bn_mode=TRANSDUCTIVE):
        one = {key: value[task:task + 1] for key, value in tasks.items()}
        weights = {name: tf.constant(variable.numpy()[None])
                   for name, variable in network.fast_variables.items()}
        record = {"weights": [weights], "gradients": [], "rates": [], "statistics": []}
        for step in range(num_steps):
            with tf.GradientTape() as tape:
                tape.watch(weights)
                logits, statistics = network.forward(one["support_images"], weights, step, bn_mode)
                loss = mean_cross_entropy(one["support_labels"][0], logits[0])
            gradients = tape.gradient(loss, weights)
            rate_step = min(step, network.inner_steps - 1)
            rates = {name: float(network.inner_rates[name.split("/")[0]].numpy()[rate_step])
                     for name in weights}
            weights = {name: tf.constant(weights[name] - rates[name] * gradients[name])
                       for name in weights}
            record["weights"].append(weights)
            record["gradients"].append(gradients)
            record["rates"].append(rates)
            record["statistics"].append(statistics)
        _, support = network.forward(one["support_images"], weights, num_steps, bn_mode)
        logits, _ = network.forward(one["target_images"], weights, num_steps, bn_mode,
                                    support=support)
        record["logits"] = logits
        record["target_loss"] = mean_cross_entropy(one["target_labels"][0], logits[0])
        return record

    return adapt


@pytest.fixture(scope="session")
def second_order_meta_step_ops():
    """The operations of a tiny second-order meta-gradient's traced graph."""
    from tf_mamlpp.core.inner_loop import adapt_and_evaluate

    network = MamlppNetwork(2, (8, 8, 1), 1, filters=4, num_stages=2)
    tasks = {"support_images": tf.zeros((1, 2, 8, 8, 1)), "support_labels": tf.constant([[0, 1]]),
             "target_images": tf.zeros((1, 2, 8, 8, 1)), "target_labels": tf.constant([[0, 1]])}

    def meta_gradient():
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(adapt_and_evaluate(network, tasks, 1, True, [0])["target_losses"])
        return tape.gradient(loss, network.trainable_variables)

    return tf.function(meta_gradient).get_concrete_function().graph.get_operations()
