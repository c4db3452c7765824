r"""Batch Renormalization: BatchNorm whose training output is corrected toward the running statistics.

Ioffe, "Batch Renormalization: Towards Reducing Minibatch Dependence in Batch-Normalized Models", NeurIPS 2017.

Training, per channel, with the batch's mean mu_B and biased variance var_B::

    sigma_B = sqrt(var_B + eps),   sigma = sqrt(running_var + eps)
    r = clip(sigma_B / sigma, 1/r_max, r_max),   d = clip((mu_B - running_mean) / sigma, -d_max, d_max)
    y = ((x - mu_B) / sigma_B * r + d) * weight + bias

``r`` and ``d`` are computed from the running statistics *before* this batch updates them and carry no
gradient. Since they are per-channel constants, y is a BatchNorm with weight ``weight * r`` and bias
``bias + weight * d``, which is how the forward is computed (one call of :func:`normlab.functional.batch_norm`,
closed-form backward included). With r_max = 1 and d_max = 0 the layer is exactly BatchNorm. Evaluation, the
running statistics update (``momentum`` = weight of the new batch, ``None`` = cumulative average, unbiased
variance) and the state_dict are BatchNorm's; the checkpoint moves to and from ``BatchNorm``.

Schedule: the clipping limits ramp linearly from (1, 0) to (r_max, d_max) over the first ``warmup_steps``
training steps, counted by ``num_batches_tracked`` (so a loaded checkpoint resumes the schedule). The paper uses
BatchNorm for the first 5k steps and ramps r_max to 3 by 40k and d_max to 5 by 25k; ``warmup_steps=0`` applies
the targets at once. Without running statistics (``track_running_stats=False``) there is nothing to
renormalize toward and the layer is BatchNorm.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .. import functional as F
from ._overrides import has_torch_function_unary, overridden
from .batchnorm import _BatchNorm

__all__ = ["BatchRenorm1d", "BatchRenorm2d", "BatchRenorm3d"]


class _BatchRenorm(_BatchNorm):
    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1, affine: bool = True,
                 track_running_stats: bool = True, r_max: float = 3.0, d_max: float = 5.0,
                 warmup_steps: int = 1000, device=None, dtype=None) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype)
        if r_max < 1 or d_max < 0:
            raise ValueError(f"BatchRenorm needs r_max >= 1 and d_max >= 0 (r is clipped to [1/r_max, r_max], d to "
                             f"[-d_max, d_max]); got r_max={r_max}, d_max={d_max}. r_max=1, d_max=0 is BatchNorm")
        if warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")
        self.r_max = float(r_max)
        self.d_max = float(d_max)
        self.warmup_steps = int(warmup_steps)

    def current_limits(self) -> tuple[float, float]:
        """(r_max, d_max) that the next training step uses, from the schedule and ``num_batches_tracked``."""
        step = 0 if self.num_batches_tracked is None else int(self.num_batches_tracked)
        t = 1.0 if self.warmup_steps <= 0 else min(1.0, step / self.warmup_steps)
        return 1.0 + (self.r_max - 1.0) * t, self.d_max * t

    def forward(self, input: Tensor) -> Tensor:
        if has_torch_function_unary(input):  # torch.fx's Proxy, a tensor subclass: as torch.nn's layers
            return overridden(self, input)
        if not (self.training and self.track_running_stats and self.running_mean is not None
                and input.numel() > 0 and input.dim() >= 2 and input.shape[1] == self.num_features):
            return super().forward(input)  # evaluation, no running statistics, or an error/empty path
        self._check_input_dim(input)
        r_max, d_max = self.current_limits()
        with torch.no_grad():
            acc = F.acc_dtype(input.dtype)
            dims = [0] + list(range(2, input.dim()))
            var_b, mu_b = torch.var_mean(input.to(acc), dim=dims, correction=0)
            sigma = torch.sqrt(self.running_var.to(acc) + self.eps)
            r = (torch.sqrt(var_b + self.eps) / sigma).clamp(1.0 / r_max, r_max)
            d = ((mu_b - self.running_mean.to(acc)) / sigma).clamp(-d_max, d_max)
            pdt = self.weight.dtype if self.weight is not None else input.dtype
            r, d = r.to(pdt), d.to(pdt)
        momentum = self._momentum_for_this_batch()
        weight = r if self.weight is None else self.weight * r
        bias = d if self.weight is None else self.weight * d
        if self.bias is not None:
            bias = bias + self.bias
        return F.batch_norm(input, self.running_mean, self.running_var, weight, bias, True, momentum, self.eps,
                            act=self.act)

    def extra_repr(self) -> str:
        return (super().extra_repr() + f", r_max={self.r_max}, d_max={self.d_max}, "
                f"warmup_steps={self.warmup_steps}")


class BatchRenorm1d(_BatchRenorm):
    """Batch Renormalization on (N, C) or (N, C, L) inputs. See the module docstring."""

    _ranks, _layout = (2, 3), "(N, C) or (N, C, L)"


class BatchRenorm2d(_BatchRenorm):
    """Batch Renormalization on (N, C, H, W) inputs. See the module docstring.

    Example::

        >>> brn = BatchRenorm2d(16, r_max=3.0, d_max=5.0, warmup_steps=500)
        >>> y = brn(torch.randn(4, 16, 8, 8))      # small batches: the correction pulls toward running stats
    """

    _ranks, _layout = (4,), "(N, C, H, W)"


class BatchRenorm3d(_BatchRenorm):
    """Batch Renormalization on (N, C, D, H, W) inputs. See the module docstring."""

    _ranks, _layout = (5,), "(N, C, D, H, W)"
