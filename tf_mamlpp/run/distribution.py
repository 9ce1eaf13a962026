"""Several GPUs or hosts with tf.distribute.

The tasks of a meta-batch are split across replicas: each replica adapts to
its share of the tasks locally (the inner loop never communicates), and only
the outer gradients are all-reduced. `--batch_size` is the global number of
tasks per meta-iteration; each replica takes batch_size / replicas of them.

    --strategy=default       one device (the first GPU, or the CPU)
    --strategy=mirrored      every GPU of this host (MirroredStrategy)
    --strategy=multi_worker  several hosts, configured by the TF_CONFIG
                             environment variable (MultiWorkerMirroredStrategy)
"""

import os

import tensorflow as tf

from tf_mamlpp.run.cluster_role import chief_by_tf_config

STRATEGIES = ("default", "mirrored", "multi_worker")


def make_strategy(name):
    """The tf.distribute strategy called `name`; create it before any other TensorFlow op.

    Raises:
      ValueError: an unknown name, or multi_worker without TF_CONFIG, naming the flag.
    """
    if name == "default":
        return tf.distribute.get_strategy()
    if name == "mirrored":
        return tf.distribute.MirroredStrategy()
    if name == "multi_worker":
        if "TF_CONFIG" not in os.environ:
            raise ValueError("--strategy=multi_worker needs the TF_CONFIG environment variable "
                             "(cluster and task of this worker)")
        return tf.distribute.MultiWorkerMirroredStrategy()
    raise ValueError(f"--strategy={name!r} is unknown; choose one of {', '.join(STRATEGIES)}")


def is_chief(strategy):
    """Whether this process writes checkpoints, logs and results (the chief worker)."""
    return (not isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy)
            or chief_by_tf_config())


def check_batch_size(batch_size, strategy):
    """Raises ValueError unless the global batch splits evenly over the replicas."""
    replicas = strategy.num_replicas_in_sync
    if batch_size % replicas:
        raise ValueError(f"--batch_size={batch_size} tasks do not split evenly over "
                         f"{replicas} replicas")
