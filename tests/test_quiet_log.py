"""Specification of tf_mamlpp.run.quiet_log: the libraries' notes left out, the project's kept.

The whole of a run's output is test_run_owner.py's, through main.py.
"""

import logging
import os

import pytest
from absl import logging as absl_logging

import tf_mamlpp
from tf_mamlpp.run import quiet_log
from tf_mamlpp.run.quiet_log import ProjectLinesOnly, hide_library_notes

PACKAGE = os.path.dirname(os.path.abspath(tf_mamlpp.__file__))
REPOSITORY = os.path.dirname(PACKAGE)
TENSORFLOW_FILE = os.path.join(os.path.dirname(logging.__file__), "site-packages", "tensorflow",
                               "python", "checkpoint", "functional_saver.py")


def record(pathname, level=logging.INFO):
    return logging.LogRecord("absl", level, pathname, 1, "a line", (), None)


@pytest.mark.parametrize("pathname, level, passes", [
    (TENSORFLOW_FILE, logging.INFO, False),
    (TENSORFLOW_FILE, logging.DEBUG, False),
    (TENSORFLOW_FILE, logging.WARNING, True),
    (TENSORFLOW_FILE, logging.ERROR, True),
    (os.path.join(PACKAGE, "run", "scoring.py"), logging.INFO, True),
    (os.path.join(REPOSITORY, "main.py"), logging.INFO, True),
    (os.path.join(REPOSITORY, "benchmarks", "start_up.py"), logging.INFO, True),
    (os.path.join(REPOSITORY, "tools", "crash_soak.py"), logging.INFO, True),
    # A library beside the project, or in a folder named like one of its own.
    (os.path.join(REPOSITORY + "_other", "main.py"), logging.INFO, False),
    (os.path.join(REPOSITORY, "venv", "tf_mamlpp", "x.py"), logging.INFO, False),
])
def test_the_filter_passes_the_project_s_lines_and_everyone_s_warnings(pathname, level, passes):
    assert ProjectLinesOnly().filter(record(pathname, level)) is passes


def filters():
    return [f for f in absl_logging.get_absl_handler().filters if isinstance(f, ProjectLinesOnly)]


@pytest.fixture
def restore_filters():
    yield
    for existing in filters():
        absl_logging.get_absl_handler().removeFilter(existing)


def test_default_verbosity_filters_once_and_verbosity_1_shows_everything(restore_filters):
    hide_library_notes(-1)  # absl's default
    hide_library_notes(0)
    assert len(filters()) == 1
    hide_library_notes(1)
    assert filters() == []


def test_the_real_libraries_log_from_outside_the_project():
    """TensorFlow's notes are logged through absl from TensorFlow's own files."""
    from tensorflow.python.checkpoint import functional_saver
    assert not os.path.abspath(functional_saver.__file__).startswith(quiet_log.PROJECT_FILES)


@pytest.mark.slow
def test_verbosity_1_shows_tensorflow_s_start_up_notes_too():
    """Whatever notes this machine's TensorFlow writes as it loads, --verbosity=1 alone shows."""
    from conftest import run_python
    script = ("import sys; from tf_mamlpp.run.quiet_start import start_tensorflow; "
              "start_tensorflow(show_notes=sys.argv[1] == 'show')")
    shown, hidden = (run_python("-c", script, choice) for choice in ("show", "hide"))
    assert shown.returncode == hidden.returncode == 0, shown.stderr + hidden.stderr
    assert hidden.stderr == ""
    if not shown.stderr:
        pytest.skip("this machine's TensorFlow writes no notes as it loads")
