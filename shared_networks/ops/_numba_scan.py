"""Fused CPU selective scan: numba kernels for the forward and the backward pass.

Layout and vectorisation
    One work item is a block of ``W`` channels of one batch element (all in the same B/C group). The ``W``
    channels are the SIMD lanes: the state of a block is an ``(N, W)`` float64 array, so the update
    ``h = exp(delta * A) * h + delta * B * u`` and the output ``y = sum_n C * h`` are vertical vector operations
    (no horizontal sums, no reassociation; ``fastmath`` stays off). Inputs are read in tiles of ``T`` time steps
    and transposed into lane order on the fly, so the caller passes the natural ``(batch, dim, L)`` layout.

Threads
    The kernels are plain ``nogil`` functions over a range of blocks; the caller runs disjoint ranges in a thread
    pool. Compared with ``parallel=True``/``prange`` this compiles ~3x faster (numba's parfor passes on these
    bodies cost more than LLVM), needs no numba threading layer (no OpenMP runtime next to PyTorch's, no
    workqueue re-entrance limits, fork-safe) and gives results that do not depend on the number of threads.

Precision
    Inputs and outputs are float32; every state, product and accumulation is float64. The decay is evaluated as
    ``2**(delta * A log2 e)`` with a vectorisable range reduction + degree-7 minimax polynomial (relative error
    < 1e-10, and < 2.5e-10 for ``1 - decay``; far below float32 resolution): the libm call would stop LLVM from
    vectorising the inner loop and costs about 3x more. The step
    ``softplus(delta + delta_bias)`` and its derivative are computed in the kernels too (vectorised log1p), so
    no extra full-size tensors are made for them.

Backward
    The forward stores the float64 state at the start of every tile (``ckpt``, 1/T of the full state history).
    The backward walks the tiles in reverse, recomputes the tile's states and decays from its checkpoint into a
    small per-block buffer, then runs the adjoint recurrence backwards through the tile. Gradients of B and C
    are sums over the channels of a group: each block writes its own partial sums (no races, deterministic),
    ``reduce_bc`` adds the blocks of a group.

``error_model="numpy"`` everywhere: with Python's model numba checks every float division for zero, and that
early exit alone stops the vectorisation of the softplus / SiLU loops (5-9 ns instead of ~1 ns per element).

Only one signature per kernel is ever compiled (all arrays float32/float64 C-contiguous with fixed ndim, flags
as booleans, block ranges as int64), and ``cache=True`` keeps the machine code on disk, so only the first
process pays the compile (~4-6 s of CPU for both kernels).
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic

#: channels per block = SIMD lanes (a compile-time constant: LLVM then vectorises without remainder loops)
W = 32
#: time steps per tile / checkpoint interval (16: the backward's tile buffer, N * 17 * 2 * W float64 = 140 kB for
#: N = 16, stays in L2; the checkpoints cost 2x the memory of u)
T = 16

_LOG2E = 1.4426950408889634


@intrinsic
def _fma(typingctx, a, b, c):
    """Fused multiply-add (one rounding, IEEE exact; not a fastmath contraction)."""
    sig = types.float64(types.float64, types.float64, types.float64)

    def codegen(context, builder, signature, args):
        fnty = ir.FunctionType(ir.DoubleType(), [ir.DoubleType()] * 3)
        fn = cgutils.get_or_insert_function(builder.module, fnty, "llvm.fma.f64")
        return builder.call(fn, args)

    return sig, codegen


@intrinsic
def _pow2_bits(typingctx, k):
    """2**k for an integer-valued float64 k in [-1022, 1023], built from the exponent bits."""
    sig = types.float64(types.float64)

    def codegen(context, builder, signature, args):
        i64 = ir.IntType(64)
        ki = builder.fptosi(args[0], i64)
        bits = builder.shl(builder.add(ki, ir.Constant(i64, 1023)), ir.Constant(i64, 52))
        return builder.bitcast(bits, ir.DoubleType())

    return sig, codegen


# 2**f - 1 = f * q(f) on [-1/2, 1/2]: relative-error minimax fit of degree 6 (error < 2.5e-10 for 2**f - 1 and
# < 1e-10 for 2**f). Factoring out f keeps 1 - exp(x) accurate for tiny steps, which matters: a relative error of
# the decay's distance from 1 is amplified by the memory length 1 / (1 - decay) in the state.
_Q0, _Q1, _Q2, _Q3 = 0.6931471805815393, 0.24022650920056943, 0.055504107278269765, 0.009618057036144177
_Q4, _Q5, _Q6 = 0.0013333669205529974, 0.00015461330171057802, 1.5252785556358998e-05


@njit(inline="always", fastmath=False, error_model="numpy")
def _exp2(x):
    """2**x, vectorisable (no libm call); clamped to [2**-1021, 2**1023]; NaN passes through."""
    x = -1021.0 if x < -1021.0 else x
    x = 1023.0 if x > 1023.0 else x
    k = np.floor(x + 0.5)
    f = x - k  # exact
    q = _fma(_Q6, f, _Q5)
    q = _fma(q, f, _Q4)
    q = _fma(q, f, _Q3)
    q = _fma(q, f, _Q2)
    q = _fma(q, f, _Q1)
    q = _fma(q, f, _Q0)
    return _fma(f, q, 1.0) * _pow2_bits(k)


@njit(inline="always", fastmath=False, error_model="numpy")
def _exp(x):
    """exp(x) = 2**(x log2 e); the scans call ``_exp2`` on A pre-scaled by log2 e instead."""
    return _exp2(x * _LOG2E)


_LN2 = 0.6931471805599453


@njit(inline="always", fastmath=False, error_model="numpy")
def _log1p_unit(y):
    """log(1 + y) for y in [0, 1] (vectorisable): 2 atanh(s) series with |s| <= 0.172, relative error < 2e-12."""
    hi = y > 0.41421356237309503  # (1 + y) / 2 in (0.707, 1]: log(1 + y) = ln 2 + log((1 + y) / 2)
    s = (y - 1.0) / (y + 3.0) if hi else y / (2.0 + y)
    s2 = s * s
    p = _fma(s2, 1.0 / 13.0, 1.0 / 11.0)
    p = _fma(p, s2, 1.0 / 9.0)
    p = _fma(p, s2, 1.0 / 7.0)
    p = _fma(p, s2, 1.0 / 5.0)
    p = _fma(p, s2, 1.0 / 3.0)
    p = _fma(p, s2, 1.0)
    return _fma(2.0 * s, p, _LN2 if hi else 0.0)


@njit(inline="always", fastmath=False, error_model="numpy")
def _softplus(x):
    """(softplus(x), d softplus / dx) with torch's threshold 20 (above it: x and 1 exactly)."""
    y = _exp(-abs(x))
    sp = max(x, 0.0) + _log1p_unit(y)
    sg = 1.0 / (1.0 + y) if x >= 0.0 else y / (1.0 + y)
    if x > 20.0:
        sp = x
        sg = 1.0
    return sp, sg


