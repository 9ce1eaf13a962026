"""Epoch-indexed schedules of MAML++: MSL weights, derivative order, meta-lr.

These are plain functions of the epoch so the trainer can compute them in
Python once per epoch and hand the result to the compiled meta-step as an
argument; the meta-step then needs no retrace when they change.
"""

import dataclasses
from typing import NamedTuple

import keras
import numpy as np

from tf_mamlpp.config_error import ConfigError


def msl_weights(epoch, num_steps, msl_epochs):
    """Per-step weights of the multi-step loss (MSL) at `epoch`.

    Antoniou et al. (2019), section 4: the weights start uniform at 1/S; each
    epoch every non-final weight falls by 1/(S * msl_epochs), down to a floor
    of 0.03/S, and the final weight rises by what they lose, capped so the
    weights sum to one. This is the reference implementation's schedule.

    Args:
      epoch: the current epoch, from 0.
      num_steps: S, the inner steps.
      msl_epochs: epochs over which the weights are annealed.

    Returns:
      float32 array (num_steps,) that sums to one.
    """
    weights = np.full(num_steps, 1.0 / num_steps)
    decay = epoch / (num_steps * msl_epochs)
    floor = 0.03 / num_steps
    weights[:-1] = np.maximum(weights[:-1] - decay, floor)
    weights[-1] = min(weights[-1] + (num_steps - 1) * decay, 1.0 - (num_steps - 1) * floor)
    return weights.astype(np.float32)


def multi_step_loss_active(use_msl, epoch, msl_epochs):
    """Whether the outer loss sums all steps (True) or uses the last one only."""
    return use_msl and epoch < msl_epochs


def second_order_active(second_order, use_da, epoch, first_order_epochs):
    """Derivative order in force at `epoch` (DA: first order for the first epochs).

    Args:
      second_order: whether second order is wanted at all; False gives
        first-order MAML throughout.
      use_da: derivative-order annealing; False means second order (when
        wanted) from the first epoch.
      epoch: the current epoch, from 0.
      first_order_epochs: epochs trained first order under DA.
    """
    if not second_order:
        return False
    return not use_da or epoch >= first_order_epochs


def meta_learning_rate(meta_lr, min_meta_lr, total_iterations, cosine_annealing):
    """The Adam learning rate: cosine-annealed (CA) from meta_lr to min_meta_lr, or constant."""
    if not cosine_annealing:
        return meta_lr
    return keras.optimizers.schedules.CosineDecay(
        initial_learning_rate=meta_lr, decay_steps=total_iterations,
        alpha=min_meta_lr / meta_lr)


def meta_optimizer(meta_lr=1e-3, min_meta_lr=1e-5, ca=False, total_iterations=None):
    """Adam, the paper's meta-optimizer, its rate cosine-annealed over `total_iterations` (CA).

    Args:
      meta_lr: the learning rate at the start.
      min_meta_lr: the rate cosine annealing ends at.
      ca: CA, cosine annealing; without it the rate stays at `meta_lr`.
      total_iterations: the meta-iterations of the whole run; CA needs it.
    """
    if ca and not total_iterations:
        raise ConfigError("ca=True anneals over the whole run: give total_iterations, the "
                          "epochs times the iterations per epoch", "ca")
    return keras.optimizers.Adam(meta_learning_rate(meta_lr, min_meta_lr, total_iterations, ca))


class Phase(NamedTuple):
    """What the schedules prescribe for one epoch's meta-updates."""

    msl_weights: np.ndarray  # (inner_steps,) float32, the multi-step loss weights
    multi_step: bool  # MSL in force: the outer loss sums every step's target loss
    second_order: bool  # DA's derivative order


@dataclasses.dataclass(frozen=True)
class Schedule:
    """The MSL and DA switches, and the epoch-indexed phase they give (CA is the optimizer's).

    Defaults are the paper's; `msl=False, da=False` with `second_order`
    chosen gives plain (first- or second-order) MAML's outer loss. The
    number of inner steps is the network's, given to `at`.
    """

    msl: bool = True
    msl_epochs: int = 10
    da: bool = True
    first_order_epochs: int = 50
    second_order: bool = True

    def at(self, epoch, inner_steps):
        """The `Phase` of `epoch` (from 0) for a network of `inner_steps` inner steps."""
        return Phase(msl_weights(epoch, inner_steps, self.msl_epochs),
                     multi_step_loss_active(self.msl, epoch, self.msl_epochs),
                     second_order_active(self.second_order, self.da, epoch,
                                         self.first_order_epochs))
