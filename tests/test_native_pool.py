"""The native glue's output pool (native.cpp, OutputPool): large outputs reuse the maps of dead outputs, never of
live ones, hold the right values in every layout, and follow the pool's size rules and cap.

The sizes are lowered here (the mechanism does not depend on them): outputs that outlive the call (a training
forward with autograd, the backward's dx) are pooled from 64 KiB, any output from 256 KiB.
"""
from __future__ import annotations

import gc
import os
import subprocess
import sys

import pytest
import torch

import normlab
from normlab import kernels as K
from normlab.kernels import native, pool

KEPT_FROM, ANY_FROM = 64 << 10, 256 << 10


@pytest.fixture(autouse=True)
def _small_sizes(backend_ctx, monkeypatch):
    with backend_ctx("native"):
        monkeypatch.setattr(native, "POOL_FROM_BYTES", ANY_FROM)
        monkeypatch.setattr(pool, "KEPT_MIN_BYTES", KEPT_FROM)
        native.configure(K._native, K._cpu)
        pool.clear()
        yield
        monkeypatch.undo()
        native.configure(K._native, K._cpu)
        gc.collect()
        pool.clear()


def held() -> int:
    return K._native.pool_free_bytes()


def addr(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


def layer_pair(cls, c, seed=0):
    torch.manual_seed(seed)
    ref = getattr(torch.nn, cls)(c)
    with torch.no_grad():
        for p in ref.parameters():
            p.copy_(torch.randn_like(p))
    ours = getattr(normlab, cls)(c)
    ours.load_state_dict(ref.state_dict())
    return ref, ours


def test_a_training_output_returns_only_when_every_view_is_gone():
    ref, ours = layer_pair("BatchNorm2d", 16)
    x = torch.randn(8, 16, 16, 16, requires_grad=True)  # 128 KiB: pooled only where it outlives the call
    y = ours(x)
    assert "NormlabBatchNormBackward" in y.grad_fn.name()
    first = addr(y)
    views = [y.view(8, 16, -1), y[3], y.detach().transpose(0, 1)]
    del y
    gc.collect()
    others = [ours(x) for _ in range(3)]  # must not land on live memory
    assert first not in {addr(o) for o in others}
    torch.testing.assert_close(views[0].view(8, 16, 16, 16), ref(x), rtol=1e-5, atol=1e-5)  # untouched
    del others, views  # the first output's map last
    gc.collect()
    assert held() == 4 * (2 << 20)
    assert addr(ours(x)) == first


def test_the_most_recently_freed_map_of_a_size_comes_back():
    _, ours = layer_pair("BatchNorm1d", 64)
    x = torch.randn(512, 64, requires_grad=True)
    y = ours(x)
    a = addr(y)
    del y
    assert held() == 2 << 20
    y = ours(x)
    assert addr(y) == a and held() == 0


def test_evaluation_and_no_grad_outputs_are_pooled_only_from_the_larger_size():
    _, ours = layer_pair("BatchNorm2d", 16)
    ours.eval()
    small = torch.randn(8, 16, 16, 16)  # 128 KiB: the heap's
    with torch.no_grad():
        y = ours(small)
    del y
    assert held() == 0
    large = torch.randn(8, 16, 32, 32)  # 512 KiB
    with torch.no_grad():
        y = ours(large)
    del y
    assert held() == 2 << 20


@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("act", ["identity", "relu"])
def test_pooled_outputs_and_gradients_match_torch_steps_after_steps(fmt, act):
    torch.manual_seed(1)
    ref = torch.nn.BatchNorm2d(24)
    ours = normlab.BatchNormAct2d(24, act=act) if act != "identity" else normlab.BatchNorm2d(24)
    ours.load_state_dict(ref.state_dict())
    post = torch.relu if act == "relu" else (lambda t: t)
    for step in range(4):  # each step's outputs land on the maps the step before left
        x = (torch.randn(6, 24, 20, 20) * 2 + step).contiguous(memory_format=fmt).requires_grad_()
        yo, yr = ours(x), post(ref(x))
        assert yo.stride() == x.stride()
        torch.testing.assert_close(yo, yr, rtol=1e-5, atol=1e-5)
        dy = torch.randn_like(yo)
        go = torch.autograd.grad(yo, [x, *ours.parameters()], dy)
        gr = torch.autograd.grad(yr, [x, *ref.parameters()], dy)
        assert go[0].stride() == x.stride()
        for a, b in zip(go, gr):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(ours.running_mean, ref.running_mean)
    assert held() > 0


@pytest.mark.parametrize("cls,args,shape", [("GroupNorm", (4, 16), (8, 16, 16, 16)),
                                            ("LayerNorm", (256,), (128, 256)),
                                            ("InstanceNorm2d", (16,), (8, 16, 16, 16))], ids=str)
def test_group_norm_family_outputs_are_pooled_and_right(cls, args, shape):
    torch.manual_seed(2)
    ref = getattr(torch.nn, cls)(*args)
    ours = getattr(normlab, cls)(*args)
    ours.load_state_dict(ref.state_dict())
    for _ in range(2):
        x = torch.randn(shape, requires_grad=True)
        yo, yr = ours(x), ref(x)
        torch.testing.assert_close(yo, yr, rtol=1e-5, atol=1e-5)
        dy = torch.randn_like(yo)
        torch.testing.assert_close(torch.autograd.grad(yo, x, dy)[0], torch.autograd.grad(yr, x, dy)[0],
                                   rtol=1e-4, atol=1e-4)
        del yo
    assert held() > 0


def test_a_pooled_output_can_be_resized_and_its_map_still_comes_back():
    _, ours = layer_pair("BatchNorm1d", 64)
    x = torch.randn(512, 64, requires_grad=True)
    y = ours(x).detach()
    a = addr(y)
    y.resize_(1024, 64)  # past the map: the storage moves to the CPU allocator's memory
    y.fill_(1.0)
    assert y.sum().item() == 1024 * 64
    assert held() == 2 << 20 and addr(y) != a
    del y
    assert addr(ours(x)) == a


def test_free_maps_are_capped_and_cleared(monkeypatch):
    _, ours = layer_pair("BatchNorm1d", 64)
    outs = [ours(torch.randn(512, 64, requires_grad=True)) for _ in range(3)]  # three maps of 2 MiB
    del outs
    gc.collect()
    assert held() == 3 * (2 << 20) and pool.free_bytes() >= held()
    monkeypatch.setattr(pool, "CAP_BYTES", (2 << 20) + 1)  # NORMLAB_POOL_MB's value
    native.configure(K._native, K._cpu)
    y = ours(torch.randn(512, 64, requires_grad=True))
    del y  # the free maps now pass the cap: the least recently freed go
    assert held() == 2 << 20
    pool.clear()
    assert held() == 0
    monkeypatch.setattr(pool, "CAP_BYTES", 0)  # NORMLAB_POOL_MB=0: no pool
    native.configure(K._native, K._cpu)
    y = ours(torch.randn(512, 64, requires_grad=True))
    del y
    assert held() == 0


@pytest.mark.skipif(not hasattr(os, "fork"), reason="no fork")
def test_a_forked_child_allocates_from_the_pool():
    code = (
        "import os, sys, torch, normlab\n"
        "from normlab import kernels as K\n"
        "from normlab.kernels import native, pool\n"
        "pool.KEPT_MIN_BYTES = 1 << 16\n"
        "native.configure(K._native, K._cpu)\n"
        "m = normlab.BatchNorm1d(64)\n"
        "x = torch.randn(512, 64, requires_grad=True)\n"
        "y = m(x); del y\n"
        "pid = os.fork()\n"
        "if pid == 0:\n"
        "    y = m(x); y.sum().backward(); del y\n"
        "    os._exit(0 if K._native.pool_free_bytes() > 0 else 3)\n"
        "_, status = os.waitpid(pid, 0)\n"
        "sys.exit(os.waitstatus_to_exitcode(status))\n"
    )
    if K._native is None:
        pytest.skip("native glue not loaded")
    env = dict(os.environ, NORMLAB_BACKEND="native")
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
