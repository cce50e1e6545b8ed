"""Q2_K: 256-weight blocks of 16 groups, 2-bit levels with 4-bit scales and mins (84 bytes)."""
from __future__ import annotations

import numpy as np
from numba import njit, prange

from ._numeric import fp16_bits, fp16_to_f32, nint
from ._qkx import KERNEL_JIT, PARALLEL_KERNEL_JIT, make_qkx2_quants, make_qp_quants

F32 = np.float32
QK = 256
BLOCK_BYTES = 84


@njit(**KERNEL_JIT)
def _finish_block(x, xo, out, oo, L, scales_b, d, dmin):
    """Requantize with the stored scales (groups whose scale is 0 keep the search levels), pack."""
    out[oo + 80] = d & 255
    out[oo + 81] = d >> 8
    out[oo + 82] = dmin & 255
    out[oo + 83] = dmin >> 8
    df = fp16_to_f32(d)
    mf = fp16_to_f32(dmin)
    for j in range(16):
        sc = scales_b[j]
        out[oo + j] = sc
        dj = df * F32(sc & 15)
        if dj == F32(0.0):
            continue
        dm = mf * F32(sc >> 4)
        for ii in range(16):
            l = nint((x[xo + 16 * j + ii] + dm) / dj)
            L[xo + 16 * j + ii] = max(np.int32(0), min(np.int32(3), l))
    for h in range(2):
        for l in range(32):
            b = xo + 128 * h + l
            out[oo + 16 + 32 * h + l] = L[b] | (L[b + 32] << 2) | (L[b + 64] << 4) | (L[b + 96] << 6)


@njit(**KERNEL_JIT)
def _quantize_row(x, out, L, laux, w, scales, mins, sc_b):
    nb = x.shape[0] // QK
    for i in range(nb):
        xo = QK * i
        for l in range(QK):
            w[xo + l] = abs(x[xo + l])
        max_scale = F32(0.0)
        max_min = F32(0.0)
        for j in range(16):
            s, m = make_qkx2_quants(x, w, xo + 16 * j, 16, 3, F32(-0.5), F32(0.1), 15, True,
                                    L, laux)
            scales[j] = s
            mins[j] = m
            if s > max_scale:
                max_scale = s
            if m > max_min:
                max_min = m
        if max_scale > F32(0.0):
            iscale = F32(15.0) / max_scale
            for j in range(16):
                sc_b[j] = nint(iscale * scales[j]) & 255
            d = fp16_bits(max_scale / F32(15.0))
        else:
            for j in range(16):
                sc_b[j] = 0
            d = fp16_bits(F32(0.0))
        if max_min > F32(0.0):
            iscale = F32(15.0) / max_min
            for j in range(16):
                sc_b[j] = (sc_b[j] | (nint(iscale * mins[j]) << 4)) & 255
            dmin = fp16_bits(max_min / F32(15.0))
        else:
            dmin = fp16_bits(F32(0.0))
        _finish_block(x, xo, out, BLOCK_BYTES * i, L, sc_b, np.int32(d), np.int32(dmin))


@njit(**PARALLEL_KERNEL_JIT)
def quantize_rows(x, out):
    """ggml quantize_row_q2_K_ref on every row."""
    rows, n = x.shape
    for r in prange(rows):
        L = np.zeros(n, np.uint8)
        laux = np.zeros(16, np.uint8)
        w = np.empty(n, np.float32)
        scales = np.empty(16, np.float32)
        mins = np.empty(16, np.float32)
        sc_b = np.empty(16, np.int32)
        _quantize_row(x[r], out[r], L, laux, w, scales, mins, sc_b)


@njit(**KERNEL_JIT)
def _quantize_row_imatrix(x, qw, out, L, laux, w, scales, mins, sw, Ls, Lm, sc_b):
    nb = x.shape[0] // QK
    for i in range(nb):
        xo = QK * i
        sumx2 = F32(0.0)
        for j in range(QK):
            sumx2 += x[xo + j] * x[xo + j]
        sigma2 = sumx2 / F32(QK)
        for j in range(16):
            go = xo + 16 * j
            acc = F32(0.0)
            for l in range(16):
                wl = qw[go + l] * np.sqrt(sigma2 + x[go + l] * x[go + l])
                w[go + l] = wl
                acc += wl
            sw[j] = acc
            s, m = make_qkx2_quants(x, w, go, 16, 3, F32(-0.9), F32(0.05), 36, False,
                                    L, laux)
            scales[j] = s
            mins[j] = m
        dm = make_qp_quants(16, 15, scales, Ls, sw)
        mm = make_qp_quants(16, 15, mins, Lm, sw)
        for j in range(16):
            sc_b[j] = (np.int32(Ls[j]) | (np.int32(Lm[j]) << 4)) & 255
        _finish_block(x, xo, out, BLOCK_BYTES * i, L, sc_b,
                      np.int32(fp16_bits(dm)), np.int32(fp16_bits(mm)))


@njit(**PARALLEL_KERNEL_JIT)
def quantize_rows_imatrix(x, qw, out):
    """ggml quantize_q2_K with importance weights (quantize_row_q2_K_impl) on every row."""
    rows, n = x.shape
    for r in prange(rows):
        L = np.zeros(n, np.uint8)
        laux = np.zeros(16, np.uint8)
        w = np.empty(n, np.float32)
        scales = np.empty(16, np.float32)
        mins = np.empty(16, np.float32)
        sw = np.empty(16, np.float32)
        Ls = np.empty(16, np.uint8)
        Lm = np.empty(16, np.uint8)
        sc_b = np.empty(16, np.int32)
        _quantize_row_imatrix(x[r], qw, out[r], L, laux, w, scales, mins, sw, Ls, Lm, sc_b)


@njit(**PARALLEL_KERNEL_JIT)
def dequantize_rows(data, out):
    """ggml dequantize_row_q2_K: y = (d*sc)*q - dmin*m."""
    rows, n = out.shape
    nb = n // QK
    for r in prange(rows):
        for i in range(nb):
            bo = BLOCK_BYTES * i
            d = fp16_to_f32(np.int32(data[r, bo + 80]) | (np.int32(data[r, bo + 81]) << 8))
            dmin = fp16_to_f32(np.int32(data[r, bo + 82]) | (np.int32(data[r, bo + 83]) << 8))
            for j in range(16):
                sc = np.int32(data[r, bo + j])
                dl = d * F32(sc & 15)
                ml = dmin * F32(sc >> 4)
                h = j // 8
                shift = 2 * ((j % 8) // 2)
                q0 = bo + 16 + 32 * h + 16 * (j % 2)
                y0 = QK * i + 16 * j
                for l in range(16):
                    q = (np.int32(data[r, q0 + l]) >> shift) & 3
                    out[r, y0 + l] = dl * F32(q) - ml
