"""The batch-norm modes: how a target (query) batch is normalised.

Kept free of TensorFlow so that the command line can offer the choices
before TensorFlow loads; per_step_batch_norm.py implements them.
"""

BN_MODES = ("transductive", "support", "task_norm", "running")
TRANSDUCTIVE, SUPPORT, TASK_NORM, RUNNING = BN_MODES

# What a model trained in each mode normalises its queries with once
# deployed: a transductive model is served with the support statistics, so
# that no answer depends on the other queries.
SERVING_MODES = {TRANSDUCTIVE: SUPPORT, SUPPORT: SUPPORT, TASK_NORM: TASK_NORM, RUNNING: RUNNING}


def check_mode(mode):
    if mode not in BN_MODES:
        raise ValueError(f"unknown batch-norm mode {mode!r}; expected one of {', '.join(BN_MODES)}")
    return mode
