"""Diagnose common batch-norm misuse in a model, from its structure, its buffers and one sample batch.

``doctor(model, sample_input)`` runs the sample through deep copies of the model (the model itself is not
touched), watching every norm with hooks, and returns a :class:`DoctorReport`. Checks (``code``: level):

* ``bias-before-bn`` (warning): a conv/linear with a bias feeds a batch norm directly: BN subtracts the mean,
  so the bias is cancelled and only wastes a parameter (build the layer with ``bias=False``).
* ``small-batch`` (error below 2 values per channel, warning below ``min_batch`` samples): a norm in training
  mode sees a tiny batch (GhostBatchNorm: the virtual batch); batch statistics are noise. Fix: larger batches,
  GroupNorm/LayerNorm, BatchRenorm, or freeze_bn.
* ``never-updated`` (warning): running statistics still at their initial values (mean 0, var 1,
  ``num_batches_tracked`` 0) while the model is in evaluation mode, which then normalizes with them.
* ``non-finite`` (error): NaN/Inf in a norm's running statistics, weight or bias.
* ``frozen-affine-updating-stats`` (warning): gamma/beta have ``requires_grad=False`` yet the norm is in
  training mode and updates its running statistics (a half-done freeze: use ``freeze_bn``).
* ``bn-at-output`` (warning): a batch norm produces the model's output (logits constrained to a fixed
  scale/shift per batch; put the norm before the last linear layer or drop it).
* ``train-eval-mismatch`` (warning): on the sample, the model's output in training mode and in evaluation
  mode differ by more than ``tolerance`` (relative L2); for the worst layers the shift
  ``|mu_batch - running_mean| / sqrt(running_var)`` and the ratio ``var_batch / running_var`` are listed.
  Often stale running statistics: try ``recompute_bn_stats``.
* ``forward-failed`` (error): the forward on the sample raised (the message is kept).
* ``no-running-stats`` (info): a batch norm without running statistics uses batch statistics in evaluation.
"""
from __future__ import annotations

import copy
import dataclasses

import torch
from torch import Tensor, nn

from . import _common as C
from .freeze import is_frozen

__all__ = ["doctor", "DoctorReport", "Finding"]

_LEVELS = ("error", "warning", "info")


@dataclasses.dataclass
class Finding:
    level: str
    code: str
    module: str
    message: str
    fix: str = ""

    def __str__(self) -> str:
        where = f" [{self.module}]" if self.module else ""
        fix = f"\n      fix: {self.fix}" if self.fix else ""
        return f"  {self.level.upper():7s} {self.code}{where}: {self.message}{fix}"


@dataclasses.dataclass
class DoctorReport:
    findings: list[Finding] = dataclasses.field(default_factory=list)
    num_norms: int = 0
    output_rel_diff: float | None = None

    def add(self, level, code, module, message, fix=""):
        self.findings.append(Finding(level, code, module, message, fix))

    @property
    def ok(self) -> bool:
        """No errors and no warnings."""
        return not any(f.level in ("error", "warning") for f in self.findings)

    def codes(self) -> set[str]:
        return {f.code for f in self.findings}

    def by_code(self, code: str) -> list[Finding]:
        return [f for f in self.findings if f.code == code]

    def __str__(self) -> str:
        counts = {lvl: sum(f.level == lvl for f in self.findings) for lvl in _LEVELS}
        head = (f"normlab doctor: {self.num_norms} norm layer(s); {counts['error']} error(s), "
                f"{counts['warning']} warning(s), {counts['info']} note(s)")
        if not self.findings:
            return head + "\n  no problems found"
        order = sorted(self.findings, key=lambda f: _LEVELS.index(f.level))
        return "\n".join([head, *map(str, order)])


def _as_args(sample_input):
    return tuple(sample_input) if isinstance(sample_input, (tuple, list)) else (sample_input,)


def _first_tensor(out):
    if isinstance(out, Tensor):
        return out
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], Tensor):
        return out[0]
    if isinstance(out, dict):
        for v in out.values():
            if isinstance(v, Tensor):
                return v
    return None


