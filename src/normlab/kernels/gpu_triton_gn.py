"""GPU backend: group norm's kernel contract (:func:`normlab.kernels.portable.gn_forward` / ``gn_backward``) in
Triton, for CUDA tensors; layer norm ((M, K, 1), one group) and instance norm (G = C) reach it through group norm.

It imports :mod:`.gpu_triton`'s helpers by name; ``gpu_triton`` hands out ``gn_forward`` / ``gn_backward`` from here
on first use (either module can be imported first).

Layout: ``x`` (N, C, S) contiguous, so group (n, g) is row r = n * G + g of an (N * G, L) view, L = (C/G) * S,
its values adjacent; element i of a row is channel g * (C/G) + i // S. Numerics as the batch-norm kernels and the
portable contract: each row's sums of ``d = x - shift`` and ``d * d`` (shift = the row's first value) per lane in
``acc_dtype``, their totals turned into the mean and biased variance in float64, ``invstd = 1 / sqrt(var + eps)``
with eps added in ``acc_dtype`` (eps passed as a float32 hi/lo pair, exact); a constant row has variance 0 and
gives exactly the bias, a row of 1e6 + small noise loses nothing to the shift. The backward takes the saved
mean (in ``acc_dtype``, as the contract returns it): ``xhat = (x - mean) * invstd``, exactly portable's (the
difference of two nearby values of one dtype is exact).

Launches. Forward: one. ``_forward_kernel`` where S < CHANNEL_TILES_FROM (layer norm's S == 1 among them): a
program per row, or ``ROWS`` short rows per program, tiles of ROWS x BLOCK values, each value's channel i // S;
``_forward_channels_kernel`` from there on: a program per row, tiles of channels x positions (weight and bias
loaded per channel, no division). A row that fits one tile is read once and normalized from registers; a longer
one twice, a sums pass then a normalize pass over the chunks (the second read mostly from L2).
Backward: dx needs per row sum(g) and sum(g * xhat), g = dy * w, then dx = invstd * (g - mean(g) - xhat *
mean(g * xhat)); dweight[c] = sum over n, s of dy * xhat and dbias[c] = sum of dy.
* S > 1 (group, instance norm) with dweight or dbias: ``_grad_channels_kernel``, a program per row, tiles of
  channels x positions; it writes each (n, c)'s sums of dy and dy * xhat (an (N, C) pair, S times smaller than
  x), derives the row's sums from them (weighted by w), and writes dx in a second pass; then ``_sum_rows_kernel``
  sums the pairs over N in float64. 2 launches (1 where N == 1: the programs write dweight and dbias themselves).
* S == 1 (layer norm, group norm of (N, C)): ``_dx_kernel`` (rows as in the forward) for dx, and
  ``_grad_columns_kernel`` for dweight and dbias, programs over channel blocks x runs of rows (the (n, c) pairs
  would be as large as x) writing a pair of partial sums per run, summed by ``_sum_rows_kernel``. 3 launches (2
  where one run covers the rows).
* dx only: 1 launch, ``_dx_kernel`` (``_grad_channels_kernel`` without the sums from S = CHANNEL_TILES_FROM).
No torch op runs besides the outputs' (and partial sums') allocation; dy of another dtype or layout is copied
first. Launches go through :func:`.gpu_triton._run` (the compiled kernel's own launcher after the first call).
Untuned: the block constants below are first choices, not sweeps (BENCHMARKS.md has no group-norm GPU rows yet).
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import gpu_triton as _bn
from .gpu_triton import (_cdiv, _channel_block, _f64, _merge_partials, _on_device_of, _opt, _pow2, _remember,
                         _rsqrt, _run, _split, _tl_acc, _vec, _vector)
from .portable import acc_dtype

# launch geometry (see _geometry), module attributes so that a test or a sweep can set them (then clear
# _GEOMETRIES)
BLOCK = 4096  # values of a row per tile at most; a row up to this long is read once (held in registers)
TILE = 4096  # values per tile where short rows are packed ROWS to a program
MIN_PROGRAMS = 512  # rows are packed only while at least this many programs remain (a few per multiprocessor)
WARP_VALUES = 256  # values per warp of a tile (num_warps = tile / WARP_VALUES, 1 to 8)
# S from which the forward and the dx-only backward tile a row by channels x positions (weight and bias per
# channel) instead of as a flat run of values (each value's channel i // S: a division and two gathered loads a
# value, but short rows packed several to a program)
CHANNEL_TILES_FROM = 64
COL_BLOCKS = (16, 64)  # (rows, channels) per tile of the S == 1 dweight/dbias kernel, channels adjacent
COL_PROGRAMS = 1024  # programs to aim for there: channel blocks x runs of rows (each run writes 2 x C sums)
# ... but one run (dweight and dbias written directly: one launch fewer) where a program's run covers at most this
# many values: the 64x256 layer norm's backward took 7.7 us of GPU time in 3 launches against torch's 6.8 (H200),
# for a few hundred ns of memory traffic: the launches' own cost (inferred from that, not swept)
COL_ONE_RUN_VALUES = 16384
SUM_BLOCKS = (16, 128)  # (channels, rows of partial sums) per program and step of the summing kernel


# ------------------------------------------------------------------------------------------------------
# device code
# ------------------------------------------------------------------------------------------------------
@triton.jit
def _rows(R, L, ROWS: tl.constexpr, BIG: tl.constexpr):
    """This program's rows, their mask and their first offsets (int64 where the tensor is BIG)."""
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    if BIG:
        base = rows.to(tl.int64) * L
    else:
        base = rows * L
    return rows, rows < R, base


