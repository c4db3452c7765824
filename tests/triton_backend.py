"""The Triton backend (batch norm on GPU): against the portable backend (the contract) on CPU, against float64
and the NumPy reference, and through the layers as ``use_backend("triton")``.

Run by ``test_kernels_triton.py`` in a child process, two ways: with ``TRITON_INTERPRET=1`` on CPU tensors (the
interpreter must be on before triton is first imported, and stays on for the whole process; it runs the same
kernel source on NumPy, program by program, so it checks the indexing, masks, tiling, layouts, dtypes and
numerics of the kernels, not their speed), and, where CUDA is available, compiled, on CUDA tensors. Tolerances:
``kernel_checks.py`` (bfloat16 to one rounding of the output: conversions may round differently on a GPU).
"""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from kernel_checks import DTYPES, check_batch_norm_contract, close, make

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
if not INTERPRETED and os.environ.get("NORMLAB_TRITON_CUDA") != "1":
    pytest.skip("run by test_kernels_triton.py (TRITON_INTERPRET=1, or NORMLAB_TRITON_CUDA=1 on a GPU)",
                allow_module_level=True)
pytest.importorskip("triton")
DEVICE = "cpu" if INTERPRETED else "cuda"

import normlab  # noqa: E402
from normlab import kernels  # noqa: E402
from normlab.kernels import portable  # noqa: E402
from normlab.reference import batchnorm as ref  # noqa: E402

# (shape, memory format): NCHW (one channel per program, runs of values), channels_last and (M, C) (blocks of up
# to 64 adjacent channels); (70, 67) has two channel blocks, (3, 2, 40, 40) several runs of 1024 values
LAYOUTS = [((5, 3, 4, 6), None), ((5, 3, 4, 6), torch.channels_last), ((9, 7), None), ((70, 67), None),
           ((4, 5, 11), None), ((2, 3, 2, 3, 4), torch.channels_last_3d), ((3, 2, 40, 40), None),
           ((1, 4, 3, 1), None)]


@pytest.fixture(scope="module")
def T():
    """The Triton backend, its kernels defined for the interpreter."""
    from normlab.kernels import gpu_triton
    assert gpu_triton.INTERPRETED == INTERPRETED
    return gpu_triton


def on(*tensors):
    """The tensors on the device under test (CPU in the interpreter)."""
    out = tuple(None if t is None else t.to(DEVICE) for t in tensors)
    return out if len(out) > 1 else out[0]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape,fmt", LAYOUTS, ids=lambda v: str(v))
def test_batch_norm_matches_portable_and_float64(T, shape, fmt, dtype):
    check_batch_norm_contract(T, shape, fmt, dtype, DEVICE)


def test_against_the_numpy_reference(T):
    """Forward and hand-derived backward of the float64 reference, on a float64 NCHW input."""
    gen = torch.Generator().manual_seed(11)
    x = make((6, 3, 5, 4), None, torch.float64, gen=gen)
    w, b = torch.randn(3, generator=gen, dtype=torch.float64), torch.randn(3, generator=gen, dtype=torch.float64)
    dy = torch.randn(x.shape, generator=gen, dtype=torch.float64)
    y_ref, cache, _ = ref.batch_norm_forward(x.numpy(), w.numpy(), b.numpy(), 1e-5)
    dx_ref, dw_ref, db_ref = ref.batch_norm_backward(dy.numpy(), cache)
    y, mean, invstd = T.bn_train_forward(*on(x, w, b), 1e-5)
    dx, dw, db = T.bn_backward(*on(dy, x, w, b), mean, invstd, "identity", True)
    for got, want in ((y, y_ref), (dx, dx_ref), (dw, dw_ref), (db, db_ref)):
        np.testing.assert_allclose(got.cpu().numpy(), want, rtol=1e-10, atol=1e-10)


