"""Ghost Batch Normalization, NumPy reference (no torch).

Hoffer, Hubara, Soudry: "Train longer, generalize better", NeurIPS 2017.

Training: the batch (N, C, *) is split along N into consecutive virtual batches of ``virtual_batch_size``
samples (the last one may be smaller; a last chunk with a single value per channel is merged into the previous
chunk). Each virtual batch is batch-normalized with its own statistics, and the running statistics take one
BatchNorm momentum step per virtual batch, in order. Evaluation is BatchNorm with the running statistics.
"""
from __future__ import annotations

import numpy as np


def chunk_sizes(n, spatial, virtual_batch_size):
    """Sizes of the virtual batches for a batch of ``n`` samples with ``spatial`` values per sample."""
    vbs = max(1, int(virtual_batch_size))
    sizes = [min(vbs, n - i) for i in range(0, n, vbs)]
    if len(sizes) > 1 and sizes[-1] * spatial == 1:
        sizes[-2] += sizes.pop()
    return sizes


def _bn_forward(x3, weight, bias, eps):
    mu = x3.mean((0, 2))
    var = ((x3 - mu[None, :, None]) ** 2).mean((0, 2))
    inv = 1.0 / np.sqrt(var + eps)
    xhat = (x3 - mu[None, :, None]) * inv[None, :, None]
    return xhat, mu, var, inv


def forward(x, virtual_batch_size, running_mean, running_var, weight=None, bias=None, eps=1e-5,
            training=True, momentum=0.1):
    """Returns ``(y, cache)``; ``cache["running_mean"]``/``["running_var"]`` are the updated statistics."""
    x = np.asarray(x, dtype=np.float64)
    n, c = x.shape[:2]
    x3 = x.reshape(n, c, -1)
    rm = np.array(running_mean, dtype=np.float64)
    rv = np.array(running_var, dtype=np.float64)
    parts = []
    if training:
        start = 0
        for size in chunk_sizes(n, x3.shape[2], virtual_batch_size):
            xc = x3[start:start + size]
            start += size
            xhat, mu, var, inv = _bn_forward(xc, weight, bias, eps)
            m = xc.shape[0] * xc.shape[2]
            rm = (1 - momentum) * rm + momentum * mu
            rv = (1 - momentum) * rv + momentum * var * m / (m - 1)
            parts.append((xhat, inv))
        xhat = np.concatenate([p[0] for p in parts])
    else:
        inv = 1.0 / np.sqrt(rv + eps)
        xhat = (x3 - rm[None, :, None]) * inv[None, :, None]
        parts.append((xhat, inv))
    y = xhat
    if weight is not None:
        y = y * np.asarray(weight, dtype=np.float64)[None, :, None]
    if bias is not None:
        y = y + np.asarray(bias, dtype=np.float64)[None, :, None]
    cache = dict(shape=x.shape, parts=parts, weight=weight, bias=bias, training=training, xhat=xhat,
                 running_mean=rm, running_var=rv)
    return y.reshape(x.shape), cache


def backward(dout, cache):
    """Per virtual batch, the BatchNorm closed form dx = inv * (g - mean(g) - xhat * mean(g * xhat))."""
    shape = cache["shape"]
    n, c = shape[:2]
    dy = np.asarray(dout, dtype=np.float64).reshape(n, c, -1)
    w = cache["weight"]
    grads = {"bias": dy.sum((0, 2)) if cache["bias"] is not None else None,
             "weight": (dy * cache["xhat"]).sum((0, 2)) if w is not None else None}
    g = dy * np.asarray(w, dtype=np.float64)[None, :, None] if w is not None else dy
    if not cache["training"]:
        grads["x"] = (g * cache["parts"][0][1][None, :, None]).reshape(shape)
        return grads
    out, start = [], 0
    for xhat, inv in cache["parts"]:
        gc = g[start:start + xhat.shape[0]]
        start += xhat.shape[0]
        out.append(inv[None, :, None] * (gc - gc.mean((0, 2), keepdims=True)
                                         - xhat * (gc * xhat).mean((0, 2), keepdims=True)))
    grads["x"] = np.concatenate(out).reshape(shape)
    return grads
