"""Tests of the NumPy reference (normlab.reference): gradients, running statistics, numerics, errors.

Tolerances (float64): analytic vs central-difference gradients < 1e-6 norm-wise relative (typically 1e-9);
graph vs closed-form backward < 1e-12; algebraic identities between ops < 1e-12.
"""
from __future__ import annotations

import ast
import pathlib

import numpy as np
import pytest

from normlab.reference import (
    batch_norm_backward,
    batch_norm_backward_graph,
    batch_norm_forward,
    check_grads,
    group_norm_backward,
    group_norm_forward,
    instance_norm_backward,
    instance_norm_forward,
    layer_norm_backward,
    layer_norm_forward,
    moments,
    normalize_rows,
    numerical_grad,
    rel_error,
    update_running,
)

GRAD_TOL = 1e-6
BN_SHAPES = [(6, 3), (4, 3, 5), (3, 2, 4, 3), (2, 3, 2, 3, 2)]
SPATIAL_SHAPES = [(3, 4, 5), (2, 6, 3, 2), (2, 4, 2, 2, 3)]


def rng(seed=0):
    return np.random.default_rng(seed)


def params(C, r, affine=True):
    if not affine:
        return None, None
    return r.normal(size=C) + 1.0, r.normal(size=C)


# ------------------------------------------------------------------------------------------------------------
# batch norm: gradients
# ------------------------------------------------------------------------------------------------------------
def bn_fns(training, backward=batch_norm_backward, affine=True, running=None):
    rm, rv = running if running is not None else (None, None)

    def fwd(x, *p):
        g, b = p if affine else (None, None)
        return batch_norm_forward(x, g, b, training=training, running_mean=rm, running_var=rv)[0]

    def bwd(dout, x, *p):
        g, b = p if affine else (None, None)
        cache = batch_norm_forward(x, g, b, training=training, running_mean=rm, running_var=rv)[1]
        dx, dg, db = backward(dout, cache)
        return (dx, dg, db) if affine else (dx,)

    return fwd, bwd


@pytest.mark.parametrize("shape", BN_SHAPES)
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("backward", [batch_norm_backward, batch_norm_backward_graph])
def test_batch_norm_grads(shape, training, backward):
    r = rng(1)
    x = r.normal(size=shape) * 2.0 + 0.5
    C = shape[1]
    g, b = params(C, r)
    running = (r.normal(size=C), r.uniform(0.5, 2.0, size=C))
    fwd, bwd = bn_fns(training, backward, running=running)
    err, per = check_grads(fwd, bwd, [x, g, b], per_input=True)
    assert len(per) == 3 and err < GRAD_TOL, per


@pytest.mark.parametrize("shape", BN_SHAPES)
def test_batch_norm_grads_no_affine(shape):
    x = rng(2).normal(size=shape)
    fwd, bwd = bn_fns(True, affine=False)
    assert check_grads(fwd, bwd, [x]) < GRAD_TOL


@pytest.mark.parametrize("shape", BN_SHAPES)
@pytest.mark.parametrize("training", [True, False])
def test_batch_norm_graph_equals_closed_form(shape, training):
    r = rng(3)
    x = r.normal(size=shape) * 3.0 - 1.0
    C = shape[1]
    g, b = params(C, r)
    _, cache, _ = batch_norm_forward(x, g, b, training=training, running_mean=r.normal(size=C),
                                     running_var=r.uniform(0.5, 2, size=C))
    dy = r.normal(size=shape)
    for a, c in zip(batch_norm_backward(dy, cache), batch_norm_backward_graph(dy, cache)):
        assert rel_error(a, c) < 1e-12


def test_batch_norm_forward_matches_definition():
    r = rng(4)
    x = r.normal(size=(5, 3, 4, 2)) * 2 + 1
    g, b = params(3, r)
    y, _, _ = batch_norm_forward(x, g, b, eps=1e-3)
    mu = x.mean(axis=(0, 2, 3), keepdims=True)
    var = x.var(axis=(0, 2, 3), keepdims=True)  # biased
    expected = g[None, :, None, None] * (x - mu) / np.sqrt(var + 1e-3) + b[None, :, None, None]
    assert rel_error(y, expected) < 1e-13


