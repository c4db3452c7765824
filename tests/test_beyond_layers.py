"""SwitchNorm, BatchRenorm, GhostBatchNorm, FrozenBatchNorm: against the NumPy references (float64, 1e-10),
against torch.nn where an equivalent exists, and their reductions to BN / IN / LN."""
import copy
import pickle

import numpy as np
import pytest
import torch

import normlab
from normlab.reference import batchrenorm as ref_brn
from normlab.reference import ghostbatchnorm as ref_gbn
from normlab.reference import switchnorm as ref_sn

TOL = dict(rtol=1e-10, atol=1e-10)
SHAPES = {1: (6, 3, 5), 2: (5, 3, 4, 3), 3: (4, 2, 3, 2, 3)}


def close(a, b, **kw):
    a = a.detach().numpy() if isinstance(a, torch.Tensor) else a
    b = b.detach().numpy() if isinstance(b, torch.Tensor) else b
    np.testing.assert_allclose(a, b, **(kw or TOL))


def _randomize(m, gen):
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype))
        if getattr(m, "running_mean", None) is not None:
            m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=gen, dtype=torch.float64))
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=gen, dtype=torch.float64) + 0.5)
    return m


# ------------------------------------------------------------------------------------------------------------
# SwitchNorm
# ------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dim", [1, 2, 3])
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("affine", [True, False])
def test_switchnorm_matches_reference(dim, training, affine):
    gen = torch.Generator().manual_seed(dim * 10 + training)
    m = getattr(normlab, f"SwitchNorm{dim}d")(SHAPES[dim][1], affine=affine, dtype=torch.float64)
    _randomize(m, gen).train(training)
    rm0, rv0 = m.running_mean.clone(), m.running_var.clone()
    x = (torch.randn(SHAPES[dim], generator=gen, dtype=torch.float64) * 2 + 1).requires_grad_()
    dy = torch.randn(SHAPES[dim], generator=gen, dtype=torch.float64)
    y = m(x)
    y.backward(dy)
    w = m.weight.detach().numpy() if affine else None
    b = m.bias.detach().numpy() if affine else None
    yr, cache = ref_sn.forward(x.detach().numpy(), m.mean_weight.detach().numpy(), m.var_weight.detach().numpy(),
                               w, b, m.eps, training, rm0.numpy(), rv0.numpy())
    g = ref_sn.backward(dy.numpy(), cache)
    close(y, yr)
    close(x.grad, g["x"])
    close(m.mean_weight.grad, g["mean_weight"])
    close(m.var_weight.grad, g["var_weight"])
    if affine:
        close(m.weight.grad, g["weight"])
        close(m.bias.grad, g["bias"])
    if training:
        rm, rv = ref_sn.update_running(rm0.numpy(), rv0.numpy(), cache, 0.1)
        close(m.running_mean, rm)
        close(m.running_var, rv)
        assert int(m.num_batches_tracked) == 1
    else:
        close(m.running_mean, rm0)


@pytest.mark.parametrize("which", ["in", "ln", "bn"])
def test_switchnorm_one_hot_reduces(which):
    torch.manual_seed(0)
    x = torch.randn(4, 6, 5, 5, dtype=torch.float64) * 3 + 2
    sn = normlab.SwitchNorm2d(6, dtype=torch.float64)
    k = ["in", "ln", "bn"].index(which)
    with torch.no_grad():
        sn.mean_weight.copy_(torch.full((3,), -40.0))
        sn.var_weight.copy_(torch.full((3,), -40.0))
        sn.mean_weight[k] = sn.var_weight[k] = 40.0
    target = {"in": torch.nn.InstanceNorm2d(6, dtype=torch.float64),
              "ln": torch.nn.GroupNorm(1, 6, dtype=torch.float64),
              "bn": torch.nn.BatchNorm2d(6, dtype=torch.float64)}[which]
    close(sn(x), target(x))
    if which == "bn":
        close(sn.running_mean, target.running_mean)
        close(sn.running_var, target.running_var)
        sn.eval(), target.eval()
        close(sn(x), target(x))


