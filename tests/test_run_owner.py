"""Specification of a run directory's life under main.py: one owner, kills survived, a quiet log.

Every run here is the crash soak's small `--deterministic` command
(tools/crash_soak.py), and must end as its uninterrupted run does, the
reference: the same JSON files, checkpoint tensors, export outputs and
files (`crash_soak.end_state`). Beside the reference run:

- the scene of issue 23: the same command started again while the first
  trains; the second is refused in one line, the first ends as the reference;
- a few kills (SIGKILL) at random moments of random phases, each followed by
  the same command, as `python -m tools.crash_soak` does fifty times;
- commands on a copy of the reference whose lock names a live process, one
  of another host, or one that has ended.

The processes run two at a time, beside one another; every wait is bounded.
"""

import concurrent.futures
import json
import os
import random
import re
import shutil
import socket
import subprocess
import time

import pytest

from conftest import TIMEOUT, MainProcess, run_main
from synthetic_images import write_class_folder
from tf_mamlpp.run.run_lock import LOCK, process_start
from tools import crash_soak

pytestmark = pytest.mark.slow

SOAK_KILLS = 2
SOAK_SEED = random.randrange(10**6)  # printed with any failure: the soak repeats its moments


def flags(logdir, *extra):
    return [*crash_soak.command(logdir)[2:], *extra]


def scene(logdir):
    """The same command twice, the second once the first has trained its first epoch."""
    first = MainProcess(flags(logdir), output=logdir / "first")
    first.wait_until(lambda: (logdir / "run" / "unvalidated_epoch.json").exists(),
                     "the first process trained an epoch")
    started = time.monotonic()
    second = run_main(*flags(logdir))
    seconds = time.monotonic() - started
    first_ran_meanwhile = first.popen.poll() is None
    first.wait()
    return {"first": first, "second": second, "second_seconds": seconds,
            "first_ran_meanwhile": first_ran_meanwhile, "run_dir": logdir / "run"}


@pytest.fixture(scope="module")
def pool():
    with concurrent.futures.ThreadPoolExecutor(max_workers=2) as executor:
        yield executor


def soak(reference, workdir):
    """A few kills, once the reference has run: (the Report or the soak's error, its lines)."""
    lines = []
    try:
        return crash_soak.soak(workdir, SOAK_KILLS, SOAK_SEED, reference.result(),
                               log=lines.append), lines
    except RuntimeError as error:
        return error, lines


@pytest.fixture(scope="module")
def started(pool, tmp_path_factory):
    """The reference and the scene, started with the module; the soak once the reference ends."""
    futures = {"reference": pool.submit(crash_soak.run_reference,
                                        tmp_path_factory.mktemp("reference")),
               "scene": pool.submit(scene, tmp_path_factory.mktemp("scene"))}
    futures["soak"] = pool.submit(soak, futures["reference"], tmp_path_factory.mktemp("soak"))
    return futures


def finished(started, name):
    return started[name].result(timeout=8 * TIMEOUT)


@pytest.fixture(scope="module")
def reference(started):
    """crash_soak.run_reference's Reference."""
    return finished(started, "reference")


@pytest.fixture(scope="module")
def the_scene(started):
    return finished(started, "scene")


# The scene.

def test_a_second_command_on_a_live_run_is_refused_at_once_in_one_line(the_scene):
    second, first = the_scene["second"], the_scene["first"]
    assert second.returncode == 2, second.stderr[-3000:]
    assert second.stdout == ""
    (line,) = second.stderr.splitlines()
    assert line.startswith(f"error: {the_scene['run_dir']} is in use by process "
                           f"{first.popen.pid} on {socket.gethostname()} since "), line
    assert "wait for it to end" in line and "--fresh" in line, line
    # Before TensorFlow loads: a second or two, while the first still trains.
    assert the_scene["first_ran_meanwhile"]
    assert the_scene["second_seconds"] < 30


def test_the_first_command_ends_as_a_single_run(the_scene, reference):
    first = the_scene["first"]
    assert first.popen.returncode == 0, first.stderr[-3000:]
    run_dir = the_scene["run_dir"]
    assert crash_soak.compare(crash_soak.end_state(run_dir), reference.state) == []
    assert len(list(run_dir.glob("events.out.tfevents.*"))) == 1
    assert not (run_dir / LOCK).exists()


# A line of the project's: absl's prefix naming one of its files, or one of the
# lines it writes without one (configuration, progress, test table, results).
PROJECT_FILES = {path.stem for path in (crash_soak.REPO / "tf_mamlpp").rglob("*.py")} | {"main"}
ABSL_PREFIX = r"^[IWEF]\d{4} [\d:.]+ +\d+ (\w+)\.py:\d+\] "
OWN_LINES = [
    r"^\{$", r'^  "\w+": .*$', r"^\}$",  # the configuration, logged as JSON
    r"^(epoch \d+/\d+|(val|test) tasks \(\w+ batch norm\)) \d+/\d+ .* s/(it|task) elapsed ",
    r"^epoch +\d+  val +[\d.]+%  test +[\d.]+% ± [\d.]+$", r"^ensemble of \d+: [\d.]+% ± [\d.]+$",
    r"^test accuracy [\d.]+% ± [\d.]+ over \d+ tasks, .*results\.json\)$",
    r"^the same in the export's \w+ batch norm: [\d.]+% ± [\d.]+$",
    r"^served: [\d.]+% ± [\d.]+, what the exported model \(epoch \d+, \w+ batch norm\) "
    r"scores asked one query at a time$",
]


