"""Public API: validate, allocate, dispatch to the numba kernels."""
from __future__ import annotations

import contextlib
import importlib
from types import ModuleType
from typing import Any

import numba
import numpy as np
from gguf import GGMLQuantizationType

from . import _checks, _source, floats, upcast
from ._source import KIND_BF16, KIND_F32, KIND_TABLE
from ._cache import is_cached
from ._checks import find_nonfinite, scan
from .errors import BlockSizeError, NonFiniteError, OverflowValueError, QuantError, ShapeError
from .types import QuantSpec, resolve

_Q = GGMLQuantizationType


def _kernels(spec: QuantSpec) -> ModuleType:
    return importlib.import_module(f"{__package__}.{spec.module}")


def set_threads(n: int) -> None:
    """Number of threads the kernels use (numba's thread pool); 1..numba.config.NUMBA_NUM_THREADS."""
    if n < 1 or n > numba.config.NUMBA_NUM_THREADS:
        raise ValueError(f"threads must be between 1 and {numba.config.NUMBA_NUM_THREADS}, got {n}")
    numba.set_num_threads(n)


def get_threads() -> int:
    return numba.get_num_threads()


# Launching a parallel region wakes every worker thread, whatever the region holds. Measured with
# `scripts/bench_kernels.py --tiny` on a 2-core virtual machine, a 1 x 3072 tensor: F32 19.5 us on
# the calling thread vs 160 us through a 2-thread region, Q8_0 18.8 vs 128, Q4_K 50.5 vs 105; on
# 16 vCPUs a conversion spent about 2 ms on each of FLUX's 467 bias and norm tensors. Below this
# many elements the calling thread works alone (the bytes never depend on the thread count).
SERIAL_BELOW = 1 << 16


@contextlib.contextmanager
def _threads_for(elements: int):
    threads = numba.get_num_threads()
    if elements >= SERIAL_BELOW or threads == 1:
        yield
        return
    numba.set_num_threads(1)
    try:
        yield
    finally:
        numba.set_num_threads(threads)


def row_nbytes(qtype: GGMLQuantizationType | str, n: int) -> int:
    """Bytes one row of n weights takes in qtype (n must be a multiple of the block size)."""
    spec = resolve(qtype)
    if n % spec.block_size:
        raise BlockSizeError(spec.name, spec.block_size, n)
    return spec.row_nbytes(n)


def _as_f32_2d(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x)
    if x.ndim != 2:
        raise ShapeError(f"expected a 2-D (rows, n) array, got {x.ndim}-D with shape {tuple(x.shape)}")
    if not np.issubdtype(x.dtype, np.floating):
        raise ShapeError(f"expected a floating-point array, got dtype {x.dtype}")
    return np.ascontiguousarray(x, dtype=np.float32)


def _check_finite(x: np.ndarray) -> float:
    """Refuse NaN/inf; return the largest magnitude (checked against the output type's range)."""
    count, where, amax = scan(x)
    if count:
        raise NonFiniteError(count, where, float(x[where]))
    return amax


# Overflow: finite inputs the output type cannot hold. F16 rounds |x| >= 65520 to inf, BF16
# |x| >= 0x7F7F8000 (both round to nearest even). Every quantized type stores its block scale as
# float16, so a block can hold at most 65504 x its largest code multiplier; beyond that (or when
# a kernel's scale search lands on a scale float16 cannot hold) the block scale becomes inf/NaN.
F16_OVERFLOW = 65520.0
BF16_OVERFLOW = float(np.array([0x7F7F8000], dtype=np.uint32).view(np.float32)[0])
_F16_MAX = 65504.0
_CODE_RANGE = {_Q.Q8_0: 127, _Q.Q2_K: 15 * 3, _Q.Q3_K: 32 * 4, _Q.Q4_K: 63 * 15, _Q.Q5_K: 63 * 31,
               _Q.Q6_K: 127 * 32}
