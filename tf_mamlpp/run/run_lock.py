"""One owner per run directory: the lock that a second command on a live run is refused by.

Two processes training one run directory write two trajectories into its
checkpoints, history and TensorBoard curves, and a test or an export beside a
live run reads files while they are replaced. So a command that trains, tests
or exports a run first owns its directory: `lock.json` in it names the
process, its host, when it started and its command, and the command is
removed when it ends. A second command reads it and ends with one line
saying so. The file appears whole (it is written beside under a name of its
own, then hard-linked into place, which fails where one exists), so whoever
reads it reads a complete owner.

A process killed outright (SIGKILL, a power cut) leaves its lock behind. The
next command on the same host takes it over, with a warning, once the process
it names no longer runs, or runs under the same id as another program started
later (ids are reused). A lock naming another host is never taken over: this
host cannot see that host's processes (a run directory on shared storage).

Taking the lock and taking over a stale one happen under a `flock` of the
directory, so two commands that race for one directory get one owner. This
module loads no TensorFlow, so that main.py can refuse a command in a second,
before TensorFlow loads; it also names a run's directory, for the same reason.
"""

import atexit
import contextlib
import datetime
import fcntl
import json
import os
import pathlib
import re
import socket
import sys
import time

from absl import logging

LOCK = "lock.json"
# Drafts of the lock, hard-linked to LOCK: ".lock.json.<host>.<pid>".
_DRAFT_PREFIX = f".{LOCK}."


class RunLockError(ValueError):
    """Another live process owns the run directory, or its lock cannot be read or written."""


def experiment_name(config):
    """The default name of a run's directory: dataset, way, shot and seed.

    A `tfds:` name's colon and slashes become underscores: one folder, named
    as a TensorBoard --logdir_spec (NAME:PATH) can take it.
    """
    dataset = re.sub(r"[^\w.-]", "_", config.dataset)
    return f"{dataset}_{config.way}way_{config.shot}shot_seed{config.seed}"


