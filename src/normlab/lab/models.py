"""The lab's models, each with a pluggable normalization layer.

``build_model(name, norm=..., impl=..., placement=...)`` returns an ``nn.Module`` taking (N, 1, 28, 28) images and
returning (N, 10) logits.

Models (``MODELS``):

* ``lenet``: d2l's LeNet with norms: conv5x6 (pad 2) -> norm -> sigmoid -> avgpool2 -> conv5x16 -> norm -> sigmoid
  -> avgpool2 -> fc120 -> norm -> sigmoid -> fc84 -> norm -> sigmoid -> fc10. Xavier-uniform init, as d2l's
  ``train_ch6``.
* ``lenet-relu``: conv5x20 -> maxpool2 -> norm -> relu -> conv5x50 -> maxpool2 -> norm -> relu -> fc500 -> relu
  -> fc10.
* ``mlp``: 784 -> 512 -> norm -> relu -> 256 -> norm -> relu -> 10.
* ``bn-paper-mlp``: 784 -> 100 -> norm -> sigmoid (three times) -> 10, weights N(0, 0.1^2), as in the MNIST
  experiment of Ioffe & Szegedy (2015), section 4.1.
* ``rnn``: the 28 image rows are 28 time steps of an Elman RNN (hidden 128, tanh); norm ``ln`` (LayerNorm of the
  pre-activation), ``bn`` (a separate BatchNorm per time step, Cooijmans et al. 2017) or ``none``.

Norms (``--norm``): ``none``, ``bn`` (batch), ``gn`` (group), ``ln`` (layer), ``in`` (instance), and any other
name of ``normlab.create_norm``'s registry (``switchnorm``, ``batchrenorm`` ...; always normlab's layers).
For conv features ``ln`` normalizes over (C, H, W) (GroupNorm with one group) and ``in`` over (H, W) per channel;
for fc features ``in`` has one value per channel and sample, which cannot be normalized, so fc layers get no norm
under ``in``. ``gn`` uses the largest divisor of C that is at most min(8, C / 2) as the group count.

Implementations (``--impl``): ``normlab`` (``normlab.nn``), ``torch`` (``torch.nn``), ``scratch``
(``normlab.lab.scratch``: batch norm only, autograd through mean and var).

Placement (``--placement``): ``before`` (norm before the activation, as in the BN paper and d2l) or ``after``
(activation, then norm).
"""
from __future__ import annotations

import torch
from torch import nn

MODELS = ["lenet", "lenet-relu", "mlp", "bn-paper-mlp", "rnn"]
NORMS = ["none", "bn", "gn", "ln", "in"]
IMPLS = ["normlab", "torch", "scratch"]
PLACEMENTS = ["before", "after"]
_LONG_NAMES = {"batchnorm": "bn", "groupnorm": "gn", "layernorm": "ln", "instancenorm": "in"}


def default_groups(channels: int) -> int:
    """Largest divisor of ``channels`` that is at most min(8, channels // 2) (at least 1)."""
    for g in range(min(8, max(1, channels // 2)), 0, -1):
        if channels % g == 0:
            return g
    return 1


def _layers(impl: str):
    """The module namespace providing BatchNorm1d/2d, GroupNorm, LayerNorm, InstanceNorm2d for ``impl``."""
    if impl == "torch":
        return nn
    if impl == "normlab":
        try:
            import normlab.nn as layers
        except ImportError as err:
            raise ImportError(f"--impl normlab needs normlab.nn, which failed to import ({err}); "
                              f"use --impl torch meanwhile") from err
        return layers
    if impl == "scratch":
        from . import scratch
        return scratch
    raise ValueError(f"unknown implementation {impl!r}; choose from {IMPLS}")


def make_norm(norm: str, channels: int, *, conv: bool, impl: str = "normlab",
              momentum: float | None = 0.1, groups: int | None = None) -> nn.Module:
    """One normalization layer for ``channels`` features of a conv (N, C, H, W) or fc (N, C) layer."""
    norm = _LONG_NAMES.get(norm, norm)
    if norm == "none":
        return nn.Identity()
    if impl == "scratch" and norm != "bn":
        raise ValueError(f"--impl scratch provides batch norm only; --norm {norm} needs --impl normlab or torch")
    layers = _layers(impl)
    if norm == "bn":
        cls = layers.BatchNorm2d if conv else layers.BatchNorm1d
        return cls(channels, momentum=momentum)
    if norm == "gn":
        return layers.GroupNorm(groups or default_groups(channels), channels)
    if norm == "ln":
        return layers.GroupNorm(1, channels) if conv else layers.LayerNorm(channels)
    if norm == "in":
        return layers.InstanceNorm2d(channels, affine=True) if conv else nn.Identity()
    try:  # the rest of normlab's registry (switchnorm, batchrenorm ...): normlab layers whatever ``impl`` says
        from normlab import create_norm
    except ImportError:
        create_norm = None
    if create_norm is not None:
        try:
            return create_norm(norm, channels, dim=2 if conv else 1)
        except KeyError:
            pass
    raise ValueError(f"unknown norm {norm!r}; choose from {NORMS} or a name of normlab.create_norm's registry")


class _Factory:
    """Builds the (norm, activation) pair in the chosen order."""

    def __init__(self, norm, impl, placement, momentum):
        if placement not in PLACEMENTS:
            raise ValueError(f"unknown placement {placement!r}; choose from {PLACEMENTS}")
        self.norm, self.impl, self.placement, self.momentum = norm, impl, placement, momentum

    def block(self, channels: int, act: nn.Module, conv: bool) -> list[nn.Module]:
        layer = make_norm(self.norm, channels, conv=conv, impl=self.impl, momentum=self.momentum)
        return [layer, act] if self.placement == "before" else [act, layer]


def lenet(f: _Factory) -> nn.Module:
    net = nn.Sequential(
        nn.Conv2d(1, 6, kernel_size=5, padding=2), *f.block(6, nn.Sigmoid(), True), nn.AvgPool2d(2, 2),
        nn.Conv2d(6, 16, kernel_size=5), *f.block(16, nn.Sigmoid(), True), nn.AvgPool2d(2, 2),
        nn.Flatten(),
        nn.Linear(16 * 5 * 5, 120), *f.block(120, nn.Sigmoid(), False),
        nn.Linear(120, 84), *f.block(84, nn.Sigmoid(), False),
        nn.Linear(84, 10))
    for m in net.modules():  # d2l's train_ch6 initializes with Xavier uniform
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.xavier_uniform_(m.weight)
    return net


def lenet_relu(f: _Factory) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 20, kernel_size=5), nn.MaxPool2d(2), *f.block(20, nn.ReLU(), True),
        nn.Conv2d(20, 50, kernel_size=5), nn.MaxPool2d(2), *f.block(50, nn.ReLU(), True),
        nn.Flatten(),
        nn.Linear(50 * 4 * 4, 500), nn.ReLU(),
        nn.Linear(500, 10))


def mlp(f: _Factory) -> nn.Module:
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(784, 512), *f.block(512, nn.ReLU(), False),
        nn.Linear(512, 256), *f.block(256, nn.ReLU(), False),
        nn.Linear(256, 10))