@njit(cache=True, fastmath=False, error_model="numpy")
def softplus_vec(x):
    """Elementwise ``_softplus`` (exposed for tests)."""
    out = np.empty_like(x)
    grad = np.empty_like(x)
    for i in range(x.size):
        out[i], grad[i] = _softplus(x[i])
    return out, grad


@njit(cache=True, fastmath=False, error_model="numpy")
def exp_vec(x):
    """Elementwise ``_exp`` (exposed for tests of the polynomial)."""
    out = np.empty_like(x)
    for i in range(x.size):
        out[i] = _exp(x[i])
    return out


@njit(inline="always")
def _block(it, nbt, bpg, per):
    b = it // nbt
    blk = it - b * nbt
    g = blk // bpg
    c0 = g * per + (blk - g * bpg) * W
    wv = min(W, g * per + per - c0)
    return b, blk, g, c0, wv



# Scratch arrays are packed into three multi-dimensional arrays per kernel, indexed by loop counters and
# constant rows, so that every inner loop touches only 2-3 distinct arrays with affine indices: LLVM then proves
# that rows of one array do not overlap and vectorises with at most a few runtime alias checks. (With one array
# per quantity it gives up beyond ~8 pairwise checks; with flat arrays and computed offsets numba's negative-index
# wrap-around turns the indices into selects it cannot analyse.)
# rows of the forward tile array `tl_` (T * W: time step tt, lane j at tt * W + j)
_TU, _TDT, _TZ, _TY = 0, 1, 2, 3
# rows of the forward lane array `lv` (W)
_DT, _DU, _ACC, _DV, _BV = 0, 1, 2, 3, 4
# rows of the backward tile array
_BU, _BD, _BZ, _BGY, _BY0, _BSG, _BGU, _BGD, _BGZ = 0, 1, 2, 3, 4, 5, 6, 7, 8
# rows of the backward lane array
_GY0, _U, _BDT, _BDU, _GDT, _GU, _PB, _PC, _BDV, _BBV, _GDL, _GBL = 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11


