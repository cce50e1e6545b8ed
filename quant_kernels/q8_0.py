"""Q8_0 kernels: ggml's ``quantize_row_q8_0_ref`` / ``dequantize_row_q8_0``, byte for byte.

Block of 32 weights, 34 bytes: d half@0, qs int8[32]@2. ``d = amax / 127`` and
``q = roundf(x * (1/d))`` with C's roundf (half away from zero). ggml ignores importance
weights for Q8_0, so there is no imatrix variant.

Divisions are written ``np.true_divide(a, b)``: the same IEEE float32 division as ``a / b``,
without numba's Python-style zero-divisor check, whose branch keeps loops from vectorizing.
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange

from ._numeric import bits_f32, f32_bits, fp16_bits, fp16_to_f32, opaque, roundf
from ._source import load_rows, n_chunks, rows_per_chunk, scales_bad
from .config import JIT_OPTIONS, PARALLEL_JIT_OPTIONS
from .types import GGMLQuantizationType, block_geometry

__all__ = ["quantize_rows", "dequantize_rows", "encode_rows", "quantize_codes"]

QK, BLOCK_BYTES = block_geometry(GGMLQuantizationType.Q8_0)  # 32, 34
SCALE_OFF0, SCALE_OFF1 = 0, -1  # the float16 d of every block (quant_kernels._source.scales_bad)

# The encoder indexes with unsigned integers (np.uint64 only, never mixed with signed ones, which
# numba would promote to float64): see quant_kernels._source's docstring for why.
_U = np.uint64
_QK = _U(QK)
_BB = _U(BLOCK_BYTES)
_ABS = np.int32(0x7FFFFFFF)


@njit(**JIT_OPTIONS)
def _encode_row(x, ob, sc, db):
    """quantize_row_q8_0_ref on one row: x float32 (n,) into ob uint8 (n // 32 * 34,); sc is
    float32 scratch of 2 * (n // 32), db uint16 scratch of n // 32.

    Three passes over the row's blocks, each a loop that vectorizes (same operations per block
    as ggml, only not interleaved the same way):

    1. amax: ggml's ``amax = MAX(amax, fabsf(x))`` taken as the largest ``|x|`` bit pattern.
       Non-negative floats order as their bits do, so for finite (and infinite) input the value
       is ggml's, and an integer max reduction vectorizes where a float one cannot without
       fastmath. (NaN, which every caller refuses before encoding, would give a NaN d here.)
    2. per block, across blocks: d = amax / 127, id = d ? 1/d : 0, and d's float16 bits;
    3. q = roundf(x * id).
    """
    nb = _U(x.shape[0]) // _QK
    qk = opaque(_QK)  # keeps pass 1's inner loop a loop: see _numeric.opaque
    for b in range(nb):
        xo = b * _QK
        m = np.int32(0)
        for j in range(qk):
            m = max(m, f32_bits(x[xo + j]) & _ABS)
        sc[b] = bits_f32(m)
    for b in range(nb):
        d = np.true_divide(sc[b], np.float32(127.0))
        sc[nb + b] = np.true_divide(np.float32(1.0), d) if d != np.float32(0.0) else np.float32(0.0)
        db[b] = fp16_bits(d)
    for b in range(nb):
        xo = b * _QK
        oo = b * _BB
        inv = sc[nb + b]
        dbits = db[b]
        ob[oo] = np.uint8(dbits & 0xFF)
        ob[oo + _U(1)] = np.uint8(dbits >> 8)
        for j in range(_QK):
            ob[oo + _U(2) + j] = np.uint8(np.int32(roundf(x[xo + j] * inv)) & 0xFF)


@njit(**JIT_OPTIONS)
def _encode_row_range(x, out, r0, r1):
    """Rows r0..r1 of x into out, with one set of scratch."""
    nb = x.shape[1] // QK
    sc = np.empty(2 * nb, np.float32)
    db = np.empty(nb, np.uint16)
    for r in range(r0, r1):
        _encode_row(x[r], out[r], sc, db)


@njit(**JIT_OPTIONS)
def encode_rows(x, qw, out):
    """quantize_row_q8_0_ref on every row of x (rows, n) into out (rows, row_bytes), serially.
    ``qw`` is accepted for a uniform interface and ignored, as ggml ignores it for Q8_0."""
    _encode_row_range(x, out, 0, x.shape[0])


# Written out per type, not made by a factory: numba caches no closures (see config.py).
@njit(**PARALLEL_JIT_OPTIONS)
def quantize_rows(x, out):
    """quantize_row_q8_0_ref on every row, in parallel tasks of rows_per_chunk rows."""
    rows, n = x.shape
    rpc = rows_per_chunk(n)
    for c in prange(n_chunks(rows, n)):
        r0 = c * rpc
        _encode_row_range(x, out, r0, min(rows, r0 + rpc))


@njit(**PARALLEL_JIT_OPTIONS)
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
    d = fp16_to_f32(np.int32(ob[0]) | (np.int32(ob[1]) << 8))
    for j in range(QK):
        y[j] = np.float32(np.int8(ob[2 + j])) * d


@njit(**PARALLEL_JIT_OPTIONS)
def dequantize_rows(data, out):
    """dequantize_row_q8_0: q * d."""
    rows, n = out.shape
    nb = n // QK
    for r in prange(rows):
        for b in range(nb):
            _decode_block(data[r, b * BLOCK_BYTES:(b + 1) * BLOCK_BYTES], out[r, b * QK:(b + 1) * QK])