def test_batch_norm_is_row_primitive_on_channel_major_view():
    x = rng(5).normal(size=(4, 3, 5))
    y, _, _ = batch_norm_forward(x)
    rows = np.moveaxis(x, 1, 0).reshape(3, -1)
    xhat, *_ = normalize_rows(rows, 1e-5)
    assert rel_error(y, np.moveaxis(xhat.reshape(3, 4, 5), 0, 1)) < 1e-13


def test_batch_norm_eval_uses_running_stats():
    r = rng(6)
    x = r.normal(size=(4, 3, 2))
    rm, rv = r.normal(size=3), r.uniform(0.5, 2, size=3)
    g, b = params(3, r)
    y, _, run = batch_norm_forward(x, g, b, training=False, running_mean=rm, running_var=rv,
                                   num_batches_tracked=7)
    expected = g[:, None] * (x - rm[:, None]) / np.sqrt(rv[:, None] + 1e-5) + b[:, None]
    assert rel_error(y, expected) < 1e-14
    assert run.mean is rm and run.var is rv and run.num_batches_tracked == 7


# ------------------------------------------------------------------------------------------------------------
# batch norm: running statistics
# ------------------------------------------------------------------------------------------------------------
def run_steps(batches, momentum, rm0=None, rv0=None):
    C = batches[0].shape[1]
    rm = np.zeros(C) if rm0 is None else rm0
    rv = np.ones(C) if rv0 is None else rv0
    nbt = 0
    for xb in batches:
        _, _, run = batch_norm_forward(xb, running_mean=rm, running_var=rv, momentum=momentum,
                                       num_batches_tracked=nbt)
        rm, rv, nbt = run
    return rm, rv, nbt


def test_running_stats_momentum_default_formula():
    r = rng(7)
    x = r.normal(size=(8, 3, 4)) * 2 + 3
    rm0, rv0 = r.normal(size=3), r.uniform(0.5, 2, size=3)
    rm, rv, nbt = run_steps([x], 0.1, rm0.copy(), rv0.copy())
    mean = x.mean(axis=(0, 2))
    unbiased = x.var(axis=(0, 2), ddof=1)
    assert np.allclose(rm, 0.9 * rm0 + 0.1 * mean, rtol=1e-14, atol=1e-15)
    assert np.allclose(rv, 0.9 * rv0 + 0.1 * unbiased, rtol=1e-14, atol=1e-15)
    assert nbt == 1


def test_running_var_is_unbiased_momentum_one():
    x = rng(8).normal(size=(5, 2, 3))
    rm, rv, _ = run_steps([x], 1.0)
    assert np.allclose(rm, x.mean(axis=(0, 2)), rtol=1e-15, atol=1e-15)
    assert np.allclose(rv, x.var(axis=(0, 2), ddof=1), rtol=1e-14)   # n/(n-1) = 15/14, not the biased var
    assert not np.allclose(rv, x.var(axis=(0, 2)), rtol=1e-3)


def test_running_stats_momentum_zero_frozen():
    r = rng(9)
    rm0, rv0 = r.normal(size=2), r.uniform(0.5, 2, size=2)
    batches = [r.normal(size=(4, 2)) * 5 for _ in range(3)]
    rm, rv, nbt = run_steps(batches, 0.0, rm0.copy(), rv0.copy())
    assert np.array_equal(rm, rm0) and np.array_equal(rv, rv0) and nbt == 3


def test_running_stats_cumulative_average():
    r = rng(10)
    batches = [r.normal(size=(6, 3)) * (k + 1) + k for k in range(5)]
    rm, rv, nbt = run_steps(batches, None)
    assert nbt == 5
    assert rel_error(rm, np.mean([b.mean(axis=0) for b in batches], axis=0)) < 1e-14
    assert rel_error(rv, np.mean([b.var(axis=0, ddof=1) for b in batches], axis=0)) < 1e-14


