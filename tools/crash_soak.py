"""Crash consistency, shown: a run killed at random moments of every phase ends as if never killed.

    python -m tools.crash_soak --kills=50 --seed=0

Runs a small `--deterministic` run of main.py to its end (the reference),
then runs the same command again in a new directory and kills it with
SIGKILL at a random moment, runs it again after each kill (a resume), and so
on; a process that reaches the end completes that directory, which is then
compared with the reference, and the next kill goes to a new directory.
After the last kill, the same command runs to the end. Every directory must
end as the reference did (`end_state`):

- config.json, best.json and results.json, equal;
- history.json and unvalidated_epoch.json, equal but for the seconds per
  iteration, a timing that differs from any run to the next;
- every tensor of the kept checkpoints (the latest two, and the best ones),
  the network's and the optimizer's, equal to the bit, and the latest list;
- the export's outputs on fixed inputs (`adapt_and_predict`'s logits and
  `embed`'s features, loaded with tf.saved_model.load), equal to the bit;
- the set of files and folders, with no lock left behind. TensorBoard's
  event files are left out of it: each process writes one of its own, named
  by its start time and process id, so a killed run has more of them.

Where it kills: a moment is drawn for each process, from a seeded generator,
as a phase, one of its calls and a point inside it: a uniform fraction of
that call's duration in the reference. The phases are the start-up
(interpreter, TensorFlow, lock, restore, until the first meta-iteration),
the meta-iterations (`MetaLearner.meta_update`), the writes of an epoch's
checkpoint (`RunDirectory.save_trained_epoch`), validation
(`Scoring.validate`), the writes of the best checkpoints and the history
(`RunDirectory.save_epoch`), the test of the best checkpoints
(`Scoring.test`) and the export (`saved_model.export`). A checkpoint's
write lasts milliseconds, so a moment is aimed at a call rather than at the
whole run: killed processes run main.py through this module (`child`),
which counts those calls and kills its own process from a timer thread
(`os.kill(getpid(), SIGKILL)`, as `kill -9` would), recording in which
phase the kill landed. The resumes that complete a directory are plain
`python main.py` with the same flags.
"""

import argparse
import atexit
import collections
import contextlib
import functools
import hashlib
import importlib.abc
import importlib.util
import json
import os
import pathlib
import random
import runpy
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
MAIN = REPO / "main.py"
# Three epochs of three first-order meta-iterations, 3-way 1-shot Omniglot, an
# 8-filter network, two best checkpoints kept: every phase in some 30 s, and
# both kinds of pruning (latest checkpoints, best checkpoints) happen.
FLAGS = ["--dataset=omniglot", "--way=3", "--shot=1", "--filters=8", "--inner_steps=1",
         "--batch_size=2", "--epochs=3", "--iters_per_epoch=3", "--val_tasks=8",
         "--test_tasks=8", "--second_order=false", "--ensemble_top_k=2", "--deterministic",
         "--experiment=run"]
# Phase -> (module, attribute) of the calls that make it up; the start-up is
# what comes before the first of them.
START_UP = "start-up"
PHASES = {
    "meta-iteration": [("tf_mamlpp.core.meta_learner", "MetaLearner.meta_update")],
    "checkpoint": [("tf_mamlpp.run.run_directory", "RunDirectory.save_trained_epoch")],
    "validation": [("tf_mamlpp.run.scoring", "Scoring.validate")],
    "best checkpoints": [("tf_mamlpp.run.run_directory", "RunDirectory.save_epoch")],
    "test": [("tf_mamlpp.run.scoring", "Scoring.test")],
    "export": [("tf_mamlpp.serving.saved_model", "export")],
}
TIMEOUT = 600  # seconds for any one process, on a loaded 2-core machine


def command(logdir, extra=()):
    """The soak's main.py command on `logdir`."""
    return [sys.executable, str(MAIN), f"--logdir={logdir}", *FLAGS, *extra]


def child_command(logdir, record, kill=None):
    """The same command through `child`, which records its phases and kills itself per `kill`."""
    return [sys.executable, "-m", "tools.crash_soak", "child", f"--record={record}",
            f"--kill={json.dumps(kill)}", "--", *command(logdir)[2:]]


# The child: main.py with its phases timed and a kill timer.

