"""Batch Renormalization, NumPy reference (no torch).

Ioffe: "Batch Renormalization: Towards Reducing Minibatch Dependence in Batch-Normalized Models", NeurIPS 2017.

Input (N, C, *), statistics per channel over m = N * prod(*) values (biased variance). Training:

    sigma_B = sqrt(var_B + eps)                     sigma = sqrt(running_var + eps)
    r = clip(sigma_B / sigma, 1/r_max, r_max)        d = clip((mu_B - running_mean) / sigma, -d_max, d_max)
    xhat = (x - mu_B) / sigma_B * r + d              y = xhat * weight + bias

r and d are treated as constants by the gradient (stop-gradient). With r_max = 1 and d_max = 0 this is exactly
BatchNorm. Evaluation: y = (x - running_mean) / sigma * weight + bias. Running statistics update as in
BatchNorm: running = (1 - momentum) running + momentum * batch, unbiased variance var_B * m / (m - 1).

Schedule (:func:`limits`): during the first ``warmup_steps`` training steps r_max and d_max ramp linearly from
(1, 0) to their targets, so training starts as BatchNorm.
"""
from __future__ import annotations

import numpy as np


def limits(step, r_max, d_max, warmup_steps):
    """(r_max_t, d_max_t) at training step ``step`` (0-based count of previous training steps)."""
    t = 1.0 if warmup_steps <= 0 else min(1.0, step / warmup_steps)
    return 1.0 + (r_max - 1.0) * t, d_max * t


def forward(x, running_mean, running_var, weight=None, bias=None, eps=1e-5, training=True, r_max=3.0,
            d_max=5.0):
    x = np.asarray(x, dtype=np.float64)
    n, c = x.shape[:2]
    x3 = x.reshape(n, c, -1)
    rm = np.asarray(running_mean, dtype=np.float64)
    rv = np.asarray(running_var, dtype=np.float64)
    sigma = np.sqrt(rv + eps)
    if training:
        mu = x3.mean((0, 2))
        var = ((x3 - mu[None, :, None]) ** 2).mean((0, 2))
        sigma_b = np.sqrt(var + eps)
        r = np.clip(sigma_b / sigma, 1.0 / r_max, r_max)
        d = np.clip((mu - rm) / sigma, -d_max, d_max)
    else:
        mu, var, sigma_b = rm, rv, sigma
        r, d = np.ones(c), np.zeros(c)
    xn = (x3 - mu[None, :, None]) / sigma_b[None, :, None]
    xhat = xn * r[None, :, None] + d[None, :, None]
    y = xhat
    if weight is not None:
        y = y * np.asarray(weight, dtype=np.float64)[None, :, None]
    if bias is not None:
        y = y + np.asarray(bias, dtype=np.float64)[None, :, None]
    cache = dict(shape=x.shape, xn=xn, xhat=xhat, r=r, d=d, sigma_b=sigma_b, weight=weight, bias=bias,
                 training=training, batch_mean=mu, batch_var=var, m=n * x3.shape[2])
    return y.reshape(x.shape), cache


def update_running(running_mean, running_var, cache, momentum=0.1):
    m = cache["m"]
    unbiased = cache["batch_var"] * m / (m - 1)
    return ((1 - momentum) * np.asarray(running_mean) + momentum * cache["batch_mean"],
            (1 - momentum) * np.asarray(running_var) + momentum * unbiased)


def backward(dout, cache):
    """Closed form, r and d constant. With g = dL/dxhat * r (per channel), xn = (x - mu_B) / sigma_B:
        training: dx = (g - mean(g) - xn * mean(g * xn)) / sigma_B      (means over the m values of a channel)
        eval:     dx = g / sigma
        dweight = sum(dy * xhat), dbias = sum(dy)
    """
    shape = cache["shape"]
    n, c = shape[:2]
    dy = np.asarray(dout, dtype=np.float64).reshape(n, c, -1)
    w = cache["weight"]
    grads = {"bias": dy.sum((0, 2)) if cache["bias"] is not None else None,
             "weight": (dy * cache["xhat"]).sum((0, 2)) if w is not None else None}
    g = dy * np.asarray(w, dtype=np.float64)[None, :, None] if w is not None else dy
    g = g * cache["r"][None, :, None]
    sb = cache["sigma_b"][None, :, None]
    if cache["training"]:
        xn = cache["xn"]
        dx = (g - g.mean((0, 2), keepdims=True) - xn * (g * xn).mean((0, 2), keepdims=True)) / sb
    else:
        dx = g / sb
    grads["x"] = dx.reshape(shape)
    return grads
