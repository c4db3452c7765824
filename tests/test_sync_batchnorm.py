"""SyncBatchNorm against single-process BatchNorm on the concatenated batch.

The multi-process checks run in ONE spawn of 3 gloo processes on 127.0.0.1 (process start-up dominates the
cost), each rank writing its results to a file that the test process compares with a single-process
``normlab.BatchNorm*d`` run on the concatenation of every rank's batch. Tolerances: float32 rounding
(rtol = atol = 1e-5 on outputs/gradients normalized to O(1); running statistics 1e-6 relative).
"""
from __future__ import annotations

import copy
import datetime
import os
import socket
import tempfile
import time
import zlib

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import normlab
from normlab.kernels import use_backend
from normlab.lab.distributed import teardown
from normlab.nn.syncbatchnorm import SyncBatchNorm

WORLD = 3

# name -> (per-rank local batch sizes, trailing shape, channels, act, momentum, steps, data offset)
CASES = {
    "uneven_1_2_7": ([1, 2, 7], (5, 4), 3, "identity", 0.1, 2, 0.0),
    "empty_rank_1d": ([0, 4, 3], (), 5, "relu", None, 2, 0.0),
    "flat_rank_3d": ([2, 1, 0], (3, 2, 2), 2, "silu", 0.3, 1, 0.0),
    "large_mean": ([3, 3, 4], (6, 6), 2, "identity", 0.1, 1, 1e4),  # checked against float64 below
    "ones_and_zero": ([1, 1, 0], (2,), 4, "sigmoid", 1.0, 2, 0.0),
}


def _bn_class(trailing):
    return {0: normlab.BatchNorm1d, 1: normlab.BatchNorm1d, 2: normlab.BatchNorm2d,
            3: normlab.BatchNorm3d}[len(trailing)]


def _case_data(name, step):
    sizes, trailing, c, _, _, _, offset = CASES[name]
    g = torch.Generator().manual_seed(zlib.crc32(f"{name}/{step}".encode()))
    total = sum(sizes)
    spread = 1 + torch.arange(c).reshape([1, c] + [1] * len(trailing))
    x = torch.randn((total, c) + trailing, generator=g) * spread
    x = x + offset
    dy = torch.randn((total, c) + trailing, generator=g)
    return x, dy


def _init_params(mod, c):
    with torch.no_grad():
        if mod.weight is not None:
            mod.weight.copy_(torch.linspace(0.5, 1.5, c))
            mod.bias.copy_(torch.linspace(-0.3, 0.4, c))


def _run_case(name, make, rank=None, dtype=torch.float32):
    """Run a case; with ``rank`` on that rank's slice of the batch, else on the whole batch."""
    sizes, trailing, c, act, momentum, steps, _ = CASES[name]
    mod = make(c, act, momentum).to(dtype)
    _init_params(mod, c)
    outs = []
    for step in range(steps):
        x, dy = _case_data(name, step)
        if rank is not None:
            lo = sum(sizes[:rank])
            x, dy = x[lo:lo + sizes[rank]], dy[lo:lo + sizes[rank]]
        x, dy = x.to(dtype), dy.to(dtype)
        x = x.clone().requires_grad_(True)
        mod.zero_grad()
        y = mod(x)
        y.backward(dy)
        outs.append({"y": y.detach(), "dx": x.grad, "dw": mod.weight.grad.clone(), "db": mod.bias.grad.clone()})
    return outs, {k: v.clone() for k, v in mod.state_dict().items()}


def _make_sync(c, act, momentum):
    return SyncBatchNorm(c, momentum=momentum, act=act)


def _make_single_for(trailing):
    def make(c, act, momentum):
        m = _bn_class(trailing)(c, momentum=momentum)
        m.act = act  # the base class applies ``act`` (fused), as BatchNormAct does
        return m
    return make


class _CollectiveCounter:
    """Counts all_gather / all_reduce calls made through torch.distributed while active."""

    def __init__(self):
        self.calls = 0
        self._saved = {}

    def __enter__(self):
        for name in ("all_gather", "all_reduce", "all_gather_into_tensor", "broadcast"):
            original = getattr(dist, name)
            self._saved[name] = original

            def counted(*a, _original=original, **k):
                self.calls += 1
                return _original(*a, **k)
            setattr(dist, name, counted)
        return self

    def __exit__(self, *exc):
        for name, original in self._saved.items():
            setattr(dist, name, original)


