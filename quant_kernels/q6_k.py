"""Q6_K kernels: ggml's ``quantize_row_q6_K_ref`` / ``quantize_row_q6_K_impl``, byte for byte.

Block of 256 weights, 210 bytes: ql u8[128]@0, qh u8[64]@128, scales int8[16]@192, d half@208.
Each group of 16 gets a signed 6-bit level search (``make_qx_quants``, nmax 32) weighted by x^2,
or by the per-column importance weights when an imatrix is given (ggml passes those unchanged:
its sigma2 weighting for Q6_K is commented out). The 16 group scales are then stored as int8
relative to the block's largest one.

The tile search here (``make_qx_quants_tile``, ``tile_levels``) also serves Q3_K's
importance-weighted path, which imports it.

Divisions are written ``np.true_divide(a, b)``: the same IEEE float32 division as ``a / b``,
without numba's Python-style zero-divisor check, whose branch keeps loops from vectorizing.
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange

from ._numeric import fp16_bits, fp16_to_f32, nint
from ._source import load_rows, n_chunks, rows_per_chunk, scales_bad
from .config import JIT_OPTIONS, PARALLEL_JIT_OPTIONS
from .types import GGMLQuantizationType, block_geometry

__all__ = ["quantize_rows", "quantize_rows_imatrix", "dequantize_rows", "encode_rows", "quantize_codes"]

QK, BLOCK_BYTES = block_geometry(GGMLQuantizationType.Q6_K)  # 256, 210
SCALE_OFF0, SCALE_OFF1 = 208, -1  # the float16 d of every block (quant_kernels._source.scales_bad)
# ggml divides without checking; numba's default "python" error model would raise
# ZeroDivisionError instead (np.true_divide avoids it for floats), and its checks block vectorization.
KERNEL_JIT = {**JIT_OPTIONS, "error_model": "numpy"}
PARALLEL_KERNEL_JIT = {**PARALLEL_JIT_OPTIONS, "error_model": "numpy"}
GROUP_MAX_EPS = np.float32(1e-15)


# --- the group search, LANES groups side by side -----------------------------------------------
#
# ggml searches one group of 16 at a time. Here a *tile* holds LANES groups transposed (element i
# of every group in one row of LANES floats), so each statement is a vector operation across
# groups while each group still sees exactly ggml's float32 operations in ggml's order (its sums
# over i left to right, no reassociation, no FMA, the same comparisons). The tile is one flat
# float32 buffer with compile-time offsets, which lets LLVM prove its loads and stores never
# overlap, so the loops over lanes vectorize without runtime alias checks.
#
# Loop shapes are chosen so that each function vectorizes when compiled on its own: numba may or
# may not inline it into its caller, and a freshly compiled kernel was measured calling the
# standalone copy (cache-loaded kernels carry their own), so relying on inlining made first runs
# 7x slower. Every loop over lanes has the constant trip count LANES (an unknown one, as
# _numeric.opaque gives, brings runtime overlap checks on the tile that sent these loops to their
# scalar fallback) and a body LLVM does not unroll: either an inner loop over the 16 elements
# with a small body, which is always fully unrolled, or four elements per pass written out (a
# larger inner body is not reliably unrolled, and a loop left inside stops the lanes from
# vectorizing). Helpers inlined into these loops take scalars only: one taking an array brings
# reference-counting calls into the loop. Indices are np.uint64 (see quant_kernels._source's
# docstring: numba's negative-index wraparound on signed indices keeps loops from vectorizing),
# never mixed with signed integers, which numba would promote to float64.

_U = np.uint64
_4 = _U(4)
_16 = _U(16)
LANES = 32
_L = _U(LANES)
# Tile layout: rows of LANES floats at these offsets, then element i of every lane's group at
# T_X + T_STRIDE*i, its weight w at + T_W and the product w*x at + T_WX.
# T_AUX is free for the caller.
T_MX, T_AMAX, T_SCALE, T_BEST, T_ISC, T_DG, T_TISC, T_SLX, T_SL2, T_AUX = [_U(k * LANES) for k in range(10)]
T_X = _U(10 * LANES)
T_W = _U(LANES)
T_WX = _U(2 * LANES)
T_STRIDE = _U(3 * LANES)
TILE_SIZE = 10 * LANES + 16 * 3 * LANES


@njit(**KERNEL_JIT)
def new_tile():
    return np.zeros(TILE_SIZE, np.float32)


@njit(inline="always", **KERNEL_JIT)
def _acc(isc, v, w, wx, slx, sl2, lo, hi):
    """One element of ggml's trial sums: l = MAX(lo, MIN(hi, nearest_int(isc * x))),
    sumlx += (w*x)*l, suml2 += (w*l)*l. Scalars only (a helper taking the array would bring
    reference counting calls into the loop, which then does not vectorize)."""
    fl = np.float32(min(hi, max(lo, nint(isc * v))))
    return slx + wx * fl, sl2 + (w * fl) * fl


@njit(**KERNEL_JIT)
def _trial(tb, nmax, step, first):
    """ggml's inverse scale -(nmax + 0.1*step)/max on every lane: the sums sum (w*x)*l and
    sum (w*l)*l over the group's levels, then ggml's accept test; ``first`` (step 0) is taken
    as the starting point: scale = suml2 ? sumlx/suml2 : 0, best = scale * sumlx.

    Four elements per pass over the lanes, written out rather than as an inner loop (whose full
    unrolling LLVM does not guarantee), with the running sums in tile rows between passes; each
    lane's sums are ggml's sequential ones."""
    lo = np.int32(-nmax)
    hi = np.int32(nmax - 1)
    num = -(np.float32(nmax) + np.float32(0.1) * np.float32(step))
    zero = np.float32(0.0)
    s = T_STRIDE
    for g in range(_L):  # elements 0-3
        at = T_X + g
        isc = np.true_divide(num, tb[T_MX + g])
        slx, sl2 = _acc(isc, tb[at], tb[at + T_W], tb[at + T_WX], zero, zero, lo, hi)
        slx, sl2 = _acc(isc, tb[at + s], tb[at + s + T_W], tb[at + s + T_WX], slx, sl2, lo, hi)
        at += _U(2) * s
        slx, sl2 = _acc(isc, tb[at], tb[at + T_W], tb[at + T_WX], slx, sl2, lo, hi)
        slx, sl2 = _acc(isc, tb[at + s], tb[at + s + T_W], tb[at + s + T_WX], slx, sl2, lo, hi)
        tb[T_TISC + g] = isc
        tb[T_SLX + g] = slx
        tb[T_SL2 + g] = sl2
    for i0 in range(_4, _U(12), _4):  # elements 4-7, 8-11
        for g in range(_L):
            at = T_X + s * i0 + g
            isc = tb[T_TISC + g]
            slx, sl2 = _acc(isc, tb[at], tb[at + T_W], tb[at + T_WX], tb[T_SLX + g], tb[T_SL2 + g], lo, hi)
            slx, sl2 = _acc(isc, tb[at + s], tb[at + s + T_W], tb[at + s + T_WX], slx, sl2, lo, hi)
            at += _U(2) * s
            slx, sl2 = _acc(isc, tb[at], tb[at + T_W], tb[at + T_WX], slx, sl2, lo, hi)
            slx, sl2 = _acc(isc, tb[at + s], tb[at + s + T_W], tb[at + s + T_WX], slx, sl2, lo, hi)
            tb[T_SLX + g] = slx
            tb[T_SL2 + g] = sl2
    for g in range(_L):  # elements 12-15, then the accept test
        at = T_X + s * _U(12) + g
        isc = tb[T_TISC + g]
        slx, sl2 = _acc(isc, tb[at], tb[at + T_W], tb[at + T_WX], tb[T_SLX + g], tb[T_SL2 + g], lo, hi)
        slx, sl2 = _acc(isc, tb[at + s], tb[at + s + T_W], tb[at + s + T_WX], slx, sl2, lo, hi)
        at += _U(2) * s
        slx, sl2 = _acc(isc, tb[at], tb[at + T_W], tb[at + T_WX], slx, sl2, lo, hi)
        slx, sl2 = _acc(isc, tb[at + s], tb[at + s + T_W], tb[at + s + T_WX], slx, sl2, lo, hi)
        best = tb[T_BEST + g]
        take = first | ((sl2 > zero) & (slx * slx > best * sl2))
        # an accepted later trial has suml2 > 0, so this is also its sumlx/suml2
        scale = np.true_divide(slx, sl2) if sl2 != zero else zero
        tb[T_SCALE + g] = scale if take else tb[T_SCALE + g]
        tb[T_BEST + g] = scale * slx if take else best
        tb[T_ISC + g] = isc if take else tb[T_ISC + g]


@njit(**KERNEL_JIT)
def make_qx_quants_tile(tb, nmax):
    """ggml's make_qx_quants(16, nmax, x, L, rmse_type=1, w) on the LANES groups of a tile
    (x at T_X, weights w at T_W, w*x at T_WX: the value ggml's ``w*x[i]*l`` starts from).

    Per lane: T_SCALE = the returned scale; T_ISC = the inverse scale whose levels ggml leaves
    in L (L = clamp(nint(ISC * x), -nmax, nmax - 1) + nmax); T_AMAX = max |x| (a group below
    GROUP_MAX_EPS has scale 0 and L = 0). The 19 trials run in ggml's order (step 0, then
    -9..-1 and 1..9), each accepted or not per lane exactly as ggml's loop would.
    """
    zero = np.float32(0.0)
    for g in range(_L):
        amax = zero
        mx = zero
        for i in range(_16):  # a small body: always unrolled, so the lanes vectorize
            v = tb[T_X + T_STRIDE * i + g]
            ax = np.abs(v)
            take = ax > amax  # strict: ties keep the first element and its sign
            amax = ax if take else amax
            mx = v if take else mx
        tb[T_AMAX + g] = amax
        # any non-zero max for an all-small group: its results are replaced below
        tb[T_MX + g] = mx if amax >= GROUP_MAX_EPS else np.float32(1.0)
    _trial(tb, nmax, 0, True)
    for step in range(-9, 10):
        if step != 0:
            _trial(tb, nmax, step, False)
    for g in range(_L):
        tb[T_SCALE + g] = tb[T_SCALE + g] if tb[T_AMAX + g] >= GROUP_MAX_EPS else zero


@njit(**KERNEL_JIT)
def tile_levels(tb, nmax, requant_max, lv):
    """Final levels of a searched tile, transposed into lv (uint8, lv[LANES*i + g]), as ggml
    leaves them after its requantization pass: where the lane's T_DG is non-zero (ggml's
    ``if (!d) continue`` skips only d == 0), clamp(nint(x / DG), -requant_max, requant_max - 1)
    + requant_max; elsewhere the search's own levels (0 for an all-small group)."""
    lo = np.int32(-nmax)
    hi = np.int32(nmax - 1)
    rlo = np.int32(-requant_max)
    rhi = np.int32(requant_max - 1)
    zero = np.float32(0.0)
    for g in range(_L):
        dg = tb[T_DG + g]
        isc = tb[T_ISC + g]
        small = tb[T_AMAX + g] < GROUP_MAX_EPS
        for i in range(_16):
            v = tb[T_X + T_STRIDE * i + g]
            q = min(rhi, max(rlo, nint(np.true_divide(v, dg)))) + np.int32(requant_max)
            l = min(hi, max(lo, nint(isc * v))) + np.int32(nmax)
            l = np.int32(0) if small else l
            lv[_L * i + g] = np.uint8(q if dg != zero else l)


