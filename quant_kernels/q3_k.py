"""Q3_K kernels: ggml's ``quantize_row_q3_K_ref`` / ``quantize_row_q3_K_impl``, byte for byte.

Block of 256 weights, 110 bytes: hmask u8[32]@0, qs u8[64]@32, scales u8[12]@96, d half@108.
Levels are signed in [-4, 3] (stored +4: two low bits in ``qs``, the third in ``hmask``); each
group of 16 has a 6-bit scale stored +32 relative to the block's ``d``.

Without an imatrix each group's scale comes from ``make_q3_quants`` (an x^2-weighted
coordinate-descent refinement) and the scales are quantized against the largest. With one,
groups use ``make_qx_quants`` weighted by ``qw * sqrt(sigma2 + x^2)`` and the 16 scales are
themselves quantized by ``make_qx_quants`` weighted by each group's total weight.

Divisions are written ``np.true_divide(a, b)``: the same IEEE float32 division as ``a / b``,
without numba's Python-style zero-divisor check, whose branch keeps loops from vectorizing.
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange

from ._numeric import fp16_bits, fp16_to_f32, nint
from .config import JIT_OPTIONS, PARALLEL_JIT_OPTIONS
from .types import GGMLQuantizationType, block_geometry
from .q6_k import NLANE, make_qx_quants

__all__ = ["quantize_rows", "quantize_rows_imatrix", "dequantize_rows"]

QK, BLOCK_BYTES = block_geometry(GGMLQuantizationType.Q3_K)  # 256, 110
GROUP_MAX_EPS = np.float32(1e-15)

# Per-thread scratch. Blocks are processed transposed (element-major: index 16*i + g holds
# element i of group g) so that loops over the 16 groups run one SIMD lane per group.
# float32 rows of 256; the per-group rows use their first 16 entries.
XT, AMAX, MX, ISCALE, SUMLX, SUML2, FIRST, SCALE, DJ, SUMW = range(10)
NF = 10
# int32 rows of 256: transposed signed levels, natural-order levels, the 16 stored scales.
LT, LN, LS = range(3)
NI = 3


@njit(**JIT_OPTIONS)
def _transpose_in(xb, xt):
    for i in range(16):
        for g in range(16):
            xt[16 * i + g] = xb[16 * g + i]


@njit(**JIT_OPTIONS)
def _refine_tail(xt, lt, g, start, sumlx, suml2):
    """ggml's sequential make_q3_quants refinement loop for group g, from element start to the
    end of the pass; returns the updated (sumlx, suml2)."""
    zero = np.float32(0.0)
    for i in range(start, 16):
        k = 16 * i + g
        v = xt[k]
        w = v * v
        fli = np.float32(lt[k])
        slx = sumlx - (w * v) * fli
        if slx > zero:
            sl2 = suml2 - (w * fli) * fli
            new_l = min(np.int32(3), max(np.int32(-4), nint(np.true_divide(v * sl2, slx))))
            if new_l != lt[k]:
                fnew = np.float32(new_l)
                slx += (w * v) * fnew
                sl2 += (w * fnew) * fnew
                if sl2 > zero and (slx * slx) * suml2 > (sumlx * sumlx) * sl2:
                    lt[k] = new_l
                    sumlx = slx
                    suml2 = sl2
    return sumlx, suml2


@njit(**JIT_OPTIONS)
def _make_q3_quants_x16(f, lt):
    """ggml's make_q3_quants(16, 4, x, L, do_rmse=true) for the 16 groups of a block.

    Reads f[XT]; writes signed levels lt (transposed; -4 for an all-|x| < 1e-15 group, which
    is ggml's L = 0) and f[SCALE]. Each SIMD lane does one group's float32 operations in
    ggml's order, so the results are ggml's:
    - the max search and first level assignment are plain per-lane loops;
    - a refinement pass keeps its running sums until its first change, so a branch-free
      look-ahead finds each group's first change from the pass's starting sums, and ggml's
      sequential loop runs only from there on (four groups in five change nothing at all);
    - a group whose pass changed nothing would change nothing in any later pass either, so
      running passes until no group changes (at most 5) equals ggml's per-group early exit.
    """
    xt = f[XT]
    amax = f[AMAX]
    mx = f[MX]
    iscale = f[ISCALE]
    sumlx = f[SUMLX]
    suml2 = f[SUML2]
    first = f[FIRST]
    zero = np.float32(0.0)
    for g in range(16):
        amax[g] = zero
        mx[g] = zero
        sumlx[g] = zero
        suml2[g] = zero
    for i in range(16):
        for g in range(16):
            v = xt[16 * i + g]
            ax = np.abs(v)
            a = amax[g]
            m = mx[g]
            if ax > a:  # strict: ties keep the first element and its sign
                a = ax
                m = v
            amax[g] = a
            mx[g] = m
    for g in range(16):
        m = mx[g]
        if amax[g] < GROUP_MAX_EPS:
            m = np.float32(1.0)  # a harmless iscale; the group's result is overwritten below
        iscale[g] = np.true_divide(np.float32(-4.0), m)
    for i in range(16):
        for g in range(16):
            v = xt[16 * i + g]
            l = min(np.int32(3), max(np.int32(-4), nint(iscale[g] * v)))
            lt[16 * i + g] = l
            fl = np.float32(l)
            w = v * v
            sumlx[g] += (w * v) * fl
            suml2[g] += (w * fl) * fl
    for _ in range(5):
        for g in range(16):
            first[g] = np.float32(16.0)
        for i in range(16):
            fi = np.float32(i)
            for g in range(16):
                v = xt[16 * i + g]
                w = v * v
                wx = w * v
                li = lt[16 * i + g]
                fli = np.float32(li)
                sx = sumlx[g]
                s2 = suml2[g]
                slx = sx - wx * fli
                sl2 = s2 - (w * fli) * fli
                new_l = min(np.int32(3), max(np.int32(-4), nint(np.true_divide(v * sl2, slx))))
                fnew = np.float32(new_l)
                slx_new = slx + wx * fnew
                sl2_new = sl2 + (w * fnew) * fnew
                take = (slx > zero) & (new_l != li) & (sl2_new > zero) & \
                    ((slx_new * slx_new) * s2 > (sx * sx) * sl2_new)
                fg = first[g]
                if take:
                    fg = min(fg, fi)
                first[g] = fg
        changed = False
        for g in range(16):
            if first[g] < np.float32(16.0):
                changed = True
                sumlx[g], suml2[g] = _refine_tail(xt, lt, g, np.int64(first[g]), sumlx[g], suml2[g])
        if not changed:
            break
    scale = f[SCALE]
    for g in range(16):
        if amax[g] < GROUP_MAX_EPS:
            scale[g] = zero
            for i in range(16):
                lt[16 * i + g] = -4
        else:
            scale[g] = np.true_divide(sumlx[g], suml2[g]) if suml2[g] > zero else zero


@njit(**JIT_OPTIONS)
def _quantize_scales_ref(scale, ls):
    """Scales relative to the signed largest: ls = clamp(nint(-32/max * s), -32, 31) + 32.
    Returns the fp16 bits of d = 1/iscale (0 when every scale is 0)."""
    max_scale = np.float32(0.0)
    amax = np.float32(0.0)
    for g in range(16):
        s = scale[g]
        a = np.abs(s)
        if a > amax:
            amax = a
            max_scale = s
    if max_scale == np.float32(0.0):
        for j in range(16):
            ls[j] = 0
        return np.uint16(0)
    iscale = np.true_divide(np.float32(-32.0), max_scale)
    for j in range(16):
        l = np.int32(np.int8(nint(iscale * scale[j])))  # ggml keeps this in an int8_t
        ls[j] = min(np.int32(31), max(np.int32(-32), l)) + 32
    return fp16_bits(np.true_divide(np.float32(1.0), iscale))


@njit(**JIT_OPTIONS)
def _finish_block(f, iw, dbits, ob):
    """Store the scales iw[LS] (0..63) and d, requantize every group whose decoded scale is
    non-zero (the others keep the search's levels), then pack hmask and the 2-bit planes."""
    ls = iw[LS]
    for k in range(12):
        ob[96 + k] = 0
    for j in range(16):
        l = ls[j]
        if j < 8:
            ob[96 + j] = np.uint8(l & 0xF)
        else:
            ob[96 + j - 8] |= np.uint8((l & 0xF) << 4)
        ob[96 + 8 + j % 4] |= np.uint8((l >> 4) << (2 * (j // 4)))
    ob[108] = np.uint8(dbits & 0xFF)
    ob[109] = np.uint8(dbits >> 8)
    d = fp16_to_f32(dbits)
    dj = f[DJ]
    for g in range(16):
        dj[g] = d * np.float32(ls[g] - 32)
    xt = f[XT]
    lt = iw[LT]
    for i in range(16):
        for g in range(16):
            k = 16 * i + g
            dg = dj[g]
            li = lt[k]
            q = min(np.int32(3), max(np.int32(-4), nint(np.true_divide(xt[k], dg))))
            if dg != np.float32(0.0):
                li = q
            lt[k] = li
    ln = iw[LN]
    for g in range(16):
        for i in range(16):
            ln[16 * g + i] = lt[16 * i + g] + 4
    # levels are 0..7: bit 2 goes to hmask[e % 32] bit e // 32, bits 0-1 to the qs planes
    for l in range(32):
        m = np.int32(0)
        for k in range(8):
            m |= (ln[32 * k + l] >> 2) << k
        ob[l] = np.uint8(m)
    for h in range(2):
        for l in range(32):
            b = 128 * h + l
            ob[32 + 32 * h + l] = np.uint8(
                (ln[b] & 3) | ((ln[b + 32] & 3) << 2) | ((ln[b + 64] & 3) << 4) | ((ln[b + 96] & 3) << 6)
            )


@njit(**JIT_OPTIONS)
def _encode_block_ref(xb, ob, f, iw):
    """quantize_row_q3_K_ref for one block."""
    _transpose_in(xb, f[XT])
    _make_q3_quants_x16(f, iw[LT])
    dbits = _quantize_scales_ref(f[SCALE], iw[LS])
    _finish_block(f, iw, dbits, ob)


@njit(**JIT_OPTIONS)
def _encode_block_imatrix(xb, qw, ob, f, iw, weight, trials):
    """quantize_row_q3_K_impl for one block: make_qx_quants per group weighted by
    qw * sqrt(sigma2 + x^2), then make_qx_quants over the 16 scales weighted by group sums."""
    sumx2 = np.float32(0.0)
    for i in range(QK):
        sumx2 += xb[i] * xb[i]
    sigma2 = np.true_divide(np.float32(2.0) * sumx2, np.float32(QK))
    scale = f[SCALE]
    sumw = f[SUMW]
    ln = iw[LN]
    for g in range(16):
        sw = np.float32(0.0)
        for l in range(16):
            i = 16 * g + l
            weight[l] = qw[i] * np.sqrt(sigma2 + xb[i] * xb[i])
            sw += weight[l]
        sumw[g] = sw
        scale[g] = make_qx_quants(xb[16 * g:16 * g + 16], weight, ln[16 * g:16 * g + 16], 4, trials)
    d_block = make_qx_quants(scale[:16], sumw[:16], iw[LS, :16], 32, trials)
    _transpose_in(xb, f[XT])
    lt = iw[LT]
    for i in range(16):
        for g in range(16):
            lt[16 * i + g] = ln[16 * g + i] - 4
    _finish_block(f, iw, fp16_bits(d_block), ob)


# Written out per type, not made by a factory: numba caches no closures (see config.py).
@njit(**PARALLEL_JIT_OPTIONS)
def quantize_rows(x, out):
    """quantize_row_q3_K_ref on every row."""
    rows, n = x.shape
    nb = n // QK
    for r in prange(rows):
        f = np.empty((NF, QK), np.float32)
        iw = np.empty((NI, QK), np.int32)
        for b in range(nb):
            _encode_block_ref(x[r, b * QK:(b + 1) * QK], out[r, b * BLOCK_BYTES:(b + 1) * BLOCK_BYTES], f, iw)


@njit(**PARALLEL_JIT_OPTIONS)
def quantize_rows_imatrix(x, qw, out):
    """quantize_row_q3_K_impl on every row (qw: one importance weight per column)."""
    rows, n = x.shape
    nb = n // QK
    for r in prange(rows):
        f = np.empty((NF, QK), np.float32)
        iw = np.empty((NI, QK), np.int32)
        weight = np.empty(16, np.float32)
        trials = np.empty((3, NLANE), np.float32)
        for b in range(nb):
            _encode_block_imatrix(x[r, b * QK:(b + 1) * QK], qw[b * QK:(b + 1) * QK],
                                  out[r, b * BLOCK_BYTES:(b + 1) * BLOCK_BYTES], f, iw, weight, trials)


@njit(**JIT_OPTIONS)
def _decode_block(ob, y):
    d = fp16_to_f32(np.int32(ob[108]) | (np.int32(ob[109]) << 8))
    for e in range(QK):
        j = e // 16
        if j < 8:
            low = np.int32(ob[96 + j]) & 15
        else:
            low = np.int32(ob[96 + j - 8]) >> 4
        sc = (low | (((np.int32(ob[104 + j % 4]) >> (2 * (j // 4))) & 3) << 4)) - 32
        q = (np.int32(ob[32 + 32 * (e // 128) + e % 32]) >> (2 * ((e % 128) // 32))) & 3
        if (np.int32(ob[e % 32]) >> (e // 32)) & 1 == 0:
            q -= 4
        y[e] = (d * np.float32(sc)) * np.float32(q)


@njit(**PARALLEL_JIT_OPTIONS)
def dequantize_rows(data, out):
    """dequantize_row_q3_K: (d * (scale - 32)) * q with q in [-4, 3]."""
    rows, n = out.shape
    nb = n // QK
    for r in prange(rows):
        for b in range(nb):
            _decode_block(data[r, b * BLOCK_BYTES:(b + 1) * BLOCK_BYTES], out[r, b * QK:(b + 1) * QK])
