r"""SyncBatchNorm: batch normalization whose statistics span every process of a ``torch.distributed`` group.

Data-parallel training splits a batch of B samples over W processes; plain batch norm then normalizes each
process's B/W samples with their own statistics. :class:`SyncBatchNorm` computes the statistics of the whole
B-sample batch instead, so a W-process step gives the same outputs, input gradients, summed parameter
gradients and running statistics as one process running :class:`~normlab.nn.BatchNorm2d` on the concatenated
batch (up to float rounding). Any rank >= 2 input (N, C, \*) is accepted; gloo on CPU, NCCL on GPU.

Forward (training), per channel
-------------------------------
Each rank r computes its count n_r, mean m_r and sum of squared deviations M2_r (shifted by the rank's first
value, so 1e4 + N(0, 1) in float32 keeps its precision), and one ``all_gather`` exchanges the W triples
(packed as float64: 1 + 2C numbers per rank). They are combined with Chan, Golub & LeVeque's parallel formula

.. math::
    n = \sum_r n_r, \qquad \mu = \frac{1}{n}\sum_r n_r m_r, \qquad
    M_2 = \sum_r M_{2,r} + \sum_r n_r (m_r - \mu)^2, \qquad \sigma^2 = M_2 / n

which is exact for uneven counts, including ranks with 0 or 1 samples (a rank with n_r = 0 contributes nothing).
Every rank combines the same gathered numbers in the same order, so the global statistics, and hence the
running statistics (updated with mu and the unbiased M_2 / (n - 1)), are bitwise identical on all ranks.

Backward
--------
With xhat = (x - mu) / sqrt(sigma^2 + eps), g = dL/dz (z the pre-activation), one ``all_reduce`` sums the
per-channel pair (sum g, sum g * xhat) over ranks, and

.. math:: dx = \gamma\,\mathrm{invstd}\,\big(g - \tfrac{1}{n}\textstyle\sum_{all} g
              - \hat x \tfrac{1}{n}\sum_{all} g \hat x\big)

with the *global* n. The parameter gradients returned are the **local** sums (sum g * xhat, sum g), as in
``torch.nn.SyncBatchNorm``: DistributedDataParallel then all-reduces them like any other gradient, and the sum
over ranks equals the gradient of a single process on the concatenated batch (DDP's default averaging divides it
by W, exactly as it does for every other parameter when each rank's loss is a mean over its own samples).

Policy
------
* Evaluation mode issues **no** collective: the running statistics are used, exactly as ``BatchNorm``.
* Without an initialized process group, or with a group of one process, the layer *is* normlab BatchNorm (it
  delegates), so a model runs unchanged in a single process.
* A global batch of 1 value per channel in training raises ``ValueError`` (on every rank, since all see the same
  counts); a global batch of 0 returns empty outputs and leaves the running statistics untouched.
* A lost or stuck peer: every collective waits at most ``timeout`` (the constructor's keyword-only argument; by
  default the process group's own timeout, set with ``init_process_group(timeout=...)``), then raises a
  ``RuntimeError`` that names the layer, the collective and the world size instead of hanging.
* Every rank must call forward (and backward) the same number of times, even with 0 local samples.
* Double backward (``create_graph=True`` through this layer) is not supported, as in ``torch.nn.SyncBatchNorm``.

Example::

    model = SyncBatchNorm.convert_sync_batchnorm(model)          # torch.nn or normlab BatchNorm*d -> Sync
    model = torch.nn.parallel.DistributedDataParallel(model)
    ...
    single = SyncBatchNorm.revert_sync_batchnorm(model.module)   # back to BatchNorm{1,2,3}d for export
"""
from __future__ import annotations

import datetime

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .. import kernels as K
from .. import functional as F
from ..kernels import ACTIVATIONS, acc_dtype
from ._overrides import has_torch_function_unary, overridden
from .batchnorm import BatchNorm1d, BatchNorm2d, BatchNorm3d, _BatchNorm

__all__ = ["SyncBatchNorm", "sync_batch_norm", "global_batch_stats"]


