"""Byte-exact numba K-quant kernels (ggml's reference quantizers, reimplemented)."""
from __future__ import annotations

import os

# numba's OpenMP threading layer keeps its worker threads spinning after every parallel region
# (libgomp's default: 300,000 spins). A conversion launches a region per tensor and runs reader,
# hash and writer threads beside them, which the spinning workers starve: measured on 2 cores,
# 2000 short Q8_0 regions next to a hashing thread took 13-24 s spinning and 4.8-5.1 s passive.
# Set before the first region loads libgomp; a value the user set is kept.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

# 512-bit vectors where the CPU has AVX-512 (see _vector_width): opt-in, before numba defines a
# single function; the flux-gguf command opts in.
if os.environ.get("FLUX_GGUF_VECTOR_WIDTH") == "512":
    from ._vector_width import prefer_512_bit

    prefer_512_bit()

from ._cache import invalidate_stale_kernels

invalidate_stale_kernels()  # before any kernel module is imported

from .api import (
    compile_kernel, dequantize, get_threads, quantize, quantize_raw, row_nbytes, set_threads, uncompiled_kernels,
)
from .errors import BlockSizeError, NonFiniteError, QuantError, ShapeError, UnsupportedTypeError
from .floats import bfloat16_bits_to_f32, to_bfloat16_bits, to_float16
from .types import SPECS, QuantSpec, resolve, supported_type_names
from ._vector_width import vector_width

__all__ = [
    "quantize", "quantize_raw", "dequantize", "set_threads", "get_threads", "row_nbytes", "uncompiled_kernels", "compile_kernel",
    "vector_width",
    "to_float16", "to_bfloat16_bits", "bfloat16_bits_to_f32",
    "QuantSpec", "SPECS", "resolve", "supported_type_names",
    "QuantError", "BlockSizeError", "NonFiniteError", "ShapeError", "UnsupportedTypeError",
]
