"""Kernels: pure functions on tensors that compute statistics, normalize and backpropagate.

``portable`` (torch ops, any device) defines the contract; ``cpu`` (numba) implements it for CPU tensors.
Every public function here dispatches on the input: the fast CPU backend where it supports the tensor, the
portable one otherwise. Batch, group, layer and instance norm on CPU inputs first try the native
glue (:mod:`.native`: the same numba loops, called from C++), where it is built.
Batch, group, layer and instance norm on CUDA tensors take the Triton kernels (:mod:`.gpu_triton`,
:mod:`.gpu_triton_gn`) where triton imports (``pip install 'normlab[gpu]'``) on NVIDIA GPUs of compute capability
7.0 and later (measured on an H200: BENCHMARKS.md), else the portable ones.
``NORMLAB_BACKEND=portable|cpu|native|triton`` (or :func:`use_backend`) forces a backend, for tests and
benchmarks.
"""
from __future__ import annotations

import contextlib
import os

import torch
from torch import Tensor
from torch.autograd import forward_ad as _forward_ad

from . import portable
from .portable import ACTIVATIONS, acc_dtype

try:  # the fast CPU backend is optional: without numba everything still works, more slowly
    from . import cpu as _cpu
except ImportError:  # pragma: no cover - exercised only where numba is missing
    _cpu = None

from . import native as _native_build  # noqa: E402

BACKENDS = (None, "portable", "cpu", "native", "triton")
_forced: str | None = os.environ.get("NORMLAB_BACKEND") or None
if _forced not in BACKENDS:
    raise ValueError(f"NORMLAB_BACKEND={_forced!r} is not a backend; expected one of portable, cpu, native, triton")
_triton = None  # the Triton backend once loaded (see _load_triton)
_triton_missing = False  # triton failed to import once: CUDA tensors take the portable kernels
_triton_devices: dict = {}  # CUDA device index -> whether the automatic choice takes the Triton kernels there


def _triton_for(x: Tensor):
    """The Triton backend for the automatic choice on the CUDA tensor ``x``, or None: where triton does not import
    (then quietly, once), on ROCm builds and on NVIDIA GPUs older than compute capability 7.0 (where the kernels
    were neither measured nor are they sure to compile); ``use_backend("triton")`` forces them anywhere."""
    global _triton_missing
    index = x.device.index if x.device.index is not None else torch.cuda.current_device()
    ok = _triton_devices.get(index)
    if ok is None:
        ok = _triton_devices[index] = (torch.version.hip is None
                                       and torch.cuda.get_device_capability(index) >= (7, 0))
    if not ok:
        return None
    if _triton is None and not _triton_missing:
        try:
            _load_triton()
        except RuntimeError:
            _triton_missing = True
    return _triton


def _load_triton():
    """The Triton backend (imported on first use: importing triton costs time every CPU user would pay)."""
    global _triton
    if _triton is None:
        try:
            from . import gpu_triton
        except ImportError as err:
            raise RuntimeError(f"the triton backend needs triton ({err}); install it with "
                               "`pip install 'normlab[gpu]'` (or `pip install triton`)") from None
        _triton = gpu_triton
    return _triton


def _load_native(build_missing: bool = False):
    """The native module, configured with the CPU backend's sizes, or None (see :func:`.native.load`)."""
    module = _native_build.load(build_missing=build_missing)
    if module is not None:
        _native_build.configure(module, _cpu)
    return module


_native = _load_native() if _cpu is not None and _forced in (None, "native") else None
# the native glue's entries while it is in use (automatic choice or forced "native"), else None: the functional
# layer's test
native_batch_norm = native_group_norm = None


def _select_native() -> None:
    global native_batch_norm, native_group_norm
    on = _native is not None and _forced in (None, "native")
    native_batch_norm = _bn_native if on else None
    native_group_norm = _gn_native if on else None


