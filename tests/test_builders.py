"""Specification of tf_mamlpp.run.builders: the objects a configuration describes, and
`--backbone`, a user's Keras model factory, through the command line."""

import json
import textwrap

import keras
import numpy as np
import pytest

import tf_mamlpp
from conftest import run_main
from tf_mamlpp.config_error import ConfigError
from tf_mamlpp.core import evaluation
from tf_mamlpp.core.meta_learner import MetaLearner
from tf_mamlpp.run import builders, task_streams
from tf_mamlpp.run.config import resolve
from tf_mamlpp.run.run_directory import RunDirectory

FACTORIES = textwrap.dedent("""
    import tf_mamlpp

    def small_resnet(image_shape, way):
        return tf_mamlpp.resnet12(image_shape, way, widths=(8, 8, 8, 8))

    def broken(image_shape, way):
        raise RuntimeError("out of ideas")

    def one_logit_too_many(image_shape, way):
        return tf_mamlpp.conv4(image_shape, way + 1, filters=4)

    def not_a_model(image_shape, way):
        return "a string"
""")


@pytest.fixture
def factories(tmp_path, monkeypatch):
    """A user's module of backbone factories in the working directory."""
    (tmp_path / "my_backbones.py").write_text(FACTORIES)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_the_built_in_network_takes_the_settings_by_name():
    config = resolve("omniglot", way=3, inner_steps=2, filters=8, bnrs=False, lslr=False,
                     bn_mode="support")
    network = builders.build_network(config)
    assert isinstance(network, tf_mamlpp.MamlppNetwork)
    assert (network.way, network.inner_steps, network.filters) == (3, 2, 8)
    assert (network.bnrs, network.bnwb, network.lslr, network.bn_mode) == (
        False, True, False, "support")


def test_the_built_in_network_takes_task_norms_options_by_name():
    config = resolve("omniglot", way=3, inner_steps=2, filters=8, bn_mode="task_norm",
                     task_norm_alpha="reptile", task_norm_unbiased=True)
    network = builders.build_network(config)
    assert all((norm.task_norm_alpha, norm.task_norm_unbiased) == ("reptile", True)
               for norm in network.norms)


def test_a_backbone_factory_becomes_a_keras_backbone_with_the_settings(factories):
    config = resolve("omniglot", way=3, inner_steps=2, bnwb=False, inner_lr=0.2,
                     bn_mode="task_norm", task_norm_alpha="per_step", task_norm_unbiased=True,
                     backbone="my_backbones:small_resnet")
    network = builders.build_network(config)
    assert isinstance(network, tf_mamlpp.KerasBackbone)
    assert (network.way, network.image_shape, network.inner_steps) == (3, (28, 28, 1), 2)
    assert (network.bnwb, network.inner_lr, network.bn_mode) == (False, 0.2, "task_norm")
    assert all((norm.task_norm_alpha, norm.task_norm_unbiased, norm.blend_logit.shape)
               == ("per_step", True, (3,)) for norm in network.norms)
    assert sum(isinstance(layer, keras.layers.Add) for layer in network.backbone.layers) == 4


@pytest.mark.parametrize("spec, message", [
    ("my_backbones", "expected MODULE:FUNCTION"),
    ("no_such_module:f", "cannot import no_such_module"),
    ("my_backbones:missing", "my_backbones has no function missing"),
    ("my_backbones:broken", "the factory raised RuntimeError: out of ideas"),
    ("my_backbones:one_logit_too_many", "maps (None, 28, 28, 1) to (None, 6), not (28, 28, 1) "
                                        "images to 5 logits"),
    ("my_backbones:not_a_model", "returned str, not a Keras model"),
])
def test_a_bad_backbone_is_a_configuration_error_naming_it(factories, spec, message):
    with pytest.raises(ConfigError, match="backbone") as raised:
        builders.backbone_model(resolve("omniglot", backbone=spec))
    assert message in str(raised.value)
    assert str(raised.value).startswith(f"backbone={spec}: ")


# A short first-order run of a small ResNet-12 on Omniglot, 5-way 1-shot: 120
# meta-iterations in one epoch, so that the meta-update is traced once (tracing
# the ResNet, not training it, takes most of the run's time), on 300 test tasks,
# so that the intervals are narrow. It tested at 45.9% ± 2.3 from 30.3% ± 2.0
# untrained (seed 0), at 50.3% ± 2.5 from 33.3% ± 2.2 (seed 1): 11 and 12 points
# between the intervals, where three epochs of 40 on 100 tasks left 2.5 (41.8% ± 3.9
# from 32.2% ± 3.2, seed 0).
RESNET_RUN = ["--dataset=omniglot", "--backbone=my_backbones:small_resnet", "--way=5",
              "--shot=1", "--epochs=1", "--iters_per_epoch=120", "--inner_steps=2",
              "--second_order=false", "--batch_size=4", "--msl_epochs=1", "--meta_lr=0.005",
              "--val_tasks=20", "--test_tasks=300", "--ensemble_top_k=1", "--experiment=resnet"]


