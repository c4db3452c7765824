"""GPU backend: batch norm's kernel contract (:mod:`normlab.kernels.portable`) in Triton, for CUDA tensors.

Same signatures, same numerics as the portable contract: statistics of ``x - shift`` (shift = the channel's first
value) summed in ``acc_dtype`` per program and merged in float64; the forward subtracts the shift before scaling,
so a large mean costs no precision; the backward recomputes the pre-activation from ``x`` (activations fused both
ways). Group, layer and instance norm, and the running statistics' update, stay with the portable kernels.

Passes over the activation, as on CPU: training forward 2 reads + 1 write (per-channel partial sums, then
normalize), backward 2 reads of (x, dy) + 1 write, eval 1 read + 1 write. Every layout the contract takes with one
stride per dimension group is a 3-D view ``(N, C, S)`` with strides ``(sN, sC, sS)``: NCHW of any rank
``(C*S, S, 1)``, channels_last ``(S*C, 1, C)``, ``(M, C)`` as ``(M, C, 1)``. A program covers ``BLOCK_C`` channels
by a run of the ``N * S`` values of each, loaded as ``BLOCK_C x BLOCK_K`` tiles: wide in K where values of one
channel are adjacent (NCHW), wide in C where channels are (channels_last, (M, C)), so that loads coalesce.

**Status: tested in Triton's interpreter on CPU (``TRITON_INTERPRET=1``) against the portable kernels and the
float64 reference; not yet compiled or measured on a GPU** (no GPU was lent to this work; see BENCHMARKS.md). The
tile sizes below are first choices, to be tuned there.
"""
from __future__ import annotations

import os
from typing import NamedTuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import portable
from .portable import acc_dtype

# Triton's interpreter (TRITON_INTERPRET=1, read when the kernels are defined) runs them on CPU tensors: the tests
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")

ACT_CODES = {"identity": 0, "relu": 1, "silu": 2, "sigmoid": 3}
SUPPORTED_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
_PROGRAMS_PER_CHANNEL_BLOCK = 64  # programs along N * S for one block of channels (partial sums merged after)


# ------------------------------------------------------------------------------------------------------
# device code
# ------------------------------------------------------------------------------------------------------
@triton.jit
def _activate(z, ACT: tl.constexpr):
    if ACT == 1:
        z = tl.maximum(z, 0.0)
    elif ACT == 2:
        z = z * tl.sigmoid(z)
    elif ACT == 3:
        z = tl.sigmoid(z)
    return z


@triton.jit
def _activate_grad(g, z, ACT: tl.constexpr):
    """dL/dz from dL/dy and the pre-activation z."""
    if ACT == 1:
        g = tl.where(z > 0, g, 0.0)
    elif ACT == 2:
        s = tl.sigmoid(z)
        g = g * s * (1.0 + z * (1.0 - s))
    elif ACT == 3:
        s = tl.sigmoid(z)
        g = g * s * (1.0 - s)
    return g


@triton.jit
def _program(C, K, k_per_program, BLOCK_C: tl.constexpr):
    """This program's channels (and their mask) and its run k_lo..k_hi of each channel's N * S values."""
    cs = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    k_lo = tl.program_id(1) * k_per_program
    return cs, cs < C, k_lo, tl.minimum(k_lo + k_per_program, K)


@triton.jit
def _tile(cs, cm, k_start, k_end, S, sN, sC, sS, BLOCK_K: tl.constexpr):
    """Offsets and mask of the tile of values k_start.. of the channels ``cs``."""
    ks = k_start + tl.arange(0, BLOCK_K)
    n = ks // S
    s = ks - n * S
    offs = cs.to(tl.int64)[:, None] * sC + (n.to(tl.int64) * sN + s.to(tl.int64) * sS)[None, :]
    return offs, cm[:, None] & (ks < k_end)[None, :]


@triton.jit
def _store_partial(ptr, a, cs, cm, C):
    """Row ``program_id(1)`` of a (runs, C) buffer of partial sums: the tile's sums over its values."""
    tl.store(ptr + tl.program_id(1) * C + cs, tl.sum(a, 1), mask=cm)


