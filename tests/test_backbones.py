"""Specification of tf_mamlpp.backbones, and of a user's backbone through every path the
built-in network has: a residual network's meta-gradients, task-parallel and 16-bit
meta-steps, the SavedModel that adapts, and `fit` under a tf.distribute strategy."""

import json
import textwrap

import keras
import numpy as np
import pytest
import tensorflow as tf

import tf_mamlpp
from conftest import answers_alone_as_among_others, noisy_episode, run_command, run_python
from tf_mamlpp.core.batch_norm_modes import BN_MODES
from tf_mamlpp.core.mixed_precision import DynamicLossScale, compute_dtype
from tf_mamlpp.core.schedules import Phase

WAY, STEPS, IMAGE_SHAPE, WIDTHS = 3, 2, (16, 16, 1), (4, 4, 4, 4)
MSL_WEIGHTS = np.array([0.4, 0.6], np.float32)


def tiny_conv4():
    return tf_mamlpp.conv4(IMAGE_SHAPE, WAY, filters=4, stages=2)


def tiny_resnet():
    return tf_mamlpp.resnet12(IMAGE_SHAPE, WAY, widths=WIDTHS)


def tiny_backbone(model=tiny_resnet, bn_mode="transductive", seed=0):
    """`model()` through `KerasBackbone`, with banks unlike their defaults."""
    keras.utils.set_random_seed(seed)
    backbone = tf_mamlpp.KerasBackbone(model(), STEPS, bn_mode=bn_mode)
    rng = np.random.default_rng(seed)
    for norm in backbone.norms:
        for bank, low, high in ((norm.gamma, 0.5, 1.5), (norm.beta, -0.3, 0.3),
                                (norm.moving_mean, -0.1, 0.1), (norm.moving_variance, 0.5, 2)):
            bank.assign(rng.uniform(low, high, bank.shape).astype(np.float32))
    return backbone


def layer_counts(model):
    counts = {}
    for layer in model.layers:
        counts[type(layer).__name__] = counts.get(type(layer).__name__, 0) + 1
    return counts


def test_resnet12_is_four_residual_blocks_of_the_given_widths_to_logits():
    model = tf_mamlpp.resnet12((28, 28, 1), 5, widths=(3, 5, 7, 9))
    counts = layer_counts(model)
    # Per block: three 3x3 convolutions and the 1x1 shortcut, each batch-normalised.
    assert (counts["Conv2D"], counts["BatchNormalization"]) == (16, 16)
    assert (counts["Add"], counts["MaxPooling2D"]) == (4, 4)
    assert model.output_shape == (None, 5)
    widths = [layer.filters for layer in model.layers
              if isinstance(layer, keras.layers.Conv2D) and layer.kernel_size == (1, 1)]
    assert widths == [3, 5, 7, 9]


def test_every_meta_parameter_of_a_residual_backbone_gets_a_meta_gradient(make_tasks):
    backbone = tiny_backbone()
    tasks = make_tasks(1, WAY, 1, 2, IMAGE_SHAPE)
    with tf.GradientTape() as tape:
        loss, _ = tf_mamlpp.outer_loss(backbone, tasks, Phase(MSL_WEIGHTS, True, True))
    gradients = tape.gradient(loss, backbone.trainable_variables)
    # 16 convolutions and the head, a rate for each, gamma and beta of 16 per-step norms.
    assert len(gradients) == 2 * 17 + 1 + 2 * 16
    silent = [v.path for v, g in zip(backbone.trainable_variables, gradients)
              if g is None or not np.any(g.numpy())]
    assert not silent


def meta_update(learner, tasks):
    learner.meta_update(tasks, Phase(tf.constant(MSL_WEIGHTS), True, True))
    return [v.numpy() for v in learner.network.variables]


