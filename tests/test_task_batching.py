"""Folding a meta-batch's tasks, running them in parallel or compiling with XLA changes no result.

The fast paths (`fold_tasks=True`, `parallel_tasks` > 1, `jit_compile=True`)
must give the plain path's loss, figures and updated parameters on the same
tasks, first and second order. Folded tasks need gradients of grouped
convolutions (`grouped_convolution_gradients()`); where TensorFlow lacks them
(a CPU without AVX-512), asking for them must fail at once with a clear error
instead of deep inside the first meta-step.
"""

import functools
import os
import textwrap

import keras
import numpy as np
import pytest
import tensorflow as tf

from conftest import (lacks_grouped_convolution_gradients, needs_grouped_convolution_gradients,
                      run_python)
from tf_mamlpp.core.meta_learner import MetaLearner
from tf_mamlpp.core.network import MamlppNetwork
from tf_mamlpp.core.schedules import Phase
from tf_mamlpp.data.random_tasks import random_tasks


@lacks_grouped_convolution_gradients()
@pytest.mark.parametrize("jit_compile", [False, True], ids=["plain", "compiled"])
@pytest.mark.parametrize("second_order", [False, True])
def test_where_grouped_convolutions_have_no_gradients_folding_is_refused_up_front(
        second_order, jit_compile):
    """Whether or not the step would be compiled."""
    # The refusal is justified: a grouped convolution's gradient really fails here.
    images = tf.random.uniform((1, 4, 4, 2))
    with pytest.raises(tf.errors.InvalidArgumentError):
        with tf.GradientTape() as tape:
            tape.watch(images)
            loss = tf.reduce_sum(tf.nn.conv2d(images, tf.ones((3, 3, 1, 2)), 1, "SAME"))
        tape.gradient(loss, images).numpy()
    with pytest.raises(ValueError, match="fold_tasks=True"):
        one_step(True, second_order, jit_compile=jit_compile)


def three_tasks():
    """A meta-batch of 3 random 3-way tasks of 8x8 images, 2 support and 2 target a class."""
    return random_tasks(3, 3, 2, 2, (8, 8, 1))


@functools.cache
def one_step(fold_tasks, second_order, parallel_tasks=1, jit_compile=False):
    """(variables, figures) after one meta-update of the same network on `three_tasks()`.

    Each path's step is taken once and compared with the others, as often as
    the tests ask.
    """
    keras.utils.set_random_seed(3)
    network = MamlppNetwork(3, (8, 8, 1), 2, filters=4, num_stages=2)
    learner = MetaLearner(network, keras.optimizers.Adam(1e-2), fold_tasks=fold_tasks,
                          parallel_tasks=parallel_tasks, jit_compile=jit_compile)
    figures = learner.meta_update(three_tasks(),
                                  Phase(tf.constant([0.3, 0.7]), True, second_order))
    return ([np.asarray(v.numpy()) for v in network.variables],
            {name: float(value) for name, value in figures.items()})


@needs_grouped_convolution_gradients()
@pytest.mark.parametrize("second_order", [False, True])
@pytest.mark.slow
def test_folded_tasks_give_the_plain_step(second_order):
    plain_variables, plain_figures = one_step(False, second_order)
    assert plain_figures["update_norm"] > 0
    folded_variables, folded_figures = one_step(True, second_order)
    assert plain_figures.keys() == folded_figures.keys()
    for name, value in plain_figures.items():
        assert folded_figures[name] == pytest.approx(value, rel=1e-4, abs=1e-6), name
    for plain, folded in zip(plain_variables, folded_variables):
        np.testing.assert_allclose(folded, plain, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("second_order", [False, True])
@pytest.mark.slow
def test_parallel_tasks_give_the_plain_step(second_order):
    plain_variables, plain_figures = one_step(False, second_order)
    parallel_variables, parallel_figures = one_step(False, second_order, parallel_tasks=3)
    assert parallel_figures == pytest.approx(plain_figures, rel=1e-6, abs=1e-7)
    for plain, parallel in zip(plain_variables, parallel_variables):
        np.testing.assert_allclose(parallel, plain, rtol=1e-6, atol=1e-7)
    assert plain_figures["update_norm"] > 0


@pytest.mark.slow
def test_parallel_tasks_reach_the_task_loop():
    tasks = three_tasks()
    network = MamlppNetwork(3, (8, 8, 1), 2, filters=4, num_stages=2)
    learner = MetaLearner(network, keras.optimizers.Adam(1e-2), parallel_tasks=3)
    graph = learner._compiled_replica_step.get_concrete_function(
        tasks, Phase(tf.constant([0.3, 0.7]), False, True)).graph
    loops = [op for op in graph.get_operations() if op.type in ("While", "StatelessWhile")]
    assert [op.get_attr("parallel_iterations") for op in loops] == [3]


@pytest.mark.parametrize("fold_tasks", [
    pytest.param(False, id="task by task"),
    pytest.param(True, id="folded", marks=needs_grouped_convolution_gradients())])
@pytest.mark.parametrize("second_order", [False, True])
@pytest.mark.slow
def test_the_xla_compiled_step_gives_the_plain_step(second_order, fold_tasks):
    plain_variables, plain_figures = one_step(fold_tasks, second_order)
    compiled_variables, compiled_figures = one_step(fold_tasks, second_order, jit_compile=True)
    assert compiled_figures == pytest.approx(plain_figures, rel=1e-4, abs=1e-6)
    assert plain_figures["update_norm"] > 0
    for plain, compiled in zip(plain_variables, compiled_variables):
        np.testing.assert_allclose(compiled, plain, rtol=1e-4, atol=1e-6)


@pytest.mark.slow
def test_cpu_threads_share_the_cores_among_parallel_tasks():
    script = textwrap.dedent("""
        import tensorflow as tf
        from tf_mamlpp.hardware import cpu_threads
        cpu_threads.configure(2)
        print(tf.config.threading.get_intra_op_parallelism_threads(),
              tf.config.threading.get_inter_op_parallelism_threads())
    """)
    printed = run_python("-c", script, check=True).stdout.split()
    cores = len(os.sched_getaffinity(0))
    assert [int(n) for n in printed] == [max(1, cores // 2), 2]


def test_parallel_tasks_below_one_are_refused():
    from tf_mamlpp.hardware import cpu_threads
    with pytest.raises(ValueError, match="--parallel_tasks must be at least 1"):
        cpu_threads.configure(0)
