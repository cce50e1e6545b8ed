"""Shared pieces of the fused quantizers: raw source codes in, encoded bytes out.

Every type module has a ``quantize_codes(codes, kind, table, qw, limit, out, flags)`` kernel that
takes the source tensor's raw little-endian codes as a 2-D (rows, n) array and, in one parallel
region over chunks of whole rows, upcasts each chunk into a small float32 buffer of its own
(``load_rows``: it stays in cache), checks it, encodes it, and checks the block scales it wrote.
No float32 copy of the tensor is ever made and nothing else passes over it.

``kind`` says how a code becomes a float32 (bit-exact, as ``quant_kernels.upcast`` does):

* ``KIND_BF16``: uint16 codes, the float32's upper 16 bits;
* ``KIND_TABLE``: uint16 (F16) or uint8 (FP8) codes, ``table[code]``;
* ``KIND_F32``: uint32 words, the float32's bits.

The checks only *detect*: each chunk's entry in ``flags`` gets ``FLAG_NONFINITE`` (a NaN or inf),
``FLAG_RANGE`` (a magnitude above ``limit``) or ``FLAG_SCALE`` (a float16 block scale that came
out inf or NaN), and a chunk that fails its input checks is not encoded. The caller
(``quant_kernels.api``) then runs the exact, whole-tensor checks to name the value and position
in its error. Flags never change the bytes of a tensor that passes.

Indices are unsigned (``np.uint64``) in the hot loops: numba adds a negative-index wraparound
select to every signed index, which keeps LLVM from vectorizing the loop.
"""
from __future__ import annotations

import numpy as np
from numba import njit

from ._numeric import bits_f32
from .config import JIT_OPTIONS

KIND_BF16 = 0
KIND_TABLE = 1
KIND_F32 = 2

FLAG_NONFINITE = 1
FLAG_RANGE = 2
FLAG_SCALE = 4

# float32 weights per chunk of rows (at least one row): 64 KB of float32, which stays in a core's
# L2 cache between the upcast and the encoder, and small enough that 16 threads get many chunks
# of a 3072 x 3072 tensor each (the loop hands them out dynamically).
CHUNK_WEIGHTS = 16384

_U = np.uint64
_EXP_MASK = np.uint32(0x7F800000)
_ABS_MASK = np.uint32(0x7FFFFFFF)


@njit(**JIT_OPTIONS)
def rows_per_chunk(n):
    """Rows per chunk for rows of n weights (at least one)."""
    return max(1, CHUNK_WEIGHTS // max(1, n))


@njit(**JIT_OPTIONS)
def n_chunks(rows, n):
    rpc = rows_per_chunk(n)
    return (rows + rpc - 1) // rpc


@njit(**JIT_OPTIONS)
def load_rows(codes, kind, table, r0, r1, x, limit):
    """Upcast rows r0:r1 of ``codes`` into the float32 buffer ``x`` (flat, (r1 - r0) * n long) and
    check them; returns 0 or FLAG_NONFINITE | FLAG_RANGE (magnitudes above ``limit``).

    The check is one integer max over the magnitudes' bits (non-negative floats order as their
    bits, and NaN and inf are the bit patterns from 0x7F800000 up): an integer reduction
    vectorizes, a float max would not without fastmath."""
    n = _U(codes.shape[1])
    bits = x.view(np.uint32)
    top = np.uint32(0)
    for r in range(r0, r1):
        base = _U(r - r0) * n
        ru = _U(r)
        if kind == KIND_BF16:
            for j in range(n):
                b = np.uint32(codes[ru, j]) << np.uint32(16)
                bits[base + j] = b
                top = max(top, b & _ABS_MASK)
        elif kind == KIND_TABLE:
            for j in range(n):
                x[base + j] = table[_U(codes[ru, j])]
            for j in range(n):
                top = max(top, bits[base + j] & _ABS_MASK)
        else:
            for j in range(n):
                b = np.uint32(codes[ru, j])
                bits[base + j] = b
                top = max(top, b & _ABS_MASK)
    if top >= _EXP_MASK:
        return np.int32(FLAG_NONFINITE)
    if bits_f32(top) > np.float32(limit):  # the largest magnitude, as the float32 it is
        return np.int32(FLAG_RANGE)
    return np.int32(0)


@njit(**JIT_OPTIONS)
def scales_bad(out, r0, r1, block_bytes, off0, off1):
    """FLAG_SCALE if a float16 scale field (at byte ``off0``, and ``off1`` unless negative, of every
    block) of rows r0:r1 of ``out`` is inf or NaN, else 0."""
    nb = _U(out.shape[1]) // _U(block_bytes)
    bad = np.uint32(0)
    for r in range(r0, r1):
        ru = _U(r)
        for b in range(nb):
            o = b * _U(block_bytes)
            hi = np.uint32(out[ru, o + _U(off0) + _U(1)])
            bad |= np.uint32((hi & np.uint32(0x7C)) == np.uint32(0x7C))
            if off1 >= 0:
                hi = np.uint32(out[ru, o + _U(off1) + _U(1)])
                bad |= np.uint32((hi & np.uint32(0x7C)) == np.uint32(0x7C))
    return np.int32(FLAG_SCALE) if bad else np.int32(0)
