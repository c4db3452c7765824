"""Property-based checks of the reference (hypothesis): shapes and values drawn at random.

Invariants checked, all in float64:
* graph and closed-form batch-norm backward agree (1e-12);
* the batch-norm input gradient sums to zero per channel (the output is invariant to a per-channel shift);
* adding a per-channel (BN) or per-row (LN) constant leaves the output unchanged;
* instance norm == group norm with G = C, layer norm over (C, *) == group norm with G = 1 (no affine).
"""
from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from normlab.reference import (
    batch_norm_backward,
    batch_norm_backward_graph,
    batch_norm_forward,
    group_norm_forward,
    instance_norm_forward,
    layer_norm_forward,
    rel_error,
)

shapes = st.tuples(st.integers(2, 5), st.integers(1, 4)).flatmap(
    lambda nc: st.lists(st.integers(1, 4), min_size=0, max_size=3).map(lambda sp: nc + tuple(sp)))
seeds = st.integers(0, 2**32 - 1)
SETTINGS = settings(max_examples=40, deadline=None)


@SETTINGS
@given(shape=shapes, seed=seeds, scale=st.sampled_from([1e-2, 1.0, 1e3]), offset=st.sampled_from([0.0, 1e4]))
def test_batch_norm_invariants(shape, seed, scale, offset):
    r = np.random.default_rng(seed)
    C = shape[1]
    x = offset + scale * r.normal(size=shape)
    g, b = r.normal(size=C), r.normal(size=C)
    y, cache, _ = batch_norm_forward(x, g, b)
    dy = r.normal(size=shape)
    closed, graph = batch_norm_backward(dy, cache), batch_norm_backward_graph(dy, cache)
    # dx can cancel to almost nothing (n = 2: xhat = +-1 whatever x is), so measure errors against its natural
    # scale |gamma| * invstd * max|dy| rather than against dx itself
    dx_scale = np.max(np.abs(g) * cache.invstd.reshape(C)) * np.max(np.abs(dy))
    assert np.max(np.abs(closed[0] - graph[0])) < 1e-12 * dx_scale
    for a, c in zip(closed[1:], graph[1:]):
        assert rel_error(a, c) < 1e-12
    axes = (0,) + tuple(range(2, len(shape)))
    assert np.max(np.abs(closed[0].sum(axis=axes))) < 1e-12 * dx_scale * x.size
    shift = r.normal(size=C).reshape((1, C) + (1,) * (len(shape) - 2)) * 10
    y2, _, _ = batch_norm_forward(x + shift, g, b)
    assert rel_error(y, y2) < 1e-9


@SETTINGS
@given(shape=st.tuples(st.integers(1, 4), st.integers(1, 4), st.integers(2, 5)), seed=seeds)
def test_one_primitive(shape, seed):
    r = np.random.default_rng(seed)
    x = r.normal(size=shape) * 3 + 1
    N, C, L = shape
    assert np.array_equal(instance_norm_forward(x)[0], group_norm_forward(x, C)[0])
    assert rel_error(layer_norm_forward(x, (C, L))[0], group_norm_forward(x, 1)[0]) < 1e-14
    y, _ = layer_norm_forward(x, L)
    y2, _ = layer_norm_forward(x + r.normal(size=(N, C, 1)) * 100, L)
    assert rel_error(y, y2) < 1e-10
