"""Where the host's time goes when normlab's batch norm runs eagerly on a CUDA GPU: microseconds per call of
back-to-back calls on a small tensor (the GPU idle-waits on the host), from a plain torch op, a Triton launch
(Triton's path, the compiled kernel's launcher, normlab's ``_run``) and a Python autograd node (its backward in
autograd's device thread or the caller's) up to the layer's forward+backward, against torch.nn's; then a profile of
the layer's calls.

    python benchmarks/gpu_host.py [--shape 256x64x8x8] [--profile 300]
"""
from __future__ import annotations

import argparse
import cProfile
import pstats
import sys

import torch

import normlab
from normlab import kernels
from normlab.bench.suite import _input, modes_for, parse_shape
from normlab.kernels import gpu_triton as T


def per_call_us(fn, reps: int = 400) -> float:
    for _ in range(20):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    best = float("inf")
    for _ in range(5):
        start.record()
        for _ in range(reps):
            fn()
        end.record()
        end.synchronize()
        best = min(best, start.elapsed_time(end) * 1e3 / reps)
    return best


def in_thread(fn):
    """``fn()`` run in a new thread (as the autograd engine runs a CUDA node's backward), its result returned."""
    import threading
    out = []
    t = threading.Thread(target=lambda: out.append(fn()))
    t.start()
    t.join()
    return out[0]