def foreign_lines(output):
    """The lines of `output` that are not the project's own."""
    foreign = []
    for line in output.splitlines():
        prefixed = re.match(ABSL_PREFIX, line)
        if prefixed:
            if prefixed[1] not in PROJECT_FILES:
                foreign.append(line)
        elif not any(re.match(pattern, line) for pattern in OWN_LINES):
            foreign.append(line)
    return foreign


def test_a_short_run_prints_only_the_project_s_lines(the_scene):
    first = the_scene["first"]
    output = first.stdout + first.stderr
    assert foreign_lines(output) == []
    for what in ("configuration:", "epoch 3/3 3/3", "validation accuracy", "ensemble of 2",
                 "exported the epoch-", "results.json", "served: "):
        assert what in output, what


def test_the_check_of_foreign_lines_finds_the_libraries_notes():
    output = ("I1204 05:55:12.718361 140469184748416 functional_saver.py:440] Sharding "
              "callback duration: 47 microseconds\n"
              "I1204 05:55:14.240761 140469184748416 scoring.py:67] epoch 1: validation\n"
              "W0000 00:00:1.0 1 cpu_feature_guard.cc:227] This TensorFlow binary\n")
    assert len(foreign_lines(output)) == 2


# Kills at random moments.

@pytest.fixture(scope="module")
def soak_report(started):
    report, lines = finished(started, "soak")
    if isinstance(report, RuntimeError):
        pytest.fail(f"seed {SOAK_SEED}: {report}\n" + "\n".join(lines))
    return report, lines


def test_a_run_killed_at_random_moments_ends_as_if_never_killed(soak_report):
    report, lines = soak_report
    assert len(report.kills) == SOAK_KILLS
    assert report.directories and report.identical, f"seed {SOAK_SEED}:\n" + "\n".join(lines)


def test_each_kill_s_lock_is_taken_over_and_none_is_left(soak_report):
    """A kill after the lock was taken leaves it; the next command takes it over."""
    report, lines = soak_report
    assert 0 < report.takeovers <= SOAK_KILLS or all(
        landed == crash_soak.START_UP for _, landed in report.kills), "\n".join(lines)
    for directory, _, _ in report.directories:
        assert not (directory / "run" / LOCK).exists()


# Locks on a copy of the reference.

@pytest.fixture
def copy_of_reference(reference, tmp_path):
    """A logdir holding a copy of the reference's run directory."""
    shutil.copytree(reference.run_dir, tmp_path / "run")
    return tmp_path


def write_lock(run_dir, pid, host=None):
    owner = {"pid": pid, "host": host or socket.gethostname(),
             "process_start": process_start(pid), "started": time.time() - 60,
             "command": "python main.py --mode=test"}
    (run_dir / LOCK).write_text(json.dumps(owner))
    return (run_dir / LOCK).read_bytes()


def images(folder, classes, per_class):
    for label in range(classes):
        write_class_folder(folder / f"class{label}", label, per_class, size=28, channels=1)
    return folder


def test_a_live_lock_refuses_testing_and_exporting_but_not_adapting(copy_of_reference):
    run_dir = copy_of_reference / "run"
    lock = write_lock(run_dir, os.getpid())  # this test's process: alive
    for mode in (["--mode=test"], ["--mode=export", f"--export_dir={copy_of_reference / 'e'}"]):
        refused = run_main(*flags(copy_of_reference, *mode))
        assert refused.returncode == 2, refused.stderr[-3000:]
        (line,) = refused.stderr.splitlines()
        assert f"is in use by process {os.getpid()}" in line
    assert not (copy_of_reference / "e").exists()
    support = images(copy_of_reference / "support", 3, 1)
    query = images(copy_of_reference / "query", 1, 2) / "class0"
    adapted = run_main("--mode=adapt", f"--export_dir={run_dir / 'export'}",
                       f"--support_dir={support}", f"--query_dir={query}")
    assert adapted.returncode == 0, adapted.stderr[-3000:]
    assert len(adapted.stdout.splitlines()) == 2
    assert (run_dir / LOCK).read_bytes() == lock


def test_another_host_s_lock_is_not_taken_over(copy_of_reference):
    run_dir = copy_of_reference / "run"
    lock = write_lock(run_dir, 1, host="elsewhere.example")
    refused = run_main(*flags(copy_of_reference, "--mode=test"))
    assert refused.returncode == 2
    (line,) = refused.stderr.splitlines()
    assert "process 1 on elsewhere.example" in line and f"remove {run_dir / LOCK}" in line
    assert (run_dir / LOCK).read_bytes() == lock


def test_a_stale_lock_is_taken_over_with_one_warning_and_verbosity_1_shows_the_notes(
        copy_of_reference):
    """An export with --verbosity=1: TensorFlow's notes on what it writes are shown."""
    run_dir = copy_of_reference / "run"
    ended = subprocess.Popen(["true"])
    ended.wait()
    write_lock(run_dir, ended.pid)
    export_dir = copy_of_reference / "exported"
    completed = run_main(*flags(copy_of_reference, "--mode=export", f"--export_dir={export_dir}",
                                "--verbosity=1"))
    assert completed.returncode == 0, completed.stderr[-3000:]
    takeovers = [line for line in completed.stderr.splitlines() if "taking over the lock" in line]
    assert len(takeovers) == 1 and f"process {ended.pid}" in takeovers[0], completed.stderr
    assert takeovers[0].startswith("W")
    assert "signature_serialization.py" in completed.stderr
    assert "fingerprinting_utils.py" in completed.stderr
    assert not (run_dir / LOCK).exists()
    assert (export_dir / "saved_model.pb").exists()
