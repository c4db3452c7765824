"""numba building blocks for the CPU kernels: element conversion, activations, and the loops themselves.

Element types. The loops read any of four storage types and compute in the *compute dtype* (float64 for
float64 storage, float32 otherwise). Sums run in compute-dtype lanes within blocks (at most 2048 elements,
or 64 rows of the (M, C) layout) and are merged in float64: full vector width, and a shifted sum stays exact
enough for a float32 mean near 1e6.

* float32 / float64: used as is.
* bfloat16 is passed as ``int16`` (torch's bits): widening is a 16-bit shift into a float32's high half;
  narrowing rounds to nearest even, NaN stays NaN.
* float16 is passed as ``uint16`` and converted with LLVM's ``half`` type (one instruction with F16C).

Each loop is compiled once per storage type (``cache=True`` keeps the machine code on disk). Layouts:

* ``ncs``: (N, C, S) with S contiguous -- NCHW of any rank. The (n, c) rows of S values are taken in memory
  order, split into a few contiguous runs per thread with per-run partial sums per channel, merged in float64.
* ``rows``: (M, C) with C contiguous -- (N, C) inputs and channels_last (N, H, W, C) / (N, D, H, W, C). Rows are
  split into a few chunks per thread; per-chunk partial sums are merged, then a second parallel pass normalizes.

Both layouts thus stream through memory in order in every pass (statistics, normalize; gradient sums, dx).
"""
from __future__ import annotations

import platform

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic, overload

_OPTS = dict(cache=True, nogil=True, error_model="numpy", fastmath={"reassoc", "contract"})
# The loops over rows, blocks and (sample, group) tasks, compiled without numba's reference counting (nothing in
# them allocates). With it, every array view they take (a row, a block) pays an atomic increment and decrement of
# its array's count: locked instructions, which on x86 also wait for the streaming stores before them to leave the
# core. Layer norm 4096x1024 at one thread, the old and new loops alternating in one process
# (benchmarks/ab_loops.py, an Intel host): forward 3.9 -> 3.1 ms, backward 5.9 -> 4.2 ms; at two threads, where the
# two cores saturate memory, no change.
_LOOP_OPTS = dict(_OPTS, _nrt=False)

IDENTITY, RELU, SILU, SIGMOID = 0, 1, 2, 3


def _copy(fn, name, **constants):
    """``fn`` again under ``name`` (its own on-disk cache entry), with some globals replaced by ``constants``:
    numba reads globals at compile time, so each copy is compiled with its own constant values."""
    import types as pytypes
    env = dict(fn.__globals__, **constants) if constants else fn.__globals__
    twin = pytypes.FunctionType(fn.__code__, env, name, fn.__defaults__, fn.__closure__)
    twin.__qualname__ = name
    twin.__module__ = fn.__module__
    twin.__doc__ = fn.__doc__
    return twin


def _kernel(fn=None, **serial_constants):
    """Compile ``fn`` twice: parallel (``prange`` over threads) and, as ``.serial``, single-threaded with no
    threading-layer launch at all (``prange`` is then ``range``) for small inputs and one-thread calls, where a
    launch costs more than the work. ``serial_constants``: globals the serial twin sees with other values
    (``@_kernel(NAME=value)``)."""
    if fn is None:
        return lambda f: _kernel(f, **serial_constants)
    par = njit(parallel=True, **_OPTS)(fn)
    par.serial = njit(**_OPTS)(_copy(fn, fn.__name__ + "_serial", **serial_constants))
    return par


ACT = IDENTITY  # in each copy that _per_act makes: that copy's activation, a compile-time constant
V_IDENTITY = V_RELU = V_SILU = V_SIGMOID = None  # in each switch that _per_act makes: its four copies


def _act_switch(act, *args):
    if act == RELU:
        return V_RELU(*args)
    if act == SILU:
        return V_SILU(*args)
    if act == SIGMOID:
        return V_SIGMOID(*args)
    return V_IDENTITY(*args)


def _per_act(template, opts=_LOOP_OPTS):
    """``f(act, *args)`` for a ``template(*args)`` that runs an inline loop with the global ``ACT``: four copies
    of the template, each compiled with one activation as a constant (so the loop vectorizes), and a switch that
    calls one of them. One function holding the four inlined loops measured 1.2-1.4x slower for every activation:
    LLVM optimizes the large function's loops worse."""
    codes = {"IDENTITY": IDENTITY, "RELU": RELU, "SILU": SILU, "SIGMOID": SIGMOID}
    copies = {f"V_{k}": njit(**opts)(_copy(template, f"{template.__name__}_{k.lower()}", ACT=v))
              for k, v in codes.items()}
    return njit(**opts)(_copy(_act_switch, template.__name__, **copies))


def _per_act_allocating(template):
    """:func:`_per_act` of a template that allocates (compiled with numba's reference counting)."""
    return _per_act(template, _OPTS)


MODE_TRAIN, MODE_STATS, MODE_EVAL = 0, 1, 2


# ------------------------------------------------------------------------------------------------------
# element conversion
# ------------------------------------------------------------------------------------------------------
def _shaped(like, elem):
    """``elem``, or a vector of it as long as ``like`` where that IR type is a vector."""
    return ir.VectorType(elem, like.count) if isinstance(like, ir.VectorType) else elem


def _widen(builder, bits, bfloat):
    """16-bit storage bits (i16, or a vector of them) -> float32: bfloat16 (``bfloat``) the high half of a float32,
    float16 by LLVM's ``half`` (one instruction with F16C)."""
    if not bfloat:
        return builder.fpext(builder.bitcast(bits, _shaped(bits.type, ir.HalfType())),
                             _shaped(bits.type, ir.FloatType()))
    i32 = _shaped(bits.type, ir.IntType(32))
    wide = builder.zext(bits, i32)
    return builder.bitcast(builder.shl(wide, _int_constant(i32, 16)), _shaped(bits.type, ir.FloatType()))


def _narrow(builder, value, bfloat):
    """float32 (or a vector of them) -> 16-bit storage bits: bfloat16 (``bfloat``) rounded to nearest even, NaN
    kept NaN; float16 by LLVM's ``half``."""
    i16 = _shaped(value.type, ir.IntType(16))
    if not bfloat:
        return builder.bitcast(builder.fptrunc(value, _shaped(value.type, ir.HalfType())), i16)
    i32 = _shaped(value.type, ir.IntType(32))
    bits = builder.bitcast(value, i32)
    lsb = builder.and_(builder.lshr(bits, _int_constant(i32, 16)), _int_constant(i32, 1))
    rounded = builder.add(bits, builder.add(lsb, _int_constant(i32, 0x7FFF)))
    out = builder.select(builder.fcmp_unordered("uno", value, value), _int_constant(i32, 0x7FC0 << 16), rounded)
    return builder.trunc(builder.lshr(out, _int_constant(i32, 16)), i16)


def _int_constant(t, v):
    """The integer constant ``v`` of IR type ``t`` (every lane of a vector type)."""
    return ir.Constant(t, [v] * t.count if isinstance(t, ir.VectorType) else v)


@intrinsic
def _bf16_to_f32(typingctx, u):
    return types.float32(u), lambda context, builder, signature, args: _widen(builder, args[0], True)


@intrinsic
def _f32_to_bf16(typingctx, f):
    return types.int16(types.float32), lambda context, builder, signature, args: _narrow(builder, args[0], True)


@intrinsic
def _f16_to_f32(typingctx, u):
    return types.float32(u), lambda context, builder, signature, args: _widen(builder, args[0], False)


@intrinsic
def _f32_to_f16(typingctx, f):
    return types.uint16(types.float32), lambda context, builder, signature, args: _narrow(builder, args[0], False)


def up(v):
    """Storage element -> compute dtype (stub; the numba overload below is the implementation)."""


def down(v, out):
    """Compute-dtype value -> the storage type of array ``out``."""


def like(v, proto):
    """Cast ``v`` to the type of scalar ``proto``."""


@overload(up, inline="always")
def _up_impl(v):
    if v == types.int16:
        return lambda v: _bf16_to_f32(v)
    if v == types.uint16:
        return lambda v: _f16_to_f32(v)
    if isinstance(v, types.Float):
        return lambda v: v


@overload(down, inline="always")
def _down_impl(v, out):
    dt = out.dtype
    if dt == types.int16:
        return lambda v, out: _f32_to_bf16(np.float32(v))
    if dt == types.uint16:
        return lambda v, out: _f32_to_f16(np.float32(v))
    if dt == types.float32:
        return lambda v, out: np.float32(v)
    if dt == types.float64:
        return lambda v, out: np.float64(v)


@overload(like, inline="always")
def _like_impl(v, proto):
    if proto == types.float32:
        return lambda v, proto: np.float32(v)
    return lambda v, proto: np.float64(v)


# ------------------------------------------------------------------------------------------------------
# activations (code: 0 identity, 1 relu, 2 silu, 3 sigmoid), in the type of z
# ------------------------------------------------------------------------------------------------------
def _exp(z):
    """exp in z's precision (stub)."""


@overload(_exp, inline="always")
def _exp_impl(z):
    if z == types.float32:
        return lambda z: _exp32(z)
    return lambda z: np.exp(z)


@njit(inline="always")
def _exp32(z):
    """float32 exp that vectorizes (no SVML needed): 2**k * p(r), r = z - k ln2, |r| <= ln2/2, ~1 ulp. z is clamped
    to [-87, 88], so k = round(z / ln2) lies in [-126, 127] and 2**k is one normal float32 built from its exponent
    bits (two such halves, for k up to 128, cost the sigmoid 18 % more: 0.32 against 0.26 ns a value in cache, one
    Zen 4 thread, the same results)."""
    one = like(1.0, z)
    zc = min(max(z, like(-87.0, z)), like(88.0, z))
    k = np.floor(zc * like(1.4426950408889634, z) + like(0.5, z))
    r = zc - k * like(0.693145751953125, z) - k * like(1.428606820309417e-06, z)
    p = like(1.0 / 5040, z)
    p = p * r + like(1.0 / 720, z)
    p = p * r + like(1.0 / 120, z)
    p = p * r + like(1.0 / 24, z)
    p = p * r + like(1.0 / 6, z)
    p = p * r + like(0.5, z)
    p = p * r + one
    p = p * r + one
    return p * _exp2i(k)


@intrinsic
def _f32_from_bits(typingctx, u):
    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.FloatType())
    return types.float32(types.int32), codegen


@njit(inline="always")
def _exp2i(k):
    """2**k for an integral float32 k in float32's normal exponent range [-126, 127]."""
    return _f32_from_bits(np.int32((np.int32(k) + np.int32(127)) << np.int32(23)))


@njit(inline="always")
def _sigmoid(z):
    one = like(1.0, z)
    return one / (one + _exp(-z))


@njit(inline="always")
def act_fwd(z, act):
    if act == RELU:
        return like(0.0, z) if z < 0 else z
    if act == SILU:
        return z * _sigmoid(z)
    if act == SIGMOID:
        return _sigmoid(z)
    return z


@njit(inline="always")
def act_grad(g, z, act):
    """dL/dz from dL/dy = g and the pre-activation z."""
    if act == RELU:  # as torch's threshold_backward: a NaN pre-activation passes the gradient
        return like(0.0, z) if z <= 0 else g
    if act == SILU:
        s = _sigmoid(z)
        one = like(1.0, z)
        return g * s * (one + z * (one - s))
    if act == SIGMOID:
        s = _sigmoid(z)
        return g * s * (like(1.0, z) - s)
    return g


# ------------------------------------------------------------------------------------------------------
# block sums: compute-dtype lanes within a block of at most _BLOCK elements, merged in float64 by the caller
#
# float64 accumulators halve the vector width of a float32 loop; a block's float32 sum of at most 2048 shifted
# values loses nothing that matters (relative ~1e-6 with 8-16 vector lanes), and the float64 merge keeps a
# channel of millions of values exact. Every inner loop runs over a 1-D slice from index 0 with a known length:
# the form LLVM vectorizes.
# ------------------------------------------------------------------------------------------------------
_BLOCK = 2048
_SHIFT_SAMPLES = 16  # values averaged into a shift (batch norm NCHW: two per sample from the first eight samples)
_SPREAD_SAMPLES = 4  # values averaged into a row's or group's shift (group, instance and layer norm) ...
_SHIFT_SPAN = 256  # ... taken from this many first values of it


@njit(inline="always")
def _block_sums(xb, shift):
    """(sum d, sum d * d) over one block, d = x - shift."""
    a1 = like(0.0, shift)
    a2 = like(0.0, shift)
    for i in range(xb.size):
        d = up(xb[i]) - shift
        a1 += d
        a2 += d * d
    return a1, a2


@njit(inline="always")
def _block_sums_around(xb, shift, m_s):
    """(sum e, sum e * e) over one block, e = (x - shift) - m_s."""
    a1 = like(0.0, shift)
    a2 = like(0.0, shift)
    for i in range(xb.size):
        e = (up(xb[i]) - shift) - m_s
        a1 += e
        a2 += e * e
    return a1, a2


@njit(inline="always")
def _moments(t1, t2, cnt):
    """(mean of d, second moment of d, biased variance) from float64 shifted sums."""
    m64 = t1 / cnt
    q64 = t2 / cnt
    return m64, q64, max(q64 - m64 * m64, 0.0)


@njit(inline="always")
def _invstd(var, eps, proto):
    """1 / sqrt(var + eps) with the sum rounded to the compute dtype of ``proto`` (as the training path), in float64."""
    return 1.0 / np.sqrt(np.float64(like(var, proto) + like(eps, proto)))


@njit(inline="always")
def _sums_around(v, shift, m_s):
    """Float64 (sum d, sum d * d) over the 1-D ``v``, d = x - shift - m_s, per block of _BLOCK values: the second
    statistics pass of a group or row whose shift lay far from its mean."""
    t1 = 0.0
    t2 = 0.0
    for lo in range(0, v.size, _BLOCK):
        a1, a2 = _block_sums_around(v[lo:lo + _BLOCK], shift, m_s)
        t1 += np.float64(a1)
        t2 += np.float64(a2)
    return t1, t2


@njit(inline="always")
def _spread_mean(v):
    """Mean (float64) of _SPREAD_SAMPLES values spread evenly over the first _SHIFT_SPAN values of the 1-D array
    ``v`` (all of them if fewer; positions ``j * (span // k)``): the shift of the per-sample norms' sums, for a row
    or a group. A single value as the shift (the first) lies more than sqrt(3) standard deviations from the mean in
    ~8 % of rows or groups, each of which then takes a second statistics pass; the mean of four normal values, in
    ~0.05 %. Every row or group waits for its shift before its sums start: sixteen values took ~30 ns a group,
    which on small groups was a third of the forward (GroupNorm (32, 32, 8, 8) G=8: 26.4 -> 18.7 us with four).
    The span is the first cache lines, which the statistics stream reads first anyway: samples spread over a whole
    group or row were loads ahead of the stream (InstanceNorm 32x64x56x56 forward 2.2 -> 2.9 ms)."""
    span = min(v.size, _SHIFT_SPAN)
    k = min(span, _SPREAD_SAMPLES)
    step = span // k
    t = 0.0
    for j in range(k):
        t += np.float64(up(v[j * step]))
    return t / k


# ------------------------------------------------------------------------------------------------------
# batch norm, both layouts: the per-channel steps between the passes (serial: C values, not the activation)
# ------------------------------------------------------------------------------------------------------
@njit(**_OPTS)
def _merge_moments(s1, s2, cnt, m1):
    """m1[0, c], m1[1, c] = mean and second moment of x - shift[c], from the per-run float64 partial sums s1, s2
    (runs x C). Returns whether some channel's shift lies far from its mean (> sqrt(3) standard deviations, so
    q - m^2 would lose more than 2 bits) and the sums should be taken again around the mean."""
    _column_sums(s1, m1[0])
    _column_sums(s2, m1[1])
    mean, second = m1[0], m1[1]
    far = 0
    for c in range(mean.size):  # no early exit: the divisions vectorize (8192 channels 24 -> 6 us)
        m = mean[c] / cnt
        q = second[c] / cnt
        mean[c] = m
        second[c] = q
        far += m * m > 0.75 * q
    return far > 0


