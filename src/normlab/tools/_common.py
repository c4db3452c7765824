"""What the tools recognize as a batch norm, and how they read batches."""
from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm as _TorchBatchNorm

from ..nn.batchnorm import _BatchNorm as _NormlabBatchNorm
from ..nn.frozenbatchnorm import _FrozenBatchNorm
from ..nn.switchnorm import _SwitchNorm

BATCHNORM_TYPES = (_TorchBatchNorm, _NormlabBatchNorm)
"""Modules with BatchNorm's policy and buffers (torch.nn and normlab BatchNorm, SyncBatchNorm, BatchRenorm,
GhostBatchNorm). Their evaluation output is BatchNorm's."""

CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
CONV_TRANSPOSE_TYPES = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
LINEAR_TYPES = (nn.Linear,)
PRODUCER_TYPES = CONV_TYPES + CONV_TRANSPOSE_TYPES + LINEAR_TYPES


def is_batchnorm(m: nn.Module) -> bool:
    """A BatchNorm-family module (trainable, batch statistics in training)."""
    return isinstance(m, BATCHNORM_TYPES)


def has_batch_stats(m: nn.Module) -> bool:
    """A module whose running statistics are per-channel batch statistics (BatchNorm family or SwitchNorm)."""
    return (isinstance(m, BATCHNORM_TYPES + (_SwitchNorm,)) and getattr(m, "running_mean", None) is not None
            and getattr(m, "running_var", None) is not None)


def is_foldable_norm(m: nn.Module) -> bool:
    """An affine map in evaluation: BatchNorm family with running statistics, or FrozenBatchNorm."""
    if isinstance(m, _FrozenBatchNorm):
        return True
    return is_batchnorm(m) and m.running_mean is not None and m.running_var is not None


def is_norm(m: nn.Module) -> bool:
    return isinstance(m, BATCHNORM_TYPES + (_SwitchNorm, _FrozenBatchNorm))


def scale_shift(bn: nn.Module) -> tuple[Tensor, Tensor]:
    """Float64 per-channel (scale, shift) of a BatchNorm in evaluation: y = x * scale + shift."""
    rv = bn.running_var.detach().to(torch.float64)
    rm = bn.running_mean.detach().to(torch.float64)
    scale = torch.rsqrt(rv + bn.eps)
    if getattr(bn, "weight", None) is not None:
        scale = scale * bn.weight.detach().to(torch.float64)
    shift = -rm * scale
    if getattr(bn, "bias", None) is not None:
        shift = shift + bn.bias.detach().to(torch.float64)
    return scale, shift


def first_tensor(batch):
    """The input of a batch: the batch itself, or the first item of a tuple/list (dicts: key 'input' or 'x')."""
    if isinstance(batch, (tuple, list)):
        return batch[0]
    if isinstance(batch, dict):
        for k in ("input", "x", "image", "images"):
            if k in batch:
                return batch[k]
        raise ValueError(f"a dict batch needs an 'input' or 'x' key, got keys {sorted(batch)}")
    return batch


def iter_inputs(batches: Iterable, num_batches: int | None, device=None) -> Iterator[Tensor]:
    """Inputs of the first ``num_batches`` batches (all when None), moved to ``device`` when given."""
    for i, batch in enumerate(batches):
        if num_batches is not None and i >= num_batches:
            break
        x = first_tensor(batch)
        if device is not None and isinstance(x, Tensor):
            x = x.to(device)
        yield x


def model_device(model: nn.Module):
    for t in list(model.parameters()) + list(model.buffers()):
        return t.device
    return None


def activation_module(act: str) -> nn.Module:
    """The module for a fused activation name of normlab's BatchNormAct."""
    return {"identity": nn.Identity, "relu": nn.ReLU, "silu": nn.SiLU, "sigmoid": nn.Sigmoid}[act]()
