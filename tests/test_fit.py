"""Specification of the meta-learner as a Keras model: meta_step, `fit` with the callbacks
users know, and the MAML++ schedules following the epoch inside it."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import tf_mamlpp

# Each test meta-trains or compares second-order meta-steps: seconds apiece.
pytestmark = pytest.mark.slow

WAY, STEPS, IMAGE_SHAPE, TASKS = 3, 2, (8, 8, 1), 2


def tiny_learner(schedule=None, seed=0):
    keras.utils.set_random_seed(seed)
    network = tf_mamlpp.MamlppNetwork(WAY, IMAGE_SHAPE, STEPS, filters=3, num_stages=2)
    return tf_mamlpp.MetaLearner(network, keras.optimizers.Adam(1e-2),
                                 schedule=schedule or tf_mamlpp.Schedule())


@pytest.fixture
def episodes(make_tasks):
    batches = [make_tasks(TASKS, WAY, 1, 2, IMAGE_SHAPE, seed=seed) for seed in range(4)]
    return tf.data.Dataset.from_tensor_slices(
        {key: tf.stack([batch[key] for batch in batches]) for key in batches[0]})


def variable_values(network):
    return [v.numpy() for v in network.variables]


@pytest.mark.parametrize("bn_mode", tf_mamlpp.BN_MODES)
@pytest.mark.parametrize("second_order", [False, True], ids=["first order", "second order"])
def test_meta_step_updates_as_the_compiled_meta_update_does(make_tasks, second_order, bn_mode):
    """The readable one-device meta_step and the compiled, task-by-task wrapper agree."""
    tasks = make_tasks(TASKS, WAY, 1, 2, IMAGE_SHAPE)
    phase = tf_mamlpp.Schedule().at(0, STEPS)._replace(second_order=second_order)
    updated = []
    for step in ("plain", "wrapped"):
        keras.utils.set_random_seed(0)
        network = tf_mamlpp.MamlppNetwork(WAY, IMAGE_SHAPE, STEPS, filters=3, num_stages=2,
                                          bn_mode=bn_mode)
        initial = variable_values(network)
        optimizer = keras.optimizers.Adam(1e-2)
        if step == "plain":
            tf_mamlpp.meta_step(network, optimizer, tasks, phase)
        else:
            tf_mamlpp.MetaLearner(network, optimizer).meta_update(tasks, phase)
        updated.append(variable_values(network))
    for plain, wrapped, start in zip(*updated, initial):
        np.testing.assert_allclose(plain, wrapped, rtol=1e-4, atol=1e-6)
    assert any(not np.allclose(plain, start) for plain, start in zip(updated[0], initial))


class PhaseLog(keras.callbacks.Callback):
    """The learner's phase as each epoch starts (after FollowSchedule set it)."""

    def __init__(self):
        super().__init__()
        self.phases = {}

    def on_epoch_begin(self, epoch, logs=None):
        learner = self.model
        self.phases[epoch] = (learner.msl_weights.numpy().copy(), learner.phase.multi_step,
                              learner.phase.second_order)


def test_fit_follows_msl_and_da_epoch_by_epoch(episodes):
    schedule = tf_mamlpp.Schedule(msl_epochs=2, first_order_epochs=1)
    learner = tiny_learner(schedule)
    log = PhaseLog()
    learner.fit(episodes.repeat(), epochs=4, steps_per_epoch=2, callbacks=[log], verbose=0)
    for epoch in range(4):
        expected = schedule.at(epoch, STEPS)
        weights, multi_step, second_order = log.phases[epoch]
        np.testing.assert_allclose(weights, expected.msl_weights)
        assert (multi_step, second_order) == (expected.multi_step, expected.second_order)
    # One trace per phase: (MSL, first order), (MSL, second), (last step, second).
    assert len({phase[1:] for phase in log.phases.values()}) == 3


def test_fit_anneals_the_meta_learning_rate_cosine_over_the_iterations(episodes):
    learner = tiny_learner()
    learner.compile(optimizer=tf_mamlpp.meta_optimizer(1e-2, 1e-4, ca=True, total_iterations=8))
    learner.optimizer.build(learner.network.trainable_variables)
    learner.fit(episodes.repeat(), epochs=2, steps_per_epoch=4, verbose=0)
    assert int(learner.optimizer.iterations.numpy()) == 8
    np.testing.assert_allclose(float(learner.optimizer.learning_rate), 1e-4, rtol=1e-3)


def test_fit_with_tensorboard_checkpoints_and_early_stopping(episodes, tmp_path):
    learner = tiny_learner()
    history = learner.fit(
        episodes.repeat(), epochs=6, steps_per_epoch=2, validation_data=episodes, verbose=0,
        callbacks=[keras.callbacks.TensorBoard(tmp_path / "logs"),
                   keras.callbacks.ModelCheckpoint(tmp_path / "best.weights.h5",
                                                   monitor="val_accuracy", mode="max",
                                                   save_best_only=True, save_weights_only=True),
                   keras.callbacks.EarlyStopping(monitor="val_accuracy", patience=1,
                                                 mode="max")])
    assert set(history.history) == {"loss", "accuracy", "val_accuracy"}
    assert all(0.0 <= value <= 1.0 for value in history.history["val_accuracy"])
    assert list((tmp_path / "logs").glob("train/events.out.tfevents.*"))
    # The checkpoint holds every meta-parameter: a fresh learner loads it and scores alike.
    fresh = tiny_learner(seed=1)
    fresh.load_weights(tmp_path / "best.weights.h5")
    best = max(history.history["val_accuracy"])
    assert fresh.evaluate(episodes, verbose=0, return_dict=True)["accuracy"] == pytest.approx(
        best, abs=1e-6)


class StopAt(keras.callbacks.Callback):
    def __init__(self, epoch):
        super().__init__()
        self.epoch = epoch

    def on_epoch_begin(self, epoch, logs=None):
        if epoch == self.epoch:
            raise KeyboardInterrupt


def test_backup_and_restore_resumes_at_the_epoch_with_its_phase(episodes, tmp_path):
    schedule = tf_mamlpp.Schedule(STEPS, msl_epochs=1, first_order_epochs=2)
    backup = tmp_path / "backup"
    learner = tiny_learner(schedule)
    with pytest.raises(KeyboardInterrupt):
        learner.fit(episodes.repeat(), epochs=4, steps_per_epoch=2, verbose=0,
                    callbacks=[keras.callbacks.BackupAndRestore(backup), StopAt(2)])
    resumed = tiny_learner(schedule, seed=1)
    log = PhaseLog()
    resumed.fit(episodes.repeat(), epochs=4, steps_per_epoch=2, verbose=0,
                callbacks=[keras.callbacks.BackupAndRestore(backup), log])
    assert sorted(log.phases) == [2, 3]
    assert log.phases[2][2] is True  # second order from epoch 2, as the schedule says
    assert int(resumed.optimizer.iterations.numpy()) == 8
