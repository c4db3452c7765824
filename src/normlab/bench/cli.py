"""``normlab bench``'s command line: the options, the sections in order, the table, ``--json`` and ``--plot``."""
from __future__ import annotations

import json
import os
import sys
from dataclasses import asdict

import torch

from .report import machine_info, render, render_targets, summarize, targets, targets_over_runs
from .suite import (DEFAULT_SECTIONS, DEFAULT_SHAPES, GPU_SHAPES, IMPLS, QUICK_SHAPES, SECTIONS, Row, bench_fused,
                    bench_gpu, bench_groupnorm, bench_layers, bench_lenet, bench_roof, parse_shape)
from .timing import STAT, copy_bandwidth, settle_allocator

DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16, "float16": torch.float16}


def register(subparsers) -> None:
    p = subparsers.add_parser("bench", help="benchmark normlab's batch norm against torch (CPU)",
                              description=sys.modules[__package__].__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true",
                   help="tiny shapes, short budget, no torch.compile (seconds): a smoke test, where per-call "
                        "overhead dominates and the ratios say nothing about real layer sizes")
    p.add_argument("--shapes", default=None,
                   help="comma-separated shapes such as 32x64x56x56,32x64x56x56cl,256x512 (cl: channels_last)")
    p.add_argument("--sections", default=None,
                   help="which of layers,fused,groupnorm,lenet,roof,gpu to run (default: all; gpu where CUDA is "
                        "available: normlab's Triton kernels against torch.nn on the GPU, batch norm then group, "
                        "instance and layer norm, eager and graph-timed; needs triton)")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile contender")
    p.add_argument("--no-scratch", action="store_true", help="skip the from-scratch contender")
    p.add_argument("--budget", type=float, default=None, help="seconds per measurement (default 0.6)")
    p.add_argument("--stat", choices=["median", "min"], default="median",
                   help="statistic of the repeats (median; min on a busy host)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32",
                   help="the activations', parameters' and running statistics' dtype of every contender, as "
                        "model.to(dtype) (default float32, the dtype the targets are set for)")
    p.add_argument("--repeat", type=int, default=1, metavar="N",
                   help="run the whole measurement N times in a row (a shared host's load moves single runs by "
                        "10-20 %%), then judge each target by the median of the runs; --json PATH writes "
                        "PATH_1 .. PATH_N")
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
    if args.repeat < 1:
        raise SystemExit(f"normlab bench: --repeat {args.repeat}: the number of runs must be 1 or more")
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
        from .plot import check_format
        check_format(args.plot)
    impls = [i for i in IMPLS if not ((i == "compile" and (args.no_compile or quick))
                                       or (i == "scratch" and args.no_scratch))]

    def log(msg):
        print(msg, file=sys.stderr, flush=True)

    settle_allocator()
    runs = []
    for i in range(args.repeat):
        if args.repeat > 1:
            log(f"run {i + 1} of {args.repeat}:")
        runs.append(_measure(args, sections, shapes, impls, budget, log))
        if args.json:
            path = _run_path(args.json, i + 1, args.repeat)
            with open(path, "w") as f:
                json.dump(runs[-1], f, indent=1)
            log(f"results: {path}")
    if args.repeat > 1 and not quick:
        print(render_targets(targets_over_runs([r["summary"] for r in runs])))
    if args.plot:
        from .plot import plot
        log(f"figure: {plot(runs, args.plot)}")
    return 0


def _measure(args, sections: set, shapes: list, impls: list, budget: float, log) -> dict:
    """One run of the chosen sections: the table, summary and targets on stdout; the run as ``--json`` writes it."""
    quick = args.quick
    dtype = DTYPES[getattr(args, "dtype", "float32")]
    log("measuring copy bandwidth ...")
    copy_gbps = copy_bandwidth((16 if quick else 512) * 2**20, budget * 2)
    machine = machine_info(copy_gbps)
    log(f"{machine['cpu']}, {machine['torch_threads']} threads, copy {copy_gbps:.1f} GB/s (read + write)")
    rows: list[Row] = []
    if "layers" in sections:
        log("batch norm layers:")
        rows += bench_layers(shapes, impls, budget, log, dtype=dtype)
    if "fused" in sections:
        log("fused batch norm + activation:")
        fused_shapes = QUICK_SHAPES[:1] if quick else ["256x6x28x28", "32x64x56x56", "256x64x28x28",
                                                        "32x64x56x56cl", "256x512"]
        rows += bench_fused(fused_shapes, budget, log, dtype)
    if "groupnorm" in sections:
        log("group / instance / layer norm:")
        rows += bench_groupnorm(quick, budget, log, dtype)
    if "lenet" in sections:
        log("LeNet-BN training step:")
        rows += bench_lenet(16 if quick else 256, budget, log, dtype)
    if "roof" in sections:
        log("roof (normlab and torch beside the autograd floor and a copy):")
        rows += bench_roof(shapes, budget, log, dtype)
    if "gpu" in sections:
        log(f"GPU ({torch.cuda.get_device_name()}), Triton kernels:")
        gpu_shapes = shapes if args.shapes or quick else shapes + GPU_SHAPES
        rows += bench_gpu(gpu_shapes, budget, log, dtype=dtype, norms=bool(quick))

    summary = summarize(rows, copy_gbps)
    glue = "native glue" if machine["native_glue"] else "Python glue only (normlab build-native: faster small layers)"
    l2 = f"L2 {machine['l2_bytes'] >> 10} KB a core, " if machine["l2_bytes"] else ""
    print(f"normlab bench -- {machine['cpu']}, {l2}{machine['torch_threads']} threads, torch {machine['torch']}, "
          f"{glue}, "
          f"{str(dtype).removeprefix('torch.')}, "
          f"copy bandwidth {copy_gbps:.1f} GB/s; times: {args.stat} in ms; 'x vs K' = K's time / normlab's; "
          f"won: rounds in which normlab's call took less time than torch's in the same round; "
          f"%copy: normlab's minimum traffic per second against a same-size copy timed in the same rotation")
    print(render(rows, copy_gbps))
    print("summary:")
    width = max(map(len, summary))
    for k, v in summary.items():
        print(f"  {k:<{width}} {v if not isinstance(v, float) else round(v, 3)}")
    checked = targets(summary)
    if checked and not quick:
        print(render_targets(checked))
        if dtype is not torch.float32:
            print(f"(the targets are set for float32; this run measured {str(dtype).removeprefix('torch.')})")
    if quick:
        print("(--quick: tiny shapes, where per-call overhead dominates; run without --quick for the real suite)")
    data = {"args": {k: v for k, v in vars(args).items() if k != "func"},
            "machine": machine, "summary": summary, "targets": checked, "results": [asdict(r) for r in rows]}
    return data


def _run_path(path: str, i: int, runs: int) -> str:
    """``--json``'s file for run ``i`` of ``runs``: the path itself for a single run, else ``stem_i.suffix``."""
    if runs == 1:
        return path
    root, ext = os.path.splitext(path)
    return f"{root}_{i}{ext}"
