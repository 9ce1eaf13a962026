"""The README's "Use it as a library" example runs as written, with fewer iterations."""

import pathlib
import re

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]

# The example's sizes, made small; everything else runs as the README has it.
SMALLER = {
    "EPOCHS, ITERATIONS_PER_EPOCH, STEPS = 100, 500, 5":
        "EPOCHS, ITERATIONS_PER_EPOCH, STEPS = 2, 5, 5",
    "num_tasks=600": "num_tasks=16",
    '"datasets/omniglot"': repr(str(REPO / "datasets" / "omniglot")),
}


def library_example():
    readme = (REPO / "README.md").read_text()
    section = readme.split("## Use it as a library", 1)[1].split("\n## ", 1)[0]
    (code,) = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    for written, smaller in SMALLER.items():
        assert written in code, written
        code = code.replace(written, smaller)
    return code


@pytest.mark.slow
def test_the_library_example_meta_trains_and_writes_its_callbacks_files(tmp_path, monkeypatch,
                                                                         capsys):
    monkeypatch.chdir(tmp_path)
    namespace = {}
    exec(compile(library_example(), "README.md", "exec"), namespace)
    learner = namespace["learner"]
    assert int(learner.optimizer.iterations.numpy()) == 2 * 5
    assert learner.phase[1:] == learner.phase_at(1)[1:]  # MSL and DA of the last epoch
    assert list((tmp_path / "logs").glob("train/events.out.tfevents.*"))
    assert "'accuracy'" in capsys.readouterr().out
