"""The contenders besides normlab and torch.nn: ``torch.compile`` of the composite formula, the d2l-style
from-scratch layer, d2l's LeNet with each library's batch norm, and the autograd floor."""
from __future__ import annotations

import torch
from torch import nn


def _allow_recompiles(limit: int = 512) -> None:
    """Every (shape, mode, grad mode) of the suite is a new graph of the same ``forward``: past dynamo's default
    limit of 8 it would silently run that contender eagerly, so the limit is raised for the benchmark."""
    import torch._dynamo
    for name in ("recompile_limit", "cache_size_limit", "accumulated_recompile_limit", "accumulated_cache_size_limit"):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, max(getattr(torch._dynamo.config, name), limit))


class CompositeBatchNorm(nn.Module):
    """Batch norm written as the formula in torch ops (what torch.compile gets to fuse)."""

    def __init__(self, c: int, eps: float = 1e-5, momentum: float = 0.1):
        super().__init__()
        self.eps, self.momentum = eps, momentum
        self.weight = nn.Parameter(torch.ones(c))
        self.bias = nn.Parameter(torch.zeros(c))
        self.register_buffer("running_mean", torch.zeros(c))
        self.register_buffer("running_var", torch.ones(c))

    def forward(self, x):
        shape = [1, x.shape[1]] + [1] * (x.dim() - 2)
        if self.training:
            dims = [0] + list(range(2, x.dim()))
            var, mean = torch.var_mean(x, dim=dims, correction=0)
            n = x.numel() // x.shape[1]
            with torch.no_grad():
                self.running_mean.lerp_(mean, self.momentum)
                self.running_var.lerp_(var * (n / max(n - 1, 1)), self.momentum)
        else:
            mean, var = self.running_mean, self.running_var
        scale = torch.rsqrt(var + self.eps) * self.weight
        return (x - mean.reshape(shape)) * scale.reshape(shape) + self.bias.reshape(shape)


class ScratchBatchNorm(nn.Module):
    """The d2l from-scratch layer (autograd through mean/var/sqrt); d2l's momentum 0.9 = torch's 0.1."""

    def __init__(self, c: int, eps: float = 1e-5, momentum: float = 0.9):
        super().__init__()
        self.eps, self.momentum = eps, momentum
        self.gamma = nn.Parameter(torch.ones(c))
        self.beta = nn.Parameter(torch.zeros(c))
        self.register_buffer("moving_mean", torch.zeros(c))
        self.register_buffer("moving_var", torch.ones(c))

    def forward(self, x):
        shape = [1, x.shape[1]] + [1] * (x.dim() - 2)
        if not torch.is_grad_enabled() or not self.training:
            x_hat = (x - self.moving_mean.reshape(shape)) / torch.sqrt(self.moving_var.reshape(shape) + self.eps)
        else:
            dims = [0] + list(range(2, x.dim()))
            mean = x.mean(dim=dims, keepdim=True)
            var = ((x - mean) ** 2).mean(dim=dims, keepdim=True)
            x_hat = (x - mean) / torch.sqrt(var + self.eps)
            self.moving_mean.data = self.momentum * self.moving_mean + (1 - self.momentum) * mean.reshape(-1)
            self.moving_var.data = self.momentum * self.moving_var + (1 - self.momentum) * var.reshape(-1)
        return self.gamma.reshape(shape) * x_hat + self.beta.reshape(shape)


def make_layer(impl: str, c: int, rank: int) -> nn.Module:
    import normlab
    d = {2: "1d", 3: "1d", 4: "2d", 5: "3d"}[rank]
    if impl == "normlab":
        return getattr(normlab, f"BatchNorm{d}")(c)
    if impl == "torch":
        return getattr(nn, f"BatchNorm{d}")(c)
    if impl == "compile":
        _allow_recompiles()
        return torch.compile(CompositeBatchNorm(c))
    if impl == "scratch":
        return ScratchBatchNorm(c)
    raise ValueError(impl)


def lenet(kind: str) -> nn.Module:
    """d2l's LeNet with batch norm (sigmoid activations) for 28x28 inputs."""
    import normlab
    if kind == "torch":
        bn2, bn1 = (lambda c: [nn.BatchNorm2d(c), nn.Sigmoid()]), (lambda c: [nn.BatchNorm1d(c), nn.Sigmoid()])
    elif kind == "normlab":
        bn2 = lambda c: [normlab.BatchNorm2d(c), nn.Sigmoid()]  # noqa: E731
        bn1 = lambda c: [normlab.BatchNorm1d(c), nn.Sigmoid()]  # noqa: E731
    else:  # normlab_fused
        bn2 = lambda c: [normlab.BatchNormAct2d(c, act="sigmoid")]  # noqa: E731
        bn1 = lambda c: [normlab.BatchNormAct1d(c, act="sigmoid")]  # noqa: E731
    return nn.Sequential(
        nn.Conv2d(1, 6, kernel_size=5, padding=2), *bn2(6), nn.AvgPool2d(2, 2),
        nn.Conv2d(6, 16, kernel_size=5), *bn2(16), nn.AvgPool2d(2, 2), nn.Flatten(),
        nn.Linear(16 * 5 * 5, 120), *bn1(120), nn.Linear(120, 84), *bn1(84), nn.Linear(84, 10))


class AutogradFloor(nn.Module):
    """``y = x * 2``: its forward+backward (one read and one write each way, one node through the autograd engine)
    is the least any layer's training step on ``x`` costs in eager PyTorch."""

    def forward(self, x):
        return x * 2.0
