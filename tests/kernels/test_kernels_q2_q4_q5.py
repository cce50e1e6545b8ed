"""Q2_K, Q4_K and Q5_K kernels against ggml (the oracle), byte for byte, and round trips."""
from __future__ import annotations

import importlib

import numba
import numpy as np
import oracle
import pytest
from gguf import GGMLQuantizationType
from gguf.quants import dequantize as gguf_dequantize
from kquant_cases import (
    assert_same_bytes,
    describe_mismatch,
    input_families,
    random_imatrix,
    type_size,
)

import quant_kernels

TYPES = ["Q2_K", "Q4_K", "Q5_K"]
FAMILIES = input_families(n=2048, rows=32)  # 256 KB per family; 8 blocks per row





def _degenerate_groups(group: int, count: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """All-negative heavy-tailed groups with sparse weights: the searches then accept a min above
    the group's max, trial levels overflow nearest_int's range, and a group can end with a
    negative scale (so make_qp_quants wraps levels through uint8). Rows of 2048 weights."""
    rng = np.random.default_rng(seed)
    x = -np.exp(rng.standard_normal((count, group)) * 3.0)
    w = rng.random((count, group)) * (rng.random((count, group)) < 0.5)
    return x.astype(np.float32).reshape(-1, 2048), w.astype(np.float32).reshape(-1, 2048)


@pytest.mark.parametrize("qtype", TYPES)
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_reference_bytes_match_ggml(qtype: str, family: str) -> None:
    assert_same_bytes(FAMILIES[family], qtype)


@pytest.mark.parametrize("qtype", TYPES)
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_imatrix_bytes_match_ggml(qtype: str, family: str) -> None:
    x = FAMILIES[family]
    assert_same_bytes(x, qtype, random_imatrix(x.shape[1], seed=len(family)))


@pytest.mark.parametrize("qtype", TYPES)
@pytest.mark.parametrize("shape", [(1, 256), (3, 256), (2, 256 * 9), (40, 768)])
def test_block_counts_match_ggml(qtype: str, shape: tuple[int, int]) -> None:
    """One block, one-block rows, odd block counts per row, many rows (threads split rows)."""
    rng = np.random.default_rng(shape[0] * 1000 + shape[1])
    x = (rng.standard_t(4, shape) * 0.02).astype(np.float32)
    assert_same_bytes(x, qtype)
    assert_same_bytes(x, qtype, random_imatrix(shape[1], seed=shape[1]))


@pytest.mark.parametrize("qtype", TYPES)
def test_imatrix_degenerate_searches_match_ggml(qtype: str) -> None:
    group = 16 if qtype == "Q2_K" else 32
    x, w = _degenerate_groups(group, 2048, seed=7)
    for row, qw in zip(x, w):
        assert_same_bytes(row[None, :], qtype, qw)
    assert_same_bytes(x, qtype)


@pytest.mark.parametrize("qtype", TYPES)
def test_tiny_range_groups_match_ggml(qtype: str) -> None:
    """Groups whose range is a few subnormal steps, beside ordinary groups in the same tile: the
    search's iscale overflows to inf there and nearest_int sees inf and NaN, which the float-domain
    levels must not (the tile takes the integer path for such a step); a flat group too."""
    rng = np.random.default_rng(11)
    x = (rng.standard_normal((8, 2048)) * 0.02).astype(np.float32)
    tiny = np.float32(1e-45) * rng.integers(0, 4, (8, 2048)).astype(np.float32)
    group = 16 if qtype == "Q2_K" else 32
    cols = (np.arange(2048) // group) % 5 == 2  # every fifth group of each row is tiny
    x[:, cols] = tiny[:, cols] * np.where(rng.random((8, 1)) < 0.5, 1, -1).astype(np.float32)
    x[3, 64:96] = np.float32(3e-38)  # and a flat one
    assert_same_bytes(x, qtype)
    assert_same_bytes(x, qtype, random_imatrix(2048, seed=5))


@pytest.mark.parametrize("qtype", TYPES)
def test_kernels_write_every_output_byte(qtype: str) -> None:
    """Called directly on a buffer full of junk, the row kernels still produce ggml's bytes."""
    kernels = importlib.import_module(f"quant_kernels.{quant_kernels.resolve(qtype).module}")
    x = np.ascontiguousarray(FAMILIES["student_t3"][:5, :768])
    qw = random_imatrix(768, seed=2)
    for imatrix in (None, qw):
        out = np.full((5, 3 * type_size(qtype)), 0xA5, np.uint8)
        if imatrix is None:
            kernels.quantize_rows(x, out)
        else:
            kernels.quantize_rows_imatrix(x, imatrix, out)
        ref = oracle.quantize(x, qtype, imatrix)
        msg = describe_mismatch(out, ref, type_size(qtype))
        assert not msg, msg


@pytest.mark.parametrize("qtype", TYPES)
def test_imatrix_all_zero_weights_match_ggml(qtype: str) -> None:
    x = FAMILIES["gauss_0.02"]
    assert_same_bytes(x, qtype, np.zeros(x.shape[1], np.float32))


@pytest.mark.parametrize("qtype", TYPES)
@pytest.mark.parametrize("family", ["gauss_0.02", "student_t3", "outliers", "mixed_zero_const", "fp16_subnormal"])
def test_dequantize_matches_gguf_and_ggml(qtype: str, family: str) -> None:
    x = FAMILIES[family]
    for imatrix in (None, random_imatrix(x.shape[1], seed=3)):
        data = oracle.quantize(x, qtype, imatrix)
        ours = quant_kernels.dequantize(data, qtype, x.shape)
        by_gguf = gguf_dequantize(data, GGMLQuantizationType[qtype]).astype(np.float32)
        by_ggml = oracle.dequantize(data, qtype, x.shape)
        np.testing.assert_array_equal(ours.view(np.uint32), by_ggml.view(np.uint32))
        np.testing.assert_array_equal(ours.view(np.uint32), by_gguf.view(np.uint32))


@pytest.mark.parametrize("qtype", TYPES)
def test_dequantize_arbitrary_bytes_matches_ggml(qtype: str) -> None:
    """Every bit pattern decodes as ggml does, including scales and d values no quantizer writes."""
    rng = np.random.default_rng(11)
    data = rng.integers(0, 256, (4, 3 * type_size(qtype)), dtype=np.uint8)
    for off in range(0, data.shape[1], type_size(qtype)):  # keep d finite so bits compare cleanly
        d_at = off + (80 if qtype == "Q2_K" else 0)
        data[:, d_at + 1] &= 0x7B
        data[:, d_at + 3] &= 0x7B
    shape = (4, 3 * 256)
    ours = quant_kernels.dequantize(data, qtype, shape)
    np.testing.assert_array_equal(ours.view(np.uint32), oracle.dequantize(data, qtype, shape).view(np.uint32))


@pytest.mark.parametrize("qtype", TYPES)
def test_thread_count_does_not_change_bytes(qtype: str) -> None:
    x = FAMILIES["student_t3"]
    qw = random_imatrix(x.shape[1], seed=1)
    before = quant_kernels.get_threads()
    try:
        quant_kernels.set_threads(1)
        one = quant_kernels.quantize(x, qtype), quant_kernels.quantize(x, qtype, imatrix=qw)
        quant_kernels.set_threads(numba.config.NUMBA_NUM_THREADS)
        many = quant_kernels.quantize(x, qtype), quant_kernels.quantize(x, qtype, imatrix=qw)
    finally:
        quant_kernels.set_threads(before)
    np.testing.assert_array_equal(one[0], many[0])
    np.testing.assert_array_equal(one[1], many[1])


@pytest.mark.parametrize("qtype,expected", [("Q2_K", 0.296), ("Q4_K", 0.0713), ("Q5_K", 0.0361)])
def test_round_trip_error_is_the_documented_one(qtype: str, expected: float) -> None:
    """Relative RMSE on N(0, 0.02) matches the figure in kquants.md to two digits."""
    rng = np.random.default_rng(5)
    x = (rng.standard_normal((64, 4096)) * 0.02).astype(np.float32)
    y = quant_kernels.dequantize(quant_kernels.quantize(x, qtype), qtype, x.shape)
    rel = float(np.sqrt(np.mean((y - x) ** 2)) / x.std())
    assert rel == pytest.approx(expected, rel=0.02)