def test_running_stats_several_steps_ema():
    r = rng(11)
    batches = [r.normal(size=(5, 2, 3)) + k for k in range(4)]
    rm, rv, _ = run_steps(batches, 0.3)
    em, ev = np.zeros(2), np.ones(2)
    for b in batches:
        em = 0.7 * em + 0.3 * b.mean(axis=(0, 2))
        ev = 0.7 * ev + 0.3 * b.var(axis=(0, 2), ddof=1)
    assert rel_error(rm, em) < 1e-14 and rel_error(rv, ev) < 1e-14


def test_running_stats_not_returned_without_buffers():
    y, _, run = batch_norm_forward(rng(12).normal(size=(3, 2)))
    assert run is None and y.shape == (3, 2)


def test_update_running_rejects_keras_momentum():
    with pytest.raises(ValueError, match="weight of the new batch"):
        update_running(np.zeros(1), np.ones(1), np.zeros(1), np.ones(1), 1.5, 0)


# ------------------------------------------------------------------------------------------------------------
# batch norm: numerics and edge cases
# ------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", BN_SHAPES)
def test_constant_input_gives_exactly_beta(shape):
    r = rng(13)
    C = shape[1]
    x = np.broadcast_to(r.normal(size=C).reshape((1, C) + (1,) * (len(shape) - 2)) * 1e3 + 0.1, shape).copy()
    g, b = params(C, r)
    y, cache, run = batch_norm_forward(x, g, b, running_mean=np.zeros(C), running_var=np.ones(C))
    assert np.array_equal(y, np.broadcast_to(b.reshape((1, C) + (1,) * (len(shape) - 2)), shape))
    assert np.all(run.var == 0.9)  # unbiased variance of a constant is exactly 0
    for grads in (batch_norm_backward(r.normal(size=shape), cache),
                  batch_norm_backward_graph(r.normal(size=shape), cache)):
        assert all(np.all(np.isfinite(gr)) for gr in grads)
    fwd, bwd = bn_fns(True)
    assert check_grads(fwd, bwd, [x, g, b]) < GRAD_TOL


@pytest.mark.parametrize("offset,scale", [(1e4, 1.0), (1e6, 0.1)])
def test_large_mean_small_spread(offset, scale):
    r = rng(14)
    z = r.normal(size=(16, 3, 4)) * scale
    x = offset + z
    z_exact = x - offset  # exact (Sterbenz): the data the network actually sees, minus the offset
    g, b = params(3, r)
    y, _, run = batch_norm_forward(x, g, b, running_mean=np.zeros(3), running_var=np.ones(3), momentum=1.0)
    y0, _, run0 = batch_norm_forward(z_exact, g, b, running_mean=np.zeros(3), running_var=np.ones(3),
                                     momentum=1.0)
    assert rel_error(y, y0) < 1e-10
    assert rel_error(run.var, run0.var) < 1e-9
    assert rel_error(run.mean - offset, run0.mean) < 1e-8
    fwd, bwd = bn_fns(True)
    assert check_grads(fwd, bwd, [x, g, b]) < 1e-5


def test_one_pass_variance_would_fail_on_large_mean():
    """Why moments() shifts and takes two passes: E[x^2] - E[x]^2 loses ~14 digits at 1e6 + N(0, 0.1)."""
    x = 1e6 + rng(15).normal(size=(4096, 1)) * 0.1
    exact = np.var(x - 1e6, axis=0)
    one_pass = (x * x).mean(axis=0) - x.mean(axis=0) ** 2
    _, var, _ = moments(x, axes=(0,))
    assert rel_error(var[0], exact) < 1e-12
    assert rel_error(one_pass, exact) > 1e-4


