"""The NumPy reference against torch.nn.functional / torch.nn in float64 (tolerance 1e-10 norm-wise relative).

This file may import torch; the reference itself must not.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from normlab.reference import (
    batch_norm_backward,
    batch_norm_forward,
    group_norm_backward,
    group_norm_forward,
    instance_norm_backward,
    instance_norm_forward,
    layer_norm_backward,
    layer_norm_forward,
    rel_error,
)

TOL = 1e-10


def t(a, grad=False):
    return torch.tensor(a, dtype=torch.float64, requires_grad=grad)


def torch_grads(fn, arrays, dy):
    """Run ``fn`` on float64 leaf tensors made from ``arrays``; return output and gradients as NumPy."""
    leaves = [None if a is None else t(a, grad=True) for a in arrays]
    out = fn(*leaves)
    out.backward(t(dy))
    return out.detach().numpy(), [None if v is None else v.grad.numpy() for v in leaves]


def assert_close(a, b, tol=TOL):
    if a is None or b is None:
        assert a is None and b is None
        return
    assert np.shape(a) == np.shape(b)
    assert rel_error(a, b) < tol, rel_error(a, b)


@pytest.mark.parametrize("shape", [(6, 3), (4, 3, 5), (3, 2, 4, 3), (2, 3, 2, 3, 2)])
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("affine", [True, False])
def test_batch_norm_vs_torch(shape, training, affine):
    r = np.random.default_rng(0)
    C = shape[1]
    x = r.normal(size=shape) * 2 + 1
    g, b = (r.normal(size=C), r.normal(size=C)) if affine else (None, None)
    rm, rv = r.normal(size=C), r.uniform(0.5, 2, size=C)
    dy = r.normal(size=shape)
    y, cache, run = batch_norm_forward(x, g, b, 1e-3, training=training, running_mean=rm, running_var=rv,
                                       momentum=0.3)
    dx, dg, db = batch_norm_backward(dy, cache)
    trm, trv = t(rm), t(rv)
    ty, (tdx, tdg, tdb) = torch_grads(
        lambda x, g, b: F.batch_norm(x, trm, trv, g, b, training=training, momentum=0.3, eps=1e-3), [x, g, b], dy)
    assert_close(y, ty)
    assert_close(dx, tdx)
    assert_close(dg, tdg)
    assert_close(db, tdb)
    assert_close(run.mean, trm.numpy())
    assert_close(run.var, trv.numpy())


@pytest.mark.parametrize("momentum", [0.0, 0.1, 1.0, None])
def test_batch_norm_module_running_stats_over_steps(momentum):
    r = np.random.default_rng(1)
    m = torch.nn.BatchNorm2d(3, momentum=momentum).double()
    rm, rv, nbt = np.zeros(3), np.ones(3), 0
    for step in range(4):
        x = r.normal(size=(4, 3, 2, 3)) * (step + 1) + step
        ty = m(t(x)).detach().numpy()
        y, _, (rm, rv, nbt) = batch_norm_forward(x, m.weight.detach().numpy(), m.bias.detach().numpy(),
                                                 running_mean=rm, running_var=rv, momentum=momentum,
                                                 num_batches_tracked=nbt)
        assert_close(y, ty)
        assert_close(rm, m.running_mean.numpy(), 1e-13)
        assert_close(rv, m.running_var.numpy(), 1e-13)
        assert nbt == int(m.num_batches_tracked)
    m.eval()
    x = r.normal(size=(2, 3, 2, 2))
    y, _, _ = batch_norm_forward(x, m.weight.detach().numpy(), m.bias.detach().numpy(), training=False,
                                 running_mean=rm, running_var=rv)
    assert_close(y, m(t(x)).detach().numpy())


def test_batch_norm_one_value_per_channel_same_message_as_torch():
    x = np.ones((1, 3))
    with pytest.raises(ValueError, match="Expected more than 1 value per channel when training") as ours:
        batch_norm_forward(x)
    with pytest.raises(ValueError, match="Expected more than 1 value per channel when training"):
        F.batch_norm(t(x), None, None, training=True)
    assert "got input size (1, 3)" in str(ours.value)


@pytest.mark.parametrize("offset,scale", [(1e4, 1.0), (1e6, 0.1)])
def test_batch_norm_large_mean_vs_torch(offset, scale):
    r = np.random.default_rng(2)
    x = offset + r.normal(size=(32, 3, 4)) * scale
    y, _, _ = batch_norm_forward(x)
    # torch's float64 CPU kernel loses a few digits here (about 1e-12 at 1e4, 1e-9 at 1e6, relative); the
    # reference is exact to rounding (see test_reference.py::test_large_mean_small_spread)
    assert_close(y, F.batch_norm(t(x), None, None, training=True).numpy(), 1e-7)


@pytest.mark.parametrize("shape,ns", [((4, 5), (5,)), ((2, 3, 4), (3, 4)), ((2, 3, 2, 2), (3, 2, 2))])
@pytest.mark.parametrize("affine", [True, False])
def test_layer_norm_vs_torch(shape, ns, affine):
    r = np.random.default_rng(3)
    x = r.normal(size=shape) * 3 - 2
    g, b = (r.normal(size=ns), r.normal(size=ns)) if affine else (None, None)
    dy = r.normal(size=shape)
    y, cache = layer_norm_forward(x, ns, g, b, 1e-4)
    grads = layer_norm_backward(dy, cache)
    ty, tgrads = torch_grads(lambda x, g, b: F.layer_norm(x, ns, g, b, 1e-4), [x, g, b], dy)
    assert_close(y, ty)
    for a, c in zip(grads, tgrads):
        assert_close(a, c)


@pytest.mark.parametrize("shape,G", [((3, 6), 2), ((2, 6, 3), 3), ((2, 6, 3), 1), ((2, 4, 3, 2), 4),
                                     ((2, 4, 2, 2, 2), 2)])
@pytest.mark.parametrize("affine", [True, False])
def test_group_norm_vs_torch(shape, G, affine):
    r = np.random.default_rng(4)
    C = shape[1]
    x = r.normal(size=shape) * 2 + 0.5
    g, b = (r.normal(size=C), r.normal(size=C)) if affine else (None, None)
    dy = r.normal(size=shape)
    y, cache = group_norm_forward(x, G, g, b, 1e-5)
    grads = group_norm_backward(dy, cache)
    ty, tgrads = torch_grads(lambda x, g, b: F.group_norm(x, G, g, b, 1e-5), [x, g, b], dy)
    assert_close(y, ty)
    for a, c in zip(grads, tgrads):
        assert_close(a, c)


def test_group_norm_error_names_both_numbers_like_torch():
    with pytest.raises(ValueError, match="C=6.*num_groups=4"):
        group_norm_forward(np.zeros((2, 6, 3)), 4)
    with pytest.raises((ValueError, RuntimeError)):
        F.group_norm(torch.zeros(2, 6, 3, dtype=torch.float64), 4)


@pytest.mark.parametrize("shape", [(3, 4, 5), (2, 3, 4, 2), (2, 2, 2, 3, 2)])
@pytest.mark.parametrize("use_input_stats", [True, False])
def test_instance_norm_vs_torch(shape, use_input_stats):
    r = np.random.default_rng(5)
    C = shape[1]
    x = r.normal(size=shape) * 2 + 1
    g, b = r.normal(size=C), r.normal(size=C)
    rm, rv = r.normal(size=C), r.uniform(0.5, 2, size=C)
    dy = r.normal(size=shape)
    y, cache, run = instance_norm_forward(x, g, b, 1e-5, use_input_stats=use_input_stats, running_mean=rm,
                                          running_var=rv, momentum=0.2)
    grads = instance_norm_backward(dy, cache)
    trm, trv = t(rm), t(rv)
    ty, tgrads = torch_grads(lambda x, g, b: F.instance_norm(x, trm, trv, g, b, use_input_stats, 0.2, 1e-5),
                             [x, g, b], dy)
    assert_close(y, ty)
    for a, c in zip(grads, tgrads):
        assert_close(a, c)
    assert_close(run.mean, trm.numpy())
    assert_close(run.var, trv.numpy())


def test_torch_instance_norm_module_treats_momentum_none_as_frozen():
    """Documented difference: torch.nn.InstanceNorm passes momentum=None as 0.0; the reference averages."""
    m = torch.nn.InstanceNorm1d(2, track_running_stats=True, momentum=None).double()
    x = np.random.default_rng(6).normal(size=(3, 2, 5)) + 4
    m(t(x))
    assert torch.equal(m.running_mean, torch.zeros(2, dtype=torch.float64))
    _, _, run = instance_norm_forward(x, running_mean=np.zeros(2), running_var=np.ones(2), momentum=None)
    assert_close(run.mean, x.mean(axis=(0, 2)))


def test_instance_norm_one_spatial_element_same_message_as_torch():
    with pytest.raises(ValueError, match="Expected more than 1 spatial element when training"):
        instance_norm_forward(np.ones((2, 3, 1)))
    with pytest.raises(ValueError, match="Expected more than 1 spatial element when training"):
        F.instance_norm(torch.ones(2, 3, 1, dtype=torch.float64))