def test_a_backbones_tasks_adapted_in_parallel_give_the_one_at_a_time_update(make_tasks):
    tasks = make_tasks(3, WAY, 1, 2, IMAGE_SHAPE)
    one_at_a_time, parallel = (
        meta_update(tf_mamlpp.MetaLearner(tiny_backbone(tiny_conv4), keras.optimizers.Adam(1e-2),
                                          parallel_tasks=count), tasks) for count in (1, 3))
    for alone, together in zip(one_at_a_time, parallel):
        np.testing.assert_allclose(together, alone, rtol=1e-5, atol=1e-6)


def test_a_backbone_meta_trains_in_16_bits(make_tasks):
    """Its layers compute in the 16-bit dtype, and the meta-gradient points where float32's does.

    On the 4-stage network, where 16-bit round-off stays small: its cosine to
    float32's was 0.98 to 0.9999 here, where a wrong cast or loss scale gives
    an unrelated direction (a deep, narrow ResNet in bfloat16 is off by a few
    percent in its logits already).
    """
    tasks = make_tasks(1, WAY, 1, 2, IMAGE_SHAPE)
    dtype = compute_dtype()

    def meta_gradient(loss_scale):
        learner = tf_mamlpp.MetaLearner(tiny_backbone(tiny_conv4), keras.optimizers.Adam(1e-2),
                                        loss_scale=loss_scale)
        step = tf.function(learner._tasks_step)
        phase = Phase(tf.constant(MSL_WEIGHTS), True, True)
        graph = step.get_concrete_function(tasks, phase).graph
        gradient = tf.concat([tf.reshape(g, [-1]) for g in step(tasks, phase)["gradients"]], 0)
        return gradient.numpy(), graph

    full, _ = meta_gradient(None)
    sixteen, graph = meta_gradient(DynamicLossScale(2.0**10, compute_dtype=dtype))
    convolutions = [op for op in graph.get_operations() if op.type == "Conv2D"]
    assert convolutions and {op.get_attr("T") for op in convolutions} == {dtype}
    cosine = full @ sixteen / (np.linalg.norm(full) * np.linalg.norm(sixteen))
    assert cosine > 0.95, cosine


@pytest.fixture(scope="module")
def episode():
    return noisy_episode(WAY, IMAGE_SHAPE)


@pytest.mark.slow
@pytest.mark.parametrize("bn_mode", BN_MODES)
def test_a_backbones_export_answers_each_query_on_its_own(bn_mode, episode, tmp_path):
    """Alone or among 50 others: as the built-in network's export (tests/test_export.py)."""
    backbone = tiny_backbone(tiny_conv4, bn_mode)
    adapt = tf.saved_model.load(str(tf_mamlpp.export(backbone, STEPS, tmp_path / "export")))
    support, queries = episode
    answers_alone_as_among_others(adapt.signatures["adapt_and_predict"], support, queries)
    features = adapt.signatures["embed"](images=tf.constant(queries[:2]))["features"]
    assert features.shape == (2, 4 * 4 * 4)  # the head's input: 4x4 maps of 4 filters


# A fresh Python with only TensorFlow and numpy, run from outside the repository.
LOADER = textwrap.dedent("""
    import json, sys
    import numpy as np
    import tensorflow as tf

    export_dir, episode_file = sys.argv[1:]
    episode = np.load(episode_file)
    model = tf.saved_model.load(export_dir)
    out = model.signatures["adapt_and_predict"](
        support_images=tf.constant(episode["support_images"]),
        support_labels=tf.constant(episode["support_labels"]),
        query_images=tf.constant(episode["query_images"]))
    print(json.dumps({"probabilities": out["probabilities"].numpy().tolist(),
                      "tf_mamlpp_loaded": any(name.startswith("tf_mamlpp")
                                              for name in sys.modules)}))
""")