# ----------------------------------------------------------------------------------------------------------
# collectives with a deadline and an error that says what happened
# ----------------------------------------------------------------------------------------------------------
def _run_collective(what: str, launch, group, timeout: datetime.timedelta | None) -> None:
    """Start ``launch(async_op=True)`` and wait, turning a lost peer into a clear ``RuntimeError``."""
    try:
        work = launch(async_op=True)
        if timeout is None:
            work.wait()
        else:
            work.wait(timeout=timeout)
    except RuntimeError as err:  # gloo/NCCL timeouts and closed connections are RuntimeErrors
        world = dist.get_world_size(group)
        rank = dist.get_rank(group)
        limit = "the process group's timeout" if timeout is None else f"{timeout.total_seconds():g} s"
        raise RuntimeError(
            f"SyncBatchNorm: the {what} across {world} processes failed on rank {rank} ({err}). A peer probably "
            f"exited, crashed or stopped calling this layer (every rank must run the same forward/backward "
            f"passes, even with 0 local samples); waited at most {limit}. Set a shorter deadline with "
            f"SyncBatchNorm(..., timeout=datetime.timedelta(seconds=...)) or init_process_group(timeout=...)."
        ) from err


def _sync_active(group) -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1


# ----------------------------------------------------------------------------------------------------------
# statistics
# ----------------------------------------------------------------------------------------------------------
def _bshape(x: Tensor) -> list[int]:
    return [1, x.shape[1]] + [1] * (x.dim() - 2)


def _local_moments(x: Tensor) -> tuple[int, Tensor, Tensor, Tensor]:
    """``(n, shift, mean - shift, M2)`` per channel of x (N, C, *) in acc dtype; shift = first value."""
    c = x.shape[1]
    n = x.numel() // c if c else 0
    acc = acc_dtype(x.dtype)
    if n == 0:
        z = torch.zeros(c, dtype=acc, device=x.device)
        return 0, z, z, z
    xa = x.detach().to(acc)
    shift = xa.select(0, 0).reshape(c, -1)[:, 0].clone()
    # one subtraction pass, then the (fast, dispatched) statistics kernel on data centred near 0
    mean_s, var = K.bn_stats(xa - shift.reshape(_bshape(x)))
    return n, shift, mean_s, var.clamp_min(0) * n


def global_batch_stats(x: Tensor, group=None, timeout: datetime.timedelta | None = None
                       ) -> tuple[int, Tensor, Tensor, Tensor, Tensor]:
    """Per-channel statistics of the union of every rank's ``x`` (one ``all_gather``).

    Returns ``(n, mu, shift, residual, var)``: the global count (a Python int), the global mean ``mu`` in
    float64 and the biased global variance ``var`` in acc dtype (these three bitwise identical on all ranks),
    this rank's shift (its first value per channel) and ``residual = mu - shift`` in acc dtype. Keeping shift
    and residual apart lets the normalization subtract a float32-exact shift first and a small residual
    second. The combination (Chan et al.) runs in float64.
    """
    c = x.shape[1]
    n_local, shift, mean_s, m2 = _local_moments(x)
    mean64 = shift.to(torch.float64) + mean_s.to(torch.float64)
    packed = torch.cat([torch.full((1,), float(n_local), dtype=torch.float64, device=x.device),
                        mean64, m2.to(torch.float64)])
    world = dist.get_world_size(group)
    gathered = [torch.empty_like(packed) for _ in range(world)]
    _run_collective("all_gather of per-channel (count, mean, M2)",
                    lambda async_op: dist.all_gather(gathered, packed, group=group, async_op=async_op),
                    group, timeout)
    table = torch.stack(gathered)                    # (W, 1 + 2C), identical on every rank
    counts, means, m2s = table[:, :1], table[:, 1:1 + c], table[:, 1 + c:]
    n = int(round(float(counts.sum())))
    acc = acc_dtype(x.dtype)
    if n == 0:
        z = torch.zeros(c, dtype=acc, device=x.device)
        return 0, z.to(torch.float64), z, z, z
    mu = (counts * means).sum(0) / n               # empty ranks have mean 0 and weight 0
    m2 = m2s.sum(0) + (counts * (means - mu) ** 2).sum(0)
    var = (m2 / n).clamp_min(0)
    residual = mu - shift.to(torch.float64)
    return n, mu, shift, residual.to(acc), var.to(acc)


