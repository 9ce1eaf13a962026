"""Command line of tf_mamlpp: meta-train MAML++ and test it.

    python main.py --dataset=omniglot --way=20 --shot=5
    python main.py --flagfile=experiments/omniglot_5way_1shot.flags
    python main.py --mode=test --experiment=omniglot_5way_1shot_seed0
    python main.py --mode=export --experiment=omniglot_5way_1shot_seed0 --export_dir=DIR
    python main.py --mode=adapt --export_dir=DIR --support_dir=FOLDER --query_dir=FOLDER

Flags left unset take the paper's setting for the dataset (see
tf_mamlpp/run/config.py); the resolved configuration is logged and saved with the run.
"""

import functools
import os
import signal
import sys
import traceback

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app, flags, logging  # noqa: E402

from tf_mamlpp.config_error import ConfigError  # noqa: E402
from tf_mamlpp.hardware.onednn import prefer_onednn  # noqa: E402

prefer_onednn()  # before TensorFlow loads, which reads it once
from tf_mamlpp.run import config_flags  # noqa: E402

FLAGS = flags.FLAGS

flags.DEFINE_enum("mode", "train", ["train", "test", "export", "adapt"],
                  "train: meta-train (resuming the run if it exists), then test and export. "
                  "test: test the run's best checkpoints and their ensemble. "
                  "export: write the run's best checkpoint as a SavedModel to --export_dir. "
                  "adapt: adapt the SavedModel in --export_dir to --support_dir and classify "
                  "--query_dir. Default train.")
flags.DEFINE_string("dataset", "omniglot", "Dataset name: omniglot, mini_imagenet, folder "
                    "(any --data_dir of class folders), the few-shot benchmarks cifar_fs, fc100 "
                    "and cub, or tfds:NAME (any TensorFlow Datasets image set), the last four "
                    "read from --tfds_data_dir. Default omniglot.")
config_flags.define_config_flags()
flags.DEFINE_string("logdir", "runs", "Parent folder of the runs. Default runs.")
flags.DEFINE_string("experiment", None, "Run directory name under --logdir. Default: "
                    "<dataset>_<way>way_<shot>shot_seed<seed>.")
flags.DEFINE_bool("fresh", False, "Start a new run in a new directory even if one exists "
                  "(the old one is kept). Default false: continue the existing run.")
flags.DEFINE_string("export_dir", None, "SavedModel folder for --mode=export (must be new or "
                    "empty) and --mode=adapt. Default: none.")
flags.DEFINE_string("support_dir", None, "--mode=adapt: folder with one sub-folder of images "
                    "per class. Default: none.")
flags.DEFINE_string("query_dir", None, "--mode=adapt: folder of images to classify. "
                    "Default: none.")
flags.DEFINE_enum("strategy", "default", ["default", "mirrored", "multi_worker"],
                  "tf.distribute strategy: default (one device), mirrored (every GPU of this "
                  "host) or multi_worker (hosts listed in TF_CONFIG); --batch_size is split "
                  "over the replicas. Default default.")
flags.DEFINE_bool("run_eagerly", False, "Run the steps eagerly, for debugging. Default false.")
flags.DEFINE_integer("parallel_tasks", None, "Tasks of a meta-batch adapted at once, with "
                     "the cores shared out among them (see tf_mamlpp/hardware/cpu_threads.py). Default: "
                     "the number of cores on a CPU, 1 on a GPU.")


@functools.cache
def resolved_config():
    """The flags' configuration; to train, checked against itself and the data's file index."""
    from tf_mamlpp.run import config, preflight
    resolved = config.resolve(FLAGS.dataset, **config_flags.config_values())
    unprobed = config.why_not_probed(resolved, FLAGS.strategy == "multi_worker")
    if unprobed and FLAGS["mixed_precision"].present and resolved.mixed_precision == config.AUTO:
        raise ConfigError(f"mixed_precision=auto with {unprobed}; pass "
                          "mixed_precision=true or false", "mixed_precision")
    return preflight.checked(resolved) if FLAGS.mode == "train" else resolved


# The folders each mode cannot run without.
NEEDED_FOLDERS = {"adapt": ("export_dir", "support_dir", "query_dir"), "export": ("export_dir",)}


def check_needed_folders():
    """Refuses, before TensorFlow loads, a --mode without the folders it needs."""
    for name in NEEDED_FOLDERS.get(FLAGS.mode, ()):
        if not FLAGS[name].value:
            raise ValueError(f"--mode={FLAGS.mode} needs --{name}")


def adapt():
    from tf_mamlpp.serving.folder_task import classify_folders
    for path, class_name, probability in classify_folders(
            FLAGS.export_dir, FLAGS.support_dir, FLAGS.query_dir):
        print(f"{path.name}\t{class_name}\t{probability:.3f}")


def run_name():
    from tf_mamlpp.run.run_lock import experiment_name
    return FLAGS.experiment or experiment_name(resolved_config())


def run_owner():
    """The lock this command holds on its run directory (run_lock.py), or None.

    Adapting reads an export and changes no run; under --strategy=multi_worker
    only the chief writes the run, so only the chief holds it.
    """
    from tf_mamlpp.run import cluster_role, run_lock
    if FLAGS.mode == "adapt" or (FLAGS.strategy == "multi_worker"
                                 and not cluster_role.chief_by_tf_config()):
        return None
    return run_lock.RunLock()


