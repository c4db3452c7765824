"""A/B of the numba loops of two checkouts in one process: group, layer and batch norm kernels (batch norm's fused
SiLU and sigmoid, and its (M, C) loops, also on 16-bit storage) called directly on numpy arrays, the two versions
alternating call by call, so that the host's drift (this file's reason to exist: the VMs it was written on moved
their copy bandwidth by 2x between runs a minute apart) falls on both alike.

    git worktree add /tmp/base <commit>                        # the loops to compare against
    .venv/bin/python benchmarks/ab_loops.py /tmp/base 1        # threads: 1 (serial twins) or more (parallel)
    .venv/bin/python benchmarks/ab_loops.py /tmp/base 1 "bn rows"   # only the kernels whose label has this text

Prints each kernel's median time in ms for the base ("old") and this checkout ("new") and their ratio. The first
run compiles the base's loops (a few minutes; numba caches them next to its sources). Kernels whose arguments
changed between the two versions get the arguments each version takes (group norm's ``runs``, ``whole``).
"""
from __future__ import annotations

import importlib.util
import inspect
import statistics
import sys
import time
from pathlib import Path

import numba
import numpy as np

HERE = Path(__file__).resolve().parents[1] / "src" / "normlab" / "kernels" / "cpu_numba.py"


def load(name: str, path: Path):
    """The base checkout's loops as module ``name``. numba caches compiled loops beside their source under the
    module's name, so this checkout's own loops are imported as ``normlab.kernels.cpu_numba`` (:func:`this`):
    loaded under another name they left cache entries that normlab itself could not load afterwards
    (ModuleNotFoundError until the source changed)."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def this():
    """This checkout's loops, imported under their own name (see :func:`load`)."""
    module = importlib.import_module("normlab.kernels.cpu_numba")
    if Path(module.__file__).resolve() != HERE:
        sys.exit(f"normlab here is {module.__file__}, not this checkout's {HERE}: run with this checkout's venv")
    return module


