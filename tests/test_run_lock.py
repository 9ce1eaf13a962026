"""Specification of tf_mamlpp.run.run_lock: one owner per run directory.

Owners other than this process are real processes: a `sleep` that lives
through the test, or one that has ended.
"""

import json
import logging
import os
import socket
import subprocess
import sys
import time

import pytest

from conftest import REPO, run_python
from tf_mamlpp.run import run_lock
from tf_mamlpp.run.run_lock import LOCK, RunLock, RunLockError, process_start


@pytest.fixture
def live_process():
    """A process of this host that runs while the test does."""
    process = subprocess.Popen(["sleep", "60"])
    yield process
    process.kill()
    process.wait()


@pytest.fixture
def ended_process():
    """The id of a process of this host that has ended."""
    process = subprocess.Popen(["true"])
    process.wait()
    return process.pid


def write_lock(run_path, pid, host=None, process_start_ticks=None, command="python main.py"):
    """A lock as another command would have written it."""
    owner = {"pid": pid, "host": host or socket.gethostname(),
             "process_start": process_start_ticks, "started": 1_700_000_000.0,
             "command": command}
    (run_path / LOCK).write_text(json.dumps(owner))
    return owner


def files(folder):
    return sorted(path.name for path in folder.iterdir())


def test_acquire_writes_the_owner_and_release_removes_it(tmp_path):
    lock = RunLock(command=["python", "main.py", "--way=5"])
    lock.acquire(tmp_path)
    owner = json.loads((tmp_path / LOCK).read_text())
    assert owner["pid"] == os.getpid()
    assert owner["host"] == socket.gethostname()
    assert owner["process_start"] == process_start(os.getpid()) is not None
    assert owner["command"] == "python main.py --way=5"
    assert files(tmp_path) == [LOCK]  # no draft left beside it
    lock.release()
    assert files(tmp_path) == []
    lock.release()  # twice is harmless


def test_a_context_manager_releases_on_leaving(tmp_path):
    with RunLock() as lock:
        lock.acquire(tmp_path)
        assert (tmp_path / LOCK).exists()
    assert not (tmp_path / LOCK).exists()


def test_a_live_process_s_lock_refuses_in_one_line_naming_run_process_host_and_remedy(
        tmp_path, live_process):
    write_lock(tmp_path, live_process.pid, process_start_ticks=process_start(live_process.pid))
    before = (tmp_path / LOCK).read_bytes()
    for attempt in (RunLock().check, RunLock().acquire):
        with pytest.raises(RunLockError) as refused:
            attempt(tmp_path)
        message = str(refused.value)
        assert "\n" not in message
        assert str(tmp_path) in message
        assert f"process {live_process.pid} on {socket.gethostname()}" in message
        assert "since 2023-11-1" in message  # local time of 1_700_000_000
        assert "python main.py" in message
        assert "wait" in message and "--fresh" in message
    assert (tmp_path / LOCK).read_bytes() == before


def test_an_ended_process_s_lock_is_taken_over_with_one_warning(tmp_path, ended_process, caplog):
    write_lock(tmp_path, ended_process)
    RunLock().check(tmp_path)  # a stale lock refuses nothing
    lock = RunLock()
    with caplog.at_level(logging.WARNING):
        lock.acquire(tmp_path)
    warnings = [record.getMessage() for record in caplog.records]
    assert len(warnings) == 1
    assert f"taking over the lock of process {ended_process}" in warnings[0]
    assert json.loads((tmp_path / LOCK).read_text())["pid"] == os.getpid()
    lock.release()


def test_a_reused_process_id_is_no_owner(tmp_path, live_process):
    """The id runs, but as a process started at another time than the lock's."""
    write_lock(tmp_path, live_process.pid,
               process_start_ticks=process_start(live_process.pid) - 1)
    with RunLock() as lock:
        lock.acquire(tmp_path)
        assert json.loads((tmp_path / LOCK).read_text())["pid"] == os.getpid()


