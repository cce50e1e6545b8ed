"""Q4_K: 256-weight blocks of 8 groups of 32, 4-bit levels with 6-bit scales and mins (144 bytes).

Q5_K shares everything but the level range and the packing of levels, so the block helpers here
take ``nmax`` and are imported by q5_k.
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange

from ._numeric import fp16_bits, fp16_to_f32, nint
from ._qkx import KERNEL_JIT, PARALLEL_KERNEL_JIT, make_qkx2_quants, make_qp_quants

F32 = np.float32
QK = 256
BLOCK_BYTES = 144


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
def requantize_block(x, xo, out, oo, nmax, L):
    """Levels from the stored d, dmin and 6-bit scales; groups whose d*sc is 0 keep L."""
    d = fp16_to_f32(np.int32(out[oo]) | (np.int32(out[oo + 1]) << 8))
    dmin = fp16_to_f32(np.int32(out[oo + 2]) | (np.int32(out[oo + 3]) << 8))
    for j in range(8):
        sc, m = scale_min_k4(j, out, oo + 4)
        dj = d * F32(sc)
        if dj == F32(0.0):
            continue
        dm = dmin * F32(m)
        for ii in range(32):
            l = nint((x[xo + 32 * j + ii] + dm) / dj)
            L[xo + 32 * j + ii] = max(np.int32(0), min(np.int32(nmax), l))


@njit(**KERNEL_JIT)
def store_d_dmin(out, oo, d, dmin):
    """fp16 d and dmin into bytes 0..3 of the block."""
    hd = np.int32(fp16_bits(d))
    hm = np.int32(fp16_bits(dmin))
    out[oo] = hd & 255
    out[oo + 1] = hd >> 8
    out[oo + 2] = hm & 255
    out[oo + 3] = hm >> 8


@njit(**KERNEL_JIT)
def ref_block_scales(x, xo, w, nmax, rmin, rdelta, nstep, L, laux, scales, mins, ls, lm, out, oo):
    """quantize_row_q{4,5}_K_ref up to the level packing: group searches, 6-bit scales, d/dmin, requantize."""
    max_scale = F32(0.0)
    max_min = F32(0.0)
    for j in range(8):
        go = xo + 32 * j
        sum_x2 = F32(0.0)
        for l in range(32):
            sum_x2 += x[go + l] * x[go + l]
        av_x = np.sqrt(sum_x2 / F32(32.0))
        for l in range(32):
            w[go + l] = av_x + abs(x[go + l])
        s, m = make_qkx2_quants(x, w, go, 32, nmax, rmin, rdelta, nstep, False, L, laux)
        scales[j] = s
        mins[j] = m
        if s > max_scale:
            max_scale = s
        if m > max_min:
            max_min = m
    inv_scale = F32(63.0) / max_scale if max_scale > F32(0.0) else F32(0.0)
    inv_min = F32(63.0) / max_min if max_min > F32(0.0) else F32(0.0)
    for j in range(8):
        ls[j] = min(63, nint(inv_scale * scales[j]) & 255)
        lm[j] = min(63, nint(inv_min * mins[j]) & 255)
    pack_scales_mins(ls, lm, out, oo + 4)
    store_d_dmin(out, oo, max_scale / F32(63.0), max_min / F32(63.0))
    requantize_block(x, xo, out, oo, nmax, L)


@njit(**KERNEL_JIT)
def imatrix_block_scales(x, xo, qw, w, nmax, clamp63, L, laux, scales, mins, sw, ls, lm, out, oo):
    """quantize_row_q{4,5}_K_impl up to the level packing (qkx3 searches, qp-quantized scales)."""
    sum_x2 = F32(0.0)
    for l in range(QK):
        sum_x2 += x[xo + l] * x[xo + l]
    sigma2 = F32(2.0) * sum_x2 / F32(QK)
    for j in range(8):
        go = xo + 32 * j
        sumw = F32(0.0)
        for l in range(32):
            wl = qw[go + l] * np.sqrt(sigma2 + x[go + l] * x[go + l])
            w[go + l] = wl
            sumw += wl
        sw[j] = sumw
        s, m = make_qkx2_quants(x, w, go, 32, nmax, F32(-0.9), F32(0.05), 36, False, L, laux)
        scales[j] = s
        mins[j] = m
    d_block = make_qp_quants(8, 63, scales, ls, sw)
    m_block = make_qp_quants(8, 63, mins, lm, sw)
    if clamp63:  # Q5_K clamps the qp levels to 63, Q4_K does not
        for j in range(8):
            ls[j] = min(np.uint8(63), ls[j])
            lm[j] = min(np.uint8(63), lm[j])
    pack_scales_mins(ls, lm, out, oo + 4)
    store_d_dmin(out, oo, d_block, m_block)
    requantize_block(x, xo, out, oo, nmax, L)


@njit(**KERNEL_JIT)
def _pack_q4(L, xo, out, oo):
    for c in range(4):
        for l in range(32):
            out[oo + 16 + 32 * c + l] = L[xo + 64 * c + l] | (L[xo + 64 * c + 32 + l] << 4)


@njit(**PARALLEL_KERNEL_JIT)
def quantize_rows(x, out):
    """ggml quantize_row_q4_K_ref on every row."""
    rows, n = x.shape
    for r in prange(rows):
        L = np.zeros(n, np.uint8)
        laux = np.zeros(32, np.uint8)
        w = np.empty(n, np.float32)
        scales = np.empty(8, np.float32)
        mins = np.empty(8, np.float32)
        ls = np.empty(8, np.uint8)
        lm = np.empty(8, np.uint8)
        xr = x[r]
        orow = out[r]
        for i in range(n // QK):
            ref_block_scales(xr, QK * i, w, 15, F32(-1.0), F32(0.1), 20, L, laux, scales, mins, ls, lm,
                             orow, BLOCK_BYTES * i)
            _pack_q4(L, QK * i, orow, BLOCK_BYTES * i)


@njit(**PARALLEL_KERNEL_JIT)
def quantize_rows_imatrix(x, qw, out):
    """ggml quantize_q4_K with importance weights (quantize_row_q4_K_impl) on every row."""
    rows, n = x.shape
    for r in prange(rows):
        L = np.zeros(n, np.uint8)
        laux = np.zeros(32, np.uint8)
        w = np.empty(n, np.float32)
        scales = np.empty(8, np.float32)
        mins = np.empty(8, np.float32)
        sw = np.empty(8, np.float32)
        ls = np.empty(8, np.uint8)
        lm = np.empty(8, np.uint8)
        xr = x[r]
        orow = out[r]
        for i in range(n // QK):
            imatrix_block_scales(xr, QK * i, qw, w, 15, False, L, laux, scales, mins, sw, ls, lm,
                                 orow, BLOCK_BYTES * i)
            _pack_q4(L, QK * i, orow, BLOCK_BYTES * i)


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
                y0 = QK * i + 32 * j
                for l in range(32):
                    q = (np.int32(data[r, q0 + l]) >> shift) & 15
                    out[r, y0 + l] = dl * F32(q) - ml
