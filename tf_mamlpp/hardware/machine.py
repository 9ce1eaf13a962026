"""The machine a measurement is from, as figures and caches name it."""

import os
import pathlib

# The CPU features that decide which kernels oneDNN can use (16-bit arithmetic, matrix units).
CPU_FEATURES = ("avx2", "avx512f", "avx512_bf16", "avx512_fp16", "amx_bf16", "amx_tile")


def cpu_description(cpuinfo=pathlib.Path("/proc/cpuinfo")):
    """The CPU as figures from it should be labelled: model, cores usable, relevant flags."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        text = ""
    fields = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
    fields = {key.strip(): value.strip() for key, value in fields.items()}
    flags = set(fields.get("flags", "").split())
    present = [flag for flag in CPU_FEATURES if flag in flags] or ["none of " + "/".join(
        CPU_FEATURES)]
    return (f"{fields.get('model name', 'unknown CPU')}, {len(os.sched_getaffinity(0))} cores, "
            f"{' '.join(present)}")
