"""Instance-norm modules: ``InstanceNorm1d/2d/3d``, drop-in for ``torch.nn``'s.

Defaults as ``torch.nn``: ``affine=False``, ``track_running_stats=False``. Statistics per sample and channel
over the spatial dimensions (group norm with one channel per group). Inputs without a batch dimension
((C, L), (C, H, W), (C, D, H, W)) are accepted, as in torch.
"""
from __future__ import annotations

import warnings

from torch import Tensor, nn

from .. import functional as F
from ._overrides import has_torch_function_unary, overridden
from .batchnorm import _NormBase


class _InstanceNorm(_NormBase):
    _batched_rank = 3

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1, affine: bool = False,
                 track_running_stats: bool = False, device=None, dtype=None, *, bias: bool = True) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype, bias=bias)

    def _check_input_dim(self, input: Tensor) -> None:
        r = self._batched_rank
        if input.dim() not in (r - 1, r):
            raise ValueError(f"expected {r - 1}D or {r}D input (got {input.dim()}D input of shape "
                             f"{tuple(input.shape)}) for {type(self).__name__}")

    def forward(self, input: Tensor) -> Tensor:
        if has_torch_function_unary(input):  # torch.fx's Proxy, a tensor subclass: as torch.nn's layers
            return overridden(self, input)
        self._check_input_dim(input)
        unbatched = input.dim() == self._batched_rank - 1
        feature_dim = 0 if unbatched else 1
        if input.shape[feature_dim] != self.num_features:
            if self.affine:
                raise ValueError(f"expected input's size at dim={feature_dim} to match num_features "
                                 f"({self.num_features}), but got: {input.shape[feature_dim]}.")
            warnings.warn(f"input's size at dim={feature_dim} does not match num_features. You can silence "
                          f"this warning by not passing in num_features, which is not used because "
                          f"affine=False")
        x = input.unsqueeze(0) if unbatched else input
        y = F.instance_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                            self.training or not self.track_running_stats,
                            self.momentum if self.momentum is not None else 0.0, self.eps)
        return y.squeeze(0) if unbatched else y


class InstanceNorm1d(_InstanceNorm, nn.InstanceNorm1d):  # as batchnorm.py's layers
    """Instance norm over (N, C, L) or (C, L): per sample and channel over L."""

    _batched_rank = 3


class InstanceNorm2d(_InstanceNorm, nn.InstanceNorm2d):  # as batchnorm.py's layers
    """Instance norm over (N, C, H, W) or (C, H, W): per sample and channel over H, W."""

    _batched_rank = 4


class InstanceNorm3d(_InstanceNorm, nn.InstanceNorm3d):  # as batchnorm.py's layers
    """Instance norm over (N, C, D, H, W) or (C, D, H, W): per sample and channel over D, H, W."""

    _batched_rank = 5
