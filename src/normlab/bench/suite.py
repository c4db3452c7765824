"""The suite's sections: what each measures and on which shapes, one :class:`Row` per case and mode."""
from __future__ import annotations

import argparse
import math
from dataclasses import dataclass, field

import torch
from torch import nn

from .contenders import AutogradFloor, lenet, make_layer
from .timing import rounds_won, saved_bytes, synced, time_graph, timeit_interleaved, timeit_with_copy


DEFAULT_SHAPES = ["256x6x28x28", "256x16x10x10", "256x120", "256x84", "32x64x56x56", "128x256x14x14",
                  "256x64x28x28", "256x512", "4096x1024", "32x64x56x56cl", "128x256x14x14cl", "256x64x28x28cl"]
QUICK_SHAPES = ["8x4x6x6", "8x4x6x6cl", "16x12"]
# the gpu section's extra shapes (without --shapes): 100-205 MB, several times a GPU's L2, where memory decides
GPU_SHAPES = ["64x256x56x56", "64x256x56x56cl", "32768x1024", "16x64x224x224", "16x64x224x224cl"]
DEFAULT_SECTIONS = "layers,fused,groupnorm,lenet,roof"
SECTIONS = ("layers", "fused", "groupnorm", "lenet", "roof", "gpu")
IMPLS = ["normlab", "torch", "compile", "scratch"]
MODES = ["train_fwd", "train_fwd_bwd", "eval_fwd"]
# minimum passes over the activation, in units of its size: stats + normalize; 2x (x, dy) + dx; read + write
MIN_PASSES = {"train_fwd": 3, "train_fwd_bwd": 3 + 5, "eval_fwd": 2, "bwd": 5}


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


def _ratio(row: Row, other: str, ours: str = "normlab") -> float | None:
    if ours in row.ms and other in row.ms:
        return row.ms[other] / row.ms[ours]
    return None


def _geomean(values):
    values = [v for v in values if v]
    return math.exp(sum(math.log(v) for v in values) / len(values)) if values else None


def _fmt(v, spec=".2f", none="-"):
    return none if v is None else format(v, spec)


def parse_shape(text: str) -> tuple[tuple[int, ...], bool]:
    cl = text.endswith("cl")
    shape = tuple(int(v) for v in text.removesuffix("cl").split("x"))
    if len(shape) < 2 or (cl and len(shape) not in (4, 5)):
        raise argparse.ArgumentTypeError(f"bad shape {text!r}: want e.g. 32x64x56x56 or 32x64x56x56cl")
    return shape, cl


def _input(shape, cl, dtype=torch.float32):
    x = torch.randn(shape).to(dtype)
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


def _time_row(row: Row, fns: dict, x: torch.Tensor, budget: float, log) -> None:
    """Time ``fns`` in one rotation with a same-size copy of ``x`` (:func:`timeit_with_copy`) into ``row``: its
    milliseconds per contender, the copy's GB/s, the page faults and the fraction of rounds normlab won."""
    rounds = {}
    got, row.copy_gbps = timeit_with_copy(fns, x, budget, log=log, rounds=rounds, faults=row.faults)
    row.won = rounds_won(rounds)
    row.ms.update({name: t * 1e3 for name, t in got.items()})


def _case(text: str, dtype, device):
    """A shape's input (laid out as the text says), a gradient for it, and its size in MB: ``(shape, x, dy, mb)``."""
    shape, cl = parse_shape(text)
    x = _input(shape, cl, dtype).to(device)
    return shape, x, torch.randn_like(x), x.numel() * x.element_size() / 1e6


def _contenders(impls, shape, x, dy, device="cpu", dtype=torch.float32) -> dict:
    """Each contender's layer for ``shape`` (seeded alike, on ``device`` in ``dtype``) as :func:`modes_for` gives
    it: ``{impl: (modes, forward_for_saved)}``."""
    out = {}
    for impl in impls:
        torch.manual_seed(0)
        out[impl] = modes_for(make_layer(impl, shape[1], len(shape)).to(device=device, dtype=dtype), x, dy)
    return out


