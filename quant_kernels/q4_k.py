"""Q4_K: 256-weight blocks of 8 groups of 32, 4-bit levels with 6-bit scales and mins (144 bytes).

Q5_K differs only in its level range, search parameters and level packing, so the row search
and block helpers here take ``nmax`` and are shared with q5_k. A row's groups are searched a
tile (two blocks) at a time first; blocks are then finished one by one.
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange

from ._numeric import fp16_bits, fp16_to_f32, nint
from ._qkx import (
    KERNEL_JIT, LANES, PARALLEL_KERNEL_JIT, ST_AUX, ST_LISC, ST_LMIN, ST_MIN, ST_SCALE,
    load_tile, make_qp_quants, new_tile, search_levels, search_tile,
)

F32 = np.float32
QK = 256
GROUP = 32
BLOCK_BYTES = 144
# Rows of the per-row search results (one column per group).
RES_SCALE, RES_MIN, RES_LISC, RES_LMIN, RES_SW = range(5)
N_RES = 5


@njit(**KERNEL_JIT)
def _store_tile(st, first_group, res):
    for g in range(LANES):
        gi = first_group + g
        if gi < res.shape[1]:
            res[RES_SCALE, gi] = st[ST_SCALE, g]
            res[RES_MIN, gi] = st[ST_MIN, g]
            res[RES_LISC, gi] = st[ST_LISC, g]
            res[RES_LMIN, gi] = st[ST_LMIN, g]


@njit(**KERNEL_JIT)
def search_row_ref(x, nmax, rmin, rdelta, nstep, res):
    """make_qkx2_quants on every group of the row with ggml's reference weights av_x + |x|."""
    xt, wt, st = new_tile(GROUP)
    av = st[ST_AUX]
    for t in range(0, res.shape[1], LANES):
        load_tile(x, t, GROUP, xt)
        for g in range(LANES):
            av[g] = F32(0.0)
        for i in range(GROUP):
            for g in range(LANES):
                av[g] += xt[i, g] * xt[i, g]
        for g in range(LANES):
            av[g] = np.sqrt(av[g] / F32(GROUP))
        for i in range(GROUP):
            for g in range(LANES):
                wt[i, g] = av[g] + abs(xt[i, g])
        search_tile(xt, wt, GROUP, nmax, rmin, rdelta, nstep, False, st)
        _store_tile(st, t, res)


