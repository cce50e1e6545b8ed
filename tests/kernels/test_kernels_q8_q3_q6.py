"""Q8_0, Q3_K and Q6_K kernels against ggml (the oracle), byte for byte; round trips; the API."""
from __future__ import annotations

import re

import numba
import numpy as np
import oracle
import pytest
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf.quants import dequantize as gguf_dequantize
from kquant_cases import assert_same_bytes, input_families, random_imatrix, type_size
from numba.core.caching import NullCache
from numba.core.registry import CPUDispatcher

import quant_kernels
from quant_kernels import (
    BlockSizeError,
    NonFiniteError,
    QuantError,
    ShapeError,
    q3_k,
    q6_k,
    q8_0,
)

TYPES = ["Q8_0", "Q3_K", "Q6_K"]
KQUANTS = ["Q3_K", "Q6_K"]
FAMILIES = input_families()  # 8 rows x 512 (two K-blocks, sixteen Q8_0 blocks per row): 16 KB each



def _block_size(qtype: str) -> int:
    return GGML_QUANT_SIZES[GGMLQuantizationType[qtype]][0]




# --- bytes: ours == ggml --------------------------------------------------------------------

@pytest.mark.parametrize("qtype", TYPES)
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_reference_bytes_match_ggml(qtype: str, family: str) -> None:
    assert_same_bytes(FAMILIES[family], qtype)


@pytest.mark.parametrize("qtype", TYPES)
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_imatrix_bytes_match_ggml(qtype: str, family: str) -> None:
    """K-quants use the weights (ggml's quantize_row_<type>_impl); Q8_0 ignores them, as ggml does."""
    x = FAMILIES[family]
    assert_same_bytes(x, qtype, random_imatrix(x.shape[1], seed=len(family)))


@pytest.mark.parametrize("qtype", TYPES)
@pytest.mark.parametrize("blocks_per_row,rows", [(1, 1), (1, 5), (3, 2), (9, 3), (2, 40)])
def test_block_counts_match_ggml(qtype: str, blocks_per_row: int, rows: int) -> None:
    """One block, one-block rows, odd block counts per row, many rows (threads split rows)."""
    n = blocks_per_row * _block_size(qtype)
    rng = np.random.default_rng(rows * 1000 + n)
    x = (rng.standard_t(4, (rows, n)) * 0.02).astype(np.float32)
    assert_same_bytes(x, qtype)
    assert_same_bytes(x, qtype, random_imatrix(n, seed=n))


@pytest.mark.parametrize("qtype", KQUANTS)
def test_many_blocks_match_ggml(qtype: str) -> None:
    """20,480 groups of 16 in varied shapes (1.3 MB). Q3_K's refinement then runs every pass count
    from one to the five-pass cap, groups of a block converge at different passes, and (uniform
    inputs) a few dozen groups still change something in their fifth pass."""
    rng = np.random.default_rng(23)
    parts = [
        rng.standard_normal((8, 4096)) * 0.02,
        rng.standard_t(2, (8, 4096)) * 0.02,
        rng.laplace(0, 0.02, (8, 4096)),
        rng.uniform(-1, 1, (56, 4096)),
    ]
    x = np.concatenate(parts).astype(np.float32)
    assert_same_bytes(x, qtype)
    assert_same_bytes(x, qtype, random_imatrix(x.shape[1], seed=5))


@pytest.mark.parametrize("qtype", KQUANTS)
def test_imatrix_all_zero_weights_match_ggml(qtype: str) -> None:
    x = FAMILIES["gauss_0.02"]
    assert_same_bytes(x, qtype, np.zeros(x.shape[1], np.float32))


@pytest.mark.parametrize("qtype", KQUANTS)
def test_imatrix_zero_weight_groups_match_ggml(qtype: str) -> None:
    """Whole groups of 16 with zero weight next to weighted ones (their searches see suml2 == 0)."""
    x = FAMILIES["student_t3"]
    qw = random_imatrix(x.shape[1], seed=9)
    qw.reshape(-1, 16)[::3] = 0.0
    assert_same_bytes(x, qtype, qw)


def test_q8_0_rounds_half_away_from_zero() -> None:
    """x * (1/d) landing on .5 exactly: C roundf goes away from zero where numpy's round goes to even."""
    x = np.zeros((1, 32), np.float32)
    x[0, 0] = 127.0  # d = 1, so x * id == x
    x[0, 1:9] = [0.5, -0.5, 1.5, -1.5, 2.5, -2.5, 126.5, -126.5]
    ours = assert_same_bytes(x, "Q8_0")
    assert ours[0, 3:11].view(np.int8).tolist() == [1, -1, 2, -2, 3, -3, 127, -127]


