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

from tf_mamlpp.core.batch_norm_modes import MODES as BN_MODES  # noqa: E402

FLAGS = flags.FLAGS

flags.DEFINE_enum("mode", "train", ["train", "test", "export", "adapt"],
                  "train: meta-train (resuming the run if it exists), then test and export. "
                  "test: test the run's best checkpoints and their ensemble. "
                  "export: write the run's best checkpoint as a SavedModel to --export_dir. "
                  "adapt: adapt the SavedModel in --export_dir to --support_dir and classify "
                  "--query_dir. Default train.")
flags.DEFINE_string("dataset", "omniglot", "Dataset name: omniglot, mini_imagenet, or folder "
                    "(any --data_dir of class folders). Default omniglot.")
flags.DEFINE_string("data_dir", None, "Folder of the dataset's files. Default: datasets/<dataset> "
                    "(Omniglot is shipped there, and fetched by tensorflow-datasets without it; "
                    "mini-ImageNet must be put there); required for --dataset=folder.")
flags.DEFINE_integer("image_size", None, "Side of the square images the files are resized to. "
                     "Default: 28 on Omniglot, 84 on mini-ImageNet and folder.")
flags.DEFINE_integer("channels", None, "1 (grayscale) or 3 (RGB); images are converted to it. "
                     "Default: 1 on Omniglot, 3 on mini-ImageNet, read from the images for "
                     "folder.")
flags.DEFINE_bool("augment", None, "Rotate training classes by multiples of 90 degrees. "
                  "Default: true on Omniglot, false on mini-ImageNet and folder (as the paper).")
flags.DEFINE_string("split_ratios", None, "--dataset=folder with no train/val/test: fractions "
                    "train,val,test of its classes (a fixed shuffle). Default 0.64,0.16,0.2.")
flags.DEFINE_float("in_memory_limit_gb", 4.0, "Folder data sets whose decoded images take more "
                   "GiB than this are read from the on-disk cache as episodes need them "
                   "instead of held in memory. Default 4.")
flags.DEFINE_enum("omniglot_split", "mamlpp", ["mamlpp", "lake"],
                  "Class split: mamlpp (1150/50/423 of all 1623 characters, as the paper) or "
                  "lake (background alphabets for training and validation, evaluation "
                  "alphabets for test). Default mamlpp.")
flags.DEFINE_integer("way", 5, "Classes per task (N). Default 5.")
flags.DEFINE_integer("shot", 1, "Support images per class (K). Default 1.")
flags.DEFINE_integer("query", None, "Target images per class. Default: 1 on Omniglot.")
flags.DEFINE_integer("batch_size", None, "Tasks per meta-batch. Default: 8 on Omniglot.")
flags.DEFINE_integer("filters", None, "Filters of each conv stage. Default: 64 on Omniglot.")
flags.DEFINE_integer("inner_steps", 5, "Inner-loop steps in training. Default 5.")
flags.DEFINE_integer("eval_inner_steps", None, "Inner-loop steps at validation and test; steps "
                     "past --inner_steps reuse the last step's BN banks and rates. "
                     "Default: --inner_steps.")
flags.DEFINE_float("inner_lr", None, "Initial inner learning rate (every layer and step). "
                   "Default: 0.1 on Omniglot.")
flags.DEFINE_float("meta_lr", 1e-3, "Adam learning rate at the start. Default 1e-3.")
flags.DEFINE_float("min_meta_lr", 1e-5, "Learning rate that cosine annealing ends at. "
                   "Default 1e-5.")
flags.DEFINE_integer("epochs", 100, "Training epochs. Default 100.")
flags.DEFINE_integer("iters_per_epoch", 500, "Meta-iterations per epoch. Default 500.")
flags.DEFINE_bool("msl", True, "MSL: multi-step loss, annealed over --msl_epochs. Default true.")
flags.DEFINE_integer("msl_epochs", 10, "Epochs after which only the last step's loss counts. "
                     "Default 10.")
