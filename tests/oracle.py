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


# --- ggml's own GGUF reader (gguf_init_from_file), as llama-quantize's load_imatrix uses it ---

class _GGUFInitParams(ctypes.Structure):
    _fields_ = [("no_alloc", ctypes.c_bool), ("ctx", ctypes.POINTER(ctypes.c_void_p))]


def _gguf_api() -> ctypes.CDLL:
    L = _lib
    L.gguf_init_from_file.restype = ctypes.c_void_p
    L.gguf_init_from_file.argtypes = [ctypes.c_char_p, _GGUFInitParams]
    L.gguf_find_key.restype = ctypes.c_int64
    L.gguf_find_key.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
    L.gguf_get_kv_type.restype = ctypes.c_int
    L.gguf_get_kv_type.argtypes = [ctypes.c_void_p, ctypes.c_int64]
    L.gguf_get_n_kv.restype = ctypes.c_int64
    L.gguf_get_n_kv.argtypes = [ctypes.c_void_p]
    L.gguf_get_key.restype = ctypes.c_char_p
    L.gguf_get_key.argtypes = [ctypes.c_void_p, ctypes.c_int64]
    L.gguf_get_val_u32.restype = ctypes.c_uint32
    L.gguf_get_val_u32.argtypes = [ctypes.c_void_p, ctypes.c_int64]
    L.gguf_get_val_str.restype = ctypes.c_char_p
    L.gguf_get_val_str.argtypes = [ctypes.c_void_p, ctypes.c_int64]
    L.gguf_get_arr_n.restype = ctypes.c_size_t
    L.gguf_get_arr_n.argtypes = [ctypes.c_void_p, ctypes.c_int64]
    L.gguf_get_arr_type.restype = ctypes.c_int
    L.gguf_get_arr_type.argtypes = [ctypes.c_void_p, ctypes.c_int64]
    L.gguf_get_arr_str.restype = ctypes.c_char_p
    L.gguf_get_arr_str.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_size_t]
    L.gguf_get_n_tensors.restype = ctypes.c_int64
    L.gguf_get_n_tensors.argtypes = [ctypes.c_void_p]
    L.gguf_get_tensor_name.restype = ctypes.c_char_p
    L.gguf_get_tensor_name.argtypes = [ctypes.c_void_p, ctypes.c_int64]
    L.ggml_get_tensor.restype = ctypes.c_void_p
    L.ggml_get_tensor.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
    L.ggml_get_data.restype = ctypes.c_void_p
    L.ggml_get_data.argtypes = [ctypes.c_void_p]
    L.ggml_nelements.restype = ctypes.c_int64
    L.ggml_nelements.argtypes = [ctypes.c_void_p]
    L.gguf_free.argtypes = [ctypes.c_void_p]
    L.ggml_free.argtypes = [ctypes.c_void_p]
    return L


GGUF_TYPE_UINT32, GGUF_TYPE_STRING, GGUF_TYPE_ARRAY = 4, 8, 9


def ggml_read_imatrix(path) -> dict:
    """Load an imatrix GGUF through ggml's gguf_init_from_file the way llama-quantize's load_imatrix does.

    Returns {"kv": {key: gguf type id}, "datasets", "chunk_count", "chunk_size",
    "tensors": {name: (ne0, ne1, float32 data)}}; raises AssertionError where llama-quantize would refuse.
    """
    L = _gguf_api()
    ctx = ctypes.c_void_p()
    g = L.gguf_init_from_file(str(path).encode(), _GGUFInitParams(False, ctypes.pointer(ctx)))
    assert g, f"ggml's gguf_init_from_file refused {path}"
    try:
        kv = {L.gguf_get_key(g, i).decode(): L.gguf_get_kv_type(g, i) for i in range(L.gguf_get_n_kv(g))}
        ids = {k: L.gguf_find_key(g, k.encode()) for k in ("imatrix.datasets", "imatrix.chunk_count", "imatrix.chunk_size")}
        assert all(i >= 0 for i in ids.values()), f"missing imatrix metadata: {ids}"
        assert L.gguf_get_arr_type(g, ids["imatrix.datasets"]) == GGUF_TYPE_STRING
        datasets = [L.gguf_get_arr_str(g, ids["imatrix.datasets"], j).decode()
                    for j in range(L.gguf_get_arr_n(g, ids["imatrix.datasets"]))]
        tensors = {}
        for i in range(L.gguf_get_n_tensors(g)):
            name = L.gguf_get_tensor_name(g, i)
            t = L.ggml_get_tensor(ctx, name)
            # struct ggml_tensor: enum type (4 B + 4 B padding), buffer pointer, int64_t ne[4]
            ne = (ctypes.c_int64 * 4).from_address(t + 16)
            n = L.ggml_nelements(t)
            data = np.ctypeslib.as_array((ctypes.c_float * n).from_address(L.ggml_get_data(t))).copy()
            tensors[name.decode()] = (int(ne[0]), int(ne[1]), data)
        return {"kv": kv, "datasets": datasets,
                "chunk_count": L.gguf_get_val_u32(g, ids["imatrix.chunk_count"]),
                "chunk_size": L.gguf_get_val_u32(g, ids["imatrix.chunk_size"]), "tensors": tensors}
    finally:
        L.gguf_free(g)
        L.ggml_free(ctx)
