"""Specification of tools/class_groups.py: a run's best checkpoint scored on groups of test
classes, one line and one JSON entry per group, with the run directory only read."""

import json
import re

import numpy as np
import pytest

from conftest import run_python


def files(run_dir):
    """Every file under `run_dir` with its size and modification time."""
    return {str(path.relative_to(run_dir)): (path.stat().st_size, path.stat().st_mtime_ns)
            for path in run_dir.rglob("*")}


@pytest.mark.slow
def test_groups_are_scored_and_the_run_is_only_read(tiny_run, tmp_path):
    before = files(tiny_run.path)
    output = tmp_path / "groups.json"
    completed = run_python("-m", "tools.class_groups", f"--run_dir={tiny_run.path}",
                           "--tasks_per_group=2", "--groups=2", f"--json={output}")
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert files(tiny_run.path) == before
    lines = completed.stdout.splitlines()
    # Omniglot's 423 test classes in two groups.
    assert [line.split(":")[0] for line in lines[:2]] == ["test group 0, 212 classes",
                                                          "test group 1, 211 classes"]
    assert [line.split(":")[0] for line in lines[2:4]] == ["train_unrotated", "train_stream"]
    assert "task noise alone" in lines[4] and "validation logged" in lines[4]
    printed = [float(number) for number in re.findall(r"(\d+\.\d+)%", completed.stdout)]
    assert printed and all(0 <= number <= 100 for number in printed)
    figures = json.loads(output.read_text())
    assert [group["classes"] for group in figures["groups"]] == [212, 211]
    fractions = [value for group in figures["groups"] for value in group.values()
                 if isinstance(value, float)]
    fractions += [figures[name]["mean"] for name in ("train_unrotated", "train_stream")]
    fractions += [figures[name] for name in ("group_sd", "task_noise_sd", "class_sd",
                                             "val_accuracy_logged")] + figures["group_range"]
    assert all(0 <= value <= 1 for value in fractions)
    # The spread is the group means' own, less what the tasks' noise alone explains.
    means = np.array([group["mean"] for group in figures["groups"]])
    noise = np.sqrt(np.mean([group["sd"] ** 2 for group in figures["groups"]]) / 2)
    np.testing.assert_allclose([figures["group_sd"], figures["task_noise_sd"], figures["class_sd"]],
                               [means.std(ddof=1), noise,
                                np.sqrt(max(means.var(ddof=1) - noise ** 2, 0))], atol=1e-9)
    assert figures["group_range"] == [means.min(), means.max()]
    trained_in = json.loads((tiny_run.path / "config.json").read_text())["bn_mode"]
    assert figures["bn_mode"] == trained_in and figures["tasks_per_group"] == 2
