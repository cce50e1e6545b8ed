"""Q6_K kernels: ggml's ``quantize_row_q6_K_ref`` / ``quantize_row_q6_K_impl``, byte for byte.

Block of 256 weights, 210 bytes: ql u8[128]@0, qh u8[64]@128, scales int8[16]@192, d half@208.
Each group of 16 gets a signed 6-bit level search (``make_qx_quants``, nmax 32) weighted by x^2,
or by the per-column importance weights when an imatrix is given (ggml passes those unchanged:
its sigma2 weighting for Q6_K is commented out). The 16 group scales are then stored as int8
relative to the block's largest one.

``make_qx_quants`` also serves Q3_K's importance-weighted path, which imports it from here.

Divisions are written ``np.true_divide(a, b)``: the same IEEE float32 division as ``a / b``,
without numba's Python-style zero-divisor check, whose branch keeps loops from vectorizing.
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange

from ._numeric import fp16_bits, fp16_to_f32, nint
from .config import JIT_OPTIONS, PARALLEL_JIT_OPTIONS
from .types import GGMLQuantizationType, block_geometry

__all__ = ["quantize_rows", "quantize_rows_imatrix", "dequantize_rows"]

QK, BLOCK_BYTES = block_geometry(GGMLQuantizationType.Q6_K)  # 256, 210
GROUP_MAX_EPS = np.float32(1e-15)


NTRIAL = 19  # ggml's initial inverse scale (step 0) and steps -9..-1, 1..9
NLANE = 24  # trials padded to whole SIMD vectors; the padding lanes are never read


@njit(**JIT_OPTIONS)
def make_qx_quants(x, w, L, nmax, trials):
    """Weighted signed-level search over one group: L[i] = nmax + l, returns the group scale.

    ggml tries the inverse scales -(nmax + 0.1*step)/max for step -9..9 and keeps the one
    maximising (sum w x l)^2 / sum w l^2. Each trial's sums are accumulated over i in ggml's
    order, so evaluating all 19 trials side by side (a loop over trials that vectorizes) gives
    the same float32 sums; the accept decisions then run in ggml's order. ``trials`` is float32
    scratch of shape (3, NLANE). All-|x| < 1e-15 gives L = 0 and scale 0.
    """
    n = x.shape[0]
    mx = np.float32(0.0)
    amax = np.float32(0.0)
    for i in range(n):
        ax = np.abs(x[i])
        if ax > amax:
            amax = ax
            mx = x[i]
    if amax < GROUP_MAX_EPS:
        for i in range(n):
            L[i] = 0
        return np.float32(0.0)
    lo = np.int32(-nmax)
    hi = np.int32(nmax - 1)
    fnmax = np.float32(nmax)
    isc = trials[0]
    slx = trials[1]
    sl2 = trials[2]
    for t in range(NLANE):
        # step 0 gives -(nmax + 0)/max, bit-identical to ggml's initial -nmax/max
        isc[t] = np.true_divide(-(fnmax + np.float32(0.1) * np.float32(t - 9)), mx)
        slx[t] = np.float32(0.0)
        sl2[t] = np.float32(0.0)
    for i in range(n):
        xi = x[i]
        wi = w[i]
        wx = wi * xi
        for t in range(NLANE):
            fl = np.float32(min(hi, max(lo, nint(isc[t] * xi))))
            slx[t] += wx * fl
            sl2[t] += (wi * fl) * fl
    sumlx = slx[9]
    suml2 = sl2[9]
    scale = np.true_divide(sumlx, suml2) if suml2 != np.float32(0.0) else np.float32(0.0)
    best = scale * sumlx
    chosen = 9
    for t in range(NTRIAL):
        if t == 9:
            continue
        sumlx = slx[t]
        suml2 = sl2[t]
        if suml2 > np.float32(0.0) and sumlx * sumlx > best * suml2:
            scale = np.true_divide(sumlx, suml2)
            best = scale * sumlx
            chosen = t
    iscale = isc[chosen]
    for i in range(n):
        L[i] = min(hi, max(lo, nint(iscale * x[i]))) + np.int32(nmax)
    return scale


@njit(**JIT_OPTIONS)
def _encode_block(xb, w, ob, L, scales, trials):
    """Quantize 256 weights (xb) into one 210-byte block (ob); w holds the 256 search weights."""
    max_scale = np.float32(0.0)
    max_abs_scale = np.float32(0.0)
    for g in range(16):
        s = make_qx_quants(xb[16 * g:16 * g + 16], w[16 * g:16 * g + 16], L[16 * g:16 * g + 16], 32, trials)
        scales[g] = s
        a = np.abs(s)
        if a > max_abs_scale:
            max_abs_scale = a
            max_scale = s
    if max_abs_scale < GROUP_MAX_EPS:
        for k in range(BLOCK_BYTES):
            ob[k] = 0
        return
    iscale = np.true_divide(np.float32(-128.0), max_scale)
    dbits = fp16_bits(np.true_divide(np.float32(1.0), iscale))
    ob[208] = np.uint8(dbits & 0xFF)
    ob[209] = np.uint8(dbits >> 8)
    d = fp16_to_f32(dbits)
    for g in range(16):
        sc = np.int32(np.int8(min(np.int32(127), nint(iscale * scales[g]))))  # stored as int8_t
        ob[192 + g] = np.uint8(sc & 0xFF)
        dg = d * np.float32(sc)
        if dg == np.float32(0.0):
            continue
        for i in range(16 * g, 16 * g + 16):
            L[i] = min(np.int32(31), max(np.int32(-32), nint(np.true_divide(xb[i], dg)))) + 32
    for h in range(2):
        for l in range(32):
            b = 128 * h + l
            q1 = np.int32(L[b])
            q2 = np.int32(L[b + 32])
            q3 = np.int32(L[b + 64])
            q4 = np.int32(L[b + 96])
            ob[64 * h + l] = np.uint8((q1 & 15) | ((q3 & 15) << 4))
            ob[64 * h + 32 + l] = np.uint8((q2 & 15) | ((q4 & 15) << 4))
            ob[128 + 32 * h + l] = np.uint8((q1 >> 4) | ((q2 >> 4) << 2) | ((q3 >> 4) << 4) | ((q4 >> 4) << 6))


# Written out per type, not made by a factory: numba caches no closures (see config.py).
@njit(**PARALLEL_JIT_OPTIONS)
def quantize_rows(x, out):
    """quantize_row_q6_K_ref on every row; search weights are x^2."""
    rows, n = x.shape
    nb = n // QK
    for r in prange(rows):
        L = np.empty(QK, np.int8)
        w = np.empty(QK, np.float32)
        scales = np.empty(16, np.float32)
        trials = np.empty((3, NLANE), np.float32)
        for b in range(nb):
            xb = x[r, b * QK:(b + 1) * QK]
            for i in range(QK):
                w[i] = xb[i] * xb[i]
            _encode_block(xb, w, out[r, b * BLOCK_BYTES:(b + 1) * BLOCK_BYTES], L, scales, trials)


@njit(**PARALLEL_JIT_OPTIONS)
def quantize_rows_imatrix(x, qw, out):
    """quantize_row_q6_K_impl on every row; search weights are the imatrix columns as given."""
    rows, n = x.shape
    nb = n // QK
    for r in prange(rows):
        L = np.empty(QK, np.int8)
        scales = np.empty(16, np.float32)
        trials = np.empty((3, NLANE), np.float32)
        for b in range(nb):
            _encode_block(x[r, b * QK:(b + 1) * QK], qw[b * QK:(b + 1) * QK],
                          out[r, b * BLOCK_BYTES:(b + 1) * BLOCK_BYTES], L, scales, trials)


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