def bench_layers(shapes, impls, budget, log, device="cpu", section="layers", dtype=torch.float32) -> list[Row]:
    """Each batch-norm contender of ``impls`` on each shape, in each mode, on ``device`` (timed to the end of
    its work: see :func:`synced`); inputs and layers in ``dtype`` (as ``model.to(dtype)``)."""
    device = torch.device(device)
    rows = []
    for text in shapes:
        shape, x, dy, mb = _case(text, dtype, device)
        by_mode = {m: Row(section, text, m, mb) for m in MODES}
        per_impl = _contenders(impls, shape, x, dy, device, dtype)
        for mode in MODES:  # contenders interleaved round by round (see timeit_interleaved)
            _time_row(by_mode[mode], {impl: synced(fns[mode], device) for impl, (fns, _) in per_impl.items()}, x,
                      budget, lambda msg, mode=mode: log(f"{msg} [{mode}]"))
            for impl, ms in by_mode[mode].ms.items():
                log(f"  {text:>16} {mode:<14} {impl:<8} {ms:9.3f} ms")
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


def bench_fused(shapes, budget, log, dtype=torch.float32) -> list[Row]:
    import normlab
    rows = []
    for text in shapes:
        shape, cl = parse_shape(text)
        x = _input(shape, cl, dtype)
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
            per = {name: modes_for(layer.to(dtype), x, dy) for name, layer in contenders.items()}
            for mode in MODES:
                _time_row(by_mode[mode], {name: fns[mode] for name, (fns, _) in per.items()}, x, budget, log)
                for name, ms in by_mode[mode].ms.items():
                    log(f"  {text:>16} bn+{act:<8} {mode:<14} {name:<16} {ms:9.3f} ms")
            for name, (_, fwd_for_saved) in per.items():
                by_mode["train_fwd_bwd"].saved_mb[name] = saved_bytes(fwd_for_saved) / 1e6
            for mode, row in by_mode.items():
                row.gbps = MIN_PASSES[mode] * mb / 1e3 / (row.ms["normlab"] / 1e3)
                rows.append(row)
    return rows


def bench_gpu(shapes, budget, log, device="cuda", dtype=torch.float32, timer=None, norms=None) -> list[Row]:
    """:func:`bench_layers` of normlab on its Triton kernels (``use_backend("triton")``) against ``torch.nn``
    (cuDNN on CUDA), in ``dtype``, on ``device``, eager and synchronized after every call (section ``gpu``; ``%copy``
    against a same-size copy on the device); then the same layers timed by ``timer(fn, budget)`` (seconds per call;
    on CUDA :func:`.timing.time_graph`: the GPU's time alone, the host's taken out by a CUDA graph) as section
    ``gpu_graph``. With ``norms`` (False: the suite's group-norm cases, True: the quick ones), group, instance and
    layer norm both ways too (sections ``gpu_norms``, ``gpu_norms_graph``). Any device the Triton backend takes: a
    CPU device in Triton's interpreter is how the tests run this section (with a wall-clock timer for the second
    part)."""
    from normlab import kernels
    device = torch.device(device)
    if timer is None and device.type == "cuda":
        timer = time_graph
    with kernels.use_backend("triton"):
        rows = bench_layers(shapes, ["normlab", "torch"], budget, log, device=device, section="gpu", dtype=dtype)
        if timer is not None:
            rows += _timed_rows(shapes, ["normlab", "torch"], budget, log, device, "gpu_graph", dtype, timer)
        if norms is not None:
            rows += bench_groupnorm(norms, budget, log, dtype, device, "gpu_norms")
            if timer is not None:
                rows += _timed_norm_rows(norms, budget, log, device, "gpu_norms_graph", dtype, timer)
    return rows


