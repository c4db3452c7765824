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
from kernel_checks import DTYPES, LOW, TOL, check_batch_norm_contract, close, make

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
    kernels, batch norm's and group norm's, every mode has both contenders, a same-size copy and a summary."""
    from normlab import bench
    calls = []
    for name in ("bn_train_forward_saved", "bn_eval_forward", "gn_forward"):
        real = getattr(T, name)
        monkeypatch.setattr(T, name, lambda *a, _real=real, _name=name, **k: calls.append(_name) or _real(*a, **k))
    timer = None if DEVICE == "cuda" else (lambda fn, budget: bench.timeit(fn, budget))  # CUDA: graph replay
    rows = bench.bench_gpu(["4x3x5x5", "6x5"], 0.0005, log=lambda msg: None, device=DEVICE, timer=timer,
                           norms=True)
    norm_cases = ["gn 4x8x6x6 G=4", "ln 16x32"]
    assert [(r.section, r.case, r.mode) for r in rows] == [
        (s, c, m) for s in ("gpu", "gpu_graph") for c in ("4x3x5x5", "6x5") for m in bench.MODES] + [
        (s, c, m) for s in ("gpu_norms", "gpu_norms_graph") for c in norm_cases for m in ("train_fwd", "train_fwd_bwd")]
    assert all(set(r.ms) == {"normlab", "torch"} and r.copy_gbps > 0 and r.gbps > 0 for r in rows)
    assert {"bn_train_forward_saved", "bn_eval_forward", "gn_forward"} <= set(calls)
    summary = bench.summarize(rows, 1.0)
    for section in ("gpu", "gpu_graph"):
        assert summary[f"{section}_train_fwd_bwd_geomean_vs_torch"] > 0
        assert summary[f"{section}_eval_geomean_vs_torch"] > 0
    for section in ("gpu_norms", "gpu_norms_graph"):
        assert summary[f"{section}_train_fwd_bwd_geomean_vs_torch"] > 0 and summary[f"{section}_worst_vs_torch"] > 0
    for section in ("gpu", "gpu_graph", "gpu_norms", "gpu_norms_graph"):
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
                               normlab.GroupNorm(2, 8), normlab.InstanceNorm2d(8, affine=True),
                               torch.nn.Flatten(), torch.nn.Linear(8 * 8 * 8, 4), normlab.BatchNorm1d(4),
                               normlab.LayerNorm(4))


@pytest.mark.skipif(INTERPRETED, reason="torch.compile compiles for a GPU; the interpreter runs on CPU")
def test_torch_compile_fullgraph_on_cuda(T):
    """torch.compile(fullgraph=True) of a model with normlab layers, its batch, group, instance and layer norms on
    the Triton kernels (the custom operators), against the same model eager: outputs, gradients, running
    statistics, train and eval."""
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


# ------------------------------------------------------------------------------------------------------
# group norm (layer and instance norm through it): gpu_triton_gn
# ------------------------------------------------------------------------------------------------------
# (shape (N, C, S), groups): layer norm's form (S == 1, one group), instance norm's (G == C), group norm, group norm
# of an (N, C) input (S == 1 with groups: the column kernel's group lookup), one sample (dweight and dbias written
# by the row kernel itself), rows of one value (variance 0), S = CHANNEL_TILES_FROM (the channel-tiled forward and
# dx)
GN_CASES = [((6, 40, 1), 1), ((4, 6, 5), 6), ((3, 6, 10), 3), ((5, 4, 1), 2), ((1, 6, 4), 2), ((4, 3, 1), 3),
            ((2, 4, 64), 2)]
GN_NEEDS = [(True, True, True), (True, False, False), (False, True, False), (False, False, True),
            (False, True, True)]


@pytest.fixture(scope="module")
def GN(T):
    """The group-norm kernels (imported by the Triton backend, after its helpers)."""
    from normlab.kernels import gpu_triton_gn
    return gpu_triton_gn


@pytest.fixture
def small_blocks(GN, monkeypatch):
    """Blocks small enough that tiny inputs run every path: rows longer than a tile (chunk loops), short rows
    packed four to a program, channel and position loops, several runs of rows summed in several steps; the
    channel-tiled forward and dx from S = 8."""
    for name, value in (("BLOCK", 16), ("TILE", 64), ("MIN_PROGRAMS", 1), ("COL_BLOCKS", (2, 16)),
                        ("COL_PROGRAMS", 16), ("COL_ONE_RUN_VALUES", 0), ("SUM_BLOCKS", (16, 2)),
                        ("CHANNEL_TILES_FROM", 8), ("_GEOMETRIES", {})):
        monkeypatch.setattr(GN, name, value)


def _gn_inputs(shape, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = make(shape, None, dtype, gen=gen)
    c = shape[1]
    w, b = torch.randn(c, generator=gen) + 1, torch.randn(c, generator=gen)
    return x, w, b, make(shape, None, dtype, scale=1.0, loc=0.0, gen=gen)


def check_group_norm(GN, shape, groups, dtype, affine=((True, True), (True, False), (False, True), (False, False)),
                     needs=GN_NEEDS, seed=0):
    """gn_forward / gn_backward on DEVICE against the portable kernels on CPU, in ``dtype`` and in float64; every
    ``needs`` with weight and bias, the full backward with the other ``affine`` choices."""
    x, w, b, dy = _gn_inputs(shape, dtype, seed)
    tol, low = TOL[dtype], dtype in LOW
    x64, dy64 = x.double(), dy.double()
    for has_w, has_b in affine:
        wa, ba = (w if has_w else None), (b if has_b else None)
        y, mean, invstd = GN.gn_forward(*on(x, wa, ba), groups, 1e-5)
        y_p, mean_p, invstd_p = portable.gn_forward(x, wa, ba, groups, 1e-5)
        w64, b64 = (None if wa is None else wa.double()), (None if ba is None else ba.double())
        y64, mean64, invstd64 = portable.gn_forward(x64, w64, b64, groups, 1e-5)
        assert y.dtype == dtype and y.shape == x.shape and mean.shape == invstd.shape == (shape[0], groups)
        assert mean.dtype == invstd.dtype == mean_p.dtype
        close(y, y_p, tol, rel=low)
        close(y, y64, tol, rel=low)
        close(mean, mean64, 1e-6 if dtype != torch.float64 else 1e-12, rel=True)
        close(invstd, invstd64, 1e-5 if dtype != torch.float64 else 1e-12, rel=True)
        for need in (needs if (has_w and has_b) else needs[:1]):
            got = GN.gn_backward(*on(dy, x, wa), mean, invstd, groups, need)
            ref = portable.gn_backward(dy, x, wa, mean.cpu(), invstd.cpu(), groups, need)
            ref64 = portable.gn_backward(dy64, x64, w64, mean64, invstd64, groups, need)
            for k, (g, r, r64) in enumerate(zip(got, ref, ref64)):
                if not need[k]:
                    assert g is None
                    continue
                assert g.dtype == (dtype if k == 0 else mean_p.dtype) and g.shape == r.shape
                close(g, r, tol * 4, rel=True)
                close(g, r64, tol * 4, rel=True)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape,groups", GN_CASES, ids=lambda v: str(v))
def test_group_norm_matches_portable_and_float64(GN, shape, groups, dtype):
    # every affine choice and needs subset in float32; the full backward with weight and bias in the others
    if dtype == torch.float32:
        check_group_norm(GN, shape, groups, dtype)
    else:
        check_group_norm(GN, shape, groups, dtype, affine=((True, True), (False, False)), needs=GN_NEEDS[:1])


# (shape, groups) under small_blocks: layer-norm rows of 40 (three chunks) and three runs of rows for dweight;
# group-norm rows of 20 (two chunks; two channels of 10 looped one at a time); positions of 24 (two position
# chunks); rows of 5 and of 6 values packed four to a program (the last program part empty); S >= 8 takes the
# channel-tiled forward and dx
GN_LOOP_CASES = [((6, 40, 1), 1), ((3, 6, 10), 3), ((2, 4, 24), 1), ((9, 5, 1), 1), ((9, 4, 3), 2)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("shape,groups", GN_LOOP_CASES, ids=lambda v: str(v))
def test_group_norm_chunk_loops_and_packed_rows(GN, small_blocks, shape, groups, dtype):
    n, c, s = shape
    g = GN._geometry(n, c, s, groups, False)
    length = c // groups * s
    assert g.rows_blocks["ONE"] == (length <= 16)
    assert g.rows_blocks["ROWS"] == (4 if length <= 16 else 1)
    if s > 1:
        assert g.chan_blocks["ONE"] == (length <= 16)
    else:
        assert g.parts > 1  # partial sums of several runs of rows
    check_group_norm(GN, shape, groups, dtype, affine=((True, True),), needs=GN_NEEDS[:3])


def test_layer_norm_weight_grads_in_one_run_when_small(GN):
    """Layer norm's dweight and dbias: a small layer in one run of rows (written directly, no summing launch), a
    large one in runs summed after (default constants)."""
    assert GN._geometry(64, 256, 1, 1, False).parts == 1
    assert GN._geometry(4096, 1024, 1, 1, False).parts > 1


def test_group_norm_edge_cases(GN):
    # a constant group (S > 1) and a constant layer-norm row (S == 1): its mean exactly, variance 0 (invstd as
    # rsqrt(eps)), y exactly the bias
    for shape, groups, const in (((3, 4, 5), 2, (1, slice(0, 2))), ((4, 8, 1), 1, (2, slice(None)))):
        x, w, b, dy = _gn_inputs(shape, torch.float32, seed=3)
        x[const] = 7.25
        y, mean, invstd = GN.gn_forward(*on(x, w, b), groups, 1e-5)
        n, g = const[0], (const[1].start or 0) // (shape[1] // groups)
        assert mean[n, g].item() == 7.25
        close(invstd[n, g], torch.rsqrt(torch.tensor(1e-5)), 1e-6, rel=True)
        assert torch.equal(y[const].cpu(), b[const[1], None].expand_as(x[const]))
        for got, want in zip(GN.gn_backward(*on(dy, x, w), mean, invstd, groups),
                             portable.gn_backward(dy, x, w, mean.cpu(), invstd.cpu(), groups)):
            close(got, want, 1e-4, rel=True)
    # groups of mean 1e6 and a small spread: statistics as float64's on the same values (the shift keeps them)
    gen = torch.Generator().manual_seed(8)
    for dtype, shape, groups in ((torch.float64, (3, 4, 6), 2), (torch.float32, (3, 4, 6), 2),
                                 (torch.float32, (5, 12, 1), 1)):
        x = (1e6 + torch.randn(shape, generator=gen, dtype=torch.float64)).to(dtype)
        y, mean, invstd = GN.gn_forward(on(x), None, None, groups, 1e-5)
        xg = x.double().reshape(shape[0], groups, -1)
        mean64 = xg.mean(2)
        invstd64 = ((xg - mean64[:, :, None]).square().mean(2) + 1e-5).rsqrt()
        exact = dtype == torch.float64
        close(mean, mean64, 1e-15 if exact else 6e-8, rel=True)
        close(invstd, invstd64, 1e-12 if exact else 1e-6, rel=True)
        close(y, portable.gn_forward(x.double(), None, None, groups, 1e-5)[0], 1e-10 if exact else 1e-5)
        if exact:
            dy = torch.randn(shape, generator=gen, dtype=torch.float64)
            for got, want in zip(GN.gn_backward(*on(dy, x), None, mean, invstd, groups),
                                 portable.gn_backward(dy, x, None, mean64, invstd64, groups)):
                close(got, want, 1e-9, rel=True)
    # dy non-contiguous and of another dtype: taken as x's dtype, contiguous
    for dtype in (torch.float32, torch.bfloat16):
        x, w, b, _ = _gn_inputs((3, 6, 10), dtype, seed=4)
        dy = torch.randn(3, 10, 6, generator=gen, dtype=torch.float64).transpose(1, 2)
        y, mean, invstd = GN.gn_forward(*on(x, w, b), 3, 1e-5)
        want = portable.gn_backward(dy.to(dtype), x, w, mean.cpu(), invstd.cpu(), 3)
        for got, r in zip(GN.gn_backward(*on(dy, x, w), mean, invstd, 3), want):
            close(got, r, 4 * TOL[dtype], rel=True)


@pytest.mark.parametrize("shape,groups", [((3, 6, 10), 3), ((6, 40, 1), 1), ((2, 4, 24), 1)], ids=lambda v: str(v))
def test_group_norm_int64_offsets(T, GN, small_blocks, monkeypatch, shape, groups):
    """The kernels' int64 offsets (tensors of 2**31 elements and more) on a small input: as the int32 ones."""
    x, w, b, dy = on(*_gn_inputs(shape, torch.float32, seed=5))

    def run():
        y, mean, invstd = GN.gn_forward(x, w, b, groups, 1e-5)
        return y, mean, invstd, *GN.gn_backward(dy, x, w, mean, invstd, groups)
    want = run()
    assert not GN._geometry_of(x, groups).rows_blocks["BIG"]
    monkeypatch.setattr(T, "INT32_OFFSETS_BELOW", 0)
    monkeypatch.setattr(GN, "_GEOMETRIES", {})
    assert GN._geometry_of(x, groups).rows_blocks["BIG"]
    for got, w_ in zip(run(), want):
        assert torch.equal(got, w_)


