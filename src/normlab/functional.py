"""Functional normalization with ``torch.nn.functional``'s signatures and closed-form backward passes.

``batch_norm``, ``layer_norm``, ``group_norm`` and ``instance_norm`` take the same arguments as their
``torch.nn.functional`` namesakes (``batch_norm`` adds a keyword-only ``act`` for a fused activation). Each is
a ``torch.autograd.Function`` whose backward is the analytic one from :mod:`normlab.kernels`, saving only the
input, the per-channel (or per-group) mean and inverse standard deviation, and the affine parameters.

Double backward: when the backward itself is differentiated (``create_graph=True``), it runs the same closed
form in differentiable torch ops, recomputing the statistics from the input so their dependence on it is seen.

torch.compile: under compilation the kernels are called through the custom operators of :mod:`normlab.ops`.

Tensor subclasses, as ``torch.nn.functional``: one with ``__torch_function__`` is handed the call (and gets its
type back from the default handling); one with ``__torch_dispatch__`` (DTensor, a wrapper of other tensors) holds
no values the kernels can read, and goes to torch.nn.functional itself.

Conventions (as ``torch.nn``)
-----------------------------
* Training normalizes with the **biased** batch variance and stores the **unbiased** one, ``var * n / (n-1)``,
  in ``running_var``: ``running = (1 - momentum) * running + momentum * batch_statistic``. ``momentum`` is the
  weight of the new batch (Keras, Flax, cs231n and d2l's from-scratch code call ``1 - momentum``
  "momentum": their 0.9 / 0.99 is our 0.1 / 0.01).
* Statistics accumulate in float32 at least; the output has the input's dtype and memory format: channels_last
  stays channels_last, and any other layout (permuted, strided) comes out contiguous, as torch.nn's.
* Non-finite batch statistics never reach the running statistics: a channel whose batch mean or variance is
  NaN/Inf keeps its previous running values (and a ``RuntimeWarning`` is issued for CPU tensors in eager mode).
* An empty batch returns an empty output and leaves the running statistics untouched.
"""
from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import torch
from torch import Tensor
from torch.overrides import handle_torch_function, has_torch_function_variadic

from . import kernels as K
from . import ops
from .kernels import ACTIVATIONS, acc_dtype, portable

__all__ = ["batch_norm", "layer_norm", "group_norm", "instance_norm", "update_running_stats"]


class NormError(ValueError, RuntimeError):
    """A bad shape or missing argument: a ``ValueError``, and a ``RuntimeError`` as torch raises there."""


# ----------------------------------------------------------------------------------------------------------
# argument checks: state the invariant, show the value, give the fix
# ----------------------------------------------------------------------------------------------------------
def _check_eps(eps: float) -> None:
    if not (eps > 0) or eps == math.inf:  # (not math.isinf: a symbolic float under torch.compile(dynamic=True))
        raise ValueError(f"eps must be a positive finite number (it keeps 1/sqrt(var + eps) finite for a "
                         f"constant channel), got eps={eps}; the usual value is 1e-5")


def _check_act(act: str) -> None:
    if act not in ACTIVATIONS:
        raise ValueError(f"unknown activation act={act!r}; expected one of {', '.join(ACTIVATIONS)}")


def _channels_ok(input: Tensor, *vectors: Tensor | None) -> bool:
    """The common case of :func:`_check_channels`, without building its error messages."""
    if input.dim() < 2:
        return False
    c = input.shape[1]
    for t in vectors:
        if t is not None and t.numel() != c:
            return False
    return True


def _check_channels(input: Tensor, **vectors: Tensor | None) -> None:
    if input.dim() < 2:
        raise NormError(f"expected an input of shape (N, C, *) with at least 2 dimensions, "
                             f"got shape {tuple(input.shape)}")
    c = input.shape[1]
    for name, t in vectors.items():
        if t is not None and t.numel() != c:
            raise NormError(f"{name} should contain {c} elements (one per channel of the input of shape "
                                 f"{tuple(input.shape)}), not {t.numel()}; check num_features")