def test_moments_constant_rows_exact():
    x = np.full((3, 7), 0.1) * np.arange(1, 4)[:, None]
    mean, var, xc = moments(x, axes=(1,))
    assert np.array_equal(mean[:, 0], x[:, 0]) and np.all(var == 0) and np.all(xc == 0)


def test_one_value_per_channel_raises_in_training_only():
    x = rng(16).normal(size=(1, 3))
    with pytest.raises(ValueError, match="Expected more than 1 value per channel when training"):
        batch_norm_forward(x)
    with pytest.raises(ValueError, match=r"\(1, 3, 1\)"):
        batch_norm_forward(x[..., None])
    y, _, _ = batch_norm_forward(x, training=False, running_mean=np.zeros(3), running_var=np.ones(3))
    assert y.shape == (1, 3)
    batch_norm_forward(rng(16).normal(size=(1, 3, 2)))  # one sample, two values per channel: fine


@pytest.mark.parametrize("shape", [(0, 3), (0, 3, 4), (0, 2, 3, 3)])
def test_empty_batch(shape):
    C = shape[1]
    rm, rv = np.full(C, 0.5), np.full(C, 2.0)
    g, b = params(C, rng(17))
    y, cache, run = batch_norm_forward(np.zeros(shape), g, b, running_mean=rm, running_var=rv,
                                       num_batches_tracked=3)
    assert y.shape == shape
    assert np.array_equal(run.mean, rm) and np.array_equal(run.var, rv) and run.num_batches_tracked == 3
    dx, dg, db = batch_norm_backward(np.zeros(shape), cache)
    assert dx.shape == shape and np.array_equal(dg, np.zeros(C)) and np.array_equal(db, np.zeros(C))
    assert batch_norm_backward_graph(np.zeros(shape), cache)[0].shape == shape


@pytest.mark.parametrize("kwargs,match", [
    (dict(x=np.zeros(3)), "got 1D"),
    (dict(x=np.zeros((2, 3, 1, 1, 1, 1))), "got 6D"),
    (dict(x=np.zeros((2, 3)), gamma=np.ones(4)), r"gamma must have shape \(3,\)"),
    (dict(x=np.zeros((2, 3)), beta=np.ones((3, 1))), r"beta must have shape \(3,\)"),
    (dict(x=np.zeros((2, 3)), eps=0.0), "eps must be > 0"),
    (dict(x=np.zeros((2, 3)), eps=-1e-5), "eps must be > 0"),
    (dict(x=np.zeros((2, 3)), running_mean=np.zeros(3)), "both running_mean and running_var"),
    (dict(x=np.zeros((2, 3)), running_mean=np.zeros(2), running_var=np.ones(2)), "running_mean must have"),
    (dict(x=np.zeros((2, 3)), training=False), "eval mode"),
])
def test_batch_norm_errors(kwargs, match):
    x = kwargs.pop("x")
    with pytest.raises(ValueError, match=match):
        batch_norm_forward(x, **kwargs)


def test_forward_does_not_mutate_inputs():
    r = rng(18)
    x = r.normal(size=(4, 2, 3))
    rm, rv = np.zeros(2), np.ones(2)
    x0 = x.copy()
    batch_norm_forward(x, running_mean=rm, running_var=rv)
    assert np.array_equal(x, x0) and np.array_equal(rm, np.zeros(2)) and np.array_equal(rv, np.ones(2))


# ------------------------------------------------------------------------------------------------------------
# layer norm
# ------------------------------------------------------------------------------------------------------------
LN_CASES = [((4, 5), (5,)), ((2, 3, 4), (4,)), ((2, 3, 4), (3, 4)), ((2, 3, 2, 2), (3, 2, 2)), ((6,), (6,))]


