"""Batch-norm modules: ``BatchNorm1d``, ``BatchNorm2d``, ``BatchNorm3d``, drop-in for ``torch.nn``'s.

Same arguments, defaults, parameters (``weight``, ``bias``), buffers (``running_mean``, ``running_var``,
``num_batches_tracked``), state_dict keys and errors as ``torch.nn``, so a checkpoint moves in both directions
with ``strict=True``. The module holds state and policy; the math is :func:`normlab.functional.batch_norm`.

Policy (as ``torch.nn``)
------------------------
* training and ``track_running_stats``: normalize with the batch's statistics, count the batch in
  ``num_batches_tracked`` and update the running statistics with weight ``momentum`` on the new batch, or, with
  ``momentum=None``, with weight ``1 / num_batches_tracked`` (a cumulative average of all batches seen).
* evaluation: normalize with the running statistics if the module has them, else with the batch's.
* ``track_running_stats`` may be flipped after construction: buffers that exist are used in evaluation, and
  are not updated in training while it is False.

Momentum: ours is the weight of the new batch (default 0.1). Keras/Flax/cs231n/d2l's "momentum" is the
weight of the old value, i.e. ``1 - momentum``: their 0.9 is our 0.1, their 0.99 our 0.01.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from .. import functional as F
from .. import kernels as K
from ._affine import add_affine, affine_of, pair_of, reset_affine
from ._overrides import has_torch_function_unary, overridden


class _NormBase(nn.Module):
    """Parameters and running-statistics buffers shared by batch norm and instance norm."""

    _version = 2

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1, affine: bool = True,
                 track_running_stats: bool = True, device=None, dtype=None, *, bias: bool = True) -> None:
        nn.Module.__init__(self)  # not torch.nn's __init__, a base class of the public layers (see BatchNorm1d)
        if not isinstance(num_features, int) or num_features <= 0:
            raise ValueError(f"num_features must be a positive int (the number of channels C), "
                             f"got {num_features!r}")
        F._check_eps(eps)
        if momentum is not None and not 0.0 <= momentum <= 1.0:
            raise ValueError(f"momentum is the weight of the new batch and must lie in [0, 1] (or be None for a "
                             f"cumulative average), got momentum={momentum}; Keras-style 0.9 is our 0.1")
        factory = {"device": device, "dtype": dtype}
        self.num_features = num_features
        self.eps = eps
        self.momentum = momentum
        self.affine = affine
        self.track_running_stats = track_running_stats
        add_affine(self, num_features, affine, bias, **factory)
        if track_running_stats:
            self.register_buffer("running_mean", torch.zeros(num_features, **factory))
            self.register_buffer("running_var", torch.ones(num_features, **factory))
            self.register_buffer("num_batches_tracked",
                                 torch.tensor(0, dtype=torch.long, device=device))
        else:
            self.register_buffer("running_mean", None)
            self.register_buffer("running_var", None)
            self.register_buffer("num_batches_tracked", None)
        self.reset_parameters()

    def reset_running_stats(self) -> None:
        if self.track_running_stats:
            self.running_mean.zero_()
            self.running_var.fill_(1)
            self.num_batches_tracked.zero_()

    def reset_parameters(self) -> None:
        self.reset_running_stats()
        reset_affine(self)

    # accepted input ranks and their layout, set by the 1d/2d/3d subclasses of every family
    _ranks: tuple[int, ...] = ()
    _layout: str = ""

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() not in self._ranks:
            ranks = " or ".join(f"{r}D" for r in self._ranks)
            raise ValueError(f"expected {ranks} input (got {input.dim()}D input of shape {tuple(input.shape)}); "
                             f"{type(self).__name__} takes {self._layout}")

    def extra_repr(self) -> str:
        return ("{num_features}, eps={eps}, momentum={momentum}, affine={affine}, bias={use_bias}, "
                "track_running_stats={track_running_stats}".format(**self.__dict__, use_bias=self.bias is not None))

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        # Checkpoints written before num_batches_tracked existed (version < 2, or a bare dict) load as 0.
        version = local_metadata.get("version", None)
        key = prefix + "num_batches_tracked"
        if (version is None or version < 2) and self.track_running_stats and key not in state_dict:
            state_dict[key] = torch.tensor(0, dtype=torch.long)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)


class _BatchNorm(_NormBase):
    """Batch norm over channel dimension 1; subclasses only check the input's rank."""

    act = "identity"  # BatchNormAct sets a fused activation

    def _momentum_for_this_batch(self) -> float:
        """Count the batch and return the weight of the new batch in the running statistics."""
        counter = self._buffers.get("num_batches_tracked")
        if not (self.training and self.track_running_stats and counter is not None):
            return 0.0 if self.momentum is None else self.momentum
        K.count_batch(counter)
        if self.momentum is None:
            return 1.0 / float(counter)
        return self.momentum

    def _check_input(self, input: Tensor) -> None:
        self._check_input_dim(input)
        if input.shape[1] != self.num_features:
            raise F.NormError(f"{type(self).__name__}({self.num_features}) got an input with "
                              f"{input.shape[1]} channels (shape {tuple(input.shape)}); channels are "
                              f"dimension 1: set num_features={input.shape[1]} or permute the input")

    def forward(self, input: Tensor) -> Tensor:
        if has_torch_function_unary(input):  # torch.fx's Proxy, a tensor subclass: as torch.nn's layers
            return overridden(self, input)
        if input.dim() not in self._ranks or input.shape[1] != self.num_features:
            self._check_input(input)
        training = self.training
        # parameters and buffers straight from their dicts: nn.Module.__getattr__ costs ~0.5 us per name, which
        # adds up on small layers (a (256, 120) forward takes ~30 us in all)
        buffers = self._buffers
        running_mean, running_var = pair_of(self, buffers, "running_mean", "running_var")
        weight, bias = affine_of(self)
        use_batch_stats = training or (running_mean is None and running_var is None)
        if training and not self.track_running_stats:
            running_mean = running_var = None
        # eager CPU inputs: the whole forward, the batch's count included, in one C++ call (Python between
        # the steps cost a (256, 120) forward+backward 10-12 %, its forward 21-23 %, in the bench's rotation, where
        # each call finds its code evicted by the other contenders': BENCHMARKS.md)
        counter = buffers.get("num_batches_tracked") if training and self.track_running_stats else None
        momentum = 0.0 if self.momentum is None and counter is None else self.momentum
        y = F._native_batch_norm(input, running_mean, running_var, weight, bias, use_batch_stats, momentum, self.eps,
                                 self.act, counter)
        if y is not None:
            return y
        # evaluation: no running-statistics update, so no momentum
        momentum = self._momentum_for_this_batch() if training and input.numel() else 0.0
        return F._batch_norm_glue(input, running_mean, running_var, weight, bias, use_batch_stats, momentum,
                                  self.eps, self.act)