def _as_torch(*tensors: Tensor | None) -> bool:
    """Whether to call torch.nn.functional itself: while a trace or an export records (the graph then holds
    torch.nn's operators: :func:`normlab.kernels.recording`), and for a tensor subclass that handles torch's
    operators (:func:`normlab.kernels.dispatched`: DTensor, wrappers), which then gets what torch.nn would have
    handed it (and the sharding rules DTensor has for torch's norms)."""
    return K.recording() or K.dispatched(*tensors)


def _kernels():
    """Custom operators while compiling (traceable), the kernels themselves in eager mode (no overhead)."""
    return _CompiledKernels if torch.compiler.is_compiling() else K


class _CompiledKernels:
    """``normlab.ops`` behind the kernels' signatures (``needs`` tuple in, ``None`` for unneeded grads)."""

    bn_train_forward = staticmethod(ops.bn_train_forward)
    bn_eval_forward = staticmethod(ops.bn_eval_forward)
    gn_forward = staticmethod(ops.gn_forward)

    @staticmethod
    def bn_backward(dy, x, weight, bias, mean, invstd, act, training, needs):
        out = ops.bn_backward(dy, x, weight, bias, mean, invstd, act, training, *needs)
        return tuple(t if need else None for t, need in zip(out, needs))

    @staticmethod
    def gn_backward(dy, x, weight, mean, invstd, groups, needs):
        out = ops.gn_backward(dy, x, weight, mean, invstd, groups, *needs)
        return tuple(t if need else None for t, need in zip(out, needs))


def _like(t: Tensor | None, ref: Tensor | None) -> Tensor | None:
    if t is None or ref is None:
        return None
    return t if t.dtype is ref.dtype else t.to(ref.dtype)


class _Unconnected(torch.autograd.Function):
    """The first ``n`` tensors as they are (aliases), linked to the rest, which get no gradient back."""

    @staticmethod
    def forward(ctx, n, *tensors):
        ctx.inputs = len(tensors)
        return tuple(t.detach() for t in tensors[:n])

    @staticmethod
    def backward(ctx, *_grads):
        return (None,) * (1 + ctx.inputs)


def _connected(grads: tuple, inputs: tuple) -> tuple:
    """The double backward's gradients as torch's double-backward nodes give them: each requires grad when one of
    ``inputs`` (dy, x, weight, bias; None where absent) does, even one that depends on none of them (evaluation's
    dx = dy * invstd * weight for a constant dy, the bias's sum of dy), so that differentiated again it gives None
    (``allow_unused``) where an error would say it does not require grad."""
    if not torch.is_grad_enabled():  # no graph asked for (a vmap over a first backward)
        return grads
    loose = [i for i, g in enumerate(grads) if g is not None and not g.requires_grad]
    linked = [t for t in inputs if t is not None and t.requires_grad]
    if not loose or not linked:
        return grads
    tied = _Unconnected.apply(len(loose), *(grads[i] for i in loose), *linked)
    out = list(grads)
    for i, t in zip(loose, tied):
        out[i] = t
    return tuple(out)


def _backward_in_ops(dy: Tensor) -> bool:
    """Whether a backward computes in differentiable torch ops rather than the kernels: double backward (grad
    mode), a torch.func transform or trace, or a vmap over the backward (a vectorized jacobian, gradcheck's
    batched gradients: dy wraps another tensor, which the kernels cannot read)."""
    return torch.is_grad_enabled() or K.transformed() or K.wrapped(dy)


