"""Switchable Normalization, NumPy reference (no torch).

Luo, Ren, Peng, Zhang, Li: "Differentiable Learning-to-Normalize via Switchable Normalization", ICLR 2019.

Input ``x`` of shape (N, C, *); write S = prod(*). Three sets of statistics, all *biased* (divide by the count):

    instance (IN):  mu_in[n, c]  = mean_s x[n, c, s]            var_in[n, c]  = mean_s (x - mu_in)^2
    layer    (LN):  mu_ln[n]     = mean_c mu_in[n, c]           var_ln[n]     = mean_c var_in + mean_c (mu_in - mu_ln)^2
    batch    (BN):  mu_bn[c]     = mean_n mu_in[n, c]           var_bn[c]     = mean_n var_in + mean_n (mu_in - mu_bn)^2

The LN and BN variances use the law of total variance on the instance statistics, so no E[x^2] - E[x]^2
cancellation happens. They equal the direct biased variance over (C, S) and over (N, S).

With p = softmax(mean_weight) and q = softmax(var_weight), logits in the order (in, ln, bn):

    mu  = p0 mu_in + p1 mu_ln + p2 mu_bn          var = q0 var_in + q1 var_ln + q2 var_bn      (both (N, C))
    y   = (x - mu) / sqrt(var + eps) * weight + bias

With S = 1 (one value per sample and channel) the IN component is dropped: p and q are softmaxes of the
(ln, bn) logits, with a weight of 0 (and no gradient) for in.

In evaluation (``training=False``) mu_bn, var_bn are the running statistics (constants). In training the
running statistics are updated as in BatchNorm: running = (1 - momentum) running + momentum * batch, with the
*unbiased* batch variance var_bn * m / (m - 1), m = N * S.
"""
from __future__ import annotations

import numpy as np


def _softmax(z):
    z = np.asarray(z, dtype=np.float64)
    e = np.exp(z - z.max())
    return e / e.sum()


def _mixture(logits, spatial):
    """softmax over (in, ln, bn); with S = 1 instance statistics do not exist: softmax over (ln, bn), IN weight 0."""
    logits = np.asarray(logits, dtype=np.float64)
    if spatial > 1:
        return _softmax(logits)
    return np.concatenate([[0.0], _softmax(logits[1:])])


def forward(x, mean_weight, var_weight, weight=None, bias=None, eps=1e-5, training=True,
            running_mean=None, running_var=None):
    """Returns ``(y, cache)``. ``cache["batch_mean"]``/``cache["batch_var"]`` hold the biased BN statistics."""
    x = np.asarray(x, dtype=np.float64)
    n, c = x.shape[:2]
    x3 = x.reshape(n, c, -1)
    s = x3.shape[2]
    mu_in = x3.mean(2)
    var_in = ((x3 - mu_in[:, :, None]) ** 2).mean(2)
    mu_ln = mu_in.mean(1)
    var_ln = var_in.mean(1) + ((mu_in - mu_ln[:, None]) ** 2).mean(1)
    batch_mean = mu_in.mean(0)
    batch_var = var_in.mean(0) + ((mu_in - batch_mean[None, :]) ** 2).mean(0)
    if training or running_mean is None:
        mu_bn, var_bn = batch_mean, batch_var
    else:
        mu_bn = np.asarray(running_mean, dtype=np.float64)
        var_bn = np.asarray(running_var, dtype=np.float64)
    p, q = _mixture(mean_weight, s), _mixture(var_weight, s)
    mu = p[0] * mu_in + p[1] * mu_ln[:, None] + p[2] * mu_bn[None, :]
    var = q[0] * var_in + q[1] * var_ln[:, None] + q[2] * var_bn[None, :]
    inv = 1.0 / np.sqrt(var + eps)
    xc = x3 - mu[:, :, None]
    xhat = xc * inv[:, :, None]
    y = xhat
    if weight is not None:
        y = y * np.asarray(weight, dtype=np.float64)[None, :, None]
    if bias is not None:
        y = y + np.asarray(bias, dtype=np.float64)[None, :, None]
    batch_stats_used = training or running_mean is None
    cache = dict(x3=x3, shape=x.shape, mu_in=mu_in, mu_ln=mu_ln, mu_bn=mu_bn, mu=mu, inv=inv, xc=xc,
                 xhat=xhat, p=p, q=q, weight=weight, bias=bias, var_in=var_in, var_ln=var_ln, var_bn=var_bn,
                 batch_stats_used=batch_stats_used, batch_mean=batch_mean, batch_var=batch_var)
    return y.reshape(x.shape), cache


