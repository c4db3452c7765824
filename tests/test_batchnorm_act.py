"""BatchNormAct{1,2,3}d: equal to torch.nn batch norm followed by the activation, state_dict compatible."""
from __future__ import annotations

import copy
import pickle

import pytest
import torch
from torch import nn

import normlab

ACTS = {"identity": nn.Identity, "relu": nn.ReLU, "silu": nn.SiLU, "sigmoid": nn.Sigmoid}
CASES = [(normlab.BatchNormAct1d, nn.BatchNorm1d, (16, 6)), (normlab.BatchNormAct1d, nn.BatchNorm1d, (8, 6, 5)),
         (normlab.BatchNormAct2d, nn.BatchNorm2d, (8, 6, 5, 4)),
         (normlab.BatchNormAct3d, nn.BatchNorm3d, (4, 6, 3, 4, 2))]


@pytest.mark.parametrize("act", list(ACTS))
@pytest.mark.parametrize("ours,theirs,shape", CASES, ids=lambda v: getattr(v, "__name__", str(v)))
def test_matches_torch_batchnorm_then_activation(ours, theirs, shape, act):
    torch.manual_seed(0)
    ref_bn = theirs(6, momentum=0.2).double()
    with torch.no_grad():
        ref_bn.weight.uniform_(0.5, 1.5)
        ref_bn.bias.uniform_(-0.5, 0.5)
    layer = ours(6, act=act, momentum=0.2).double()
    layer.load_state_dict(ref_bn.state_dict(), strict=True)
    ref = nn.Sequential(ref_bn, ACTS[act]())
    for train in (True, True, False):
        layer.train(train)
        ref.train(train)
        x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
        x2 = x.detach().clone().requires_grad_()
        y, y_ref = layer(x), ref(x2)
        torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-10)
        dy = torch.randn_like(y)
        y.backward(dy)
        y_ref.backward(dy)
        torch.testing.assert_close(x.grad, x2.grad, rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(layer.weight.grad, ref_bn.weight.grad, rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(layer.bias.grad, ref_bn.bias.grad, rtol=1e-9, atol=1e-9)
    for key, value in ref_bn.state_dict().items():
        torch.testing.assert_close(layer.state_dict()[key], value)


def test_state_dict_keys_equal_batchnorm_and_round_trip():
    layer = normlab.BatchNormAct2d(5, act="silu")
    assert layer.state_dict().keys() == nn.BatchNorm2d(5).state_dict().keys()
    back = nn.BatchNorm2d(5)
    back.load_state_dict(layer.state_dict(), strict=True)
    # a torch checkpoint of Sequential(BatchNorm2d, ReLU) loads under the batch-norm prefix
    seq = nn.Sequential(nn.BatchNorm2d(5), nn.ReLU())
    fused = nn.Sequential(normlab.BatchNormAct2d(5, act="relu"))
    fused.load_state_dict({k: v for k, v in seq.state_dict().items()}, strict=True)


def test_float32_channels_last_fused_relu():
    torch.manual_seed(1)
    x = torch.randn(8, 6, 7, 7).contiguous(memory_format=torch.channels_last)
    layer = normlab.BatchNormAct2d(6, act="relu")
    ref = nn.Sequential(nn.BatchNorm2d(6), nn.ReLU())
    y = layer(x)
    assert y.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(y, ref(x), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(layer.running_var, ref[0].running_var)


def test_bad_activation_and_repr_copy_pickle():
    with pytest.raises(ValueError, match="gelu"):
        normlab.BatchNormAct2d(4, act="gelu")
    layer = normlab.BatchNormAct2d(4, act="sigmoid", eps=1e-3)
    assert "act='sigmoid'" in repr(layer) and layer.eps == 1e-3
    for clone in (copy.deepcopy(layer), pickle.loads(pickle.dumps(layer))):
        assert clone.act == "sigmoid"
        x = torch.randn(3, 4, 2, 2)
        torch.testing.assert_close(clone(x), layer(x))


def test_rank_checks_inherited():
    with pytest.raises(ValueError):
        normlab.BatchNormAct2d(4)(torch.randn(3, 4))


@pytest.mark.parametrize("backend", ["portable", "cpu", "native"])
def test_relu_gradient_passes_nan_pre_activations_as_torch(backend, backend_ctx):
    """A NaN pre-activation (here from NaN running variances in evaluation: a 16-bit model's running_var
    overflowed, then momentum 1.0 multiplied inf by 0) passes its gradient through the fused ReLU, as torch's
    ReLU backward does (its mask is ``y <= 0``): dbias is the sum of dy, not 0."""
    torch.manual_seed(3)
    ref_bn = nn.BatchNorm2d(4).eval()
    with torch.no_grad():
        ref_bn.running_var[1] = float("nan")
    layer = normlab.BatchNormAct2d(4, act="relu").eval()
    layer.load_state_dict(ref_bn.state_dict())
    x = torch.randn(3, 4, 2, 2)
    dy = torch.randn(3, 4, 2, 2)
    expected = torch.autograd.grad(torch.relu(ref_bn(x)), [ref_bn.weight, ref_bn.bias], dy)
    with backend_ctx(backend):
        got = torch.autograd.grad(layer(x), [layer.weight, layer.bias], dy)
    torch.testing.assert_close(got[1], expected[1], equal_nan=True)
    assert torch.isnan(got[0][1]) == torch.isnan(expected[0][1])
