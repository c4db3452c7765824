"""Instance normalization in NumPy: group norm with one channel per group, plus optional running statistics.

Paper: D. Ulyanov, A. Vedaldi and V. Lempitsky, "Instance Normalization: The Missing Ingredient for Fast
Stylization", 2016 (arXiv:1607.08022).

Shapes
------
``x`` is ``(N, C, *spatial)`` with at least one spatial dim. Statistics are per (sample n, channel c) over the
``S = prod(spatial)`` values ``x[n, c, ...]``; ``gamma``, ``beta``, ``running_mean``, ``running_var`` are ``(C,)``.

With input statistics (``use_input_stats=True``, torch's default and the training mode)::

    y = group_norm(x, num_groups=C, gamma, beta, eps)

and, when running statistics are kept (``torch.nn.InstanceNorm*d(track_running_stats=True)``), they move
towards the batch average of the per-instance statistics (torch's rule)::

    batch_mean_c = (1/N) sum_n mean[n, c]
    batch_var_c  = (1/N) sum_n var[n, c] * S / (S - 1)          (unbiased per instance, then averaged)
    running      = (1 - momentum) * running + momentum * batch   (see :mod:`.running`)

With running statistics (``use_input_stats=False``: eval mode with ``track_running_stats=True``) it is
exactly batch norm in eval mode, :func:`.batchnorm.batch_norm_forward` with ``training=False``.

``momentum=None`` here means the cumulative average, as for batch norm. Note: ``torch.nn.InstanceNorm*d``
instead passes ``momentum=None`` to ``F.instance_norm`` as 0.0, which freezes the running statistics.

Example::

    >>> x = np.array([[[0.0, 2.0], [1.0, 1.0]]])             # N=1, C=2, L=2
    >>> y, cache, run = instance_norm_forward(x, eps=1e-12)
    >>> np.round(y, 4).tolist()
    [[[-1.0, 1.0], [0.0, 0.0]]]
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

from ._checks import as_f64, check_param
from .batchnorm import BatchNormCache, batch_norm_backward, batch_norm_forward
from .groupnorm import GroupNormCache, group_norm_backward, group_norm_forward
from .running import RunningStats, update_running


class InstanceNormCache(NamedTuple):
    use_input_stats: bool
    inner: GroupNormCache | BatchNormCache


def instance_norm_forward(
    x,
    gamma=None,
    beta=None,
    eps: float = 1e-5,
    *,
    use_input_stats: bool = True,
    running_mean=None,
    running_var=None,
    momentum: float | None = 0.1,
    num_batches_tracked: int = 0,
) -> tuple[np.ndarray, InstanceNormCache, RunningStats | None]:
    """Instance norm forward. Returns ``(y, cache, new_running)`` like :func:`.batch_norm_forward`.

    Raises:
        ValueError: fewer than 3 dims; one spatial value per instance while using input statistics (as
            torch: the variance of one value is 0); C not matching gamma/beta/running buffers; eps <= 0;
            ``use_input_stats=False`` without running statistics.
    """
    x = as_f64(x, "x")
    if x.ndim < 3:
        raise ValueError(f"instance norm expects x of shape (N, C, *spatial) with at least one spatial dim, got "
                         f"shape {x.shape}; for an unbatched (C, L) input use x[None]")
    C = x.shape[1]
    running_mean = check_param(running_mean, (C,), "running_mean", "channel")
    running_var = check_param(running_var, (C,), "running_var", "channel")
    if (running_mean is None) != (running_var is None):
        raise ValueError("pass both running_mean and running_var, or neither (track_running_stats=False)")
    if not use_input_stats:
        y, cache, run = batch_norm_forward(x, gamma, beta, eps, training=False, running_mean=running_mean,
                                           running_var=running_var, num_batches_tracked=num_batches_tracked)
        return y, InstanceNormCache(False, cache), run
    S = int(np.prod(x.shape[2:]))
    if S == 1:
        raise ValueError(f"Expected more than 1 spatial element when training, got input size {x.shape}: "
                         f"the variance of one value is 0. Use eval mode with running statistics, or a "
                         f"larger spatial extent")
    y, cache = group_norm_forward(x, C, gamma, beta, eps)
    run = None
    if running_mean is not None:
        if x.size == 0:
            run = RunningStats(running_mean, running_var, int(num_batches_tracked))
        else:
            batch_mean = cache.mean.mean(axis=0)
            batch_var = (cache.var * (S / (S - 1))).mean(axis=0)
            run = update_running(running_mean, running_var, batch_mean, batch_var, momentum, num_batches_tracked)
    return y, InstanceNormCache(True, cache), run


def instance_norm_backward(dy, cache: InstanceNormCache):
    """Closed-form backward (group norm's with G = C, or batch norm's eval backward). Returns
    ``(dx, dgamma, dbeta)``."""
    if cache.use_input_stats:
        return group_norm_backward(dy, cache.inner)
    return batch_norm_backward(dy, cache.inner)