@njit(**_OPTS)
def _column_sums(parts, out):
    """out (float64) = the column sums of the (runs, n) partials, added in float64 in run order, a whole row at a
    time: a column at a time (a loop over the runs per column) did not vectorize, (8, 1024) 16 us against 6, and
    on layer norm's K-wide partials cost more than the backward's rows (1x16384: 54 us against ~4)."""
    out[:] = 0.0
    for k in range(parts.shape[0]):
        row = parts[k]
        for c in range(row.size):
            out[c] += row[c]


@njit(**_OPTS)
def _recentre(shift, m1, s1, s2):
    """Every channel's shift moves to the first pass's mean (harmless where it was close already); the partial
    sums are cleared for the second pass."""
    for c in range(shift.size):
        shift[c] = like(np.float64(shift[c]) + m1[0, c], shift[0])
    s1[:] = 0.0
    s2[:] = 0.0


@njit(**_OPTS)
def _finish_stats(shift, m1, w, b, eps, mode, mean, var_or_invstd, a, bb):
    """mean (float64) and, for MODE_STATS, the biased variance, else invstd and the normalization's coefficients
    y = act((x - shift) * a + bb), the small remainder of the mean folded into the bias."""
    for c in range(shift.size):
        m64 = m1[0, c]
        v64 = max(m1[1, c] - m64 * m64, 0.0)
        mean[c] = np.float64(shift[c]) + m64
        if mode == MODE_STATS:
            var_or_invstd[c] = v64
        else:
            inv = _invstd(v64, eps, w[0])
            var_or_invstd[c] = inv
            a[c] = like(inv * w[c], w[0])
            bb[c] = like(np.float64(b[c]) - np.float64(like(m64, w[0])) * np.float64(a[c]), w[0])


# The backward reads, per element, x - x0 with x0 = the channel's mean rounded to the compute dtype (centred, and
# exact for a large mean; mu = mean - x0 is below x0's rounding error), the activation's input
# z = xhat * w + b = (x - x0) * a_z + b_z, and sums g and g * (x - x0); xhat is applied per channel after the
# merge, and dx = g * k_g + (x - x0) * k_d + k_0. Few per-channel values per element matter in the (M, C) layout,
# where they are vectors read beside every row: the earlier form (xhat from x0, mean - x0 and invstd, then z from
# w and b) read eight of them and two accumulators, which for C = 1024 no longer fit in L1 (4096x1024 backward
# with cold caches 4.5 -> 3.3 ms, 25088x256 4.2 -> 3.8 ms).
@njit(**_OPTS)
def _grad_coefficients(w, b, mean, invstd):
    """Per channel: x0 (the mean in the compute dtype), the activation input's a_z, b_z, and mu = mean - x0."""
    nc = w.size
    x0 = np.empty(nc, dtype=w.dtype)
    a_z = np.empty(nc, dtype=w.dtype)
    b_z = np.empty(nc, dtype=w.dtype)
    mu = np.empty(nc)
    for c in range(nc):
        x0[c] = like(mean[c], w[0])
        mu[c] = np.float64(mean[c]) - np.float64(x0[c])
        a = np.float64(invstd[c]) * np.float64(w[c])
        a_z[c] = like(a, w[0])
        b_z[c] = like(np.float64(b[c]) - mu[c] * a, w[0])
    return x0, a_z, b_z, mu


@njit(**_OPTS)
def _grad_finish(sg, sgd, invstd, w, mu, training, cnt, dw, db):
    """db = sum g, dw = sum g * xhat from the per-run sums of g and g * (x - x0), and dx's coefficients
    (k_g, k_d, k_0; k_d and k_0 are zero in evaluation mode, where the statistics are constants)."""
    t1s = np.empty(mu.size)
    t2s = np.empty(mu.size)
    _column_sums(sg, t1s)
    _column_sums(sgd, t2s)
    for c in range(mu.size):
        t2s[c] = np.float64(invstd[c]) * (t2s[c] - mu[c] * t1s[c])
        db[c] = t1s[c]
        dw[c] = t2s[c]
    return _dx_coefficients(t1s, t2s, invstd, w, mu, training, cnt)


@njit(**_OPTS)
def _grad_finish_into(sg, sgd, invstd, w, mu, training, cnt, dw, db, k_g, k_d, k_0):
    """:func:`_grad_finish` writing dx's coefficients into ``k_g``, ``k_d``, ``k_0``."""
    g, d, z = _grad_finish(sg, sgd, invstd, w, mu, training, cnt, dw, db)
    k_g[:] = g
    k_d[:] = d
    k_0[:] = z


@njit(**_OPTS)
def _dx_coefficients(t1s, t2s, invstd, w, mu, training, cnt):
    """dx = g * k_g + (x - x0) * k_d + k_0 per channel, from the batch's dbias (t1s) and dweight (t2s) in
    float64 and its ``cnt`` values per channel."""
    k_g = np.zeros(mu.size, dtype=w.dtype)
    k_d = np.zeros(mu.size, dtype=w.dtype)
    k_0 = np.zeros(mu.size, dtype=w.dtype)
    for c in range(mu.size):
        t1 = t1s[c]
        t2 = t2s[c]
        inv = np.float64(invstd[c])
        scale = np.float64(like(invstd[c] * w[c], w[0]))
        k_g[c] = scale
        if training:  # dx = g * scale - xhat * scale * t2 / cnt - scale * t1 / cnt, xhat = ((x - x0) - mu) * inv
            k_x = -scale * t2 / cnt
            k_d[c] = inv * k_x
            k_0[c] = -scale * t1 / cnt - mu[c] * inv * k_x
    return k_g, k_d, k_0


# ------------------------------------------------------------------------------------------------------
# streaming (non-temporal) stores for large outputs
#
# A plain store to a line that is not in cache first reads the line (read for ownership): writing an output of
# B bytes moves 2B through the memory bus. Non-temporal stores write whole lines without reading them, and do not
# evict the caches' other contents. On outputs larger than most of L3 (where the consumer finds the line in memory
# anyway) that saves a third of an evaluation pass: a 25.7 MB y = (x - r) * a + b took 1.29 -> 0.98 ms at one
# thread (16.8 MB: 0.65 -> 0.61 ms; 4.2 MB, cache-resident: 0.10 -> 0.15 ms, hence the threshold). Used by the
# loops that write y and dx, row by row, when every row starts on a 64-byte boundary and covers whole lines
# (a non-temporal store to part of a line costs a read-modify-write in memory: rows of 196 floats ran 3x slower
# when each row was streamed on its own with gaps between them). The batch-norm (N, C, S) loops also stream rows
# that start or end mid-line, of _STREAM_MIDLINE_FROM bytes and more (14x14 images): each row's whole lines with
# vector stores, its partial first and last lines with scalar non-temporal stores, written in memory order, so
# that the end of one row and the start of the next fill the same line in the write-combining buffer before it
# leaves. Standalone dx pass, 25 MB, caches flushed, 1 thread: rows of 196 floats 3.7-4.4 -> 2.95-3.8 ms, of 144
# and 289 0.84-0.89x of plain stores, of 100 floats at parity and of 49 (7x7) 1.4-1.6x slower (hence the floor).
# ------------------------------------------------------------------------------------------------------
STREAM_FROM = 16 << 20  # bytes of output: half the measured host's L3 (a much larger L3 would want more)
# The per-sample norms' forward reads a (sample, group) block or a row for its statistics, then writes its output:
# streaming that output measured slower where the block is small (3 KB: 2.8 -> 4.6 ms for 256x64x28x28 instance
# norm; an earlier measurement of 4 KB layer-norm rows, 4096x1024 1.1 -> 1.6 ms, was not confirmed in the bench's
# rotation: see _LN_STREAM_FROM), faster from 8 KB. Against a 24 KB threshold,
# A/B at 1 | 2 threads: layer norm 2048x4096 (16 KB rows) 4.7-4.8 -> 3.1-3.3 | 2.4 -> 1.2-1.7 ms, 4096x2048 (8 KB)
# 4.0-4.5 -> 3.1-3.3 | 2.2 -> 1.1-1.7 ms; instance norm 32x64x56x56 (12.5 KB) 1.8 -> 2.0-2.2 | 1.5-1.6 -> 0.7-1.1
# ms. Their backward streams dx at any size (3 KB blocks: 4.6 -> 3.8 ms).
# From 6 KB (2026-12-02; was 8 KB, and 24 KB on one thread), with 14x14 rows streamed mid-line
# (_normalized_row): group norm (32, 256) on 128x256x14x14 (6.1 KB blocks) forward at 2 threads 0.94-0.97x of
# torch plain against 1.21-1.23x streamed (two process-alternating A/B runs); at 1 thread, three runs, 0.95-1.07x
# against 1.23-1.30x, and the 12.5 KB blocks of group norm (64, 64) on 32x64x56x56 0.96-1.12x against 1.02-1.27x.
# (An earlier A/B had found those 12.5 KB blocks slower streamed on one thread, 1.8-2.1 ms plain against 2.0-2.4,
# and kept the serial twin at 24 KB.)
_GROUP_STREAM_FROM = 6 << 10
# Layer-norm rows stream from 4 KB: in the bench's rotation (torch and a same-size copy between calls, so the
# caches hold little of x), 4096x1024 forward at 2 threads, four process-alternating A/B runs of three
# measurements: 1.25-1.93x of torch streamed against 0.98-1.22x plain (0.96-1.66 ms against 1.26-2.12); at 1
# thread 0.67-1.21x against 0.83-1.17x, a wash. Standalone, caches flushed, 1 thread: rows of 3-4 KB 0.6-0.65x
# of plain stores' time, 2 KB 0.75-0.8x, 1 KB at parity; but 16384x512 (2 KB rows) measured slower streamed in
# the rotation at 1 thread (4.9-7.5 against 4.3-5.6 ms), hence 4 KB. In a network's order (three inputs in
# turn, a residual add consuming each output), 4096x1024 streamed ran 1.06-1.69x of torch, plain 0.86-1.08x.
_LN_STREAM_FROM = 4 << 10
_CAN_STREAM = platform.machine().lower() in ("x86_64", "amd64")
_STREAM_MIDLINE_FROM = 512  # bytes per row: the (N, C, S) loops stream rows that start or end mid-line from here


def _mark_nontemporal(builder, store):
    """Gives the IR ``store`` LLVM's ``nontemporal`` hint: a streaming store."""
    store.set_metadata("nontemporal", builder.module.add_metadata([ir.Constant(ir.IntType(32), 1)]))


def _nontemporal_store(align):
    """Codegen of ``arr[idx] = val`` as a store with LLVM's ``nontemporal`` hint, declared ``align``-byte aligned
    (None: the element's own size)."""
    def codegen(context, builder, signature, args):
        arrty = signature.args[0]
        ary = context.make_array(arrty)(context, builder, args[0])
        ptr = cgutils.get_item_pointer(context, builder, arrty, ary, [args[1]], wraparound=False)
        _mark_nontemporal(builder, builder.store(
            args[2], ptr, align=align or context.get_abi_sizeof(context.get_data_type(arrty.dtype))))
        return context.get_dummy_value()
    return codegen


@intrinsic
def _store_stream(typingctx, arr, idx, val):
    """``arr[idx] = val`` as a non-temporal store. The address is declared 64-byte aligned, which holds for the
    wide stores the loop vectorizer makes of a row that starts on a line (the only way to get aligned
    ``vmovntps``: the vectorizer takes a store's alignment from the scalar one's), not for a scalar element."""
    return types.void(arr, idx, val), _nontemporal_store(64)


@intrinsic
def _store_stream_one(typingctx, arr, idx, val):
    """``arr[idx] = val`` as a scalar non-temporal store at the element's own alignment (``movntss`` / ``movnti``
    where the target has one; the vectorizer leaves such a loop scalar): the partial lines at a row's ends."""
    return types.void(arr, idx, val), _nontemporal_store(None)


@intrinsic
def _stream_fence(typingctx):
    """Orders the non-temporal stores before what follows (x86 ``sfence``; they are weakly ordered)."""
    sig = types.void()

    def codegen(context, builder, signature, args):
        if _CAN_STREAM:
            fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.VoidType(), []),
                                                "llvm.x86.sse.sfence")
            builder.call(fn, [])
        return context.get_dummy_value()
    return sig, codegen


@intrinsic
def _address(typingctx, arr):
    sig = types.intp(arr)

    def codegen(context, builder, signature, args):
        ary = context.make_array(signature.args[0])(context, builder, args[0])
        return builder.ptrtoint(ary.data, ir.IntType(64))
    return sig, codegen


@njit(inline="always")
def _large_output(out, whole):
    """Whether ``out`` is an output the loops may stream at all: x86, float32 or float64, STREAM_FROM bytes in
    ``out`` or in the whole output it is a part of (``whole`` bytes: the native glue's runs each write a part of
    one output; 0 where ``out`` is the whole)."""
    return _CAN_STREAM and max(out.nbytes, whole) >= STREAM_FROM and (out.itemsize == 4 or out.itemsize == 8)


@njit(inline="always")
def _streams(out, row, whole):
    """Whether the loops write ``out`` (rows of ``row`` elements, contiguous) with streaming stores: a large
    output (:func:`_large_output`) whose every row starts on a 64-byte boundary."""
    return _large_output(out, whole) and (row * out.itemsize) % 64 == 0 and _address(out) % 64 == 0


@njit(inline="always")
def _streams_ncs(out, row, whole):
    """:func:`_streams` for the batch-norm (N, C, S) loops, which also stream rows that start or end mid-line
    when a row holds _STREAM_MIDLINE_FROM bytes or more (see :func:`_line_split`), if the elements lie on their
    own alignment (a buffer viewed at an odd byte offset does not: its whole lines would not start on a line)."""
    return _streams(out, row, whole) or (_large_output(out, whole) and row * out.itemsize >= _STREAM_MIDLINE_FROM
                                         and _address(out) % out.itemsize == 0)


