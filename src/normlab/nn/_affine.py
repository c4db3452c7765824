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


# A parameter or buffer that a tool took out of the module's dicts: torch.nn.utils.prune (``weight_orig`` and
# ``weight_mask``, the masked product set as a plain attribute before each forward) or
# torch.nn.utils.parametrize (a property computing it). Registered as None (affine=False), it stays in the dict.
TAKEN = object()


def pair_of(module: nn.Module, table: dict, first: str, second: str) -> tuple:
    """``(module.<first>, module.<second>)``, read from ``table``, the module's parameter or buffer dict
    (``nn.Module.__getattr__`` costs ~0.5 us a name, which small layers feel), unless pruning or a
    parametrization took them out of it."""
    a, b = table.get(first, TAKEN), table.get(second, TAKEN)
    if a is TAKEN or b is TAKEN:
        return getattr(module, first), getattr(module, second)
    return a, b


def affine_of(module: nn.Module) -> tuple:
    """``(module.weight, module.bias)`` (see :func:`pair_of`)."""
    return pair_of(module, module._parameters, "weight", "bias")


def reset_affine(module: nn.Module) -> None:
    """γ to ones and β to zeros, where the module has them."""
    params = module._parameters
    if params.get("weight") is not None:
        nn.init.ones_(params["weight"])
    if params.get("bias") is not None:
        nn.init.zeros_(params["bias"])
