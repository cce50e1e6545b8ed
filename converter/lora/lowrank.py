"""B @ A for LoRA deltas with a summation order fixed by us, not by the BLAS library.

A merged release must be re-derivable anywhere (``verify --source``), so the merged weights must
be the same bits on every machine. BLAS picks its kernel (and so its summation order) by CPU, so
``numpy.matmul`` in float32 can differ in the last bit between machines. Here every product of two
float32 values is exact in float64, the rank-r sum runs in float64 in index order, and the result
is rounded once to float32: deterministic, and more accurate than a float32 GEMM.
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange


@njit(parallel=True, cache=True, fastmath=False, nogil=True)
def _lowrank_into(b, a, out):
    rows, rank = b.shape
    cols = a.shape[1]
    for i in prange(rows):
        acc = np.zeros(cols, dtype=np.float64)
        for k in range(rank):
            bk = np.float64(b[i, k])
            for j in range(cols):
                acc[j] += bk * np.float64(a[k, j])
        for j in range(cols):
            out[i, j] = np.float32(acc[j])


def lowrank_product(b: np.ndarray, a: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """float32 ``B @ A`` (B [out, r], A [r, in]) computed deterministically; writes into ``out``
    (a C-contiguous float32 [out, in] array or row slice of one) when given."""
    b = np.ascontiguousarray(b, dtype=np.float32)
    a = np.ascontiguousarray(a, dtype=np.float32)
    if b.ndim != 2 or a.ndim != 2 or b.shape[1] != a.shape[0]:
        raise ValueError(f"cannot multiply B {list(b.shape)} by A {list(a.shape)}")
    shape = (b.shape[0], a.shape[1])
    if out is None:
        out = np.empty(shape, dtype=np.float32)
    elif out.shape != shape or out.dtype != np.float32 or not out.flags.c_contiguous:
        raise ValueError(f"output must be a C-contiguous float32 array of shape {list(shape)}")
    _lowrank_into(b, a, out)
    return out
