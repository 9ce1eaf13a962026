"""Specification of resuming: a run stopped at any moment continues as if never stopped.

Real `python main.py` processes are killed (SIGKILL), interrupted (SIGINT,
SIGTERM) and run again; with --deterministic the resumed run must end with
the validation accuracies and test results of an uninterrupted run of the
same command. Two chains of processes run side by side, and beside the
in-process tests, to keep the file fast; every wait is bounded.

Two in-process tests stop a run at the two moments a signal can hardly be
timed to hit: on the last iteration of an epoch, and between the epoch's
latest checkpoint and its best-checkpoint bookkeeping.
"""

import concurrent.futures
import dataclasses
import json
import signal
import time

import pytest

from conftest import TIMEOUT, MainProcess

pytestmark = pytest.mark.slow

ITERS_PER_EPOCH = 8
# Two epochs of 8 first-order meta-iterations on 3-way 1-shot Omniglot with an
# 8-filter network: about 15 s a process on 2 cores, most of it tracing. Transductive:
# validated in two modes, the most a resumed run must repeat.
RUN = ["--way=3", "--shot=1", "--inner_steps=1", "--filters=8", "--batch_size=2",
       f"--iters_per_epoch={ITERS_PER_EPOCH}", "--epochs=2", "--val_tasks=8", "--test_tasks=8",
       "--second_order=false", "--deterministic", "--bn_mode=transductive", "--experiment=run"]
# Flags (after RUN's) the existing run cannot continue under.
REFUSED = ["--way=5", "--shot=2", "--filters=16", f"--iters_per_epoch={ITERS_PER_EPOCH // 2}"]


def start_in(logdir, flags, name):
    """main.py on `logdir` in the background, its output in logdir/`name`.stdout and .stderr."""
    return MainProcess([f"--logdir={logdir}", *flags], output=logdir / name)


def run_to_end(logdir, flags, name):
    process = start_in(logdir, flags, name)
    process.wait()
    return process


def read_json(path):
    return json.loads(path.read_text())


def epoch_1_is_saved(run_dir):
    """True once epoch 1's history, best checkpoint and latest checkpoint are all written."""
    best, state = run_dir / "best.json", run_dir / "checkpoints" / "latest" / "checkpoint"
    history = run_dir / "history.json"  # written last, after the best checkpoint
    return (best.exists() and any(entry[1] == 1 for entry in read_json(best))
            and history.exists() and len(read_json(history)) >= 1
            and state.exists()
            and f'model_checkpoint_path: "ckpt-{ITERS_PER_EPOCH}"' in state.read_text())


def checkpoint_numbers(run_dir):
    """Meta-iterations of the latest checkpoints on disk, ascending."""
    return sorted(int(path.name[len("ckpt-"):-len(".index")])
                  for path in (run_dir / "checkpoints" / "latest").glob("ckpt-*.index"))


def snapshot(run_dir):
    """Every file under the run directory: path -> (bytes, mtime)."""
    return {path.relative_to(run_dir): (path.read_bytes(), path.stat().st_mtime_ns)
            for path in sorted(run_dir.rglob("*")) if path.is_file()}


def reference_chain(logdir):
    """An uninterrupted run; then a command it must refuse, and one with --fresh."""
    reference = run_to_end(logdir, RUN, "reference")
    assert reference.popen.returncode == 0, reference.stderr[-3000:]
    run_dir = logdir / "run"
    before = snapshot(run_dir)
    time.sleep(0.05)  # so that a rewrite would show in the mtimes
    refused = run_to_end(logdir, [*RUN, *REFUSED], "refused")
    after_refusal = snapshot(run_dir)
    fresh = run_to_end(logdir, [*RUN, "--fresh", "--epochs=1", "--iters_per_epoch=1",
                                "--val_tasks=2", "--test_tasks=2"], "fresh")
    return {"reference": reference, "run_dir": run_dir, "before": before,
            "refused": refused, "after_refusal": after_refusal,
            "fresh": fresh, "after_fresh": snapshot(run_dir)}