@triton.jit
def _xhat_and_grad(dy_ptr, x_ptr, offs, mask, x0, rel, inv, w, b, ACT: tl.constexpr):
    """xhat = ((x - x0) - rel) * invstd and g = dL/dz of one tile, z = xhat * w + b recomputed from x."""
    acc = x0.dtype
    xhat = ((tl.load(x_ptr + offs, mask=mask, other=0.0).to(acc) - x0[:, None]) - rel[:, None]) * inv[:, None]
    g = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(acc)
    return xhat, _activate_grad(g, xhat * w[:, None] + b[:, None], ACT)


@triton.jit
def _stats_kernel(x_ptr, shift_ptr, s1_ptr, s2_ptr, C, S, K, sN, sC, sS, k_per_program,
                  BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr):
    """Partial sums of (x - shift) and (x - shift)**2 of BLOCK_C channels over one run of their N * S values."""
    cs, cm, k_lo, k_hi = _program(C, K, k_per_program, BLOCK_C)
    shift = tl.load(shift_ptr + cs, mask=cm, other=0.0)
    a1 = tl.zeros([BLOCK_C, BLOCK_K], shift.dtype)
    a2 = tl.zeros([BLOCK_C, BLOCK_K], shift.dtype)
    for i in range(0, k_per_program, BLOCK_K):
        offs, mask = _tile(cs, cm, k_lo + i, k_hi, S, sN, sC, sS, BLOCK_K)
        v = tl.load(x_ptr + offs, mask=mask, other=0.0).to(shift.dtype)
        d = tl.where(mask, v - shift[:, None], 0.0)
        a1 += d
        a2 += d * d
    _store_partial(s1_ptr, a1, cs, cm, C)
    _store_partial(s2_ptr, a2, cs, cm, C)


@triton.jit
def _normalize_kernel(x_ptr, y_ptr, shift_ptr, scale_ptr, offset_ptr, C, S, K, sN, sC, sS, k_per_program,
                      ACT: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr):
    """y = act((x - shift) * scale + offset), per-channel shift, scale and offset (in the accumulation dtype)."""
    cs, cm, k_lo, k_hi = _program(C, K, k_per_program, BLOCK_C)
    shift = tl.load(shift_ptr + cs, mask=cm, other=0.0)
    scale = tl.load(scale_ptr + cs, mask=cm, other=0.0)
    offset = tl.load(offset_ptr + cs, mask=cm, other=0.0)
    for i in range(0, k_per_program, BLOCK_K):
        offs, mask = _tile(cs, cm, k_lo + i, k_hi, S, sN, sC, sS, BLOCK_K)
        v = tl.load(x_ptr + offs, mask=mask, other=0.0).to(shift.dtype)
        z = _activate((v - shift[:, None]) * scale[:, None] + offset[:, None], ACT)
        tl.store(y_ptr + offs, z.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _channel_row(table_ptr, row, cs, cm, C):
    """Row ``row`` of a (rows, C) table of per-channel values, for the channels ``cs``."""
    return tl.load(table_ptr + row * C + cs, mask=cm, other=0.0)


@triton.jit
def _grad_terms(table_ptr, cs, cm, C):
    """x0, rel, invstd, w, b of the channels ``cs``: rows 0-4 of the backward's per-channel table."""
    return (_channel_row(table_ptr, 0, cs, cm, C), _channel_row(table_ptr, 1, cs, cm, C),
            _channel_row(table_ptr, 2, cs, cm, C), _channel_row(table_ptr, 3, cs, cm, C),
            _channel_row(table_ptr, 4, cs, cm, C))


@triton.jit
def _grad_sums_kernel(dy_ptr, x_ptr, table_ptr, sg_ptr, sgx_ptr, C, S, K, sN, sC, sS, k_per_program,
                      ACT: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr):
    """Partial sums of g and g * xhat, g = dL/dz, xhat = ((x - x0) - rel) * invstd."""
    cs, cm, k_lo, k_hi = _program(C, K, k_per_program, BLOCK_C)
    x0, rel, inv, w, b = _grad_terms(table_ptr, cs, cm, C)
    a1 = tl.zeros([BLOCK_C, BLOCK_K], x0.dtype)
    a2 = tl.zeros([BLOCK_C, BLOCK_K], x0.dtype)
    for i in range(0, k_per_program, BLOCK_K):
        offs, mask = _tile(cs, cm, k_lo + i, k_hi, S, sN, sC, sS, BLOCK_K)
        xhat, g = _xhat_and_grad(dy_ptr, x_ptr, offs, mask, x0, rel, inv, w, b, ACT)
        g = tl.where(mask, g, 0.0)
        a1 += g
        a2 += g * xhat
    _store_partial(sg_ptr, a1, cs, cm, C)
    _store_partial(sgx_ptr, a2, cs, cm, C)


@triton.jit
def _dx_kernel(dy_ptr, x_ptr, dx_ptr, table_ptr, C, S, K, sN, sC, sS, k_per_program,
               ACT: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr):
    """dx = kg * g + kx * xhat + k0, the per-channel coefficients in rows 5-7 of the table (see ``bn_backward``)."""
    cs, cm, k_lo, k_hi = _program(C, K, k_per_program, BLOCK_C)
    x0, rel, inv, w, b = _grad_terms(table_ptr, cs, cm, C)
    kg = _channel_row(table_ptr, 5, cs, cm, C)
    kx = _channel_row(table_ptr, 6, cs, cm, C)
    k0 = _channel_row(table_ptr, 7, cs, cm, C)
    for i in range(0, k_per_program, BLOCK_K):
        offs, mask = _tile(cs, cm, k_lo + i, k_hi, S, sN, sC, sS, BLOCK_K)
        xhat, g = _xhat_and_grad(dy_ptr, x_ptr, offs, mask, x0, rel, inv, w, b, ACT)
        dx = kg[:, None] * g + kx[:, None] * xhat + k0[:, None]
        tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=mask)


