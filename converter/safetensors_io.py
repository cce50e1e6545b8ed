"""Safetensors files read by hand: the header parsed and checked, tensor bytes through pread.

We parse the header ourselves (8-byte little-endian length, then JSON) rather than calling the
safetensors package because every malformed file must fail with one line that names the file,
the tensor and what was expected; and we upcast to float32 ourselves so that BF16, F16 and both
FP8 flavours convert exactly (bit for bit what PyTorch's ``.float()`` gives, NaNs included).

Bytes are read with ``os.preadv`` into buffers the caller owns (and reuses), one tensor or one
element range at a time: a 24 GB checkpoint never occupies more than the buffers in flight, the
reads release the GIL so several can run at once, and a file that shrinks while it is being read
(another process truncating or rewriting it) gives a short read and a one-line SourceError naming
the file and tensor, where a mapping would kill the process with SIGBUS.

A source that is not already in the page cache is read with O_DIRECT where the file system
allows it (see ``direct_io``; ``FLUX_GGUF_DIRECT_IO``): the checkpoint is read once, and through
the page cache that costs a copy of every byte and, when the file nears the size of RAM, the
reclaim of as much cache again. A source mostly in the page cache stays buffered (a copy from
memory beats a trip to the disk). Direct reads land in the caller's buffer without a copy when
its address has the tensor's file offset modulo the page size (``raw_phase`` says which; the
pipeline places its buffers so), otherwise through a bounce buffer.
"""
from __future__ import annotations

import errno
import json
import math
import os
import pathlib
import stat
import struct
import threading
from dataclasses import dataclass

import numpy as np

from manifests.hashing import open_regular
from quant_kernels import upcast

from . import direct_io
from .direct_io import IO_ALIGN, DirectRefused
from .errors import SourceError

# Bytes per element of every dtype we read (safetensors' names).
DTYPE_SIZES: dict[str, int] = {"BF16": 2, "F16": 2, "F32": 4, "F8_E4M3": 1, "F8_E5M2": 1}
# The safetensors package refuses headers above 100 MB; so do we (a random file's first 8 bytes
# would otherwise ask for an absurd allocation).
MAX_HEADER_BYTES = 100_000_000


def _shape_text(shape: tuple[int, ...]) -> str:
    return "[" + ", ".join(str(d) for d in shape) + "]"


