"""Seconds per meta-iteration, peak memory and FLOP rate of the MAML++ meta-step.

    python -m benchmarks.meta_iteration                  # the four paper configurations
    python -m benchmarks.meta_iteration --iterations=20 --variants=fold,loop
    python -m benchmarks.meta_iteration --reference_dir=PATH   # and the reference, same run
    python -m benchmarks.meta_iteration --bn_modes=transductive,support,task_norm,running
    python -m benchmarks.meta_iteration --networks=builtin,keras_conv4,resnet12

Each configuration runs in its own subprocess, so its peak resident memory is
its own. Random images stand in for Omniglot (28x28x1): the step's cost does
not depend on the pixels. The reference figures are the paper's PyTorch
implementation: with --reference_dir (a checkout of it, and PyTorch
installed) measured in the same run (reference_maml.py), else as quoted for
these 2-core machines (random_tasks.QUOTED_REFERENCE). The FLOP rate
counts the convolutions and matrix products of the step (see
flops.py) and sets it beside a 4096x4096 matmul timed in the same run.
"""

import itertools
import json
import sys

from absl import app, flags

from benchmarks.measurement import peak_gb, run_json_child, time_step
from benchmarks.random_tasks import (BATCH_SIZE, CONFIGS, INNER_STEPS, QUERY, QUOTED_REFERENCE,
                                     config_names)
from benchmarks.reference_maml import check_checkout, measure as measure_reference
from tf_mamlpp.core.batch_norm_modes import BN_MODES
from tf_mamlpp.hardware.machine import cpu_description

FLAGS = flags.FLAGS
flags.DEFINE_integer("iterations", 20, "Timed meta-iterations after two warm-up ones. Default 20.")
flags.DEFINE_list("variants", ["parallel"], "Task batching to measure: parallel (main.py's "
                  "default: one task per core at once, single-threaded ops), loop (one task "
                  "after another, TensorFlow's default threads), fold (grouped convolutions). "
                  "Default parallel.")
flags.DEFINE_list("configs", None, "Names of the configurations to run, with _ for spaces. "
                  "Default: all.")
flags.DEFINE_list("bn_modes", ["transductive"], "Batch-norm modes to measure (main.py's "
                  "--bn_mode): transductive, support, task_norm, running. Default transductive.")
flags.DEFINE_list("networks", ["builtin"], "Learners to measure: builtin (MamlppNetwork), "
                  "keras_conv4 (the same architecture as a Keras model through KerasBackbone, "
                  "tf_mamlpp.conv4), resnet12 (tf_mamlpp.resnet12 of the usual widths through "
                  "KerasBackbone). Default builtin.")
flags.DEFINE_bool("jit_compile", False, "Compile the meta-step with XLA. Default false.")
flags.DEFINE_bool("mixed_precision", False, "Compute the meta-step in 16 bits, as main.py's "
                  "--mixed_precision (bfloat16 on a CPU, float16 on a GPU). Default false.")
flags.DEFINE_bool("scaling", False, "Instead of the paper's configurations, measure 5-way "
                  "1-shot second order at 1, 2, 5 and 10 inner steps (batch 8) and at 1, 4, 8 and "
                  "16 tasks per meta-batch (5 steps). Default false.")
flags.DEFINE_string("reference_dir", None, "A checkout of the paper's PyTorch implementation "
                    "(AntreasAntoniou/HowToTrainYourMAMLPytorch), with PyTorch installed: its step "
                    "is timed in the same run. Default: the figures quoted for these machines.")
flags.DEFINE_string("child", None, "Internal: run one measurement and print it as JSON.")


NETWORKS = ("builtin", "keras_conv4", "resnet12")


def learner_network(network, way, inner_steps, bn_mode, image_shape=(28, 28, 1)):
    """The `network` of --networks, `way` classes of Omniglot-sized images."""
    import tf_mamlpp
    if network == "builtin":
        return tf_mamlpp.MamlppNetwork(way, image_shape, inner_steps, bn_mode=bn_mode)
    model = (tf_mamlpp.conv4 if network == "keras_conv4" else tf_mamlpp.resnet12)(image_shape, way)
    return tf_mamlpp.KerasBackbone(model, inner_steps, bn_mode=bn_mode)


def measure(name, variant, iterations, jit_compile, mixed_precision, inner_steps=INNER_STEPS,
            batch_size=BATCH_SIZE, bn_mode="transductive", network="builtin"):
    """Times one configuration in this process; returns a dict of figures."""
    import keras
    import numpy as np
    import tensorflow as tf
    from benchmarks.flops import graph_flops
    from tf_mamlpp.core.meta_learner import MetaLearner
    from tf_mamlpp.core.mixed_precision import DynamicLossScale, compute_dtype
    from tf_mamlpp.core.schedules import Phase
    from tf_mamlpp.data.random_tasks import random_tasks
    from tf_mamlpp.hardware import cpu_threads

    parallel_tasks = cpu_threads.default_parallel_tasks() if variant == "parallel" else 1
    if variant == "parallel":
        cpu_threads.configure(parallel_tasks)
    way, shot, second_order = CONFIGS[name]
    learner = MetaLearner(learner_network(network, way, inner_steps, bn_mode),
                          keras.optimizers.Adam(1e-3),
                          jit_compile=jit_compile, fold_tasks=variant == "fold",
                          parallel_tasks=parallel_tasks,
                          loss_scale=(DynamicLossScale(compute_dtype=compute_dtype())
                                      if mixed_precision else None))
    batch = random_tasks(batch_size, way, shot, QUERY)
    weights = tf.constant(np.full(inner_steps, 1 / inner_steps, np.float32))
    phase = Phase(weights, multi_step=True, second_order=second_order)
    first_call, seconds = time_step(
        lambda: float(learner.meta_update(batch, phase)["loss"]), iterations)
    # The step is one task's graph run batch_size times (map_fn), or the same
    # arithmetic folded; count one task's graph and scale it.
    one_task = random_tasks(1, way, shot, QUERY)
    task_graph = tf.function(learner._tasks_step).get_concrete_function(one_task, phase).graph
    flops = graph_flops(task_graph) * batch_size
    return {"seconds": seconds, "first_call": first_call, "peak_gb": peak_gb(),
            "gflop": flops / 1e9, "gflop_per_s": flops / seconds / 1e9}


