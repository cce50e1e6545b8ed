"""Tensors below quant_kernels.api.SERIAL_BELOW elements are encoded on the calling thread alone
(a parallel region costs more than they do): same bytes as through a region, the caller's
thread count restored afterwards, errors included; larger tensors keep every thread."""
from __future__ import annotations

import numba
import numpy as np
import pytest

import quant_kernels
from quant_kernels import api

TYPES = ["F32", "F16", "BF16", "Q8_0", "Q4_K", "Q6_K", "Q2_K"]


@pytest.fixture
def two_threads():
    if numba.config.NUMBA_NUM_THREADS < 2:
        pytest.fail("these tests need numba to allow at least 2 threads")
    before = numba.get_num_threads()
    numba.set_num_threads(2)
    yield
    numba.set_num_threads(before)


def _spy_threads(monkeypatch) -> list[int]:
    """Thread counts seen where the kernels are entered (both paths of quantize and quantize_raw)."""
    seen: list[int] = []
    for name in ("_encode_float", "_quantize_fused"):
        real = getattr(api, name)

        def spy(*args, _real=real, **kw):
            seen.append(numba.get_num_threads())
            return _real(*args, **kw)

        monkeypatch.setattr(api, name, spy)
    return seen


@pytest.mark.parametrize("qtype", TYPES)
def test_small_tensors_run_on_the_calling_thread_with_the_same_bytes(two_threads, monkeypatch, qtype):
    x = (np.random.default_rng(3).standard_normal((2, 1024)) * 0.02).astype(np.float32)
    assert x.size < api.SERIAL_BELOW
    monkeypatch.setattr(api, "SERIAL_BELOW", 0)  # every call through a parallel region
    parallel = quant_kernels.quantize(x, qtype).tobytes()
    parallel_raw = quant_kernels.quantize_raw(x.view(np.uint32), "f32", qtype).tobytes()
    monkeypatch.undo()
    seen = _spy_threads(monkeypatch)
    assert quant_kernels.quantize(x, qtype).tobytes() == parallel
    assert quant_kernels.quantize_raw(x.view(np.uint32), "f32", qtype).tobytes() == parallel_raw == parallel
    assert seen == [1, 1]
    assert numba.get_num_threads() == 2


def test_large_tensors_keep_every_thread(two_threads, monkeypatch):
    x = (np.random.default_rng(4).standard_normal((api.SERIAL_BELOW // 256, 256)) * 0.02).astype(np.float32)
    seen = _spy_threads(monkeypatch)
    quant_kernels.quantize(x, "Q8_0")
    quant_kernels.quantize_raw(x.view(np.uint32), "f32", "F16")
    assert seen == [2, 2]


def test_the_thread_count_comes_back_after_an_error(two_threads):
    x = np.zeros((1, 256), np.float32)
    x[0, 7] = np.nan
    with pytest.raises(quant_kernels.NonFiniteError):
        quant_kernels.quantize(x, "Q4_K")
    with pytest.raises(quant_kernels.NonFiniteError):
        quant_kernels.quantize_raw(x.view(np.uint32), "f32", "F16")
    assert numba.get_num_threads() == 2