def test_group_layer_instance_norm_layers_through_the_triton_backend(T, GN, monkeypatch):
    """normlab.GroupNorm, LayerNorm and InstanceNorm2d(affine=True) with use_backend("triton") against torch.nn,
    forward and backward: through the Triton group-norm kernels (not the portable ones)."""
    assert T.gn_forward is GN.gn_forward and T.gn_backward is GN.gn_backward
    calls = []
    for name in ("gn_forward", "gn_backward"):
        real = getattr(GN, name)
        monkeypatch.setattr(T, name, lambda *a, _real=real, _name=name, **k: calls.append(_name) or _real(*a, **k))
    gen = torch.Generator().manual_seed(12)
    for ours, theirs, shape in ((normlab.GroupNorm(3, 6), torch.nn.GroupNorm(3, 6), (4, 6, 5, 5)),
                                (normlab.LayerNorm((3, 4)), torch.nn.LayerNorm((3, 4)), (6, 5, 3, 4)),
                                (normlab.InstanceNorm2d(4, affine=True), torch.nn.InstanceNorm2d(4, affine=True),
                                 (3, 4, 5, 5))):
        ours, theirs = ours.to(DEVICE), theirs.to(DEVICE)
        with torch.no_grad():
            for m in (ours, theirs):
                m.weight.copy_(torch.linspace(0.5, 2, m.weight.numel()).reshape(m.weight.shape))
                m.bias.copy_(torch.linspace(-1, 1, m.bias.numel()).reshape(m.bias.shape))
        x, dy = on(make(shape, None, torch.float32, gen=gen), torch.randn(shape, generator=gen))
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        calls.clear()
        with kernels.use_backend("triton"):
            ya = ours(xa)
            ya.backward(dy)
        yb = theirs(xb)
        yb.backward(dy)
        assert calls == ["gn_forward", "gn_backward"], (type(ours).__name__, calls)
        close(ya, yb, 1e-5)
        close(xa.grad, xb.grad, 1e-4, rel=True)
        close(ours.weight.grad, theirs.weight.grad, 1e-4, rel=True)
        close(ours.bias.grad, theirs.bias.grad, 1e-4, rel=True)


