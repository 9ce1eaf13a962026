"""How the meta-step shares a CPU's cores: several tasks at once, each op on one core.

The ops of one task's inner loop are small: a 5-way 1-shot convolution
takes a fraction of a millisecond, too little to split across cores, so
TensorFlow's default (every op spread over all cores, one task after
another) leaves the cores waiting on each other. Adapting as many tasks at
once as there are cores, with single-threaded ops, keeps them all busy: on
a 2-core machine a 5-way 1-shot meta-iteration takes 0.57 s instead of
0.80-1.10 s (benchmarks/README.md). Tasks are independent, so the result is
the same; the memory of as many tasks' graphs is alive at once.
"""

import os

import tensorflow as tf


def available_cores():
    """Cores this process may run on (its affinity, not the machine's count)."""
    return len(os.sched_getaffinity(0))


def default_parallel_tasks():
    """Tasks adapted at once when --parallel_tasks is not given.

    One per core on a CPU; one on a GPU, where a task's ops are already
    spread over the device (parallel tasks there are not measured).
    """
    return 1 if tf.config.list_physical_devices("GPU") else available_cores()


def configure(parallel_tasks):
    """Sets TensorFlow's thread pools for `parallel_tasks` concurrent tasks.

    Must run before TensorFlow executes its first op. Each task's ops get
    an equal share of the cores (at least one), and the inter-op pool runs
    the tasks side by side.
    """
    if parallel_tasks < 1:
        raise ValueError(f"--parallel_tasks must be at least 1, got {parallel_tasks}")
    tf.config.threading.set_intra_op_parallelism_threads(
        max(1, available_cores() // parallel_tasks))
    tf.config.threading.set_inter_op_parallelism_threads(max(2, parallel_tasks))