# ----------------------------------------------------------------------------------------------------------
# autograd: normalize with the global statistics, closed-form backward with one all_reduce
# ----------------------------------------------------------------------------------------------------------
class _SyncBatchNormFunction(torch.autograd.Function):

    @staticmethod
    def forward(ctx, x, weight, bias, shift, residual, invstd, var, n, eps, act, group, timeout):
        # y = act(((x - shift) - residual) * invstd * w + b), written as the kernel's eval forward with
        # mean = shift and the residual folded into the bias: b' = b - residual * invstd * w (exact algebra,
        # and the large shift is subtracted from x before anything is rounded).
        acc = acc_dtype(x.dtype)
        scale = invstd if weight is None else invstd * weight.detach().to(acc)
        folded = -residual * scale if bias is None else bias.detach().to(acc) - residual * scale
        if x.numel() == 0:
            y = x.clone()
        else:
            y = K.bn_eval_forward(x, shift, var, weight, folded, eps, act)
        ctx.save_for_backward(x, weight, bias if act != "identity" else None, shift, residual, invstd)
        ctx.n, ctx.act, ctx.group, ctx.timeout = n, act, group, timeout
        return y

    @staticmethod
    def backward(ctx, dy):
        # The local per-channel sums come from the kernel's *evaluation* backward, run with mean = shift and the
        # folded bias b' (so z, hence g = dL/dz, is exact):
        #   dx_eval = w * invstd * g,  db = sum g,  dw' = sum g * xhat'  with xhat' = (x - shift) * invstd
        # and xhat = xhat' - residual * invstd gives dw = dw' - residual * invstd * db. After the all_reduce,
        #   dx = dx_eval - w * invstd * (sum_all g / n + xhat * sum_all g xhat / n)
        #      = dx_eval - ((x - shift) * A + B),  A = w invstd^2 sum_all(g xhat) / n,
        #                                          B = w invstd (sum_all g - residual invstd sum_all(g xhat)) / n
        x, weight, bias, shift, residual, invstd = ctx.saved_tensors
        acc = acc_dtype(x.dtype)
        b = _bshape(x)
        c = x.shape[1]
        w = None if weight is None else weight.detach().to(acc)
        scale = invstd if w is None else invstd * w
        if x.numel() == 0:
            dx_eval = None
            sum_g = torch.zeros(c, dtype=acc, device=x.device)
            sum_gx = torch.zeros(c, dtype=acc, device=x.device)
        else:
            folded = -residual * scale if bias is None else bias.detach().to(acc) - residual * scale
            dy = dy if dy.stride() == x.stride() else torch.empty_like(x, dtype=dy.dtype).copy_(dy)
            dx_eval, dw_shifted, sum_g = K.bn_backward(dy, x, weight, folded, shift, invstd, ctx.act, False,
                                                       (True, True, True))
            sum_g = sum_g.to(acc)
            sum_gx = dw_shifted.to(acc) - residual * invstd * sum_g
        dx = None
        if ctx.needs_input_grad[0]:
            total = torch.cat([sum_g, sum_gx])
            _run_collective("all_reduce of per-channel (sum dy, sum dy*xhat) in backward",
                            lambda async_op: dist.all_reduce(total, group=ctx.group, async_op=async_op),
                            ctx.group, ctx.timeout)
            if x.numel() == 0:
                dx = torch.zeros_like(x)
            else:
                n = ctx.n
                a = scale * invstd * total[c:] / n
                bb = scale * (total[:c] - residual * invstd * total[c:]) / n
                centred = x.to(acc) - shift.reshape(b)                       # exact for nearby values
                correction = torch.addcmul(bb.reshape(b), centred, a.reshape(b), out=centred)
                dx = (dx_eval.sub_(correction) if dx_eval.dtype == acc else dx_eval.to(acc) - correction)
                dx = dx.to(x.dtype)
        dw = sum_gx.to(weight.dtype) if weight is not None and ctx.needs_input_grad[1] else None
        db = sum_g.to(weight.dtype) if ctx.needs_input_grad[2] else None
        return dx, dw, db, None, None, None, None, None, None, None, None, None


def sync_batch_norm(input: Tensor, running_mean: Tensor | None, running_var: Tensor | None,
                    weight: Tensor | None = None, bias: Tensor | None = None, momentum: float = 0.1,
                    eps: float = 1e-5, group=None, *, act: str = "identity",
                    timeout: datetime.timedelta | None = None) -> Tensor:
    """Training-mode batch norm over the union of the group's batches (see the module docstring).

    ``running_mean`` / ``running_var`` (optional) are updated in place with the global mean and the global
    unbiased variance, ``momentum`` being the weight of the new batch. Issues one ``all_gather`` in forward and,
    when the input needs a gradient, one ``all_reduce`` in backward.
    """
    _check_args(input, eps, act, weight=weight, bias=bias, running_mean=running_mean, running_var=running_var)
    stats = global_batch_stats(input, group, timeout)
    _check_global_count(stats[0], input, group)
    return _normalize_global(input, stats, running_mean, running_var, weight, bias, momentum, eps, group, act,
                             timeout)


