"""Reused memory for the CPU kernels' large outputs (y, dx): fresh pages cost more than the kernel itself.

Memory that a process has never touched, or has given back to the system, faults in page by page on its first
write, and the kernel zeroes each page: glibc serves every allocation of 32 MiB and more that way, so a
(256, 64, 28, 28) float32 output costs about 12,500 page faults, several milliseconds, every call (more than
the normalization itself), and smaller ones whenever it has given the top of its heap back (a training step's
freed outputs, see :data:`KEPT_MIN_BYTES`). torch's CPU allocator has no cache; this module is a small one, for the
CPU kernels' outputs of ``POOL_MIN_BYTES`` (32 MiB) and more, and those that outlive the call (a training y, a dx)
of ``KEPT_MIN_BYTES`` (1 MiB) and more:

* :func:`empty` returns a numpy byte array carved from an anonymous memory map (transparent huge pages
  requested), either fresh or one that a dead output left behind;
* when the last array or tensor viewing that memory is gone, a finalizer puts the map back in the pool (every
  view, numpy's or torch's, holds the byte array alive: numpy never collapses a view's base past an array that
  does not own its memory, and ``torch.from_numpy`` keeps the array it was given);
* the pool keeps at most ``NORMLAB_POOL_MB`` (default 512) MiB of free maps, dropping the least recently freed
  first; ``NORMLAB_POOL_MB=0`` turns it off (large outputs then come from numpy's allocator, as small ones do).

Sizes are rounded up to 2 MiB (one huge page), and a free map is reused only for the same rounded size, so a
request never gets more than 2 MiB of slack.

The native glue (``native.cpp``), which runs the norm layers wherever it is built, keeps a pool of its own for its
outputs, by the same rules and cap (:data:`normlab.kernels.native.POOL_FROM_BYTES`): :func:`free_bytes` counts its free
maps too, and :func:`clear` unmaps them.
"""
from __future__ import annotations

import mmap
import os
import threading
import weakref

import numpy as np

# glibc maps every request from 32 MiB up afresh (its largest mmap threshold); below that, an evaluation output from
# its heap reuses the block the caller's dead tensors just left (in cache), measured a few per cent faster than these
# maps in a streaming kernel
POOL_MIN_BYTES = 32 << 20
# outputs that outlive the kernel call (a training forward's y, the backward's dx) from this size, in both glues
# (the native glue's too: native.configure): a training step frees its y and the step before's dx, and two
# such blocks at the top of glibc's heap passed its trim threshold, so the next step's outputs faulted in afresh
KEPT_MIN_BYTES = 1 << 20
_GRAIN = 2 << 20


def _cap_from_env() -> int:
    raw = os.environ.get("NORMLAB_POOL_MB", "512")
    try:
        mb = float(raw)
    except ValueError:
        raise ValueError(f"NORMLAB_POOL_MB must be a number of MiB (0 disables the output cache), got {raw!r}")
    return max(0, int(mb * (1 << 20)))


CAP_BYTES = _cap_from_env()
_free: list[tuple[int, mmap.mmap]] = []  # (size, map), least recently freed first
_free_bytes = 0
_lock = threading.RLock()  # a finalizer may run inside a locked section (garbage collection), on any thread
_others: dict = {}  # other pools (the native glue's): clear -> free_bytes


def empty(nbytes: int) -> np.ndarray:
    """A writable uint8 array of ``nbytes``, contents undefined."""
    size = -(-nbytes // _GRAIN) * _GRAIN
    block = _take(size)
    if block is None:
        block = mmap.mmap(-1, size)
        if hasattr(mmap, "MADV_HUGEPAGE"):
            try:
                block.madvise(mmap.MADV_HUGEPAGE)
            except OSError:  # huge pages unavailable: plain pages still work
                pass
    raw = np.frombuffer(block, np.uint8, count=nbytes)
    fin = weakref.finalize(raw, _give_back, size, block)
    fin.atexit = False
    return raw


def _take(size: int) -> mmap.mmap | None:
    global _free_bytes
    with _lock:
        for i in range(len(_free) - 1, -1, -1):  # the most recently freed first: its pages may still be cached
            if _free[i][0] == size:
                _free_bytes -= size
                return _free.pop(i)[1]
        return None


def _give_back(size: int, block: mmap.mmap) -> None:
    global _free_bytes
    dropped = []
    with _lock:
        _free.append((size, block))
        _free_bytes += size
        while _free_bytes > CAP_BYTES and _free:
            old_size, old = _free.pop(0)
            _free_bytes -= old_size
            dropped.append(old)
    for old in dropped:
        try:
            old.close()
        except BufferError:  # pragma: no cover - still exported somewhere: let the garbage collector unmap it
            pass


def also(clear_other, free_bytes_other) -> None:
    """Count another pool's free maps in :func:`free_bytes` and unmap them in :func:`clear` (the native glue's)."""
    _others[clear_other] = free_bytes_other


def free_bytes() -> int:
    """Bytes held in free maps now (this pool's and the native glue's)."""
    with _lock:
        mine = _free_bytes
    return mine + sum(other() for other in _others.values())


def clear() -> None:
    """Unmap every free map, the native glue's too (memory in use is unaffected)."""
    global _free_bytes
    with _lock:
        dropped = [block for _, block in _free]
        _free.clear()
        _free_bytes = 0
    for block in dropped:
        try:
            block.close()
        except BufferError:  # pragma: no cover
            pass
    for clear_other in _others:
        clear_other()
