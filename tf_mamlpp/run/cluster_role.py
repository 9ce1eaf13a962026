"""Whether this process is its cluster's chief, read from TF_CONFIG alone.

Only the chief of a --strategy=multi_worker cluster writes the run (its
checkpoints, event files, results and export), so it alone holds the run
directory's lock (run_lock.py). main.py takes that lock before TensorFlow
loads, so the answer comes from TF_CONFIG, the variable that
MultiWorkerMirroredStrategy itself reads, and not from the strategy object.
"""

import json
import os


def chief_by_tf_config(environ=None):
    """Whether TF_CONFIG makes this process the chief: its "chief" task, or else worker 0.

    A process without TF_CONFIG is a cluster of one, and its own chief.
    """
    environ = os.environ if environ is None else environ
    if "TF_CONFIG" not in environ:
        return True
    tf_config = json.loads(environ["TF_CONFIG"])
    task = tf_config.get("task", {})
    if "chief" in tf_config.get("cluster", {}):
        return task.get("type") == "chief"
    return task.get("type") == "worker" and task.get("index", 0) == 0