# --- Q6_K blocks ---------------------------------------------------------------------------------
#
# The blocks of a (rows, n) input are numbered row by row, k = row * (n // 256) + block, and
# encoded two to a tile (a tile's two blocks may come from consecutive rows).

BLOCKS_PER_TILE = LANES // 16
BLOCKS_PER_TASK = 16  # blocks per parallel task (each task allocates its own tile)


@njit(**KERNEL_JIT)
def load_blocks(x, qw, k0, nbt, tb):
    """Lanes 16*bt + j of the tile = group j of block k0 + bt (bt < nbt; other lanes zero), with
    weights x^2 (qw empty) or the importance weights qw of the group's columns."""
    zero = np.float32(0.0)
    nb = _U(x.shape[1]) // _U(QK)
    imatrix = qw.shape[0] != 0
    for bt in range(_U(BLOCKS_PER_TILE)):
        if bt < nbt:
            k = k0 + bt
            xr = x[k // nb]
            c0 = (k % nb) * _U(QK)
            for j in range(_16):
                g = _16 * bt + j
                for i in range(_16):
                    at = T_X + T_STRIDE * i + g
                    c = c0 + _16 * j + i
                    v = xr[c]
                    w = qw[c] if imatrix else v * v
                    tb[at] = v
                    tb[at + T_W] = w
                    tb[at + T_WX] = w * v
        else:
            for j in range(_16):
                g = _16 * bt + j
                for i in range(_16):
                    at = T_X + T_STRIDE * i + g
                    tb[at] = zero
                    tb[at + T_W] = zero
                    tb[at + T_WX] = zero


@njit(**KERNEL_JIT)
def _block_scales(tb, lane0, ob):
    """ggml's per-block pass over the 16 group scales of the block in lanes lane0..lane0+15:
    d and the int8 scales into ob (210 bytes), T_DG = d * scale per lane. Returns False (ob
    zeroed, as ggml's memset) when every scale is below GROUP_MAX_EPS."""
    max_scale = np.float32(0.0)
    max_abs_scale = np.float32(0.0)
    for j in range(_16):
        s = tb[T_SCALE + lane0 + j]
        a = np.abs(s)
        if a > max_abs_scale:
            max_abs_scale = a
            max_scale = s
    if max_abs_scale < GROUP_MAX_EPS:
        for k in range(_U(BLOCK_BYTES)):
            ob[k] = np.uint8(0)
        for j in range(_16):
            tb[T_DG + lane0 + j] = np.float32(0.0)
        return False
    iscale = np.true_divide(np.float32(-128.0), max_scale)
    dbits = fp16_bits(np.true_divide(np.float32(1.0), iscale))
    ob[208] = np.uint8(dbits & 0xFF)
    ob[209] = np.uint8(dbits >> 8)
    d = fp16_to_f32(dbits)
    for j in range(_16):
        sc = np.int32(np.int8(min(np.int32(127), nint(iscale * tb[T_SCALE + lane0 + j]))))  # int8_t
        ob[_U(192) + j] = np.uint8(sc & 0xFF)
        tb[T_DG + lane0 + j] = d * np.float32(sc)
    return True


@njit(**KERNEL_JIT)
def _pack_block(lv, lane0, ob):
    """ql and qh of one block from its levels in lanes lane0..lane0+15 of lv (transposed)."""
    for h in range(_U(2)):
        for l in range(_U(32)):
            # element e = 128h + 32k + l of the block: group e // 16, index e % 16
            base = lane0 + _U(8) * h + (l >> _U(4))
            at = _L * (l & _U(15)) + base
            q1 = np.int32(lv[at])
            q2 = np.int32(lv[at + _U(2)])
            q3 = np.int32(lv[at + _U(4)])
            q4 = np.int32(lv[at + _U(6)])
            ob[_U(64) * h + l] = np.uint8((q1 & 15) | ((q3 & 15) << 4))
            ob[_U(64) * h + _U(32) + l] = np.uint8((q2 & 15) | ((q4 & 15) << 4))
            ob[_U(128) + _U(32) * h + l] = np.uint8(
                (q1 >> 4) | ((q2 >> 4) << 2) | ((q3 >> 4) << 4) | ((q4 >> 4) << 6))


@njit(**KERNEL_JIT)
def _encode_blocks(x, qw, out, k0, k1, tb, lv):
    """quantize_row_q6_K_ref (qw empty) or quantize_row_q6_K_impl on blocks k0..k1 of x into
    out; tb = new_tile(), lv uint8 scratch of 16 * LANES."""
    nb = _U(x.shape[1]) // _U(QK)
    bb = _U(BLOCK_BYTES)
    for t0 in range(_U(k0), _U(k1), _U(BLOCKS_PER_TILE)):
        nbt = min(_U(BLOCKS_PER_TILE), _U(k1) - t0)
        load_blocks(x, qw, t0, nbt, tb)
        make_qx_quants_tile(tb, 32)
        keep = 0
        for bt in range(nbt):
            k = t0 + bt
            oo = (k % nb) * bb
            if _block_scales(tb, _16 * bt, out[k // nb, oo:oo + bb]):
                keep |= 1 << bt
        tile_levels(tb, 32, 32, lv)
        for bt in range(nbt):
            if keep & (1 << bt):
                k = t0 + bt
                oo = (k % nb) * bb
                _pack_block(lv, _16 * bt, out[k // nb, oo:oo + bb])


@njit(**KERNEL_JIT)
def encode_rows(x, qw, out):
    """Every row of x (rows, n) into out (rows, row_bytes), serially: quantize_row_q6_K_ref when
    qw is empty, else quantize_row_q6_K_impl with qw as the per-column importance weights."""
    _encode_blocks(x, qw, out, 0, x.shape[0] * (x.shape[1] // QK), new_tile(), np.empty(16 * LANES, np.uint8))


@njit(**KERNEL_JIT)
def _encode_task(x, qw, out, t):
    """Parallel task t: blocks BLOCKS_PER_TASK * t onwards."""
    total = x.shape[0] * (x.shape[1] // QK)
    k0 = t * BLOCKS_PER_TASK
    _encode_blocks(x, qw, out, k0, min(total, k0 + BLOCKS_PER_TASK), new_tile(), np.empty(16 * LANES, np.uint8))


@njit(**KERNEL_JIT)
def _n_tasks(x):
    return (x.shape[0] * (x.shape[1] // QK) + BLOCKS_PER_TASK - 1) // BLOCKS_PER_TASK


# Written out per type, not made by a factory: numba caches no closures (see config.py).
@njit(**PARALLEL_KERNEL_JIT)
def quantize_rows(x, out):
    """quantize_row_q6_K_ref on every row; search weights are x^2."""
    qw = np.empty(0, np.float32)
    for t in prange(_n_tasks(x)):
        _encode_task(x, qw, out, t)


@njit(**PARALLEL_KERNEL_JIT)
def quantize_rows_imatrix(x, qw, out):
    """quantize_row_q6_K_impl on every row; search weights are the imatrix columns as given."""
    for t in prange(_n_tasks(x)):
        _encode_task(x, qw, out, t)


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
    d = fp16_to_f32(np.int32(ob[208]) | (np.int32(ob[209]) << 8))
    for h in range(2):
        for l in range(32):
            a = np.int32(ob[64 * h + l])
            c = np.int32(ob[64 * h + 32 + l])
            hb = np.int32(ob[128 + 32 * h + l])
            g = 8 * h + l // 16
            q1 = ((a & 15) | ((hb & 3) << 4)) - 32
            q2 = ((c & 15) | (((hb >> 2) & 3) << 4)) - 32
            q3 = ((a >> 4) | (((hb >> 4) & 3) << 4)) - 32
            q4 = ((c >> 4) | (((hb >> 6) & 3) << 4)) - 32
            base = 128 * h + l
            y[base] = (d * np.float32(np.int8(ob[192 + g]))) * np.float32(q1)
            y[base + 32] = (d * np.float32(np.int8(ob[192 + g + 2]))) * np.float32(q2)
            y[base + 64] = (d * np.float32(np.int8(ob[192 + g + 4]))) * np.float32(q3)
            y[base + 96] = (d * np.float32(np.int8(ob[192 + g + 6]))) * np.float32(q4)


@njit(**PARALLEL_JIT_OPTIONS)
def dequantize_rows(data, out):
    """dequantize_row_q6_K: (d * scale) * (q - 32)."""
    rows, n = out.shape
    nb = n // QK
    for r in prange(rows):
        for b in range(nb):
            _decode_block(data[r, b * BLOCK_BYTES:(b + 1) * BLOCK_BYTES], out[r, b * QK:(b + 1) * QK])
