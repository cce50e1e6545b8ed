"""Exact upcasts of raw little-endian source bytes to float32, parallel over rows.

BF16 is the top half of a float32 (a shift); F16 and both FP8 flavours go through a table of the
float32 value of every code, which the caller passes in (``converter.safetensors_io`` builds the
tables so that NaN payloads match PyTorch's ``.float()``). F32 is a copy. Each kernel takes the
raw codes as a 2-D (rows, n) array and writes a C-contiguous float32 (rows, n) array, rows in
parallel: the conversion runs at memory speed on every core instead of one.

Like every parallel kernel here, these must be launched from one thread only (numba's
workqueue threading layer aborts when two threads launch parallel regions at once).
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange

from .config import PARALLEL_JIT_OPTIONS

__all__ = ["bf16_rows", "f32_rows", "table_rows"]


@njit(**PARALLEL_JIT_OPTIONS)
def bf16_rows(codes, out):
    """BF16 codes (uint16, rows x n) -> float32: the code is the float32's upper 16 bits."""
    rows, n = codes.shape
    bits = out.view(np.uint32)
    for r in prange(rows):
        for j in range(n):
            bits[r, j] = np.uint32(codes[r, j]) << np.uint32(16)


@njit(**PARALLEL_JIT_OPTIONS)
def table_rows(codes, table, out):
    """F16 (uint16) or FP8 (uint8) codes -> ``table[code]`` (the exact float32 of every code)."""
    rows, n = codes.shape
    for r in prange(rows):
        for j in range(n):
            out[r, j] = table[codes[r, j]]


@njit(**PARALLEL_JIT_OPTIONS)
def f32_rows(words, out):
    """F32 source words (uint32, rows x n) copied bit for bit (NaN payloads kept)."""
    rows, n = words.shape
    bits = out.view(np.uint32)
    for r in prange(rows):
        for j in range(n):
            bits[r, j] = words[r, j]
