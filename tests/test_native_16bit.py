"""The native glue on 16-bit activations (bfloat16, float16): with float32 parameters and statistics (mixed
precision) or of a model converted with ``.bfloat16()`` / ``.half()``. A file of its own so that the test processes
compile the 16-bit loops' entry points beside test_native.py's float32 and float64 ones, not after them.

Tolerance: one rounding of a 16-bit output (relative to the largest value) where the two glues split a batch
differently; float64 accuracy is test_nn_vs_torch's.
"""
from __future__ import annotations

import copy
import subprocess
import sys

import pytest
import torch

from normlab import kernels as K
from normlab.kernels import cpu, native
from test_native import NATIVE, NATIVE_GROUP, close, family_layers, threads, torch_layer


@pytest.fixture(autouse=True)
def _native(backend_ctx):
    with backend_ctx("native"):
        yield


# (shape, memory format): the rows layout, (N, C, S), (N, C, S) of short rows (flat sample rows), channels_last, and
# three past native.BN_SPLIT_FROM (split over threads at two): (2048, 64) in lanes, (15, 8, 24, 25) by samples,
# (32, 2080) by blocks of channels; 4096 channels: float16 vectors of that length are converted by ATen's kernel
# (native.cpp, kHalfByAtenFrom), shorter ones by the glue's loop
HALF_LAYOUTS = [((32, 6), torch.contiguous_format), ((8, 6, 5, 7), torch.contiguous_format),
                ((64, 20, 3), torch.contiguous_format),
                ((8, 6, 5, 7), torch.channels_last), ((2048, 64), torch.contiguous_format),
                ((15, 8, 24, 25), torch.contiguous_format), ((32, 2080), torch.contiguous_format),
                ((8, 4096), torch.contiguous_format)]  # a 16-bit model's vectors long enough for ATen's conversion
HALF_ULP = {torch.bfloat16: 2.0 ** -7, torch.float16: 2.0 ** -10}


def python_glue_twin(layer, x, dy):
    """The training step, the running statistics and an evaluation of a copy of ``layer`` through the Python glue."""
    twin = copy.deepcopy(layer)
    with K.use_backend("cpu"):
        xt = x.detach().clone().requires_grad_()
        y = twin(xt)
        assert NATIVE not in y.grad_fn.name() and NATIVE_GROUP not in y.grad_fn.name()
        got = (y, *torch.autograd.grad(y, [xt, *twin.parameters()], dy))
        with torch.no_grad():
            evaluated = twin.eval()(x)
    return got, twin, evaluated


@pytest.mark.parametrize("threads_", [1, 2])
@pytest.mark.parametrize("params", ["float32", "same"], ids=["f32-params", "16-bit-params"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "f16"])
@pytest.mark.parametrize("shape,fmt", HALF_LAYOUTS, ids=[f"{s}-{str(f).split('.')[-1]}" for s, f in HALF_LAYOUTS])
def test_16_bit_activations_take_it_and_match_the_python_glue(shape, fmt, dtype, params, threads_):
    """bfloat16/float16 inputs with float32 parameters and statistics (mixed precision), or of a model converted
    with ``.bfloat16()`` / ``.half()`` (its parameters and running statistics read and written in float32 copies):
    the same loops as the Python glue's, so the same results up to one rounding of the 16-bit outputs where the
    two glues split a batch differently (float64 accuracy: test_nn_vs_torch). Gradients in the parameters'
    dtype."""
    if dtype not in cpu.SUPPORTED_DTYPES:
        pytest.skip("float16 loops need F16C")
    torch.manual_seed(sum(shape) + len(params))
    _, ours = torch_layer(shape, torch.float32)
    if params == "same":
        ours.to(dtype)
    x = (torch.randn(shape, dtype=torch.float64) * 2 + 1).to(dtype).contiguous(memory_format=fmt)
    dy = torch.randn(shape, dtype=torch.float64).to(dtype).contiguous(memory_format=fmt)
    with threads(threads_):
        expected, twin, evaluated = python_glue_twin(ours, x, dy)
        xo = x.clone().requires_grad_()
        y = ours(xo)
        assert NATIVE in y.grad_fn.name()
        got = (y, *torch.autograd.grad(y, [xo, *ours.parameters()], dy))
        with torch.no_grad():
            got_eval = ours.eval()(x)
    assert y.dtype == dtype and y.stride() == x.stride()
    ulp = HALF_ULP[dtype]
    for what, a, b in zip(("y", "dx", "dweight", "dbias"), got, expected):
        assert a.dtype == b.dtype, what
        close(a, b, ulp * max(1.0, b.abs().max().item()), what)
    for key in ("running_mean", "running_var"):
        a, b = getattr(ours, key), getattr(twin, key)
        assert a.dtype == b.dtype == (dtype if params == "same" else torch.float32)
        close(a, b, ulp * max(1.0, b.abs().max().item()), key)
    assert int(ours.num_batches_tracked) == int(twin.num_batches_tracked) == 1
    close(got_eval, evaluated, ulp * max(1.0, evaluated.abs().max().item()), "evaluation")


