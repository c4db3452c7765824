"""``normlab bench``: normlab's batch norm against torch.nn, torch.compile and a from-scratch version.

Everything runs in one process, one after the other, on the same tensors:

* ``normlab``  -- :class:`normlab.BatchNorm2d` (etc.), numba kernels on CPU;
* ``torch``    -- :class:`torch.nn.BatchNorm2d` eager;
* ``compile``  -- ``torch.compile`` of the composite formula (mean, biased var, rsqrt, affine, buffer update);
* ``scratch``  -- the d2l-style from-scratch layer: autograd through ``mean``, ``var`` and ``sqrt``.

Modes: training forward (autograd recording, as in a training step), forward + backward, eval forward.
Each number is the median of many repeats after warm-up (``--budget`` seconds per measurement), the contenders
taking turns call by call; ``won`` is the fraction of those rounds in which normlab's call beat torch's. Bandwidth
is the minimum traffic of a pass (forward 2 reads + 1 write, backward 4 reads + 1 write, eval 1 read + 1 write)
divided by the time, as a fraction of the bandwidth of a copy (``dst.copy_(x)``, read + write) of the same tensor
timed as one more contender in the same rotation -- so a tensor that fits in the last-level cache in part is
compared with a copy that found the caches in the same states (see :func:`timeit_with_copy`). The copy bandwidth of
a 512 MiB tensor (DRAM) is measured first and reported in the header; the summary gives the median fraction of both.
Saved-for-backward memory is counted with ``torch.autograd.graph.saved_tensors_hooks``.

Other sections: fused BN+ReLU (and sigmoid) vs BN then the activation; GroupNorm / LayerNorm vs torch; the whole
LeNet-BN training step (d2l's network) in examples per second; ``roof``: how fast any batch norm could be on this
machine, and so the largest ratio over torch any could reach (see :func:`roof_bound`); where CUDA is available,
normlab's Triton kernels against torch.nn on the GPU (``gpu``). ``--json PATH`` writes every number.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field

try:
    import resource
except ImportError:  # Windows
    resource = None

import torch
from torch import nn

DEFAULT_SHAPES = ["256x6x28x28", "256x16x10x10", "256x120", "256x84", "32x64x56x56", "128x256x14x14",
                  "256x64x28x28", "256x512", "4096x1024", "32x64x56x56cl", "128x256x14x14cl", "256x64x28x28cl"]
QUICK_SHAPES = ["8x4x6x6", "8x4x6x6cl", "16x12"]
DEFAULT_SECTIONS = "layers,fused,groupnorm,lenet,roof"
SECTIONS = ("layers", "fused", "groupnorm", "lenet", "roof", "gpu")
IMPLS = ["normlab", "torch", "compile", "scratch"]
MODES = ["train_fwd", "train_fwd_bwd", "eval_fwd"]
# minimum passes over the activation, in units of its size: stats + normalize; 2x (x, dy) + dx; read + write
MIN_PASSES = {"train_fwd": 3, "train_fwd_bwd": 3 + 5, "eval_fwd": 2, "bwd": 5}


# ------------------------------------------------------------------------------------------------------
# timing
# ------------------------------------------------------------------------------------------------------
STAT = {"name": "median"}  # or "min" (--stat): the statistic every table and ratio uses


def timeit(fn, budget: float, min_reps: int = 5, max_reps: int = 200, warmup: int = 2) -> float:
    """Seconds per call of ``fn()`` after ``warmup`` calls, repeated to fill about ``budget`` seconds: the median
    (default) or the minimum (``--stat min``, the better estimate of the cost on a host shared with other jobs)."""
    for _ in range(warmup):
        fn()
    t0 = time.perf_counter()
    fn()
    one = time.perf_counter() - t0
    reps = max(min_reps, min(max_reps, int(budget / max(one, 1e-7))))
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times) if STAT["name"] == "min" else statistics.median(times)


COPY = "same-size copy"


def round_orders(n: int) -> list[list[int]]:
    """Orders of ``n`` contenders for successive rounds in which each contender comes right after each other one
    equally often (a Williams design: n rounds for even n, 2n for odd n; each round is a permutation).

    Rotating one order does not do that: rotations of (a, b, c, d) keep a before b, b before c and c before d in
    every round, so b always inherited what a left (a copy's dirty lines, a from-scratch layer's freed
    temporaries) and a what d left."""
    if n <= 1:
        return [list(range(n))]
    first = [0] + [(j + 1) // 2 if j % 2 else n - j // 2 for j in range(1, n)]  # 0, 1, n-1, 2, n-2, ...
    rows = [[(v + i) % n for v in first] for i in range(n)]
    return rows if n % 2 == 0 else rows + [row[::-1] for row in rows]


def _minor_faults() -> int:
    """Page faults this process has taken without I/O so far (0 where ``resource`` is missing: Windows)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt if resource is not None else 0


