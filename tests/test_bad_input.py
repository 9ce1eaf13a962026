"""Bad input through main.py: one line naming the problem, exit status 2, nothing overwritten.

Every case runs `python main.py` as a user would, against the directory of an
earlier, finished run, and must end with a single `error: ...` line that
names the flag or the file, exit status 2 and no traceback, leaving the
earlier run as it was. Cases caught before TensorFlow loads take about a
second; the others start TensorFlow or train, so all run two at a time.
Truncated images are test_decoded_images.py's, in process.
"""

import concurrent.futures
import pathlib
import re
import resource
import shutil

import numpy as np
import pytest
import tensorflow as tf

from conftest import REPO, run_main
from synthetic_images import write_class_folders, write_split_folders

pytestmark = pytest.mark.slow

OMNIGLOT_ZIP = REPO / "datasets" / "omniglot" / "images_background.zip"

# A network just large enough that its checkpoint (350 kB) outgrows the event
# file, so a file-size limit between the two fails the checkpoint first. In
# float32, where a NaN loss ends the run (16 bits skip the update instead, as
# test_mixed_precision.py tests), whatever precision `auto` would pick here.
RUN = ["--filters=32", "--inner_steps=1", "--iters_per_epoch=2", "--epochs=1",
       "--val_tasks=2", "--test_tasks=2", "--batch_size=2", "--way=2", "--shot=1", "--query=2",
       "--mixed_precision=false", "--experiment=earlier"]
FILE_SIZE_LIMIT = 200_000


def run_tiny_main(logdir, *flags, **options):
    """main.py on `logdir` with RUN's flags, then `flags`; `options` go to run_main."""
    return run_main(f"--logdir={logdir}", *RUN, *flags, **options)


def limit_file_size():
    """preexec_fn: a disk that is full for files over FILE_SIZE_LIMIT bytes.

    Python ignores SIGXFSZ, so a write past the limit fails with EFBIG.
    """
    resource.setrlimit(resource.RLIMIT_FSIZE, (FILE_SIZE_LIMIT, FILE_SIZE_LIMIT))