@pytest.mark.slow
def test_a_backbones_export_serves_without_the_project_and_through_tensorflow_1s_loader(
        episode, tmp_path):
    """On the 4-stage network written as a Keras model: the residual one's export is
    test_builders.py's, through main.py."""
    backbone = tiny_backbone(tiny_conv4, bn_mode="support")
    export_dir = tf_mamlpp.export(backbone, STEPS, tmp_path / "export")
    support, queries = episode
    inputs = {"support_images": support, "support_labels": np.arange(WAY, dtype=np.int32),
              "query_images": queries[:5]}
    np.savez(tmp_path / "episode.npz", **inputs)
    expected = tf.saved_model.load(str(export_dir)).signatures["adapt_and_predict"](
        **{name: tf.constant(value) for name, value in inputs.items()})["probabilities"].numpy()
    (tmp_path / "load.py").write_text(LOADER)
    loaded = run_python(str(tmp_path / "load.py"), str(export_dir), str(tmp_path / "episode.npz"),
                        cwd=tmp_path, env={"PATH": "/usr/bin:/bin", "TF_CPP_MIN_LOG_LEVEL": "2"})
    assert loaded.returncode == 0, loaded.stderr[-3000:]
    report = json.loads(loaded.stdout.strip().splitlines()[-1])
    assert not report["tf_mamlpp_loaded"]
    np.testing.assert_allclose(report["probabilities"], expected, rtol=1e-4, atol=1e-4)
    for name, value in inputs.items():
        np.save(tmp_path / f"{name}.npy", value)
    cli = run_command(["saved_model_cli", "run", "--dir", str(export_dir), "--tag_set", "serve",
                       "--signature_def", "adapt_and_predict", "--outdir", str(tmp_path / "cli"),
                       "--inputs", ";".join(f"{name}={tmp_path / name}.npy" for name in inputs)])
    assert cli.returncode == 0, cli.stderr[-3000:]
    np.testing.assert_allclose(np.load(tmp_path / "cli" / "probabilities.npy"), expected,
                               rtol=1e-4, atol=1e-4)


# Two logical CPUs stand in for two GPUs; they must be set before TensorFlow starts, so
# the fits run in a process of their own, all four in one: one MirroredStrategy object
# serves both kinds (two in one process can mix up their collective ops). Plain gradient
# descent: the update is the meta-gradient.
MIRRORED_FITS = textwrap.dedent("""
    import json
    import numpy as np, tensorflow as tf, keras
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(
        cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    import tf_mamlpp
    from tf_mamlpp.data.random_tasks import random_tasks

    def network(kind):
        if kind == "builtin":
            return tf_mamlpp.MamlppNetwork(3, (16, 16, 1), 2, filters=4, num_stages=2)
        return tf_mamlpp.KerasBackbone(tf_mamlpp.conv4((16, 16, 1), 3, filters=4, stages=2), 2)

    def fitted_variables(kind, strategy):
        keras.utils.set_random_seed(0)
        with strategy.scope():
            fitted = network(kind)
            meta_learner = tf_mamlpp.MetaLearner(fitted, keras.optimizers.SGD(0.1))
        batch = random_tasks(4, 3, 1, 2, image_shape=(16, 16, 1))
        meta_learner.fit(tf.data.Dataset.from_tensors(batch), epochs=1, verbose=0)
        return [np.asarray(v.numpy()).tolist() for v in fitted.variables]

    strategies = {"single": tf.distribute.get_strategy(),
                  "mirrored": tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])}
    print(json.dumps({kind: {name: fitted_variables(kind, strategy)
                             for name, strategy in strategies.items()}
                      for kind in ("builtin", "backbone")}))
""")


@pytest.fixture(scope="module")
def mirrored_fits():
    """kind -> {"single" or "mirrored": the variables after one fit}."""
    completed = run_python("-c", MIRRORED_FITS)
    assert completed.returncode == 0, completed.stderr[-3000:]
    return json.loads(completed.stdout.strip().splitlines()[-1])


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["builtin", "backbone"])
def test_fit_under_a_mirrored_strategy_gives_the_single_device_update(mirrored_fits, kind):
    """Two replicas, each with half of the tasks, move every variable as one device does."""
    single, mirrored = (mirrored_fits[kind][strategy] for strategy in ("single", "mirrored"))
    assert len(single) == len(mirrored)
    moved = 0
    for alone, replicated in zip(single, mirrored):
        np.testing.assert_allclose(replicated, alone, rtol=1e-4, atol=1e-5)
        moved += 1
    assert moved > 0
