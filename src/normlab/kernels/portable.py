"""Portable kernels: plain torch ops, any device, any floating dtype.

This file is the contract every backend (``cpu.py`` with numba, a GPU backend) implements with the same
signatures and the same numerics. It is also the fallback when no fast backend applies.

Layout conventions
------------------
Batch-norm kernels take ``x`` of shape ``(N, C, *)`` (channel dimension 1, any strides) and return outputs and
input gradients with ``x``'s shape and dtype, in ``output_format(x)`` (channels_last for channels_last inputs,
else contiguous, as torch.nn's batch norm). Statistics are per channel over ``N * prod(*)``.

Group-norm kernels take ``x`` of shape ``(N, C, S)`` contiguous and ``groups`` G dividing C; statistics are per
``(n, g)`` over ``(C/G) * S``, affine parameters per channel. LayerNorm over K trailing elements is
``(M, K, 1)`` with G = 1; InstanceNorm is G = C.

Numerics
--------
* Statistics accumulate in float32 for float16/bfloat16/float32 inputs and in float64 for float64 inputs
  (``acc_dtype``); ``invstd`` (and group norm's ``mean``) come back in that dtype. The batch-norm training
  forward returns its ``mean`` in **float64** (C values): the backward subtracts it from ``x`` relative to the
  channel's first value, so a mean near 1e4 in float32 data costs the gradients no precision.
* Variances are *biased* (divide by n), computed on data shifted by one sample of the channel/group, so a
  constant channel gives mean == x exactly, variance 0 and an output of exactly ``bias``, and large means with a
  small spread (1e4 + N(0, 1) in float32) lose no precision.
* ``invstd = 1 / sqrt(var + eps)``; eps is added in ``acc_dtype``.

Activations (fused, batch norm only): ``"identity"``, ``"relu"``, ``"silu"``, ``"sigmoid"``. The backward
recomputes the pre-activation ``z = xhat * w + b`` from ``x`` so only ``x``, ``mean`` and ``invstd`` are saved.
"""
from __future__ import annotations

import torch
from torch import Tensor

ACTIVATIONS = ("identity", "relu", "silu", "sigmoid")


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype: float64 for float64, float32 for everything else."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def output_format(x: Tensor) -> torch.memory_format:
    """The memory format of a norm's output on ``x``, torch.nn's: channels_last (channels_last_3d) for a 4-D
    (5-D) input laid out so, contiguous for every other input, permuted and strided ones included."""
    fmt = {4: torch.channels_last, 5: torch.channels_last_3d}.get(x.dim())
    if fmt is None or x.is_contiguous():
        return torch.contiguous_format
    try:
        return fmt if x.is_contiguous(memory_format=fmt) else torch.contiguous_format
    except RuntimeError:  # inside torch.func.vmap, which answers for the contiguous format only
        return torch.contiguous_format


def empty_output(x: Tensor) -> Tensor:
    """An uninitialized output (or input gradient) for ``x``: x's strides where x is laid out in its
    ``output_format``, else that format."""
    fmt = output_format(x)
    return torch.empty_like(x) if x.is_contiguous(memory_format=fmt) else torch.empty_like(x, memory_format=fmt)


def _in_format(t: Tensor, fmt: torch.memory_format, dtype: torch.dtype) -> Tensor:
    """``t`` in ``dtype``, laid out in ``fmt`` (one copy at most; ``t.to(dtype, memory_format=fmt)`` would
    alias a permuted ``t`` of that dtype)."""
    if t.is_contiguous(memory_format=fmt):
        return t.to(dtype)
    return torch.empty_like(t, dtype=dtype, memory_format=fmt).copy_(t)


def _bshape(x: Tensor) -> list[int]:
    """Shape that broadcasts a per-channel vector against ``x`` of shape (N, C, *)."""
    return [1, x.shape[1]] + [1] * (x.dim() - 2)


def _reduce_dims(x: Tensor) -> list[int]:
    return [0] + list(range(2, x.dim()))


def activate(z: Tensor, act: str) -> Tensor:
    if act == "identity":
        return z
    if act == "relu":
        return torch.relu(z)
    if act == "sigmoid":
        return torch.sigmoid(z)
    if act == "silu":
        return z * torch.sigmoid(z)
    raise ValueError(f"unknown activation {act!r}; expected one of {ACTIVATIONS}")


def activate_grad(dy: Tensor, z: Tensor, act: str) -> Tensor:
    """dL/dz given dL/dy and the pre-activation z."""
    if act == "identity":
        return dy
    if act == "relu":  # as torch's threshold_backward: a NaN pre-activation passes the gradient
        return dy * (z <= 0).logical_not().to(dy.dtype)
    s = torch.sigmoid(z)
    if act == "sigmoid":
        return dy * s * (1 - s)
    if act == "silu":
        return dy * s * (1 + z * (1 - s))
    raise ValueError(f"unknown activation {act!r}; expected one of {ACTIVATIONS}")


