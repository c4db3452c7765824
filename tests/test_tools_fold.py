"""fold_bn: exact in float64 over random models and random statistics; reports what stays."""
import copy
import random

import pytest
import torch
from torch import nn

import normlab
from normlab.tools import fold_bn
from normlab.tools._common import is_norm

BN_MAKERS = [
    lambda c, d: getattr(nn, f"BatchNorm{d}d")(c),
    lambda c, d: getattr(normlab, f"BatchNorm{d}d")(c),
    lambda c, d: getattr(normlab, f"BatchNorm{d}d")(c, affine=False),
    lambda c, d: getattr(normlab, f"FrozenBatchNorm{d}d")(c),
    lambda c, d: getattr(normlab, f"BatchRenorm{d}d")(c),
    lambda c, d: getattr(normlab, f"GhostBatchNorm{d}d")(c, 2),
    lambda c, d: getattr(nn, f"BatchNorm{d}d")(c, affine=False),
]


def _random_stats(model, gen):
    with torch.no_grad():
        for m in model.modules():
            if getattr(m, "running_mean", None) is not None:
                c = m.running_mean.numel()
                m.running_mean.copy_(torch.randn(c, generator=gen, dtype=torch.float64) * 3)
                m.running_var.copy_(torch.rand(c, generator=gen, dtype=torch.float64) * 4 + 0.01)
                for name in ("weight", "bias"):
                    t = getattr(m, name, None)
                    if t is not None:
                        t.copy_(torch.randn(c, generator=gen, dtype=torch.float64))


def _random_model(rng: random.Random):
    d = rng.choice([1, 2, 3])
    layers, c = [], rng.choice([2, 4, 6])
    cin = c
    for _ in range(rng.randint(1, 3)):
        cout = rng.choice([2, 4, 6, 8])
        kind = rng.choice(["conv", "conv", "depthwise", "grouped", "transpose"])
        groups = {"conv": 1, "depthwise": cin, "grouped": 2, "transpose": rng.choice([1, 2])}[kind]
        if kind == "depthwise":
            cout = cin * rng.choice([1, 2])
        bias = rng.random() < 0.5
        cls = getattr(nn, f"ConvTranspose{d}d" if kind == "transpose" else f"Conv{d}d")
        layers.append(cls(cin, cout, rng.choice([1, 2, 3]), groups=groups, bias=bias, padding=1))
        layers.append(rng.choice(BN_MAKERS)(cout, d))
        if rng.random() < 0.5:
            layers.append(nn.ReLU())
        cin = cout
    layers += [nn.AdaptiveAvgPool1d(1) if d == 1 else getattr(nn, f"AdaptiveAvgPool{d}d")(1), nn.Flatten()]
    lin = nn.Linear(cin, 5, bias=rng.random() < 0.5)
    layers += [lin, rng.choice(BN_MAKERS)(5, 1)]
    shape = (3, c) + (5,) * d
    return nn.Sequential(*layers).double(), shape


def test_fold_bn_random_models_exact_float64():
    rng = random.Random(0)
    gen = torch.Generator().manual_seed(0)
    for trial in range(20):
        model, shape = _random_model(rng)
        _random_stats(model, gen)
        model.train()
        before = copy.deepcopy(model.state_dict())
        x = torch.randn(shape, generator=gen, dtype=torch.float64)
        folded = fold_bn(model, x)
        rep = folded.fold_report
        n_norms = sum(1 for m in model.modules() if is_norm(m))
        assert len(rep.folded) == n_norms and not rep.skipped, (trial, str(rep))
        assert not any(is_norm(m) for m in folded.modules())
        model.eval()
        want = model(x)
        torch.testing.assert_close(folded(x), want, rtol=1e-10, atol=1e-10)
        assert rep.max_abs_diff < 1e-10 and rep.ok
        # the input model is untouched (state and mode)
        model.train()
        assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
        assert not folded.training


class Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.bn = nn.BatchNorm2d(3)
        self.shared = nn.Conv2d(3, 3, 1)
        self.bn_shared = nn.BatchNorm2d(3)
        self.bn_input = normlab.BatchNorm2d(3)
        self.conv_nostats = nn.Conv2d(3, 3, 1)
        self.bn_nostats = nn.BatchNorm2d(3, track_running_stats=False)
        self.sn_conv = nn.Conv2d(3, 3, 1)
        self.sn = normlab.SwitchNorm2d(3)

    def forward(self, x):
        x = self.bn_input(x)
        y = self.conv(x)
        z = self.bn(y) + y                                 # conv output used twice: not foldable
        z = self.bn_shared(self.shared(z)) + self.shared(x)  # shared conv: not foldable
        z = self.bn_nostats(self.conv_nostats(z))
        return self.sn(self.sn_conv(z))


def test_fold_reports_non_foldable():
    torch.manual_seed(0)
    model = Residual().double()
    _random_stats(model, torch.Generator().manual_seed(1))
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    folded = fold_bn(model, x)
    rep = folded.fold_report
    assert rep.method == "fx" and rep.folded == []
    reasons = dict(rep.skipped)
    assert "used elsewhere" in reasons["bn"]
    assert "more than once" in reasons["bn_shared"]
    assert "does not come from a conv" in reasons["bn_input"]
    assert "no running statistics" in reasons["bn_nostats"]
    assert "not an affine map" in reasons["sn"]
    assert rep.max_abs_diff < 1e-12
    assert "left in place" in str(rep)


