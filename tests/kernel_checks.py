"""What the kernel backends' tests share (``test_kernels_cpu.py``, ``triton_backend.py``): dtypes, per-dtype
tolerances, activations, a seeded input maker and the closeness check.

Tolerances (absolute, on outputs of unit scale; gradients are compared relative to their largest entry):
float64 1e-10, float32 1e-4, bfloat16 / float16: one rounding of the output (2**-7 / 2**-10 relative) plus
float32 noise, i.e. 2e-2 / 4e-3.
"""
from __future__ import annotations

import torch

DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
TOL = {torch.float64: 1e-10, torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 4e-3}
LOW = (torch.bfloat16, torch.float16)  # compared relative to the largest |value|: one rounding of the output
ACTS = ["identity", "relu", "silu", "sigmoid"]


def make(shape, fmt, dtype, scale=2.0, loc=0.5, gen=None):
    """``scale * N(0, 1) + loc`` drawn in float64, then cast to ``dtype`` and laid out as ``fmt`` (or contiguous)."""
    x = (torch.randn(shape, generator=gen, dtype=torch.float64) * scale + loc).to(dtype)
    return x if fmt is None else x.contiguous(memory_format=fmt)


def close(a, b, tol, rel=False):
    """max |a - b| <= tol (times max(1, max |b|) if ``rel``), in float64."""
    a, b = a.double().cpu(), b.double().cpu()
    scale = max(1.0, b.abs().max().item()) if rel else 1.0
    err = (a - b).abs().max().item()
    assert err <= tol * scale, f"max abs error {err:.3g} > {tol * scale:.3g}"


def check_batch_norm_contract(backend, shape, fmt, dtype, device="cpu"):
    """``backend``'s batch norm (training forward, evaluation, backward in training and eval, a subset of the
    gradients) on ``device`` against the portable kernels on CPU, in ``dtype`` and float64, for every activation:
    what :mod:`normlab.kernels.portable` defines, checked for each fast backend."""
    import zlib

    from normlab.kernels import portable

    def on(*tensors):
        return [t.to(device) for t in tensors]
    gen = torch.Generator().manual_seed(zlib.crc32(repr((shape, fmt, dtype)).encode()))
    x = make(shape, fmt, dtype, gen=gen)
    c = shape[1]
    w = torch.randn(c, generator=gen) + 1
    b = torch.randn(c, generator=gen)
    xd, wd, bd = on(x, w, b)
    assert backend.supports(xd)
    tol, low = TOL[dtype], dtype in LOW
    x64, w64, b64 = x.double(), w.double(), b.double()
    for act in ACTS:
        y, mean, invstd = backend.bn_train_forward(xd, wd, bd, 1e-5, act)
        y_p, mean_p, invstd_p = portable.bn_train_forward(x, w, b, 1e-5, act)
        y64, mean64, invstd64 = portable.bn_train_forward(x64, w64, b64, 1e-5, act)
        assert y.dtype == dtype and y.shape == x.shape and y.stride() == x.stride()
        assert mean.dtype == mean_p.dtype and invstd.dtype == invstd_p.dtype
        close(y, y_p, tol, rel=low)
        close(y, y64, tol, rel=low)
        close(mean, mean64, 1e-6 if dtype != torch.float64 else 1e-12, rel=True)
        close(invstd, invstd64, 1e-5 if dtype != torch.float64 else 1e-12, rel=True)

        # eval forward with running statistics
        rv = torch.rand(c, generator=gen) + 0.5
        rm = torch.randn(c, generator=gen)
        ye = backend.bn_eval_forward(xd, *on(rm, rv, w, b), 1e-5, act)
        assert ye.stride() == x.stride() and ye.dtype == dtype
        close(ye, portable.bn_eval_forward(x, rm, rv, w, b, 1e-5, act), tol * 4, rel=low)
        close(ye, portable.bn_eval_forward(x64, rm.double(), rv.double(), w64, b64, 1e-5, act), tol * 4, rel=low)

        # backward, training and eval, with every subset of needed gradients that matters
        dy = make(shape, fmt, dtype, scale=1.0, loc=0.0, gen=gen)
        for training in (True, False):
            got = backend.bn_backward(*on(dy, x, w, b), mean, invstd, act, training)
            ref = portable.bn_backward(dy, x, w, b, mean.cpu(), invstd.cpu(), act, training)
            ref64 = portable.bn_backward(dy.double(), x64, w64, b64, mean64, invstd64, act, training)
            assert got[0].stride() == x.stride() and got[0].dtype == dtype
            for g, r, r64 in zip(got, ref, ref64):
                close(g, r, tol * 4, rel=True)
                close(g, r64, tol * 4, rel=True)
        dx, dw, db = backend.bn_backward(*on(dy, x, w, b), mean, invstd, act, True, (False, True, False))
        assert dx is None and db is None and dw is not None