@triton.jit
def _row_tile(rows, rmask, base, start, L, S, CPG, G, BLOCK: tl.constexpr):
    """Offsets, mask and channel of the values start..start + BLOCK of the rows (ROWS x BLOCK)."""
    cols = start + tl.arange(0, BLOCK)
    mask = rmask[:, None] & (cols < L)[None, :]
    ch = (rows % G)[:, None] * CPG + (cols // S)[None, :]
    return base[:, None] + cols[None, :], mask, ch


@triton.jit
def _moments(s1, s2, L, eps_hi, eps_lo, ACC: tl.constexpr):
    """mean - shift (float64) and invstd (ACC) from the sums of d and d * d over L values."""
    n = tl.cast(L, tl.float64)
    mean_s = s1.to(tl.float64) / n
    var = tl.maximum(s2.to(tl.float64) / n - mean_s * mean_s, 0.0)
    return mean_s, _rsqrt(var.to(ACC) + _f64(eps_hi, eps_lo).to(ACC))


@triton.jit
def _store_stats(mean_ptr, invstd_ptr, rows, rmask, shift, mean_s, invstd):
    tl.store(mean_ptr + rows, (shift.to(tl.float64) + mean_s).to(mean_ptr.dtype.element_ty), mask=rmask)
    tl.store(invstd_ptr + rows, invstd, mask=rmask)


@triton.jit
def _store_y(y_ptr, w_ptr, b_ptr, offs, mask, ch, d, mean_s, invstd, HAS_W: tl.constexpr, HAS_B: tl.constexpr):
    """y = ((x - shift) - (mean - shift)) * invstd * w + b, in portable's order, from d = x - shift."""
    y = (d - mean_s[:, None]) * invstd[:, None]
    if HAS_W:
        y = y * _vec(w_ptr, ch, mask, 1.0, True, d.dtype)
    if HAS_B:
        y = y + _vec(b_ptr, ch, mask, 0.0, True, d.dtype)
    tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _forward_kernel(x_ptr, y_ptr, w_ptr, b_ptr, mean_ptr, invstd_ptr, R, L, S, CPG, G, eps_hi, eps_lo,
                    ACC: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr, ROWS: tl.constexpr,
                    BLOCK: tl.constexpr, ONE: tl.constexpr, BIG: tl.constexpr):
    """Statistics and normalized output of ROWS rows; ONE: each row fits one tile (read once)."""
    rows, rmask, base = _rows(R, L, ROWS, BIG)
    shift = tl.load(x_ptr + base, mask=rmask, other=0.0).to(ACC)
    if ONE:
        offs, mask, ch = _row_tile(rows, rmask, base, 0, L, S, CPG, G, BLOCK)
        d = tl.where(mask, tl.load(x_ptr + offs, mask=mask, other=0.0).to(ACC) - shift[:, None], 0.0)
        mean_s, invstd = _moments(tl.sum(d, 1), tl.sum(d * d, 1), L, eps_hi, eps_lo, ACC)
        _store_stats(mean_ptr, invstd_ptr, rows, rmask, shift, mean_s, invstd)
        _store_y(y_ptr, w_ptr, b_ptr, offs, mask, ch, d, mean_s.to(ACC), invstd, HAS_W, HAS_B)
    else:
        a1 = tl.zeros([ROWS, BLOCK], ACC)
        a2 = tl.zeros([ROWS, BLOCK], ACC)
        for i in range(0, L, BLOCK):
            offs, mask, ch = _row_tile(rows, rmask, base, i, L, S, CPG, G, BLOCK)
            d = tl.where(mask, tl.load(x_ptr + offs, mask=mask, other=0.0).to(ACC) - shift[:, None], 0.0)
            a1 += d
            a2 += d * d
        mean_s, invstd = _moments(tl.sum(a1, 1), tl.sum(a2, 1), L, eps_hi, eps_lo, ACC)
        _store_stats(mean_ptr, invstd_ptr, rows, rmask, shift, mean_s, invstd)
        ms = mean_s.to(ACC)
        for i in range(0, L, BLOCK):
            offs, mask, ch = _row_tile(rows, rmask, base, i, L, S, CPG, G, BLOCK)
            d = tl.load(x_ptr + offs, mask=mask, other=0.0).to(ACC) - shift[:, None]
            _store_y(y_ptr, w_ptr, b_ptr, offs, mask, ch, d, ms, invstd, HAS_W, HAS_B)


@triton.jit
def _channels_from(j, CPG, BC: tl.constexpr):
    """The row's channels j..j + BC (offsets within its group) and their mask."""
    cc = j + tl.arange(0, BC)
    return cc, cc < CPG


@triton.jit
def _channel_tile(base, cc, cmask, s0, S, BS: tl.constexpr):
    """Offsets and mask of positions s0..s0 + BS of the row's channels ``cc`` (BC x BS)."""
    ss = s0 + tl.arange(0, BS)
    return base + cc[:, None] * S + ss[None, :], cmask[:, None] & (ss < S)[None, :]


@triton.jit
def _row_start(L, CPG, BIG: tl.constexpr):
    """Row ``program_id(0)``: its index r, the offset of its first value and of its first channel in an (N, C)
    table (n * C + g * CPG = r * CPG)."""
    r = tl.program_id(0)
    if BIG:
        base = r.to(tl.int64) * L
        first = r.to(tl.int64) * CPG
    else:
        base = r * L
        first = r * CPG
    return r, base, first


@triton.jit
def _store_y_channels(y_ptr, w_ptr, b_ptr, offs, mask, ch, cmask, d, mean_s, invstd, HAS_W: tl.constexpr,
                      HAS_B: tl.constexpr):
    """:func:`_store_y` of a channels x positions tile: w and b per channel."""
    y = (d - mean_s) * invstd
    if HAS_W:
        y = y * _vec(w_ptr, ch, cmask, 1.0, True, d.dtype)[:, None]
    if HAS_B:
        y = y + _vec(b_ptr, ch, cmask, 0.0, True, d.dtype)[:, None]
    tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _forward_channels_kernel(x_ptr, y_ptr, w_ptr, b_ptr, mean_ptr, invstd_ptr, L, S, CPG, G, eps_hi, eps_lo,
                             ACC: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr, BC: tl.constexpr,
                             BS: tl.constexpr, ONE: tl.constexpr, BIG: tl.constexpr):
    """:func:`_forward_kernel` of one row (S >= CHANNEL_TILES_FROM) in tiles of BC channels x BS positions."""
    r, base, first = _row_start(L, CPG, BIG)
    shift = tl.load(x_ptr + base).to(ACC)
    c0 = (r % G) * CPG  # the row's first channel
    if ONE:
        cc, cmask = _channels_from(0, CPG, BC)
        offs, mask = _channel_tile(base, cc, cmask, 0, S, BS)
        d = tl.where(mask, tl.load(x_ptr + offs, mask=mask, other=0.0).to(ACC) - shift, 0.0)
        mean_s, invstd = _moments(tl.sum(tl.sum(d, 1), 0), tl.sum(tl.sum(d * d, 1), 0), L, eps_hi, eps_lo, ACC)
        tl.store(mean_ptr + r, (shift.to(tl.float64) + mean_s).to(mean_ptr.dtype.element_ty))
        tl.store(invstd_ptr + r, invstd)
        _store_y_channels(y_ptr, w_ptr, b_ptr, offs, mask, c0 + cc, cmask, d, mean_s.to(ACC), invstd, HAS_W,
                          HAS_B)
    else:
        a1 = tl.zeros([BC, BS], ACC)
        a2 = tl.zeros([BC, BS], ACC)
        for j in range(0, CPG, BC):
            cc, cmask = _channels_from(j, CPG, BC)
            for s0 in range(0, S, BS):
                offs, mask = _channel_tile(base, cc, cmask, s0, S, BS)
                d = tl.where(mask, tl.load(x_ptr + offs, mask=mask, other=0.0).to(ACC) - shift, 0.0)
                a1 += d
                a2 += d * d
        mean_s, invstd = _moments(tl.sum(tl.sum(a1, 1), 0), tl.sum(tl.sum(a2, 1), 0), L, eps_hi, eps_lo, ACC)
        tl.store(mean_ptr + r, (shift.to(tl.float64) + mean_s).to(mean_ptr.dtype.element_ty))
        tl.store(invstd_ptr + r, invstd)
        ms = mean_s.to(ACC)
        for j in range(0, CPG, BC):
            cc, cmask = _channels_from(j, CPG, BC)
            for s0 in range(0, S, BS):
                offs, mask = _channel_tile(base, cc, cmask, s0, S, BS)
                d = tl.load(x_ptr + offs, mask=mask, other=0.0).to(ACC) - shift
                _store_y_channels(y_ptr, w_ptr, b_ptr, offs, mask, c0 + cc, cmask, d, ms, invstd, HAS_W, HAS_B)


@triton.jit
def _xhat_g(x_ptr, dy_ptr, w_ptr, offs, mask, ch, mean, invstd, HAS_W: tl.constexpr):
    """xhat = (x - mean) * invstd and g = dy * w of a ROWS x BLOCK tile (g is 0 past the ends)."""
    acc = mean.dtype
    xhat = (tl.load(x_ptr + offs, mask=mask, other=0.0).to(acc) - mean[:, None]) * invstd[:, None]
    g = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(acc)
    if HAS_W:
        g = g * _vec(w_ptr, ch, mask, 0.0, True, acc)
    return xhat, g


@triton.jit
def _dx_kernel(dy_ptr, x_ptr, dx_ptr, w_ptr, mean_ptr, invstd_ptr, R, L, S, CPG, G, ACC: tl.constexpr,
               HAS_W: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr, ONE: tl.constexpr, BIG: tl.constexpr):
    """dx = invstd * ((g - mean(g)) - xhat * mean(g * xhat)) of ROWS rows, the means over each row."""
    rows, rmask, base = _rows(R, L, ROWS, BIG)
    mean = tl.load(mean_ptr + rows, mask=rmask, other=0.0).to(ACC)
    invstd = tl.load(invstd_ptr + rows, mask=rmask, other=0.0).to(ACC)
    if ONE:
        offs, mask, ch = _row_tile(rows, rmask, base, 0, L, S, CPG, G, BLOCK)
        xhat, g = _xhat_g(x_ptr, dy_ptr, w_ptr, offs, mask, ch, mean, invstd, HAS_W)
        mg = tl.sum(g, 1) / L
        mgx = tl.sum(g * xhat, 1) / L
        dx = ((g - mg[:, None]) - xhat * mgx[:, None]) * invstd[:, None]
        tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=mask)
    else:
        a1 = tl.zeros([ROWS, BLOCK], ACC)
        a2 = tl.zeros([ROWS, BLOCK], ACC)
        for i in range(0, L, BLOCK):
            offs, mask, ch = _row_tile(rows, rmask, base, i, L, S, CPG, G, BLOCK)
            xhat, g = _xhat_g(x_ptr, dy_ptr, w_ptr, offs, mask, ch, mean, invstd, HAS_W)
            a1 += g
            a2 += g * xhat
        mg = tl.sum(a1, 1) / L
        mgx = tl.sum(a2, 1) / L
        for i in range(0, L, BLOCK):
            offs, mask, ch = _row_tile(rows, rmask, base, i, L, S, CPG, G, BLOCK)
            xhat, g = _xhat_g(x_ptr, dy_ptr, w_ptr, offs, mask, ch, mean, invstd, HAS_W)
            dx = ((g - mg[:, None]) - xhat * mgx[:, None]) * invstd[:, None]
            tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _xhat_dy(x_ptr, dy_ptr, offs, mask, mean, invstd, ACC: tl.constexpr):
    xhat = (tl.load(x_ptr + offs, mask=mask, other=0.0).to(ACC) - mean) * invstd
    return xhat, tl.load(dy_ptr + offs, mask=mask, other=0.0).to(ACC)