@dataclass(frozen=True)
class RawTensor:
    """One header entry, with offsets made absolute (bytes from the start of the file)."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin

    @property
    def count(self) -> int:
        return math.prod(self.shape)


# ---------------------------------------------------------------------------------------------
# Exact upcasts. Tables are built once; NaN bit patterns follow PyTorch's conversions so tests can
# compare every code bit for bit.


def _f16_table() -> np.ndarray:
    """float32 value of every float16 code; NaNs quieted (bit 22 set) as hardware F16C does."""
    t = np.arange(65536, dtype=np.uint32).astype(np.uint16).view(np.float16).astype(np.float32)
    bits = t.view(np.uint32)
    bits[np.isnan(t)] |= np.uint32(0x00400000)
    return t


def _f8_e4m3fn_table() -> np.ndarray:
    """float32 value of every float8_e4m3fn code: bias 7, no infinities, S.1111.111 is NaN."""
    t = np.empty(256, dtype=np.float32)
    for code in range(256):
        sign = -1.0 if code & 0x80 else 1.0
        exp, man = (code >> 3) & 0xF, code & 0x7
        if exp == 0xF and man == 0x7:
            t.view(np.uint32)[code] = 0xFFF00000 if code & 0x80 else 0x7FF00000  # PyTorch's NaN
        elif exp == 0:
            t[code] = sign * math.ldexp(man, -9)  # subnormal: man/8 * 2^-6
        else:
            t[code] = sign * math.ldexp(8 + man, exp - 10)  # (1 + man/8) * 2^(exp-7)
    return t


F16_TO_F32 = _f16_table()
F8_E4M3_TO_F32 = _f8_e4m3fn_table()
# float8_e5m2 is float16 with the low byte cut off: its code shifted left by 8 is the float16.
F8_E5M2_TO_F32 = F16_TO_F32[np.arange(256, dtype=np.uint32) << 8].copy()
_TABLES = {"F16": F16_TO_F32, "F8_E4M3": F8_E4M3_TO_F32, "F8_E5M2": F8_E5M2_TO_F32}


def upcast_into(raw: np.ndarray, dtype: str, out: np.ndarray) -> None:
    """Convert little-endian bytes ``raw`` (uint8) of ``dtype`` into float32 ``out`` (1-D), exactly."""
    if dtype == "BF16":
        bits = out.view(np.uint32)
        bits[...] = raw.view("<u2")
        bits <<= np.uint32(16)
    elif dtype == "F32":
        out[...] = raw.view("<f4")
    elif dtype == "F16":
        np.take(F16_TO_F32, raw.view("<u2"), out=out)
    else:
        np.take(_TABLES[dtype], raw, out=out)


_SERIAL_BELOW = 1 << 16


def upcast_rows(raw: np.ndarray, dtype: str, out: np.ndarray) -> None:
    """Like :func:`upcast_into` for ``out`` a C-contiguous float32 (rows, n) array, on every kernel
    thread (``quant_kernels.set_threads``). Launch it from the thread that runs the quantizers.
    Arrays under 64K elements (biases, norms) are converted on this thread: a parallel region
    costs more than they do."""
    rows, n = out.shape
    if rows * n < _SERIAL_BELOW:
        upcast_into(raw.reshape(-1), dtype, out.reshape(-1))
    elif dtype == "BF16":
        upcast.bf16_rows(raw.view("<u2").reshape(rows, n), out)
    elif dtype == "F32":
        upcast.f32_rows(raw.view("<u4").reshape(rows, n), out)
    elif dtype == "F16":
        upcast.table_rows(raw.view("<u2").reshape(rows, n), F16_TO_F32, out)
    else:
        upcast.table_rows(raw.reshape(rows, n), _TABLES[dtype], out)


def raw_codes(raw: np.ndarray, dtype: str, rows: int, n: int) -> tuple[np.ndarray, str, np.ndarray | None]:
    """The source bytes of a (rows, n) tensor as ``quant_kernels.quantize_raw`` takes them:
    (codes, kind, table)."""
    if dtype == "BF16":
        return raw.view("<u2").reshape(rows, n), "bf16", None
    if dtype == "F32":
        return raw.view("<u4").reshape(rows, n), "f32", None
    if dtype == "F16":
        return raw.view("<u2").reshape(rows, n), "table", F16_TO_F32
    return raw.reshape(rows, n), "table", _TABLES[dtype]


# ---------------------------------------------------------------------------------------------
# Header parsing.


def _fail(path: pathlib.Path, message: str) -> SourceError:
    return SourceError(f"{path}: {message}")


def _unique_pairs(pairs: list[tuple[str, object]]) -> dict[str, object]:
    seen: dict[str, object] = {}
    for key, value in pairs:
        if key in seen:
            raise _DuplicateKey(key)
        seen[key] = value
    return seen


class _DuplicateKey(Exception):
    pass


def _read_header(path: pathlib.Path, size: int) -> tuple[int, dict[str, object]]:
    with open_regular(path) as f:  # fstat on the descriptor: a FIFO swapped in is refused, never waited on
        head = f.read(8)
        if len(head) < 8:
            raise _fail(path, f"not a safetensors file (only {size} bytes; a safetensors file starts "
                              "with an 8-byte header length)")
        if head[:4] == b"GGUF":
            raise _fail(path, "not a safetensors file (it is a GGUF file)")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8 or n > MAX_HEADER_BYTES:
            raise _fail(path, f"not a safetensors file (header length {n} does not fit in the "
                              f"{size}-byte file)")
        blob = f.read(n)
    try:
        header = json.loads(blob.decode("utf-8"), object_pairs_hook=_unique_pairs)
    except UnicodeDecodeError as e:
        raise _fail(path, f"not a safetensors file (header is not UTF-8 text: byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise _fail(path, f"not a safetensors file (header is not JSON: {e.msg} at byte {e.pos})") from None
    except _DuplicateKey as e:
        raise _fail(path, f"header lies: key {_safe(e.args[0])} appears twice") from None
    except RecursionError:
        raise _fail(path, "not a safetensors file (header is JSON nested too deeply)") from None
    except ValueError as e:  # an integer beyond Python's digit limit, and the like
        raise _fail(path, f"not a safetensors file (header is not usable JSON: {str(e).split(';')[0]})") from None
    if not isinstance(header, dict):
        raise _fail(path, f"not a safetensors file (header is a JSON {type(header).__name__}, "
                          "expected an object)")
    for key in header:
        if not _is_text(key):
            raise _fail(path, f"header has a tensor name that is not valid Unicode text: {_safe(key)}")
    return 8 + n, header


def _is_text(s: str) -> bool:
    """False for strings holding lone surrogates (JSON '\\ud800' escapes decode to them)."""
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _safe(s: str) -> str:
    """``s`` for an error message: lone surrogates and control characters escaped."""
    return ascii(s)[1:-1] if not _is_text(s) or any(ord(c) < 32 or ord(c) == 127 for c in s) else s


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _parse_entry(path: pathlib.Path, name: str, entry: object, data_start: int) -> RawTensor:
    if not isinstance(entry, dict):
        raise _fail(path, f"tensor {name}: header entry is not an object")
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if not isinstance(dtype, str):
        raise _fail(path, f"tensor {name}: header entry has no dtype string")
    if not isinstance(shape, list) or not all(_is_int(d) for d in shape):
        raise _fail(path, f"tensor {name}: shape must be a list of non-negative integers, got {shape!r}")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_int(o) for o in offsets)):
        raise _fail(path, f"tensor {name}: data_offsets must be two non-negative integers, got {offsets!r}")
    if dtype not in DTYPE_SIZES:
        raise _fail(path, f"tensor {name} has dtype {dtype}; supported: {', '.join(DTYPE_SIZES)}")
    begin, end = offsets
    if begin > end:
        raise _fail(path, f"header lies about tensor {name}: data_offsets [{begin}, {end}] are out of order")
    shp = tuple(shape)
    need = math.prod(shp) * DTYPE_SIZES[dtype]
    if end - begin != need:
        raise _fail(path, f"header lies about tensor {name}: data_offsets [{begin}, {end}] span "
                          f"{end - begin} bytes but shape {_shape_text(shp)} x {dtype} needs {need}")
    return RawTensor(name, dtype, shp, data_start + begin, data_start + end)


def _check_layout(path: pathlib.Path, tensors: list[RawTensor], data_start: int, size: int) -> None:
    """Truncation first (the common real-world failure), then overlaps, holes, trailing bytes."""
    if tensors:
        last = max(tensors, key=lambda t: t.end)
        if last.end > size:
            raise _fail(path, f"truncated file: tensor {last.name} needs bytes up to {last.end} but "
                              f"the file has {size}")
    prev: RawTensor | None = None
    pos = data_start
    for t in sorted(tensors, key=lambda t: (t.begin, t.end)):
        if t.begin < pos and prev is not None:
            raise _fail(path, f"header lies: tensors {prev.name} and {t.name} overlap (data_offsets "
                              f"[{prev.begin - data_start}, {prev.end - data_start}] and "
                              f"[{t.begin - data_start}, {t.end - data_start}])")
        if t.begin > pos:
            raise _fail(path, f"header lies: {t.begin - pos} bytes before tensor {t.name} belong to no tensor")
        pos, prev = max(pos, t.end), t
    if pos < size:
        raise _fail(path, f"header lies: {size - pos} bytes after the last tensor belong to no tensor")


class SafetensorsFile:
    """One safetensors file: a checked header now, bytes through ``os.preadv`` on demand.

    Opening reads and validates only the header; the file is opened for reading on the first
    tensor read. ``close()`` closes it; reading afterwards raises. Reads may come from several
    threads at once (pread has no shared file position).
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = pathlib.Path(path)
        try:
            st = self.path.stat()
            if not stat.S_ISREG(st.st_mode):
                raise _fail(self.path, "not a regular file (a FIFO, device or socket cannot be a checkpoint)")
            self.size = st.st_size
            data_start, header = _read_header(self.path, self.size)
        except FileNotFoundError:
            raise _fail(self.path, "no such file") from None
        except OSError as e:
            raise _fail(self.path, f"cannot read ({e.strerror or e})") from None
        meta = header.pop("__metadata__", {})
        if not isinstance(meta, dict) or not all(isinstance(v, str) and _is_text(v) for v in meta.values()):
            raise _fail(self.path, "__metadata__ must be an object of strings")
        self.metadata: dict[str, str] = dict(meta)
        self.tensors: dict[str, RawTensor] = {
            name: _parse_entry(self.path, name, entry, data_start) for name, entry in header.items()
        }
        _check_layout(self.path, list(self.tensors.values()), data_start, self.size)
        self._fd: int | None = None
        self._direct_fd: int | None = None  # set on the first read when direct reads are chosen
        self.direct = False  # whether large reads bypass the page cache (decided on the first read)
        self._closed = False
        self._lock = threading.Lock()  # the descriptor is opened lazily; readers may be threads

    def _descriptor(self) -> int:
        with self._lock:
            if self._closed:
                raise _fail(self.path, "read after close()")
            if self._fd is None:
                mode = direct_io.mode()
                try:
                    self._fd = os.open(self.path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
                except OSError as e:
                    raise _fail(self.path, f"cannot read ({e.strerror or e})") from None
                if hasattr(os, "posix_fadvise"):
                    try:
                        os.posix_fadvise(self._fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
                    except OSError:
                        pass  # a hint only
                if mode == "on" or (mode == "auto" and not direct_io.mostly_cached(self._fd, self.size)):
                    self._direct_fd = direct_io.open_direct(self.path, os.O_RDONLY)
                    self.direct = self._direct_fd is not None
            return self._fd

    def _no_direct(self) -> None:
        """The file system turned a direct read down (EINVAL): buffered reads from now on. The
        descriptor stays open until close(): another thread may be reading through it, and a
        closed number can be reused by the next open() at once."""
        self.direct = False

    def raw_phase(self, name: str, first: int = 0) -> int:
        """The file offset of element ``first`` of ``name`` modulo IO_ALIGN: a buffer whose
        address has this remainder receives direct reads without a copy."""
        t = self.tensors[name]
        return (t.begin + first * DTYPE_SIZES[t.dtype]) % IO_ALIGN

    def read_raw_into(self, name: str, first: int, out: np.ndarray) -> None:
        """Copy the raw little-endian bytes of ``out.nbytes // width`` elements of tensor ``name``,
        starting at element ``first``, into ``out`` (any writable C-contiguous array).

        A file that ends before those bytes (truncated since it was opened) raises SourceError.
        """
        t = self.tensors[name]
        width = DTYPE_SIZES[t.dtype]
        start, count = t.begin + first * width, out.nbytes
        if count % width or start + count > t.end:
            raise ValueError(f"{self.path}: {count} bytes from element {first} do not fit tensor {name}")
        fd = self._descriptor()
        if count == 0:
            return
        view = memoryview(out).cast("B")
        if self.direct and count >= direct_io.DIRECT_MIN_BYTES:
            dfd = self._direct_fd
            try:
                if dfd is not None:
                    if (direct_io.address(out) - start) % IO_ALIGN == 0:
                        self._read_direct_in_place(fd, dfd, name, t, start, view)
                    else:
                        self._read_direct_bounced(dfd, name, t, start, view)
                    return
            except DirectRefused:
                self._no_direct()
        self._pread(fd, name, t, start, view)

    def _pread(self, fd: int, name: str, t: RawTensor, start: int, view: memoryview) -> None:
        """All of ``view`` from ``start``; a file that ends first raises (truncated)."""
        done, count = 0, len(view)
        while done < count:
            try:
                got = os.preadv(fd, [view[done:]], start + done)
            except OSError as e:
                raise _fail(self.path, f"cannot read tensor {name} ({e.strerror or e})") from None
            if got == 0:
                raise self._truncated(fd, name, t, start + done)
            done += got

    def _truncated(self, fd: int, name: str, t: RawTensor, at: int) -> SourceError:
        try:
            now = os.fstat(fd).st_size
        except OSError:
            now = at
        return _fail(self.path, f"truncated while reading tensor {name}: it needs bytes up to "
                                f"{t.end} but the file now has {now} (it had {self.size} when opened)")

    def _pread_direct(self, dfd: int, name: str, view: memoryview, offset: int) -> int:
        """One direct read of ``view`` (aligned address, offset and length) at ``offset``: the
        bytes read, fewer only at the end of the file. EINVAL raises DirectRefused."""
        done, count = 0, len(view)
        while done < count:
            try:
                got = os.preadv(dfd, [view[done:]], offset + done)
            except OSError as e:
                if e.errno == errno.EINVAL:
                    raise DirectRefused() from None
                raise _fail(self.path, f"cannot read tensor {name} ({e.strerror or e})") from None
            if got == 0:
                break
            done += got
            if got % IO_ALIGN:
                break  # the end of the file (a shorter read elsewhere would misalign the next)
        return done

    def _read_direct_in_place(self, fd: int, dfd: int, name: str, t: RawTensor, start: int,
                              view: memoryview) -> None:
        """Direct reads straight into ``view`` for its page-aligned middle; the partial pages at
        either end through the page cache."""
        count = len(view)
        head, mid = direct_io.split(start, count)
        for k in range(0, mid, direct_io.CHUNK):
            piece = view[head + k:head + min(mid, k + direct_io.CHUNK)]
            got = self._pread_direct(dfd, name, piece, start + head + k)
            if got < len(piece):
                self._pread(fd, name, t, start + head + k + got, piece[got:])
        if head:
            self._pread(fd, name, t, start, view[:head])
        if head + mid < count:
            self._pread(fd, name, t, start + head + mid, view[head + mid:])

    def _read_direct_bounced(self, dfd: int, name: str, t: RawTensor, start: int,
                             view: memoryview) -> None:
        """Direct reads of whole pages into this thread's bounce buffer, copied into ``view``."""
        bounce = direct_io.bounce_buffer()
        count = len(view)
        pos = start - start % IO_ALIGN
        end = start + count
        while pos < end:
            want = min(len(bounce), -(-(end - pos) // IO_ALIGN) * IO_ALIGN)
            got = self._pread_direct(dfd, name, bounce[:want], pos)
            lo, hi = max(pos, start), min(pos + got, end)
            if hi < min(pos + want, end):
                raise self._truncated(dfd, name, t, hi)
            view[lo - start:hi - start] = bounce[lo - pos:hi - pos]
            pos += want

    def read_elements_into(self, name: str, first: int, out: np.ndarray) -> None:
        """Upcast ``out.size`` elements of tensor ``name`` starting at element ``first`` into ``out``.

        ``out`` is a 1-D float32 view (e.g. rows of a larger C-contiguous array); row ranges of
        a tensor are contiguous element ranges, which is how fused diffusers parts are assembled.
        """
        t = self.tensors[name]
        raw = np.empty(out.size * DTYPE_SIZES[t.dtype], dtype=np.uint8)
        self.read_raw_into(name, first, raw)
        if raw.size:
            upcast_into(raw, t.dtype, out)

    def read(self, name: str) -> np.ndarray:
        """Tensor ``name`` as a C-contiguous float32 array of its header shape."""
        t = self.tensors[name]
        out = np.empty(t.shape, dtype=np.float32)
        self.read_elements_into(name, 0, out.reshape(-1))
        return out

    def close(self) -> None:
        with self._lock:
            self._closed = True
            for fd in (self._fd, self._direct_fd):
                if fd is not None:
                    os.close(fd)
            self._fd = self._direct_fd = None


# ---------------------------------------------------------------------------------------------
# Header encoding (for writers).


def encode_header(entries: list[tuple[str, str, tuple[int, ...]]], metadata: dict[str, str]) -> bytes:
    """The 8-byte length + JSON header for tensors stored back to back in ``entries`` order.

    ``entries`` holds (name, dtype, shape). The JSON is padded with spaces to a multiple of 8
    bytes, as the safetensors package does, so tensor data starts aligned.
    """
    header: dict[str, object] = {"__metadata__": dict(metadata)} if metadata else {}
    pos = 0
    for name, dtype, shape in entries:
        n = math.prod(shape) * DTYPE_SIZES[dtype]
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [pos, pos + n]}
        pos += n
    blob = json.dumps(header, separators=(",", ":")).encode("utf-8")
    blob += b" " * (-len(blob) % 8)
    return struct.pack("<Q", len(blob)) + blob
