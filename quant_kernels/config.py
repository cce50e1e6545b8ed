"""Numba options for every kernel, in one place.

``fastmath`` stays off: its ``contract`` flag would fuse multiply-adds and change bytes.
``cache=True`` lets a second process reach its first quantized tensor without recompiling.

Why every type module writes its own ``quantize_rows`` / ``dequantize_rows`` / ``encode_rows`` /
``quantize_codes`` wrappers (the same few lines around each type's own encoder) instead of
one factory closing over each block function: numba's cache misses on closures. A factory-made
``@njit(cache=True)`` wrapper was measured recompiling in every new process (cache_hits empty,
cache_misses 1, on numba 0.68), which would bring the ~20 s first-run compile back on every run.
"""
from __future__ import annotations

JIT_OPTIONS = {"cache": True, "fastmath": False, "nogil": True}
PARALLEL_JIT_OPTIONS = {**JIT_OPTIONS, "parallel": True}
