"""Q2_K: 256-weight blocks of 16 groups, 2-bit levels with 4-bit scales and mins (84 bytes).

A block's 16 groups are exactly one search tile (see _qkx), so rows are processed block by block.
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
GROUP = 16
BLOCK_BYTES = 84
assert QK // GROUP == LANES


@njit(**KERNEL_JIT)
def _finish_block(x, xo, out, oo, st, sc_b, d, dmin, L):
    """Store scales, d, dmin; requantize each group with its stored scale (groups whose scale is
    0 keep the search's levels, as in ggml); pack the 2-bit levels."""
    out[oo + 80] = d & 255
    out[oo + 81] = d >> 8
    out[oo + 82] = dmin & 255
    out[oo + 83] = dmin >> 8
    df = fp16_to_f32(d)
    mf = fp16_to_f32(dmin)
    for j in range(16):
        sc = sc_b[j]
        out[oo + j] = sc
        dj = df * F32(sc & 15)
        if dj == F32(0.0):
            search_levels(x, xo + GROUP * j, GROUP, 3, st[ST_LISC, j], st[ST_LMIN, j], L, GROUP * j)
            continue
        dm = mf * F32(sc >> 4)
        for ii in range(GROUP):
            l = nint((x[xo + GROUP * j + ii] + dm) / dj)
            L[GROUP * j + ii] = max(np.int32(0), min(np.int32(3), l))
    for h in range(2):
        for l in range(32):
            b = 128 * h + l
            out[oo + 16 + 32 * h + l] = L[b] | (L[b + 32] << 2) | (L[b + 64] << 4) | (L[b + 96] << 6)


@njit(**KERNEL_JIT)
def _quantize_row(x, out):
    xt, wt, st = new_tile(GROUP)
    L = np.zeros(QK, np.uint8)
    sc_b = np.zeros(16, np.int32)
    for i in range(x.shape[0] // QK):
        load_tile(x, LANES * i, GROUP, xt)
        for l in range(GROUP):
            for g in range(LANES):
                wt[l, g] = abs(xt[l, g])
        search_tile(xt, wt, GROUP, 3, F32(-0.5), F32(0.1), 15, True, st)
        scales, mins = st[ST_SCALE], st[ST_MIN]
        max_scale = F32(0.0)
        max_min = F32(0.0)
        for j in range(16):
            if scales[j] > max_scale:
                max_scale = scales[j]
            if mins[j] > max_min:
                max_min = mins[j]
        for j in range(16):
            sc_b[j] = 0
        d = np.int32(0)
        dmin = np.int32(0)
        if max_scale > F32(0.0):
            iscale = F32(15.0) / max_scale
            for j in range(16):
                sc_b[j] = nint(iscale * scales[j]) & 255
            d = np.int32(fp16_bits(max_scale / F32(15.0)))
        if max_min > F32(0.0):
            iscale = F32(15.0) / max_min
            for j in range(16):
                sc_b[j] = (sc_b[j] | (nint(iscale * mins[j]) << 4)) & 255
            dmin = np.int32(fp16_bits(max_min / F32(15.0)))
        _finish_block(x, QK * i, out, BLOCK_BYTES * i, st, sc_b, d, dmin, L)


@njit(**PARALLEL_KERNEL_JIT)
def quantize_rows(x, out):
    """ggml quantize_row_q2_K_ref on every row."""
    for r in prange(x.shape[0]):
        _quantize_row(x[r], out[r])


@njit(**KERNEL_JIT)
def _quantize_row_imatrix(x, qw, out):
    xt, wt, st = new_tile(GROUP)
    L = np.zeros(QK, np.uint8)
    sc_b = np.zeros(16, np.int32)
    Ls = np.zeros(16, np.uint8)
    Lm = np.zeros(16, np.uint8)
    sw = st[ST_AUX]
    for i in range(x.shape[0] // QK):
        xo = QK * i
        sumx2 = F32(0.0)
        for l in range(QK):
            sumx2 += x[xo + l] * x[xo + l]
        sigma2 = sumx2 / F32(QK)
        load_tile(x, LANES * i, GROUP, xt)
        for g in range(LANES):
            sw[g] = F32(0.0)
        for l in range(GROUP):
            for g in range(LANES):
                w = qw[xo + GROUP * g + l] * np.sqrt(sigma2 + xt[l, g] * xt[l, g])
                wt[l, g] = w
                sw[g] += w
        search_tile(xt, wt, GROUP, 3, F32(-0.9), F32(0.05), 36, False, st)
        dm = make_qp_quants(16, 15, st[ST_SCALE], Ls, sw)
        mm = make_qp_quants(16, 15, st[ST_MIN], Lm, sw)
        for j in range(16):
            sc_b[j] = (np.int32(Ls[j]) | (np.int32(Lm[j]) << 4)) & 255
        _finish_block(x, xo, out, BLOCK_BYTES * i, st, sc_b,
                      np.int32(fp16_bits(dm)), np.int32(fp16_bits(mm)), L)


@njit(**PARALLEL_KERNEL_JIT)
def quantize_rows_imatrix(x, qw, out):
    """ggml quantize_q2_K with importance weights (quantize_row_q2_K_impl) on every row."""
    for r in prange(x.shape[0]):
        _quantize_row_imatrix(x[r], qw, out[r])


@njit(**PARALLEL_KERNEL_JIT)
def dequantize_rows(data, out):
    """ggml dequantize_row_q2_K: y = (d*sc)*q - dmin*m."""
    rows, n = out.shape
    for r in prange(rows):
        for i in range(n // QK):
            bo = BLOCK_BYTES * i
            d = fp16_to_f32(np.int32(data[r, bo + 80]) | (np.int32(data[r, bo + 81]) << 8))
            dmin = fp16_to_f32(np.int32(data[r, bo + 82]) | (np.int32(data[r, bo + 83]) << 8))
            for j in range(16):
                sc = np.int32(data[r, bo + j])
                dl = d * F32(sc & 15)
                ml = dmin * F32(sc >> 4)
                q0 = bo + 16 + 32 * (j // 8) + 16 * (j % 2)
                shift = 2 * ((j % 8) // 2)
                y0 = QK * i + GROUP * j
                for l in range(GROUP):
                    q = (np.int32(data[r, q0 + l]) >> shift) & 3
                    out[r, y0 + l] = dl * F32(q) - ml