def timeit_interleaved(fns: dict, budget: float, min_reps: int = 5, max_reps: int = 200, warmup: int = 2,
                       log=None, rounds: dict | None = None, faults: dict | None = None) -> dict:
    """Seconds per call of each ``fns[name]()``, measured in alternating rounds (one call of each contender per
    round, in the orders of :func:`round_orders`) so that a change of load on a shared host hits every contender
    alike, and each contender runs after each other one equally often (it inherits the caches, dirty lines and
    allocator state its predecessor left); ``budget`` seconds per contender. A contender that raises during
    warm-up is reported through ``log`` and left out. ``rounds``, if given, receives each contender's seconds
    round by round (equal-length lists: see :func:`rounds_won`); ``faults``, if given, each contender's median
    page faults per call (counted outside the timed call): a call that draws freshly mapped memory pays one per
    4 KiB page, which says whether a ratio measured the kernels or the heap state that the other contenders left."""
    live = {}
    for name, fn in fns.items():
        try:
            for _ in range(warmup):
                fn()
            t0 = time.perf_counter()
            fn()
            live[name] = (fn, time.perf_counter() - t0)
        except Exception as err:  # e.g. torch.compile without a working C++ toolchain
            if log is not None:
                log(f"  {name}: failed ({type(err).__name__}: {str(err).splitlines()[0][:80]})")
    if not live:
        return {}
    slowest = max(one for _, one in live.values())
    reps = max(min_reps, min(max_reps, int(budget / max(slowest, 1e-7))))
    times: dict = {name: [] for name in live}
    faulted: dict = {name: [] for name in live}
    order = list(live)
    orders = round_orders(len(order))
    if reps > len(orders):  # whole cycles of the design, where the budget allows more than one
        reps = -(-reps // len(orders)) * len(orders)
    for r in range(reps):
        for name in (order[i] for i in orders[r % len(orders)]):
            fn = live[name][0]
            f0 = _minor_faults()
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
            faulted[name].append(_minor_faults() - f0)
    if rounds is not None:
        rounds.update(times)
    if faults is not None:
        faults.update({name: statistics.median(fs) for name, fs in faulted.items() if name != COPY})
    pick = min if STAT["name"] == "min" else statistics.median
    return {name: pick(ts) for name, ts in times.items()}


def rounds_won(rounds: dict, ours: str = "normlab") -> dict:
    """For each other contender, the fraction of rounds in which ``ours`` took less time than it: a paired
    comparison (both calls ran within the same round, under the same load), which says how often a ratio of
    medians near 1 goes either way."""
    if ours not in rounds:
        return {}
    mine = rounds[ours]
    return {name: sum(a < b for a, b in zip(mine, ts)) / len(mine)
            for name, ts in rounds.items() if name not in (ours, COPY) and ts and len(ts) == len(mine)}



def timeit_with_copy(fns: dict, x: torch.Tensor, budget: float, log=None, rounds: dict | None = None,
                     faults: dict | None = None) -> tuple[dict, float | None]:
    """:func:`timeit_interleaved` of ``fns`` with ``dst.copy_(x)`` as one more contender in the same rotation:
    returns the contenders' seconds and the copy's GB/s (read + write), the bandwidth the same cache states allow.

    Timed alone in a tight loop, a copy of a 25.7 MB tensor finds source and destination in the cache that it
    left them in (81-94 GB/s here at 2 threads, against 34 GB/s for 512 MB), while the layers run after contenders
    that evict it: a fraction of that copy compared a cold pass with a warm one."""
    dst = torch.empty_like(x)
    got = timeit_interleaved({**fns, COPY: synced(lambda: dst.copy_(x), x.device)}, budget, log=log,
                             rounds=rounds, faults=faults)
    t = got.pop(COPY, None)
    return got, (2 * x.numel() * x.element_size() / t / 1e9 if t else None)


def synced(fn, device: torch.device):
    """``fn`` followed by a wait for the device's queue on CUDA (kernels launch asynchronously), else ``fn``."""
    if device.type != "cuda":
        return fn

    def call():
        fn()
        torch.cuda.synchronize(device)
    return call


def settle_allocator() -> None:
    """Put glibc's allocator in the state of a process that has been running a while: free one mapped block of
    just under 32 MiB, which raises its mapping threshold to that size (and its heap-trim threshold to twice it).

    A fresh process maps every block above 128 KiB afresh and gives it back on free until a freed mapping raises
    that threshold; until then a torch BatchNorm2d forward+backward on a 25.7 MB tensor paid ~4,600 page faults
    per call (27 ms, against 19 ms after one such free), which inflated normlab's ratios. Any training loop has
    freed such blocks by its second step. Blocks of 32 MiB and more are mapped afresh in every state.
    """
    block = torch.empty(31 * 2**20, dtype=torch.uint8)
    del block


def copy_bandwidth(nbytes: int, budget: float) -> float:
    """GB/s of ``dst.copy_(src)`` counting read + write, on tensors larger than most L3 caches."""
    src = torch.ones(nbytes // 4)
    dst = torch.empty_like(src)
    t = timeit(lambda: dst.copy_(src), budget, min_reps=5, max_reps=50)
    return 2 * nbytes / t / 1e9


def saved_bytes(fn) -> int:
    """Bytes of distinct storages autograd saves for backward while running ``fn``."""
    seen: dict[int, int] = {}

    def pack(t):
        s = t.untyped_storage()
        seen[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


# ------------------------------------------------------------------------------------------------------
# the contenders
# ------------------------------------------------------------------------------------------------------
def _allow_recompiles(limit: int = 512) -> None:
    """Every (shape, mode, grad mode) of the suite is a new graph of the same ``forward``: past dynamo's default
    limit of 8 it would silently run that contender eagerly, so the limit is raised for the benchmark."""
    import torch._dynamo
    for name in ("recompile_limit", "cache_size_limit", "accumulated_recompile_limit", "accumulated_cache_size_limit"):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, max(getattr(torch._dynamo.config, name), limit))


class CompositeBatchNorm(nn.Module):
    """Batch norm written as the formula in torch ops (what torch.compile gets to fuse)."""

    def __init__(self, c: int, eps: float = 1e-5, momentum: float = 0.1):
        super().__init__()
        self.eps, self.momentum = eps, momentum
        self.weight = nn.Parameter(torch.ones(c))
        self.bias = nn.Parameter(torch.zeros(c))
        self.register_buffer("running_mean", torch.zeros(c))
        self.register_buffer("running_var", torch.ones(c))

    def forward(self, x):
        shape = [1, x.shape[1]] + [1] * (x.dim() - 2)
        if self.training:
            dims = [0] + list(range(2, x.dim()))
            var, mean = torch.var_mean(x, dim=dims, correction=0)
            n = x.numel() // x.shape[1]
            with torch.no_grad():
                self.running_mean.lerp_(mean, self.momentum)
                self.running_var.lerp_(var * (n / max(n - 1, 1)), self.momentum)
        else:
            mean, var = self.running_mean, self.running_var
        scale = torch.rsqrt(var + self.eps) * self.weight
        return (x - mean.reshape(shape)) * scale.reshape(shape) + self.bias.reshape(shape)


class ScratchBatchNorm(nn.Module):
    """The d2l from-scratch layer (autograd through mean/var/sqrt); d2l's momentum 0.9 = torch's 0.1."""

    def __init__(self, c: int, eps: float = 1e-5, momentum: float = 0.9):
        super().__init__()
        self.eps, self.momentum = eps, momentum
        self.gamma = nn.Parameter(torch.ones(c))
        self.beta = nn.Parameter(torch.zeros(c))
        self.register_buffer("moving_mean", torch.zeros(c))
        self.register_buffer("moving_var", torch.ones(c))

    def forward(self, x):
        shape = [1, x.shape[1]] + [1] * (x.dim() - 2)
        if not torch.is_grad_enabled() or not self.training:
            x_hat = (x - self.moving_mean.reshape(shape)) / torch.sqrt(self.moving_var.reshape(shape) + self.eps)
        else:
            dims = [0] + list(range(2, x.dim()))
            mean = x.mean(dim=dims, keepdim=True)
            var = ((x - mean) ** 2).mean(dim=dims, keepdim=True)
            x_hat = (x - mean) / torch.sqrt(var + self.eps)
            self.moving_mean.data = self.momentum * self.moving_mean + (1 - self.momentum) * mean.reshape(-1)
            self.moving_var.data = self.momentum * self.moving_var + (1 - self.momentum) * var.reshape(-1)
        return self.gamma.reshape(shape) * x_hat + self.beta.reshape(shape)


def make_layer(impl: str, c: int, rank: int) -> nn.Module:
    import normlab
    d = {2: "1d", 3: "1d", 4: "2d", 5: "3d"}[rank]
    if impl == "normlab":
        return getattr(normlab, f"BatchNorm{d}")(c)
    if impl == "torch":
        return getattr(nn, f"BatchNorm{d}")(c)
    if impl == "compile":
        _allow_recompiles()
        return torch.compile(CompositeBatchNorm(c))
    if impl == "scratch":
        return ScratchBatchNorm(c)
    raise ValueError(impl)


# ------------------------------------------------------------------------------------------------------
# measurements
# ------------------------------------------------------------------------------------------------------
@dataclass
class Row:
    section: str
    case: str
    mode: str
    mbytes: float
    ms: dict = field(default_factory=dict)          # impl -> milliseconds
    saved_mb: dict = field(default_factory=dict)    # impl -> MB saved for backward
    gbps: float | None = None                       # normlab's minimum traffic / time
    copy_gbps: float | None = None                  # dst.copy_(x), same size, timed in the same rotation
    won: dict = field(default_factory=dict)         # impl -> fraction of rounds in which normlab was faster
    faults: dict = field(default_factory=dict)      # impl -> median page faults per call


def parse_shape(text: str) -> tuple[tuple[int, ...], bool]:
    cl = text.endswith("cl")
    shape = tuple(int(v) for v in text.removesuffix("cl").split("x"))
    if len(shape) < 2 or (cl and len(shape) not in (4, 5)):
        raise argparse.ArgumentTypeError(f"bad shape {text!r}: want e.g. 32x64x56x56 or 32x64x56x56cl")
    return shape, cl


def _input(shape, cl):
    x = torch.randn(shape)
    if cl:
        x = x.contiguous(memory_format=torch.channels_last if len(shape) == 4 else torch.channels_last_3d)
    return x


def _clear_grads(*tensors):
    for t in tensors:
        t.grad = None


def modes_for(layer: nn.Module, x: torch.Tensor, dy: torch.Tensor):
    """The three timed callables for one layer and input."""
    xg = x.detach().clone().requires_grad_()
    params = list(layer.parameters())

    def train_fwd():
        layer.train()
        return layer(x)

    def train_fwd_bwd():
        layer.train()
        _clear_grads(xg, *params)
        layer(xg).backward(dy)

    def eval_fwd():
        layer.eval()
        with torch.no_grad():
            return layer(x)

    return {"train_fwd": train_fwd, "train_fwd_bwd": train_fwd_bwd, "eval_fwd": eval_fwd}, \
        (lambda: layer.train()(xg))


def bench_layers(shapes, impls, budget, log, device="cpu", section="layers") -> list[Row]:
    """Each batch-norm contender of ``impls`` on each shape, in each mode, on ``device`` (timed to the end of
    its work: see :func:`synced`)."""
    device = torch.device(device)
    rows = []
    for text in shapes:
        shape, cl = parse_shape(text)
        x = _input(shape, cl).to(device)
        dy = torch.randn_like(x)
        mb = x.numel() * x.element_size() / 1e6
        by_mode = {m: Row(section, text, m, mb) for m in MODES}
        per_impl = {}
        for impl in impls:
            torch.manual_seed(0)
            layer = make_layer(impl, shape[1], len(shape)).to(device)
            per_impl[impl] = modes_for(layer, x, dy)
        for mode in MODES:  # contenders interleaved round by round (see timeit_interleaved)
            rounds = {}
            got, by_mode[mode].copy_gbps = timeit_with_copy(
                {impl: synced(fns[mode], device) for impl, (fns, _) in per_impl.items()}, x, budget,
                log=lambda msg, mode=mode: log(f"{msg} [{mode}]"), rounds=rounds, faults=by_mode[mode].faults)
            by_mode[mode].won = rounds_won(rounds)
            for impl, t in got.items():
                by_mode[mode].ms[impl] = t * 1e3
                log(f"  {text:>16} {mode:<14} {impl:<8} {t * 1e3:9.3f} ms")
        for impl, (_, fwd_for_saved) in per_impl.items():
            try:
                by_mode["train_fwd_bwd"].saved_mb[impl] = saved_bytes(fwd_for_saved) / 1e6
            except Exception:
                pass
        for mode, row in by_mode.items():
            if "normlab" in row.ms:
                row.gbps = MIN_PASSES[mode] * mb / 1e3 / (row.ms["normlab"] / 1e3)
            rows.append(row)
    return rows


def bench_fused(shapes, budget, log) -> list[Row]:
    import normlab
    rows = []
    for text in shapes:
        shape, cl = parse_shape(text)
        x = _input(shape, cl)
        dy = torch.randn_like(x)
        mb = x.numel() * x.element_size() / 1e6
        d = {2: "1d", 3: "1d", 4: "2d", 5: "3d"}[len(shape)]
        for act, torch_act in (("relu", nn.ReLU), ("sigmoid", nn.Sigmoid)):
            contenders = {
                "normlab": getattr(normlab, f"BatchNormAct{d}")(shape[1], act=act),
                "torch": nn.Sequential(getattr(nn, f"BatchNorm{d}")(shape[1]), torch_act()),
                "normlab_unfused": nn.Sequential(getattr(normlab, f"BatchNorm{d}")(shape[1]), torch_act()),
            }
            by_mode = {m: Row(f"fused_{act}", text, m, mb) for m in MODES}
            per = {name: modes_for(layer, x, dy) for name, layer in contenders.items()}
            for mode in MODES:
                rounds = {}
                got, by_mode[mode].copy_gbps = timeit_with_copy(
                    {name: fns[mode] for name, (fns, _) in per.items()}, x, budget, log=log, rounds=rounds,
                    faults=by_mode[mode].faults)
                by_mode[mode].won = rounds_won(rounds)
                for name, t in got.items():
                    by_mode[mode].ms[name] = t * 1e3
                    log(f"  {text:>16} bn+{act:<8} {mode:<14} {name:<16} {t * 1e3:9.3f} ms")
            for name, (_, fwd_for_saved) in per.items():
                by_mode["train_fwd_bwd"].saved_mb[name] = saved_bytes(fwd_for_saved) / 1e6
            for mode, row in by_mode.items():
                row.gbps = MIN_PASSES[mode] * mb / 1e3 / (row.ms["normlab"] / 1e3)
                rows.append(row)
    return rows


def bench_gpu(shapes, budget, log, device="cuda") -> list[Row]:
    """:func:`bench_layers` of normlab on its Triton kernels (``use_backend("triton")``) against ``torch.nn``
    (cuDNN on CUDA), float32, on ``device``; ``%copy`` is then against a same-size copy on the device. Any device
    the Triton backend takes: a CPU device in Triton's interpreter is how the tests run this section."""
    from normlab import kernels
    with kernels.use_backend("triton"):
        return bench_layers(shapes, ["normlab", "torch"], budget, log, device=device, section="gpu")


def bench_groupnorm(quick, budget, log) -> list[Row]:
    import torch.nn.functional as TF

    import normlab.functional as NF
    cases = [("gn", (4, 8, 6, 6), 4), ("ln", (16, 32), None)] if quick else [
        ("gn", (32, 64, 56, 56), 32), ("gn", (256, 64, 28, 28), 8), ("in", (32, 64, 56, 56), 64),
        # 14x14 images: channel rows that start and end mid-line, 6 KB groups
        ("gn", (128, 256, 14, 14), 32),
        ("ln", (4096, 1024), None), ("ln", (256, 197, 768), None),
        # small layers, where per-call overhead decides; few long rows, where dweight/dbias's merge does
        ("gn", (32, 32, 8, 8), 8), ("in", (8, 16, 16, 16), 16), ("ln", (64, 256), None), ("ln", (16, 4096), None)]
    rows = []
    for kind, shape, groups in cases:
        x = torch.randn(shape)
        dy = torch.randn_like(x)
        mb = x.numel() * 4 / 1e6
        c = shape[-1] if kind == "ln" else shape[1]
        w = torch.randn(c, requires_grad=True)
        b = torch.randn(c, requires_grad=True)
        xg = x.clone().requires_grad_()
        if kind == "ln":
            ours = lambda t: NF.layer_norm(t, (c,), w, b, 1e-5)  # noqa: E731
            theirs = lambda t: TF.layer_norm(t, (c,), w, b, 1e-5)  # noqa: E731
        else:
            ours = lambda t, g=groups: NF.group_norm(t, g, w, b, 1e-5)  # noqa: E731
            theirs = lambda t, g=groups: TF.group_norm(t, g, w, b, 1e-5)  # noqa: E731
        case = f"{kind} {'x'.join(map(str, shape))}" + (f" G={groups}" if kind == "gn" else "")
        for mode in ("train_fwd", "train_fwd_bwd"):
            row = Row("groupnorm", case, mode, mb)
            fns = {}
            for name, f in (("normlab", ours), ("torch", theirs)):
                if mode == "train_fwd":
                    fns[name] = (lambda f=f: f(x))
                else:
                    def fn(f=f):
                        _clear_grads(xg, w, b)
                        f(xg).backward(dy)
                    fns[name] = fn
            rounds = {}
            got, row.copy_gbps = timeit_with_copy(fns, x, budget, log=log, rounds=rounds, faults=row.faults)
            row.won = rounds_won(rounds)
            for name, t in got.items():
                row.ms[name] = t * 1e3
                log(f"  {case:>24} {mode:<14} {name:<8} {row.ms[name]:9.3f} ms")
            passes = 2 if mode == "train_fwd" else 2 + 3  # forward: 1 read (group in cache) + 1 write
            row.gbps = passes * mb / 1e3 / (row.ms["normlab"] / 1e3)
            rows.append(row)
    return rows


def lenet(kind: str) -> nn.Module:
    """d2l's LeNet with batch norm (sigmoid activations) for 28x28 inputs."""
    import normlab
    if kind == "torch":
        bn2, bn1 = (lambda c: [nn.BatchNorm2d(c), nn.Sigmoid()]), (lambda c: [nn.BatchNorm1d(c), nn.Sigmoid()])
    elif kind == "normlab":
        bn2, bn1 = (lambda c: [normlab.BatchNorm2d(c), nn.Sigmoid()]), (lambda c: [normlab.BatchNorm1d(c), nn.Sigmoid()])
    else:  # normlab_fused
        bn2 = lambda c: [normlab.BatchNormAct2d(c, act="sigmoid")]  # noqa: E731
        bn1 = lambda c: [normlab.BatchNormAct1d(c, act="sigmoid")]  # noqa: E731
    return nn.Sequential(
        nn.Conv2d(1, 6, kernel_size=5, padding=2), *bn2(6), nn.AvgPool2d(2, 2),
        nn.Conv2d(6, 16, kernel_size=5), *bn2(16), nn.AvgPool2d(2, 2), nn.Flatten(),
        nn.Linear(16 * 5 * 5, 120), *bn1(120), nn.Linear(120, 84), *bn1(84), nn.Linear(84, 10))


def bench_lenet(batch, budget, log) -> list[Row]:
    """One SGD step of LeNet-BN per contender, the contenders interleaved round by round (see
    :func:`timeit_interleaved`: timed one after the other, a few seconds apart, the host's load moved the ratio
    by more than the difference)."""
    x = torch.randn(batch, 1, 28, 28)
    y = torch.randint(0, 10, (batch,))
    row = Row("lenet", f"LeNet-BN step, batch {batch}", "train_step", x.numel() * 4 / 1e6)
    loss_fn = nn.CrossEntropyLoss()

    def make_step(kind):
        torch.manual_seed(0)
        model = lenet(kind)
        opt = torch.optim.SGD(model.parameters(), lr=0.9)

        def step():
            opt.zero_grad(set_to_none=True)
            loss_fn(model(x), y).backward()
            opt.step()
        return step

    rounds = {}
    got = timeit_interleaved({kind: make_step(kind) for kind in ("normlab", "torch", "normlab_fused")},
                             budget * 2, warmup=3, log=log, rounds=rounds)
    row.won = rounds_won(rounds)
    for kind, t in got.items():
        row.ms[kind] = t * 1e3
        log(f"  {row.case} {kind:<14} {row.ms[kind]:9.3f} ms  ({batch / row.ms[kind] * 1e3:,.0f} examples/s)")
    return [row]


class AutogradFloor(nn.Module):
    """``y = x * 2``: its forward+backward (one read and one write each way, one node through the autograd engine)
    is the least any layer's training step on ``x`` costs in eager PyTorch."""

    def forward(self, x):
        return x * 2.0


def roof_bound(row: Row) -> dict:
    """The fastest a batch-norm training forward+backward could run in ``row``'s rotation, and what that means.

    * ``roof_ms``: the minimum traffic (MIN_PASSES: 3 passes forward, 5 backward) at the bandwidth of the copy
      timed in the same rotation -- the memory roof;
    * ``floor_ms``: the autograd floor (:class:`AutogradFloor`) on the same input -- the per-call cost of eager
      autograd, which decides small layers; left out where its calls took page faults (freshly mapped outputs,
      the heap's state rather than the engine's cost);
    * ``bound_ms``: the larger of the two; ``cap``: torch's time over it, the largest ratio any batch norm could
      reach against torch here; ``share``: normlab's ratio over that cap; ``torch_frac``: torch's minimum traffic
      per second as a fraction of the copy's.

    Not a law: a tensor that stays in cache between passes can beat the roof (normlab's 51 MB NCHW layer
    measured 127 % of the copy), so ``share`` can exceed 1."""
    mb, copy = row.mbytes, row.copy_gbps
    roof = MIN_PASSES["train_fwd_bwd"] * mb / copy if copy else None  # MB / (GB/s) = ms
    floor = row.ms.get("floor") if not row.faults.get("floor") else None
    bound = max(v for v in (roof, floor) if v is not None) if (roof or floor) else None
    torch_ms, ours = row.ms.get("torch"), row.ms.get("normlab")
    cap = torch_ms / bound if torch_ms and bound else None
    ratio = torch_ms / ours if torch_ms and ours else None
    return {"roof_ms": roof, "floor_ms": floor, "bound_ms": bound, "cap": cap,
            "share": ratio / cap if ratio and cap else None,
            "torch_frac": roof / torch_ms if roof and torch_ms else None}


def bench_roof(shapes, budget, log) -> list[Row]:
    """Training forward+backward of normlab and torch beside the autograd floor and a copy of the input, the four
    taking turns (no torch.compile or from-scratch contender in the rotation): each row's :func:`roof_bound`."""
    rows = []
    for text in shapes:
        shape, cl = parse_shape(text)
        x = _input(shape, cl)
        dy = torch.randn_like(x)
        row = Row("roof", text, "train_fwd_bwd", x.numel() * x.element_size() / 1e6)
        fns = {}
        for impl in ("normlab", "torch"):
            torch.manual_seed(0)
            fns[impl] = modes_for(make_layer(impl, shape[1], len(shape)), x, dy)[0]["train_fwd_bwd"]
        fns["floor"] = modes_for(AutogradFloor(), x, dy)[0]["train_fwd_bwd"]
        rounds = {}
        got, row.copy_gbps = timeit_with_copy(fns, x, budget, log=log, rounds=rounds, faults=row.faults)
        row.won = rounds_won(rounds)
        row.ms = {name: t * 1e3 for name, t in got.items()}
        if "normlab" in row.ms:
            row.gbps = MIN_PASSES["train_fwd_bwd"] * row.mbytes / row.ms["normlab"]
        bound = roof_bound(row)
        log(f"  {text:>16} " + " ".join(f"{k} {v:.3f} ms" for k, v in row.ms.items())
            + f"; bound {_fmt(bound['bound_ms'], '.3f')} ms, cap {_fmt(bound['cap'])}x")
        rows.append(row)
    return rows


# ------------------------------------------------------------------------------------------------------
# report
# ------------------------------------------------------------------------------------------------------
def _ratio(row: Row, other: str, ours: str = "normlab") -> float | None:
    if ours in row.ms and other in row.ms:
        return row.ms[other] / row.ms[ours]
    return None


def _geomean(values):
    values = [v for v in values if v]
    return math.exp(sum(math.log(v) for v in values) / len(values)) if values else None


def _fmt(v, spec=".2f", none="-"):
    return none if v is None else format(v, spec)


def render(rows: list[Row], copy_gbps: float) -> str:
    out = []
    sections = {}
    for r in rows:
        sections.setdefault(r.section, []).append(r)
    for name, rs in sections.items():
        impls = [k for k in ["normlab", "torch", "compile", "scratch", "normlab_unfused", "normlab_fused", "floor"]
                 if any(k in r.ms for r in rs)]
        others = [k for k in impls if k != "normlab"]
        head = (f"{'case':<24} {'mode':<14} {'MB':>7} " + " ".join(f"{k + ' ms':>14}" for k in impls)
                + " " + " ".join(f"{'x vs ' + k:>12}" for k in others) + f" {'won':>5} {'GB/s':>7} {'%copy':>6}")
        out += [f"== {name} ==", head, "-" * len(head)]
        for r in rs:
            frac = None if r.gbps is None else r.gbps / (r.copy_gbps or copy_gbps)
            out.append(f"{r.case:<24} {r.mode:<14} {r.mbytes:7.1f} "
                       + " ".join(f"{_fmt(r.ms.get(k), '.3f'):>14}" for k in impls) + " "
                       + " ".join(f"{_fmt(_ratio(r, k)):>12}" for k in others)
                       + f" {_fmt(r.won.get('torch'), '.0%'):>5} {_fmt(r.gbps, '.1f'):>7} {_fmt(frac, '.0%'):>6}")
        faulting = [r for r in rs if any(r.faults.values())]
        if faulting:
            out.append("page faults per call, median (fresh pages: the heap state, not the kernel): " + "; ".join(
                f"{r.case} {r.mode}: " + ", ".join(f"{k} {v:g}" for k, v in r.faults.items()) for r in faulting))
        if name == "roof":
            out.append("roof: the fastest any batch norm's training step could run here, the larger of the memory "
                       "roof (8 passes at the copy's rate) and the autograd floor (x * 2 forward+backward); cap = "
                       "torch ms / bound ms, the largest ratio over torch any could reach; share = normlab's ratio "
                       "/ cap; torch %copy = torch's minimum traffic per second against the copy's")
            out.append(f"{'case':<24} {'roof ms':>10} {'floor ms':>10} {'bound ms':>10} {'torch %copy':>12} "
                       f"{'cap':>7} {'x vs torch':>11} {'share':>7}")
            for r in rs:
                b = roof_bound(r)
                out.append(f"{r.case:<24} {_fmt(b['roof_ms'], '.3f'):>10} {_fmt(b['floor_ms'], '.3f'):>10} "
                           f"{_fmt(b['bound_ms'], '.3f'):>10} {_fmt(b['torch_frac'], '.0%'):>12} "
                           f"{_fmt(b['cap']):>7} {_fmt(_ratio(r, 'torch')):>11} {_fmt(b['share'], '.0%'):>7}")
        saved = [r for r in rs if r.saved_mb]
        if saved:
            out.append("saved for backward (MB): " + "; ".join(
                f"{r.case}: " + ", ".join(f"{k} {v:.2f}" for k, v in r.saved_mb.items()) for r in saved))
        out.append("")
    return "\n".join(out)


def summarize(rows: list[Row], copy_gbps: float) -> dict:
    lay = [r for r in rows if r.section == "layers"]

    def gm(mode, other):
        return _geomean([_ratio(r, other) for r in lay if r.mode == mode])

    def worst(mode, other):
        vals = [(_ratio(r, other), r.case) for r in lay if r.mode == mode and _ratio(r, other)]
        return min(vals) if vals else None

    def fewest_won(mode):
        vals = [(r.won["torch"], r.case) for r in lay if r.mode == mode and "torch" in r.won]
        return min(vals) if vals else None

    big = [r for r in lay if r.mbytes >= 25 and r.gbps]
    frac = [r.gbps / (r.copy_gbps or copy_gbps) for r in big]  # against the same-size copy, same rotation
    frac_large = [r.gbps / copy_gbps for r in big]  # against the large copy measured first
    fused = [r for r in rows if r.section == "fused_relu" and r.mode == "train_fwd_bwd"]
    gn = [r for r in rows if r.section == "groupnorm"]
    le = [r for r in rows if r.section == "lenet"]
    gpu = [r for r in rows if r.section == "gpu"]
    roof = [r for r in rows if r.section == "roof"]

    def gpu_gm(mode):
        return _geomean([_ratio(r, "torch") for r in gpu if r.mode == mode])
    gpu_frac = [r.gbps / r.copy_gbps for r in gpu if r.gbps and r.copy_gbps and r.mbytes >= 25]
    return {
        "train_fwd_bwd_geomean_vs_torch": gm("train_fwd_bwd", "torch"),
        "train_fwd_bwd_worst_vs_torch": worst("train_fwd_bwd", "torch"),
        "train_fwd_bwd_fewest_rounds_won_vs_torch": fewest_won("train_fwd_bwd"),
        "train_fwd_geomean_vs_torch": gm("train_fwd", "torch"),
        "eval_geomean_vs_torch": gm("eval_fwd", "torch"),
        "eval_worst_vs_torch": worst("eval_fwd", "torch"),
        "train_fwd_bwd_geomean_vs_compile": gm("train_fwd_bwd", "compile"),
        "train_fwd_geomean_vs_compile": gm("train_fwd", "compile"),
        "eval_geomean_vs_compile": gm("eval_fwd", "compile"),
        "train_fwd_bwd_geomean_vs_scratch": gm("train_fwd_bwd", "scratch"),
        "fused_relu_fwd_bwd_geomean_vs_torch": _geomean([_ratio(r, "torch") for r in fused]),
        "min_frac_copy_on_25MB_plus": min(frac) if frac else None,
        "median_frac_copy_on_25MB_plus": statistics.median(frac) if frac else None,
        "median_frac_large_copy_on_25MB_plus": statistics.median(frac_large) if frac_large else None,
        "groupnorm_worst_vs_torch": min((_ratio(r, "torch") for r in gn), default=None),
        "lenet_step_vs_torch": _ratio(le[0], "torch") if le else None,
        "lenet_fused_step_vs_torch": _ratio(le[0], "torch", "normlab_fused") if le else None,
        "roof_train_fwd_bwd_geomean_vs_torch": _geomean([_ratio(r, "torch") for r in roof]),
        "roof_cap_geomean_vs_torch": _geomean([roof_bound(r)["cap"] for r in roof]),
        "gpu_train_fwd_bwd_geomean_vs_torch": gpu_gm("train_fwd_bwd"),
        "gpu_train_fwd_geomean_vs_torch": gpu_gm("train_fwd"),
        "gpu_eval_geomean_vs_torch": gpu_gm("eval_fwd"),
        "gpu_median_frac_copy_on_25MB_plus": statistics.median(gpu_frac) if gpu_frac else None,
    }


def machine_info(copy_gbps: float) -> dict:
    import numba
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    from normlab import kernels
    # the L2 a core has decides whether large NCHW layers go channel by channel (None without the numba backend)
    l2_bytes = getattr(kernels._cpu, "L2_BYTES", None)
    return {"cpu": cpu, "l2_bytes": l2_bytes, "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "numba": numba.__version__, "python": platform.python_version(), "platform": platform.platform(),
            "copy_gbps": copy_gbps, "stat": STAT["name"],
            "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
            "backend": kernels.backend_for(torch.empty(2, 2)).__name__,
            "native_glue": kernels.native_batch_norm is not None,
            "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
            "date": time.strftime("%Y-%m-%d %H:%M:%S %Z")}


# ------------------------------------------------------------------------------------------------------
# command line
# ------------------------------------------------------------------------------------------------------
def register(subparsers) -> None:
    p = subparsers.add_parser("bench", help="benchmark normlab's batch norm against torch (CPU)",
                              description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true",
                   help="tiny shapes, short budget, no torch.compile (seconds): a smoke test, where per-call "
                        "overhead dominates and the ratios say nothing about real layer sizes")
    p.add_argument("--shapes", default=None,
                   help="comma-separated shapes such as 32x64x56x56,32x64x56x56cl,256x512 (cl: channels_last)")
    p.add_argument("--sections", default=None,
                   help="which of layers,fused,groupnorm,lenet,roof,gpu to run (default: all; gpu where CUDA is "
                        "available: normlab's Triton kernels against torch.nn on the GPU, needs triton)")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile contender")
    p.add_argument("--no-scratch", action="store_true", help="skip the from-scratch contender")
    p.add_argument("--budget", type=float, default=None, help="seconds per measurement (default 0.6)")
    p.add_argument("--stat", choices=["median", "min"], default="median",
                   help="statistic of the repeats (median; min on a busy host)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--json", metavar="PATH", default=None, help="write all results as JSON")
    p.add_argument("--plot", metavar="PATH", default=None,
                   help="draw the ratios over torch as a figure (PNG); `normlab bench-plot` draws several runs")
    p.set_defaults(func=run)


def run(args) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    quick = args.quick
    STAT["name"] = args.stat
    budget = args.budget or (0.02 if quick else 0.6)
    shapes = args.shapes.split(",") if args.shapes else (QUICK_SHAPES if quick else DEFAULT_SHAPES)
    for s in shapes:
        parse_shape(s)
    sections = set((args.sections or DEFAULT_SECTIONS).split(","))
    unknown = sorted(sections - set(SECTIONS))
    if unknown:
        raise SystemExit(f"normlab bench: unknown section(s) {', '.join(map(repr, unknown))}; choose from "
                         f"{','.join(SECTIONS)}")
    if args.sections is None and torch.cuda.is_available():
        sections.add("gpu")
    if "gpu" in sections:
        if not torch.cuda.is_available():
            raise SystemExit("normlab bench: the gpu section needs a CUDA device (torch.cuda.is_available() is "
                             "False); run the other sections with --sections layers,fused,groupnorm,lenet,roof")
        from normlab import kernels
        try:
            kernels._load_triton()
        except RuntimeError as err:
            raise SystemExit(f"normlab bench: {err}") from None
    for flag, path in (("--json", args.json), ("--plot", args.plot)):  # before minutes of measuring, not after
        if path and not os.path.isdir(os.path.dirname(os.path.abspath(path))):
            raise SystemExit(f"normlab bench: {flag} {path!r}: its folder does not exist; create it or pick another")
    if args.plot:
        from normlab.bench_plot import check_format
        check_format(args.plot)
    impls = [i for i in IMPLS if not ((i == "compile" and (args.no_compile or quick))
                                       or (i == "scratch" and args.no_scratch))]

    def log(msg):
        print(msg, file=sys.stderr, flush=True)

    settle_allocator()
    log("measuring copy bandwidth ...")
    copy_gbps = copy_bandwidth((16 if quick else 512) * 2**20, budget * 2)
    machine = machine_info(copy_gbps)
    log(f"{machine['cpu']}, {machine['torch_threads']} threads, copy {copy_gbps:.1f} GB/s (read + write)")
    rows: list[Row] = []
    if "layers" in sections:
        log("batch norm layers:")
        rows += bench_layers(shapes, impls, budget, log)
    if "fused" in sections:
        log("fused batch norm + activation:")
        fused_shapes = QUICK_SHAPES[:1] if quick else ["256x6x28x28", "32x64x56x56", "256x64x28x28",
                                                        "32x64x56x56cl", "256x512"]
        rows += bench_fused(fused_shapes, budget, log)
    if "groupnorm" in sections:
        log("group / instance / layer norm:")
        rows += bench_groupnorm(quick, budget, log)
    if "lenet" in sections:
        log("LeNet-BN training step:")
        rows += bench_lenet(16 if quick else 256, budget, log)
    if "roof" in sections:
        log("roof (normlab and torch beside the autograd floor and a copy):")
        rows += bench_roof(shapes, budget, log)
    if "gpu" in sections:
        log(f"GPU ({torch.cuda.get_device_name()}), Triton kernels:")
        rows += bench_gpu(shapes, budget, log)

    summary = summarize(rows, copy_gbps)
    glue = "native glue" if machine["native_glue"] else "Python glue only (normlab build-native: faster small layers)"
    l2 = f"L2 {machine['l2_bytes'] >> 10} KB a core, " if machine["l2_bytes"] else ""
    print(f"normlab bench -- {machine['cpu']}, {l2}{machine['torch_threads']} threads, torch {machine['torch']}, {glue}, "
          f"copy bandwidth {copy_gbps:.1f} GB/s; times: {args.stat} in ms; 'x vs K' = K's time / normlab's; "
          f"won: rounds in which normlab's call took less time than torch's in the same round; "
          f"%copy: normlab's minimum traffic per second against a same-size copy timed in the same rotation")
    print(render(rows, copy_gbps))
    print("summary:")
    for k, v in summary.items():
        print(f"  {k:<38} {v if not isinstance(v, float) else round(v, 3)}")
    if quick:
        print("(--quick: tiny shapes, where per-call overhead dominates; run without --quick for the real suite)")
    data = {"args": {k: v for k, v in vars(args).items() if k != "func"},
            "machine": machine, "summary": summary, "results": [asdict(r) for r in rows]}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(data, f, indent=1)
    if args.plot:
        from normlab.bench_plot import plot
        log(f"figure: {plot([data], args.plot)}")
    return 0
