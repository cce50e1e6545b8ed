"""Q3_K kernels: ggml's ``quantize_row_q3_K_ref`` / ``quantize_row_q3_K_impl``, byte for byte.

Block of 256 weights, 110 bytes: hmask u8[32]@0, qs u8[64]@32, scales u8[12]@96, d half@108.
Levels are signed in [-4, 3] (stored +4: two low bits in ``qs``, the third in ``hmask``); each
group of 16 has a 6-bit scale stored +32 relative to the block's ``d``.

Without an imatrix each group's scale comes from ``make_q3_quants`` (an x^2-weighted
coordinate-descent refinement) and the scales are quantized against the largest. With one,
groups use ``make_qx_quants`` weighted by ``qw * sqrt(sigma2 + x^2)`` and the 16 scales are
themselves quantized by ``make_qx_quants`` weighted by each group's total weight.

Both run on tiles of 32 groups side by side (two blocks; see the notes in q6_k.py, whose tile
search the imatrix path shares): each group sees exactly ggml's float32 operations in ggml's
order. Blocks are numbered across rows (k = row * (n // 256) + block), so a tile's two blocks may
come from consecutive rows, and the imatrix path's second search (over each block's 16 scales)
runs once per 32 blocks, one lane per block. Indices are np.uint64: see quant_kernels._source.

Divisions are written ``np.true_divide(a, b)``: the same IEEE float32 division as ``a / b``,
without numba's Python-style zero-divisor check, whose branch keeps loops from vectorizing.
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange

from ._numeric import fp16_bits, fp16_to_f32, nint
from ._source import load_rows, n_chunks, rows_per_chunk, scales_bad
from .config import JIT_OPTIONS, PARALLEL_JIT_OPTIONS
from .q6_k import (
    KERNEL_JIT,
    LANES,
    PARALLEL_KERNEL_JIT,
    T_AMAX,
    T_AUX,
    T_DG,
    T_ISC,
    T_SCALE,
    T_STRIDE,
    T_W,
    T_WX,
    T_X,
    make_qx_quants_tile,
    new_tile,
    tile_levels,
)
from .types import GGMLQuantizationType, block_geometry

__all__ = ["quantize_rows", "quantize_rows_imatrix", "dequantize_rows", "encode_rows", "quantize_codes"]

QK, BLOCK_BYTES = block_geometry(GGMLQuantizationType.Q3_K)  # 256, 110
SCALE_OFF0, SCALE_OFF1 = 108, -1  # the float16 d of every block (quant_kernels._source.scales_bad)
GROUP_MAX_EPS = np.float32(1e-15)

_U = np.uint64
_4 = _U(4)
_16 = _U(16)
_L = _U(LANES)
_QK = _U(QK)
_BB = _U(BLOCK_BYTES)
BLOCKS_PER_TILE = LANES // 16
BLOCKS_PER_TASK = 16  # reference path: blocks per parallel task (each allocates its own tile)
BATCH = LANES  # imatrix path: blocks per second-level search (one lane each) and per task

# Reference-path tile: RLANES groups (one block: its refinement passes repeat until no group of
# the tile changes, so fewer lanes mean fewer passes), rows of RLANES floats, then element i of
# every lane's group at R_X + R_STRIDE*i, its weight w = x*x at + R_W, w*x at + R_WX and its
# current level at + R_LEV.
RLANES = 16
_RL = _U(RLANES)
BLOCKS_PER_REF_TILE = RLANES // 16
R_AMAX, R_MX, R_ISC, R_SLX, R_SL2, R_FIRST, R_SCALE, R_DG = [_U(k * RLANES) for k in range(8)]
R_X = _U(8 * RLANES)
R_W = _RL
R_WX = _U(2 * RLANES)
R_LEV = _U(3 * RLANES)
R_STRIDE = _U(4 * RLANES)
REF_TILE_SIZE = 8 * RLANES + 16 * 4 * RLANES


# --- reference path: make_q3_quants on a tile ----------------------------------------------------

@njit(**KERNEL_JIT)
def _load_ref(x, k0, nbt, tb):
    """Lanes 16*bt + j = group j of block k0 + bt (bt < nbt; other lanes zero), weights x^2."""
    zero = np.float32(0.0)
    nb = _U(x.shape[1]) // _QK
    for bt in range(_U(BLOCKS_PER_REF_TILE)):
        k = k0 + bt if bt < nbt else k0  # a missing block reads block k0 (and stores zeros)
        xr = x[k // nb]
        c0 = (k % nb) * _QK
        for j in range(_16):
            g = _16 * bt + j
            for i in range(_16):
                at = R_X + R_STRIDE * i + g
                v = xr[c0 + _16 * j + i] if bt < nbt else zero
                w = v * v
                tb[at] = v
                tb[at + R_W] = w
                tb[at + R_WX] = w * v


@njit(**KERNEL_JIT)
def _refine_tail(tb, g, start):
    """ggml's sequential make_q3_quants refinement loop for lane g, from element ``start`` to
    the end of the pass, on the lane's levels and sums in the tile."""
    zero = np.float32(0.0)
    sumlx = tb[R_SLX + g]
    suml2 = tb[R_SL2 + g]
    for i in range(start, _16):
        at = R_X + R_STRIDE * i + g
        v = tb[at]
        w = tb[at + R_W]
        wx = tb[at + R_WX]
        fli = tb[at + R_LEV]
        slx = sumlx - wx * fli
        if slx > zero:
            sl2 = suml2 - (w * fli) * fli
            new_l = min(np.int32(3), max(np.int32(-4), nint(np.true_divide(v * sl2, slx))))
            fnew = np.float32(new_l)
            if fnew != fli:
                slx += wx * fnew
                sl2 += (w * fnew) * fnew
                if sl2 > zero and (slx * slx) * suml2 > (sumlx * sumlx) * sl2:
                    tb[at + R_LEV] = fnew
                    sumlx = slx
                    suml2 = sl2
    tb[R_SLX + g] = sumlx
    tb[R_SL2 + g] = suml2