def _timed_rows(shapes, impls, budget, log, device, section, dtype, timer) -> list[Row]:
    """One row per shape and mode of each contender's seconds per call by ``timer(fn, budget)``, and a same-size
    copy's GB/s timed the same way."""
    rows = []
    for text in shapes:
        shape, x, dy, mb = _case(text, dtype, device)
        fns = {impl: modes for impl, (modes, _) in _contenders(impls, shape, x, dy, device, dtype).items()}
        rows += _timed_case(section, text, mb, x, fns, {m: MIN_PASSES[m] for m in MODES}, budget, log, timer)
    return rows


def _timed_case(section, case, mb, x, fns, passes, budget, log, timer) -> list[Row]:
    """One case's rows, a mode each (the keys of ``passes``, its minimum passes over ``x``): each contender's
    ``fns[impl][mode]`` timed by ``timer(fn, budget)``, and a same-size copy's GB/s timed the same way."""
    dst = torch.empty_like(x)
    t_copy = timer(lambda: dst.copy_(x), budget)
    rows = []
    for mode in passes:
        row = Row(section, case, mode, mb)
        for impl, f in fns.items():
            t = timer(f[mode], budget)
            if t:
                row.ms[impl] = t * 1e3
                log(f"  {case:>16} {mode:<14} {impl:<8} {t * 1e3:9.4f} ms ({section})")
        row.copy_gbps = 2 * mb / 1e3 / t_copy if t_copy else None
        if "normlab" in row.ms:
            row.gbps = passes[mode] * mb / 1e3 / (row.ms["normlab"] / 1e3)
        rows.append(row)
    return rows


# (kind, shape, groups): group norm, instance norm (G = C) and layer norm over the last dimension
GROUPNORM_CASES = [
    ("gn", (32, 64, 56, 56), 32), ("gn", (256, 64, 28, 28), 8), ("in", (32, 64, 56, 56), 64),
    # 14x14 images: channel rows that start and end mid-line, 6 KB groups
    ("gn", (128, 256, 14, 14), 32),
    ("ln", (4096, 1024), None), ("ln", (256, 197, 768), None),
    # small layers, where per-call overhead decides; few long rows, where dweight/dbias's merge does
    ("gn", (32, 32, 8, 8), 8), ("in", (8, 16, 16, 16), 16), ("ln", (64, 256), None), ("ln", (16, 4096), None)]


GROUPNORM_QUICK = [("gn", (4, 8, 6, 6), 4), ("ln", (16, 32), None)]


def norm_case(kind: str, shape: tuple, groups, device="cpu", dtype=torch.float32):
    """One group / instance / layer norm case: ``(label, mb, x, fns)``, ``fns[impl][mode]`` the timed callables of
    normlab.functional's and torch.nn.functional's (weight and bias of the channels, or of the last dimension for
    layer norm) in ``train_fwd`` and ``train_fwd_bwd``, on ``device`` in ``dtype``."""
    import torch.nn.functional as TF

    import normlab.functional as NF
    x = torch.randn(shape).to(dtype).to(device)
    dy = torch.randn_like(x)
    c = shape[-1] if kind == "ln" else shape[1]
    w = torch.randn(c).to(dtype).to(device).requires_grad_()
    b = torch.randn(c).to(dtype).to(device).requires_grad_()
    xg = x.clone().requires_grad_()
    if kind == "ln":
        pair = {"normlab": lambda t: NF.layer_norm(t, (c,), w, b, 1e-5),
                "torch": lambda t: TF.layer_norm(t, (c,), w, b, 1e-5)}
    else:
        pair = {"normlab": lambda t: NF.group_norm(t, groups, w, b, 1e-5),
                "torch": lambda t: TF.group_norm(t, groups, w, b, 1e-5)}

    def fwd_bwd(f):
        def run():
            _clear_grads(xg, w, b)
            f(xg).backward(dy)
        return run
    label = f"{kind} {'x'.join(map(str, shape))}" + (f" G={groups}" if kind == "gn" else "")
    fns = {impl: {"train_fwd": (lambda f=f: f(x)), "train_fwd_bwd": fwd_bwd(f)} for impl, f in pair.items()}
    return label, x.numel() * x.element_size() / 1e6, x, fns


