"""How much of a validation/test gap the choice of classes can explain.

    python -m tools.class_groups --run_dir=runs/omniglot_25min_running

Made for `--bn_mode=running` (BNRS), which validated at 82.4% and tested at 76.5% (README,
"Every mode on the 25-minute budget"). Scores a run's `--rank`-th best checkpoint, only reading
the run (it may be training), on disjoint groups of the test classes (one permutation with seed
0, cut in `--groups`: 8 groups of Omniglot's 423 are about the validation split's 50 classes)
and on training classes, unrotated and as training drew them (rotated). The spread of the group
means beyond what task noise explains is how far the choice of classes alone moves an accuracy.
"""

import dataclasses
import functools
import json
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app, flags  # noqa: E402
import numpy as np  # noqa: E402

from tf_mamlpp.core import evaluation  # noqa: E402
from tf_mamlpp.core.batch_norm_modes import BN_MODES  # noqa: E402
from tf_mamlpp.hardware.onednn import prefer_onednn  # noqa: E402
from tf_mamlpp.run.quiet_start import start_tensorflow  # noqa: E402

prefer_onednn()  # before TensorFlow loads: the kernels the run was validated with
start_tensorflow()  # without its native start-up notes, as main.py
from tf_mamlpp.core.meta_learner import MetaLearner  # noqa: E402
from tf_mamlpp.run import task_streams  # noqa: E402
from tf_mamlpp.run.builders import build_network  # noqa: E402
from tf_mamlpp.run.run_directory import RunDirectory  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("run_dir", None, "The run's directory (holding config.json). Required.")
flags.DEFINE_enum("bn_mode", None, BN_MODES, "Batch-norm mode to evaluate in. Default: the "
                  "run's own.")
flags.DEFINE_integer("tasks_per_group", 300, "Tasks per group of classes, and of training "
                     "classes. Default 300.", lower_bound=1)
flags.DEFINE_integer("groups", 8, "Disjoint groups of test classes. Default 8.", lower_bound=2)
flags.DEFINE_integer("rank", 0, "Which best checkpoint: 0 the best. Default 0.", lower_bound=0)
flags.DEFINE_string("data_dir", None, "The data set's folder. Default: the run's own.")
flags.DEFINE_string("json", None, "Also write the figures to this JSON file. Default: none.")
flags.mark_flag_as_required("run_dir")


def scored(learner, config, bn_mode, count, name, tasks):
    """Accuracy after the last inner step on the first `count` tasks: mean, 95% interval, SD;
    printed as a line that starts with `name`."""
    accuracies = evaluation.evaluate(learner, tasks.take(-(-count // config.batch_size)),
                                     config.eval_inner_steps, bn_mode)["accuracies"][:count, -1]
    mean, interval = evaluation.mean_and_interval(accuracies)
    print(f"{name}: {100 * mean:.2f}% ± {100 * interval:.2f}", flush=True)
    return {"mean": mean, "interval": interval, "sd": float(accuracies.std())}


def spread(groups, count):
    """The group means' SD, the SD task noise alone gives a mean of `count` tasks, the rest."""
    means = np.array([group["mean"] for group in groups])
    noise = float(np.sqrt(np.mean([group["sd"] ** 2 for group in groups]) / count))
    return {"group_sd": float(means.std(ddof=1)), "task_noise_sd": noise,
            "class_sd": float(np.sqrt(max(means.var(ddof=1) - noise ** 2, 0))),
            "group_range": [float(means.min()), float(means.max())]}


def main(argv):
    del argv
    run_dir = RunDirectory(FLAGS.run_dir)  # reads config.json; locks and writes nothing
    config = dataclasses.replace(run_dir.config, data_dir=FLAGS.data_dir or run_dir.config.data_dir)
    best = run_dir.best_checkpoints()
    if FLAGS.rank >= len(best):
        raise app.UsageError(f"--rank={FLAGS.rank}: {FLAGS.run_dir} has {len(best)} validated "
                             "checkpoints")
    val_accuracy, epoch, prefix = best[FLAGS.rank]
    learner = MetaLearner(build_network(config), eval_inner_steps=config.eval_inner_steps)
    run_dir.restore_best(learner.network, prefix)
    bn_mode, count = FLAGS.bn_mode or config.bn_mode, FLAGS.tasks_per_group
    score = functools.partial(scored, learner, config, bn_mode, count)
    splits = task_streams.load_splits(config)
    test, train = splits["test"], splits["train"]
    figures = {"bn_mode": bn_mode, "epoch": epoch, "val_accuracy_logged": val_accuracy,
               "tasks_per_group": count, "groups": []}
    permutation = np.random.RandomState(0).permutation(test.num_classes)
    for number, classes in enumerate(np.array_split(permutation, FLAGS.groups)):
        tasks = task_streams.evaluation_tasks(config, test.select(np.sort(classes)), "test", count)
        figures["groups"].append({"classes": len(classes), **score(
            f"test group {number}, {len(classes)} classes", tasks)})
    figures["train_unrotated"] = score(
        "train_unrotated", task_streams.evaluation_tasks(config, train, "train", count))
    figures["train_stream"] = score("train_stream", task_streams.training_tasks(config, train))
    figures.update(spread(figures["groups"], count))
    low, high = figures["group_range"]
    print(f"group means ({bn_mode}, epoch {epoch}, {count} tasks each): SD "
          f"{100 * figures['group_sd']:.2f} points, task noise alone "
          f"{100 * figures['task_noise_sd']:.2f}, class part {100 * figures['class_sd']:.2f}, "
          f"range {100 * low:.2f}-{100 * high:.2f}%; validation logged "
          f"{100 * val_accuracy:.2f}% ({config.bn_mode})")
    if FLAGS.json:
        with open(FLAGS.json, "w") as file:
            json.dump(figures, file, indent=1)


if __name__ == "__main__":
    app.run(main)