def run_child(name, variant, inner_steps=INNER_STEPS, batch_size=BATCH_SIZE,
              bn_mode="transductive", network="builtin"):
    return run_json_child(__spec__.name, f"--child={name}|{variant}|{inner_steps}|{batch_size}|"
                                         f"{bn_mode}|{network}",
                          f"--iterations={FLAGS.iterations}", f"--jit_compile={FLAGS.jit_compile}",
                          f"--mixed_precision={FLAGS.mixed_precision}")


def reference_figures(name, reference_dir):
    """(seconds per iteration, peak GB) of the reference: measured now, or as quoted."""
    if not reference_dir:
        return QUOTED_REFERENCE[name]
    figures = run_json_child(__spec__.name, f"--child={name}|reference",
                             f"--iterations={FLAGS.iterations}",
                             f"--reference_dir={reference_dir}")
    return figures["seconds"], figures["peak_gb"]


def run_matmul_child():
    """GFLOP/s of a large matmul, measured in a process of its own."""
    return run_json_child(__spec__.name, "--child=matmul")


def main(argv):
    del argv
    if FLAGS.child == "matmul":
        from benchmarks.flops import matmul_flop_rate
        print(matmul_flop_rate() / 1e9)
        return
    if FLAGS.child:
        name, variant, *sizes = FLAGS.child.split("|")
        if variant == "reference":
            print(json.dumps(measure_reference(name, FLAGS.iterations, FLAGS.reference_dir)))
        else:
            inner_steps, batch_size, bn_mode, network = sizes
            print(json.dumps(measure(name, variant, FLAGS.iterations, FLAGS.jit_compile,
                                     FLAGS.mixed_precision, int(inner_steps), int(batch_size),
                                     bn_mode, network)))
        return
    if FLAGS.scaling:
        print_scaling()
        return
    try:
        names = config_names(FLAGS.configs)
        unknown = sorted(set(FLAGS.bn_modes) - set(BN_MODES))
        if unknown:
            raise ValueError(f"--bn_modes: unknown mode {', '.join(unknown)}; known: "
                             f"{', '.join(BN_MODES)}")
        unknown = sorted(set(FLAGS.networks) - set(NETWORKS))
        if unknown:
            raise ValueError(f"--networks: unknown network {', '.join(unknown)}; known: "
                             f"{', '.join(NETWORKS)}")
        reference_dir = FLAGS.reference_dir and check_checkout(FLAGS.reference_dir)
    except ValueError as error:
        sys.exit(f"error: {error}")
    # The machine's ceiling, with TensorFlow's default threads (all cores on one op).
    matmul = run_matmul_child()
    reference = "measured in this run" if reference_dir else "as quoted"
    print(f"batch {BATCH_SIZE} tasks, {INNER_STEPS} inner steps, query {QUERY}, "
          f"median of {FLAGS.iterations} iterations, jit_compile={FLAGS.jit_compile}, "
          f"mixed_precision={FLAGS.mixed_precision}; "
          f"4096x4096 matmul {matmul:.1f} GFLOP/s; reference {reference}")
    print(f"CPU: {cpu_description()}")
    print("| configuration | network | variant | batch norm | s/iter | reference s/iter "
          "| speed-up | peak GB | reference GB | first call s | GFLOP/iter | GFLOP/s | of matmul |")
    print("| --- " * 13 + "|")
    for name in names:
        reference_seconds, reference_gb = reference_figures(name, reference_dir)
        for network, variant, bn_mode in itertools.product(FLAGS.networks, FLAGS.variants,
                                                           FLAGS.bn_modes):
            figures = run_child(name, variant, bn_mode=bn_mode, network=network)
            print(f"| {name} | {network} | {variant} | {bn_mode} | {figures['seconds']:.3f} "
                  f"| {reference_seconds:.3g} "
                  f"| {reference_seconds / figures['seconds']:.2f}x | {figures['peak_gb']:.2f} "
                  f"| {reference_gb:.2f} | {figures['first_call']:.1f} | {figures['gflop']:.1f} "
                  f"| {figures['gflop_per_s']:.1f} | {figures['gflop_per_s'] / matmul:.0%} |",
                  flush=True)


def print_scaling():
    """How time and memory grow with the inner steps and the meta-batch size."""
    print(f"5-way 1-shot, second order, median of {FLAGS.iterations} iterations")
    print("| inner steps | tasks per meta-batch | variant | s/iter | s/iter per task | peak GB |")
    print("| --- | --- | --- | --- | --- | --- |")
    settings = [(steps, BATCH_SIZE) for steps in (1, 2, 5, 10)]
    settings += [(INNER_STEPS, batch) for batch in (1, 4, 16)]
    for steps, batch in settings:
        for variant in FLAGS.variants:
            figures = run_child("5-way 1-shot", variant, steps, batch)
            print(f"| {steps} | {batch} | {variant} | {figures['seconds']:.3f} "
                  f"| {figures['seconds'] / batch:.3f} | {figures['peak_gb']:.2f} |", flush=True)


if __name__ == "__main__":
    app.run(main)