# ----------------------------------------------------------------------------------------------------------
# batch norm
# ----------------------------------------------------------------------------------------------------------
class _BatchNormFunction(torch.autograd.Function):
    """y = act((x - mean) * invstd * weight + bias), statistics from the batch (training) or given (eval).

    Eager: returns y alone; in training the kernel call also updates the running statistics when given (with
    weight ``momentum`` on the batch), and the statistics stay in the backend's own record (``ctx.saved``), not
    tensors. Compiled: the custom operators, and ``(y, mean, invstd)`` so the caller updates the running
    statistics with traceable ops."""

    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, training, eps, act, momentum):
        ctx.training, ctx.eps, ctx.act = training, eps, act
        ctx.set_materialize_grads(False)  # no zero tensors for the statistics' (absent) gradients
        keep_bias = bias if act != "identity" else None  # the activation's input needs it
        compiling = torch.compiler.is_compiling()
        if not training:
            acc = acc_dtype(x.dtype)
            stats = running_mean.to(acc), torch.rsqrt(running_var.to(acc) + eps)
            y = _kernels().bn_eval_forward(x, running_mean, running_var, weight, bias, eps, act)
        elif compiling:
            y, *stats = ops.bn_train_forward(x, weight, bias, eps, act)
        else:
            y, ctx.saved, nonfinite = K.bn_train_forward_saved(x, weight, bias, eps, act, running_mean, running_var,
                                                               momentum)
            _warn_nonfinite(nonfinite)
            ctx.save_for_backward(x, weight, keep_bias)
            return y
        ctx.saved = None
        ctx.save_for_backward(x, weight, keep_bias, *stats)
        if not compiling:
            return y
        ctx.mark_non_differentiable(*stats)
        return y, *stats

    @staticmethod
    def backward(ctx, dy, *_stat_grads):
        if dy is None:
            return None, None, None, None, None, None, None, None, None
        x, weight, bias, *stats = ctx.saved_tensors
        needs = ctx.needs_input_grad[:3]
        if _backward_in_ops(dy):  # the closed form in torch ops, statistics from x
            if ctx.training:
                m, v = portable.bn_stats(x)
                stats = m, torch.rsqrt(v + ctx.eps)
            dx, dw, db = _connected(portable.bn_backward(dy, x, weight, bias, *stats, ctx.act, ctx.training, needs),
                                    (dy, x, weight, bias))
        elif ctx.saved is not None:
            dx, dw, db = K.bn_backward_saved(dy, x, weight, bias, ctx.saved, ctx.act, needs)
        else:
            dx, dw, db = _kernels().bn_backward(dy, x, weight, bias, *stats, ctx.act, ctx.training, needs)
        return dx, _like(dw, weight), _like(db, weight), None, None, None, None, None, None


def batch_norm(input: Tensor, running_mean: Tensor | None, running_var: Tensor | None,
               weight: Tensor | None = None, bias: Tensor | None = None, training: bool = False,
               momentum: float = 0.1, eps: float = 1e-5, *, act: str = "identity") -> Tensor:
    r"""Batch normalization over the channel dimension 1 of ``input`` (N, C, \*), fused with ``act``.

    .. math::
        y = \mathrm{act}\Big(\frac{x - \mathrm{E}[x]}{\sqrt{\mathrm{Var}[x] + \epsilon}}\,\gamma + \beta\Big)

    with per-channel statistics over N and all trailing dimensions (Ioffe & Szegedy, 2015). In training the
    statistics are the batch's (biased variance), and ``running_mean`` / ``running_var`` (when given) are
    updated in place with weight ``momentum`` on the new batch and the unbiased variance. In evaluation the
    running statistics are used and left unchanged.

    Example::

        >>> x = torch.randn(8, 3, 5, 5)
        >>> rm, rv = torch.zeros(3), torch.ones(3)
        >>> y = batch_norm(x, rm, rv, training=True)   # rm, rv now moved 10% toward the batch's
    """
    if has_torch_function_variadic(input, running_mean, running_var, weight, bias):
        return handle_torch_function(batch_norm, (input, running_mean, running_var, weight, bias), input,
                                     running_mean, running_var, weight, bias, training, momentum, eps, act=act)
    y = _native_batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps, act)
    if y is not None:
        return y
    return _batch_norm_glue(input, running_mean, running_var, weight, bias, training, momentum, eps, act)


def _native_batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps, act, counter=None):
    """Eager CPU inputs the native glue takes (:func:`normlab.kernels.native.bn_below_bytes`): checks,
    loops, running statistics (and ``counter``, a module's batch count: see :func:`normlab.kernels._bn_native`) and
    the autograd node in one C++ call. None where the native glue is not in use, while compiling, or where it
    declines, having done nothing: anything :func:`_batch_norm_glue`'s checks reject, or that it does not take."""
    native = K.native_batch_norm
    if native is None or torch.compiler.is_compiling() or K.transformed():
        return None
    y, nonfinite = native(input, weight, bias, running_mean, running_var, training, momentum, eps, act, counter)
    if nonfinite:
        _warn_nonfinite(K.nonfinite_channels(input))
    return y


