"""Precise batch-norm statistics: recompute the running statistics from data, or adapt them to a new domain.

Running statistics from an exponential moving average lag behind the weights and weight recent batches more
(Wu & Johnson, "Rethinking 'Batch' in BatchNorm", 2021). :func:`recompute_bn_stats` replaces them with the
*population* statistics of every value each norm sees over the given batches: the mean, and the **unbiased**
variance ``M2 / (n - 1)`` (``torch.nn``'s convention for ``running_var``), exact whatever the batch sizes.

Per channel, each batch contributes its count ``n_b``, mean ``m_b`` and sum of squared deviations ``M2_b``
(computed in float64 by a two-pass ``var_mean``), merged with Chan et al.'s pairwise update::

    delta = m_b - m;   n' = n + n_b;   m' = m + delta * n_b / n';   M2' = M2 + M2_b + delta^2 * n * n_b / n'

The forward passes run with every batch norm in training mode (as during training, each layer's input is
produced by upstream layers normalized with batch statistics); other modules keep their mode, so call
``model.train()`` first if dropout should be on as during training. Momenta are set to 0 during the passes, and
modes, momenta and ``num_batches_tracked`` are restored afterwards; only ``running_mean``/``running_var``
change. Works on torch.nn and normlab BatchNorm (BatchRenorm, GhostBatchNorm and SwitchNorm's batch part too).

:func:`adapt_bn` is AdaBN (Li et al., "Revisiting Batch Normalization For Practical Domain Adaptation", 2016):
the same recomputation on target-domain data, optionally blended with the source statistics (``prior``, as in
Schneider et al., 2020).
"""
from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor, nn

from . import _common as C

__all__ = ["recompute_bn_stats", "adapt_bn", "ChannelMoments"]


class ChannelMoments:
    """Running per-channel count, mean and M2 (float64), merged batch by batch (Chan et al.)."""

    def __init__(self) -> None:
        self.n = 0
        self.mean: Tensor | None = None
        self.m2: Tensor | None = None

    def update(self, x: Tensor) -> None:
        if x.dim() < 2 or x.numel() == 0:
            return
        x64 = x.detach().to(torch.float64)
        dims = [0] + list(range(2, x.dim()))
        nb = x.numel() // x.shape[1]
        var_b, mean_b = torch.var_mean(x64, dim=dims, correction=0)
        m2_b = var_b * nb
        if self.mean is None:
            self.n, self.mean, self.m2 = nb, mean_b, m2_b
            return
        n = self.n + nb
        delta = mean_b - self.mean
        self.mean = self.mean + delta * (nb / n)
        self.m2 = self.m2 + m2_b + delta.pow(2) * (self.n * nb / n)
        self.n = n

    def var(self, unbiased: bool = True) -> Tensor:
        return self.m2 / max(self.n - 1 if unbiased else self.n, 1)


@torch.no_grad()
def recompute_bn_stats(model: nn.Module, batches: Iterable, num_batches: int | None = None) -> nn.Module:
    """Set every batch norm's running statistics to the population statistics of its inputs over ``batches``.

    ``batches``: an iterable of tensors, or of tuples/lists whose first item is the input (a DataLoader);
    ``num_batches``: use only the first ones. Inputs are moved to the model's device. Returns ``model``
    (modified in place); ``model.bn_stats_count`` maps norm names to the number of values per channel seen.
    Norms that saw nothing keep their statistics.
    """
    norms = {name: m for name, m in model.named_modules() if C.has_batch_stats(m)}
    saved = {name: (m.training, m.momentum) for name, m in norms.items()}
    saved_nbt = {name: m.num_batches_tracked.clone() for name, m in norms.items()
                 if getattr(m, "num_batches_tracked", None) is not None}
    moments = {name: ChannelMoments() for name in norms}
    handles = [m.register_forward_pre_hook(_hook(moments[name])) for name, m in norms.items()]
    try:
        for m in norms.values():
            m.train()
            m.momentum = 0.0
        device = C.model_device(model)
        for x in C.iter_inputs(batches, num_batches, device):
            model(x)
    finally:
        for h in handles:
            h.remove()
        for name, m in norms.items():
            m.train(saved[name][0])
            m.momentum = saved[name][1]
            if name in saved_nbt:
                m.num_batches_tracked.copy_(saved_nbt[name])
    for name, m in norms.items():
        mom = moments[name]
        if mom.mean is not None:
            m.running_mean.copy_(mom.mean.to(m.running_mean.dtype))
            m.running_var.copy_(mom.var(unbiased=True).to(m.running_var.dtype))
    model.bn_stats_count = {name: moments[name].n for name in norms}
    return model


def _hook(moments: ChannelMoments):
    def hook(module, args):
        if args and isinstance(args[0], Tensor):
            moments.update(args[0])
    return hook


@torch.no_grad()
def adapt_bn(model: nn.Module, target_batches: Iterable, num_batches: int | None = None,
             prior: float = 0.0) -> nn.Module:
    """AdaBN: replace the running statistics by those of the target domain (in place; returns ``model``).

    ``prior`` in [0, 1] keeps that weight on the source statistics: ``running = prior * source +
    (1 - prior) * target`` (0: pure AdaBN). Labels in the batches are ignored, so unlabeled target data works.
    """
    if not 0.0 <= prior <= 1.0:
        raise ValueError(f"prior is the weight of the source statistics and must lie in [0, 1], got {prior}")
    source = {name: (m.running_mean.clone(), m.running_var.clone())
              for name, m in model.named_modules() if C.has_batch_stats(m)}
    recompute_bn_stats(model, target_batches, num_batches)
    if prior > 0:
        for name, m in model.named_modules():
            if name in source:
                m.running_mean.mul_(1 - prior).add_(source[name][0], alpha=prior)
                m.running_var.mul_(1 - prior).add_(source[name][1], alpha=prior)
    return model