def test_direct_launches(T, monkeypatch):
    """From the second launch of a specialization on, the kernels go through the compiled kernel's own launcher
    (compiled Triton 3.3+; never in the interpreter): the results of Triton's own launch, bit for bit, on an
    input 16-byte aligned and on one that is not (a pointer's alignment is part of the specialization: a kernel
    compiled for aligned loads would fault or misread on the other)."""
    from triton import knobs
    assert not T._hooked(knobs.runtime.launch_enter_hook)  # no profiler's hook: None, or an empty chain (3.5+)
    if INTERPRETED:
        assert T._launcher() is None
    elif T._launcher() is None:
        pytest.skip(f"triton {T.triton.__version__}: Triton's own launch only")
    gen = torch.Generator().manual_seed(12)
    base = torch.randn(2 * 3 * 4 * 5 + 1, generator=gen)
    dy = on(torch.randn(2, 3, 4, 5, generator=gen))
    w, b, rm, rv = on(torch.rand(3, generator=gen) + 0.5, torch.randn(3, generator=gen), torch.zeros(3),
                      torch.ones(3))

    def run(x):
        y, mean, invstd = T.bn_train_forward(x, w, b, 1e-5, "relu")
        return (y, mean, invstd, T.bn_eval_forward(x, rm, rv, w, b, 1e-5, "silu"),
                *T.bn_backward(dy, x, w, b, mean, invstd, "relu", True))

    for offset in (0, 1):  # 1: a view 4 bytes past an aligned start
        x = on(base)[offset:offset + dy.numel()].view(dy.shape)
        assert (x.data_ptr() % 16 == 0) == (offset == 0)
        monkeypatch.setattr(T, "FAST_LAUNCH", False)
        want = run(x)
        monkeypatch.setattr(T, "FAST_LAUNCH", True)
        T._BINARIES.clear()
        for _ in range(3):  # the first: Triton's launch (the binary kept); then direct
            for got, expected in zip(run(x), want):
                assert torch.equal(got, expected)
        assert len(T._BINARIES) == (0 if INTERPRETED else 7)


