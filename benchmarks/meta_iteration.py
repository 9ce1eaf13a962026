"""Seconds per meta-iteration, peak memory and FLOP rate of the MAML++ meta-step.

    python benchmarks/meta_iteration.py                  # the four paper configurations
    python benchmarks/meta_iteration.py --iterations=20 --variants=fold,loop

Each configuration runs in its own subprocess, so its peak resident memory is
its own. Random images stand in for Omniglot (28x28x1): the step's cost does
not depend on the pixels. The reference figures are the paper's PyTorch
implementation measured on the same 2-core machines (see README.md). The
FLOP rate counts the convolutions and matrix products of the step (see
flops.py) and sets it beside a 4096x4096 matmul timed in the same run.
"""

import json
import resource
import subprocess
import sys
import time

from absl import app, flags

from random_tasks import BATCH_SIZE, INNER_STEPS, QUERY, random_batch

FLAGS = flags.FLAGS
flags.DEFINE_integer("iterations", 20, "Timed meta-iterations after two warm-up ones. Default 20.")
flags.DEFINE_list("variants", ["parallel"], "Task batching to measure: parallel (main.py's "
                  "default: one task per core at once, single-threaded ops), loop (one task "
                  "after another, TensorFlow's default threads), fold (grouped convolutions). "
                  "Default parallel.")
flags.DEFINE_list("configs", None, "Names of the configurations to run, with _ for spaces. Default: all.")
flags.DEFINE_bool("jit_compile", False, "Compile the meta-step with XLA. Default false.")
flags.DEFINE_bool("scaling", False, "Instead of the paper's configurations, measure 5-way "
                  "1-shot second order at 1, 2, 5 and 10 inner steps (batch 8) and at 1, 4, 8 and "
                  "16 tasks per meta-batch (5 steps). Default false.")
flags.DEFINE_string("child", None, "Internal: run one measurement and print it as JSON.")

# name: (way, shot, second order, reference seconds, reference peak GB)
CONFIGS = {
    "20-way 1-shot": (20, 1, True, 2.8, 2.5),
    "20-way 5-shot": (20, 5, True, 10.8, 7.4),
    "5-way 1-shot": (5, 1, True, 1.03, 1.0),
    "5-way 1-shot first order": (5, 1, False, 0.55, 0.7),
}
def measure(name, variant, iterations, jit_compile, inner_steps=INNER_STEPS,
            batch_size=BATCH_SIZE):
    """Times one configuration in this process; returns a dict of figures."""
    import keras
    import numpy as np
    import tensorflow as tf
    from flops import graph_flops
    from tf_mamlpp import cpu_threads
    from tf_mamlpp.meta_learner import MetaLearner
    from tf_mamlpp.network import MamlppNetwork

    parallel_tasks = cpu_threads.default_parallel_tasks() if variant == "parallel" else 1
    if variant == "parallel":
        cpu_threads.configure(parallel_tasks)
    way, shot, second_order, _, _ = CONFIGS[name]
    network = MamlppNetwork(way, (28, 28, 1), inner_steps)
    learner = MetaLearner(network, keras.optimizers.Adam(1e-3), batch_size,
                          jit_compile=jit_compile, fold_tasks=variant == "fold",
                          parallel_tasks=parallel_tasks)
    batch = random_batch(way, shot, QUERY, batch_size)
    weights = tf.constant(np.full(inner_steps, 1 / inner_steps, np.float32))
    started = time.monotonic()
    float(learner.train_step(batch, weights, second_order, True)["loss"])
    first_call = time.monotonic() - started
    float(learner.train_step(batch, weights, second_order, True)["loss"])
    times = []
    for _ in range(iterations):
        started = time.monotonic()
        float(learner.train_step(batch, weights, second_order, True)["loss"])
        times.append(time.monotonic() - started)
    seconds = float(np.median(times))
    # The step is one task's graph run batch_size times (map_fn), or the same
    # arithmetic folded; count one task's graph and scale it.
    one_task = random_batch(way, shot, QUERY, 1)
    task_graph = tf.function(learner._tasks_step).get_concrete_function(
        one_task, weights, second_order, True).graph
    flops = graph_flops(task_graph) * batch_size
    return {"seconds": seconds, "first_call": first_call,
            "peak_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
            "gflop": flops / 1e9, "gflop_per_s": flops / seconds / 1e9}


def run_child(name, variant, inner_steps=INNER_STEPS, batch_size=BATCH_SIZE):
    command = [sys.executable, __file__, f"--child={name}|{variant}|{inner_steps}|{batch_size}",
               f"--iterations={FLAGS.iterations}", f"--jit_compile={FLAGS.jit_compile}"]
    output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    return json.loads(output.strip().splitlines()[-1])


def run_matmul_child():
    """GFLOP/s of a large matmul, measured in a process of its own."""
    command = [sys.executable, __file__, "--child=matmul"]
    output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    return float(output.strip().splitlines()[-1])


def main(argv):
    del argv
    if FLAGS.child == "matmul":
        from flops import matmul_flop_rate
        print(matmul_flop_rate() / 1e9)
        return
    if FLAGS.child:
        name, variant, inner_steps, batch_size = FLAGS.child.split("|")
        print(json.dumps(measure(name, variant, FLAGS.iterations, FLAGS.jit_compile,
                                 int(inner_steps), int(batch_size))))
        return
    if FLAGS.scaling:
        print_scaling()
        return
    names = [name.replace("_", " ") for name in FLAGS.configs] if FLAGS.configs else list(CONFIGS)
    # The machine's ceiling, with TensorFlow's default threads (all cores on one
    # op). In a child: Linux keeps a parent's peak memory across fork and exec,
    # so a parent holding TensorFlow would raise every child's figure.
    matmul = run_matmul_child()
    print(f"batch {BATCH_SIZE} tasks, {INNER_STEPS} inner steps, query {QUERY}, "
          f"median of {FLAGS.iterations} iterations, jit_compile={FLAGS.jit_compile}; "
          f"4096x4096 matmul {matmul:.1f} GFLOP/s")
    print(f"| configuration | variant | s/iter | reference s/iter | speed-up | peak GB "
          f"| reference GB | first call s | GFLOP/iter | GFLOP/s | of matmul |")
    print("| --- " * 11 + "|")
    for name in names:
        for variant in FLAGS.variants:
            figures = run_child(name, variant)
            _, _, _, reference_seconds, reference_gb = CONFIGS[name]
            print(f"| {name} | {variant} | {figures['seconds']:.3f} | {reference_seconds} "
                  f"| {reference_seconds / figures['seconds']:.2f}x | {figures['peak_gb']:.2f} "
                  f"| {reference_gb} | {figures['first_call']:.1f} | {figures['gflop']:.1f} "
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