@pytest.fixture(scope="module")
def resnet_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("resnet")
    (folder / "my_backbones.py").write_text(FACTORIES)
    completed = run_main(f"--logdir={folder / 'runs'}", *RESNET_RUN, cwd=folder, timeout=900)
    assert completed.returncode == 0, completed.stderr[-3000:]
    return folder, completed


def untrained_accuracy(run_dir):
    """The run's test tasks scored with the initialisation it started from."""
    config = run_dir.config
    keras.utils.set_random_seed(config.seed)  # as the trainer, before it builds the network
    learner = MetaLearner(builders.build_network(config))
    images = task_streams.load_splits(config)
    tasks = task_streams.evaluation_tasks(config, images["test"], "test", config.test_tasks)
    result = evaluation.evaluate(learner, tasks, config.eval_inner_steps, config.bn_mode)
    return evaluation.mean_and_interval(result["accuracies"][:, -1])


@pytest.mark.slow
def test_a_residual_backbone_meta_trains_through_main_above_its_untrained_accuracy(
        resnet_run, monkeypatch):
    folder, _ = resnet_run
    monkeypatch.chdir(folder)
    run_dir = RunDirectory(folder / "runs" / "resnet")
    assert run_dir.config.backbone == "my_backbones:small_resnet"
    results = json.loads((run_dir.path / "results.json").read_text())
    before, before_interval = untrained_accuracy(run_dir)
    assert results["test_accuracy"] - results["test_interval"] > before + before_interval, (
        before, results["test_accuracy"])


@pytest.mark.slow
def test_the_residual_backbones_export_adapts_to_image_folders_through_main(resnet_run):
    folder, _ = resnet_run
    rng = np.random.default_rng(0)
    for index in range(5):
        (folder / "support" / f"class{index}").mkdir(parents=True)
        write_png(folder / "support" / f"class{index}" / "a.png", rng)
    (folder / "query").mkdir()
    for name in ("x.png", "y.png"):
        write_png(folder / "query" / name, rng)
    completed = run_main("--mode=adapt", f"--export_dir={folder / 'runs' / 'resnet' / 'export'}",
                         f"--support_dir={folder / 'support'}", f"--query_dir={folder / 'query'}")
    assert completed.returncode == 0, completed.stderr[-3000:]
    rows = [line.split("\t") for line in completed.stdout.strip().splitlines()]
    assert [row[0] for row in rows] == ["x.png", "y.png"]
    assert all(row[1] in {f"class{index}" for index in range(5)} and 0 < float(row[2]) <= 1
               for row in rows)


def write_png(path, rng):
    import tensorflow as tf
    pixels = tf.constant(rng.integers(0, 256, (28, 28, 1)), tf.uint8)
    path.write_bytes(tf.io.encode_png(pixels).numpy())


@pytest.mark.slow
def test_the_residual_backbones_run_resumes_as_finished_and_refuses_another_backbone(resnet_run):
    folder, _ = resnet_run
    again = run_main(f"--logdir={folder / 'runs'}", *RESNET_RUN, cwd=folder)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "holds a finished run" in again.stdout
    other = [flag if not flag.startswith("--backbone") else "--backbone=tf_mamlpp:conv4"
             for flag in RESNET_RUN]
    refused = run_main(f"--logdir={folder / 'runs'}", *other, cwd=folder)
    assert refused.returncode == 2
    (line,) = refused.stderr.strip().splitlines()[-1:]
    assert line.startswith("error: ") and "--backbone=tf_mamlpp:conv4" in line
    assert "run has my_backbones:small_resnet" in line


@pytest.mark.slow
def test_a_bad_backbone_ends_main_in_one_line_before_any_run_directory(factories):
    completed = run_main(f"--logdir={factories / 'runs'}", "--backbone=my_backbones:broken",
                         cwd=factories)
    assert completed.returncode == 2
    assert completed.stderr.strip().splitlines()[-1] == (
        "error: --backbone=my_backbones:broken: the factory raised RuntimeError: out of ideas")
    assert not (factories / "runs").exists()