def _batch_norm_glue(input, running_mean, running_var, weight, bias, training, momentum, eps, act):
    """:func:`batch_norm` through the Python glue: the checks, then the backend's kernels (or custom operators
    when compiling)."""
    if not (eps > 0.0 and eps != math.inf):
        _check_eps(eps)
    if act not in ACTIVATIONS:
        _check_act(act)
    if not _channels_ok(input, running_mean, running_var, weight, bias):
        _check_channels(input, running_mean=running_mean, running_var=running_var, weight=weight, bias=bias)
    if not training and (running_mean is None or running_var is None):
        raise NormError("batch_norm in evaluation mode (training=False) needs running_mean and running_var; "
                         "pass them, or training=True to normalize with the batch's statistics")
    n = input.numel() // input.shape[1] if input.shape[1] else 0
    if input.numel() == 0:
        return _empty_output(input, weight, bias)
    if training and n == 1:
        raise ValueError(f"Expected more than 1 value per channel when training, got input size "
                         f"{input.size()}: the batch variance of a single value is 0; use a larger batch, "
                         f"eval mode, or a per-sample norm (GroupNorm, LayerNorm)")
    update = training and running_mean is not None and running_var is not None
    if update and momentum is None:
        raise TypeError("batch_norm's momentum must be a number (the new batch's weight in the running statistics), "
                        "got None; the cumulative average is a module's option: BatchNorm2d(C, momentum=None) "
                        "weighs each batch 1 / num_batches_tracked")
    if _as_torch(input, weight, bias, running_mean, running_var):
        return portable.activate(torch.nn.functional.batch_norm(input, running_mean, running_var, weight, bias,
                                                                training, momentum, eps), act)
    if K.transformed():
        return _batch_norm_ops(input, running_mean, running_var, weight, bias, training, momentum, eps, act)
    # eager: the kernel call updates the running statistics too; compiled: a traceable update follows
    compiling = torch.compiler.is_compiling()
    fused_update = update and not compiling
    if torch.is_grad_enabled() and (input.requires_grad or (weight is not None and weight.requires_grad)
                                    or (bias is not None and bias.requires_grad)):
        out = _BatchNormFunction.apply(input, weight, bias, running_mean, running_var, bool(training), float(eps),
                                       act, float(momentum) if fused_update else 0.0)
        if not compiling:
            return out
        y, mean, invstd = out
    elif fused_update:  # nothing to differentiate: the kernels alone, no autograd node
        y, _, _, nonfinite = K.bn_train_forward_update(input, weight, bias, float(eps), act, running_mean,
                                                       running_var, float(momentum))
        _warn_nonfinite(nonfinite)
        return y
    elif training:
        y, mean, invstd = _kernels().bn_train_forward(input, weight, bias, float(eps), act)
    else:
        return _kernels().bn_eval_forward(input, running_mean, running_var, weight, bias, float(eps), act)
    if update and not fused_update:
        update_running_stats(running_mean, running_var, mean, invstd, eps, n, momentum)
    return y


def _batch_norm_ops(input, running_mean, running_var, weight, bias, training, momentum, eps, act):
    """:func:`batch_norm` under a torch.func transform (grad, vmap, jvp, jacrev, ...): the portable formulas as
    plain torch ops, differentiated (and batched) by the transform itself; the running statistics are updated
    with torch ops, which a transform refuses where it refuses torch.nn's own (a captured buffer mutated under
    grad, say)."""
    if not training:
        return portable.bn_eval_forward(input, running_mean, running_var, weight, bias, eps, act)
    y, mean, invstd = portable.bn_train_forward(input, weight, bias, eps, act)
    if running_mean is not None and running_var is not None:
        update_running_stats(running_mean, running_var, mean, invstd, eps, input.numel() // input.shape[1],
                             momentum)
    return y


def _empty_output(input: Tensor, weight: Tensor | None, bias: Tensor | None) -> Tensor:
    """An empty batch: an empty output that still depends on the parameters (their gradients are zeros)."""
    shape = [1, input.shape[1]] + [1] * (input.dim() - 2) if input.dim() >= 2 else [-1]
    y = input * weight.reshape(shape) if weight is not None and input.dim() >= 2 else input.clone()
    return y + bias.reshape(shape) if bias is not None and input.dim() >= 2 else y


