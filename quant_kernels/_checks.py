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


def find_nonfinite(x: np.ndarray) -> tuple[int, tuple[int, int] | None]:
    """Count NaN/inf in a 2-D float32 array; return (count, (row, col) of the first or None)."""
    rows = x.shape[0]
    counts = np.zeros(rows, dtype=np.int64)
    first_col = np.empty(rows, dtype=np.int64)
    _nonfinite_per_row(x, counts, first_col)
    total = int(counts.sum())
    if total == 0:
        return 0, None
    r = int(np.flatnonzero(counts)[0])
    return total, (r, int(first_col[r]))