def _worker(rank, world, port, outdir):
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    with use_backend("portable"):  # the sync logic is under test here, not the (JIT-compiled) CPU kernels
        _checks(rank, world, port, outdir)
    print(f"rank {rank}: checks took {time.perf_counter() - t0:.1f} s", flush=True)


def _checks(rank, world, port, outdir):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=30))
    results = {}
    for name in CASES:
        results[name] = _run_case(name, _make_sync, rank)

    # evaluation issues no collective, and equals BatchNorm in eval mode with the same buffers
    m = SyncBatchNorm(3)
    _init_params(m, 3)
    m.running_mean.normal_()
    m.running_var.uniform_(0.5, 2)
    m.eval()
    x = torch.randn(rank + 1, 3, 4, 4, requires_grad=True)  # different sizes per rank, would not match
    with _CollectiveCounter() as counter:
        y = m(x)
        y.sum().backward()
    results["eval"] = {"calls": counter.calls, "x": x.detach(), "y": y.detach(), "dx": x.grad,
                       "state": m.state_dict()}

    # a global batch of one value per channel raises ValueError on every rank, and the group still works
    m = SyncBatchNorm(4)
    try:
        m(torch.randn(1 if rank == 0 else 0, 4))
        results["one_value"] = "no error"
    except ValueError as err:
        results["one_value"] = str(err)
    results["one_value_nbt"] = int(m.num_batches_tracked)
    t = torch.ones(1)
    dist.all_reduce(t)
    results["after_error"] = float(t)

    # training forward without input gradient: no backward collective is needed, forward still syncs
    m = SyncBatchNorm(2)
    with _CollectiveCounter() as counter:
        m(torch.randn(2, 2)).sum().backward()
    results["no_input_grad_calls"] = counter.calls

    # a lost peer: rank 2 stops calling the layer; ranks 0 and 1 get a clear error after the deadline
    if rank == world - 1:
        time.sleep(2.0)
        results["lost_peer"] = None
    else:
        m = SyncBatchNorm(2, timeout=datetime.timedelta(seconds=0.5))
        t0 = time.perf_counter()
        try:
            m(torch.randn(3, 2))
            results["lost_peer"] = ("no error", 0.0)
        except RuntimeError as err:
            results["lost_peer"] = (str(err), time.perf_counter() - t0)
    torch.save(results, os.path.join(outdir, f"rank{rank}.pt"))
    teardown(finished=False)  # no barrier: the lost-peer check may have broken the group


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def spawned():
    with tempfile.TemporaryDirectory() as outdir:
        mp.spawn(_worker, args=(WORLD, _free_port(), outdir), nprocs=WORLD, join=True)
        yield [torch.load(os.path.join(outdir, f"rank{r}.pt"), weights_only=False) for r in range(WORLD)]


def _close(a, b, tol=1e-5):
    torch.testing.assert_close(a, b, rtol=tol, atol=tol)


