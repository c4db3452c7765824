"""``normlab bench-plot``: the ratios over torch of one or more ``normlab bench --json`` runs, as one figure.

Two lines of panels per thread count found in the runs, one panel per section (batch norm layers, the roof, the
GPU's layers eager and graph-timed; fused batch norm + activation, group / instance / layer norm, the LeNet step); in
each, for every case and mode, a bar at the median ratio over the runs (torch's time / normlab's: above 1, normlab
is faster), a line from the lowest to the highest run (the host's spread, which a single run hides), parity and the
issue's targets as dashed lines, and each mode's geometric mean. The roof panel draws, over each case's
forward+backward bar, a black tick at the cap: torch's time over the fastest any batch norm could run there
(``suite.roof_bound``), so the gap between bar and tick is what is left to win.
"""
from __future__ import annotations

import json
import statistics
from pathlib import Path

from . import report

PLOTTED = ("layers", "fused_relu", "fused_sigmoid", "groupnorm", "lenet", "roof", "gpu", "gpu_graph", "gpu_norms",
           "gpu_norms_graph")
TITLES = {"layers": "batch norm vs torch.nn", "fused_relu": "fused BN+ReLU vs BN, ReLU",
          "fused_sigmoid": "fused BN+sigmoid vs BN, sigmoid", "groupnorm": "group / instance / layer norm",
          "lenet": "LeNet-BN step", "roof": "fwd+bwd beside the roof (tick: cap)", "gpu": "GPU eager: Triton vs torch",
          "gpu_graph": "GPU time (CUDA graph): Triton vs torch",
          "gpu_norms": "GPU eager: group / instance / layer norm",
          "gpu_norms_graph": "GPU time: group / instance / layer norm"}
# the panels of one thread count, line by line
LINES = [["layers", "roof", "gpu", "gpu_graph"], ["fused_relu", "fused_sigmoid", "groupnorm", "lenet"],
         ["gpu_norms", "gpu_norms_graph"]]
MODE_LABELS = {"train_fwd_bwd": "training fwd+bwd", "train_fwd": "training fwd", "eval_fwd": "eval fwd",
               "train_step": "step"}
MODE_ORDER = list(MODE_LABELS)
COLORS = {"train_fwd_bwd": "tab:blue", "train_fwd": "tab:orange", "eval_fwd": "tab:green", "train_step": "tab:purple"}
DPI = 80  # with the figure's size, a PNG of 100-250 KB for the docs
# the targets, per section and mode (ratio over torch), from the report's; every panel also draws parity (1x)
TARGETS = {panel: goal for key, _, goal in report.TARGETS for panel in report.PANELS.get(key, ())}


def load_runs(paths) -> list[dict]:
    """The runs written by ``normlab bench --json``; a clear error for a file that is missing or is not one."""
    runs = []
    for path in paths:
        try:
            data = json.loads(Path(path).read_text())
        except FileNotFoundError:
            raise SystemExit(f"normlab bench-plot: no file {str(path)!r}; write one with "
                             f"`normlab bench --json {path}`") from None
        except json.JSONDecodeError as err:
            raise SystemExit(f"normlab bench-plot: {str(path)!r} is not JSON ({err}); pass files written by "
                             f"`normlab bench --json FILE`") from None
        if not isinstance(data, dict) or not isinstance(data.get("results"), list) or "machine" not in data:
            raise SystemExit(f"normlab bench-plot: {str(path)!r} is not a `normlab bench --json` file (it has no "
                             f"'results' list and 'machine'); write one with `normlab bench --json FILE`")
        runs.append(data)
    return runs


def check_format(path: str | Path) -> None:
    """A clear error for a figure file whose suffix matplotlib cannot write (before anything is measured)."""
    from matplotlib.backend_bases import FigureCanvasBase
    known = FigureCanvasBase.get_supported_filetypes()
    suffix = Path(path).suffix.lstrip(".").lower()
    if suffix not in known:
        raise SystemExit(f"normlab bench-plot: cannot write a figure as {str(path)!r}; name it with one of the "
                         f"suffixes {', '.join('.' + k for k in sorted(known))} (e.g. bench.png)")


def collect(runs: list[dict]) -> dict:
    """``{threads: {section: {(case, mode): [ratio per run, ...]}}}``, ratio = torch's time / normlab's, cases
    and modes in the order the runs measured them; the roof section also ``{(case, "cap"): [cap per run]}``."""
    from .suite import Row, roof_bound
    out: dict = {}
    for run in runs:
        threads = run["machine"].get("torch_threads")
        for r in run["results"]:
            ms = r.get("ms", {})
            if r.get("section") not in PLOTTED or not ms.get("normlab") or not ms.get("torch"):
                continue
            per = out.setdefault(threads, {}).setdefault(r["section"], {})
            per.setdefault((r["case"], r["mode"]), []).append(ms["torch"] / ms["normlab"])
            if r["section"] == "roof":
                cap = roof_bound(Row(**{k: v for k, v in r.items() if k in Row.__dataclass_fields__}))["cap"]
                if cap:
                    per.setdefault((r["case"], "cap"), []).append(cap)
    return out


