"""Specification of --mixed_precision: 16-bit meta-steps with a dynamic loss scale.

float16 on a GPU, bfloat16 on a CPU. The meta-gradient computed in float16
or bfloat16 agrees with the float32 one, first and second order, folded
tasks or not; scaling the inner losses is what keeps small inner gradients
from underflowing in float16; a non-finite meta-gradient skips the update,
on every replica, and halves the scale; a mixed-precision run trains,
checkpoints, resumes and exports through `main.py`. Networks are tiny (1 or
2 stages of 2 to 8 filters on 4x4 or 8x8 images, 2- or 3-way, 1 or 2 inner
steps, 1 or 2 tasks).

The `main.py` runs and a MirroredStrategy check run in subprocesses, started
with the module, while the in-process tests run.
"""

import concurrent.futures
import dataclasses
import itertools
import json
import textwrap

import keras
import numpy as np
import pytest
import tensorflow as tf
from tensorboard.backend.event_processing import event_accumulator
from tensorboard.util import tensor_util

from conftest import (TIMEOUT, lacks_grouped_convolution_gradients,
                      needs_grouped_convolution_gradients, run_main, run_python,
                      slow_tests_selected, smooth_problem)
from tf_mamlpp.core.inner_loop import adapt_and_evaluate, inner_update
from tf_mamlpp.core.meta_learner import MetaLearner
from tf_mamlpp.run import config as config_module
from tf_mamlpp.serving import saved_model
from tf_mamlpp.core.mixed_precision import DynamicLossScale, all_finite, compute_dtype
from tf_mamlpp.core.network import MamlppNetwork
from tf_mamlpp.run import precision
from tf_mamlpp.run.run_directory import RunDirectory, RunDirectoryError, saved_config
from tf_mamlpp.core.schedules import Phase
from tf_mamlpp.run.builders import build_network
from tf_mamlpp.run.trainer import NonFiniteLossError, Trainer

WAY, IMAGE_SHAPE, STEPS = 2, (8, 8, 1), 2
MSL_WEIGHTS = [0.4, 0.6]
# float16 keeps 11 significant bits, about 3 digits; 1 or 2 inner steps lose
# about one more. Measured on smooth problems (below): 0.2% to 0.8% over all
# the meta-gradient, at most 2% on one variable.
TOLERANCE = 0.05
# bfloat16 keeps 8 significant bits, between 2 and 3 digits. Measured on the
# same problems: 1.4% to 2.6% over all the meta-gradient, at most 7.2% on one
# variable.
TOLERANCES = {tf.float16: TOLERANCE, tf.bfloat16: 3 * TOLERANCE}

# Two logical CPUs: a mixed-precision step under MirroredStrategy against the
# single-device one, then a step whose second task (the second replica's)
# overflows float16 while the first replica's stays finite.
MIRRORED_SCRIPT = textwrap.dedent("""
    import json
    import tensorflow as tf, keras
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(
        cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    from tf_mamlpp.core.meta_learner import MetaLearner
    from tf_mamlpp.core.mixed_precision import DynamicLossScale
    from tf_mamlpp.core.network import MamlppNetwork
    from tf_mamlpp.core.schedules import Phase
    from tf_mamlpp.data.random_tasks import random_tasks

    batch = random_tasks(2, 2, 1, 2, (8, 8, 1))
    poisoned = dict(batch, support_images=tf.concat(
        [batch["support_images"][:1], 1e5 * batch["support_images"][1:]], 0))

    def learner(strategy):
        keras.utils.set_random_seed(0)
        with strategy.scope():
            network = MamlppNetwork(2, (8, 8, 1), 1, filters=4, num_stages=2)
            return MetaLearner(network, keras.optimizers.Adam(1e-2), strategy=strategy,
                               loss_scale=DynamicLossScale(2.0**10))

    def step(learner, batch):
        variables = learner.network.variables
        before = [v.numpy().tolist() for v in variables]
        figures = learner.meta_update(batch, Phase(tf.constant([1.0]), False, True))
        return {"before": before, "after": [v.numpy().tolist() for v in variables],
                "figures": {k: float(v) for k, v in figures.items()},
                "scale": float(learner.loss_scale.scale.numpy()),
                "iterations": int(learner.optimizer.iterations.numpy())}

    mirrored = learner(tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"]))
    print(json.dumps({"single": step(learner(tf.distribute.get_strategy()), batch),
                      "mirrored": step(mirrored, batch),
                      "mirrored_poisoned": step(mirrored, poisoned)}))
""")

