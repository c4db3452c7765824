"""The native glue (``native.cpp``): batch, group, layer and instance norm on CPU inputs of any size (on hosts whose
NCHW batch norm goes channel by channel, below :data:`normlab.kernels.cpu._CHANNELS_FROM` in that layout:
:func:`bn_below_bytes`), with no Python between the checks, the allocations (large outputs from its own pool),
the numba loops and the autograd node; from a few ten thousand elements it splits the work over torch's threads
itself (:data:`BN_SPLIT_FROM`, :data:`GROUP_SPLIT_FROM`, :data:`GROUP_BACKWARD_SPLIT_FROM`).

Why: on a (256, 120) layer the loops take ~5 us forward and ~11 us backward, but the Python glue of
:mod:`normlab.kernels.cpu` around them (tensor -> numpy views, allocations, checks, a Python autograd node) took
~25 us more per step, so torch's C++ layer won on small inputs. The native glue calls the same loops (their C entry
points, :func:`normlab.kernels.cpu_numba.c_entry_points`) from C++.

It is optional and built once per machine, torch and Python (``normlab build-native``; ``make setup`` runs it): it
needs a C++ compiler and ninja, and takes ~25 s, then half a minute to two minutes per dtype to compile the loops'
entry points once (numba caches them). The library is kept in :func:`cache_dir` under a tag of its source and
flags, torch, Python and the machine, so an upgrade builds afresh instead of loading a stale binary (until then the
Python glue runs). Where it is not built, ``NORMLAB_NATIVE=0`` is set, or a backend is forced
(:func:`normlab.kernels.use_backend`), the Python glue does the same work with the same loops.
"""
from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import os
import platform
import sys
import threading
import time
import warnings
from pathlib import Path

import torch

from . import pool

NAME = "normlab_native"
SOURCE = Path(__file__).with_name("native.cpp")


