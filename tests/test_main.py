"""The command line, run as a user runs it: `python main.py ...` in a subprocess."""

import concurrent.futures
import json

import pytest

from conftest import run_main, scalars, tensorboard_events
from tf_mamlpp.core.batch_norm_modes import BN_MODES, TRANSDUCTIVE

pytestmark = pytest.mark.slow

WAY = 5

# A short first-order run: 120 meta-iterations of 4 tasks, 2 inner steps, MSL
# in every epoch, so that the meta-update is traced once. It tested at 69.2% ±
# 3.6 (seed 0) and 66.3% ± 3.4 (seed 1); MSL in the first epoch only, 64.4% ±
# 3.6 (seed 0). Without meta-learning (the meta-learning rate at 1e-9, only
# the inner loop on a random initialisation) the same command tests at 39%;
# chance is 20%. Transductive, the paper's mode, scored as trained and as exported.
SHORT_RUN = ["--dataset=omniglot", f"--way={WAY}", "--shot=1", "--epochs=3",
             "--iters_per_epoch=40", "--inner_steps=2", "--second_order=false", "--batch_size=4",
             "--msl_epochs=3", "--val_tasks=32", "--test_tasks=150", "--ensemble_top_k=2",
             f"--bn_mode={TRANSDUCTIVE}"]

# The cheapest run found that tells each other batch-norm mode from one stuck
# at chance: 80 meta-iterations of a 16-filter network at a meta-learning rate
# of 1e-2, tested on 300 tasks of 3 queries a class. It tested at 39% to 44%
# in the running mode (seeds 0, 1 and 2), the slowest to learn (its banks
# start far from the activations' statistics, and every target is put in one
# class until they come near), and at 54% in task_norm and 65% in support
# (seed 0). After 40 meta-iterations, even of 32 filters, the running mode was
# at 23% to 30%.
MODE_RUN = ["--dataset=omniglot", f"--way={WAY}", "--shot=1", "--query=3", "--epochs=1",
            "--iters_per_epoch=80", "--filters=16", "--meta_lr=1e-2", "--inner_steps=2",
            "--second_order=false", "--batch_size=4", "--val_tasks=4", "--test_tasks=300",
            "--ensemble_top_k=1"]

SHORT_RUN_TIMEOUT = 900  # seconds


def run_to_the_end(logdir, flags, experiment):
    """(run directory, completed process) of `main.py FLAGS` run to its end as `experiment`."""
    completed = run_main(f"--logdir={logdir}", *flags, f"--experiment={experiment}",
                         timeout=SHORT_RUN_TIMEOUT)
    assert completed.returncode == 0, completed.stderr[-3000:]
    return logdir / experiment, completed


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The short run, and a mode run in each other batch-norm mode, two at a time from
    the module's start: name ("short" or the mode) -> future of `run_to_the_end`'s."""
    logdir = tmp_path_factory.mktemp("runs")
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=2)
    futures = {"short": pool.submit(run_to_the_end, logdir, SHORT_RUN, "short")}
    for mode in BN_MODES:
        if mode != TRANSDUCTIVE:  # the short run's mode
            futures[mode] = pool.submit(run_to_the_end, logdir,
                                        [*MODE_RUN, f"--bn_mode={mode}"], mode)
    yield futures
    pool.shutdown(wait=True)


@pytest.fixture(scope="module")
def short_run(runs):
    return runs["short"].result()


def test_short_omniglot_run_learns(short_run):
    run_dir, _ = short_run
    results = json.loads((run_dir / "results.json").read_text())
    # Far above chance (20%) and above the un-meta-trained 39%.
    assert results["test_accuracy"] - results["test_interval"] > 0.55
    assert results["test_tasks"] == 150


def read_results(run_dir):
    return json.loads((run_dir / "results.json").read_text())


@pytest.mark.parametrize("mode", BN_MODES)
def test_every_batch_norm_mode_trains_and_tests_above_chance(mode, runs):
    """Each offered mode's run tests at twice its interval above chance or more.

    A mode stuck at chance scores within one interval of it 95% of the time,
    so it would pass with a probability under 1e-4. That meta-learning beats
    the un-meta-trained network is test_short_omniglot_run_learns' to show;
    that every mode trains every meta-parameter, test_meta_learner.py's.
    """
    run_dir, _ = runs["short" if mode == TRANSDUCTIVE else mode].result()
    results = read_results(run_dir)
    assert results["bn_mode"] == mode
    assert results["test_tasks"] == (150 if mode == TRANSDUCTIVE else 300)
    assert results["test_accuracy"] - 2 * results["test_interval"] > 1 / WAY, results


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


def test_a_transductive_run_shows_validation_and_test_in_both_modes_in_tensorboard(short_run):
    """As trained (transductive) and as its export serves it (support), under their own tags."""
    run_dir, _ = short_run
    events = tensorboard_events(run_dir)
    history = json.loads((run_dir / "history.json").read_text())
    results = read_results(run_dir)
    for mode, tested in (("transductive", results), ("support", results["serving"])):
        accuracy = scalars(events, f"val_{mode}/accuracy")
        assert list(accuracy.values()) == pytest.approx(
            [record[f"val_accuracy_{mode}"] for record in history], rel=1e-6)
        assert tested["bn_mode"] == mode
        (test_accuracy,) = scalars(events, f"test_{mode}/ensemble_accuracy").values()
        assert test_accuracy == pytest.approx(tested["test_accuracy"], rel=1e-6)


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