# Two epochs of 2 meta-iterations on 3-way 1-shot Omniglot, first order then
# second; the second epoch in a second process, which resumes the run.
RUN = ["--mixed_precision", "--way=3", "--shot=1", "--inner_steps=1", "--filters=8",
       "--batch_size=2", "--iters_per_epoch=2", "--first_order_epochs=1", "--val_tasks=4",
       "--test_tasks=4", "--experiment=run"]


def train_then_resume(logdir):
    """`main.py --mixed_precision` for one epoch, then with `--mixed_precision=auto` for a second."""
    return {"first": run_main(f"--logdir={logdir}", *RUN, "--epochs=1"),
            "second": run_main(f"--logdir={logdir}", *RUN, "--epochs=2",
                               "--mixed_precision=auto"),
            "run_dir": logdir / "run"}


def train_auto(logdir):
    """`main.py --mixed_precision=auto` for one epoch of a new run."""
    return {"process": run_main(f"--logdir={logdir}", *RUN, "--epochs=1",
                                "--mixed_precision=auto"),
            "run_dir": logdir / "run"}


@pytest.fixture(scope="module", autouse=True)
def processes(request, tmp_path_factory):
    """The subprocesses: name -> future of their results; none unless slow tests run."""
    if not slow_tests_selected(request):
        yield {}
        return
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=2)
    futures = {"run": pool.submit(train_then_resume, tmp_path_factory.mktemp("runs")),
               "auto": pool.submit(train_auto, tmp_path_factory.mktemp("auto")),
               "mirrored": pool.submit(run_python, "-c", MIRRORED_SCRIPT)}
    yield futures
    pool.shutdown(wait=True)


@pytest.fixture(scope="module")
def task(make_tasks):
    return make_tasks(1, WAY, shot=1, query=2, image_shape=IMAGE_SHAPE)


def tiny_network(inner_steps=STEPS, margin=0.0):
    """`margin`: a head bias that puts class 0 that far ahead of class 1."""
    keras.utils.set_random_seed(0)
    network = MamlppNetwork(WAY, IMAGE_SHAPE, inner_steps, filters=8, num_stages=2)
    network.head_bias.assign([margin, 0.0])
    return network


def tiny_learner(mixed, initial_scale=2.0**10, **network_args):
    loss_scale = DynamicLossScale(initial_scale) if mixed else None
    return MetaLearner(tiny_network(**network_args), keras.optimizers.Adam(1e-2),
                       loss_scale=loss_scale)


def meta_gradients(learner, task, second_order, multi_step=True):
    """{name: meta-gradient}, computed eagerly on the meta-learner's default path."""
    sums = learner._task_by_task(
        task, Phase(tf.constant(MSL_WEIGHTS), multi_step, second_order))
    return {v.path.split("/", 1)[1]: g.numpy()
            for v, g in zip(learner.network.trainable_variables, sums["gradients"])}


def relative_error(actual, expected):
    """|actual - expected| / |expected|, over the arrays of `expected`'s keys together;
    in float64, where the squares of gradients near 1e-18 (below) do not underflow."""
    actual, expected = ({key: np.asarray(arrays[key], np.float64) for key in expected}
                        for arrays in (actual, expected))
    difference = sum(np.sum((actual[key] - expected[key]) ** 2) for key in expected)
    return np.sqrt(difference / sum(np.sum(expected[key] ** 2) for key in expected))


