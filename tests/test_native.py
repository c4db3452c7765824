"""The native glue (normlab.kernels.native): which inputs it takes, and that it computes what torch.nn does.

Tolerances as in test_nn_vs_torch: float32 outputs and input gradients 1e-5, parameter gradients 1e-4 relative to
their largest value; float64 1e-10 / 1e-9.
"""
from __future__ import annotations

import contextlib
import copy

import pytest
import torch

import normlab
import normlab.functional as F
from normlab import kernels as K
from normlab.kernels import cpu, native

TOL = {torch.float32: dict(out=1e-5, dx=1e-5, dp=1e-4), torch.float64: dict(out=1e-10, dx=1e-10, dp=1e-9)}
NATIVE = "NormlabBatchNormBackward"  # the native glue's autograd nodes
NATIVE_GROUP = "NormlabGroupNormBackward"

# (shape, memory format): every layout the glue takes; (2048, 64) and the 16-channel channels_last one are past
# the lanes threshold (k rows as one row of lanes); with more than one torch thread those two and the last, NCHW
# one are past native.BN_SPLIT_FROM (one run of rows or samples per thread)
LAYOUTS = [
    ((32, 6), torch.contiguous_format),
    ((16, 6, 1), torch.contiguous_format),
    ((8, 6, 5), torch.contiguous_format),
    ((8, 6, 5, 7), torch.contiguous_format),
    ((8, 6, 5, 7), torch.channels_last),
    ((4, 6, 3, 4, 5), torch.channels_last_3d),
    ((2048, 64), torch.contiguous_format),
    ((32, 16, 16, 16), torch.channels_last),
    ((15, 8, 24, 25), torch.contiguous_format),
]


@pytest.fixture(autouse=True)
def _native(backend_ctx):
    with backend_ctx("native"):
        yield


@contextlib.contextmanager
def threads(n):
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def close(a, b, tol, what):
    err = (a.double() - b.double()).abs().max().item()
    assert err <= tol, f"{what}: max abs error {err:.3g} > {tol:.1g}"


def torch_layer(shape, dtype, **kwargs):
    cls = {2: torch.nn.BatchNorm1d, 3: torch.nn.BatchNorm1d, 4: torch.nn.BatchNorm2d, 5: torch.nn.BatchNorm3d}
    ref = cls[len(shape)](shape[1], **kwargs).to(dtype)
    with torch.no_grad():
        for p in ref.parameters():
            p.copy_(torch.randn_like(p))
    ours = getattr(normlab, type(ref).__name__)(shape[1], **kwargs).to(dtype)
    ours.load_state_dict(ref.state_dict())
    return ref, ours


def grads(layer, x, y, dy):
    return torch.autograd.grad(y, [x, *layer.parameters()], dy)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("shape,fmt", LAYOUTS, ids=[f"{s}-{str(f).split('.')[-1]}" for s, f in LAYOUTS])
def test_takes_every_layout_and_matches_torch(shape, fmt, dtype):
    torch.manual_seed(sum(shape))
    tol = TOL[dtype]
    ref, ours = torch_layer(shape, dtype)
    for step in range(2):
        x = (torch.randn(shape, dtype=dtype) * 2 + 3 * step).contiguous(memory_format=fmt).requires_grad_()
        yr, yo = ref(x), ours(x)
        assert NATIVE in yo.grad_fn.name()
        assert yo.stride() == yr.stride()
        close(yo, yr, tol["out"], "output")
        dy = torch.randn_like(yr)
        gr, go = grads(ref, x, yr, dy), grads(ours, x, yo, dy)
        close(go[0], gr[0], tol["dx"], "dx")
        for a, b in zip(go[1:], gr[1:]):
            close(a, b, tol["dp"] * max(1.0, b.abs().max().item()), "dweight/dbias")
        for name in ("running_mean", "running_var", "num_batches_tracked"):
            close(getattr(ours, name), getattr(ref, name), tol["out"] * 10, name)
    ref.eval(), ours.eval()
    x = torch.randn(shape, dtype=dtype).contiguous(memory_format=fmt).requires_grad_()
    yr, yo = ref(x), ours(x)
    assert NATIVE in yo.grad_fn.name()
    close(yo, yr, tol["out"], "eval output")
    dy = torch.randn_like(yr)
    for a, b in zip(grads(ours, x, yo, dy), grads(ref, x, yr, dy)):
        close(a, b, tol["dp"] * max(1.0, b.abs().max().item()), "eval gradient")
    with torch.no_grad():
        close(ours(x), yr, tol["out"], "eval output without autograd")


