"""normlab layers and functional API in float64 against the NumPy reference (tolerance 1e-10).

Outputs, input and parameter gradients, and running statistics over several training steps, then eval.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

import normlab
import normlab.functional as NF
from normlab import reference as R

TOL = 1e-10


def close(a, b, tol=TOL):
    b = b.detach().numpy() if isinstance(b, torch.Tensor) else b
    assert np.shape(a) == np.shape(b), (np.shape(a), np.shape(b))
    assert R.rel_error(a, b) < tol, R.rel_error(a, b)


def randomize_affine(m, r):
    with torch.no_grad():
        for p in (m.weight, m.bias):
            if p is not None:
                p.copy_(torch.from_numpy(r.normal(size=tuple(p.shape))))


def params_np(m):
    w = None if m.weight is None else m.weight.detach().numpy().copy()
    b = None if m.bias is None else m.bias.detach().numpy().copy()
    return w, b


def module_step(m, x, dy):
    """Forward + backward through module ``m``; returns output and (dx, dweight, dbias) as NumPy."""
    m.zero_grad()
    xt = torch.tensor(x, requires_grad=True)
    y = m(xt)
    y.backward(torch.from_numpy(dy))
    grads = [xt.grad] + [None if p is None else p.grad for p in (m.weight, m.bias)]
    return y.detach().numpy(), [None if g is None else g.numpy() for g in grads]


def close_grads(ref, got):
    for a, b in zip(ref, got):
        if a is None or b is None:
            assert a is None and b is None
        else:
            close(a, b)


BN_CASES = [(normlab.BatchNorm1d, (6, 3)), (normlab.BatchNorm1d, (4, 3, 5)), (normlab.BatchNorm2d, (3, 2, 4, 3)),
            (normlab.BatchNorm3d, (2, 3, 2, 3, 2))]


@pytest.mark.parametrize("cls,shape", BN_CASES)
@pytest.mark.parametrize("momentum", [0.1, None, 0.0, 1.0])
def test_batchnorm_modules_vs_reference(cls, shape, momentum):
    r = np.random.default_rng(0)
    C = shape[1]
    m = cls(C, eps=1e-4, momentum=momentum).double()
    randomize_affine(m, r)
    rm, rv, nbt = np.zeros(C), np.ones(C), 0
    for step in range(3):
        x = r.normal(size=shape) * (step + 1) + step
        dy = r.normal(size=shape)
        w, b = params_np(m)
        y, cache, (rm, rv, nbt) = R.batch_norm_forward(x, w, b, 1e-4, running_mean=rm, running_var=rv,
                                                       momentum=momentum, num_batches_tracked=nbt)
        got_y, got_grads = module_step(m, x, dy)
        close(y, got_y)
        close_grads(R.batch_norm_backward(dy, cache), got_grads)
        close(rm, m.running_mean)
        close(rv, m.running_var)
        assert nbt == int(m.num_batches_tracked)
    m.eval()
    x, dy = r.normal(size=shape), r.normal(size=shape)
    w, b = params_np(m)
    y, cache, run = R.batch_norm_forward(x, w, b, 1e-4, training=False, running_mean=rm, running_var=rv)
    got_y, got_grads = module_step(m, x, dy)
    close(y, got_y)
    close_grads(R.batch_norm_backward(dy, cache), got_grads)
    close(run.mean, m.running_mean)


def test_batchnorm_module_no_affine_no_tracking():
    r = np.random.default_rng(1)
    m = normlab.BatchNorm2d(3, affine=False, track_running_stats=False).double()
    x, dy = r.normal(size=(4, 3, 2, 2)), r.normal(size=(4, 3, 2, 2))
    y, cache, run = R.batch_norm_forward(x)
    assert run is None
    for mode in (m.train, m.eval):  # without running statistics eval mode also uses the batch's
        mode()
        got_y, got_grads = module_step(m, x, dy)
        close(y, got_y)
        close(R.batch_norm_backward(dy, cache)[0], got_grads[0])


@pytest.mark.parametrize("shape,ns", [((4, 5), (5,)), ((2, 3, 4), (3, 4)), ((2, 3, 2, 2), (3, 2, 2))])
@pytest.mark.parametrize("affine", [True, False])
def test_layernorm_module_vs_reference(shape, ns, affine):
    r = np.random.default_rng(2)
    m = normlab.LayerNorm(ns, eps=1e-5, elementwise_affine=affine).double()
    if affine:
        randomize_affine(m, r)
    x, dy = r.normal(size=shape) * 2 + 1, r.normal(size=shape)
    w, b = params_np(m) if affine else (None, None)
    y, cache = R.layer_norm_forward(x, ns, w, b, 1e-5)
    for mode in (m.train, m.eval):
        mode()
        got_y, got_grads = module_step(m, x, dy)
        close(y, got_y)
        close_grads(R.layer_norm_backward(dy, cache), got_grads if affine else got_grads[:1] + [None, None])


@pytest.mark.parametrize("shape,G", [((3, 6), 2), ((2, 6, 3), 3), ((2, 6, 3), 1), ((2, 4, 3, 2), 4),
                                     ((2, 4, 2, 2, 2), 2)])
@pytest.mark.parametrize("affine", [True, False])
def test_groupnorm_module_vs_reference(shape, G, affine):
    r = np.random.default_rng(3)
    C = shape[1]
    m = normlab.GroupNorm(G, C, eps=1e-5, affine=affine).double()
    if affine:
        randomize_affine(m, r)
    x, dy = r.normal(size=shape) * 2 - 1, r.normal(size=shape)
    w, b = params_np(m) if affine else (None, None)
    y, cache = R.group_norm_forward(x, G, w, b, 1e-5)
    got_y, got_grads = module_step(m, x, dy)
    close(y, got_y)
    close_grads(R.group_norm_backward(dy, cache), got_grads if affine else got_grads[:1] + [None, None])


IN_CASES = [(normlab.InstanceNorm1d, (3, 4, 5)), (normlab.InstanceNorm2d, (2, 3, 4, 2)),
            (normlab.InstanceNorm3d, (2, 2, 2, 3, 2))]


@pytest.mark.parametrize("cls,shape", IN_CASES)
@pytest.mark.parametrize("momentum", [0.1, 1.0, None])
def test_instancenorm_modules_vs_reference(cls, shape, momentum):
    """With running statistics. torch.nn (and normlab) pass momentum=None to instance_norm as 0.0."""
    r = np.random.default_rng(4)
    C = shape[1]
    m = cls(C, eps=1e-5, momentum=momentum, affine=True, track_running_stats=True).double()
    randomize_affine(m, r)
    ref_momentum = 0.0 if momentum is None else momentum
    rm, rv = np.zeros(C), np.ones(C)
    for step in range(3):
        x, dy = r.normal(size=shape) * (step + 1) + step, r.normal(size=shape)
        w, b = params_np(m)
        y, cache, run = R.instance_norm_forward(x, w, b, 1e-5, running_mean=rm, running_var=rv,
                                                momentum=ref_momentum)
        rm, rv = run.mean, run.var
        got_y, got_grads = module_step(m, x, dy)
        close(y, got_y)
        close_grads(R.instance_norm_backward(dy, cache), got_grads)
        close(rm, m.running_mean)
        close(rv, m.running_var)
    m.eval()
    x, dy = r.normal(size=shape), r.normal(size=shape)
    w, b = params_np(m)
    y, cache, _ = R.instance_norm_forward(x, w, b, 1e-5, use_input_stats=False, running_mean=rm, running_var=rv)
    got_y, got_grads = module_step(m, x, dy)
    close(y, got_y)
    close_grads(R.instance_norm_backward(dy, cache), got_grads)


@pytest.mark.parametrize("cls,shape", IN_CASES)
def test_instancenorm_default_module_vs_reference(cls, shape):
    """Default InstanceNorm: no affine, no running statistics, input statistics in train and eval."""
    r = np.random.default_rng(5)
    m = cls(shape[1]).double()
    x, dy = r.normal(size=shape), r.normal(size=shape)
    y, cache, run = R.instance_norm_forward(x)
    assert run is None
    for mode in (m.train, m.eval):
        mode()
        got_y, got_grads = module_step(m, x, dy)
        close(y, got_y)
        close(R.instance_norm_backward(dy, cache)[0], got_grads[0])


# ------------------------------------------------------------------------------------------------------------
# functional API, directly
# ------------------------------------------------------------------------------------------------------------
def fn_grads(fn, arrays, dy):
    leaves = [None if a is None else torch.tensor(a, requires_grad=True) for a in arrays]
    y = fn(*leaves)
    y.backward(torch.from_numpy(dy))
    return y.detach().numpy(), [None if v is None else v.grad.numpy() for v in leaves]


@pytest.mark.parametrize("shape", [(6, 3), (3, 2, 4, 3)])
@pytest.mark.parametrize("training", [True, False])
def test_functional_batch_norm_vs_reference(shape, training):
    r = np.random.default_rng(6)
    C = shape[1]
    x, dy = r.normal(size=shape) + 2, r.normal(size=shape)
    g, b = r.normal(size=C), r.normal(size=C)
    rm, rv = r.normal(size=C), r.uniform(0.5, 2, size=C)
    y, cache, run = R.batch_norm_forward(x, g, b, 1e-5, training=training, running_mean=rm, running_var=rv,
                                         momentum=0.25)
    trm, trv = torch.from_numpy(rm.copy()), torch.from_numpy(rv.copy())
    got_y, got_grads = fn_grads(lambda x, g, b: NF.batch_norm(x, trm, trv, g, b, training, 0.25, 1e-5),
                                [x, g, b], dy)
    close(y, got_y)
    close_grads(R.batch_norm_backward(dy, cache), got_grads)
    close(run.mean, trm)
    close(run.var, trv)


def test_functional_layer_group_instance_norm_vs_reference():
    r = np.random.default_rng(7)
    x, dy = r.normal(size=(2, 4, 3, 2)) * 3, r.normal(size=(2, 4, 3, 2))
    g, b = r.normal(size=4), r.normal(size=4)
    y, cache = R.group_norm_forward(x, 2, g, b)
    got_y, got = fn_grads(lambda x, g, b: NF.group_norm(x, 2, g, b), [x, g, b], dy)
    close(y, got_y)
    close_grads(R.group_norm_backward(dy, cache), got)

    y, cache, _ = R.instance_norm_forward(x, g, b)
    got_y, got = fn_grads(lambda x, g, b: NF.instance_norm(x, None, None, g, b), [x, g, b], dy)
    close(y, got_y)
    close_grads(R.instance_norm_backward(dy, cache), got)

    ns = (3, 2)
    gl, bl = r.normal(size=ns), r.normal(size=ns)
    y, cache = R.layer_norm_forward(x, ns, gl, bl)
    got_y, got = fn_grads(lambda x, g, b: NF.layer_norm(x, ns, g, b), [x, gl, bl], dy)
    close(y, got_y)
    close_grads(R.layer_norm_backward(dy, cache), got)


@pytest.mark.parametrize("offset,scale", [(1e4, 1.0), (1e6, 0.1)])
def test_large_mean_layers_vs_reference(offset, scale):
    r = np.random.default_rng(8)
    x = offset + r.normal(size=(16, 3, 4)) * scale
    dy = r.normal(size=x.shape)
    m = normlab.BatchNorm1d(3).double()
    y, cache, run = R.batch_norm_forward(x, np.ones(3), np.zeros(3), running_mean=np.zeros(3),
                                         running_var=np.ones(3))
    got_y, got_grads = module_step(m, x, dy)
    close(y, got_y, 1e-9)
    close(R.batch_norm_backward(dy, cache)[0], got_grads[0], 1e-9)
    close(run.var, m.running_var, 1e-9)


def test_constant_input_layers_vs_reference():
    x = np.full((4, 3, 5), 2.5)
    m = normlab.BatchNorm1d(3).double()
    randomize_affine(m, np.random.default_rng(9))
    w, b = params_np(m)
    y, _, _ = R.batch_norm_forward(x, w, b)
    got_y, got_grads = module_step(m, x, np.ones_like(x))
    assert np.array_equal(y, got_y)
    assert all(np.all(np.isfinite(g)) for g in got_grads)
