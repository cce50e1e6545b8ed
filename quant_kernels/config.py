"""Numba options for every kernel, in one place.

``fastmath`` stays off: its ``contract`` flag would fuse multiply-adds and change bytes.
``cache=True`` lets a second process reach its first quantized tensor without recompiling.
"""
from __future__ import annotations

JIT_OPTIONS = {"cache": True, "fastmath": False, "nogil": True}
PARALLEL_JIT_OPTIONS = {**JIT_OPTIONS, "parallel": True}