def interrupted_chain(logdir):
    """One run stopped three ways, each time in epoch 2, then run to the end.

    SIGKILL once epoch 1 is saved; SIGINT as soon as the next process
    resumes; SIGTERM as soon as the one after resumes; a fourth finishes.
    """
    run_dir = logdir / "run"
    record = {"run_dir": run_dir}
    killed = start_in(logdir, RUN, "sigkill")
    killed.wait_until(lambda: epoch_1_is_saved(run_dir), "epoch 1 was saved")
    killed.popen.send_signal(signal.SIGKILL)
    killed.wait()
    record["SIGKILL"] = {"process": killed, "history": read_json(run_dir / "history.json"),
                         "checkpoints": checkpoint_numbers(run_dir),
                         "results_exist": (run_dir / "results.json").exists()}
    for signal_number in (signal.SIGINT, signal.SIGTERM):
        process = start_in(logdir, RUN, signal_number.name)
        process.wait_until(lambda: "Resuming at epoch" in process.stderr, "the run resumed")
        process.popen.send_signal(signal_number)
        process.wait()
        record[signal_number.name] = {"process": process,
                                      "history": read_json(run_dir / "history.json"),
                                      "checkpoints": checkpoint_numbers(run_dir)}
    record["last"] = run_to_end(logdir, RUN, "last")
    return record


@pytest.fixture(scope="module", autouse=True)
def chains(tmp_path_factory):
    """The two chains of processes, started with the module: name -> future of its record.

    They run while the in-process tests below do, on the other core.
    """
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=2)
    futures = {chain.__name__: pool.submit(chain, tmp_path_factory.mktemp(chain.__name__))
               for chain in (reference_chain, interrupted_chain)}
    yield futures
    pool.shutdown(wait=True)


@pytest.fixture(scope="module")
def reference(chains):
    return chains["reference_chain"].result(timeout=6 * TIMEOUT)


@pytest.fixture(scope="module")
def interrupted(chains):
    return chains["interrupted_chain"].result(timeout=6 * TIMEOUT)


# In-process, while the processes run: stops at moments a signal cannot be timed to hit.
# One epoch of two meta-iterations, so the second process only has to validate
# and test (no second trace of the meta-step): an epoch lost shows as a run
# with nothing to test.

def one_epoch_config():
    from tf_mamlpp.run import config
    return config.resolve("omniglot", way=3, shot=1, inner_steps=1, filters=8, batch_size=2,
                          iters_per_epoch=2, epochs=1, val_tasks=4, test_tasks=4,
                          second_order=False, mixed_precision=False)


def open_run(tmp_path, config):
    """The run directory as each process opens it; export is not under test here
    (the trainer leaves an empty export folder alone), so it is skipped."""
    from tf_mamlpp.run.run_directory import RunDirectory
    run_dir = RunDirectory.open(tmp_path, "run", config)
    (run_dir.path / "export").mkdir(exist_ok=True)
    return run_dir


def assert_epoch_1_validated_kept_and_tested(run_dir):
    assert [record["epoch"] for record in run_dir.read_history()] == [1]
    assert [epoch for _, epoch, _ in run_dir.best_checkpoints()] == [1]
    results = json.loads((run_dir.path / "results.json").read_text())
    assert [model["epoch"] for model in results["models"]] == [1]


