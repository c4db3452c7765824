"""A sweep of norm-layer shapes outside the bench's suite, to find any where normlab runs slower than torch.nn.

Each case times normlab's layer and torch's in alternating rounds in one process (the median of each round's
calls, then the lowest of the rounds' medians, so a busy moment of a shared host does not decide it) for the
training forward, forward+backward and the evaluation forward, and prints torch's time over normlab's; cases
below ``--flag`` (default 1.0) are marked. The grid covers batch norm's layouts (few rows and wide, short (n, c)
rows, channels_last) and group, layer and instance norm.

    .venv/bin/python benchmarks/sweep.py                    # the whole grid, torch's threads (a few minutes)
    .venv/bin/python benchmarks/sweep.py --only bn1d,ln     # some kinds
    .venv/bin/python benchmarks/sweep.py --threads 1 --rounds 5
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

import normlab
from normlab.bench.suite import modes_for

GRID = {
    "bn1d": [(2, 4096), (8, 64), (32, 256), (16, 8192), (64, 2048), (512, 1024), (2048, 96), (65536, 3)],
    "bn1d_seq": [(64, 128, 2), (128, 64, 3), (32, 512, 4), (16, 256, 12), (8, 4096, 2), (64, 64, 50)],
    "bn2d": [(1, 3, 224, 224), (8, 64, 4, 4), (16, 2048, 2, 2), (64, 256, 7, 7), (8, 32, 64, 64), (4, 512, 14, 14)],
    "bn2d_cl": [(8, 64, 4, 4), (64, 256, 7, 7), (8, 3, 64, 64), (16, 96, 28, 28)],
    "bn3d": [(2, 16, 8, 16, 16), (4, 64, 4, 8, 8)],
    "gn": [(1, 64, 56, 56, 1), (8, 64, 4, 4, 32), (16, 256, 7, 7, 32), (4, 512, 14, 14, 8), (64, 32, 8, 8, 4)],
    "ln": [(8, 64), (64, 768), (512, 1024), (16, 16384), (4096, 96), (65536, 8)],
    "in": [(8, 64, 4, 4), (16, 128, 16, 16), (2, 256, 32, 32)],
}


def layers(kind: str, shape: tuple):
    """(normlab layer, torch layer, input shape, memory format) for one case of the grid."""
    if kind == "gn":
        *dims, groups = shape
        return normlab.GroupNorm(groups, dims[1]), torch.nn.GroupNorm(groups, dims[1]), tuple(dims), None
    if kind == "ln":
        return normlab.LayerNorm(shape[-1]), torch.nn.LayerNorm(shape[-1]), shape, None
    if kind == "in":
        return (normlab.InstanceNorm2d(shape[1], affine=True), torch.nn.InstanceNorm2d(shape[1], affine=True), shape,
                None)
    d = len(shape) - 2
    names = {0: "BatchNorm1d", 1: "BatchNorm1d", 2: "BatchNorm2d", 3: "BatchNorm3d"}
    fmt = {2: torch.channels_last, 3: torch.channels_last_3d}.get(d) if kind.endswith("_cl") else None
    return getattr(normlab, names[d])(shape[1]), getattr(torch.nn, names[d])(shape[1]), shape, fmt


def timed(fn, calls: int) -> float:
    ts = []
    for _ in range(calls):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def case(kind: str, shape: tuple, rounds: int, budget: float) -> dict:
    ours, theirs, xshape, fmt = layers(kind, shape)
    gen = torch.Generator().manual_seed(sum(xshape))
    x = torch.randn(xshape, generator=gen)
    if fmt is not None:
        x = x.contiguous(memory_format=fmt)
    dy = torch.randn(xshape, generator=gen)
    fns = {"normlab": modes_for(ours, x, dy)[0], "torch": modes_for(theirs, x, dy)[0]}  # the bench's callables
    out = {}
    for mode in ("train_fwd", "train_fwd_bwd", "eval_fwd"):
        for impl in fns:  # warm-up, and the calls a round takes within the budget
            fns[impl][mode]()
        t0 = time.perf_counter()
        fns["torch"][mode]()
        calls = max(5, min(400, int(budget / rounds / 2 / max(time.perf_counter() - t0, 1e-6))))
        best = dict.fromkeys(fns, float("inf"))
        for _ in range(rounds):
            for impl in fns:
                best[impl] = min(best[impl], timed(fns[impl][mode], calls))
        out[mode] = (best["normlab"], best["torch"])
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--only", default=",".join(GRID), help=f"comma-separated kinds of {', '.join(GRID)}")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds per mode (the lowest median counts)")
    p.add_argument("--budget", type=float, default=0.3, help="seconds per case and mode, both libraries")
    p.add_argument("--flag", type=float, default=1.0, help="mark cases where torch's time over normlab's is below")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    kinds = [k.strip() for k in args.only.split(",") if k.strip()]
    unknown = [k for k in kinds if k not in GRID]
    if unknown:
        p.error(f"unknown kind(s) {unknown}; choose from {list(GRID)}")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; x = torch's time / normlab's "
          f"(us: normlab, torch), '<' below {args.flag}")
    slower = 0
    for kind in kinds:
        for shape in GRID[kind]:
            res = case(kind, shape, args.rounds, args.budget)
            cells = []
            for mode, (a, b) in res.items():
                mark = "<" if b / a < args.flag else " "
                slower += mark == "<"
                name = {"train_fwd": "fwd", "train_fwd_bwd": "fwd+bwd", "eval_fwd": "eval"}[mode]
                cells.append(f"{name} {b / a:5.2f}x{mark}({a * 1e6:7.1f}, {b * 1e6:7.1f})")
            print(f"{kind:9s} {'x'.join(map(str, shape)):18s} " + "  ".join(cells), flush=True)
    print(f"{slower} case(s) below {args.flag}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