def test_switchnorm_large_mean_is_stable():
    torch.manual_seed(1)
    x64 = 1e4 + torch.randn(8, 4, 6, 6, dtype=torch.float64)
    sn = normlab.SwitchNorm2d(4)
    y = sn(x64.float())
    yr, _ = ref_sn.forward(x64.numpy(), np.ones(3), np.ones(3), np.ones(4), np.zeros(4), 1e-5, True)
    # E[x^2] - E[x]^2 in float32 would lose every digit here (1e8 vs a variance of 1)
    np.testing.assert_allclose(y.detach().numpy(), yr, atol=2e-3)


def test_switchnorm_momentum_none_and_errors():
    sn = normlab.SwitchNorm1d(3, momentum=None, dtype=torch.float64)
    xs = [torch.randn(5, 3, dtype=torch.float64) for _ in range(3)]
    for x in xs:
        sn(x)
    means = torch.stack([x.mean(0) for x in xs]).mean(0)
    close(sn.running_mean, means)
    with pytest.raises(ValueError, match="more than 1 value"):
        sn(torch.randn(1, 3))
    with pytest.raises(ValueError, match="3D"):
        normlab.SwitchNorm2d(3)(torch.randn(2, 3, 4))
    with pytest.raises(ValueError, match="channels"):
        normlab.SwitchNorm2d(3)(torch.randn(2, 4, 3, 3))
    assert normlab.SwitchNorm2d(3)(torch.randn(0, 3, 2, 2)).shape == (0, 3, 2, 2)


def test_switchnorm_state_dict_with_torch_batchnorm_buffers():
    sn = normlab.SwitchNorm2d(5)
    bn = torch.nn.BatchNorm2d(5)
    bn(torch.randn(4, 5, 3, 3))
    missing, unexpected = sn.load_state_dict(bn.state_dict(), strict=False)
    assert sorted(missing) == ["mean_weight", "var_weight"] and unexpected == []
    close(sn.running_mean, bn.running_mean)


# ------------------------------------------------------------------------------------------------------------
# BatchRenorm
# ------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dim", [1, 2, 3])
@pytest.mark.parametrize("training", [True, False])
def test_batchrenorm_matches_reference(dim, training):
    gen = torch.Generator().manual_seed(dim + 7 * training)
    c = SHAPES[dim][1]
    m = getattr(normlab, f"BatchRenorm{dim}d")(c, r_max=1.5, d_max=0.5, warmup_steps=0, dtype=torch.float64)
    _randomize(m, gen).train(training)
    rm0, rv0 = m.running_mean.clone(), m.running_var.clone()
    x = (torch.randn(SHAPES[dim], generator=gen, dtype=torch.float64) * 2 + 0.5).requires_grad_()
    dy = torch.randn(SHAPES[dim], generator=gen, dtype=torch.float64)
    y = m(x)
    y.backward(dy)
    yr, cache = ref_brn.forward(x.detach().numpy(), rm0.numpy(), rv0.numpy(), m.weight.detach().numpy(),
                                m.bias.detach().numpy(), m.eps, training, 1.5, 0.5)
    g = ref_brn.backward(dy.numpy(), cache)
    close(y, yr)
    close(x.grad, g["x"])
    close(m.weight.grad, g["weight"])
    close(m.bias.grad, g["bias"])
    if training:
        assert np.any(cache["r"] != 1) or np.any(cache["d"] != 0)  # the correction is active
        rm, rv = ref_brn.update_running(rm0.numpy(), rv0.numpy(), cache, 0.1)
        close(m.running_mean, rm)
        close(m.running_var, rv)


