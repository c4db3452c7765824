"""How ``normlab bench`` times: contenders taking turns call by call in balanced orders, the statistic of the
repeats, page faults per call, a same-size copy in the same rotation, and the bytes autograd saves."""
from __future__ import annotations

import statistics
import time

try:
    import resource
except ImportError:  # Windows
    resource = None

import torch


STAT = {"name": "median"}  # or "min" (--stat): the statistic every table and ratio uses


def timeit(fn, budget: float, min_reps: int = 5, max_reps: int = 200, warmup: int = 2) -> float:
    """Seconds per call of ``fn()`` after ``warmup`` calls, repeated to fill about ``budget`` seconds: the median
    (default) or the minimum (``--stat min``, the better estimate of the cost on a host shared with other jobs)."""
    for _ in range(warmup):
        fn()
    t0 = time.perf_counter()
    fn()
    one = time.perf_counter() - t0
    reps = max(min_reps, min(max_reps, int(budget / max(one, 1e-7))))
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times) if STAT["name"] == "min" else statistics.median(times)


COPY = "same-size copy"


def round_orders(n: int) -> list[list[int]]:
    """Orders of ``n`` contenders for successive rounds in which each contender comes right after each other one
    equally often (a Williams design: n rounds for even n, 2n for odd n; each round is a permutation).

    Rotating one order does not do that: rotations of (a, b, c, d) keep a before b, b before c and c before d in
    every round, so b always inherited what a left (a copy's dirty lines, a from-scratch layer's freed
    temporaries) and a what d left."""
    if n <= 1:
        return [list(range(n))]
    first = [0] + [(j + 1) // 2 if j % 2 else n - j // 2 for j in range(1, n)]  # 0, 1, n-1, 2, n-2, ...
    rows = [[(v + i) % n for v in first] for i in range(n)]
    return rows if n % 2 == 0 else rows + [row[::-1] for row in rows]


def _minor_faults() -> int:
    """Page faults this process has taken without I/O so far (0 where ``resource`` is missing: Windows)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt if resource is not None else 0


def timeit_interleaved(fns: dict, budget: float, min_reps: int = 5, max_reps: int = 200, warmup: int = 2,
                       log=None, rounds: dict | None = None, faults: dict | None = None) -> dict:
    """Seconds per call of each ``fns[name]()``, measured in alternating rounds (one call of each contender per
    round, in the orders of :func:`round_orders`) so that a change of load on a shared host hits every contender
    alike, and each contender runs after each other one equally often (it inherits the caches, dirty lines and
    allocator state its predecessor left); ``budget`` seconds per contender. A contender that raises during
    warm-up is reported through ``log`` and left out. ``rounds``, if given, receives each contender's seconds
    round by round (equal-length lists: see :func:`rounds_won`); ``faults``, if given, each contender's median
    page faults per call (counted outside the timed call): a call that draws freshly mapped memory pays one per
    4 KiB page, which says whether a ratio measured the kernels or the heap state that the other contenders left."""
    live = {}
    for name, fn in fns.items():
        try:
            for _ in range(warmup):
                fn()
            t0 = time.perf_counter()
            fn()
            live[name] = (fn, time.perf_counter() - t0)
        except Exception as err:  # e.g. torch.compile without a working C++ toolchain
            if log is not None:
                log(f"  {name}: failed ({type(err).__name__}: {str(err).splitlines()[0][:80]})")
    if not live:
        return {}
    slowest = max(one for _, one in live.values())
    reps = max(min_reps, min(max_reps, int(budget / max(slowest, 1e-7))))
    times: dict = {name: [] for name in live}
    faulted: dict = {name: [] for name in live}
    order = list(live)
    orders = round_orders(len(order))
    # whole cycles of the design, at least one: a part of a cycle leaves the predecessors unbalanced (with the
    # from-scratch layer at 0.1-0.5 s a call, the large layers' forward+backward took 5 of the 10 rounds that five
    # contenders need, and their medians swung with which predecessors those 5 rounds happened to give)
    reps = -(-reps // len(orders)) * len(orders)
    for r in range(reps):
        for name in (order[i] for i in orders[r % len(orders)]):
            fn = live[name][0]
            f0 = _minor_faults()
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
            faulted[name].append(_minor_faults() - f0)
    if rounds is not None:
        rounds.update(times)
    if faults is not None:
        faults.update({name: statistics.median(fs) for name, fs in faulted.items() if name != COPY})
    pick = min if STAT["name"] == "min" else statistics.median
    return {name: pick(ts) for name, ts in times.items()}


def rounds_won(rounds: dict, ours: str = "normlab") -> dict:
    """For each other contender, the fraction of rounds in which ``ours`` took less time than it: a paired
    comparison (both calls ran within the same round, under the same load), which says how often a ratio of
    medians near 1 goes either way."""
    if ours not in rounds:
        return {}
    mine = rounds[ours]
    return {name: sum(a < b for a, b in zip(mine, ts)) / len(mine)
            for name, ts in rounds.items() if name not in (ours, COPY) and ts and len(ts) == len(mine)}


def timeit_with_copy(fns: dict, x: torch.Tensor, budget: float, log=None, rounds: dict | None = None,
                     faults: dict | None = None) -> tuple[dict, float | None]:
    """:func:`timeit_interleaved` of ``fns`` with ``dst.copy_(x)`` as one more contender in the same rotation:
    returns the contenders' seconds and the copy's GB/s (read + write), the bandwidth the same cache states allow.

    Timed alone in a tight loop, a copy of a 25.7 MB tensor finds source and destination in the cache that it
    left them in (81-94 GB/s here at 2 threads, against 34 GB/s for 512 MB), while the layers run after contenders
    that evict it: a fraction of that copy compared a cold pass with a warm one."""
    dst = torch.empty_like(x)
    got = timeit_interleaved({**fns, COPY: synced(lambda: dst.copy_(x), x.device)}, budget, log=log,
                             rounds=rounds, faults=faults)
    t = got.pop(COPY, None)
    return got, (2 * x.numel() * x.element_size() / t / 1e9 if t else None)


def synced(fn, device: torch.device):
    """``fn`` followed by a wait for the device's queue on CUDA (kernels launch asynchronously), else ``fn``."""
    if device.type != "cuda":
        return fn

    def call():
        fn()
        torch.cuda.synchronize(device)
    return call


def time_graph(fn, budget: float, inner: int = 10) -> float | None:
    """Seconds per call of ``fn`` on a CUDA device with the host taken out: ``inner`` calls captured in a CUDA graph
    (after three on a side stream, as capture requires), the graph replayed back to back between two events; the
    median of five rounds. None where the calls cannot be captured (the reason on stderr)."""
    import sys
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            for _ in range(inner):
                fn()
    except Exception as err:  # noqa: BLE001 - a contender that cannot be captured is reported, not fatal
        print(f"  (not captured: {type(err).__name__}: {str(err)[:120]})", file=sys.stderr)
        return None

    def rounds_ms(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(reps):
            graph.replay()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / reps

    one = rounds_ms(3)
    reps = max(5, min(2000, int(budget / 5 * 1e3 / max(one, 1e-3))))
    return sorted(rounds_ms(reps) for _ in range(5))[2] / inner / 1e3


def settle_allocator() -> None:
    """Put glibc's allocator in the state of a process that has been running a while: free one mapped block of
    just under 32 MiB, which raises its mapping threshold to that size (and its heap-trim threshold to twice it).

    A fresh process maps every block above 128 KiB afresh and gives it back on free until a freed mapping raises
    that threshold; until then a torch BatchNorm2d forward+backward on a 25.7 MB tensor paid ~4,600 page faults
    per call (27 ms, against 19 ms after one such free), which inflated normlab's ratios. Any training loop has
    freed such blocks by its second step. Blocks of 32 MiB and more are mapped afresh in every state.
    """
    block = torch.empty(31 * 2**20, dtype=torch.uint8)
    del block


def copy_bandwidth(nbytes: int, budget: float) -> float:
    """GB/s of ``dst.copy_(src)`` counting read + write, on tensors larger than most L3 caches."""
    src = torch.ones(nbytes // 4)
    dst = torch.empty_like(src)
    t = timeit(lambda: dst.copy_(src), budget, min_reps=5, max_reps=50)
    return 2 * nbytes / t / 1e9


def saved_bytes(fn) -> int:
    """Bytes of distinct storages autograd saves for backward while running ``fn``."""
    seen: dict[int, int] = {}

    def pack(t):
        s = t.untyped_storage()
        seen[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())