def _panel(ax, section: str, ratios: dict) -> None:
    from .suite import _geomean
    cases = list(dict.fromkeys(case for case, _ in ratios))
    modes = sorted({mode for _, mode in ratios if mode != "cap"},
                   key=lambda m: MODE_ORDER.index(m) if m in MODE_ORDER else 99)
    width = 0.8 / len(modes)
    ymin, ymax = 1.0, 1.0
    for j, mode in enumerate(modes):
        xs, med, lo, hi = [], [], [], []
        for i, case in enumerate(cases):
            vals = ratios.get((case, mode))
            if vals:
                m = statistics.median(vals)
                xs.append(i + (j - (len(modes) - 1) / 2) * width)
                med.append(m)
                lo.append(m - min(vals))
                hi.append(max(vals) - m)
                ymin, ymax = min(ymin, min(vals)), max(ymax, max(vals))
        color = COLORS.get(mode, "tab:gray")
        ax.bar(xs, med, width, color=color, yerr=[lo, hi] if max(hi + lo) > 0 else None,
               error_kw={"elinewidth": 0.8, "capsize": 1.5})
        ax.text(0.02, 0.97 - 0.075 * j, f"{MODE_LABELS.get(mode, mode)}: geomean {_geomean(med):.2f}x",
                transform=ax.transAxes, fontsize=7, color=color, va="top")
        target = TARGETS.get((section, mode))
        if target:
            ax.axhline(target, color=color, linestyle=(0, (4, 3)), linewidth=1)
            ymax = max(ymax, target)
    caps = [(i, statistics.median(ratios[(case, "cap")])) for i, case in enumerate(cases) if (case, "cap") in ratios]
    if caps:  # the roof section: one mode, its bars centred on the cases
        caps_all = [c for _, c in caps]
        ax.hlines(caps_all, [i - 0.45 for i, _ in caps], [i + 0.45 for i, _ in caps], color="black", linewidth=2.2)
        ax.text(0.02, 0.97 - 0.075 * len(modes), f"cap (tick): geomean {_geomean(caps_all):.2f}x",
                transform=ax.transAxes, fontsize=7, color="black", va="top")
        ymax = max([ymax] + caps_all)
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_yscale("log")
    ax.set_ylim(ymin / 1.25, ymax * 1.4 ** (len(modes) + bool(caps)))  # room above the bars for the geomeans
    ax.set_xticks(range(len(cases)))
    ax.set_xticklabels(cases, rotation=40, ha="right", fontsize=7)
    ax.tick_params(axis="y", labelsize=7)
    ax.set_xlim(-0.6, len(cases) - 0.4)
    ax.set_title(TITLES.get(section, section), fontsize=9)
    ax.grid(axis="y", alpha=0.3, which="both")


def plot(runs: list[dict], path: str | Path) -> str:
    """Draws :func:`collect` of ``runs`` into ``path`` (PNG, or any format matplotlib knows by the suffix)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    data = collect(runs)
    if not data:
        raise SystemExit("normlab bench-plot: the runs hold no result with both normlab and torch timed; run "
                         "`normlab bench --json FILE` with any of the sections layers,fused,groupnorm,lenet,roof")
    thread_counts = sorted(data, key=lambda t: (t is None, t))
    present = {s for t in thread_counts for s in data[t]}
    lines = [[s for s in line if s in present] for line in LINES]
    lines = [line for line in lines if line]
    cases = {s: max(5, max(len({c for c, _ in data[t].get(s, {})}) for t in thread_counts)) + 1.5 for s in present}
    width = max(sum(cases[s] for s in line) for line in lines)
    fig = plt.figure(figsize=(max(8.0, 0.42 * width), 3.4 * len(lines) * len(thread_counts) + 0.6))
    outer = fig.add_gridspec(len(lines) * len(thread_counts), 1)
    for row, threads in enumerate(thread_counts):
        n = sum(1 for run in runs if run["machine"].get("torch_threads") == threads)
        for k, line in enumerate(lines):
            # each line's panels in proportion to their cases, padded to the widest line
            ratios = [cases[s] for s in line] + [width - sum(cases[s] for s in line) + 1e-9]
            grid = outer[row * len(lines) + k].subgridspec(1, len(ratios), width_ratios=ratios)
            for col, section in enumerate(line):
                ax = fig.add_subplot(grid[0, col])
                if section not in data[threads]:
                    ax.set_axis_off()
                    continue
                _panel(ax, section, data[threads][section])
                ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}x"))
                ax.yaxis.set_minor_formatter(FuncFormatter(lambda v, _: f"{v:g}" if v in (0.7, 1.5, 3, 5) else ""))
                if col == 0:
                    ax.set_ylabel(f"{threads} thread{'s' if threads != 1 else ''}: torch ms / normlab ms\n"
                                  f"(bar: median of {n} run{'s' if n != 1 else ''}, line: range)", fontsize=8)
    machine = runs[0]["machine"]
    dates = sorted(run["machine"].get("date", "") for run in runs)
    gpu = f" + {machine['gpu']}" if machine.get("gpu") and any(s.startswith("gpu") for s in present) else ""
    fig.suptitle(f"normlab bench: {machine.get('cpu', '?')}{gpu}, torch {machine.get('torch', '?')}, "
                 f"{len(runs)} run{'s' if len(runs) != 1 else ''}, {dates[0]}"
                 + (f" .. {dates[-1]}" if dates[-1] != dates[0] else "")
                 + "\nabove 1x normlab is faster; dashed lines: the targets", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return str(path)


def register(subparsers) -> None:
    p = subparsers.add_parser("bench-plot", help="plot the ratios of `normlab bench --json` runs",
                              description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", metavar="RUN.json", help="files written by `normlab bench --json`")
    p.add_argument("-o", "--output", default="bench.png", help="figure to write (default bench.png)")
    p.set_defaults(func=run)


def run(args) -> int:
    check_format(args.output)
    print(plot(load_runs(args.runs), args.output))
    return 0