def bn_paper_mlp(f: _Factory, init_std: float = 0.1) -> nn.Module:
    layers: list[nn.Module] = [nn.Flatten()]
    width_in = 784
    for _ in range(3):
        layers += [nn.Linear(width_in, 100), *f.block(100, nn.Sigmoid(), False)]
        width_in = 100
    layers.append(nn.Linear(100, 10))
    net = nn.Sequential(*layers)
    for m in net.modules():  # "small random Gaussian values"
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=init_std)
            nn.init.zeros_(m.bias)
    return net


class RowRNN(nn.Module):
    """Elman RNN over the 28 image rows: h_t = tanh(norm_t(W x_t + U h_{t-1} + b)); logits = fc(h_28).

    ``norm="ln"``: one LayerNorm shared over time. ``norm="bn"``: one BatchNorm1d per time step, each with its own
    running statistics (the statistics of step 1 and step 28 differ). ``norm="none"``: no normalization.
    """

    def __init__(self, norm: str = "ln", impl: str = "normlab", momentum: float | None = 0.1,
                 hidden: int = 128, steps: int = 28):
        super().__init__()
        norm = _LONG_NAMES.get(norm, norm)
        if norm not in ("none", "ln", "bn"):
            raise ValueError(f"the rnn model supports --norm none, ln or bn (per time step); got {norm!r}")
        self.hidden, self.steps, self.norm_kind = hidden, steps, norm
        self.inp = nn.Linear(28, hidden)
        self.rec = nn.Linear(hidden, hidden, bias=False)
        nn.init.orthogonal_(self.rec.weight)
        if norm == "bn":
            self.norms = nn.ModuleList(make_norm("bn", hidden, conv=False, impl=impl, momentum=momentum)
                                       for _ in range(steps))
        else:
            shared = make_norm(norm, hidden, conv=False, impl=impl, momentum=momentum)
            self.norms = nn.ModuleList([shared])
        self.fc = nn.Linear(hidden, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(x.shape[0], self.steps, -1)          # (N, T, 28)
        projected = self.inp(rows)                            # (N, T, H), all steps at once
        h = x.new_zeros(x.shape[0], self.hidden)
        for t in range(self.steps):
            norm = self.norms[t] if self.norm_kind == "bn" else self.norms[0]
            h = torch.tanh(norm(projected[:, t] + self.rec(h)))
        return self.fc(h)


def build_model(name: str, norm: str = "bn", *, impl: str = "normlab", placement: str = "before",
                momentum: float | None = 0.1) -> nn.Module:
    """Build model ``name`` (see ``MODELS``) with norm ``norm`` from implementation ``impl``.

    ``momentum`` is the running-statistics momentum of batch norms (torch convention: weight of the new batch;
    ``None``: cumulative average).
    """
    if name == "rnn":
        return RowRNN(norm, impl=impl, momentum=momentum)
    builders = {"lenet": lenet, "lenet-relu": lenet_relu, "mlp": mlp, "bn-paper-mlp": bn_paper_mlp}
    if name not in builders:
        raise ValueError(f"unknown model {name!r}; choose from {MODELS}")
    return builders[name](_Factory(norm, impl, placement, momentum))


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def norm_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, module) of every normalization layer with a per-channel affine ``weight`` (gamma) and ``bias``."""
    out = []
    for name, module in model.named_modules():
        if isinstance(module, (nn.Linear, nn.Conv2d)) or name == "":
            continue
        weight = getattr(module, "weight", None)
        if isinstance(weight, torch.Tensor) and weight.dim() == 1 and getattr(module, "bias", None) is not None:
            out.append((name, module))
    return out