class _Node(torch.autograd.Function):
    """The cheapest Python autograd node: a new tensor forward (no kernel); its backward runs ``_Node.work`` and
    returns dy."""
    work = staticmethod(lambda: None)

    @staticmethod
    def forward(ctx, x):
        return torch.empty_like(x)

    @staticmethod
    def backward(ctx, dy):
        _Node.work()
        return dy


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", default="256x64x8x8")
    p.add_argument("--profile", type=int, default=300, help="layer fwd+bwd calls to profile (0: none)")
    args = p.parse_args(argv)
    shape, cl = parse_shape(args.shape)
    x = _input(shape, cl).cuda()
    dy = torch.randn_like(x)
    c = shape[1]
    w, b = torch.ones(c, device="cuda"), torch.zeros(c, device="cuda")
    rm, rv = torch.zeros(c, device="cuda"), torch.ones(c, device="cuda")
    small = torch.zeros(16, device="cuda")
    y, (mean, invstd), _ = T.bn_train_forward_saved(x, w, b, 1e-5, "identity", rm, rv, 0.1)
    g = T._launch(x)
    yb = torch.empty_like(x)
    d = {2: "1d", 3: "1d", 4: "2d", 5: "3d"}[len(shape)]
    layer_of_ours = getattr(normlab, f"BatchNorm{d}")(c).cuda()
    ours = modes_for(layer_of_ours, x, dy)[0]
    theirs = modes_for(getattr(torch.nn, f"BatchNorm{d}")(c).cuda(), x, dy)[0]
    xg = x.detach().clone().requires_grad_()
    bare = lambda: T._eval_kernel[g.grid](  # noqa: E731
        x, yb, rm, rv, w, b, *g.args, 1e-5, 0.0, ACT=0, ACC=T.tl.float32, HAS_W=True, HAS_B=True, **g.blocks)

    def node(work):
        def run():
            _Node.work = work
            xg.grad = None
            _Node.apply(xg).backward(dy)
        return run

    def direct():
        """The compiled kernel's own launcher, no binder and no cache lookup (Triton's internals: may not exist)."""
        try:
            from triton.runtime.driver import driver
            k = bare()
            dev = driver.active.get_current_device()
            binder = T._eval_kernel.device_caches[dev][4]
            vals = tuple(binder(x, yb, rm, rv, w, b, *g.args, 1e-5, 0.0, ACT=0, ACC=T.tl.float32, HAS_W=True,
                                HAS_B=True, **g.blocks)[0].values())
            stream = driver.active.get_current_stream(dev)
            grid = tuple(g.grid) + (1,) * (3 - len(g.grid))
            meta = k.launch_metadata(grid, stream, *vals)
            return lambda: k.run(*grid, stream, k.function, k.packed_metadata, meta, None, None, *vals)
        except Exception as e:  # noqa: BLE001
            print(f"(compiled.run not timed: {type(e).__name__}: {e})")
            return None

    fast = direct()
    layer_fb = ours["train_fwd_bwd"]

    def layer_fwd_with_grad():
        xg.grad = None
        return layer_of_ours(xg)

    def one_thread(fn):
        def run():
            with torch.autograd.set_multithreading_enabled(False):
                fn()
        return run

    cases = {
        "python autograd.Function fwd+bwd, no kernels": node(lambda: None),
        "the same, its backward one bare Triton launch": node(bare),
        "the same, its backward normlab bn_backward": node(
            lambda: T.bn_backward(dy, x, w, b, mean, invstd, "identity", True)),
        "the same, backward in the caller's thread": one_thread(node(
            lambda: T.bn_backward(dy, x, w, b, mean, invstd, "identity", True))),
        "triton: compiled.run(...) of that launch": fast,
        "normlab: _run(...) of that launch": lambda: T._run(
            T._eval_kernel, g.grid, x, yb, rm, rv, w, b, *g.args, 1e-5, 0.0, ACT=0, ACC=T.tl.float32, HAS_W=True,
            HAS_B=True, **g.blocks),
        "normlab layer(x) with grad, no backward": layer_fwd_with_grad,
        "normlab layer fwd+bwd, backward in caller's thread": one_thread(layer_fb),
        "torch layer fwd+bwd, backward in caller's thread": one_thread(theirs["train_fwd_bwd"]),
        "normlab: bn_backward in another thread": lambda: in_thread(
            lambda: per_call_us(lambda: T.bn_backward(dy, x, w, b, mean, invstd, "identity", True))),
        "torch: small.add_(1)": lambda: small.add_(1),
        "torch: empty_like(x)": lambda: torch.empty_like(x),
        "triton: _eval_kernel[grid](...) bare": bare,
        "normlab: _launch(x)": lambda: T._launch(x),
        "normlab: _split(1e-5)": lambda: T._split(1e-5),
        "normlab: bn_eval_forward": lambda: T.bn_eval_forward(x, rm, rv, w, b, 1e-5),
        "normlab: bn_train_forward_saved": lambda: T.bn_train_forward_saved(x, w, b, 1e-5, "identity", rm, rv, 0.1),
        "normlab: bn_backward": lambda: T.bn_backward(dy, x, w, b, mean, invstd, "identity", True),
    }
    threaded = "normlab: bn_backward in another thread"
    with kernels.use_backend("triton"):
        for name, fn in cases.items():
            if fn is None:
                continue
            us = fn() if name == threaded else per_call_us(fn)
            print(f"{name:<48} {us:8.1f} us", flush=True)
        for mode in ("eval_fwd", "train_fwd", "train_fwd_bwd"):
            for who, fns in (("normlab", ours), ("torch", theirs)):
                print(f"{who + ' layer: ' + mode:<48} {per_call_us(fns[mode], 200):8.1f} us", flush=True)
    with kernels.use_backend("portable"):
        print(f"{'normlab layer, portable: train_fwd_bwd':<48} {per_call_us(ours['train_fwd_bwd'], 200):8.1f} us")
    with kernels.use_backend("triton"):
        if args.profile:
            prof = cProfile.Profile()
            prof.enable()
            for _ in range(args.profile):
                ours["train_fwd_bwd"]()
            torch.cuda.synchronize()
            prof.disable()
            pstats.Stats(prof).sort_stats("tottime").print_stats(30)
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as tp:
                for _ in range(50):
                    ours["train_fwd_bwd"]()
                torch.cuda.synchronize()
            print(tp.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))
    return 0


if __name__ == "__main__":
    sys.exit(main())
