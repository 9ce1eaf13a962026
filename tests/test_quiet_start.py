"""Specification of tf_mamlpp.run.quiet_start: TensorFlow starts without its native notes."""

import textwrap

import pytest

from conftest import run_python

pytestmark = pytest.mark.slow


def stderr_of(script):
    completed = run_python("-c", textwrap.dedent(script))
    assert completed.returncode == 0, completed.stderr[-3000:]
    return completed.stderr


def test_tensorflow_starts_without_a_line_on_standard_error():
    assert stderr_of("""
        import sys
        from tf_mamlpp.run.quiet_start import start_tensorflow
        tf, gpus = start_tensorflow()
        tf.zeros(1)
        print("first line of our own", file=sys.stderr)
    """) == "first line of our own\n"


def test_other_lines_written_meanwhile_are_kept_in_order():
    assert stderr_of("""
        import os
        from tf_mamlpp.run.quiet_start import native_start_up_notes_hidden
        with native_start_up_notes_hidden():
            os.write(2, b"before\\n")
            os.write(2, b"I0000 00:00:1.0 1 cudart_stub.cc:31] Could not find cuda drivers\\n")
            os.write(2, b"after\\n")
    """) == "before\nafter\n"
