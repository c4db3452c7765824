"""Freeze batch norms: keep using their running statistics, never update them, stop training gamma/beta.

``freeze_bn(model)`` puts every BatchNorm-family module into evaluation behaviour *persistently*: a forward
pre-hook sets ``module.training = False`` before each call, so a later ``model.train()`` (which flips the flag
back) does not make it use or update batch statistics. ``weight``/``bias`` (all the module's own parameters,
SwitchNorm's mixture logits included) get ``requires_grad=False``.
``unfreeze_bn(model)`` removes the hooks, restores ``requires_grad`` and puts the modules back in ``model``'s
current mode.
Typical use: fine-tuning with small batches. To bake the freeze into the architecture (and the checkpoint),
use ``convert(model, to="frozenbatchnorm")`` instead.
"""
from __future__ import annotations

from torch import nn

from . import _common as C

__all__ = ["freeze_bn", "unfreeze_bn", "is_frozen"]

_ATTR = "_normlab_freeze"


def _force_eval(module, args):
    module.training = False


def is_frozen(module: nn.Module) -> bool:
    return hasattr(module, _ATTR)


def freeze_bn(model: nn.Module, affine: bool = True) -> nn.Module:
    """Freeze every batch norm of ``model`` in place (``affine=False``: keep training gamma/beta). Returns it."""
    for m in model.modules():
        if not (C.is_batchnorm(m) or C.has_batch_stats(m)):
            continue
        if is_frozen(m):
            continue
        grads = {n: p.requires_grad for n, p in m.named_parameters(recurse=False)}
        m.register_forward_pre_hook(_force_eval)
        object.__setattr__(m, _ATTR, grads)
        if affine:
            for p in m.parameters(recurse=False):
                p.requires_grad_(False)
        m.training = False
    return model


def unfreeze_bn(model: nn.Module) -> nn.Module:
    """Undo :func:`freeze_bn` in place: hooks removed, ``requires_grad`` restored, mode = ``model.training``."""
    for m in model.modules():
        if not is_frozen(m):
            continue
        grads = getattr(m, _ATTR)
        # remove by identity rather than through a handle: handles of a deep-copied model point to the original
        for key in [k for k, hook in m._forward_pre_hooks.items() if hook is _force_eval]:
            del m._forward_pre_hooks[key]
        for n, p in m.named_parameters(recurse=False):
            p.requires_grad_(grads.get(n, True))
        m.training = model.training
        delattr(m, _ATTR)
    return model
