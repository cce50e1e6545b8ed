"""Q4_K: 256-weight blocks of 8 groups of 32, 4-bit levels with 6-bit scales and mins (144 bytes).

Q5_K differs only in its level range, search parameters and level packing, so everything up
to the packing is here, parameterized by ``nmax``, and shared with q5_k. The matrix is
processed as one flat run of blocks (blocks never straddle rows), a tile of LANES groups (four
blocks) at a time; threads take runs of CHUNK_TILES tiles, each writing only its own blocks.
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
SCALE_OFF0, SCALE_OFF1 = (0, 2)  # byte offsets of the block's float16 scales (d, dmin)
QK, BLOCK_BYTES = block_geometry(GGMLQuantizationType.Q4_K)  # 256, 144
GROUP = 32
TILE_BLOCKS = LANES * GROUP // QK
CHUNK_TILES = 8  # tiles per unit of parallel work (8K weights)


@njit(**KERNEL_JIT)
def _search(x, qw, n_per_row, t, tb, nmax, rmin, rdelta, nstep):
    """The group searches of tile t: make_qkx2_quants with weights av_x + |x| (reference), or
    make_qkx3_quants with weights qw*sqrt(sigma2 + x^2), sigma2 = 2*mean(x^2) over the block
    (importance-weighted, when qw is not empty; per-group weight sums go to row T_AUX2)."""
    load_tile(x, LANES * t, GROUP, tb)
    if qw.shape[0] > 0:
        n_blocks = x.shape[0] // QK
        for bt in range(TILE_BLOCKS):
            b = TILE_BLOCKS * t + bt
            s2 = F32(0.0)
            if b < n_blocks:
                sum_x2 = F32(0.0)
                for l in range(QK):
                    sum_x2 += x[QK * b + l] * x[QK * b + l]
                s2 = F32(2.0) * sum_x2 / F32(QK)
            for j in range(8):
                tb[T_AUX + 8 * bt + j] = s2
        load_imatrix_weights(tb, qw, LANES * t, GROUP, n_blocks * 8, n_per_row, T_AUX, T_AUX2)
        search_tile(tb, GROUP, nmax, F32(-0.9), F32(0.05), 36, False)
        return
    for g in range(LANES):
        tb[T_AUX + g] = F32(0.0)
    for i in range(GROUP):
        for g in range(LANES):
            v = tb[T_X + T_STRIDE * i + g]
            tb[T_AUX + g] += v * v
    for g in range(LANES):
        tb[T_AUX + g] = np.sqrt(tb[T_AUX + g] / F32(GROUP))
    for i in range(GROUP):
        for g in range(LANES):
            at = T_X + T_STRIDE * i + g
            tb[at + T_W] = tb[T_AUX + g] + abs(tb[at])
    search_tile(tb, GROUP, nmax, rmin, rdelta, nstep, False)


@njit(**KERNEL_JIT)
def _pack_scales_mins(ls, lm, out, so):
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
def _block_scales(tb, lane0, clamp63, imatrix, ls, lm):
    """The block's 6-bit scales and mins into ls, lm; returns d and dmin (before fp16).

    Reference: scaled by 63/max with C's uint8 truncation before MIN(63, .). Importance-weighted:
    make_qp_quants with the group weight sums (Q5_K then clamps to 63, Q4_K does not)."""
    if imatrix:
        sw = tb[T_AUX2 + lane0:T_AUX2 + lane0 + 8]
        d = make_qp_quants(8, 63, tb[T_SCALE + lane0:T_SCALE + lane0 + 8], ls, sw)
        dmin = make_qp_quants(8, 63, tb[T_MIN + lane0:T_MIN + lane0 + 8], lm, sw)
        if clamp63:
            for j in range(8):
                ls[j] = min(np.uint8(63), ls[j])
                lm[j] = min(np.uint8(63), lm[j])
        return d, dmin
    max_scale = F32(0.0)
    max_min = F32(0.0)
    for j in range(8):
        if tb[T_SCALE + lane0 + j] > max_scale:
            max_scale = tb[T_SCALE + lane0 + j]
        if tb[T_MIN + lane0 + j] > max_min:
            max_min = tb[T_MIN + lane0 + j]
    inv_scale = F32(63.0) / max_scale if max_scale > F32(0.0) else F32(0.0)
    inv_min = F32(63.0) / max_min if max_min > F32(0.0) else F32(0.0)
    for j in range(8):
        ls[j] = min(63, nint(inv_scale * tb[T_SCALE + lane0 + j]) & 255)
        lm[j] = min(63, nint(inv_min * tb[T_MIN + lane0 + j]) & 255)
    return max_scale / F32(63.0), max_min / F32(63.0)


@njit(**KERNEL_JIT)
def _requantize_block(x, xo, out, oo, nmax, tb, lane0, L, lo):
    """Levels from the stored d, dmin and 6-bit scales into L[lo:lo+256]; a group whose d*sc is
    0 keeps the search's levels, as in ggml."""
    d = fp16_to_f32(np.int32(out[oo]) | (np.int32(out[oo + 1]) << 8))
    dmin = fp16_to_f32(np.int32(out[oo + 2]) | (np.int32(out[oo + 3]) << 8))
    for j in range(8):
        sc, m = scale_min_k4(j, out, oo + 4)
        dj = d * F32(sc)
        if dj == F32(0.0):
            search_levels(x, xo + GROUP * j, GROUP, nmax, tb[T_LISC + lane0 + j], tb[T_LMIN + lane0 + j],
                          L, lo + GROUP * j)
            continue
        dm = dmin * F32(m)
        # unsigned indices: a signed one gets numba's wraparound select, which keeps the loop
        # (a division per weight) from vectorizing
        xg = np.uint64(xo + GROUP * j)
        lg = np.uint64(lo + GROUP * j)
        for ii in range(np.uint64(GROUP)):
            l = nint((x[xg + ii] + dm) / dj)
            L[lg + ii] = max(np.int32(0), min(np.int32(nmax), l))


