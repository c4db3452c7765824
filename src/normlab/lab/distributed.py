"""Data-parallel training for the lab: ``normlab train ... --nproc N`` (or under ``torchrun``).

Pieces, each usable on its own:

* :func:`launch` starts N processes on this machine (``torch.multiprocessing.spawn``) joined in a gloo group on
  127.0.0.1 (NCCL when CUDA is there, one GPU per process); :func:`init_from_env` joins the group ``torchrun``
  prepared instead.
* :func:`prepare_model` applies a **BN statistics policy** and wraps the model in ``DistributedDataParallel``.
* :func:`shard_batch` gives each rank its part of a global batch; :func:`make_sampler` is the
  ``DistributedSampler`` equivalent for code that uses a ``DataLoader``.
* :func:`train_distributed` is the whole ``--nproc`` run, built from ``normlab.lab.train``'s pieces.
* :func:`benchmark_sync` measures SyncBatchNorm's overhead and data-parallel scaling (see BENCHMARKS.md).

BN statistics policies (``POLICIES``)
-------------------------------------
``sync``     every BatchNorm becomes :class:`normlab.SyncBatchNorm`: statistics over the whole global batch. With
             the global batch split over the ranks as :func:`shard_batch` does, a step computes the same thing as
             one process on the global batch (up to float rounding), so results do not depend on N. Costs one
             small all_gather per BN layer in forward and one all_reduce in backward.
``local``    each rank normalizes with its own shard's statistics (plain DDP): no extra communication, but the
             effective BN batch is the per-rank batch, and each rank's running statistics differ; rank 0's are
             the ones evaluated and saved (DDP's default ``broadcast_buffers=True`` leads to the same thing; we
             turn it off to save a broadcast per step).
``average``  as ``local`` during training, then the running statistics are all-reduced (averaged over ranks)
             before every evaluation / save (:func:`average_bn_buffers`): one collective per epoch, and
             evaluation uses the average of the ranks' estimates rather than rank 0's alone (every rank then
             continues from the averaged buffers).

Batch convention: ``cfg.batch_size`` is the **global** batch. Every rank walks the same permutation of the
epoch (``train.epoch_permutation``), cuts the same global batches, and keeps every N-th example of each
(:func:`shard_batch`); each rank's loss is its sum over its examples divided by the global batch size (times N,
since DDP averages gradients), so the gradient is the global batch's mean-loss gradient even when the shards are
uneven (the last batch of an epoch).

Command line: ``normlab train --nproc N --bn-policy {sync,local,average}`` calls
``train_distributed(cfg, N, policy)`` instead of ``train(cfg)`` when ``N > 1`` or :func:`under_torchrun` (then
``torchrun --nproc-per-node N -m normlab.cli train ...`` works as well). Differences from ``train``: the batch is
global, the run always starts fresh (no resume), and the model is saved as ``model.pt`` (a plain state_dict).

Failure: the process group is created with a timeout (``timeout_s``, default 300 s); a collective that cannot
complete because a peer died raises instead of hanging, and :func:`launch` re-raises the failing worker's error.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import datetime
import gc
import inspect
import json
import math
import os
import socket
import time
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

POLICIES = ("sync", "local", "average")
# Before torch 2.8, destroy_process_group waits forever on a gloo collective that a rank abandoned after a deadline
# (SyncBatchNorm's lost-peer error); such a group is left as it is, and the process still exits cleanly.
_DESTROY_WAITS_ON_ABANDONED = torch.__version__ < "2.8"
DEFAULT_TIMEOUT_S = 300.0


# ------------------------------------------------------------------------------------------- process groups
def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def default_backend() -> str:
    return "nccl" if torch.cuda.is_available() and dist.is_nccl_available() else "gloo"


def under_torchrun() -> bool:
    """Whether this process was started by ``torchrun`` (or another launcher setting RANK/WORLD_SIZE)."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def init_from_env(backend: str | None = None, timeout_s: float = DEFAULT_TIMEOUT_S) -> tuple[int, int]:
    """Join the process group ``torchrun`` describes in the environment; returns ``(rank, world_size)``."""
    if not dist.is_initialized():
        dist.init_process_group(backend or default_backend(), init_method="env://",
                                timeout=datetime.timedelta(seconds=timeout_s))
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", dist.get_rank())) % torch.cuda.device_count())
    return dist.get_rank(), dist.get_world_size()