@njit(inline="always")
def _line_split(row):
    """(h, e) for a contiguous row: row[:h] lies before its first 64-byte boundary, row[h:e] is whole lines,
    row[e:] the partial last line (h = 0 and e = row.size for a row that starts and ends on a boundary)."""
    per = 64 // row.itemsize
    h = min(row.size, (64 - _address(row) % 64) % 64 // row.itemsize)
    return h, h + (row.size - h) // per * per


# ------------------------------------------------------------------------------------------------------
# batch norm, (N, C, S) layout: every pass walks the (n, c) rows of S values in memory order, in contiguous runs
# of rows (one per task), with per-run partial sums per channel merged in float64. A channel-major walk (one task
# per channel: its statistics, then its normalization while its rows are still in L2) jumps between N rows far
# apart, which the hardware prefetcher follows poorly: on a host with 512 KB of L2 per core, where a channel of
# the suite's shapes did not stay in L2, it measured 1.2-2.3x slower for the training forward ((128, 256, 14, 14):
# 4.2 vs 1.8 ms on one thread), although it reads the activation from memory once less. Where a channel does fit
# (2 MB of L2 per core), the channel-major kernels below (``bn_fwd_ncs_channels``, ``bn_bwd_ncs_channels``) read it
# from memory once per pass pair and win; the glue (``cpu._by_channel``) chooses by the host's L2 size.
# The row loops take (r_lo, r_hi, step): step 1 walks the rows in memory order, step C one channel's rows.
# ------------------------------------------------------------------------------------------------------
_ONE = np.intp(1)  # the memory-order step: an intp like the channel kernels' C (a literal 1 compiles every loop twice)
_ZERO = np.intp(0)  # a first row, or the (M, C) loops' lanes argument for their memory form: as _ONE, not a literal


@njit(inline="always")
def _next_channel(c, nc, step):
    """The channel of the next row a loop takes: of the next (n, c) row in memory order (``step`` 1), or the same
    (``step`` C: one channel's rows). The loops over rows take each row of the (N * C, S) view, which LLVM handles
    best (0-based, contiguous); x[n, c] with n, c = divmod(r, nc) per row cost 20-30 % of an eval pass over rows of
    196 values (128x256x14x14: 2.4-2.75 ms against 1.75 ms)."""
    if step != 1:
        return c
    return 0 if c + 1 == nc else c + 1


# Short (n, c) rows (LeNet's 10x10 and ResNet's 14x14 maps) pay per row for the loop vectorizer's forms: a main
# loop of four 64-byte vectors, an epilogue of 32-byte ones, a scalar remainder and a horizontal reduction of each
# form's accumulators (rows of 100 float32 took ~19 ns each beside ~7 ns for their values in cache: 131,072 values
# summed in 33 us as rows of 100, 9 us as rows of 3136). The sums of a row of at most _BLOCK values are written as
# LLVM IR instead: 64-byte vectors two at a time, the last partial one a masked load (its missing lanes read as
# the shift, so they add zero), one reduction per row; 16-bit rows widened to float32 vectors (:class:`_RegTypes`).
def _row_sums_ir_codegen(grads):
    """Codegen of ``_row_sums_ir(x2, dy2, r, shift)`` -> (sum d, sum d * d) or, if ``grads``, (sum g, sum g * d)
    with d = x2[r, i] - shift and g = dy2[r, i] (identity activation), in x's element type, returned as float64.
    x2, dy2: (rows, S) C-contiguous arrays of one storage type (:class:`_RegTypes`; other combinations return
    zeros: the callers do not take this path for them)."""
    def codegen(context, builder, signature, args):
        xt, dyt = signature.args[0], signature.args[1]
        x2, dy2, r, shift = args
        f64 = ir.DoubleType()
        if xt.dtype not in _REG_STORAGE or dyt.dtype != xt.dtype:
            zero = ir.Constant(f64, 0.0)
            return context.make_tuple(builder, signature.return_type, [zero, zero])
        st = _RegTypes(context, xt.dtype)
        elem, lanes, vt, item = st.elem, st.lanes, st.vt, st.item
        intp = context.get_value_type(types.intp)
        xa = context.make_array(xt)(context, builder, x2)
        ns = builder.extract_value(xa.shape, 1)
        r = context.cast(builder, r, signature.args[2], types.intp)
        start = builder.mul(r, ns)
        xrow = builder.gep(xa.data, [start])
        dyrow = builder.gep(context.make_array(dyt)(context, builder, dy2).data, [start])
        sh = context.cast(builder, shift, signature.args[3], st.compute)
        shv = _splat(builder, sh, vt)
        zero = ir.Constant(vt, None)
        acc = [cgutils.alloca_once_value(builder, zero) for _ in range(4)]  # (sum, second) x two chains
        for a in acc:
            builder.store(zero, a)

        def add(chain, xv, gv):
            d = builder.fsub(xv, shv)
            _accumulate(builder, acc[2 * chain], acc[2 * chain + 1], gv if grads else d, d)

        def load(row, at):
            return st.load(builder, row, at)

        step = ir.Constant(intp, lanes)
        full = builder.sdiv(ns, step)
        pairs = builder.sdiv(full, ir.Constant(intp, 2))
        with cgutils.for_range(builder, pairs, intp=intp) as loop:
            at = builder.mul(loop.index, ir.Constant(intp, 2 * lanes))
            at2 = builder.add(at, step)
            add(0, load(xrow, at), load(dyrow, at) if grads else None)
            add(1, load(xrow, at2), load(dyrow, at2) if grads else None)
        done = builder.mul(pairs, ir.Constant(intp, 2 * lanes))
        with builder.if_then(builder.icmp_signed("!=", builder.srem(full, ir.Constant(intp, 2)),
                                                 ir.Constant(intp, 0))):
            add(0, load(xrow, done), load(dyrow, done) if grads else None)
        done = builder.mul(full, step)
        rest = builder.sub(ns, done)
        with builder.if_then(builder.icmp_signed(">", rest, ir.Constant(intp, 0))):
            mask = _lane_masks(builder, rest, 1, lanes, intp)[0]
            xv = st.load(builder, xrow, done, mask, shv)
            add(1, xv, st.load(builder, dyrow, done, mask) if grads else None)
        reduce = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(elem, [elem, vt]),
            f"llvm.vector.reduce.fadd.{_llvm_suffix(vt)}")
        out = []
        for k in range(2):
            both = builder.fadd(builder.load(acc[k]), builder.load(acc[2 + k]))
            total = builder.call(reduce, [ir.Constant(elem, 0.0), both], fastmath=("reassoc",))
            out.append(builder.fpext(total, f64) if item == 4 else total)
        return context.make_tuple(builder, signature.return_type, out)
    return codegen


@intrinsic
def _row_sums_ir(typingctx, x2, dy2, r, shift):
    """(sum d, sum d * d) over row r of x2, d = x - shift (``dy2`` unused; see :func:`_row_sums_ir_codegen`)."""
    return types.UniTuple(types.float64, 2)(x2, dy2, r, shift), _row_sums_ir_codegen(False)


@intrinsic
def _row_grad_sums_ir(typingctx, x2, dy2, r, shift):
    """(sum g, sum g * d) over row r, g = dy2[r], d = x2[r] - shift."""
    return types.UniTuple(types.float64, 2)(x2, dy2, r, shift), _row_sums_ir_codegen(True)


@njit(inline="always")
def _short_rows_ir(x, other):
    """Whether the (N, C, S) sums take :func:`_row_sums_ir`: rows of at most _BLOCK values, ``other`` (dy, or x
    itself) of the same element size (the glues give dy x's dtype)."""
    return other.itemsize == x.itemsize and x.shape[2] <= _BLOCK


@njit(inline="always")
def _short_rows_sums(x2, dy2, r_lo, r_hi, step, nc, shift, s1, s2, grads):
    """s1[c], s2[c] += :func:`_row_sums_ir` (``grads`` False) or :func:`_row_grad_sums_ir` of each (n, c) row
    r_lo, r_lo + step, ... below r_hi of the (N * C, S) views."""
    c = r_lo % nc
    for r in range(r_lo, r_hi, step):
        if grads:
            a1, a2 = _row_grad_sums_ir(x2, dy2, r, shift[c])
        else:
            a1, a2 = _row_sums_ir(x2, dy2, r, shift[c])
        s1[c] += a1
        s2[c] += a2
        c = _next_channel(c, nc, step)


@njit(**_LOOP_OPTS)
def _ncs_sums(x, r_lo, r_hi, step, shift, s1, s2):
    """s1[c] += sum (x - shift[c]), s2[c] += sum (x - shift[c])**2 over the (n, c) rows r_lo..r_hi by ``step``: per
    block of at most _BLOCK values in the compute dtype of ``shift``, merged in float64."""
    nc = x.shape[1]
    ns = x.shape[2]
    x2 = x.reshape(-1, ns)
    c = r_lo % nc
    if _short_rows_ir(x, x):
        _short_rows_sums(x2, x2, r_lo, r_hi, step, nc, shift, s1, s2, False)
        return
    for r in range(r_lo, r_hi, step):
        xr = x2[r]
        for lo in range(0, ns, _BLOCK):
            a1, a2 = _block_sums(xr[lo:lo + _BLOCK], shift[c])
            s1[c] += np.float64(a1)
            s2[c] += np.float64(a2)
        c = _next_channel(c, nc, step)


@_kernel
def bn_eval_ncs(x, y, w, b, eps, act, mean, var, nchunks, whole):
    """Evaluation forward on (N, C, S): y = act((x - mean) * w / sqrt(var + eps) + b), the (n, c) rows taken
    in memory order (one streaming pass, as a copy: a channel-major walk jumps between N distant rows and
    measured 2x slower), in ``nchunks`` contiguous runs of rows. ``whole``: bytes of the output ``y`` is a part of
    (the native glue's runs), else 0 (see :func:`_large_output`)."""
    nc = x.shape[1]
    ref = _scratch(nc, w)
    a = _scratch(nc, w)
    bb = _scratch(nc, w)
    for c in range(nc):  # per channel once, not once per row
        ref[c] = like(mean[c], w[0])
        a[c] = like(_invstd(var[c], eps, w[0]) * w[c], w[0])
        bb[c] = b[c]
    ref_l, a_l, bb_l = _ncs_lanes(ref, x), _ncs_lanes(a, x), _ncs_lanes(bb, x)
    stream = _ncs_streams(y, whole)
    for k in prange(nchunks):
        _ncs_normalize(act, x, y, k, nchunks, ref_l, a_l, bb_l, stream)


@njit(inline="always")
def _normalized(v, ref, a, b, act, out):
    """act((v - ref) * a + b) in ``out``'s storage type."""
    return down(act_fwd((up(v) - ref) * a + b, act), out)


@njit(inline="always")
def _normalized_row(xr, yr, rc, ac, bc, act, stream):
    """yr[i] = _normalized(xr[i]) for one contiguous row (a channel's S values). ``stream``: whole lines with
    vector streaming stores, the partial ones at the row's ends (a row that starts or ends mid-line) with scalar
    ones; the caller fences."""
    if stream:
        h, e = _line_split(yr)
        for i in range(h):
            _store_stream_one(yr, i, _normalized(xr[i], rc, ac, bc, act, yr))
        xb = xr[h:e]
        yb = yr[h:e]
        for i in range(yb.size):
            _store_stream(yb, i, _normalized(xb[i], rc, ac, bc, act, yr))
        for i in range(e, yr.size):
            _store_stream_one(yr, i, _normalized(xr[i], rc, ac, bc, act, yr))
    else:
        for i in range(xr.size):
            yr[i] = _normalized(xr[i], rc, ac, bc, act, yr)


@njit(inline="always")
def _eval_rows_loop(x, y, r_lo, r_hi, step, ref, a, bb, act, stream):
    nc = x.shape[1]
    ns = x.shape[2]
    x2 = x.reshape(-1, ns)
    y2 = y.reshape(-1, ns)
    c = r_lo % nc
    for r in range(r_lo, r_hi, step):
        _normalized_row(x2[r], y2[r], ref[c], a[c], bb[c], act, stream)
        c = _next_channel(c, nc, step)
    if stream:
        _stream_fence()


@_per_act
def _eval_rows(x, y, r_lo, r_hi, step, ref, a, bb, stream):
    """y[n, c] = act((x[n, c] - ref[c]) * a[c] + bb[c]) for the (n, c) rows r_lo..r_hi by ``step``
    (streaming stores if ``stream``)."""
    _eval_rows_loop(x, y, r_lo, r_hi, step, ref, a, bb, ACT, stream)


# Short (n, c) rows (S below _FLAT_S_BELOW: BatchNorm1d over short sequences, 2x2 or 3x3 maps) cost more per row
# than per value in the loops above (a row's setup and its reduction), and the rows of small S run several times
# slower than the same bytes as (M, C) rows. Such inputs run as flat rows instead: sample n's C * S values are one
# row, lane j of it holds channel j // S, the per-channel values repeated S times to the lanes and the per-lane sums
# folded back, through the (M, C) loops (their memory form). One thread, float32, sums of 131072 values in (16, C, S)
# (2026-12-06): S = 2 396 us as (n, c) rows with the IR sums (250 with plain loops), S = 4 199 (143), S = 8 100
# (77), S = 16 54 (45); the same values as 16 rows of 8192, 45 us with the forward's per-channel work. Training
# forward against torch at 2 threads before: (64, 128, 2) 0.66x, (128, 64, 3) 0.80x, (8, 8192, 2) 0.80x.
_FLAT_S_BELOW = 16


@njit(inline="always")
def _flat(x):
    """Whether the (N, C, S) loops take x as flat sample rows (see the note above)."""
    return x.shape[2] < _FLAT_S_BELOW


@njit(inline="always")
def _flat_rows(a):
    """The (N, C * S) view of a C-contiguous (N, C, S) array: its samples as rows."""
    return a.reshape(a.shape[0], a.shape[1] * a.shape[2])


@njit(**_OPTS)
def _repeat(v, s):
    """``v`` with each value repeated ``s`` times: per-channel values beside a flat sample row, whose lane j holds
    channel j // s."""
    out = np.empty(v.size * s, dtype=v.dtype)
    for c in range(v.size):
        for i in range(s):
            out[c * s + i] = v[c]
    return out


@njit(**_OPTS)
def _fold_repeat(lanes, s, out):
    """out[t, c] = the sum (float64) of lanes[t, c * s .. c * s + s - 1]: per-run lane sums of flat sample rows ->
    per-run channel sums."""
    for t in range(lanes.shape[0]):
        for c in range(out.shape[1]):
            acc = 0.0
            for i in range(s):
                acc += lanes[t, c * s + i]
            out[t, c] = acc


@njit(**_OPTS)
def _ncs_lanes(v, x):
    """Per-channel ``v`` as the (N, C, S) loops of ``x`` take it: repeated to the lanes of flat sample rows where x
    runs as those (:func:`_flat`), else ``v`` itself."""
    return _repeat(v, x.shape[2]) if _flat(x) else v


@njit(inline="always")
def _ncs_streams(out, whole):
    """Whether the (N, C, S) loops stream ``out``: :func:`_streams` of its flat sample rows, or
    :func:`_streams_ncs` of its (n, c) rows."""
    if _flat(out):
        return _streams(_flat_rows(out), out.shape[1] * out.shape[2], whole)
    return _streams_ncs(out, out.shape[2], whole)