def update_running_stats(running_mean: Tensor, running_var: Tensor, mean: Tensor, invstd: Tensor, eps: float,
                         n: int, momentum: float) -> None:
    """``running = (1 - momentum) * running + momentum * batch`` with the unbiased variance ``var * n/(n-1)``.

    ``var`` is recovered as ``invstd**-2 - eps`` in float64. Channels whose batch statistics are not finite
    keep their running values (no host synchronization is needed for that; the warning is eager-CPU only).
    """
    if torch.compiler.is_compiling() or K.transformed() or K.dispatched(mean, running_mean, running_var):
        with torch.no_grad():  # detached too: forward-mode AD would give the buffers the statistics' tangents
            K.portable.running_update(running_mean, running_var, mean.detach(), invstd.detach(), eps, n, momentum)
        return
    # eager: the statistics carry no autograd history (non-differentiable outputs), so no no_grad block is needed
    if mean.requires_grad or invstd.requires_grad:
        mean, invstd = mean.detach(), invstd.detach()
    _warn_nonfinite(K.running_update(running_mean, running_var, mean, invstd, eps, n, momentum))


def _warn_nonfinite(nonfinite: Tensor | None) -> None:
    """Warn (CPU tensors only: no device synchronization) about the channels :func:`running_update` skipped."""
    if nonfinite is not None and nonfinite.is_cpu and bool(nonfinite.any()):
        channels = nonfinite.nonzero().flatten().tolist()
        warnings.warn(f"batch statistics are not finite in channel(s) {channels[:10]}; their running statistics "
                      f"were left unchanged (check the input and the learning rate)", RuntimeWarning, stacklevel=4)


# ----------------------------------------------------------------------------------------------------------
# group norm: the one per-sample primitive (layer norm and instance norm reduce to it)
# ----------------------------------------------------------------------------------------------------------
class _GroupNormFunction(torch.autograd.Function):
    """x (N, C, S) contiguous; statistics per (sample, group) over (C/G) * S; affine per channel."""

    @staticmethod
    def forward(ctx, x, weight, bias, groups, eps):
        y, mean, invstd = _kernels().gn_forward(x, weight, bias, groups, eps)
        ctx.save_for_backward(x, weight, mean, invstd)
        ctx.groups, ctx.eps = groups, eps
        ctx.mark_non_differentiable(mean, invstd)
        ctx.set_materialize_grads(False)
        return y, mean, invstd

    @staticmethod
    def backward(ctx, dy, _dmean, _dinvstd):
        if dy is None:
            return None, None, None, None, None
        x, weight, mean, invstd = ctx.saved_tensors
        needs = tuple(ctx.needs_input_grad[:3])
        dy = dy.contiguous()
        if _backward_in_ops(dy):  # statistics recomputed from x
            n, c, _ = x.shape
            var, mean = torch.var_mean(x.to(acc_dtype(x.dtype)).reshape(n, ctx.groups, -1), dim=2, correction=0)
            invstd = torch.rsqrt(var + ctx.eps)
            dx, dw, db = _connected(portable.gn_backward(dy, x, weight, mean, invstd, ctx.groups, needs),
                                    (dy, x, weight))
        else:
            dx, dw, db = _kernels().gn_backward(dy, x, weight, mean, invstd, ctx.groups, needs)
        return dx, _like(dw, weight), _like(db, weight), None, None


class _GradInFormat(torch.autograd.Function):
    """The identity, whose backward lays the gradient out in ``fmt``: group norm's kernels take a contiguous copy
    of a channels_last input, and torch's group norm hands back a channels_last input's gradient channels_last."""

    @staticmethod
    def forward(ctx, x, fmt):
        ctx.fmt = fmt
        return x.view_as(x)

    @staticmethod
    def backward(ctx, dx):
        return dx.contiguous(memory_format=ctx.fmt), None


def _group_norm_native(input: Tensor, weight, bias, groups: int, eps: float, layer_shape: tuple[int, ...] = ()):
    """``(y, mean, invstd)`` of :func:`_group_norm_any` through the native glue (small CPU inputs: checks, loops
    and autograd node in one C++ call), or None where it declines the call, bad arguments included."""
    native = K.native_group_norm
    if native is None or torch.compiler.is_compiling() or K.transformed():
        return None
    return native(input, weight, bias, groups, eps, layer_shape)


