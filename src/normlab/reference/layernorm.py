"""Layer normalization in NumPy: the row primitive over the trailing ``normalized_shape``.

Paper: J. L. Ba, J. R. Kiros and G. E. Hinton, "Layer Normalization", 2016 (arXiv:1607.06450).

Shapes
------
``x`` is ``(*leading, *normalized_shape)``. Statistics are per leading index over the
``K = prod(normalized_shape)`` trailing values; ``gamma`` and ``beta`` (elementwise affine, optional) have
shape ``normalized_shape``. No running statistics: training and evaluation compute the same thing.

Forward, with ``R = x.reshape(M, K)`` (one row per leading index)::

    xhat = (R - mean_row(R)) / sqrt(var_row(R) + eps)           (biased variance, divide by K)
    y    = gamma * xhat + beta                                   (gamma, beta broadcast over the leading dims)

Backward::

    dbeta  = sum over leading dims of dy
    dgamma = sum over leading dims of dy * xhat
    dx     = row backward of dxhat = dy * gamma  (see :func:`.rownorm.normalize_rows_backward`)

Example::

    >>> y, cache = layer_norm_forward(np.array([[1.0, 2.0, 3.0]]), (3,), eps=1e-12)
    >>> np.round(y, 4).tolist()
    [[-1.2247, 0.0, 1.2247]]

LayerNorm over ``(C, H, W)`` of an ``(N, C, H, W)`` input is GroupNorm with one group, except that its affine
parameters are per element instead of per channel.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

from ._checks import as_f64, check_eps, check_param
from .rownorm import normalize_rows, normalize_rows_backward


class LayerNormCache(NamedTuple):
    shape: tuple[int, ...]
    xhat: np.ndarray           # (M, K)
    invstd: np.ndarray         # (M,)
    gamma: np.ndarray | None   # (K,) flattened, or None
    has_beta: bool
    normalized_shape: tuple[int, ...]


def _as_shape(normalized_shape) -> tuple[int, ...]:
    if isinstance(normalized_shape, (int, np.integer)):
        return (int(normalized_shape),)
    return tuple(int(s) for s in normalized_shape)


def layer_norm_forward(x, normalized_shape, gamma=None, beta=None, eps: float = 1e-5):
    """Layer norm forward. Returns ``(y, cache)``.

    Args:
        x: ``(*leading, *normalized_shape)``, converted to float64.
        normalized_shape: int or tuple, the trailing dims to normalize over.
        gamma, beta: arrays of shape ``normalized_shape``, or ``None``.
        eps: > 0.

    Raises:
        ValueError: x's trailing dims differ from ``normalized_shape``; wrong parameter shape; eps <= 0.
    """
    x = as_f64(x, "x")
    ns = _as_shape(normalized_shape)
    eps = check_eps(eps)
    if len(ns) == 0 or x.ndim < len(ns) or x.shape[x.ndim - len(ns):] != ns:
        raise ValueError(f"layer norm normalizes over the trailing dims normalized_shape={ns}, but x has shape "
                         f"{x.shape}; pass normalized_shape=x.shape[-k:] for the k dims to normalize over")
    gamma = check_param(gamma, ns, "gamma", "normalized element")
    beta = check_param(beta, ns, "beta", "normalized element")
    K = int(np.prod(ns))
    rows = x.reshape(-1, K)
    if rows.shape[0] == 0 or K == 0:
        cache = LayerNormCache(x.shape, rows, np.zeros(rows.shape[0]), None if gamma is None else gamma.reshape(-1),
                               beta is not None, ns)
        return np.empty_like(x), cache
    xhat, _, _, invstd = normalize_rows(rows, eps)
    y = xhat
    if gamma is not None:
        y = y * gamma.reshape(1, K)
    if beta is not None:
        y = y + beta.reshape(1, K)
    cache = LayerNormCache(x.shape, xhat, invstd, None if gamma is None else gamma.reshape(-1),
                           beta is not None, ns)
    return y.reshape(x.shape), cache


def layer_norm_backward(dy, cache: LayerNormCache):
    """Closed-form backward. Returns ``(dx, dgamma, dbeta)`` (``None`` for an absent parameter)."""
    dy = as_f64(dy, "dy")
    K = cache.xhat.shape[1]
    g = dy.reshape(-1, K)
    dgamma = None if cache.gamma is None else (g * cache.xhat).sum(axis=0).reshape(cache.normalized_shape)
    dbeta = g.sum(axis=0).reshape(cache.normalized_shape) if cache.has_beta else None
    if dy.size == 0:
        return np.zeros_like(dy), dgamma, dbeta
    dxhat = g if cache.gamma is None else g * cache.gamma.reshape(1, K)
    dx = normalize_rows_backward(dxhat, cache.xhat, cache.invstd)
    return dx.reshape(cache.shape), dgamma, dbeta
