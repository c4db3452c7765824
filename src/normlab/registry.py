"""One constructor for every norm: ``create_norm(name, num_features, **kw)``.

All norms are built *channels first*: the module takes (N, C, \\*) with C = ``num_features`` and normalizes as

=================  =======  =================================================================================
name               alias    module (``impl="normlab"``; ``impl="torch"`` gives the ``torch.nn`` twin)
=================  =======  =================================================================================
batchnorm          bn       ``BatchNorm{dim}d(C, **kw)``
groupnorm          gn       ``GroupNorm(groups, C, **kw)``, ``groups`` (default 32) lowered to the largest
                            divisor of C that is <= groups
layernorm          ln       ``GroupNorm(1, C, **kw)``: per sample over (C, \\*), per-channel affine. This is the
                            channels-first "LayerNorm" of ConvNets; ``torch.nn.LayerNorm([C, H, W])`` would need
                            the spatial size and learn one γ per element instead.
instancenorm       in       ``InstanceNorm{dim}d(C, affine=True, **kw)`` (affine on by default here, unlike
                            torch.nn, so that it swaps in for BatchNorm)
switchnorm         sn       ``SwitchNorm{dim}d(C, **kw)``
batchrenorm        brn      ``BatchRenorm{dim}d(C, **kw)``
ghostbatchnorm     gbn      ``GhostBatchNorm{dim}d(C, **kw)`` (``virtual_batch_size`` default 32)
frozenbatchnorm    fbn      ``FrozenBatchNorm{dim}d(C, **kw)``
none               identity ``torch.nn.Identity()`` (keyword arguments are ignored)
=================  =======  =================================================================================

``dim`` (1, 2 or 3, default 2) picks the 1d/2d/3d class; norms without a rank ignore it. Every other keyword
goes to the class (``eps``, ``momentum``, ``affine``, ``device``, ``dtype``, ...). Names are case-insensitive
and ``-``/``_`` are ignored ("Batch_Norm" works).

``register_norm(name, factory, aliases=())`` adds a norm: ``factory(num_features, *, dim, impl, **kw)``
returns a module. ``list_norms()`` lists the names. Example::

    >>> create_norm("gn", 48, groups=32)          # GroupNorm(24, 48): 32 does not divide 48
    >>> create_norm("bn", 16, dim=1, impl="torch")  # torch.nn.BatchNorm1d(16)
"""
from __future__ import annotations

import difflib
from collections.abc import Callable

from torch import nn

__all__ = ["create_norm", "register_norm", "list_norms", "resolve_norm_name", "divisor_groups"]

_FACTORIES: dict[str, Callable[..., nn.Module]] = {}
_ALIASES: dict[str, str] = {}
IMPLS = ("normlab", "torch")


def _key(name: str) -> str:
    return str(name).lower().replace("-", "").replace("_", "").replace(" ", "")


def register_norm(name: str, factory: Callable[..., nn.Module], aliases: tuple[str, ...] | list[str] = (),
                  overwrite: bool = False) -> None:
    """Register ``factory(num_features, *, dim, impl, **kw) -> nn.Module`` under ``name`` (and ``aliases``)."""
    key = _key(name)
    taken = [k for k in [key, *map(_key, aliases)] if (k in _FACTORIES or k in _ALIASES) and not overwrite]
    if taken:
        raise ValueError(f"norm name(s) {taken} already registered; pass overwrite=True to replace")
    _FACTORIES[key] = factory
    for a in aliases:
        _ALIASES[_key(a)] = key


def list_norms(with_aliases: bool = False) -> list[str] | dict[str, list[str]]:
    """Registered names (sorted); ``with_aliases=True``: ``{name: [aliases]}``."""
    if not with_aliases:
        return sorted(_FACTORIES)
    return {k: sorted(a for a, t in _ALIASES.items() if t == k) for k in sorted(_FACTORIES)}


def resolve_norm_name(name: str) -> str:
    """The canonical registered name for ``name`` or an alias; ``ValueError`` naming the valid ones otherwise."""
    key = _key(name)
    key = _ALIASES.get(key, key)
    if key in _FACTORIES:
        return key
    valid = ", ".join(f"{k} ({'/'.join(v)})" if v else k for k, v in list_norms(with_aliases=True).items())
    close = difflib.get_close_matches(_key(name), list(_FACTORIES) + list(_ALIASES), n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    raise ValueError(f"unknown norm {name!r}.{hint} Valid names (aliases): {valid}")


def create_norm(name: str, num_features: int, *, dim: int = 2, impl: str = "normlab", **kw) -> nn.Module:
    """Build the norm ``name`` for ``num_features`` channels (see the module docstring for the table)."""
    if dim not in (1, 2, 3):
        raise ValueError(f"dim selects the 1d/2d/3d class and must be 1, 2 or 3, got dim={dim!r}")
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got impl={impl!r}")
    return _FACTORIES[resolve_norm_name(name)](num_features, dim=dim, impl=impl, **kw)


def divisor_groups(num_channels: int, groups: int = 32) -> int:
    """The largest divisor of ``num_channels`` that is at most ``groups`` (at least 1)."""
    g = max(1, min(int(groups), int(num_channels)))
    while num_channels % g:
        g -= 1
    return g


# ----------------------------------------------------------------------------------------------------------
# built-in norms
# ----------------------------------------------------------------------------------------------------------
def _ranked(family: str, torch_name: str | None = None, defaults: dict | None = None):
    """Factory for a family with 1d/2d/3d classes named ``{family}{dim}d``."""
    def factory(num_features, *, dim=2, impl="normlab", **kw):
        kw = {**(defaults or {}), **kw}
        if impl == "torch":
            if torch_name is None:
                raise ValueError(f"{family} has no torch.nn implementation; use impl='normlab'")
            return getattr(nn, f"{torch_name}{dim}d")(num_features, **kw)
        from . import nn as nlnn
        return getattr(nlnn, f"{family}{dim}d")(num_features, **kw)
    return factory


def _groupnorm(num_features, *, dim=2, impl="normlab", groups=32, num_groups=None, **kw):
    g = divisor_groups(num_features, groups if num_groups is None else num_groups)
    if impl == "torch":
        return nn.GroupNorm(g, num_features, **kw)
    from .nn import GroupNorm
    return GroupNorm(g, num_features, **kw)


def _layernorm(num_features, *, dim=2, impl="normlab", **kw):
    return _groupnorm(num_features, dim=dim, impl=impl, groups=1, **kw)


def _identity(num_features, *, dim=2, impl="normlab", **kw):
    return nn.Identity()


register_norm("batchnorm", _ranked("BatchNorm", "BatchNorm"), aliases=("bn",))
register_norm("groupnorm", _groupnorm, aliases=("gn",))
register_norm("layernorm", _layernorm, aliases=("ln",))
register_norm("instancenorm", _ranked("InstanceNorm", "InstanceNorm", {"affine": True}), aliases=("in",))
register_norm("switchnorm", _ranked("SwitchNorm"), aliases=("sn",))
register_norm("batchrenorm", _ranked("BatchRenorm"), aliases=("brn",))
register_norm("ghostbatchnorm", _ranked("GhostBatchNorm"), aliases=("gbn", "ghostbn"))
register_norm("frozenbatchnorm", _ranked("FrozenBatchNorm"), aliases=("fbn", "frozenbn"))
register_norm("none", _identity, aliases=("identity",))