def test_edge_cases(T):
    # a constant channel gives exactly the bias, and its statistics exactly (value, 0)
    x = torch.full((4, 2, 3, 3), 7.25)
    x[:, 1] = torch.randn(4, 3, 3)
    y, mean, invstd = T.bn_train_forward(*on(x, torch.full((2,), 3.0), torch.tensor([0.5, -1.0])), 1e-5)
    assert torch.equal(y[:, 0].cpu(), torch.full((4, 3, 3), 0.5)) and mean[0].item() == 7.25
    m, v = T.bn_stats(on(x))
    assert m[0].item() == 7.25 and v[0].item() == 0.0
    # a large mean with a small spread, float32: as float64 on the same values
    gen = torch.Generator().manual_seed(2)
    x = (1e4 + torch.randn(8, 3, 6, 6, generator=gen, dtype=torch.float64)).float()
    y, mean, invstd = T.bn_train_forward(on(x), None, None, 1e-5)
    y64, mean64, invstd64 = portable.bn_train_forward(x.double(), None, None, 1e-5)
    close(y, y64, 1e-3)
    close(mean, mean64, 1e-9)
    dy = torch.randn(x.shape, generator=gen)
    got = T.bn_backward(*on(dy, x), None, None, mean, invstd, "identity", True)
    want = portable.bn_backward(dy.double(), x.double(), None, None, mean64, invstd64, "identity", True)
    for g, w in zip(got, want):
        close(g, w, 1e-3, rel=True)
    # dy in another layout than x is taken as x's
    x = make((3, 4, 5, 5), torch.channels_last, torch.float32, gen=gen)
    y, mean, invstd = T.bn_train_forward(on(x), None, None, 1e-5)
    dy = torch.randn(x.shape, generator=gen)
    close(T.bn_backward(*on(dy, x), None, None, mean, invstd, "identity", True)[0],
          portable.bn_backward(dy, x, None, None, mean.cpu(), invstd.cpu(), "identity", True)[0], 1e-5)
    with pytest.raises(ValueError, match="unknown activation 'gelu'"):
        T.bn_train_forward(on(x), None, None, 1e-5, "gelu")


def test_supports(T):
    x = on(torch.randn(4, 3, 8, 8))
    assert T.supports(x) and T.supports(x.to(memory_format=torch.channels_last))
    assert not T.supports(x[:, :, ::2])  # trailing dimensions with gaps
    assert not T.supports(x.int()) and not T.supports(torch.empty(0, 3))


@pytest.mark.parametrize("fmt", [None, torch.channels_last])
def test_layers_through_the_triton_backend(T, fmt):
    """normlab.BatchNorm2d / BatchNormAct2d with use_backend("triton") against torch.nn, training and eval."""
    gen = torch.Generator().manual_seed(5)
    x = make((6, 4, 5, 5), fmt, torch.float32, gen=gen)
    dy = torch.randn(x.shape, generator=gen)
    x, dy = on(x, dy)
    ours, theirs = normlab.BatchNorm2d(4).to(DEVICE), torch.nn.BatchNorm2d(4).to(DEVICE)
    with torch.no_grad():
        for m in (ours, theirs):
            m.weight.copy_(torch.linspace(0.5, 2, 4))
            m.bias.copy_(torch.linspace(-1, 1, 4))
    calls = []
    real = T.bn_train_forward_saved

    def spy(*args, **kwargs):
        calls.append(args[0].shape)
        return real(*args, **kwargs)
    T.bn_train_forward_saved = spy
    try:
        with kernels.use_backend("triton"):
            xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
            ya, yb = ours(xa), theirs(xb)
            ya.backward(dy)
            yb.backward(dy)
            ours.eval()
            theirs.eval()
            with torch.no_grad():
                ea, eb = ours(x), theirs(x)
    finally:
        T.bn_train_forward_saved = real
    assert calls, "the training forward did not go through the Triton backend"
    close(ya, yb, 1e-5)
    close(xa.grad, xb.grad, 1e-5)
    close(ours.weight.grad, theirs.weight.grad, 1e-4)
    close(ours.bias.grad, theirs.bias.grad, 1e-4)
    close(ours.running_mean, theirs.running_mean, 1e-6)
    close(ours.running_var, theirs.running_var, 1e-6)
    close(ea, eb, 1e-5)

    fused = normlab.BatchNormAct2d(4, act="silu").to(DEVICE)
    xs = x.clone().requires_grad_()
    with kernels.use_backend("triton"):
        out = fused(xs)
        out.backward(dy)
    xr = x.clone().requires_grad_()
    with kernels.use_backend("portable"):
        want = normlab.BatchNormAct2d(4, act="silu").to(DEVICE)(xr)
        want.backward(dy)
    close(out, want, 1e-5)
    close(xs.grad, xr.grad, 1e-5)