def aligned(shape, dtype=np.float32) -> np.ndarray:
    """An uninitialized array whose data starts on a 64-byte line (as the outputs normlab allocates)."""
    n = int(np.prod(shape))
    buf = np.empty(n + 64 // np.dtype(dtype).itemsize, dtype)
    off = (-buf.ctypes.data % 64) // buf.itemsize
    return buf[off:off + n].reshape(shape)


def filled(shape, rng, storage=np.float32) -> np.ndarray:
    """Normal values in ``storage``: float32, or bfloat16 / float16 as the loops take them (int16 / uint16 bits)."""
    v = rng.standard_normal(shape, dtype=np.float32)
    a = aligned(shape, storage)
    if storage == np.uint16:
        a[...] = v.astype(np.float16).view(np.uint16)
    elif storage == np.int16:
        a[...] = (v.view(np.uint32) >> 16).astype(np.int16)  # truncated to bfloat16: fine for timing
    else:
        a[...] = v
    return a


ONLY = ""  # the third argument: only kernels whose label contains it


def ab(label: str, calls: dict, reps: int = 25, warmup: int = 3) -> None:
    """Median ms of each of ``calls`` ({"old": fn, "new": fn}), alternating which goes first every round."""
    if ONLY not in label:
        return
    times = {k: [] for k in calls}
    for r in range(reps + warmup):
        for k in (list(calls) if r % 2 else list(calls)[::-1]):
            t = time.perf_counter()
            calls[k]()
            if r >= warmup:
                times[k].append(time.perf_counter() - t)
    med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    print(f"{label:34s} old {med['old']:8.3f}  new {med['new']:8.3f}   new/old {med['new'] / med['old']:.3f}",
          flush=True)


def main(base: str, threads: int) -> None:
    versions = {"old": load("base_cpu_numba", Path(base) / "src/normlab/kernels/cpu_numba.py"),
                "new": this()}
    numba.set_num_threads(threads)
    numba.set_parallel_chunksize(1)
    rng = np.random.default_rng(0)

    def kernel(mod, name):
        k = getattr(mod, name)
        return k.serial if threads == 1 else k

    def takes(mod, name, arg) -> bool:
        return arg in inspect.signature(getattr(mod, name).py_func).parameters

    def whole(mod, name) -> tuple:  # loops that take it: 0, each array is the whole output
        return (0,) if takes(mod, name, "whole") else ()

    def three_of(shape, storage):  # three inputs in turn: the caches hold little of the one being read
        return [filled(shape, rng, storage) for _ in range(3)]

    def three(shape):
        return three_of(shape, np.float32)

    for shape, g in [((128, 256, 196), 32), ((32, 64, 3136), 32), ((32, 64, 3136), 64), ((32, 32, 64), 8)]:
        xs, dys, ys = three(shape), three(shape), [aligned(shape) for _ in range(3)]
        c = shape[1]
        w, b = np.ones(c, np.float32), np.zeros(c, np.float32)
        mean, inv = np.empty((shape[0], g), np.float32), np.empty((shape[0], g), np.float32)
        dwp, dbp = np.empty((shape[0], c)), np.empty((shape[0], c))
        tasks = shape[0] * g
        runs = 1 if threads == 1 else min(tasks, 16 * threads)
        turn = iter(range(1 << 62))

        def fwd(mod):
            extra = ((runs,) if takes(mod, "gn_fwd", "runs") else ()) + whole(mod, "gn_fwd")
            i = next(turn) % 3
            kernel(mod, "gn_fwd")(xs[i], ys[i], w, b, g, 1e-5, mean, inv, *extra)

        def bwd(mod):
            extra = ((runs,) if takes(mod, "gn_bwd", "runs") else ()) + whole(mod, "gn_bwd")
            i = next(turn) % 3
            kernel(mod, "gn_bwd")(dys[i], xs[i], w, mean, inv, g, True, ys[i], dwp, dbp, *extra)

        ab(f"gn fwd {shape}/{g}", {k: (lambda m=m: fwd(m)) for k, m in versions.items()})
        ab(f"gn bwd {shape}/{g}", {k: (lambda m=m: bwd(m)) for k, m in versions.items()})

    for shape in [(4096, 1024), (16384, 512), (256 * 197, 768)]:
        xs, dys, y = three(shape), three(shape), aligned(shape)
        k = shape[1]
        w, b = np.ones(k, np.float32), np.zeros(k, np.float32)
        mean, inv = np.empty(shape[0], np.float32), np.empty(shape[0], np.float32)
        dw, db = np.empty(k, np.float32), np.empty(k, np.float32)
        chunks = 1 if threads == 1 else max(4 * threads, -(-shape[0] // 256))
        turn = iter(range(1 << 62))
        ab(f"ln fwd {shape}", {n: (lambda m=m: kernel(m, "ln_fwd")(xs[next(turn) % 3], y, w, b, 1e-5, mean, inv,
                                                                    chunks, *whole(m, "ln_fwd")))
                               for n, m in versions.items()})
        ab(f"ln bwd {shape}", {n: (lambda m=m: kernel(m, "ln_bwd")(dys[next(turn) % 3], xs[0], w, mean, inv, True,
                                                                    True, y, dw, db, chunks, *whole(m, "ln_bwd")))
                               for n, m in versions.items()})

    # (N, C, S) batch norm: identity on float32; the fused SiLU (2) and sigmoid (3), whose exp costs more than the
    # values' memory traffic, on float32 and bfloat16 (int16 bits)
    for shape, storage, acts in [((256, 64, 784), np.float32, (0,)), ((32, 64, 3136), np.float32, (0, 2, 3)),
                                 ((128, 256, 196), np.float32, (0,)), ((32, 64, 3136), np.int16, (2, 3))]:
        xs, dys, y = three_of(shape, storage), three_of(shape, storage), aligned(shape, storage)
        c = shape[1]
        w, b = np.ones(c, np.float32), np.zeros(c, np.float32)
        mean, var = np.empty(c), np.empty(c, np.float32)
        dw, db = np.empty(c, np.float32), np.empty(c, np.float32)
        chunks = 1 if threads == 1 else 16 * threads
        turn = iter(range(1 << 62))
        for act in acts:
            label = f"{shape}" if act == 0 else f"{np.dtype(storage).name} {shape} act {act}"
            kind = "bn" if act == 0 else "bn act"
            ab(f"{kind} fwd {label}", {n: (lambda m=m, act=act: kernel(m, "bn_fwd_ncs")(
                xs[next(turn) % 3], y, w, b, 1e-5, act, 0, mean, var, chunks)) for n, m in versions.items()})
            ab(f"{kind} bwd {label}", {n: (lambda m=m, act=act: kernel(m, "bn_bwd_ncs")(
                dys[next(turn) % 3], xs[0], w, b, mean, var, act, True, True, y, dw, db, chunks))
                for n, m in versions.items()})

    # the (M, C) loops as the glue calls them on channels_last and (N, C) inputs: (M / k, k * C) rows (cpu._lanes)
    for storage in (np.float32, np.uint16, np.int16):
        for rows, c, k in [(100352, 64, 8), (4096, 64, 8), (256, 120, 1)]:
            shape = (rows // k, k * c)
            xs, dys, y = three_of(shape, storage), three_of(shape, storage), aligned(shape, storage)
            w, b = np.ones(c, np.float32), np.zeros(c, np.float32)
            mean, second = np.empty(c), np.empty(c, np.float32)
            dw, db = np.empty(c, np.float32), np.empty(c, np.float32)
            chunks = 1 if threads == 1 else 4 * threads
            turn = iter(range(1 << 62))
            label = f"{np.dtype(storage).name} ({rows}, {c})"
            # MODE_TRAIN (0) writes mean and invstd, MODE_EVAL (2) reads them; act 1: the fused ReLU
            for mode, act, what in ((0, 0, "train"), (2, 0, "eval"), (0, 1, "train relu"), (2, 1, "eval relu")):
                ab(f"bn rows {what} {label}", {n: (lambda m=m, mode=mode, act=act: kernel(m, "bn_fwd_rows")(
                    xs[next(turn) % 3], y, w, b, 1e-5, act, mode, mean, second, chunks, *whole(m, "bn_fwd_rows")))
                    for n, m in versions.items()})
            versions["new"].bn_fwd_rows(xs[0], y, w, b, 1e-5, 0, 0, mean, second, 1, 0)  # the batch's statistics
            ab(f"bn rows bwd {label}",
               {n: (lambda m=m: kernel(m, "bn_bwd_rows")(dys[next(turn) % 3], xs[0], w, b, mean, second, 0, True, True,
                                                         y, dw, db, chunks)) for n, m in versions.items()})


if __name__ == "__main__":
    if len(sys.argv) not in (2, 3, 4):
        sys.exit("usage: ab_loops.py BASE_CHECKOUT [THREADS [LABEL_TEXT]]")
    ONLY = sys.argv[3] if len(sys.argv) == 4 else ""
    main(sys.argv[1], int(sys.argv[2]) if len(sys.argv) >= 3 else 1)
