"""Folding a meta-batch's tasks, running them in parallel or compiling with XLA changes no result.

The fast paths (`fold_tasks=True`, `parallel_tasks` > 1, `jit_compile=True`)
must give the plain path's loss, figures and updated parameters on the same
tasks, first and second order. Folded tasks need gradients of grouped
convolutions (`grouped_convolution_gradients()`); where TensorFlow lacks them
(a CPU without AVX-512), asking for them must fail at once with a clear error
instead of deep inside the first meta-step.
"""

import os
import textwrap

import keras
import numpy as np
import pytest
import tensorflow as tf

from conftest import run_python
from tf_mamlpp.core.meta_learner import MetaLearner
from tf_mamlpp.core.network import MamlppNetwork
from tf_mamlpp.core.schedules import Phase
from tf_mamlpp.hardware.devices import grouped_convolution_gradients


def random_tasks(num_tasks, way, shot, query, size, seed=0):
    rng = np.random.default_rng(seed)

    def labels(per_class):
        return tf.constant([rng.permutation(np.repeat(np.arange(way), per_class))
                            for _ in range(num_tasks)], tf.int32)

    def images(per_class):
        return tf.constant(rng.random((num_tasks, way * per_class, size, size, 1), np.float32))

    return {"support_images": images(shot), "support_labels": labels(shot),
            "target_images": images(query), "target_labels": labels(query)}


def assert_folding_is_refused(second_order, tasks, jit_compile=False):
    """Where grouped convolutions have no gradients, `fold_tasks` is refused up front."""
    # The refusal is justified: a grouped convolution's gradient really fails here.
    images = tf.random.uniform((1, 4, 4, 2))
    with pytest.raises(tf.errors.InvalidArgumentError):
        with tf.GradientTape() as tape:
            tape.watch(images)
            loss = tf.reduce_sum(tf.nn.conv2d(images, tf.ones((3, 3, 1, 2)), 1, "SAME"))
        tape.gradient(loss, images).numpy()
    with pytest.raises(ValueError, match="fold_tasks=True"):
        one_step(True, second_order, tasks, jit_compile=jit_compile)


def one_step(fold_tasks, second_order, tasks, parallel_tasks=1, jit_compile=False):
    keras.utils.set_random_seed(3)
    network = MamlppNetwork(3, (8, 8, 1), 2, filters=4, num_stages=2)
    learner = MetaLearner(network, keras.optimizers.Adam(1e-2), fold_tasks=fold_tasks,
                          parallel_tasks=parallel_tasks, jit_compile=jit_compile)
    figures = learner.meta_update(tasks, Phase(tf.constant([0.3, 0.7]), True, second_order))
    return ([np.asarray(v.numpy()) for v in network.variables],
            {name: float(value) for name, value in figures.items()})


@pytest.mark.parametrize("second_order", [False, True])
@pytest.mark.slow
def test_folded_tasks_give_the_plain_step(second_order):
    tasks = random_tasks(num_tasks=3, way=3, shot=2, query=2, size=8)
    plain_variables, plain_figures = one_step(False, second_order, tasks)
    assert plain_figures["update_norm"] > 0
    if not grouped_convolution_gradients():
        assert_folding_is_refused(second_order, tasks)
        return
    folded_variables, folded_figures = one_step(True, second_order, tasks)
    assert plain_figures.keys() == folded_figures.keys()
    for name, value in plain_figures.items():
        assert folded_figures[name] == pytest.approx(value, rel=1e-4, abs=1e-6), name
    for plain, folded in zip(plain_variables, folded_variables):
        np.testing.assert_allclose(folded, plain, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("second_order", [False, True])
@pytest.mark.slow
def test_parallel_tasks_give_the_plain_step(second_order):
    tasks = random_tasks(num_tasks=3, way=3, shot=2, query=2, size=8, seed=1)
    plain_variables, plain_figures = one_step(False, second_order, tasks)
    parallel_variables, parallel_figures = one_step(False, second_order, tasks, parallel_tasks=3)
    assert parallel_figures == pytest.approx(plain_figures, rel=1e-6, abs=1e-7)
    for plain, parallel in zip(plain_variables, parallel_variables):
        np.testing.assert_allclose(parallel, plain, rtol=1e-6, atol=1e-7)
    assert plain_figures["update_norm"] > 0


@pytest.mark.slow
def test_parallel_tasks_reach_the_task_loop():
    tasks = random_tasks(num_tasks=3, way=3, shot=2, query=2, size=8)
    network = MamlppNetwork(3, (8, 8, 1), 2, filters=4, num_stages=2)
    learner = MetaLearner(network, keras.optimizers.Adam(1e-2), parallel_tasks=3)
    graph = learner._replica_train_step.get_concrete_function(
        tasks, tf.constant([0.3, 0.7]), False, True).graph
    loops = [op for op in graph.get_operations() if op.type in ("While", "StatelessWhile")]
    assert [op.get_attr("parallel_iterations") for op in loops] == [3]


@pytest.mark.parametrize("fold_tasks", [False, True], ids=["task by task", "folded"])
@pytest.mark.parametrize("second_order", [False, True])
@pytest.mark.slow
def test_the_xla_compiled_step_gives_the_plain_step(second_order, fold_tasks):
    tasks = random_tasks(num_tasks=3, way=3, shot=2, query=2, size=8, seed=2)
    if fold_tasks and not grouped_convolution_gradients():
        # Refused whether or not the step would be compiled.
        assert_folding_is_refused(second_order, tasks, jit_compile=True)
        assert_folding_is_refused(second_order, tasks, jit_compile=False)
        return
    plain_variables, plain_figures = one_step(fold_tasks, second_order, tasks)
    compiled_variables, compiled_figures = one_step(fold_tasks, second_order, tasks,
                                                    jit_compile=True)
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