def test_stop_during_the_last_iteration_of_an_epoch_still_validates_that_epoch(tmp_path):
    from tf_mamlpp.run.trainer import RunComplete, Trainer, TrainingInterrupted

    config = one_epoch_config()
    first = Trainer(config, open_run(tmp_path, config))
    meta_update = first.meta_learner.meta_update
    calls = []

    def signal_during_the_last_iteration(*args):
        calls.append(None)
        if len(calls) == config.iters_per_epoch:
            first.request_stop()  # what the SIGINT/SIGTERM handler does
        return meta_update(*args)

    first.meta_learner.meta_update = signal_during_the_last_iteration
    try:
        first.train()
    except TrainingInterrupted:
        pass  # the command says to run it again
    # The stop came in the run's last iteration: the run validated, tested and
    # exported, and running it again redoes nothing.
    assert_epoch_1_validated_kept_and_tested(first.run_dir)
    with pytest.raises(RunComplete):
        Trainer(config, open_run(tmp_path, config)).train()


def test_a_failed_validation_costs_no_training(tmp_path):
    """The epoch's checkpoint is written before it is validated; the rerun only validates."""
    from tf_mamlpp.run.trainer import Trainer

    # Task counts that are not multiples of the batch size (2).
    config = dataclasses.replace(one_epoch_config(), val_tasks=5, test_tasks=3)
    first = Trainer(config, open_run(tmp_path, config))

    def failing_validation(epoch):
        raise OSError("validation data went away")

    first.scoring.validate = failing_validation
    with pytest.raises(OSError):
        first.train()
    second = Trainer(config, open_run(tmp_path, config))
    trained_again = []
    second.meta_learner.meta_update = lambda *args: trained_again.append(args)
    second.train()
    assert trained_again == []
    assert second.iterations_done == config.iters_per_epoch
    assert_epoch_1_validated_kept_and_tested(second.run_dir)


class Killed(BaseException):
    """Stands for SIGKILL: nothing after it runs."""


def test_kill_between_the_latest_and_the_best_checkpoint_keeps_that_epoch(tmp_path):
    from tf_mamlpp.run.trainer import Trainer

    config = one_epoch_config()
    first = Trainer(config, open_run(tmp_path, config))

    def killed(*args):
        raise Killed()

    first.run_dir._keep_if_best = killed  # after validation, before the history
    with pytest.raises(Killed):
        first.train()
    second = Trainer(config, open_run(tmp_path, config))
    second.train()
    assert_epoch_1_validated_kept_and_tested(second.run_dir)


# The processes.

def val_accuracies(run_dir):
    return [(record["epoch"], record["val_accuracy"], record["val_accuracy_support"])
            for record in read_json(run_dir / "history.json")]


def test_uninterrupted_run_finishes(reference):
    run_dir = reference["run_dir"]
    assert [epoch for epoch, *_ in val_accuracies(run_dir)] == [1, 2]
    assert len(read_json(run_dir / "results.json")["models"]) == 2


def test_a_deterministic_run_trains_in_float32_without_a_timing_probe(reference):
    """A probe's timing may choose 16 bits in one run of the command and not the next."""
    assert read_json(reference["run_dir"] / "config.json")["mixed_precision"] is False
    assert "a probe meta-step took" not in reference["reference"].stderr
    assert "--mixed_precision=auto with --deterministic" in reference["reference"].stderr


def test_sigkill_in_epoch_2_leaves_epoch_1_to_resume_from(interrupted):
    killed = interrupted["SIGKILL"]
    assert killed["process"].popen.returncode == -signal.SIGKILL
    assert [record["epoch"] for record in killed["history"]] == [1]
    assert killed["checkpoints"][-1] == ITERS_PER_EPOCH
    assert not killed["results_exist"]


@pytest.mark.parametrize("signal_name, resumed_at", [("SIGINT", 1), ("SIGTERM", 2)])
def test_signal_stops_after_an_iteration_with_a_checkpoint_and_says_how_to_resume(
        interrupted, signal_name, resumed_at):
    stopped = interrupted[signal_name]
    process = stopped["process"]
    assert process.popen.returncode == 0, process.stderr[-3000:]
    assert f"Resuming at epoch 2, iteration {resumed_at}." in process.stderr
    assert "Traceback" not in process.stderr
    lines = [line for line in process.stdout.splitlines() if "Run the same command again" in line]
    assert len(lines) == 1, process.stdout
    # The signal came while the first meta-step was being traced: the run
    # stops once that step is done, mid-epoch, and the checkpoint holds it.
    assert f"stopped at epoch 2, iteration {resumed_at}" in lines[0]
    assert stopped["checkpoints"][-1] == ITERS_PER_EPOCH + resumed_at
    assert [record["epoch"] for record in stopped["history"]] == [1]