def _check_args(input: Tensor, eps: float, act: str, **vectors) -> None:
    F._check_eps(eps)
    F._check_act(act)
    F._check_channels(input, **vectors)


def _check_global_count(n: int, input: Tensor, group) -> None:
    if n == 1:
        raise ValueError(f"Expected more than 1 value per channel when training, got a global batch of 1 value "
                         f"per channel over {dist.get_world_size(group)} processes (this rank's input size "
                         f"{input.size()}): the batch variance of a single value is 0; use a larger batch, eval "
                         f"mode, or a per-sample norm (GroupNorm, LayerNorm)")


def _normalize_global(input, stats, running_mean, running_var, weight, bias, momentum, eps, group, act, timeout):
    n, mu, shift, residual, var = stats
    if n == 0:  # nothing on any rank: empty outputs, no backward collective, statistics untouched
        return F.batch_norm(input, running_mean, running_var, weight, bias, True, momentum, eps, act=act)
    invstd = torch.rsqrt(var + eps)
    y = _SyncBatchNormFunction.apply(input, weight, bias, shift, residual, invstd, var, n, float(eps), act,
                                     group, timeout)
    if running_mean is not None and running_var is not None:
        F.update_running_stats(running_mean, running_var, mu, invstd, eps, n, momentum)
    return y


# ----------------------------------------------------------------------------------------------------------
# the module
# ----------------------------------------------------------------------------------------------------------
_DIM_TO_CLASS = {1: BatchNorm1d, 2: BatchNorm2d, 3: BatchNorm3d}


def _input_dim_of(module: nn.Module) -> int | None:
    """1, 2 or 3 for a BatchNorm{1,2,3}d class (torch.nn or normlab, Act subclasses included), else None."""
    for cls in type(module).__mro__:
        name = cls.__name__
        for d in (1, 2, 3):
            if name.endswith(f"{d}d") and "Norm" in name:
                return d
    return None


def _is_batchnorm(module: nn.Module) -> bool:
    """torch.nn / normlab BatchNorm{1,2,3}d (Act subclasses included) and torch.nn.SyncBatchNorm."""
    return (isinstance(module, (nn.modules.batchnorm._BatchNorm, _BatchNorm))
            and not isinstance(module, SyncBatchNorm)
            and (_input_dim_of(module) is not None or isinstance(module, nn.SyncBatchNorm)))


