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

from ._numeric import fp16_bits, fp16_to_f32, roundf
from .config import JIT_OPTIONS, PARALLEL_JIT_OPTIONS
from .types import GGMLQuantizationType, block_geometry

__all__ = ["quantize_rows", "dequantize_rows"]

QK, BLOCK_BYTES = block_geometry(GGMLQuantizationType.Q8_0)  # 32, 34


@njit(**JIT_OPTIONS)
def _encode_block(xb, ob):
    amax = np.float32(0.0)
    for j in range(QK):
        amax = max(amax, np.abs(xb[j]))
    d = np.true_divide(amax, np.float32(127.0))
    inv = np.true_divide(np.float32(1.0), d) if d != np.float32(0.0) else np.float32(0.0)
    dbits = fp16_bits(d)
    ob[0] = np.uint8(dbits & 0xFF)
    ob[1] = np.uint8(dbits >> 8)
    for j in range(QK):
        ob[2 + j] = np.uint8(np.int32(roundf(xb[j] * inv)) & 0xFF)


# Written out per type, not made by a factory: numba caches no closures (see config.py).
@njit(**PARALLEL_JIT_OPTIONS)
def quantize_rows(x, out):
    """quantize_row_q8_0_ref on every row."""
    rows, n = x.shape
    nb = n // QK
    for r in prange(rows):
        for b in range(nb):
            _encode_block(x[r, b * QK:(b + 1) * QK], out[r, b * BLOCK_BYTES:(b + 1) * BLOCK_BYTES])


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