def _group_norm_any(input: Tensor, weight, bias, groups: int, eps: float, layer_k: int = 0):
    """``(y, mean, invstd)`` of group norm over (N, C, *), statistics (N, G); or, with ``layer_k``, of layer norm
    over the last ``layer_k`` values (weight and bias of that many values), statistics (M, 1). y has the input's
    shape (and is contiguous). The arguments are checked; the native glue has been tried where it could take the
    call (group and layer norm), so this is the Python glue."""
    if layer_k:
        x3 = input.reshape(-1, layer_k, 1)
        # (layer_k,) already for a 1-D normalized_shape: no reshape (1.5 us each, a call on a GPU waits on the host)
        weight = weight if weight is None or weight.dim() == 1 else weight.reshape(layer_k)
        bias = bias if bias is None or bias.dim() == 1 else bias.reshape(layer_k)
    else:
        x3 = input.reshape(input.shape[0], input.shape[1], -1)
    if K.transformed():  # torch.func: plain torch ops, which the transform differentiates itself
        y, mean, invstd = portable.gn_forward(x3, weight, bias, groups, float(eps))
    else:
        y, mean, invstd = _GroupNormFunction.apply(x3.contiguous(), weight, bias, groups, float(eps))
    return y.reshape(input.shape), mean, invstd


def group_norm(input: Tensor, num_groups: int, weight: Tensor | None = None, bias: Tensor | None = None,
               eps: float = 1e-5) -> Tensor:
    r"""Group normalization (Wu & He, 2018): per sample, channels split into ``num_groups`` groups.

    .. math:: y_{n,c,\cdot} = \frac{x_{n,c,\cdot} - \mu_{n,g}}{\sqrt{\sigma^2_{n,g} + \epsilon}}\gamma_c + \beta_c,
        \quad g = \lfloor c / (C/G) \rfloor

    with the biased variance over the (C/G) * prod(\*) values of group g of sample n. G = 1 is layer norm over
    (C, \*) with per-channel affine; G = C is instance norm.
    """
    if has_torch_function_variadic(input, weight, bias):
        return handle_torch_function(group_norm, (input, weight, bias), input, num_groups, weight, bias, eps)
    out = _group_norm_native(input, weight, bias, num_groups, eps)
    if out is not None:
        return out[0]
    if not (eps > 0.0 and eps != math.inf):
        _check_eps(eps)
    if not _channels_ok(input, weight, bias):
        _check_channels(input, weight=weight, bias=bias)
    c = input.shape[1]
    if num_groups <= 0 or c % num_groups != 0:
        raise NormError(f"the number of channels C={c} must be divisible by num_groups={num_groups} "
                             f"(input of shape {tuple(input.shape)}); choose G among the divisors of {c}")
    if input.numel() == num_groups:  # N * (C / G) * prod(*) == 1, which torch.nn.functional.group_norm rejects
        raise ValueError(f"Expected more than 1 value per channel when training, got input size {input.size()} "
                         f"with num_groups={num_groups}: each group of a batch of one sample holds a single value "
                         f"(its normalized value is 0); use fewer groups or a larger batch")
    if input.numel() == 0:
        return _empty_output(input, weight, bias)
    if _as_torch(input, weight, bias):
        return torch.nn.functional.group_norm(input, num_groups, weight, bias, eps)
    if input.requires_grad and not input.is_contiguous() and torch.is_grad_enabled() and not K.transformed():
        fmt = portable.output_format(input)
        if fmt is not torch.contiguous_format:  # channels_last: the input gradient too, as torch's
            input = _GradInFormat.apply(input, fmt)
    y, _, _ = _group_norm_any(input, weight, bias, num_groups, eps)
    return _restore_format(y, input)


def _restore_format(y: Tensor, like: Tensor) -> Tensor:
    return y.contiguous(memory_format=portable.output_format(like))