def test_automatic_choice(T):
    """The automatic choice takes the Triton kernels for CUDA tensors they support, never for CPU tensors (in the
    interpreter, only use_backend("triton") sends CPU tensors to them)."""
    x = on(torch.randn(2, 3, 4))
    assert T.supports(x)
    assert (kernels.backend_for(x) is T) == x.is_cuda
    with kernels.use_backend("triton"):
        assert kernels.backend_for(x) is T
        assert kernels.backend_for(x[:, :, ::2]) is not T  # unsupported layouts: the other backends
    with kernels.use_backend("portable"):
        assert kernels.backend_for(x) is kernels.portable


def test_bench_gpu_section_runs_the_triton_kernels(T, monkeypatch):
    """``normlab bench``'s gpu section (on a CPU device in the interpreter): normlab's rows come from the Triton
    kernels, every mode has both contenders, a same-size copy and a summary."""
    from normlab import bench
    calls = []
    for name in ("bn_train_forward_saved", "bn_eval_forward"):
        real = getattr(T, name)
        monkeypatch.setattr(T, name, lambda *a, _real=real, _name=name, **k: calls.append(_name) or _real(*a, **k))
    timer = None if DEVICE == "cuda" else (lambda fn, budget: bench.timeit(fn, budget))  # CUDA: graph replay
    rows = bench.bench_gpu(["4x3x5x5", "6x5"], 0.0005, log=lambda msg: None, device=DEVICE, timer=timer)
    assert [(r.section, r.case, r.mode) for r in rows] == [
        (s, c, m) for s in ("gpu", "gpu_graph") for c in ("4x3x5x5", "6x5") for m in bench.MODES]
    assert all(set(r.ms) == {"normlab", "torch"} and r.copy_gbps > 0 and r.gbps > 0 for r in rows)
    assert {"bn_train_forward_saved", "bn_eval_forward"} <= set(calls)
    summary = bench.summarize(rows, 1.0)
    for section in ("gpu", "gpu_graph"):
        assert summary[f"{section}_train_fwd_bwd_geomean_vs_torch"] > 0
        assert summary[f"{section}_eval_geomean_vs_torch"] > 0
        assert f"== {section} ==" in bench.render(rows, 1.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
def test_running_statistics_update(T, dtype):
    """The per-channel kernel's update of the running statistics (in their own dtype) against the portable
    update; a channel with a non-finite value keeps its running values."""
    gen = torch.Generator().manual_seed(9)
    x = make((6, 3, 4, 4), None, dtype, gen=gen)
    x[2, 1, 1, 1] = float("inf")
    rm, rv = torch.randn(3, generator=gen).to(dtype), (torch.rand(3, generator=gen) + 0.5).to(dtype)
    rm_d, rv_d = on(rm.clone(), rv.clone())
    y, mean, invstd, nonfinite = T.bn_train_forward_update(on(x), None, None, 1e-5, "identity", rm_d, rv_d, 0.3)
    want_m, want_v = rm.clone(), rv.clone()
    portable.bn_train_forward_update(x, None, None, 1e-5, "identity", want_m, want_v, 0.3)
    tol = 1e-12 if dtype == torch.float64 else (1e-6 if dtype == torch.float32 else 1e-2)
    close(rm_d, want_m, tol, rel=True)
    close(rv_d, want_v, tol, rel=True)
    assert rm_d[1].item() == rm[1].item() and rv_d[1].item() == rv[1].item()


def _convnet():
    return torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), normlab.BatchNormAct2d(8, act="relu"),
                               torch.nn.Conv2d(8, 8, 3, padding=1), normlab.BatchNorm2d(8), torch.nn.SiLU(),
                               torch.nn.Flatten(), torch.nn.Linear(8 * 8 * 8, 4), normlab.BatchNorm1d(4))