# Byte offsets of the float16 scale fields in each type's block (ggml's block_* structs).
_SCALE_FIELDS = {_Q.Q8_0: (0,), _Q.Q2_K: (80, 82), _Q.Q3_K: (108,), _Q.Q4_K: (0, 2), _Q.Q5_K: (0, 2),
                 _Q.Q6_K: (208,)}


def _first_over(x: np.ndarray, limit: float) -> tuple[int, int]:
    r, c = np.unravel_index(int(np.argmax(np.abs(x) >= limit)), x.shape)
    return int(r), int(c)


def _check_range(x: np.ndarray, spec: QuantSpec, amax: float) -> None:
    """Refuse values that would be written as inf (float types) or exceed what a block can hold."""
    if spec.qtype == _Q.F16 and amax >= F16_OVERFLOW:
        where = _first_over(x, F16_OVERFLOW)
        raise OverflowValueError("F16", float(x[where]), where, _F16_MAX, "it would be stored as inf")
    if spec.qtype == _Q.BF16 and amax >= BF16_OVERFLOW:
        where = _first_over(x, BF16_OVERFLOW)
        raise OverflowValueError("BF16", float(x[where]), where, 3.3895313892515355e38, "it would be stored as inf")
    limit = _CODE_RANGE.get(spec.qtype)
    if limit is not None and amax > _F16_MAX * limit:
        where = _first_over(x, np.nextafter(np.float32(_F16_MAX * limit), np.float32(np.inf)))
        raise OverflowValueError(spec.name, float(x[where]), where, None,
                                 f"a {spec.name} block holds at most 65504 (its float16 scale) x {limit}")


def _check_scales(x: np.ndarray, out: np.ndarray, spec: QuantSpec) -> None:
    """After encoding: every float16 block scale must be finite (exact, whatever the kernel did)."""
    fields = _SCALE_FIELDS.get(spec.qtype)
    if not fields or out.size == 0:
        return
    blocks = out.reshape(-1, spec.type_size)
    for off in fields:
        bits = blocks[:, off].astype(np.uint16) | (blocks[:, off + 1].astype(np.uint16) << np.uint16(8))
        bad = np.flatnonzero((bits & np.uint16(0x7C00)) == np.uint16(0x7C00))
        if bad.size:
            per_row = x.shape[1] // spec.block_size
            r, b = divmod(int(bad[0]), per_row)
            block = x[r, b * spec.block_size:(b + 1) * spec.block_size]
            c = b * spec.block_size + int(np.argmax(np.abs(block)))
            raise OverflowValueError(spec.name, float(x[r, c]), (r, c), None,
                                     f"the float16 scale of block {b} of that row would be inf")


def _check_out(out: np.ndarray, shape: tuple[int, int]) -> None:
    if not isinstance(out, np.ndarray) or out.dtype != np.uint8 or out.shape != shape or not out.flags.c_contiguous:
        got = f"{getattr(out, 'dtype', type(out).__name__)} {tuple(getattr(out, 'shape', ()))}"
        raise ShapeError(f"out must be a C-contiguous uint8 array of shape {shape}, got {got}")


def quantize(
    x: np.ndarray,
    qtype: GGMLQuantizationType | str,
    *,
    imatrix: np.ndarray | None = None,
    out: np.ndarray | None = None,
) -> np.ndarray:
    """Encode a 2-D (rows, n) float array; returns uint8 (rows, n // block * type_size).

    The bytes are identical to ggml's ``ggml_quantize_chunk`` for the same float32 input
    (importance-weighted when ``imatrix`` is given, a float per column). ``out``, if given, is a
    C-contiguous uint8 array of that shape to write into (and return) instead of a new one.
    """
    spec = resolve(qtype)
    x = _as_f32_2d(x)
    with _threads_for(x.size):
        if spec.is_float:
            return _encode_float(x, spec, out)
        return _quantize_fused(x.view(np.uint32), KIND_F32, None, spec, imatrix, out, lambda: x)


# How raw source codes become float32 (quant_kernels._source): the upper half of a float32, an
# entry of a table of every code's value, or a float32's own bits.
RAW_KINDS = {"bf16": KIND_BF16, "table": KIND_TABLE, "f32": KIND_F32}
_CODE_DTYPES = {KIND_BF16: (np.uint16,), KIND_TABLE: (np.uint16, np.uint8), KIND_F32: (np.uint32,)}