def process_start(pid):
    """When process `pid` started, in clock ticks after boot (Linux's /proc), else None.

    A process id names one process at a time only: with the start time, a
    lock's owner is recognised even after its id is given to another program.
    """
    try:
        with open(f"/proc/{pid}/stat") as stat:
            # The command name (field 2) is in parentheses and may hold spaces.
            return int(stat.read().rsplit(")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None


def _this_process():
    return {"pid": os.getpid(), "host": socket.gethostname(),
            "process_start": process_start(os.getpid())}


def _runs(owner):
    """Whether the owner a lock names still runs; only asked of a lock of this host."""
    try:
        os.kill(owner["pid"], 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # it runs, as another user
    started = process_start(owner["pid"])
    return started is None or owner.get("process_start") in (None, started)


def read_owner(run_path):
    """The owner `run_path`'s lock names, a dict; None where there is no lock."""
    try:
        return json.loads((pathlib.Path(run_path) / LOCK).read_text())
    except (FileNotFoundError, NotADirectoryError):  # no run there (yet)
        return None
    except (OSError, ValueError) as error:
        raise RunLockError(f"{run_path}: its lock {LOCK} cannot be read ({error}); if no "
                            f"process uses the run, remove {LOCK}") from error


def _since(owner):
    return datetime.datetime.fromtimestamp(owner["started"]).strftime("%Y-%m-%d %H:%M:%S")


@contextlib.contextmanager
def _directory_mutex(run_path):
    """Holds an exclusive `flock` on the directory while the block runs.

    File systems without flock (some network ones) run the block without it:
    the hard link still gives one owner; only two takeovers of one stale lock
    could then race.
    """
    descriptor = os.open(run_path, os.O_RDONLY)
    try:
        with contextlib.suppress(OSError):
            fcntl.flock(descriptor, fcntl.LOCK_EX)
        yield
    finally:
        os.close(descriptor)  # releases the flock


class RunLock:
    """The lock of the run directory one command works on.

    Args:
      command: the command to record in the lock; default: this process's.

    `check(path)` refuses a run that a live process owns, changing nothing;
    `acquire(path)` takes it; `release()` (at the latest at exit) gives it
    back. Used as a context manager, it releases on leaving.
    """

    def __init__(self, command=None):
        self.command = " ".join(command or [os.path.basename(sys.executable), *sys.argv])
        self.held = None

    def check(self, run_path):
        """Raises RunLockError if a live process, or one of another host, owns `run_path`."""
        owner = read_owner(run_path)
        if owner is not None and not self._is_mine(owner):
            self._refuse_unless_stale(run_path, owner)

    def acquire(self, run_path):
        """Takes the lock of the existing directory `run_path`, taking over a stale one.

        Raises:
          RunLockError: a live process, or one of another host, owns it, or
            the lock cannot be written, in one line that says what to do.
        """
        run_path = pathlib.Path(run_path)
        if self.held == run_path:
            return
        me = _this_process()
        owner = {**me, "started": time.time(), "command": self.command}
        draft = run_path / f"{_DRAFT_PREFIX}{me['host']}.{me['pid']}"
        try:
            with _directory_mutex(run_path):
                self._remove_dead_drafts(run_path, me["host"])
                previous = read_owner(run_path)
                # This process may hold it already: a library user reopening its run.
                if previous is None or not self._is_mine(previous):
                    if previous is not None:
                        self._take_over(run_path, previous)
                    draft.write_text(json.dumps(owner, indent=2))
                    try:
                        os.link(draft, run_path / LOCK)
                    finally:
                        draft.unlink()
        except OSError as error:
            raise RunLockError(f"{run_path}: cannot write its lock {LOCK} "
                                f"({error.strerror or error})") from error
        self.held = run_path
        atexit.register(self.release)

    def release(self):
        """Removes the lock this command holds, if it still names this process."""
        run_path, self.held = self.held, None
        if run_path is None:
            return
        with contextlib.suppress(OSError, RunLockError):
            if self._is_mine(read_owner(run_path) or {}):
                (run_path / LOCK).unlink()

    def __enter__(self):
        return self

    def __exit__(self, *exception):
        self.release()

    @staticmethod
    def _is_mine(owner):
        return all(owner.get(key) == value for key, value in _this_process().items())

    @classmethod
    def _take_over(cls, run_path, owner):
        """Removes the lock of `owner`, a process of this host that has ended, with a warning."""
        cls._refuse_unless_stale(run_path, owner)
        logging.warning("%s: taking over the lock of process %d on %s (since %s), which no "
                        "longer runs", run_path, owner["pid"], owner["host"], _since(owner))
        (run_path / LOCK).unlink()

    @staticmethod
    def _refuse_unless_stale(run_path, owner):
        """Raises RunLockError unless `owner` is a process of this host that has ended."""
        this_host = owner["host"] == socket.gethostname()
        if this_host and not _runs(owner):
            return
        where = f"process {owner['pid']} on {owner['host']} since {_since(owner)}"
        remedy = "wait for it to end, or pass --fresh to train a new run beside it"
        if not this_host:
            remedy += (f"; if no process on {owner['host']} uses the run any more, remove "
                       f"{pathlib.Path(run_path) / LOCK}")
        raise RunLockError(f"{run_path} is in use by {where} ({owner.get('command', '?')}); "
                            f"{remedy}")

    @staticmethod
    def _remove_dead_drafts(run_path, host):
        """Removes the drafts that processes of this host killed while locking left behind.

        Under the directory's mutex every draft is linked and removed at once,
        so one still there belongs to a process that died in between.
        """
        for draft in run_path.glob(f"{_DRAFT_PREFIX}{host}.*"):
            pid = draft.name.rsplit(".", 1)[1]
            if pid.isdigit() and not _runs({"pid": int(pid)}):
                draft.unlink(missing_ok=True)
