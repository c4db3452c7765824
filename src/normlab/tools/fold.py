"""Fold batch norms into the preceding convolution or linear layer, for inference.

In evaluation a BatchNorm is the per-channel affine map ``y = z * s + t`` with
``s = weight / sqrt(running_var + eps)`` and ``t = bias - running_mean * s``. When z is the output of a
convolution (or linear layer) ``z = W * x + b`` used by nothing else, the pair is one convolution::

    W'[o] = W[o] * s[o]        b'[o] = b[o] * s[o] + t[o]        (b = 0 when the conv has no bias)

A max-pool between the two is no obstacle when every scale is >= 0: an increasing per-channel map commutes with
the maximum, ``maxpool(z) * s + t == maxpool(z * s + t)``, so the norm folds into the convolution and the pool
stays (a negative scale turns the maximum into a minimum: that norm stays, and the report names the channels).

Grouped and depthwise convolutions fold the same way (output channels are dimension 0 of W). For transposed
convolutions W has shape (in, out / groups, k...), and output channel ``g * out/groups + j`` lives at
``W[g * in/groups : (g+1) * in/groups, j]``. The arithmetic is done in float64 and cast back to W's dtype.

Discovery: ``torch.fx`` symbolic tracing (norm modules are kept as leaves), so any model whose forward traces
works, whatever its module nesting; when tracing fails (data-dependent control flow), consecutive
(conv, norm) children of every ``nn.Sequential`` are folded instead. Norms that stay are listed in the report
with the reason. Handles torch.nn and normlab BatchNorm (and BatchRenorm / GhostBatchNorm, whose evaluation is
BatchNorm's) and FrozenBatchNorm; a BatchNorm with a fused activation leaves the activation in its place.
"""
from __future__ import annotations

import copy
import dataclasses
import warnings

import torch
import torch.fx as fx
from torch import nn

from . import _common as C

__all__ = ["fold_bn", "fold_into", "FoldReport", "fold_speedup", "time_inference"]


@dataclasses.dataclass
class FoldReport:
    """What :func:`fold_bn` did. ``folded``: (producer, norm) module names; ``skipped``: (norm, reason)."""
    method: str = "fx"
    folded: list[tuple[str, str]] = dataclasses.field(default_factory=list)
    skipped: list[tuple[str, str]] = dataclasses.field(default_factory=list)
    max_abs_diff: float | None = None
    max_abs_output: float | None = None
    trace_error: str | None = None

    @property
    def ok(self) -> bool:
        """True when the equivalence check (if any) passed."""
        if self.max_abs_diff is None:
            return True
        return self.max_abs_diff <= 1e-4 * max(1.0, self.max_abs_output or 0.0)

    def __str__(self) -> str:
        lines = [f"fold_bn ({self.method}): {len(self.folded)} folded, {len(self.skipped)} left in place"]
        lines += [f"  folded  {norm} -> {prod}" for prod, norm in self.folded]
        lines += [f"  kept    {norm}: {why}" for norm, why in self.skipped]
        if self.max_abs_diff is not None:
            lines.append(f"  check: max |folded - original| = {self.max_abs_diff:.3g} "
                         f"(max |output| {self.max_abs_output:.3g}) {'ok' if self.ok else 'MISMATCH'}")
        if self.trace_error:
            lines.append(f"  fx tracing failed ({self.trace_error}); used the Sequential walk")
        return "\n".join(lines)