@pytest.mark.parametrize("params", ["float32", "same"], ids=["f32-params", "16-bit-params"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "f16"])
@pytest.mark.parametrize("name,args,kwargs,shape", [("GroupNorm", (3, 6), {}, (4, 6, 5, 7)),
                                                    ("LayerNorm", (300,), {}, (128, 300)),
                                                    ("InstanceNorm2d", (6,), {"affine": True}, (4, 6, 5, 7)),
                                                    ("LayerNorm", (4096,), {}, (4, 4096))],
                         ids=["group", "layer-split", "instance", "layer-4096"])
def test_group_norm_family_16_bit_activations_match_the_python_glue(name, args, kwargs, shape, dtype, params):
    if dtype not in cpu.SUPPORTED_DTYPES:
        pytest.skip("float16 loops need F16C")
    torch.manual_seed(sum(shape))
    _, ours = family_layers(name, args, kwargs, torch.float32)
    if params == "same":
        ours.to(dtype)
    x = (torch.randn(shape, dtype=torch.float64) * 2 + 1).to(dtype)
    dy = torch.randn(shape, dtype=torch.float64).to(dtype)
    with threads(2):
        expected, _, evaluated = python_glue_twin(ours, x, dy)
        xo = x.clone().requires_grad_()
        y = ours(xo)
        assert NATIVE_GROUP in y.grad_fn.name()
        got = (y, *torch.autograd.grad(y, [xo, *ours.parameters()], dy))
    ulp = HALF_ULP[dtype]
    for what, a, b in zip(("y", "dx", "dweight", "dbias"), got, expected):
        assert a.dtype == b.dtype, what
        close(a, b, ulp * max(1.0, b.abs().max().item()), what)


def test_set_loops_declines_a_dtype_the_cpu_loops_do_not_take(monkeypatch):
    """float16 on a host without F16C: the module is told there are no loops (no addresses), not handed none."""
    calls = []

    class Module:
        def set_loops(self, name, addresses):
            calls.append((name, addresses))

    monkeypatch.setattr(cpu, "SUPPORTED_DTYPES", cpu.SUPPORTED_DTYPES - {torch.float16})
    native.set_loops(Module(), torch.float16)
    assert calls == [("float16", [])]


def test_a_declined_dtype_goes_to_the_python_glue_for_good():
    """After set_loops(dtype, []) the glue declines that dtype's calls (they take the Python glue) instead of
    asking for its loops again; in a fresh process, as a declined dtype stays declined."""
    code = ("import torch, normlab; from normlab import kernels as K; assert K._native is not None; "
            "K._native.set_loops('float16', []); "
            "x = torch.randn(8, 4, dtype=torch.float16, requires_grad=True); "
            # the outputs kept: torch 2.5 refuses a Python node's name() once its output is gone
            "ys = normlab.BatchNorm1d(4).half()(x), normlab.LayerNorm(4).half()(x), normlab.BatchNorm1d(4)(x.float()); "
            "print(*(y.grad_fn.name() for y in ys))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert NATIVE not in out[0] and NATIVE_GROUP not in out[1] and NATIVE in out[2], out
