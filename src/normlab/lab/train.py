"""Train one model on Fashion-MNIST: the whole loop, readable top to bottom.

    normlab train --model lenet --norm bn --epochs 10 --batch-size 256 --lr 1.0 --out runs/lenet-bn

What a run leaves in its directory (``--out``):

* ``config.json``       the ``TrainConfig`` it ran with;
* ``metrics.jsonl``     one JSON object per epoch: epoch, step, train_loss, train_acc, test_acc (running
                        statistics, i.e. ``model.eval()``), test_acc_batch_stats (``model.train()`` on test batches
                        of the training batch size, buffers untouched), test_loss, examples_per_s, epoch_time_s;
* ``checkpoint.safetensors``  model + optimizer state + torch RNG state + epoch, rewritten after every epoch;
* ``curves.png``        loss and accuracies per epoch (d2l style).

Running the same command again resumes from the last completed epoch; because the batch order of epoch ``e`` is a
pure function of ``(seed, e)`` and the checkpoint holds everything else, the resumed run ends bit for bit where
an uninterrupted one would (same threads, same machine). ``resume=False`` (``--fresh``) starts over.

The per-step pieces (``epoch_batches``, ``train_step``, ``evaluate``) are plain functions so that a data-parallel
driver can reuse them: ``epoch_batches`` takes ``rank`` and ``world_size`` and hands each process its shard of the
epoch's permutation; ``train_step`` is one forward/backward/update on one batch.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from .data import Split, load_fashion_mnist
from .models import build_model


@dataclass
class TrainConfig:
    # model
    model: str = "lenet"
    norm: str = "bn"
    impl: str = "normlab"             # normlab | torch | scratch
    placement: str = "before"         # norm before or after the activation
    bn_momentum: float | None = 0.1   # weight of the new batch in the running statistics; None: cumulative
    # optimization
    epochs: int = 10
    max_steps: int | None = None      # stop after this many steps (may end mid-epoch)
    batch_size: int = 256
    lr: float = 0.9
    momentum: float = 0.0             # SGD momentum
    weight_decay: float = 0.0
    seed: int = 0
    # data
    data_dir: str | None = None
    verify_data: bool = True
    download: bool = False
    train_subset: int | None = None   # use the first N training images (None: all 60,000)
    test_subset: int | None = None
    # machinery
    out: str = "runs/train"
    threads: int | None = None
    eval_batch_size: int = 1000
    checkpoint: bool = True
    plots: bool = True
    progress: bool = True
    resume: bool = True

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2)


# Config fields that may change between an interrupted run and its resumption.
_RESUMABLE_CHANGES = {"epochs", "max_steps", "out", "threads", "progress", "plots", "data_dir", "download",
                      "resume", "checkpoint", "eval_batch_size"}


class TrainingError(RuntimeError):
    """The run cannot go on (diverged, impossible batch statistics, mismatched resume); the message says why."""


# ----------------------------------------------------------------------------------------------- data order
def epoch_permutation(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The order of the ``n`` training examples in ``epoch``: a pure function of (seed, epoch)."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=generator)


def epoch_batches(n: int, batch_size: int, seed: int, epoch: int, *, rank: int = 0,
                  world_size: int = 1) -> Iterator[torch.Tensor]:
    """Index tensors of this process's batches for ``epoch``.

    With ``world_size`` processes, process ``rank`` takes every ``world_size``-th example of the shared
    permutation, so the shards are disjoint and together cover the epoch. A final batch of a single example is
    dropped (batch statistics of one value are undefined), any other remainder is kept, as d2l does.
    """
    order = epoch_permutation(n, seed, epoch)[rank::world_size]
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        if len(idx) == 1 and batch_size > 1:
            break
        yield idx


# ----------------------------------------------------------------------------------------------- one step
def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor,
               y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward, backward, update on one batch. Returns (mean loss, number correct), both detached."""
    logits = model(x)
    loss = F.cross_entropy(logits, y)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.detach(), (logits.argmax(dim=1) == y).sum()


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, batch_size: int = 1000,
             batch_stats: bool = False) -> tuple[float, float]:
    """(accuracy, mean loss) on (x, y).

    ``batch_stats=False``: ``model.eval()``, norms use their running statistics (what deployment sees).
    ``batch_stats=True``: ``model.train()`` on a copy, each batch normalized with its own statistics; the copy's
    running buffers absorb the updates, so the model itself is untouched.
    """
    was_training = model.training
    net = copy.deepcopy(model).train() if batch_stats else model.eval()
    correct, loss_sum = 0, 0.0
    for start in range(0, len(y), batch_size):
        xb, yb = x[start:start + batch_size], y[start:start + batch_size]
        if batch_stats and len(yb) < 2:
            break
        logits = net(xb)
        loss_sum += F.cross_entropy(logits, yb, reduction="sum").item()
        correct += (logits.argmax(dim=1) == yb).sum().item()
    model.train(was_training)
    seen = len(y) - (batch_stats and len(y) % batch_size == 1)
    return correct / max(seen, 1), loss_sum / max(seen, 1)


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


