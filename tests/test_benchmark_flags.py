"""The benchmark's bad flags: a one-line error naming the flag, before anything is measured."""

import pytest

from conftest import run_python
from tf_mamlpp.hardware.machine import cpu_description


@pytest.mark.parametrize("flag, named", [
    ("--reference_dir=/nonexistent/HowToTrainYourMAMLPytorch", "--reference_dir="),
    ("--configs=20-way_1-shot,7-way_3-shot", "--configs: unknown configuration '7-way_3-shot'"),
    ("--bn_modes=support,metabn", "--bn_modes: unknown mode metabn"),
])
@pytest.mark.slow
def test_a_bad_flag_is_refused_in_one_line(flag, named):
    result = run_python("-m", "benchmarks.meta_iteration", flag, timeout=60)
    assert result.returncode != 0
    assert result.stdout == ""  # no table begun, no matmul measured
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and named in lines[0]


def test_figures_name_their_cpu(tmp_path):
    """Model, usable cores and the flags that decide oneDNN's kernels, as /proc/cpuinfo says."""
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nmodel name\t: Intel(R) Xeon(R) Platinum 8481C\n"
                       "flags\t\t: fpu avx2 avx512f avx512_bf16 avx512_fp16 avx512_vnni\n")
    description = cpu_description(cpuinfo)
    assert description.startswith("Intel(R) Xeon(R) Platinum 8481C, ")
    assert description.endswith(" cores, avx2 avx512f avx512_bf16 avx512_fp16")