def update_running(running_mean, running_var, cache, momentum=0.1):
    """New ``(running_mean, running_var)`` after one training step (unbiased variance, torch's momentum)."""
    n, c, s = cache["x3"].shape
    m = n * s
    unbiased = cache["batch_var"] * m / (m - 1)
    return ((1 - momentum) * np.asarray(running_mean) + momentum * cache["batch_mean"],
            (1 - momentum) * np.asarray(running_var) + momentum * unbiased)


def _softmax_backward(p, dp):
    return p * (dp - np.sum(p * dp))


def backward(dout, cache):
    """Closed form. Returns ``dict(x, weight, bias, mean_weight, var_weight)``.

    With g = dL/dxhat, for every statistics set k with index set I_k of size m_k:
        dL/dmu  = -sum_s g * inv                 dL/dvar = -1/2 sum_s g * (x - mu) * inv^3
        dL/dx   = g * inv + sum_k [ P_k / m_k + V_k * 2 (x - mu_k) / m_k ]
    where P_k (V_k) is p_k (q_k) times dL/dmu (dL/dvar) summed over the positions that share mu_k (var_k):
    nothing for IN, over c for LN, over n for BN (absent in evaluation, where the BN statistics are constants).
    d mean_weight = softmax'(sum(dL/dmu * mu_k)), likewise for var_weight.
    """
    x3 = cache["x3"]
    n, c, s = x3.shape
    dy = np.asarray(dout, dtype=np.float64).reshape(n, c, s)
    inv, xc, xhat, p, q = cache["inv"], cache["xc"], cache["xhat"], cache["p"], cache["q"]
    w = cache["weight"]
    grads = {}
    grads["bias"] = dy.sum((0, 2)) if cache["bias"] is not None else None
    grads["weight"] = (dy * xhat).sum((0, 2)) if w is not None else None
    g = dy * np.asarray(w, dtype=np.float64)[None, :, None] if w is not None else dy
    dmu = -(g * inv[:, :, None]).sum(2)                                 # (N, C)
    dvar = -0.5 * (g * xc).sum(2) * inv ** 3                            # (N, C)
    mus = [cache["mu_in"], np.broadcast_to(cache["mu_ln"][:, None], (n, c)),
           np.broadcast_to(cache["mu_bn"][None, :], (n, c))]
    vars_ = [cache["var_in"], np.broadcast_to(cache["var_ln"][:, None], (n, c)),
             np.broadcast_to(cache["var_bn"][None, :], (n, c))]
    grads["mean_weight"] = _softmax_backward(p, np.array([(dmu * m).sum() for m in mus]))
    grads["var_weight"] = _softmax_backward(q, np.array([(dvar * v).sum() for v in vars_]))
    if s == 1:  # softmax over (ln, bn) only: p[0] = 0 makes the formula give 0 for the IN logit, as it should
        grads["mean_weight"][0] = grads["var_weight"][0] = 0.0
    dx = g * inv[:, :, None]
    # instance statistics: over s, per (n, c)
    dx = dx + (p[0] * dmu)[:, :, None] / s + (q[0] * dvar)[:, :, None] * 2 * (x3 - cache["mu_in"][:, :, None]) / s
    # layer statistics: over (c, s), per n
    m_ln = c * s
    dx = dx + (p[1] * dmu.sum(1))[:, None, None] / m_ln \
        + (q[1] * dvar.sum(1))[:, None, None] * 2 * (x3 - cache["mu_ln"][:, None, None]) / m_ln
    if cache["batch_stats_used"]:  # batch statistics: over (n, s), per c
        m_bn = n * s
        dx = dx + (p[2] * dmu.sum(0))[None, :, None] / m_bn \
            + (q[2] * dvar.sum(0))[None, :, None] * 2 * (x3 - cache["mu_bn"][None, :, None]) / m_bn
    grads["x"] = dx.reshape(cache["shape"])
    return grads
