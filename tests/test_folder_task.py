"""Specification of `main.py --mode=adapt`: a new task from image folders, as a user runs it.

The session's tiny run (conftest.TINY_RUN) is the exported model; the task's
folders hold real Omniglot PNG files, taken unchanged from the shipped
archive (105x105, resized by the command as in training), one sub-folder per
character named after it. Every case is its own `python main.py` process;
they run two at a time.
"""

import concurrent.futures
import pathlib
import shutil
import zipfile

import pytest
import tensorflow as tf

from conftest import REPO, TINY_RUN, run_main
from tf_mamlpp.data.class_images import DataError
from tf_mamlpp.serving.folder_task import classify_folders

ARCHIVE = REPO / "datasets" / "omniglot" / "images_evaluation.zip"
WAY = TINY_RUN["way"]
# Three characters of three alphabets of the evaluation archive. The export
# adapts with 5 inner steps, which fits the support set: each support drawing
# queried back comes out as its own class.
CHARACTERS = ("Angelic/character01", "Glagolitic/character05", "Tibetan/character10")


def class_name(character):
    return character.replace("/", "-")


def drawings(character):
    """The 20 PNG files of one character in the shipped archive: [(name, bytes)]."""
    with zipfile.ZipFile(ARCHIVE) as archive:
        names = sorted(name for name in archive.namelist()
                       if name.startswith(f"images_evaluation/{character}/")
                       and name.endswith(".png"))
        return [(pathlib.Path(name).name, archive.read(name)) for name in names]


def write_support(folder, characters=CHARACTERS, shots=1):
    for character in characters:
        (folder / class_name(character)).mkdir(parents=True)
        for name, png in drawings(character)[:shots]:
            (folder / class_name(character) / name).write_bytes(png)
    return folder


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """Support (one drawing per character) and the same drawings again as queries."""
    root = tmp_path_factory.mktemp("task")
    support = write_support(root / "support")
    queries = root / "queries"
    queries.mkdir()
    truth = {}
    for character in CHARACTERS:
        name, png = drawings(character)[0]
        (queries / f"{class_name(character)}_{name}").write_bytes(png)
        truth[f"{class_name(character)}_{name}"] = class_name(character)
    (queries / "README.txt").write_text("not an image; not looked at")
    return {"root": root, "support": support, "queries": queries, "truth": truth}


def adapt_flags(export_dir, support, query):
    return ["--mode=adapt", f"--export_dir={export_dir}", f"--support_dir={support}",
            f"--query_dir={query}"]


def error_cases(root, support, queries):
    """Folders a user may get wrong: name -> (support_dir, query_dir, words the error names)."""
    two_classes = write_support(root / "two_classes", CHARACTERS[:2])
    empty_class = write_support(root / "empty_class")
    shutil.rmtree(empty_class / class_name(CHARACTERS[1]))
    (empty_class / class_name(CHARACTERS[1])).mkdir()
    (empty_class / class_name(CHARACTERS[1]) / "notes.txt").write_text("no drawing here")
    corrupt = write_support(root / "corrupt")
    (corrupt / class_name(CHARACTERS[2]) / "broken.png").write_bytes(b"not a png at all")
    return {
        "wrong number of classes": (two_classes, queries, ["--support_dir", "2", f"{WAY}-way"]),
        "class without images": (empty_class, queries, [class_name(CHARACTERS[1]), "no images"]),
        "file that is not an image": (corrupt, queries, ["broken.png", "not a readable image"]),
        "missing support folder": (root / "nowhere", queries, ["--support_dir", "nowhere"]),
        "missing query folder": (support, root / "nowhere", ["--query_dir", "nowhere"]),
    }


@pytest.fixture(scope="module")
def commands(folders, tiny_run):
    """Runs every adapt command on the tiny run's export, two at a time.

    Returns {"results": name -> CompletedProcess, "expected_words": name -> words}.
    """
    export_dir = tiny_run.path / "export"
    errors = error_cases(folders["root"], folders["support"], folders["queries"])
    cases = {"task": (folders["support"], folders["queries"]),
             **{name: (support, queries) for name, (support, queries, _) in errors.items()}}
    with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
        futures = {name: pool.submit(run_main, *adapt_flags(export_dir, support, queries))
                   for name, (support, queries) in cases.items()}
        results = {name: future.result() for name, future in futures.items()}
    return {"results": results,
            "expected_words": {name: words for name, (_, _, words) in errors.items()}}


def parse(stdout):
    """Lines 'file<TAB>class<TAB>probability' -> {file: (class, probability)}."""
    rows = {}
    for line in stdout.strip().splitlines():
        name, predicted, probability = line.split("\t")
        rows[name] = (predicted, float(probability))
    return rows


@pytest.mark.slow
def test_one_line_per_query_file_with_a_class_of_the_support(commands, folders):
    completed = commands["results"]["task"]
    assert completed.returncode == 0, completed.stderr[-3000:]
    rows = parse(completed.stdout)
    assert sorted(rows) == sorted(folders["truth"])
    classes = {class_name(character) for character in CHARACTERS}
    for predicted, probability in rows.values():
        assert predicted in classes
        # The winning class of 3 has at least a third of the probability.
        assert probability >= 1 / WAY - 1e-3 and probability <= 1.0


@pytest.mark.slow
def test_the_support_drawings_themselves_get_their_own_class(commands, folders):
    """Adapted on them, the model classifies its support drawings as labelled."""
    rows = parse(commands["results"]["task"].stdout)
    assert {name: predicted for name, (predicted, _) in rows.items()} == folders["truth"]


@pytest.mark.parametrize("case", ["wrong number of classes", "class without images",
                                  "file that is not an image", "missing support folder",
                                  "missing query folder"])
@pytest.mark.slow
def test_bad_folders_are_a_one_line_error(commands, case):
    completed = commands["results"][case]
    assert completed.returncode == 2, completed.stdout
    assert completed.stdout == ""
    assert "Traceback" not in completed.stderr
    error = completed.stderr.strip().splitlines()[-1]
    assert error.startswith("error: ")
    for word in commands["expected_words"][case]:
        assert word in error, error


def test_an_export_without_the_file_signature_is_refused_naming_the_remedy(folders, tmp_path):
    """Exports made before adapt_and_predict_files decoded nothing themselves."""
    module = tf.Module()
    module.adapt = tf.function(lambda images: {"probabilities": images},
                               input_signature=[tf.TensorSpec((None,), tf.float32)])
    tf.saved_model.save(module, str(tmp_path / "old"), signatures={"adapt_and_predict":
                                                                   module.adapt})
    with pytest.raises(DataError, match=r"--export_dir .*old: .*--mode=export"):
        classify_folders(tmp_path / "old", folders["support"], folders["queries"])
