r"""Switchable Normalization: a learned softmax mixture of instance, layer and batch statistics.

Luo, Ren, Peng, Zhang, Li, "Differentiable Learning-to-Normalize via Switchable Normalization", ICLR 2019.

For ``x`` of shape (N, C, \*) with S = prod(\*) values per (sample, channel)::

    IN: mu_in[n,c], var_in[n,c]  over S            LN: mu_ln[n], var_ln[n]  over C*S
    BN: mu_bn[c],   var_bn[c]    over N*S           (all biased variances)

    p = softmax(mean_weight), q = softmax(var_weight)          # logits in the order (in, ln, bn)
    mu  = p0 mu_in + p1 mu_ln + p2 mu_bn,   var = q0 var_in + q1 var_ln + q2 var_bn
    y   = (x - mu) / sqrt(var + eps) * weight + bias

The LN and BN variances come from the instance statistics by the law of total variance
(``var_ln = mean_c var_in + mean_c (mu_in - mu_ln)^2``), never as ``E[x^2] - E[x]^2``, so there is no
catastrophic cancellation for inputs with a large mean.

Running statistics belong to the BN component and follow ``torch.nn.BatchNorm``: ``momentum`` is the weight of the
new batch (``None``: cumulative average; Keras/Flax's momentum 0.9 or 0.99 is our 0.1 or 0.01), ``running_var``
stores the unbiased batch variance, non-finite batch statistics leave them untouched. In evaluation the BN
component uses them (without running statistics, the batch's), while the IN and LN components are always
computed from the sample.

``SwitchNorm1d`` accepts (N, C, L) and (N, C). With a single value per (sample, channel), S = 1 (an (N, C) input,
or 1x1 feature maps), instance statistics do not exist (mu_in = x, var_in = 0): the IN component is dropped and
the mixture is the softmax of the (ln, bn) logits only, as the paper's SwitchNorm1d does; the IN logits then get
no gradient.
Gradients flow through torch autograd; :mod:`normlab.reference.switchnorm` has the closed form.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from .. import functional as F
from ._overrides import has_torch_function_unary, overridden
from .batchnorm import _NormBase

__all__ = ["SwitchNorm1d", "SwitchNorm2d", "SwitchNorm3d"]


def _mixture(logits: Tensor, spatial: int) -> Tensor:
    """Softmax of the (in, ln, bn) logits; with one value per (sample, channel) the IN weight is 0."""
    if spatial > 1:
        return torch.softmax(logits, 0)
    return torch.cat([torch.zeros_like(logits[:1]), torch.softmax(logits[1:], 0)])


class _SwitchNorm(_NormBase):
    """Parameters and buffers as ``BatchNorm`` (same state_dict keys) plus the logits ``mean_weight``,
    ``var_weight`` of shape (3,), order (in, ln, bn)."""


    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1, affine: bool = True,
                 track_running_stats: bool = True, device=None, dtype=None) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype)
        # logits in the order (instance, layer, batch); equal weights at initialization as in the paper
        self.mean_weight = nn.Parameter(torch.ones(3, device=device, dtype=dtype))
        self.var_weight = nn.Parameter(torch.ones(3, device=device, dtype=dtype))

    def reset_parameters(self) -> None:
        super().reset_parameters()
        if hasattr(self, "mean_weight"):
            with torch.no_grad():
                self.mean_weight.fill_(1)
                self.var_weight.fill_(1)

    def _check_input_dim(self, input: Tensor) -> None:
        super()._check_input_dim(input)
        if input.shape[1] != self.num_features:
            raise ValueError(f"{type(self).__name__}({self.num_features}) got an input with {input.shape[1]} "
                             f"channels (shape {tuple(input.shape)}); num_features must equal the channel "
                             f"dimension 1")

    def mixture(self) -> tuple[Tensor, Tensor]:
        """The current (mean, variance) mixture weights, softmaxes of the logits, order (in, ln, bn)."""
        return torch.softmax(self.mean_weight, 0), torch.softmax(self.var_weight, 0)

    def forward(self, input: Tensor) -> Tensor:
        if has_torch_function_unary(input):  # torch.fx's Proxy, a tensor subclass: as torch.nn's layers
            return overridden(self, input)
        self._check_input_dim(input)
        if input.numel() == 0:
            return F._empty_output(input, self.weight, self.bias)
        n, c = input.shape[:2]
        acc = F.acc_dtype(input.dtype)
        x3 = input.to(acc).reshape(n, c, -1)
        s = x3.shape[2]
        use_batch = self.training or self.running_mean is None
        if self.training and n * s == 1:
            raise ValueError(f"Expected more than 1 value per channel when training, got input size "
                             f"{tuple(input.shape)}: the batch statistics of a single value are degenerate; use a "
                             f"larger batch or eval mode")
        var_in, mu_in = torch.var_mean(x3, dim=2, correction=0)
        mu_ln = mu_in.mean(1, keepdim=True)
        var_ln = var_in.mean(1, keepdim=True) + (mu_in - mu_ln).pow(2).mean(1, keepdim=True)
        if use_batch:
            mu_bn = mu_in.mean(0, keepdim=True)
            var_bn = var_in.mean(0, keepdim=True) + (mu_in - mu_bn).pow(2).mean(0, keepdim=True)
        else:
            mu_bn = self.running_mean.to(acc).reshape(1, c)
            var_bn = self.running_var.to(acc).reshape(1, c)
        p, q = _mixture(self.mean_weight.to(acc), s), _mixture(self.var_weight.to(acc), s)
        mu = p[0] * mu_in + p[1] * mu_ln + p[2] * mu_bn
        var = q[0] * var_in + q[1] * var_ln + q[2] * var_bn
        y = (x3 - mu.unsqueeze(2)) * torch.rsqrt(var.clamp_min(0) + self.eps).unsqueeze(2)
        if self.weight is not None:
            y = y * self.weight.to(acc).reshape(1, c, 1)
        if self.bias is not None:
            y = y + self.bias.to(acc).reshape(1, c, 1)
        if self.training and self.track_running_stats and self.running_mean is not None:
            self._update_running(mu_bn.detach().reshape(c), var_bn.detach().reshape(c), n * s)
        return F._restore_format(y.reshape(input.shape).to(input.dtype), input)

    def _update_running(self, mean: Tensor, var: Tensor, count: int) -> None:
        self.num_batches_tracked.add_(1)
        if self.momentum is None:
            factor = 1.0 / float(self.num_batches_tracked)
        else:
            factor = float(self.momentum)
        F.update_running_stats(self.running_mean, self.running_var, mean, torch.rsqrt(var + self.eps),
                               self.eps, count, factor)


class SwitchNorm1d(_SwitchNorm):
    """Switchable Normalization on (N, C) or (N, C, L) inputs. See the module docstring."""
    _ranks, _layout = (2, 3), "(N, C) or (N, C, L)"


class SwitchNorm2d(_SwitchNorm):
    """Switchable Normalization on (N, C, H, W) inputs. See the module docstring.

    Example::

        >>> sn = SwitchNorm2d(16)
        >>> y = sn(torch.randn(8, 16, 32, 32))
        >>> sn.mixture()      # softmax weights of (in, ln, bn) for the mean and the variance
    """
    _ranks, _layout = (4,), "(N, C, H, W)"


class SwitchNorm3d(_SwitchNorm):
    """Switchable Normalization on (N, C, D, H, W) inputs. See the module docstring."""
    _ranks, _layout = (5,), "(N, C, D, H, W)"