# ------------------------------------------------------------------------------------------------------
# host side
# ------------------------------------------------------------------------------------------------------
def _strides3(x: Tensor) -> tuple[int, int, int, int, int, int] | None:
    """(N, C, S, sN, sC, sS) of x (N, C, *) viewed as (N, C, S), or None where the trailing dimensions do not
    collapse into one stride."""
    n, c = x.shape[0], x.shape[1]
    rest = x.shape[2:]
    s = 1
    for d in rest:
        s *= d
    if s == 1:
        return n, c, 1, x.stride(0), x.stride(1), 1
    # the trailing dimensions (size > 1) must be dense among themselves, innermost last
    dims = [i for i in range(2, x.dim()) if x.shape[i] > 1]
    s_s = x.stride(dims[-1])
    expect = s_s
    for i in reversed(dims):
        if x.stride(i) != expect:
            return None
        expect *= x.shape[i]
    return n, c, s, x.stride(0), x.stride(1), s_s


def _dense_layout(x: Tensor) -> bool:
    """Contiguous, or channels_last (4-D) / channels_last_3d (5-D): layouts whose ``empty_like`` has x's strides."""
    if x.is_contiguous():
        return True
    if x.dim() == 4:
        return x.is_contiguous(memory_format=torch.channels_last)
    return x.dim() == 5 and x.is_contiguous(memory_format=torch.channels_last_3d)


def supports(x: Tensor) -> bool:
    """CUDA (or, in Triton's interpreter, CPU) tensors of a supported dtype, non-empty, contiguous or
    channels_last."""
    return ((x.is_cuda or (INTERPRETED and x.device.type == "cpu")) and x.dtype in SUPPORTED_DTYPES
            and x.dim() >= 2 and x.numel() > 0 and _dense_layout(x) and _strides3(x) is not None)


class _Launch(NamedTuple):
    """One launch geometry for every kernel on ``x``: the grid, the kernels' size arguments (C, S, K = N * S, the
    three strides, values per program) and their tile sizes."""
    grid: tuple[int, int]
    args: tuple[int, ...]
    blocks: dict
    count: int  # N * S, the values per channel


