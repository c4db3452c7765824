"""Batch normalization in NumPy: forward, running statistics, and two backwards (graph and closed form).

Paper: S. Ioffe and C. Szegedy, "Batch Normalization: Accelerating Deep Network Training by Reducing
Internal Covariate Shift", ICML 2015 (arXiv:1502.03167), Algorithm 1 and section 3.1.

Shapes
------
``x`` is ``(N, C)``, ``(N, C, L)``, ``(N, C, H, W)`` or ``(N, C, D, H, W)``. Statistics are per channel c over
the ``n = N * prod(spatial)`` values ``x[:, c, ...]``; ``gamma``, ``beta``, ``running_mean``, ``running_var``
have shape ``(C,)``.

Forward (training)::

    mu_c     = (1/n) sum x[:, c]                       batch mean
    var_c    = (1/n) sum (x[:, c] - mu_c)^2             biased batch variance (used to normalize)
    xhat     = (x - mu_c) / sqrt(var_c + eps)
    y        = gamma_c * xhat + beta_c

and the running statistics are updated with ``var_c * n / (n - 1)`` (see :mod:`.running`). The update is
*returned* as a :class:`~.running.RunningStats`; nothing is mutated.

Forward (evaluation): the same formula with ``mu_c = running_mean_c``, ``var_c = running_var_c``; y is then an
affine function of x per channel, and nothing is updated.

Backward (training), with ``dy = dL/dy``, sums over the n values of channel c::

    dbeta_c  = sum dy
    dgamma_c = sum dy * xhat
    dx       = gamma_c * invstd_c / n * (n * dy - sum dy - xhat * sum(dy * xhat))

Backward (evaluation): ``dx = gamma_c * invstd_c * dy``, where ``invstd_c = 1/sqrt(running_var_c + eps)``.

:func:`batch_norm_backward_graph` derives the same dx one node at a time; :func:`batch_norm_backward` is the
closed form. ``tests/test_reference.py`` checks they agree to 1e-12 and that both match central differences.

Example::

    >>> x = np.array([[1.0], [3.0]])                        # N = 2, C = 1
    >>> y, cache, run = batch_norm_forward(x, np.ones(1), np.zeros(1),
    ...                                    running_mean=np.zeros(1), running_var=np.ones(1))
    >>> np.round(y[:, 0], 4).tolist(), run.mean.tolist(), run.var.tolist()
    ([-1.0, 1.0], [0.2], [1.1])

(batch mean 2, biased variance 1, unbiased 2: running_mean = 0.9 * 0 + 0.1 * 2, running_var = 0.9 + 0.2.)

Edge cases: training with ``n == 1`` raises ``ValueError`` (torch's message); an empty batch (``N == 0``)
returns an empty output, zero parameter gradients and the running statistics unchanged, including
``num_batches_tracked`` (``torch.nn.BatchNorm*d`` leaves mean and var alone but still counts the batch). The
reference does not guard against non-finite inputs: NaN in, NaN out, also in the running statistics; that
policy belongs to the layers.

Batch norm is the row primitive of :mod:`.rownorm` applied to the channel-major view
``x.moveaxis(1, 0).reshape(C, n)``; it is written out here on the original layout so the per-channel
reductions and the computation graph stay visible.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

from ._checks import as_f64, check_eps, check_param
from .rownorm import moments
from .running import RunningStats, update_running


class BatchNormCache(NamedTuple):
    """What the backward needs. Per-channel arrays are kept broadcastable to x: shape ``(1, C, 1, ...)``."""

    training: bool
    axes: tuple[int, ...]     # reduced axes: 0 and every spatial axis
    n: int                    # values per channel
    xc: np.ndarray            # x - mean (training) / x - running_mean (eval)
    var: np.ndarray           # biased batch variance (training) / running_var (eval)
    invstd: np.ndarray        # 1 / sqrt(var + eps)
    xhat: np.ndarray          # xc * invstd
    gamma: np.ndarray | None  # (C,) or None (no affine)
    has_beta: bool


def _reduce_axes(x: np.ndarray) -> tuple[int, ...]:
    return (0,) + tuple(range(2, x.ndim))


def _bcast(v: np.ndarray, ndim: int) -> np.ndarray:
    """A per-channel vector ``(C,)`` reshaped to broadcast against ``(N, C, *)``."""
    return v.reshape((1, -1) + (1,) * (ndim - 2))


def _check_input(x: np.ndarray) -> None:
    if not 2 <= x.ndim <= 5:
        raise ValueError(f"batch norm expects x of shape (N, C), (N, C, L), (N, C, H, W) or (N, C, D, H, W), "
                         f"got {x.ndim}D input of shape {x.shape}; for a single sample add a batch axis: x[None]")


def batch_norm_forward(
    x,
    gamma=None,
    beta=None,
    eps: float = 1e-5,
    *,
    training: bool = True,
    running_mean=None,
    running_var=None,
    momentum: float | None = 0.1,
    num_batches_tracked: int = 0,
) -> tuple[np.ndarray, BatchNormCache, RunningStats | None]:
    """Batch norm forward. Returns ``(y, cache, new_running)``.

    Args:
        x: ``(N, C, *)`` with 0 to 3 spatial dims; converted to float64.
        gamma, beta: ``(C,)`` scale and shift, or ``None`` for no scale / no shift.
        eps: added to the variance, > 0.
        training: normalize with batch statistics (and update running ones if given), else with the running
            statistics.
        running_mean, running_var: ``(C,)`` buffers or both ``None`` (``track_running_stats=False``).
        momentum: weight of the new batch in the moving average (torch convention); ``None`` = cumulative
            average. Keras/Flax/cs231n/d2l "momentum" m corresponds to ``1 - m`` here.
        num_batches_tracked: batches seen so far (before this one).

    Returns:
        ``y`` (float64, x's shape); the cache for the backward; ``RunningStats(mean, var,
        num_batches_tracked)`` after this step, or ``None`` when no running statistics are kept. In eval mode,
        and for an empty batch, the running statistics come back unchanged.

    Raises:
        ValueError: wrong rank; parameter/buffer shapes not ``(C,)``; eps <= 0; training with one value per
            channel (the variance of one value is 0 and the output would be just beta, as in torch);
            eval without running statistics.
    """
    x = as_f64(x, "x")
    _check_input(x)
    eps = check_eps(eps)
    C = x.shape[1]
    gamma = check_param(gamma, (C,), "gamma", "channel")
    beta = check_param(beta, (C,), "beta", "channel")
    running_mean = check_param(running_mean, (C,), "running_mean", "channel")
    running_var = check_param(running_var, (C,), "running_var", "channel")
    if (running_mean is None) != (running_var is None):
        raise ValueError("pass both running_mean and running_var, or neither (track_running_stats=False)")
    tracking = running_mean is not None
    axes = _reduce_axes(x)
    n = x.size // C if C else 0
    unchanged = RunningStats(running_mean, running_var, int(num_batches_tracked)) if tracking else None

    if training:
        if n == 1:
            raise ValueError(f"Expected more than 1 value per channel when training, got input size {x.shape}: "
                             f"the batch variance of one value is 0. Use a batch of 2 or more, or eval mode "
                             f"(running statistics)")
        if x.size == 0:  # an empty batch is not a batch: nothing to normalize, nothing to learn from
            cache = BatchNormCache(True, axes, 0, x, x, x, x, gamma, beta is not None)
            return np.empty_like(x), cache, unchanged
        mean, var, xc = moments(x, axes)
        invstd = 1.0 / np.sqrt(var + eps)
        new_running = None
        if tracking:
            unbiased = var.reshape(C) * (n / (n - 1))
            new_running = update_running(running_mean, running_var, mean.reshape(C), unbiased, momentum,
                                         num_batches_tracked)
    else:
        if not tracking:
            raise ValueError("eval mode normalizes with running_mean/running_var, but none were given; pass "
                             "them, or use training=True to normalize with batch statistics")
        var = _bcast(running_var, x.ndim)
        xc = x - _bcast(running_mean, x.ndim)
        invstd = 1.0 / np.sqrt(var + eps)
        new_running = unchanged

    xhat = xc * invstd
    y = xhat
    if gamma is not None:
        y = y * _bcast(gamma, x.ndim)
    if beta is not None:
        y = y + _bcast(beta, x.ndim)
    cache = BatchNormCache(training, axes, n, xc, var, invstd, xhat, gamma, beta is not None)
    return y, cache, new_running


def _param_grads(dy: np.ndarray, cache: BatchNormCache) -> tuple[np.ndarray | None, np.ndarray | None]:
    dgamma = (dy * cache.xhat).sum(axis=cache.axes) if cache.gamma is not None else None
    dbeta = dy.sum(axis=cache.axes) if cache.has_beta else None
    return dgamma, dbeta


def _empty_grads(dy: np.ndarray, cache: BatchNormCache):
    C = dy.shape[1]
    return (np.zeros_like(dy), None if cache.gamma is None else np.zeros(C),
            np.zeros(C) if cache.has_beta else None)


def batch_norm_backward(dy, cache: BatchNormCache) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
    """Closed-form backward. Returns ``(dx, dgamma, dbeta)`` (``None`` for an absent parameter).

    Training: ``dx = gamma * invstd / n * (n * dy - sum(dy) - xhat * sum(dy * xhat))`` per channel.
    Eval:     ``dx = gamma * invstd * dy`` (the statistics are constants).
    """
    dy = as_f64(dy, "dy")
    if dy.size == 0:
        return _empty_grads(dy, cache)
    dgamma, dbeta = _param_grads(dy, cache)
    g = 1.0 if cache.gamma is None else _bcast(cache.gamma, dy.ndim)
    if not cache.training:
        return g * cache.invstd * dy, dgamma, dbeta
    n = cache.n
    sum_dy = dy.sum(axis=cache.axes, keepdims=True)
    sum_dy_xhat = (dy * cache.xhat).sum(axis=cache.axes, keepdims=True)
    dx = (g * cache.invstd / n) * (n * dy - sum_dy - cache.xhat * sum_dy_xhat)
    return dx, dgamma, dbeta


def batch_norm_backward_graph(dy, cache: BatchNormCache):
    """Backward one node of the computation graph at a time. Returns ``(dx, dgamma, dbeta)``.

    The forward graph, per channel (sums over the n values of the channel)::

        mean   = sum(x) / n
        xc     = x - mean
        xc2    = xc ** 2
        var    = sum(xc2) / n
        invstd = (var + eps) ** -0.5
        xhat   = xc * invstd
        y      = gamma * xhat + beta

    Walk it backwards; every line is "upstream gradient times local derivative", and a node used twice (xc,
    x) accumulates the gradients of both uses. In eval mode mean and var are constants, so only the last two
    lines remain.
    """
    dy = as_f64(dy, "dy")
    if dy.size == 0:
        return _empty_grads(dy, cache)
    axes, n = cache.axes, cache.n
    xc, invstd, xhat = cache.xc, cache.invstd, cache.xhat
    # y = gamma * xhat + beta
    dbeta = dy.sum(axis=axes) if cache.has_beta else None
    dgamma = (dy * xhat).sum(axis=axes) if cache.gamma is not None else None
    dxhat = dy * (1.0 if cache.gamma is None else _bcast(cache.gamma, dy.ndim))
    if not cache.training:
        return dxhat * invstd, dgamma, dbeta
    # xhat = xc * invstd: both factors depend on x
    dinvstd = (dxhat * xc).sum(axis=axes, keepdims=True)
    dxc = dxhat * invstd
    # invstd = (var + eps) ** -0.5, so d invstd / d var = -0.5 * (var + eps) ** -1.5 = -0.5 * invstd ** 3
    dvar = -0.5 * invstd ** 3 * dinvstd
    # var = sum(xc2) / n: every element of the channel gets 1/n of dvar
    dxc2 = np.broadcast_to(dvar / n, dy.shape)
    # xc2 = xc ** 2: second path into xc
    dxc = dxc + 2.0 * xc * dxc2
    # xc = x - mean: x directly, and through mean
    dmean = -dxc.sum(axis=axes, keepdims=True)
    dx = dxc.copy()
    # mean = sum(x) / n
    dx = dx + dmean / n
    return dx, dgamma, dbeta
