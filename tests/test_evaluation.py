"""Specification of tf_mamlpp.core.evaluation: accuracy as the paper reports it."""

import math

import numpy as np
import pytest
import tensorflow as tf

from tf_mamlpp.core.evaluation import ensemble_accuracies, evaluate, mean_and_interval


def test_mean_and_interval_against_hand_numbers():
    # mean 0.5; deviations +-0.3, +-0.1: variance (0.09+0.01+0.01+0.09)/4 = 0.05.
    mean, half_width = mean_and_interval([0.2, 0.4, 0.6, 0.8])
    assert mean == pytest.approx(0.5)
    assert half_width == pytest.approx(1.96 * math.sqrt(0.05) / math.sqrt(4))


def test_interval_shrinks_with_the_square_root_of_the_task_count():
    _, few = mean_and_interval([0.0, 1.0])
    _, many = mean_and_interval([0.0, 1.0] * 50)
    assert few == pytest.approx(1.96 * 0.5 / math.sqrt(2))
    assert many == pytest.approx(few / math.sqrt(50))


def test_identical_accuracies_have_no_interval_and_z_is_honoured():
    assert mean_and_interval([0.75] * 10) == (pytest.approx(0.75), pytest.approx(0.0))
    _, half_width = mean_and_interval([0.0, 1.0], z=1.0)
    assert half_width == pytest.approx(0.5 / math.sqrt(2))


def test_no_tasks_raises():
    with pytest.raises(ValueError, match="no tasks"):
        mean_and_interval([])


def test_ensemble_can_be_right_where_each_member_is_wrong_once():
    labels = np.array([[0, 1], [0, 1]])
    # (models, tasks, queries, way). Task 0: each model errs on a different
    # query, confidently right on the other, so the mean is right on both.
    # Task 1: both models lean the wrong way on query 1.
    first = np.array([[[0.9, 0.1], [0.6, 0.4]],
                      [[0.8, 0.2], [0.7, 0.3]]])
    second = np.array([[[0.4, 0.6], [0.1, 0.9]],
                       [[0.6, 0.4], [0.55, 0.45]]])
    np.testing.assert_allclose(ensemble_accuracies([first], labels), [0.5, 0.5])
    np.testing.assert_allclose(ensemble_accuracies([second], labels), [0.5, 0.5])
    np.testing.assert_allclose(ensemble_accuracies([first, second], labels), [1.0, 0.5])


def test_ensemble_averages_probabilities_not_votes():
    labels = np.array([[1]])
    # Two members vote 0 weakly, one votes 1 strongly: the mean says 1.
    members = [np.array([[[0.55, 0.45]]]), np.array([[[0.55, 0.45]]]), np.array([[[0.0, 1.0]]])]
    np.testing.assert_allclose(ensemble_accuracies(members, labels), [1.0])


class StubMetaLearner:
    """Answers evaluate_batch with accuracies that identify the batch."""

    def __init__(self):
        self.calls = []

    def evaluate_batch(self, batch, num_steps, bn_mode):
        self.calls.append((num_steps, bn_mode))
        first = tf.cast(batch["target_labels"][:, :1], tf.float32)  # (tasks, 1)
        return {"accuracies": tf.tile(first, [1, num_steps]),
                "probabilities": tf.one_hot(batch["target_labels"], 2)}


class CountingProgress:
    def __init__(self):
        self.count = 0

    def update(self, count=1, **figures):
        self.count += count


def test_evaluate_concatenates_batches_in_order_and_counts_tasks():
    labels = np.array([[0, 1], [1, 0], [1, 1], [0, 0], [1, 0]], np.int32)  # 5 tasks
    dataset = tf.data.Dataset.from_tensor_slices({"target_labels": labels}).batch(2)
    stub, progress = StubMetaLearner(), CountingProgress()
    result = evaluate(stub, dataset, num_steps=3, bn_mode="running", progress=progress)
    assert stub.calls == [(3, "running")] * 3
    np.testing.assert_array_equal(result["labels"], labels)
    np.testing.assert_array_equal(result["accuracies"], np.repeat(labels[:, :1], 3, axis=1))
    assert result["probabilities"].shape == (5, 2, 2)
    assert progress.count == 5