def snapshot(folder):
    """Relative path -> bytes of every file under `folder`."""
    return {path.relative_to(folder): path.read_bytes()
            for path in sorted(pathlib.Path(folder).rglob("*")) if path.is_file()}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Good and bad data sets, each in a folder of its own."""
    root = tmp_path_factory.mktemp("data")
    good = write_class_folders(root / "good", num_classes=10, per_class=4, size=16, channels=1)
    folders = {"good": good, "empty": root / "empty",
               "split": write_split_folders(root / "split", classes=(2, 1, 1), per_class=4,
                                            size=16)}
    folders["empty"].mkdir()
    for name in ("empty_class", "not_an_image"):
        folders[name] = shutil.copytree(good, root / name)
    (folders["empty_class"] / "class03" / "readme.txt").write_text("no images")
    for image in (folders["empty_class"] / "class03").glob("*.png"):
        image.unlink()
    (folders["not_an_image"] / "class02" / "001.png").write_text("hello")
    folders["truncated_zip"] = root / "omniglot"
    folders["truncated_zip"].mkdir()
    for part in ("images_background", "images_evaluation"):
        (folders["truncated_zip"] / f"{part}.zip").write_bytes(OMNIGLOT_ZIP.read_bytes()[:4096])
    (root / "a_file").write_text("not a folder")
    folders["file"] = root / "a_file"
    return folders


@pytest.fixture(scope="module")
def earlier(tmp_path_factory, data):
    """The logdir of a finished one-epoch run on the good data."""
    logdir = tmp_path_factory.mktemp("runs")
    completed = run_tiny_main(logdir, "--dataset=folder", f"--data_dir={data['good']}",
                              "--image_size=16")
    assert completed.returncode == 0, completed.stderr[-3000:]
    return logdir


def folder(data_name, *flags):
    return ["--dataset=folder", f"--data_dir={{{data_name}}}", "--image_size=16", *flags]


# name: (flags, with {data name} for a data folder; fragments the error line must hold)
CASES = {
    "way above the classes of a split": (folder("good", "--way=7"),
                                         ["--way=7", "6 classes of the train split"]),
    "shot and query above the smallest class": (
        folder("good", "--shot=3"), ["--shot=3 plus --query=2", "4 images of class"]),
    "zero way": (folder("good", "--way=0"), ["--way=0: must be at least 1"]),
    "negative query": (folder("good", "--query=-1"), ["--query=-1: must be at least 1"]),
    "zero tasks per batch": (folder("good", "--batch_size=0"), ["--batch_size=0"]),
    "an image size that pools to nothing": (folder("good", "--image_size=12"),
                                            ["--image_size=12 cannot be pooled"]),
    "missing data": (["--dataset=mini_imagenet", "--data_dir={good}/nowhere"],
                     ["{good}/nowhere: no such directory", "train/, val/, test/",
                      "train.csv"]),
    "no --data_dir for a folder": (["--dataset=folder"], ["--dataset=folder needs --data_dir"]),
    "empty data folder": (folder("empty"), ["{empty}: no class folders"]),
    "class folder with no images": (folder("empty_class"),
                                    ["{empty_class}/class03: class folder with no images"]),
    "file that is not an image": (folder("not_an_image"),
                                  ["{not_an_image}/class02/001.png: not a readable image"]),
    "truncated zip": (["--dataset=omniglot", "--data_dir={truncated_zip}"],
                      ["{truncated_zip}/images_background.zip: corrupt or truncated zip"]),
    "unknown dataset": (["--dataset=imagenet21k"], ["--dataset='imagenet21k' is unknown"]),
    "unknown strategy": (folder("good", "--strategy=tpu"), ["--strategy=tpu", "mirrored"]),
    "auto precision on several hosts": (
        folder("good", "--strategy=multi_worker", "--mixed_precision=auto"),
        ["--mixed_precision=auto with --strategy=multi_worker", "--mixed_precision=true"]),
    "auto precision in a deterministic run": (
        folder("good", "--deterministic", "--mixed_precision=auto"),
        ["--mixed_precision=auto with --deterministic", "--mixed_precision=true"]),
    "zero parallel tasks": (folder("good", "--parallel_tasks=0"),
                            ["--parallel_tasks must be at least 1, got 0"]),
    "image size conflicting with omniglot": (
        ["--dataset=omniglot", "--image_size=84"],
        ["--image_size=84 conflicts with --dataset=omniglot"]),
    "split ratios for a split data set": (
        ["--dataset=mini_imagenet", "--data_dir={split}", "--image_size=16",
         "--split_ratios=0.5,0.25,0.25"],
        ["--split_ratios=0.5,0.25,0.25 conflicts with --dataset=mini_imagenet"]),
    "export without a folder": (["--mode=export"], ["--mode=export needs --export_dir"]),
    "adapt without a support set": (["--mode=adapt", "--export_dir={good}", "--query_dir={good}"],
                                    ["--mode=adapt needs --support_dir"]),
    "log directory that cannot be written": (
        folder("good", "--logdir={file}/runs"), ["{file}/runs/earlier: cannot write the run "
                                                 "directory (Not a directory); check --logdir"]),
}


def filled(text, data):
    return text.format(**{name: str(path) for name, path in data.items()})


def damage_truncate(checkpoint):
    data_file = checkpoint.with_name(checkpoint.name + ".data-00000-of-00001")
    data_file.write_bytes(data_file.read_bytes()[:1000])


def damage_replace_with_foreign(checkpoint):
    for file in checkpoint.parent.glob(checkpoint.name + ".*"):
        file.unlink()
    tf.train.Checkpoint(something=tf.Variable([1.0, 2.0])).write(str(checkpoint))


# name: (how the run's latest checkpoint is changed, extra flags, file-size limit, fragments)
CHECKPOINT_CASES = {
    "corrupt checkpoint": (damage_truncate, [], None,
                           ["ckpt-2: corrupt or truncated checkpoint", "--fresh"]),
    "foreign checkpoint": (damage_replace_with_foreign, [], None,
                           ["ckpt-2: checkpoint of another network or program", "--fresh"]),
    "full disk while writing a checkpoint": (
        None, ["--epochs=2"], limit_file_size,
        ["cannot write", "(File too large)", "the previous checkpoint is kept"]),
    "loss that becomes NaN": (None, ["--epochs=2", "--meta_lr=1e38"], None,
                              ["became nan at epoch 2", "--meta_lr"]),
}


@pytest.fixture(scope="module")
def all_outcomes(tmp_path_factory, data, earlier):
    """Runs every case, two at a time, the long checkpoint cases first.

    Returns:
      CASES name -> completed process; the earlier run's files before and
      after them; CHECKPOINT_CASES name -> (the logdir of its copy of the
      earlier run, the copy's files before, completed process).
    """
    copies = {}
    for name, (damage, _, _, _) in CHECKPOINT_CASES.items():
        copies[name] = tmp_path_factory.mktemp("copy")
        shutil.copytree(earlier / "earlier", copies[name] / "earlier")
        if damage:
            damage(copies[name] / "earlier" / "checkpoints" / "latest" / "ckpt-2")
    copied = {name: snapshot(logdir) for name, logdir in copies.items()}
    before = snapshot(earlier)
    with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
        checkpoint_futures = {name: pool.submit(
            run_tiny_main, copies[name], *[
                filled(flag, data) for flag in (*folder("good"), *flags)], preexec_fn=preexec)
            for name, (_, flags, preexec, _) in CHECKPOINT_CASES.items()}
        futures = {name: pool.submit(
            run_tiny_main, earlier, *[filled(flag, data) for flag in flags])
            for name, (flags, _) in CASES.items()}
        completed = {name: future.result() for name, future in futures.items()}
        checkpoint_completed = {name: (copies[name], copied[name], future.result())
                                for name, future in checkpoint_futures.items()}
    return completed, before, snapshot(earlier), checkpoint_completed


@pytest.fixture(scope="module")
def outcomes(all_outcomes):
    """(CASES name -> completed process, the earlier run's files before, and after)."""
    return all_outcomes[:3]


@pytest.fixture(scope="module")
def checkpoint_outcomes(all_outcomes):
    """CHECKPOINT_CASES name -> (logdir of its copy, the copy's files before, completed)."""
    return all_outcomes[3]


# A log line of the project's own: absl's prefix, then main.py or a module of the package.
OWN_LOG_LINE = re.compile(r"^[IW]\d{4} [\d:.]+ +\d+ (\w+)\.py:\d+\] ")


def is_own_log_line(line):
    match = OWN_LOG_LINE.match(line)
    return bool(match) and (match[1] == "main"
                            or any((REPO / "tf_mamlpp").rglob(f"{match[1]}.py")))


def assert_one_line_error(completed, fragments, alone=True):
    """`alone`: before the error only the project's own log lines, not even
    TensorFlow's start-up notes (a run that fails while training shows its
    progress first)."""
    assert completed.returncode == 2, completed.stderr[-3000:]
    assert "Traceback" not in completed.stderr, completed.stderr[-3000:]
    lines = completed.stderr.strip().splitlines()
    last = lines[-1]
    if alone:
        assert all(is_own_log_line(line) for line in lines[:-1]), completed.stderr[-3000:]
    assert last.startswith("error: "), last
    for fragment in fragments:
        assert fragment in last, last


@pytest.mark.parametrize("case", CASES)
def test_bad_input_ends_in_one_line_and_leaves_the_earlier_run(outcomes, data, earlier, case):
    completed, before, after = outcomes
    assert_one_line_error(completed[case], [filled(text, data) for text in CASES[case][1]])
    assert after == before
    assert [path.name for path in earlier.iterdir()] == ["earlier"]


def test_verbosity_shows_the_traceback(earlier, data):
    completed = run_tiny_main(
        earlier, *[filled(flag, data) for flag in folder("good", "--way=7")], "--verbosity=1")
    assert completed.returncode == 2
    assert "Traceback" in completed.stderr
    assert completed.stderr.strip().splitlines()[-1].startswith("error: --way=7")


def test_a_missing_flagfile_ends_in_one_line_naming_it(tmp_path):
    """absl's message starts with an "ERROR:: " of its own, which the error line drops."""
    flagfile = tmp_path / "missing.flags"
    completed = run_tiny_main(tmp_path, f"--flagfile={flagfile}")
    assert_one_line_error(completed, ["Unable to open flagfile", str(flagfile)])
    assert "ERROR" not in completed.stderr, completed.stderr
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("case", CHECKPOINT_CASES)
def test_checkpoint_trouble_ends_in_one_line_and_keeps_the_last_good_checkpoint(
        checkpoint_outcomes, case):
    logdir, before, completed = checkpoint_outcomes[case]
    assert_one_line_error(completed, CHECKPOINT_CASES[case][3], alone=False)
    after = snapshot(logdir)
    checkpoints = {path: content for path, content in before.items()
                   if path.parts[1] == "checkpoints"}
    assert {path: after.get(path) for path in checkpoints} == checkpoints
    latest = logdir / "earlier" / "checkpoints" / "latest"
    assert tf.train.latest_checkpoint(latest) == str(latest / "ckpt-2")
    assert not list(latest.parent.glob("*/*_temp")) and not list(latest.glob("ckpt-4*"))


@pytest.mark.parametrize("case", ["full disk while writing a checkpoint",
                                  "loss that becomes NaN"])
def test_the_kept_checkpoint_still_loads_with_finite_values(checkpoint_outcomes, case):
    logdir, _, _ = checkpoint_outcomes[case]
    reader = tf.train.load_checkpoint(str(logdir / "earlier" / "checkpoints" / "latest"))
    names = [name for name in reader.get_variable_to_shape_map()
             if name != "_CHECKPOINTABLE_OBJECT_GRAPH"]
    assert len(names) > 20
    for name in names:
        assert np.isfinite(np.asarray(reader.get_tensor(name), np.float64)).all(), name


def test_a_diverged_run_keeps_its_history(checkpoint_outcomes):
    logdir, before, _ = checkpoint_outcomes["loss that becomes NaN"]
    history = pathlib.Path("earlier") / "history.json"
    assert (logdir / history).read_bytes() == before[history]
