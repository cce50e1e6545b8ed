"""The fused kernels (raw source codes in, bytes out; quant_kernels._source) of the tile types, and
``quantize_raw``: same bytes as the row kernels (which test_kernels_q2_q4_q5 holds to ggml's), same
errors as ``quantize`` of the upcast tensor, whatever the source code width."""
from __future__ import annotations

import numpy as np
import pytest

import quant_kernels
from converter.safetensors_io import F8_E4M3_TO_F32, F16_TO_F32
from quant_kernels import NonFiniteError, q2_k, q4_k, q5_k
from quant_kernels._source import FLAG_NONFINITE, FLAG_RANGE, n_chunks, rows_per_chunk
from quant_kernels.errors import OverflowValueError

MODULES = {"Q2_K": (q2_k, 84), "Q4_K": (q4_k, 144), "Q5_K": (q5_k, 176)}
SHAPES = [(1, 256), (7, 512), (33, 3072), (5, 12288), (3, 768)]
NO_TABLE = np.zeros(1, np.float32)
NO_WEIGHTS = np.zeros(0, np.float32)
BIG = np.float32(3e38)


def _bf16(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    codes = (x.view(np.uint32) >> np.uint32(16)).astype(np.uint16)
    return codes, (codes.astype(np.uint32) << np.uint32(16)).view(np.float32)


def _row_kernel(mod, x, qw, bb):
    out = np.empty((x.shape[0], x.shape[1] // 256 * bb), np.uint8)
    (mod.quantize_rows_imatrix(x, qw, out) if qw.size else mod.quantize_rows(x, out))
    return out


@pytest.mark.parametrize("qtype", sorted(MODULES))
@pytest.mark.parametrize("imatrix", [False, True])
def test_fused_kernel_equals_row_kernel_for_every_code_width(qtype, imatrix):
    mod, bb = MODULES[qtype]
    rng = np.random.default_rng(7)
    for rows, n in SHAPES:
        x = (rng.standard_t(4, (rows, n)) * 0.02).astype(np.float32)
        qw = rng.random(n).astype(np.float32) if imatrix else NO_WEIGHTS
        flags = np.full(n_chunks(rows, n), -1, np.int32)
        out = np.empty((rows, n // 256 * bb), np.uint8)
        mod.quantize_codes(x.view(np.uint32), 2, NO_TABLE, qw, BIG, out, flags)  # float32 bits
        assert np.array_equal(out, _row_kernel(mod, x, qw, bb)) and not flags.any()
        codes, xb = _bf16(x)
        mod.quantize_codes(codes, 0, NO_TABLE, qw, BIG, out, flags)  # BF16
        assert np.array_equal(out, _row_kernel(mod, xb, qw, bb)) and not flags.any()
        h = x.astype(np.float16).view(np.uint16)
        mod.quantize_codes(h, 1, F16_TO_F32, qw, BIG, out, flags)  # F16 through its table
        assert np.array_equal(out, _row_kernel(mod, F16_TO_F32[h], qw, bb)) and not flags.any()
        f8 = rng.integers(0, 256, (rows, n), dtype=np.uint8)
        f8[f8 & 0x7F == 0x7F] = 0  # no NaN codes
        mod.quantize_codes(f8, 1, F8_E4M3_TO_F32, qw, BIG, out, flags)  # FP8 through its table
        assert np.array_equal(out, _row_kernel(mod, F8_E4M3_TO_F32[f8], qw, bb)) and not flags.any()


@pytest.mark.parametrize("qtype", sorted(MODULES))
def test_fused_kernel_flags_the_chunk_holding_a_bad_value(qtype):
    mod, bb = MODULES[qtype]
    rows, n = 40, 3072
    x = np.random.default_rng(1).normal(0, 0.02, (rows, n)).astype(np.float32)
    bad_row = 37
    chunk = bad_row // rows_per_chunk(n)
    out = np.empty((rows, n // 256 * bb), np.uint8)
    for value, flag in ((np.nan, FLAG_NONFINITE), (np.inf, FLAG_NONFINITE), (5.0, FLAG_RANGE)):
        y = x.copy()
        y[bad_row, 100] = value
        flags = np.zeros(n_chunks(rows, n), np.int32)
        mod.quantize_codes(y.view(np.uint32), 2, NO_TABLE, NO_WEIGHTS, np.float32(1.0), out, flags)
        assert flags[chunk] == flag and np.count_nonzero(flags) == 1


def _raw_errors(fn):
    try:
        fn()
    except quant_kernels.QuantError as e:
        return type(e), str(e)
    return None


@pytest.mark.parametrize("qtype", ["Q2_K", "Q4_K", "Q5_K", "Q8_0", "Q6_K", "F16", "BF16", "F32"])
def test_quantize_raw_equals_quantize_of_the_upcast_tensor(qtype):
    rng = np.random.default_rng(3)
    x = rng.normal(0, 0.02, (9, 512)).astype(np.float32)
    codes, xb = _bf16(x)
    qw = rng.random(512).astype(np.float32)
    assert np.array_equal(quant_kernels.quantize_raw(codes, "bf16", qtype), quant_kernels.quantize(xb, qtype))
    assert np.array_equal(quant_kernels.quantize_raw(codes, "bf16", qtype, imatrix=qw),
                          quant_kernels.quantize(xb, qtype, imatrix=qw))
    h = x.astype(np.float16).view(np.uint16)
    assert np.array_equal(quant_kernels.quantize_raw(h, "table", qtype, table=F16_TO_F32),
                          quant_kernels.quantize(F16_TO_F32[h], qtype))
    out = np.zeros((9, quant_kernels.row_nbytes(qtype, 512)), np.uint8)
    assert quant_kernels.quantize_raw(x.view(np.uint32), "f32", qtype, out=out) is out
    assert np.array_equal(out, quant_kernels.quantize(x, qtype))


@pytest.mark.parametrize("qtype", ["Q4_K", "Q2_K", "Q8_0", "F16"])
def test_quantize_raw_errors_are_those_of_quantize(qtype):
    x = np.random.default_rng(4).normal(0, 0.02, (20, 256)).astype(np.float32)
    for where, value in (((13, 17), np.nan), ((0, 0), -np.inf), ((19, 255), 3e38), ((5, 5), 7e4)):
        y = x.copy()
        y[where] = value
        y[2, 3] = value  # the first of two, over every row, is the one named
        codes, yb = _bf16(y)
        want = _raw_errors(lambda: quant_kernels.quantize(yb, qtype))
        got = _raw_errors(lambda: quant_kernels.quantize_raw(codes, "bf16", qtype))
        assert got == want
        if value != 7e4 or qtype == "F16":  # 7e4 is within every K-quant's range; F16 refuses it
            first = min(where, (2, 3))
            assert want is not None and f"row {first[0]}, column {first[1]}" in want[1]
    with pytest.raises(NonFiniteError):
        quant_kernels.quantize_raw(np.array([[0x7FC0] * 256], np.uint16), "bf16", qtype)
    with pytest.raises(OverflowValueError):
        quant_kernels.quantize_raw(np.array([[0x7F7F] * 256], np.uint16), "bf16", qtype)


def test_quantize_raw_refuses_codes_it_cannot_read():
    with pytest.raises(quant_kernels.ShapeError, match="bf16 codes must be a C-contiguous 2-D uint16"):
        quant_kernels.quantize_raw(np.zeros((2, 256), np.uint32), "bf16", "Q4_K")
    with pytest.raises(quant_kernels.ShapeError, match="native byte order"):
        quant_kernels.quantize_raw(np.zeros((2, 256), ">u2"), "bf16", "Q4_K")  # would be read byte-swapped
    with pytest.raises(quant_kernels.ShapeError, match="a table of 256 float32 values"):
        quant_kernels.quantize_raw(np.zeros((2, 256), np.uint8), "table", "Q4_K", table=F16_TO_F32)
    with pytest.raises(quant_kernels.ShapeError, match="kind must be one of"):
        quant_kernels.quantize_raw(np.zeros((2, 256), np.uint16), "f8", "Q4_K")
