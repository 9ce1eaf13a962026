"""TensorFlow's start without the notes its native libraries print.

While TensorFlow 2.21 loads, and again at its first device query, its C++
libraries write a block of lines to standard error before absl logging is
set up, so TF_CPP_MIN_LOG_LEVEL does not reach them: the CUDA stubs' "could
not find cuda drivers", cuInit's error on a machine without a GPU, and the
note on CPU instructions the build does not use. A command's output should
start with its own lines and a bad flag should end in one line, so those two
moments run with the standard-error descriptor sent to a temporary file, and
only lines that are not among these notes are written back.
"""

import contextlib
import os
import re
import sys
import tempfile

START_UP_NOTES = re.compile(
    r"All log messages before absl::InitializeLog|cudart_stub\.cc|cuda_platform\.cc|"
    r"cuda_executor\.cc|cuda_diagnostics\.cc|cpu_feature_guard\.cc|"
    r"To enable the following instructions|oneDNN custom operations are on|"
    r"TF_ENABLE_ONEDNN_OPTS")


@contextlib.contextmanager
def native_start_up_notes_hidden():
    """Runs the block with TensorFlow's start-up notes on standard error left out."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            for line in captured.read().decode(errors="replace").splitlines(keepends=True):
                if not START_UP_NOTES.search(line):
                    sys.stderr.write(line)
            sys.stderr.flush()


def start_tensorflow(show_notes=False):
    """Imports TensorFlow and finds its devices, quietly unless `show_notes` (--verbosity=1).

    TensorFlow's own Python logger is set to warnings: at INFO it reports
    each checkpoint's sharding time among the project's lines.

    Returns:
      (tensorflow module, list of GPU devices).
    """
    with contextlib.nullcontext() if show_notes else native_start_up_notes_hidden():
        import tensorflow as tf
        gpus = tf.config.list_physical_devices("GPU")
    tf.get_logger().setLevel("WARNING")
    return tf, gpus