@pytest.mark.parametrize("shape,ns", LN_CASES)
@pytest.mark.parametrize("affine", [True, False])
def test_layer_norm_grads(shape, ns, affine):
    r = rng(20)
    x = r.normal(size=shape) * 2 + 1
    g, b = (r.normal(size=ns) + 1, r.normal(size=ns)) if affine else (None, None)

    def fwd(x, *p):
        return layer_norm_forward(x, ns, *(p if affine else (None, None)))[0]

    def bwd(dout, x, *p):
        dx, dg, db = layer_norm_backward(dout, layer_norm_forward(x, ns, *(p if affine else (None, None)))[1])
        return (dx, dg, db) if affine else (dx,)

    err, per = check_grads(fwd, bwd, [x, g, b] if affine else [x], per_input=True)
    assert err < GRAD_TOL, per


def test_layer_norm_definition_and_int_shape():
    x = rng(21).normal(size=(3, 7))
    y, _ = layer_norm_forward(x, 7, eps=1e-4)
    expected = (x - x.mean(1, keepdims=True)) / np.sqrt(x.var(1, keepdims=True) + 1e-4)
    assert rel_error(y, expected) < 1e-14


def test_layer_norm_constant_and_large_mean():
    r = rng(22)
    g, b = r.normal(size=(4,)), r.normal(size=(4,))
    y, cache = layer_norm_forward(np.full((3, 4), 1e4 + 0.3), (4,), g, b)
    assert np.array_equal(y, np.broadcast_to(b, (3, 4)))
    assert all(np.all(np.isfinite(t)) for t in layer_norm_backward(r.normal(size=(3, 4)), cache))
    z = r.normal(size=(5, 4)) * 0.1
    x = 1e6 + z
    assert rel_error(layer_norm_forward(x, 4, g, b)[0], layer_norm_forward(x - 1e6, 4, g, b)[0]) < 1e-10


def test_layer_norm_over_chw_equals_group_norm_one_group():
    r = rng(23)
    x = r.normal(size=(3, 4, 2, 2))
    y_ln, _ = layer_norm_forward(x, (4, 2, 2))
    y_gn, _ = group_norm_forward(x, 1)
    assert rel_error(y_ln, y_gn) < 1e-14


@pytest.mark.parametrize("shape,ns,match", [
    ((2, 3), (4,), "trailing dims"), ((3,), (2, 3), "trailing dims"), ((2, 3), (), "trailing dims")])
def test_layer_norm_shape_errors(shape, ns, match):
    with pytest.raises(ValueError, match=match):
        layer_norm_forward(np.zeros(shape), ns)


def test_layer_norm_param_shape_error_and_empty():
    with pytest.raises(ValueError, match="gamma must have shape"):
        layer_norm_forward(np.zeros((2, 3)), (3,), np.ones(2))
    y, cache = layer_norm_forward(np.zeros((0, 3)), 3, np.ones(3), np.zeros(3))
    assert y.shape == (0, 3)
    dx, dg, db = layer_norm_backward(np.zeros((0, 3)), cache)
    assert dx.shape == (0, 3) and np.array_equal(dg, np.zeros(3)) and np.array_equal(db, np.zeros(3))


# ------------------------------------------------------------------------------------------------------------
# group norm
# ------------------------------------------------------------------------------------------------------------
GN_CASES = [((3, 6), 2), ((2, 6, 3), 3), ((2, 6, 3), 1), ((2, 4, 3, 2), 4), ((2, 4, 2, 2, 2), 2)]


@pytest.mark.parametrize("shape,G", GN_CASES)
@pytest.mark.parametrize("affine", [True, False])
def test_group_norm_grads(shape, G, affine):
    r = rng(30)
    x = r.normal(size=shape) * 2 - 1
    C = shape[1]
    g, b = params(C, r, affine)

    def fwd(x, *p):
        return group_norm_forward(x, G, *(p if affine else (None, None)))[0]

    def bwd(dout, x, *p):
        dx, dg, db = group_norm_backward(dout, group_norm_forward(x, G, *(p if affine else (None, None)))[1])
        return (dx, dg, db) if affine else (dx,)

    err, per = check_grads(fwd, bwd, [x, g, b] if affine else [x], per_input=True)
    assert err < GRAD_TOL, per