def test_the_stopped_run_resumes_and_repeats_the_uninterrupted_run(reference, interrupted):
    last = interrupted["last"]
    assert last.popen.returncode == 0, last.stderr[-3000:]
    assert "Resuming at epoch 2, iteration 3." in last.stderr
    assert val_accuracies(interrupted["run_dir"]) == val_accuracies(reference["run_dir"])
    assert (read_json(interrupted["run_dir"] / "results.json")
            == read_json(reference["run_dir"] / "results.json"))


def test_the_stopped_run_records_the_whole_of_epoch_2_in_its_history(reference, interrupted):
    """An interrupted epoch's training figures cover all its iterations.

    Only the timing may differ: epoch 2's losses and norms must be the means
    over its 8 iterations, as in the uninterrupted run, not over the 6 after
    the last resume.
    """
    def training_figures(run_dir):
        return [{name: value for name, value in record.items()
                 if name.startswith("train_") and name != "train_seconds_per_iteration"}
                for record in read_json(run_dir / "history.json")]

    assert (training_figures(interrupted["run_dir"])
            == training_figures(reference["run_dir"]))


def test_changed_network_is_refused_naming_the_flags_and_nothing_is_touched(reference):
    refused = reference["refused"]
    assert refused.popen.returncode == 2
    assert "Traceback" not in refused.stderr
    error = refused.stderr.strip().splitlines()[-1]
    assert error.startswith("error: ")
    for flag in ("--way=5", "--shot=2", "--filters=16"):
        assert flag in error
    assert "--fresh" in error
    # config.json, history.json, the checkpoints: byte-identical, same mtimes.
    assert reference["after_refusal"] == reference["before"]


def test_changed_iterations_per_epoch_is_refused_too(reference):
    """The checkpoint's position is a count of meta-iterations and its epoch is that
    count over --iters_per_epoch. Rerun alone with --iters_per_epoch=4, this run
    is re-read as 4 finished epochs of 2 and goes straight to testing (exit 0);
    the flag must be refused and named like a changed network."""
    error = reference["refused"].stderr.strip().splitlines()[-1]
    assert f"--iters_per_epoch={ITERS_PER_EPOCH // 2}" in error


def test_fresh_starts_a_new_directory_and_keeps_the_old_one(reference):
    fresh = reference["fresh"]
    assert fresh.popen.returncode == 0, fresh.stderr[-3000:]
    new_dir = reference["run_dir"].parent / "run_2"
    assert read_json(new_dir / "config.json")["epochs"] == 1
    assert [record["epoch"] for record in read_json(new_dir / "history.json")] == [1]
    assert reference["after_fresh"] == reference["before"]


def test_progress_off_a_terminal_is_plain_lines(reference, interrupted):
    for process, epochs in ((reference["reference"], (1, 2)), (interrupted["last"], (2,))):
        stderr = process.stderr
        assert "\r" not in stderr
        lines = stderr.splitlines()
        assert [epoch for epoch in (1, 2) if any(
            line.startswith(f"epoch {epoch}/2 ") and "loss=" in line and " left " in line
            for line in lines)] == list(epochs)
        assert any(line.startswith("val tasks (transductive batch norm) 8/8 ") for line in lines)
        # A resumed epoch counts on from where it stopped, to the epoch's length.
        assert any(line.startswith(f"epoch 2/2 {ITERS_PER_EPOCH}/{ITERS_PER_EPOCH} ")
                   for line in lines)
