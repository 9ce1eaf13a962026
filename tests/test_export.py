"""Specification of tf_mamlpp.serving.saved_model: a SavedModel that adapts, usable without this package.

The model is the session's tiny run's (conftest.tiny_run), whose training
through main.py exported its best checkpoint to run/export. A separate
Python process that never imports tf_mamlpp loads that SavedModel and adapts
it to a real Omniglot episode, given as the training arrays and as the
archive's PNG files, and its outputs must equal the in-process
`AdaptingModel`'s at two numbers of query images, TensorFlow 1's loader's
(`saved_model_cli run`, as TensorFlow Serving loads) and `main.py
--mode=adapt`'s. The subprocesses run side by side.
"""

import concurrent.futures
import json
import os
import pathlib
import re
import shutil
import textwrap
import zipfile

import numpy as np
import pytest
import tensorflow as tf

from conftest import (REPO, TINY_RUN, answers_alone_as_among_others, copy_run, noisy_episode,
                      run_command, run_main, run_python)
from synthetic_images import write_split_folders
from tf_mamlpp.core.batch_norm_modes import BN_MODES, DEFAULT_MODE, SERVING_MODES, TASK_NORM
from tf_mamlpp.core.inner_loop import adapt_and_evaluate
from tf_mamlpp.data import decoded_images
from tf_mamlpp.data.image_folders import index_splits
from tf_mamlpp.ops import plain_tensorflow
from tf_mamlpp.run import config as config_module
from tf_mamlpp.run import task_streams
from tf_mamlpp.serving import saved_model
from tf_mamlpp.run.run_directory import RunDirectory
from tf_mamlpp.run.builders import build_network
from tf_mamlpp.run.trainer import Trainer

pytestmark = pytest.mark.slow

OMNIGLOT = REPO / "datasets" / "omniglot"
WAY, FILTERS, INNER_STEPS = (TINY_RUN[name] for name in ("way", "filters", "inner_steps"))
QUERY_COUNTS = (3, 7)
# What TensorFlow's native libraries write to standard error as it starts,
# on any machine without a GPU; the loader may print nothing else.
START_UP_NOTES = re.compile(
    r"All log messages before absl::InitializeLog|cudart_stub\.cc|cuda_platform\.cc|"
    r"cuda_executor\.cc|cuda_diagnostics\.cc|cpu_feature_guard\.cc|"
    r"To enable the following instructions|oneDNN custom operations are on")

# One float32 graph run twice (here and loaded in another process) agrees to
# round-off, which the inner steps amplify and which depends on the kernels
# (oneDNN's or Eigen's, as Grappler fuses them): up to 3e-5 on logits of about
# 1 on an AVX2 CPU with oneDNN. A wrong adaptation is off by far more.
SAME_ANSWER = dict(rtol=1e-4, atol=1e-4)

# The inputs of the adapt signatures, by signature.
SIGNATURE_INPUTS = {
    "adapt_and_predict": ("support_images", "support_labels", "query_images"),
    "adapt_and_predict_files": ("support_image_bytes", "support_labels", "query_image_bytes"),
}
# What the LOADER writes to standard error before its error cases.
ERROR_CASES = "error cases:"