@pytest.mark.skipif(INTERPRETED, reason="torch.compile compiles for a GPU; the interpreter runs on CPU")
def test_torch_compile_fullgraph_on_cuda(T):
    """torch.compile(fullgraph=True) of a model with normlab layers, its batch norms on the Triton kernels (the
    custom operators), against the same model eager: outputs, gradients, running statistics, train and eval."""
    import copy
    torch.manual_seed(0)
    eager = _convnet().to(DEVICE)
    compiled_model = copy.deepcopy(eager)
    compiled = torch.compile(compiled_model, fullgraph=True)
    x = on(torch.randn(6, 3, 8, 8))
    with kernels.use_backend("triton"):
        ye, yc = eager(x), compiled(x)
        ye.square().sum().backward()
        yc.square().sum().backward()
        close(yc, ye, 1e-4)
        for p, q in zip(eager.parameters(), compiled_model.parameters()):
            close(q.grad, p.grad, 1e-3, rel=True)
        for a, b in zip(eager.buffers(), compiled_model.buffers()):
            close(b, a, 1e-5)
        eager.eval(), compiled_model.eval()
        close(compiled(x), eager(x), 1e-4)


@pytest.mark.parametrize("fmt", [None, torch.channels_last])
def test_int64_offsets(T, fmt, monkeypatch):
    """The kernels' int64 offsets (tensors of 2**31 elements and more) on a small input: as the int32 ones."""
    gen = torch.Generator().manual_seed(4)
    x = make((3, 5, 4, 6), fmt, torch.float32, gen=gen)
    x, dy, rm, rv = on(x, torch.randn(x.shape, generator=gen), torch.zeros(5), torch.ones(5))

    def run():
        y, mean, invstd = T.bn_train_forward(x, None, None, 1e-5)
        return y, T.bn_eval_forward(x, rm, rv, None, None, 1e-5), *T.bn_backward(dy, x, None, None, mean, invstd,
                                                                                   "relu", True)
    want = run()
    assert not T._launch(x).blocks["BIG"]
    monkeypatch.setattr(T, "INT32_OFFSETS_BELOW", 0)
    monkeypatch.setattr(T, "_LAUNCHES", {})
    assert T._launch(x).blocks["BIG"]
    for got, w in zip(run(), want):
        assert torch.equal(got, w)


def test_strided_per_channel_tensors(T):
    """Weight, bias and running statistics that are strided views (every other element of a longer tensor): read
    and, for the running statistics, updated in place as adjacent ones."""
    gen = torch.Generator().manual_seed(6)
    x = make((4, 3, 5, 5), None, torch.float32, gen=gen)
    dy = torch.randn(x.shape, generator=gen)
    w, b = torch.randn(6, generator=gen)[::2], torch.randn(6, generator=gen)[::2]
    rm, rv = torch.randn(6, generator=gen), torch.rand(6, generator=gen) + 0.5
    rm_d, rv_d = on(rm.clone(), rv.clone())
    assert not w.is_contiguous()
    y, mean, invstd, _ = T.bn_train_forward_update(on(x), *on(w, b), 1e-5, "silu", rm_d[::2], rv_d[::2], 0.1)
    want_m, want_v = rm.clone(), rv.clone()
    y_p, mean_p, invstd_p, _ = portable.bn_train_forward_update(x, w, b, 1e-5, "silu", want_m[::2], want_v[::2], 0.1)
    close(y, y_p, 1e-5)
    close(rm_d, want_m, 1e-6)
    close(rv_d, want_v, 1e-6)
    close(T.bn_eval_forward(on(x), rm_d[::2], rv_d[::2], *on(w, b), 1e-5, "silu"),
          portable.bn_eval_forward(x, want_m[::2], want_v[::2], w, b, 1e-5, "silu"), 1e-5)
    for got, want in zip(T.bn_backward(*on(dy, x, w, b), mean, invstd, "silu", True),
                         portable.bn_backward(dy, x, w, b, mean_p, invstd_p, "silu", True)):
        close(got, want, 1e-4, rel=True)


@pytest.mark.skipif(INTERPRETED, reason="one device in the interpreter")
def test_per_channel_tensors_on_another_device(T):
    x = on(torch.randn(4, 3, 5))
    with pytest.raises(RuntimeError, match="same device"):
        T.bn_train_forward(x, torch.ones(3), None, 1e-5)