class SyncBatchNorm(_BatchNorm):
    r"""Batch norm with statistics over all processes of ``process_group`` (default: the whole world).

    Same arguments, parameters, buffers and state_dict keys as ``torch.nn.SyncBatchNorm`` and normlab's
    ``BatchNorm2d``; accepts any input (N, C, \*). See the module docstring for the math and the policy (eval
    and single-process runs issue no collective; a lost peer raises after ``timeout``).

    Extra keyword-only arguments: ``act`` (a fused activation among ``normlab.kernels.ACTIVATIONS``, as in
    ``BatchNormAct``) and ``timeout`` (a ``datetime.timedelta`` bounding each collective; default the process
    group's timeout).
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1, affine: bool = True,
                 track_running_stats: bool = True, process_group=None, device=None, dtype=None, *,
                 act: str = "identity", timeout: datetime.timedelta | None = None) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device=device, dtype=dtype)
        if act not in ACTIVATIONS:
            raise ValueError(f"unknown activation act={act!r}; expected one of {', '.join(ACTIVATIONS)}")
        self.process_group = process_group
        self.act = act
        self.timeout = timeout
        self._input_dim: int | None = None  # 1, 2 or 3, remembered for revert_sync_batchnorm

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (N, C, *), got {input.dim()}D input of shape "
                             f"{tuple(input.shape)}")

    def extra_repr(self) -> str:
        extra = super().extra_repr()
        return extra + (f", act={self.act!r}" if self.act != "identity" else "")

    def forward(self, input: Tensor) -> Tensor:
        if has_torch_function_unary(input):  # torch.fx's Proxy, a tensor subclass: as torch.nn's layers
            return overridden(self, input)
        self._check_input_dim(input)
        if self._input_dim is None:
            self._input_dim = 1 if input.dim() <= 3 else input.dim() - 2
        if not self.training or not _sync_active(self.process_group):
            return super().forward(input)  # exactly normlab BatchNorm: eval, no process group, or one process
        update = self.track_running_stats and self.running_mean is not None
        rm, rv = (self.running_mean, self.running_var) if update else (None, None)
        _check_args(input, self.eps, self.act, weight=self.weight, bias=self.bias, running_mean=rm,
                    running_var=rv)
        stats = global_batch_stats(input, self.process_group, self.timeout)
        _check_global_count(stats[0], input, self.process_group)
        # count the batch only when the global batch is not empty (as BatchNorm does for an empty batch)
        momentum = self._momentum_for_this_batch() if stats[0] > 0 else 0.0
        return _normalize_global(input, stats, rm, rv, self.weight, self.bias, momentum, self.eps,
                                 self.process_group, self.act, self.timeout)

    # ------------------------------------------------------------------------------------------------------
    @classmethod
    def convert_sync_batchnorm(cls, module: nn.Module, process_group=None) -> nn.Module:
        """Replace every ``torch.nn`` / normlab ``BatchNorm{1,2,3}d`` (and ``BatchNormAct``, and
        ``torch.nn.SyncBatchNorm``) in ``module``.

        Parameters are shared (the same ``nn.Parameter`` objects, so ``requires_grad`` and optimizer state
        carry over), buffers are copied, the training flag is kept, and a fused activation (``act``) is kept.
        Returns the converted module (the same object unless ``module`` itself is a batch norm).
        """
        if _is_batchnorm(module):
            act = getattr(module, "act", "identity")
            if not isinstance(act, str):
                raise TypeError(f"cannot convert {type(module).__name__} with act={act!r}: SyncBatchNorm fuses "
                                f"only the activations named in {ACTIVATIONS}")
            ref = module.weight if module.weight is not None else module.running_mean
            out = cls(module.num_features, module.eps, module.momentum, module.affine,
                      module.track_running_stats, process_group,
                      device=None if ref is None else ref.device,
                      dtype=None if ref is None else ref.dtype, act=act)
            _copy_state(module, out)
            out._input_dim = _input_dim_of(module)
            return out
        for name, child in module.named_children():
            new = cls.convert_sync_batchnorm(child, process_group)
            if new is not child:
                setattr(module, name, new)
        return module

    @staticmethod
    def revert_sync_batchnorm(module: nn.Module, dim: int | None = None) -> nn.Module:
        """Replace every :class:`SyncBatchNorm` in ``module`` by normlab ``BatchNorm{dim}d``.

        ``dim`` defaults to the dimensionality recorded at conversion (from the original class) or at the first
        forward (from the input rank: (N, C) and (N, C, L) give 1, (N, C, H, W) 2, (N, C, D, H, W) 3). A fused
        activation gives ``normlab.BatchNormAct{dim}d``.
        """
        if isinstance(module, SyncBatchNorm):
            d = dim if dim is not None else module._input_dim
            if d not in (1, 2, 3):
                raise ValueError(f"cannot tell whether this SyncBatchNorm({module.num_features}) was a BatchNorm1d, "
                                 f"2d or 3d: it was never converted from one nor run on an input; pass "
                                 f"revert_sync_batchnorm(model, dim=1|2|3)")
            ref = module.weight if module.weight is not None else module.running_mean
            kw = dict(eps=module.eps, momentum=module.momentum, affine=module.affine,
                      track_running_stats=module.track_running_stats,
                      device=None if ref is None else ref.device, dtype=None if ref is None else ref.dtype)
            if module.act != "identity":
                from . import batchnorm_act
                out = getattr(batchnorm_act, f"BatchNormAct{d}d")(module.num_features, act=module.act, **kw)
            else:
                out = _DIM_TO_CLASS[d](module.num_features, **kw)
            _copy_state(module, out)
            return out
        for name, child in module.named_children():
            new = SyncBatchNorm.revert_sync_batchnorm(child, dim)
            if new is not child:
                setattr(module, name, new)
        return module


def _copy_state(src: nn.Module, dst: nn.Module) -> None:
    """Share parameters, copy buffers and the training flag from one batch norm to another."""
    if src.affine:
        dst.weight = src.weight
        dst.bias = src.bias
    with torch.no_grad():
        for name in ("running_mean", "running_var", "num_batches_tracked"):
            s, d = getattr(src, name, None), getattr(dst, name, None)
            if s is None:
                setattr(dst, name, None) if name in dst._buffers else None
            elif d is None:
                dst.register_buffer(name, s.detach().clone())
            else:
                d.copy_(s)
    dst.train(src.training)
    if hasattr(src, "qconfig"):
        dst.qconfig = src.qconfig
