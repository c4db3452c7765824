"""normlab.kernels.pool: large kernel outputs reuse the memory of dead outputs, never of live ones.

Safety first: memory goes back to the pool only when no numpy array, tensor or view of it is left; then the
numerics of the pooled path against the portable backend, in every layout and dtype it serves.
"""
from __future__ import annotations

import gc

import numpy as np
import pytest
import torch

from normlab.kernels import cpu, pool, portable

pytestmark = pytest.mark.skipif(cpu is None, reason="numba missing")

BIG = (8, 32, 64, 64)  # 4 MiB of float32


@pytest.fixture(autouse=True)
def _small_threshold(monkeypatch):
    """Pool 1 MiB outputs and up here (the mechanism does not depend on the size; real: 32 MiB)."""
    monkeypatch.setattr(pool, "POOL_MIN_BYTES", 1 << 20)


def _addr(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


def test_memory_returns_only_when_every_view_is_gone():
    x = torch.randn(BIG)
    y = cpu.bn_train_forward(x, None, None, 1e-5)[0]
    addr = _addr(y)
    views = [y.view(8, 32, -1), y[3], y.numpy()[2:], y.transpose(0, 1)]
    del y
    gc.collect()
    others = [cpu.bn_train_forward(x, None, None, 1e-5)[0] for _ in range(3)]  # must not land on live memory
    assert addr not in {_addr(o) for o in others}
    ref = portable.bn_train_forward(x, None, None, 1e-5)[0]
    torch.testing.assert_close(views[0].view(BIG), ref, rtol=1e-5, atol=1e-5)  # untouched by the others
    del others
    gc.collect()
    del views
    gc.collect()
    again = cpu.bn_train_forward(x, None, None, 1e-5)[0]
    assert _addr(again) == addr  # the most recently freed map of this size is reused


def test_reused_memory_holds_the_new_result():
    torch.manual_seed(0)
    for fmt in (torch.contiguous_format, torch.channels_last):
        for _ in range(3):
            x = (torch.randn(BIG) * 3 + 1).contiguous(memory_format=fmt)
            w, b = torch.randn(32), torch.randn(32)
            y, mean, invstd = cpu.bn_train_forward(x, w, b, 1e-5, "relu")
            assert y.stride() == x.stride()
            torch.testing.assert_close(y, portable.bn_train_forward(x, w, b, 1e-5, "relu")[0], rtol=1e-4,
                                       atol=1e-4)
            dy = torch.randn_like(x)
            dx = cpu.bn_backward(dy, x, w, b, mean, invstd, "relu", True)[0]
            assert dx.stride() == x.stride()
            torch.testing.assert_close(dx, portable.bn_backward(dy, x, w, b, mean, invstd, "relu", True)[0],
                                       rtol=1e-4, atol=1e-4)
            del y, dx


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64], ids=str)
def test_pooled_outputs_in_every_storage_dtype(dtype):
    if dtype not in cpu.SUPPORTED_DTYPES:
        pytest.skip(f"{dtype} not handled by the numba backend on this CPU")
    x = torch.randn(8, 32, 64, 64).to(dtype)  # >= 1 MiB in every dtype
    y = cpu.bn_eval_forward(x, torch.zeros(32), torch.ones(32), None, None, 1e-5)
    assert y.dtype == dtype and y.shape == x.shape
    expected = (x.double() / (1 + 1e-5) ** 0.5).to(dtype)
    torch.testing.assert_close(y, expected, rtol=1e-2, atol=1e-2)


def test_free_maps_are_capped(monkeypatch):
    pool.clear()
    monkeypatch.setattr(pool, "CAP_BYTES", 6 << 20)
    arrays = [pool.empty(4 << 20) for _ in range(3)]  # 3 maps of 4 MiB
    assert all(a.flags.writeable and a.nbytes == 4 << 20 for a in arrays)
    del arrays
    gc.collect()
    assert pool._free_bytes == 4 << 20  # one fits under 6 MiB, the other two were unmapped (this pool's alone)
    monkeypatch.setattr(pool, "CAP_BYTES", 0)
    a = pool.empty(5 << 20)
    del a
    gc.collect()
    assert pool._free_bytes == 0


def test_cap_from_environment(monkeypatch):
    monkeypatch.setenv("NORMLAB_POOL_MB", "1.5")
    assert pool._cap_from_env() == 3 << 19
    monkeypatch.setenv("NORMLAB_POOL_MB", "lots")
    with pytest.raises(ValueError, match="NORMLAB_POOL_MB"):
        pool._cap_from_env()


def test_pool_arrays_do_not_share_memory():
    a, b = pool.empty(4 << 20), pool.empty(4 << 20)
    a[:] = 1
    b[:] = 2
    assert not np.shares_memory(a, b) and a.max() == 1


def test_training_outputs_and_gradients_are_pooled_from_the_smaller_size(monkeypatch):
    """Outputs that outlive the call (a training y, a dx) from KEPT_MIN_BYTES; evaluation outputs from
    POOL_MIN_BYTES only."""
    monkeypatch.setattr(pool, "POOL_MIN_BYTES", 32 << 20)
    x = torch.randn(4, 16, 64, 64)  # 1 MiB
    assert pool.KEPT_MIN_BYTES <= x.numel() * 4 < pool.POOL_MIN_BYTES
    pool.clear()
    y_eval = cpu.bn_eval_forward(x, torch.zeros(16), torch.ones(16), None, None, 1e-5)
    del y_eval
    gc.collect()
    assert pool._free_bytes == 0
    y, mean, invstd = cpu.bn_train_forward(x, None, None, 1e-5)
    dx = cpu.bn_backward(torch.randn_like(x), x, None, None, mean, invstd, "identity", True)[0]
    torch.testing.assert_close(y, portable.bn_train_forward(x, None, None, 1e-5)[0], rtol=1e-5, atol=1e-5)
    del y, dx
    gc.collect()
    assert pool._free_bytes == 2 * (2 << 20)
