r"""Ghost Batch Normalization: batch statistics per *virtual* batch.

Hoffer, Hubara, Soudry, "Train longer, generalize better: closing the generalization gap in large batch
training of neural networks", NeurIPS 2017.

Training: the batch (N, C, \*) is split along N into consecutive chunks of ``virtual_batch_size`` samples (the
last one may be smaller; a last chunk with a single value per channel joins the previous chunk). Each chunk is
batch-normalized with its own mean and biased variance. The running statistics take **one momentum step per
virtual batch**, in order, and ``num_batches_tracked`` counts virtual batches: one forward of N samples moves
the running statistics as ceil(N / virtual_batch_size) BatchNorm steps would (with ``momentum=None``, the
cumulative average weights every virtual batch equally). Evaluation is BatchNorm with the running statistics,
and ``virtual_batch_size >= N`` is exactly BatchNorm. Buffers and state_dict are BatchNorm's.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .. import functional as F
from ._overrides import has_torch_function_unary, overridden
from .batchnorm import _BatchNorm

__all__ = ["GhostBatchNorm1d", "GhostBatchNorm2d", "GhostBatchNorm3d"]


def chunk_sizes(n: int, spatial: int, virtual_batch_size: int) -> list[int]:
    """Virtual batch sizes for ``n`` samples of ``spatial`` values each (a lone single value is merged)."""
    sizes = [min(virtual_batch_size, n - i) for i in range(0, n, virtual_batch_size)]
    if len(sizes) > 1 and sizes[-1] * spatial == 1:
        sizes[-2] += sizes.pop()
    return sizes


class _GhostBatchNorm(_BatchNorm):
    def __init__(self, num_features: int, virtual_batch_size: int = 32, eps: float = 1e-5,
                 momentum: float | None = 0.1, affine: bool = True, track_running_stats: bool = True,
                 device=None, dtype=None) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype)
        if not isinstance(virtual_batch_size, int) or virtual_batch_size < 1:
            raise ValueError(f"virtual_batch_size must be a positive int (samples per virtual batch), "
                             f"got {virtual_batch_size!r}")
        self.virtual_batch_size = virtual_batch_size

    def forward(self, input: Tensor) -> Tensor:
        if has_torch_function_unary(input):  # torch.fx's Proxy, a tensor subclass: as torch.nn's layers
            return overridden(self, input)
        if not self.training or input.dim() < 2 or input.shape[0] <= self.virtual_batch_size:
            return super().forward(input)
        self._check_input_dim(input)
        if input.shape[1] != self.num_features or input.numel() == 0:
            return super().forward(input)
        spatial = input[0, 0].numel()
        update = self.track_running_stats and self.running_mean is not None
        outs = []
        for chunk in torch.split(input, chunk_sizes(input.shape[0], spatial, self.virtual_batch_size)):
            momentum = self._momentum_for_this_batch()
            outs.append(F.batch_norm(chunk, self.running_mean if update else None,
                                     self.running_var if update else None, self.weight, self.bias, True,
                                     momentum, self.eps, act=self.act))
        return F._restore_format(torch.cat(outs), input)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", virtual_batch_size={self.virtual_batch_size}"


class GhostBatchNorm1d(_GhostBatchNorm):
    """Ghost BatchNorm on (N, C) or (N, C, L) inputs. See the module docstring."""

    _ranks, _layout = (2, 3), "(N, C) or (N, C, L)"


class GhostBatchNorm2d(_GhostBatchNorm):
    """Ghost BatchNorm on (N, C, H, W) inputs. See the module docstring.

    Example::

        >>> gbn = GhostBatchNorm2d(16, virtual_batch_size=32)
        >>> y = gbn(torch.randn(256, 16, 8, 8))     # 8 virtual batches, 8 running-statistics steps
    """

    _ranks, _layout = (4,), "(N, C, H, W)"


class GhostBatchNorm3d(_GhostBatchNorm):
    """Ghost BatchNorm on (N, C, D, H, W) inputs. See the module docstring."""

    _ranks, _layout = (5,), "(N, C, D, H, W)"