@njit(**KERNEL_JIT)
def _make_q3_quants_tile(tb):
    """ggml's make_q3_quants(16, 4, x, L, do_rmse=true) for the RLANES groups of a tile.

    Per lane: R_SCALE = the returned scale, R_LEV = the signed levels (-4 for an all-|x| <
    1e-15 group, which is ggml's L = 0). Each lane does one group's float32 operations in ggml's
    order, so the results are ggml's:
    - the max search and first level assignment are plain loops over the lanes;
    - a refinement pass keeps its running sums until its first change, so a branch-free
      look-ahead finds each group's first change from the pass's starting sums, and ggml's
      sequential loop runs only from there on (four groups in five change nothing at all);
    - a group whose pass changed nothing would change nothing in any later pass either, so
      running passes until no group changes (at most 5) equals ggml's per-group early exit.
    """
    zero = np.float32(0.0)
    lanes = _RL
    lo = np.int32(-4)
    hi = np.int32(3)
    for g in range(lanes):
        amax = zero
        mx = zero
        for i in range(_16):  # a small body: always unrolled, so the lanes vectorize
            v = tb[R_X + R_STRIDE * i + g]
            ax = np.abs(v)
            take = ax > amax  # strict: ties keep the first element and its sign
            amax = ax if take else amax
            mx = v if take else mx
        tb[R_AMAX + g] = amax
        # a harmless iscale for an all-small group: its results are overwritten below
        m = mx if amax >= GROUP_MAX_EPS else np.float32(1.0)
        tb[R_ISC + g] = np.true_divide(np.float32(-4.0), m)
        tb[R_SLX + g] = zero
        tb[R_SL2 + g] = zero
    for i in range(_16):
        for g in range(lanes):
            at = R_X + R_STRIDE * i + g
            fl = np.float32(min(hi, max(lo, nint(tb[R_ISC + g] * tb[at]))))
            tb[at + R_LEV] = fl
            tb[R_SLX + g] += tb[at + R_WX] * fl
            tb[R_SL2 + g] += (tb[at + R_W] * fl) * fl
    sixteen = np.float32(16.0)
    for _ in range(5):
        for g in range(lanes):
            tb[R_FIRST + g] = sixteen
        for i in range(_16):
            ii = _U(15) - i  # descending: R_FIRST ends at the first change
            fi = np.float32(ii)
            for g in range(lanes):
                at = R_X + R_STRIDE * ii + g
                v = tb[at]
                w = tb[at + R_W]
                wx = tb[at + R_WX]
                fli = tb[at + R_LEV]
                sx = tb[R_SLX + g]
                s2 = tb[R_SL2 + g]
                slx = sx - wx * fli
                sl2 = s2 - (w * fli) * fli
                fnew = np.float32(min(hi, max(lo, nint(np.true_divide(v * sl2, slx)))))
                slx_new = slx + wx * fnew
                sl2_new = sl2 + (w * fnew) * fnew
                take = (slx > zero) & (fnew != fli) & (sl2_new > zero) & \
                    ((slx_new * slx_new) * s2 > (sx * sx) * sl2_new)
                tb[R_FIRST + g] = fi if take else tb[R_FIRST + g]
        changed = False
        for g in range(_RL):
            f = tb[R_FIRST + g]
            if f < sixteen:
                changed = True
                _refine_tail(tb, g, _U(f))
        if not changed:
            break
    for g in range(lanes):
        small = tb[R_AMAX + g] < GROUP_MAX_EPS
        sl2 = tb[R_SL2 + g]
        scale = np.true_divide(tb[R_SLX + g], sl2) if sl2 > zero else zero
        tb[R_SCALE + g] = zero if small else scale
        for i in range(_16):
            at = R_X + R_STRIDE * i + g + R_LEV
            tb[at] = np.float32(-4.0) if small else tb[at]