def quantize_raw(
    codes: np.ndarray,
    kind: str,
    qtype: GGMLQuantizationType | str,
    *,
    table: np.ndarray | None = None,
    imatrix: np.ndarray | None = None,
    out: np.ndarray | None = None,
) -> np.ndarray:
    """Encode a tensor given as its raw source codes, a 2-D (rows, n) array: ``kind`` "bf16"
    (uint16, the upper half of each float32), "table" (uint16 or uint8 codes, ``table[code]`` the
    exact float32 of each) or "f32" (uint32, the float32's bits).

    The bytes equal ``quantize`` of the upcast float32 tensor, and so do the errors (NaN/inf,
    out-of-range values, block scales float16 cannot hold, with the same positions). For the
    quantized types the codes are upcast a cache-sized chunk of rows at a time inside the
    encoding kernel, in one parallel region: no float32 copy of the tensor is made.
    """
    if kind not in RAW_KINDS:
        raise ShapeError(f"kind must be one of {', '.join(RAW_KINDS)}, got {kind!r}")
    k = RAW_KINDS[kind]
    codes = np.asarray(codes)
    if (codes.ndim != 2 or codes.dtype.type not in _CODE_DTYPES[k] or not codes.dtype.isnative
            or not codes.flags.c_contiguous):
        names = " or ".join(np.dtype(t).name for t in _CODE_DTYPES[k])
        raise ShapeError(f"{kind} codes must be a C-contiguous 2-D {names} array in native byte order, "
                         f"got {codes.dtype} {tuple(codes.shape)}")
    if k == KIND_TABLE:
        table = np.ascontiguousarray(table, dtype=np.float32) if table is not None else None
        if table is None or table.shape != (1 << (8 * codes.dtype.itemsize),):
            raise ShapeError(f"a table of {1 << (8 * codes.dtype.itemsize)} float32 values is needed for "
                             f"{codes.dtype} codes, got {None if table is None else tuple(table.shape)}")
    spec = resolve(qtype)

    def upcast_all() -> np.ndarray:
        x = np.empty(codes.shape, np.float32)
        if codes.size:
            if k == KIND_BF16:
                upcast.bf16_rows(codes, x)
            elif k == KIND_TABLE:
                upcast.table_rows(codes, table, x)
            else:
                upcast.f32_rows(codes, x)
        return x

    with _threads_for(codes.size):
        if spec.is_float:
            return _encode_float(upcast_all(), spec, out)
        return _quantize_fused(codes, k, table, spec, imatrix, out, upcast_all)


def _importance(spec: QuantSpec, imatrix: np.ndarray | None, n: int) -> np.ndarray | None:
    """The imatrix as the kernels take it (checked), or None where the type ignores it."""
    if imatrix is None or not spec.is_kquant:
        return None  # ggml ignores importance weights for Q8_0 and the float types.
    qw = np.ascontiguousarray(imatrix, dtype=np.float32)
    if qw.shape != (n,):
        raise ShapeError(f"imatrix must hold one weight per column ({n}), got shape {tuple(qw.shape)}")
    count, where = find_nonfinite(qw.reshape(1, n))
    if count:
        raise QuantError(f"imatrix holds {count} non-finite weight{'s' if count != 1 else ''} (NaN or inf); "
                         f"first at column {where[1]} ({float(qw[where[1]])})")
    if (qw < 0).any():
        raise QuantError("imatrix weights must be non-negative")
    return qw


_NO_TABLE = np.zeros(1, np.float32)
_NO_WEIGHTS = np.zeros(0, np.float32)
_F32_MAX = float(np.finfo(np.float32).max)