@pytest.mark.parametrize("name", list(CASES))
def test_matches_single_process_on_concatenated_batch(spawned, name):
    sizes, trailing = CASES[name][0], CASES[name][1]
    ref_steps, ref_state = _run_case(name, _make_single_for(trailing))
    exact_steps, _ = _run_case(name, _make_single_for(trailing), dtype=torch.float64)
    for step, ref in enumerate(ref_steps):
        y = torch.cat([spawned[r][name][0][step]["y"] for r in range(WORLD)])
        dx = torch.cat([spawned[r][name][0][step]["dx"] for r in range(WORLD)])
        if CASES[name][6] == 0:
            _close(y, ref["y"])
            _close(dx, ref["dx"])
        else:  # 1e4 + N(0, 1): float32 data; both must be as close to the float64 truth as BatchNorm is
            for ours, theirs, key in ((y, ref["y"], "y"), (dx, ref["dx"], "dx")):
                exact = exact_steps[step][key]
                err_ours = (ours.double() - exact).abs().max().item()
                err_bn = (theirs.double() - exact).abs().max().item()
                assert err_ours <= 2 * err_bn + 1e-6, (key, err_ours, err_bn)
        # parameter gradients are local sums: their sum over ranks is the single-process gradient
        for key in ("dw", "db"):
            total = sum(spawned[r][name][0][step][key] for r in range(WORLD))
            if CASES[name][6] == 0:
                _close(total, ref[key], tol=2e-5)
            else:  # 1e4 + N(0, 1): both keep the mean's shift apart from x - mean; compare both to float64
                for got in (total, ref[key]):
                    torch.testing.assert_close(got.double(), exact_steps[step][key], rtol=2e-5, atol=2e-5)
        for r in range(WORLD):
            assert spawned[r][name][0][step]["y"].shape[0] == sizes[r]
    for r in range(WORLD):
        state = spawned[r][name][1]
        assert state.keys() == ref_state.keys()
        torch.testing.assert_close(state["running_mean"], ref_state["running_mean"], rtol=1e-6,
                                   atol=1e-6 * (1 + abs(CASES[name][6])))
        torch.testing.assert_close(state["running_var"], ref_state["running_var"], rtol=1e-5, atol=1e-6)
        assert int(state["num_batches_tracked"]) == int(ref_state["num_batches_tracked"]) == CASES[name][5]
        # identical on all ranks, bit for bit
        for key in state:
            assert torch.equal(state[key], spawned[0][name][1][key])


def test_eval_issues_no_collective_and_equals_batchnorm(spawned):
    for r in range(WORLD):
        res = spawned[r]["eval"]
        assert res["calls"] == 0
        bn = normlab.BatchNorm2d(3)
        bn.load_state_dict(res["state"])
        bn.eval()
        x = res["x"].clone().requires_grad_(True)
        with use_backend("portable"):  # the backend the workers use
            y = bn(x)
            y.sum().backward()
        assert torch.equal(y, res["y"])
        assert torch.equal(x.grad, res["dx"])


def test_global_batch_of_one_raises_everywhere(spawned):
    for r in range(WORLD):
        assert "more than 1 value per channel" in spawned[r]["one_value"]
        assert spawned[r]["one_value_nbt"] == 0
        assert spawned[r]["after_error"] == WORLD


def test_collectives_per_step(spawned):
    # one all_gather in forward; no all_reduce when the input needs no gradient
    assert all(spawned[r]["no_input_grad_calls"] == 1 for r in range(WORLD))


def test_lost_peer_raises_clear_error_after_timeout(spawned):
    for r in range(WORLD - 1):
        message, waited = spawned[r]["lost_peer"]
        assert "SyncBatchNorm" in message and "failed" in message and "timeout" in message, message
        assert waited < 10.0


# ------------------------------------------------------------------------------------------------------------
# single process
# ------------------------------------------------------------------------------------------------------------
def _pair(c=3):
    torch.manual_seed(0)
    sync, bn = SyncBatchNorm(c), normlab.BatchNorm2d(c)
    _init_params(sync, c)
    _init_params(bn, c)
    return sync, bn


def _same_step(sync, bn, x):
    xs, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    ys, yb = sync(xs), bn(xb)
    ys.pow(2).sum().backward()
    yb.pow(2).sum().backward()
    assert torch.equal(ys, yb)
    assert torch.equal(xs.grad, xb.grad)
    assert torch.equal(sync.weight.grad, bn.weight.grad)
    for key, value in bn.state_dict().items():
        assert torch.equal(sync.state_dict()[key], value)


def test_without_process_group_is_batchnorm():
    assert not dist.is_initialized()
    sync, bn = _pair()
    _same_step(sync, bn, torch.randn(6, 3, 4, 4))
    with pytest.raises(ValueError, match="more than 1 value"):
        sync(torch.randn(1, 3, 1, 1))


def test_world_size_one_is_batchnorm_without_collective(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        sync, bn = _pair()
        with _CollectiveCounter() as counter:
            _same_step(sync, bn, torch.randn(5, 3, 2, 3))
        assert counter.calls == 0
    finally:
        dist.destroy_process_group()


def _toy_model():
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 6),
                         nn.BatchNorm1d(6, momentum=None), normlab.BatchNorm2d(1),
                         nn.Sequential(normlab.BatchNorm3d(2, affine=False)))


