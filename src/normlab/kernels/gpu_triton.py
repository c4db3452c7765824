"""GPU backend: batch norm's kernel contract (:mod:`normlab.kernels.portable`) in Triton, for CUDA tensors.

Same signatures, same numerics as the portable contract: statistics of ``x - shift`` (shift = the channel's first
value) summed in ``acc_dtype`` per program and merged in float64; the forward subtracts the shift before scaling,
so a large mean costs no precision; the backward recomputes the pre-activation from ``x`` (activations fused both
ways). Group norm (layer and instance norm through it) has its kernels in :mod:`.gpu_triton_gn`.

Passes over the activation, as on CPU: training forward 2 reads + 1 write, backward 2 reads of (x, dy) + 1 write,
eval 1 read + 1 write. Launches: the training forward 3 (partial sums per channel block and run; a per-channel
kernel that merges them in float64 and derives the normalize terms and the running statistics' update; normalize),
the backward 3 (partial sums of g and g * xhat; dweight, dbias and dx's coefficients; dx), eval 1. No torch op runs
between them: on a GPU the host's time per launch (21-36 us through Triton's launch path on the H200 hosts measured,
22 through :func:`_run`'s direct call, against 7-11 us for a torch op) is what a small layer costs. Every layout the
contract takes with one stride per dimension group is a 3-D view ``(N, C, S)`` with strides ``(sN, sC, sS)``: NCHW
of any rank ``(C*S, S, 1)``, channels_last as ``(N*S, C, 1)`` rows, ``(M, C)`` as ``(M, C, 1)``. A program covers
``BLOCK_C`` channels by a run of the ``N * S`` values of each, loaded as ``BLOCK_C x BLOCK_K`` tiles: wide in K
where values of one channel are adjacent (NCHW), wide in C where channels are (channels_last, (M, C)), so that loads
coalesce.

Tested compiled on an H200 (Triton 3.6, torch 2.11) and in Triton's interpreter on CPU (``TRITON_INTERPRET=1``),
against the portable kernels and the float64 reference; launch geometry from sweeps there (BENCHMARKS.md, "GPU").
"""
from __future__ import annotations

import functools
import os
import struct
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
# launch geometry (see _geometry), module attributes so that a tuning sweep can set them (then clear _LAUNCHES);
# defaults from the H200 sweeps (BENCHMARKS.md, "GPU")
PROGRAMS = 1024  # programs per pass to aim for: channel blocks x runs along N * S (partial sums merged after)
MAX_RUNS = 1024  # runs per channel block at most (the partial sums take 2 x runs x C values)
NCHW_BLOCK_K = 1024  # values of one channel per tile where they are adjacent in memory
CL_BLOCKS = (16, 64)  # (channels, values) per tile where channels are adjacent (channels_last, (M, C))
NUM_WARPS = 4
INT32_OFFSETS_BELOW = 2**31 - 2**24  # elements: int32 offsets below (masked lanes a tile past the end included)
COEF_BLOCK = 16  # channels per program of the per-channel kernels
COEF_BLOCK_R = 128  # runs of partial sums they merge at a time


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
    if ACT == 1:  # as torch's threshold_backward: a NaN pre-activation passes the gradient
        g = tl.where(z <= 0, 0.0, g)
    elif ACT == 2:
        s = tl.sigmoid(z)
        g = g * s * (1.0 + z * (1.0 - s))
    elif ACT == 3:
        s = tl.sigmoid(z)
        g = g * s * (1.0 - s)
    return g


@triton.jit
def _f64(hi, lo):
    """A float64 scalar passed as two float32 arguments (Triton passes a Python float as float32)."""
    return tl.cast(hi, tl.float64) + tl.cast(lo, tl.float64)


@triton.jit
def _rsqrt(v):
    """1 / sqrt(v), each step correctly rounded (within one ulp of torch.rsqrt): float32's plain sqrt and division
    are approximate on a GPU, float64's are exact."""
    if v.dtype == tl.float64:
        r = 1.0 / tl.sqrt(v)
    else:
        r = tl.div_rn(tl.full(v.shape, 1.0, v.dtype), tl.sqrt_rn(v))
    return r


@triton.jit
def _narrow(v, DT: tl.constexpr):
    """float64 ``v`` in ``DT`` as torch converts it: through float32 unless ``DT`` is float64 (and no direct
    float64 -> 16-bit conversion is needed)."""
    if DT != tl.float64:
        v = v.to(tl.float32).to(DT)
    return v


@triton.jit
def _channel_block(C, BLOCK: tl.constexpr):
    """The channels of block ``program_id(0)`` and their mask."""
    cs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    return cs, cs < C


