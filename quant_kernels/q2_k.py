"""Q2_K: 256-weight blocks of 16 groups, 2-bit levels with 4-bit scales and mins (84 bytes).

The matrix is processed as one flat run of blocks (blocks never straddle rows), a tile of
LANES groups (two blocks) at a time; threads take runs of CHUNK_TILES tiles, each writing only
its own blocks' bytes.
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange

from ._source import load_rows, n_chunks, rows_per_chunk, scales_bad
from .types import GGMLQuantizationType, block_geometry
from ._numeric import fp16_bits, fp16_to_f32, nint
from ._qkx import (
    KERNEL_JIT, LANES, PARALLEL_KERNEL_JIT, T_AUX, T_AUX2, T_LISC, T_LMIN, T_MIN, T_SCALE, T_STRIDE,
    T_W, T_X, load_imatrix_weights, load_tile, make_qp_quants, new_tile, search_levels, search_tile,
)

F32 = np.float32
SCALE_OFF0, SCALE_OFF1 = (80, 82)  # byte offsets of the block's float16 scales (d, dmin)
QK, BLOCK_BYTES = block_geometry(GGMLQuantizationType.Q2_K)  # 256, 84
GROUP = 16
TILE_BLOCKS = LANES * GROUP // QK
CHUNK_TILES = 16  # tiles per unit of parallel work (8K weights)


@njit(**KERNEL_JIT)
def _finish_block(x, xo, out, oo, tb, lane0, sc_b, d, dmin, L):
    """Store scales, d, dmin; requantize each group with its stored scale (a group whose scale
    is 0 keeps the search's levels, as in ggml); pack the 2-bit levels."""
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
            search_levels(x, xo + GROUP * j, GROUP, 3, tb[T_LISC + lane0 + j], tb[T_LMIN + lane0 + j],
                          L, GROUP * j)
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
def _ref_scales(tb, lane0, sc_b):
    """quantize_row_q2_K_ref's 4-bit scales and mins; returns the fp16 bits of d and dmin."""
    max_scale = F32(0.0)
    max_min = F32(0.0)
    for j in range(16):
        if tb[T_SCALE + lane0 + j] > max_scale:
            max_scale = tb[T_SCALE + lane0 + j]
        if tb[T_MIN + lane0 + j] > max_min:
            max_min = tb[T_MIN + lane0 + j]
    for j in range(16):
        sc_b[j] = 0
    d = np.int32(0)
    dmin = np.int32(0)
    if max_scale > F32(0.0):
        iscale = F32(15.0) / max_scale
        for j in range(16):
            sc_b[j] = nint(iscale * tb[T_SCALE + lane0 + j]) & 255
        d = np.int32(fp16_bits(max_scale / F32(15.0)))
    if max_min > F32(0.0):
        iscale = F32(15.0) / max_min
        for j in range(16):
            sc_b[j] = (sc_b[j] | (nint(iscale * tb[T_MIN + lane0 + j]) << 4)) & 255
        dmin = np.int32(fp16_bits(max_min / F32(15.0)))
    return d, dmin


@njit(**KERNEL_JIT)
def _quantize_tile(x, qw, n_per_row, out, t, tb, L, sc_b, Ls, Lm):
    """Blocks of tile t of the flat x: quantize_row_q2_K_ref, or quantize_row_q2_K_impl when
    qw holds importance weights."""
    n_blocks = x.shape[0] // QK
    load_tile(x, LANES * t, GROUP, tb)
    use_imatrix = qw.shape[0] > 0
    if use_imatrix:
        for bt in range(TILE_BLOCKS):  # sigma2 = mean x^2 over the block, summed in order
            b = TILE_BLOCKS * t + bt
            s2 = F32(0.0)
            if b < n_blocks:
                sumx2 = F32(0.0)
                for l in range(QK):
                    sumx2 += x[QK * b + l] * x[QK * b + l]
                s2 = sumx2 / F32(QK)
            for j in range(16):
                tb[T_AUX + 16 * bt + j] = s2
        load_imatrix_weights(tb, qw, LANES * t, GROUP, n_blocks * 16, n_per_row, T_AUX, T_AUX2)
        search_tile(tb, GROUP, 3, F32(-0.9), F32(0.05), 36, False)
    else:
        for i in range(GROUP):
            for g in range(LANES):
                tb[T_X + T_STRIDE * i + T_W + g] = abs(tb[T_X + T_STRIDE * i + g])
        search_tile(tb, GROUP, 3, F32(-0.5), F32(0.1), 15, True)
    for bt in range(TILE_BLOCKS):
        b = TILE_BLOCKS * t + bt
        if b >= n_blocks:
            break
        lane0 = 16 * bt
        if use_imatrix:
            dm = make_qp_quants(16, 15, tb[T_SCALE + lane0:T_SCALE + lane0 + 16], Ls,
                                tb[T_AUX2 + lane0:T_AUX2 + lane0 + 16])
            mm = make_qp_quants(16, 15, tb[T_MIN + lane0:T_MIN + lane0 + 16], Lm,
                                tb[T_AUX2 + lane0:T_AUX2 + lane0 + 16])
            for j in range(16):
                sc_b[j] = (np.int32(Ls[j]) | (np.int32(Lm[j]) << 4)) & 255
            d = np.int32(fp16_bits(dm))
            dmin = np.int32(fp16_bits(mm))
        else:
            d, dmin = _ref_scales(tb, lane0, sc_b)
        _finish_block(x, QK * b, out, BLOCK_BYTES * b, tb, lane0, sc_b, d, dmin, L)


@njit(**KERNEL_JIT)
def _quantize_tiles(x, qw, n_per_row, out, t0, t1):
    tb = new_tile(GROUP)
    L = np.zeros(QK, np.uint8)
    sc_b = np.zeros(16, np.int32)
    Ls = np.zeros(16, np.uint8)
    Lm = np.zeros(16, np.uint8)
    for t in range(t0, t1):
        _quantize_tile(x, qw, n_per_row, out, t, tb, L, sc_b, Ls, Lm)


# Written out per type, not made by a factory: numba caches no closures (see config.py).
@njit(**PARALLEL_KERNEL_JIT)
def quantize_rows(x, out):
    """ggml quantize_row_q2_K_ref on every row of x (float32, C-contiguous) into out."""
    xf = x.reshape(-1)
    of = out.reshape(-1)
    qw = np.zeros(0, np.float32)
    n_tiles = (xf.shape[0] // GROUP + LANES - 1) // LANES
    for c in prange((n_tiles + CHUNK_TILES - 1) // CHUNK_TILES):
        _quantize_tiles(xf, qw, x.shape[1], of, c * CHUNK_TILES, min(n_tiles, (c + 1) * CHUNK_TILES))


@njit(**PARALLEL_KERNEL_JIT)
def quantize_rows_imatrix(x, qw, out):
    """ggml quantize_q2_K with one importance weight per column (quantize_row_q2_K_impl)."""
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