def test_group_norm_definition():
    r = rng(31)
    x = r.normal(size=(2, 6, 5))
    g, b = params(6, r)
    y, cache = group_norm_forward(x, 3, g, b)
    xr = x.reshape(2, 3, 10)
    expected = ((xr - xr.mean(2, keepdims=True)) / np.sqrt(xr.var(2, keepdims=True) + 1e-5)).reshape(x.shape)
    expected = expected * g[:, None] + b[:, None]
    assert rel_error(y, expected) < 1e-14
    assert rel_error(cache.mean, xr.mean(2)) < 1e-14 and rel_error(cache.var, xr.var(2)) < 1e-14


def test_group_norm_constant_input():
    r = rng(32)
    x = np.broadcast_to(r.normal(size=(2, 4, 1)) * 1e4, (2, 4, 3)).copy()
    g, b = params(4, r)
    y, cache = group_norm_forward(x, 4, g, b)
    assert np.array_equal(y, np.broadcast_to(b[None, :, None], x.shape))
    assert all(np.all(np.isfinite(t)) for t in group_norm_backward(r.normal(size=x.shape), cache))


def test_group_norm_errors():
    with pytest.raises(ValueError, match=r"C=6 channels and num_groups=4"):
        group_norm_forward(np.zeros((2, 6, 3)), 4)
    with pytest.raises(ValueError, match="num_groups=0"):
        group_norm_forward(np.zeros((2, 6, 3)), 0)
    with pytest.raises(ValueError, match="gamma must have shape"):
        group_norm_forward(np.zeros((2, 6, 3)), 3, np.ones(3))
    with pytest.raises(ValueError, match="shape"):
        group_norm_forward(np.zeros(6), 3)
    y, _ = group_norm_forward(np.zeros((0, 6, 3)), 3)
    assert y.shape == (0, 6, 3)


# ------------------------------------------------------------------------------------------------------------
# instance norm
# ------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", SPATIAL_SHAPES)
@pytest.mark.parametrize("use_input_stats", [True, False])
def test_instance_norm_grads(shape, use_input_stats):
    r = rng(40)
    x = r.normal(size=shape) * 2 + 1
    C = shape[1]
    g, b = params(C, r)
    rm, rv = r.normal(size=C), r.uniform(0.5, 2, size=C)

    def run(x, g, b):
        return instance_norm_forward(x, g, b, use_input_stats=use_input_stats, running_mean=rm, running_var=rv)

    err, per = check_grads(lambda *a: run(*a)[0], lambda d, *a: instance_norm_backward(d, run(*a)[1]),
                           [x, g, b], per_input=True)
    assert err < GRAD_TOL, per


def test_instance_norm_is_group_norm_with_g_equal_c():
    r = rng(41)
    x = r.normal(size=(3, 4, 5, 2))
    g, b = params(4, r)
    y_in, _, _ = instance_norm_forward(x, g, b)
    y_gn, _ = group_norm_forward(x, 4, g, b)
    assert np.array_equal(y_in, y_gn)
    xr = x.reshape(3, 4, -1)
    expected = (xr - xr.mean(2, keepdims=True)) / np.sqrt(xr.var(2, keepdims=True) + 1e-5)
    assert rel_error(y_in, expected.reshape(x.shape) * g[:, None, None] + b[:, None, None]) < 1e-14


