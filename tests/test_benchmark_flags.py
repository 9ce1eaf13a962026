"""The benchmark's bad flags: a one-line error naming the flag, before anything is measured."""

import pathlib
import subprocess
import sys

import pytest

SCRIPT = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "meta_iteration.py"


@pytest.mark.parametrize("flag, named", [
    ("--reference_dir=/nonexistent/HowToTrainYourMAMLPytorch", "--reference_dir="),
    ("--configs=20-way_1-shot,7-way_3-shot", "--configs: unknown configuration '7-way_3-shot'"),
])
def test_a_bad_flag_is_refused_in_one_line(flag, named):
    result = subprocess.run([sys.executable, str(SCRIPT), flag], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode != 0
    assert result.stdout == ""  # no table begun, no matmul measured
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and named in lines[0]
