"""Specification of tf_mamlpp.run.cluster_role: the chief, who holds the lock, by TF_CONFIG."""

import json

import pytest

from tf_mamlpp.run.cluster_role import chief_by_tf_config

WORKERS = {"worker": ["host1:12345", "host2:12345"]}


def tf_config(cluster, task_type, index):
    return {"TF_CONFIG": json.dumps({"cluster": cluster,
                                     "task": {"type": task_type, "index": index}})}


@pytest.mark.parametrize("environ, chief", [
    ({}, True),  # a process alone
    (tf_config(WORKERS, "worker", 0), True),
    (tf_config(WORKERS, "worker", 1), False),
    (tf_config({"chief": ["host0:12345"], **WORKERS}, "chief", 0), True),
    (tf_config({"chief": ["host0:12345"], **WORKERS}, "worker", 0), False),
    (tf_config(WORKERS, "evaluator", 0), False),
])
def test_the_chief_is_the_chief_task_or_else_worker_0(environ, chief):
    assert chief_by_tf_config(environ) is chief