@triton.jit
def _program(C, K, k_per_program, BLOCK_C: tl.constexpr):
    """This program's channels (and their mask) and its run k_lo..k_hi of each channel's N * S values."""
    cs, cm = _channel_block(C, BLOCK_C)
    k_lo = tl.program_id(1) * k_per_program
    return cs, cm, k_lo, tl.minimum(k_lo + k_per_program, K)


@triton.jit
def _tile(cs, cm, k_start, k_end, S, sN, sC, sS, BLOCK_K: tl.constexpr, BIG: tl.constexpr):
    """Offsets and mask of the tile of values k_start.. of the channels ``cs``: in int64 where the tensor spans
    2**31 elements or more (BIG), else in int32 (half the arithmetic)."""
    ks = k_start + tl.arange(0, BLOCK_K)
    n = ks // S
    s = ks - n * S
    if BIG:
        offs = cs.to(tl.int64)[:, None] * sC + (n.to(tl.int64) * sN + s.to(tl.int64) * sS)[None, :]
    else:
        offs = cs[:, None] * sC + (n * sN + s * sS)[None, :]
    return offs, cm[:, None] & (ks < k_end)[None, :]


@triton.jit
def _firsts(x_ptr, cs, cm, sC, ACC: tl.constexpr):
    """Each channel's first value (sample 0, position 0): the shift of its sums, as in the portable kernels."""
    return tl.load(x_ptr + cs.to(tl.int64) * sC, mask=cm, other=0.0).to(ACC)


@triton.jit
def _vec(ptr, cs, cm, fill, HAS: tl.constexpr, DT: tl.constexpr):
    """A per-channel vector (weight, bias) in ``DT``, or ``fill`` where the layer has none."""
    if HAS:
        v = tl.load(ptr + cs, mask=cm, other=fill).to(DT)
    else:
        v = tl.full(cs.shape, fill, DT)
    return v


@triton.jit
def _store_partials(part_ptr, a1, a2, cs, cm, C):
    """Row ``program_id(1)`` of both halves of a (2, runs, C) buffer: the tile sums' totals over their values."""
    row = tl.program_id(1)
    tl.store(part_ptr + row * C + cs, tl.sum(a1, 1), mask=cm)
    tl.store(part_ptr + (tl.num_programs(1) + row) * C + cs, tl.sum(a2, 1), mask=cm)


@triton.jit
def _merge_partials(part_ptr, cs, cm, C, R, BLOCK_R: tl.constexpr):
    """Both halves of a (2, R, C) buffer of partial sums, summed over the R runs in float64, BLOCK_R runs at a
    time: a run at a time, one program waited on a thousand loads in a row where 64 channels channels_last took
    1024 runs (the training forward 2.4x torch's time)."""
    s1 = tl.zeros([BLOCK_R, cs.shape[0]], tl.float64)
    s2 = tl.zeros([BLOCK_R, cs.shape[0]], tl.float64)
    for r0 in range(0, R, BLOCK_R):
        rs = r0 + tl.arange(0, BLOCK_R)
        offs = rs[:, None] * C + cs[None, :]
        mask = (rs < R)[:, None] & cm[None, :]
        s1 += tl.load(part_ptr + offs, mask=mask, other=0.0).to(tl.float64)
        s2 += tl.load(part_ptr + R * C + offs, mask=mask, other=0.0).to(tl.float64)
    return tl.sum(s1, 0), tl.sum(s2, 0)


