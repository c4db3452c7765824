"""Group normalization in NumPy: a reshape, the row primitive, and a per-channel affine.

Paper: Y. Wu and K. He, "Group Normalization", ECCV 2018 (arXiv:1803.08494).

Shapes
------
``x`` is ``(N, C, *spatial)`` with C divisible by the number of groups G. Statistics are per sample n and
group g over the ``K = (C / G) * prod(spatial)`` values of channels ``g*C/G .. (g+1)*C/G - 1``; ``gamma`` and
``beta`` are per channel, shape ``(C,)``. No running statistics: training and evaluation are the same.

Forward::

    R    = x.reshape(N * G, K)                                 one row per (sample, group)
    xhat = ((R - mean_row(R)) / sqrt(var_row(R) + eps)).reshape(x.shape)    (biased variance)
    y    = gamma_c * xhat + beta_c

Backward::

    dbeta_c  = sum over (N, spatial) of dy
    dgamma_c = sum over (N, spatial) of dy * xhat
    dx       = row backward of dxhat = gamma_c * dy   (see :func:`.rownorm.normalize_rows_backward`)

Special cases: G = 1 is LayerNorm over (C, *spatial) with per-channel affine; G = C is InstanceNorm.

Example::

    >>> x = np.arange(8.0).reshape(1, 4, 2)                  # N=1, C=4, L=2; G=2 -> rows [0..3], [4..7]
    >>> y, _ = group_norm_forward(x, 2, eps=1e-12)
    >>> np.round(y[0, :2], 4).tolist()
    [[-1.3416, -0.4472], [0.4472, 1.3416]]
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

from ._checks import as_f64, check_eps, check_param
from .rownorm import normalize_rows, normalize_rows_backward


class GroupNormCache(NamedTuple):
    shape: tuple[int, ...]
    groups: int
    xhat: np.ndarray            # x's shape
    mean: np.ndarray            # (N, G)
    var: np.ndarray             # (N, G) biased
    invstd: np.ndarray          # (N * G,)
    gamma: np.ndarray | None    # (C,) or None
    has_beta: bool


def _bcast(v: np.ndarray, ndim: int) -> np.ndarray:
    return v.reshape((1, -1) + (1,) * (ndim - 2))


def group_norm_forward(x, num_groups: int, gamma=None, beta=None, eps: float = 1e-5):
    """Group norm forward. Returns ``(y, cache)``; ``cache.mean``/``cache.var`` hold the (N, G) statistics.

    Raises:
        ValueError: x has fewer than 2 dims; C not divisible by ``num_groups``; gamma/beta not ``(C,)``;
            eps <= 0.
    """
    x = as_f64(x, "x")
    eps = check_eps(eps)
    if x.ndim < 2:
        raise ValueError(f"group norm expects x of shape (N, C, *spatial), got shape {x.shape}")
    N, C = x.shape[:2]
    G = int(num_groups)
    if G <= 0 or C % G != 0:
        raise ValueError(f"group norm needs the number of channels to be divisible by the number of groups, "
                         f"got C={C} channels and num_groups={G}; choose num_groups among the divisors of {C}")
    gamma = check_param(gamma, (C,), "gamma", "channel")
    beta = check_param(beta, (C,), "beta", "channel")
    rows = x.reshape(N * G, -1) if x.size else np.empty((N * G, 0))
    if x.size == 0:
        empty = np.zeros((N, G))
        return np.empty_like(x), GroupNormCache(x.shape, G, x, empty, empty, np.zeros(N * G), gamma,
                                                beta is not None)
    xhat_rows, mean, var, invstd = normalize_rows(rows, eps)
    xhat = xhat_rows.reshape(x.shape)
    y = xhat
    if gamma is not None:
        y = y * _bcast(gamma, x.ndim)
    if beta is not None:
        y = y + _bcast(beta, x.ndim)
    cache = GroupNormCache(x.shape, G, xhat, mean.reshape(N, G), var.reshape(N, G), invstd, gamma,
                           beta is not None)
    return y, cache


def group_norm_backward(dy, cache: GroupNormCache):
    """Closed-form backward. Returns ``(dx, dgamma, dbeta)`` (``None`` for an absent parameter)."""
    dy = as_f64(dy, "dy")
    axes = (0,) + tuple(range(2, dy.ndim))
    dgamma = None if cache.gamma is None else (dy * cache.xhat).sum(axis=axes)
    dbeta = dy.sum(axis=axes) if cache.has_beta else None
    if dy.size == 0:
        return np.zeros_like(dy), dgamma, dbeta
    dxhat = dy if cache.gamma is None else dy * _bcast(cache.gamma, dy.ndim)
    N = cache.shape[0]
    rows = N * cache.groups
    dx = normalize_rows_backward(dxhat.reshape(rows, -1), cache.xhat.reshape(rows, -1), cache.invstd)
    return dx.reshape(cache.shape), dgamma, dbeta
