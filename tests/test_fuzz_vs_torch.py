"""Seeded differential fuzz: normlab's drop-in layers against torch.nn on random configurations.

Each case draws a layer (batch norm, fused with an activation or not, layer, group or instance norm), its
arguments (affine, running statistics, momentum 0 / 1 / None, eps down to 1e-12), a shape (batches of one, size-1
dimensions), a dtype (float32, float64, bfloat16, float16, 16-bit inputs to a float32 layer), a layout
(contiguous, channels_last, permuted, strided views) and values (large means, tiny spreads, constant channels),
then three steps in random train / eval modes. Both layers must raise alike, or both run; then outputs, input and
parameter gradients and the buffers are judged against torch.nn's layer in float64 on the same rounded input
(a contiguous copy): normlab's error must stay
within the dtype's tolerance or within 4x torch's own error (on ill-conditioned cases, a tiny spread under a
large mean or eps = 1e-12, both drift from float64, and normlab is the one judged).

``NORMLAB_FUZZ_CASES`` (default 400) sets how many cases run (half as many again under the forced "cpu" and
"portable" backends); the seeds are fixed, so a failure names its seed.
"""
from __future__ import annotations

import math
import os
import random

import pytest
import torch

import normlab

CASES = int(os.environ.get("NORMLAB_FUZZ_CASES", "400"))
CHUNKS = 8
KINDS = ("BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "BatchNormAct1d", "BatchNormAct2d", "BatchNormAct3d",
         "LayerNorm", "GroupNorm", "InstanceNorm1d",
         "InstanceNorm2d", "InstanceNorm3d")
RANKS = {"BatchNorm1d": (2, 3), "BatchNorm2d": (4,), "BatchNorm3d": (5,), "BatchNormAct1d": (2, 3),
         "BatchNormAct2d": (4,), "BatchNormAct3d": (5,), "LayerNorm": (2, 3, 4),
         "GroupNorm": (2, 3, 4, 5), "InstanceNorm1d": (2, 3), "InstanceNorm2d": (4,), "InstanceNorm3d": (5,)}
ACTIVATIONS = {"identity": torch.nn.Identity, "relu": torch.nn.ReLU, "silu": torch.nn.SiLU, "sigmoid": torch.nn.Sigmoid}
TOL = {torch.float64: 1e-9, torch.float32: 4e-4, torch.bfloat16: 8e-2, torch.float16: 1.6e-2}
MAX_VALUES = 1 << 18


