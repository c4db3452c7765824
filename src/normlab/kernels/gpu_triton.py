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
def _tile(c_block, k_start, k_end, C, S, sN, sC, sS, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr):
    """Channels of this program, offsets and mask of the tile of values k_start.. of each channel."""
    cs = c_block * BLOCK_C + tl.arange(0, BLOCK_C)
    ks = k_start + tl.arange(0, BLOCK_K)
    n = ks // S
    s = ks - n * S
    offs = cs.to(tl.int64)[:, None] * sC + (n.to(tl.int64) * sN + s.to(tl.int64) * sS)[None, :]
    mask = (cs < C)[:, None] & (ks < k_end)[None, :]
    return cs, offs, mask


@triton.jit
def _stats_kernel(x_ptr, shift_ptr, s1_ptr, s2_ptr, C, S, K, sN, sC, sS, k_per_program,
                  BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr):
    """Partial sums of (x - shift) and (x - shift)**2 of BLOCK_C channels over one run of their N * S values."""
    c_block = tl.program_id(0)
    run = tl.program_id(1)
    cs0 = c_block * BLOCK_C + tl.arange(0, BLOCK_C)
    shift = tl.load(shift_ptr + cs0, mask=cs0 < C, other=0.0)
    acc = shift.dtype
    a1 = tl.zeros([BLOCK_C, BLOCK_K], acc)
    a2 = tl.zeros([BLOCK_C, BLOCK_K], acc)
    k_lo = run * k_per_program
    k_hi = tl.minimum(k_lo + k_per_program, K)
    for i in range(0, k_per_program, BLOCK_K):
        cs, offs, mask = _tile(c_block, k_lo + i, k_hi, C, S, sN, sC, sS, BLOCK_C, BLOCK_K)
        v = tl.load(x_ptr + offs, mask=mask, other=0.0).to(acc)
        d = tl.where(mask, v - shift[:, None], 0.0)
        a1 += d
        a2 += d * d
    out = run * C + cs0
    tl.store(s1_ptr + out, tl.sum(a1, 1), mask=cs0 < C)
    tl.store(s2_ptr + out, tl.sum(a2, 1), mask=cs0 < C)


