"""Specification of tf_mamlpp.core.keras_backbone: any Keras model as a MAML++ learner."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import tf_mamlpp
from tf_mamlpp.core.batch_norm_modes import BN_MODES, TASK_NORM
from tf_mamlpp.core.schedules import Phase
from tf_mamlpp.run.config import SHIPPED_DATA

WAY, STEPS, IMAGE_SHAPE, FILTERS = 3, 2, (8, 8, 1), 3


def builtin_as_keras(way=WAY, filters=FILTERS, stages=2):
    """The built-in network's architecture written as a user would, with standard layers."""
    return tf_mamlpp.conv4(IMAGE_SHAPE, way, filters, stages)


def twin_learners(bn_mode, **task_norm_options):
    """The built-in network, and its twin through `KerasBackbone`, with equal meta-parameters."""
    keras.utils.set_random_seed(0)
    builtin = tf_mamlpp.MamlppNetwork(WAY, IMAGE_SHAPE, STEPS, filters=FILTERS, num_stages=2,
                                      bn_mode=bn_mode, **task_norm_options)
    backbone = tf_mamlpp.KerasBackbone(builtin_as_keras(), STEPS, bn_mode=bn_mode,
                                       **task_norm_options)
    rng = np.random.default_rng(1)
    for name, variable in builtin.fast_variables.items():
        variable.assign(rng.normal(0, 0.5, variable.shape).astype(np.float32))
    for (_, mine), (_, theirs) in zip(builtin.fast_variables.items(),
                                      backbone.fast_variables.items()):
        theirs.assign(mine)
    pairs = list(zip(builtin.inner_rates.values(), backbone.inner_rates.values()))
    for norm, twin in zip(builtin.norms, backbone.norms):
        pairs += list(zip(norm.variables, twin.variables))
    for mine, theirs in pairs:
        mine.assign(rng.uniform(0.5, 1.0, mine.shape).astype(np.float32) * 0.2
                    if "inner_rate" in mine.path else
                    rng.uniform(0.5, 1.5, mine.shape).astype(np.float32))
        theirs.assign(mine)
    return builtin, backbone, pairs


def meta_gradients(learner, tasks, second_order):
    phase = Phase(np.array([0.3, 0.7], np.float32), True, second_order)
    with tf.GradientTape() as tape:
        loss, _ = tf_mamlpp.outer_loss(learner, tasks, phase)
    variables = learner.trainable_variables
    gradients = tape.gradient(loss, variables, unconnected_gradients="zero")
    return loss, {id(v): g for v, g in zip(variables, gradients)}


@pytest.mark.parametrize("second_order", [False, True], ids=["first order", "second order"])
@pytest.mark.parametrize("bn_mode", BN_MODES)
def test_the_builtin_network_as_a_keras_backbone_gives_the_same_meta_gradients(
        make_tasks, bn_mode, second_order):
    compared = compare_twins_meta_gradients(make_tasks, second_order, bn_mode)
    # conv and head weights, the rates, and every norm's gamma/beta (and blend).
    assert compared == 4 + 3 + 2 * (4 if bn_mode == TASK_NORM else 2)


@pytest.mark.parametrize("task_norm_alpha, task_norm_unbiased", [("per_step", True),
                                                                 ("reptile", False)])
def test_task_norms_options_give_the_backbone_the_built_in_networks_meta_gradients(
        make_tasks, task_norm_alpha, task_norm_unbiased):
    compared = compare_twins_meta_gradients(
        make_tasks, True, TASK_NORM, task_norm_alpha=task_norm_alpha,
        task_norm_unbiased=task_norm_unbiased)
    # conv and head weights, the rates, every norm's gamma/beta and per-state logits (if any).
    assert compared == 4 + 3 + 2 * (3 if task_norm_alpha == "per_step" else 2)


def compare_twins_meta_gradients(make_tasks, second_order, bn_mode, **task_norm_options):
    """Checks that `twin_learners` get equal losses and meta-gradients on a task; returns
    the number of trainable variables compared."""
    builtin, backbone, pairs = twin_learners(bn_mode, **task_norm_options)
    assert all((norm.task_norm_alpha, norm.task_norm_unbiased)
               == (builtin.task_norm_alpha, builtin.task_norm_unbiased)
               for norm in [*builtin.norms, *backbone.norms])
    tasks = make_tasks(1, WAY, 2, 2, IMAGE_SHAPE)
    loss, mine = meta_gradients(builtin, tasks, second_order)
    twin_loss, theirs = meta_gradients(backbone, tasks, second_order)
    np.testing.assert_allclose(twin_loss, loss, rtol=1e-5)
    weights = zip(builtin.fast_variables.values(), backbone.fast_variables.values())
    compared = 0
    for variable, twin in [*weights, *pairs]:
        if variable.trainable:
            np.testing.assert_allclose(theirs[id(twin)], mine[id(variable)], rtol=2e-4,
                                       atol=2e-6, err_msg=variable.path)
            compared += 1
    return compared


def test_banks_and_rates_are_created_for_the_backbone():
    backbone = tf_mamlpp.KerasBackbone(builtin_as_keras(), STEPS)
    assert [norm.gamma.shape for norm in backbone.norms] == [(STEPS + 1, FILTERS)] * 2
    assert list(backbone.inner_rates) == [layer.name for layer in backbone.backbone.layers
                                          if isinstance(layer, (keras.layers.Conv2D,
                                                                keras.layers.Dense))]
    # The user's batch-norm weights are the per-step banks' starting point, and frozen.
    user_norms = [layer for layer in backbone.backbone.layers
                  if isinstance(layer, keras.layers.BatchNormalization)]
    assert not any(layer.trainable for layer in user_norms)
    assert set(map(id, backbone.trainable_variables)).isdisjoint(
        id(v) for layer in user_norms for v in layer.weights)