@njit(**KERNEL_JIT)
def _quantize_scales_ref(tb, lane0, ls):
    """ggml's scale pass of one block (lanes lane0..lane0+15): ls[j] = clamp(nint(-32/max *
    s_j), -32, 31) + 32 against the signed largest scale. Returns the fp16 bits of
    d = 1/iscale (0, with every ls 0, when every scale is 0)."""
    max_scale = np.float32(0.0)
    amax = np.float32(0.0)
    for j in range(_16):
        s = tb[R_SCALE + lane0 + j]
        a = np.abs(s)
        if a > amax:
            amax = a
            max_scale = s
    if max_scale == np.float32(0.0):
        for j in range(_16):
            ls[j] = 0
        return np.uint16(0)
    iscale = np.true_divide(np.float32(-32.0), max_scale)
    for j in range(_16):
        l = np.int32(np.int8(nint(iscale * tb[R_SCALE + lane0 + j])))  # ggml keeps this in an int8_t
        ls[j] = min(np.int32(31), max(np.int32(-32), l)) + 32
    return fp16_bits(np.true_divide(np.float32(1.0), iscale))


@njit(**KERNEL_JIT)
def _ref_levels(tb, lv):
    """Final levels (0..7) of a reference tile into lv (transposed, lv[RLANES*i + g]): requantized
    against the lane's R_DG where it is non-zero (ggml's ``if (!d) continue``), else the
    search's own."""
    zero = np.float32(0.0)
    for g in range(_RL):
        dg = tb[R_DG + g]
        for i in range(_16):
            at = R_X + R_STRIDE * i + g
            q = min(np.int32(3), max(np.int32(-4), nint(np.true_divide(tb[at], dg))))
            l = np.int32(tb[at + R_LEV])
            lv[_RL * i + g] = np.uint8((q if dg != zero else l) + np.int32(4))


# --- block output, both paths ----------------------------------------------------------------------

