"""Input checks that run at memory speed (numba, parallel over rows)."""
from __future__ import annotations

import numpy as np
from numba import njit, prange

from .config import PARALLEL_JIT_OPTIONS


@njit(**PARALLEL_JIT_OPTIONS)
def _nonfinite_per_row(x, counts, first_col):
    rows, n = x.shape
    for r in prange(rows):
        c = 0
        first = -1
        for j in range(n):
            if not np.isfinite(x[r, j]):
                if first < 0:
                    first = j
                c += 1
        counts[r] = c
        first_col[r] = first


@njit(**PARALLEL_JIT_OPTIONS)
def _scan_per_row(x, counts, first_col, amax):
    """NaN/inf count, first non-finite column and largest finite magnitude of every row, in one pass."""
    rows, n = x.shape
    for r in prange(rows):
        c = 0
        first = -1
        m = np.float32(0.0)
        for j in range(n):
            v = x[r, j]
            if not np.isfinite(v):
                if first < 0:
                    first = j
                c += 1
            else:
                a = abs(v)
                if a > m:
                    m = a
        counts[r] = c
        first_col[r] = first
        amax[r] = m


def find_nonfinite(x: np.ndarray) -> tuple[int, tuple[int, int] | None]:
    """Count NaN/inf in a 2-D float32 array; return (count, (row, col) of the first or None)."""
    total, where, _ = scan(x)
    return total, where


def scan(x: np.ndarray) -> tuple[int, tuple[int, int] | None, float]:
    """(NaN/inf count, (row, col) of the first or None, largest finite magnitude) of a 2-D float32 array."""
    rows = x.shape[0]
    counts = np.zeros(rows, dtype=np.int64)
    first_col = np.empty(rows, dtype=np.int64)
    amax = np.zeros(rows, dtype=np.float32)
    if rows:
        _scan_per_row(x, counts, first_col, amax)
    largest = float(amax.max()) if rows else 0.0
    total = int(counts.sum())
    if total == 0:
        return 0, None, largest
    r = int(np.flatnonzero(counts)[0])
    return total, (r, int(first_col[r])), largest