def test_another_host_s_lock_is_never_taken_over(tmp_path, ended_process):
    """Even naming a process id that no longer runs here: that host's processes are not ours."""
    write_lock(tmp_path, ended_process, host="elsewhere.example")
    before = (tmp_path / LOCK).read_bytes()
    with pytest.raises(RunLockError) as refused:
        RunLock().acquire(tmp_path)
    message = str(refused.value)
    assert f"process {ended_process} on elsewhere.example" in message
    assert f"remove {tmp_path / LOCK}" in message
    assert (tmp_path / LOCK).read_bytes() == before


def test_the_same_process_may_acquire_again(tmp_path):
    with RunLock() as first:
        first.acquire(tmp_path)
        first.acquire(tmp_path)
        RunLock().check(tmp_path)
        RunLock().acquire(tmp_path)  # in-process library use reopens a run
    assert not (tmp_path / LOCK).exists()


def test_release_leaves_a_lock_that_is_not_its_own(tmp_path, live_process):
    lock = RunLock()
    lock.acquire(tmp_path)
    write_lock(tmp_path, live_process.pid)
    lock.release()
    assert json.loads((tmp_path / LOCK).read_text())["pid"] == live_process.pid


def test_an_unreadable_lock_is_refused_saying_what_to_do(tmp_path):
    (tmp_path / LOCK).write_text("{not json")
    with pytest.raises(RunLockError, match=f"cannot be read.*remove {LOCK}"):
        RunLock().acquire(tmp_path)


def test_a_draft_left_by_a_killed_process_is_removed(tmp_path, ended_process, live_process):
    host = socket.gethostname()
    dead = tmp_path / f".{LOCK}.{host}.{ended_process}"
    alive = tmp_path / f".{LOCK}.{host}.{live_process.pid}"
    other_host = tmp_path / f".{LOCK}.elsewhere.{ended_process}"
    for draft in (dead, alive, other_host):
        draft.write_text("{}")
    with RunLock() as lock:
        lock.acquire(tmp_path)
    assert files(tmp_path) == sorted([alive.name, other_host.name])


def test_a_directory_that_cannot_be_written_is_one_line(tmp_path):
    missing = tmp_path / "missing"
    with pytest.raises(RunLockError, match=f"{missing}: cannot write its lock"):
        RunLock().acquire(missing)


@pytest.mark.slow
def test_of_commands_racing_for_one_stale_lock_exactly_one_wins(tmp_path, ended_process):
    """Processes of their own, all started before any takes the lock."""
    write_lock(tmp_path, ended_process)
    script = ("import sys, time; from tf_mamlpp.run.run_lock import RunLock, RunLockError\n"
              "time.sleep(float(sys.argv[1]) - time.time())\n"
              "try:\n    RunLock().acquire(sys.argv[2]); print('won'); time.sleep(1)\n"
              "except RunLockError:\n    print('refused')\n")
    start = str(time.time() + 3)
    racers = [subprocess.Popen([sys.executable, "-c", script, start, str(tmp_path)], cwd=REPO,
                               stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
              for _ in range(4)]
    outcomes = sorted(racer.communicate(timeout=60)[0].strip() for racer in racers)
    assert outcomes == ["refused"] * 3 + ["won"], outcomes


def test_experiment_name_needs_no_tensorflow():
    from types import SimpleNamespace
    config = SimpleNamespace(dataset="omniglot", way=5, shot=1, seed=4)
    assert run_lock.experiment_name(config) == "omniglot_5way_1shot_seed4"


@pytest.mark.slow
def test_the_module_loads_no_tensorflow():
    """main.py refuses a run in use before TensorFlow loads."""
    code = ("import sys, tf_mamlpp.run.run_lock, tf_mamlpp.run.cluster_role; "
            "print('tensorflow' in sys.modules)")
    completed = run_python("-c", code)
    assert completed.stdout.strip() == "False", completed.stderr



def test_no_directory_or_a_file_in_its_place_has_no_owner(tmp_path):
    """main.py's own errors name a missing run, or a --logdir that is a file."""
    (tmp_path / "file").write_text("not a folder")
    for path in (tmp_path / "missing", tmp_path / "file" / "runs" / "run"):
        assert run_lock.read_owner(path) is None
        RunLock().check(path)
