"""A/B of the two glues on large norm-layer inputs, in one process: the native glue (C++ autograd node, the loops
split into one run per thread) against the Python glue (a Python autograd node, numba's parallel loops), with
torch.nn beside them. The native glue's size limit is set call by call (``native.BN_BELOW_BYTES``, with
``--group`` ``native.GROUP_BELOW_BYTES``), so both run
the same loops on the same inputs; a copy of 64 MB between calls leaves little of the input in cache, as in a
network.

    .venv/bin/python benchmarks/native_limit.py                 # the suite's 16-32 MiB shapes, torch's threads
    .venv/bin/python benchmarks/native_limit.py 4096x1024,32x64x56x56cl --rounds 40
    .venv/bin/python benchmarks/native_limit.py --group         # group, layer and instance norm's 16-32 MiB shapes
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
GROUP_SHAPES = "gn:32x64x56x56:32,in:32x64x56x56,gn:128x256x14x14:32,ln:4096x1024"


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


def batch_norm_cases(shapes: str):
    """(label, x, the layer's class name in normlab and torch.nn, its arguments) for batch norm on each of
    ``shapes`` (cl: channels_last)."""
    for spec in shapes.split(","):
        cl = spec.endswith("cl")
        shape = tuple(int(s) for s in spec.removesuffix("cl").split("x"))
        fmt = torch.channels_last if cl else torch.contiguous_format
        name = f"BatchNorm{'2d' if len(shape) == 4 else '1d'}"
        yield spec, torch.randn(shape).contiguous(memory_format=fmt), name, (shape[1],)


def group_cases(shapes: str):
    """The same for group, layer and instance norm: ``gn:32x64x56x56:32`` (G=32), ``ln:4096x1024`` (over the last
    dimension), ``in:32x64x56x56`` (affine)."""
    for spec in shapes.split(","):
        kind, dims, *groups = spec.split(":")
        shape = tuple(int(s) for s in dims.split("x"))
        name, args = {"gn": ("GroupNorm", lambda: (int(groups[0]), shape[1])),
                      "ln": ("LayerNorm", lambda: (shape[-1],)),
                      "in": ("InstanceNorm2d", lambda: (shape[1], 1e-5, 0.1, True))}[kind]
        yield spec, torch.randn(shape), name, args()


def layers(cases, limit_name: str, rounds: int) -> None:
    """Each case's layer through the Python glue (``native.<limit_name>`` at the input's size), through the native
    glue (the limit past it) and torch.nn's, forward+backward and forward."""
    module = K._native
    if module is None:
        raise SystemExit("the native glue is not built: run `normlab build-native`")
    big = torch.randn(16 << 20)
    dst = torch.empty_like(big)
    default = getattr(native, limit_name)

    def limit(nbytes):
        setattr(native, limit_name, nbytes)
        native.configure(module, cpu)

    for label, x, name, args in cases:
        x.requires_grad_()
        dy = torch.randn_like(x)
        python_layer, native_layer = getattr(normlab, name)(*args), getattr(normlab, name)(*args)
        torch_layer = getattr(torch.nn, name)(*args)
        nbytes = x.numel() * x.element_size()
        python_limit = min(nbytes, default)  # the Python glue from this input's size
        native_limit = max(nbytes + 1, default)

        def step(layer, nbytes):
            def call():
                limit(nbytes)
                x.grad = None
                for p in layer.parameters():
                    p.grad = None
                layer(x).backward(dy)
            return call

        def forward(layer, nbytes):
            def call():
                limit(nbytes)
                layer(x)
            return call

        print(f"{label}: {nbytes / 1e6:.1f} MB, {torch.get_num_threads()} threads, median (min) ms")
        for mode, make in (("fwd+bwd", step), ("forward", forward)):
            got = race({"python glue": make(python_layer, python_limit),
                        "native glue": make(native_layer, native_limit), "torch": make(torch_layer, default)},
                       rounds, lambda: dst.copy_(big))
            print(f"  {mode:8s}" + "".join(f"  {n} {m:7.3f} ({lo:6.3f})" for n, (m, lo) in got.items()), flush=True)
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
    parser.add_argument("shapes", nargs="?", help=f"default: {SHAPES}; with --group: {GROUP_SHAPES}")
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--group", action="store_true", help="group, layer and instance norm instead of batch norm "
                        "(native.GROUP_BELOW_BYTES)")
    parser.add_argument("--node", action="store_true", help="the Python autograd node's cost instead")
    args = parser.parse_args()
    settle_allocator()
    if args.node:
        node_overhead(args.rounds)
    elif args.group:
        layers(group_cases(args.shapes or GROUP_SHAPES), "GROUP_BELOW_BYTES", args.rounds)
    else:
        layers(batch_norm_cases(args.shapes or SHAPES), "BN_BELOW_BYTES", args.rounds)


if __name__ == "__main__":
    main()
