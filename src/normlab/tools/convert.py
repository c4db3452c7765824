"""Swap normalization layers in a model: torch.nn <-> normlab, or one norm type for another.

``convert(model, to="normlab")`` replaces every torch.nn BatchNorm/InstanceNorm{1,2,3}d, GroupNorm and LayerNorm
by its normlab twin (same arguments, state_dict loaded strictly); ``to="torch"`` goes back. Any registry name
(``"groupnorm"``, ``"frozenbatchnorm"``, ``"batchrenorm"``, ``"switchnorm"``, ``"none"``, aliases too) replaces
every batch norm (torch.nn or normlab BatchNorm family, SwitchNorm, FrozenBatchNorm) by
``create_norm(to, C, dim=..., **kw)`` and carries over what has the same meaning:

* ``weight``/``bias`` (per-channel gamma/beta) when the new module has them with the same shape;
* ``running_mean``/``running_var``/``num_batches_tracked`` when both have them (BN -> BRN/GBN/SN/Frozen);
* ``eps`` and ``momentum`` unless given in ``kw``; the module's mode, device and dtype.

The input model is left untouched (deep copy) unless ``inplace=True``. The result has ``.convert_report``:
a list of ``(name, old class, new class)``.
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from .. import nn as nlnn
from ..registry import create_norm, resolve_norm_name
from . import _common as C

__all__ = ["convert"]

_TWINS = ("BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "InstanceNorm1d", "InstanceNorm2d", "InstanceNorm3d",
          "GroupNorm", "LayerNorm")


def _dim_of(m: nn.Module) -> int:
    for cls in type(m).__mro__:
        for d in (1, 2, 3):
            if cls.__name__.endswith(f"{d}d"):
                return d
    return 2


def _twin(m: nn.Module, to: str) -> nn.Module | None:
    name = type(m).__name__
    if name not in _TWINS:
        return None
    mod = type(m).__module__
    if to == "normlab" and not mod.startswith("torch.nn"):
        return None
    if to == "torch" and not mod.startswith("normlab"):
        return None
    cls = getattr(nlnn if to == "normlab" else nn, name)
    fk = _factory_kw(m)
    if name.startswith(("BatchNorm", "InstanceNorm")):
        new = cls(m.num_features, m.eps, m.momentum, m.affine, m.track_running_stats, **fk)
    elif name == "GroupNorm":
        new = cls(m.num_groups, m.num_channels, m.eps, m.affine, **fk)
    else:
        new = cls(m.normalized_shape, m.eps, m.elementwise_affine, bias=m.bias is not None, **fk)
    new.load_state_dict(m.state_dict(), strict=True)
    return new


def _factory_kw(m: nn.Module) -> dict:
    for t in list(m.parameters(recurse=False)) + list(m.buffers(recurse=False)):
        if t.is_floating_point():
            return {"device": t.device, "dtype": t.dtype}
    return {}


@torch.no_grad()
def _to_norm(m: nn.Module, to: str, kw: dict) -> nn.Module | None:
    if not C.is_norm(m):
        return None
    kw = dict(kw)
    kw.setdefault("dim", _dim_of(m))
    new = create_norm(to, m.num_features, **kw)
    src_state = {k: v for k, v in list(m.named_parameters(recurse=False)) + list(m.named_buffers(recurse=False))
                 if v is not None}
    dst_state = {k: v for k, v in list(new.named_parameters(recurse=False)) + list(new.named_buffers(recurse=False))
                 if v is not None}
    for key in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
        if key in src_state and key in dst_state and src_state[key].shape == dst_state[key].shape:
            dst_state[key].copy_(src_state[key])
    for attr in ("eps", "momentum"):
        if attr not in kw and hasattr(m, attr) and hasattr(new, attr):
            setattr(new, attr, getattr(m, attr))
    fk = _factory_kw(m)
    if fk:
        new = new.to(**fk)
    return new.train(m.training)


def convert(model: nn.Module, to: str, *, inplace: bool = False, **kw) -> nn.Module:
    """Replace normalization layers (see the module docstring); returns the converted model."""
    if to not in ("normlab", "torch"):
        to = resolve_norm_name(to)  # a helpful error for a bad name, before any work
    if not inplace:
        model = copy.deepcopy(model)
    report: list[tuple[str, str, str]] = []

    def make(m):
        return _twin(m, to) if to in ("normlab", "torch") else _to_norm(m, to, kw)

    root_new = make(model)
    if root_new is not None:
        report.append(("", type(model).__name__, type(root_new).__name__))
        root_new.convert_report = report
        return root_new
    for name, parent in list(model.named_modules()):
        for child_name, child in list(parent.named_children()):
            new = make(child)
            if new is not None:
                setattr(parent, child_name, new)
                full = f"{name}.{child_name}" if name else child_name
                report.append((full, type(child).__name__, type(new).__name__))
    model.convert_report = report
    return model
