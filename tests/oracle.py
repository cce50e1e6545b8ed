"""ggml's own quantizers through ctypes (libggml-python): the test oracle and benchmark peer.

Never imported by production code.
"""
from __future__ import annotations

import ctypes
import pathlib

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType


def _load() -> ctypes.CDLL:
    import libggml

    root = pathlib.Path(libggml.__file__).parent
    for cand in (root / "lib64" / "libggml-base.so", root / "lib" / "libggml-base.so"):
        if cand.exists():
            return ctypes.CDLL(str(cand))
    raise FileNotFoundError(f"libggml-base.so not found under {root}")


_lib = _load()
_lib.ggml_quantize_chunk.restype = ctypes.c_size_t
_lib.ggml_quantize_chunk.argtypes = [
    ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p,
]


def _ptr(a: np.ndarray) -> int:
    return a.ctypes.data


def quantize(x: np.ndarray, qtype: GGMLQuantizationType | str, imatrix: np.ndarray | None = None) -> np.ndarray:
    """ggml_quantize_chunk over all rows (one thread). Returns uint8 (rows, row_bytes)."""
    q = GGMLQuantizationType[qtype.upper()] if isinstance(qtype, str) else GGMLQuantizationType(qtype)
    x = np.ascontiguousarray(x, dtype=np.float32)
    rows, n = x.shape
    bs, ts = GGML_QUANT_SIZES[q]
    out = np.zeros((rows, n // bs * ts), dtype=np.uint8)
    qw = None if imatrix is None else np.ascontiguousarray(imatrix, dtype=np.float32)
    written = _lib.ggml_quantize_chunk(int(q), _ptr(x), _ptr(out), 0, rows, n, None if qw is None else _ptr(qw))
    assert written == out.nbytes, (written, out.nbytes)
    return out


def dequantize(data: np.ndarray, qtype: GGMLQuantizationType | str, shape: tuple[int, int]) -> np.ndarray:
    """dequantize_row_<type> over the whole buffer."""
    q = GGMLQuantizationType[qtype.upper()] if isinstance(qtype, str) else GGMLQuantizationType(qtype)
    fn = getattr(_lib, f"dequantize_row_{q.name.lower().replace('_k', '_K')}")
    fn.restype = None
    fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64]
    raw = np.ascontiguousarray(data, dtype=np.uint8)
    out = np.empty(int(np.prod(shape)), dtype=np.float32)
    fn(_ptr(raw), _ptr(out), out.size)
    return out.reshape(shape)