@torch.no_grad()
def doctor(model: nn.Module, sample_input, *, min_batch: int = 8, tolerance: float = 0.1) -> DoctorReport:
    """Check ``model`` for batch-norm misuse on ``sample_input`` (a tensor or a tuple of forward arguments).

    The model is run on deep copies (its running statistics and mode are untouched). Example::

        >>> print(doctor(model, torch.randn(32, 1, 28, 28)))
    """
    report = DoctorReport()
    work = copy.deepcopy(model)
    norms = {name: m for name, m in work.named_modules() if C.is_norm(m)}
    report.num_norms = len(norms)
    _static_checks(work, norms, report)

    # one forward in the model's own mode, recording who produced which tensor and what each norm saw
    producers: dict[int, tuple[str, nn.Module, Tensor]] = {}
    norm_outputs: dict[int, tuple[str, Tensor]] = {}
    seen: dict[str, dict] = {}
    handles = []
    for name, m in work.named_modules():
        if isinstance(m, C.PRODUCER_TYPES):
            handles.append(m.register_forward_hook(_record_producer(name, m, producers)))
        if name in norms:
            handles.append(m.register_forward_pre_hook(_record_norm_input(name, producers, seen)))
            handles.append(m.register_forward_hook(_record_norm_output(name, norm_outputs)))
    snapshot = copy.deepcopy(work)  # for the train/eval comparison, before this forward touches the buffers
    out = None
    try:
        out = work(*_as_args(sample_input))
    except (ValueError, RuntimeError) as e:  # still report what the hooks saw before the failure
        report.add("error", "forward-failed", "", f"the model's forward on the sample raised: {e}"[:400])
    finally:
        for h in handles:
            h.remove()
    out_t = _first_tensor(out)

    for name, info in seen.items():
        m = norms[name]
        if C.is_batchnorm(m) or C.has_batch_stats(m):
            prod = info.get("producer")
            if prod is not None and C.is_batchnorm(m) and getattr(prod[1], "bias", None) is not None:
                report.add("warning", "bias-before-bn", prod[0],
                           f"{type(prod[1]).__name__} has a bias but feeds {name} ({type(m).__name__}) directly; "
                           f"the norm subtracts the mean, so the bias has no effect",
                           f"construct {prod[0]} with bias=False")
        if info["training"] and (C.is_batchnorm(m) or C.has_batch_stats(m)):
            n, per_channel = info["n"], info["per_channel"]
            vbs = getattr(m, "virtual_batch_size", None)
            eff = min(n, vbs) if vbs else n
            if per_channel <= 1 or (vbs and eff * (per_channel // max(n, 1)) <= 1):
                report.add("error", "small-batch", name,
                           f"training with {per_channel} value(s) per channel: the batch variance is 0",
                           "use a larger batch, eval mode, or GroupNorm/LayerNorm")
            elif eff < min_batch:
                what = f"virtual batches of {eff}" if vbs else f"a batch of {n} samples"
                report.add("warning", "small-batch", name,
                           f"training with {what} (< {min_batch}); batch statistics are noisy and differ from "
                           f"the running ones",
                           "use larger batches, GroupNorm ('gn'), BatchRenorm ('brn'), or freeze_bn(model)")
    if out_t is not None:
        for name in norms:
            hit = norm_outputs.get(id(out_t))
            if hit is not None and hit[0] == name and hit[1] is out_t:
                report.add("warning", "bn-at-output", name,
                           f"the model's output comes straight from {type(norms[name]).__name__} {name}: the "
                           f"outputs are forced to a per-channel scale and shift",
                           "drop the final norm or place it before the last linear/conv layer")
    _train_eval_check(snapshot, norms, sample_input, tolerance, report)
    return report


def _static_checks(model, norms, report):
    for name, m in norms.items():
        tensors = {k: getattr(m, k, None) for k in ("running_mean", "running_var", "weight", "bias")}
        bad = [k for k, t in tensors.items() if isinstance(t, Tensor) and not torch.isfinite(t).all()]
        if bad:
            report.add("error", "non-finite", name, f"non-finite values in {', '.join(bad)}",
                       "check the learning rate / inputs; recompute_bn_stats repairs running statistics")
        if not (C.is_batchnorm(m) or C.has_batch_stats(m)):
            continue
        if getattr(m, "running_mean", None) is None:
            report.add("info", "no-running-stats", name,
                       "track_running_stats=False: evaluation normalizes with the batch's statistics")
            continue
        nbt = getattr(m, "num_batches_tracked", None)
        untouched = (bool((m.running_mean == 0).all()) and bool((m.running_var == 1).all())
                     and (nbt is None or int(nbt) == 0))
        if untouched and not m.training:
            report.add("warning", "never-updated", name,
                       "running statistics were never updated (mean 0, var 1, num_batches_tracked 0) and the "
                       "model is in eval mode, so it normalizes with them",
                       "train first, or run recompute_bn_stats(model, batches)")
        params = [p for p in (getattr(m, "weight", None), getattr(m, "bias", None)) if isinstance(p, nn.Parameter)]
        momentum = getattr(m, "momentum", 0.1)
        if (params and not any(p.requires_grad for p in params) and m.training and not is_frozen(m)
                and momentum != 0):
            report.add("warning", "frozen-affine-updating-stats", name,
                       "weight/bias have requires_grad=False but the layer is in training mode and still "
                       "updates its running statistics",
                       "call normlab.tools.freeze_bn(model) (keeps it in eval behaviour), or unfreeze weight/bias")


def _record_producer(name, m, producers):
    def hook(module, args, out):
        if isinstance(out, Tensor):
            producers[id(out)] = (name, m, out)  # the tensor is kept alive so its id cannot be reused
    return hook


def _record_norm_input(name, producers, seen):
    def hook(module, args):
        x = args[0] if args and isinstance(args[0], Tensor) else None
        if x is None or x.dim() < 2:
            return
        prod = producers.get(id(x))
        if prod is not None and prod[2] is not x:
            prod = None
        seen[name] = {"producer": prod, "n": x.shape[0],
                      "per_channel": x.numel() // max(x.shape[1], 1), "training": module.training}
    return hook


def _record_norm_output(name, norm_outputs):
    def hook(module, args, out):
        if isinstance(out, Tensor):
            norm_outputs[id(out)] = (name, out)
    return hook


def _train_eval_check(model, norms, sample_input, tolerance, report):
    bn_names = [n for n, m in norms.items() if C.has_batch_stats(m)]
    if not bn_names:
        return
    ev = copy.deepcopy(model).eval()
    tr = copy.deepcopy(model).train()
    inputs: dict[str, Tensor] = {}
    handles = [dict(tr.named_modules())[n].register_forward_pre_hook(_grab(n, inputs)) for n in bn_names]
    try:
        out_e = _first_tensor(ev(*_as_args(sample_input)))
        out_t = _first_tensor(tr(*_as_args(sample_input)))
    except (ValueError, RuntimeError) as e:  # e.g. a batch of one cannot run in training mode
        report.add("info", "train-eval-mismatch", "", f"training-mode forward failed on the sample: {e}")
        return
    finally:
        for h in handles:
            h.remove()
    if out_e is None or out_t is None or out_e.shape != out_t.shape or out_e.numel() == 0:
        return
    diff = (out_e.double() - out_t.double()).norm() / max(float(out_e.double().norm()), 1e-12)
    report.output_rel_diff = float(diff)
    if report.output_rel_diff <= tolerance:
        return
    shifts = []
    for n in bn_names:
        m = norms[n]
        x = inputs.get(n)
        if x is None or m.running_mean is None:
            continue
        dims = [0] + list(range(2, x.dim()))
        var_b, mu = torch.var_mean(x.double(), dim=dims)
        rv = m.running_var.double()
        z = (mu - m.running_mean.double()).abs() / torch.sqrt(rv + m.eps)
        ratio = (var_b + m.eps) / (rv + m.eps)
        shifts.append((float(z.max()), float(ratio.max()), float(ratio.min()), n))
    shifts.sort(reverse=True)
    worst = ", ".join(f"{n} (mean off by {z:.2f} sd, batch/running variance {lo:.2g}..{hi:.2g})"
                      for z, hi, lo, n in shifts[:3])
    report.add("warning", "train-eval-mismatch", "",
               f"on the sample, training-mode and eval-mode outputs differ by {report.output_rel_diff:.1%} "
               f"(relative L2); layers whose batch statistics are furthest from the running ones: {worst or 'n/a'}",
               "stale or unrepresentative running statistics: recompute_bn_stats(model, train_batches); or the "
               "sample is from another distribution (adapt_bn)")


def _grab(name, inputs):
    def hook(module, args):
        if args and isinstance(args[0], Tensor):
            inputs[name] = args[0].detach()
    return hook