# ----------------------------------------------------------------------------------------------- checkpoints
def save_checkpoint(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, epoch: int, step: int) -> None:
    """model + optimizer + RNG + epoch in one safetensors file, written atomically (tmp file, then rename)."""
    from safetensors.torch import save_file
    tensors = {f"model.{k}": v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    opt_state = optimizer.state_dict()
    for index, state in opt_state["state"].items():
        for name, value in state.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optim.{index}.{name}"] = value.detach().clone().contiguous()
    tensors["rng.torch"] = torch.get_rng_state()
    metadata = {"epoch": str(epoch), "step": str(step), "param_groups": json.dumps(opt_state["param_groups"])}
    tmp = path.with_suffix(".tmp")
    save_file(tensors, str(tmp), metadata=metadata)
    os.replace(tmp, path)


def load_checkpoint(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[int, int]:
    """Restore what ``save_checkpoint`` wrote; returns (epoch, step)."""
    from safetensors import safe_open
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    model.load_state_dict({k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")})
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, index, name = key.split(".", 2)
            state.setdefault(int(index), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": json.loads(metadata["param_groups"])})
    torch.set_rng_state(tensors["rng.torch"])
    return int(metadata["epoch"]), int(metadata["step"])


# ----------------------------------------------------------------------------------------------- progress bar
class Progress:
    """A one-line progress bar on stderr (redrawn at most 5 times a second; silent when stderr is no terminal)."""

    def __init__(self, total: int, label: str, enabled: bool = True):
        self.total, self.label = total, label
        self.enabled = enabled and sys.stderr.isatty()
        self.last = 0.0

    def update(self, done: int, loss: torch.Tensor, correct: torch.Tensor, elapsed: float) -> None:
        now = time.perf_counter()
        if not self.enabled or (now - self.last < 0.2 and done < self.total):
            return
        self.last = now
        loss, acc, rate = loss.item() / done, correct.item() / done, done / max(elapsed, 1e-9)
        width = 24
        filled = int(width * done / max(self.total, 1))
        sys.stderr.write(f"\r{self.label} [{'#' * filled}{'.' * (width - filled)}] {done}/{self.total} "
                         f"loss {loss:.3f} acc {acc:.3f} {rate:,.0f} ex/s ")
        sys.stderr.flush()

    def close(self) -> None:
        if self.enabled:
            sys.stderr.write("\r" + " " * 100 + "\r")
            sys.stderr.flush()


# ----------------------------------------------------------------------------------------------- the run
StepHook = Callable[[dict], None]


def train(cfg: TrainConfig, data: tuple[Split, Split] | None = None, on_step: StepHook | None = None,
          log: Callable[[str], None] = print) -> dict:
    """Run ``cfg``; returns {"config", "metrics" (list of per-epoch dicts), "out", "model"}.

    ``data`` (train, test) skips loading from disk (experiments load once). ``on_step(info)`` is called after
    every step with ``info = {"step", "epoch", "loss", "model"}``; it must leave the model in train mode.
    """
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)

    # -- data: the whole split as one float tensor in memory (47 MB for Fashion-MNIST)
    if data is None:
        data = load_fashion_mnist(cfg.data_dir, verify=cfg.verify_data, download_missing=cfg.download)
    train_split, test_split = data[0].subset(cfg.train_subset), data[1].subset(cfg.test_subset)
    x_train, y_train = train_split.float_images(), train_split.labels
    x_test, y_test = test_split.float_images(), test_split.labels
    n = len(y_train)
    if cfg.batch_size < 1:
        raise TrainingError(f"--batch-size must be at least 1, got {cfg.batch_size}")

    # -- model and optimizer, or the state of an interrupted run
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model, cfg.norm, impl=cfg.impl, placement=cfg.placement, momentum=cfg.bn_momentum)
    optimizer = make_optimizer(model, cfg)
    ckpt_path, metrics_path = out / "checkpoint.safetensors", out / "metrics.jsonl"
    start_epoch, step, metrics = 0, 0, []
    if cfg.resume and ckpt_path.exists():
        _check_resumable(out, cfg)
        start_epoch, step = load_checkpoint(ckpt_path, model, optimizer)
        metrics = [m for m in _read_metrics(metrics_path) if m["epoch"] <= start_epoch]
        log(f"resuming {out} after epoch {start_epoch} (step {step})")
    else:
        ckpt_path.unlink(missing_ok=True)
    (out / "config.json").write_text(cfg.to_json() + "\n")
    metrics_path.write_text("".join(json.dumps(m) + "\n" for m in metrics))

    steps_per_epoch = n // cfg.batch_size + (n % cfg.batch_size > 1)  # see epoch_batches
    total_steps = cfg.epochs * steps_per_epoch
    if cfg.max_steps is not None:
        total_steps = min(total_steps, cfg.max_steps)
    last_epoch = math.ceil(total_steps / max(steps_per_epoch, 1))
    model.train()

    for epoch in range(start_epoch + 1, last_epoch + 1):
        # -- one pass over the training data
        t0 = time.perf_counter()
        loss_sum, correct, seen = torch.zeros(()), torch.zeros((), dtype=torch.long), 0
        bar = Progress(n, f"epoch {epoch}/{last_epoch}", cfg.progress)
        for idx in epoch_batches(n, cfg.batch_size, cfg.seed, epoch):
            if step >= total_steps:
                break
            x, y = x_train[idx], y_train[idx]
            try:
                loss, batch_correct = train_step(model, optimizer, x, y)
            except ValueError as err:
                raise TrainingError(f"{cfg.model} with --norm {cfg.norm} cannot train at batch size "
                                    f"{len(idx)}: {err}") from err
            if not torch.isfinite(loss):
                raise TrainingError(f"loss became {loss.item()} at epoch {epoch}, step {step + 1} (lr {cfg.lr}, "
                                    f"norm {cfg.norm}): training diverged. Lower --lr, or use a norm; the last "
                                    f"good state is the checkpoint of epoch {epoch - 1}.")
            step += 1
            loss_sum += loss * len(idx)
            correct += batch_correct
            seen += len(idx)
            if on_step is not None:
                on_step({"step": step, "epoch": epoch, "loss": loss, "model": model})
            bar.update(seen, loss_sum, correct, time.perf_counter() - t0)
        bar.close()
        train_time = time.perf_counter() - t0

        # -- evaluation with running statistics and with batch statistics
        test_acc, test_loss = evaluate(model, x_test, y_test, batch_size=cfg.eval_batch_size)
        test_acc_bs, _ = evaluate(model, x_test, y_test, batch_size=max(cfg.batch_size, 2), batch_stats=True)
        record = {
            "epoch": epoch, "step": step,
            "train_loss": loss_sum.item() / max(seen, 1), "train_acc": correct.item() / max(seen, 1),
            "test_acc": test_acc, "test_acc_batch_stats": test_acc_bs, "test_loss": test_loss,
            "examples_per_s": seen / train_time, "epoch_time_s": time.perf_counter() - t0,
        }
        metrics.append(record)
        with open(metrics_path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if cfg.checkpoint:
            save_checkpoint(ckpt_path, model, optimizer, epoch, step)
        log(f"epoch {epoch:>3}/{last_epoch}  loss {record['train_loss']:.3f}  train acc {record['train_acc']:.3f}"
            f"  test acc {test_acc:.3f} (batch stats {test_acc_bs:.3f})  {record['examples_per_s']:,.0f} ex/s"
            f"  {record['epoch_time_s']:.1f} s")

    if cfg.plots and metrics:
        from .plots import plot_run
        plot_run(metrics, out / "curves.png", title=f"{cfg.model} / {cfg.norm} / lr {cfg.lr}")
    return {"config": cfg, "metrics": metrics, "out": str(out), "model": model}


def _read_metrics(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _check_resumable(out: Path, cfg: TrainConfig) -> None:
    try:
        old = json.loads((out / "config.json").read_text())
    except (OSError, ValueError):
        return
    new = dataclasses.asdict(cfg)
    diff = {k: (old.get(k), v) for k, v in new.items() if k not in _RESUMABLE_CHANGES and old.get(k) != v}
    if diff:
        changes = ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in diff.items())
        raise TrainingError(f"{out} holds a checkpoint of a different run ({changes}). Resume with the same "
                            f"settings, pick another --out, or pass --fresh to start over.")
