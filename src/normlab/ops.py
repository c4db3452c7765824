"""The kernels as ``torch.library`` custom operators, so ``torch.compile(..., fullgraph=True)`` can trace them.

Eager code calls :mod:`normlab.kernels` directly (no dispatcher overhead); code being compiled calls these
operators instead (see ``normlab.functional._kernels``). Each operator has a fake (meta) implementation that
gives output shapes, dtypes and memory formats without computing anything. Gradients a caller does not need
come back as empty tensors, since an operator cannot return ``None``.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import kernels as K
from .kernels import acc_dtype
from .kernels.portable import empty_output

def _or_empty(t: Tensor | None, like: Tensor) -> Tensor:
    return like.new_empty(0) if t is None else t


@torch.library.custom_op("normlab::bn_train_forward", mutates_args=())
def bn_train_forward(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], eps: float,
                     act: str) -> tuple[Tensor, Tensor, Tensor]:
    return K.bn_train_forward(x, weight, bias, eps, act)


@bn_train_forward.register_fake
def _(x, weight, bias, eps, act):
    c = x.shape[1]
    return empty_output(x), x.new_empty(c, dtype=torch.float64), x.new_empty(c, dtype=acc_dtype(x.dtype))


@torch.library.custom_op("normlab::bn_eval_forward", mutates_args=())
def bn_eval_forward(x: Tensor, running_mean: Tensor, running_var: Tensor, weight: Optional[Tensor],
                    bias: Optional[Tensor], eps: float, act: str) -> Tensor:
    return K.bn_eval_forward(x, running_mean, running_var, weight, bias, eps, act)


@bn_eval_forward.register_fake
def _(x, running_mean, running_var, weight, bias, eps, act):
    return empty_output(x)


@torch.library.custom_op("normlab::bn_backward", mutates_args=())
def bn_backward(dy: Tensor, x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], mean: Tensor,
                invstd: Tensor, act: str, training: bool, need_dx: bool, need_dw: bool,
                need_db: bool) -> tuple[Tensor, Tensor, Tensor]:
    dx, dw, db = K.bn_backward(dy, x, weight, bias, mean, invstd, act, training, (need_dx, need_dw, need_db))
    return _or_empty(dx, x), _or_empty(dw, invstd), _or_empty(db, invstd)


@bn_backward.register_fake
def _(dy, x, weight, bias, mean, invstd, act, training, need_dx, need_dw, need_db):
    c = x.shape[1]
    return (empty_output(x) if need_dx else x.new_empty(0),
            invstd.new_empty(c if need_dw else 0), invstd.new_empty(c if need_db else 0))


@torch.library.custom_op("normlab::gn_forward", mutates_args=())
def gn_forward(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], groups: int,
               eps: float) -> tuple[Tensor, Tensor, Tensor]:
    return K.gn_forward(x, weight, bias, groups, eps)


@gn_forward.register_fake
def _(x, weight, bias, groups, eps):
    acc = acc_dtype(x.dtype)
    stats = (x.shape[0], groups)
    return torch.empty_like(x), x.new_empty(stats, dtype=acc), x.new_empty(stats, dtype=acc)


@torch.library.custom_op("normlab::gn_backward", mutates_args=())
def gn_backward(dy: Tensor, x: Tensor, weight: Optional[Tensor], mean: Tensor, invstd: Tensor, groups: int,
                need_dx: bool, need_dw: bool, need_db: bool) -> tuple[Tensor, Tensor, Tensor]:
    dx, dw, db = K.gn_backward(dy, x, weight, mean, invstd, groups, (need_dx, need_dw, need_db))
    return _or_empty(dx, x), _or_empty(dw, mean), _or_empty(db, mean)


@gn_backward.register_fake
def _(dy, x, weight, mean, invstd, groups, need_dx, need_dw, need_db):
    c = x.shape[1]
    return (torch.empty_like(x) if need_dx else x.new_empty(0),
            mean.new_empty(c if need_dw else 0), mean.new_empty(c if need_db else 0))
