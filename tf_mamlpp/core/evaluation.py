"""Evaluation as the paper reports it: mean accuracy over fixed tasks, 95% interval.

Antoniou et al. (2019), section 5: accuracy is the mean over 600 test tasks,
with a confidence interval of 1.96 standard deviations over sqrt(tasks); the
final figure is the ensemble of the best validation checkpoints.
"""

import numpy as np

Z_95 = 1.96


def mean_and_interval(accuracies, z=Z_95):
    """Mean of per-task accuracies and the half-width of its confidence interval.

    Args:
      accuracies: per-task accuracies, shape (tasks,).
      z: the normal quantile of the interval; 1.96 for 95%.

    Returns:
      (mean, half_width) as Python floats.
    """
    accuracies = np.asarray(accuracies, dtype=np.float64)
    if accuracies.size == 0:
        raise ValueError("no tasks to evaluate")
    return float(accuracies.mean()), float(z * accuracies.std() / np.sqrt(accuracies.size))


def evaluate(meta_learner, dataset, num_steps, bn_mode, progress=None):
    """Adapts to every task of a finite dataset and scores its target set.

    Args:
      meta_learner: a `MetaLearner`.
      dataset: finite tf.data.Dataset of task batches (see episodes).
      num_steps: inner steps to take on each task.
      bn_mode: the batch-norm mode of the target pass, one of
        batch_norm_modes.BN_MODES.
      progress: optional `Progress`, advanced by the tasks of each batch.

    Returns:
      dict with `accuracies` (tasks, num_steps), `probabilities`
      (tasks, way*query, way) after the last step and `labels` (tasks, way*query).
    """
    accuracies, probabilities, labels = [], [], []
    for batch in dataset:
        result = meta_learner.evaluate_batch(batch, num_steps, bn_mode)
        accuracies.append(result["accuracies"].numpy())
        probabilities.append(result["probabilities"].numpy())
        labels.append(batch["target_labels"].numpy())
        if progress is not None:
            progress.update(len(labels[-1]))
    return {"accuracies": np.concatenate(accuracies),
            "probabilities": np.concatenate(probabilities),
            "labels": np.concatenate(labels)}


def ensemble_accuracies(probabilities, labels):
    """Per-task accuracy of the mean of several models' predicted probabilities.

    Args:
      probabilities: list of (tasks, way*query, way) arrays, one per model.
      labels: (tasks, way*query) int labels.

    Returns:
      (tasks,) accuracies.
    """
    predictions = np.mean(probabilities, axis=0).argmax(axis=-1)
    return (predictions == labels).mean(axis=-1)