class _Recorder:
    """Counts and times the phases of this process; kills it as `kill` says.

    Args:
      record: the JSON file written at the kill ({"landed": phase}) or at exit
        ({"timeline": [[phase, call, start, end], ...]}, seconds since start).
      kill: None, or {"phase", "call", "delay"}: SIGKILL `delay` seconds
        after the `call`-th call of `phase` starts (the start-up's: after
        this process starts).
    """

    def __init__(self, record, kill):
        self.record = pathlib.Path(record)
        self.kill = kill
        self.started = time.monotonic()
        self.calls = collections.Counter()
        self.active = []
        self.timeline = []
        atexit.register(self._write, {"timeline": self.timeline})
        if kill and kill["phase"] == START_UP:
            self._arm(kill["delay"])

    def _arm(self, delay):
        timer = threading.Timer(delay, self._kill_now)
        timer.daemon = True
        timer.start()

    def _kill_now(self):
        landed = (self.active[-1] if self.active
                  else "between phases" if self.timeline else START_UP)
        self._write({"landed": landed, "at": time.monotonic() - self.started})
        os.kill(os.getpid(), signal.SIGKILL)

    def _write(self, value):
        self.record.write_text(json.dumps(value))

    @contextlib.contextmanager
    def phase(self, name):
        self.calls[name] += 1
        call = self.calls[name]
        if self.kill and (self.kill["phase"], self.kill["call"]) == (name, call):
            self._arm(self.kill["delay"])
        start = time.monotonic() - self.started
        self.active.append(name)
        try:
            yield
        finally:
            self.active.pop()
            self.timeline.append([name, call, start, time.monotonic() - self.started])

    def wrap(self, name, function):
        @functools.wraps(function)
        def timed(*args, **kwargs):
            with self.phase(name):
                return function(*args, **kwargs)
        return timed


class _PatchOnImport(importlib.abc.MetaPathFinder):
    """Wraps the phases' functions as their modules are imported, as main.py imports them.

    Patching on import keeps main.py's order of imports (TensorFlow loads
    where main.py loads it), so the child runs exactly main.py's process.
    """

    def __init__(self, recorder):
        self.recorder = recorder
        self.targets = collections.defaultdict(list)
        for phase, functions in PHASES.items():
            for module, attribute in functions:
                self.targets[module].append((phase, attribute))

    def find_spec(self, name, path, target=None):
        targets = self.targets.pop(name, None)
        if targets is None:
            return None
        spec = importlib.util.find_spec(name)
        execute = spec.loader.exec_module

        def execute_and_patch(module):
            execute(module)
            for phase, attribute in targets:
                *owner_path, function = attribute.split(".")
                owner = functools.reduce(getattr, owner_path, module)
                setattr(owner, function, self.recorder.wrap(phase, getattr(owner, function)))

        spec.loader.exec_module = execute_and_patch
        return spec


def child(record, kill, main_flags):
    """Runs `python main.py MAIN_FLAGS` in this process, its phases recorded, killed per `kill`."""
    recorder = _Recorder(record, kill)
    sys.meta_path.insert(0, _PatchOnImport(recorder))
    sys.argv = [str(MAIN), *main_flags]
    runpy.run_path(str(MAIN), run_name="__main__")


# The soak.

class Process:
    """One finished process of the soak: its exit status, output and record."""

    def __init__(self, completed, record_path=None):
        self.returncode = completed.returncode
        self.stdout, self.stderr = completed.stdout, completed.stderr
        self.record = (json.loads(record_path.read_text())
                       if record_path and record_path.exists() else {})

    @property
    def killed(self):
        return self.returncode == -signal.SIGKILL

    def lock_takeovers(self):
        return [line for line in self.stderr.splitlines() if "taking over the lock" in line]


def run_process(arguments, record=None):
    completed = subprocess.run(arguments, cwd=REPO, capture_output=True, text=True,
                               timeout=TIMEOUT)
    return Process(completed, record)


# The uninterrupted run: its Process (its record holds its phases' timeline),
# its run directory and that directory's end state.
Reference = collections.namedtuple("Reference", "process run_dir state")