def _quantize_fused(codes: np.ndarray, kind: int, table: np.ndarray | None, spec: QuantSpec,
                    imatrix: np.ndarray | None, out: np.ndarray | None, upcast_all) -> np.ndarray:
    rows, n = codes.shape
    if n % spec.block_size:
        raise BlockSizeError(spec.name, spec.block_size, n)
    qw = _importance(spec, imatrix, n)
    if out is not None:
        _check_out(out, (rows, spec.row_nbytes(n)))
    else:
        out = np.empty((rows, spec.row_nbytes(n)), dtype=np.uint8)
    if rows == 0 or n == 0:
        return out
    limit = _CODE_RANGE.get(spec.qtype)
    flags = np.zeros(_source.n_chunks(rows, n), np.int32)
    _kernels(spec).quantize_codes(codes, kind, table if table is not None else _NO_TABLE,
                                  qw if qw is not None else _NO_WEIGHTS,
                                  np.float32(_F16_MAX * limit if limit is not None else _F32_MAX), out, flags)
    if flags.any():
        # Something failed a check: the exact whole-tensor checks name the value and where it is.
        # A chunk that failed an input check was not encoded; one whose scales failed was.
        x = upcast_all()
        _check_range(x, spec, _check_finite(x))
        if (flags & (_source.FLAG_NONFINITE | _source.FLAG_RANGE)).any():
            raise QuantError(f"{spec.name}: the kernel's input check and the exact check disagree")  # pragma: no cover
        _check_scales(x, out, spec)
    return out


def _encode_float(x: np.ndarray, spec: QuantSpec, out: np.ndarray | None) -> np.ndarray:
    """F32, F16 or BF16 bytes of a float32 (rows, n) array, after the same checks."""
    rows, n = x.shape
    _check_range(x, spec, _check_finite(x))
    if out is not None:
        _check_out(out, (rows, spec.row_nbytes(n)))
    if spec.qtype == _Q.F32:
        encoded = x.view(np.uint8).reshape(rows, n * 4)
    elif spec.qtype == _Q.F16:
        encoded = floats.to_float16(x).view(np.uint8).reshape(rows, n * 2)
    else:
        encoded = floats.to_bfloat16_bits(x).view(np.uint8).reshape(rows, n * 2)
    if out is None:
        return encoded
    out[...] = encoded
    return out


def dequantize(data: np.ndarray, qtype: GGMLQuantizationType | str, shape: tuple[int, ...]) -> np.ndarray:
    """Decode bytes of qtype into float32 of ``shape`` (last dim = row length), as ggml does."""
    spec = resolve(qtype)
    shape = tuple(int(s) for s in shape)
    if not shape:
        raise ShapeError("shape must have at least one dimension")
    n = shape[-1]
    if n % spec.block_size:
        raise BlockSizeError(spec.name, spec.block_size, n)
    rows = int(np.prod(shape[:-1], dtype=np.int64)) if len(shape) > 1 else 1
    raw = np.ascontiguousarray(data).view(np.uint8).reshape(-1)
    expected = rows * spec.row_nbytes(n)
    if raw.size != expected:
        raise ShapeError(f"{spec.name} data for shape {shape} must be {expected} bytes, got {raw.size}")
    raw = raw.reshape(rows, spec.row_nbytes(n))
    if spec.qtype == _Q.F32:
        out = raw.view(np.float32).copy()
    elif spec.qtype == _Q.F16:
        out = raw.view(np.float16).astype(np.float32)
    elif spec.qtype == _Q.BF16:
        out = floats.bfloat16_bits_to_f32(raw.view(np.uint16))
    else:
        out = np.empty((rows, n), dtype=np.float32)
        if rows and n:
            _kernels(spec).dequantize_rows(raw, out)
    return out.reshape(shape)


# --- first use: numba compiles each kernel once per install (about 5-20 s each), then loads it from
# its on-disk cache in milliseconds. Callers that face a user ask which kernels are missing, say so,
# and compile them one by one with visible progress; the library itself never prints.

CHECKS_KERNEL = "input checks"
UPCAST_KERNELS = "source upcasts"