def n_blocks(nb, nd, G):
    """Number of parallel work items (blocks of W channels of one batch element and one group)."""
    return nb * G * -(-(nd // G) // W)


@njit(nogil=True, fastmath=False, error_model="numpy", cache=True)
def scan_fwd(i0, i1, u, delta, A, B, C, Dv, dbias, z, has_z, softplus, save_ckpt, y, last, ckpt):
    """Forward scan of blocks ``i0 .. i1 - 1`` (see ``n_blocks``; callers run disjoint ranges in threads).

    u, delta, z: (nb, nd, L) float32 (the step is ``softplus(delta + dbias)`` if softplus else
    ``delta + dbias``; z ignored unless has_z); A: (nd, N); B, C: (nb, G, N, L); Dv, dbias: (nd,) (zeros when
    absent). Outputs: y (nb, nd, L) float32, last (nb, nd, N) float32, ckpt (nb, ceil(L/T), N, nd) float64
    (written only if save_ckpt).
    """
    nd, L = u.shape[1], u.shape[2]
    N = A.shape[1]
    G = B.shape[1]
    per = nd // G
    bpg = (per + W - 1) // W
    nbt = G * bpg
    nchunk = (L + T - 1) // T
    for it in range(i0, i1):
        b, blk, g, c0, wv = _block(it, nbt, bpg, per)
        Bg, Cg = B[b, g], C[b, g]
        st = np.zeros((N, 2, W))  # per state n: [h | A * log2(e)]
        lv = np.zeros((5, W))
        tl_ = np.zeros((4, T * W))  # padded lanes (j >= wv) keep zero inputs, a zero state, and are not written out
        for j in range(wv):
            lv[_DV, j] = Dv[c0 + j]
            lv[_BV, j] = dbias[c0 + j]
            for n in range(N):
                st[n, 1, j] = A[c0 + j, n] * _LOG2E
        for k in range(nchunk):
            t0 = k * T
            tl = min(T, L - t0)
            if save_ckpt:
                for n in range(N):
                    for j in range(wv):
                        ckpt[b, k, n, c0 + j] = st[n, 0, j]
            for j in range(wv):  # transpose the tile into lane order (1-D row views: cheap indexing)
                ur, dr = u[b, c0 + j, t0:t0 + tl], delta[b, c0 + j, t0:t0 + tl]
                for tt in range(tl):
                    tl_[_TU, tt * W + j] = ur[tt]
                    tl_[_TDT, tt * W + j] = dr[tt]
                if has_z:
                    zr = z[b, c0 + j, t0:t0 + tl]
                    for tt in range(tl):
                        tl_[_TZ, tt * W + j] = zr[tt]
            for tt in range(tl):
                for j in range(W):
                    x = tl_[_TDT, tt * W + j] + lv[_BV, j]
                    if softplus:
                        x = _softplus(x)[0]
                    tl_[_TDT, tt * W + j] = x if j < wv else 0.0  # padded lanes: zero step
            for tt in range(tl):
                bt, ct = Bg[:, t0 + tt], Cg[:, t0 + tt]
                r = tt * W
                for j in range(W):
                    lv[_DT, j] = tl_[_TDT, r + j]
                    lv[_DU, j] = tl_[_TDT, r + j] * tl_[_TU, r + j]
                    lv[_ACC, j] = 0.0
                for n in range(N):
                    bb = np.float64(bt[n])
                    cc = np.float64(ct[n])
                    for j in range(W):
                        e = _exp2(lv[_DT, j] * st[n, 1, j])
                        hv = _fma(e, st[n, 0, j], lv[_DU, j] * bb)
                        st[n, 0, j] = hv
                        lv[_ACC, j] = _fma(hv, cc, lv[_ACC, j])
                for j in range(W):
                    yv = _fma(lv[_DV, j], tl_[_TU, r + j], lv[_ACC, j])
                    if has_z:
                        zv = tl_[_TZ, r + j]
                        yv = yv * zv / (1.0 + _exp(-zv))
                    tl_[_TY, r + j] = yv
            for j in range(wv):
                yr = y[b, c0 + j, t0:t0 + tl]
                for tt in range(tl):
                    yr[tt] = tl_[_TY, tt * W + j]
        for j in range(wv):
            for n in range(N):
                last[b, c0 + j, n] = st[n, 0, j]


@njit(nogil=True, fastmath=False, error_model="numpy", cache=True)
def scan_bwd(i0, i1, u, delta, A, B, C, Dv, dbias, z, has_z, softplus, ckpt, gy, glast, has_glast,
             gu, gdelta, gz, gA, gD, gbias, gBp):
    """Backward scan of blocks ``i0 .. i1 - 1`` (see module docstring).

    Inputs as in ``scan_fwd`` plus ckpt from it, gy (nb, nd, L) float32, glast (nb, nd, N) float32 (used if
    has_glast). Outputs: gu, gdelta (w.r.t. the raw delta), gz (nb, nd, L) float32 (gz written only if
    has_z); gA (nb, nd, N), gD and gbias (nb, nd) float64 per-batch partials; gBp (2, nb, n_blocks / nb, N, L)
    float32 per-block partial sums over channels of the B and C gradients (added up by ``reduce_bc``).
    """
    nd, L = u.shape[1], u.shape[2]
    N = A.shape[1]
    G = B.shape[1]
    per = nd // G
    bpg = (per + W - 1) // W
    nbt = G * bpg
    nchunk = (L + T - 1) // T
    for it in range(i0, i1):
        b, blk, g, c0, wv = _block(it, nbt, bpg, per)
        Bg, Cg = B[b, g], C[b, g]
        gBr, gCr = gBp[0, b, blk], gBp[1, b, blk]
        # per state n: [adjoint carried to the previous step (already times its decay) | A | dL/dA | A log2(e)]
        st = np.zeros((N, 4, W))
        lv = np.zeros((12, W))
        tl_ = np.zeros((9, T * W))
        # tile states: state n, step s (0..T) -> [h_s | decay from h_{s-1} to h_s]; s = 0 is the checkpoint.
        # (n outermost: consecutive steps are then a constant W apart, which LLVM can prove disjoint)
        tb = np.zeros((N, T + 1, 2, W))
        for j in range(wv):
            lv[_BDV, j] = Dv[c0 + j]
            lv[_BBV, j] = dbias[c0 + j]
            for n in range(N):
                st[n, 1, j] = A[c0 + j, n]
                st[n, 3, j] = A[c0 + j, n] * _LOG2E
                if has_glast:
                    st[n, 0, j] = glast[b, c0 + j, n]
        for k in range(nchunk - 1, -1, -1):
            t0 = k * T
            tl = min(T, L - t0)
            for j in range(wv):
                ur, dr, gr = u[b, c0 + j, t0:t0 + tl], delta[b, c0 + j, t0:t0 + tl], gy[b, c0 + j, t0:t0 + tl]
                for tt in range(tl):
                    tl_[_BU, tt * W + j] = ur[tt]
                    tl_[_BD, tt * W + j] = dr[tt]
                    tl_[_BGY, tt * W + j] = gr[tt]
                if has_z:
                    zr = z[b, c0 + j, t0:t0 + tl]
                    for tt in range(tl):
                        tl_[_BZ, tt * W + j] = zr[tt]
                for n in range(N):
                    tb[n, 0, 0, j] = ckpt[b, k, n, c0 + j]
            for tt in range(tl):
                for j in range(W):
                    x = tl_[_BD, tt * W + j] + lv[_BBV, j]
                    sg = 1.0
                    if softplus:
                        x, sg = _softplus(x)
                    tl_[_BD, tt * W + j] = x if j < wv else 0.0
                    tl_[_BSG, tt * W + j] = sg
            # recompute the tile's states, decays and pre-gate outputs
            for tt in range(tl):
                bt, ct = Bg[:, t0 + tt], Cg[:, t0 + tt]
                r = tt * W
                for j in range(W):
                    lv[_BDT, j] = tl_[_BD, r + j]
                    lv[_BDU, j] = tl_[_BD, r + j] * tl_[_BU, r + j]
                    lv[_PB, j] = 0.0
                for n in range(N):
                    bb = np.float64(bt[n])
                    cc = np.float64(ct[n])
                    for j in range(W):
                        e = _exp2(lv[_BDT, j] * st[n, 3, j])
                        hv = _fma(e, tb[n, tt, 0, j], lv[_BDU, j] * bb)
                        tb[n, tt + 1, 0, j] = hv
                        tb[n, tt + 1, 1, j] = e
                        lv[_PB, j] = _fma(hv, cc, lv[_PB, j])
                for j in range(W):
                    tl_[_BY0, r + j] = _fma(lv[_BDV, j], tl_[_BU, r + j], lv[_PB, j])
            # adjoint recurrence, backwards through the tile
            for tt in range(tl - 1, -1, -1):
                t = t0 + tt
                bt, ct = Bg[:, t], Cg[:, t]
                r = tt * W
                for j in range(W):
                    gyv = tl_[_BGY, r + j]
                    if has_z:
                        zv = tl_[_BZ, r + j]
                        sg = 1.0 / (1.0 + _exp(-zv))
                        tl_[_BGZ, r + j] = gyv * tl_[_BY0, r + j] * sg * (1.0 + zv * (1.0 - sg))
                        gyv = gyv * zv * sg
                    lv[_GY0, j] = gyv
                    lv[_U, j] = tl_[_BU, r + j]
                    lv[_BDT, j] = tl_[_BD, r + j]
                    lv[_BDU, j] = tl_[_BD, r + j] * tl_[_BU, r + j]
                    lv[_GDT, j] = 0.0
                    lv[_GU, j] = gyv * lv[_BDV, j]
                    lv[_GDL, j] = _fma(gyv, tl_[_BU, r + j], lv[_GDL, j])
                for n in range(N):
                    bb = np.float64(bt[n])
                    cc = np.float64(ct[n])
                    for j in range(W):
                        gh = _fma(lv[_GY0, j], cc, st[n, 0, j])  # dL/dh_t
                        e = tb[n, tt + 1, 1, j]
                        ga = gh * tb[n, tt, 0, j] * e  # dL/d(delta_t * A)
                        ghb = gh * bb
                        lv[_GDT, j] = _fma(ga, st[n, 1, j], _fma(ghb, lv[_U, j], lv[_GDT, j]))
                        lv[_GU, j] = _fma(ghb, lv[_BDT, j], lv[_GU, j])
                        st[n, 2, j] = _fma(ga, lv[_BDT, j], st[n, 2, j])
                        lv[_PB, j] = gh * lv[_BDU, j]
                        lv[_PC, j] = lv[_GY0, j] * tb[n, tt + 1, 0, j]
                        st[n, 0, j] = gh * e
                    # lane sums for the shared B/C: 8 fixed partial sums (vectorisable, deterministic order)
                    sB0 = sB1 = sB2 = sB3 = sB4 = sB5 = sB6 = sB7 = 0.0
                    sC0 = sC1 = sC2 = sC3 = sC4 = sC5 = sC6 = sC7 = 0.0
                    for q in range(0, W, 8):
                        sB0 += lv[_PB, q]
                        sB1 += lv[_PB, q + 1]
                        sB2 += lv[_PB, q + 2]
                        sB3 += lv[_PB, q + 3]
                        sB4 += lv[_PB, q + 4]
                        sB5 += lv[_PB, q + 5]
                        sB6 += lv[_PB, q + 6]
                        sB7 += lv[_PB, q + 7]
                        sC0 += lv[_PC, q]
                        sC1 += lv[_PC, q + 1]
                        sC2 += lv[_PC, q + 2]
                        sC3 += lv[_PC, q + 3]
                        sC4 += lv[_PC, q + 4]
                        sC5 += lv[_PC, q + 5]
                        sC6 += lv[_PC, q + 6]
                        sC7 += lv[_PC, q + 7]
                    gBr[n, t] = ((sB0 + sB1) + (sB2 + sB3)) + ((sB4 + sB5) + (sB6 + sB7))
                    gCr[n, t] = ((sC0 + sC1) + (sC2 + sC3)) + ((sC4 + sC5) + (sC6 + sC7))
                for j in range(W):
                    tl_[_BGU, r + j] = lv[_GU, j]
                    gd = lv[_GDT, j] * tl_[_BSG, r + j]
                    tl_[_BGD, r + j] = gd
                    lv[_GBL, j] += gd
            for j in range(wv):
                ur, dr = gu[b, c0 + j, t0:t0 + tl], gdelta[b, c0 + j, t0:t0 + tl]
                for tt in range(tl):
                    ur[tt] = tl_[_BGU, tt * W + j]
                    dr[tt] = tl_[_BGD, tt * W + j]
                if has_z:
                    zr = gz[b, c0 + j, t0:t0 + tl]
                    for tt in range(tl):
                        zr[tt] = tl_[_BGZ, tt * W + j]
        for j in range(wv):
            gD[b, c0 + j] = lv[_GDL, j]
            gbias[b, c0 + j] = lv[_GBL, j]
            for n in range(N):
                gA[b, c0 + j, n] = st[n, 2, j]


@njit(nogil=True, fastmath=False, error_model="numpy", cache=True)
def reduce_bc(r0, r1, gBp, gBC):
    """Rows ``r0 .. r1 - 1`` of (2 * nb * G * N) of the B/C gradients: gBC (2, nb, G, N, L) = the sum of the blocks
    of each group in gBp (2, nb, G * bpg, N, L), in a fixed order (results do not depend on the thread count)."""
    nb, G, N, L = gBC.shape[1], gBC.shape[2], gBC.shape[3], gBC.shape[4]
    bpg = gBp.shape[2] // G
    for row in range(r0, r1):
        q = row // (nb * G * N)
        b = (row // (G * N)) % nb
        g = (row // N) % G
        n = row % N
        for t in range(L):
            gBC[q, b, g, n, t] = gBp[q, b, g * bpg, n, t]
        for k in range(1, bpg):
            for t in range(L):
                gBC[q, b, g, n, t] += gBp[q, b, g * bpg + k, n, t]
