"""The README's "Use it as a library" example runs as written, with fewer iterations."""

import pathlib
import re
import zipfile

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


def write_task_files(folder):
    """The example's new task: one Omniglot evaluation drawing per class, and one to classify."""
    with zipfile.ZipFile(REPO / "datasets" / "omniglot" / "images_evaluation.zip") as archive:
        characters = sorted({name.rsplit("/", 1)[0] for name in archive.namelist()
                             if name.endswith(".png")})[:5]
        drawings = [sorted(name for name in archive.namelist()
                           if name.startswith(character + "/") and name.endswith(".png"))
                    for character in characters]
        (folder / "support").mkdir()
        for name, files in zip("abcde", drawings):
            (folder / "support" / f"{name}.png").write_bytes(archive.read(files[0]))
        (folder / "query.png").write_bytes(archive.read(drawings[2][1]))  # class c


@pytest.mark.slow
def test_the_library_example_meta_trains_exports_and_adapts_to_image_files(tmp_path, monkeypatch,
                                                                            capsys):
    monkeypatch.chdir(tmp_path)
    write_task_files(tmp_path)
    namespace = {}
    exec(compile(library_example(), "README.md", "exec"), namespace)
    learner = namespace["learner"]
    assert int(learner.optimizer.iterations.numpy()) == 2 * 5
    assert learner.phase[1:] == learner.phase_at(1)[1:]  # MSL and DA of the last epoch
    assert list((tmp_path / "logs").glob("train/events.out.tfevents.*"))
    printed = capsys.readouterr().out.strip().splitlines()
    assert "'accuracy'" in printed[-2]
    probabilities = namespace["answer"]["probabilities"].numpy()
    assert probabilities.shape == (1, 5) and abs(probabilities.sum() - 1) < 1e-5
    assert printed[-1] == str(probabilities.argmax())
