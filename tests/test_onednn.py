"""Specification of tf_mamlpp.hardware.onednn: main.py asks for oneDNN's kernels, the library
does not behind the user's back, and a user's setting wins."""

import os
import textwrap

import pytest

from conftest import run_python

pytestmark = pytest.mark.slow

ONEDNN_STATE = textwrap.dedent("""
    import os, sys
    sys.argv = ["main.py"]
    {prelude}
    from tf_mamlpp.run.quiet_start import start_tensorflow
    start_tensorflow()
    from tensorflow.python.util import _pywrap_util_port
    print(os.environ.get("TF_ENABLE_ONEDNN_OPTS"), _pywrap_util_port.IsMklEnabled())
""")


def onednn_state(prelude, setting=None):
    """(TF_ENABLE_ONEDNN_OPTS, whether oneDNN's kernels are on) in a fresh process after `prelude`."""
    env = {key: value for key, value in os.environ.items() if key != "TF_ENABLE_ONEDNN_OPTS"}
    if setting is not None:
        env["TF_ENABLE_ONEDNN_OPTS"] = setting
    completed = run_python("-c", ONEDNN_STATE.format(prelude=prelude), env=env)
    assert completed.returncode == 0, completed.stderr[-3000:]
    return completed.stdout.split()


def test_main_turns_onednn_on_before_tensorflow_loads_on_any_x86_cpu():
    assert onednn_state("import main") == ["1", "True"]


def test_a_users_setting_wins():
    assert onednn_state("import main", setting="0") == ["0", "False"]


def test_importing_the_library_changes_no_environment_variable():
    assert onednn_state("import tf_mamlpp; tf_mamlpp.MetaLearner")[0] == "None"