@njit(**KERNEL_JIT)
def quantize_tile_levels(x, qw, n_per_row, t, tb, nmax, rmin, rdelta, nstep, clamp63, out,
                         block_bytes, ls, lm, L):
    """Tile t of the flat x up to the level packing: searches, then per block d, dmin and the
    12 scale bytes into out (block_bytes per block) and the levels into L[256*bt:].
    Returns how many blocks the tile holds."""
    _search(x, qw, n_per_row, t, tb, nmax, rmin, rdelta, nstep)
    n_blocks = min(TILE_BLOCKS, x.shape[0] // QK - TILE_BLOCKS * t)
    for bt in range(n_blocks):
        b = TILE_BLOCKS * t + bt
        oo = block_bytes * b
        d, dmin = _block_scales(tb, 8 * bt, clamp63, qw.shape[0] > 0, ls, lm)
        _pack_scales_mins(ls, lm, out, oo + 4)
        hd = np.int32(fp16_bits(d))
        hm = np.int32(fp16_bits(dmin))
        out[oo] = hd & 255
        out[oo + 1] = hd >> 8
        out[oo + 2] = hm & 255
        out[oo + 3] = hm >> 8
        _requantize_block(x, QK * b, out, oo, nmax, tb, 8 * bt, L, QK * bt)
    return n_blocks


@njit(**KERNEL_JIT)
def _quantize_tiles(x, qw, n_per_row, out, t0, t1):
    tb = new_tile(GROUP)
    L = np.zeros(QK * TILE_BLOCKS, np.uint8)
    ls = np.zeros(8, np.uint8)
    lm = np.zeros(8, np.uint8)
    for t in range(t0, t1):
        nb = quantize_tile_levels(x, qw, n_per_row, t, tb, 15, F32(-1.0), F32(0.1), 20, False, out,
                                  BLOCK_BYTES, ls, lm, L)
        for bt in range(nb):
            oo = np.uint64(BLOCK_BYTES * (TILE_BLOCKS * t + bt) + 16)
            for c in range(np.uint64(4)):
                for l in range(np.uint64(32)):
                    lo = np.uint64(QK) * np.uint64(bt) + np.uint64(64) * c + l
                    out[oo + np.uint64(32) * c + l] = L[lo] | (L[lo + np.uint64(32)] << 4)


# Written out per type, not made by a factory: numba caches no closures (see config.py).
@njit(**PARALLEL_KERNEL_JIT)
def quantize_rows(x, out):
    """ggml quantize_row_q4_K_ref on every row of x (float32, C-contiguous) into out."""
    xf = x.reshape(-1)
    of = out.reshape(-1)
    qw = np.zeros(0, np.float32)
    n_tiles = (xf.shape[0] // GROUP + LANES - 1) // LANES
    for c in prange((n_tiles + CHUNK_TILES - 1) // CHUNK_TILES):
        _quantize_tiles(xf, qw, x.shape[1], of, c * CHUNK_TILES, min(n_tiles, (c + 1) * CHUNK_TILES))


@njit(**PARALLEL_KERNEL_JIT)
def quantize_rows_imatrix(x, qw, out):
    """ggml quantize_q4_K with one importance weight per column (quantize_row_q4_K_impl)."""
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