def test_switched_off_techniques_shrink_the_banks_and_freeze_the_rates():
    backbone = tf_mamlpp.KerasBackbone(builtin_as_keras(), STEPS, bnrs=False, bnwb=False,
                                       lslr=False)
    assert all(norm.gamma.shape[0] == 1 and norm.moving_mean.shape[0] == 1
               for norm in backbone.norms)
    assert not any(rate.trainable for rate in backbone.inner_rates.values())


def test_a_backbone_without_batch_norm_scores_every_task(make_tasks):
    """No norm, no support moments to split per task: still one answer per task."""
    backbone = tf_mamlpp.KerasBackbone(keras.Sequential([
        keras.Input(IMAGE_SHAPE), keras.layers.Conv2D(4, 3), keras.layers.ReLU(),
        keras.layers.Flatten(), keras.layers.Dense(WAY)]), STEPS, bn_mode="support")
    learner = tf_mamlpp.MetaLearner(backbone)
    result = learner.evaluate_batch(make_tasks(3, WAY, 1, 2, IMAGE_SHAPE), STEPS, "support")
    assert result["accuracies"].shape == (3, STEPS)


def test_a_functional_backbone_with_a_skip_connection_adapts(make_tasks):
    inputs = keras.Input(IMAGE_SHAPE)
    x = keras.layers.Conv2D(4, 3, padding="same")(inputs)
    y = keras.layers.BatchNormalization()(x)
    y = keras.layers.Conv2D(4, 3, padding="same")(keras.layers.ReLU()(y))
    x = keras.layers.Add()([x, y])
    outputs = keras.layers.Dense(WAY)(keras.layers.GlobalAveragePooling2D()(x))
    backbone = tf_mamlpp.KerasBackbone(keras.Model(inputs, outputs), STEPS)
    tasks = make_tasks(2, WAY, 1, 2, IMAGE_SHAPE)
    adaptation = tf_mamlpp.adapt(backbone, tasks["support_images"], tasks["support_labels"],
                                 STEPS)
    adapted = adaptation.adapted_weights
    assert set(adapted) == set(backbone.fast_variables)
    # Every layer with weights moved, each task its own way.
    for name, value in adapted.items():
        initial = backbone.fast_variables[name].numpy()
        assert not np.allclose(value[0], initial), name
        assert not np.allclose(value[0], value[1]), name


def test_an_unbuilt_model_is_refused_naming_it():
    with pytest.raises(ValueError, match="'unbuilt'.*must be built"):
        tf_mamlpp.KerasBackbone(keras.Sequential([keras.layers.Dense(3)], name="unbuilt"),
                                STEPS)


def small_user_backbone(way):
    """What a user might write: two convolutions, global pooling, a linear head."""
    return keras.Sequential([
        keras.Input((28, 28, 1)),
        keras.layers.Conv2D(32, 3, strides=2, padding="same"),
        keras.layers.BatchNormalization(),
        keras.layers.ReLU(),
        keras.layers.Conv2D(32, 3, strides=2, padding="same"),
        keras.layers.BatchNormalization(),
        keras.layers.ReLU(),
        keras.layers.GlobalAveragePooling2D(),
        keras.layers.Dense(way),
    ])


def validation_accuracy(learner, images, spec):
    tasks = tf_mamlpp.episode_dataset(images, spec, 10, seed=1, num_tasks=200)
    accuracies = np.concatenate([
        learner.evaluate_batch(batch, learner.eval_inner_steps, learner.network.bn_mode)["accuracies"]
        [:, -1] for batch in tasks])
    return tf_mamlpp.mean_and_interval(accuracies)


@pytest.mark.slow
def test_a_user_backbone_meta_trains_on_omniglot_above_its_untrained_baseline():
    keras.utils.set_random_seed(0)
    images = tf_mamlpp.load_omniglot(f"{SHIPPED_DATA}/omniglot")
    splits = tf_mamlpp.split_classes(tf_mamlpp.num_background_classes(images),
                                     images.num_classes)
    spec = tf_mamlpp.EpisodeSpec(way=5, shot=1, query=1)
    backbone = tf_mamlpp.KerasBackbone(small_user_backbone(5), inner_steps=3, bn_mode="support")
    # An epoch of first-order MSL, then one of second order on the last step only:
    # measured at 38.6% ± 3.0 after them, from 26.5% ± 1.9 before.
    learner = tf_mamlpp.MetaLearner(
        backbone, tf_mamlpp.meta_optimizer(3e-3, 1e-4, ca=True, total_iterations=100),
        schedule=tf_mamlpp.Schedule(msl_epochs=1, first_order_epochs=1))
    before, before_interval = validation_accuracy(learner, images.select(splits["val"]), spec)
    episodes = tf_mamlpp.episode_dataset(images.select(splits["train"]), spec, 4, seed=0,
                                         augment=True)
    learner.fit(episodes, epochs=2, steps_per_epoch=50, verbose=0)
    after, after_interval = validation_accuracy(learner, images.select(splits["val"]), spec)
    assert after - after_interval > before + before_interval, (before, after)
