"""The learnable γ (``weight``) and β (``bias``) every torch.nn norm layer declares the same way."""
from __future__ import annotations

import torch
from torch import nn


def add_affine(module: nn.Module, shape, affine: bool, bias: bool, device=None, dtype=None) -> None:
    """Registers ``weight`` and ``bias`` of ``shape`` on ``module`` (uninitialized: see :func:`reset_affine`),
    or None for each one left out: both without ``affine``, β alone with ``bias=False``."""
    def new():
        return nn.Parameter(torch.empty(shape, device=device, dtype=dtype))
    module.register_parameter("weight", new() if affine else None)
    module.register_parameter("bias", new() if affine and bias else None)


def reset_affine(module: nn.Module) -> None:
    """γ to ones and β to zeros, where the module has them."""
    params = module._parameters
    if params.get("weight") is not None:
        nn.init.ones_(params["weight"])
    if params.get("bias") is not None:
        nn.init.zeros_(params["bias"])