# the minimum passes over the input: forward 1 read (a group in cache for its second) + 1 write; backward 2 + 1
NORM_PASSES = {"train_fwd": 2, "train_fwd_bwd": 2 + 3}


def bench_groupnorm(quick, budget, log, dtype=torch.float32, device="cpu", section="groupnorm") -> list[Row]:
    """Group, instance and layer norm, normlab against torch.nn.functional, on ``device`` (timed to the end of its
    work: see :func:`synced`)."""
    device = torch.device(device)
    rows = []
    for kind, shape, groups in GROUPNORM_QUICK if quick else GROUPNORM_CASES:
        case, mb, x, fns = norm_case(kind, shape, groups, device, dtype)
        for mode in NORM_PASSES:
            row = Row(section, case, mode, mb)
            _time_row(row, {impl: synced(modes[mode], device) for impl, modes in fns.items()}, x, budget, log)
            for name, ms in row.ms.items():
                log(f"  {case:>24} {mode:<14} {name:<8} {ms:9.3f} ms")
            row.gbps = NORM_PASSES[mode] * mb / 1e3 / (row.ms["normlab"] / 1e3)
            rows.append(row)
    return rows


def _timed_norm_rows(quick, budget, log, device, section, dtype, timer) -> list[Row]:
    """:func:`bench_groupnorm`'s cases timed by ``timer(fn, budget)`` (seconds per call), with a same-size copy."""
    rows = []
    for kind, shape, groups in GROUPNORM_QUICK if quick else GROUPNORM_CASES:
        case, mb, x, fns = norm_case(kind, shape, groups, device, dtype)
        rows += _timed_case(section, case, mb, x, fns, NORM_PASSES, budget, log, timer)
    return rows


def bench_lenet(batch, budget, log, dtype=torch.float32) -> list[Row]:
    """One SGD step of LeNet-BN per contender, the contenders interleaved round by round (see
    :func:`timeit_interleaved`: timed one after the other, a few seconds apart, the host's load moved the ratio
    by more than the difference); model and input in ``dtype``."""
    x = torch.randn(batch, 1, 28, 28).to(dtype)
    y = torch.randint(0, 10, (batch,))
    row = Row("lenet", f"LeNet-BN step, batch {batch}", "train_step", x.numel() * x.element_size() / 1e6)
    loss_fn = nn.CrossEntropyLoss()

    def make_step(kind):
        torch.manual_seed(0)
        model = lenet(kind).to(dtype)
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


def bench_roof(shapes, budget, log, dtype=torch.float32) -> list[Row]:
    """Training forward+backward of normlab and torch beside the autograd floor and a copy of the input, the four
    taking turns (no torch.compile or from-scratch contender in the rotation): each row's :func:`roof_bound`."""
    rows = []
    for text in shapes:
        shape, cl = parse_shape(text)
        x = _input(shape, cl, dtype)
        dy = torch.randn_like(x)
        row = Row("roof", text, "train_fwd_bwd", x.numel() * x.element_size() / 1e6)
        fns = {impl: modes["train_fwd_bwd"]
               for impl, (modes, _) in _contenders(("normlab", "torch"), shape, x, dy, dtype=dtype).items()}
        fns["floor"] = modes_for(AutogradFloor(), x, dy)[0]["train_fwd_bwd"]
        _time_row(row, fns, x, budget, log)
        if "normlab" in row.ms:
            row.gbps = MIN_PASSES["train_fwd_bwd"] * row.mbytes / row.ms["normlab"]
        bound = roof_bound(row)
        log(f"  {text:>16} " + " ".join(f"{k} {v:.3f} ms" for k, v in row.ms.items())
            + f"; bound {_fmt(bound['bound_ms'], '.3f')} ms, cap {_fmt(bound['cap'])}x")
        rows.append(row)
    return rows