@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("affine", [True, False])
def test_batchrenorm_without_correction_is_batchnorm(momentum, affine):
    torch.manual_seed(2)
    kw = dict(momentum=momentum, affine=affine, dtype=torch.float64)
    brn = normlab.BatchRenorm2d(4, r_max=1.0, d_max=0.0, **kw)
    nbn = normlab.BatchNorm2d(4, **kw)
    tbn = torch.nn.BatchNorm2d(4, **kw)
    for step in range(3):
        x = torch.randn(6, 4, 3, 3, dtype=torch.float64) * (step + 1) + step
        outs = []
        for m in (brn, nbn, tbn):
            xi = x.clone().requires_grad_()
            y = m(xi)
            (y * torch.arange(y.numel(), dtype=torch.float64).reshape(y.shape).sin()).sum().backward()
            outs.append((y, xi.grad))
        for y, gx in outs[1:]:
            close(outs[0][0], y)
            close(outs[0][1], gx)
    for m in (nbn, tbn):
        close(brn.running_mean, m.running_mean)
        close(brn.running_var, m.running_var)
        if affine:
            close(brn.weight.grad, m.weight.grad)
            close(brn.bias.grad, m.bias.grad)
    brn.eval(), tbn.eval()
    x = torch.randn(3, 4, 2, 2, dtype=torch.float64)
    close(brn(x), tbn(x))


def test_batchrenorm_schedule_and_checkpoint():
    brn = normlab.BatchRenorm1d(3, r_max=3.0, d_max=5.0, warmup_steps=4)
    assert brn.current_limits() == (1.0, 0.0)
    for _ in range(2):
        brn(torch.randn(8, 3))
    assert brn.current_limits() == (2.0, 2.5)
    for _ in range(5):
        brn(torch.randn(8, 3))
    assert brn.current_limits() == (3.0, 5.0)
    bn = torch.nn.BatchNorm1d(3)
    bn.load_state_dict(brn.state_dict())  # same keys as BatchNorm, both ways
    brn2 = normlab.BatchRenorm1d(3, warmup_steps=4)
    brn2.load_state_dict(bn.state_dict())
    assert brn2.current_limits() == (3.0, 5.0)  # the schedule resumes from num_batches_tracked
    with pytest.raises(ValueError, match="r_max"):
        normlab.BatchRenorm2d(3, r_max=0.5)


