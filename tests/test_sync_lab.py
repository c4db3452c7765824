"""normlab.lab.distributed: one 2-process launch checks DDP + SyncBatchNorm training against one process.

With the ``sync`` policy, a global batch split by ``shard_batch`` (uneven: 7 = 4 + 3) and the loss scaled by
``train_step``, a few SGD steps on 2 processes land on the same parameters and buffers as on one process.
The ``average`` policy's buffer averaging is checked against the mean of the per-rank buffers.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from torch import nn

import normlab
from normlab.kernels import use_backend
from normlab.lab import distributed as D

GLOBAL_BATCH, STEPS = 7, 3


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), normlab.BatchNorm2d(4), nn.ReLU(),
                         nn.Flatten(), nn.Linear(4 * 5 * 5, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))


def _data():
    g = torch.Generator().manual_seed(3)
    return torch.randn(STEPS, GLOBAL_BATCH, 2, 5, 5, generator=g), torch.randint(0, 3, (STEPS, GLOBAL_BATCH),
                                                                                 generator=g)


def _train(policy, rank=0, world=1):
    model = D.prepare_model(_model(), policy)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    xs, ys = _data()
    for x, y in zip(xs, ys):
        mine = D.shard_batch(torch.arange(GLOBAL_BATCH), rank, world)
        D.train_step(model, optimizer, x[mine], y[mine], GLOBAL_BATCH)
    return D.unwrap(model)


def _worker(rank, world, outdir):
    with use_backend("portable"):
        synced = _train("sync", rank, world)
        kinds = sorted({type(m).__name__ for m in synced.modules() if "Norm" in type(m).__name__})
        local = _train("average", rank, world)
        before = [b.clone() for b in D.bn_buffers(local)]
        D.average_bn_buffers(local)
        torch.save({"sync": D.eval_copy(synced).state_dict(), "kinds": kinds, "local_before": before,
                    "local_after": [b.clone() for b in D.bn_buffers(local)]},
                   os.path.join(outdir, f"rank{rank}.pt"))
        # the --nproc driver itself, on a few Fashion-MNIST images (uneven last batch: 70 = 32 + 32 + 6)
        D._train_worker(rank, world, _tiny_config(os.path.join(outdir, "run")), "sync", None)


def _tiny_config(out):
    from normlab.lab.train import TrainConfig
    return TrainConfig(model="lenet", norm="bn", epochs=1, batch_size=32, lr=0.5, train_subset=70, test_subset=40,
                       verify_data=False, out=out, plots=False, progress=False, eval_batch_size=40)


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    outdir = str(tmp_path_factory.mktemp("lab"))
    os.makedirs(os.path.join(outdir, "run"))
    D.launch(_worker, 2, outdir, backend="gloo", timeout_s=60, threads=1)
    results = [torch.load(os.path.join(outdir, f"rank{r}.pt"), weights_only=False) for r in range(2)]
    results[0]["run"] = os.path.join(outdir, "run")
    return results


def test_sync_policy_trains_like_one_process(results):
    with use_backend("portable"):
        single = _train("sync").state_dict()
    assert results[0]["kinds"] == ["SyncBatchNorm"]
    for r in range(2):
        state = results[r]["sync"]
        assert state.keys() == single.keys()
        for key, value in single.items():
            if value.is_floating_point():
                torch.testing.assert_close(state[key], value, rtol=1e-4, atol=1e-5, msg=key)
            else:
                assert torch.equal(state[key], value), key


def test_average_policy_averages_running_statistics(results):
    for a, b, after0, after1 in zip(results[0]["local_before"], results[1]["local_before"],
                                    results[0]["local_after"], results[1]["local_after"]):
        assert not torch.equal(a, b)  # the ranks saw different shards
        torch.testing.assert_close(after0, (a + b) / 2)
        assert torch.equal(after0, after1)


def test_single_process_prepare_is_identity():
    model = _model()
    assert D.prepare_model(model, "sync") is model
    with pytest.raises(ValueError, match="policy"):
        D.prepare_model(model, "global")
    assert D.shard_batch(torch.arange(7), 1, 3).tolist() == [1, 4]


def test_nproc_driver_matches_one_process(results, tmp_path):
    two = D._read_jsonl(Path(results[0]["run"]) / "metrics.jsonl")
    with use_backend("portable"):
        one = D.train_distributed(_tiny_config(str(tmp_path)), 1, "sync", log=lambda line: None)["metrics"]
    assert len(one) == len(two) == 1 and two[0]["nproc"] == 2 and two[0]["step"] == one[0]["step"] == 3
    for key in ("train_loss", "train_acc", "test_acc", "test_loss"):
        assert abs(one[0][key] - two[0][key]) < 1e-4, key
    a, b = torch.load(tmp_path / "model.pt"), torch.load(Path(results[0]["run"]) / "model.pt")
    for key, value in a.items():
        torch.testing.assert_close(b[key], value, rtol=1e-4, atol=1e-5, msg=key)


def _ddp_leaves_cycles(rank, world):
    for _ in range(2):  # unreachable DDP wrappers (reference cycles) still holding the group when fn returns
        model = D.prepare_model(nn.Sequential(nn.Linear(6, 6), nn.BatchNorm1d(6), nn.Linear(6, 2)), "local")
        model(torch.randn(4, 6)).sum().backward()


def test_launch_exits_cleanly_after_ddp():
    # before launch's teardown collected them, the gloo threads of such a group died with the interpreter
    # and about a third of these runs aborted (SIGABRT, "terminate called without an active exception")
    for _ in range(3):
        D.launch(_ddp_leaves_cycles, 2, backend="gloo", timeout_s=60, threads=1)