flags.DEFINE_bool("da", True, "DA: derivative-order annealing, first order for "
                  "--first_order_epochs epochs. Default true.")
flags.DEFINE_integer("first_order_epochs", 50, "Epochs of first-order training under DA. "
                     "Default 50.")
flags.DEFINE_bool("second_order", True, "Use second-order meta-gradients (after the DA epochs); "
                  "false trains first order throughout. Default true.")
flags.DEFINE_bool("bnrs", True, "BNRS: per-step batch-norm running statistics. Default true.")
flags.DEFINE_bool("bnwb", True, "BNWB: per-step batch-norm weights and biases. Default true.")
flags.DEFINE_bool("lslr", True, "LSLR: learned per-layer, per-step inner learning rates. "
                  "Default true.")
flags.DEFINE_bool("ca", True, "CA: cosine annealing of the meta learning rate. Default true.")
flags.DEFINE_enum("bn_mode", "transductive", BN_MODES,
                  "Batch norm of the target (query) pass, in meta-training and evaluation "
                  "alike: transductive (each batch by its own statistics, as the reference "
                  "code; exported models then normalise queries by the support set's), support "
                  "(MetaBN: the support set's statistics at the same weights), task_norm "
                  "(TaskNorm-I: support and per-image moments blended by a learned weight) or "
                  "running (BNRS: the per-step running banks). Default transductive.")
flags.DEFINE_integer("val_tasks", 600, "Fixed validation tasks. Default 600.")
flags.DEFINE_integer("test_tasks", 600, "Fixed test tasks. Default 600.")
flags.DEFINE_integer("seed", 0, "Seed of the initialisation and the task streams. Default 0.")
flags.DEFINE_string("logdir", "runs", "Parent folder of the runs. Default runs.")
flags.DEFINE_string("experiment", None, "Run directory name under --logdir. Default: "
                    "<dataset>_<way>way_<shot>shot_seed<seed>.")
flags.DEFINE_integer("ensemble_top_k", 3, "Best validation checkpoints kept and ensembled at "
                     "test time, as the paper does with three. Default 3.", lower_bound=1)
flags.DEFINE_bool("fresh", False, "Start a new run in a new directory even if one exists "
                  "(the old one is kept). Default false: continue the existing run.")
flags.DEFINE_bool("deterministic", False, "Enable TensorFlow's op determinism, so an "
                  "interrupted and resumed run repeats an uninterrupted one exactly. "
                  "Default false.")
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
flags.DEFINE_bool("jit_compile", False, "Compile the meta-step with XLA. Default false "
                  "(slower on CPU; see benchmarks/README.md).")
flags.DEFINE_bool("fold_tasks", False, "Run a meta-batch's tasks together as grouped "
                  "convolutions instead of one after another. Default false (slower on CPU; "
                  "see benchmarks/README.md).")
flags.DEFINE_integer("parallel_tasks", None, "Tasks of a meta-batch adapted at once, with "
                     "the cores shared out among them (see tf_mamlpp/run/cpu_threads.py). Default: "
                     "the number of cores on a CPU, 1 on a GPU.")
flags.DEFINE_bool("mixed_precision", False, "Meta-train in 16 bits (float16 on a GPU, "
                  "bfloat16 on a CPU) with float32 variables and a dynamic loss scale on the "
                  "inner and outer losses; validation, test and the export stay float32. "
                  "Default false.")

CONFIG_FLAGS = ("data_dir", "image_size", "channels", "augment", "split_ratios",
                "in_memory_limit_gb", "omniglot_split", "way", "shot", "query", "batch_size",
                "filters", "inner_steps", "eval_inner_steps", "inner_lr", "meta_lr", "min_meta_lr",
                "epochs", "iters_per_epoch", "msl", "msl_epochs", "da", "first_order_epochs",
                "second_order", "bnrs", "bnwb", "lslr", "ca", "bn_mode", "val_tasks",
                "test_tasks", "seed", "mixed_precision")


