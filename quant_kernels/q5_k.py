"""Q5_K: Q4_K's blocks with 5-bit levels: the fifth bit of each level lives in qh (176 bytes)."""
from __future__ import annotations

import numpy as np
from numba import njit, prange

from ._numeric import fp16_to_f32
from ._qkx import KERNEL_JIT, PARALLEL_KERNEL_JIT
from .q4_k import imatrix_block_scales, ref_block_scales, scale_min_k4

F32 = np.float32
QK = 256
BLOCK_BYTES = 176


@njit(**KERNEL_JIT)
def _pack_q5(L, xo, out, oo):
    for l in range(32):
        out[oo + 16 + l] = 0
    for c in range(4):
        for l in range(32):
            l1 = np.int32(L[xo + 64 * c + l])
            l2 = np.int32(L[xo + 64 * c + 32 + l])
            h = np.int32(out[oo + 16 + l])
            if l1 > 15:
                l1 -= 16
                h |= 1 << (2 * c)
            if l2 > 15:
                l2 -= 16
                h |= 2 << (2 * c)
            out[oo + 16 + l] = h
            out[oo + 48 + 32 * c + l] = l1 | (l2 << 4)


@njit(**PARALLEL_KERNEL_JIT)
def quantize_rows(x, out):
    """ggml quantize_row_q5_K_ref on every row."""
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
            ref_block_scales(xr, QK * i, w, 31, F32(-0.5), F32(0.1), 15, L, laux, scales, mins, ls, lm,
                             orow, BLOCK_BYTES * i)
            _pack_q5(L, QK * i, orow, BLOCK_BYTES * i)


@njit(**PARALLEL_KERNEL_JIT)
def quantize_rows_imatrix(x, qw, out):
    """ggml quantize_q5_K with importance weights (quantize_row_q5_K_impl) on every row."""
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
            imatrix_block_scales(xr, QK * i, qw, w, 31, True, L, laux, scales, mins, sw, ls, lm,
                                 orow, BLOCK_BYTES * i)
            _pack_q5(L, QK * i, orow, BLOCK_BYTES * i)


@njit(**PARALLEL_KERNEL_JIT)
def dequantize_rows(data, out):
    """ggml dequantize_row_q5_K: y = (d*sc)*(q + 16*hbit) - dmin*m."""
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
                q0 = bo + 48 + 32 * (j // 2)
                shift = 4 * (j % 2)
                y0 = QK * i + 32 * j
                for l in range(32):
                    q = (np.int32(data[r, q0 + l]) >> shift) & 15
                    if (np.int32(data[r, bo + 16 + l]) >> j) & 1:
                        q += 16
                    out[r, y0 + l] = dl * F32(q) - ml