def _launch(x: Tensor) -> _Launch:
    """Channels adjacent in memory (sC == 1) take wide channel blocks, else one channel per block and wide value
    runs; up to _PROGRAMS_PER_CHANNEL_BLOCK runs per channel block."""
    n, c, s, s_n, s_c, s_s = _strides3(x)
    k = n * s
    if s_c == 1 and c > 1:
        block_c = min(64, triton.next_power_of_2(c))
        block_k = 16
    else:
        block_c = 1
        block_k = min(1024, triton.next_power_of_2(max(k, 16)))
    runs = max(1, min(_PROGRAMS_PER_CHANNEL_BLOCK, triton.cdiv(k, block_k)))
    per = triton.cdiv(triton.cdiv(k, runs), block_k) * block_k
    return _Launch((triton.cdiv(c, block_c), triton.cdiv(k, per)), (c, s, k, s_n, s_c, s_s, per),
                   {"BLOCK_C": block_c, "BLOCK_K": block_k}, k)


def _acc_vec(t: Tensor | None, c: int, acc: torch.dtype, fill: float, device) -> Tensor:
    if t is None:
        return torch.full((c,), fill, dtype=acc, device=device)
    return t.detach().to(acc).contiguous()


def _channel_firsts(x: Tensor, acc: torch.dtype) -> Tensor:
    """Each channel's first value (sample 0, position 0), as the portable kernels shift by."""
    return x.detach().select(0, 0).reshape(x.shape[1], -1)[:, 0].to(acc).contiguous()


def _shifted_stats(x: Tensor, g: _Launch) -> tuple[Tensor, Tensor, Tensor]:
    """Per-channel ``(shift, mean - shift, biased var)``: shift in ``acc_dtype``, the others in float64."""
    acc = acc_dtype(x.dtype)
    shift = _channel_firsts(x, acc)
    s1 = torch.empty((g.grid[1], x.shape[1]), dtype=acc, device=x.device)
    s2 = torch.empty_like(s1)
    _stats_kernel[g.grid](x, shift, s1, s2, *g.args, **g.blocks)
    mean_s = s1.double().sum(0) / g.count
    var = (s2.double().sum(0) / g.count - mean_s * mean_s).clamp_min(0)
    return shift, mean_s, var


def _normalize(x: Tensor, g: _Launch, shift: Tensor, scale: Tensor, offset: Tensor, act: str) -> Tensor:
    y = torch.empty_like(x)
    _normalize_kernel[g.grid](x, y, shift, scale, offset, *g.args, ACT=_act_code(act), **g.blocks)
    return y


def _act_code(act: str) -> int:
    try:
        return ACT_CODES[act]
    except KeyError:
        raise ValueError(f"unknown activation {act!r}; expected one of {tuple(ACT_CODES)}") from None


def bn_stats(x: Tensor) -> tuple[Tensor, Tensor]:
    """Per-channel (mean, biased var) of ``x`` (N, C, *), in ``acc_dtype``."""
    shift, mean_s, var = _shifted_stats(x, _launch(x))
    acc = acc_dtype(x.dtype)
    return (shift.double() + mean_s).to(acc), var.to(acc)


def bn_train_forward(x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float,
                     act: str = "identity") -> tuple[Tensor, Tensor, Tensor]:
    """Training forward ``(y, mean, invstd)``: mean in float64, invstd in ``acc_dtype``; 2 reads, 1 write."""
    _act_code(act)
    acc = acc_dtype(x.dtype)
    c = x.shape[1]
    g = _launch(x)
    shift, mean_s, var = _shifted_stats(x, g)
    invstd = torch.rsqrt(var.to(acc) + eps)
    w = _acc_vec(weight, c, torch.float64, 1.0, x.device)
    b = _acc_vec(bias, c, torch.float64, 0.0, x.device)
    scale = invstd.double() * w
    # z = ((x - shift) - mean_s) * scale + b, with the per-channel part folded into one offset
    offset = (b - mean_s * scale).to(acc)
    y = _normalize(x, g, shift, scale.to(acc), offset, act)
    return y, shift.double() + mean_s, invstd


