"""Kernels: pure functions on tensors that compute statistics, normalize and backpropagate.

``portable`` (torch ops, any device) defines the contract; ``cpu`` (numba) implements it for CPU tensors.
Every public function here dispatches on the input: the fast CPU backend where it supports the tensor, the
portable one otherwise. ``NORMLAB_BACKEND=portable`` (or :func:`use_backend`) forces a backend, for tests and
benchmarks.
"""
from __future__ import annotations

import contextlib
import os

import torch
from torch import Tensor

from . import portable
from .portable import ACTIVATIONS, acc_dtype

try:  # the fast CPU backend is optional: without numba everything still works, more slowly
    from . import cpu as _cpu
except ImportError:  # pragma: no cover - exercised only where numba is missing
    _cpu = None

_forced: str | None = os.environ.get("NORMLAB_BACKEND") or None


@contextlib.contextmanager
def use_backend(name: str | None):
    """Force ``"portable"`` or ``"cpu"`` inside the block (``None``: automatic choice)."""
    global _forced
    if name not in (None, "portable", "cpu"):
        raise ValueError(f"unknown backend {name!r}; expected 'portable', 'cpu' or None")
    previous, _forced = _forced, name
    try:
        yield
    finally:
        _forced = previous


def backend_for(x: Tensor):
    """The module implementing the kernel contract for ``x``."""
    if _forced is None:
        return _cpu if _cpu is not None and _cpu.supports(x) else portable
    if _forced == "portable" or _cpu is None:
        return portable
    return _cpu


def bn_stats(x, *a, **k):
    return backend_for(x).bn_stats(x, *a, **k)


def bn_train_forward(x, *a, **k):
    return backend_for(x).bn_train_forward(x, *a, **k)


def bn_train_forward_update(x, weight, bias, eps, act, running_mean, running_var, momentum):
    """Training forward and the running statistics' update; the CPU backend does both in one call."""
    b = backend_for(x)
    if b is _cpu and not _cpu.supports_running(running_mean, running_var):
        b = portable
    return b.bn_train_forward_update(x, weight, bias, eps, act, running_mean, running_var, momentum)


def bn_train_forward_saved(x, weight, bias, eps, act, running_mean, running_var, momentum):
    """The training forward of an autograd node: ``(y, saved, nonfinite)``; ``saved`` is the backend's own record
    of the statistics, for :func:`bn_backward_saved` only. Running statistics (unless None) are updated."""
    b = backend_for(x)
    if b is _cpu and running_mean is not None and not _cpu.supports_running(running_mean, running_var):
        b = portable
    return b.bn_train_forward_saved(x, weight, bias, eps, act, running_mean, running_var, momentum)


def bn_backward_saved(dy, x, weight, bias, saved, act, needs=(True, True, True)):
    """Backward of :func:`bn_train_forward_saved`, by the backend that made ``saved``."""
    b = _cpu if _cpu is not None and isinstance(saved, _cpu.Saved) else portable
    return b.bn_backward_saved(dy, x, weight, bias, saved, act, needs)


def bn_eval_forward(x, *a, **k):
    return backend_for(x).bn_eval_forward(x, *a, **k)


def bn_backward(dy, x, *a, **k):
    return backend_for(x).bn_backward(dy, x, *a, **k)


def gn_forward(x, *a, **k):
    return backend_for(x).gn_forward(x, *a, **k)


def gn_backward(dy, x, *a, **k):
    return backend_for(x).gn_backward(dy, x, *a, **k)


def running_update(running_mean, running_var, mean, invstd, eps, n, momentum):
    """Moving-average update of the running statistics in place; the mask of non-finite channels or None."""
    if _forced != "portable" and _cpu is not None and _cpu.supports_running(running_mean, running_var, mean, invstd):
        return _cpu.running_update(running_mean, running_var, mean, invstd, eps, n, momentum)
    return portable.running_update(running_mean, running_var, mean, invstd, eps, n, momentum)


def count_batch(counter):
    """``counter += 1`` in place (``num_batches_tracked``): through numba for a CPU counter in eager mode (a torch
    op costs several microseconds in a small layer's forward), else with torch."""
    if (_forced != "portable" and _cpu is not None and _cpu.supports_counter(counter)
            and not torch.compiler.is_compiling()):
        _cpu.count_batch(counter)
    else:
        counter.add_(1)


__all__ = ["ACTIVATIONS", "acc_dtype", "backend_for", "use_backend", "portable", "bn_stats", "bn_train_forward",
           "bn_train_forward_update", "bn_train_forward_saved", "bn_backward_saved", "bn_eval_forward", "bn_backward",
           "gn_forward", "gn_backward", "running_update", "count_batch"]
