"""Folding a meta-batch's tasks into grouped convolutions changes no result.

The fast path (`fold_tasks=True`) must give the plain path's loss, figures
and updated parameters on the same tasks, first and second order.
"""

import keras
import numpy as np
import pytest
import tensorflow as tf

from tf_mamlpp.meta_learner import MetaLearner
from tf_mamlpp.network import MamlppNetwork


def random_tasks(num_tasks, way, shot, query, size, seed=0):
    rng = np.random.default_rng(seed)

    def labels(per_class):
        return tf.constant([rng.permutation(np.repeat(np.arange(way), per_class))
                            for _ in range(num_tasks)], tf.int32)

    def images(per_class):
        return tf.constant(rng.random((num_tasks, way * per_class, size, size, 1), np.float32))

    return {"support_images": images(shot), "support_labels": labels(shot),
            "target_images": images(query), "target_labels": labels(query)}


def one_step(fold_tasks, second_order, tasks):
    keras.utils.set_random_seed(3)
    network = MamlppNetwork(3, (8, 8, 1), 2, filters=4, num_stages=2)
    learner = MetaLearner(network, keras.optimizers.Adam(1e-2), 3, fold_tasks=fold_tasks)
    figures = learner.train_step(tasks, tf.constant([0.3, 0.7]), second_order, True)
    return ([np.asarray(v.numpy()) for v in network.variables],
            {name: float(value) for name, value in figures.items()})


@pytest.mark.parametrize("second_order", [False, True])
def test_folded_tasks_give_the_plain_step(second_order):
    tasks = random_tasks(num_tasks=3, way=3, shot=2, query=2, size=8)
    plain_variables, plain_figures = one_step(False, second_order, tasks)
    folded_variables, folded_figures = one_step(True, second_order, tasks)
    assert plain_figures.keys() == folded_figures.keys()
    for name, value in plain_figures.items():
        assert folded_figures[name] == pytest.approx(value, rel=1e-4, abs=1e-6), name
    for plain, folded in zip(plain_variables, folded_variables):
        np.testing.assert_allclose(folded, plain, rtol=1e-4, atol=1e-6)
    assert plain_figures["update_norm"] > 0