@pytest.mark.parametrize("dtype", [tf.float16, tf.bfloat16], ids=lambda dtype: dtype.name)
@pytest.mark.parametrize("second_order", [False, True], ids=["first_order", "second_order"])
def test_meta_gradient_in_16_bits_matches_float32(second_order, dtype):
    """On test_inner_loop's smooth problem (1 stage of 2 filters, 4x4 images, 2 steps):
    near a ReLU's kink or a max-pool's tie, rounding to 16 bits can move a
    gradient across the jump, which measures the jump and not the precision."""
    network, task = smooth_problem()
    tolerance = TOLERANCES[dtype]
    learners = {mixed: MetaLearner(
        network, keras.optimizers.Adam(1e-2), 1,
        loss_scale=DynamicLossScale(2.0**10, compute_dtype=dtype) if mixed else None)
        for mixed in (False, True)}
    reference, mixed = (meta_gradients(learners[m], task, second_order) for m in (False, True))
    # Above zero: the arithmetic was 16-bit indeed.
    assert 0 < relative_error(mixed, reference) < tolerance / 2
    # No variable's error stands out against the meta-gradient's size. (Measured
    # against a variable's own size, a gradient that is a sum of cancelling
    # terms, like an inner rate's, would measure the cancellation, not the
    # 16-bit arithmetic.)
    scale = np.sqrt(sum(np.sum(np.square(value, dtype=np.float64)) for value in reference.values()))
    for name in reference:
        error = np.linalg.norm(np.asarray(mixed[name], np.float64) - reference[name])
        assert error / scale < tolerance / 2, name
    if second_order:
        # The second-order terms are far above the tolerance (38%): a 16-bit
        # meta-gradient without them would not pass.
        first_order = meta_gradients(learners[False], task, False)
        assert relative_error(first_order, reference) > 2 * tolerance


# A task whose labels are all class 0, to a network whose head bias puts class 0
# ahead by MARGIN: the loss's gradient at the logits, e**-MARGIN / 2 or about
# 1e-9 per image, is far under half of float16's smallest subnormal (6e-8), so
# rounding it to float16 gives 0 whatever the kernels, and every gradient
# behind it is 0. Scaled by SCALE it is about 1e-3, where float16 keeps all
# its digits.
MARGIN, SCALE = 20.0, 2.0**20
CONV_KERNELS = ("conv0/kernel", "conv1/kernel")


@pytest.fixture(scope="module")
def confident_task(task):
    """The target labels too: one scale serves both losses, and SCALE would overflow
    float16 in the backward pass of a target loss that is not small."""
    return dict(task, support_labels=tf.zeros_like(task["support_labels"]),
                target_labels=tf.zeros_like(task["target_labels"]))


def test_small_inner_gradients_underflow_in_float16_unless_the_loss_is_scaled(confident_task):
    """Inner rates of 2**30 (exact in binary) make a step large enough to read the
    inner gradient back from the weights in float32: g = (w - w') / rate."""
    network = tiny_network(inner_steps=1, margin=MARGIN)
    for rates in network.inner_rates.values():
        rates.assign(tf.fill(rates.shape, 2.0**30))
    weights = network.initial_fast_weights(1)

    def conv_gradients(compute_dtype, loss_scale):
        new_weights, _ = inner_update(network, weights, confident_task["support_images"],
                                      confident_task["support_labels"], 0, False,
                                      compute_dtype=compute_dtype, loss_scale=loss_scale)
        return {name: ((weights[name] - new_weights[name]) / 2.0**30).numpy()
                for name in CONV_KERNELS}

    reference = conv_gradients(tf.float32, None)
    scaled = conv_gradients(tf.float16, tf.constant(SCALE))
    unscaled = conv_gradients(tf.float16, None)
    for name, expected in reference.items():
        # float32 keeps every entry, though each is below float16's smallest subnormal.
        assert np.all(expected != 0) and np.abs(expected).max() < 2.0**-24, name
        assert relative_error(scaled, {name: expected}) < TOLERANCE, name
        assert not np.any(unscaled[name]), name


