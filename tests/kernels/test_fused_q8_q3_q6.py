"""The fused source-code kernels (``quantize_codes``) and the serial ``encode_rows`` of Q8_0, Q3_K
and Q6_K give the bytes of ``quantize_rows`` / ``quantize_rows_imatrix`` (which
test_kernels_q8_q3_q6.py checks against ggml), and flag bad chunks as quant_kernels._source says."""
from __future__ import annotations

import numpy as np
import pytest
from kquant_cases import random_imatrix

import quant_kernels
from quant_kernels import q3_k, q6_k, q8_0
from quant_kernels._source import (
    FLAG_NONFINITE,
    FLAG_RANGE,
    FLAG_SCALE,
    KIND_BF16,
    KIND_F32,
    KIND_TABLE,
    n_chunks,
    rows_per_chunk,
)

MODULES = {"Q8_0": q8_0, "Q3_K": q3_k, "Q6_K": q6_k}
TYPES = list(MODULES)
NO_TABLE = np.zeros(1, np.float32)
NO_IMATRIX = np.zeros(0, np.float32)
NO_LIMIT = np.float32(3e38)


def _x(rows: int, n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.standard_t(4, (rows, n)) * 0.02).astype(np.float32)


def _out(qtype: str, rows: int, n: int) -> np.ndarray:
    return np.full((rows, quant_kernels.row_nbytes(qtype, n)), 0xAA, np.uint8)


def _reference(qtype: str, x: np.ndarray, qw: np.ndarray) -> np.ndarray:
    """quantize_rows, or quantize_rows_imatrix for a K-quant given weights (Q8_0 ignores them)."""
    module = MODULES[qtype]
    out = _out(qtype, *x.shape)
    if qw.size and qtype != "Q8_0":
        module.quantize_rows_imatrix(x, qw, out)
    else:
        module.quantize_rows(x, out)
    return out


def _fused(qtype: str, codes: np.ndarray, kind: int, table: np.ndarray, qw: np.ndarray,
           limit: np.float32 = NO_LIMIT) -> tuple[np.ndarray, np.ndarray]:
    rows, n = codes.shape
    out = _out(qtype, rows, n)
    flags = np.full(n_chunks(rows, n), -1, np.int32)
    MODULES[qtype].quantize_codes(codes, kind, table, qw, limit, out, flags)
    return out, flags


@pytest.mark.parametrize("qtype", TYPES)
@pytest.mark.parametrize("n", [256, 512, 3072])
@pytest.mark.parametrize("rows", [1, 7, 33])
@pytest.mark.parametrize("imatrix", [False, True], ids=["ref", "imatrix"])
def test_f32_codes_and_encode_rows_match_quantize_rows(qtype: str, n: int, rows: int, imatrix: bool) -> None:
    x = _x(rows, n, seed=rows * 10_000 + n)
    qw = random_imatrix(n, seed=n + rows) if imatrix else NO_IMATRIX
    expected = _reference(qtype, x, qw)
    out, flags = _fused(qtype, x.view(np.uint32), KIND_F32, NO_TABLE, qw)
    assert np.array_equal(out, expected)
    assert not flags.any()
    serial = _out(qtype, rows, n)
    MODULES[qtype].encode_rows(x, qw, serial)
    assert np.array_equal(serial, expected)


@pytest.mark.parametrize("qtype", TYPES)
@pytest.mark.parametrize("imatrix", [False, True], ids=["ref", "imatrix"])
def test_bf16_codes_match_the_upcast_float32(qtype: str, imatrix: bool) -> None:
    x = _x(33, 512, seed=3)
    codes = (x.view(np.uint32) >> 16).astype(np.uint16)
    upcast = (codes.astype(np.uint32) << 16).view(np.float32)
    qw = random_imatrix(512, seed=4) if imatrix else NO_IMATRIX
    out, flags = _fused(qtype, codes, KIND_BF16, NO_TABLE, qw)
    assert np.array_equal(out, _reference(qtype, upcast, qw))
    assert not flags.any()


@pytest.mark.parametrize("qtype", TYPES)
def test_f16_table_codes_match_the_upcast_float32(qtype: str) -> None:
    x = _x(7, 3072, seed=5)
    codes = x.astype(np.float16).view(np.uint16)
    table = np.arange(65536, dtype=np.uint32).astype(np.uint16).view(np.float16).astype(np.float32)
    qw = random_imatrix(3072, seed=6)
    for w in (NO_IMATRIX, qw):
        out, flags = _fused(qtype, codes, KIND_TABLE, table, w)
        assert np.array_equal(out, _reference(qtype, table[codes], w))
        assert not flags.any()


def _chunk_of(row: int, n: int) -> int:
    return row // rows_per_chunk(n)


@pytest.mark.parametrize("qtype", TYPES)
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_input_flags_its_chunk_only(qtype: str, bad: float) -> None:
    rows, n = 33, 3072  # 5 rows per chunk: 7 chunks
    x = _x(rows, n, seed=7)
    x[12, 700] = bad
    out, flags = _fused(qtype, x.view(np.uint32), KIND_F32, NO_TABLE, NO_IMATRIX)
    hit = _chunk_of(12, n)
    assert flags[hit] == FLAG_NONFINITE
    assert not np.delete(flags, hit).any()
    rpc = rows_per_chunk(n)
    keep = np.ones(rows, bool)
    keep[hit * rpc:(hit + 1) * rpc] = False
    good = x[keep]
    assert np.array_equal(out[keep], _reference(qtype, good, NO_IMATRIX))


@pytest.mark.parametrize("qtype", TYPES)
def test_value_above_limit_flags_its_chunk(qtype: str) -> None:
    rows, n = 33, 3072
    x = _x(rows, n, seed=8)
    x = np.clip(x, -0.5, 0.5)
    x[30, 5] = -1.5  # magnitude above the limit: last chunk
    x[3, 9] = 1.0  # equal to the limit: not flagged
    limit = np.float32(1.0)
    out, flags = _fused(qtype, x.view(np.uint32), KIND_F32, NO_TABLE, NO_IMATRIX, limit)
    hit = _chunk_of(30, n)
    assert flags[hit] == FLAG_RANGE
    assert not np.delete(flags, hit).any()
    first = rows_per_chunk(n) * hit
    assert np.array_equal(out[:first], _reference(qtype, x[:first], NO_IMATRIX))


@pytest.mark.parametrize("qtype", TYPES)
def test_block_scale_overflowing_float16_flags_its_chunk(qtype: str) -> None:
    """A finite input whose block scale d rounds to inf in float16 (ggml would write inf)."""
    rows, n = 12, 3072
    x = _x(rows, n, seed=9)
    x[7, 300] = 1e9
    out, flags = _fused(qtype, x.view(np.uint32), KIND_F32, NO_TABLE, NO_IMATRIX)
    hit = _chunk_of(7, n)
    assert flags[hit] == FLAG_SCALE
    assert not np.delete(flags, hit).any()
    assert np.array_equal(out, _reference(qtype, x, NO_IMATRIX))  # flags never change bytes