def test_instance_norm_running_stats():
    r = rng(42)
    x = r.normal(size=(3, 2, 5)) * 2 + 1
    rm0, rv0 = r.normal(size=2), r.uniform(0.5, 2, size=2)
    _, _, run = instance_norm_forward(x, running_mean=rm0, running_var=rv0, momentum=0.2, num_batches_tracked=4)
    mean = x.mean(axis=(0, 2))                 # average over n of per-instance means
    var = x.var(axis=2, ddof=1).mean(axis=0)   # average over n of per-instance unbiased variances
    assert rel_error(run.mean, 0.8 * rm0 + 0.2 * mean) < 1e-14
    assert rel_error(run.var, 0.8 * rv0 + 0.2 * var) < 1e-14
    assert run.num_batches_tracked == 5
    _, _, run = instance_norm_forward(x, running_mean=rm0, running_var=rv0, momentum=None)
    assert rel_error(run.mean, mean) < 1e-14 and rel_error(run.var, var) < 1e-14
    # eval with running statistics = batch norm eval
    y, _, run_eval = instance_norm_forward(x, use_input_stats=False, running_mean=rm0, running_var=rv0)
    y_bn, _, _ = batch_norm_forward(x, training=False, running_mean=rm0, running_var=rv0)
    assert np.array_equal(y, y_bn) and run_eval.mean is rm0


def test_instance_norm_errors_and_edges():
    with pytest.raises(ValueError, match="Expected more than 1 spatial element when training"):
        instance_norm_forward(np.zeros((2, 3, 1)))
    with pytest.raises(ValueError, match="at least one spatial dim"):
        instance_norm_forward(np.zeros((2, 3)))
    with pytest.raises(ValueError, match="eval mode"):
        instance_norm_forward(np.zeros((2, 3, 4)), use_input_stats=False)
    with pytest.raises(ValueError, match="eps must be > 0"):
        instance_norm_forward(np.zeros((2, 3, 4)), eps=0)
    # one spatial element is fine with running statistics
    y, _, _ = instance_norm_forward(np.ones((2, 3, 1)), use_input_stats=False, running_mean=np.zeros(3),
                                    running_var=np.ones(3))
    assert y.shape == (2, 3, 1)
    # constant instance -> exactly beta; empty batch leaves running stats alone
    b = np.array([0.1, -0.2, 0.3])
    y, _, _ = instance_norm_forward(np.full((2, 3, 4), 7.7), np.ones(3), b)
    assert np.array_equal(y, np.broadcast_to(b[None, :, None], (2, 3, 4)))
    rm, rv = np.zeros(3), np.ones(3)
    y, _, run = instance_norm_forward(np.zeros((0, 3, 4)), running_mean=rm, running_var=rv, num_batches_tracked=2)
    assert y.shape == (0, 3, 4) and run.mean is rm and run.num_batches_tracked == 2


# ------------------------------------------------------------------------------------------------------------
# gradcheck itself, and the no-torch rule
# ------------------------------------------------------------------------------------------------------------
def test_numerical_grad_on_known_function():
    x = rng(50).normal(size=(3, 4))
    dout = rng(51).normal(size=(3, 4))
    g = numerical_grad(lambda v: np.sin(v) * v, x, dout)
    assert rel_error(g, dout * (np.cos(x) * x + np.sin(x))) < 1e-9


def test_check_grads_catches_a_wrong_backward():
    x = rng(52).normal(size=(5, 2))
    fwd = lambda x: batch_norm_forward(x)[0]                                     # noqa: E731
    wrong = lambda d, x: (d * batch_norm_forward(x)[1].invstd,)                  # eval formula in training
    assert check_grads(fwd, wrong, [x]) > 1e-2


def test_reference_never_imports_torch():
    root = pathlib.Path(__file__).resolve().parents[1] / "src" / "normlab" / "reference"
    files = sorted(root.glob("*.py"))
    assert files
    for path in files:
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""] if node.level == 0 else []
            assert not any(n == "torch" or n.startswith("torch.") for n in names), f"{path.name} imports torch"


@pytest.mark.parametrize("name", ["rownorm", "running", "batchnorm", "layernorm", "groupnorm", "instancenorm",
                                  "gradcheck"])
def test_docstring_examples(name):
    import doctest
    import importlib

    module = importlib.import_module(f"normlab.reference.{name}")
    result = doctest.testmod(module, extraglobs={"np": np}, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0 and (result.attempted > 0 or name == "_checks")