def test_meta_learner_scales_the_inner_losses(confident_task):
    """The meta-gradient of the conv layers' learned rates is minus the inner gradient
    dotted with the outer one, so it is lost with an underflowing inner gradient."""
    rates = ("conv0_inner_rate", "conv1_inner_rate")
    gradients = {mixed: meta_gradients(tiny_learner(mixed, SCALE, inner_steps=1, margin=MARGIN),
                                       confident_task, True, multi_step=False)
                 for mixed in (False, True)}
    expected = {name: gradients[False][name] for name in rates}
    assert relative_error(gradients[True], expected) < TOLERANCE
    # The same float16 meta-gradient with the outer loss scaled and the inner ones not.
    network = tiny_network(inner_steps=1, margin=MARGIN)
    variables = [network.inner_rates[name.removesuffix("_inner_rate")] for name in rates]
    with tf.GradientTape() as tape:
        result = adapt_and_evaluate(network, confident_task, 1, True, [0],
                                    compute_dtype=tf.float16)
        loss = tf.reduce_sum(result["target_losses"]) * SCALE
    for gradient in tape.gradient(loss, variables):
        assert not np.any(gradient.numpy())


@pytest.mark.slow
def test_an_overflow_skips_the_update_and_halves_the_scale(task):
    learner = tiny_learner(mixed=True, inner_steps=1)
    network, optimizer = learner.network, learner.optimizer
    weights = tf.constant([1.0])
    before = [v.numpy().copy() for v in network.trainable_variables]
    figures = learner.meta_update(task, Phase(weights, False, False))
    assert (float(figures["skipped_updates"]), float(figures["loss_scale"])) == (0, 2.0**10)
    for variable, old in zip(network.trainable_variables, before):
        assert np.abs(variable.numpy() - old).max() > 1e-4, variable.path
    assert learner.loss_scale.scale.numpy() == 2.0**10
    # float16's largest number is 65504: a scale of 2**40 overflows at once.
    learner.loss_scale.scale.assign(2.0**40)
    state = lambda: [v.numpy().copy() for v in network.variables + optimizer.variables
                     if v is not optimizer.iterations]
    before = state()
    figures = learner.meta_update(task, Phase(weights, False, False))
    assert (float(figures["skipped_updates"]), float(figures["loss_scale"])) == (1, 2.0**40)
    assert not np.isfinite(figures["gradient_norm"]) and figures["update_norm"] == 0
    # Weights, batch-norm banks, Adam's moments: untouched.
    for old, new in zip(before, state()):
        np.testing.assert_array_equal(new, old)
    assert learner.loss_scale.scale.numpy() == 2.0**39
    # A skipped update is still a meta-iteration: the counter is the run's position.
    assert optimizer.iterations.numpy() == 2
    assert learner.trace_count == 1


def test_scale_halves_on_each_overflow_and_doubles_after_a_run_of_finite_steps():
    loss_scale = DynamicLossScale(initial_scale=64.0, growth_steps=3)
    scales = []
    for finite in (True, True, False, True, True, True, True, False, False):
        loss_scale.update(tf.constant(finite))
        scales.append(float(loss_scale.scale.numpy()))
    # An overflow resets the count: growth takes 3 finite steps in a row.
    assert scales == [64, 64, 32, 32, 32, 64, 64, 32, 16]


def test_all_finite():
    assert bool(all_finite([tf.ones(3), tf.zeros((2, 2))]))
    assert not bool(all_finite([tf.ones(3), tf.constant([[0.0, np.inf]])]))
    assert not bool(all_finite([tf.constant([np.nan])]))


@pytest.mark.slow
def test_under_mirrored_strategy_an_overflow_on_one_replica_skips_every_replica(processes):
    completed = processes["mirrored"].result(timeout=2 * TIMEOUT)
    assert completed.returncode == 0, completed.stderr[-3000:]
    result = json.loads(completed.stdout.strip().splitlines()[-1])
    single, mirrored, poisoned = (result[key] for key in ("single", "mirrored",
                                                          "mirrored_poisoned"))
    assert single["figures"]["update_norm"] > 0
    for expected, actual in zip(single["after"], mirrored["after"]):
        np.testing.assert_allclose(actual, expected, rtol=1e-4, atol=1e-6)
    assert mirrored["figures"]["loss"] == pytest.approx(single["figures"]["loss"], rel=1e-5)
    # keras.optimizers.LossScaleOptimizer tests only the first replica's
    # gradients, and would let the second replica's NaN into the variables.
    assert poisoned["figures"]["skipped_updates"] == 1
    assert poisoned["after"] == poisoned["before"]
    assert (poisoned["scale"], poisoned["iterations"]) == (2.0**9, 2)