# Runs in a clean process: only TensorFlow and numpy, from a folder where
# tf_mamlpp is not importable by path.
LOADER = textwrap.dedent("""
    import json, sys
    import numpy as np
    import tensorflow as tf

    export_dir, episode_dir, out_dir = sys.argv[1:]
    model = tf.saved_model.load(export_dir)
    adapt = model.signatures["adapt_and_predict"]
    embed = model.signatures["embed"]
    episode = dict(np.load(episode_dir + "/episode.npz"))
    arrays, errors = {}, {}
    for n in (3, 7):
        out = adapt(support_images=tf.constant(episode["support_images"]),
                    support_labels=tf.constant(episode["support_labels"]),
                    query_images=tf.constant(episode["query_images"][:n]))
        arrays[f"logits_{n}"] = out["logits"].numpy()
        arrays[f"probabilities_{n}"] = out["probabilities"].numpy()
    arrays["features"] = embed(images=tf.constant(episode["query_images"]))["features"].numpy()
    with open(episode_dir + "/files.json") as file:
        files = json.load(file)
    contents = {name: [open(path, "rb").read() for path in paths]
                for name, paths in files.items()}
    arrays["files_probabilities"] = model.signatures["adapt_and_predict_files"](
        support_image_bytes=tf.constant(contents["support"]),
        support_labels=tf.constant(episode["support_labels"]),
        query_image_bytes=tf.constant(contents["query"]))["probabilities"].numpy()
    # TensorFlow logs each input refused below; the test reads the lines before.
    print("error cases:", file=sys.stderr, flush=True)

    def error_of(name, call):
        try:
            call()
            errors[name] = None
        except Exception as error:  # recorded for the test to judge
            errors[name] = type(error).__name__ + ": " + str(error)

    def adapt_on(support_images, support_labels, query_images):
        return lambda: adapt(support_images=tf.constant(support_images),
                             support_labels=tf.constant(support_labels),
                             query_images=tf.constant(query_images))

    images, labels, queries = (episode["support_images"], episode["support_labels"],
                               episode["query_images"][:3])
    error_of("label_too_large", adapt_on(images, np.array([0, 1, 3], np.int32), queries))
    error_of("label_negative", adapt_on(images, np.array([0, -1, 2], np.int32), queries))
    error_of("empty_support", adapt_on(images[:0], labels[:0], queries))
    error_of("empty_query", adapt_on(images, labels, queries[:0]))
    error_of("labels_and_images_differ", adapt_on(images, labels[:2], queries))
    error_of("int64_labels", adapt_on(images, labels.astype(np.int64), queries))
    # 30x30 pools to 1x1 like 28x28 does; 32x32 to 2x2.
    error_of("adapt_30x30", adapt_on(np.zeros((3, 30, 30, 1), np.float32), labels,
                                     np.zeros((3, 30, 30, 1), np.float32)))
    error_of("adapt_queries_32x32", adapt_on(images, labels, np.zeros((3, 32, 32, 1), np.float32)))
    error_of("embed_30x30", lambda: embed(images=tf.zeros((3, 30, 30, 1))))
    error_of("embed_32x32", lambda: embed(images=tf.zeros((3, 32, 32, 1))))
    np.savez(out_dir + "/outputs.npz", **arrays)
    with open(out_dir + "/report.json", "w") as file:
        json.dump({"errors": errors, "way": int(model.way[0].numpy()),
                   "image_shape": [int(d) for d in model.image_shape[0].numpy()],
                   "tf_mamlpp_imported": any(name.startswith("tf_mamlpp")
                                             for name in sys.modules)}, file)
""")


@pytest.fixture(scope="module")
def trained(tiny_run, tmp_path_factory):
    """A copy of the session's tiny run, whose training exported its best checkpoint to
    run/export, opened as the trainer of a new process opens it."""
    run_dir = copy_run(tiny_run.path, tmp_path_factory.mktemp("runs"))
    run_directory = RunDirectory.existing(run_dir.parent, run_dir.name)
    return Trainer(run_directory.config, run_directory)


@pytest.fixture(scope="module")
def adapting_model(trained):
    """The in-process AdaptingModel of the exported (best) checkpoint."""
    network = build_network(trained.config)
    best_prefix = trained.run_dir.best_checkpoints()[0][2]
    tf.train.Checkpoint(network=network).read(
        trained.run_dir.checkpoint_path(best_prefix)).expect_partial()
    return saved_model.AdaptingModel(network, trained.config.eval_inner_steps)


