"""A/B of the two glues on large batch-norm inputs, in one process: the native glue (C++ autograd node, the loops
split into one run per thread) against the Python glue (a Python autograd node, numba's parallel loops), with
torch.nn beside them. The native glue's size limit is set call by call (``native.BN_BELOW_BYTES``), so both run
the same loops on the same inputs; a copy of 64 MB between calls leaves little of the input in cache, as in a
network.

    .venv/bin/python benchmarks/native_limit.py                 # the suite's 16-32 MiB shapes, torch's threads
    .venv/bin/python benchmarks/native_limit.py 4096x1024,32x64x56x56cl --rounds 40
    .venv/bin/python benchmarks/native_limit.py --node          # a Python autograd node's cost around its backward

Prints each contender's median ms (and minimum) for the training forward+backward and the forward. ``--node``
times the autograd engine around a Python ``autograd.Function`` whose backward busy-waits 0, 1, 4 and 8 ms: the
time from ``y.backward()`` to the entry of ``backward``, and from its return back to the caller.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

import normlab
from normlab import kernels as K
from normlab.bench.timing import round_orders, settle_allocator
from normlab.kernels import cpu, native

SHAPES = "32x64x56x56cl,128x256x14x14cl,32x64x56x56,128x256x14x14,4096x1024"


def race(fns: dict, rounds: int, flush) -> dict:
    """Median and minimum ms of each ``fns[name]()``, called in balanced rotating orders, ``flush()`` before each."""
    names = list(fns)
    for f in fns.values():
        f()
    times: dict = {n: [] for n in names}
    orders = round_orders(len(names))
    for r in range(rounds):
        for i in orders[r % len(orders)]:
            flush()
            t0 = time.perf_counter()
            fns[names[i]]()
            times[names[i]].append(time.perf_counter() - t0)
    return {n: (statistics.median(ts) * 1e3, min(ts) * 1e3) for n, ts in times.items()}


def layers(shapes: str, rounds: int) -> None:
    module = K._native
    if module is None:
        raise SystemExit("the native glue is not built: run `normlab build-native`")
    big = torch.randn(16 << 20)
    dst = torch.empty_like(big)
    default = native.BN_BELOW_BYTES

    def limit(nbytes):
        native.BN_BELOW_BYTES = nbytes
        native.configure(module, cpu)

    for spec in shapes.split(","):
        cl = spec.endswith("cl")
        shape = tuple(int(s) for s in spec.removesuffix("cl").split("x"))
        fmt = torch.channels_last if cl else torch.contiguous_format
        x = torch.randn(shape).contiguous(memory_format=fmt).requires_grad_()
        dy = torch.randn(shape).contiguous(memory_format=fmt)
        ours = getattr(normlab, f"BatchNorm{'2d' if len(shape) == 4 else '1d'}")
        theirs = getattr(torch.nn, f"BatchNorm{'2d' if len(shape) == 4 else '1d'}")
        python_layer, native_layer, torch_layer = ours(shape[1]), ours(shape[1]), theirs(shape[1])
        python_limit = min(x.numel() * x.element_size(), default)  # the Python glue from this input's size

        def step(layer, nbytes):
            def call():
                limit(nbytes)
                x.grad = None
                layer.weight.grad = layer.bias.grad = None
                layer(x).backward(dy)
            return call

        def forward(layer, nbytes):
            def call():
                limit(nbytes)
                layer(x)
            return call

        print(f"{spec}: {x.numel() * 4 / 1e6:.1f} MB, {torch.get_num_threads()} threads, median (min) ms")
        for mode, make in (("fwd+bwd", step), ("forward", forward)):
            got = race({"python glue": make(python_layer, python_limit), "native glue": make(native_layer, default),
                        "torch": make(torch_layer, default)}, rounds, lambda: dst.copy_(big))
            print(f"  {mode:8s}" + "".join(f"  {n} {m:7.3f} ({lo:6.3f})" for n, (m, lo) in got.items()))
    limit(default)


def node_overhead(rounds: int) -> None:
    marks = {}

    class Busy(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, seconds):
            ctx.seconds = seconds
            return x * 1.0

        @staticmethod
        def backward(ctx, dy):
            marks["in"] = time.perf_counter()
            while time.perf_counter() - marks["in"] < ctx.seconds:
                pass
            marks["out"] = time.perf_counter()
            return dy, None

    x = torch.randn(256, requires_grad=True)
    dy = torch.randn(256)
    for seconds in (0.0, 0.001, 0.004, 0.008):
        y = Busy.apply(x, seconds)
        before, after = [], []
        for _ in range(rounds):
            t0 = time.perf_counter()
            y.backward(dy, retain_graph=True)
            t1 = time.perf_counter()
            before.append(marks["in"] - t0)
            after.append(t1 - marks["out"])
        print(f"backward of {seconds * 1e3:.0f} ms: engine to entry {statistics.median(before) * 1e6:6.1f} us, "
              f"return to caller {statistics.median(after) * 1e6:6.1f} us")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("shapes", nargs="?", default=SHAPES)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--node", action="store_true", help="the Python autograd node's cost instead")
    args = parser.parse_args()
    settle_allocator()
    if args.node:
        node_overhead(args.rounds)
    else:
        layers(args.shapes, args.rounds)


if __name__ == "__main__":
    main()
