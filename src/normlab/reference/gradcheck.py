"""Numerical gradients by central differences, to check every hand-written backward.

For a function ``f`` with array output and an upstream gradient ``dout`` (same shape as the output), the
scalar ``L(x) = sum(f(x) * dout)`` has gradient ``dL/dx = J^T dout``, which is exactly what a backward
returns. Central differences estimate it element by element::

    dL/dx_i ~= (L(x + h e_i) - L(x - h e_i)) / (2 h)

with truncation error ``O(h^2 * f''')`` and rounding error ``O(eps_machine * |L| / h)``; in float64,
``h = 1e-6`` balances them at around 1e-10 relative. The step actually taken is ``(x_i + h) - x_i`` after
rounding, not ``h``, so inputs far from zero (1e4 + N(0, 1)) are differentiated just as accurately.

Typical use::

    >>> from normlab.reference import batch_norm_forward, batch_norm_backward
    >>> rng = np.random.default_rng(0)
    >>> x, g, b = rng.normal(size=(4, 3)), rng.normal(size=3), rng.normal(size=3)
    >>> fwd = lambda x, g, b: batch_norm_forward(x, g, b)[0]
    >>> bwd = lambda dout, x, g, b: batch_norm_backward(dout, batch_norm_forward(x, g, b)[1])
    >>> check_grads(fwd, bwd, [x, g, b]) < 1e-7
    True
"""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np


def rel_error(a, b) -> float:
    """Norm-wise relative error ``max|a - b| / max(max|a|, max|b|)`` (0 when both are all zero).

    Norm-wise rather than element-wise so that tiny entries (which carry no information) cannot blow it up.
    """
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    scale = max(np.max(np.abs(a), initial=0.0), np.max(np.abs(b), initial=0.0))
    if scale == 0.0:
        return 0.0
    return float(np.max(np.abs(a - b), initial=0.0) / scale)


def numerical_grad(f: Callable[[np.ndarray], np.ndarray], x, dout, h: float = 1e-6) -> np.ndarray:
    """Central-difference estimate of ``d sum(f(x) * dout) / dx``, same shape as ``x``.

    ``f`` takes an array shaped like ``x``; ``x`` itself is not modified.
    """
    x = np.array(x, dtype=np.float64, copy=True)
    dout = np.asarray(dout, dtype=np.float64)
    grad = np.zeros_like(x)
    flat, gflat = x.reshape(-1), grad.reshape(-1)
    for i in range(flat.size):
        xi = flat[i]
        hi_x, lo_x = xi + h, xi - h
        flat[i] = hi_x
        f_hi = np.sum(f(x) * dout)
        flat[i] = lo_x
        f_lo = np.sum(f(x) * dout)
        flat[i] = xi
        gflat[i] = (f_hi - f_lo) / (hi_x - lo_x)
    return grad


def check_grads(
    forward: Callable[..., np.ndarray],
    backward: Callable[..., Sequence[np.ndarray | None]],
    inputs: Sequence,
    dout=None,
    h: float = 1e-6,
    seed: int = 20150211,
    per_input: bool = False,
):
    """Compare an analytic backward with central differences for every input.

    Args:
        forward: ``forward(*inputs) -> out``.
        backward: ``backward(dout, *inputs) -> grads``, one entry per input (``None`` skips that input, e.g.
            a non-differentiable integer argument or an absent parameter).
        inputs: the arrays to differentiate with respect to (float64).
        dout: upstream gradient; a fixed random normal array of the output's shape when omitted.
        h: finite-difference step.
        per_input: also return the list of per-input errors.

    Returns:
        The maximum :func:`rel_error` over the inputs (and the per-input list when ``per_input``).
    """
    inputs = [np.asarray(a, dtype=np.float64) for a in inputs]
    out = forward(*inputs)
    if dout is None:
        dout = np.random.default_rng(seed).normal(size=np.shape(out))
    grads = backward(dout, *inputs)
    if len(grads) != len(inputs):
        raise ValueError(f"backward returned {len(grads)} gradients for {len(inputs)} inputs")
    errors = []
    for k, (a, g) in enumerate(zip(inputs, grads)):
        if g is None:
            continue
        if np.shape(g) != a.shape:
            raise ValueError(f"gradient {k} has shape {np.shape(g)}, its input has shape {a.shape}")

        def f_k(v, k=k):
            args = list(inputs)
            args[k] = v
            return forward(*args)

        errors.append(rel_error(g, numerical_grad(f_k, a, dout, h)))
    worst = max(errors, default=0.0)
    return (worst, errors) if per_input else worst