def drawings(class_name):
    """The PNG files of an Omniglot class ("images_evaluation/Tibetan/character10") in the
    shipped archive, in the order of its training images: [(file name, bytes)]."""
    part = class_name.split("/")[0]
    with zipfile.ZipFile(OMNIGLOT / f"{part}.zip") as archive:
        names = sorted(name for name in archive.namelist()
                       if name.startswith(f"{class_name}/") and name.endswith(".png"))
        return [(pathlib.Path(name).name, archive.read(name)) for name in names]


def write_file(path, contents):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(contents)
    return str(path)


@pytest.fixture(scope="module")
def episode(trained, tmp_path_factory):
    """A 3-way 1-shot episode of unseen (test split) Omniglot characters, 7 queries.

    Beside the training arrays, in its folder: the same drawings as the
    archive's PNG files, laid out for `main.py --mode=adapt` (support/class<label>/,
    query/ in episode order), their paths in files.json, and each input of both
    adapt signatures as an .npy file for `saved_model_cli run`.
    """
    test_images = trained.splits["test"]
    folder = tmp_path_factory.mktemp("episode")
    support, queries, files = [], [], {"support": [], "query": []}
    for label, count in zip(range(WAY), (3, 2, 2)):
        images = test_images.images_of(label)
        support.append(images[0])
        queries += list(images[1:1 + count])
        (name, png), *query_pngs = drawings(test_images.class_names[label])[:1 + count]
        files["support"].append(write_file(folder / "support" / f"class{label}" / name, png))
        for name, png in query_pngs:
            files["query"].append(
                write_file(folder / "query" / f"{len(files['query']):02d}_{name}", png))
    episode = {"support_images": np.stack(support).astype(np.float32),
               "support_labels": np.arange(WAY, dtype=np.int32),
               "query_images": np.stack(queries).astype(np.float32)}
    np.savez(folder / "episode.npz", **episode)
    (folder / "files.json").write_text(json.dumps(files))
    for name, array in episode.items():
        np.save(folder / f"{name}.npy", array)
    for kind, paths in files.items():
        contents = np.array([pathlib.Path(path).read_bytes() for path in paths], dtype=object)
        np.save(folder / f"{kind}_image_bytes.npy", contents, allow_pickle=True)
    return episode, folder


def load_elsewhere(export_dir, episode_dir, out_dir):
    """The LOADER in a fresh Python, run from a folder outside the repository.

    Returns:
      (arrays, report, what it wrote to standard error).
    """
    script = out_dir / "load_export.py"
    script.write_text(LOADER)
    env = {name: value for name, value in os.environ.items() if name != "PYTHONPATH"}
    completed = run_python(str(script), str(export_dir), str(episode_dir), str(out_dir),
                           cwd=out_dir, env=env)
    assert completed.returncode == 0, completed.stderr[-3000:]
    return (dict(np.load(out_dir / "outputs.npz")),
            json.loads((out_dir / "report.json").read_text()), completed.stderr)


def saved_model_cli_run(cli, export_dir, signature, inputs, episode_dir, out_dir):
    """`saved_model_cli run` of `signature` on the episode's .npy files: {output: array}.

    It loads the SavedModel with TensorFlow 1's loader, in a session, as
    TensorFlow Serving does.
    """
    completed = run_command([cli, "run", "--dir", str(export_dir), "--tag_set", "serve",
                             "--signature_def", signature, "--outdir", str(out_dir), "--inputs",
                             ";".join(f"{name}={episode_dir / name}.npy" for name in inputs)])
    assert completed.returncode == 0, completed.stderr[-3000:]
    return {path.stem: np.load(path) for path in out_dir.glob("*.npy")}


def export_twice_through_main(run_dir, export_dir):
    """`main.py --mode=export` into a new folder, then again into the same, now full, one."""
    flags = ["--mode=export", f"--logdir={run_dir.parent}", f"--experiment={run_dir.name}",
             f"--export_dir={export_dir}"]
    first = run_main(*flags)
    listing = sorted(path.relative_to(export_dir) for path in export_dir.rglob("*"))
    second = run_main(*flags)
    return first, listing, second