@triton.jit
def _normalize_kernel(x_ptr, y_ptr, shift_ptr, scale_ptr, offset_ptr, C, S, K, sN, sC, sS, k_per_program,
                      ACT: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr):
    """y = act((x - shift) * scale + offset), per-channel shift, scale and offset (in the accumulation dtype)."""
    c_block = tl.program_id(0)
    run = tl.program_id(1)
    cs0 = c_block * BLOCK_C + tl.arange(0, BLOCK_C)
    shift = tl.load(shift_ptr + cs0, mask=cs0 < C, other=0.0)
    scale = tl.load(scale_ptr + cs0, mask=cs0 < C, other=0.0)
    offset = tl.load(offset_ptr + cs0, mask=cs0 < C, other=0.0)
    k_lo = run * k_per_program
    k_hi = tl.minimum(k_lo + k_per_program, K)
    for i in range(0, k_per_program, BLOCK_K):
        cs, offs, mask = _tile(c_block, k_lo + i, k_hi, C, S, sN, sC, sS, BLOCK_C, BLOCK_K)
        v = tl.load(x_ptr + offs, mask=mask, other=0.0).to(shift.dtype)
        z = _activate((v - shift[:, None]) * scale[:, None] + offset[:, None], ACT)
        tl.store(y_ptr + offs, z.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _grad_sums_kernel(dy_ptr, x_ptr, x0_ptr, rel_ptr, invstd_ptr, w_ptr, b_ptr, sg_ptr, sgx_ptr,
                      C, S, K, sN, sC, sS, k_per_program,
                      ACT: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr):
    """Partial sums of g and g * xhat, g = dL/dz, xhat = ((x - x0) - rel) * invstd."""
    c_block = tl.program_id(0)
    run = tl.program_id(1)
    cs0 = c_block * BLOCK_C + tl.arange(0, BLOCK_C)
    cm = cs0 < C
    x0 = tl.load(x0_ptr + cs0, mask=cm, other=0.0)
    rel = tl.load(rel_ptr + cs0, mask=cm, other=0.0)
    inv = tl.load(invstd_ptr + cs0, mask=cm, other=0.0)
    w = tl.load(w_ptr + cs0, mask=cm, other=0.0)
    b = tl.load(b_ptr + cs0, mask=cm, other=0.0)
    acc = x0.dtype
    a1 = tl.zeros([BLOCK_C, BLOCK_K], acc)
    a2 = tl.zeros([BLOCK_C, BLOCK_K], acc)
    k_lo = run * k_per_program
    k_hi = tl.minimum(k_lo + k_per_program, K)
    for i in range(0, k_per_program, BLOCK_K):
        cs, offs, mask = _tile(c_block, k_lo + i, k_hi, C, S, sN, sC, sS, BLOCK_C, BLOCK_K)
        xhat = ((tl.load(x_ptr + offs, mask=mask, other=0.0).to(acc) - x0[:, None]) - rel[:, None]) * inv[:, None]
        g = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(acc)
        g = tl.where(mask, _activate_grad(g, xhat * w[:, None] + b[:, None], ACT), 0.0)
        a1 += g
        a2 += g * xhat
    out = run * C + cs0
    tl.store(sg_ptr + out, tl.sum(a1, 1), mask=cm)
    tl.store(sgx_ptr + out, tl.sum(a2, 1), mask=cm)


@triton.jit
def _dx_kernel(dy_ptr, x_ptr, dx_ptr, x0_ptr, rel_ptr, invstd_ptr, w_ptr, b_ptr, kg_ptr, kx_ptr, k0_ptr,
               C, S, K, sN, sC, sS, k_per_program,
               ACT: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr):
    """dx = kg * g + kx * xhat + k0, per-channel coefficients (see ``bn_backward``)."""
    c_block = tl.program_id(0)
    run = tl.program_id(1)
    cs0 = c_block * BLOCK_C + tl.arange(0, BLOCK_C)
    cm = cs0 < C
    x0 = tl.load(x0_ptr + cs0, mask=cm, other=0.0)
    rel = tl.load(rel_ptr + cs0, mask=cm, other=0.0)
    inv = tl.load(invstd_ptr + cs0, mask=cm, other=0.0)
    w = tl.load(w_ptr + cs0, mask=cm, other=0.0)
    b = tl.load(b_ptr + cs0, mask=cm, other=0.0)
    kg = tl.load(kg_ptr + cs0, mask=cm, other=0.0)
    kx = tl.load(kx_ptr + cs0, mask=cm, other=0.0)
    k0 = tl.load(k0_ptr + cs0, mask=cm, other=0.0)
    acc = x0.dtype
    k_lo = run * k_per_program
    k_hi = tl.minimum(k_lo + k_per_program, K)
    for i in range(0, k_per_program, BLOCK_K):
        cs, offs, mask = _tile(c_block, k_lo + i, k_hi, C, S, sN, sC, sS, BLOCK_C, BLOCK_K)
        xhat = ((tl.load(x_ptr + offs, mask=mask, other=0.0).to(acc) - x0[:, None]) - rel[:, None]) * inv[:, None]
        g = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(acc)
        g = _activate_grad(g, xhat * w[:, None] + b[:, None], ACT)
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


def _launch_shape(n: int, c: int, s: int, s_c: int) -> tuple[int, int, tuple[int, int], int]:
    """(BLOCK_C, BLOCK_K, grid, values per program): channels adjacent in memory (s_c == 1) take wide channel
    blocks, else one channel per block and wide value runs."""
    k = n * s
    if s_c == 1 and c > 1:
        block_c = min(64, triton.next_power_of_2(c))
        block_k = 16
    else:
        block_c = 1
        block_k = min(1024, triton.next_power_of_2(max(k, 16)))
    c_blocks = triton.cdiv(c, block_c)
    runs = max(1, min(_PROGRAMS_PER_CHANNEL_BLOCK, triton.cdiv(k, block_k)))
    per = triton.cdiv(triton.cdiv(k, runs), block_k) * block_k
    runs = triton.cdiv(k, per)
    return block_c, block_k, (c_blocks, runs), per


def _acc_vec(t: Tensor | None, c: int, acc: torch.dtype, fill: float, device) -> Tensor:
    if t is None:
        return torch.full((c,), fill, dtype=acc, device=device)
    return t.detach().to(acc).contiguous()


def _channel_firsts(x: Tensor, acc: torch.dtype) -> Tensor:
    """Each channel's first value (sample 0, position 0), as the portable kernels shift by."""
    return x.detach().select(0, 0).reshape(x.shape[1], -1)[:, 0].to(acc).contiguous()


def _shifted_stats(x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Per-channel ``(shift, mean - shift, biased var)``: shift in ``acc_dtype``, the others in float64."""
    acc = acc_dtype(x.dtype)
    n, c, s, s_n, s_c, s_s = _strides3(x)
    shift = _channel_firsts(x, acc)
    block_c, block_k, grid, per = _launch_shape(n, c, s, s_c)
    s1 = torch.empty((grid[1], c), dtype=acc, device=x.device)
    s2 = torch.empty_like(s1)
    _stats_kernel[grid](x, shift, s1, s2, c, s, n * s, s_n, s_c, s_s, per, BLOCK_C=block_c, BLOCK_K=block_k)
    cnt = n * s
    mean_s = s1.double().sum(0) / cnt
    var = (s2.double().sum(0) / cnt - mean_s * mean_s).clamp_min(0)
    return shift, mean_s, var


def _normalize(x: Tensor, shift: Tensor, scale: Tensor, offset: Tensor, act: str) -> Tensor:
    n, c, s, s_n, s_c, s_s = _strides3(x)
    y = torch.empty_like(x)
    block_c, block_k, grid, per = _launch_shape(n, c, s, s_c)
    _normalize_kernel[grid](x, y, shift, scale, offset, c, s, n * s, s_n, s_c, s_s, per, ACT=ACT_CODES[act],
                            BLOCK_C=block_c, BLOCK_K=block_k)
    return y


def _check_act(act: str) -> None:
    if act not in ACT_CODES:
        raise ValueError(f"unknown activation {act!r}; expected one of {tuple(ACT_CODES)}")


def bn_stats(x: Tensor) -> tuple[Tensor, Tensor]:
    """Per-channel (mean, biased var) of ``x`` (N, C, *), in ``acc_dtype``."""
    shift, mean_s, var = _shifted_stats(x)
    acc = acc_dtype(x.dtype)
    return (shift.double() + mean_s).to(acc), var.to(acc)


def bn_train_forward(x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float,
                     act: str = "identity") -> tuple[Tensor, Tensor, Tensor]:
    """Training forward ``(y, mean, invstd)``: mean in float64, invstd in ``acc_dtype``; 2 reads, 1 write."""
    _check_act(act)
    acc = acc_dtype(x.dtype)
    c = x.shape[1]
    shift, mean_s, var = _shifted_stats(x)
    invstd = torch.rsqrt(var.to(acc) + eps)
    w = _acc_vec(weight, c, torch.float64, 1.0, x.device)
    b = _acc_vec(bias, c, torch.float64, 0.0, x.device)
    scale = invstd.double() * w
    # z = ((x - shift) - mean_s) * scale + b, with the per-channel part folded into one offset
    offset = (b - mean_s * scale).to(acc)
    y = _normalize(x, shift, scale.to(acc), offset, act)
    return y, shift.double() + mean_s, invstd


def bn_train_forward_update(x, weight, bias, eps, act, running_mean, running_var, momentum):
    """:func:`bn_train_forward`, then the portable running-statistics update: ``(y, mean, invstd, nonfinite)``."""
    y, mean, invstd = bn_train_forward(x, weight, bias, eps, act)
    n = x.numel() // x.shape[1]
    return y, mean, invstd, portable.running_update(running_mean, running_var, mean, invstd, eps, n, momentum)


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
    _check_act(act)
    acc = acc_dtype(x.dtype)
    c = x.shape[1]
    invstd = torch.rsqrt(running_var.detach().to(acc) + eps)
    scale = invstd * _acc_vec(weight, c, acc, 1.0, x.device)
    return _normalize(x, running_mean.detach().to(acc).contiguous(), scale.contiguous(),
                      _acc_vec(bias, c, acc, 0.0, x.device), act)


def bn_backward(dy: Tensor, x: Tensor, weight: Tensor | None, bias: Tensor | None, mean: Tensor,
                invstd: Tensor, act: str, training: bool, needs=(True, True, True)):
    """Closed-form backward ``(dx, dweight, dbias)`` (as :func:`normlab.kernels.portable.bn_backward`): one pass
    for the per-channel sums of g and g * xhat, one for dx = w * invstd * (g - db / n - xhat * dw / n)."""
    _check_act(act)
    acc = acc_dtype(x.dtype)
    if dy.dtype != x.dtype or dy.stride() != x.stride():
        dy = torch.empty_like(x).copy_(dy)
    n, c, s, s_n, s_c, s_s = _strides3(x)
    cnt = n * s
    x0 = _channel_firsts(x, acc)
    rel = (mean.detach().double() - x0.double()).to(acc)
    inv = invstd.detach().to(acc).contiguous()
    w = _acc_vec(weight, c, acc, 1.0, x.device)
    b = _acc_vec(bias, c, acc, 0.0, x.device)
    block_c, block_k, grid, per = _launch_shape(n, c, s, s_c)
    code = ACT_CODES[act]
    sg = torch.empty((grid[1], c), dtype=acc, device=x.device)
    sgx = torch.empty_like(sg)
    _grad_sums_kernel[grid](dy, x, x0, rel, inv, w, b, sg, sgx, c, s, cnt, s_n, s_c, s_s, per, ACT=code,
                            BLOCK_C=block_c, BLOCK_K=block_k)
    db = sg.double().sum(0)
    dw = sgx.double().sum(0)
    dx = None
    if needs[0]:
        kg = inv.double() * w.double()
        if training:
            kx = -kg * dw / cnt
            k0 = -kg * db / cnt
        else:
            kx = k0 = torch.zeros_like(kg)
        dx = torch.empty_like(x)
        _dx_kernel[grid](dy, x, dx, x0, rel, inv, w, b, kg.to(acc), kx.to(acc), k0.to(acc), c, s, cnt, s_n, s_c,
                         s_s, per, ACT=code, BLOCK_C=block_c, BLOCK_K=block_k)
    return (dx, dw.to(acc) if needs[1] else None, db.to(acc) if needs[2] else None)


# not batch norm: the portable kernels
running_update = portable.running_update
gn_forward = portable.gn_forward
gn_backward = portable.gn_backward