@triton.jit
def _grad_channels_kernel(dy_ptr, x_ptr, dx_ptr, w_ptr, mean_ptr, invstd_ptr, p1_ptr, p2_ptr, L, S, CPG, G,
                          ACC: tl.constexpr, HAS_W: tl.constexpr, HAS_DX: tl.constexpr, PARTIALS: tl.constexpr,
                          BC: tl.constexpr, BS: tl.constexpr, ONE: tl.constexpr, BIG: tl.constexpr):
    """Row r = n * G + g (S > 1): with PARTIALS, the sums of dy and dy * xhat over each channel's S values,
    written at n * C + c of ``p1`` / ``p2``; with HAS_DX, dx from the row's sums of g = dy * w and g * xhat, which
    are the channel sums weighted by w. Tiles of BC channels x BS positions; ONE: the row fits one tile (read
    once)."""
    r, base, first = _row_start(L, CPG, BIG)
    mean = tl.load(mean_ptr + r).to(ACC)
    invstd = tl.load(invstd_ptr + r).to(ACC)
    c0 = (r % G) * CPG  # the row's first channel
    if ONE:
        cc, cmask = _channels_from(0, CPG, BC)
        offs, mask = _channel_tile(base, cc, cmask, 0, S, BS)
        xhat, dy = _xhat_dy(x_ptr, dy_ptr, offs, mask, mean, invstd, ACC)
        sdy = tl.sum(dy, 1)
        sdyx = tl.sum(dy * xhat, 1)
        if PARTIALS:
            tl.store(p1_ptr + first + cc, sdy, mask=cmask)
            tl.store(p2_ptr + first + cc, sdyx, mask=cmask)
        if HAS_DX:
            w = _vec(w_ptr, c0 + cc, cmask, 1.0, HAS_W, ACC)
            mg = tl.sum(sdy * w, 0) / L
            mgx = tl.sum(sdyx * w, 0) / L
            dx = ((dy * w[:, None] - mg) - xhat * mgx) * invstd
            tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=mask)
    else:
        tg = tl.zeros([BC], ACC)  # per lane, over the channel blocks: sum(g), sum(g * xhat)
        tgx = tl.zeros([BC], ACC)
        for j in range(0, CPG, BC):
            cc, cmask = _channels_from(j, CPG, BC)
            a1 = tl.zeros([BC, BS], ACC)
            a2 = tl.zeros([BC, BS], ACC)
            for s0 in range(0, S, BS):
                offs, mask = _channel_tile(base, cc, cmask, s0, S, BS)
                xhat, dy = _xhat_dy(x_ptr, dy_ptr, offs, mask, mean, invstd, ACC)
                a1 += dy
                a2 += dy * xhat
            sdy = tl.sum(a1, 1)
            sdyx = tl.sum(a2, 1)
            if PARTIALS:
                tl.store(p1_ptr + first + cc, sdy, mask=cmask)
                tl.store(p2_ptr + first + cc, sdyx, mask=cmask)
            if HAS_DX:
                w = _vec(w_ptr, c0 + cc, cmask, 1.0, HAS_W, ACC)
                tg += sdy * w
                tgx += sdyx * w
        if HAS_DX:
            mg = tl.sum(tg, 0) / L
            mgx = tl.sum(tgx, 0) / L
            for j in range(0, CPG, BC):
                cc, cmask = _channels_from(j, CPG, BC)
                w = _vec(w_ptr, c0 + cc, cmask, 1.0, HAS_W, ACC)
                for s0 in range(0, S, BS):
                    offs, mask = _channel_tile(base, cc, cmask, s0, S, BS)
                    xhat, dy = _xhat_dy(x_ptr, dy_ptr, offs, mask, mean, invstd, ACC)
                    dx = ((dy * w[:, None] - mg) - xhat * mgx) * invstd
                    tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _grad_columns_kernel(dy_ptr, x_ptr, mean_ptr, invstd_ptr, p1_ptr, p2_ptr, N, C, CPG, G, per,
                         ACC: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BIG: tl.constexpr):
    """S == 1: sums of dy and dy * xhat of BLOCK_C channels over the run of rows n_lo..n_lo + per, written at row
    ``program_id(1)`` of ``p1`` / ``p2`` (R, C). Tiles of BLOCK_N rows x BLOCK_C adjacent channels."""
    cs, cm = _channel_block(C, BLOCK_C)
    n_lo = tl.program_id(1) * per
    n_hi = tl.minimum(n_lo + per, N)
    grp = (cs // CPG)[None, :]
    a1 = tl.zeros([BLOCK_N, BLOCK_C], ACC)
    a2 = tl.zeros([BLOCK_N, BLOCK_C], ACC)
    for i in range(0, per, BLOCK_N):
        ns = n_lo + i + tl.arange(0, BLOCK_N)
        mask = (ns < n_hi)[:, None] & cm[None, :]
        if BIG:
            offs = ns.to(tl.int64)[:, None] * C + cs[None, :]
        else:
            offs = ns[:, None] * C + cs[None, :]
        stat = ns[:, None] * G + grp
        mean = tl.load(mean_ptr + stat, mask=mask, other=0.0).to(ACC)
        invstd = tl.load(invstd_ptr + stat, mask=mask, other=0.0).to(ACC)
        xhat = (tl.load(x_ptr + offs, mask=mask, other=0.0).to(ACC) - mean) * invstd
        dy = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(ACC)
        a1 += dy
        a2 += dy * xhat
    row = tl.program_id(1) * C
    tl.store(p1_ptr + row + cs, tl.sum(a1, 0), mask=cm)
    tl.store(p2_ptr + row + cs, tl.sum(a2, 0), mask=cm)


@triton.jit
def _sum_rows_kernel(part_ptr, db_ptr, dw_ptr, C, R, BLOCK: tl.constexpr, BLOCK_R: tl.constexpr):
    """dbias and dweight: the two halves of the (2, R, C) partial sums, summed over R in float64."""
    cs, cm = _channel_block(C, BLOCK)
    db, dw = _merge_partials(part_ptr, cs, cm, C, R, BLOCK_R)
    tl.store(db_ptr + cs, db.to(db_ptr.dtype.element_ty), mask=cm)
    tl.store(dw_ptr + cs, dw.to(dw_ptr.dtype.element_ty), mask=cm)


# ------------------------------------------------------------------------------------------------------
# host side
# ------------------------------------------------------------------------------------------------------
class _Geometry(NamedTuple):
    """Launch geometry of one (N, C, S, groups, BIG): the flat row kernels' grid and size arguments (R = N * G,
    L, S, C/G, G) and constexprs; the channel kernels' constexprs (their grid is R); the S == 1 column kernel's
    grid, rows per run and constexprs; the rows of partial sums (N or runs; 1: written as dweight/dbias directly)
    and the summing kernel's grid and constexprs."""
    rows_grid: tuple[int]
    args: tuple[int, ...]
    rows_blocks: dict
    chan_blocks: dict
    col_grid: tuple[int, int]
    col_per: int
    col_blocks: dict
    parts: int
    sum_grid: tuple[int]
    sum_blocks: dict


_GEOMETRIES: dict = {}  # (n, c, s, groups, big) -> _Geometry; cleared by whoever changes the constants above


def _warps(tile: int) -> int:
    return max(1, min(8, tile // WARP_VALUES))


def _floor_pow2(n: int) -> int:
    """The greatest power of 2 <= n (n >= 1)."""
    return 1 << (n.bit_length() - 1)


def _geometry(n: int, c: int, s: int, groups: int, big: bool) -> _Geometry:
    """Rows up to BLOCK values are one tile, packed while MIN_PROGRAMS programs remain; channel tiles as wide in
    positions as S allows (up to BLOCK values); S == 1's column kernel in runs of rows for about COL_PROGRAMS
    programs. Cached by the arguments (the host's time per call counts on a GPU); the cache starts over past
    4096 entries."""
    key = (n, c, s, groups, big)
    g = _GEOMETRIES.get(key)
    if g is not None:
        return g
    rows, cpg = n * groups, c // groups
    length = cpg * s
    block = min(BLOCK, _pow2(max(length, 16)))
    one = length <= block
    packed = min(TILE // block, _floor_pow2(max(1, rows // MIN_PROGRAMS))) if one else 1
    rows_blocks = {"ROWS": packed, "BLOCK": block, "ONE": one, "BIG": big, "num_warps": _warps(packed * block)}
    # S > 1: channels x positions, a power of 2 each, at least 16 values a tile
    bs = min(BLOCK, _pow2(s))
    bc = min(_pow2(cpg), max(1, BLOCK // bs))
    if bc * bs < 16:
        bs = 16 // bc
    chan_blocks = {"BC": bc, "BS": bs, "ONE": bc >= cpg and bs >= s, "BIG": big, "num_warps": _warps(bc * bs)}
    # S == 1: runs of rows by channel blocks for about COL_PROGRAMS programs
    col_n, col_c = COL_BLOCKS[0], min(COL_BLOCKS[1], _pow2(max(c, 16)))
    runs = max(1, min(_cdiv(n, col_n), _cdiv(COL_PROGRAMS, _cdiv(c, col_c))))
    if n * col_c <= COL_ONE_RUN_VALUES:
        runs = 1
    per = _cdiv(_cdiv(n, runs), col_n) * col_n
    runs = _cdiv(n, per)
    col_blocks = {"BLOCK_N": col_n, "BLOCK_C": col_c, "BIG": big, "num_warps": _warps(col_n * col_c)}
    g = _Geometry((_cdiv(rows, packed),), (rows, length, s, cpg, groups), rows_blocks, chan_blocks,
                  (_cdiv(c, col_c), runs), per, col_blocks, n if s > 1 else runs, (_cdiv(c, SUM_BLOCKS[0]),),
                  {"BLOCK": SUM_BLOCKS[0], "BLOCK_R": SUM_BLOCKS[1]})
    return _remember(_GEOMETRIES, key, g)


def _geometry_of(x: Tensor, groups: int) -> _Geometry:
    n, c, s = x.shape
    return _geometry(n, c, s, groups, x.numel() >= _bn.INT32_OFFSETS_BELOW)


@_on_device_of(0)
def gn_forward(x: Tensor, weight: Tensor | None, bias: Tensor | None, groups: int,
               eps: float) -> tuple[Tensor, Tensor, Tensor]:
    """Forward on ``x`` (N, C, S): ``(y, mean, invstd)``, mean and invstd (N, G) in ``acc_dtype``; one launch, one
    read of x where a row fits a tile (BLOCK values), else two."""
    if not x.is_contiguous():
        x = x.contiguous()
    g = _geometry_of(x, groups)
    acc = acc_dtype(x.dtype)
    w, has_w = _opt(weight, x)
    b, has_b = _opt(bias, x)
    y = torch.empty_like(x)
    mean = torch.empty((x.shape[0], groups), dtype=acc, device=x.device)
    invstd = torch.empty((x.shape[0], groups), dtype=acc, device=x.device)
    if x.shape[2] >= CHANNEL_TILES_FROM:
        _run(_forward_channels_kernel, (g.args[0],), x, y, w, b, mean, invstd, *g.args[1:], *_split(float(eps)),
             ACC=_tl_acc(x), HAS_W=has_w, HAS_B=has_b, **g.chan_blocks)
    else:
        _run(_forward_kernel, g.rows_grid, x, y, w, b, mean, invstd, *g.args, *_split(float(eps)),
             ACC=_tl_acc(x), HAS_W=has_w, HAS_B=has_b, **g.rows_blocks)
    return y, mean, invstd


@_on_device_of(1)
def gn_backward(dy: Tensor, x: Tensor, weight: Tensor | None, mean: Tensor, invstd: Tensor, groups: int,
                needs=(True, True, True)) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """Closed-form backward of :func:`gn_forward`: ``(dx, dweight, dbias)`` as
    :func:`normlab.kernels.portable.gn_backward` (None where ``needs`` says so); launches in the module
    docstring."""
    if not x.is_contiguous():
        x = x.contiguous()
    if dy.dtype != x.dtype or not dy.is_contiguous():
        dy = dy.to(x.dtype).contiguous()
    n, c, s = x.shape
    g = _geometry_of(x, groups)
    acc = acc_dtype(x.dtype)
    tl_acc = _tl_acc(x)
    w, has_w = _opt(weight, x)
    mean, invstd = _vector(mean, x), _vector(invstd, x)
    sums = needs[1] or needs[2]
    if not (sums or needs[0]):
        return None, None, None
    dx = torch.empty_like(x) if needs[0] else None
    dw = db = part = None
    if sums:
        # two tensors, not views of one: a custom operator's outputs may not alias each other (torch.compile)
        dw, db = torch.empty(c, dtype=acc, device=x.device), torch.empty(c, dtype=acc, device=x.device)
        part = torch.empty((2, g.parts, c), dtype=acc, device=x.device) if g.parts > 1 else None
        p1, p2 = (db, dw) if part is None else (part[0], part[1])
    if s > 1 and (sums or s >= CHANNEL_TILES_FROM):
        _run(_grad_channels_kernel, (n * groups,), dy, x, x if dx is None else dx, w, mean, invstd,
             *((p1, p2) if sums else (x, x)), *g.args[1:], ACC=tl_acc, HAS_W=has_w, HAS_DX=dx is not None,
             PARTIALS=sums, **g.chan_blocks)
    elif dx is not None:
        _run(_dx_kernel, g.rows_grid, dy, x, dx, w, mean, invstd, *g.args, ACC=tl_acc, HAS_W=has_w,
             **g.rows_blocks)
    if sums and s == 1:
        _run(_grad_columns_kernel, g.col_grid, dy, x, mean, invstd, p1, p2, n, c, g.args[3], groups, g.col_per,
             ACC=tl_acc, **g.col_blocks)
    if part is not None:
        _run(_sum_rows_kernel, g.sum_grid, part, db, dw, c, g.parts, **g.sum_blocks)
    return dx, dw if needs[1] else None, db if needs[2] else None