@pytest.mark.parametrize("act", ["identity", "relu", "silu", "sigmoid"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("shape", [(12, 3), (5, 3, 2, 3)], ids=str)
def test_gradcheck_and_double_backward(act, training, shape):
    torch.manual_seed(7)
    x = (torch.randn(shape, dtype=torch.float64) + 0.3).requires_grad_()
    w = (torch.rand(3, dtype=torch.float64) + 0.5).requires_grad_()
    b = torch.randn(3, dtype=torch.float64, requires_grad=True)
    rm, rv = torch.randn(3, dtype=torch.float64), torch.rand(3, dtype=torch.float64) + 0.5

    def f(x, w, b):
        return F.batch_norm(x, None if training else rm, None if training else rv, w, b, training, act=act)

    assert NATIVE in f(x, w, b).grad_fn.name()
    # batched gradients: torch.func's vmap over the node's backward; forward AD: dual inputs (the Python glue's)
    assert torch.autograd.gradcheck(f, (x, w, b), check_batched_grad=True, check_forward_ad=True)
    assert torch.autograd.gradgradcheck(f, (x, w, b), check_batched_grad=True)


# (32, 2072) and (64, 1024): few rows, split by blocks of channels instead (native.cpp, channel_runs; 2072 channels
# make blocks whose edges are not a row's halves and rows that end mid-line); (522, 42, 3) and (130, 150, 2, 2): short
# (n, c) rows, taken as flat sample rows (cpu_numba._FLAT_S_BELOW)
SPLIT_BN = [((2048, 64), torch.contiguous_format), ((300, 250), torch.contiguous_format),
            ((15, 8, 24, 25), torch.contiguous_format), ((32, 16, 16, 16), torch.channels_last),
            ((32, 2072), torch.contiguous_format), ((64, 1024), torch.contiguous_format),
            ((522, 42, 3), torch.contiguous_format), ((130, 150, 2, 2), torch.contiguous_format)]
ACTS = {"identity": lambda z: z, "relu": torch.relu, "silu": torch.nn.functional.silu, "sigmoid": torch.sigmoid}


@pytest.mark.parametrize("act", list(ACTS))
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("shape,fmt", SPLIT_BN, ids=[f"{s}-{str(f).split('.')[-1]}" for s, f in SPLIT_BN])
def test_batch_norm_split_over_threads_matches_one_run_and_float64(shape, fmt, training, act):
    """Past native.BN_SPLIT_FROM at two threads: one run of rows (samples) per thread, the runs' statistics and
    dweight/dbias merged. float32 against the float64 composition (channels with a mean of 1e4 among them, and a
    constant one), and against the same call in one run (one thread)."""
    assert torch.Size(shape).numel() >= native.BN_SPLIT_FROM
    torch.manual_seed(sum(shape))
    c = shape[1]
    view = [1, c] + [1] * (len(shape) - 2)
    offset = torch.zeros(c)
    offset[::3] = 1e4
    x = (torch.randn(shape) + offset.view(view)).contiguous(memory_format=fmt)
    x[:, 1] = 2.5  # a constant channel
    w, b = torch.rand(c) + 0.5, torch.randn(c)
    rm, rv = offset + torch.randn(c), torch.rand(c) + 0.5
    dy = torch.randn(shape)

    def run(dtype, threads_):
        xs = x.to(dtype).requires_grad_()
        ws, bs = w.to(dtype).requires_grad_(), b.to(dtype).requires_grad_()
        rms, rvs = rm.to(dtype), rv.to(dtype)
        with threads(threads_):
            y = F.batch_norm(xs, rms, rvs, ws, bs, training, 0.1, 1e-5, act=act)
            assert NATIVE in y.grad_fn.name()
            return (y, *torch.autograd.grad(y, (xs, ws, bs), dy.to(dtype)), rms, rvs)

    def composed():  # float64, with torch ops
        xs = x.double().requires_grad_()
        ws, bs = w.double().requires_grad_(), b.double().requires_grad_()
        dims = [0] + list(range(2, len(shape)))
        if training:
            var, mean = torch.var_mean(xs, dims, correction=0, keepdim=True)
        else:
            mean, var = rm.double().view(view), rv.double().view(view)
        y = ACTS[act]((xs - mean) / torch.sqrt(var + 1e-5) * ws.view(view) + bs.view(view))
        return (y, *torch.autograd.grad(y, (xs, ws, bs), dy.double()))

    split, one = run(torch.float32, 2), run(torch.float32, 1)
    tols = {"y": 1e-5, "dx": 1e-4, "dw": 1e-4, "db": 1e-4, "running_mean": 1e-6, "running_var": 1e-5}
    for (name, tol), a, e, o in zip(tols.items(), split, composed() + one[4:], one):
        scale = max(1.0, e.abs().max().item())
        close(a, e, tol * scale, f"{name} against float64")
        close(a, o, tol * scale, f"{name} against one run")


# From 16 MiB the loops write y and dx with streaming stores; split over threads, each run writes half the output
# and chooses them by the whole output's size (the `whole` argument of the loops' eval and dx entries).
STREAMED_SPLIT = [((4608, 1024), torch.contiguous_format), ((20, 64, 64, 64), torch.channels_last),
                  ((20, 64, 64, 64), torch.contiguous_format)]


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("shape,fmt", STREAMED_SPLIT, ids=[f"{s}-{str(f).split('.')[-1]}" for s, f in STREAMED_SPLIT])
def test_streamed_split_runs_match_one_run_and_float64(shape, fmt, training):
    """Inputs from 16 MiB up to the native glue's limit at two threads: runs that each write a streamed part of y
    and dx compute what one run does (one thread), and what float64 does."""
    nbytes = torch.Size(shape).numel() * 4
    rows_below, ncs_below = native.bn_below_bytes(cpu)
    if nbytes >= (ncs_below if fmt is torch.contiguous_format and len(shape) > 2 else rows_below):
        pytest.skip("this host leaves the (N, C, S) layout of this size to the Python glue's channel loops")
    assert nbytes >= cpu._k.STREAM_FROM
    torch.manual_seed(7)
    c = shape[1]
    view = [1, c] + [1] * (len(shape) - 2)
    x = (torch.randn(shape) * 2 + 3).contiguous(memory_format=fmt)
    w, b = torch.rand(c) + 0.5, torch.randn(c)
    rm, rv = torch.randn(c) + 3, torch.rand(c) + 3.5
    dy = torch.randn(shape).contiguous(memory_format=fmt)

    def run(threads_):
        xs, ws, bs = x.clone().requires_grad_(), w.clone().requires_grad_(), b.clone().requires_grad_()
        rms, rvs = rm.clone(), rv.clone()
        with threads(threads_):
            y = F.batch_norm(xs, rms, rvs, ws, bs, training, 0.1, 1e-5, act="relu")
            assert NATIVE in y.grad_fn.name()
            return (y, *torch.autograd.grad(y, (xs, ws, bs), dy), rms, rvs)

    xs, ws, bs = x.double().requires_grad_(), w.double().requires_grad_(), b.double().requires_grad_()
    dims = [0] + list(range(2, len(shape)))
    if training:
        var, mean = torch.var_mean(xs, dims, correction=0, keepdim=True)
    else:
        mean, var = rm.double().view(view), rv.double().view(view)
    y64 = torch.relu((xs - mean) / torch.sqrt(var + 1e-5) * ws.view(view) + bs.view(view))
    expected = (y64, *torch.autograd.grad(y64, (xs, ws, bs), dy.double()))
    split, one = run(2), run(1)
    tols = {"y": 1e-5, "dx": 1e-4, "dw": 1e-4, "db": 1e-4, "running_mean": 1e-6, "running_var": 1e-5}
    for (name, tol), a, o, e in zip(tols.items(), split, one, expected + one[4:]):
        scale = max(1.0, e.abs().max().item())
        close(a, e, tol * scale, f"{name} against float64")
        close(a, o, tol * scale, f"{name} against one run")


@pytest.mark.parametrize("wants", ["x", "weight", "x+bias"])
def test_gradients_of_some_inputs_only(wants):
    torch.manual_seed(3)
    ref, ours = torch_layer((16, 5), torch.float64)
    for layer in (ref, ours):
        layer.weight.requires_grad_("weight" in wants)
        layer.bias.requires_grad_("bias" in wants)
    x = torch.randn(16, 5, dtype=torch.float64, requires_grad="x" in wants)
    yr, yo = ref(x), ours(x)
    assert NATIVE in yo.grad_fn.name()
    inputs = lambda layer: [t for t in (x, layer.weight, layer.bias) if t.requires_grad]  # noqa: E731
    dy = torch.randn_like(yr)
    for a, b in zip(torch.autograd.grad(yo, inputs(ours), dy), torch.autograd.grad(yr, inputs(ref), dy)):
        close(a, b, 1e-9, "gradient")


def test_expanded_and_other_layout_output_gradients():
    """sum().backward() hands the node an expanded (stride 0) gradient; a channels_last input may get a contiguous
    one: both are matched to the input's layout first."""
    ref, ours = torch_layer((8, 6, 5, 7), torch.float32)
    x = torch.randn(8, 6, 5, 7).contiguous(memory_format=torch.channels_last).requires_grad_()
    for make_dy in (lambda y: torch.ones_like(y).expand_as(y), lambda y: torch.randn(y.shape)):
        yr, yo = ref(x), ours(x)
        dy = make_dy(yr)
        for a, b in zip(grads(ours, x, yo, dy), grads(ref, x, yr, dy)):
            close(a, b, 1e-4 * max(1.0, b.abs().max().item()), "gradient")


def test_input_changed_in_place_after_forward_is_caught():
    bn = normlab.BatchNorm1d(4)
    x = torch.randn(8, 4, requires_grad=True)
    h = x * 1
    y = bn(h)
    h.add_(1)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()


def test_without_autograd_updates_running_statistics():
    ref, ours = torch_layer((64, 10), torch.float32)
    x = torch.randn(64, 10) * 3 + 1
    with torch.no_grad():
        yr, yo = ref(x), ours(x)
    assert yo.grad_fn is None
    close(yo, yr, 1e-5, "output")
    close(ours.running_mean, ref.running_mean, 1e-5, "running_mean")
    close(ours.running_var, ref.running_var, 1e-5, "running_var")


@pytest.mark.parametrize("momentum", [0.1, None])
def test_module_counts_its_batches_in_the_native_call_as_torch(momentum):
    ref, ours = torch_layer((16, 5), torch.float32, momentum=momentum)
    versions = ours.num_batches_tracked._version, ref.num_batches_tracked._version
    for step in range(4):  # momentum None: the running statistics are the cumulative average (weight 1 / count)
        x = torch.randn(16, 5, requires_grad=True) * (step + 1) + step
        yo = ours(x)
        assert NATIVE in yo.grad_fn.name()
        ref(x)
    assert int(ours.num_batches_tracked) == int(ref.num_batches_tracked) == 4
    assert ours.num_batches_tracked._version - versions[0] == ref.num_batches_tracked._version - versions[1] == 4
    close(ours.running_mean, ref.running_mean, 1e-5, "running_mean")
    close(ours.running_var, ref.running_var, 1e-5, "running_var")
    ours.eval(), ref.eval()
    x = torch.randn(16, 5)
    ours(x), ref(x)
    assert int(ours.num_batches_tracked) == 4  # evaluation does not count
    # a batch the glue declines (one value per channel) is counted once, by the Python glue, before it raises
    ours.train(), ref.train()
    for layer in (ours, ref):
        with pytest.raises(ValueError, match="more than 1 value per channel"):
            layer(torch.randn(1, 5))
    assert int(ours.num_batches_tracked) == int(ref.num_batches_tracked) == 5


def test_native_call_declines_counters_it_cannot_count_and_leaves_them_alone():
    x = torch.randn(16, 5)
    K.native_batch_norm(x, None, None, None, None, True, 0.1, 1e-5, "identity")  # the loops compiled
    for counter in (torch.zeros((), dtype=torch.float32), torch.zeros(2, dtype=torch.int64)):
        y, _ = K.native_batch_norm(x, None, None, None, None, True, 0.1, 1e-5, "identity", counter)
        assert y is None and not counter.any()
    # the cumulative average needs a counter
    assert K.native_batch_norm(x, None, None, None, None, True, None, 1e-5, "identity")[0] is None
    counter = torch.zeros((), dtype=torch.int64)
    y, _ = K.native_batch_norm(x, None, None, None, None, False, None, 1e-5, "identity", counter)
    assert y is None  # evaluation without running statistics: the Python glue says what is wrong
    rm, rv = torch.zeros(5), torch.ones(5)
    y, _ = K.native_batch_norm(x, None, None, rm, rv, False, None, 1e-5, "identity", counter)
    assert y is not None and int(counter) == 0  # evaluation: normalized with them, not counted
    y, _ = K.native_batch_norm(x, None, None, rm, rv, True, None, 1e-5, "identity", counter)
    assert int(counter) == 1
    close(rm, x.mean(0), 1e-6, "first batch's mean with weight 1 / 1")


def test_leaves_other_inputs_to_the_python_glue():
    bn = normlab.BatchNorm1d(8)
    x = torch.randn(32, 16, requires_grad=True)
    assert NATIVE not in bn(x[:, ::2]).grad_fn.name()  # strided
    # parameters of another floating dtype than the input's or its compute dtype (float32 for 16-bit inputs)
    assert NATIVE not in bn.double()(torch.randn(32, 8, requires_grad=True)).grad_fn.name()
    assert NATIVE not in bn(torch.randn(32, 8, dtype=torch.bfloat16, requires_grad=True)).grad_fn.name()


def test_takes_large_inputs_but_nchw_where_the_python_glue_goes_channel_by_channel():
    """No size limit (the native glue's own output pool serves large outputs), but for the (N, C, S) layout on
    hosts of 2 MiB of L2 a core and more, whose channel-by-channel loops run in the Python glue from
    cpu._CHANNELS_FROM."""
    bn2 = normlab.BatchNorm2d(16)
    rows_below, ncs_below = native.bn_below_bytes(cpu)
    assert rows_below == native.BN_BELOW_BYTES == native.NO_LIMIT
    channel_loops = cpu.L2_BYTES >= cpu._CHANNEL_L2_MIN
    assert ncs_below == (min(cpu._CHANNELS_FROM, native.NO_LIMIT) if channel_loops else native.NO_LIMIT)
    samples = (36 << 20) // (4 * 16 * 4)  # float32 (N, 16, 2, 2): 256 bytes a sample, 36 MiB in all
    for fmt in (torch.channels_last, torch.contiguous_format):
        big = torch.randn(samples, 16, 2, 2).contiguous(memory_format=fmt).requires_grad_()
        python_glue = fmt is torch.contiguous_format and big.numel() * 4 >= ncs_below
        for n in (1, 2):
            with threads(n):
                assert (NATIVE in bn2(big).grad_fn.name()) != python_glue


def test_forced_backends_do_not_use_it():
    bn = normlab.BatchNorm1d(4)
    x = torch.randn(8, 4, requires_grad=True)
    for name in ("cpu", "portable"):
        with K.use_backend(name):
            assert K.native_batch_norm is None
            assert NATIVE not in bn(x).grad_fn.name()
    assert NATIVE in bn(x).grad_fn.name()


def test_disabled_by_environment_and_tagged_by_torch_version(monkeypatch):
    monkeypatch.setenv("NORMLAB_NATIVE", "0")
    assert native.load() is None
    here = native.library_path()
    monkeypatch.setattr(torch, "__version__", torch.__version__ + ".other")
    assert native.library_path() != here, "another torch must not load this binary"


def test_build_keeps_the_flags_that_tag_the_binary(monkeypatch, tmp_path):
    # torch.utils.cpp_extension.load appends its own flags to the lists it is given; the tag must not follow them
    from torch.utils import cpp_extension

    def load(**kwargs):
        kwargs["extra_cflags"].append("-DEXTRA")
        kwargs["extra_ldflags"].append("-L/somewhere")
        return "module"

    monkeypatch.setenv("NORMLAB_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(cpp_extension, "load", load)
    before = native.library_path()
    assert native.build() == "module"
    assert native.library_path() == before, "the binary was built under a tag that the next process will not find"


def test_build_command_checks_against_torch(capsys):
    from normlab.cli import main

    assert main(["build-native"]) == 0
    assert "ok" in capsys.readouterr().out


def test_slow_work_says_so_on_stderr_and_quick_work_says_nothing(capsys):
    """A first use's loops compile for a minute or more: past the delay a line says what is under way, and one when
    it is done; loops from numba's cache come back before the delay and print nothing."""
    import time

    with native._note_if_slow("compiling the loops", 0.05):
        time.sleep(0.3)
    err = capsys.readouterr().err.splitlines()
    assert err[0] == "normlab: compiling the loops (once per machine, cached afterwards) ..."
    assert err[1].startswith("normlab: compiling the loops: done in") and len(err) == 2
    with native._note_if_slow("compiling the loops", 5.0):
        pass
    assert capsys.readouterr().err == ""


def test_set_loops_notes_a_slow_compile(monkeypatch, capsys):
    """set_loops runs the loops' compile (here a slow stand-in) under the note, then hands the module its entries."""
    import time

    from normlab.kernels import cpu_numba

    calls = []

    class Module:
        def set_loops(self, name, addresses):
            calls.append((name, addresses))

    def slow_entries(storage):
        time.sleep(0.3)
        return iter([1, 2, 3])

    monkeypatch.setattr(cpu_numba, "c_entry_points", slow_entries)
    monkeypatch.setattr(native, "SLOW_LOOPS_NOTE_S", 0.05)
    native.set_loops(Module(), torch.bfloat16)
    assert calls == [("bfloat16", [1, 2, 3])]
    err = capsys.readouterr().err
    assert "compiling the CPU norm loops for bfloat16 inputs (once per machine" in err and "done in" in err


def family_layers(name, args, kwargs, dtype):
    """torch.nn's layer ``name`` with random parameters, and normlab's with its state_dict."""
    ref = getattr(torch.nn, name)(*args, **kwargs).to(dtype)
    with torch.no_grad():
        for p in ref.parameters():
            p.copy_(torch.randn_like(p))
    ours = getattr(normlab, name)(*args, **kwargs).to(dtype)
    ours.load_state_dict(ref.state_dict())
    return ref, ours


GROUP_LAYERS = [  # (class name, args, kwargs, input shape)
    ("GroupNorm", (3, 6), {}, (4, 6, 5, 7)),
    ("GroupNorm", (2, 6), {"affine": False}, (4, 6, 5)),
    ("GroupNorm", (3, 6), {}, (4, 6)),  # S = 1, groups of two values
    ("LayerNorm", (7,), {}, (4, 6, 5, 7)),
    ("LayerNorm", ((6, 5, 7),), {}, (4, 6, 5, 7)),
    ("LayerNorm", (7,), {"bias": False}, (4, 7)),
    ("LayerNorm", (7,), {"elementwise_affine": False}, (4, 6, 7)),
    ("InstanceNorm2d", (6,), {"affine": True, "track_running_stats": True}, (4, 6, 5, 7)),
    ("InstanceNorm1d", (6,), {}, (4, 6, 9)),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("name,args,kwargs,shape", GROUP_LAYERS, ids=[f"{n}-{i}" for i, (n, *_) in
                                                                      enumerate(GROUP_LAYERS)])
def test_group_norm_family_takes_small_inputs_and_matches_torch(name, args, kwargs, shape, dtype):
    torch.manual_seed(len(shape) + sum(shape))
    tol = TOL[dtype]
    ref, ours = family_layers(name, args, kwargs, dtype)
    for step in range(2):
        x = (torch.randn(shape, dtype=dtype) * 2 + 3 * step).requires_grad_()
        yr, yo = ref(x), ours(x)
        assert NATIVE_GROUP in yo.grad_fn.name()
        close(yo, yr, tol["out"], "output")
        dy = torch.randn_like(yr)
        for a, b in zip(grads(ours, x, yo, dy), grads(ref, x, yr, dy)):
            close(a, b, tol["dp"] * max(1.0, b.abs().max().item()), "gradient")
        for (key, a), b in zip(ours.state_dict().items(), ref.state_dict().values()):
            close(a, b, tol["out"] * 10, key)
    with torch.no_grad():
        close(ours(x), ref(x), tol["out"], "output without autograd")


@pytest.mark.parametrize("form", ["group", "layer"])
def test_group_norm_family_gradcheck_and_double_backward(form):
    torch.manual_seed(11)
    if form == "group":
        x = torch.randn(3, 4, 2, 3, dtype=torch.float64, requires_grad=True)
        w = torch.randn(4, dtype=torch.float64, requires_grad=True)
        b = torch.randn(4, dtype=torch.float64, requires_grad=True)

        def f(x, w, b):
            return F.group_norm(x, 2, w, b)
    else:
        x = torch.randn(3, 2, 5, dtype=torch.float64, requires_grad=True)
        w = torch.randn(2, 5, dtype=torch.float64, requires_grad=True)
        b = torch.randn(2, 5, dtype=torch.float64, requires_grad=True)

        def f(x, w, b):
            return F.layer_norm(x, (2, 5), w, b)

    assert NATIVE_GROUP in f(x, w, b).grad_fn.name()
    assert torch.autograd.gradcheck(f, (x, w, b), check_batched_grad=True, check_forward_ad=True)
    assert torch.autograd.gradgradcheck(f, (x, w, b), check_batched_grad=True)


SPLIT_LAYERS = [  # past native.GROUP_SPLIT_FROM elements: the forward runs one run of samples (rows) per torch thread
    ("GroupNorm", (8, 32), {}, (16, 32, 8, 8)),
    ("InstanceNorm2d", (16,), {"affine": True}, (3, 16, 32, 24)),  # 3 samples over 2 runs: uneven
    ("LayerNorm", (300,), {}, (128, 300)),  # the backward too (past GROUP_BACKWARD_SPLIT_FROM)
    ("LayerNorm", (300,), {"elementwise_affine": False}, (2, 64, 300)),
    ("LayerNorm", (256,), {}, (63, 256)),  # a forward split over threads, a backward on one: 63 rows, uneven
]


# every layer with all inputs' gradients, and those with parameters with the parameters' alone (no dx)
SPLIT_CASES = [(*layer, wants) for layer in SPLIT_LAYERS for wants in ("all", "params")
               if wants == "all" or layer[2].get("elementwise_affine", True)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("name,args,kwargs,shape,wants", SPLIT_CASES,
                         ids=[f"{case[0]}-{i}-{case[4]}" for i, case in enumerate(SPLIT_CASES)])
def test_group_norm_family_split_over_threads_matches_torch(name, args, kwargs, shape, dtype, wants):
    assert torch.Size(shape).numel() >= native.GROUP_SPLIT_FROM  # else this test would not split anything
    torch.manual_seed(sum(shape))
    tol = TOL[dtype]
    ref, ours = family_layers(name, args, kwargs, dtype)
    x = torch.randn(shape, dtype=dtype) * 2 + 1
    inputs = [x.requires_grad_()] if wants == "all" else []
    inputs += list(ref.parameters())
    with threads(2):
        yr, yo = ref(x), ours(x)
        assert NATIVE_GROUP in yo.grad_fn.name()
        close(yo, yr, tol["out"], "output")
        dy = torch.randn_like(yr)
        got = torch.autograd.grad(yo, ([x] if wants == "all" else []) + list(ours.parameters()), dy)
        expected = torch.autograd.grad(yr, inputs, dy)
    for a, b in zip(got, expected):
        close(a, b, tol["dp"] * max(1.0, b.abs().max().item()), "gradient")


GROUP_STREAMED_SPLIT = [  # 16 MiB up to the native glue's limit: y and dx streamed, each run writing a part
    ("GroupNorm", (32, 64), (20, 64, 64, 64)),
    ("InstanceNorm2d", (64, 1e-5, 0.1, True), (20, 64, 64, 64)),
    ("LayerNorm", (1024,), (4608, 1024)),
]


@pytest.mark.parametrize("name,args,shape", GROUP_STREAMED_SPLIT, ids=[case[0] for case in GROUP_STREAMED_SPLIT])
def test_group_norm_family_streamed_split_runs_match_one_run_and_float64(name, args, shape):
    """As batch norm's: runs at two threads that each write a streamed part of y and dx (by the whole output's
    size, the loops' ``whole`` argument) compute what one run does, and what float64 does."""
    nbytes = torch.Size(shape).numel() * 4
    assert cpu._k.STREAM_FROM <= nbytes < native.GROUP_BELOW_BYTES
    torch.manual_seed(11)
    ref, ours = family_layers(name, args, {}, torch.float64)
    x = torch.randn(shape) * 2 + 3
    dy = torch.randn(shape)

    def run(threads_):
        layer = copy.deepcopy(ours).float()
        xs = x.clone().requires_grad_()
        with threads(threads_):
            y = layer(xs)
            assert NATIVE_GROUP in y.grad_fn.name()
            return (y, *torch.autograd.grad(y, (xs, *layer.parameters()), dy))

    xs = x.double().requires_grad_()
    y64 = ref(xs)
    expected = (y64, *torch.autograd.grad(y64, (xs, *ref.parameters()), dy.double()))
    split, one = run(2), run(1)
    for what, tol, a, o, e in zip(("y", "dx", "dw", "db"), (1e-5, 1e-4, 1e-4, 1e-4), split, one, expected):
        scale = max(1.0, e.abs().max().item())
        close(a, e, tol * scale, f"{what} against float64")
        close(a, o, tol * scale, f"{what} against one run")


def test_group_norm_family_takes_large_inputs():
    """No size limit: inputs past the 32 MiB where the Python glue took over until 2026-12-06 take the native glue
    at one and two threads, and match torch."""
    assert native.GROUP_BELOW_BYTES == native.NO_LIMIT
    torch.manual_seed(5)
    gn, ref = normlab.GroupNorm(4, 16), torch.nn.GroupNorm(4, 16)
    big = torch.randn((36 << 20) // (4 * 16 * 4), 16, 4, requires_grad=True)  # 36 MiB of float32
    dy = torch.randn_like(big)
    yr = ref(big)
    gr = torch.autograd.grad(yr, big, dy)[0]
    for n in (1, 2):
        with threads(n):
            y = gn(big)
            assert NATIVE_GROUP in y.grad_fn.name()
            close(y, yr, 1e-5, "output")
            close(torch.autograd.grad(y, big, dy)[0], gr, 1e-4, "dx")


def test_group_norm_family_leaves_channels_last_to_the_python_glue():
    gn = normlab.GroupNorm(2, 6)
    x = torch.randn(4, 6, 5, 7).contiguous(memory_format=torch.channels_last).requires_grad_()
    y = gn(x)
    assert NATIVE_GROUP not in y.grad_fn.name()
    assert y.is_contiguous(memory_format=torch.channels_last)


def test_concurrent_threads_get_their_own_results():
    """Two Python threads training small layers at once (the loops hold no shared state; each call allocates its
    own scratch): every step matches torch.nn's."""
    import threading

    errors = []

    def worker(seed):
        try:
            torch.manual_seed(seed)
            ref, ours = torch_layer((64, 12), torch.float64)
            gref, gours = torch.nn.GroupNorm(3, 12).double(), normlab.GroupNorm(3, 12).double()
            for _ in range(30):
                x = torch.randn(64, 12, dtype=torch.float64, requires_grad=True)
                for r, o in ((ref, ours), (gref, gours)):
                    yr, yo = r(x), o(x)
                    close(yo, yr, 1e-10, "output")
                    dy = torch.randn_like(yr)
                    for a, b in zip(grads(o, x, yo, dy), grads(r, x, yr, dy)):
                        close(a, b, 1e-9, "gradient")
            close(ours.running_var, ref.running_var, 1e-10, "running_var")
        except Exception as exc:  # noqa: BLE001 - reported by the main thread
            errors.append(exc)

    threads_ = [threading.Thread(target=worker, args=(s,)) for s in (1, 2)]
    for t in threads_:
        t.start()
    for t in threads_:
        t.join()
    assert not errors, errors


NODE_LAYERS = [  # one layer per autograd node of the native glue, with its node's name
    (lambda: normlab.BatchNorm1d(6), (32, 6), NATIVE),
    (lambda: normlab.LayerNorm(6), (32, 6), NATIVE_GROUP),
    (lambda: normlab.GroupNorm(2, 6), (4, 6, 5), NATIVE_GROUP),
]


@pytest.mark.parametrize("make,shape,node", NODE_LAYERS, ids=["batch", "layer", "group"])
def test_autograd_nodes_keep_torchs_graph_rules(make, shape, node):
    layer = make()
    x = torch.randn(shape, requires_grad=True)
    dy = torch.randn(shape)
    y = layer(x)
    assert node in y.grad_fn.name()
    first = torch.autograd.grad(y, [x, *layer.parameters()], dy, retain_graph=True)
    again = torch.autograd.grad(y, [x, *layer.parameters()], dy)  # retained: same gradients
    for a, b in zip(first, again):
        assert torch.equal(a, b)
    with pytest.raises(RuntimeError, match="second time"):  # released after a backward without retain_graph
        torch.autograd.grad(y, [x], dy)
    y = layer(x)
    (dw,) = torch.autograd.grad(y, [layer.weight], dy)  # only what is asked for
    close(dw, first[1], 1e-6, "dweight alone")
    assert x.grad is None


@pytest.mark.parametrize("make,shape,node", NODE_LAYERS, ids=["batch", "layer", "group"])
def test_forward_mode_ad_is_computed_not_dropped(make, shape, node):
    """Dual inputs are declined by the native glue (its nodes have no forward derivative) and computed in torch
    ops: the tangent is the directional derivative, with or without a backward graph as well."""
    import torch.autograd.forward_ad as fwad
    layer = make().double()
    x, t = torch.randn(shape, dtype=torch.float64), torch.randn(shape, dtype=torch.float64)
    h = 1e-6
    with torch.no_grad():
        ref = (layer(x + h * t) - layer(x - h * t)) / (2 * h)
    for requires_grad in (False, True):
        with fwad.dual_level():
            y = layer(fwad.make_dual(x.clone().requires_grad_(requires_grad), t))
            tangent = fwad.unpack_dual(y).tangent
        assert tangent is not None
        close(tangent, ref, 1e-6, "tangent")