def folded_meta_gradient(tasks, fold, dtype):
    """The meta-gradient of `tasks` computed in `dtype`, folded or task by task."""
    loss_scale = None if dtype == tf.float32 else DynamicLossScale(2.0**10, compute_dtype=dtype)
    learner = MetaLearner(tiny_network(), keras.optimizers.Adam(1e-2), fold_tasks=fold,
                          loss_scale=loss_scale)
    step = learner._tasks_step if fold else learner._task_by_task
    return step(tasks, Phase(tf.constant(MSL_WEIGHTS), True, True))["gradients"]


@lacks_grouped_convolution_gradients(compute_dtype())
def test_where_grouped_convolutions_have_no_16_bit_gradients_folding_is_refused(make_tasks):
    tasks = make_tasks(2, WAY, shot=1, query=2, image_shape=IMAGE_SHAPE)
    with pytest.raises(ValueError, match="fold_tasks=True"):
        folded_meta_gradient(tasks, True, compute_dtype())


@needs_grouped_convolution_gradients(compute_dtype())
def test_folded_tasks_give_the_task_loops_meta_gradient_in_16_bits(make_tasks):
    """--fold_tasks with --mixed_precision: grouped convolutions have 16-bit gradients."""
    tasks = make_tasks(2, WAY, shot=1, query=2, image_shape=IMAGE_SHAPE)
    dtype = compute_dtype()
    gradients = [folded_meta_gradient(tasks, fold, precision)
                 for fold, precision in ((True, dtype), (False, dtype), (False, tf.float32))]
    for folded, looped, plain in zip(*gradients):
        np.testing.assert_allclose(folded, looped, rtol=1e-3, atol=1e-3 * np.abs(looped).max())
        # 16-bit indeed: not float32's meta-gradient.
        assert not np.allclose(looped, plain, rtol=1e-4, atol=0)


@pytest.mark.slow
def test_a_mixed_precision_trainer_computes_in_bfloat16_on_a_cpu_and_float16_on_a_gpu(
        tmp_path, make_tasks):
    """bfloat16 where the step runs on a CPU, which has next to no float16 kernels."""
    config = config_module.resolve("omniglot", way=3, filters=8, inner_steps=1, batch_size=1,
                                   mixed_precision=True, bn_mode="transductive")  # fused kernels
    learner = Trainer(config, RunDirectory.open(tmp_path, "run", config)).meta_learner
    task = make_tasks(1, 3, shot=1, query=1, image_shape=(28, 28, 1))
    graph = tf.function(learner._tasks_step).get_concrete_function(
        task, Phase(tf.constant([1.0]), multi_step=False, second_order=True)).graph
    expected = tf.float16 if tf.config.list_physical_devices("GPU") else tf.bfloat16
    assert compute_dtype() == expected
    for kind in ("Conv2D", "Conv2DBackpropFilter", "FusedBatchNormV3", "MaxPool"):
        assert {op.get_attr("T") for op in graph.get_operations() if op.type == kind} == {
            expected}, kind


@pytest.mark.slow
def test_the_xla_compiled_second_order_step_matches_the_plain_one_in_float16():
    """--jit_compile with --mixed_precision, second order: XLA has float16 kernels for
    every op of the step (max-pooling's second derivative is a mask and a window sum,
    not MaxPoolGradGrad, which XLA lacks in float16)."""
    network, task = smooth_problem()
    sums = {jit: tf.function(MetaLearner(network, keras.optimizers.Adam(1e-2),
                                         loss_scale=DynamicLossScale(2.0**10))._task_by_task,
                             jit_compile=jit)(task, Phase(tf.constant(MSL_WEIGHTS), True, True))
            for jit in (False, True)}
    for compiled, plain in zip(sums[True]["gradients"], sums[False]["gradients"]):
        np.testing.assert_allclose(compiled, plain, rtol=TOLERANCE,
                                   atol=TOLERANCE * np.abs(plain).max())


@pytest.fixture(scope="module")
def run(processes):
    run = processes["run"].result(timeout=3 * TIMEOUT)
    for name in ("first", "second"):
        assert run[name].returncode == 0, run[name].stderr[-3000:]
    return run


