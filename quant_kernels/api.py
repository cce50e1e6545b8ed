"""Public API: validate, allocate, dispatch to the numba kernels."""
from __future__ import annotations

import importlib
from types import ModuleType

import numba
import numpy as np
from gguf import GGMLQuantizationType

from . import _checks, floats
from ._cache import is_cached
from ._checks import find_nonfinite
from .errors import BlockSizeError, NonFiniteError, QuantError, ShapeError
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


def _check_finite(x: np.ndarray) -> None:
    count, where = find_nonfinite(x)
    if count:
        raise NonFiniteError(count, where, float(x[where]))


def quantize(
    x: np.ndarray,
    qtype: GGMLQuantizationType | str,
    *,
    imatrix: np.ndarray | None = None,
) -> np.ndarray:
    """Encode a 2-D (rows, n) float array; returns uint8 (rows, n // block * type_size).

    The bytes are identical to ggml's ``ggml_quantize_chunk`` for the same float32 input
    (importance-weighted when ``imatrix`` is given, a float per column).
    """
    spec = resolve(qtype)
    x = _as_f32_2d(x)
    rows, n = x.shape
    if n % spec.block_size:
        raise BlockSizeError(spec.name, spec.block_size, n)
    _check_finite(x)
    if spec.qtype == _Q.F32:
        return x.view(np.uint8).reshape(rows, n * 4)
    if spec.qtype == _Q.F16:
        return floats.to_float16(x).view(np.uint8).reshape(rows, n * 2)
    if spec.qtype == _Q.BF16:
        return floats.to_bfloat16_bits(x).view(np.uint8).reshape(rows, n * 2)
    out = np.empty((rows, spec.row_nbytes(n)), dtype=np.uint8)
    if rows == 0 or n == 0:
        return out
    kernels = _kernels(spec)
    if imatrix is not None and spec.is_kquant:
        qw = np.ascontiguousarray(imatrix, dtype=np.float32)
        if qw.shape != (n,):
            raise ShapeError(f"imatrix must hold one weight per column ({n}), got shape {tuple(qw.shape)}")
        count, where = find_nonfinite(qw.reshape(1, n))
        if count:
            raise QuantError(f"imatrix holds {count} non-finite weight{'s' if count != 1 else ''} (NaN or inf); "
                             f"first at column {where[1]} ({float(qw[where[1]])})")
        if (qw < 0).any():
            raise QuantError("imatrix weights must be non-negative")
        kernels.quantize_rows_imatrix(x, qw, out)
    else:
        # ggml ignores importance weights for Q8_0 and the float types.
        kernels.quantize_rows(x, out)
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
_IMATRIX_SUFFIX = "+imatrix"


def _sample(spec: QuantSpec) -> tuple[np.ndarray, np.ndarray]:
    x = np.zeros((1, spec.block_size), dtype=np.float32)
    return x, np.empty((1, spec.row_nbytes(spec.block_size)), dtype=np.uint8)


def uncompiled_kernels(qtypes, *, imatrix: bool = False) -> list[str]:
    """The kernels ``quantize`` needs for ``qtypes`` (names like ``Q4_K``) that numba's on-disk
    cache does not hold yet: ``"input checks"``, type names, and ``"Q4_K+imatrix"`` with imatrix.
    Float types (F32/F16/BF16) need no compiled kernel. Imports the kernel modules, compiles nothing."""
    missing: list[str] = []
    probe = np.zeros((1, 1), dtype=np.float32)
    if not is_cached(_checks._nonfinite_per_row, probe, np.zeros(1, np.int64), np.zeros(1, np.int64)):
        missing.append(CHECKS_KERNEL)
    seen: set[str] = set()
    for q in qtypes:
        spec = resolve(q)
        if spec.is_float or spec.name in seen:
            continue
        seen.add(spec.name)
        kernels = _kernels(spec)
        x, out = _sample(spec)
        if not is_cached(kernels.quantize_rows, x, out):
            missing.append(spec.name)
        if imatrix and spec.is_kquant and not is_cached(kernels.quantize_rows_imatrix, x, x[0], out):
            missing.append(spec.name + _IMATRIX_SUFFIX)
    return missing


def compile_kernel(name: str) -> None:
    """Compile (or load from numba's cache) one kernel ``uncompiled_kernels`` named, by running it
    on one block of zeros with exactly the argument types ``quantize`` passes."""
    if name == CHECKS_KERNEL:
        find_nonfinite(np.zeros((1, 1), dtype=np.float32))
        return
    imatrix = name.endswith(_IMATRIX_SUFFIX)
    spec = resolve(name.removesuffix(_IMATRIX_SUFFIX))
    x, _ = _sample(spec)
    quantize(x, spec.qtype, imatrix=np.ones(spec.block_size, dtype=np.float32) if imatrix else None)