@pytest.fixture(scope="module")
def subprocesses(trained, episode, tmp_path_factory):
    """The slow outside views of the export, started together: name -> future."""
    export_dir = trained.run_dir.path / "export"
    work = tmp_path_factory.mktemp("outside")
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=3)
    episode_dir = episode[1]
    futures = {
        "loaded": pool.submit(load_elsewhere, export_dir, episode_dir, work),
        "main_export": pool.submit(export_twice_through_main, trained.run_dir.path,
                                   work / "exported_by_main"),
        "main_adapt": pool.submit(run_main, "--mode=adapt", f"--export_dir={export_dir}",
                                  f"--support_dir={episode_dir / 'support'}",
                                  f"--query_dir={episode_dir / 'query'}"),
    }
    cli = shutil.which("saved_model_cli")
    if cli:
        futures["saved_model_cli"] = pool.submit(
            run_command, [cli, "show", "--dir", str(export_dir), "--all"])
        for signature, inputs in SIGNATURE_INPUTS.items():
            futures[signature] = pool.submit(saved_model_cli_run, cli, export_dir, signature,
                                             inputs, episode_dir, work / signature)
    yield futures
    pool.shutdown(wait=True)


@pytest.fixture(scope="module")
def loaded(subprocesses):
    """(arrays, report) of the LOADER."""
    return subprocesses["loaded"].result(timeout=600)[:2]


def in_process(adapting_model, episode, num_queries):
    out = adapting_model.adapt_and_predict(
        tf.constant(episode["support_images"]), tf.constant(episode["support_labels"]),
        tf.constant(episode["query_images"][:num_queries]))
    return {name: value.numpy() for name, value in out.items()}


def test_loading_needs_no_tf_mamlpp(loaded):
    _, report = loaded
    assert report["tf_mamlpp_imported"] is False
    assert report["way"] == WAY
    assert report["image_shape"] == [28, 28, 1]


@pytest.mark.parametrize("num_queries", QUERY_COUNTS)
def test_loaded_model_adapts_as_the_in_process_model(loaded, adapting_model, episode,
                                                     num_queries):
    arrays, _ = loaded
    expected = in_process(adapting_model, episode[0], num_queries)
    assert arrays[f"logits_{num_queries}"].shape == (num_queries, WAY)
    np.testing.assert_allclose(arrays[f"logits_{num_queries}"], expected["logits"],
                               **SAME_ANSWER)
    np.testing.assert_allclose(arrays[f"probabilities_{num_queries}"],
                               expected["probabilities"], **SAME_ANSWER)
    np.testing.assert_allclose(arrays[f"probabilities_{num_queries}"].sum(-1), 1.0, rtol=1e-5)


@pytest.mark.parametrize("signature", ["adapt_and_predict", "adapt_and_predict_files"])
def test_tensorflow_1s_loader_answers_as_the_loaded_model(subprocesses, loaded, signature):
    """`saved_model_cli run` loads as TensorFlow Serving does: in a session, by the
    variables' names, which a SavedModel of Keras 3 variables saved from a
    tf.Module did not have."""
    outputs = subprocesses[signature].result(timeout=600)
    expected = loaded[0]["probabilities_7" if signature == "adapt_and_predict"
                         else "files_probabilities"]
    np.testing.assert_allclose(outputs["probabilities"], expected, **SAME_ANSWER)


def test_loading_prints_nothing(subprocesses):
    """Loading and adapting print no "unsaved custom gradients" warning per function,
    nor anything else but TensorFlow's start-up notes: the export holds no custom
    gradient."""
    stderr = subprocesses["loaded"].result(timeout=600)[2]
    assert ERROR_CASES in stderr
    stderr = stderr[:stderr.index(ERROR_CASES)]
    assert "custom gradients" not in stderr
    assert [line for line in stderr.splitlines() if not START_UP_NOTES.search(line)] == []