def test_direct_launch_logic(T, monkeypatch):
    """``_run``'s bookkeeping with a stand-in kernel and launcher (the real ones need a GPU): Triton's launch the
    first time for each specialization, the kept binary's ``run`` after it with the grid padded to three, the
    current stream and every argument in signature order; a new dtype, alignment, int value, constexpr or device
    is a new specialization; a profiler's hook or FAST_LAUNCH = False takes Triton's launch every time."""
    calls = []

    class Binary:
        function, packed_metadata = "fn", "meta"

        def run(self, *a):
            calls.append(("direct", a))

    class Kernel:
        arg_names = ["x", "n", "eps", "ACC", "BLOCK"]

        def __getitem__(self, grid):
            return lambda *a, **k: calls.append(("triton", grid, a, k)) or Binary()

    class Runtime:
        launch_enter_hook = None

    device = [0]
    monkeypatch.setattr(T, "_launcher", lambda: (lambda: device[0], lambda d: f"stream{d}", Runtime))
    monkeypatch.setattr(T, "_BINARIES", {})
    k, x = Kernel(), torch.zeros(8)

    def launch(t=x, n=5, block=16, grid=(3,)):
        calls.clear()
        T._run(k, grid, t, n, 1e-5, ACC="f32", BLOCK=block, num_warps=4)
        return calls[0][0]

    assert launch() == "triton" and launch() == "direct"
    assert calls == [("direct", (3, 1, 1, "stream0", "fn", "meta", None, None, None, x, 5, 1e-5, "f32", 16))]
    assert launch(grid=(3, 2)) == "direct" and calls[0][1][:3] == (3, 2, 1)  # the grid is not specialized
    new = [dict(t=x.double()), dict(t=torch.zeros(9)[1:]), dict(n=6), dict(block=32)]  # dtype, 4-byte offset
    for kw in new:
        assert launch(**kw) == "triton" and launch(**kw) == "direct", kw
    assert launch(n=7) == "triton"
    device[0] = 1
    assert launch() == "triton" and launch() == "direct" and calls[0][1][3] == "stream1"
    Runtime.launch_enter_hook = print
    assert launch() == "triton"
    Runtime.launch_enter_hook = None
    monkeypatch.setattr(T, "FAST_LAUNCH", False)
    assert launch() == "triton"
    assert len(T._BINARIES) == 7  # the first, four new specializations, n=7, device 1


@pytest.mark.parametrize("chunk", range(8))
def test_layers_agree_with_torch_on_random_configurations(chunk):
    """The seeded differential fuzz of ``test_fuzz_vs_torch.py`` through ``use_backend("triton")``: 48 cases of
    up to 4,096 values in the interpreter, 200 of up to 262,144 compiled; in 8 chunks (the GPU run's workers)."""
    import test_fuzz_vs_torch as fuzz
    cases, values = (48, 1 << 12) if INTERPRETED else (200, 1 << 18)
    seeds = range(chunk, cases, 8)
    with kernels.use_backend("triton"):
        found = [r for r in (fuzz.run_case(seed, DEVICE, values) for seed in seeds) if r]
    assert not found, f"{len(found)} of {len(seeds)} cases:\n" + "\n".join(found[:5])