@contextlib.contextmanager
def use_backend(name: str | None):
    """Force a backend inside the block: ``"portable"`` (torch ops), ``"cpu"`` (numba loops, Python glue, on the
    inputs they take: CPU tensors of their dtypes and layouts; others take portable), ``"native"`` (numba loops,
    C++ glue where it takes the input, built on demand; else as ``"cpu"``) or
    ``"triton"`` (the Triton kernels on the CUDA tensors they support; other inputs take the cpu backend
    where it supports them, else portable).
    ``None``: the automatic choice (native where built, then cpu, then portable; Triton for CUDA tensors where
    triton imports)."""
    global _forced, _native
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; expected 'portable', 'cpu', 'native', 'triton' or None")
    if name == "triton":
        _load_triton()
    if name == "native" and _native is None:
        if _cpu is None:
            raise RuntimeError("the native backend calls the numba loops; install numba")
        _native = _load_native(build_missing=True)
        if _native is None:
            raise RuntimeError("normlab's native glue is not available (see the warning above); "
                               "`normlab build-native --verbose` shows the compiler's output")
    previous, _forced = _forced, name
    _select_native()
    try:
        yield
    finally:
        _forced = previous
        _select_native()


def _bn_native(x, weight, bias, running_mean, running_var, training, momentum, eps, act, counter=None):
    """Batch norm through the native glue: ``(y, nonfinite)`` (how many channels kept their running statistics),
    or ``(None, 0)`` where it does not take the call, bad arguments included (the caller goes on with the Python
    glue and its checks). In training the running statistics are updated only when both are given, and
    ``counter`` (a module's ``num_batches_tracked``), when given, is counted as the call is taken; momentum None
    (with a counter): the weight of the batch is 1 / count."""
    code = _cpu._ACT_CODE.get(act)
    cumulative = momentum is None
    if code is None or (cumulative and counter is None):
        return None, 0
    if training and (running_mean is None or running_var is None):
        running_mean = running_var = None
    try:
        y, status = _native.batch_norm(x, weight, bias, running_mean, running_var, bool(training),
                                       0.0 if cumulative else float(momentum), float(eps), code, counter, cumulative)
    except TypeError:  # arguments of other types
        return None, 0
    if status >= 0:
        return y, status
    if status == _native.NO_LOOPS:
        _native_build.set_loops(_native, x.dtype)
        return _bn_native(x, weight, bias, running_mean, running_var, training, momentum, eps, act, counter)
    return None, 0


def _gn_native(x, weight, bias, groups, eps, layer_shape=()):
    """Group norm of a contiguous (N, C, *) input through the native glue, or layer norm over its trailing
    ``layer_shape`` (a tuple of ints): ``(y, mean, invstd)``, y shaped as x, statistics (N, G) or (M, 1); None
    where it does not take the call, bad arguments included (the caller's checks say what is wrong)."""
    try:
        y, mean, invstd, status = _native.group_norm(x, weight, bias, groups, float(eps), layer_shape)
    except TypeError:  # arguments of other types
        return None
    if status == 0:
        return y, mean, invstd
    if status == _native.NO_LOOPS:
        _native_build.set_loops(_native, x.dtype)
        return _gn_native(x, weight, bias, groups, eps, layer_shape)
    return None


_select_native()


def backend_for(x: Tensor):
    """The module implementing the kernel contract for ``x``."""
    if _forced == "triton" and _load_triton().supports(x):
        return _triton
    if _forced is None and x.is_cuda and _triton_for(x) is not None and _triton.supports(x):
        return _triton
    if _forced in (None, "triton"):
        return _cpu if _cpu is not None and _cpu.supports(x) else portable
    if _forced == "portable" or _cpu is None:
        return portable
    return _cpu if _cpu.supports(x) else portable  # forced "cpu" / "native": the loops on what they take


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
    """Backward of :func:`bn_train_forward_saved`, by the backend that made ``saved`` (the CPU backend's own
    record, or the (mean, invstd) pair that the portable and Triton backends keep)."""
    if _cpu is not None and isinstance(saved, _cpu.Saved):
        b = _cpu
    else:
        b = backend_for(x)
        if b is _cpu:
            b = portable
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