@njit(inline="always")
def _ncs_normalize(act, x, y, k, nchunks, ref, a, bb, stream):
    """Run k of ``nchunks`` of y = act((x - ref) * a + bb) on (N, C, S): samples as flat rows where x takes them,
    ref, a, bb per lane (:func:`_ncs_lanes`), else (n, c) rows."""
    nb, nc = x.shape[0], x.shape[1]
    if _flat(x):
        _rows_normalize(act, _flat_rows(x), _flat_rows(y), _ZERO, k * nb // nchunks, (k + 1) * nb // nchunks, ref, a,
                        bb, stream)
    else:
        _eval_rows(act, x, y, k * nb * nc // nchunks, (k + 1) * nb * nc // nchunks, _ONE, ref, a, bb, stream)


@njit(inline="always")
def _ncs_dx_run(act, dy, x, dx, k, nchunks, x0, a_z, b_z, k_g, k_d, k_0, stream):
    """Run k of ``nchunks`` of the backward's dx on (N, C, S), as :func:`_ncs_normalize` (coefficients per lane
    where x runs as flat sample rows)."""
    nb, nc = x.shape[0], x.shape[1]
    if _flat(x):
        _row_dx(act, _flat_rows(dy), _flat_rows(x), x0, a_z, b_z, _ZERO, k * nb // nchunks, (k + 1) * nb // nchunks,
                k_g, k_d, k_0, _flat_rows(dx), stream)
    else:
        _ncs_dx(act, dy, x, k * nb * nc // nchunks, (k + 1) * nb * nc // nchunks, _ONE, x0, a_z, b_z, k_g, k_d, k_0,
                dx, stream)


@njit(**_OPTS)
def _ncs_shift(x, w):
    """Per channel, the mean of _SHIFT_SAMPLES of its values (positions 0 and S // 2 of the first samples), in the
    compute dtype of ``w``: the shift of the (N, C, S) statistics."""
    nb, nc, ns = x.shape
    shift = _scratch(nc, w)
    k0 = min(nb, _SHIFT_SAMPLES // 2)
    for c in range(nc):
        t = 0.0
        for n in range(k0):
            t += np.float64(up(x[n, c, 0])) + np.float64(up(x[n, c, ns // 2]))
        shift[c] = like(t / (2 * k0), w[0])
    return shift


@_kernel
def bn_fwd_ncs(x, y, w, b, eps, act, mode, mean, var_or_invstd, nchunks):
    """mode TRAIN: stats then normalize, writes mean/invstd; STATS: writes mean/var only (EVAL: bn_eval_ncs).

    Statistics: sums of x - shift per block, merged in float64; where the shift lies far from the mean (> sqrt(3)
    standard deviations, so q - m^2 would lose more than 2 bits) a second pass over the whole activation sums
    around the first pass's mean, which becomes the shift. The shift is the mean of _SHIFT_SAMPLES values per
    channel, from different samples and positions: a channel's first value alone lies that far out in ~8 % of
    channels, so with 64 channels almost every call read the activation twice (32x64x56x56 statistics: 1.6 vs
    0.93 ms); a constant channel's shift is still its value exactly."""
    nb, nc, ns = x.shape
    rows = nb * nc
    cnt = nb * ns
    flat = _flat(x)
    x2 = _flat_rows(x)
    shift = _ncs_shift(x, w)
    s1 = _zeros2(nchunks, nc)
    s2 = _zeros2(nchunks, nc)
    s1_l = _zeros2(nchunks, nc * ns if flat else 0)  # flat rows: per-lane sums
    s2_l = _zeros2(nchunks, nc * ns if flat else 0)
    m1 = _zeros2(2, nc)
    for attempt in range(2):
        if flat:
            shift_l = _repeat(shift, ns)
            for k in prange(nchunks):
                _row_sums(x2, shift_l, _ZERO, k * nb // nchunks, (k + 1) * nb // nchunks, s1_l[k], s2_l[k])
            _fold_repeat(s1_l, ns, s1)
            _fold_repeat(s2_l, ns, s2)
        else:
            for k in prange(nchunks):
                _ncs_sums(x, k * rows // nchunks, (k + 1) * rows // nchunks, _ONE, shift, s1[k], s2[k])
        redo = _merge_moments(s1, s2, cnt, m1)
        if attempt == 1 or not redo:
            break
        _recentre(shift, m1, s1, s2)
        s1_l[:] = 0.0
        s2_l[:] = 0.0
    a = _scratch(nc, w)
    bb = _scratch(nc, w)
    _finish_stats(shift, m1, w, b, eps, mode, mean, var_or_invstd, a, bb)
    if mode == MODE_STATS:
        return
    ref_l, a_l, bb_l = _ncs_lanes(shift, x), _ncs_lanes(a, x), _ncs_lanes(bb, x)
    stream = _ncs_streams(y, _ZERO)
    for k in prange(nchunks):
        _ncs_normalize(act, x, y, k, nchunks, ref_l, a_l, bb_l, stream)


@njit(inline="always")
def _ncs_grad_sums_loop(dy, x, r_lo, r_hi, step, x0, a_z, b_z, act, s1, s2):
    nc = x.shape[1]
    ns = x.shape[2]
    x2 = x.reshape(-1, ns)
    dy2 = dy.reshape(-1, ns)
    c = r_lo % nc
    if act == IDENTITY and _short_rows_ir(x, dy):
        _short_rows_sums(x2, dy2, r_lo, r_hi, step, nc, x0, s1, s2, True)
        return
    for r in range(r_lo, r_hi, step):
        xr = x2[r]
        dyr = dy2[r]
        x0c, azc, bzc = x0[c], a_z[c], b_z[c]
        for lo in range(0, ns, _BLOCK):
            xb = xr[lo:lo + _BLOCK]
            db = dyr[lo:lo + _BLOCK]
            a1 = like(0.0, x0c)
            a2 = like(0.0, x0c)
            for i in range(xb.size):
                d = up(xb[i]) - x0c
                g = act_grad(up(db[i]), d * azc + bzc, act)
                a1 += g
                a2 += g * d
            s1[c] += np.float64(a1)
            s2[c] += np.float64(a2)
        c = _next_channel(c, nc, step)


@_per_act
def _ncs_grad_sums(dy, x, r_lo, r_hi, step, x0, a_z, b_z, s1, s2):
    """s1[c] += sum g, s2[c] += sum g * (x - x0) over the (n, c) rows r_lo..r_hi by ``step``, g = dL/dz."""
    _ncs_grad_sums_loop(dy, x, r_lo, r_hi, step, x0, a_z, b_z, ACT, s1, s2)


@njit(inline="always")
def _dx_value(xv, dyv, x0, a_z, b_z, k_g, k_d, k_0, act, out):
    """dx of one element, in ``out``'s storage type: g * k_g + (x - x0) * k_d + k_0, g = dL/dz."""
    d = up(xv) - x0
    g = act_grad(up(dyv), d * a_z + b_z, act)
    return down(g * k_g + d * k_d + k_0, out)


@njit(inline="always")
def _dx_row(xr, dyr, dxr, x0c, azc, bzc, kg, kd, k0, act, stream):
    """dxr[i] = _dx_value(xr[i], dyr[i]) for one contiguous row, streamed as :func:`_normalized_row`."""
    if stream:
        h, e = _line_split(dxr)
        for i in range(h):
            _store_stream_one(dxr, i, _dx_value(xr[i], dyr[i], x0c, azc, bzc, kg, kd, k0, act, dxr))
        xb = xr[h:e]
        dyb = dyr[h:e]
        dxb = dxr[h:e]
        for i in range(dxb.size):
            _store_stream(dxb, i, _dx_value(xb[i], dyb[i], x0c, azc, bzc, kg, kd, k0, act, dxr))
        for i in range(e, dxr.size):
            _store_stream_one(dxr, i, _dx_value(xr[i], dyr[i], x0c, azc, bzc, kg, kd, k0, act, dxr))
    else:
        for i in range(xr.size):
            dxr[i] = _dx_value(xr[i], dyr[i], x0c, azc, bzc, kg, kd, k0, act, dxr)


@njit(inline="always")
def _ncs_dx_loop(dy, x, r_lo, r_hi, step, x0, a_z, b_z, act, k_g, k_d, k_0, dx, stream):
    nc = x.shape[1]
    ns = x.shape[2]
    x2 = x.reshape(-1, ns)
    dy2 = dy.reshape(-1, ns)
    dx2 = dx.reshape(-1, ns)
    c = r_lo % nc
    for r in range(r_lo, r_hi, step):
        _dx_row(x2[r], dy2[r], dx2[r], x0[c], a_z[c], b_z[c], k_g[c], k_d[c], k_0[c], act, stream)
        c = _next_channel(c, nc, step)
    if stream:
        _stream_fence()


@_per_act
def _ncs_dx(dy, x, r_lo, r_hi, step, x0, a_z, b_z, k_g, k_d, k_0, dx, stream):
    """dx over the (n, c) rows r_lo..r_hi by ``step`` (streaming stores if ``stream``)."""
    _ncs_dx_loop(dy, x, r_lo, r_hi, step, x0, a_z, b_z, ACT, k_g, k_d, k_0, dx, stream)


@_kernel
def bn_bwd_ncs(dy, x, w, b, mean, invstd, act, training, need_dx, dx, dw, db, nchunks):
    """Closed-form backward, (N, C, S) layout (see the note above ``_grad_coefficients``). Writes dw, db (always)
    and dx (if need_dx)."""
    nb, nc, ns = x.shape
    rows = nb * nc
    x0, a_z, b_z, mu = _grad_coefficients(w, b, mean, invstd)
    sg = _zeros2(nchunks, nc)
    sgd = _zeros2(nchunks, nc)
    x0_l, a_z_l, b_z_l = _ncs_lanes(x0, x), _ncs_lanes(a_z, x), _ncs_lanes(b_z, x)
    if _flat(x):  # flat sample rows (see _FLAT_S_BELOW): per-lane sums, folded to channels
        x2, dy2 = _flat_rows(x), _flat_rows(dy)
        sg_l = _zeros2(nchunks, nc * ns)
        sgd_l = _zeros2(nchunks, nc * ns)
        for k in prange(nchunks):
            _row_grad_sums(act, dy2, x2, x0_l, a_z_l, b_z_l, _ZERO, k * nb // nchunks, (k + 1) * nb // nchunks,
                           sg_l[k], sgd_l[k])
        _fold_repeat(sg_l, ns, sg)
        _fold_repeat(sgd_l, ns, sgd)
    else:
        for k in prange(nchunks):
            _ncs_grad_sums(act, dy, x, k * rows // nchunks, (k + 1) * rows // nchunks, _ONE, x0, a_z, b_z, sg[k],
                           sgd[k])
    k_g, k_d, k_0 = _grad_finish(sg, sgd, invstd, w, mu, training, nb * ns, dw, db)
    if not need_dx:
        return
    k_g_l, k_d_l, k_0_l = _ncs_lanes(k_g, x), _ncs_lanes(k_d, x), _ncs_lanes(k_0, x)
    stream = _ncs_streams(dx, _ZERO)
    for k in prange(nchunks):
        _ncs_dx_run(act, dy, x, dx, k, nchunks, x0_l, a_z_l, b_z_l, k_g_l, k_d_l, k_0_l, stream)


# Channel by channel: one task per channel reads its N rows (statistics, or the backward's sums), then at once
# normalizes them (computes dx), when the channel's rows (x, and dy in the backward) stay in L2 between the two
# walks. The activation then comes from memory once per pass pair instead of twice. Standalone, one thread, cold
# caches, against the memory-order loops on a host with 2 MB of L2 per core (see BENCHMARKS.md):
# forward (32, 64, 3136) 5.7-5.95 -> 4.6 ms, (256, 64, 784) 13.4-16.5 -> 11.1-14.1 ms; at two threads 1.2-1.4x.
@_kernel
def bn_fwd_ncs_channels(x, y, w, b, eps, act, mean, invstd):
    """Training forward on (N, C, S), channel by channel: each channel's statistics (shifted sums, with the second
    pass around the mean of :func:`bn_fwd_ncs` where the shift lies far from it, now from L2), then its
    normalization. Writes mean (float64) and invstd."""
    nb, nc, ns = x.shape
    rows = nb * nc
    shift = _ncs_shift(x, w)
    s1 = _zeros2(1, nc)
    s2 = _zeros2(1, nc)
    m1 = _zeros2(2, nc)
    a = _scratch(nc, w)
    bb = _scratch(nc, w)
    stream = _streams_ncs(y, ns, 0)
    for t in prange(nc):
        c = np.intp(t)  # prange's index is unsigned: the loops would compile again for it
        d = c + 1
        for attempt in range(2):
            _ncs_sums(x, c, rows, nc, shift, s1[0], s2[0])
            redo = _merge_moments(s1[:, c:d], s2[:, c:d], nb * ns, m1[:, c:d])
            if attempt == 1 or not redo:
                break
            _recentre(shift[c:d], m1[:, c:d], s1[:, c:d], s2[:, c:d])
        _finish_stats(shift[c:d], m1[:, c:d], w[c:d], b[c:d], eps, MODE_TRAIN, mean[c:d], invstd[c:d], a[c:d],
                      bb[c:d])
        _eval_rows(act, x, y, c, rows, nc, shift, a, bb, stream)


@_kernel
def bn_bwd_ncs_channels(dy, x, w, b, mean, invstd, act, training, dx, dw, db):
    """:func:`bn_bwd_ncs` with dx, channel by channel: each channel's sums of g and g * (x - x0), then its dx."""
    nb, nc, ns = x.shape
    rows = nb * nc
    x0, a_z, b_z, mu = _grad_coefficients(w, b, mean, invstd)
    sg = _zeros2(1, nc)
    sgd = _zeros2(1, nc)
    k_g = _scratch(nc, w)
    k_d = _scratch(nc, w)
    k_0 = _scratch(nc, w)
    stream = _streams_ncs(dx, ns, 0)
    for t in prange(nc):
        c = np.intp(t)
        d = c + 1
        _ncs_grad_sums(act, dy, x, c, rows, nc, x0, a_z, b_z, sg[0], sgd[0])
        _grad_finish_into(sg[:, c:d], sgd[:, c:d], invstd[c:d], w[c:d], mu[c:d], training, nb * ns, dw[c:d],
                          db[c:d], k_g[c:d], k_d[c:d], k_0[c:d])
        _ncs_dx(act, dy, x, c, rows, nc, x0, a_z, b_z, k_g, k_d, k_0, dx, stream)


# ------------------------------------------------------------------------------------------------------
# batch norm, (M, C) layout (channels innermost): row chunks + merge
#
# Scratch arrays come from the serial helpers below: inside a ``parallel=True`` function numba turns
# ``np.zeros`` into a parallel loop of its own, and every parallel launch costs a thread wake-up.
# ------------------------------------------------------------------------------------------------------
@njit(cache=True)
def _zeros2(m, n):
    return np.zeros((m, n))


@njit(cache=True)
def _scratch(n, like_arr):
    return np.zeros(n, dtype=like_arr.dtype)


_ROW_BLOCK = 64  # rows summed in compute-dtype lanes before a float64 merge
_SHIFT_ROWS = 16  # rows averaged for the (M, C) kernels' shift


@njit(**_OPTS)
def _row_sums(x, shift, lanes, lo, hi, s1, s2):
    """s1[c] += sum (x - shift), s2[c] += sum (x - shift)**2 over rows lo..hi: per block of _ROW_BLOCK rows in the
    compute dtype of ``shift`` (full-width float32 lanes for float32/bfloat16/float16), merged in float64.

    Each sweep over the channels takes four rows, one from each quarter of lo..hi: the per-channel block sums are
    loaded and stored once per four elements, and the four quarters stream in order. One row per sweep (the sums'
    loads and stores outnumbering the row's) read 25088x256 from memory in 1.6 ms, two from each half 1.0 ms
    (np.sum: 1.1); two adjacent rows per sweep were faster from cache but slower from memory. Four quarters against
    two halves, this pass alone on one thread (Zen 4, 2026-12-03): 25088x256 885 -> 706 us, 4096x1024 331 -> 295,
    256x512 13.9 -> 11.4 in cache and 47.8 -> 45.0 from memory; the whole training forward 1.00-1.07x faster at 1
    and 2 threads (BENCHMARKS.md). The gradient sums read x and dy: four rows of each, eight streams, measured no
    faster, and slower from memory; they keep two. Where ``lanes`` is not 0 (:func:`_reg_lanes`), in registers over
    rows of that many lanes instead."""
    if lanes:
        _reg_rows_sums(x, x, shift, lanes, lo, hi, s1, s2, False)
        return
    nc = shift.size  # the row's first columns (all of them but in a block of channels: bn_fwd_rows' cols)
    sh = np.empty(nc, dtype=shift.dtype)
    for c in range(nc):
        sh[c] = shift[c]
    b1 = np.empty(nc, dtype=shift.dtype)
    b2 = np.empty(nc, dtype=shift.dtype)
    q = (hi - lo) // 4
    for p0 in range(0, q, _ROW_BLOCK // 4):
        for c in range(nc):
            b1[c] = 0
            b2[c] = 0
        for p in range(p0, min(p0 + _ROW_BLOCK // 4, q)):
            xa = x[lo + p]
            xb = x[lo + q + p]
            xc = x[lo + 2 * q + p]
            xd = x[lo + 3 * q + p]
            for c in range(nc):
                da = up(xa[c]) - sh[c]
                db = up(xb[c]) - sh[c]
                dc = up(xc[c]) - sh[c]
                dd = up(xd[c]) - sh[c]
                b1[c] += (da + db) + (dc + dd)
                b2[c] += (da * da + db * db) + (dc * dc + dd * dd)
        for c in range(nc):
            s1[c] += np.float64(b1[c])
            s2[c] += np.float64(b2[c])
    for r in range(lo + 4 * q, hi):  # the rows left over (up to three)
        xr = x[r]
        for c in range(nc):
            d = np.float64(up(xr[c]) - sh[c])
            s1[c] += d
            s2[c] += d * d


# ------------------------------------------------------------------------------------------------------
# (M, C) sums with the per-lane accumulators in registers
#
# The loops above keep a row's per-lane block sums in memory: every vector of x costs a load and a store of each
# accumulator beside its own load, and from memory those sweeps read at 55-65 % of the rate of the (N, C, S)
# loops, whose accumulators are registers (16.8 MB, caches flushed, one thread: (4096, 1024) statistics 1.3-1.6
# ms against 0.73-0.92 ms on the same bytes as (N, C, S) rows). LLVM keeps numba's arrays in memory, so these
# sums are written as LLVM IR: rows of 256 bytes (64 float32 or 32 float64 lanes, four 64-byte vectors per sum,
# promoted to registers) walked in memory order, each lane's sums added into float64 per block. A lane of that
# view holds channel lane % C, so it serves any C that divides its width (C = 64, 32, 16, ...: channels_last
# conv layers). Other C up to 512 bytes (float32: 120, 84, 100, 3...; LeNet's fully connected layers) take rows
# of C times a power of two, up to eight vectors, the last ones masked: (256, 120) forward 8.8 -> 6.4 us and
# backward 11.8 -> 8.4 in cache, (100352, 120) 8.2 -> 7.3 ms and 14.5 -> 11.9 from memory, though such rows
# start mid-vector and store without streaming (an AVX-512 target; without AVX-512 a mask costs more than the
# registers save, and those rows keep the loops above: _REG_MASKS). Wider rows do not fit the registers: strips
# of such rows walked one after another, or rows interleaved, read slower than the loops above from memory
# (strips of 64 or 128 lanes over tiles of 8-64 rows: (4096, 1024) 1.2-2.0 ms against 1.04; (25088, 256) 2.6-2.9
# against 1.5; strips over whole runs of rows: (4096, 1024) 2.2 ms against 0.74), faster only from L2 ((256, 512)
# 11 us against 14, but 43 against 32 when the input comes from L3).
#
# bfloat16 and float16 storage take the same rows of float32 lanes (:class:`_RegTypes`): a 16-bit vector half a
# register wide in memory, widened on load and narrowed on store, each output rounded once as the loops above do.
# In those loops the per-lane coefficients of the 16-bit passes came from memory beside every vector, and a 16-bit
# channels_last evaluation ran slower than torch's (0.81-0.92x). Old and new loops alternating in one process, one
# thread, caches mostly cold (benchmarks/ab_loops.py BASE 1 "bn rows", Zen 4, 2026-12-04), ms: float16
# (100352, 64) training forward 2.59 -> 1.97, evaluation 1.48 -> 1.10, backward 2.87 -> 2.15; bfloat16 1.67 ->
# 1.41, 1.08 -> 0.90, 2.54 -> 2.08; float32 unchanged.
# ------------------------------------------------------------------------------------------------------
_REG_ROW_BYTES = 256  # a full row of the register view: four 64-byte vectors per sum
_REG_WIDE_BYTES = 512  # the widest row it takes: eight vectors, the last ones masked where the row is shorter
_REG_STORAGE = (types.float32, types.float64, types.int16, types.uint16)  # bfloat16 as int16, float16 as uint16
_REG_VECTOR_BYTES = 64  # LLVM vectors of this size (one zmm; two ymm or four xmm where the target has no zmm)


def _target_masks_natively() -> bool:
    """Whether the loops' compile target has AVX-512, where a masked load or store is one instruction: numba's
    NUMBA_CPU_FEATURES where set, False for another NUMBA_CPU_NAME without them (its features unknown here), else
    the host's. Without it LLVM lowers masks to AVX's vmaskmovps, microcoded on AMD cores, and the register rows
    that need masks ran 2.5-3.5x slower than the loops over rows in memory (one thread, in cache, Zen 4 with AVX-512
    hidden by its VM, us, register / memory: (256, 120) forward 22.9 / 8.1, evaluation 16.9 / 7.9, backward 24.5 /
    12.3; (4096, 120) forward 371 / 114), while rows that need none stayed ahead ((256, 128) evaluation 3.9 / 4.7,
    backward 9.4 / 11.9)."""
    from numba.core import config
    if config.CPU_FEATURES is not None:
        return "+avx512f" in config.CPU_FEATURES.split(",")
    return config.CPU_NAME in (None, "host") and host_has("avx512f")


def host_has(feature: str) -> bool:
    """Whether this host's CPU has ``feature`` (llvmlite's name: "f16c", "avx512f"); False where llvmlite cannot
    say."""
    try:
        from llvmlite import binding
        return bool(binding.get_host_cpu_features().get(feature, False))
    except Exception:  # pragma: no cover - unknown platform: be safe
        return False


_REG_MASKS = _target_masks_natively()  # a compile-time constant of the loops (numba's cache is per CPU's features)
_CONTRACT = ("contract",)  # a * b + c may become one fused multiply-add, as in the loops' fastmath


class _RegTypes:
    """The register loops' types for arrays of storage type ``dtype``: compute vectors ``vt`` of ``lanes``
    elements ``elem`` (``item`` bytes: float32 for float32, bfloat16 and float16 storage, float64 for float64) in
    one _REG_VECTOR_BYTES register, and the storage vectors ``svt`` of as many storage elements (``sitem`` bytes:
    a 16-bit type's vector is half a register wide, widened on load and narrowed on store as :func:`up` and
    :func:`down` do one element)."""

    def __init__(self, context, dtype):
        self.dtype = dtype
        self.narrow = dtype in (types.int16, types.uint16)
        self.bfloat = dtype == types.int16
        self.compute = types.float32 if self.narrow else dtype
        self.elem = context.get_value_type(self.compute)
        self.item = self.compute.bitwidth // 8
        self.lanes = _REG_VECTOR_BYTES // self.item
        self.vt = ir.VectorType(self.elem, self.lanes)
        self.sitem = dtype.bitwidth // 8
        self.svt = ir.VectorType(context.get_value_type(dtype), self.lanes)

    def load(self, builder, base, index, mask=None, fill=None):
        """The compute vector of the storage elements at ``index`` of ``base`` (as :func:`_vload`; lanes left out
        by ``mask`` read ``fill``, zeros if None)."""
        if not self.narrow:
            return _vload(builder, base, index, self.vt, self.item, mask, fill)
        v = _widen(builder, _vload(builder, base, index, self.svt, self.sitem, mask), self.bfloat)
        return v if mask is None or fill is None else builder.select(mask, v, fill)  # the fill after widening

    def store(self, builder, value, base, index, mask=None, nontemporal=False):
        """Stores the compute vector ``value`` as storage elements at ``index`` of ``base`` (as :func:`_vstore`;
        a streaming store takes a vector-aligned address)."""
        if self.narrow:
            value = _narrow(builder, value, self.bfloat)
        vt = self.svt if self.narrow else self.vt
        whole = self.lanes * self.sitem
        _vstore(builder, value, base, index, vt, whole if nontemporal else self.sitem, mask, nontemporal)


def _splat(builder, value, vt):
    """A ``vt`` vector of ``value`` in every lane."""
    i32 = ir.IntType(32)
    one = builder.insert_element(ir.Constant(vt, ir.Undefined), value, ir.Constant(i32, 0))
    return builder.shuffle_vector(one, one, ir.Constant(ir.VectorType(i32, vt.count), [0] * vt.count))


def _llvm_suffix(vt):
    """LLVM's overload suffix of vector type ``vt`` (v16f32, v8f64, v16i16) for intrinsics such as
    llvm.masked.load."""
    kind = {ir.FloatType(): "f32", ir.DoubleType(): "f64", ir.IntType(16): "i16"}[vt.element]
    return f"v{vt.count}{kind}"


def _vec_ptr(builder, base, index, vt):
    """Pointer to the ``vt`` vector at element ``index`` of ``base`` (a pointer to elements)."""
    return builder.bitcast(builder.gep(base, [index]), vt.as_pointer())


def _masked(builder, op, vt):
    """LLVM's llvm.masked.load (``op`` "load") or llvm.masked.store ("store") for ``vt`` vectors."""
    mask = ir.VectorType(ir.IntType(1), vt.count)
    i32 = ir.IntType(32)
    sig = (ir.FunctionType(vt, [vt.as_pointer(), i32, mask, vt]) if op == "load" else
           ir.FunctionType(ir.VoidType(), [vt, vt.as_pointer(), i32, mask]))
    return cgutils.get_or_insert_function(builder.module, sig,
                                          f"llvm.masked.{op}.{_llvm_suffix(vt)}.p0{_llvm_suffix(vt)}")


def _vload(builder, base, index, vt, align, mask=None, fill=None):
    """The ``vt`` vector at element ``index`` of ``base``; with ``mask`` (i1 lanes) a masked load whose lanes left
    out read ``fill`` (zeros if None) and touch no memory."""
    ptr = _vec_ptr(builder, base, index, vt)
    if mask is None:
        return builder.load(ptr, align=align)
    fill = ir.Constant(vt, None) if fill is None else fill
    return builder.call(_masked(builder, "load", vt), [ptr, ir.Constant(ir.IntType(32), align), mask, fill])


def _vstore(builder, value, base, index, vt, align, mask=None, nontemporal=False):
    """Stores ``value`` at element ``index`` of ``base``: only the lanes of ``mask`` where given, else the whole
    vector, with LLVM's nontemporal hint (a streaming store) if ``nontemporal``."""
    ptr = _vec_ptr(builder, base, index, vt)
    if mask is not None:
        builder.call(_masked(builder, "store", vt), [value, ptr, ir.Constant(ir.IntType(32), align), mask])
        return
    st = builder.store(value, ptr, align=align)
    if nontemporal:
        _mark_nontemporal(builder, st)


def _lane_masks(builder, width, nvec, lanes, intp):
    """Per vector k of a row of ``nvec`` vectors, the i1 lanes k * lanes + i < ``width`` (a runtime value)."""
    ids = ir.Constant(ir.VectorType(intp, lanes), list(range(lanes)))
    return [builder.icmp_signed("<", ids, _splat(builder, builder.sub(width, ir.Constant(intp, k * lanes)),
                                                  ids.type)) for k in range(nvec)]


def _reg_forms(builder, width, lanes, intp, emit):
    """The register loops' four forms, chosen by the row ``width`` at run time: ``emit(nvec, masks)`` under the
    branch where rows take ``nvec`` vectors (those of _REG_ROW_BYTES up to its lanes, else of _REG_WIDE_BYTES),
    ``masks`` None where the row fills them, else :func:`_lane_masks`."""
    short, wide = _REG_ROW_BYTES // _REG_VECTOR_BYTES, _REG_WIDE_BYTES // _REG_VECTOR_BYTES
    with builder.if_else(builder.icmp_signed("<=", width, ir.Constant(intp, short * lanes))) as (narrow, broad):
        for nvec, branch in ((short, narrow), (wide, broad)):
            with branch:
                full = builder.icmp_signed("==", width, ir.Constant(intp, nvec * lanes))
                with builder.if_else(full) as (whole, part):
                    with whole:
                        emit(nvec, None)
                    with part:
                        emit(nvec, _lane_masks(builder, width, nvec, lanes, intp))


def _accumulate(builder, first_acc, second_acc, first, d):
    """first_acc += first; second_acc += first * d (the accumulators are allocas that LLVM keeps in registers).
    Statistics: first = d = x - shift; gradient sums: first = dy."""
    builder.store(builder.fadd(builder.load(first_acc), first), first_acc)
    prod = builder.fmul(first, d, flags=_CONTRACT)
    builder.store(builder.fadd(builder.load(second_acc), prod, flags=_CONTRACT), second_acc)


def _reg_sums_codegen(grads):
    """Codegen of ``_reg_sums`` (``grads`` False) and ``_reg_grad_sums`` (True): over rows lo..hi of ``width``
    lanes of x's memory (row r at element r * width; width at most _REG_WIDE_BYTES of compute-dtype lanes,
    C-contiguous, x and dy of one storage type of :class:`_RegTypes`: other element types emit nothing, the callers
    never take this path for them), with d = x - shift[l]:

    * sums:      s1[l] += sum d,  s2[l] += sum d * d
    * grad sums: s1[l] += sum g,  s2[l] += sum g * d, with g = dy (identity activation)

    the sums in the compute dtype (float32 lanes for float32 and 16-bit storage), added to the float64 s1, s2 at
    the end.
    Lanes past ``width`` in a row's last vectors are masked off: x reads as the shift there and dy as zero, so they
    add nothing, and s1, s2 keep their values."""
    def codegen(context, builder, signature, args):
        xt = signature.args[0]
        x, dy, lo, hi, width, shift, s1, s2 = args
        if xt.dtype not in _REG_STORAGE or signature.args[1].dtype != xt.dtype:
            return context.get_dummy_value()
        st = _RegTypes(context, xt.dtype)
        elem, lanes, vt, item = st.elem, st.lanes, st.vt, st.item
        v64 = ir.VectorType(ir.DoubleType(), lanes)
        intp = context.get_value_type(types.intp)

        def data(arg_index, value):
            return context.make_array(signature.args[arg_index])(context, builder, value).data

        lo_v, hi_v, width_v = (context.cast(builder, v, signature.args[i], types.intp)
                               for i, v in ((2, lo), (3, hi), (4, width)))
        xs, dys, shs, s1s, s2s = data(0, x), data(1, dy), data(5, shift), data(6, s1), data(7, s2)

        def emit(nvec, masks):
            mask = masks or [None] * nvec
            sh = [_vload(builder, shs, ir.Constant(intp, k * lanes), vt, item, mask[k]) for k in range(nvec)]
            acc1 = [cgutils.alloca_once_value(builder, ir.Constant(vt, None)) for _ in range(nvec)]
            acc2 = [cgutils.alloca_once_value(builder, ir.Constant(vt, None)) for _ in range(nvec)]
            for k in range(nvec):  # alloca_once_value stores its value in the entry block: clear them here too
                builder.store(ir.Constant(vt, None), acc1[k])
                builder.store(ir.Constant(vt, None), acc2[k])
            with cgutils.for_range_slice(builder, lo_v, hi_v, ir.Constant(intp, 1), intp=intp) as (r, _):
                start = builder.mul(r, width_v)
                for k in range(nvec):
                    at = builder.add(start, ir.Constant(intp, k * lanes))
                    d = builder.fsub(st.load(builder, xs, at, mask[k], sh[k]), sh[k])
                    first = st.load(builder, dys, at, mask[k]) if grads else d
                    _accumulate(builder, acc1[k], acc2[k], first, d)
            for k in range(nvec):
                at = ir.Constant(intp, k * lanes)
                for acc, out in ((acc1[k], s1s), (acc2[k], s2s)):
                    total = builder.load(acc)
                    if elem != ir.DoubleType():
                        total = builder.fpext(total, v64)
                    total = builder.fadd(_vload(builder, out, at, v64, 8, mask[k]), total)
                    _vstore(builder, total, out, at, v64, 8, mask[k])

        _reg_forms(builder, width_v, lanes, intp, emit)
        return context.get_dummy_value()
    return codegen


@intrinsic
def _reg_sums(typingctx, x, dy, lo, hi, width, shift, s1, s2):
    """s1[l] += sum (x - shift), s2[l] += sum (x - shift)**2 over rows lo..hi of ``width`` lanes (``dy`` unused;
    see :func:`_reg_sums_codegen`)."""
    return types.void(x, dy, lo, hi, width, shift, s1, s2), _reg_sums_codegen(False)


@intrinsic
def _reg_grad_sums(typingctx, x, dy, lo, hi, width, shift, s1, s2):
    """s1[l] += sum dy, s2[l] += sum dy * (x - shift) over rows lo..hi of ``width`` lanes."""
    return types.void(x, dy, lo, hi, width, shift, s1, s2), _reg_sums_codegen(True)


def _reg_map_codegen(kind):
    """Codegen of ``_reg_normalize`` (``kind`` "y"), ``_reg_normalize_relu`` ("y_relu") and ``_reg_dx`` ("dx"):
    elementwise over rows lo..hi of ``width`` lanes (see :func:`_reg_sums_codegen`), the per-lane coefficients held
    in registers, the output in x's storage type; with streaming stores where ``stream`` (rows of 64-byte aligned
    vectors; rows with masked lanes store plainly):

    * y:  out = (x - ref[l]) * a[l] + bb[l]                  args (x, out, lo, hi, width, ref, a, bb, stream)
    * y_relu: the same, negative values 0 (NaN stays NaN, as :func:`act_fwd`)
    * dx: out = dy * k_g[l] + (x - x0[l]) * k_d[l] + k_0[l]  args (dy, x, out, lo, hi, width, x0, k_g, k_d, k_0, stream)
    """
    n_in = 2 if kind == "dx" else 1

    def codegen(context, builder, signature, args):
        arrays = signature.args[:n_in + 1]
        xt = arrays[n_in - 1]
        if xt.dtype not in _REG_STORAGE or any(a.dtype != xt.dtype for a in arrays):
            return context.get_dummy_value()
        st = _RegTypes(context, xt.dtype)
        lanes, vt, item = st.lanes, st.vt, st.item
        intp = context.get_value_type(types.intp)
        data = [context.make_array(t)(context, builder, v).data for t, v in zip(signature.args, args)
                if isinstance(t, types.Array)]
        ins, out, coefs = data[:n_in], data[n_in], data[n_in + 1:]
        lo, hi, width = (context.cast(builder, args[n_in + 1 + i], signature.args[n_in + 1 + i], types.intp)
                         for i in range(3))
        stream = context.cast(builder, args[-1], signature.args[-1], types.boolean)

        def rows(nvec, mask, nontemporal):
            coef = [[_vload(builder, c, ir.Constant(intp, k * lanes), vt, item, mask[k]) for k in range(nvec)]
                    for c in coefs]
            with cgutils.for_range_slice(builder, lo, hi, ir.Constant(intp, 1), intp=intp) as (r, _):
                start = builder.mul(r, width)
                for k in range(nvec):
                    at = builder.add(start, ir.Constant(intp, k * lanes))
                    v = [st.load(builder, p, at, mask[k]) for p in ins]
                    if kind != "dx":
                        ref, a, bb = (c[k] for c in coef)
                        res = builder.fadd(builder.fmul(builder.fsub(v[0], ref), a, flags=_CONTRACT), bb,
                                           flags=_CONTRACT)
                        if kind == "y_relu":
                            zero = ir.Constant(vt, None)
                            res = builder.select(builder.fcmp_ordered("<", res, zero), zero, res)
                    else:
                        x0, kg, kd, k0 = (c[k] for c in coef)
                        d = builder.fsub(v[1], x0)
                        res = builder.fadd(builder.fmul(v[0], kg, flags=_CONTRACT),
                                           builder.fadd(builder.fmul(d, kd, flags=_CONTRACT), k0, flags=_CONTRACT),
                                           flags=_CONTRACT)
                    st.store(builder, res, out, at, mask[k], nontemporal)

        def emit(nvec, masks):
            if masks is not None:
                rows(nvec, masks, False)
                return
            with builder.if_else(stream) as (then, otherwise):
                with then:
                    rows(nvec, [None] * nvec, True)
                with otherwise:
                    rows(nvec, [None] * nvec, False)

        _reg_forms(builder, width, lanes, intp, emit)
        return context.get_dummy_value()
    return codegen


@intrinsic
def _reg_normalize(typingctx, x, y, lo, hi, width, ref, a, bb, stream):
    """y = (x - ref) * a + bb over rows lo..hi of ``width`` lanes (see :func:`_reg_map_codegen`)."""
    return types.void(x, y, lo, hi, width, ref, a, bb, stream), _reg_map_codegen("y")


@intrinsic
def _reg_normalize_relu(typingctx, x, y, lo, hi, width, ref, a, bb, stream):
    """y = max((x - ref) * a + bb, 0) over rows lo..hi of ``width`` lanes: the fused ReLU's forward."""
    return types.void(x, y, lo, hi, width, ref, a, bb, stream), _reg_map_codegen("y_relu")


@intrinsic
def _reg_dx(typingctx, dy, x, dx, lo, hi, width, x0, k_g, k_d, k_0, stream):
    """dx = dy * k_g + (x - x0) * k_d + k_0 over rows lo..hi of ``width`` lanes."""
    return types.void(dy, x, dx, lo, hi, width, x0, k_g, k_d, k_0, stream), _reg_map_codegen("dx")


@njit(inline="always")
def _dense(a):
    """Whether the 2-D array ``a`` is C-contiguous (whatever layout numba typed it with)."""
    return a.strides[1] == a.itemsize and a.strides[0] == a.shape[1] * a.itemsize


@njit(inline="always")
def _reg_lanes(x, nc, other1, other2):
    """The register view's row width (lanes) for (M, width) rows arrays of C = ``nc`` channels, 0 where it does not
    apply: all three arrays (x and the pass's other two: y; dy, dx) of one element size (the glues give them x's
    dtype) and C-contiguous. The register loops take the arrays' memory as rows of that many lanes, lane l holding
    channel l % C, whatever their shape: a full row of 256 bytes of compute-dtype lanes (64 float32 lanes for
    float32, bfloat16 and float16 storage, 32 float64 ones) where C divides it and the rows hold whole ones, else
    rows of j * C lanes up to 512 bytes (j the largest power of two that divides the rows' width over C, the last
    vectors of a row masked: only where the target masks natively, :data:`_REG_MASKS`, or where no mask is needed)."""
    if other1.itemsize != x.itemsize or other2.itemsize != x.itemsize:
        return 0
    if not (_dense(x) and _dense(other1) and _dense(other2)):
        return 0
    item = max(x.itemsize, 4)  # the compute dtype's, as _RegTypes.item (float32 for 16-bit storage)
    full = _REG_ROW_BYTES // item
    if full % nc == 0 and x.shape[1] % full == 0:
        return full
    widest = _REG_WIDE_BYTES // item
    if nc > widest:
        return 0
    lanes = nc
    while 2 * lanes <= widest and x.shape[1] % (2 * lanes) == 0:
        lanes *= 2
    if not _REG_MASKS and lanes != widest:  # a row that ends mid-vector (full rows returned above)
        return 0
    return lanes


@njit(inline="always")
def _reg_rows_sums(x, dy, shift, lanes, lo, hi, s1, s2, grads):
    """The sums of :func:`_reg_sums` (``grads`` False) or :func:`_reg_grad_sums` over rows lo..hi of the (M, width)
    arrays, as rows of ``lanes`` (a view of the same memory; lane l of it is lane l of ``shift``, ``s1``, ``s2``),
    per block of _ROW_BLOCK of those rows in the element type, merged in float64."""
    q = x.shape[1] // lanes
    for r0 in range(lo * q, hi * q, _ROW_BLOCK):
        r1 = min(r0 + _ROW_BLOCK, hi * q)
        if grads:
            _reg_grad_sums(x, dy, r0, r1, lanes, shift, s1, s2)
        else:
            _reg_sums(x, dy, r0, r1, lanes, shift, s1, s2)


@njit(**_OPTS)
def _tile(v, width):
    """``v`` repeated to ``width`` lanes (a multiple of its length): per-channel values beside a row of the
    (M / k, k * C) view, whose lane j holds channel j % C."""
    nc = v.size
    if width == nc:
        return v
    out = np.empty(width, dtype=v.dtype)
    for j0 in range(0, width, nc):
        for c in range(nc):
            out[j0 + c] = v[c]
    return out


@njit(**_OPTS)
def _fold(lanes, nc):
    """Per-run lane sums (runs x k * C) -> per-run channel sums (runs x C), in float64."""
    if lanes.shape[1] == nc:
        return lanes
    out = np.zeros((lanes.shape[0], nc))
    for t in range(lanes.shape[0]):
        for j0 in range(0, lanes.shape[1], nc):
            for c in range(nc):
                out[t, c] += lanes[t, j0 + c]
    return out


@_kernel
def bn_fwd_rows(x, y, w, b, eps, act, mode, mean, var_or_invstd, nchunks, whole, cols):
    """(M, C) layout, passed as (M / k, k * C): k rows of C channels make one row of k * C lanes (lane j is
    channel j % C), so that a narrow layer's loops run over a few hundred values per row, not C. The caller
    chooses k (``normlab.kernels.cpu._lanes``: 1 for small inputs); per-channel values are tiled to the lanes and
    per-lane sums folded back to channels. ``whole``: as :func:`bn_eval_ncs`'s. ``cols``: the columns of each row
    the call covers, x.shape[1] for all; fewer (with k = 1: x's rows hold more channels than ``w``) for a block of
    channels, the first ``cols`` of rows x.shape[1] apart (the native glue splits wide layers with few rows by
    channels: each thread takes a block of them whole, with no merge, see native.cpp)."""
    m_rows = x.shape[0]
    width = cols
    nc = w.size
    k = width // nc
    block = width != x.shape[1]
    step = (m_rows + nchunks - 1) // nchunks
    shift = _scratch(nc, w)  # y = act((x - shift) * a + bb)
    a = _scratch(nc, w)
    bb = _scratch(nc, w)
    reg = _ZERO if block else _reg_lanes(x, nc, y, y)
    if mode == MODE_EVAL:
        for c in range(nc):
            shift[c] = like(mean[c], w[0])
            a[c] = like(_invstd(var_or_invstd[c], eps, w[0]) * w[c], w[0])
            bb[c] = b[c]
    else:
        s1 = _zeros2(nchunks, width)
        s2 = _zeros2(nchunks, width)
        m1 = _zeros2(2, nc)
        # shift: the mean of the first few rows, close to the channel's mean (the first value alone lies more
        # than sqrt(3) standard deviations away in ~8 % of channels, and one such channel among C made the
        # whole (M, C) array be summed twice); a constant channel's shift is its value exactly
        k0 = min(m_rows * k, _SHIFT_ROWS)
        acc = m1[0]
        for r in range(k0):
            xr = x[r // k, (r % k) * nc:(r % k + 1) * nc]
            for c in range(nc):
                acc[c] += up(xr[c])
        for c in range(nc):
            shift[c] = like(m1[0, c] / k0, w[0])
        for attempt in range(2):
            shift_l = _tile(shift, width)
            for t in prange(nchunks):
                _row_sums(x, shift_l, reg, t * step, min(t * step + step, m_rows), s1[t], s2[t])
            redo = _merge_moments(_fold(s1, nc), _fold(s2, nc), m_rows * k, m1)
            if attempt == 1 or not redo:
                break
            _recentre(shift, m1, s1, s2)
        _finish_stats(shift, m1, w, b, eps, mode, mean, var_or_invstd, a, bb)
        if mode == MODE_STATS:
            return
    shift_l = _tile(shift, width)
    a_l = _tile(a, width)
    bb_l = _tile(bb, width)
    stream = _streams(y, width, whole) and not block
    for t in prange(nchunks):
        _rows_normalize(act, x, y, reg, t * step, min(t * step + step, m_rows), shift_l, a_l, bb_l, stream)


@njit(inline="always")
def _rows_normalize_loop(x, y, lo, hi, ref, a, bb, act, stream):
    for r in range(lo, hi):
        xr = x[r]
        yr = y[r]
        if stream:
            for c in range(ref.size):
                _store_stream(yr, c, down(act_fwd((up(xr[c]) - ref[c]) * a[c] + bb[c], act), yr))
        else:
            for c in range(ref.size):  # the row's first columns (see _row_sums)
                yr[c] = down(act_fwd((up(xr[c]) - ref[c]) * a[c] + bb[c], act), yr)
    if stream:
        _stream_fence()


@_per_act
def _rows_normalize(x, y, lanes, lo, hi, ref, a, bb, stream):
    """y[r] = act((x[r] - ref) * a + bb) for rows lo..hi (streaming stores if ``stream``); with the identity or ReLU
    activation and the coefficients in registers over rows of ``lanes`` where that is not 0 (:func:`_reg_lanes`)."""
    if (ACT == IDENTITY or ACT == RELU) and lanes:
        q = x.shape[1] // lanes
        if ACT == RELU:
            _reg_normalize_relu(x, y, lo * q, hi * q, lanes, ref, a, bb, stream)
        else:
            _reg_normalize(x, y, lo * q, hi * q, lanes, ref, a, bb, stream)
        if stream:
            _stream_fence()
        return
    _rows_normalize_loop(x, y, lo, hi, ref, a, bb, ACT, stream)


@njit(inline="always")
def _grad_sums_loop(dy, x, x0, a_z, b_z, act, lo, hi, b1, b2, s1, s2):
    nc = x0.size  # the row's first columns (see _row_sums)
    half = (hi - lo) // 2
    for p0 in range(0, half, _ROW_BLOCK // 2):  # two rows per sweep, one from each half (not four: see _row_sums)
        for c in range(nc):
            b1[c] = 0
            b2[c] = 0
        for p in range(p0, min(p0 + _ROW_BLOCK // 2, half)):
            xa, dya = x[lo + p], dy[lo + p]
            xb, dyb = x[lo + half + p], dy[lo + half + p]
            for c in range(nc):
                da = up(xa[c]) - x0[c]
                db = up(xb[c]) - x0[c]
                ga = act_grad(up(dya[c]), da * a_z[c] + b_z[c], act)
                gb = act_grad(up(dyb[c]), db * a_z[c] + b_z[c], act)
                b1[c] += ga + gb
                b2[c] += ga * da + gb * db
        for c in range(nc):
            s1[c] += np.float64(b1[c])
            s2[c] += np.float64(b2[c])
    if (hi - lo) % 2:  # the odd row out
        xr, dyr = x[hi - 1], dy[hi - 1]
        for c in range(nc):
            d = up(xr[c]) - x0[c]
            g = act_grad(up(dyr[c]), d * a_z[c] + b_z[c], act)
            s1[c] += np.float64(g)
            s2[c] += np.float64(g * d)


@_per_act_allocating
def _row_grad_sums(dy, x, x0, a_z, b_z, lanes, lo, hi, s1, s2):
    """Per-channel sums of g = dL/dz and g * (x - x0) over rows lo..hi, in compute-dtype lanes per block of
    _ROW_BLOCK rows merged in float64; with the identity activation in registers over rows of ``lanes`` where
    that is not 0 (:func:`_reg_lanes`)."""
    if ACT == IDENTITY and lanes:
        _reg_rows_sums(x, dy, x0, lanes, lo, hi, s1, s2, True)
        return
    b1 = np.empty(x0.size, dtype=x0.dtype)
    b2 = np.empty(x0.size, dtype=x0.dtype)
    _grad_sums_loop(dy, x, x0, a_z, b_z, ACT, lo, hi, b1, b2, s1, s2)


@njit(inline="always")
def _dx_loop(dy, x, x0, a_z, b_z, act, lo, hi, k_g, k_d, k_0, dx, stream):
    for r in range(lo, hi):
        xr = x[r]
        dyr = dy[r]
        dxr = dx[r]
        if stream:
            for c in range(x0.size):
                d = up(xr[c]) - x0[c]
                g = act_grad(up(dyr[c]), d * a_z[c] + b_z[c], act)
                _store_stream(dxr, c, down(g * k_g[c] + d * k_d[c] + k_0[c], dxr))
        else:
            for c in range(x0.size):  # the row's first columns (see _row_sums)
                d = up(xr[c]) - x0[c]
                g = act_grad(up(dyr[c]), d * a_z[c] + b_z[c], act)
                dxr[c] = down(g * k_g[c] + d * k_d[c] + k_0[c], dxr)
    if stream:
        _stream_fence()


@_per_act
def _row_dx(dy, x, x0, a_z, b_z, lanes, lo, hi, k_g, k_d, k_0, dx, stream):
    """dx over rows lo..hi (streaming stores if ``stream``); with the identity activation and the coefficients in
    registers over rows of ``lanes`` where that is not 0 (:func:`_reg_lanes`)."""
    if ACT == IDENTITY and lanes:
        q = x.shape[1] // lanes
        _reg_dx(dy, x, dx, lo * q, hi * q, lanes, x0, k_g, k_d, k_0, stream)
        if stream:
            _stream_fence()
        return
    _dx_loop(dy, x, x0, a_z, b_z, ACT, lo, hi, k_g, k_d, k_0, dx, stream)


@_kernel
def bn_bwd_rows(dy, x, w, b, mean, invstd, act, training, need_dx, dx, dw, db, nchunks, cols):
    """Closed-form backward, (M, C) layout as the (M / k, k * C) view of ``bn_fwd_rows`` (see the note above
    ``_grad_coefficients``); ``cols`` as there."""
    m_rows = x.shape[0]
    width = cols
    block = width != x.shape[1]
    nc = w.size
    step = (m_rows + nchunks - 1) // nchunks
    x0, a_z, b_z, mu = _grad_coefficients(w, b, mean, invstd)
    x0_l = _tile(x0, width)
    a_z_l = _tile(a_z, width)
    b_z_l = _tile(b_z, width)
    sg = _zeros2(nchunks, width)
    sgd = _zeros2(nchunks, width)
    reg = _ZERO if block else _reg_lanes(x, nc, dy, dx)
    for t in prange(nchunks):
        _row_grad_sums(act, dy, x, x0_l, a_z_l, b_z_l, reg, t * step, min(t * step + step, m_rows), sg[t], sgd[t])
    k_g, k_d, k_0 = _grad_finish(_fold(sg, nc), _fold(sgd, nc), invstd, w, mu, training, m_rows * (width // nc),
                                 dw, db)
    if not need_dx:
        return
    k_g_l = _tile(k_g, width)
    k_d_l = _tile(k_d, width)
    k_0_l = _tile(k_0, width)
    stream = _streams(dx, width, 0) and not block
    for t in prange(nchunks):
        _row_dx(act, dy, x, x0_l, a_z_l, b_z_l, reg, t * step, min(t * step + step, m_rows), k_g_l, k_d_l, k_0_l,
                dx, stream)


@njit(**_OPTS)
def bn_apply_rows(x, y, ref, a, bb, act, whole):
    """y = act((x - ref) * a + bb) on (M / k, k * C) rows, the per-channel ref, a, bb given: the native glue's split
    training forward computes them once, in its merge of the runs' statistics, where each run's evaluation loop
    had derived a from the variance again (a square root and a division per channel and run: ~1.2 ns a channel
    here, 10 us for 8192 channels). ``whole``: as :func:`bn_dx_rows`'s."""
    width = x.shape[1]
    _rows_normalize(act, x, y, _reg_lanes(x, ref.size, y, y), _ZERO, x.shape[0], _tile(ref, width),
                    _tile(a, width), _tile(bb, width), _streams(y, width, whole))


@njit(**_OPTS)
def bn_apply_ncs(x, y, ref, a, bb, act, whole):
    """:func:`bn_apply_rows` for (N, C, S)."""
    _ncs_normalize(act, x, y, _ZERO, _ONE, _ncs_lanes(ref, x), _ncs_lanes(a, x), _ncs_lanes(bb, x),
                   _ncs_streams(y, whole))


@njit(**_OPTS)
def bn_dx_rows(dy, x, w, b, mean, invstd, act, dw, db, cnt, dx, whole):
    """The training backward's dx alone on (M / k, k * C) rows, from the whole batch's dweight and dbias (float64,
    over ``cnt`` values per channel): the native glue splits a batch into runs of rows over threads, sums their
    dweight/dbias, then calls this on each run, with ``whole`` the bytes of the whole dx (its streaming stores are
    chosen by the whole output's size, as the Python glue's loops choose them)."""
    width = x.shape[1]
    x0, a_z, b_z, mu = _grad_coefficients(w, b, mean, invstd)
    k_g, k_d, k_0 = _dx_coefficients(db, dw, invstd, w, mu, True, cnt)
    reg = _reg_lanes(x, w.size, dy, dx)
    _row_dx(act, dy, x, _tile(x0, width), _tile(a_z, width), _tile(b_z, width), reg, _ZERO, x.shape[0],
            _tile(k_g, width), _tile(k_d, width), _tile(k_0, width), dx, _streams(dx, width, whole))


@njit(**_OPTS)
def bn_dx_ncs(dy, x, w, b, mean, invstd, act, dw, db, cnt, dx, whole):
    """:func:`bn_dx_rows` for (N, C, S)."""
    x0, a_z, b_z, mu = _grad_coefficients(w, b, mean, invstd)
    k_g, k_d, k_0 = _dx_coefficients(db, dw, invstd, w, mu, True, cnt)
    _ncs_dx_run(act, dy, x, dx, _ZERO, _ONE, _ncs_lanes(x0, x), _ncs_lanes(a_z, x), _ncs_lanes(b_z, x),
                _ncs_lanes(k_g, x), _ncs_lanes(k_d, x), _ncs_lanes(k_0, x), _ncs_streams(dx, whole))


# ------------------------------------------------------------------------------------------------------
# group norm on (N, C, S): one task per (sample, group) block of (C/G) * S contiguous elements
# ------------------------------------------------------------------------------------------------------
@njit(inline="always")
def _gn_task_fwd(x2, y2, w, b, ns, groups, cg, cnt, eps, mean, invstd, stream, task):
    """One (sample, group) task of :func:`gn_fwd` on the (N, C * S) views."""
    n = task // groups
    g = task - n * groups
    c0 = g * cg
    # the task's values, its channels one after the other: one slice per task (a slice per use cost as much
    # as the values of small groups: InstanceNorm (64, 64, 32, 32) forward 0.95 -> 0.70 ms)
    xt = x2[n, c0 * ns:(c0 + cg) * ns]
    yt = y2[n, c0 * ns:(c0 + cg) * ns]
    shift = like(_spread_mean(xt), up(xt[0]))
    sh = np.float64(shift)
    s1 = 0.0
    s2 = 0.0
    if ns == 1:  # layer norm (M, K, 1): float64 sums in one flat loop
        for i in range(cnt):
            d = np.float64(up(xt[i])) - sh
            s1 += d
            s2 += d * d
    else:  # compute-dtype lanes per block of the group's values, merged in float64 (as batch norm); one loop
        # over the group, not one per channel (small S: per-loop set-up and tails cost as much as the values)
        for lo in range(0, cnt, _BLOCK):
            a1, a2 = _block_sums(xt[lo:lo + _BLOCK], shift)
            s1 += np.float64(a1)
            s2 += np.float64(a2)
    m64 = s1 / cnt
    v64 = max(s2 / cnt - m64 * m64, 0.0)
    if ns > 1 and m64 * m64 > 0.75 * (s2 / cnt):
        # the shift lies far from the group's mean (q - m^2 would lose more than 2 bits): sum again around
        # the first pass's mean
        m_first = like(m64, shift)
        s1, s2 = _sums_around(xt, shift, m_first)
        e64 = s1 / cnt
        v64 = max(s2 / cnt - e64 * e64, 0.0)
        m64 = np.float64(m_first) + e64
    inv = _invstd(v64, eps, w[0])
    mean[n, g] = sh + m64
    invstd[n, g] = inv
    m_s = like(m64, shift)
    if ns == 1:
        inv_c = like(inv, shift)
        for i in range(cnt):
            yt[i] = down(((up(xt[i]) - shift) - m_s) * inv_c * like(w[c0 + i], shift)
                         + like(b[c0 + i], shift), yt)
        return
    for j in range(cg):  # y = (x - shift) * a + bb, the remainder of the mean folded into bb (as batch norm)
        a = like(inv * w[c0 + j], shift)
        bb = like(b[c0 + j] - m64 * inv * w[c0 + j], shift)
        _normalized_row(xt[j * ns:(j + 1) * ns], yt[j * ns:(j + 1) * ns], shift, a, bb, IDENTITY, stream)
    if stream:  # one fence per (sample, group) task: as fast as one per run of tasks
        _stream_fence()


@njit(**_LOOP_OPTS)
def _gn_tasks_fwd(x, y, w, b, groups, eps, mean, invstd, stream, lo, hi):
    """Tasks lo..hi of :func:`gn_fwd`."""
    nb, nc, ns = x.shape
    cg = nc // groups
    x2 = x.reshape(nb, nc * ns)
    y2 = y.reshape(nb, nc * ns)
    for task in range(lo, hi):
        _gn_task_fwd(x2, y2, w, b, ns, groups, cg, cg * ns, eps, mean, invstd, stream, task)


@_kernel
def gn_fwd(x, y, w, b, groups, eps, mean, invstd, runs, whole):
    """The (sample, group) tasks in ``runs`` runs of consecutive tasks, one call of the loops each (handed to the
    threads one at a time: a preempted thread holds up little). A call per task cost ~150 ns, more than a small
    task's values (GroupNorm (32, 32, 8, 8) G=8 backward 0.14 -> 0.18 ms). ``whole``: as :func:`bn_eval_ncs`'s."""
    nb, nc, ns = x.shape
    stream = _streams_ncs(y, ns, whole) and nc // groups * ns * y.itemsize >= _GROUP_STREAM_FROM
    tasks = nb * groups
    for t in prange(runs):
        _gn_tasks_fwd(x, y, w, b, groups, eps, mean, invstd, stream, t * tasks // runs, (t + 1) * tasks // runs)


@njit(inline="always")
def _gn_task_bwd(dy, x, x2, dy2, x3, dy3, dx2, w, mean, invstd, groups, need_dx, dw_part, db_part, stream, short,
                 task):
    """One (sample, group) task of :func:`gn_bwd` (x2, dy2, dx2: (N, C * S) views; x3, dy3: (N * C, S))."""
    nc, ns = x.shape[1], x.shape[2]
    cg = nc // groups
    cnt = cg * ns
    n = task // groups
    g = task - n * groups
    c0 = g * cg
    mu = like(mean[n, g], up(x[n, c0, 0]))
    inv = like(invstd[n, g], mu)
    s_g = 0.0
    s_gx = 0.0
    if ns == 1:  # layer norm: flat loops
        for c in range(c0, c0 + cg):
            xh = (up(x2[n, c]) - mu) * inv
            d = up(dy2[n, c])
            db_part[n, c] = d
            dw_part[n, c] = d * xh
            s_g += d * w[c]
            s_gx += d * xh * w[c]
        if need_dx:
            k_x = like(-np.float64(inv) * s_gx / cnt, mu)
            k_0 = like(-np.float64(inv) * s_g / cnt, mu)
            for c in range(c0, c0 + cg):
                xh = (up(x2[n, c]) - mu) * inv
                v = up(dy2[n, c]) * inv * like(w[c], mu) + xh * k_x + k_0
                if cnt == 1:  # a group of one value: y = b whatever x, so dx = 0 (the terms above cancel only
                    v = like(0.0, mu)  # to their rounding, which invstd = eps**-0.5 scales: 0.1-0.3 at 1e-12)
                dx2[n, c] = down(v, dx2)
        return
    for c in range(c0, c0 + cg):
        wc = like(w[c], mu)
        if short:  # one channel row as batch norm's short rows: sum dy, sum dy * (x - mu), then * inv
            p_d, p_dmu = _row_grad_sums_ir(x3, dy3, n * nc + c, mu)
            p_dx = p_dmu * np.float64(inv)
            db_part[n, c] = p_d
            dw_part[n, c] = p_dx
            s_g += p_d * wc
            s_gx += p_dx * wc
            continue
        xr = x[n, c]
        dyr = dy[n, c]
        p_d = 0.0
        p_dx = 0.0
        for lo in range(0, ns, _BLOCK):  # compute-dtype lanes per block, merged in float64
            xb = xr[lo:lo + _BLOCK]
            db = dyr[lo:lo + _BLOCK]
            a1 = like(0.0, mu)
            a2 = like(0.0, mu)
            for i in range(xb.size):
                xh = (up(xb[i]) - mu) * inv
                d = up(db[i])
                a1 += d
                a2 += d * xh
            p_d += np.float64(a1)
            p_dx += np.float64(a2)
        db_part[n, c] = p_d
        dw_part[n, c] = p_dx
        s_g += p_d * wc
        s_gx += p_dx * wc
    if not need_dx:
        return
    # dx = dy * k_g + (x - mu) * k_d + k_0 (batch norm's _dx_value, identity activation)
    k_d = like(-np.float64(inv) * np.float64(inv) * s_gx / cnt, mu)
    k_0 = like(-np.float64(inv) * s_g / cnt, mu)
    zero = like(0.0, mu)
    for c in range(c0, c0 + cg):
        k_g = like(np.float64(inv) * w[c], mu)
        _dx_row(x2[n, c * ns:(c + 1) * ns], dy2[n, c * ns:(c + 1) * ns], dx2[n, c * ns:(c + 1) * ns], mu, zero,
                zero, k_g, k_d, k_0, IDENTITY, stream)
    if stream:
        _stream_fence()


@njit(**_LOOP_OPTS)
def _gn_tasks_bwd(dy, x, w, mean, invstd, groups, need_dx, dx, dw_part, db_part, stream, short, lo, hi):
    """Tasks lo..hi of :func:`gn_bwd`."""
    nb, nc, ns = x.shape
    x2 = x.reshape(nb, nc * ns)
    dy2 = dy.reshape(nb, nc * ns)
    x3 = x.reshape(nb * nc, ns)
    dy3 = dy.reshape(nb * nc, ns)
    dx2 = dx.reshape(dx.shape[0], dx.shape[1] * dx.shape[2])
    for task in range(lo, hi):
        _gn_task_bwd(dy, x, x2, dy2, x3, dy3, dx2, w, mean, invstd, groups, need_dx, dw_part, db_part, stream, short,
                     task)


@_kernel
def gn_bwd(dy, x, w, mean, invstd, groups, need_dx, dx, dw_part, db_part, runs, whole):
    """dw_part, db_part: (N, C) float64 per-sample partial sums (the caller sums over N); tasks in ``runs`` runs as
    :func:`gn_fwd`; ``whole`` as :func:`bn_eval_ncs`'s."""
    stream = need_dx and _streams_ncs(dx, x.shape[2], whole)
    short = _short_rows_ir(x, dy)
    tasks = x.shape[0] * groups
    for t in prange(runs):
        _gn_tasks_bwd(dy, x, w, mean, invstd, groups, need_dx, dx, dw_part, db_part, stream, short,
                      t * tasks // runs, (t + 1) * tasks // runs)


# ------------------------------------------------------------------------------------------------------
# layer norm: (M, K) rows of K contiguous values, statistics per row, affine per k (group norm, G = 1, S = 1)
#
# One row is at most a few hundred KiB, so its passes after the first come from L1/L2. Sums accumulate in the
# compute dtype (float32 lanes for float32/bfloat16/float16 storage: float64 halves the vector width) within
# blocks of _BLOCK elements, merged in float64; the statistics are sums of data shifted by the mean of a few of the
# row's values (a second pass around the mean where that shift lies far out), so a constant row gives exactly
# ``bias`` and 1e4 + N(0, 1) in float32 keeps float32 accuracy.
# ------------------------------------------------------------------------------------------------------
@njit(inline="always")
def _ln_row_fwd(xr, yr, w, b, eps, k, stream):
    """Normalizes one row; returns (mean, invstd) in float64. Statistics: one pass of shifted sums, and a second
    pass around the mean only where the shift (:func:`_spread_mean`) lies far from it. Blocks are slices (loops
    from 0 with a known length: the form LLVM vectorizes)."""
    shift = like(_spread_mean(xr), up(xr[0]))
    t1 = 0.0
    t2 = 0.0
    for lo in range(0, k, _BLOCK):
        a1, a2 = _block_sums(xr[lo:lo + _BLOCK], shift)
        t1 += np.float64(a1)
        t2 += np.float64(a2)
    m64, q64, v64 = _moments(t1, t2, k)
    m_s = like(m64, shift)
    mean = np.float64(shift) + m64
    if m64 * m64 > 0.75 * q64:
        # the shift lies far out (> sqrt(3) standard deviations from the mean): var = q - m^2 would lose
        # more than 2 bits, so sum again around the mean (the row is in L1/L2)
        t1, t2 = _sums_around(xr[:k], shift, m_s)
        r64, _, v64 = _moments(t1, t2, k)
        mean = np.float64(shift) + np.float64(m_s) + r64
    inv = _invstd(v64, eps, shift)
    inv_c = like(inv, shift)
    if stream:
        for i in range(k):
            _store_stream(yr, i, down(((up(xr[i]) - shift) - m_s) * inv_c * w[i] + b[i], yr))
    else:
        for i in range(k):
            yr[i] = down(((up(xr[i]) - shift) - m_s) * inv_c * w[i] + b[i], yr)
    return mean, inv


@_kernel
def ln_fwd(x, y, w, b, eps, mean, invstd, nchunks, whole):
    """x, y: (M, K); w, b: (K,) in the compute dtype; mean, invstd: (M,) in the compute dtype; ``whole`` as
    :func:`bn_eval_ncs`'s."""
    m_rows, k = x.shape
    step = (m_rows + nchunks - 1) // nchunks
    stream = _streams(y, k, whole) and k * y.itemsize >= _LN_STREAM_FROM
    for t in prange(nchunks):
        _ln_rows_fwd(x, y, w, b, eps, mean, invstd, t * step, min(t * step + step, m_rows), stream)


@njit(**_LOOP_OPTS)
def _ln_rows_fwd(x, y, w, b, eps, mean, invstd, lo, hi, stream):
    """Rows lo..hi of :func:`ln_fwd`."""
    for r in range(lo, hi):
        mu, inv = _ln_row_fwd(x[r], y[r], w, b, eps, x.shape[1], stream)
        mean[r] = mu
        invstd[r] = inv
    if stream:
        _stream_fence()


@njit(inline="always")
def _ln_block_grad(dyb, xb, wb, mu, inv, need_wb, dwb, dbb):
    """(sum g, sum g * xhat) over one block, g = dy * w; adds dy * xhat and dy to the dweight/dbias partials."""
    a1 = like(0.0, mu)
    a2 = like(0.0, mu)
    if need_wb:
        for i in range(xb.size):
            xh = (up(xb[i]) - mu) * inv
            d = up(dyb[i])
            g = d * wb[i]
            a1 += g
            a2 += g * xh
            dwb[i] += d * xh
            dbb[i] += d
    else:
        for i in range(xb.size):
            xh = (up(xb[i]) - mu) * inv
            g = up(dyb[i]) * wb[i]
            a1 += g
            a2 += g * xh
    return a1, a2


@njit(inline="always")
def _ln_row_bwd(dyr, xr, w, mu, inv, k, need_dx, need_wb, dxr, dwp, dbp, stream):
    sg = 0.0
    sgx = 0.0
    for lo in range(0, k, _BLOCK):
        hi = lo + _BLOCK
        a1, a2 = _ln_block_grad(dyr[lo:hi], xr[lo:hi], w[lo:hi], mu, inv, need_wb, dwp[lo:hi], dbp[lo:hi])
        sg += np.float64(a1)
        sgx += np.float64(a2)
    if need_dx:
        k_x = like(-np.float64(inv) * sgx / k, mu)
        k_0 = like(-np.float64(inv) * sg / k, mu)
        if k == 1:  # a row of one value: y = b whatever x, so dx = 0 (as in _gn_task_bwd)
            dxr[0] = down(like(0.0, mu), dxr)
        elif stream:
            for i in range(k):
                xh = (up(xr[i]) - mu) * inv
                _store_stream(dxr, i, down(up(dyr[i]) * (inv * w[i]) + xh * k_x + k_0, dxr))
        else:
            for i in range(k):
                xh = (up(xr[i]) - mu) * inv
                dxr[i] = down(up(dyr[i]) * (inv * w[i]) + xh * k_x + k_0, dxr)


@_kernel
def ln_bwd(dy, x, w, mean, invstd, need_dx, need_wb, dx, dw, db, nchunks, whole):
    """dy, x, dx: (M, K); w, dw, db: (K,) in the compute dtype; per-chunk partial sums of dw/db in the compute
    dtype, merged in float64; ``whole`` as :func:`bn_eval_ncs`'s."""
    m_rows, k = x.shape
    step = (m_rows + nchunks - 1) // nchunks
    one = nchunks == 1 and need_wb  # one chunk sums straight into dw, db (its float64 merge changes nothing)
    if one:
        dw[:] = 0
        db[:] = 0
        dwp = dw.reshape(1, k)
        dbp = db.reshape(1, k)
    else:
        dwp = _scratch2(nchunks, k, w)
        dbp = _scratch2(nchunks, k, w)
    stream = need_dx and _streams(dx, k, whole)
    for t in prange(nchunks):
        _ln_rows_bwd(dy, x, w, mean, invstd, t * step, min(t * step + step, m_rows), need_dx, need_wb, dx, dwp[t],
                     dbp[t], stream)
    if need_wb and not one:  # the partials merged in float64 (see _column_sums)
        acc = np.empty(k)
        _column_sums(dwp, acc)
        for i in range(k):
            dw[i] = acc[i]
        _column_sums(dbp, acc)
        for i in range(k):
            db[i] = acc[i]


@njit(**_LOOP_OPTS)
def _ln_rows_bwd(dy, x, w, mean, invstd, lo, hi, need_dx, need_wb, dx, dwt, dbt, stream):
    """Rows lo..hi of :func:`ln_bwd`, their dweight/dbias added to ``dwt``, ``dbt``."""
    for r in range(lo, hi):
        mu = like(mean[r], w[0])
        inv = like(invstd[r], w[0])
        _ln_row_bwd(dy[r], x[r], w, mu, inv, x.shape[1], need_dx, need_wb, dx[r], dwt, dbt, stream)
    if stream:
        _stream_fence()


@njit(cache=True)
def _scratch2(m, n, like_arr):
    return np.zeros((m, n), dtype=like_arr.dtype)


# ------------------------------------------------------------------------------------------------------
# running statistics
# ------------------------------------------------------------------------------------------------------
@njit(cache=True, nogil=True, error_model="numpy")
def running_update(rm, rv, mean, invstd, eps, n, momentum):
    """In place, in float64: rm = (1 - momentum) rm + momentum mean, rv likewise with the unbiased variance
    (invstd**-2 - eps) * n / (n - 1); channels with a non-finite mean or variance keep their values. Returns
    how many channels did."""
    corr = n / max(n - 1, 1)
    keep = 1.0 - momentum
    bad = 0
    for c in range(rm.size):
        mu = np.float64(mean[c])
        iv = np.float64(invstd[c])
        var = max(1.0 / (iv * iv) - eps, 0.0) * corr
        if np.isfinite(mu) and np.isfinite(var):
            rm[c] = keep * np.float64(rm[c]) + momentum * mu
            rv[c] = keep * np.float64(rv[c]) + momentum * var
        else:
            bad += 1
    return bad


@njit(cache=True, nogil=True)
def increment(counter):
    """counter[0] += 1 (a training step's count, in place)."""
    counter[0] += 1


# ------------------------------------------------------------------------------------------------------
# C entry points: the single-threaded loops behind plain C signatures, for the native glue (kernels/native.cpp)
# ------------------------------------------------------------------------------------------------------
# The entries pass their constant arguments as intp values (_ONE, _ZERO, _EVAL), not literals: a literal argument
# types as its own constant, and each such signature compiled the whole kernel once more beside the Python glue's
_EVAL = np.intp(MODE_EVAL)
_FWD_ROWS, _FWD_NCS, _EVAL_NCS = bn_fwd_rows.serial, bn_fwd_ncs.serial, bn_eval_ncs.serial
_BWD_ROWS, _BWD_NCS = bn_bwd_rows.serial, bn_bwd_ncs.serial
_GN_FWD, _GN_BWD, _LN_FWD, _LN_BWD = gn_fwd.serial, gn_bwd.serial, ln_fwd.serial, ln_bwd.serial
C_ENTRY_ORDER = ("fwd_rows", "eval_rows", "fwd_ncs", "eval_ncs", "bwd_rows", "bwd_ncs", "running",
                 "gn_fwd", "gn_bwd", "ln_fwd", "ln_bwd", "dx_rows", "dx_ncs", "apply_rows", "apply_ncs")


@njit(inline="always")
def _ln_serial_chunks(m):
    """``normlab.kernels.cpu._ln_chunks`` at one thread: the same chunks, so the same dweight/dbias sums."""
    return max(1, min(m, (m + 255) // 256))


def c_entry_points(dtype) -> tuple[int, ...]:
    """Addresses of the C-callable loops for activations stored as ``dtype`` (float32, float64, or the bits of
    bfloat16 as int16 and of float16 as uint16), in :data:`C_ENTRY_ORDER` (the order ``native.cpp`` declares
    them). Pointers to the data (the activations in ``dtype``, batch norm's mean always float64, everything else in
    the compute dtype: float64 for float64, else float32; group and layer norm's statistics (N, G) and (M,)), then
    the sizes: (M / k, k * C, C) for the rows layout (k rows as one row of lanes, as ``bn_fwd_rows`` takes them),
    (N, C, S) for ncs; batch norm's eval and dx entries and the group and layer norm entries end with the bytes of
    the whole output that a call writes a part of (``whole``: their streaming stores follow its size). Defined
    here, beside the loops they call, so that numba's on-disk cache of these wrappers goes stale with this file."""
    from numba import carray, cfunc, from_dtype

    storage = from_dtype(np.dtype(dtype))
    p = types.CPointer(storage)  # activations
    a = types.CPointer(types.float64 if storage == types.float64 else types.float32)  # weights, statistics
    m64, i64, f64 = types.CPointer(types.float64), types.int64, types.float64

    def fwd_rows(xp, yp, wp, bp, mp, ip, m, ld, cols, c, eps, act, mode):
        _FWD_ROWS(carray(xp, (m, ld)), carray(yp, (m, ld)), carray(wp, (c,)), carray(bp, (c,)), eps, act, mode,
                  carray(mp, (c,)), carray(ip, (c,)), _ONE, _ZERO, cols)
        return 0

    def eval_rows(xp, yp, wp, bp, mp, vp, m, ld, cols, c, eps, act, whole):
        _FWD_ROWS(carray(xp, (m, ld)), carray(yp, (m, ld)), carray(wp, (c,)), carray(bp, (c,)), eps, act,
                  _EVAL, carray(mp, (c,)), carray(vp, (c,)), _ONE, whole, cols)
        return 0

    def fwd_ncs(xp, yp, wp, bp, mp, ip, n, c, s, eps, act, mode):
        _FWD_NCS(carray(xp, (n, c, s)), carray(yp, (n, c, s)), carray(wp, (c,)), carray(bp, (c,)), eps, act, mode,
                 carray(mp, (c,)), carray(ip, (c,)), _ONE)
        return 0

    def eval_ncs(xp, yp, wp, bp, mp, vp, n, c, s, eps, act, whole):
        _EVAL_NCS(carray(xp, (n, c, s)), carray(yp, (n, c, s)), carray(wp, (c,)), carray(bp, (c,)), eps, act,
                  carray(mp, (c,)), carray(vp, (c,)), _ONE, whole)
        return 0

    def bwd_rows(dyp, xp, wp, bp, mp, ip, dxp, dwp, dbp, m, ld, cols, c, act, training, need_dx):
        _BWD_ROWS(carray(dyp, (m, ld)), carray(xp, (m, ld)), carray(wp, (c,)), carray(bp, (c,)), carray(mp, (c,)),
                  carray(ip, (c,)), act, training != 0, need_dx != 0, carray(dxp, (m, ld)), carray(dwp, (c,)),
                  carray(dbp, (c,)), _ONE, cols)
        return 0

    def bwd_ncs(dyp, xp, wp, bp, mp, ip, dxp, dwp, dbp, n, c, s, act, training, need_dx):
        shape = (n, c, s)
        _BWD_NCS(carray(dyp, shape), carray(xp, shape), carray(wp, (c,)), carray(bp, (c,)), carray(mp, (c,)),
                 carray(ip, (c,)), act, training != 0, need_dx != 0, carray(dxp, shape), carray(dwp, (c,)),
                 carray(dbp, (c,)), _ONE)
        return 0

    def running(rmp, rvp, mp, ip, c, eps, n, momentum):
        return running_update(carray(rmp, (c,)), carray(rvp, (c,)), carray(mp, (c,)), carray(ip, (c,)), eps, n,
                              momentum)

    def gn_fwd_c(xp, yp, wp, bp, mp, ip, n, c, s, groups, eps, whole):
        _GN_FWD(carray(xp, (n, c, s)), carray(yp, (n, c, s)), carray(wp, (c,)), carray(bp, (c,)), groups, eps,
                carray(mp, (n, groups)), carray(ip, (n, groups)), _ONE, whole)
        return 0

    def gn_bwd_c(dyp, xp, wp, mp, ip, dxp, dwp, dbp, n, c, s, groups, need_dx, whole):
        dw_part = np.empty((n, c))
        db_part = np.empty((n, c))
        _GN_BWD(carray(dyp, (n, c, s)), carray(xp, (n, c, s)), carray(wp, (c,)), carray(mp, (n, groups)),
                carray(ip, (n, groups)), groups, need_dx != 0, carray(dxp, (n, c, s)), dw_part, db_part, _ONE,
                whole)
        dw = carray(dwp, (c,))
        db = carray(dbp, (c,))
        for ch in range(c):
            dw[ch] = dw_part[:, ch].sum()
            db[ch] = db_part[:, ch].sum()
        return 0

    def ln_fwd_c(xp, yp, wp, bp, mp, ip, m, k, eps, whole):
        _LN_FWD(carray(xp, (m, k)), carray(yp, (m, k)), carray(wp, (k,)), carray(bp, (k,)), eps, carray(mp, (m,)),
                carray(ip, (m,)), _ln_serial_chunks(m), whole)
        return 0

    def ln_bwd_c(dyp, xp, wp, mp, ip, dxp, dwp, dbp, m, k, need_dx, need_wb, whole):
        _LN_BWD(carray(dyp, (m, k)), carray(xp, (m, k)), carray(wp, (k,)), carray(mp, (m,)), carray(ip, (m,)),
                need_dx != 0, need_wb != 0, carray(dxp, (m, k)), carray(dwp, (k,)), carray(dbp, (k,)),
                _ln_serial_chunks(m), whole)
        return 0

    def dx_rows(dyp, xp, wp, bp, mp, ip, dwp, dbp, dxp, m, width, c, act, cnt, whole):
        bn_dx_rows(carray(dyp, (m, width)), carray(xp, (m, width)), carray(wp, (c,)), carray(bp, (c,)),
                   carray(mp, (c,)), carray(ip, (c,)), act, carray(dwp, (c,)), carray(dbp, (c,)), cnt,
                   carray(dxp, (m, width)), whole)
        return 0

    def dx_ncs(dyp, xp, wp, bp, mp, ip, dwp, dbp, dxp, n, c, s, act, cnt, whole):
        shape = (n, c, s)
        bn_dx_ncs(carray(dyp, shape), carray(xp, shape), carray(wp, (c,)), carray(bp, (c,)), carray(mp, (c,)),
                  carray(ip, (c,)), act, carray(dwp, (c,)), carray(dbp, (c,)), cnt, carray(dxp, shape), whole)
        return 0

    def apply_rows(xp, yp, rp, ap, bp, m, width, c, act, whole):
        bn_apply_rows(carray(xp, (m, width)), carray(yp, (m, width)), carray(rp, (c,)), carray(ap, (c,)),
                      carray(bp, (c,)), act, whole)
        return 0

    def apply_ncs(xp, yp, rp, ap, bp, n, c, s, act, whole):
        bn_apply_ncs(carray(xp, (n, c, s)), carray(yp, (n, c, s)), carray(rp, (c,)), carray(ap, (c,)),
                     carray(bp, (c,)), act, whole)
        return 0

    sigs = {
        "fwd_rows": i64(p, p, a, a, m64, a, i64, i64, i64, i64, f64, i64, i64),
        "eval_rows": i64(p, p, a, a, a, a, i64, i64, i64, i64, f64, i64, i64),
        "fwd_ncs": i64(p, p, a, a, m64, a, i64, i64, i64, f64, i64, i64),
        "eval_ncs": i64(p, p, a, a, a, a, i64, i64, i64, f64, i64, i64),
        "bwd_rows": i64(p, p, a, a, m64, a, p, a, a, i64, i64, i64, i64, i64, i64, i64),
        "bwd_ncs": i64(p, p, a, a, m64, a, p, a, a, i64, i64, i64, i64, i64, i64),
        "running": i64(a, a, m64, a, i64, f64, i64, f64),
        "gn_fwd": i64(p, p, a, a, a, a, i64, i64, i64, i64, f64, i64),
        "gn_bwd": i64(p, p, a, a, a, p, a, a, i64, i64, i64, i64, i64, i64),
        "ln_fwd": i64(p, p, a, a, a, a, i64, i64, f64, i64),
        "ln_bwd": i64(p, p, a, a, a, p, a, a, i64, i64, i64, i64, i64),
        "dx_rows": i64(p, p, a, a, m64, a, m64, m64, p, i64, i64, i64, i64, i64, i64),
        "dx_ncs": i64(p, p, a, a, m64, a, m64, m64, p, i64, i64, i64, i64, i64, i64),
        "apply_rows": i64(p, p, a, a, a, i64, i64, i64, i64, i64),
        "apply_ncs": i64(p, p, a, a, a, i64, i64, i64, i64, i64),
    }
    fns = {"fwd_rows": fwd_rows, "eval_rows": eval_rows, "fwd_ncs": fwd_ncs, "eval_ncs": eval_ncs,
           "bwd_rows": bwd_rows, "bwd_ncs": bwd_ncs, "running": running, "gn_fwd": gn_fwd_c, "gn_bwd": gn_bwd_c,
           "ln_fwd": ln_fwd_c, "ln_bwd": ln_bwd_c, "dx_rows": dx_rows, "dx_ncs": dx_ncs,
           "apply_rows": apply_rows, "apply_ncs": apply_ncs}
    return tuple(cfunc(sigs[name], cache=True, error_model="numpy")(fns[name]).address for name in C_ENTRY_ORDER)