def test_the_file_signature_answers_as_the_training_images_do(loaded):
    """The archive's PNG files through adapt_and_predict_files, and the arrays training
    decoded from them through adapt_and_predict."""
    arrays, _ = loaded
    np.testing.assert_allclose(arrays["files_probabilities"], arrays["probabilities_7"],
                               rtol=0, atol=1e-6)


def test_decode_image_is_omniglots_decoding(episode):
    episode, folder = episode
    files = json.loads((folder / "files.json").read_text())
    for path, image in zip(files["support"] + files["query"],
                           np.concatenate([episode["support_images"], episode["query_images"]])):
        decoded = saved_model.decode_image(pathlib.Path(path).read_bytes(), (28, 28, 1))
        np.testing.assert_array_equal(decoded.numpy(), image)


@pytest.mark.parametrize("channels", [1, 3])
def test_decode_image_rounded_is_the_image_folders_decoding(channels, tmp_path):
    """RGB PNG and JPEG files, made grayscale or kept RGB, as the decoded-image cache
    holds them for training (read as value / 255)."""
    root = write_split_folders(tmp_path / "data", classes=(2, 1, 1), per_class=4,
                               suffixes=(".png", ".jpg"))
    files = index_splits(root)["train"]
    cached = decoded_images.load_split(files, 16, channels,
                                       decoded_images.cache_dir(root, 16, channels))
    paths = [path for class_files in files.files for path in class_files]
    assert len(paths) == len(cached.images) == 8
    for path, image in zip(paths, cached.images):
        decoded = saved_model.decode_image(path.read_bytes(), (16, 16, channels),
                                      rounded_to_uint8=True)
        np.testing.assert_array_equal(decoded.numpy(), image.astype(np.float32) / 255.0)


def test_adapt_mode_prints_the_file_signatures_answers(subprocesses, loaded, episode):
    completed = subprocesses["main_adapt"].result(timeout=600)
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert "custom gradients" not in completed.stderr
    rows = [line.split("\t") for line in completed.stdout.strip().splitlines()]
    files = json.loads((episode[1] / "files.json").read_text())
    assert [name for name, _, _ in rows] == [pathlib.Path(path).name for path in files["query"]]
    expected = loaded[0]["files_probabilities"]
    assert [(predicted, probability) for _, predicted, probability in rows] == [
        (f"class{row.argmax()}", f"{row.max():.3f}") for row in expected]


@pytest.mark.parametrize("bn_mode", BN_MODES)
def test_tensorflow_derivatives_adapt_as_the_closed_forms(bn_mode, episode):
    """First-order adaptation and its meta-gradient with the kernels' custom gradients
    and with TensorFlow's (`plain_tensorflow`, as exported).

    The meta-gradient is compared to 1e-3 of its scale: in the support mode it
    passes through the support statistics, which the fused kernel and plain
    reductions round differently (each is as close to float64's as the other;
    1.2e-4 of 0.22 apart on an AVX2 CPU with oneDNN)."""
    network = randomised_network(bn_mode)
    images = episode[0]
    tasks = {"support_images": images["support_images"][np.newaxis],
             "support_labels": images["support_labels"][np.newaxis],
             "target_images": images["query_images"][np.newaxis],
             "target_labels": np.array([[0, 0, 0, 1, 1, 2, 2]], np.int32)}

    def adapted():
        with tf.GradientTape() as tape:
            result = adapt_and_evaluate(network, tasks, INNER_STEPS, second_order=False,
                                        target_steps=[INNER_STEPS - 1], bn_mode=bn_mode)
        gradients = tape.gradient(result["target_losses"], network.trainable_variables)
        return [result["logits"], *result["bn_means"], *result["bn_variances"]], gradients

    adaptation, gradients = adapted()
    with plain_tensorflow():
        plain_adaptation, plain_gradients = adapted()
    for expected, actual in zip(adaptation, plain_adaptation, strict=True):
        np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=1e-5)
    for expected, actual in zip(gradients, plain_gradients, strict=True):
        np.testing.assert_allclose(actual, expected, rtol=1e-3,
                                   atol=1e-3 * np.abs(expected).max())


