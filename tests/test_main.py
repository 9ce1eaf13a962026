"""The command line, run as a user runs it: `python main.py ...` in a subprocess."""

import json

import pytest

from conftest import run_main
from tf_mamlpp.core.batch_norm_modes import BN_MODES

pytestmark = pytest.mark.slow

# A short first-order run: 120 meta-iterations of 4 tasks, 2 inner steps.
# The same command with the meta-learning rate at 1e-9 (no meta-learning,
# only the inner loop on a random initialisation) is the baseline that every
# batch-norm mode must beat; chance is 20%.
SHORT_RUN = ["--dataset=omniglot", "--way=5", "--shot=1", "--epochs=3", "--iters_per_epoch=40",
             "--inner_steps=2", "--second_order=false", "--batch_size=4", "--msl_epochs=1",
             "--val_tasks=64", "--test_tasks=300", "--ensemble_top_k=2"]

SHORT_RUN_TIMEOUT = 900  # seconds


@pytest.fixture(scope="module")
def short_run(tmp_path_factory):
    logdir = tmp_path_factory.mktemp("runs")
    completed = run_main(f"--logdir={logdir}", *SHORT_RUN, "--experiment=short",
                         timeout=SHORT_RUN_TIMEOUT)
    assert completed.returncode == 0, completed.stderr[-3000:]
    return logdir / "short", completed


def test_short_omniglot_run_learns(short_run):
    run_dir, _ = short_run
    results = json.loads((run_dir / "results.json").read_text())
    # Far above chance (20%) and above the un-meta-trained 39%.
    assert results["test_accuracy"] - results["test_interval"] > 0.55
    assert results["test_tasks"] == 300


def read_results(run_dir):
    return json.loads((run_dir / "results.json").read_text())


@pytest.mark.parametrize("mode", BN_MODES)
def test_every_batch_norm_mode_learns(mode, short_run, tmp_path):
    """Each offered mode's short run tests above the un-meta-trained network in that mode."""
    if mode == "transductive":
        trained = read_results(short_run[0])
    else:
        completed = run_main(f"--logdir={tmp_path}", *SHORT_RUN, f"--bn_mode={mode}",
                             "--experiment=trained", timeout=SHORT_RUN_TIMEOUT)
        assert completed.returncode == 0, completed.stderr[-3000:]
        trained = read_results(tmp_path / "trained")
    completed = run_main(f"--logdir={tmp_path}", *SHORT_RUN, f"--bn_mode={mode}",
                         "--experiment=untrained", "--meta_lr=1e-9", "--ca=false", "--epochs=1",
                         "--iters_per_epoch=1", "--val_tasks=8", timeout=SHORT_RUN_TIMEOUT)
    assert completed.returncode == 0, completed.stderr[-3000:]
    untrained = read_results(tmp_path / "untrained")
    assert trained["bn_mode"] == untrained["bn_mode"] == mode
    assert trained["test_accuracy"] - trained["test_interval"] > untrained["test_accuracy"], (
        trained["test_accuracy"], untrained["test_accuracy"])


def test_run_directory_records_the_run(short_run):
    run_dir, completed = short_run
    config = json.loads((run_dir / "config.json").read_text())
    assert (config["way"], config["shot"], config["inner_steps"]) == (5, 1, 2)
    history = json.loads((run_dir / "history.json").read_text())
    assert [record["epoch"] for record in history] == [1, 2, 3]
    for record in history:
        assert 0.2 < record["val_accuracy"] <= 1.0
        assert record["val_accuracy"] == record["val_accuracy_transductive"]
        # The transductive model is also scored as its export serves it.
        assert 0.2 < record["val_accuracy_support"] <= 1.0
    assert len(json.loads((run_dir / "best.json").read_text())) == 2
    results = json.loads((run_dir / "results.json").read_text())
    assert sorted(model["epoch"] for model in results["models"]) == sorted(
        record["epoch"] for record in sorted(history, key=lambda r: -r["val_accuracy"])[:2])
    assert "test accuracy" in completed.stdout


def test_changed_network_is_refused_and_nothing_overwritten(short_run):
    run_dir, _ = short_run
    before = {path: path.read_bytes() for path in run_dir.glob("*.json")}
    completed = run_main(f"--logdir={run_dir.parent}", *SHORT_RUN, "--experiment=short",
                         "--way=20", timeout=SHORT_RUN_TIMEOUT)
    assert completed.returncode == 2
    error = completed.stderr.strip().splitlines()[-1]
    assert "--way=20" in error and "Traceback" not in completed.stderr
    assert {path: path.read_bytes() for path in run_dir.glob("*.json")} == before


def test_a_finished_run_run_again_says_so_and_redoes_nothing(short_run):
    run_dir, _ = short_run
    def files():  # but TensorBoard's new event file, and config.json, written at every start
        return {path: path.stat().st_mtime_ns for path in run_dir.rglob("*")
                if path.is_file() and "events.out" not in path.name
                and path.name != "config.json"}

    before = files()
    completed = run_main(f"--logdir={run_dir.parent}", *SHORT_RUN, "--experiment=short",
                         timeout=SHORT_RUN_TIMEOUT)
    assert completed.returncode == 0, completed.stderr[-2000:]
    message = completed.stdout.strip().splitlines()[-1]
    assert "finished run" in message and "results.json" in message
    assert "--mode=test" in message and "--fresh" in message
    assert "Resuming" not in completed.stderr and "test tasks" not in completed.stderr
    assert files() == before


def test_malformed_flag_is_a_one_line_error(tmp_path):
    completed = run_main(f"--logdir={tmp_path}", "--mode=teach")
    assert completed.returncode == 2
    assert completed.stderr.strip().splitlines() == [
        "error: flag --mode=teach: value should be one of <train|test|export|adapt>"]


def test_unknown_dataset_is_a_one_line_error(tmp_path):
    completed = run_main(f"--logdir={tmp_path}", "--dataset=imagenet21k")
    assert completed.returncode == 2
    assert "--dataset" in completed.stderr.strip().splitlines()[-1]
    assert not any(tmp_path.iterdir())
