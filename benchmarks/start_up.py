"""Where the time from the command to the end of the first meta-iteration goes.

    python -m benchmarks.start_up --way=20 --shot=5

Runs what `python main.py --dataset=omniglot --way=20 --shot=5` runs before
its first meta-update has finished, in a fresh process, phase by phase:
the interpreter and absl, TensorFlow's start, the package's modules, the
Omniglot cache, the trainer (splits, network, optimizer), the first
meta-batch from the episode pipeline, and the first meta-step (trace and
run). The second meta-step, timed alone, shows what of the first was tracing.
"""

import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time

from absl import app, flags

from tf_mamlpp.hardware.machine import cpu_description

REPO = pathlib.Path(__file__).resolve().parents[1]
FLAGS = flags.FLAGS
flags.DEFINE_integer("way", 20, "Classes per task. Default 20.")
flags.DEFINE_integer("shot", 5, "Support images per class. Default 5.")
flags.DEFINE_enum("mixed_precision", "auto", ["false", "true", "auto"],
                  "As main.py's --mixed_precision; auto and true add the precision probe. "
                  "Default auto, as main.py's.")
flags.DEFINE_float("child", None, "Internal: the parent's clock at the child's start.")
PRECISIONS = {"false": False, "true": True, "auto": "auto"}


def measure(started):
    """The phases in this process; returns [(phase, seconds)]."""
    phases, last = [], started

    def phase(name):
        nonlocal last
        now = time.time()
        phases.append((name, now - last))
        last = now

    phase("interpreter, absl")
    from tf_mamlpp.run.quiet_start import start_tensorflow
    tf, _ = start_tensorflow()
    phase("TensorFlow start")
    from tf_mamlpp.hardware import cpu_threads
    from tf_mamlpp.run import config, precision, run_directory, task_streams
    from tf_mamlpp.run.trainer import Trainer
    phase("tf_mamlpp modules")
    parallel_tasks = cpu_threads.default_parallel_tasks()
    cpu_threads.configure(parallel_tasks)
    resolved = config.resolve("omniglot", way=FLAGS.way, shot=FLAGS.shot,
                              mixed_precision=PRECISIONS[FLAGS.mixed_precision])
    task_streams.prepare(resolved)
    phase("Omniglot cache")
    with tempfile.TemporaryDirectory() as logdir:
        if resolved.mixed_precision is not False:
            os.environ["XDG_CACHE_HOME"] = logdir  # no cached probe
            resolved = precision.settled(resolved, parallel_tasks=parallel_tasks)
            phase(f"precision probe (--mixed_precision={FLAGS.mixed_precision}, uncached)")
        trainer = Trainer(resolved, run_directory.RunDirectory.open(logdir, "run", resolved))
        phase("trainer: splits, network, optimizer")
        tasks = iter(task_streams.training_tasks(resolved, trainer.splits["train"]))
        batch = next(tasks)
        phase("first meta-batch")
        first_epoch = trainer.meta_learner.phase_at(0)
        float(trainer.meta_learner.meta_update(batch, first_epoch)["loss"])
        phase("first meta-step (trace and run)")
        float(trainer.meta_learner.meta_update(next(tasks), first_epoch)["loss"])
        phase("second meta-step (run only)")
    return phases


def main(argv):
    del argv
    if FLAGS.child is not None:
        print(json.dumps(measure(FLAGS.child)))
        return
    command = [sys.executable, "-m", __spec__.name, f"--way={FLAGS.way}", f"--shot={FLAGS.shot}",
               f"--mixed_precision={FLAGS.mixed_precision}"]
    result = subprocess.run([*command, f"--child={time.time()}"], capture_output=True, text=True,
                            cwd=REPO)
    if result.returncode != 0:
        sys.exit(result.stderr[-3000:])
    phases = json.loads(result.stdout.strip().splitlines()[-1])
    print(f"{FLAGS.way}-way {FLAGS.shot}-shot Omniglot, first order (main.py's first epochs), "
          f"--mixed_precision={FLAGS.mixed_precision}; CPU: {cpu_description()}")
    print("| phase | seconds |\n| --- | --- |")
    for name, seconds in phases:
        print(f"| {name} | {seconds:.2f} |")
    to_first = sum(seconds for name, seconds in phases if not name.startswith("second"))
    print(f"| to the end of the first meta-iteration | {to_first:.2f} |")


if __name__ == "__main__":
    app.run(main)
