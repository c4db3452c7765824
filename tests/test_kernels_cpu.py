"""The numba CPU backend against the portable backend (the contract) and against float64.

Tolerances: see ``kernel_checks.py``. No timing assertions here: see ``normlab bench``.
"""
from __future__ import annotations

import os
import subprocess
import sys
import zlib

import numpy as np
import pytest
import torch
from kernel_checks import DTYPES, LOW, TOL, check_batch_norm_contract, close, make

from normlab.kernels import cpu, cpu_numba, portable

pytestmark = pytest.mark.skipif(cpu is None, reason="numba missing")

# (shape, memory format)
# (M, C) kernels: rows in blocks of 64, four rows per sweep; (67, 5) and (9, 7) end a block with 3 and 1 rows left over
# The register loops (cpu_numba._reg_lanes) take (130, 64) in float32 as full rows of 64 lanes, and (8, 32, 4, 4)
# channels_last in float32 as lanes and in float64 both ways; 130 rows end their last block of 64 with 2 left over.
# Rows shorter than their vectors (masked lanes): (9, 7), (67, 5) and the channels_last C = 3 in four vectors,
# (67, 120) in eight (float32; float64's 120 lanes exceed 512 bytes: the memory loops), (64, 40) as rows of 40
# lanes, and with the lanes view as rows of 80 float32 / 40 float64; where the compile target has no AVX-512
# (cpu_numba._REG_MASKS), those rows take the memory loops instead
LAYOUTS = [((5, 3, 4, 6), None), ((5, 3, 4, 6), torch.channels_last), ((9, 7), None), ((67, 5), None),
           ((4, 5, 11), None), ((2, 3, 2, 3, 4), torch.channels_last_3d), ((3, 4, 2, 2, 3), None),
           ((130, 64), None), ((8, 32, 4, 4), torch.channels_last), ((67, 120), None), ((64, 40), None)]


def _skip_unsupported(dtype):
    if dtype not in cpu.SUPPORTED_DTYPES:
        pytest.skip(f"{dtype} not handled by the numba backend on this CPU")


def _force_large_paths(monkeypatch):
    """Small inputs take the kernels of large ones: (M, C) as k rows in one of k * C lanes, (N, C, S) training passes
    channel by channel (as if every channel fit in L2)."""
    monkeypatch.setattr(cpu, "_LANES_FROM", 0)
    monkeypatch.setattr(cpu, "_CHANNELS_FROM", 0)
    monkeypatch.setattr(cpu, "_CHANNEL_ROW_FROM", 0)
    monkeypatch.setattr(cpu, "_CHANNELS_PER_THREAD", 0)
    monkeypatch.setattr(cpu, "L2_BYTES", 1 << 40)


