"""Byte-exact numba K-quant kernels (ggml's reference quantizers, reimplemented)."""
from __future__ import annotations

from ._cache import invalidate_stale_kernels

invalidate_stale_kernels()  # before any kernel module is imported

from .api import (
    compile_kernel, dequantize, get_threads, quantize, quantize_raw, row_nbytes, set_threads, uncompiled_kernels,
)
from .errors import BlockSizeError, NonFiniteError, QuantError, ShapeError, UnsupportedTypeError
from .floats import bfloat16_bits_to_f32, to_bfloat16_bits, to_float16
from .types import SPECS, QuantSpec, resolve, supported_type_names

__all__ = [
    "quantize", "quantize_raw", "dequantize", "set_threads", "get_threads", "row_nbytes", "uncompiled_kernels", "compile_kernel",
    "to_float16", "to_bfloat16_bits", "bfloat16_bits_to_f32",
    "QuantSpec", "SPECS", "resolve", "supported_type_names",
    "QuantError", "BlockSizeError", "NonFiniteError", "ShapeError", "UnsupportedTypeError",
]
