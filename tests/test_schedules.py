"""Specification of tf_mamlpp.core.schedules: the epoch-indexed MAML++ schedules.

Each schedule is checked at named epochs or steps against its closed form
(Antoniou et al., 2019, section 4: MSL, DA and CA).
"""

import math

import numpy as np
import pytest

from tf_mamlpp.core.schedules import (meta_learning_rate, msl_weights, multi_step_loss_active,
                                 second_order_active)

STEPS = 5
MSL_EPOCHS = 10


def test_msl_weights_start_uniform():
    np.testing.assert_allclose(msl_weights(0, STEPS, MSL_EPOCHS), np.full(STEPS, 0.2), rtol=1e-6)


def test_msl_weights_in_the_middle_follow_the_linear_decay():
    # Epoch 4 of 10 with 5 steps: every non-final weight loses 4 * 1/(5*10) = 0.08
    # and the final weight gains the 4 * 0.08 = 0.32 they lose together.
    weights = msl_weights(4, STEPS, MSL_EPOCHS)
    np.testing.assert_allclose(weights, [0.12, 0.12, 0.12, 0.12, 0.52], rtol=1e-6)


def test_msl_weights_reach_the_floor_at_msl_epochs_and_stay_there():
    floor = 0.03 / STEPS
    expected = [floor] * (STEPS - 1) + [1 - (STEPS - 1) * floor]
    for epoch in (MSL_EPOCHS, MSL_EPOCHS + 1, 3 * MSL_EPOCHS):
        np.testing.assert_allclose(msl_weights(epoch, STEPS, MSL_EPOCHS), expected, rtol=1e-6)
    # Just before the end the non-final weights sit above the floor.
    assert msl_weights(MSL_EPOCHS - 1, STEPS, MSL_EPOCHS)[0] == pytest.approx(0.02, rel=1e-5)


@pytest.mark.parametrize("num_steps", [1, 2, 3, 5])
def test_msl_weights_always_sum_to_one(num_steps):
    for epoch in range(0, 3 * MSL_EPOCHS):
        weights = msl_weights(epoch, num_steps, MSL_EPOCHS)
        assert weights.shape == (num_steps,)
        assert weights.dtype == np.float32
        assert float(weights.sum()) == pytest.approx(1.0, abs=1e-6)
        assert np.all(weights > 0)


def test_multi_step_loss_is_active_only_before_msl_epochs_and_only_when_used():
    assert multi_step_loss_active(True, 0, MSL_EPOCHS)
    assert multi_step_loss_active(True, MSL_EPOCHS - 1, MSL_EPOCHS)
    assert not multi_step_loss_active(True, MSL_EPOCHS, MSL_EPOCHS)
    assert not multi_step_loss_active(True, MSL_EPOCHS + 5, MSL_EPOCHS)
    for epoch in (0, 5, MSL_EPOCHS, 50):
        assert not multi_step_loss_active(False, epoch, MSL_EPOCHS)


def test_derivative_order_annealing_is_first_order_then_second_order():
    assert second_order_active(True, True, 0, 50) is False
    assert second_order_active(True, True, 49, 50) is False
    assert second_order_active(True, True, 50, 50) is True
    assert second_order_active(True, True, 99, 50) is True


def test_second_order_off_means_first_order_throughout():
    for use_da in (True, False):
        for epoch in (0, 49, 50, 99):
            assert second_order_active(False, use_da, epoch, 50) is False


def test_without_da_second_order_holds_from_the_first_epoch():
    for epoch in (0, 1, 49, 50, 99):
        assert second_order_active(True, False, epoch, 50) is True


def cosine_closed_form(step, meta_lr, min_meta_lr, total):
    t = min(step, total)
    return min_meta_lr + 0.5 * (meta_lr - min_meta_lr) * (1 + math.cos(math.pi * t / total))


def test_cosine_annealed_meta_learning_rate_at_named_steps():
    meta_lr, min_meta_lr, total = 1e-3, 1e-5, 1000
    schedule = meta_learning_rate(meta_lr, min_meta_lr, total, cosine_annealing=True)
    assert float(schedule(0)) == pytest.approx(meta_lr, rel=1e-5)
    assert float(schedule(total // 2)) == pytest.approx((meta_lr + min_meta_lr) / 2, rel=1e-5)
    for step in (100, 250, 731):
        assert float(schedule(step)) == pytest.approx(
            cosine_closed_form(step, meta_lr, min_meta_lr, total), rel=1e-5)
    assert float(schedule(total)) == pytest.approx(min_meta_lr, rel=1e-4)
    for step in (total + 1, 2 * total, 10 * total):
        assert float(schedule(step)) == pytest.approx(min_meta_lr, rel=1e-4)


def test_meta_learning_rate_is_constant_without_cosine_annealing():
    rate = meta_learning_rate(1e-3, 1e-5, 1000, cosine_annealing=False)
    assert float(rate) == 1e-3