def _entry(rank: int, fn: Callable, world: int, port: int, backend: str, timeout_s: float, threads: int,
           args: tuple) -> None:
    torch.set_num_threads(threads)
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=timeout_s))
    if backend == "nccl":
        torch.cuda.set_device(rank % torch.cuda.device_count())
    with leaving_group():
        fn(rank, world, *args)


@contextlib.contextmanager
def leaving_group(owned: bool = True):
    """Run the block, then :func:`teardown` (when ``owned``), telling it whether the block finished."""
    finished = False
    try:
        yield
        finished = True
    finally:
        if owned:
            teardown(finished)


def teardown(finished: bool = True) -> None:
    """Leave the process group so that the process can exit cleanly.

    ``destroy_process_group`` only drops the group's registry entry: a ``DistributedDataParallel`` wrapper that
    is already unreachable but not yet collected (it sits in reference cycles) still holds the group, whose
    gloo threads then die with the interpreter at exit, and the process aborts ("terminate called without an
    active exception", SIGABRT in about a third of 2-process runs here). Collecting garbage first releases
    them while the interpreter is alive. After a clean finish the ranks also meet at a barrier, so that none
    tears down while another still communicates; after an error they do not (a lost peer would block it), and
    with a torch before 2.8 the group is not destroyed either (see _DESTROY_WAITS_ON_ABANDONED).
    """
    if not (dist.is_available() and dist.is_initialized()):
        return
    gc.collect()
    if not finished and _DESTROY_WAITS_ON_ABANDONED:
        return
    try:
        if finished:
            dist.barrier()
        dist.destroy_process_group()
    except Exception:  # a broken group (lost peer) cannot be torn down cleanly; the error is already raised
        pass
    gc.collect()