@torch.no_grad()
def fold_into(producer: nn.Module, bn: nn.Module) -> None:
    """Fold the evaluation-mode ``bn`` into ``producer`` (Conv, ConvTranspose or Linear) in place."""
    s, t = C.scale_shift(bn)
    w = producer.weight
    w64 = w.detach().to(torch.float64)
    if isinstance(producer, C.CONV_TRANSPOSE_TYPES):
        g = producer.groups
        cin, cout_g = w.shape[0], w.shape[1]
        k = list(w.shape[2:])
        w64 = (w64.reshape(g, cin // g, cout_g, *k) * s.reshape(g, 1, cout_g, *[1] * len(k))).reshape(w.shape)
    else:
        w64 = w64 * s.reshape(-1, *[1] * (w.dim() - 1))
    b64 = t if producer.bias is None else producer.bias.detach().to(torch.float64) * s + t
    producer.weight.copy_(w64.to(w.dtype))
    if producer.bias is None:
        producer.bias = nn.Parameter(b64.to(dtype=w.dtype, device=w.device))
    else:
        producer.bias.copy_(b64.to(producer.bias.dtype))


MAX_POOL_TYPES = (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d,
                  nn.AdaptiveMaxPool3d)


def _out_channels(m: nn.Module) -> int:
    return m.out_features if isinstance(m, nn.Linear) else m.out_channels


def _replacement(bn: nn.Module) -> nn.Module | None:
    act = getattr(bn, "act", "identity")
    return None if act == "identity" else C.activation_module(act)


def _set_submodule(root: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, leaf, new)


def _fold_fx(model: nn.Module, report: FoldReport, sample_input) -> nn.Module:
    tracer = fx.Tracer()  # norm layers are leaves, torch.nn's and normlab's (normlab.nn._overrides)
    graph = tracer.trace(model)
    gm = fx.GraphModule(tracer.root, graph, class_name=type(model).__name__ + "Folded")
    shapes = _linear_output_ranks(gm, sample_input)
    modules = dict(gm.named_modules())
    calls: dict[str, int] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    for node in list(gm.graph.nodes):
        if node.op != "call_module" or not C.is_norm(modules[node.target]):
            continue
        bn = modules[node.target]
        why = _why_not(node, bn, modules, calls, shapes)
        if why:
            report.skipped.append((node.target, why))
            continue
        prev = _producer(node.args[0], modules)
        fold_into(modules[prev.target], bn)
        report.folded.append((prev.target, node.target))
        rep = _replacement(bn)
        if rep is None:
            node.replace_all_uses_with(node.args[0])
            gm.graph.erase_node(node)
        else:
            _set_submodule(gm, node.target, rep)
    gm.graph.lint()
    gm.delete_all_unused_submodules()
    gm.recompile()
    return gm


@torch.no_grad()
def _linear_output_ranks(gm: fx.GraphModule, sample_input) -> dict[str, int]:
    """Rank of the output of every Linear that feeds a norm, from one run on the sample (empty without one)."""
    modules = dict(gm.named_modules())
    targets = {n.args[0].target for n in gm.graph.nodes
               if n.op == "call_module" and C.is_norm(modules[n.target]) and n.args
               and isinstance(n.args[0], fx.Node) and n.args[0].op == "call_module"
               and isinstance(modules.get(n.args[0].target), nn.Linear)}
    ranks: dict[str, int] = {}
    if sample_input is None or not targets:
        return ranks
    handles = [modules[t].register_forward_hook(lambda m, a, out, t=t: ranks.__setitem__(t, out.dim()))
               for t in targets]
    try:
        gm(*_as_args(sample_input))
    except Exception:  # the ranks are only a refinement
        pass
    finally:
        for h in handles:
            h.remove()
    return ranks


def _is_max_pool(node, modules) -> bool:
    return (isinstance(node, fx.Node) and node.op == "call_module"
            and isinstance(modules.get(node.target), MAX_POOL_TYPES) and not modules[node.target].return_indices)


def _producer(node, modules):
    """The node the norm folds into: its input, or the input of a max-pool in between."""
    return node.args[0] if _is_max_pool(node, modules) else node


def _why_not(node, bn, modules, calls, shapes) -> str | None:
    if not C.is_foldable_norm(bn):
        return f"{type(bn).__name__} has no running statistics (track_running_stats=False)" \
            if C.is_batchnorm(bn) else f"{type(bn).__name__} is not an affine map in evaluation"
    if len(node.args) != 1 or node.kwargs:
        return "called with extra arguments"
    prev = node.args[0]
    if _is_max_pool(prev, modules):
        pool = prev
        if len(pool.args) != 1 or pool.kwargs or len(pool.users) != 1:
            return f"the max-pool {pool.target} before it is called with extra arguments or used elsewhere"
        prev = pool.args[0]
        if not (isinstance(prev, fx.Node) and prev.op == "call_module"
                and isinstance(modules.get(prev.target), C.CONV_TYPES + C.CONV_TRANSPOSE_TYPES)):
            what = f"{prev.op} {prev.target}" if isinstance(prev, fx.Node) else type(prev).__name__
            return f"its input is a max-pool of something other than a convolution ({what})"
        negative = (C.scale_shift(bn)[0] < 0).nonzero().flatten().tolist()
        if negative:
            return (f"the max-pool {pool.target} sits between it and {prev.target}, and channel(s) {negative[:8]} "
                    f"have a negative scale (max would become min)")
    if not isinstance(prev, fx.Node) or prev.op != "call_module" or \
            not isinstance(modules.get(prev.target), C.PRODUCER_TYPES):
        what = prev.op if isinstance(prev, fx.Node) else type(prev).__name__
        target = getattr(prev, "target", "")
        return f"its input does not come from a conv/linear layer (from {what} {target})".rstrip()
    producer = modules[prev.target]
    if len(prev.users) != 1:
        return f"the output of {prev.target} is also used elsewhere"
    if calls.get(prev.target, 0) != 1:
        return f"{prev.target} is called more than once (shared weights)"
    if _out_channels(producer) != bn.num_features:
        return f"{prev.target} has {_out_channels(producer)} outputs, the norm {bn.num_features} channels"
    if isinstance(producer, nn.Linear) and shapes.get(prev.target, 2) != 2:
        return f"{prev.target} output has {shapes[prev.target]} dimensions: its features are not dimension 1"
    return None


def _fold_sequential(model: nn.Module, report: FoldReport) -> nn.Module:
    done = set()
    for name, seq in model.named_modules():
        if not isinstance(seq, nn.Sequential):
            continue
        children = list(seq.named_children())
        for (pname, prod), (bname, bn) in zip(children, children[1:]):
            full = f"{name}.{bname}" if name else bname
            if not C.is_norm(bn):
                continue
            done.add(id(bn))
            if isinstance(prod, C.PRODUCER_TYPES) and C.is_foldable_norm(bn) and \
                    _out_channels(prod) == bn.num_features:
                fold_into(prod, bn)
                report.folded.append((f"{name}.{pname}" if name else pname, full))
                setattr(seq, bname, _replacement(bn) or nn.Identity())
            else:
                report.skipped.append((full, "not directly after a conv/linear in a Sequential"
                                       if C.is_foldable_norm(bn) else "no running statistics"))
    for name, m in model.named_modules():
        if C.is_norm(m) and id(m) not in done:
            report.skipped.append((name, "not inside a Sequential (and the model could not be traced)"))
    return model


def _as_args(sample_input):
    return tuple(sample_input) if isinstance(sample_input, (tuple, list)) else (sample_input,)


def fold_bn(model: nn.Module, sample_input=None, *, check: bool = True) -> nn.Module:
    """A new evaluation-mode model with every foldable batch norm folded into the layer before it.

    ``model`` is left untouched (it is deep-copied). The result carries ``.fold_report`` (:class:`FoldReport`):
    folded pairs, norms left in place with the reason, and, when ``sample_input`` (a tensor or a tuple of
    arguments) is given and ``check``, the largest absolute difference between the two models' outputs in
    evaluation mode (a warning is issued when it is not small). Example::

        >>> fast = fold_bn(model, torch.randn(1, 1, 28, 28))
        >>> print(fast.fold_report)
    """
    work = copy.deepcopy(model).eval()
    report = FoldReport()
    try:
        folded = _fold_fx(work, report, sample_input)
    except Exception as e:  # tracing failed: data-dependent control flow, unsupported ops, ...
        report = FoldReport(method="sequential", trace_error=f"{type(e).__name__}: {e}"[:200])
        folded = _fold_sequential(copy.deepcopy(model).eval(), report)
    folded.eval()
    if sample_input is not None and check:
        reference = copy.deepcopy(model).eval()
        with torch.no_grad():
            want = reference(*_as_args(sample_input))
            got = folded(*_as_args(sample_input))
        if isinstance(want, torch.Tensor) and isinstance(got, torch.Tensor):
            report.max_abs_diff = float((want.double() - got.double()).abs().max()) if want.numel() else 0.0
            report.max_abs_output = float(want.double().abs().max()) if want.numel() else 0.0
            if not report.ok:
                warnings.warn(f"fold_bn: the folded model differs from the original by up to "
                              f"{report.max_abs_diff:.3g}", RuntimeWarning, stacklevel=2)
    folded.fold_report = report
    return folded


@torch.no_grad()
def time_inference(model: nn.Module, sample_input, repeats: int = 50, warmup: int = 5) -> float:
    """Median wall time in milliseconds of one evaluation-mode forward on ``sample_input``."""
    import statistics
    import time

    model = model.eval()
    args = _as_args(sample_input)
    for _ in range(warmup):
        model(*args)
    times = []
    for _ in range(repeats):
        if args[0].is_cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        model(*args)
        if args[0].is_cuda:
            torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def fold_speedup(model: nn.Module, sample_input, repeats: int = 50, warmup: int = 5) -> dict:
    """Fold ``model`` and time both versions on ``sample_input`` in one process (median of ``repeats``).

    Returns ``{"original_ms", "folded_ms", "speedup", "max_abs_diff", "folded", "kept", "report"}``, where
    ``speedup = original_ms / folded_ms`` and ``report`` is the :class:`FoldReport`. The model is untouched.
    """
    folded = fold_bn(model, sample_input)
    original = copy.deepcopy(model).eval()
    t_orig = time_inference(original, sample_input, repeats, warmup)
    t_fold = time_inference(folded, sample_input, repeats, warmup)
    rep = folded.fold_report
    return {"original_ms": t_orig, "folded_ms": t_fold, "speedup": t_orig / t_fold if t_fold > 0 else float("nan"),
            "max_abs_diff": rep.max_abs_diff, "folded": len(rep.folded), "kept": len(rep.skipped), "report": rep}
