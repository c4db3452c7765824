"""A/B of batch norm's two (N, C, S) training kernels in one process: the memory-order passes (``bn_fwd_ncs``,
``bn_bwd_ncs``) against the channel-by-channel ones (``bn_fwd_ncs_channels``, ``bn_bwd_ncs_channels``), called
directly on numpy arrays, alternating call by call over four inputs in turn (so each call finds little of its
input in cache, and the host's drift falls on both alike).

    .venv/bin/python benchmarks/ncs_channels.py 1          # threads: 1 (serial twins) or more (parallel)
    .venv/bin/python benchmarks/ncs_channels.py 2 32x64x3136,256x64x784
    .venv/bin/python benchmarks/ncs_channels.py 1 --module    # normlab.BatchNorm1d forward, forward+backward

Prints each kernel's median ms and the ratio memory-order / channel-by-channel (> 1: channels faster), with each
shape's bytes per channel against this host's L2 (what ``cpu._by_channel`` decides by). ``--module`` times the
layer as a user calls it instead (autograd, allocations), the host's L2 set to unknown (memory order) or to 1 TB
(channel by channel wherever the other conditions hold) call by call.
"""
from __future__ import annotations

import statistics
import sys
import time

import numpy as np
import torch

from normlab.kernels import cpu
from normlab.kernels import cpu_numba as K

SHAPES = "32x64x3136,256x64x784,128x256x196,64x128x784"


def median_ms(calls: dict, inputs: int, reps: int = 12) -> dict:
    times = {k: [] for k in calls}
    turn = 0
    for r in range(reps + 1):
        for k in (list(calls) if r % 2 else list(calls)[::-1]):
            t = time.perf_counter()
            calls[k](turn % inputs)
            turn += 1
            if r:
                times[k].append(time.perf_counter() - t)
    return {k: statistics.median(v) * 1e3 for k, v in times.items()}


def main(threads: int, shapes: str) -> None:
    torch.set_num_threads(threads)
    cpu._sync_threads(1 << 30)
    rng = np.random.default_rng(0)
    print(f"threads {threads}, L2 {cpu.L2_BYTES >> 10} KB")
    for spec in shapes.split(","):
        nb, nc, ns = (int(v) for v in spec.split("x"))
        xs = [rng.standard_normal((nb, nc, ns), dtype=np.float32) for _ in range(4)]
        dys = [rng.standard_normal((nb, nc, ns), dtype=np.float32) for _ in range(4)]
        outs = [np.empty_like(x) for x in xs]
        w, b = np.ones(nc, np.float32), np.zeros(nc, np.float32)
        mean, invstd = np.empty(nc), np.empty(nc, np.float32)
        dw, db = np.empty(nc, np.float32), np.empty(nc, np.float32)
        chunks = cpu._nchunks(threads, nb * nc, xs[0].size)

        def pick(kernel):
            return kernel.serial if threads == 1 else kernel
        fwd = {"memory order": lambda i: pick(K.bn_fwd_ncs)(xs[i], outs[i], w, b, 1e-5, K.IDENTITY, K.MODE_TRAIN,
                                                            mean, invstd, chunks),
               "channels": lambda i: pick(K.bn_fwd_ncs_channels)(xs[i], outs[i], w, b, 1e-5, K.IDENTITY, mean,
                                                                 invstd)}
        bwd = {"memory order": lambda i: pick(K.bn_bwd_ncs)(dys[i], xs[i], w, b, mean, invstd, K.IDENTITY, True,
                                                            True, outs[i], dw, db, chunks),
               "channels": lambda i: pick(K.bn_bwd_ncs_channels)(dys[i], xs[i], w, b, mean, invstd, K.IDENTITY,
                                                                 True, outs[i], dw, db)}
        per_channel = nb * ns * 4
        for label, calls, arrays in (("forward", fwd, 1), ("backward", bwd, 2)):
            med = median_ms(calls, len(xs))
            print(f"{spec:14s} {label:9s} {arrays * per_channel >> 10:6d} KB/channel  memory order "
                  f"{med['memory order']:7.2f} ms  channels {med['channels']:7.2f} ms  "
                  f"ratio {med['memory order'] / med['channels']:.2f}", flush=True)


def module(threads: int, shapes: str) -> None:
    """``--module``: normlab.BatchNorm1d on each (N, C, S) shape, memory order against channel by channel."""
    import normlab
    torch.set_num_threads(threads)
    print(f"threads {threads}, L2 {cpu.L2_BYTES >> 10} KB, normlab.BatchNorm1d on (N, C, S)")
    for spec in shapes.split(","):
        shape = tuple(int(v) for v in spec.split("x"))
        layer = normlab.BatchNorm1d(shape[1])
        xs = [torch.randn(shape, requires_grad=True) for _ in range(3)]
        dy = torch.randn(shape)

        def call_with(l2: int, backward: bool):
            def call(i):
                cpu.L2_BYTES = l2
                y = layer(xs[i])
                if backward:
                    y.backward(dy)
                    xs[i].grad = None
            return call
        for label, backward in (("forward", False), ("fwd+bwd", True)):
            calls = {"memory order": call_with(0, backward), "channels": call_with(1 << 40, backward)}
            med = median_ms(calls, len(xs), 24)
            print(f"{spec:14s} {label:9s} memory order {med['memory order']:7.2f} ms  channels "
                  f"{med['channels']:7.2f} ms  ratio {med['memory order'] / med['channels']:.2f}", flush=True)


if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if a != "--module"]
    (module if "--module" in sys.argv else main)(int(args[0]) if args else 1, args[1] if len(args) > 1 else SHAPES)