def run_reference(logdir):
    """The uninterrupted run in `logdir`, through `child` for its phases' timeline."""
    logdir = pathlib.Path(logdir)
    logdir.mkdir(parents=True, exist_ok=True)
    record = logdir / "record.json"
    process = run_process(child_command(logdir, record), record)
    if process.returncode != 0:
        raise RuntimeError(f"the reference run failed:\n{process.stderr[-3000:]}")
    return Reference(process, logdir / "run", end_state(logdir / "run"))


def draw_kill(rng, timeline):
    """A random moment of a random phase, as `_Recorder`'s `kill`, from a reference timeline."""
    phase = rng.choice([START_UP, *PHASES])
    if phase == START_UP:
        first = min(start for _, _, start, _ in timeline)
        return {"phase": phase, "call": 0, "delay": rng.random() * first}
    calls = [(call, end - start) for name, call, start, end in timeline if name == phase]
    call, duration = rng.choice(calls)
    return {"phase": phase, "call": call, "delay": rng.random() * duration}


class Report:
    """What a soak did: its kills, the directories it completed and how they differed."""

    def __init__(self):
        self.kills = []  # (planned phase, landed phase)
        self.directories = []  # (path, differences, event files)
        self.takeovers = 0

    @property
    def identical(self):
        return all(not differences for _, differences, _ in self.directories)

    def summary(self):
        landed = collections.Counter(landed for _, landed in self.kills)
        return (f"{len(self.kills)} kills survived, end state "
                f"{'identical' if self.identical else 'DIFFERENT'} in "
                f"{len(self.directories)} run directories (kills landed in: "
                + ", ".join(f"{phase} {count}" for phase, count in landed.most_common()) + ")")


def soak(workdir, kills, seed, reference, log=print):
    """Kills, resumes and compares until `kills` kills have landed; returns a Report.

    Args:
      workdir: a folder for the run directories.
      reference: `run_reference`'s Reference.
      log: called with a line per process.
    """
    timeline = reference.process.record["timeline"]
    rng = random.Random(seed)
    report = Report()
    directory = None
    while len(report.kills) < kills or directory is not None:
        if directory is None:
            directory = pathlib.Path(workdir) / f"run_{len(report.directories) + 1:03d}"
        last = len(report.kills) == kills
        kill = None if last else draw_kill(rng, timeline)
        record = directory / f"record_{len(report.kills) + 1:03d}.json"
        directory.mkdir(parents=True, exist_ok=True)
        process = run_process(command(directory) if last else
                              child_command(directory, record, kill), record)
        report.takeovers += len(process.lock_takeovers())
        if len(process.lock_takeovers()) > 1:
            raise RuntimeError(f"more than one takeover line:\n{process.stderr[-3000:]}")
        if process.killed:
            report.kills.append((kill["phase"], process.record["landed"]))
            log(f"kill {len(report.kills)}/{kills} in {directory.name}: aimed at "
                f"{kill['phase']} (call {kill['call']}, +{kill['delay']:.3f} s), landed in "
                f"{process.record['landed']}")
            continue
        if process.returncode != 0:
            what = f"the process to be killed at {kill}" if kill else "the last resume"
            raise RuntimeError(f"{what} in {directory} exited {process.returncode}:\n"
                               f"{process.stderr[-3000:]}")
        run_dir = directory / "run"
        differences = compare(end_state(run_dir), reference.state)
        events = len(list(run_dir.glob("events.out.tfevents.*")))
        report.directories.append((directory, differences, events))
        log(f"{directory.name} ran to its end: "
            f"{'identical' if not differences else 'DIFFERENT: ' + '; '.join(differences)} "
            f"({events} event files)")
        directory = None
    return report


# The end state of a run directory.

EVENT_FILES = "events.out.tfevents."


def _without_timings(value):
    """`value` without the keys that hold timings (seconds per iteration), at any depth."""
    if isinstance(value, dict):
        return {key: _without_timings(item) for key, item in value.items()
                if "seconds" not in key}
    if isinstance(value, list):
        return [_without_timings(item) for item in value]
    return value


def _read_json(path):
    return _without_timings(json.loads(path.read_text())) if path.exists() else None


def _checkpoint_digests(prefix):
    """Variable name -> digest of its bytes, for every tensor of the checkpoint at `prefix`."""
    import tensorflow as tf
    reader = tf.train.load_checkpoint(str(prefix))
    return {name: hashlib.sha256(reader.get_tensor(name).tobytes()).hexdigest()[:16]
            for name in sorted(reader.get_variable_to_shape_map())
            if name != "_CHECKPOINTABLE_OBJECT_GRAPH"}


