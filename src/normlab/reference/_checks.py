"""Argument checks shared by the reference ops. Each error states the rule, shows the value, names the fix."""
from __future__ import annotations

import numpy as np


def as_f64(a, name: str) -> np.ndarray | None:
    """``a`` as a float64 array (the reference computes in float64 only); ``None`` passes through."""
    if a is None:
        return None
    arr = np.asarray(a, dtype=np.float64)
    return arr


def check_eps(eps: float) -> float:
    if not eps > 0:
        raise ValueError(f"eps must be > 0 (it keeps 1/sqrt(var + eps) finite on constant inputs), got {eps}; "
                         f"the usual value is 1e-5")
    return float(eps)


def check_param(p: np.ndarray | None, shape: tuple[int, ...], name: str, what: str) -> np.ndarray | None:
    """``p`` must be ``None`` or have exactly ``shape`` (one value per ``what``)."""
    if p is None:
        return None
    p = as_f64(p, name)
    if p.shape != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)} (one value per {what}), got {p.shape}")
    return p