def open_run(parallel_tasks, owner):
    """The run directory and configuration this command works on, owned by `owner`."""
    from tf_mamlpp.run import precision, run_directory
    config = resolved_config()
    name = run_name()
    if FLAGS.mode == "train":
        previous = None if FLAGS.fresh else run_directory.saved_config(
            os.path.join(FLAGS.logdir, name))
        config = precision.settled(config, previous, parallel_tasks,
                                  multi_worker=FLAGS.strategy == "multi_worker")
        run_dir = run_directory.RunDirectory.open(FLAGS.logdir, name, config, fresh=FLAGS.fresh,
                                                  owner=owner)
        return run_dir, config
    # Testing and exporting use the configuration the run was trained with.
    run_dir = run_directory.RunDirectory.existing(FLAGS.logdir, name, owner=owner)
    return run_dir, run_dir.config


def train(trainer):
    """Trains; SIGINT/SIGTERM stop it after the current iteration with a checkpoint."""
    from tf_mamlpp.run.trainer import NonFiniteLossError, RunComplete, TrainingInterrupted
    for signal_number in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signal_number, lambda *_: trainer.request_stop())
    try:
        return trainer.train()
    except TrainingInterrupted as stop:
        print(f"{stop}. Run the same command again to resume.")
        return None
    except RunComplete as complete:
        print(complete)
        return None
    except NonFiniteLossError as error:
        fail(error)


def run(owner):
    # Bad flags or data fail here, in a second, before TensorFlow loads.
    check_needed_folders()
    if FLAGS.mode == "train":
        resolved_config()
    if owner is not None and not (FLAGS.mode == "train" and FLAGS.fresh):
        owner.check(os.path.join(FLAGS.logdir, run_name()))  # a run in use, likewise
    from tf_mamlpp.run.quiet_start import start_tensorflow
    tf, gpus = start_tensorflow(show_notes=FLAGS.verbosity >= 1)
    from tf_mamlpp.hardware import cpu_threads
    from tf_mamlpp.run import task_streams
    from tf_mamlpp.run.builders import backbone_model
    from tf_mamlpp.run.distribution import make_strategy
    from tf_mamlpp.run.trainer import Trainer

    if FLAGS.mode == "adapt":
        return adapt()
    parallel_tasks = (cpu_threads.default_parallel_tasks() if FLAGS.parallel_tasks is None
                      else FLAGS.parallel_tasks)
    cpu_threads.configure(parallel_tasks)  # before TensorFlow runs its first op
    strategy = make_strategy(FLAGS.strategy)
    tf.config.run_functions_eagerly(FLAGS.run_eagerly)
    if FLAGS.mode == "train":
        # A bad backbone factory or a corrupt file fails here, before anything is written.
        if resolved_config().backbone is not None:
            backbone_model(resolved_config())
        task_streams.prepare(resolved_config())  # decodes the data
    run_dir, config = open_run(parallel_tasks, owner)
    if not gpus:
        logging.info("No GPU found: running on the CPU.")
    logging.info("Run directory %s; configuration:\n%s", run_dir.path, config.to_json())
    if config.deterministic:
        tf.config.experimental.enable_op_determinism()
    trainer = Trainer(config, run_dir, parallel_tasks=parallel_tasks, strategy=strategy)
    if FLAGS.mode == "export":
        print(f"exported to {trainer.export_best(FLAGS.export_dir)}")
        return
    results = trainer.test() if FLAGS.mode == "test" else train(trainer)
    if results:
        print(f"test accuracy {100 * results['test_accuracy']:.2f}% "
              f"± {100 * results['test_interval']:.2f} over {results['test_tasks']} tasks, "
              f"ensemble of {len(results['models'])} checkpoints, {results['bn_mode']} batch "
              f"norm ({run_dir.path / 'results.json'})")
        if "serving" in results:
            serving = results["serving"]
            print(f"the same in the export's {serving['bn_mode']} batch norm: "
                  f"{100 * serving['test_accuracy']:.2f}% ± {100 * serving['test_interval']:.2f}")
        served = results["served"]
        print(f"served: {100 * served['test_accuracy']:.2f}% ± "
              f"{100 * served['test_interval']:.2f}, what the exported model (epoch "
              f"{served['epoch']}, {served['bn_mode']} batch norm) scores asked one query at "
              "a time")


def fail(error):
    """Ends the command with `error` in one line and exit status 2 (a traceback at -v 1).

    A setting the library names as `way=0` is named as the flag, `--way=0`.
    """
    if FLAGS.verbosity >= 1:
        traceback.print_exc()
    message = error.spelled("--") if isinstance(error, ConfigError) else error
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    from tf_mamlpp.run.quiet_log import hide_library_notes
    hide_library_notes(FLAGS.verbosity)
    owner = run_owner()
    try:
        run(owner)
    except (ValueError, OSError) as error:
        fail(error)
    finally:
        if owner is not None:
            owner.release()


def parse_flags(argv):
    """absl's parser, with a malformed flag ending like any bad input: one line, status 2."""
    try:
        return FLAGS(argv)
    except flags.Error as error:
        # absl starts some messages (a flagfile it cannot open) with its own "ERROR:: ".
        print(f"error: {str(error).removeprefix('ERROR:: ')}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