def _export_outputs(export_dir):
    """The export's outputs on fixed random inputs, as lists of floats (bit-exact)."""
    import numpy as np
    import tensorflow as tf
    model = tf.saved_model.load(str(export_dir))
    way, shape = int(model.way[0].numpy()), tuple(model.image_shape[0].numpy())
    rng = np.random.default_rng(0)
    support = tf.constant(rng.random((way, *shape)), tf.float32)
    queries = tf.constant(rng.random((2 * way, *shape)), tf.float32)
    adapted = model.signatures["adapt_and_predict"](
        support_images=support, support_labels=tf.range(way, dtype=tf.int32),
        query_images=queries)
    features = model.signatures["embed"](images=queries)["features"]
    return {"logits": adapted["logits"].numpy().tolist(),
            "features": features.numpy().tolist()}


def end_state(run_dir):
    """What a run directory holds at its end, as compared by `compare` (see the docstring)."""
    import tensorflow as tf
    run_dir = pathlib.Path(run_dir)
    # Folders too (with a "/"): a temporary one left empty is debris as well.
    state = {"files": sorted(str(path.relative_to(run_dir)) + "/" * path.is_dir()
                             for path in run_dir.rglob("*")
                             if not path.name.startswith(EVENT_FILES))}
    for name in ("config.json", "history.json", "best.json", "results.json",
                 "unvalidated_epoch.json"):
        state[name] = _read_json(run_dir / name)
    latest = run_dir / "checkpoints" / "latest"
    listed = tf.train.get_checkpoint_state(str(latest))
    prefixes = [pathlib.Path(path) for path in (listed.all_model_checkpoint_paths
                                                if listed else [])]
    state["latest checkpoints"] = [prefix.name for prefix in prefixes]
    prefixes += [run_dir / entry[2] for entry in state["best.json"] or []]
    state["checkpoint tensors"] = {str(prefix.relative_to(run_dir)): _checkpoint_digests(prefix)
                                   for prefix in prefixes}
    export = run_dir / "export"
    state["export outputs"] = _export_outputs(export) if export.exists() else None
    return state


def compare(state, expected):
    """The differences of `state` from `expected`, one line each; [] where they agree."""
    differences = []
    for key in expected:
        if state.get(key) != expected[key]:
            if key == "files":
                extra = sorted(set(state[key]) - set(expected[key]))
                missing = sorted(set(expected[key]) - set(state[key]))
                differences.append(f"files: extra {extra}, missing {missing}")
            else:
                differences.append(f"{key} differs")
    return differences


def machine():
    """The CPU, as the README reports measurements."""
    from tf_mamlpp.hardware.machine import cpu_description
    return cpu_description()


def main(argv):
    if argv[:1] == ["child"]:
        internal = argparse.ArgumentParser(prog="crash_soak child",
                                           description="main.py, its phases timed, killed")
        internal.add_argument("--record", required=True)
        internal.add_argument("--kill", type=json.loads, default=None)
        internal.add_argument("main_flags", nargs="*")
        arguments = internal.parse_args(argv[1:])
        return child(arguments.record, arguments.kill, arguments.main_flags)
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--kills", type=int, default=50, help="kills to land (default 50)")
    parser.add_argument("--seed", type=int, default=0, help="of the kills' moments (default 0)")
    parser.add_argument("--workdir", help="keep the run directories there (default: a "
                        "temporary folder, removed at the end)")
    arguments = parser.parse_args(argv)
    workdir = arguments.workdir or tempfile.mkdtemp(prefix="crash_soak_")
    started = time.monotonic()
    try:
        print(f"reference: {' '.join(command(pathlib.Path(workdir) / 'reference'))}", flush=True)
        reference = run_reference(pathlib.Path(workdir) / "reference")
        report = soak(workdir, arguments.kills, arguments.seed, reference,
                      log=functools.partial(print, flush=True))
    finally:
        if not arguments.workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    minutes = (time.monotonic() - started) / 60
    print(f"{report.summary()}; {report.takeovers} stale locks taken over; {minutes:.0f} "
          f"minutes on {machine()}")
    return 0 if report.identical else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