def bn_train_forward_update(x, weight, bias, eps, act, running_mean, running_var, momentum):
    """:func:`bn_train_forward`, then the portable running-statistics update: ``(y, mean, invstd, nonfinite)``."""
    y, (mean, invstd), nonfinite = bn_train_forward_saved(x, weight, bias, eps, act, running_mean, running_var,
                                                          momentum)
    return y, mean, invstd, nonfinite


def bn_train_forward_saved(x, weight, bias, eps, act, running_mean, running_var, momentum):
    """The training forward as an autograd node calls it: ``(y, (mean, invstd), nonfinite)``."""
    y, mean, invstd = bn_train_forward(x, weight, bias, eps, act)
    if running_mean is None or running_var is None:
        return y, (mean, invstd), None
    n = x.numel() // x.shape[1]
    return y, (mean, invstd), portable.running_update(running_mean, running_var, mean, invstd, eps, n, momentum)


def bn_backward_saved(dy, x, weight, bias, saved, act, needs=(True, True, True)):
    """:func:`bn_backward` of a training forward, with what :func:`bn_train_forward_saved` kept."""
    return bn_backward(dy, x, weight, bias, *saved, act, True, needs)


def bn_eval_forward(x: Tensor, running_mean: Tensor, running_var: Tensor, weight: Tensor | None,
                    bias: Tensor | None, eps: float, act: str = "identity") -> Tensor:
    """Evaluation forward with the running statistics: 1 read, 1 write."""
    acc = acc_dtype(x.dtype)
    c = x.shape[1]
    invstd = torch.rsqrt(running_var.detach().to(acc) + eps)
    scale = invstd * _acc_vec(weight, c, acc, 1.0, x.device)
    return _normalize(x, _launch(x), running_mean.detach().to(acc).contiguous(), scale.contiguous(),
                      _acc_vec(bias, c, acc, 0.0, x.device), act)


def bn_backward(dy: Tensor, x: Tensor, weight: Tensor | None, bias: Tensor | None, mean: Tensor,
                invstd: Tensor, act: str, training: bool, needs=(True, True, True)):
    """Closed-form backward ``(dx, dweight, dbias)`` (as :func:`normlab.kernels.portable.bn_backward`): one pass
    for the per-channel sums of g and g * xhat, one for dx = w * invstd * (g - db / n - xhat * dw / n)."""
    code = _act_code(act)
    acc = acc_dtype(x.dtype)
    if dy.dtype != x.dtype or dy.stride() != x.stride():
        dy = torch.empty_like(x).copy_(dy)
    c = x.shape[1]
    g = _launch(x)
    x0 = _channel_firsts(x, acc)
    rel = (mean.detach().double() - x0.double()).to(acc)
    inv = invstd.detach().to(acc).contiguous()
    w = _acc_vec(weight, c, acc, 1.0, x.device)
    b = _acc_vec(bias, c, acc, 0.0, x.device)
    table = torch.stack([x0, rel, inv, w, b])  # per channel: x0, rel, invstd, w, b (rows 0-4)
    sg = torch.empty((g.grid[1], c), dtype=acc, device=x.device)
    sgx = torch.empty_like(sg)
    _grad_sums_kernel[g.grid](dy, x, table, sg, sgx, *g.args, ACT=code, **g.blocks)
    db = sg.double().sum(0)
    dw = sgx.double().sum(0)
    dx = None
    if needs[0]:
        kg = inv.double() * w.double()
        if training:
            kx = -kg * dw / g.count
            k0 = -kg * db / g.count
        else:
            kx = k0 = torch.zeros_like(kg)
        dx = torch.empty_like(x)
        table = torch.cat([table, torch.stack([kg, kx, k0]).to(acc)])  # rows 5-7: kg, kx, k0
        _dx_kernel[g.grid](dy, x, dx, table, *g.args, ACT=code, **g.blocks)
    return (dx, dw.to(acc) if needs[1] else None, db.to(acc) if needs[2] else None)


# not batch norm: the portable kernels
running_update = portable.running_update
gn_forward = portable.gn_forward
gn_backward = portable.gn_backward