class Branchy(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(2, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(4 * 4 * 4, 3), normlab.BatchNorm1d(3))
        self.lonely = nn.BatchNorm2d(2)

    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow: torch.fx cannot trace this
            x = self.lonely(x)
        return self.head(self.features(x))


def test_fold_falls_back_to_sequential_walk():
    model = Branchy().double()
    _random_stats(model, torch.Generator().manual_seed(2))
    x = torch.randn(4, 2, 6, 6, dtype=torch.float64).abs()
    folded = fold_bn(model, x)
    rep = folded.fold_report
    assert rep.method == "sequential" and rep.trace_error
    assert sorted(rep.folded) == [("features.0", "features.1"), ("head.1", "head.2")]
    assert [n for n, _ in rep.skipped] == ["lonely"]
    assert rep.max_abs_diff < 1e-10


def test_fold_lenet_float32_without_sample():
    model = nn.Sequential(nn.Conv2d(1, 6, 5, bias=False), nn.BatchNorm2d(6), nn.ReLU(), nn.MaxPool2d(2),
                          nn.Conv2d(6, 16, 5), normlab.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                          nn.Linear(256, 120), nn.BatchNorm1d(120), nn.ReLU(), nn.Linear(120, 10))
    for _ in range(3):
        model(torch.randn(16, 1, 28, 28))
    folded = fold_bn(model)
    assert len(folded.fold_report.folded) == 3 and folded.fold_report.max_abs_diff is None
    model.eval()
    x = torch.randn(8, 1, 28, 28)
    torch.testing.assert_close(folded(x), model(x), rtol=1e-4, atol=1e-4)
    assert model.training is False  # we put it in eval ourselves above; fold_bn does not


class _BNReLU(normlab.BatchNorm2d):
    act = "relu"  # a fused activation, as normlab's BatchNormAct


def test_fold_keeps_fused_activation_and_speedup_helper():
    from normlab.tools import fold_speedup
    model = nn.Sequential(nn.Conv2d(2, 4, 3), _BNReLU(4), nn.Conv2d(4, 3, 1)).double()
    _random_stats(model, torch.Generator().manual_seed(3))
    x = torch.randn(2, 2, 6, 6, dtype=torch.float64)
    folded = fold_bn(model, x)
    assert isinstance(folded.get_submodule("1"), nn.ReLU)
    assert folded.fold_report.max_abs_diff < 1e-10
    out = fold_speedup(model, x, repeats=3, warmup=1)
    assert out["folded"] == 1 and out["speedup"] > 0 and out["max_abs_diff"] < 1e-10


class _WithNormlabLayers(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = normlab.BatchNorm2d(4)
        self.gn = normlab.GroupNorm(2, 4)
        self.ln = normlab.LayerNorm([4, 4, 4])

    def forward(self, x):
        return self.ln(self.gn(torch.relu(self.bn(self.conv(x)))))


def test_fold_traces_models_with_other_normlab_layers():
    model = _WithNormlabLayers().double()
    _random_stats(model, torch.Generator().manual_seed(4))
    folded = fold_bn(model, torch.randn(2, 3, 6, 6, dtype=torch.float64))
    rep = folded.fold_report
    assert rep.method == "fx" and rep.folded == [("conv", "bn")] and rep.max_abs_diff < 1e-10


@pytest.mark.parametrize("d", [1, 2, 3])
def test_folds_through_max_pool_when_every_scale_is_nonnegative(d):
    """conv -> max-pool -> BN: an increasing per-channel affine map commutes with the max, so it folds (exactly,
    in float64, also with a zero scale); one negative scale keeps the norm, and the report says which channel."""
    gen = torch.Generator().manual_seed(d)
    pool = getattr(nn, f"MaxPool{d}d")(2, padding=1)
    model = nn.Sequential(getattr(nn, f"Conv{d}d")(3, 4, 3, bias=False), pool, getattr(nn, f"BatchNorm{d}d")(4),
                          nn.ReLU(), getattr(nn, f"Conv{d}d")(4, 5, 1), getattr(nn, f"AdaptiveMaxPool{d}d")(1),
                          normlab.BatchNorm1d(5) if d == 1 else getattr(normlab, f"BatchNorm{d}d")(5)).double()
    _random_stats(model, gen)
    with torch.no_grad():
        model[2].weight.copy_(torch.rand(4, generator=gen, dtype=torch.float64))
        model[2].weight[1] = 0.0
        model[6].weight.copy_(torch.rand(5, generator=gen, dtype=torch.float64) + 0.1)
    x = torch.randn((2, 3) + (7,) * d, generator=gen, dtype=torch.float64)
    folded = fold_bn(model, x)
    assert [norm for _, norm in folded.fold_report.folded] == ["2", "6"]
    assert not any(is_norm(m) for m in folded.modules())
    assert any(isinstance(m, type(pool)) for m in folded.modules())
    torch.testing.assert_close(folded(x), model.eval()(x), rtol=1e-12, atol=1e-12)

    with torch.no_grad():
        model[2].weight[3] = -0.5
    folded = fold_bn(model, x)
    assert [norm for _, norm in folded.fold_report.folded] == ["6"]
    (name, why), = folded.fold_report.skipped
    assert name == "2" and "negative scale" in why and "[3]" in why
    torch.testing.assert_close(folded(x), model.eval()(x), rtol=1e-12, atol=1e-12)


def test_max_pool_of_a_linear_is_not_folded():
    seq = nn.Sequential(nn.Linear(4, 6), nn.Unflatten(1, (2, 3)), nn.MaxPool1d(1), nn.BatchNorm1d(2)).double().eval()
    folded = fold_bn(seq, torch.randn(3, 4, dtype=torch.float64))
    assert not folded.fold_report.folded and "max-pool of something other than a convolution" in \
        folded.fold_report.skipped[0][1]