def _upcast_samples() -> list[tuple[Any, tuple[np.ndarray, ...]]]:
    """Each source-upcast kernel (quant_kernels.upcast) with arguments of the types the pipeline
    passes: BF16 and F32 words, F16 (uint16) and FP8 (uint8) codes through a float32 table."""
    out = np.zeros((1, 1), np.float32)
    return [(upcast.bf16_rows, (np.zeros((1, 1), np.uint16), out)),
            (upcast.f32_rows, (np.zeros((1, 1), np.uint32), out)),
            (upcast.table_rows, (np.zeros((1, 1), np.uint16), np.zeros(1 << 16, np.float32), out)),
            (upcast.table_rows, (np.zeros((1, 1), np.uint8), np.zeros(256, np.float32), out))]
_IMATRIX_SUFFIX = "+imatrix"


# The fused kernels are compiled once per width of source code they read: 32-bit (float32 input,
# an F32 source), 16-bit (BF16 and F16 sources) and 8-bit (FP8 sources).
_CODE_WIDTHS = {"F32": 32, "BF16": 16, "F16": 16, "F8_E4M3": 8, "F8_E5M2": 8}
_CODE_DTYPE = {32: np.uint32, 16: np.uint16, 8: np.uint8}


def _fused_name(spec: QuantSpec, width: int) -> str:
    return spec.name if width == 32 else f"{spec.name} ({width}-bit codes)"


def _fused_sample(spec: QuantSpec, width: int) -> tuple:
    codes = np.zeros((1, spec.block_size), _CODE_DTYPE[width])
    table = np.zeros(1 << width if width < 32 else 1, np.float32)
    return (codes, KIND_F32, table, _NO_WEIGHTS, np.float32(1.0),
            np.empty((1, spec.row_nbytes(spec.block_size)), np.uint8), np.zeros(1, np.int32))


def uncompiled_kernels(qtypes, *, imatrix: bool = False, sources=()) -> list[str]:
    """The kernels ``quantize`` (or, given source dtypes ``sources`` such as "BF16", ``quantize_raw``
    on those sources' codes) needs for ``qtypes`` (names like ``Q4_K``) that numba's on-disk cache does not hold yet:
    ``"input checks"``, ``"source upcasts"``, type names (the kernel for float32 input) and names
    like ``"Q4_K (16-bit codes)"`` for a 16-bit source. One kernel serves with or without an
    imatrix (``imatrix`` is accepted for callers that pass it). Float types (F32/F16/BF16) need no
    compiled kernel. Imports the kernel modules, compiles nothing."""
    missing: list[str] = []
    probe = np.zeros((1, 1), dtype=np.float32)
    if not is_cached(_checks._scan_per_row, probe, np.zeros(1, np.int64), np.zeros(1, np.int64),
                     np.zeros(1, np.float32)):
        missing.append(CHECKS_KERNEL)
    if any(not is_cached(kernel, *args) for kernel, args in _upcast_samples()):
        missing.append(UPCAST_KERNELS)
    widths = sorted({_CODE_WIDTHS[s] for s in sources} or {32}, reverse=True)  # no sources: quantize()'s
    seen: set[str] = set()
    for q in qtypes:
        spec = resolve(q)
        if spec.is_float or spec.name in seen:
            continue
        seen.add(spec.name)
        kernels = _kernels(spec)  # one kernel per code width, with or without an imatrix
        missing += [_fused_name(spec, w) for w in widths
                    if not is_cached(kernels.quantize_codes, *_fused_sample(spec, w))]
    return missing


def compile_kernel(name: str) -> None:
    """Compile (or load from numba's cache) one kernel ``uncompiled_kernels`` named, by running it
    on one block of zeros with exactly the argument types ``quantize`` passes."""
    if name == CHECKS_KERNEL:
        find_nonfinite(np.zeros((1, 1), dtype=np.float32))
        return
    if name == UPCAST_KERNELS:
        for kernel, args in _upcast_samples():
            kernel(*args)
        return
    base, _, width = name.removesuffix(_IMATRIX_SUFFIX).partition(" (")  # "+imatrix": the same kernel
    spec = resolve(base)
    _kernels(spec).quantize_codes(*_fused_sample(spec, int(width.split("-")[0]) if width else 32))
