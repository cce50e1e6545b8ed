"""Q5_K: Q4_K's blocks with 5-bit levels; the fifth bit of each level lives in qh (176 bytes)."""
from __future__ import annotations

import numpy as np
from numba import njit, prange

from ._numeric import fp16_to_f32
from ._qkx import KERNEL_JIT, PARALLEL_KERNEL_JIT
from .q4_k import GROUP, N_RES, imatrix_block, ref_block, scale_min_k4, search_row_imatrix, search_row_ref

F32 = np.float32
QK = 256
BLOCK_BYTES = 176


@njit(**KERNEL_JIT)
def _pack_q5(L, out, oo):
    for l in range(32):
        h = np.int32(0)
        for c in range(4):
            l1 = np.int32(L[64 * c + l])
            l2 = np.int32(L[64 * c + 32 + l])
            if l1 > 15:
                l1 -= 16
                h |= 1 << (2 * c)
            if l2 > 15:
                l2 -= 16
                h |= 2 << (2 * c)
            out[oo + 48 + 32 * c + l] = l1 | (l2 << 4)
        out[oo + 16 + l] = h


@njit(**KERNEL_JIT)
def _quantize_row(x, qw, use_imatrix, out):
    n_blocks = x.shape[0] // QK
    res = np.zeros((N_RES, n_blocks * (QK // GROUP)), np.float32)
    if use_imatrix:
        search_row_imatrix(x, qw, 31, res)
    else:
        search_row_ref(x, 31, F32(-0.5), F32(0.1), 15, res)
    L = np.zeros(QK, np.uint8)
    ls = np.zeros(8, np.uint8)
    lm = np.zeros(8, np.uint8)
    for i in range(n_blocks):
        if use_imatrix:
            imatrix_block(x, QK * i, 31, True, res, 8 * i, ls, lm, L, out, BLOCK_BYTES * i)
        else:
            ref_block(x, QK * i, 31, res, 8 * i, ls, lm, L, out, BLOCK_BYTES * i)
        _pack_q5(L, out, BLOCK_BYTES * i)


@njit(**PARALLEL_KERNEL_JIT)
def quantize_rows(x, out):
    """ggml quantize_row_q5_K_ref on every row."""
    qw = np.zeros(0, np.float32)
    for r in prange(x.shape[0]):
        _quantize_row(x[r], qw, False, out[r])


@njit(**PARALLEL_KERNEL_JIT)
def quantize_rows_imatrix(x, qw, out):
    """ggml quantize_q5_K with importance weights (quantize_row_q5_K_impl) on every row."""
    for r in prange(x.shape[0]):
        _quantize_row(x[r], qw, True, out[r])


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