@pytest.fixture(params=[False, True], ids=["small", "large"])
def large_paths(request, monkeypatch):
    """Small inputs as they run, and as large ones run (:func:`_force_large_paths`)."""
    if request.param:
        _force_large_paths(monkeypatch)
    return request.param


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape,fmt", LAYOUTS, ids=lambda v: str(v))
def test_batch_norm_matches_portable_and_float64(shape, fmt, dtype, large_paths):
    _skip_unsupported(dtype)
    check_batch_norm_contract(cpu, shape, fmt, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
def test_no_affine_and_stats(dtype):
    x = make((6, 4, 5), None, dtype, gen=torch.Generator().manual_seed(3))
    y, mean, invstd = cpu.bn_train_forward(x, None, None, 1e-5)
    y_p, _, _ = portable.bn_train_forward(x, None, None, 1e-5)
    close(y, y_p, TOL[dtype], rel=dtype in LOW)
    m, v = cpu.bn_stats(x)
    m_p, v_p = portable.bn_stats(x)
    close(m, m_p, 1e-6, rel=True)
    close(v, v_p, 1e-5, rel=True)
    dx, dw, db = cpu.bn_backward(torch.ones_like(x), x, None, None, mean, invstd, "identity", True)
    close(dx, torch.zeros_like(dx), TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape,groups", [((3, 6, 10), 3), ((4, 5, 7), 1), ((2, 4, 9), 4), ((8, 16, 1), 1)])
def test_group_norm_matches_portable_and_float64(shape, groups, dtype):
    _skip_unsupported(dtype)
    gen = torch.Generator().manual_seed(zlib.crc32(repr((shape, groups, dtype)).encode()))
    x = make(shape, None, dtype, gen=gen)
    c = shape[1]
    w, b = torch.randn(c, generator=gen) + 1, torch.randn(c, generator=gen)
    tol, low = TOL[dtype], dtype in LOW
    y, mean, invstd = cpu.gn_forward(x, w, b, groups, 1e-5)
    y_p, mean_p, invstd_p = portable.gn_forward(x, w, b, groups, 1e-5)
    y64, mean64, invstd64 = portable.gn_forward(x.double(), w.double(), b.double(), groups, 1e-5)
    assert y.dtype == dtype and mean.shape == (shape[0], groups) and mean.dtype == mean_p.dtype
    close(y, y_p, tol, rel=low)
    close(y, y64, tol, rel=low)
    close(invstd, invstd64, 1e-5, rel=True)
    dy = make(shape, None, dtype, scale=1.0, loc=0.0, gen=gen)
    got = cpu.gn_backward(dy, x, w, mean, invstd, groups)
    ref = portable.gn_backward(dy, x, w, mean, invstd, groups)
    ref64 = portable.gn_backward(dy.double(), x.double(), w.double(), mean64, invstd64, groups)
    for g, r, r64 in zip(got, ref, ref64):
        close(g, r, tol * 4, rel=True)
        close(g, r64, tol * 4, rel=True)
    got = cpu.gn_backward(dy, x, None, mean, invstd, groups, (True, False, False))
    close(got[0], portable.gn_backward(dy, x, None, mean, invstd, groups)[0], tol * 4, rel=True)
    assert got[1] is None and got[2] is None


# ------------------------------------------------------------------------------------------------------
# edge cases
# ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", [None, torch.channels_last])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
def test_constant_channel_gives_exactly_bias(fmt, dtype, large_paths):
    x = torch.full((4, 3, 5, 5), 7.3, dtype=dtype)
    x[:, 1] = -2.0
    x[:, 2] = torch.randn(4, 5, 5).to(dtype)
    x = x.contiguous(memory_format=fmt) if fmt else x
    w, b = torch.tensor([2.0, 3.0, 1.0]), torch.tensor([0.25, -1.5, 0.0])
    y, mean, invstd = cpu.bn_train_forward(x, w, b, 1e-5)
    assert torch.equal(y[:, 0], torch.full_like(y[:, 0], 0.25))
    assert torch.equal(y[:, 1], torch.full_like(y[:, 1], -1.5))
    dx, dw, db = cpu.bn_backward(torch.randn_like(x), x, w, b, mean, invstd, "identity", True)
    assert torch.isfinite(dx).all() and torch.isfinite(dw).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("value", [0.1, 1 / 3, 1e7 + 0.123456789])
def test_constant_input_gives_exactly_bias_in_every_kernel(value, dtype):
    """The shifts average 16 values; for a constant channel, group or row that average must be the value itself
    (or cancel exactly), so the output is exactly the bias: NCHW, channels_last, (M, C), group norm, layer norm."""
    w, b = torch.tensor([2.0, 3.0, 0.5]), torch.tensor([0.25, -1.5, 0.125])
    x = torch.full((9, 3, 5, 5), value, dtype=dtype)
    for xin in (x, x.contiguous(memory_format=torch.channels_last)):
        y, _, _ = cpu.bn_train_forward(xin, w, b, 1e-5)
        assert torch.equal(y, b.to(dtype).view(1, 3, 1, 1).expand_as(y))
    y, _, _ = cpu.bn_train_forward(torch.full((37, 3), value, dtype=dtype), w, b, 1e-5)
    assert torch.equal(y, b.to(dtype).expand_as(y))
    y, _, _ = cpu.gn_forward(torch.full((2, 3, 50), value, dtype=dtype), w, b, 3, 1e-5)
    assert torch.equal(y, b.to(dtype).view(1, 3, 1).expand_as(y))
    y, _, _ = cpu.gn_forward(torch.full((3, 70, 1), value, dtype=dtype), torch.ones(70), torch.full((70,), 0.5), 1,
                             1e-5)
    assert torch.equal(y, torch.full_like(y, 0.5))


@pytest.mark.parametrize("fmt", [None, torch.channels_last])
@pytest.mark.parametrize("loc,spread,tol", [(1e4, 1.0, 1e-3), (1e6, 0.1, 2e-2)])
def test_large_mean_small_spread_float32(fmt, loc, spread, tol, large_paths):
    gen = torch.Generator().manual_seed(1)
    x64 = loc + spread * torch.randn(8, 4, 6, 6, generator=gen, dtype=torch.float64)
    x = x64.float()
    x = x.contiguous(memory_format=fmt) if fmt else x
    w, b = torch.randn(4, generator=gen), torch.randn(4, generator=gen)
    y, mean, invstd = cpu.bn_train_forward(x, w, b, 1e-5)
    # float64 reference on the *same* float32 values
    y64, _, invstd64 = portable.bn_train_forward(x.double(), w.double(), b.double(), 1e-5)
    close(y, y64, tol)
    close(invstd, invstd64, 1e-5, rel=True)


@pytest.mark.parametrize("shape", [(1, 3, 1, 1), (2, 3), (1, 2, 1), (1, 5, 1, 2)])
def test_tiny_batches(shape):
    x = torch.randn(shape)
    w, b = torch.randn(shape[1]), torch.randn(shape[1])
    y, mean, invstd = cpu.bn_train_forward(x, w, b, 1e-5, "relu")
    close(y, portable.bn_train_forward(x, w, b, 1e-5, "relu")[0], 1e-5)
    dy = torch.randn(shape)
    for g, r in zip(cpu.bn_backward(dy, x, w, b, mean, invstd, "relu", True),
                    portable.bn_backward(dy, x, w, b, mean, invstd, "relu", True)):
        close(g, r, 1e-4, rel=True)


def test_channels_last_output_and_mixed_dy_layout():
    x = torch.randn(4, 8, 5, 5).contiguous(memory_format=torch.channels_last)
    w, b = torch.randn(8), torch.randn(8)
    y, mean, invstd = cpu.bn_train_forward(x, w, b, 1e-5, "silu")
    assert y.is_contiguous(memory_format=torch.channels_last) and not y.is_contiguous()
    dy = torch.randn(4, 8, 5, 5)  # NCHW gradient for a channels_last input
    got = cpu.bn_backward(dy, x, w, b, mean, invstd, "silu", True)
    ref = portable.bn_backward(dy, x, w, b, mean, invstd, "silu", True)
    assert got[0].is_contiguous(memory_format=torch.channels_last)
    for g, r in zip(got, ref):
        close(g, r, 1e-4, rel=True)


def test_supports():
    assert cpu.supports(torch.randn(2, 3, 4, 4))
    assert cpu.supports(torch.randn(2, 3, 4, 4).contiguous(memory_format=torch.channels_last))
    assert not cpu.supports(torch.randn(2, 3, 4, 4).transpose(2, 3))       # odd strides
    assert not cpu.supports(torch.randn(4, 3)[::2])                       # non-contiguous rows
    assert not cpu.supports(torch.randn(0, 3))                            # empty
    assert not cpu.supports(torch.randn(5))                               # rank 1
    assert not cpu.supports(torch.randint(0, 3, (2, 3)))                  # integers
    assert not cpu.supports(torch.randn(2, 3, dtype=torch.complex64))
    assert cpu.supports(torch.randn(2, 3, requires_grad=True))


@pytest.mark.parametrize("dtype,shape,c,lanes", [
    (torch.float32, (10, 64), 64, 64), (torch.float32, (10, 512), 64, 64), (torch.float32, (10, 512), 16, 64),
    (torch.float32, (10, 48), 48, 48), (torch.float32, (10, 128), 128, 128), (torch.float32, (10, 32), 32, 32),
    (torch.float32, (10, 480), 120, 120), (torch.float32, (10, 384), 3, 96), (torch.float32, (10, 130), 130, 0),
    (torch.float64, (10, 32), 32, 32), (torch.float64, (10, 64), 64, 64), (torch.float64, (10, 120), 120, 0),
    (torch.float64, (10, 320), 40, 40), (torch.bfloat16, (10, 128), 64, 64), (torch.float16, (10, 480), 120, 120),
    (torch.float16, (10, 130), 130, 0)],
    ids=str)
def test_register_loops_take_rows_of_up_to_512_bytes(dtype, shape, c, lanes):
    """The (M, C) register loops take arrays as rows of 256 bytes of compute-dtype lanes (float32 for 16-bit
    storage) where C divides that and the arrays' rows hold whole ones, else as rows of C times the largest power of
    two that fits 512 bytes and divides the arrays' rows (the last vectors masked, where the target masks
    natively: elsewhere rows that end mid-vector keep the memory loops); wider channels and strided arrays keep the
    memory loops."""
    a = cpu._np(torch.zeros(shape, dtype=dtype))
    item = max(a.itemsize, 4)  # the compute dtype's
    if lanes not in (cpu_numba._REG_ROW_BYTES // item, cpu_numba._REG_WIDE_BYTES // item) and not cpu_numba._REG_MASKS:
        lanes = 0
    assert cpu_numba._reg_lanes(a, c, a, a) == lanes
    if lanes:
        assert cpu_numba._reg_lanes(a, c, a[:, ::2], a) == 0  # a strided output: the memory loops
        assert cpu_numba._reg_lanes(a, c, a, a.view(a.dtype)[:, :shape[1]]) == lanes


@pytest.mark.parametrize("name,features,masks", [
    (None, "+avx2,+avx512f,+avx512bw", True), (None, "+avx2,+fma", False), ("generic", "", False),
    ("haswell", None, False), ("skylake-avx512", None, False)], ids=str)
def test_register_rows_mask_only_where_the_target_has_avx512(monkeypatch, name, features, masks):
    """Rows that end mid-vector take the register loops only where the compile target has AVX-512 (numba's
    NUMBA_CPU_FEATURES, else the host's where NUMBA_CPU_NAME does not name another CPU): elsewhere a masked store
    is vmaskmovps, and the memory loops were 2.5-3.5x faster."""
    from numba.core import config
    monkeypatch.setattr(config, "CPU_NAME", name)
    monkeypatch.setattr(config, "CPU_FEATURES", features)
    assert cpu_numba._target_masks_natively() is masks


# 16-bit inputs of the register loops (full rows of 64 lanes; masked rows of 120 and of 3 * 32 lanes; channels_last
# C = 64 and C = 3) and of the short (N, C, S) rows' sums (S = 100: pairs of vectors and a masked one)
LOW_REGISTER = [((130, 64), None), ((67, 120), None), ((64, 3), None), ((8, 64, 4, 4), torch.channels_last),
                ((16, 3, 5, 5), torch.channels_last), ((6, 5, 10, 10), None)]


@pytest.mark.parametrize("act", ["identity", "relu"])
@pytest.mark.parametrize("dtype", LOW, ids=str)
@pytest.mark.parametrize("shape,fmt", LOW_REGISTER, ids=str)
def test_16bit_loops_round_their_float32_twins_once(shape, fmt, dtype, act, large_paths):
    """bfloat16 and float16 loops compute in float32: on the same values held in float32 storage, the float32 loops
    take the same paths, sums and coefficients, so each 16-bit output is the float32 output rounded once (to
    nearest even), bit for bit, and the statistics and parameter gradients are equal (the fused ReLU's forward
    runs in the register loops too)."""
    _skip_unsupported(dtype)
    gen = torch.Generator().manual_seed(zlib.crc32(repr((shape, fmt, dtype)).encode()))
    x = make(shape, fmt, dtype, gen=gen)
    dy = make(shape, fmt, dtype, scale=1.0, loc=0.0, gen=gen)
    c = shape[1]
    w, b = torch.randn(c, generator=gen) + 1, torch.randn(c, generator=gen)
    rm, rv = torch.randn(c, generator=gen), torch.rand(c, generator=gen) + 0.5
    x32, dy32 = x.float(), dy.float()
    y, mean, invstd = cpu.bn_train_forward(x, w, b, 1e-5, act)
    y32, mean32, invstd32 = cpu.bn_train_forward(x32, w, b, 1e-5, act)
    assert torch.equal(y, y32.to(dtype)) and torch.equal(mean, mean32) and torch.equal(invstd, invstd32)
    y_eval32 = cpu.bn_eval_forward(x32, rm, rv, w, b, 1e-5, act)
    assert torch.equal(cpu.bn_eval_forward(x, rm, rv, w, b, 1e-5, act), y_eval32.to(dtype))
    for training in (True, False):
        got = cpu.bn_backward(dy, x, w, b, mean, invstd, act, training)
        want = cpu.bn_backward(dy32, x32, w, b, mean, invstd, act, training)
        assert torch.equal(got[0], want[0].to(dtype))
        assert torch.equal(got[1], want[1]) and torch.equal(got[2], want[2])


@pytest.mark.parametrize("dtype", LOW, ids=str)
@pytest.mark.parametrize("shape,groups", [((6, 8, 10, 10), 4), ((4, 6, 7), 6)], ids=str)
def test_16bit_group_norm_rounds_its_float32_twin_once(shape, groups, dtype):
    """As above for group and instance norm on rows of 100 and 7 values (the short rows' vector sums in the
    backward). Longer rows take numba's vectorized loops, where LLVM may fuse multiply-adds differently for each
    storage type: a float16 (3, 4, 2400) dx differs from its twin's in the last bit."""
    _skip_unsupported(dtype)
    gen = torch.Generator().manual_seed(zlib.crc32(repr((shape, groups, dtype)).encode()))
    x = make(shape, None, dtype, gen=gen).view(shape[0], shape[1], -1)
    dy = make(shape, None, dtype, scale=1.0, loc=0.0, gen=gen).view_as(x)
    w, b = torch.randn(shape[1], generator=gen) + 1, torch.randn(shape[1], generator=gen)
    y, mean, invstd = cpu.gn_forward(x, w, b, groups, 1e-5)
    y32, mean32, invstd32 = cpu.gn_forward(x.float(), w, b, groups, 1e-5)
    assert torch.equal(y, y32.to(dtype)) and torch.equal(mean, mean32) and torch.equal(invstd, invstd32)
    got = cpu.gn_backward(dy, x, w, mean, invstd, groups)
    want = cpu.gn_backward(dy.float(), x.float(), w, mean, invstd, groups)
    assert torch.equal(got[0], want[0].to(dtype))
    assert torch.equal(got[1], want[1]) and torch.equal(got[2], want[2])


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=lambda d: d.__name__)
@pytest.mark.parametrize("s", [1, 7, 15, 16, 17, 24, 32, 48, 100, 196, 2048, 2049])
def test_short_row_sums_against_float64(dtype, s):
    """The (N, C, S) statistics and gradient sums of rows of at most 2048 values (LLVM IR: pairs of 64-byte
    vectors, one more, then a masked partial one) against float64 sums, from a run of rows that starts and ends
    inside a sample, and from one channel's rows (step C); rows of 2049 take the vectorized loops."""
    rng = np.random.default_rng(s)
    n, c = 3, 4
    x = (rng.standard_normal((n, c, s)) * 2 + 5).astype(dtype)
    dy = rng.standard_normal((n, c, s)).astype(dtype)
    shift = np.full(c, 5, dtype)
    for r_lo, r_hi, step in ((1, n * c - 2, 1), (2, n * c, c)):
        s1, s2, g1, g2 = (np.zeros(c) for _ in range(4))
        cpu_numba._ncs_sums(x, r_lo, r_hi, step, shift, s1, s2)
        cpu_numba._ncs_grad_sums(cpu_numba.IDENTITY, dy, x, r_lo, r_hi, step, shift, np.ones(c, dtype),
                                 np.zeros(c, dtype), g1, g2)
        rows = np.zeros(n * c, bool)
        rows[r_lo:r_hi:step] = True
        rows = rows.reshape(n, c)[:, :, None]
        d = np.where(rows, x.astype(np.float64) - 5, 0.0)
        g = np.where(rows, dy.astype(np.float64), 0.0)
        tol = 1e-5 if dtype == np.float32 else 1e-12
        for got, want in ((s1, d.sum((0, 2))), (s2, (d * d).sum((0, 2))), (g1, g.sum((0, 2))),
                          (g2, (g * d).sum((0, 2)))):
            np.testing.assert_allclose(got, want, rtol=tol, atol=tol * np.abs(want).max())


def test_float32_exp_and_sigmoid_within_their_ulps():
    """The activations' vectorizing float32 exp (cpu_numba._exp32) over its whole clamped range [-87, 88], where
    2**k is built from exponent bits for k from -126 to 127, and the sigmoid on it (one division more), against
    float64; NaN stays NaN."""
    from numba import njit

    @njit
    def both(z, e, s):
        for i in range(z.size):
            e[i] = cpu_numba._exp32(z[i])
            s[i] = cpu_numba._sigmoid(z[i])

    z = np.concatenate([np.linspace(-87, 88, 200_001), [-87.0, 88.0, 0.0, np.nan]]).astype(np.float32)
    e, s = np.empty_like(z), np.empty_like(z)
    both(z, e, s)
    z64 = z.astype(np.float64)
    for got, want, bound in ((e, np.exp(z64), 1.25), (s, 1 / (1 + np.exp(-z64)), 2.5)):  # measured: 1.16, 2.35
        ok = ~np.isnan(z)
        ulps = np.abs(got[ok] - want[ok]) / np.spacing(want[ok].astype(np.float32)).astype(np.float64)
        assert ulps.max() <= bound, f"{ulps.max():.2f} ulps at z = {z[ok][ulps.argmax()]}"
        assert np.isnan(got[~ok]).all()


def test_dispatcher_prefers_cpu_backend():
    from normlab import kernels
    x = torch.randn(4, 3, 5, 5)
    assert kernels.backend_for(x) is cpu
    with kernels.use_backend("portable"):
        assert kernels.backend_for(x) is portable


@pytest.mark.parametrize("fmt", [None, torch.channels_last])
def test_parallel_path_large_input(fmt):
    """Inputs above SERIAL_BELOW run the multi-threaded kernels (the others above run the serial twins)."""
    torch.manual_seed(5)
    x = make((8, 16, 48, 48), fmt, torch.float32)
    assert x.numel() >= cpu.SERIAL_BELOW
    w, b = torch.randn(16), torch.randn(16)
    y, mean, invstd = cpu.bn_train_forward(x, w, b, 1e-5, "relu")
    close(y, portable.bn_train_forward(x, w, b, 1e-5, "relu")[0], 1e-4)
    dy = torch.randn_like(x)
    for g, r in zip(cpu.bn_backward(dy, x, w, b, mean, invstd, "relu", True),
                    portable.bn_backward(dy, x, w, b, mean, invstd, "relu", True)):
        close(g, r, 1e-4, rel=True)
    x3 = x.contiguous().view(8, 16, -1)
    y, m, i = cpu.gn_forward(x3, w, b, 4, 1e-5)
    close(y, portable.gn_forward(x3, w, b, 4, 1e-5)[0], 1e-4)
    for g, r in zip(cpu.gn_backward(dy.view(8, 16, -1), x3, w, m, i, 4),
                    portable.gn_backward(dy.view(8, 16, -1), x3, w, m, i, 4)):
        close(g, r, 1e-4, rel=True)


# (shape, memory format or dtype, the loops' row length) of outputs of STREAM_FROM bytes and more: written with
# streaming stores where a row covers whole cache lines, and in the (N, C, S) layout also where its rows start or
# end mid-line but hold 512 bytes or more ((16, 8, 129, 257), 14x14 images in float32 and float64); 7x7 images
# (196-byte rows) with plain ones
STREAMED = [((8, 16, 256, 128), None, 256 * 128), ((4096, 1024), None, 1024),
            ((64, 64, 32, 32), torch.channels_last, 512), ((2, 16, 64, 1024), torch.float64, 64 * 1024),
            ((65536, 32), torch.float64, 512),
            ((16, 8, 129, 257), None, 129 * 257), ((128, 256, 14, 14), None, 196),
            ((128, 128, 14, 14), torch.float64, 196), ((512, 256, 7, 7), None, 49)]


def _expect_streamed(ncs, row, itemsize):
    """Whether the batch-norm loops stream an output with rows of ``row`` elements, in the (N, C, S) layout if
    ``ncs`` (see ``cpu_numba._streams_ncs``)."""
    return cpu_numba._CAN_STREAM and (row * itemsize % 64 == 0 or (ncs and row * itemsize >= 512))


def test_a_part_of_a_large_output_streams_as_the_whole():
    """The native glue's runs each write a part of one output: the part streams where the whole output would
    (``whole`` bytes), not only where the part alone is large enough."""
    part = torch.empty(cpu_numba.STREAM_FROM // 8).numpy().reshape(-1, 256)  # half the streaming size
    assert not cpu_numba._streams(part, 256, 0) and not cpu_numba._streams_ncs(part, 256, 0)
    whole = 2 * part.nbytes
    assert cpu_numba._streams(part, 256, whole) == cpu_numba._CAN_STREAM
    assert cpu_numba._streams_ncs(part, 256, whole) == cpu_numba._CAN_STREAM


@pytest.mark.parametrize("shape,fmt,row", STREAMED, ids=lambda v: str(v))
def test_streamed_outputs_match_float64(shape, fmt, row):
    """The loops that write y and dx of large outputs with non-temporal stores compute what the plain ones do:
    training forward, eval forward and backward against float64, with and without a fused activation."""
    dtype = fmt if isinstance(fmt, torch.dtype) else torch.float32
    fmt = None if isinstance(fmt, torch.dtype) else fmt
    gen = torch.Generator().manual_seed(3)
    x = make(shape, fmt, dtype, gen=gen)
    assert x.numel() * x.element_size() >= cpu._k.STREAM_FROM
    out = torch.empty(x.numel(), dtype=dtype).numpy().reshape(-1, row)  # torch's allocator: 64-byte aligned
    ncs = len(shape) > 2 and fmt is None
    streams = cpu._k._streams_ncs if ncs else cpu._k._streams
    assert streams(out, row, 0) == _expect_streamed(ncs, row, x.element_size())
    c = shape[1]
    w, b = torch.rand(c, generator=gen, dtype=dtype) + 0.5, torch.randn(c, generator=gen, dtype=dtype)
    x64, w64, b64 = x.double(), w.double(), b.double()
    tol = 1e-4 if dtype == torch.float32 else 1e-10
    dy = make(shape, fmt, dtype, scale=1.0, loc=0.0, gen=gen)
    for act in ("identity", "relu", "sigmoid"):
        y, mean, invstd = cpu.bn_train_forward(x, w, b, 1e-5, act)
        y64, mean64, invstd64 = portable.bn_train_forward(x64, w64, b64, 1e-5, act)
        close(y, y64, tol)
        rm, rv = torch.randn(c, generator=gen, dtype=dtype), torch.rand(c, generator=gen, dtype=dtype) + 0.5
        close(cpu.bn_eval_forward(x, rm, rv, w, b, 1e-5, act),
               portable.bn_eval_forward(x64, rm.double(), rv.double(), w64, b64, 1e-5, act), tol)
        for training in (True, False):
            got = cpu.bn_backward(dy, x, w, b, mean, invstd, act, training)
            ref = portable.bn_backward(dy.double(), x64, w64, b64, mean64, invstd64, act, training)
            for g, r in zip(got, ref):
                close(g, r, tol, rel=True)


@pytest.mark.parametrize("dtype,shape", [(torch.float32, (128, 256, 196)), (torch.float64, (128, 128, 196)),
                                         (torch.float32, (16, 8, 129 * 257))], ids=str)
@pytest.mark.parametrize("offset", [0, 1, 3])
def test_streamed_midline_rows_any_offset_and_split(dtype, shape, offset):
    """The (N, C, S) loops stream rows that start or end mid-line at any offset of the output from a cache line,
    in runs of rows that split lines between them: eval and training forward and dx against float64, and nothing
    written outside the output."""
    gen = torch.Generator().manual_seed(5)
    x, dy = make(shape, None, dtype, gen=gen), make(shape, None, dtype, scale=1.0, loc=0.0, gen=gen)
    c = shape[1]
    w, b = torch.rand(c, generator=gen, dtype=dtype) + 0.5, torch.randn(c, generator=gen, dtype=dtype)
    rm, rv = torch.randn(c, generator=gen, dtype=dtype), torch.rand(c, generator=gen, dtype=dtype) + 0.5
    x64, w64, b64 = x.double(), w.double(), b.double()
    y_eval = portable.bn_eval_forward(x64, rm.double(), rv.double(), w64, b64, 1e-5, "relu")
    y_train, mean64, invstd64 = portable.bn_train_forward(x64, w64, b64, 1e-5, "relu")
    dx64 = portable.bn_backward(dy.double(), x64, w64, b64, mean64, invstd64, "relu", True)[0]
    raw = torch.zeros(x.numel() + 16, dtype=dtype)
    out = raw[offset:offset + x.numel()].view(shape)
    o, xa, dya, wa, ba = out.numpy(), x.numpy(), dy.numpy(), w.numpy(), b.numpy()
    assert cpu_numba._streams_ncs(o, shape[2], 0) == cpu_numba._CAN_STREAM
    mean, second = torch.empty(c, dtype=torch.float64).numpy(), torch.empty(c, dtype=dtype).numpy()
    dw, db = torch.empty(c, dtype=dtype).numpy(), torch.empty(c, dtype=dtype).numpy()
    relu = cpu_numba.RELU
    for chunks in (1, 3, 7):
        cpu_numba.bn_eval_ncs.serial(xa, o, wa, ba, 1e-5, relu, rm.numpy(), rv.numpy(), chunks, 0)
        close(out, y_eval, TOL[dtype])
        cpu_numba.bn_fwd_ncs.serial(xa, o, wa, ba, 1e-5, relu, cpu_numba.MODE_TRAIN, mean, second, chunks)
        close(out, y_train, TOL[dtype])
        cpu_numba.bn_bwd_ncs.serial(dya, xa, wa, ba, mean, second, relu, True, True, o, dw, db, chunks)
        close(out, dx64, TOL[dtype], rel=True)
        assert not raw[:offset].any() and not raw[offset + x.numel():].any()
    cpu_numba.bn_fwd_ncs_channels.serial(xa, o, wa, ba, 1e-5, relu, mean, second)  # channel by channel
    close(out, y_train, TOL[dtype])
    cpu_numba.bn_bwd_ncs_channels.serial(dya, xa, wa, ba, mean, second, relu, True, o, dw, db)
    close(out, dx64, TOL[dtype], rel=True)
    assert not raw[:offset].any() and not raw[offset + x.numel():].any()


def test_unaligned_output_takes_plain_stores():
    """An output viewed at an odd byte offset (its floats off their own alignment) is not streamed: its whole
    lines would not start on a line, where the vector streaming stores need one. The plain loop writes it."""
    shape = (128, 256, 196)
    gen = torch.Generator().manual_seed(6)
    x = make(shape, None, torch.float32, gen=gen)
    c = shape[1]
    w, b = torch.rand(c, generator=gen) + 0.5, torch.randn(c, generator=gen)
    rm, rv = torch.randn(c, generator=gen), torch.rand(c, generator=gen) + 0.5
    raw = torch.zeros(x.numel() * 4 + 1, dtype=torch.uint8).numpy()
    out = raw[1:].view("float32").reshape(shape)
    assert not out.flags.aligned and not cpu_numba._streams_ncs(out, shape[2], 0)
    cpu_numba.bn_eval_ncs.serial(x.numpy(), out, w.numpy(), b.numpy(), 1e-5, cpu_numba.IDENTITY, rm.numpy(),
                                 rv.numpy(), 3, 0)
    close(torch.from_numpy(out.copy()), portable.bn_eval_forward(x.double(), rm.double(), rv.double(), w.double(),
                                                                b.double(), 1e-5, "identity"), TOL[torch.float32])


@pytest.mark.parametrize("groups,shape", [(4, (16, 32, 64, 128)), (32, (16, 32, 64, 128)), (1, (4096, 1024, 1)),
                                          (4, (16, 32, 129, 65))], ids=["group", "instance", "layer", "unaligned"])
def test_streamed_group_norm_outputs_match_float64(groups, shape):
    """Group, instance and layer norm write large y and dx with streaming stores where their rows (a channel's S
    values, a layer-norm row) cover whole cache lines: against float64."""
    gen = torch.Generator().manual_seed(4)
    x = make(shape, None, torch.float32, gen=gen).reshape(shape[0], shape[1], -1)  # (N, C, S)
    assert x.numel() * 4 >= cpu._k.STREAM_FROM
    if groups == 1:  # rows of 4 KB: the smallest layer-norm rows that stream
        assert shape[1] * 4 == cpu._k._LN_STREAM_FROM
    c = shape[1]
    w, b = torch.rand(c, generator=gen) + 0.5, torch.randn(c, generator=gen)
    dy = torch.randn(x.shape, generator=gen)
    y, mean, invstd = cpu.gn_forward(x, w, b, groups, 1e-5)
    y64, mean64, invstd64 = portable.gn_forward(x.double(), w.double(), b.double(), groups, 1e-5)
    close(y, y64, 1e-4)
    got = cpu.gn_backward(dy, x, w, mean, invstd, groups)
    ref = portable.gn_backward(dy.double(), x.double(), w.double(), mean64, invstd64, groups)
    for g, r in zip(got, ref):
        close(g, r, 1e-4, rel=True)


@pytest.mark.parametrize("groups", [8, 256], ids=["group", "instance"])
@pytest.mark.parametrize("offset", [0, 1, 3])
def test_group_norm_streams_midline_rows_at_any_offset(groups, offset):
    """Group and instance norm stream y and dx of 14x14 images (784-byte channel rows that start and end mid-line)
    at any offset of the output from a cache line, in the parallel kernels and their serial twins: against
    float64, and nothing written outside the output. (Instance norm's 784-byte blocks keep plain stores forward.)
    Also as the native glue calls them: the serial loops on each half of the batch, a part below the streaming size
    that streams as its whole output (``whole``)."""
    shape = (128, 256, 196)
    gen = torch.Generator().manual_seed(7)
    x, dy = make(shape, None, torch.float32, gen=gen), make(shape, None, torch.float32, scale=1.0, loc=0.0, gen=gen)
    c = shape[1]
    w, b = torch.rand(c, generator=gen) + 0.5, torch.randn(c, generator=gen)
    y64, mean64, invstd64 = portable.gn_forward(x.double(), w.double(), b.double(), groups, 1e-5)
    dx64 = portable.gn_backward(dy.double(), x.double(), w.double(), mean64, invstd64, groups)[0]
    raw = torch.zeros(x.numel() + 16)
    out = raw[offset:offset + x.numel()].view(shape)
    o, xa, dya, wa, ba = out.numpy(), x.numpy(), dy.numpy(), w.numpy(), b.numpy()
    assert cpu_numba._streams_ncs(o, shape[2], 0) == cpu_numba._CAN_STREAM
    mean, invstd = torch.empty(shape[0], groups).numpy(), torch.empty(shape[0], groups).numpy()
    dw_part, db_part = (torch.empty(shape[0], c, dtype=torch.float64).numpy() for _ in range(2))
    # the tasks in runs: uneven ones (7), one per task, all in one
    par, serial = (cpu_numba.gn_fwd, cpu_numba.gn_bwd), (cpu_numba.gn_fwd.serial, cpu_numba.gn_bwd.serial)
    half = shape[0] // 2
    assert o[:half].nbytes < cpu_numba.STREAM_FROM <= o.nbytes
    for (fwd, bwd), runs, whole in ((par, 7, 0), (par, shape[0] * groups, 0), (serial, 1, 0), (serial, 1, o.nbytes)):
        out.zero_()
        parts = (slice(0, half), slice(half, shape[0])) if whole else (slice(None),)
        for p in parts:
            fwd(xa[p], o[p], wa, ba, groups, 1e-5, mean[p], invstd[p], runs, whole)
        close(out, y64, TOL[torch.float32])
        for p in parts:
            bwd(dya[p], xa[p], wa, mean[p], invstd[p], groups, True, o[p], dw_part[p], db_part[p], runs, whole)
        close(out, dx64, TOL[torch.float32], rel=True)
        assert not raw[:offset].any() and not raw[offset + x.numel():].any()


# ------------------------------------------------------------------------------------------------------
# layer norm: the dedicated row kernel (group norm with G = 1 on (M, K, 1))
# ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("m,k", [(1, 1), (7, 5), (300, 64), (3, 2048 + 37), (600, 512)])
def test_layer_norm_rows_match_portable_and_float64(m, k, dtype):
    _skip_unsupported(dtype)
    gen = torch.Generator().manual_seed(zlib.crc32(repr((m, k, dtype)).encode()))
    x = make((m, k, 1), None, dtype, gen=gen)
    w, b = torch.randn(k, generator=gen) + 1, torch.randn(k, generator=gen)
    tol, low = TOL[dtype], dtype in LOW
    y, mean, invstd = cpu.gn_forward(x, w, b, 1, 1e-5)
    y64, mean64, invstd64 = portable.gn_forward(x.double(), w.double(), b.double(), 1, 1e-5)
    assert y.dtype == dtype and y.shape == x.shape and mean.shape == (m, 1) and invstd.shape == (m, 1)
    assert mean.dtype == invstd.dtype == portable.acc_dtype(dtype)
    close(y, y64, tol, rel=low)
    close(mean, mean64, 1e-6 if dtype != torch.float64 else 1e-12, rel=True)
    close(invstd, invstd64, 1e-5 if dtype != torch.float64 else 1e-12, rel=True)
    dy = make((m, k, 1), None, dtype, scale=1.0, loc=0.0, gen=gen)
    ref64 = portable.gn_backward(dy.double(), x.double(), w.double(), mean64, invstd64, 1)
    got = cpu.gn_backward(dy, x, w, mean, invstd, 1)
    assert got[0].dtype == dtype and got[1].dtype == got[2].dtype == portable.acc_dtype(dtype)
    for g, r64 in zip(got, ref64):
        close(g, r64, tol * 4, rel=True)
    for needs in [(True, False, False), (False, True, True), (False, False, True)]:
        sub = cpu.gn_backward(dy, x, None, mean, invstd, 1, needs)
        ref = portable.gn_backward(dy, x, None, mean, invstd, 1, needs)
        for g, r, need in zip(sub, ref, needs):
            assert (g is None) == (not need)
            if need:
                close(g, r, tol * 4, rel=True)


def test_layer_norm_rows_large_mean_and_constant_rows():
    gen = torch.Generator().manual_seed(7)
    x64 = 1e4 + torch.randn(64, 1000, 1, generator=gen, dtype=torch.float64)
    x = x64.float()
    x[3] = 7.25  # constant row: exactly bias
    w, b = torch.randn(1000, generator=gen), torch.randn(1000, generator=gen)
    y, mean, invstd = cpu.gn_forward(x, w, b, 1, 1e-5)
    y64, _, invstd64 = portable.gn_forward(x.double(), w.double(), b.double(), 1, 1e-5)
    close(y, y64, 1e-3)
    close(invstd, invstd64, 1e-5, rel=True)
    assert torch.equal(y[3, :, 0], b)
    assert mean[3, 0].item() == 7.25


def test_layer_norm_rows_parallel_path():
    torch.manual_seed(11)
    x = torch.randn(1024, 384, 1) * 3 + 1
    assert x.numel() >= cpu.SERIAL_BELOW
    w, b = torch.randn(384), torch.randn(384)
    y, mean, invstd = cpu.gn_forward(x, w, b, 1, 1e-5)
    close(y, portable.gn_forward(x, w, b, 1, 1e-5)[0], 1e-4)
    dy = torch.randn_like(x)
    for g, r in zip(cpu.gn_backward(dy, x, w, mean, invstd, 1), portable.gn_backward(dy, x, w, mean, invstd, 1)):
        close(g, r, 1e-4, rel=True)


def test_parameter_views_follow_in_place_updates_and_reassignment():
    """The cached numpy views of leaf parameters must see in-place updates and notice ``p.data = ...``."""
    x = torch.randn(16, 5)
    w = torch.nn.Parameter(torch.ones(5))
    b = torch.nn.Parameter(torch.zeros(5))
    for _ in range(2):
        y, _, _ = cpu.bn_train_forward(x, w, b, 1e-5)
        close(y, portable.bn_train_forward(x, w, b, 1e-5)[0], 1e-5)
        with torch.no_grad():
            w.mul_(2.0)
            b.add_(0.5)
    w.data = torch.full((5,), -3.0)
    y, _, _ = cpu.bn_train_forward(x, w, b, 1e-5)
    close(y, portable.bn_train_forward(x, w, b, 1e-5)[0], 1e-5)
    y, _, _ = cpu.gn_forward(x.reshape(16, 5, 1), w, b, 1, 1e-5)
    close(y, portable.gn_forward(x.reshape(16, 5, 1), w, b, 1, 1e-5)[0], 1e-5)


def _spread_positions(size, k=cpu_numba._SPREAD_SAMPLES):
    """The positions whose values the per-sample norms' shift averages (``_spread_mean``)."""
    k = min(size, k)
    return [j * (size // k) for j in range(k)]


@pytest.mark.parametrize("first", [0.0, 3.0, -50.0, 1e3])
def test_layer_norm_rows_outlier_first_value(first):
    """The statistics shift by the mean of 4 of each row's first 256 values; far from the mean (all 4 are
    outliers, in rows long enough that the outliers barely move the standard deviation), a second pass takes
    over."""
    gen = torch.Generator().manual_seed(9)
    k = 100_000
    x = (5e3 + torch.randn(3, k, 1, generator=gen, dtype=torch.float64))
    x[:, _spread_positions(256)] = 5e3 + first
    x = x.float()
    w, b = torch.randn(k, generator=gen), torch.randn(k, generator=gen)
    y, mean, invstd = cpu.gn_forward(x, w, b, 1, 1e-5)
    y64, mean64, invstd64 = portable.gn_forward(x.double(), w.double(), b.double(), 1, 1e-5)
    close(y, y64, 1e-3)
    close(invstd, invstd64, 1e-5, rel=True)
    close(mean, mean64, 1e-6, rel=True)


@pytest.mark.parametrize("groups, first", [(2, 0.0), (2, -50.0), (2, 1e3), (8, -1e3)])
def test_group_norm_outlier_first_value(groups, first):
    """Group-norm statistics (S > 1) sum float32 blocks shifted by the mean of 4 of each group's values; far from
    the mean (all 4 are outliers), a second pass around the first pass's mean keeps the variance exact (without
    it, +-1e3 fails)."""
    gen = torch.Generator().manual_seed(5)
    x = 5e3 + torch.randn(2, 8, 4000, generator=gen, dtype=torch.float64)
    x.view(2, groups, -1)[:, :, _spread_positions(256)] = 5e3 + first  # the shift's samples: in the first 256
    w, b = torch.randn(8, generator=gen), torch.randn(8, generator=gen)
    y, mean, invstd = cpu.gn_forward(x.float(), w, b, groups, 1e-5)
    y64, mean64, invstd64 = portable.gn_forward(x.float().double(), w.double(), b.double(), groups, 1e-5)
    close(y, y64, 1e-3)
    close(invstd, invstd64, 1e-5, rel=True)
    close(mean, mean64, 1e-6, rel=True)


def _outliers_at_shift_samples(x, c, value):
    """Sets every value that the NCHW kernels average into channel c's shift (positions 0 and S // 2 of the first
    eight samples) to ``value``; in channels_last, the first of them is in the (M, C) kernels' shift rows too."""
    flat = x.view(x.shape[0], x.shape[1], -1)
    flat[:8, c, 0] = value
    flat[:8, c, flat.shape[2] // 2] = value


@pytest.mark.parametrize("fmt", [None, torch.channels_last])
@pytest.mark.parametrize("first", [0.0, -50.0, 1e3])
def test_batch_norm_outlier_first_value(fmt, first, large_paths):
    """Batch-norm statistics shift by a few of each channel's values; far from the mean, a second pass (NCHW) or the
    float64 merge of 64-row blocks (rows) keeps the variance exact."""
    gen = torch.Generator().manual_seed(4)
    x = 5e3 + torch.randn(16, 3, 9, 9, generator=gen, dtype=torch.float64)
    for c in range(3):
        _outliers_at_shift_samples(x, c, 5e3 + first)
    x = x.float()
    x = x.contiguous(memory_format=fmt) if fmt else x
    w, b = torch.randn(3, generator=gen), torch.randn(3, generator=gen)
    y, mean, invstd = cpu.bn_train_forward(x, w, b, 1e-5)
    y64, mean64, invstd64 = portable.bn_train_forward(x.double(), w.double(), b.double(), 1e-5)
    close(y, y64, 1e-3)
    close(invstd, invstd64, 1e-5, rel=True)
    close(mean, mean64, 1e-6, rel=True)


@pytest.mark.parametrize("threads", [1, 2])
def test_batch_norm_ncs_outlier_first_value_in_parallel_runs(threads, large_paths):
    """NCHW statistics over several runs of (n, c) rows (one per task, partial sums merged), or channel by channel
    (a task per channel): the second pass around the mean, for a channel whose shift lies far from its mean (every
    value the shift averages is an outlier), must redo every run, serial twin and parallel."""
    gen = torch.Generator().manual_seed(12)
    x = 5e3 + torch.randn(8, 4, 100, 100, generator=gen, dtype=torch.float64)
    _outliers_at_shift_samples(x, 1, 5e3 + 1e3)
    assert x.numel() >= cpu.SERIAL_BELOW
    w, b = torch.randn(4, generator=gen), torch.randn(4, generator=gen)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        y, mean, invstd = cpu.bn_train_forward(x.float(), w, b, 1e-5)
        dy = torch.randn(x.shape, generator=gen)
        grads = cpu.bn_backward(dy, x.float(), w, b, mean, invstd, "identity", True)
    finally:
        torch.set_num_threads(previous)
    y64, mean64, invstd64 = portable.bn_train_forward(x.float().double(), w.double(), b.double(), 1e-5)
    close(y, y64, 1e-3)
    close(invstd, invstd64, 1e-5, rel=True)
    close(mean, mean64, 1e-7, rel=True)
    for g, r in zip(grads, portable.bn_backward(dy.double(), x.float().double(), w.double(), b.double(), mean64,
                                                invstd64, "identity", True)):
        close(g, r, 1e-4, rel=True)


def test_channel_by_channel_where_a_channel_fits_in_l2(monkeypatch):
    """The (N, C, S) training passes go channel by channel where the channel's rows (x; x and dy) take at most 80 %
    of L2, the activation is at least 16 MiB, rows at least 1 KB and channels at least four per thread, on hosts of
    2 MB of L2 per core and more; never where L2 is unknown."""
    def fits(shape, arrays, dtype=np.float32, threads=2):
        return cpu._by_channel(np.empty(shape, dtype), arrays, threads)
    monkeypatch.setattr(cpu, "L2_BYTES", 2 << 20)
    assert fits((32, 64, 3136), 1) and fits((32, 64, 3136), 2)
    assert fits((256, 64, 784), 2) and not fits((320, 64, 784), 2)  # 1.6 MB of x and dy per channel; 2.0 MB
    assert not fits((128, 256, 196), 1) and fits((128, 128, 196), 1, np.float64)  # 784-byte rows; 1568-byte
    assert not fits((16, 64, 3136), 1)  # 12.8 MB: the memory-order passes find it in L3
    assert fits((32, 64, 3136), 1, threads=16) and not fits((32, 64, 3136), 1, threads=17)
    assert fits((32, 64, 3136), 2, np.float64) and not fits((40, 64, 3136), 2, np.float64)
    monkeypatch.setattr(cpu, "L2_BYTES", 4 << 20)
    assert fits((320, 64, 784), 2) and fits((128, 128, 196), 2, np.float64)
    for small in (1 << 20, 512 << 10):  # hosts of less L2 walk memory order, where a channel would fit too
        monkeypatch.setattr(cpu, "L2_BYTES", small)
        assert not fits((32, 64, 3136), 1) and not fits((64, 128, 784), 2)
    monkeypatch.setattr(cpu, "L2_BYTES", 0)
    assert not fits((32, 64, 3136), 1)
    assert cpu._l2_bytes() >= 0


def test_large_paths_take_the_channel_kernels(monkeypatch):
    """What :func:`_force_large_paths` forces is what runs: the channel kernels for the training forward and the
    backward with dx; the memory-order ones for evaluation and a backward without dx."""
    _force_large_paths(monkeypatch)
    ran = []
    run = cpu._run
    monkeypatch.setattr(cpu, "_run", lambda kernel, *args: (ran.append(kernel), run(kernel, *args)))
    x, w, b = torch.randn(4, 3, 5, 5), torch.randn(3), torch.randn(3)
    y, mean, invstd = cpu.bn_train_forward(x, w, b, 1e-5)
    cpu.bn_backward(torch.randn_like(x), x, w, b, mean, invstd, "identity", True)
    cpu.bn_backward(torch.randn_like(x), x, w, b, mean, invstd, "identity", True, (False, True, True))
    cpu.bn_eval_forward(x, mean.float(), invstd.float(), w, b, 1e-5)
    assert ran == [cpu_numba.bn_fwd_ncs_channels, cpu_numba.bn_bwd_ncs_channels, cpu_numba.bn_bwd_ncs,
                   cpu_numba.bn_eval_ncs]


@pytest.mark.parametrize("offset", [0.0, 30.0, -1e3])
def test_batch_norm_rows_shift_far_from_the_mean(offset):
    """(M, C) statistics shift by the mean of the first 16 rows; a batch whose first rows differ from the rest
    (sorted data) puts that shift far from the mean, and the second pass around the first pass's mean keeps the
    variance exact."""
    gen = torch.Generator().manual_seed(8)
    x = 5e3 + torch.randn(20000, 6, generator=gen, dtype=torch.float64)
    x[:16, ::2] += offset  # every other channel; with 1e3, q - m**2 around the shift would lose ~10 bits
    w, b = torch.randn(6, generator=gen), torch.randn(6, generator=gen)
    y, mean, invstd = cpu.bn_train_forward(x.float(), w, b, 1e-5)
    y64, mean64, invstd64 = portable.bn_train_forward(x.float().double(), w.double(), b.double(), 1e-5)
    close(y, y64, 1e-4)
    close(invstd, invstd64, 1e-5, rel=True)
    close(mean, mean64, 1e-7, rel=True)


def test_batch_norm_spans_several_blocks():
    """S = 75 * 61 > 2048: a channel's rows are summed in several float32 blocks, merged in float64."""
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(3, 2, 75, 61, generator=gen, dtype=torch.float64) * 3 + 2
    w, b, dy = torch.randn(2, generator=gen), torch.randn(2, generator=gen), torch.randn(x.shape, generator=gen)
    y, mean, invstd = cpu.bn_train_forward(x.float(), w, b, 1e-5, "silu")
    y64, mean64, invstd64 = portable.bn_train_forward(x, w.double(), b.double(), 1e-5, "silu")
    close(y, y64, 1e-5)
    close(invstd, invstd64, 1e-6, rel=True)
    grads = cpu.bn_backward(dy.float(), x.float(), w, b, mean, invstd, "silu", True)
    grads64 = portable.bn_backward(dy, x, w.double(), b.double(), mean64, invstd64, "silu", True)
    for g, r in zip(grads, grads64):
        close(g, r, 1e-5, rel=True)


def test_output_strides_follow_ambiguous_size_one_layouts():
    """(N, 1, H, W) channels_last is also contiguous: outputs keep x's exact strides, as torch.empty_like does."""
    x = torch.randn(4, 1, 5, 5).contiguous(memory_format=torch.channels_last)
    y, mean, invstd = cpu.bn_train_forward(x, None, None, 1e-5)
    assert y.stride() == x.stride()
    dx, _, _ = cpu.bn_backward(torch.randn_like(x), x, None, None, mean, invstd, "identity", True)
    assert dx.stride() == x.stride()


def test_threading_layer_keeps_torch_thread_count():
    """A fresh process at torch.set_num_threads(1): starting numba's threading layer (torch's OpenMP pool where
    it can be shared) leaves torch at 1 thread, and the layer is the shared one when that is possible."""
    code = (
        "import torch\n"
        "torch.set_num_threads(1)\n"
        "import numba, normlab\n"
        "from normlab.kernels import cpu\n"
        "n = (32 << 20) // (4 * 8 * 64 * 64) + 1\n"  # the Python glue's parallel loops (NORMLAB_NATIVE=0)
        "normlab.BatchNorm2d(8)(torch.randn(n, 8, 64, 64)).sum().backward()\n"
        "try:\n"
        "    import numba.np.ufunc.omppool\n"  # numba's OpenMP layer needs the system's libgomp to load
        "    omp = True\n"
        "except ImportError:\n"
        "    omp = False\n"
        "print(torch.get_num_threads(), numba.threading_layer(), cpu.SHARED_OPENMP and omp)\n")
    env = {k: v for k, v in os.environ.items() if k not in ("NUMBA_THREADING_LAYER", "OMP_NUM_THREADS")}
    env["NORMLAB_NATIVE"] = "0"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    threads, layer, shared = out.stdout.split()
    assert threads == "1"
    assert layer == ("omp" if shared == "True" else "workqueue")


def test_forked_child_runs_the_kernels_single_threaded():
    """After the parent has run parallel kernels, a forked child (multiprocessing's default on Linux) still runs
    normlab's kernels, on one thread: numba's OpenMP layer terminates a forked child that launches a parallel loop
    ("fork() called from a process already using GNU OpenMP, this is unsafe"). The child uses no torch op of its
    own on large tensors: those hang in a child forked from a process that used GNU OpenMP, with or without normlab.
    """
    code = (
        "import os, numpy as np, torch, normlab\n"
        "import normlab.functional as F\n"
        "torch.set_num_threads(2)\n"
        "x = torch.from_numpy(np.random.default_rng(0).normal(3.0, 2.0, (64, 16, 32, 32)).astype(np.float32))\n"
        "F.batch_norm(x, None, None, training=True)\n"
        "pid = os.fork()\n"
        "if pid == 0:\n"
        "    y = F.batch_norm(x, None, None, training=True).numpy()\n"
        "    ok = abs(float(y.mean())) < 1e-4 and abs(float(y.std()) - 1) < 1e-3\n"
        "    os._exit(0 if ok else 3)\n"
        "print(os.waitpid(pid, 0)[1])\n")
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_THREADING_LAYER"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0 and out.stdout.split() == ["0"], (out.stdout, out.stderr)


@pytest.mark.parametrize("shape", [(4, 8, 96, 96), (2, 4, 1024, 640)], ids=["torch-allocated", "numpy-aligned"])
def test_large_outputs_start_on_a_cache_line(shape):
    """Outputs of 1 MiB and more are 64-byte aligned (numpy's allocator gives 16), whichever allocator serves them
    (evaluation: torch's or numpy's by size; training outputs and dx: the pool), and stay valid after the kernel call
    returns."""
    x = torch.randn(shape)
    nbytes = x.numel() * 4
    assert nbytes >= cpu._TORCH_ALLOC_FROM and nbytes < cpu.pool.POOL_MIN_BYTES
    assert nbytes >= cpu.pool.KEPT_MIN_BYTES
    assert (nbytes > cpu._TORCH_ALLOC_TO) == (shape[-1] == 640)
    c = shape[1]
    for _ in range(3):  # different heap states
        y_eval = cpu.bn_eval_forward(x, torch.zeros(c), torch.ones(c), None, None, 1e-5)
        y, mean, invstd = cpu.bn_train_forward(x, None, None, 1e-5)
        dx = cpu.bn_backward(torch.randn_like(x), x, None, None, mean, invstd, "identity", True)[0]
        assert y_eval.data_ptr() % 64 == 0 and y.data_ptr() % 64 == 0 and dx.data_ptr() % 64 == 0
    del mean, invstd
    close(y, portable.bn_train_forward(x, None, None, 1e-5)[0], 1e-5)
    close(y_eval, x / (1 + 1e-5) ** 0.5, 1e-5)