# ----------------------------------------------------------------------------------------------------------
# batch norm
# ----------------------------------------------------------------------------------------------------------
def _shifted_stats(x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Per-channel ``(shift, mean - shift, biased var)`` in ``acc_dtype``; shift is the channel's first value."""
    xa = x.to(acc_dtype(x.dtype))
    # the statistics do not depend on the shift: detached, so that autograd differentiating these ops (under
    # torch.func) takes no path through it
    shift = xa.select(0, 0).reshape(x.shape[1], -1)[:, 0].detach()
    var, mean_s = torch.var_mean(xa - shift.reshape(_bshape(x)), dim=_reduce_dims(x), correction=0)
    return shift, mean_s, var.clamp_min(0)


def bn_stats(x: Tensor) -> tuple[Tensor, Tensor]:
    """Per-channel (mean, biased var) of ``x`` (N, C, *), in ``acc_dtype``. Needs at least one element."""
    shift, mean_s, var = _shifted_stats(x)
    return shift + mean_s, var


def bn_train_forward(x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float,
                     act: str = "identity") -> tuple[Tensor, Tensor, Tensor]:
    """Training forward: returns ``(y, mean, invstd)``; y = act(((x - mean) * invstd) * w + b).

    The normalization subtracts the shift and the small remainder separately, (x - shift) - (mean - shift),
    so that a float32 mean rounded near 1e4 costs no precision in y.
    """
    shift, mean_s, var = _shifted_stats(x)
    invstd = torch.rsqrt(var + eps)
    y = _normalize(x, shift, invstd, weight, bias, act, mean_s)
    return y, shift.double() + mean_s.double(), invstd


def bn_train_forward_update(x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float, act: str,
                            running_mean: Tensor, running_var: Tensor,
                            momentum: float) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """:func:`bn_train_forward`, then :func:`running_update` with its statistics: ``(y, mean, invstd, nonfinite)``
    (``nonfinite`` as running_update returns it)."""
    y, mean, invstd = bn_train_forward(x, weight, bias, eps, act)
    n = x.numel() // x.shape[1]
    return y, mean, invstd, running_update(running_mean, running_var, mean, invstd, eps, n, momentum)


def bn_train_forward_saved(x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float, act: str,
                           running_mean: Tensor | None, running_var: Tensor | None,
                           momentum: float) -> tuple[Tensor, tuple[Tensor, Tensor], Tensor | None]:
    """The training forward as an autograd node calls it: ``(y, saved, nonfinite)``, ``saved`` = (mean, invstd)
    for :func:`bn_backward_saved`; the running statistics are updated unless None."""
    y, mean, invstd = bn_train_forward(x, weight, bias, eps, act)
    if running_mean is None or running_var is None:
        return y, (mean, invstd), None
    n = x.numel() // x.shape[1]
    return y, (mean, invstd), running_update(running_mean, running_var, mean, invstd, eps, n, momentum)


def bn_backward_saved(dy: Tensor, x: Tensor, weight: Tensor | None, bias: Tensor | None,
                      saved: tuple[Tensor, Tensor], act: str,
                      needs: tuple[bool, bool, bool] = (True, True, True)
                      ) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """:func:`bn_backward` of a training forward, with what :func:`bn_train_forward_saved` kept."""
    return bn_backward(dy, x, weight, bias, *saved, act, True, needs)


def bn_eval_forward(x: Tensor, running_mean: Tensor, running_var: Tensor, weight: Tensor | None,
                    bias: Tensor | None, eps: float, act: str = "identity") -> Tensor:
    """Evaluation forward with the running statistics."""
    acc = acc_dtype(x.dtype)
    invstd = torch.rsqrt(running_var.to(acc) + eps)
    return _normalize(x, running_mean.to(acc), invstd, weight, bias, act)


def _normalize(x, mean, invstd, weight, bias, act, residual=None):
    acc = acc_dtype(x.dtype)
    b = _bshape(x)
    scale = invstd if weight is None else invstd * weight.to(acc)
    centered = _in_format(x, output_format(x), acc) - mean.reshape(b)
    if residual is not None:
        centered = centered - residual.reshape(b)
    z = centered * scale.reshape(b)
    if bias is not None:
        z = z + bias.to(acc).reshape(b)
    return activate(z, act).to(x.dtype)


def bn_backward(dy: Tensor, x: Tensor, weight: Tensor | None, bias: Tensor | None, mean: Tensor,
                invstd: Tensor, act: str, training: bool,
                needs: tuple[bool, bool, bool] = (True, True, True)
                ) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """Closed-form backward of ``bn_*_forward``: returns ``(dx, dweight, dbias)`` (None where not needed).

    With xhat = (x - mean) * invstd, z = xhat * w + b, g = dL/dz, n = N * prod(*):
        dbias = sum(g),  dweight = sum(g * xhat)
        training: dx = w * invstd * (g - dbias / n - xhat * dweight / n)
        eval:     dx = w * invstd * g           (mean and invstd are constants)
    """
    acc = acc_dtype(x.dtype)
    b = _bshape(x)
    dims = _reduce_dims(x)
    w = None if weight is None else weight.to(acc)
    # x - mean as (x - x0) - (mean - x0), x0 the channel's first value: exact for a large mean given in float64
    # x and dy in the output's format, as dx (and torch's): a permuted x's y and dx are contiguous
    fmt = output_format(x)
    xa = _in_format(x, fmt, acc)
    x0 = xa.select(0, 0).reshape(x.shape[1], -1)[:, 0]
    rel = (mean.to(torch.float64) - x0.to(torch.float64)).to(acc)
    xhat = ((xa - x0.reshape(b)) - rel.reshape(b)) * invstd.reshape(b)
    g = _in_format(dy, fmt, acc)
    if act != "identity":
        z = xhat if w is None else xhat * w.reshape(b)
        if bias is not None:
            z = z + bias.to(acc).reshape(b)
        g = activate_grad(g, z, act)
    need_stats = training and needs[0]
    db = g.sum(dims) if (needs[2] or need_stats) else None
    dw = (g * xhat).sum(dims) if (needs[1] or need_stats) else None
    dx = None
    if needs[0]:
        scale = invstd if w is None else invstd * w
        if training:
            n = x.numel() // x.shape[1]
            g = g - (db / n).reshape(b) - xhat * (dw / n).reshape(b)
        dx = (g * scale.reshape(b)).to(x.dtype)
    return (dx,
            None if not needs[1] or dw is None else dw,
            None if not needs[2] or db is None else db)


def running_update(running_mean: Tensor, running_var: Tensor, mean: Tensor, invstd: Tensor, eps: float, n: int,
                   momentum: float) -> Tensor | None:
    """In place: ``running = (1 - momentum) * running + momentum * batch`` for the mean and for the unbiased
    variance ``var * n / (n - 1)``, ``var = invstd**-2 - eps``, in float64. A channel whose batch mean or
    variance is not finite keeps its running values. Returns the per-channel mask of such channels (a tensor
    on the statistics' device, so nothing waits for it), or None when every channel is known to be finite."""
    var = (invstd.to(torch.float64).pow(-2) - eps).clamp_min(0) * (n / max(n - 1, 1))
    mean64 = mean.to(torch.float64)
    finite = torch.isfinite(mean64) & torch.isfinite(var)
    old_mean, old_var = running_mean.to(torch.float64), running_var.to(torch.float64)
    running_mean.copy_(torch.where(finite, old_mean * (1 - momentum) + mean64 * momentum, old_mean))
    running_var.copy_(torch.where(finite, old_var * (1 - momentum) + var * momentum, old_var))
    return ~finite


# ----------------------------------------------------------------------------------------------------------
# group norm (and layer norm, instance norm through it)
# ----------------------------------------------------------------------------------------------------------
def gn_forward(x: Tensor, weight: Tensor | None, bias: Tensor | None, groups: int,
               eps: float) -> tuple[Tensor, Tensor, Tensor]:
    """Forward on ``x`` (N, C, S): returns ``(y, mean, invstd)`` with mean, invstd of shape (N, G)."""
    n, c, s = x.shape
    acc = acc_dtype(x.dtype)
    xg = x.to(acc).reshape(n, groups, (c // groups) * s)
    shift = xg[:, :, :1].detach()  # as _shifted_stats'
    var, mean_s = torch.var_mean(xg - shift, dim=2, correction=0)
    mean = mean_s + shift[:, :, 0]
    invstd = torch.rsqrt(var.clamp_min(0) + eps)
    xhat = ((xg - shift) - mean_s[:, :, None]) * invstd[:, :, None]
    y = xhat.reshape(n, c, s)
    if weight is not None:
        y = y * weight.to(acc).reshape(1, c, 1)
    if bias is not None:
        y = y + bias.to(acc).reshape(1, c, 1)
    return y.to(x.dtype), mean, invstd


def gn_backward(dy: Tensor, x: Tensor, weight: Tensor | None, mean: Tensor, invstd: Tensor, groups: int,
                needs: tuple[bool, bool, bool] = (True, True, True)
                ) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """Closed-form backward of ``gn_forward``: ``(dx, dweight, dbias)``, per group m = (C/G) * S:
        dweight[c] = sum_{n,s} dy * xhat,  dbias[c] = sum_{n,s} dy,  g = dy * w
        dx = invstd * (g - mean_group(g) - xhat * mean_group(g * xhat))
    """
    n, c, s = x.shape
    acc = acc_dtype(x.dtype)
    xhat = ((x.to(acc).reshape(n, groups, -1) - mean[:, :, None]) * invstd[:, :, None]).reshape(n, c, s)
    d = dy.to(acc)
    dw = (d * xhat).sum((0, 2)) if needs[1] else None
    db = d.sum((0, 2)) if needs[2] else None
    dx = None
    if needs[0]:
        g = d if weight is None else d * weight.to(acc).reshape(1, c, 1)
        gg = g.reshape(n, groups, -1)
        xg = xhat.reshape(n, groups, -1)
        dxg = invstd[:, :, None] * (gg - gg.mean(2, keepdim=True) - xg * (gg * xg).mean(2, keepdim=True))
        dx = dxg.reshape(n, c, s).to(x.dtype)
    return dx, dw, db
