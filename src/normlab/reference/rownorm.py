"""The one primitive: normalize rows, and its backward.

Every member of the family is "subtract a mean, divide by a standard deviation" over some set of elements.
Lay each such set out as one row of a matrix ``R`` of shape ``(M, K)`` and they are all the same function:

==============  ===========================================  =====================
norm            rows                                         row length K
==============  ===========================================  =====================
LayerNorm       x.reshape(M, prod(normalized_shape))          prod(normalized_shape)
GroupNorm       x.reshape(N * G, (C // G) * prod(spatial))    (C / G) * spatial
InstanceNorm    GroupNorm with G = C                          spatial
BatchNorm       x.moveaxis(1, 0).reshape(C, N * spatial)       N * spatial
==============  ===========================================  =====================

Forward, per row r with K elements::

    mu_r     = (1/K) sum_k R[r, k]
    var_r    = (1/K) sum_k (R[r, k] - mu_r)^2          (biased estimator: divide by K, not K - 1)
    invstd_r = 1 / sqrt(var_r + eps)
    xhat     = (R - mu_r) * invstd_r

Backward, given g = dL/dxhat (same shape as R)::

    dL/dR = invstd_r * (g - mean_k(g) - xhat * mean_k(g * xhat))

(derivation: xhat depends on R directly, through mu and through var; the two correction terms are the
projections of g onto the constant vector and onto xhat, which the normalization removes.)

Numerics (float64)
------------------
:func:`moments` subtracts a *shift* (the first element of each reduced set) before it sums, then takes the
variance in a second pass over the centred values. The shift makes a constant set exact (every shifted value
is 0, so mean == x and var == 0, and the output is exactly ``beta``); the second pass avoids the cancellation
of the one-pass formula ``E[x^2] - E[x]^2``, which loses ``log10(mean^2 / var)`` digits (for
``1e6 + N(0, 0.1)`` in float64 that is 14 of 16 digits; see ``tests/test_reference.py``).
"""
from __future__ import annotations

import numpy as np


def moments(x: np.ndarray, axes: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mean and biased variance of ``x`` over ``axes`` (kept as size-1 dims), plus the centred values.

    Returns ``(mean, var, xc)`` with ``xc = x - mean`` computed as ``(x - shift) - (mean - shift)``.
    ``var = mean(xc**2)`` is never negative.

    Example::

        >>> m, v, xc = moments(np.array([[1.0, 2.0, 3.0]]), axes=(1,))
        >>> float(m[0, 0]), float(v[0, 0])
        (2.0, 0.6666666666666666)
    """
    index = tuple(slice(0, 1) if a in axes else slice(None) for a in range(x.ndim))
    shift = x[index]                      # first element of every reduced set, broadcastable to x
    d = x - shift
    mean_d = d.mean(axis=axes, keepdims=True)
    xc = d - mean_d
    var = (xc * xc).mean(axis=axes, keepdims=True)
    return shift + mean_d, var, xc


def normalize_rows(rows: np.ndarray, eps: float) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Normalize each row of ``rows`` (shape ``(M, K)``) to zero mean and unit (biased) variance.

    Returns ``(xhat, mean, var, invstd)``; ``xhat`` has shape ``(M, K)``, the statistics shape ``(M,)``.
    """
    mean, var, xc = moments(rows, axes=(1,))
    invstd = 1.0 / np.sqrt(var + eps)
    return xc * invstd, mean[:, 0], var[:, 0], invstd[:, 0]


def normalize_rows_backward(dxhat: np.ndarray, xhat: np.ndarray, invstd: np.ndarray) -> np.ndarray:
    """Gradient through :func:`normalize_rows`: ``invstd * (g - mean(g) - xhat * mean(g * xhat))`` per row.

    ``dxhat`` and ``xhat`` have shape ``(M, K)``, ``invstd`` shape ``(M,)``.
    """
    g_mean = dxhat.mean(axis=1, keepdims=True)
    gx_mean = (dxhat * xhat).mean(axis=1, keepdims=True)
    return invstd[:, None] * (dxhat - g_mean - xhat * gx_mean)