def scalars(run_dir, tag):
    """{step: value} of a training scalar, from the event files of both processes."""
    accumulator = event_accumulator.EventAccumulator(
        str(run_dir), size_guidance={event_accumulator.TENSORS: 0})
    accumulator.Reload()
    return {event.step: float(tensor_util.make_ndarray(event.tensor_proto))
            for event in accumulator.Tensors(tag)}


@pytest.mark.slow
def test_main_trains_resumes_and_continues_the_loss_scale(run):
    assert f"the meta-step computes in {compute_dtype().name}" in run["first"].stderr
    assert "Resuming at epoch 2, iteration 1." in run["second"].stderr
    # auto keeps a resumed run's precision, unprobed.
    assert (f"--mixed_precision=auto: the run continues in 16 bits ({compute_dtype().name}), "
            "as it began.") in run["second"].stderr
    run_dir = run["run_dir"]
    assert json.loads((run_dir / "config.json").read_text())["mixed_precision"] is True
    history = json.loads((run_dir / "history.json").read_text())
    assert [(record["epoch"], record["second_order"]) for record in history] == [
        (1, False), (2, True)]
    # One scale per meta-iteration, halved after each skipped update, across the
    # resume too: the second process continued from the checkpointed scale.
    scales, skipped = (scalars(run_dir, f"train/{name}") for name in ("loss_scale",
                                                                      "skipped_updates"))
    assert sorted(scales) == sorted(skipped) == [1, 2, 3, 4]
    assert scales[1] == 2.0**15
    for step in (1, 2, 3):
        assert scales[step + 1] == scales[step] / (2 if skipped[step] else 1)
    assert [record["train_skipped_updates"] for record in history] == [
        int(skipped[1] + skipped[2]), int(skipped[3] + skipped[4])]
    # The second epoch's updates were applied and moved the network.
    assert skipped[4] == 0 and np.isfinite(history[1]["train_loss"])
    latest = run_dir / "checkpoints" / "latest"
    kernel = "network/conv0_kernel/.ATTRIBUTES/VARIABLE_VALUE"
    assert not np.array_equal(tf.train.load_variable(str(latest / "ckpt-2"), kernel),
                              tf.train.load_variable(str(latest / "ckpt-4"), kernel))
    assert tf.train.load_variable(str(latest / "ckpt-4"),
                                  "loss_scale/scale/.ATTRIBUTES/VARIABLE_VALUE") == scales[4]
    results = json.loads((run_dir / "results.json").read_text())
    assert results["test_tasks"] == 4


@pytest.mark.slow
def test_auto_picks_a_precision_for_a_new_run_and_logs_why(processes):
    auto = processes["auto"].result()
    assert auto["process"].returncode == 0, auto["process"].stderr[-3000:]
    (line,) = [line for line in auto["process"].stderr.splitlines()
               if "--mixed_precision=auto: a probe meta-step took" in line]
    mixed = json.loads((auto["run_dir"] / "config.json").read_text())["mixed_precision"]
    assert line.endswith(f"meta-training in {'16 bits' if mixed else 'float32'}"
                         f"{f' ({compute_dtype().name})' if mixed else ''}.")