def test_adaptation_changes_the_prediction(adapting_model, episode):
    """The signature adapts: other support labels give other predictions."""
    images = episode[0]
    permuted = dict(images, support_labels=np.array([1, 2, 0], np.int32))
    original = in_process(adapting_model, images, 7)["probabilities"]
    relabelled = in_process(adapting_model, permuted, 7)["probabilities"]
    assert not np.allclose(original, relabelled, atol=1e-3)


def test_embed_returns_features_of_each_image(loaded, adapting_model, episode):
    arrays, _ = loaded
    features = arrays["features"]
    # 28 pooled four times is 1x1, times 8 filters.
    assert features.shape == (7, adapting_model.network.feature_size) == (7, FILTERS)
    expected = adapting_model.embed(tf.constant(episode[0]["query_images"]))["features"]
    np.testing.assert_allclose(features, expected.numpy(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case", ["label_too_large", "label_negative"])
def test_labels_out_of_range_are_refused(loaded, case):
    _, report = loaded
    error = report["errors"][case]
    assert error is not None and "support_labels must be in [0, way)" in error


def test_empty_support_set_is_refused(loaded):
    error = loaded[1]["errors"]["empty_support"]
    assert error is not None and "the support set is empty" in error


def test_labels_and_images_of_different_lengths_are_refused(loaded):
    error = loaded[1]["errors"]["labels_and_images_differ"]
    assert error is not None and "differ in length" in error


def test_empty_query_set_is_refused_naming_the_queries(loaded):
    error = loaded[1]["errors"]["empty_query"]
    assert error is not None and "query_images" in error


def test_labels_of_another_dtype_are_refused(loaded):
    assert loaded[1]["errors"]["int64_labels"] is not None


@pytest.mark.parametrize("case", ["adapt_30x30", "adapt_queries_32x32", "embed_30x30",
                                  "embed_32x32"])
def test_images_of_another_size_are_refused_naming_the_expected_size(loaded, case):
    """The loaded signatures check dtypes but not shapes: the model must check sizes
    itself, or 30x30 images (which pool to 1x1 like 28x28) get an answer and
    32x32 ones get a wrong number of rows (embed) or an error about softmax."""
    error = loaded[1]["errors"][case]
    assert error is not None, f"{case}: answered instead of refusing"
    assert "28" in error, error


def test_export_into_a_non_empty_folder_is_refused_and_keeps_its_files(adapting_model,
                                                                       tmp_path):
    target = tmp_path / "model"
    target.mkdir()
    (target / "saved_model.pb").write_bytes(b"an earlier export")
    (target / "notes.txt").write_text("keep me")
    with pytest.raises(saved_model.ExportError, match="not empty"):
        saved_model.export(adapting_model.network, INNER_STEPS, target)
    assert sorted(path.name for path in target.iterdir()) == ["notes.txt", "saved_model.pb"]
    assert (target / "saved_model.pb").read_bytes() == b"an earlier export"
    assert sorted(path.name for path in tmp_path.iterdir()) == ["model"]


def test_export_into_an_empty_folder_leaves_no_staging_behind(adapting_model, tmp_path):
    target = tmp_path / "model"
    target.mkdir()
    assert saved_model.export(adapting_model.network, INNER_STEPS, target) == target
    assert (target / "saved_model.pb").exists()
    assert sorted(path.name for path in tmp_path.iterdir()) == ["model"]


def test_training_exported_the_best_checkpoint_and_no_staging_is_left(trained):
    names = [path.name for path in trained.run_dir.path.iterdir()]
    assert "export" in names
    assert not [name for name in names if name.startswith(".export-")]


def exports_task_accuracies(trained):
    """The run's export asked about each query of each test task on its own: [accuracy]."""
    adapt = tf.saved_model.load(str(trained.run_dir.path / "export")).signatures[
        "adapt_and_predict"]
    config = trained.config
    accuracies = []
    for batch in task_streams.evaluation_tasks(config, trained.splits["test"], "test",
                                               config.test_tasks):
        for task in range(batch["support_labels"].shape[0]):
            queries = batch["target_images"][task]
            answers = [adapt(support_images=batch["support_images"][task],
                             support_labels=tf.cast(batch["support_labels"][task], tf.int32),
                             query_images=queries[index:index + 1])["probabilities"][0]
                       for index in range(queries.shape[0])]
            accuracies.append(np.mean(np.argmax(answers, axis=1)
                                      == batch["target_labels"][task].numpy()))
    return accuracies


def test_the_served_figure_is_the_exports_asked_one_query_at_a_time_task_for_task(trained):
    """results.json's `served`: the best checkpoint alone, in the export's mode; the tiny run
    is the default command's."""
    served = json.loads((trained.run_dir.path / "results.json").read_text())["served"]
    assert trained.config.bn_mode == DEFAULT_MODE
    assert (served["epoch"], served["bn_mode"]) == (trained.run_dir.best_checkpoints()[0][1],
                                                    SERVING_MODES[DEFAULT_MODE])
    assert len(served["task_accuracies"]) == TINY_RUN["test_tasks"]
    np.testing.assert_allclose(exports_task_accuracies(trained), served["task_accuracies"],
                               atol=1e-6)
    assert served["test_accuracy"] == pytest.approx(np.mean(served["task_accuracies"]))


def test_main_export_writes_a_loadable_model_of_the_best_checkpoint(subprocesses,
                                                                    adapting_model, episode):
    first, listing, _ = subprocesses["main_export"].result(timeout=600)
    assert first.returncode == 0, first.stderr[-3000:]
    export_dir = pathlib.Path(first.stdout.strip().splitlines()[-1].removeprefix("exported to "))
    assert pathlib.Path("saved_model.pb") in listing
    model = tf.saved_model.load(str(export_dir))
    images = episode[0]
    out = model.signatures["adapt_and_predict"](
        support_images=tf.constant(images["support_images"]),
        support_labels=tf.constant(images["support_labels"]),
        query_images=tf.constant(images["query_images"][:3]))
    np.testing.assert_allclose(out["logits"].numpy(),
                               in_process(adapting_model, images, 3)["logits"], **SAME_ANSWER)


def test_main_export_into_a_non_empty_folder_is_a_one_line_error(subprocesses):
    first, listing, second = subprocesses["main_export"].result(timeout=600)
    assert second.returncode == 2
    assert "Traceback" not in second.stderr
    error = second.stderr.strip().splitlines()[-1]
    assert error.startswith("error: ") and "--export_dir" in error and "not empty" in error
    export_dir = pathlib.Path(first.stdout.strip().splitlines()[-1].removeprefix("exported to "))
    assert sorted(path.relative_to(export_dir) for path in export_dir.rglob("*")) == listing


def test_saved_model_cli_lists_both_signatures(subprocesses):
    # The tensorflow package installs saved_model_cli; its absence is a failure.
    assert "saved_model_cli" in subprocesses, "saved_model_cli is not on PATH"
    shown = subprocesses["saved_model_cli"].result(timeout=600)
    assert shown.returncode == 0, shown.stderr[-3000:]
    for name in ("adapt_and_predict", "embed"):
        assert f"signature_def['{name}']" in shown.stdout
    for name in ("support_images", "support_labels", "query_images", "probabilities",
                 "logits", "features"):
        assert name in shown.stdout


def randomised_network(bn_mode, **task_norm_options):
    """A 3-way network in `bn_mode` whose banks, affine rows and per-state alphas (TaskNorm's
    task_norm_alpha=per_step or direct) differ from their defaults."""
    network = build_network(config_module.resolve(
        "omniglot", way=WAY, shot=1, inner_steps=INNER_STEPS, filters=FILTERS, bn_mode=bn_mode,
        **task_norm_options))
    rng = np.random.default_rng(0)
    for norm in network.norms:
        for bank, low, high in ((norm.gamma, 0.5, 1.5), (norm.beta, -0.3, 0.3),
                                (norm.moving_mean, -0.1, 0.1), (norm.moving_variance, 0.5, 2)):
            bank.assign(rng.uniform(low, high, bank.shape).astype(np.float32))
        if hasattr(norm, "blend_logit"):
            norm.blend_logit.assign(rng.uniform(-1.5, 1.5, norm.blend_logit.shape))
    return network


def write_images(folder, images):
    folder.mkdir(parents=True)
    for index, image in enumerate(images):
        png = tf.io.encode_png(tf.cast(tf.round(image * 255), tf.uint8))
        (folder / f"{index:03d}.png").write_bytes(png.numpy())


@pytest.fixture(scope="module")
def query_tasks(trained, tmp_path_factory):
    """In every mode, a task of 51 queries: {mode: (export dir, support, queries, future)}.

    The export is a randomised network's; support and queries are test
    images as their PNG files (in the task's folders) hold them; the future
    is of --mode=adapt on those folders, started as soon as the export is
    written, two commands at a time.
    """
    images = trained.splits["test"]
    support = np.round(255 * np.stack([images.images_of(label)[0] for label in range(WAY)])) / 255
    queries = np.round(255 * np.concatenate(
        [images.images_of(label)[1:18] for label in range(WAY)])[:51]) / 255
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=2)
    tasks = {}
    for bn_mode in BN_MODES:
        folder = tmp_path_factory.mktemp(bn_mode)
        export_dir = saved_model.export(randomised_network(bn_mode), INNER_STEPS,
                                        folder / "export")
        for label in range(WAY):
            write_images(folder / "support" / f"class{label}", support[label:label + 1])
        write_images(folder / "queries", queries)
        tasks[bn_mode] = (export_dir, support, queries, pool.submit(
            run_main, "--mode=adapt", f"--export_dir={export_dir}",
            f"--support_dir={folder / 'support'}", f"--query_dir={folder / 'queries'}"))
    yield tasks
    pool.shutdown(wait=True)


@pytest.mark.parametrize("bn_mode", BN_MODES)
def test_a_querys_answer_does_not_depend_on_the_other_queries(bn_mode, query_tasks):
    """Through the SavedModel, alone or among 50 others; through --mode=adapt, among them
    as the SavedModel answers it alone; in every mode."""
    export_dir, support, queries, command = query_tasks[bn_mode]
    adapt = tf.saved_model.load(str(export_dir)).signatures["adapt_and_predict"]
    alone = answers_alone_as_among_others(adapt, support, queries)
    completed = command.result()
    assert completed.returncode == 0, completed.stderr[-2000:]
    rows = [line.split("\t") for line in completed.stdout.strip().splitlines()]
    assert len(rows) == 51
    for index, answer in alone.items():
        name, predicted, probability = rows[index]
        assert name == f"{index:03d}.png"
        # The class, and the probability to the three places printed.
        assert predicted == f"class{answer.argmax()}"
        assert float(probability) == pytest.approx(answer.max(), abs=1e-3)


# per_step's first row is direct's one.
@pytest.mark.parametrize("task_norm_alpha, task_norm_unbiased",
                         [("per_step", True), ("reptile", False)])
def test_task_norms_other_forms_answer_each_query_on_its_own(task_norm_alpha, task_norm_unbiased,
                                                              tmp_path):
    """TaskNorm-I's other alphas and its unbiased variances, exported: a query alone or among
    50 others gets the same answer."""
    network = randomised_network(TASK_NORM, task_norm_alpha=task_norm_alpha,
                                 task_norm_unbiased=task_norm_unbiased)
    export_dir = saved_model.export(network, INNER_STEPS, tmp_path / "export")
    support, queries = noisy_episode(WAY, network.image_shape)
    answers_alone_as_among_others(tf.saved_model.load(str(export_dir)).signatures[
        "adapt_and_predict"], support, queries)