@functools.cache
def resolved_config():
    """The flags' configuration; to train, checked against itself and the data's file index."""
    from tf_mamlpp.run import config, preflight
    resolved = config.resolve(FLAGS.dataset, **{name: FLAGS[name].value for name in CONFIG_FLAGS})
    return preflight.checked(resolved) if FLAGS.mode == "train" else resolved


def adapt():
    from tf_mamlpp.run.folder_task import classify_folders
    for name in ("export_dir", "support_dir", "query_dir"):
        if not FLAGS[name].value:
            raise ValueError(f"--mode=adapt needs --{name}")
    for path, class_name, probability in classify_folders(
            FLAGS.export_dir, FLAGS.support_dir, FLAGS.query_dir):
        print(f"{path.name}\t{class_name}\t{probability:.3f}")


def open_run():
    """The run directory and configuration this command works on."""
    from tf_mamlpp.run import run_directory
    config = resolved_config()
    name = FLAGS.experiment or run_directory.experiment_name(config)
    if FLAGS.mode == "train":
        run_dir = run_directory.RunDirectory.open(FLAGS.logdir, name, config, fresh=FLAGS.fresh,
                                                  keep_best=FLAGS.ensemble_top_k)
        return run_dir, config
    # Testing and exporting use the configuration the run was trained with.
    run_dir = run_directory.RunDirectory.existing(FLAGS.logdir, name,
                                                  keep_best=FLAGS.ensemble_top_k)
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


def run():
    if FLAGS.mode == "train":
        resolved_config()  # bad flags or data fail here, in a second, before TensorFlow loads
    from tf_mamlpp.run.quiet_start import start_tensorflow
    tf, gpus = start_tensorflow()
    from tf_mamlpp.core import mixed_precision
    from tf_mamlpp.data import splits
    from tf_mamlpp.run import cpu_threads
    from tf_mamlpp.run.distribution import make_strategy
    from tf_mamlpp.run.trainer import Trainer

    if FLAGS.mode == "adapt":
        return adapt()
    if FLAGS.mode == "export" and not FLAGS.export_dir:
        raise ValueError("--mode=export needs --export_dir")
    parallel_tasks = (cpu_threads.default_parallel_tasks() if FLAGS.parallel_tasks is None
                      else FLAGS.parallel_tasks)
    cpu_threads.configure(parallel_tasks)  # before TensorFlow runs its first op
    strategy = make_strategy(FLAGS.strategy)
    if FLAGS.mode == "train" and FLAGS.mixed_precision:
        mixed_precision.warn_if_slow()
    tf.config.run_functions_eagerly(FLAGS.run_eagerly)
    if FLAGS.deterministic:
        tf.config.experimental.enable_op_determinism()
    if FLAGS.mode == "train":
        splits.prepare(resolved_config())  # decodes the data: a corrupt file fails before any write
    run_dir, config = open_run()
    if not gpus:
        logging.info("No GPU found: running on the CPU.")
    logging.info("Run directory %s; configuration:\n%s", run_dir.path, config.to_json())
    trainer = Trainer(config, run_dir, jit_compile=FLAGS.jit_compile,
                      fold_tasks=FLAGS.fold_tasks, parallel_tasks=parallel_tasks,
                      strategy=strategy)
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
            print(f"as exported ({serving['bn_mode']} batch norm): "
                  f"{100 * serving['test_accuracy']:.2f}% ± {100 * serving['test_interval']:.2f}")


def fail(error):
    """Ends the command with `error` in one line and exit status 2 (a traceback at -v 1)."""
    if FLAGS.verbosity >= 1:
        traceback.print_exc()
    print(f"error: {error}", file=sys.stderr)
    sys.exit(2)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    try:
        run()
    except (ValueError, OSError) as error:
        fail(error)


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