def layer_norm(input: Tensor, normalized_shape: Sequence[int] | int, weight: Tensor | None = None,
               bias: Tensor | None = None, eps: float = 1e-5) -> Tensor:
    r"""Layer normalization (Ba, Kiros & Hinton, 2016) over the trailing ``normalized_shape`` dimensions.

    .. math:: y = \frac{x - \mathrm{E}[x]}{\sqrt{\mathrm{Var}[x] + \epsilon}} \odot \gamma + \beta

    with statistics per leading index over the K = prod(normalized_shape) trailing values and elementwise
    γ, β of shape ``normalized_shape``. Computed as group norm with one group on (M, K, 1).
    """
    if has_torch_function_variadic(input, weight, bias):
        return handle_torch_function(layer_norm, (input, weight, bias), input, normalized_shape, weight, bias, eps)
    shape = (normalized_shape,) if isinstance(normalized_shape, int) else tuple(normalized_shape)
    out = _group_norm_native(input, weight, bias, 1, eps, shape) if shape else None
    if out is not None:
        return out[0]
    if not (eps > 0.0 and eps != math.inf):
        _check_eps(eps)
    k = len(shape)
    if k == 0 or input.dim() < k or input.shape[input.dim() - k:] != shape:
        raise NormError(f"Given normalized_shape={list(shape)}, expected input with shape "
                             f"[*, {', '.join(map(str, shape))}], but got input of size {list(input.shape)}")
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and t.shape != shape:
            raise NormError(f"{name} must have shape normalized_shape={list(shape)}, got {list(t.shape)}")
    numel = math.prod(shape)
    if input.numel() == 0 or numel == 0:
        return input.clone() if weight is None else input * weight + (0 if bias is None else bias)
    if _as_torch(input, weight, bias):
        return torch.nn.functional.layer_norm(input, shape, weight, bias, eps)
    return _group_norm_any(input, weight, bias, 1, eps, numel)[0]


def instance_norm(input: Tensor, running_mean: Tensor | None = None, running_var: Tensor | None = None,
                  weight: Tensor | None = None, bias: Tensor | None = None, use_input_stats: bool = True,
                  momentum: float = 0.1, eps: float = 1e-5) -> Tensor:
    r"""Instance normalization (Ulyanov et al., 2016): per sample and channel, over the spatial dimensions.

    Group norm with G = C. With ``use_input_stats`` and running statistics given, they are updated with the
    mean over the batch of the per-instance mean and unbiased variance (as ``torch.nn.functional``); without
    ``use_input_stats`` the running statistics normalize, as batch norm in evaluation mode.
    """
    if has_torch_function_variadic(input, running_mean, running_var, weight, bias):
        return handle_torch_function(instance_norm, (input, running_mean, running_var, weight, bias), input,
                                     running_mean, running_var, weight, bias, use_input_stats, momentum, eps)
    _check_eps(eps)
    _check_channels(input, running_mean=running_mean, running_var=running_var, weight=weight, bias=bias)
    as_torch = _as_torch(input, running_mean, running_var, weight, bias)
    if not use_input_stats and not as_torch:  # a contiguous input, output and input gradient, as torch's
        return batch_norm(input.contiguous(), running_mean, running_var, weight, bias, False, momentum, eps)
    n, c = input.shape[:2]
    s = input.numel() // (n * c) if n * c else 0
    if input.numel() == 0:
        return _empty_output(input, weight, bias)
    if s <= 1 and use_input_stats:
        raise ValueError(f"Expected more than 1 spatial element when training, got input size {input.size()}: "
                         f"instance norm of a single value is 0; use a larger input or BatchNorm")
    if as_torch:
        return torch.nn.functional.instance_norm(input, running_mean, running_var, weight, bias, use_input_stats,
                                                 momentum, eps)
    out = _group_norm_native(input, weight, bias, c, eps)
    y, mean, invstd = out if out is not None else _group_norm_any(input, weight, bias, c, eps)
    if running_mean is not None and running_var is not None:
        with torch.no_grad():
            var = (invstd.to(torch.float64).pow(-2) - eps).clamp_min(0)
            update_running_stats(running_mean, running_var, mean.mean(0),
                                 (var.mean(0) + eps).rsqrt(), eps, s, momentum)
    return y  # contiguous, as torch's (which normalizes a contiguous copy of the input)
