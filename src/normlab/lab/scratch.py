"""Batch normalization from scratch, the way d2l writes it: a few tensor ops, autograd does the backward.

This is the third implementation the lab can train with (``--impl scratch``), next to ``torch.nn`` and
``normlab.nn``. It exists to be read, and as a baseline: autograd differentiates through ``mean`` and ``var``,
so the backward is several small kernels instead of one closed form.

Training, for x of shape (N, C) or (N, C, H, W), statistics per channel over every other axis (m values):

    mu    = mean(x)                      var = mean((x - mu)^2)        (biased: divide by m)
    y     = gamma * (x - mu) / sqrt(var + eps) + beta
    running_mean <- (1 - momentum) * running_mean + momentum * mu
    running_var  <- (1 - momentum) * running_var  + momentum * var * m / (m - 1)   (unbiased, as torch.nn)

Evaluation uses ``running_mean`` / ``running_var`` instead of the batch statistics.

Momentum convention: ``momentum`` is the weight of the *new* batch (0.1 by default), as in ``torch.nn``;
``momentum=None`` keeps the cumulative average over ``num_batches_tracked``. d2l's code (and Keras, Flax, cs231n)
call the weight of the *old* value "momentum" (0.9): d2l ``momentum=0.9`` is ``momentum=0.1`` here.

Parameter and buffer names (``weight``, ``bias``, ``running_mean``, ``running_var``, ``num_batches_tracked``) and
shapes (C,) equal ``torch.nn.BatchNorm2d``'s, so state dicts move between the three implementations.
"""
from __future__ import annotations

import torch
from torch import nn


def batch_norm(x: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor, running_mean: torch.Tensor,
               running_var: torch.Tensor, *, training: bool, momentum: float, eps: float) -> torch.Tensor:
    """Normalize ``x``; in training also update the running buffers in place (``momentum`` weights the batch)."""
    if x.dim() not in (2, 4):
        raise ValueError(f"scratch batch_norm expects (N, C) or (N, C, H, W) input, got shape {tuple(x.shape)}")
    dims = (0,) if x.dim() == 2 else (0, 2, 3)
    shape = (1, -1) if x.dim() == 2 else (1, -1, 1, 1)
    if training:
        m = x.numel() // x.shape[1]
        if m < 2:
            raise ValueError(f"Expected more than 1 value per channel when training, got input size "
                             f"{list(x.shape)}: batch statistics of one value are undefined. Use a batch size "
                             f"of at least 2, or a per-sample norm (LayerNorm, GroupNorm).")
        mean = x.mean(dim=dims, keepdim=True)
        var = ((x - mean) ** 2).mean(dim=dims, keepdim=True)
        x_hat = (x - mean) / torch.sqrt(var + eps)
        with torch.no_grad():
            running_mean.mul_(1 - momentum).add_(momentum * mean.reshape(-1))
            running_var.mul_(1 - momentum).add_(momentum * var.reshape(-1) * (m / (m - 1)))
    else:
        x_hat = (x - running_mean.reshape(shape)) / torch.sqrt(running_var.reshape(shape) + eps)
    return gamma.reshape(shape) * x_hat + beta.reshape(shape)


class BatchNorm(nn.Module):
    """From-scratch batch norm for (N, C) and (N, C, H, W) inputs; arguments as ``torch.nn.BatchNorm2d``."""

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1):
        super().__init__()
        self.num_features, self.eps, self.momentum = num_features, eps, momentum
        self.weight = nn.Parameter(torch.ones(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))
        self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] != self.num_features:
            raise ValueError(f"expected {self.num_features} channels (dim 1), got input of shape {tuple(x.shape)}")
        momentum = self.momentum
        if self.training:
            self.num_batches_tracked.add_(1)
            if momentum is None:  # cumulative average: the k-th batch gets weight 1/k
                momentum = 1.0 / float(self.num_batches_tracked)
        return batch_norm(x, self.weight, self.bias, self.running_mean, self.running_var,
                          training=self.training, momentum=momentum or 0.0, eps=self.eps)

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}, momentum={self.momentum}"


# The same class serves 1d (N, C) and 2d (N, C, H, W) inputs.
BatchNorm1d = BatchNorm2d = BatchNorm