def test_convert_and_revert_round_trip():
    torch.manual_seed(0)
    model = _toy_model()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.BatchNorm2d, nn.BatchNorm1d, normlab.nn.batchnorm._BatchNorm)):
                m.running_mean.uniform_()
                m.running_var.uniform_(1, 2)
                m.num_batches_tracked.fill_(7)
                if m.affine:
                    m.weight.uniform_()
    model[1].weight.requires_grad_(False)
    model[5].eval()
    before = copy.deepcopy(model.state_dict())
    w = model[1].weight

    converted = SyncBatchNorm.convert_sync_batchnorm(model)
    kinds = [type(m).__name__ for m in converted.modules() if "Norm" in type(m).__name__]
    assert kinds == ["SyncBatchNorm"] * 4
    assert converted[1].weight is w and not converted[1].weight.requires_grad
    assert not converted[5].training and converted[1].training
    assert converted[5].momentum is None and converted[7][0].affine is False
    assert converted.state_dict().keys() == before.keys()
    for key, value in before.items():
        assert torch.equal(converted.state_dict()[key], value), key

    reverted = SyncBatchNorm.revert_sync_batchnorm(converted)
    assert [type(m) for m in reverted.modules() if "Norm" in type(m).__name__] == [
        normlab.BatchNorm2d, normlab.BatchNorm1d, normlab.BatchNorm2d, normlab.BatchNorm3d]
    assert reverted[1].weight is w
    for key, value in before.items():
        assert torch.equal(reverted.state_dict()[key], value), key
    # the reverted model runs and matches the torch.nn original in eval mode
    x = torch.randn(2, 1, 6, 6)
    original = _toy_model()
    original.load_state_dict(before)
    original.eval(), reverted.eval()
    _close(reverted[:6](x), original[:6](x))


def test_convert_keeps_fused_activation_and_revert_by_input_rank():
    from normlab.nn.batchnorm_act import BatchNormAct2d
    bn = BatchNormAct2d(3, act="silu", momentum=0.2)
    model = SyncBatchNorm.convert_sync_batchnorm(nn.Sequential(bn))
    sync = model[0]
    assert isinstance(sync, SyncBatchNorm) and sync.act == "silu" and sync.weight is bn.weight
    x = torch.randn(4, 3, 2, 2)
    torch.testing.assert_close(sync(x), bn(x))
    back = SyncBatchNorm.revert_sync_batchnorm(model)[0]
    assert type(back) is BatchNormAct2d and back.act == "silu" and back.momentum == 0.2
    assert torch.equal(back.running_mean, sync.running_mean)
    fresh = SyncBatchNorm(3)
    with pytest.raises(ValueError, match="dim="):
        SyncBatchNorm.revert_sync_batchnorm(fresh)
    fresh(torch.randn(2, 3, 4, 4, 4))
    assert type(SyncBatchNorm.revert_sync_batchnorm(fresh)) is normlab.BatchNorm3d
    assert type(SyncBatchNorm.revert_sync_batchnorm(SyncBatchNorm(3), dim=1)) is normlab.BatchNorm1d


def test_convert_from_torch_syncbatchnorm_needs_dim_to_revert():
    theirs = nn.SyncBatchNorm(4, momentum=0.3)
    ours = SyncBatchNorm.convert_sync_batchnorm(theirs)
    assert isinstance(ours, SyncBatchNorm) and ours.momentum == 0.3 and ours.weight is theirs.weight
    assert type(SyncBatchNorm.revert_sync_batchnorm(ours, dim=2)) is normlab.BatchNorm2d


def test_state_dict_moves_to_and_from_torch_syncbatchnorm():
    ours = SyncBatchNorm(4)
    theirs = nn.SyncBatchNorm(4)
    ours.running_mean.fill_(0.5)
    theirs.load_state_dict(ours.state_dict())
    ours.load_state_dict(theirs.state_dict())
    assert torch.equal(theirs.running_mean, ours.running_mean)