def _shape(kind: str, rng: random.Random, max_values: int) -> list[int]:
    rank = rng.choice(RANKS[kind])
    dims = [rng.choice([1, 2, 3, 4, 5, 7, 8, 16, 33, 64]) for _ in range(rank)]
    if rng.random() < 0.3:
        dims[0] = rng.choice([1, 2, 64, 300])
    while math.prod(dims) > max_values:
        i = max(range(rank), key=lambda j: dims[j])
        dims[i] = max(1, dims[i] // 4)
    return dims


def _arguments(kind: str, shape: list[int], rng: random.Random) -> tuple[tuple, dict]:
    kw = {"eps": rng.choice([1e-5, 1e-3, 0.1, 1e-12])}
    if kind == "LayerNorm":
        args = (shape[-rng.randint(1, len(shape)):],)
        kw["elementwise_affine"] = rng.random() < 0.8
        if kw["elementwise_affine"] and rng.random() < 0.2:
            kw["bias"] = False
    elif kind == "GroupNorm":
        c = shape[1]
        args = (rng.choice([g for g in range(1, c + 1) if c % g == 0]), c)
        kw["affine"] = rng.random() < 0.8
    else:
        batch = kind.startswith("Batch")
        args = (shape[1],)
        kw["affine"] = rng.random() < (0.8 if batch else 0.5)
        kw["track_running_stats"] = rng.random() < (0.8 if batch else 0.4)
        kw["momentum"] = rng.choice([0.1, 0.3, None, 1.0, 0.0])
        if "Act" in kind:
            kw["act"] = rng.choice(list(ACTIVATIONS))
    return args, kw


def _torch_layer(kind: str, args: tuple, kw: dict) -> torch.nn.Module:
    """torch.nn's layer for ``kind``; for normlab's fused BatchNormAct, torch's batch norm then the activation."""
    if "Act" not in kind:
        return getattr(torch.nn, kind)(*args, **kw)
    kw = dict(kw)
    act = ACTIVATIONS[kw.pop("act")]()
    return torch.nn.Sequential(getattr(torch.nn, kind.replace("Act", ""))(*args, **kw), act)


def _norm(layer: torch.nn.Module) -> torch.nn.Module:
    """The norm layer itself (the batch norm of a torch batch norm + activation)."""
    return layer[0] if isinstance(layer, torch.nn.Sequential) else layer


def _input(shape, dtype, layout, scale, offset, rng, gen, device) -> torch.Tensor:
    x = torch.randn(shape, dtype=torch.float64, generator=gen) * scale + offset
    if rng.random() < 0.1:
        x[:, 0] = 3.25  # a constant channel (a constant column of an (N, C) input)
    x = x.to(dtype).to(device)
    if layout == "channels_last" and x.dim() in (4, 5):
        return x.contiguous(memory_format=torch.channels_last if x.dim() == 4 else torch.channels_last_3d)
    if layout == "permuted" and x.dim() >= 3:
        return x.transpose(0, 2).contiguous().transpose(0, 2)
    if layout == "strided":
        return torch.cat([x, x], dim=-1)[..., ::2]
    return x


def _judge(ours, theirs, truth, tol, what) -> str | None:
    """None if ``ours`` is finite wherever the float64 ``truth`` rounded to ``ours``' dtype and torch's ``theirs``
    both are, and within ``tol`` of the truth where both are finite (relative to its largest value, at least 1)
    or within 4x torch's own error; else what is wrong."""
    rounded = torch.isfinite(truth.to(ours.dtype))  # a 16-bit gradient overflows where its value does
    ours, theirs, truth = (t.detach().cpu().double() for t in (ours, theirs, truth))
    fo, ft = torch.isfinite(ours), torch.isfinite(theirs)
    lost = ~fo & rounded & ft
    if lost.any():
        return f"{what}: {lost.sum().item()} non-finite values where float64 and torch are finite"
    both = fo & rounded
    if not both.any():
        return None
    scale = max(1.0, truth[both].abs().max().item())
    err = (ours[both] - truth[both]).abs().max().item()
    ft = ft & both
    theirs_err = (theirs[ft] - truth[ft]).abs().max().item() if ft.any() else math.inf
    if err > tol * scale and err > 4 * theirs_err:
        return f"{what}: error {err:.3g} against float64 (scale {scale:.3g}), torch's {theirs_err:.3g}"
    return None


def _flags(t: torch.Tensor) -> tuple[bool, bool]:
    """(contiguous, channels_last or channels_last_3d)"""
    fmt = {4: torch.channels_last, 5: torch.channels_last_3d}.get(t.dim())
    return t.is_contiguous(), fmt is not None and t.is_contiguous(memory_format=fmt)


def _same_format(ours, theirs, what) -> str | None:
    """None where both tensors are laid out alike: contiguous, channels_last (3d) or neither (a view's
    success, ``.view(N, -1)`` say, depends on it)."""
    if _flags(ours) == _flags(theirs):
        return None
    return f"{what}: (contiguous, channels_last) {_flags(ours)}, torch's {_flags(theirs)} (strides " \
           f"{ours.stride()}, torch's {theirs.stride()})"


def _condition(kind: str, args: tuple, x: torch.Tensor, eps: float) -> float:
    """max |x| over the smallest sqrt(var + eps) of the groups the layer's statistics run over: how much the
    rounding of a float64 computation on ``x`` grows in its normalized output."""
    if kind.startswith("Batch"):
        groups = x.transpose(0, 1).reshape(x.shape[1], -1)
    elif kind.startswith("Instance"):
        groups = x.reshape(x.shape[0] * x.shape[1], -1)
    elif kind == "GroupNorm":
        groups = x.reshape(x.shape[0] * args[0], -1)
    else:
        groups = x.reshape(-1, math.prod(args[0]))
    if groups.numel() == 0:
        return 1.0
    var = groups.var(1, unbiased=False).min().item()
    return x.abs().max().item() / math.sqrt(var + eps)


def run_case(seed: int, device: str = "cpu", max_values: int = MAX_VALUES) -> str | None:
    """One case on ``device`` (the float64 reference on CPU); None if normlab agrees with torch.nn, else a
    description naming the seed."""
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    kind = rng.choice(KINDS)
    shape = _shape(kind, rng, max_values)
    dtype = rng.choice([torch.float32, torch.float32, torch.float64, torch.bfloat16, torch.float16])
    args, kw = _arguments(kind, shape, rng)
    layout = rng.choice(["contiguous", "contiguous", "channels_last", "permuted", "strided"])
    scale, offset = rng.choice([1.0, 1.0, 1e3, 1e-3]), rng.choice([0.0, 0.0, 100.0, -5.0])
    mixed = dtype in (torch.bfloat16, torch.float16) and rng.random() < 0.4  # 16-bit input, float32 layer
    input_grad = rng.random() < 0.85
    if kind == "GroupNorm" and layout == "channels_last" and len(shape) in (4, 5) and not input_grad:
        return None  # torch's own GroupNorm backward crashes on channels_last inputs when the input needs no grad
    theirs = _torch_layer(kind, args, kw)
    ours = getattr(normlab, kind)(*args, **kw)
    with torch.no_grad():
        for p in theirs.parameters():
            p.uniform_(-2, 2, generator=gen)
    ours.load_state_dict(_norm(theirs).state_dict())
    theirs.to(device=device, dtype=None if mixed else dtype)
    ours.to(device=device, dtype=None if mixed else dtype)
    label = (f"seed {seed}: {kind}{args} {kw} {dtype}{' (float32 layer)' if mixed else ''} shape {shape} "
             f"{layout}, values {offset} + {scale} N(0, 1), input grad {input_grad}")
    for step in range(3):
        training = rng.random() < 0.7
        theirs.train(training)
        ours.train(training)
        state = {k: v.clone() for k, v in _norm(theirs).state_dict().items()}
        x = _input(shape, dtype, layout, scale, offset, rng, gen, device)
        xt, xo = (x.detach().clone().requires_grad_(input_grad) for _ in range(2))
        errors = []
        for layer, xi in ((theirs, xt), (ours, xo)):
            try:
                errors.append((layer(xi), None))
            except Exception as err:  # noqa: BLE001 - compared below
                errors.append((None, err))
        (yt, et), (yo, eo) = errors
        if (et is None) != (eo is None):
            return f"{label}, step {step} ({'train' if training else 'eval'}): torch raised {et!r}, normlab {eo!r}"
        if et is not None:
            if not isinstance(eo, type(et)):
                return f"{label}: torch raised {type(et).__name__}, normlab {type(eo).__name__}: {eo}"
            return None
        if yo.shape != yt.shape or yo.dtype != yt.dtype:
            return f"{label}: output {tuple(yo.shape)} {yo.dtype}, torch's {tuple(yt.shape)} {yt.dtype}"
        exact = _torch_layer(kind, args, kw).double()
        _norm(exact).load_state_dict({k: v.double() if v.is_floating_point() else v for k, v in state.items()})
        exact.train(training)
        # the reference takes a contiguous copy: torch's own backward of some permuted layouts is wrong (its dbias
        # is not the sum of dy for a (1, 33, 8, 1) input of strides (1, 1, 33, 1), torch 2.13)
        x64 = x.detach().cpu().double().contiguous().requires_grad_(input_grad)
        y64 = exact(x64)
        # float64 is the truth only to u * kappa (kappa = max |x| * invstd): where that exceeds the tolerance
        # (float64 inputs, eps = 1e-12 and single-value groups, say), the tolerance grows to it
        tol = max(TOL[dtype], 100 * 2.0 ** -53 * _condition(kind, args, x64.detach(), kw["eps"]))
        problems = [_judge(yo, yt, y64, tol, "output"), _same_format(yo, yt, "output")]
        dy = torch.randn(yt.shape, dtype=torch.float64, generator=gen).to(yt.dtype).to(device)
        if rng.random() < 0.5:
            dy = torch.empty_like(yt).copy_(dy)  # laid out as torch's output (as autograd hands it over)
        wrt = {name: [xi] if input_grad else [] for name, xi in (("t", xt), ("o", xo), ("e", x64))}
        gt = go = None
        if wrt["t"] or list(theirs.parameters()):
            try:
                gt = torch.autograd.grad(yt, wrt["t"] + list(theirs.parameters()), dy)
            except RuntimeError:  # torch's own backward fails (group norm of a 5-D input with weight xor bias)
                pass
            go = torch.autograd.grad(yo, wrt["o"] + list(ours.parameters()), dy)
        if gt is not None:
            g64 = torch.autograd.grad(y64, wrt["e"] + list(exact.parameters()), dy.cpu().double())
            names = (["input grad"] if input_grad else []) + [f"{n} grad" for n, _ in ours.named_parameters()]
            problems += [_judge(o, t, e, 50 * tol, n) for o, t, e, n in zip(go, gt, g64, names)]
            if input_grad:
                problems.append(_same_format(go[0], gt[0], "input grad"))
        for (name, bo), (_, bt), (_, b64) in zip(ours.named_buffers(), theirs.named_buffers(), exact.named_buffers()):
            if bo.dtype != bt.dtype or not bt.is_floating_point():
                problems.append(None if torch.equal(bo.cpu(), bt.cpu()) else
                                f"{name}: {bo} ({bo.dtype}), torch's {bt} ({bt.dtype})")
            else:
                problems.append(_judge(bo, bt, b64, 10 * tol, name))
        problems = [p for p in problems if p]
        if problems:
            return f"{label}, step {step} ({'train' if training else 'eval'}): " + "; ".join(problems)
        ours.load_state_dict(_norm(theirs).state_dict())  # the next step starts from the same buffers
    return None


@pytest.mark.filterwarnings("ignore::UserWarning")  # InstanceNorm's num_features note, as torch's
@pytest.mark.parametrize("chunk", range(CHUNKS))
@pytest.mark.parametrize("backend", [None, "cpu", "portable"])
def test_layers_agree_with_torch_on_random_configurations(backend, chunk, backend_ctx):
    """The automatic choice on every case; the Python glue's loops and the portable path on half as many."""
    seeds = range(chunk, CASES if backend is None else CASES // 2, CHUNKS)
    with backend_ctx(backend):
        found = [r for r in map(run_case, seeds) if r]
    assert not found, f"{len(found)} of {len(seeds)} cases:\n" + "\n".join(found[:5])
