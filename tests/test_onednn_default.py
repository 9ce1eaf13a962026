"""Specification of the package's oneDNN default: on unless the user says otherwise."""

import os
import textwrap

import pytest

from conftest import run_python

pytestmark = pytest.mark.slow

ONEDNN_STATE = textwrap.dedent("""
    import os
    import tf_mamlpp
    from tf_mamlpp.run.quiet_start import start_tensorflow
    start_tensorflow()
    from tensorflow.python.util import _pywrap_util_port
    print(os.environ["TF_ENABLE_ONEDNN_OPTS"], _pywrap_util_port.IsMklEnabled())
""")


def onednn_state(setting):
    """(TF_ENABLE_ONEDNN_OPTS, whether TensorFlow's oneDNN kernels are on) in a fresh process."""
    env = {key: value for key, value in os.environ.items() if key != "TF_ENABLE_ONEDNN_OPTS"}
    if setting is not None:
        env["TF_ENABLE_ONEDNN_OPTS"] = setting
    completed = run_python("-c", ONEDNN_STATE, env=env)
    assert completed.returncode == 0, completed.stderr[-3000:]
    return completed.stdout.split()


def test_importing_the_package_first_turns_onednn_on_on_any_x86_cpu():
    assert onednn_state(None) == ["1", "True"]


def test_a_users_setting_wins():
    assert onednn_state("0") == ["0", "False"]
