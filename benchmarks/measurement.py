"""How the benchmarks measure: one process per measurement, a median after warm-up.

A process of its own for each measurement: its peak resident memory is then
its own (Linux keeps a parent's peak across fork and exec), and a parent that
never imports TensorFlow or PyTorch cannot raise it.
"""

import json
import resource
import statistics
import subprocess
import sys
import time


def run_json_child(module, *flags):
    """Runs `python -m MODULE FLAGS` (a measurement); returns the JSON of the last line it prints.

    `module`: the calling benchmark's `__spec__.name`. The child starts in the
    parent's directory, from which `benchmarks` was imported.

    Raises:
      RuntimeError: the child failed; the end of its stderr is written out first.
    """
    command = [sys.executable, "-m", module, *flags]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        sys.stderr.write(result.stderr[-4000:])
        raise RuntimeError(f"{' '.join(command[1:])}: the measurement failed "
                           f"(exit status {result.returncode})")
    return json.loads(result.stdout.strip().splitlines()[-1])


def time_step(step, iterations):
    """Runs `step` (a callable that waits for its result) 2 + `iterations` times.

    Returns:
      (seconds of the first call, which traces or builds what it needs;
       median seconds of the `iterations` calls after two warm-up ones).
    """
    started = time.monotonic()
    step()
    first_call = time.monotonic() - started
    step()
    times = []
    for _ in range(iterations):
        started = time.monotonic()
        step()
        times.append(time.monotonic() - started)
    return first_call, statistics.median(times)


def peak_gb():
    """This process's peak resident memory so far, in GB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