# The public layers derive from torch.nn's too (normlab's methods first), so that code which asks
# isinstance(m, nn.BatchNorm2d) or nn.modules.batchnorm._BatchNorm finds them: torch.optim.swa_utils.update_bn,
# nn.SyncBatchNorm.convert_sync_batchnorm, torch.func.replace_all_batch_norm_modules_, torchvision's
# split_normalization_params (no weight decay on norm parameters). BatchNormAct, whose activation such code would
# drop, does not.
class BatchNorm1d(_BatchNorm, nn.BatchNorm1d):
    r"""Batch norm over a 2-D (N, C) or 3-D (N, C, L) input: per feature/channel over N (and L).

    .. math:: y = \frac{x - \mathrm{E}[x]}{\sqrt{\mathrm{Var}[x] + \epsilon}} \gamma + \beta

    Args: num_features (C), eps=1e-5, momentum=0.1 (weight of the new batch; None: cumulative average),
    affine=True, track_running_stats=True, device, dtype, and keyword-only bias=True
    (False: no β). Example: ``BatchNorm1d(100)(torch.randn(20, 100))``.
    """

    _ranks, _layout = (2, 3), "(N, C) or (N, C, L)"


class BatchNorm2d(_BatchNorm, nn.BatchNorm2d):
    r"""Batch norm over a 4-D (N, C, H, W) input: per channel over N, H, W (a conv layer's feature maps).

    .. math:: y = \frac{x - \mathrm{E}[x]}{\sqrt{\mathrm{Var}[x] + \epsilon}} \gamma + \beta

    Args as :class:`BatchNorm1d`. Example: ``BatchNorm2d(64)(torch.randn(32, 64, 56, 56))``.
    """

    _ranks, _layout = (4,), "(N, C, H, W)"


class BatchNorm3d(_BatchNorm, nn.BatchNorm3d):
    r"""Batch norm over a 5-D (N, C, D, H, W) input: per channel over N, D, H, W.

    Args as :class:`BatchNorm1d`. Example: ``BatchNorm3d(8)(torch.randn(4, 8, 6, 10, 10))``.
    """

    _ranks, _layout = (5,), "(N, C, D, H, W)"