def launch(fn: Callable[..., Any], nproc: int, *args, backend: str | None = None,
           timeout_s: float = DEFAULT_TIMEOUT_S, threads: int | None = None) -> None:
    """Run ``fn(rank, world_size, *args)`` in ``nproc`` new processes joined in one process group.

    ``fn`` must be importable (a module-level function), as for any ``spawn``. Each process gets ``threads``
    intra-op threads (default: the machine's cores divided by ``nproc``). Returns when all have finished; an
    exception in any of them is re-raised here (``torch.multiprocessing.ProcessRaisedException``).
    """
    if nproc < 1:
        raise ValueError(f"nproc must be at least 1, got {nproc}")
    threads = threads or max(1, (os.cpu_count() or 1) // nproc)
    mp.spawn(_entry, args=(fn, nproc, free_port(), backend or default_backend(), timeout_s, threads, args),
             nprocs=nproc, join=True)


def rank_and_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


# ------------------------------------------------------------------------------------------- model and data
def prepare_model(model: nn.Module, policy: str = "sync", *, process_group=None,
                  device_ids: list[int] | None = None) -> nn.Module:
    """Apply the BN ``policy`` (see the module docstring) and wrap in ``DistributedDataParallel``.

    Without a process group of more than one process, the model comes back unwrapped and unconverted.
    """
    if policy not in POLICIES:
        raise ValueError(f"unknown BN policy {policy!r}; choose from {POLICIES}")
    if rank_and_world()[1] == 1:
        return model
    if policy == "sync":
        from normlab.nn.syncbatchnorm import SyncBatchNorm
        model = SyncBatchNorm.convert_sync_batchnorm(model, process_group)
    ddp = nn.parallel.DistributedDataParallel
    # buffers are not broadcast before each forward (rank 0's are synced once, at wrap time): sync keeps them
    # identical by construction; local/average keep per-rank statistics (see the policies above)
    no_sync = ({"forward_sync_buffers": False} if "forward_sync_buffers" in inspect.signature(ddp).parameters
               else {"broadcast_buffers": False})
    return ddp(model, device_ids=device_ids, process_group=process_group, **no_sync)


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def bn_buffers(model: nn.Module) -> list[torch.Tensor]:
    """The floating running-statistics buffers (running_mean, running_var) of every batch norm in ``model``."""
    return [buf for name, buf in unwrap(model).named_buffers()
            if name.rsplit(".", 1)[-1] in ("running_mean", "running_var") and buf.is_floating_point()]


@torch.no_grad()
def average_bn_buffers(model: nn.Module, group=None) -> None:
    """All-reduce-average every running_mean / running_var over the group (the ``average`` policy).

    Note: the average of per-rank running variances is the mean *within-shard* variance; it leaves out the
    spread between the ranks' means (usually tiny with random shards). ``sync`` has no such gap.
    """
    _, world = rank_and_world()
    buffers = bn_buffers(model)
    if world == 1 or not buffers:
        return
    flat = torch.cat([b.reshape(-1).to(torch.float64) for b in buffers])
    dist.all_reduce(flat, group=group)
    flat /= world
    offset = 0
    for b in buffers:
        b.copy_(flat[offset:offset + b.numel()].reshape(b.shape))
        offset += b.numel()


def shard_batch(idx: torch.Tensor, rank: int, world_size: int) -> torch.Tensor:
    """This rank's part of a global batch: every ``world_size``-th index starting at ``rank``.

    The parts are disjoint, cover the batch, and differ in size by at most one.
    """
    return idx[rank::world_size]


def make_sampler(dataset, *, shuffle: bool = True, seed: int = 0, drop_last: bool = False):
    """A ``DistributedSampler`` for this process (for code that feeds a ``DataLoader``; call ``set_epoch``)."""
    from torch.utils.data.distributed import DistributedSampler
    rank, world = rank_and_world()
    return DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=shuffle, seed=seed,
                              drop_last=drop_last)


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor,
               global_batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One data-parallel step on this rank's shard; the gradient is the global batch's mean-loss gradient.

    Returns this rank's (loss sum, number correct), detached.
    """
    _, world = rank_and_world()
    logits = model(x)
    loss_sum = F.cross_entropy(logits, y, reduction="sum")
    optimizer.zero_grad(set_to_none=True)
    (loss_sum * (world / global_batch)).backward()  # DDP averages over ranks: world/B * sum -> global mean
    optimizer.step()
    return loss_sum.detach(), (logits.argmax(dim=1) == y).sum()


def eval_copy(model: nn.Module) -> nn.Module:
    """A single-process copy of the model for evaluation: unwrapped, SyncBatchNorm reverted to BatchNorm."""
    from normlab.nn.syncbatchnorm import SyncBatchNorm
    return SyncBatchNorm.revert_sync_batchnorm(copy.deepcopy(unwrap(model)))


# ------------------------------------------------------------------------------------------- the --nproc run
def train_distributed(cfg, nproc: int, policy: str = "sync", *, timeout_s: float = DEFAULT_TIMEOUT_S,
                      log: Callable[[str], None] = print) -> dict:
    """``normlab train`` on ``nproc`` processes (or on the group ``torchrun`` started, if any).

    ``cfg`` is a ``normlab.lab.train.TrainConfig``; ``cfg.batch_size`` is the global batch. Rank 0 writes
    ``config.json`` (plus ``nproc`` and ``bn_policy``) and ``metrics.jsonl`` (as ``normlab train``; examples_per_s
    counts the examples of all ranks), ``curves.png`` (with ``cfg.plots``) and, with ``cfg.checkpoint``,
    ``model.pt`` (the single-process model's state_dict, loadable into ``build_model(...)``). Checkpoint
    resumption is not supported with ``--nproc``. Returns ``{"config", "metrics", "out", "nproc", "policy", "rank"}``
    (``rank`` is this process's rank under ``torchrun``, else 0).
    """
    if policy not in POLICIES:
        raise ValueError(f"unknown BN policy {policy!r}; choose from {POLICIES}")
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    rank = 0
    if under_torchrun():
        owned = not dist.is_initialized()  # a group the caller made stays theirs to destroy
        rank, world = init_from_env("gloo", timeout_s=timeout_s)  # the lab trains on CPU tensors
        with leaving_group(owned):
            _train_worker(rank, world, cfg, policy, log if rank == 0 else None)
    elif nproc == 1:
        _train_worker(0, 1, cfg, policy, log)
        world = 1
    else:
        launch(_train_worker, nproc, cfg, policy, None, backend="gloo", timeout_s=timeout_s,
               threads=cfg.threads or max(1, (os.cpu_count() or 1) // nproc))
        world = nproc
        metrics = _read_jsonl(out / "metrics.jsonl")
        for m in metrics:
            log(_epoch_line(m, cfg.epochs))
    metrics = _read_jsonl(out / "metrics.jsonl")
    if cfg.plots and metrics and rank == 0:
        from .plots import plot_run
        plot_run(metrics, out / "curves.png",
                 title=f"{cfg.model} / {cfg.norm} / lr {cfg.lr} / {world} proc, BN {policy}")
    return {"config": cfg, "metrics": metrics, "out": str(out), "nproc": world, "policy": policy, "rank": rank}


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def _epoch_line(m: dict, epochs: int) -> str:
    return (f"epoch {m['epoch']:>3}/{epochs}  loss {m['train_loss']:.3f}  train acc {m['train_acc']:.3f}  "
            f"test acc {m['test_acc']:.3f} (batch stats {m['test_acc_batch_stats']:.3f})  "
            f"{m['examples_per_s']:,.0f} ex/s  {m['epoch_time_s']:.1f} s")


def _train_worker(rank: int, world: int, cfg, policy: str, log: Callable[[str], None] | None) -> None:
    from .data import load_fashion_mnist
    from .models import build_model
    from .train import TrainingError, epoch_permutation, evaluate, make_optimizer

    out = Path(cfg.out)
    if cfg.threads and world == 1:
        torch.set_num_threads(cfg.threads)
    train_split, test_split = load_fashion_mnist(cfg.data_dir, verify=cfg.verify_data,
                                                 download_missing=cfg.download and rank == 0)
    train_split, test_split = train_split.subset(cfg.train_subset), test_split.subset(cfg.test_subset)
    x_train, y_train = train_split.float_images(), train_split.labels
    x_test, y_test = test_split.float_images(), test_split.labels
    n, batch = len(y_train), cfg.batch_size
    if batch < 2 * world and policy != "sync":
        raise TrainingError(f"--bn-policy {policy} normalizes each rank's shard alone: the global batch "
                            f"{batch} over {world} processes leaves shards of fewer than 2 examples; use a "
                            f"batch of at least {2 * world} or --bn-policy sync")

    torch.manual_seed(cfg.seed)  # every rank builds the same initial model (DDP also broadcasts rank 0's)
    model = build_model(cfg.model, cfg.norm, impl=cfg.impl, placement=cfg.placement, momentum=cfg.bn_momentum)
    model = prepare_model(model, policy)
    optimizer = make_optimizer(model, cfg)
    if rank == 0:
        config = dataclasses.asdict(cfg) | {"nproc": world, "bn_policy": policy}
        (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        (out / "metrics.jsonl").write_text("")

    steps_per_epoch = n // batch + (n % batch > 1)
    total_steps = cfg.epochs * steps_per_epoch
    if cfg.max_steps is not None:
        total_steps = min(total_steps, cfg.max_steps)
    last_epoch = math.ceil(total_steps / max(steps_per_epoch, 1))
    step = 0
    model.train()
    for epoch in range(1, last_epoch + 1):
        t0 = time.perf_counter()
        totals = torch.zeros(3, dtype=torch.float64)  # loss sum, correct, examples (this rank)
        order = epoch_permutation(n, cfg.seed, epoch)
        for start in range(0, n, batch):
            idx = order[start:start + batch]
            if (len(idx) == 1 and batch > 1) or step >= total_steps:
                break
            mine = shard_batch(idx, rank, world)
            try:
                loss_sum, correct = train_step(model, optimizer, x_train[mine], y_train[mine], len(idx))
            except ValueError as err:
                raise TrainingError(f"{cfg.model} with --norm {cfg.norm} --bn-policy {policy} cannot train at "
                                    f"global batch {len(idx)} over {world} processes: {err}") from err
            totals += torch.tensor([float(loss_sum), float(correct), len(mine)], dtype=torch.float64)
            step += 1
        train_time = time.perf_counter() - t0
        if world > 1:
            dist.all_reduce(totals)
        if not math.isfinite(float(totals[0])):
            raise TrainingError(f"loss became {float(totals[0])} at epoch {epoch}: training diverged; lower --lr")
        if policy == "average":
            average_bn_buffers(model)
        if rank == 0:
            net = eval_copy(model)
            test_acc, test_loss = evaluate(net, x_test, y_test, batch_size=cfg.eval_batch_size)
            test_acc_bs, _ = evaluate(net, x_test, y_test, batch_size=max(batch, 2), batch_stats=True)
            seen = float(totals[2])
            record = {"epoch": epoch, "step": step, "train_loss": float(totals[0]) / seen,
                      "train_acc": float(totals[1]) / seen, "test_acc": test_acc,
                      "test_acc_batch_stats": test_acc_bs, "test_loss": test_loss,
                      "examples_per_s": seen / train_time, "epoch_time_s": time.perf_counter() - t0,
                      "nproc": world, "bn_policy": policy}
            with open(out / "metrics.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")
            if log is not None:
                log(_epoch_line(record, last_epoch))
            if cfg.checkpoint:
                torch.save(net.state_dict(), out / "model.pt")
        if world > 1:
            dist.barrier()  # rank 0's evaluation done before the next epoch (keeps timings per epoch honest)


# ------------------------------------------------------------------------------------------- benchmarks
def _bench_sync_worker(rank: int, world: int, shapes: list[tuple[int, ...]], repeats: int, result_path: str
                       ) -> None:
    import normlab
    from normlab.nn.syncbatchnorm import SyncBatchNorm

    rows = []
    for shape in shapes:
        x = torch.randn(shape, requires_grad=True)
        dy = torch.randn(shape)
        c = shape[1]
        layers = {"BatchNorm (local)": normlab.BatchNorm2d(c) if len(shape) == 4 else normlab.BatchNorm1d(c),
                  "SyncBatchNorm": SyncBatchNorm(c)}
        samples: dict[str, list[float]] = {name: [] for name in layers}
        for i in range(repeats + 3):  # interleaved, so that a change in machine load hits both alike
            for name, layer in layers.items():
                dist.barrier()
                t0 = time.perf_counter()
                layer(x).backward(dy)
                samples[name].append(time.perf_counter() - t0)
                x.grad = None
        med = {name: sorted(s[3:])[len(s[3:]) // 2] for name, s in samples.items()}
        best = {name: min(s[3:]) for name, s in samples.items()}
        rows.append({"shape": list(shape), **{f"{k} ms": v * 1e3 for k, v in med.items()},
                     **{f"{k} best ms": v * 1e3 for k, v in best.items()},
                     "ratio": med["SyncBatchNorm"] / med["BatchNorm (local)"],
                     "best ratio": best["SyncBatchNorm"] / best["BatchNorm (local)"]})
    if rank == 0:
        Path(result_path).write_text(json.dumps(rows))


def _bench_lenet_worker(rank: int, world: int, global_batch: int, steps: int, policy: str, result_path: str
                        ) -> None:
    from .models import build_model

    torch.manual_seed(0)
    model = prepare_model(build_model("lenet", "bn"), policy)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    g = torch.Generator().manual_seed(1)
    x = torch.rand(global_batch, 1, 28, 28, generator=g)
    y = torch.randint(0, 10, (global_batch,), generator=g)
    mine = shard_batch(torch.arange(global_batch), rank, world)
    for _ in range(3):
        train_step(model, optimizer, x[mine], y[mine], global_batch)
    chunks = []
    for _ in range(3):  # three timed chunks of steps // 3; the best chunk is least disturbed by other load
        if world > 1:
            dist.barrier()
        t0 = time.perf_counter()
        for _ in range(max(1, steps // 3)):
            train_step(model, optimizer, x[mine], y[mine], global_batch)
        if world > 1:
            dist.barrier()
        chunks.append((time.perf_counter() - t0) / max(1, steps // 3))
    if rank == 0:
        step_s = sorted(chunks)[1]
        Path(result_path).write_text(json.dumps({"examples_per_s": global_batch / step_s,
                                                 "step_ms": step_s * 1e3,
                                                 "best_examples_per_s": global_batch / min(chunks)}))


def benchmark_sync(shapes: list[tuple[int, ...]] | None = None, *, nproc: int = 2, repeats: int = 40,
                   lenet_batch: int = 256, lenet_steps: int = 30) -> dict:
    """SyncBatchNorm vs local BatchNorm (fwd + bwd, median over ``repeats``, ``nproc`` gloo processes, each with
    the given local shape), and LeNet-BN training throughput on 1 process vs ``nproc`` processes (``sync`` and
    ``local`` policies) at the same global batch. Returns a dict of the numbers (also printable as Markdown)."""
    import tempfile

    shapes = shapes or [(32, 16, 28, 28), (64, 64, 14, 14), (128, 256), (256, 6, 28, 28)]
    cores = os.cpu_count() or 1
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "r.json")
        launch(_bench_sync_worker, nproc, shapes, repeats, path, threads=max(1, cores // nproc))
        layer_rows = json.loads(Path(path).read_text())
        scaling = {}
        runs = [(1, "local", cores), (1, "local", max(1, cores // nproc)), (nproc, "local", max(1, cores // nproc)),
                (nproc, "sync", max(1, cores // nproc))]
        for world, policy, threads in runs:
            name = f"1 proc, {threads} thread(s)" if world == 1 else f"{world} proc x {threads} thread(s), {policy}"
            if name in scaling:
                continue
            launch(_bench_lenet_worker, world, lenet_batch, lenet_steps, policy, path, threads=threads)
            scaling[name] = json.loads(Path(path).read_text())
    return {"layers": layer_rows, "lenet": scaling, "nproc": nproc, "cores": cores,
            "torch": torch.__version__}


def format_benchmark(result: dict) -> str:
    """Markdown tables of :func:`benchmark_sync`'s result."""
    lines = [f"{result['nproc']} gloo processes on {result['cores']} cores, torch {result['torch']}", "",
             "| local shape per rank | BatchNorm fwd+bwd ms (median / best) | SyncBatchNorm fwd+bwd ms "
             "(median / best) | ratio (median / best) |", "|---|---|---|---|"]
    for r in result["layers"]:
        lines.append(f"| {tuple(r['shape'])} | {r['BatchNorm (local) ms']:.2f} / {r['BatchNorm (local) best ms']:.2f} "
                     f"| {r['SyncBatchNorm ms']:.2f} / {r['SyncBatchNorm best ms']:.2f} "
                     f"| {r['ratio']:.2f} / {r['best ratio']:.2f} |")
    lines += ["", "| LeNet-BN training step, same global batch | examples/s (median chunk / best) | ms/step |",
              "|---|---|---|"]
    for name, r in result["lenet"].items():
        lines.append(f"| {name} | {r['examples_per_s']:,.0f} / {r['best_examples_per_s']:,.0f} "
                     f"| {r['step_ms']:.1f} |")
    return "\n".join(lines)


if __name__ == "__main__":  # python -m normlab.lab.distributed  -> the benchmark
    print(format_benchmark(benchmark_sync()))
