"""The terminal table, the summary against the issue's targets, and the machine's description."""
from __future__ import annotations

import os
import platform
import statistics
import time

import torch

from .suite import Row, _fmt, _geomean, _ratio, roof_bound
from .timing import STAT


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
    roof = [r for r in rows if r.section == "roof"]

    def gpu_gm(section, mode):
        return _geomean([_ratio(r, "torch") for r in rows if r.section == section and r.mode == mode])

    def gpu_frac(section):
        fracs = [r.gbps / r.copy_gbps for r in rows
                 if r.section == section and r.gbps and r.copy_gbps and r.mbytes >= 25]
        return statistics.median(fracs) if fracs else None
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
        **{f"{section}_{key}": value for section in ("gpu", "gpu_graph") for key, value in (
            ("train_fwd_bwd_geomean_vs_torch", gpu_gm(section, "train_fwd_bwd")),
            ("train_fwd_geomean_vs_torch", gpu_gm(section, "train_fwd")),
            ("eval_geomean_vs_torch", gpu_gm(section, "eval_fwd")),
            ("median_frac_copy_on_25MB_plus", gpu_frac(section)))},
        **{f"{section}_{key}": value for section in ("gpu_norms", "gpu_norms_graph") for key, value in (
            ("train_fwd_bwd_geomean_vs_torch", gpu_gm(section, "train_fwd_bwd")),
            ("train_fwd_geomean_vs_torch", gpu_gm(section, "train_fwd")),
            ("worst_vs_torch", min((_ratio(r, "torch") for r in rows if r.section == section and _ratio(r, "torch")),
                                   default=None)))},
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


# The issue's CPU targets, float32, as (summary key, what it says, the least value that meets it): ratios over torch
# (or torch.compile), and the fraction of a same-size copy's bandwidth.
TARGETS = [
    ("train_fwd_bwd_geomean_vs_torch", "training forward+backward, geomean vs torch.nn", 2.0),
    ("train_fwd_bwd_worst_vs_torch", "... and no shape slower (worst shape)", 1.0),
    ("eval_geomean_vs_torch", "eval forward, geomean vs torch.nn", 1.5),
    ("fused_relu_fwd_bwd_geomean_vs_torch", "fused BN+ReLU vs BN then ReLU", 2.5),
    ("median_frac_copy_on_25MB_plus", "copy's bandwidth on tensors of 25 MB and more (median)", 0.7),
    ("train_fwd_bwd_geomean_vs_compile", "forward+backward vs torch.compile of the formula", 1.0),
    ("lenet_step_vs_torch", "LeNet-BN training step vs torch.nn", 1.0),
    ("groupnorm_worst_vs_torch", "group / layer / instance norm, worst case vs torch", 1.0),
]
# the (section, mode) panels of ``normlab bench-plot`` that draw a target as a dashed line
PANELS = {"train_fwd_bwd_geomean_vs_torch": [("layers", "train_fwd_bwd")],
          "eval_geomean_vs_torch": [("layers", "eval_fwd")],
          "fused_relu_fwd_bwd_geomean_vs_torch": [("fused_relu", mode)
                                                  for mode in ("train_fwd_bwd", "train_fwd", "eval_fwd")]}


def targets(summary: dict) -> list[dict]:
    """Each target of :data:`TARGETS` whose summary value this run measured: its value (the ratio, for a worst
    case given as (ratio, case)), the case it names, the goal, and whether it was met."""
    out = []
    for key, label, goal in TARGETS:
        value, case = summary.get(key), None
        if isinstance(value, (tuple, list)):
            value, case = value
        if value is not None:
            out.append({"key": key, "label": label, "value": value, "case": case, "goal": goal, "met": value >= goal})
    return out


def targets_over_runs(summaries: list[dict]) -> list[dict]:
    """:func:`targets` judged over several runs: each target's median over the runs that measured it (its value),
    the lowest and highest run, the worst cases the runs named, and whether the median meets the goal."""
    per = {}
    for summary in summaries:
        for t in targets(summary):
            per.setdefault(t["key"], []).append(t)
    out = []
    for key, got in per.items():
        values = [t["value"] for t in got]
        median = statistics.median(values)
        cases = list(dict.fromkeys(t["case"] for t in got if t["case"]))
        out.append({**got[0], "value": median, "lo": min(values), "hi": max(values), "runs": len(values),
                    "case": ", ".join(cases) or None, "met": median >= got[0]["goal"]})
    return out


def render_targets(checked: list[dict]) -> str:
    """The targets as lines of the terminal report ("" when none was measured): one run's values, or, from
    :func:`targets_over_runs`, the median and range of several."""
    if not checked:
        return ""
    runs = max(t.get("runs", 1) for t in checked)
    lines = ["targets (CPU, float32): " + ("this run" if runs == 1 else f"the median of {runs} runs (lowest-highest)")
             + ", on the shapes it measured"]
    cells = []
    for t in checked:
        pct = t["key"].startswith("median_frac")
        show = (lambda v: f"{v:.0%}") if pct else (lambda v: f"{v:.2f}x")
        value = show(t["value"]) + (f" ({show(t['lo'])}-{show(t['hi'])})" if "lo" in t and runs > 1 else "")
        goal = f">= {t['goal']:.0%}" if pct else f">= {t['goal']:g}x"
        cells.append((t, value, goal))
    width = max(len(value) for _, value, _ in cells)
    for t, value, goal in cells:
        case = f" [{t['case']}]" if t["case"] else ""
        lines.append(f"  {'met   ' if t['met'] else 'MISSED'} {t['label']:<56} {value:>{width}}  ({goal}){case}")
    return "\n".join(lines)