@triton.jit
def _normalize_run(x_ptr, y_ptr, shift, scale, offset, cs, cm, k_lo, k_hi, S, sN, sC, sS, k_per_program,
                   ACT: tl.constexpr, BLOCK_K: tl.constexpr, BIG: tl.constexpr):
    """y = act((x - shift) * scale + offset) over this program's run of values."""
    for i in range(0, k_per_program, BLOCK_K):
        offs, mask = _tile(cs, cm, k_lo + i, k_hi, S, sN, sC, sS, BLOCK_K, BIG)
        v = tl.load(x_ptr + offs, mask=mask, other=0.0).to(shift.dtype)
        z = _activate((v - shift[:, None]) * scale[:, None] + offset[:, None], ACT)
        tl.store(y_ptr + offs, z.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _stats_kernel(x_ptr, part_ptr, C, S, K, sN, sC, sS, k_per_program,
                  ACC: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr, BIG: tl.constexpr):
    """Partial sums of (x - shift) and (x - shift)**2 of BLOCK_C channels over one run of their N * S values."""
    cs, cm, k_lo, k_hi = _program(C, K, k_per_program, BLOCK_C)
    shift = _firsts(x_ptr, cs, cm, sC, ACC)
    a1 = tl.zeros([BLOCK_C, BLOCK_K], ACC)
    a2 = tl.zeros([BLOCK_C, BLOCK_K], ACC)
    for i in range(0, k_per_program, BLOCK_K):
        offs, mask = _tile(cs, cm, k_lo + i, k_hi, S, sN, sC, sS, BLOCK_K, BIG)
        v = tl.load(x_ptr + offs, mask=mask, other=0.0).to(ACC)
        d = tl.where(mask, v - shift[:, None], 0.0)
        a1 += d
        a2 += d * d
    _store_partials(part_ptr, a1, a2, cs, cm, C)


@triton.jit
def _train_coef_kernel(x_ptr, part_ptr, w_ptr, b_ptr, mean_ptr, coef_ptr, rm_ptr, rv_ptr, C, sC, R, K,
                       eps_hi, eps_lo, mom_hi, mom_lo, ACC: tl.constexpr, HAS_W: tl.constexpr,
                       HAS_B: tl.constexpr, UPDATE: tl.constexpr, BLOCK: tl.constexpr, BLOCK_R: tl.constexpr):
    """Per channel, from the partial sums: the mean (float64), and in the (5, C) table ``coef`` the shift, scale
    and offset of the normalize pass, invstd and the biased variance; with UPDATE, the running statistics too
    (unbiased variance; a channel whose mean or variance is not finite keeps its running values)."""
    cs, cm = _channel_block(C, BLOCK)
    shift = _firsts(x_ptr, cs, cm, sC, ACC)
    s1, s2 = _merge_partials(part_ptr, cs, cm, C, R, BLOCK_R)
    n = tl.cast(K, tl.float64)
    mean_s = s1 / n
    var = tl.maximum(s2 / n - mean_s * mean_s, 0.0)
    eps = _f64(eps_hi, eps_lo)
    invstd = _rsqrt(var.to(ACC) + eps.to(ACC))
    scale = invstd.to(tl.float64) * _vec(w_ptr, cs, cm, 1.0, HAS_W, tl.float64)
    offset = _vec(b_ptr, cs, cm, 0.0, HAS_B, tl.float64) - mean_s * scale
    mean = shift.to(tl.float64) + mean_s
    tl.store(mean_ptr + cs, mean, mask=cm)
    tl.store(coef_ptr + cs, shift, mask=cm)
    tl.store(coef_ptr + C + cs, scale.to(ACC), mask=cm)
    tl.store(coef_ptr + 2 * C + cs, offset.to(ACC), mask=cm)
    tl.store(coef_ptr + 3 * C + cs, invstd, mask=cm)
    tl.store(coef_ptr + 4 * C + cs, var.to(ACC), mask=cm)
    if UPDATE:
        momentum = _f64(mom_hi, mom_lo)
        unbiased = var * (n / tl.maximum(n - 1.0, 1.0))
        finite = (tl.abs(mean) < float("inf")) & (unbiased < float("inf"))  # NaN compares False
        old_m = tl.load(rm_ptr + cs, mask=cm, other=0.0).to(tl.float64)
        old_v = tl.load(rv_ptr + cs, mask=cm, other=0.0).to(tl.float64)
        new_m = tl.where(finite, old_m * (1.0 - momentum) + mean * momentum, old_m)
        new_v = tl.where(finite, old_v * (1.0 - momentum) + unbiased * momentum, old_v)
        tl.store(rm_ptr + cs, _narrow(new_m, rm_ptr.dtype.element_ty), mask=cm)
        tl.store(rv_ptr + cs, _narrow(new_v, rv_ptr.dtype.element_ty), mask=cm)


@triton.jit
def _normalize_kernel(x_ptr, y_ptr, coef_ptr, C, S, K, sN, sC, sS, k_per_program,
                      ACT: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr, BIG: tl.constexpr):
    """y = act((x - shift) * scale + offset), the per-channel terms in rows 0-2 of ``coef``."""
    cs, cm, k_lo, k_hi = _program(C, K, k_per_program, BLOCK_C)
    shift = tl.load(coef_ptr + cs, mask=cm, other=0.0)
    scale = tl.load(coef_ptr + C + cs, mask=cm, other=0.0)
    offset = tl.load(coef_ptr + 2 * C + cs, mask=cm, other=0.0)
    _normalize_run(x_ptr, y_ptr, shift, scale, offset, cs, cm, k_lo, k_hi, S, sN, sC, sS, k_per_program, ACT,
                   BLOCK_K, BIG)


@triton.jit
def _eval_kernel(x_ptr, y_ptr, rm_ptr, rv_ptr, w_ptr, b_ptr, C, S, K, sN, sC, sS, k_per_program, eps_hi, eps_lo,
                 ACT: tl.constexpr, ACC: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
                 BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr, BIG: tl.constexpr):
    """y = act((x - running_mean) * rsqrt(running_var + eps) * weight + bias), all in one launch."""
    cs, cm, k_lo, k_hi = _program(C, K, k_per_program, BLOCK_C)
    shift = tl.load(rm_ptr + cs, mask=cm, other=0.0).to(ACC)
    var = tl.load(rv_ptr + cs, mask=cm, other=1.0).to(ACC)
    scale = _rsqrt(var + _f64(eps_hi, eps_lo).to(ACC)) * _vec(w_ptr, cs, cm, 1.0, HAS_W, ACC)
    offset = _vec(b_ptr, cs, cm, 0.0, HAS_B, ACC)
    _normalize_run(x_ptr, y_ptr, shift, scale, offset, cs, cm, k_lo, k_hi, S, sN, sC, sS, k_per_program, ACT,
                   BLOCK_K, BIG)


@triton.jit
def _grad_terms(x_ptr, mean_ptr, invstd_ptr, w_ptr, b_ptr, cs, cm, sC, ACC: tl.constexpr, HAS_W: tl.constexpr,
                HAS_B: tl.constexpr):
    """x0 (each channel's first value), rel = mean - x0, invstd, w and b of the channels ``cs``, in ``ACC``."""
    x0 = _firsts(x_ptr, cs, cm, sC, ACC)
    rel = (tl.load(mean_ptr + cs, mask=cm, other=0.0).to(tl.float64) - x0.to(tl.float64)).to(ACC)
    inv = tl.load(invstd_ptr + cs, mask=cm, other=0.0).to(ACC)
    return x0, rel, inv, _vec(w_ptr, cs, cm, 1.0, HAS_W, ACC), _vec(b_ptr, cs, cm, 0.0, HAS_B, ACC)


@triton.jit
def _xhat_and_grad(dy_ptr, x_ptr, offs, mask, x0, rel, inv, w, b, ACT: tl.constexpr):
    """xhat = ((x - x0) - rel) * invstd and g = dL/dz of one tile, z = xhat * w + b recomputed from x."""
    acc = x0.dtype
    xhat = ((tl.load(x_ptr + offs, mask=mask, other=0.0).to(acc) - x0[:, None]) - rel[:, None]) * inv[:, None]
    g = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(acc)
    return xhat, _activate_grad(g, xhat * w[:, None] + b[:, None], ACT)


@triton.jit
def _grad_sums_kernel(dy_ptr, x_ptr, mean_ptr, invstd_ptr, w_ptr, b_ptr, part_ptr, C, S, K, sN, sC, sS,
                      k_per_program, ACT: tl.constexpr, ACC: tl.constexpr, HAS_W: tl.constexpr,
                      HAS_B: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr, BIG: tl.constexpr):
    """Partial sums of g and g * xhat, g = dL/dz, xhat = ((x - x0) - rel) * invstd."""
    cs, cm, k_lo, k_hi = _program(C, K, k_per_program, BLOCK_C)
    x0, rel, inv, w, b = _grad_terms(x_ptr, mean_ptr, invstd_ptr, w_ptr, b_ptr, cs, cm, sC, ACC, HAS_W, HAS_B)
    a1 = tl.zeros([BLOCK_C, BLOCK_K], ACC)
    a2 = tl.zeros([BLOCK_C, BLOCK_K], ACC)
    for i in range(0, k_per_program, BLOCK_K):
        offs, mask = _tile(cs, cm, k_lo + i, k_hi, S, sN, sC, sS, BLOCK_K, BIG)
        xhat, g = _xhat_and_grad(dy_ptr, x_ptr, offs, mask, x0, rel, inv, w, b, ACT)
        g = tl.where(mask, g, 0.0)
        a1 += g
        a2 += g * xhat
    _store_partials(part_ptr, a1, a2, cs, cm, C)


@triton.jit
def _grad_coef_kernel(part_ptr, invstd_ptr, w_ptr, dw_ptr, db_ptr, coef_ptr, C, R, K, ACC: tl.constexpr,
                      HAS_W: tl.constexpr, TRAINING: tl.constexpr, BLOCK: tl.constexpr, BLOCK_R: tl.constexpr):
    """Per channel, from the partial sums: dweight and dbias and the coefficients of
    dx = kg * g + kx * xhat + k0 (rows 0-2 of ``coef``): kg = w * invstd; in training kx = -kg * dw / n and
    k0 = -kg * db / n, else 0 (the statistics are constants)."""
    cs, cm = _channel_block(C, BLOCK)
    db, dw = _merge_partials(part_ptr, cs, cm, C, R, BLOCK_R)
    tl.store(dw_ptr + cs, dw.to(ACC), mask=cm)
    tl.store(db_ptr + cs, db.to(ACC), mask=cm)
    # invstd and w in ACC (as the portable kernels take them), their product in float64
    inv = tl.load(invstd_ptr + cs, mask=cm, other=0.0).to(ACC)
    kg = inv.to(tl.float64) * _vec(w_ptr, cs, cm, 1.0, HAS_W, ACC).to(tl.float64)
    if TRAINING:
        n = tl.cast(K, tl.float64)
        kx = -kg * dw / n
        k0 = -kg * db / n
    else:
        kx = tl.zeros(cs.shape, tl.float64)
        k0 = tl.zeros(cs.shape, tl.float64)
    tl.store(coef_ptr + cs, kg.to(ACC), mask=cm)
    tl.store(coef_ptr + C + cs, kx.to(ACC), mask=cm)
    tl.store(coef_ptr + 2 * C + cs, k0.to(ACC), mask=cm)


@triton.jit
def _dx_kernel(dy_ptr, x_ptr, dx_ptr, mean_ptr, invstd_ptr, w_ptr, b_ptr, coef_ptr, C, S, K, sN, sC, sS,
               k_per_program, ACT: tl.constexpr, ACC: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
               BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr, BIG: tl.constexpr):
    """dx = kg * g + kx * xhat + k0, the per-channel coefficients in rows 0-2 of ``coef``."""
    cs, cm, k_lo, k_hi = _program(C, K, k_per_program, BLOCK_C)
    x0, rel, inv, w, b = _grad_terms(x_ptr, mean_ptr, invstd_ptr, w_ptr, b_ptr, cs, cm, sC, ACC, HAS_W, HAS_B)
    kg = tl.load(coef_ptr + cs, mask=cm, other=0.0)
    kx = tl.load(coef_ptr + C + cs, mask=cm, other=0.0)
    k0 = tl.load(coef_ptr + 2 * C + cs, mask=cm, other=0.0)
    for i in range(0, k_per_program, BLOCK_K):
        offs, mask = _tile(cs, cm, k_lo + i, k_hi, S, sN, sC, sS, BLOCK_K, BIG)
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


_LAYOUTS: dict = {}  # (shape, strides) -> whether the kernels take that layout (supports' answers)


def _remember(cache: dict, key, value):
    """``cache[key] = value``, returned; a cache of the host's per-call answers starts over past 4096 entries."""
    if len(cache) >= 4096:
        cache.clear()
    cache[key] = value
    return value


def supports(x: Tensor) -> bool:
    """CUDA (or, in Triton's interpreter, CPU) tensors of a supported dtype, non-empty, contiguous or
    channels_last; the layout's answer cached (asked before each kernel call: 5 us a time uncached)."""
    if not ((x.is_cuda or (INTERPRETED and x.device.type == "cpu")) and x.dtype in SUPPORTED_DTYPES):
        return False
    key = (x.shape, x.stride())
    ok = _LAYOUTS.get(key)
    if ok is None:
        ok = _remember(_LAYOUTS, key,
                       x.dim() >= 2 and x.numel() > 0 and _dense_layout(x) and _strides3(x) is not None)
    return ok


class _Launch(NamedTuple):
    """One launch geometry for the kernels over ``x``: the grid, the kernels' size arguments (C, S, K = N * S,
    the three strides, values per program), their tile sizes and warps; the runs R per channel block (grid[1])
    and, for the per-channel kernels, their grid."""
    grid: tuple[int, int]
    args: tuple[int, ...]
    blocks: dict
    runs: int
    coef_grid: tuple[int]
    coef_blocks: dict


_LAUNCHES: dict = {}  # (shape, strides) -> _Launch; cleared by whoever changes the geometry above


def _launch(x: Tensor) -> _Launch:
    """:func:`_geometry` of ``x``, cached by shape and strides (the host's time per call counts on a GPU: a
    small layer's kernels take microseconds); the cache starts over past 4096 layouts."""
    key = (x.shape, x.stride())
    g = _LAUNCHES.get(key)
    return _remember(_LAUNCHES, key, _geometry(x)) if g is None else g


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _pow2(n: int) -> int:
    """The least power of 2 >= n (n >= 1)."""
    return 1 << (n - 1).bit_length()


def _geometry(x: Tensor) -> _Launch:
    """Channels adjacent in memory (sC == 1) take wide channel blocks, else one channel per block and wide value
    runs; each channel block split into enough runs for about PROGRAMS programs in all (a few per multiprocessor:
    64 channels channels_last are one block)."""
    n, c, s, s_n, s_c, s_s = _strides3(x)
    k = n * s
    if s > 1 and s_n == s * s_s:  # channels_last: the (n, s) pairs are one run of rows (no division by S)
        n, s, s_n, s_s = k, 1, s_s, 1
    big = x.numel() >= INT32_OFFSETS_BELOW
    if s_c == 1 and c > 1:
        block_c = min(CL_BLOCKS[0], _pow2(c))
        block_k = CL_BLOCKS[1]
    else:
        block_c = 1
        block_k = min(NCHW_BLOCK_K, _pow2(max(k, 16)))
    runs = max(1, min(MAX_RUNS, _cdiv(PROGRAMS, _cdiv(c, block_c)), _cdiv(k, block_k)))
    per = _cdiv(_cdiv(k, runs), block_k) * block_k
    runs = _cdiv(k, per)
    return _Launch((_cdiv(c, block_c), runs), (c, s, k, s_n, s_c, s_s, per),
                   {"BLOCK_C": block_c, "BLOCK_K": block_k, "BIG": big, "num_warps": NUM_WARPS}, runs,
                   (_cdiv(c, COEF_BLOCK),), {"BLOCK": COEF_BLOCK, "BLOCK_R": COEF_BLOCK_R})


# A Triton launch, ``kernel[grid](...)``, spends 31-36 us of host time on the H200 host measured (10 us of it the
# compiled kernel's launcher) binding and specializing its arguments and looking the compiled kernel up, for
# kernels that run in microseconds on a small layer. _run calls the compiled kernel's own launcher directly once
# Triton has chosen it (22 us a launch there, its key included), in Triton versions whose launch it repeats
# exactly; FAST_LAUNCH = False (a module attribute) turns it off.
FAST_LAUNCH = True
_BINARIES: dict = {}  # specialization key (see _run) -> (compiled kernel, names of the constexpr arguments)


@functools.lru_cache(maxsize=1)
def _launcher():
    """``(current_device, current_stream, knobs)`` where the direct launch applies, else None: compiled kernels
    (not the interpreter) of a Triton from 3.3 to 3.x, whose launch passes every argument, constexprs too, to the
    compiled kernel's ``run`` with the knobs' hooks (the call :func:`_run` repeats)."""
    try:
        from triton import knobs
        from triton.runtime.driver import driver
        version = tuple(int(v) for v in triton.__version__.split(".")[:2])
    except (ImportError, ValueError):
        return None
    if INTERPRETED or not (3, 3) <= version < (4, 0):
        return None
    return driver.active.get_current_device, driver.active.get_current_stream, knobs.runtime


def _hooked(hook) -> bool:
    """Whether a launch hook is set: None, or (Triton 3.5 on) an empty chain of hooks, is none."""
    return hook is not None and bool(getattr(hook, "calls", True))


def _run(kernel, grid: tuple, *args, **consts) -> None:
    """``kernel[grid](*args, **consts)``; from the second launch of a specialization on, through the compiled
    kernel's launcher. The key holds what Triton specializes on (each tensor's dtype and 16-byte alignment, each
    int's value, the constexprs and launch options), the kernel (the module's, never freed) and the device; floats
    are not specialized."""
    fast = _launcher() if FAST_LAUNCH else None
    if fast is None or _hooked(fast[2].launch_enter_hook):  # a profiler's hooks: Triton's own launch
        kernel[grid](*args, **consts)
        return
    device = fast[0]()
    key = (id(kernel), device, tuple(consts.items()),  # id: a JITFunction's own hash costs 0.4-2 us
           *[(a.dtype, a.data_ptr() & 15) if isinstance(a, Tensor) else a if isinstance(a, int) else float
             for a in args])
    hit = _BINARIES.get(key)
    if hit is None:
        binary = kernel[grid](*args, **consts)
        binary = binary.result() if hasattr(binary, "result") else binary  # an asynchronous compile's future
        names = kernel.arg_names[len(args):]
        if binary is not None and all(n in consts for n in names):
            _remember(_BINARIES, key, (binary, names))
        return
    binary, names = hit
    g = tuple(grid) + (1, 1)
    binary.run(g[0], g[1], g[2], fast[1](device), binary.function, binary.packed_metadata, None, None, None,
               *args, *[consts[n] for n in names])


@functools.lru_cache(maxsize=64)
def _split(v: float) -> tuple[float, float]:
    """``v`` as float32 ``(hi, lo)`` with hi + lo == v to about 48 bits (the kernels add them in float64)."""
    try:
        hi = struct.unpack("f", struct.pack("f", v))[0]
    except OverflowError:  # beyond float32's range: the kernels see inf, as a float32 layer would
        return v, 0.0
    return hi, float(v - hi)


def _tl_acc(x: Tensor):
    return tl.float64 if x.dtype == torch.float64 else tl.float32


def _opt(t: Tensor | None, x: Tensor) -> tuple[Tensor, bool]:
    """A per-channel tensor argument and whether it is there (a kernel never reads the stand-in ``x``)."""
    return (x, False) if t is None else (_vector(t, x), True)


def _vector(t: Tensor, x: Tensor) -> Tensor:
    """A per-channel tensor as the kernels read it: on x's device (else the error torch would raise), its C
    values adjacent."""
    if t.device != x.device:
        raise RuntimeError(f"Expected all tensors to be on the same device: the input is on {x.device}, a "
                           f"per-channel tensor (weight, bias or running statistics) on {t.device}; move the "
                           f"module with .to({str(x.device)!r})")
    # a kernel takes the storage as it is (no detach needed); only a strided one is copied, outside autograd
    return t if t.is_contiguous() else t.detach().contiguous()


def _act_code(act: str) -> int:
    try:
        return ACT_CODES[act]
    except KeyError:
        raise ValueError(f"unknown activation {act!r}; expected one of {tuple(ACT_CODES)}") from None


def _on_device_of(index: int):
    """Run the decorated function on the CUDA device of its argument ``index`` (Triton launches on the current
    device: a tensor on another GPU would be handed to kernels running on the wrong one)."""
    def wrap(fn):
        @functools.wraps(fn)
        def run(*args, **kwargs):
            x = args[index]
            if x.is_cuda and x.device.index != torch.cuda.current_device():
                with torch.cuda.device(x.device):
                    return fn(*args, **kwargs)
            return fn(*args, **kwargs)
        return run
    return wrap


def _train_stats(x: Tensor, g: _Launch, weight, bias, eps, running_mean=None, running_var=None,
                 momentum=0.0) -> tuple[Tensor, Tensor]:
    """The statistics pass and the per-channel kernel: ``(mean, coef)``, mean in float64 and coef the (5, C)
    table of shift, scale, offset, invstd and biased variance in ``acc_dtype``; the running statistics
    updated in place when given."""
    c = x.shape[1]
    acc = acc_dtype(x.dtype)
    part = torch.empty((2, g.runs, c), dtype=acc, device=x.device)
    _run(_stats_kernel, g.grid, x, part, *g.args, ACC=_tl_acc(x), **g.blocks)
    mean = torch.empty(c, dtype=torch.float64, device=x.device)
    coef = torch.empty((5, c), dtype=acc, device=x.device)
    w, has_w = _opt(weight, x)
    b, has_b = _opt(bias, x)
    update = running_mean is not None and running_var is not None
    # the kernel writes the running statistics in place: strided ones through adjacent copies, copied back
    rm, rv = (_vector(running_mean, x), _vector(running_var, x)) if update else (x, x)
    _run(_train_coef_kernel, g.coef_grid, x, part, w, b, mean, coef, rm, rv, c, g.args[4], g.runs, g.args[2],
         *_split(eps), *_split(momentum), ACC=_tl_acc(x), HAS_W=has_w, HAS_B=has_b, UPDATE=update, **g.coef_blocks)
    if update:
        for dst, src in ((running_mean, rm), (running_var, rv)):
            if src.data_ptr() != dst.data_ptr():
                with torch.no_grad():
                    dst.copy_(src)
    return mean, coef


@_on_device_of(0)
def bn_stats(x: Tensor) -> tuple[Tensor, Tensor]:
    """Per-channel (mean, biased var) of ``x`` (N, C, *), in ``acc_dtype``."""
    mean, coef = _train_stats(x, _launch(x), None, None, 1.0)
    return mean.to(acc_dtype(x.dtype)), coef[4]


def bn_train_forward(x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float,
                     act: str = "identity") -> tuple[Tensor, Tensor, Tensor]:
    """Training forward ``(y, mean, invstd)``: mean in float64, invstd in ``acc_dtype``; 2 reads, 1 write, in 3
    launches (partial sums, per-channel terms, normalize)."""
    y, (mean, invstd), _ = bn_train_forward_saved(x, weight, bias, eps, act, None, None, 0.0)
    return y, mean, invstd


def bn_train_forward_update(x, weight, bias, eps, act, running_mean, running_var, momentum):
    """:func:`bn_train_forward` that also updates the running statistics: ``(y, mean, invstd, None)`` (a channel
    whose statistics are not finite keeps its running values; no warning, which would wait for the device)."""
    y, (mean, invstd), nonfinite = bn_train_forward_saved(x, weight, bias, eps, act, running_mean, running_var,
                                                          momentum)
    return y, mean, invstd, nonfinite


@_on_device_of(0)
def bn_train_forward_saved(x, weight, bias, eps, act, running_mean, running_var, momentum):
    """The training forward as an autograd node calls it: ``(y, (mean, invstd), None)``; the running statistics
    (unless None) updated in the per-channel kernel."""
    code = _act_code(act)
    g = _launch(x)
    mean, coef = _train_stats(x, g, weight, bias, eps, running_mean, running_var, momentum)
    y = torch.empty_like(x)
    _run(_normalize_kernel, g.grid, x, y, coef, *g.args, ACT=code, **g.blocks)
    return y, (mean, coef[3]), None


def bn_backward_saved(dy, x, weight, bias, saved, act, needs=(True, True, True)):
    """:func:`bn_backward` of a training forward, with what :func:`bn_train_forward_saved` kept."""
    return bn_backward(dy, x, weight, bias, *saved, act, True, needs)


@_on_device_of(0)
def bn_eval_forward(x: Tensor, running_mean: Tensor, running_var: Tensor, weight: Tensor | None,
                    bias: Tensor | None, eps: float, act: str = "identity") -> Tensor:
    """Evaluation forward with the running statistics: 1 read, 1 write, one launch."""
    code = _act_code(act)
    g = _launch(x)
    w, has_w = _opt(weight, x)
    b, has_b = _opt(bias, x)
    y = torch.empty_like(x)
    rm, rv = _vector(running_mean, x), _vector(running_var, x)
    _run(_eval_kernel, g.grid, x, y, rm, rv, w, b, *g.args, *_split(eps), ACT=code, ACC=_tl_acc(x), HAS_W=has_w,
         HAS_B=has_b, **g.blocks)
    return y


@_on_device_of(1)
def bn_backward(dy: Tensor, x: Tensor, weight: Tensor | None, bias: Tensor | None, mean: Tensor,
                invstd: Tensor, act: str, training: bool, needs=(True, True, True)):
    """Closed-form backward ``(dx, dweight, dbias)`` (as :func:`normlab.kernels.portable.bn_backward`): one pass
    for the per-channel sums of g and g * xhat, a per-channel kernel for dweight, dbias and dx's coefficients,
    one pass for dx = w * invstd * (g - db / n - xhat * dw / n)."""
    code = _act_code(act)
    if dy.dtype != x.dtype or dy.stride() != x.stride():
        dy = torch.empty_like(x).copy_(dy)
    c = x.shape[1]
    acc = acc_dtype(x.dtype)
    g = _launch(x)
    w, has_w = _opt(weight, x)
    b, has_b = _opt(bias, x)
    mean, invstd = _vector(mean, x), _vector(invstd, x)
    terms = dict(ACT=code, ACC=_tl_acc(x), HAS_W=has_w, HAS_B=has_b, **g.blocks)
    part = torch.empty((2, g.runs, c), dtype=acc, device=x.device)
    _run(_grad_sums_kernel, g.grid, dy, x, mean, invstd, w, b, part, *g.args, **terms)
    # two tensors, not views of one: a custom operator's outputs may not alias each other (torch.compile)
    dw, db = torch.empty(c, dtype=acc, device=x.device), torch.empty(c, dtype=acc, device=x.device)
    coef = torch.empty((3, c), dtype=acc, device=x.device)
    _run(_grad_coef_kernel, g.coef_grid, part, invstd, w, dw, db, coef, c, g.runs, g.args[2], ACC=_tl_acc(x),
         HAS_W=has_w, TRAINING=bool(training), **g.coef_blocks)
    dx = None
    if needs[0]:
        dx = torch.empty_like(x)
        _run(_dx_kernel, g.grid, dy, x, dx, mean, invstd, w, b, coef, *g.args, **terms)
    return (dx, dw if needs[1] else None, db if needs[2] else None)


# the running statistics' update on its own (outside the training forward): the portable one
running_update = portable.running_update


def __getattr__(name: str):
    """``gn_forward`` and ``gn_backward``: group norm's kernels (layer and instance norm through it), in
    :mod:`.gpu_triton_gn`, which imports the helpers above; looked up on first use (and kept) so that either
    module can be imported first."""
    if name in ("gn_forward", "gn_backward"):
        from . import gpu_triton_gn
        value = globals()[name] = getattr(gpu_triton_gn, name)
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
