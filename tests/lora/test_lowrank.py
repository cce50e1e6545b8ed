"""The LoRA delta product is deterministic (same bits for any thread count) and float64-accurate."""
from __future__ import annotations

import numba
import numpy as np
import pytest

from converter.lora.lowrank import lowrank_product


def _inputs(rows=300, rank=16, cols=260, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((rows, rank)).astype(np.float32) * 0.01,
            rng.standard_normal((rank, cols)).astype(np.float32))


def test_equals_float64_sum_rounded_once():
    b, a = _inputs()
    ref = (b.astype(np.float64) @ a.astype(np.float64)).astype(np.float32)
    got = lowrank_product(b, a)
    # float64 accumulation of exact products: at most a last-bit difference from BLAS's float64 order
    assert np.max(np.abs(got.view(np.int32) - ref.view(np.int32))) <= 1
    assert np.allclose(got, b @ a, rtol=1e-5, atol=1e-7)


def test_same_bits_for_any_thread_count():
    b, a = _inputs(rows=97, rank=8, cols=512, seed=1)
    before = numba.get_num_threads()
    try:
        numba.set_num_threads(1)
        one = lowrank_product(b, a)
        numba.set_num_threads(numba.config.NUMBA_NUM_THREADS)
        many = lowrank_product(b, a)
    finally:
        numba.set_num_threads(before)
    assert np.array_equal(one.view(np.uint32), many.view(np.uint32))


def test_writes_into_a_row_slice():
    b, a = _inputs(rows=10, rank=4, cols=64)
    out = np.full((30, 64), np.nan, np.float32)
    lowrank_product(b, a, out=out[10:20])
    assert np.isnan(out[:10]).all() and np.isnan(out[20:]).all()
    assert np.array_equal(out[10:20], lowrank_product(b, a))


def test_shape_errors():
    b, a = _inputs(rows=4, rank=3, cols=8)
    with pytest.raises(ValueError, match=r"cannot multiply B \[4, 3\] by A \[4, 8\]"):
        lowrank_product(b, np.zeros((4, 8), np.float32))
    with pytest.raises(ValueError, match=r"output must be a C-contiguous float32 array of shape \[4, 8\]"):
        lowrank_product(b, a, out=np.zeros((4, 9), np.float32))
