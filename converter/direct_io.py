"""Reads and writes that bypass the page cache (O_DIRECT), for the conversion's large streams.

A conversion reads a 23.8 GB checkpoint once and writes each output once. Through the page
cache every byte costs the kernel a copy, a page to hold it and, once RAM is full, the reclaim
of another; none of it is ever read again. Measured with ``scripts/bench_direct_io.py --gb 4`` on
a 2-core, 24 GB virtual machine (where fresh pages are expensive; bare metal pays less):
buffered, 1.3 CPU s per GB read and 4.0 per GB written; direct, 0.02 either way, at 2.3x and 8x
the throughput. Direct I/O moves whole pages between the device and the caller's
memory, so offsets, lengths and buffer addresses must be multiples of IO_ALIGN. The readers and
writers built on this module send the page-aligned middle of each large transfer direct, and
the partial pages at either end (shared with the neighbouring tensor) through the page cache;
a buffer whose address does not line up with the file goes through a per-thread bounce buffer.

A file system that refuses O_DIRECT (tmpfs, some network file systems) gets buffered I/O, as
does everything when ``FLUX_GGUF_DIRECT_IO=off``. There is no library to lean on here: Python
exposes O_DIRECT but nothing that handles alignment for it.
"""
from __future__ import annotations

import ctypes
import mmap
import os
import threading

import numpy as np

from .errors import SettingError

# The page size covers every logical block size Linux file systems use for O_DIRECT.
IO_ALIGN = 4096
ENV = "FLUX_GGUF_DIRECT_IO"
MODES = ("auto", "on", "off")
# Transfers smaller than this stay buffered (direct I/O pays off on large sequential ones only).
DIRECT_MIN_BYTES = 1 << 20
CHUNK = 64 << 20  # one direct request
BOUNCE_BYTES = 8 << 20  # per thread

O_DIRECT = getattr(os, "O_DIRECT", 0)  # 0: not Linux, buffered only


class DirectRefused(Exception):
    """The file system turned a direct transfer down (EINVAL): use the page cache instead."""


def mode() -> str:
    """``FLUX_GGUF_DIRECT_IO``: ``auto`` (the default: direct for sources not in the page cache
    and for outputs, where the file system allows it), ``on`` (direct wherever allowed, cached
    sources too) or ``off`` (the page cache for everything)."""
    raw = os.environ.get(ENV, "")
    value = raw.strip().lower() or "auto"
    if value not in MODES:
        raise SettingError(f"{ENV}={raw!r}: expected one of {', '.join(MODES)}")
    return value


def open_direct(path: str | os.PathLike[str], flags: int) -> int | None:
    """A second descriptor on ``path`` with O_DIRECT, or None where that is refused or unavailable."""
    if not O_DIRECT or mode() == "off":
        return None
    try:
        return os.open(path, flags | O_DIRECT | getattr(os, "O_CLOEXEC", 0))
    except OSError:
        return None


def cached_fraction(fd: int, size: int) -> float | None:
    """The fraction of the file's pages in the page cache (mincore on a mapping that is never
    touched, so asking changes nothing); None where the system cannot tell.

    Through ctypes because Python's mmap has no mincore and no dependency of ours offers one.
    (Reading a page with RWF_NOWAIT instead caches the page it asks about: the next process
    would find the file "cached".)"""
    if size <= 0 or not hasattr(os, "O_DIRECT"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        c_mmap, c_mincore, c_munmap = libc.mmap, libc.mincore, libc.munmap
    except (OSError, AttributeError):
        return None
    c_mmap.restype = ctypes.c_void_p
    c_mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    c_mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    c_munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    addr = c_mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
    if addr is None or addr == ctypes.c_void_p(-1).value:
        return None
    try:
        pages = -(-size // mmap.PAGESIZE)
        vec = np.zeros(pages, np.uint8)
        if c_mincore(addr, size, vec.ctypes.data) != 0:
            return None
        return float(np.count_nonzero(vec & 1)) / pages
    finally:
        c_munmap(addr, size)


def mostly_cached(fd: int, size: int) -> bool | None:
    """Whether at least half of the file is in the page cache; None if the system cannot tell."""
    fraction = cached_fraction(fd, size)
    return None if fraction is None else fraction >= 0.5


_bounce = threading.local()


def bounce_buffer() -> memoryview:
    """This thread's page-aligned bounce buffer (an anonymous mapping: aligned by construction)."""
    buf = getattr(_bounce, "buf", None)
    if buf is None:
        buf = _bounce.buf = memoryview(mmap.mmap(-1, BOUNCE_BYTES))
    return buf


def address(a: np.ndarray | memoryview) -> int:
    """The address of a numpy array's (or a buffer's) first byte."""
    if isinstance(a, memoryview):
        a = np.frombuffer(a, np.uint8)
    return int(a.__array_interface__["data"][0])


def placed(buf: np.ndarray, phase: int, nbytes: int) -> np.ndarray:
    """``nbytes`` of ``buf`` starting at an address with remainder ``phase`` modulo IO_ALIGN (``buf``
    must have IO_ALIGN bytes to spare): direct transfers to or from a file offset with the same
    remainder then need no bounce copy."""
    at = (phase - address(buf)) % IO_ALIGN
    return buf[at:at + nbytes]


def split(offset: int, nbytes: int) -> tuple[int, int]:
    """(head, middle): a transfer of ``nbytes`` at ``offset`` is ``head`` bytes up to a page
    boundary, ``middle`` bytes of whole pages, and the rest (a partial page)."""
    head = min(-offset % IO_ALIGN, nbytes)
    return head, (nbytes - head) // IO_ALIGN * IO_ALIGN