def test_batchrenorm_small_batch_uses_running_stats():
    """Once the running statistics are known, BRN's training output is close to its eval output."""
    torch.manual_seed(3)
    brn = normlab.BatchRenorm2d(2, r_max=1e6, d_max=1e6, warmup_steps=0, momentum=0.0)
    with torch.no_grad():
        brn.running_mean.fill_(3.0)
        brn.running_var.fill_(4.0)
    x = 3 + 2 * torch.randn(2, 2, 2, 2)
    y_train = brn(x)
    brn.eval()
    close(y_train, brn(x), rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------------------------------------------------
# GhostBatchNorm
# ------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dim,n,vbs", [(1, 11, 4), (2, 7, 3), (3, 5, 2), (1, 9, 4)])
def test_ghostbatchnorm_matches_reference(dim, n, vbs):
    gen = torch.Generator().manual_seed(n * vbs)
    shape = (n, *SHAPES[dim][1:]) if dim > 1 else (n, 3)  # dim 1: (N, C): a last chunk of 1 gets merged
    m = getattr(normlab, f"GhostBatchNorm{dim}d")(shape[1], vbs, dtype=torch.float64)
    _randomize(m, gen)
    rm0, rv0 = m.running_mean.clone(), m.running_var.clone()
    x = torch.randn(shape, generator=gen, dtype=torch.float64).requires_grad_()
    dy = torch.randn(shape, generator=gen, dtype=torch.float64)
    y = m(x)
    y.backward(dy)
    yr, cache = ref_gbn.forward(x.detach().numpy(), vbs, rm0.numpy(), rv0.numpy(), m.weight.detach().numpy(),
                                m.bias.detach().numpy(), m.eps, True, 0.1)
    g = ref_gbn.backward(dy.numpy(), cache)
    close(y, yr)
    close(x.grad, g["x"])
    close(m.weight.grad, g["weight"])
    close(m.bias.grad, g["bias"])
    close(m.running_mean, cache["running_mean"])
    close(m.running_var, cache["running_var"])
    assert int(m.num_batches_tracked) == len(ref_gbn.chunk_sizes(n, x[0, 0].numel(), vbs))
    m.eval()
    yr, _ = ref_gbn.forward(x.detach().numpy(), vbs, m.running_mean.numpy(), m.running_var.numpy(),
                            m.weight.detach().numpy(), m.bias.detach().numpy(), m.eps, False)
    close(m(x), yr)


def test_ghostbatchnorm_large_virtual_batch_is_batchnorm():
    torch.manual_seed(4)
    g = normlab.GhostBatchNorm2d(3, virtual_batch_size=64, dtype=torch.float64)
    b = torch.nn.BatchNorm2d(3, dtype=torch.float64)
    x = torch.randn(16, 3, 4, 4, dtype=torch.float64)
    close(g(x), b(x))
    close(g.running_var, b.running_var)
    g.eval(), b.eval()
    close(g(x), b(x))
    with pytest.raises(ValueError, match="virtual_batch_size"):
        normlab.GhostBatchNorm2d(3, 0)


def test_ghostbatchnorm_channels_last():
    g = normlab.GhostBatchNorm2d(3, 2)
    x = torch.randn(6, 3, 4, 4).contiguous(memory_format=torch.channels_last)
    assert g(x).is_contiguous(memory_format=torch.channels_last)


# ------------------------------------------------------------------------------------------------------------
# FrozenBatchNorm
# ------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dim", [1, 2, 3])
def test_frozen_batchnorm_loads_batchnorm_and_equals_eval(dim):
    torch.manual_seed(dim)
    shape = SHAPES[dim]
    bn = getattr(torch.nn, f"BatchNorm{dim}d")(shape[1], dtype=torch.float64)
    _randomize(bn, torch.Generator().manual_seed(dim))
    bn(torch.randn(shape, dtype=torch.float64))
    bn.eval()
    fz = getattr(normlab, f"FrozenBatchNorm{dim}d")(shape[1], dtype=torch.float64)
    fz.load_state_dict(bn.state_dict())  # num_batches_tracked accepted and ignored
    assert list(fz.parameters()) == []
    assert sorted(fz.state_dict()) == ["bias", "running_mean", "running_var", "weight"]
    x = torch.randn(shape, dtype=torch.float64)
    fz.train()
    close(fz(x), bn(x))
    rm = fz.running_mean.clone()
    fz(x * 5 + 3)
    close(fz.running_mean, rm)
    fz2 = getattr(normlab, f"FrozenBatchNorm{dim}d").from_batchnorm(bn)
    close(fz2(x), bn(x))


def test_frozen_batchnorm_from_affine_free_and_normlab():
    bn = torch.nn.BatchNorm2d(3, affine=False)
    bn(torch.randn(4, 3, 2, 2))
    fz = normlab.FrozenBatchNorm2d(3)
    fz.load_state_dict(bn.state_dict())
    bn.eval()
    x = torch.randn(2, 3, 2, 2)
    close(fz(x), bn(x), rtol=1e-6, atol=1e-6)
    nbn = normlab.BatchNorm2d(3)
    fz.load_state_dict({k: v for k, v in nbn.state_dict().items() if k != "num_batches_tracked"})
    with pytest.raises(ValueError, match="4D"):
        fz(torch.randn(2, 3))


# ------------------------------------------------------------------------------------------------------------
# all new modules: copy, pickle, float16, dtypes
# ------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["SwitchNorm2d", "BatchRenorm2d", "GhostBatchNorm2d", "FrozenBatchNorm2d"])
def test_copy_pickle_half(name):
    m = getattr(normlab, name)(3)
    x = torch.randn(8, 3, 4, 4)
    m(x)
    for clone in (copy.deepcopy(m), pickle.loads(pickle.dumps(m))):
        clone.eval(), m.eval()
        close(clone(x), m(x), rtol=0, atol=0)
    m.train()
    y = m(x.half())
    assert y.dtype == torch.float16 and torch.isfinite(y).all()
    if name != "FrozenBatchNorm2d":
        z = m(torch.full((4, 3, 2, 2), 7.0))  # constant input: exactly beta, finite
        assert torch.isfinite(z).all()


@pytest.mark.parametrize("name", ["SwitchNorm2d", "GhostBatchNorm2d", "BatchRenorm2d"])
def test_channels_last_and_non_contiguous(name):
    m = getattr(normlab, name)(3, **({"virtual_batch_size": 2} if "Ghost" in name else {}))
    x = torch.randn(6, 3, 4, 5)
    m2 = copy.deepcopy(m)
    y_ref = copy.deepcopy(m)(x)
    y = m(x.contiguous(memory_format=torch.channels_last))
    assert y.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(y, y_ref)
    y2 = m2(x.transpose(2, 3).contiguous().transpose(2, 3))
    torch.testing.assert_close(y2, y_ref)


def test_switchnorm_gradcheck_and_double_backward():
    torch.manual_seed(5)
    sn = normlab.SwitchNorm2d(2, dtype=torch.float64)
    _randomize(sn, torch.Generator().manual_seed(5))
    x = torch.randn(3, 2, 2, 3, dtype=torch.float64, requires_grad=True)
    params = (sn.weight, sn.bias, sn.mean_weight, sn.var_weight)

    def f(x, w, b, mw, vw):
        out = torch.func.functional_call(sn, {"weight": w, "bias": b, "mean_weight": mw, "var_weight": vw}, (x,))
        return out

    assert torch.autograd.gradcheck(f, (x, *params))
    assert torch.autograd.gradgradcheck(f, (x, *params))


def test_batchrenorm_nonfinite_batch_leaves_running_stats():
    brn = normlab.BatchRenorm1d(2, warmup_steps=0)
    x = torch.randn(8, 2)
    x[0, 1] = float("nan")
    with pytest.warns(RuntimeWarning):
        brn(x)
    assert torch.isfinite(brn.running_mean).all() and brn.running_mean[1] == 0 and brn.running_var[1] == 1


@pytest.mark.parametrize("training", [True, False])
def test_switchnorm_one_value_per_channel_drops_instance_component(training):
    """(N, C) input: softmax over (ln, bn) only; reference and module agree, the IN logits get no gradient."""
    gen = torch.Generator().manual_seed(11)
    m = _randomize(normlab.SwitchNorm1d(4, dtype=torch.float64), gen).train(training)
    rm0, rv0 = m.running_mean.clone(), m.running_var.clone()
    x = torch.randn(6, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    dy = torch.randn(6, 4, generator=gen, dtype=torch.float64)
    m(x).backward(dy)
    yr, cache = ref_sn.forward(x.detach().numpy(), m.mean_weight.detach().numpy(), m.var_weight.detach().numpy(),
                               m.weight.detach().numpy(), m.bias.detach().numpy(), m.eps, training, rm0.numpy(),
                               rv0.numpy())
    g = ref_sn.backward(dy.numpy(), cache)
    close(m(x.detach()) if not training else yr, yr)
    close(x.grad, g["x"])
    close(m.mean_weight.grad, g["mean_weight"])
    close(m.var_weight.grad, g["var_weight"])
    assert m.mean_weight.grad[0] == 0 and m.var_weight.grad[0] == 0
    # with the (ln, bn) logits one-hot on bn, an (N, C) SwitchNorm is BatchNorm1d
    sn = normlab.SwitchNorm1d(4, dtype=torch.float64)
    with torch.no_grad():
        sn.mean_weight.copy_(torch.tensor([0.0, -40.0, 40.0]))
        sn.var_weight.copy_(torch.tensor([0.0, -40.0, 40.0]))
    close(sn(x.detach()), torch.nn.BatchNorm1d(4, dtype=torch.float64)(x.detach()))
