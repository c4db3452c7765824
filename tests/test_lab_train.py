"""The training loop on tiny synthetic data: outputs, resume after an interrupt, divergence, batch size 1."""
import json

import pytest
import torch

from normlab.lab.data import load_fashion_mnist, write_synthetic
from normlab.lab.train import TrainConfig, TrainingError, epoch_batches, train


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    directory = tmp_path_factory.mktemp("fmnist")
    write_synthetic(directory, n_train=300, n_test=100)
    return str(directory), load_fashion_mnist(directory, verify=False)


def _cfg(tmp_path, data_dir, **kw):
    base = dict(model="lenet", norm="bn", impl="torch", epochs=1, batch_size=32, lr=1.0, out=str(tmp_path / "run"),
                data_dir=data_dir, verify_data=False, progress=False, threads=1)
    base.update(kw)
    return TrainConfig(**base)


def test_one_epoch_writes_run_dir(tiny, tmp_path):
    data_dir, _ = tiny
    result = train(_cfg(tmp_path, data_dir), log=lambda s: None)  # loads from disk
    run = tmp_path / "run"
    assert {p.name for p in run.iterdir()} >= {"config.json", "metrics.jsonl", "checkpoint.safetensors",
                                              "curves.png"}
    (line,) = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    for key in ("epoch", "train_loss", "train_acc", "test_acc", "test_acc_batch_stats", "examples_per_s"):
        assert key in line
    assert line["epoch"] == 1 and line["step"] == 10 and 0 <= line["test_acc"] <= 1
    assert json.loads((run / "config.json").read_text())["model"] == "lenet"
    assert result["metrics"] == [line]


def test_learns_synthetic_task(tiny, tmp_path):
    _, data = tiny
    result = train(_cfg(tmp_path, None, model="mlp", epochs=3, lr=0.1, momentum=0.9, plots=False), data=data,
                   log=lambda s: None)
    assert result["metrics"][-1]["test_acc"] > 0.5


@pytest.mark.parametrize("model,momentum", [("lenet", 0.0), ("mlp", 0.9)])
def test_resume_after_interrupt_gives_identical_result(tiny, tmp_path, model, momentum):
    _, data = tiny
    kw = dict(model=model, epochs=3, momentum=momentum, lr=0.5 if model == "lenet" else 0.05, plots=False)
    straight = train(_cfg(tmp_path / "a", None, **kw), data=data, log=lambda s: None)

    def interrupt(info):
        if info["epoch"] == 2 and info["step"] == 13:  # mid-way through epoch 2
            raise KeyboardInterrupt

    cfg = _cfg(tmp_path / "b", None, **kw)
    with pytest.raises(KeyboardInterrupt):
        train(cfg, data=data, on_step=interrupt, log=lambda s: None)
    lines = (tmp_path / "b" / "run" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 1  # epoch 1 finished and was checkpointed
    messages = []
    resumed = train(cfg, data=data, log=messages.append)
    assert messages[0].startswith("resuming") and "after epoch 1" in messages[0]
    drop = ("examples_per_s", "epoch_time_s")
    strip = lambda ms: [{k: v for k, v in m.items() if k not in drop} for m in ms]  # noqa: E731
    assert strip(resumed["metrics"]) == strip(straight["metrics"])
    for (k, a), (_, b) in zip(straight["model"].state_dict().items(), resumed["model"].state_dict().items()):
        assert torch.equal(a, b), k
    # a finished run resumes to itself without training
    again = train(cfg, data=data, log=lambda s: None)
    assert strip(again["metrics"]) == strip(straight["metrics"])


def test_resume_refuses_a_different_run(tiny, tmp_path):
    _, data = tiny
    train(_cfg(tmp_path, None, plots=False, train_subset=64), data=data, log=lambda s: None)
    with pytest.raises(TrainingError, match=r"different run \(lr: 1.0 -> 0.5\).*--fresh"):
        train(_cfg(tmp_path, None, plots=False, train_subset=64, lr=0.5), data=data, log=lambda s: None)
    train(_cfg(tmp_path, None, plots=False, train_subset=64, lr=0.5, resume=False), data=data, log=lambda s: None)


def test_nan_loss_stops_with_message(tiny, tmp_path):
    _, data = tiny
    with pytest.raises(TrainingError, match=r"loss became nan .* diverged"):
        train(_cfg(tmp_path, None, model="mlp", norm="none", lr=1e6, plots=False), data=data, log=lambda s: None)


def test_batch_size_one_with_bn_is_a_clear_error(tiny, tmp_path):
    _, data = tiny
    with pytest.raises(TrainingError, match=r"batch size 1: .*more than 1 value per channel"):
        train(_cfg(tmp_path, None, batch_size=1, plots=False), data=data, log=lambda s: None)
    # per-sample norms train at batch size 1
    train(_cfg(tmp_path, None, norm="gn", batch_size=1, train_subset=8, test_subset=8, plots=False,
               resume=False), data=data, log=lambda s: None)


def test_epoch_batches_shard_and_drop_single():
    full = torch.cat(list(epoch_batches(10, 4, seed=0, epoch=1)))
    assert sorted(full.tolist()) == list(range(10))
    shards = [torch.cat(list(epoch_batches(12, 2, seed=0, epoch=1, rank=r, world_size=2))) for r in range(2)]
    assert sorted(torch.cat(shards).tolist()) == list(range(12))
    assert [len(b) for b in epoch_batches(9, 4, seed=0, epoch=1)] == [4, 4]  # a lone last example is dropped
    assert not torch.equal(torch.cat(list(epoch_batches(10, 4, 0, 1))), torch.cat(list(epoch_batches(10, 4, 0, 2))))
