"""Running statistics: the exponential (or cumulative) moving average kept for evaluation.

Update rule (``torch.nn`` convention, which normlab follows)::

    num_batches_tracked += 1
    factor = momentum                       if momentum is not None
           = 1 / num_batches_tracked        if momentum is None       (cumulative average)
    running_mean = (1 - factor) * running_mean + factor * batch_mean
    running_var  = (1 - factor) * running_var  + factor * batch_var * n / (n - 1)

* ``momentum`` is the weight of the **new** batch (default 0.1). ``momentum = 0`` freezes the buffers,
  ``momentum = 1`` replaces them with the last batch's statistics.
* The batch is normalized with the *biased* variance (divide by n), but ``running_var`` receives the
  *unbiased* estimate (Bessel's correction, divide by n - 1), n being the number of values per channel.
* ``momentum = None`` gives every batch seen so far equal weight: after k batches the buffers are the plain
  average of the k batch statistics (the initial values 0 and 1 are overwritten by the first batch, whose
  factor is 1/1).
* Initial values: ``running_mean = 0``, ``running_var = 1``, ``num_batches_tracked = 0``.

Naming across libraries: Keras (``BatchNormalization(momentum=0.99)``), Flax (``nn.BatchNorm(momentum=0.99)``),
the cs231n assignments and the d2l from-scratch code (``momentum=0.9``) call the weight of the **old**
running value "momentum"::

    running = keras_momentum * running + (1 - keras_momentum) * batch

so ``torch_momentum = 1 - keras_momentum``: Keras/Flax 0.99 is normlab/torch 0.01, cs231n/d2l 0.9 is 0.1.
(Keras also stores the biased batch variance, so its moving variance is smaller by n/(n-1).)
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np


class RunningStats(NamedTuple):
    """New values of the three buffers after one training step (returned, never mutated in place)."""

    mean: np.ndarray
    var: np.ndarray
    num_batches_tracked: int


def update_factor(momentum: float | None, num_batches_tracked: int) -> float:
    """Weight of the new batch for this step; ``num_batches_tracked`` is the count *after* incrementing."""
    if momentum is None:
        return 1.0 / num_batches_tracked
    return float(momentum)


def update_running(
    running_mean: np.ndarray,
    running_var: np.ndarray,
    batch_mean: np.ndarray,
    batch_var_unbiased: np.ndarray,
    momentum: float | None,
    num_batches_tracked: int,
) -> RunningStats:
    """One step of the moving average above; returns a new :class:`RunningStats`.

    Example (momentum 0.1, one channel, batch mean 2, unbiased batch variance 4)::

        >>> s = update_running(np.zeros(1), np.ones(1), np.full(1, 2.0), np.full(1, 4.0), 0.1, 0)
        >>> float(s.mean[0]), float(s.var[0]), s.num_batches_tracked
        (0.2, 1.3, 1)
    """
    if momentum is not None and not 0.0 <= momentum <= 1.0:
        raise ValueError(f"momentum is the weight of the new batch and must lie in [0, 1], got {momentum}; "
                         f"if you mean the Keras convention (weight of the old value) pass 1 - {momentum}")
    count = int(num_batches_tracked) + 1
    f = update_factor(momentum, count)
    new_mean = (1.0 - f) * np.asarray(running_mean, dtype=np.float64) + f * batch_mean
    new_var = (1.0 - f) * np.asarray(running_var, dtype=np.float64) + f * batch_var_unbiased
    return RunningStats(new_mean, new_var, count)