def cache_dir() -> Path:
    """``$NORMLAB_CACHE_DIR``, else ``$XDG_CACHE_HOME/normlab``, else ``~/.cache/normlab``."""
    if os.environ.get("NORMLAB_CACHE_DIR"):
        return Path(os.environ["NORMLAB_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "normlab"


# -fopenmp: at::parallel_for's OpenMP region is compiled into this module (the libgomp it links is torch's own,
# already loaded under the same soname, so both share one thread pool)
# (tuples: they make the binary's tag, and cpp_extension.load appends to the lists it is given)
# -fno-math-errno: std::sqrt vectorizes (the merges' loops over channels, `#pragma omp simd`); nothing reads errno
CFLAGS = ("-O2", "-fopenmp", "-fno-math-errno")
LDFLAGS = ("-fopenmp",)


def _tag() -> str:
    """What the binary depends on: its source and flags, torch, Python and the machine."""
    h = hashlib.sha256(SOURCE.read_bytes())
    h.update(f"{list(CFLAGS)}|{list(LDFLAGS)}|{torch.__version__}|{sys.version}|{platform.machine()}".encode())
    return h.hexdigest()[:16]


def library_path() -> Path:
    return cache_dir() / f"native-{_tag()}" / f"{NAME}.so"


def build(verbose: bool = False):
    """Compile ``native.cpp`` against the installed torch (``torch.utils.cpp_extension``) and return the loaded
    module. Raises with the compiler's message when it fails."""
    from torch.utils import cpp_extension

    directory = library_path().parent
    directory.mkdir(parents=True, exist_ok=True)
    try:
        return cpp_extension.load(name=NAME, sources=[str(SOURCE)], build_directory=str(directory),
                                  extra_cflags=list(CFLAGS), extra_ldflags=list(LDFLAGS), verbose=verbose)
    except Exception:  # noqa: BLE001 - a compiler without OpenMP (clang without libomp): single-threaded loops
        plain = [f for f in CFLAGS if f != "-fopenmp"]
        return cpp_extension.load(name=NAME, sources=[str(SOURCE)], build_directory=str(directory),
                                  extra_cflags=plain, verbose=verbose)


def _import(path: Path):
    spec = importlib.util.spec_from_file_location(NAME, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load(build_missing: bool = False):
    """The native module, or None: not built (and ``build_missing`` False), disabled (``NORMLAB_NATIVE=0``), or
    not loadable (a warning says why)."""
    if os.environ.get("NORMLAB_NATIVE", "1") == "0":
        return None
    module = sys.modules.get(NAME)
    if module is not None:
        return module
    path = library_path()
    try:
        if path.exists():
            return _import(path)
        return build() if build_missing else None
    except Exception as exc:  # noqa: BLE001 - any failure leaves the Python glue in charge, said once
        warnings.warn(f"normlab's native glue could not be {'loaded' if path.exists() else 'built'} ({exc}); "
                      f"norm layers use the Python glue (slower per call, same results). Rebuild with "
                      f"`normlab build-native --verbose`, or set NORMLAB_NATIVE=0 to silence this",
                      RuntimeWarning, stacklevel=2)
        return None


# Inputs below these sizes (bytes) take the native glue; larger ones the Python glue. Until 2026-12-06 that was 32 MiB,
# where the Python glue's output pool took over; with a pool of its own (POOL_FROM_BYTES) the native glue measured
# faster on larger inputs too, alternating call by call in one process (2 threads, median ms Python glue -> native glue,
# training forward+backward / forward / evaluation): batch norm (256, 64, 28, 28) 12.54 -> 11.78 / 3.74 -> 3.45 / 2.26
# -> 2.06, channels_last 12.77 -> 11.78 / 3.98 -> 3.60 / 2.48 -> 2.19, (64, 64, 56, 56) 12.09 -> 11.26; group norm (256,
# 64, 28, 28) G=8 8.46 -> 7.24 / 3.07 -> 2.63, (256, 256, 14, 14) G=32 6.21 -> 5.08 / 2.18 -> 1.61, layer norm (128,
# 197, 768) 12.70 -> 11.06 / 6.27 -> 5.28, instance norm (64, 64, 56, 56) 6.51 -> 5.53 / 2.01 -> 1.55. So no limit now
# (NO_LIMIT), but for NCHW batch norm on hosts of 2 MiB of L2 a core and more, whose channel-by-channel loops the Python
# glue runs (bn_below_bytes). With more than one torch thread, the native glue splits batch norm inputs of BN_SPLIT_FROM
# elements and more, and group/layer/instance norm inputs of GROUP_SPLIT_FROM (forward) or GROUP_BACKWARD_SPLIT_FROM
# (backward; layer norm's only with 16 rows a run or more: native.cpp, kLayerBackwardRowsPerRun), into one run of rows
# or samples per thread on torch's own pool (at::parallel_for); smaller ones run on the calling thread. Measured with
# `normlab bench` against the Python glue and its numba-parallel loops, forward+backward vs torch.nn: 2 threads, (256,
# 512) 1.04x -> 1.20x, (1024, 256) 0.84-0.93x -> 1.32x, (256, 6, 28, 28) 2.27x -> 2.77x; 1 thread, (256, 6, 28, 28)
# 2.58x -> 3.1x, (2048, 1024) 1.06x -> 1.2x and its eval 0.83-1.10x -> 1.6-2.0x. 25.7 MB inputs had measured no better
# than with the Python glue while each run chose its streaming stores by its own part of the output (a half, under the
# 16 MiB from which the loops stream); chosen by the whole output's size (2026-12-03), batch norm from 16 to 32 MiB
# measured faster through the native glue (BENCHMARKS.md), except the (N, C, S) layout on hosts whose channel-by-channel
# loops apply (cpu._by_channel: 2 MiB of L2 and more), which the Python glue keeps from 16 MiB. Group, layer and
# instance norm from 16 to 32 MiB likewise, once their runs streamed by the whole output too (2026-12-03, later;
# `benchmarks/native_limit.py --group --rounds 40`, fwd+bwd median ms Python glue -> native glue, 2 threads | 1 thread):
# GN (32, 64, 56, 56) G=32 5.16 -> 4.43 | 8.23 -> 7.42, IN (32, 64, 56, 56) 5.36 -> 4.67 | 7.86 -> 7.59, GN (128, 256,
# 14, 14) G=32 5.81 -> 4.88 | 9.44 -> 8.94, LN (4096, 1024) 4.35 -> 3.84 | 6.97 -> 5.47; their forwards 9-25 % faster.
# GN (32, 32, 8, 8) at 2 threads: 0.70x -> 1.0x; LN (64, 256) split (16K elements) measured slower than on one thread.
# Rechecked 2026-12-02 (GROUP_SPLIT_FROM 8K against 32K, two alternations at 2 threads): LN (64, 256) forward 1.07-1.14x
# against 0.98-1.00x of torch, but LN (16, 1024) forward+backward 1.00-1.03x against 1.22-1.29x; small GN/IN cases
# within noise. The forward and the backward now split from sizes of their own (2026-12-02, later; one process, both
# settings alternating call by call in the bench's balanced orders, 2 threads, two runs): a forward split from 8K
# elements and a backward from 32K (its runs add their dweight/dbias partials) against both from 32K: LN (64, 256)
# forward 19.0-19.2 -> 17.6-18.3 us, forward+backward 73.0-73.6 -> 69.9-70.7 us; LN (256, 64) forward 19.2-28.7 ->
# 18.3-22.4 us; GN (8, 32, 8, 8) forward 16.3-20.9 -> 15.2-18.8 us; none slower beyond the runs' spread. A backward
# split from 4K as well cost LN (16, 1024) and (8, 2048) forward+backward 73-80 us against 67-69; from 128K it helped
# none consistently.
NO_LIMIT = 1 << 62
BN_BELOW_BYTES = GROUP_BELOW_BYTES = NO_LIMIT
GROUP_SPLIT_FROM = 1 << 13
GROUP_BACKWARD_SPLIT_FROM = 1 << 15
BN_SPLIT_FROM = 1 << 16
# The native glue's outputs come from its output pool (native.cpp, OutputPool; the Python glue's grain and cap,
# NORMLAB_POOL_MB): those that outlive the call (a training forward's y where autograd records the node, the backward's
# dx) from pool.KEPT_MIN_BYTES, as in the Python glue, any from POOL_FROM_BYTES. Before, glibc's heap served them, and a
# training step's freed y and dx at the top of the heap passed its trim threshold: the next outputs faulted in page by
# page. Alternating call by call in one process (benchmarks/pool_ab.py, Zen 4, 2026-12-06, two runs; the faults come and
# go with the heap's state), forward+backward median ms heap -> pool at 2 threads: (32, 64, 56, 56) 6.11 -> 2.97 (3,045
# page faults a call -> 0) and 4.03 -> 3.93 (no faults), channels_last 2.95 -> 2.50 and 4.54 -> 4.32, (128, 256, 14, 14)
# 3.12 -> 2.60 and 4.06 -> 3.91, (4096, 1024) 1.71 -> 1.57 and 3.32 -> 3.20, (256, 6, 28, 28) 0.41 -> 0.35 and 0.50 ->
# 0.45; at 1 thread (128, 256, 14, 14) 6.42 -> 5.54 and 7.11 -> 6.08, (256, 16, 10, 10) 0.46 -> 0.28 (202 faults a call
# -> 0), (64, 64, 16, 16) 1.13 -> 0.72 and 0.73 -> 0.62; none slower. Evaluation outputs below 16 MiB stay with the
# heap, which hands out the block the caller's dead tensors just left, still in cache: pooled, the 4.8 MB (256, 6, 28,
# 28) evaluation measured 0.88-0.94x of torch's time in the bench against 1.03-1.08x. `normlab bench --sections layers`,
# two runs each way alternating (heap / pool): training forward+backward geomean vs torch 2.04 / 2.18x and 2.03 / 2.24x.
POOL_FROM_BYTES = 16 << 20


def bn_below_bytes(cpu) -> tuple[int, int]:
    """The bytes below which the native glue takes batch norm's rows and (N, C, S) inputs on this host."""
    channel_loops = cpu.L2_BYTES >= cpu._CHANNEL_L2_MIN  # the Python glue's, from cpu._CHANNELS_FROM
    return BN_BELOW_BYTES, min(cpu._CHANNELS_FROM, BN_BELOW_BYTES) if channel_loops else BN_BELOW_BYTES


def configure(module, cpu) -> None:
    """The sizes the module takes, the rows layout's lanes as :mod:`normlab.kernels.cpu` uses them, and its output
    pool's sizes (the pool's free maps count in :func:`normlab.kernels.pool.free_bytes` and go with its ``clear``)."""
    pool.also(module.pool_clear, module.pool_free_bytes)
    module.configure(*bn_below_bytes(cpu), GROUP_BELOW_BYTES, cpu._LANES_FROM, cpu._LANES, GROUP_SPLIT_FROM,
                     GROUP_BACKWARD_SPLIT_FROM, BN_SPLIT_FROM, POOL_FROM_BYTES, pool.KEPT_MIN_BYTES, pool._GRAIN,
                     pool.CAP_BYTES)


# a first use whose loops take longer than this to compile (not yet in numba's cache) says so on stderr
SLOW_LOOPS_NOTE_S = 3.0


@contextlib.contextmanager
def _note_if_slow(what: str, after_s: float):
    """Says on stderr that ``what`` is under way once it has taken ``after_s`` seconds, and when it is done; quick
    work (loops from numba's cache) prints nothing."""
    t0 = time.perf_counter()
    noted = threading.Event()

    def note():
        print(f"normlab: {what} (once per machine, cached afterwards) ...", file=sys.stderr, flush=True)
        noted.set()

    timer = threading.Timer(after_s, note)
    timer.daemon = True
    timer.start()
    try:
        yield
    finally:
        timer.cancel()
        timer.join()  # a note being printed is finished before the last line
        if noted.is_set():
            print(f"normlab: {what}: done in {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)


def set_loops(module, dtype: torch.dtype) -> None:
    """Hand the numba loops for activations of ``dtype`` (float32, float64, bfloat16, float16) to the module:
    compiled on first use (half a minute to two minutes per dtype once per machine, cached on disk by
    numba; stderr says so when it takes more than :data:`SLOW_LOOPS_NOTE_S`), so only the dtypes a program uses
    are compiled. A dtype the host's loops do not take (float16 without F16C) is declined: the module leaves its
    calls to the Python glue."""
    from . import cpu, cpu_numba

    name = str(dtype).removeprefix("torch.")
    if dtype not in cpu.SUPPORTED_DTYPES:
        module.set_loops(name, [])
        return
    with _note_if_slow(f"compiling the CPU norm loops for {name} inputs", SLOW_LOOPS_NOTE_S):
        entries = list(cpu_numba.c_entry_points(cpu._NP_STORAGE[dtype]))  # 16-bit floats as their bits
    module.set_loops(name, entries)


__all__ = ["NAME", "SOURCE", "BN_BELOW_BYTES", "GROUP_BELOW_BYTES", "bn_below_bytes", "GROUP_SPLIT_FROM",
           "GROUP_BACKWARD_SPLIT_FROM", "BN_SPLIT_FROM", "cache_dir", "library_path", "build", "load", "configure",
           "set_loops"]


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "build-native", help="compile the native glue for the norm layers on CPU (once per machine and torch)",
        description="Compile native.cpp against the installed torch (~25 s), then the numba loops it calls for "
                    "float32 (~1.5 min the first time, cached by numba; float64's on first use), and check one layer "
                    "against torch.nn. `make setup` runs this; without it those layers use the Python glue.")
    p.add_argument("--verbose", action="store_true", help="show the compiler's commands and output")
    p.set_defaults(func=_build_command)


def _build_command(args) -> int:
    from . import cpu as _cpu_glue

    t0 = time.perf_counter()
    print(f"normlab build-native: compiling {SOURCE.name} against torch {torch.__version__} into "
          f"{library_path().parent} ...", flush=True)
    try:
        module = load(build_missing=True) if not args.verbose else build(verbose=True)
    except Exception as exc:  # noqa: BLE001 - reported, with the way forward
        print(f"normlab build-native: failed: {exc}\n  needs a C++ compiler (g++ or clang++) and ninja "
              f"(pip install ninja); norm layers keep using the Python glue", file=sys.stderr)
        return 1
    if module is None:
        print("normlab build-native: failed (see the warning above); norm layers keep using the Python glue",
              file=sys.stderr)
        return 1
    print(f"  built in {time.perf_counter() - t0:.0f} s", flush=True)  # set_loops says when the loops compile
    t1 = time.perf_counter()
    configure(module, _cpu_glue)
    set_loops(module, torch.float32)
    print(f"  the float32 loops ready in {time.perf_counter() - t1:.0f} s (other dtypes' on first use); checking "
          f"against torch.nn ...", flush=True)
    x = torch.randn(64, 24, requires_grad=True)
    w = torch.rand(24, requires_grad=True)
    b = torch.randn(24, requires_grad=True)
    y, status = module.batch_norm(x, w, b, None, None, True, 0.1, 1e-5, 0, None, False)
    expected = torch.nn.functional.batch_norm(x, None, None, w, b, True, 0.1, 1e-5)
    g = torch.randn_like(expected)
    ok = status == 0 and all(torch.allclose(a, e, rtol=1e-4, atol=1e-5) for a, e in zip(
        (y, *torch.autograd.grad(y, (x, w, b), g)), (expected, *torch.autograd.grad(expected, (x, w, b), g))))
    print(f"normlab build-native: {'ok' if ok else 'MISMATCH against torch.nn'}, {library_path()}")
    return 0 if ok else 1
