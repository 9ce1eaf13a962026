"""oneDNN's CPU kernels, which programs of this project turn on before TensorFlow loads.

TensorFlow enables them by itself only on CPUs with AVX-512 VNNI or BF16 or
AMX; on an AVX2 CPU they made the meta-step up to 1.5x faster (README,
"Speed on one device"). The switch is the environment variable
TF_ENABLE_ONEDNN_OPTS, read once, when TensorFlow loads: main.py, the
benchmarks and the tests call `prefer_onednn` before that; a library user
sets the variable (or calls this) before importing TensorFlow.
"""

import os

VARIABLE = "TF_ENABLE_ONEDNN_OPTS"


def prefer_onednn():
    """Asks for oneDNN's kernels unless the user has chosen (TF_ENABLE_ONEDNN_OPTS=0 keeps them off).

    Has no effect once TensorFlow is loaded.
    """
    os.environ.setdefault(VARIABLE, "1")
