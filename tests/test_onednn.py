"""Specification of tf_mamlpp.hardware.onednn: main.py asks for oneDNN's kernels, the library
does not behind the user's back, and a user's setting wins."""

import concurrent.futures
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


# name: (prelude, TF_ENABLE_ONEDNN_OPTS or None for unset)
CASES = {"main": ("import main", None),
         "main with the user's setting": ("import main", "0"),
         "library": ("import tf_mamlpp; tf_mamlpp.MetaLearner", None)}


@pytest.fixture(scope="module")
def states():
    """CASES name -> `onednn_state` of the case, the processes side by side."""
    with concurrent.futures.ThreadPoolExecutor(max_workers=len(CASES)) as pool:
        futures = {name: pool.submit(onednn_state, *case) for name, case in CASES.items()}
        return {name: future.result() for name, future in futures.items()}


def test_main_turns_onednn_on_before_tensorflow_loads_on_any_x86_cpu(states):
    assert states["main"] == ["1", "True"]


def test_a_users_setting_wins(states):
    assert states["main with the user's setting"] == ["0", "False"]


def test_importing_the_library_changes_no_environment_variable(states):
    assert states["library"][0] == "None"