# --- decoding ---------------------------------------------------------------------------------

@pytest.mark.parametrize("qtype", TYPES)
@pytest.mark.parametrize("family", ["gauss_0.02", "student_t3", "outliers", "mixed_zero_const", "fp16_subnormal", "ties"])
def test_dequantize_matches_gguf_and_ggml(qtype: str, family: str) -> None:
    x = FAMILIES[family]
    for imatrix in (None, random_imatrix(x.shape[1], seed=3)):
        data = quant_kernels.quantize(x, qtype, imatrix=imatrix)
        ours = quant_kernels.dequantize(data, qtype, x.shape)
        by_gguf = gguf_dequantize(data, GGMLQuantizationType[qtype]).astype(np.float32)
        by_ggml = oracle.dequantize(data, qtype, x.shape)
        assert np.array_equal(ours.view(np.uint32), by_ggml.view(np.uint32))
        assert np.array_equal(ours.view(np.uint32), by_gguf.view(np.uint32))


@pytest.mark.parametrize("qtype", TYPES)
def test_dequantize_arbitrary_bytes_matches_ggml(qtype: str) -> None:
    """Every bit pattern decodes as ggml does, including scales and d values no quantizer writes."""
    ts, bs = type_size(qtype), _block_size(qtype)
    d_at = {"Q8_0": 0, "Q3_K": 108, "Q6_K": 208}[qtype]
    rng = np.random.default_rng(11)
    data = rng.integers(0, 256, (4, 3 * ts), dtype=np.uint8)
    data[:, d_at + 1::ts] &= 0x7B  # keep d finite so results compare bit for bit
    shape = (4, 3 * bs)
    ours = quant_kernels.dequantize(data, qtype, shape)
    assert np.array_equal(ours.view(np.uint32), oracle.dequantize(data, qtype, shape).view(np.uint32))
    by_gguf = gguf_dequantize(data, GGMLQuantizationType[qtype]).astype(np.float32).reshape(shape)
    assert np.array_equal(ours.view(np.uint32), by_gguf.view(np.uint32))


@pytest.mark.parametrize("qtype,expected", [("Q8_0", 0.0054), ("Q3_K", 0.151), ("Q6_K", 0.0178)])
def test_round_trip_error_is_the_documented_one(qtype: str, expected: float) -> None:
    """Relative RMSE on N(0, 0.02) matches the figure in kquants.md to two digits."""
    rng = np.random.default_rng(5)
    x = (rng.standard_normal((32, 4096)) * 0.02).astype(np.float32)
    y = quant_kernels.dequantize(quant_kernels.quantize(x, qtype), qtype, x.shape)
    rel = float(np.sqrt(np.mean((y - x) ** 2)) / x.std())
    assert rel == pytest.approx(expected, rel=0.02)


# --- threads and compilation options ----------------------------------------------------------

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
    assert np.array_equal(one[0], many[0])
    assert np.array_equal(one[1], many[1])


def _own_dispatchers(module) -> dict[str, CPUDispatcher]:
    return {
        name: obj for name, obj in vars(module).items()
        if isinstance(obj, CPUDispatcher) and obj.py_func.__module__ == module.__name__
    }


@pytest.mark.parametrize("module", [q8_0, q3_k, q6_k], ids=lambda m: m.__name__)
def test_kernels_compile_cached_without_fastmath(module) -> None:
    """fastmath would let LLVM fuse multiply-adds and reassociate sums, changing bytes; cache=True
    spares every new process the compile. Row kernels (and the fused quantize_codes) are parallel;
    block helpers and the serial encode_rows are not."""
    dispatchers = _own_dispatchers(module)
    assert {"quantize_rows", "dequantize_rows"} <= set(dispatchers)
    for name, disp in dispatchers.items():
        assert disp.targetoptions.get("fastmath") is False, name
        assert not isinstance(disp._cache, NullCache), f"{name} is not compiled with cache=True"
        is_row_kernel = name in ("quantize_rows", "quantize_rows_imatrix", "dequantize_rows", "quantize_codes")
        assert bool(disp.targetoptions.get("parallel")) == is_row_kernel, name
    has_imatrix = "quantize_rows_imatrix" in dispatchers
    assert has_imatrix == (module is not q8_0)


