"""Q5_K: Q4_K's blocks with 5-bit levels; the fifth bit of each level lives in qh (176 bytes)."""
from __future__ import annotations

import numpy as np
from numba import njit, prange

from ._source import load_rows, n_chunks, rows_per_chunk, scales_bad
from .types import GGMLQuantizationType, block_geometry
from ._numeric import fp16_to_f32
from ._qkx import KERNEL_JIT, LANES, PARALLEL_KERNEL_JIT, new_tile
from .q4_k import CHUNK_TILES, GROUP, TILE_BLOCKS, quantize_tile_levels, scale_min_k4

F32 = np.float32
SCALE_OFF0, SCALE_OFF1 = (0, 2)  # byte offsets of the block's float16 scales (d, dmin)
QK, BLOCK_BYTES = block_geometry(GGMLQuantizationType.Q5_K)  # 256, 176


@njit(**KERNEL_JIT)
def _quantize_tiles(x, qw, n_per_row, out, t0, t1):
    tb = new_tile(GROUP)
    L = np.zeros(QK * TILE_BLOCKS, np.uint8)
    ls = np.zeros(8, np.uint8)
    lm = np.zeros(8, np.uint8)
    for t in range(t0, t1):
        nb = quantize_tile_levels(x, qw, n_per_row, t, tb, 31, F32(-0.5), F32(0.1), 15, True, out,
                                  BLOCK_BYTES, ls, lm, L)
        for bt in range(nb):
            oo = BLOCK_BYTES * (TILE_BLOCKS * t + bt)
            for l in range(32):
                h = np.int32(0)
                for c in range(4):
                    lo = QK * bt + 64 * c + l
                    l1 = np.int32(L[lo])
                    l2 = np.int32(L[lo + 32])
                    if l1 > 15:
                        l1 -= 16
                        h |= 1 << (2 * c)
                    if l2 > 15:
                        l2 -= 16
                        h |= 2 << (2 * c)
                    out[oo + 48 + 32 * c + l] = l1 | (l2 << 4)
                out[oo + 16 + l] = h


# Written out per type, not made by a factory: numba caches no closures (see config.py).
@njit(**PARALLEL_KERNEL_JIT)
def quantize_rows(x, out):
    """ggml quantize_row_q5_K_ref on every row of x (float32, C-contiguous) into out."""
    xf = x.reshape(-1)
    of = out.reshape(-1)
    qw = np.zeros(0, np.float32)
    n_tiles = (xf.shape[0] // GROUP + LANES - 1) // LANES
    for c in prange((n_tiles + CHUNK_TILES - 1) // CHUNK_TILES):
        _quantize_tiles(xf, qw, x.shape[1], of, c * CHUNK_TILES, min(n_tiles, (c + 1) * CHUNK_TILES))


@njit(**PARALLEL_KERNEL_JIT)
def quantize_rows_imatrix(x, qw, out):
    """ggml quantize_q5_K with one importance weight per column (quantize_row_q5_K_impl)."""
    xf = x.reshape(-1)
    of = out.reshape(-1)
    n_tiles = (xf.shape[0] // GROUP + LANES - 1) // LANES
    for c in prange((n_tiles + CHUNK_TILES - 1) // CHUNK_TILES):
        _quantize_tiles(xf, qw, x.shape[1], of, c * CHUNK_TILES, min(n_tiles, (c + 1) * CHUNK_TILES))


@njit(**KERNEL_JIT)
def encode_rows(x, qw, out):
    """Serial: every row of x (float32, C-contiguous, rows x n) into out; ``qw`` the importance
    weights per column, or empty for the reference quantizer."""
    xf = x.reshape(-1)
    of = out.reshape(-1)
    n_tiles = (xf.shape[0] // GROUP + LANES - 1) // LANES
    _quantize_tiles(xf, qw, x.shape[1], of, 0, n_tiles)


@njit(**PARALLEL_KERNEL_JIT)
def quantize_codes(codes, kind, table, qw, limit, out, flags):
    """Raw source codes (rows x n) -> out in one parallel region over chunks of rows, each upcast
    into a cache-sized buffer, checked and encoded (see _source.py); per-chunk flags."""
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
                y0 = QK * i + GROUP * j
                for l in range(GROUP):
                    q = (np.int32(data[r, q0 + l]) >> shift) & 15
                    if (np.int32(data[r, bo + 16 + l]) >> j) & 1:
                        q += 16
                    out[r, y0 + l] = dl * F32(q) - ml
