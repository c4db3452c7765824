r"""Frozen batch normalization: a per-channel affine map built from fixed BatchNorm statistics.

    y = (x - running_mean) / sqrt(running_var + eps) * weight + bias  =  x * scale + shift

``weight``, ``bias``, ``running_mean`` and ``running_var`` are all *buffers*: nothing is learned, nothing is
updated, and ``train()``/``eval()`` change nothing. Typical use: fine-tuning a detector backbone with small
batches, where batch statistics would be noise (the torchvision / Detectron convention).

It loads a ``BatchNorm`` state_dict (``torch.nn`` or ``normlab``) directly; ``num_batches_tracked`` is accepted
and ignored. With ``affine=False`` in the source there is no weight/bias in its state_dict: the defaults
(1 and 0) stay. ``FrozenBatchNorm2d.from_batchnorm(bn)`` copies any BatchNorm module.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from ._overrides import has_torch_function_unary, overridden

__all__ = ["FrozenBatchNorm1d", "FrozenBatchNorm2d", "FrozenBatchNorm3d"]


class _FrozenBatchNorm(nn.Module):
    _ranks: tuple[int, ...] = ()

    def __init__(self, num_features: int, eps: float = 1e-5, device=None, dtype=None, **_ignored) -> None:
        super().__init__()
        if not (eps > 0):
            raise ValueError(f"eps must be positive, got eps={eps}")
        fk = {"device": device, "dtype": dtype}
        self.num_features = int(num_features)
        self.eps = eps
        self.register_buffer("weight", torch.ones(num_features, **fk))
        self.register_buffer("bias", torch.zeros(num_features, **fk))
        self.register_buffer("running_mean", torch.zeros(num_features, **fk))
        self.register_buffer("running_var", torch.ones(num_features, **fk))

    @classmethod
    def from_batchnorm(cls, bn: nn.Module) -> "_FrozenBatchNorm":
        """A frozen copy of any BatchNorm-like module (``weight``/``bias`` may be None, running stats must exist)."""
        if getattr(bn, "running_mean", None) is None:
            raise ValueError(f"{type(bn).__name__} has no running statistics (track_running_stats=False); "
                             f"a frozen BatchNorm needs them")
        ref = bn.running_mean
        out = cls(bn.num_features, bn.eps, device=ref.device, dtype=ref.dtype)
        with torch.no_grad():
            out.running_mean.copy_(bn.running_mean)
            out.running_var.copy_(bn.running_var)
            if getattr(bn, "weight", None) is not None:
                out.weight.copy_(bn.weight)
            if getattr(bn, "bias", None) is not None:
                out.bias.copy_(bn.bias)
        return out

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() not in self._ranks:
            shapes = " or ".join(f"{r}D" for r in self._ranks)
            raise ValueError(f"{type(self).__name__} expects a {shapes} input, got a {input.dim()}D input of "
                             f"shape {tuple(input.shape)}")
        if input.shape[1] != self.num_features:
            raise ValueError(f"{type(self).__name__}({self.num_features}) got {input.shape[1]} channels "
                             f"(input shape {tuple(input.shape)})")

    def scale_shift(self) -> tuple[Tensor, Tensor]:
        """Per-channel ``(scale, shift)`` with y = x * scale + shift."""
        scale = self.weight * torch.rsqrt(self.running_var + self.eps)
        return scale, self.bias - self.running_mean * scale

    def forward(self, input: Tensor) -> Tensor:
        if has_torch_function_unary(input):  # torch.fx's Proxy, a tensor subclass: as torch.nn's layers
            return overridden(self, input)
        self._check_input_dim(input)
        scale, shift = self.scale_shift()
        shape = [1, self.num_features] + [1] * (input.dim() - 2)
        return input * scale.to(input.dtype).reshape(shape) + shift.to(input.dtype).reshape(shape)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        state_dict.pop(prefix + "num_batches_tracked", None)
        for name in ("weight", "bias"):  # a BatchNorm(affine=False) state_dict: keep the identity affine
            if prefix + name not in state_dict:
                state_dict[prefix + name] = getattr(self, name).detach().clone()
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}"


class FrozenBatchNorm1d(_FrozenBatchNorm):
    """Frozen BatchNorm for (N, C) or (N, C, L) inputs."""
    _ranks = (2, 3)


class FrozenBatchNorm2d(_FrozenBatchNorm):
    """Frozen BatchNorm for (N, C, H, W) inputs.

    Example::

        >>> bn = torch.nn.BatchNorm2d(8)
        >>> frozen = FrozenBatchNorm2d(8)
        >>> frozen.load_state_dict(bn.state_dict())      # num_batches_tracked accepted and ignored
    """
    _ranks = (4,)


class FrozenBatchNorm3d(_FrozenBatchNorm):
    """Frozen BatchNorm for (N, C, D, H, W) inputs."""
    _ranks = (5,)
