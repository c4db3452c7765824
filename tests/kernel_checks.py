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