# --- API validation ---------------------------------------------------------------------------

@pytest.mark.parametrize("qtype", TYPES)
def test_row_length_not_a_multiple_of_the_block_size(qtype: str) -> None:
    bs = _block_size(qtype)
    x = np.zeros((2, bs + 8), np.float32)
    with pytest.raises(BlockSizeError) as err:
        quant_kernels.quantize(x, qtype)
    assert str(err.value) == (
        f"{qtype} needs rows that are a multiple of its block size {bs}, got rows of length {bs + 8}"
    )
    with pytest.raises(BlockSizeError, match=rf"^{qtype} needs rows .* block size {bs}, got rows of length {bs + 8}$"):
        quant_kernels.dequantize(np.zeros(64, np.uint8), qtype, (2, bs + 8))


@pytest.mark.parametrize("shape", [(256,), (2, 2, 256), ()])
def test_input_must_be_two_dimensional(shape: tuple[int, ...]) -> None:
    with pytest.raises(ShapeError, match=re.escape(f"expected a 2-D (rows, n) array, got {len(shape)}-D with shape {shape}")):
        quant_kernels.quantize(np.zeros(shape, np.float32), "Q6_K")


@pytest.mark.parametrize("qtype", TYPES)
def test_non_finite_input_names_count_and_first_location(qtype: str) -> None:
    x = FAMILIES["gauss_0.02"].copy()
    x[3, 100] = np.nan
    x[3, 200] = np.inf
    x[6, 5] = -np.inf
    with pytest.raises(NonFiniteError) as err:
        quant_kernels.quantize(x, qtype)
    assert err.value.count == 3
    assert err.value.first_index == (3, 100)
    assert str(err.value) == "input holds 3 non-finite values (NaN or inf); first at row 3, column 100 (nan)"


def test_non_finite_imatrix_is_rejected() -> None:
    x = FAMILIES["gauss_0.02"]
    qw = random_imatrix(x.shape[1], seed=2)
    qw[7] = np.inf
    with pytest.raises(QuantError) as err:
        quant_kernels.quantize(x, "Q3_K", imatrix=qw)
    assert str(err.value) == "imatrix holds 1 non-finite weight (NaN or inf); first at column 7 (inf)"


@pytest.mark.parametrize("qtype", TYPES)
def test_qtype_as_any_case_string_or_enum(qtype: str) -> None:
    x = FAMILIES["student_t3"]
    expected = oracle.quantize(x, qtype)
    for spelling in (qtype, qtype.lower(), qtype.swapcase(), f" {qtype.lower()} ", GGMLQuantizationType[qtype]):
        assert np.array_equal(quant_kernels.quantize(x, spelling), expected), spelling
    data = quant_kernels.quantize(x, qtype)
    assert np.array_equal(
        quant_kernels.dequantize(data, qtype.lower(), x.shape), quant_kernels.dequantize(data, GGMLQuantizationType[qtype], x.shape)
    )


@pytest.mark.parametrize("qtype", TYPES)
@pytest.mark.parametrize("dtype", [np.float16, np.float64])
def test_float16_and_float64_input_is_rounded_to_float32_first(qtype: str, dtype: type) -> None:
    x = FAMILIES["student_t3"].astype(dtype)
    expected = oracle.quantize(x.astype(np.float32), qtype)
    assert np.array_equal(quant_kernels.quantize(x, qtype), expected)
    qw = random_imatrix(x.shape[1], seed=4)
    assert np.array_equal(quant_kernels.quantize(x, qtype, imatrix=qw.astype(np.float64)), oracle.quantize(x.astype(np.float32), qtype, qw))


def test_non_contiguous_input_is_accepted() -> None:
    x = FAMILIES["gauss_1"]
    view = np.asfortranarray(x)[:, :256]
    assert np.array_equal(quant_kernels.quantize(view, "Q3_K"), oracle.quantize(np.ascontiguousarray(x[:, :256]), "Q3_K"))


@pytest.mark.parametrize("qtype", TYPES)
def test_output_shape_and_dtype(qtype: str) -> None:
    x = FAMILIES["gauss_0.02"]
    out = quant_kernels.quantize(x, qtype)
    assert out.dtype == np.uint8
    assert out.shape == (x.shape[0], x.shape[1] // _block_size(qtype) * type_size(qtype))
    assert quant_kernels.row_nbytes(qtype, x.shape[1]) == out.shape[1]
