"""A/B of the native glue's output pool in one process: a layer's training forward+backward (as a training step
calls it: the previous step's gradient freed, a new y, a new dx) with its outputs from the pool and from the heap
(the pool's sizes set past any output), alternating call by call so the host's drift falls on both alike.

    .venv/bin/python benchmarks/pool_ab.py 2                      # threads
    .venv/bin/python benchmarks/pool_ab.py 1 32x64x56x56,64x64x16x16cl

Prints each setting's median ms and the page faults per call (the heap's cost: a freed block at the top of glibc's
heap past its trim threshold goes back to the system, and the next output faults in page by page).
"""
from __future__ import annotations

import resource
import statistics
import sys
import time

import torch

import normlab
from normlab import kernels as K
from normlab.bench import parse_shape
from normlab.kernels import native, pool

SHAPES = "32x64x56x56,32x64x56x56cl,128x256x14x14,4096x1024,256x6x28x28,256x16x10x10,64x64x16x16"
NEVER = 1 << 62
DEFAULTS = native.POOL_FROM_BYTES, pool.KEPT_MIN_BYTES


def pooled(on: bool) -> None:
    native.POOL_FROM_BYTES, pool.KEPT_MIN_BYTES = DEFAULTS if on else (NEVER, NEVER)
    native.configure(K._native, K._cpu)


def faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def main(threads: int, shapes: str) -> None:
    if K._native is None:
        sys.exit("the native glue is not loaded: `normlab build-native`")
    torch.set_num_threads(threads)
    print(f"{threads} thread(s); forward+backward, median ms (page faults per call)")
    for text in shapes.split(","):
        shape, cl = parse_shape(text)
        torch.manual_seed(0)
        x = torch.randn(shape)
        if cl:
            x = x.contiguous(memory_format=torch.channels_last)
        dy = torch.randn_like(x)
        layer = {2: normlab.BatchNorm1d, 4: normlab.BatchNorm2d, 5: normlab.BatchNorm3d}[len(shape)](shape[1])
        xg = x.clone().requires_grad_()
        times = {"pool": [], "heap": []}
        faulted = {"pool": 0, "heap": 0}
        reps = 40 if x.numel() > 2_000_000 else 300
        for i in range(reps):
            for name in ("pool", "heap") if i % 2 else ("heap", "pool"):
                pooled(name == "pool")
                f0, t0 = faults(), time.perf_counter()
                xg.grad = layer.weight.grad = layer.bias.grad = None
                layer(xg).backward(dy)
                if i >= 3:
                    times[name].append((time.perf_counter() - t0) * 1e3)
                    faulted[name] += faults() - f0
        cells = [f"{name} {statistics.median(v):8.3f} ({faulted[name] / len(v):6.0f})" for name, v in times.items()]
        ratio = statistics.median(times["heap"]) / statistics.median(times["pool"])
        print(f"{text:>18}  " + "  ".join(cells) + f"  heap/pool {ratio:.2f}x")
    pooled(True)


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else torch.get_num_threads(),
         sys.argv[2] if len(sys.argv) > 2 else SHAPES)