@njit(**KERNEL_JIT)
def search_row_imatrix(x, qw, nmax, res):
    """make_qkx3_quants on every group with weights qw*sqrt(sigma2 + x^2), sigma2 = 2*mean(x^2)
    over the block; also the per-group weight sums into res[RES_SW]."""
    xt, wt, st = new_tile(GROUP)
    sigma2 = st[ST_AUX]
    per_block = QK // GROUP
    n_groups = res.shape[1]
    for t in range(0, n_groups, LANES):
        load_tile(x, t, GROUP, xt)
        for b in range(t // per_block, min(n_groups, t + LANES) // per_block):
            sum_x2 = F32(0.0)
            for l in range(QK):
                sum_x2 += x[QK * b + l] * x[QK * b + l]
            s2 = F32(2.0) * sum_x2 / F32(QK)
            for g in range(per_block * b - t, per_block * (b + 1) - t):
                sigma2[g] = s2
        for g in range(LANES):
            gi = t + g
            if gi >= n_groups:
                sigma2[g] = F32(0.0)
                for i in range(GROUP):
                    wt[i, g] = F32(0.0)
                continue
            sumw = F32(0.0)
            for i in range(GROUP):
                w = qw[GROUP * gi + i] * np.sqrt(sigma2[g] + xt[i, g] * xt[i, g])
                wt[i, g] = w
                sumw += w
            res[RES_SW, gi] = sumw
        search_tile(xt, wt, GROUP, nmax, F32(-0.9), F32(0.05), 36, False, st)
        _store_tile(st, t, res)


@njit(**KERNEL_JIT)
def pack_scales_mins(ls, lm, out, so):
    """Eight 6-bit scales and mins into 12 bytes at out[so:] (values above 63 wrap as in C)."""
    for j in range(8):
        a = np.int32(ls[j])
        b = np.int32(lm[j])
        if j < 4:
            out[so + j] = a & 255
            out[so + j + 4] = b & 255
        else:
            out[so + j + 4] = ((a & 15) | ((b & 15) << 4)) & 255
            out[so + j - 4] = (np.int32(out[so + j - 4]) | ((a >> 4) << 6)) & 255
            out[so + j] = (np.int32(out[so + j]) | ((b >> 4) << 6)) & 255


@njit(inline="always", **KERNEL_JIT)
def scale_min_k4(j, q, so):
    """ggml get_scale_min_k4: the 6-bit scale and min of group j from the 12 bytes at q[so:]."""
    if j < 4:
        sc = np.int32(q[so + j]) & 63
        m = np.int32(q[so + j + 4]) & 63
    else:
        sc = (np.int32(q[so + j + 4]) & 15) | ((np.int32(q[so + j - 4]) >> 6) << 4)
        m = (np.int32(q[so + j + 4]) >> 4) | ((np.int32(q[so + j]) >> 6) << 4)
    return sc, m


@njit(**KERNEL_JIT)
def _store_d_dmin(out, oo, d, dmin):
    hd = np.int32(fp16_bits(d))
    hm = np.int32(fp16_bits(dmin))
    out[oo] = hd & 255
    out[oo + 1] = hd >> 8
    out[oo + 2] = hm & 255
    out[oo + 3] = hm >> 8


@njit(**KERNEL_JIT)
def _requantize_block(x, xo, out, oo, nmax, res, j0, L):
    """Levels from the stored d, dmin and 6-bit scales; groups whose d*sc is 0 keep the
    search's levels, as in ggml."""
    d = fp16_to_f32(np.int32(out[oo]) | (np.int32(out[oo + 1]) << 8))
    dmin = fp16_to_f32(np.int32(out[oo + 2]) | (np.int32(out[oo + 3]) << 8))
    for j in range(8):
        sc, m = scale_min_k4(j, out, oo + 4)
        dj = d * F32(sc)
        if dj == F32(0.0):
            search_levels(x, xo + GROUP * j, GROUP, nmax, res[RES_LISC, j0 + j], res[RES_LMIN, j0 + j],
                          L, GROUP * j)
            continue
        dm = dmin * F32(m)
        for ii in range(GROUP):
            l = nint((x[xo + GROUP * j + ii] + dm) / dj)
            L[GROUP * j + ii] = max(np.int32(0), min(np.int32(nmax), l))


@njit(**KERNEL_JIT)
def ref_block(x, xo, nmax, res, j0, ls, lm, L, out, oo):
    """quantize_row_q{4,5}_K_ref for block at x[xo:] after the search: 6-bit scales and mins
    (with C's uint8 truncation), d and dmin, requantized levels into L (packing is the caller's)."""
    max_scale = F32(0.0)
    max_min = F32(0.0)
    for j in range(8):
        if res[RES_SCALE, j0 + j] > max_scale:
            max_scale = res[RES_SCALE, j0 + j]
        if res[RES_MIN, j0 + j] > max_min:
            max_min = res[RES_MIN, j0 + j]
    inv_scale = F32(63.0) / max_scale if max_scale > F32(0.0) else F32(0.0)
    inv_min = F32(63.0) / max_min if max_min > F32(0.0) else F32(0.0)
    for j in range(8):
        ls[j] = min(63, nint(inv_scale * res[RES_SCALE, j0 + j]) & 255)
        lm[j] = min(63, nint(inv_min * res[RES_MIN, j0 + j]) & 255)
    pack_scales_mins(ls, lm, out, oo + 4)
    _store_d_dmin(out, oo, max_scale / F32(63.0), max_min / F32(63.0))
    _requantize_block(x, xo, out, oo, nmax, res, j0, L)


@njit(**KERNEL_JIT)
def imatrix_block(x, xo, nmax, clamp63, res, j0, ls, lm, L, out, oo):
    """quantize_row_q{4,5}_K_impl for one block after the search: scales and mins quantized
    by make_qp_quants (Q5_K clamps them to 63, Q4_K does not), d, dmin, requantized levels."""
    d_block = make_qp_quants(8, 63, res[RES_SCALE, j0:j0 + 8], ls, res[RES_SW, j0:j0 + 8])
    m_block = make_qp_quants(8, 63, res[RES_MIN, j0:j0 + 8], lm, res[RES_SW, j0:j0 + 8])
    if clamp63:
        for j in range(8):
            ls[j] = min(np.uint8(63), ls[j])
            lm[j] = min(np.uint8(63), lm[j])
    pack_scales_mins(ls, lm, out, oo + 4)
    _store_d_dmin(out, oo, d_block, m_block)
    _requantize_block(x, xo, out, oo, nmax, res, j0, L)


@njit(**KERNEL_JIT)
def _pack_q4(L, out, oo):
    for c in range(4):
        for l in range(32):
            out[oo + 16 + 32 * c + l] = L[64 * c + l] | (L[64 * c + 32 + l] << 4)


@njit(**KERNEL_JIT)
def _quantize_row(x, qw, use_imatrix, out):
    n_blocks = x.shape[0] // QK
    res = np.zeros((N_RES, n_blocks * (QK // GROUP)), np.float32)
    if use_imatrix:
        search_row_imatrix(x, qw, 15, res)
    else:
        search_row_ref(x, 15, F32(-1.0), F32(0.1), 20, res)
    L = np.zeros(QK, np.uint8)
    ls = np.zeros(8, np.uint8)
    lm = np.zeros(8, np.uint8)
    for i in range(n_blocks):
        if use_imatrix:
            imatrix_block(x, QK * i, 15, False, res, 8 * i, ls, lm, L, out, BLOCK_BYTES * i)
        else:
            ref_block(x, QK * i, 15, res, 8 * i, ls, lm, L, out, BLOCK_BYTES * i)
        _pack_q4(L, out, BLOCK_BYTES * i)


@njit(**PARALLEL_KERNEL_JIT)
def quantize_rows(x, out):
    """ggml quantize_row_q4_K_ref on every row."""
    qw = np.zeros(0, np.float32)
    for r in prange(x.shape[0]):
        _quantize_row(x[r], qw, False, out[r])


@njit(**PARALLEL_KERNEL_JIT)
def quantize_rows_imatrix(x, qw, out):
    """ggml quantize_q4_K with importance weights (quantize_row_q4_K_impl) on every row."""
    for r in prange(x.shape[0]):
        _quantize_row(x[r], qw, True, out[r])


@njit(**PARALLEL_KERNEL_JIT)
def dequantize_rows(data, out):
    """ggml dequantize_row_q4_K: y = (d*sc)*q - dmin*m."""
    rows, n = out.shape
    for r in prange(rows):
        for i in range(n // QK):
            bo = BLOCK_BYTES * i
            d = fp16_to_f32(np.int32(data[r, bo]) | (np.int32(data[r, bo + 1]) << 8))
            dmin = fp16_to_f32(np.int32(data[r, bo + 2]) | (np.int32(data[r, bo + 3]) << 8))
            for j in range(8):
                sc, m = scale_min_k4(j, data[r], bo + 4)
                dl = d * F32(sc)
                ml = dmin * F32(m)
                q0 = bo + 16 + 32 * (j // 2)
                shift = 4 * (j % 2)
                y0 = QK * i + GROUP * j
                for l in range(GROUP):
                    q = (np.int32(data[r, q0 + l]) >> shift) & 15
                    out[r, y0 + l] = dl * F32(q) - ml