def nonfinite_channels(x):
    """The channels of ``x`` (N, C, *) whose batch mean or variance is not finite (for the running statistics'
    warning, where a kernel only counted them)."""
    dims = [0, *range(2, x.dim())]
    var, mean = torch.var_mean(x.detach().to(acc_dtype(x.dtype)), dim=dims, correction=0)
    return ~(torch.isfinite(mean) & torch.isfinite(var))


_functorch_active = getattr(torch._C, "_are_functorch_transforms_active", lambda: False)
_tracing = torch.jit.is_tracing  # (torch.compile folds it to False; not torch._C._is_tracing, which it cannot trace)
_exporting = getattr(torch.compiler, "is_exporting", lambda: False)  # (torch >= 2.6)


def recording() -> bool:
    """Whether torch.jit.trace or torch.export is recording a graph. A trace records torch ops only (the kernels'
    results would be baked in as constants: the legacy ONNX exporter traces); an exported program runs where
    normlab is not (AOTInductor, ExecuTorch, ONNX). The layers then call torch.nn.functional, so the graph holds
    torch.nn's own operators (aten::batch_norm, ...), which exporters and backends know (ONNX's
    BatchNormalization, conv + batch norm folding)."""
    return _tracing() or _exporting()


def transformed() -> bool:
    """Whether a torch.func transform (grad, vmap, jvp, jacrev, ...), a forward-mode AD dual level, or a
    :func:`recording` is active. A transform hands functions tensors that wrap others, with no storage for the
    kernels to read, and sees through torch ops only; forward-mode AD needs a forward derivative, which torch ops
    have and the kernels' autograd nodes do not."""
    return _functorch_active() or _forward_ad._current_level >= 0 or _tracing() or _exporting()  # (recording())


_has_storage = getattr(torch._C, "_has_storage", lambda t: True)


_PLAIN_DISPATCH = Tensor.__torch_dispatch__


def dispatched(*tensors: Tensor | None) -> bool:
    """Whether one of ``tensors`` is a tensor subclass that handles torch's operators itself
    (``__torch_dispatch__``: DTensor, a wrapper of other tensors): its storage, where it has one, does not hold
    its values, so the kernels must not read it; torch ops dispatch to the subclass."""
    for t in tensors:
        if type(t) is not Tensor and t is not None and type(t).__torch_dispatch__ is not _PLAIN_DISPATCH:
            return True
    return False


def wrapped(t: Tensor) -> bool:
    """Whether ``t`` holds no values of its own for the kernels to read: it wraps another tensor without storage
    (a torch.func transform's, or a batched gradient where a vmap runs over a backward: ``jacobian(...,
    vectorize=True)``), or is a :func:`dispatched` subclass."""
    return not torch.compiler.is_compiling() and (not _has_storage(t) or dispatched(t))  # (compiling: fake tensors)


def count_batch(counter):
    """``counter += 1`` in place (``num_batches_tracked``): through numba for a CPU counter in eager mode (a torch
    op costs several microseconds in a small layer's forward), else with torch (under a torch.func transform the
    transform sees it, as torch.nn's own count)."""
    if (_forced != "portable" and _cpu is not None and _cpu.supports_counter(counter)
            and not torch.compiler.is_compiling() and not transformed() and not dispatched(counter)):
        _cpu.count_batch(counter)
    else:
        counter.add_(1)


__all__ = ["ACTIVATIONS", "acc_dtype", "recording", "transformed", "dispatched", "wrapped", "backend_for",
           "use_backend", "native_batch_norm", "native_group_norm",
           "portable", "bn_stats", "bn_train_forward", "bn_train_forward_update", "bn_train_forward_saved",
           "bn_backward_saved", "bn_eval_forward", "bn_backward", "gn_forward", "gn_backward", "running_update",
           "nonfinite_channels", "count_batch"]
