"""Batch norm on a CUDA GPU: normlab's Triton kernels (``use_backend("triton")``) against torch.nn (cuDNN or
torch's own CUDA kernels, whichever ``torch.batch_norm`` picks), layer against layer, timed two ways:

* ``graph``: the calls captured in a CUDA graph and replayed, so the GPU's time alone (no Python, no launch
  latency): what the kernels cost, as a fraction of a same-size device copy timed the same way;
* ``eager``: back-to-back calls timed with CUDA events, host overhead included: what a training loop sees.

    python benchmarks/gpu_kernels.py --json gpu.json                 # the suite's shapes and larger ones, f32, bf16
    python benchmarks/gpu_kernels.py --sweep --json sweep.json       # launch geometry of the Triton kernels
    python benchmarks/gpu_kernels.py --norms                         # group / instance / layer norm
    python benchmarks/gpu_kernels.py --norms-sweep                   # their kernels' constants

Modes as ``normlab bench``'s: ``train_fwd``, ``train_fwd_bwd``, ``eval_fwd``; GB/s counts each mode's minimum
traffic (3, 8 and 2 passes over the activation). Shapes above the GPU's L2 (60 MB on an H200) measure memory;
below it, the passes after the first find much of the tensor in L2, for both contenders alike.
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import torch

from normlab import kernels
from normlab.bench import timing
from normlab.bench.suite import (DEFAULT_SHAPES, GPU_SHAPES, GROUPNORM_CASES, MODES, _case, _contenders, _geomean,
                                 _ratio, _timed_rows, norm_case, parse_shape)
from normlab.kernels import gpu_triton

LARGE = GPU_SHAPES[:2] + ["256x128x28x28cl"] + GPU_SHAPES[2:]
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
INNER = 10  # calls per captured graph (amortizes a replay's own launch)
DEVICE = "cuda"
CONTENDERS = ["normlab", "torch"]


def _events_ms(run, reps: int) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        run()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / reps


def _reps_for(run, budget: float) -> int:
    t = _events_ms(run, 3)
    return max(5, min(2000, int(budget * 1e3 / max(t, 1e-3))))


def time_eager(fn, budget: float) -> float:
    """Median over 5 rounds of the mean ms of back-to-back calls (the host's overhead included)."""
    for _ in range(3):
        fn()
    reps = _reps_for(fn, budget / 5)
    return sorted(_events_ms(fn, reps) for _ in range(5))[2]


def time_graph(fn, budget: float) -> float | None:
    """ms per call, the GPU's time alone (:func:`normlab.bench.timing.time_graph`, INNER calls a graph)."""
    t = timing.time_graph(fn, budget, INNER)
    return t * 1e3 if t else None


def layers(text: str, dtype):
    """A shape's input and gradient on the GPU and normlab's and torch's layers' timed modes (as the bench's)."""
    shape, x, dy, _ = _case(text, dtype, DEVICE)
    return x, dy, {impl: modes for impl, (modes, _) in _contenders(CONTENDERS, shape, x, dy, DEVICE, dtype).items()}


def measure(text: str, dtype, budget: float, ways=("graph", "eager")) -> list[dict]:
    """The bench's timed rows (:func:`normlab.bench.suite._timed_rows`) of one shape, each way, as dicts."""
    timers = {"graph": time_graph, "eager": time_eager}
    rows = []
    with kernels.use_backend("triton"):
        for way in ways:
            for r in _timed_rows([text], CONTENDERS, budget, lambda msg: None, DEVICE, way, dtype,
                                 lambda fn, b, t=timers[way]: (t(fn, b) or 0) / 1e3 or None):
                row = {"case": text, "dtype": str(dtype).removeprefix("torch."), "mode": r.mode, "way": way,
                       "mb": round(r.mbytes, 1), "ms": {impl: r.ms.get(impl) for impl in CONTENDERS},
                       "x_vs_torch": _ratio(r, "torch"), "gbps": r.gbps, "copy_gbps": r.copy_gbps,
                       "frac_copy": r.gbps / r.copy_gbps if r.gbps and r.copy_gbps else None}
                rows.append(row)
                print(_line(row), flush=True)
    return rows


def _f(v, spec):
    return "-" if v is None else format(v, spec)


HEADER = (f"{'case':<18} {'dtype':<9} {'mode':<14} {'way':<6} {'MB':>7} {'normlab ms':>11} {'torch ms':>9} "
          f"{'x vs torch':>10} {'GB/s':>7} {'%copy':>6}")


def _line(r: dict) -> str:
    return (f"{r['case']:<18} {r['dtype']:<9} {r['mode']:<14} {r['way']:<6} {r['mb']:>7.1f} "
            f"{_f(r['ms']['normlab'], '11.4f')} {_f(r['ms']['torch'], '9.4f')} {_f(r['x_vs_torch'], '10.2f')} "
            f"{_f(r['gbps'], '7.0f')} {_f(r['frac_copy'] and 100 * r['frac_copy'], '5.0f')}%")


def summary(rows: list[dict]) -> dict:
    out = {}
    for dtype in sorted({r["dtype"] for r in rows}):
        for way in ("graph", "eager"):
            for mode in MODES:
                sel = [r for r in rows if r["dtype"] == dtype and r["way"] == way and r["mode"] == mode]
                out[f"{dtype}_{way}_{mode}_geomean_vs_torch"] = _geomean([r["x_vs_torch"] for r in sel])
                big = [r["frac_copy"] for r in sel if r["mb"] >= 100 and r["frac_copy"]]
                out[f"{dtype}_{way}_{mode}_median_frac_copy_100MB_plus"] = sorted(big)[len(big) // 2] if big else None
    return out


SWEEP_SHAPES = ["32x64x56x56cl", "256x64x28x28cl", "64x256x56x56cl", "16x64x224x224cl"]


def sweep(budget: float) -> list[dict]:
    """train_fwd_bwd (graph-timed) of normlab on each SWEEP_SHAPES over the Triton kernels' launch geometry."""
    base = (gpu_triton.PROGRAMS, gpu_triton.NUM_WARPS, gpu_triton.NCHW_BLOCK_K, gpu_triton.CL_BLOCKS)
    rows = []
    for text in SWEEP_SHAPES:
        shape, cl = parse_shape(text)
        channels_adjacent = cl or len(shape) == 2
        x, dy, fns = layers(text, torch.float32)
        blocks = [(16, 64), (32, 32), (64, 16)] if channels_adjacent else [(1024,), (2048,)]
        for block in blocks:
            for warps in (4,):
                for programs in (1024, 2048):
                    gpu_triton.PROGRAMS, gpu_triton.NUM_WARPS = programs, warps
                    if channels_adjacent:
                        gpu_triton.CL_BLOCKS = block
                    else:
                        gpu_triton.NCHW_BLOCK_K = block[0]
                    gpu_triton._LAUNCHES.clear()
                    with kernels.use_backend("triton"):
                        ms = {m: time_graph(fns["normlab"][m], budget) for m in ("train_fwd", "train_fwd_bwd")}
                    row = {"case": text, "block": block, "warps": warps, "programs": programs, "ms": ms}
                    rows.append(row)
                    print(f"{text:<18} block={str(block):<10} warps={warps} programs={programs:<5} "
                          f"fwd {_f(ms['train_fwd'], '.4f')} ms  fwd+bwd {_f(ms['train_fwd_bwd'], '.4f')} ms",
                          flush=True)
        gpu_triton.PROGRAMS, gpu_triton.NUM_WARPS, gpu_triton.NCHW_BLOCK_K, gpu_triton.CL_BLOCKS = base
        gpu_triton._LAUNCHES.clear()
        with kernels.use_backend("triton"):
            ref = time_graph(fns["torch"]["train_fwd_bwd"], budget)
        print(f"{text:<18} torch fwd+bwd {_f(ref, '.4f')} ms", flush=True)
        rows.append({"case": text, "torch_train_fwd_bwd_ms": ref})
    return rows


GPU_NORM_CASES = [("gn", (64, 128, 56, 56), 32), ("ln", (8192, 4096), None)]  # 103 MB, 134 MB


def norms(budget: float) -> list[dict]:
    """Group, instance and layer norm (``normlab.functional``: the Triton kernels on CUDA) against torch's, float32,
    forward and forward+backward, graph-timed and eager: the suite's group-norm cases on the GPU, then two of over
    100 MB."""
    rows = []
    for kind, shape, groups in GROUPNORM_CASES + GPU_NORM_CASES:
        case, _, _, fns = norm_case(kind, shape, groups, DEVICE)
        for mode in ("train_fwd", "train_fwd_bwd"):
            for way, timer in (("graph", time_graph), ("eager", time_eager)):
                ms = {name: timer(modes[mode], budget) for name, modes in fns.items()}
                ratio = ms["torch"] / ms["normlab"] if ms["torch"] and ms["normlab"] else None
                row = {"case": case, "mode": mode, "way": way, "ms": ms, "x_vs_torch": ratio}
                rows.append(row)
                print(f"{case:<24} {mode:<14} {way:<6} normlab {_f(ms['normlab'], '.4f')} ms  torch "
                      f"{_f(ms['torch'], '.4f')} ms  x {_f(row['x_vs_torch'], '.2f')}", flush=True)
        torch.cuda.empty_cache()
    return rows


# the group-norm kernels' constants (gpu_triton_gn), each tried alone against the defaults (a one-factor sweep)
NORM_SWEEP = {"BLOCK": (2048, 8192), "TILE": (2048, 8192), "MIN_PROGRAMS": (256, 1024), "WARP_VALUES": (128, 512),
              "CHANNEL_TILES_FROM": (16, 256), "COL_PROGRAMS": (512, 2048)}
NORM_SWEEP_CASES = [("gn", (32, 64, 56, 56), 32), ("gn", (128, 256, 14, 14), 32), ("in", (32, 64, 56, 56), 64),
                    ("in", (256, 64, 7, 7), 64), ("ln", (4096, 1024), None), ("ln", (256, 197, 768), None),
                    ("ln", (64, 256), None), ("ln", (16, 4096), None)]


def norm_sweep(budget: float) -> list[dict]:
    """Graph-timed forward and forward+backward of normlab's group/instance/layer norm on NORM_SWEEP_CASES, the
    defaults first, then each constant of NORM_SWEEP at its other values (the rest at their defaults)."""
    from normlab.kernels import gpu_triton_gn as G
    defaults = {name: getattr(G, name) for name in NORM_SWEEP}
    settings = [("default", None)] + [(name, v) for name, values in NORM_SWEEP.items() for v in values]
    rows = []
    for kind, shape, groups in NORM_SWEEP_CASES:
        case, _, _, fns = norm_case(kind, shape, groups, DEVICE)
        torch_ms = {m: time_graph(fns["torch"][m], budget) for m in ("train_fwd", "train_fwd_bwd")}
        for name, value in settings:
            for k, v in defaults.items():
                setattr(G, k, value if k == name else v)
            G._GEOMETRIES.clear()
            with kernels.use_backend("triton"):
                ms = {m: time_graph(fns["normlab"][m], budget) for m in ("train_fwd", "train_fwd_bwd")}
            rows.append({"case": case, "constant": name, "value": value, "ms": ms, "torch_ms": torch_ms})
            print(f"{case:<24} {name:<18} {str(value):<6} fwd {_f(ms['train_fwd'], '.4f')} ms (torch "
                  f"{_f(torch_ms['train_fwd'], '.4f')})  fwd+bwd {_f(ms['train_fwd_bwd'], '.4f')} ms (torch "
                  f"{_f(torch_ms['train_fwd_bwd'], '.4f')})", flush=True)
        torch.cuda.empty_cache()
    for k, v in defaults.items():
        setattr(G, k, v)
    G._GEOMETRIES.clear()
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", default=None, help="comma-separated shapes (default: the suite's, then LARGE)")
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--budget", type=float, default=0.1, help="seconds per timing (default 0.1)")
    p.add_argument("--ways", default="graph,eager")
    p.add_argument("--sweep", action="store_true", help="time the launch geometries instead")
    p.add_argument("--norms", action="store_true", help="time group, instance and layer norm instead")
    p.add_argument("--norms-sweep", action="store_true", help="sweep the group-norm kernels' constants instead")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("gpu_kernels: needs a CUDA device")
    t0 = time.time()
    info = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
            "triton": __import__("triton").__version__, "cudnn": torch.backends.cudnn.version(),
            "launch": {"PROGRAMS": gpu_triton.PROGRAMS, "NUM_WARPS": gpu_triton.NUM_WARPS,
                       "NCHW_BLOCK_K": gpu_triton.NCHW_BLOCK_K, "CL_BLOCKS": gpu_triton.CL_BLOCKS}}
    print(info, flush=True)
    if args.sweep:
        result = {"info": info, "sweep": sweep(args.budget)}
    elif args.norms:
        result = {"info": info, "norms": norms(args.budget)}
    elif args.norms_sweep:
        result = {"info": info, "norm_sweep": norm_sweep(args.budget)}
    else:
        shapes = args.shapes.split(",") if args.shapes else DEFAULT_SHAPES + LARGE
        rows = []
        print(HEADER, flush=True)
        for name in args.dtypes.split(","):
            for text in shapes:
                rows += measure(text, DTYPES[name], args.budget, tuple(args.ways.split(",")))
                torch.cuda.empty_cache()
        result = {"info": info, "rows": rows, "summary": summary(rows)}
        for k, v in result["summary"].items():
            print(f"  {k:<56} {_f(v, '.3f')}")
    print(f"done in {time.time() - t0:.0f} s", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