@njit(**KERNEL_JIT)
def _write_scales(ls, dbits, ob):
    """The 12 scale bytes (6-bit ls[j], 0..63) and d of one block."""
    for k in range(12):
        ob[96 + k] = 0
    for j in range(16):
        l = np.int32(ls[j])
        if j < 8:
            ob[96 + j] = np.uint8(l & 0xF)
        else:
            ob[96 + j - 8] |= np.uint8((l & 0xF) << 4)
        ob[96 + 8 + j % 4] |= np.uint8((l >> 4) << (2 * (j // 4)))
    ob[108] = np.uint8(dbits & 0xFF)
    ob[109] = np.uint8(dbits >> 8)


@njit(**KERNEL_JIT)
def _pack_block(lv, stride, lane0, ob):
    """hmask and the 2-bit planes of one block from its levels (0..7) in lanes lane0..lane0+15
    of lv (transposed, ``stride`` lanes). Element e of the block is
    lv[stride * (e % 16) + lane0 + e // 16]."""
    # bit 2 of element 32k + l goes to hmask[l] bit k
    for l in range(_U(32)):
        at = stride * (l & _U(15)) + lane0 + (l >> _U(4))
        m = np.int32(0)
        for k in range(_U(8)):
            m |= ((np.int32(lv[at + _U(2) * k]) >> 2) & 1) << np.int32(k)
        ob[l] = np.uint8(m)
    # bits 0-1 of element 128h + 32q + l go to qs[32h + l] bits 2q, 2q + 1
    for h in range(_U(2)):
        for l in range(_U(32)):
            at = stride * (l & _U(15)) + lane0 + _U(8) * h + (l >> _U(4))
            ob[_U(32) + _U(32) * h + l] = np.uint8(
                (np.int32(lv[at]) & 3) | ((np.int32(lv[at + _U(2)]) & 3) << 2)
                | ((np.int32(lv[at + _U(4)]) & 3) << 4) | ((np.int32(lv[at + _U(6)]) & 3) << 6))


@njit(**KERNEL_JIT)
def _encode_blocks_ref(x, out, k0, k1, tb, lv, ls):
    """quantize_row_q3_K_ref on blocks k0..k1 of x into out; tb: REF_TILE_SIZE float32 scratch,
    lv: uint8 of 16 * RLANES, ls: int32 of 16."""
    nb = _U(x.shape[1]) // _QK
    for t0 in range(_U(k0), _U(k1), _U(BLOCKS_PER_REF_TILE)):
        nbt = min(_U(BLOCKS_PER_REF_TILE), _U(k1) - t0)
        _load_ref(x, t0, nbt, tb)
        _make_q3_quants_tile(tb)
        for bt in range(_U(BLOCKS_PER_REF_TILE)):
            lane0 = _16 * bt
            if bt < nbt:
                k = t0 + bt
                oo = (k % nb) * _BB
                ob = out[k // nb, oo:oo + _BB]
                dbits = _quantize_scales_ref(tb, lane0, ls)
                _write_scales(ls, dbits, ob)
                d = fp16_to_f32(dbits)
                for j in range(_16):
                    tb[R_DG + lane0 + j] = d * np.float32(ls[j] - 32)
            else:
                for j in range(_16):
                    tb[R_DG + lane0 + j] = np.float32(0.0)
        _ref_levels(tb, lv)
        for bt in range(nbt):
            k = t0 + bt
            oo = (k % nb) * _BB
            _pack_block(lv, _RL, _16 * bt, out[k // nb, oo:oo + _BB])


# --- imatrix path ------------------------------------------------------------------------------------
#
# Per batch of up to BATCH blocks: (1) every tile's groups searched by make_qx_quants (nmax 4)
# with their weights, keeping each group's scale, inverse scale, max |x| and weight sum; (2) one
# tile search over the batch's blocks, a lane each, of their 16 scales (nmax 32, weighted by the
# sums): ggml's d_block and 6-bit scales; (3) every tile's levels requantized and packed.

# batch scratch rows (bs[row, 16 * block + group])
B_SCALE, B_ISC, B_AMAX, B_SUMW = range(4)
NB_ROWS = 4


@njit(**KERNEL_JIT)
def _load_qx(x, qw, k0, nbt, tb, weights):
    """Lanes 16*bt + j of a q6_k tile = group j of block k0 + bt (bt < nbt; others zero): x at
    T_X and, with ``weights``, qw's columns at T_W (multiplied by the sigma factor later)."""
    zero = np.float32(0.0)
    nb = _U(x.shape[1]) // _QK
    for bt in range(_U(BLOCKS_PER_TILE)):
        k = k0 + bt if bt < nbt else k0  # a missing block reads block k0 (and stores zeros)
        xr = x[k // nb]
        c0 = (k % nb) * _QK
        for j in range(_16):
            g = _16 * bt + j
            for i in range(_16):
                at = T_X + T_STRIDE * i + g
                c = c0 + _16 * j + i
                tb[at] = xr[c] if bt < nbt else zero
                if weights:
                    tb[at + T_W] = qw[c] if bt < nbt else zero


@njit(**KERNEL_JIT)
def _group_weights(tb):
    """T_W = qw * sqrt(sigma2 + x*x) (sigma2 per lane at T_AUX), T_WX = T_W * x, and each
    lane's weight sum, in ggml's order, left at T_AUX."""
    zero = np.float32(0.0)
    for g in range(_L):
        s2 = tb[T_AUX + g]
        sw = zero
        for i in range(_16):
            at = T_X + T_STRIDE * i + g
            v = tb[at]
            w = tb[at + T_W] * np.sqrt(s2 + v * v)
            tb[at + T_W] = w
            tb[at + T_WX] = w * v
            sw += w
        tb[T_AUX + g] = sw


@njit(**KERNEL_JIT)
def _encode_batch_imatrix(x, qw, out, k0, k1, tb, lv, bs, ls, dblk, sig):
    """quantize_row_q3_K_impl on blocks k0..k1 (at most BATCH) of x into out. Scratch: tb a
    q6_k tile, lv uint8 (16 * LANES), bs float32 (NB_ROWS, 16 * BATCH), ls int32 (16 * BATCH),
    dblk uint16 (BATCH), sig float32 (BATCH)."""
    zero = np.float32(0.0)
    nb = _U(x.shape[1]) // _QK
    n = _U(k1) - _U(k0)
    # sigma2 = 2 * sum(x^2) / 256 per block, each sum sequential as ggml's: four blocks' sums as
    # independent scalar chains (a loop over blocks would vectorize into gathers, which are slow)
    for q in range(_U(0), n, _4):
        k = _U(k0) + q
        xa = x[k // nb]
        ca = (k % nb) * _QK
        k = _U(k0) + min(q + _U(1), n - _U(1))  # past the batch: a repeat, not stored
        xb = x[k // nb]
        cb = (k % nb) * _QK
        k = _U(k0) + min(q + _U(2), n - _U(1))
        xc = x[k // nb]
        cc = (k % nb) * _QK
        k = _U(k0) + min(q + _U(3), n - _U(1))
        xd = x[k // nb]
        cd = (k % nb) * _QK
        sa = sb = sc = sd = zero
        for e in range(_QK):
            va = xa[ca + e]
            vb = xb[cb + e]
            vc = xc[cc + e]
            vd = xd[cd + e]
            sa += va * va
            sb += vb * vb
            sc += vc * vc
            sd += vd * vd
        sig[q] = sa
        if q + _U(1) < n:
            sig[q + _U(1)] = sb
        if q + _U(2) < n:
            sig[q + _U(2)] = sc
        if q + _U(3) < n:
            sig[q + _U(3)] = sd
    for kb in range(n):
        sig[kb] = np.true_divide(np.float32(2.0) * sig[kb], np.float32(QK))
    # (1) group searches
    for t in range(_U(0), n, _U(BLOCKS_PER_TILE)):
        nbt = min(_U(BLOCKS_PER_TILE), n - t)
        _load_qx(x, qw, _U(k0) + t, nbt, tb, True)
        for bt in range(_U(BLOCKS_PER_TILE)):
            s2 = sig[t + bt] if bt < nbt else zero
            for j in range(_16):
                tb[T_AUX + _16 * bt + j] = s2
        _group_weights(tb)
        make_qx_quants_tile(tb, 4)
        for gl in range(_16 * nbt):
            at = _16 * t + gl
            bs[B_SCALE, at] = tb[T_SCALE + gl]
            bs[B_ISC, at] = tb[T_ISC + gl]
            bs[B_AMAX, at] = tb[T_AMAX + gl]
            bs[B_SUMW, at] = tb[T_AUX + gl]
    # (2) each block's 16 scales, one lane per block
    for kb in range(_L):
        for j in range(_16):
            at = T_X + T_STRIDE * j + kb
            s = bs[B_SCALE, _16 * kb + j] if kb < n else zero
            w = bs[B_SUMW, _16 * kb + j] if kb < n else zero
            tb[at] = s
            tb[at + T_W] = w
            tb[at + T_WX] = w * s
    make_qx_quants_tile(tb, 32)
    for kb in range(n):
        small = tb[T_AMAX + kb] < GROUP_MAX_EPS
        isc = tb[T_ISC + kb]
        for j in range(_16):
            l = min(np.int32(31), max(np.int32(-32), nint(isc * tb[T_X + T_STRIDE * j + kb]))) + np.int32(32)
            ls[_16 * kb + j] = np.int32(0) if small else l
        dblk[kb] = fp16_bits(tb[T_SCALE + kb])
    # (3) levels and output
    for t in range(_U(0), n, _U(BLOCKS_PER_TILE)):
        nbt = min(_U(BLOCKS_PER_TILE), n - t)
        _load_qx(x, qw, _U(k0) + t, nbt, tb, False)
        for bt in range(_U(BLOCKS_PER_TILE)):
            kb = t + bt
            for j in range(_16):
                g = _16 * bt + j
                if bt < nbt:
                    at = _16 * kb + j
                    tb[T_ISC + g] = bs[B_ISC, at]
                    tb[T_AMAX + g] = bs[B_AMAX, at]
                    tb[T_DG + g] = fp16_to_f32(dblk[kb]) * np.float32(ls[at] - 32)
                else:
                    tb[T_DG + g] = zero
        tile_levels(tb, 4, 4, lv)
        for bt in range(nbt):
            kb = t + bt
            k = _U(k0) + kb
            oo = (k % nb) * _BB
            ob = out[k // nb, oo:oo + _BB]
            _write_scales(ls[_16 * kb:_16 * kb + _16], dblk[kb], ob)
            _pack_block(lv, _L, _16 * bt, ob)


# --- entry points ------------------------------------------------------------------------------------

@njit(**KERNEL_JIT)
def _n_blocks(x):
    return x.shape[0] * (x.shape[1] // QK)


@njit(**KERNEL_JIT)
def _task_ref(x, out, k0, k1):
    _encode_blocks_ref(x, out, k0, k1, np.zeros(REF_TILE_SIZE, np.float32), np.empty(16 * RLANES, np.uint8),
                       np.empty(16, np.int32))


@njit(**KERNEL_JIT)
def _task_imatrix(x, qw, out, k0, k1):
    _encode_batch_imatrix(x, qw, out, k0, k1, new_tile(), np.empty(16 * LANES, np.uint8),
                          np.empty((NB_ROWS, 16 * BATCH), np.float32), np.empty(16 * BATCH, np.int32),
                          np.empty(BATCH, np.uint16), np.empty(BATCH, np.float32))


@njit(**KERNEL_JIT)
def encode_rows(x, qw, out):
    """Every row of x (rows, n) into out (rows, row_bytes), serially: quantize_row_q3_K_ref when
    qw is empty, else quantize_row_q3_K_impl with qw as the per-column importance weights."""
    total = _n_blocks(x)
    if qw.shape[0] == 0:
        _task_ref(x, out, 0, total)
    else:
        for k0 in range(0, total, BATCH):
            _task_imatrix(x, qw, out, k0, min(total, k0 + BATCH))


# Written out per type, not made by a factory: numba caches no closures (see config.py).
@njit(**PARALLEL_KERNEL_JIT)
def quantize_rows(x, out):
    """quantize_row_q3_K_ref on every row."""
    total = _n_blocks(x)
    for t in prange((total + BLOCKS_PER_TASK - 1) // BLOCKS_PER_TASK):
        k0 = t * BLOCKS_PER_TASK
        _task_ref(x, out, k0, min(total, k0 + BLOCKS_PER_TASK))


@njit(**PARALLEL_KERNEL_JIT)
def quantize_rows_imatrix(x, qw, out):
    """quantize_row_q3_K_impl on every row (qw: one importance weight per column)."""
    total = _n_blocks(x)
    for t in prange((total + BATCH - 1) // BATCH):
        k0 = t * BATCH
        _task_imatrix(x, qw, out, k0, min(total, k0 + BATCH))


@njit(**PARALLEL_KERNEL_JIT)
def quantize_codes(codes, kind, table, qw, limit, out, flags):
    """Raw source codes (rows, n) -> out, one parallel region: see _source.py."""
    rows, n = codes.shape
    rpc = rows_per_chunk(n)
    for c in prange(n_chunks(rows, n)):
        r0 = c * rpc
        r1 = min(rows, r0 + rpc)
        x = np.empty((r1 - r0) * n, np.float32)
        f = load_rows(codes, kind, table, r0, r1, x, limit)
        if f == 0:
            encode_rows(x.reshape(r1 - r0, n), qw, out[r0:r1])
            f = scales_bad(out, r0, r1, BLOCK_BYTES, SCALE_OFF0, SCALE_OFF1)
        flags[c] = f


@njit(**JIT_OPTIONS)
def _decode_block(ob, y):
    d = fp16_to_f32(np.int32(ob[108]) | (np.int32(ob[109]) << 8))
    for e in range(QK):
        j = e // 16
        if j < 8:
            low = np.int32(ob[96 + j]) & 15
        else:
            low = np.int32(ob[96 + j - 8]) >> 4
        sc = (low | (((np.int32(ob[104 + j % 4]) >> (2 * (j // 4))) & 3) << 4)) - 32
        q = (np.int32(ob[32 + 32 * (e // 128) + e % 32]) >> (2 * ((e % 128) // 32))) & 3
        if (np.int32(ob[e % 32]) >> (e // 32)) & 1 == 0:
            q -= 4
        y[e] = (d * np.float32(sc)) * np.float32(q)


@njit(**PARALLEL_JIT_OPTIONS)
def dequantize_rows(data, out):
    """dequantize_row_q3_K: (d * (scale - 32)) * q with q in [-4, 3]."""
    rows, n = out.shape
    nb = n // QK
    for r in prange(rows):
        for b in range(nb):
            _decode_block(data[r, b * BLOCK_BYTES:(b + 1) * BLOCK_BYTES], out[r, b * QK:(b + 1) * QK])
