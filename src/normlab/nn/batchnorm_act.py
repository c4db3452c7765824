r"""Batch norm fused with its activation: ``BatchNormAct2d(C, act="relu")`` == ``BatchNorm2d(C)`` then ReLU.

.. math::
    y = \mathrm{act}\Big(\frac{x - \mathrm{E}[x]}{\sqrt{\mathrm{Var}[x] + \epsilon}}\,\gamma + \beta\Big),
    \qquad \mathrm{act} \in \{\text{identity}, \text{relu}, \text{silu}, \text{sigmoid}\}

Why fuse: unfused, the activation reads and writes the whole tensor once more forward and twice more backward,
and autograd keeps its input alive as well. Fused, the kernel applies ``act`` while it writes ``y``, and the
backward recomputes the pre-activation ``z = xhat * gamma + beta`` from ``x`` (which batch norm saves anyway), so
the fused layer saves exactly what a plain batch norm saves. Measured speed-ups are in BENCHMARKS.md.

Parameters, buffers and state_dict keys are exactly :class:`normlab.BatchNorm2d`'s (and hence
``torch.nn.BatchNorm2d``'s): a checkpoint of ``nn.Sequential(BatchNorm2d(C), ReLU())`` loads into
``BatchNormAct2d(C, act="relu")`` with ``strict=True`` under the batch-norm layer's key prefix; the activation has
no state. Example::

    >>> import torch, normlab
    >>> layer = normlab.BatchNormAct2d(16, act="relu", momentum=0.1)
    >>> y = layer(torch.randn(8, 16, 5, 5))
    >>> bool((y >= 0).all())
    True
"""
from __future__ import annotations

from ..kernels import ACTIVATIONS
from .batchnorm import BatchNorm1d, BatchNorm2d, BatchNorm3d, _BatchNorm


class _ActMixin:
    """Stores the activation name; the forward of :class:`normlab.nn.batchnorm._BatchNorm` passes it on."""

    def _set_act(self, act: str) -> None:
        if act not in ACTIVATIONS:
            raise ValueError(f"{type(self).__name__}: unknown activation act={act!r}; expected one of "
                             f"{', '.join(ACTIVATIONS)}")
        self.act = act

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, act={self.act!r}"


class BatchNormAct1d(_ActMixin, _BatchNorm):
    """:class:`normlab.BatchNorm1d` on (N, C) or (N, C, L), followed by ``act`` in the same pass."""

    _ranks, _layout = BatchNorm1d._ranks, BatchNorm1d._layout  # not a subclass: see normlab.nn.batchnorm

    def __init__(self, num_features: int, act: str = "relu", **batchnorm_args) -> None:
        super().__init__(num_features, **batchnorm_args)
        self._set_act(act)


class BatchNormAct2d(_ActMixin, _BatchNorm):
    """:class:`normlab.BatchNorm2d` on (N, C, H, W), followed by ``act`` in the same pass."""

    _ranks, _layout = BatchNorm2d._ranks, BatchNorm2d._layout  # not a subclass: see normlab.nn.batchnorm

    def __init__(self, num_features: int, act: str = "relu", **batchnorm_args) -> None:
        super().__init__(num_features, **batchnorm_args)
        self._set_act(act)


class BatchNormAct3d(_ActMixin, _BatchNorm):
    """:class:`normlab.BatchNorm3d` on (N, C, D, H, W), followed by ``act`` in the same pass."""

    _ranks, _layout = BatchNorm3d._ranks, BatchNorm3d._layout  # not a subclass: see normlab.nn.batchnorm

    def __init__(self, num_features: int, act: str = "relu", **batchnorm_args) -> None:
        super().__init__(num_features, **batchnorm_args)
        self._set_act(act)


__all__ = ["BatchNormAct1d", "BatchNormAct2d", "BatchNormAct3d"]