@pytest.mark.slow
def test_the_export_of_a_mixed_precision_run_serves_float32(run):
    run_dir = RunDirectory.existing(run["run_dir"].parent, "run")
    signature = tf.saved_model.load(str(run_dir.path / "export")).signatures["adapt_and_predict"]
    assert {spec.dtype for spec in signature.structured_input_signature[1].values()} == {
        tf.float32, tf.int32}
    rng = np.random.default_rng(0)
    support, labels = rng.random((3, 28, 28, 1)).astype(np.float32), np.arange(3, dtype=np.int32)
    queries = rng.random((4, 28, 28, 1)).astype(np.float32)
    out = signature(support_images=tf.constant(support), support_labels=tf.constant(labels),
                    query_images=tf.constant(queries))
    assert out["logits"].dtype == out["probabilities"].dtype == tf.float32
    np.testing.assert_allclose(out["probabilities"].numpy().sum(-1), 1.0, rtol=1e-5)
    # It adapts in float32, as the in-process model of the exported checkpoint.
    network = build_network(run_dir.config)
    tf.train.Checkpoint(network=network).read(
        run_dir.checkpoint_path(run_dir.best_checkpoints()[0][2])).expect_partial()
    expected = saved_model.AdaptingModel(network, 1).adapt_and_predict(
        tf.constant(support), tf.constant(labels), tf.constant(queries))
    np.testing.assert_allclose(out["logits"].numpy(), expected["logits"].numpy(),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_changing_mixed_precision_is_refused_naming_the_flag(run):
    config = RunDirectory.existing(run["run_dir"].parent, "run").config
    with pytest.raises(RunDirectoryError, match=r"--mixed_precision=False \(run has True\)"):
        RunDirectory.open(run["run_dir"].parent, "run",
                          dataclasses.replace(config, mixed_precision=False))


@pytest.mark.slow
def test_loss_scale_is_checkpointed_and_restored(tmp_path):
    config = config_module.resolve("omniglot", way=3, filters=8, inner_steps=1, batch_size=2,
                                   mixed_precision=True)
    first = Trainer(config, RunDirectory.open(tmp_path, "run", config))
    first.loss_scale.scale.assign(96.0)
    first.loss_scale.finite_steps.assign(7)
    first.run_dir.save_checkpoint(first.checkpoint, 0)
    second = Trainer(config, RunDirectory.existing(tmp_path, "run"))
    assert second.loss_scale.scale.numpy() == 2.0**15
    assert second.run_dir.restore_latest(second.checkpoint)
    assert (second.loss_scale.scale.numpy(), second.loss_scale.finite_steps.numpy()) == (96, 7)


def test_trainer_averages_applied_updates_counts_skipped_ones_and_stops_at_scale_1(tmp_path):
    """The meta-step's figures are scripted: applied or skipped, at a given scale."""
    config = config_module.resolve("omniglot", way=3, filters=8, inner_steps=1, batch_size=2,
                                   iters_per_epoch=4, mixed_precision=True)
    trainer = Trainer(config, RunDirectory.open(tmp_path, "run", config))

    def applied(scale, loss):
        return {"loss": loss, "accuracy": 0.5, "gradient_norm": 1.0, "loss_scale": scale,
                "skipped_updates": 0.0}

    skipped = lambda scale: {"loss": np.nan, "accuracy": 0.0, "gradient_norm": np.nan,
                             "loss_scale": scale, "skipped_updates": 1.0}
    steps = iter([applied(4.0, 1.0), skipped(4.0), applied(2.0, 3.0), skipped(2.0),
                  applied(1.0, 1.0), skipped(1.0)])

    def meta_update(*args):
        trainer.optimizer.iterations.assign_add(1)  # skipped or not, as the real step
        return next(steps)

    trainer.meta_learner.meta_update = meta_update
    record = trainer.train_epoch(0, itertools.repeat(None))
    assert record["train_skipped_updates"] == 2
    assert (record["train_loss"], record["train_loss_scale"]) == (2.0, 3.0)
    # A step that overflows at a scale of 1 is not one that scaling caused.
    with pytest.raises(NonFiniteLossError, match="loss scale down to 1 at epoch 2, iteration 2"):
        trainer.train_epoch(1, itertools.repeat(None))


def test_runs_from_before_the_flag_continue_in_float32(tmp_path):
    """A config.json written before --mixed_precision existed reads as float32, and the
    default, auto, continues it so."""
    config = config_module.resolve("omniglot", way=3, filters=8, mixed_precision=False)
    run_dir = RunDirectory.open(tmp_path, "run", config)
    saved = json.loads((run_dir.path / "config.json").read_text())
    del saved["mixed_precision"]
    (run_dir.path / "config.json").write_text(json.dumps(saved))
    assert saved_config(run_dir.path).mixed_precision is False
    assert RunDirectory.open(tmp_path, "run", config).config.mixed_precision is False
    by_default = config_module.resolve("omniglot", way=3, filters=8)
    assert by_default.mixed_precision == config_module.AUTO
    assert precision.settled(by_default, saved_config(run_dir.path)) == config
