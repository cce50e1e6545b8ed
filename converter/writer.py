"""Streaming GGUF writer: header, KV and tensor infos through gguf-py, tensor data one at a time.

gguf-py's ``GGUFWriter`` encodes the header, the KV metadata and the tensor-info table (so the
bytes are exactly what every GGUF reader expects); the tensor data is streamed here so that a
23.8 GB conversion never holds more than one tensor, and so that the sha256 of the whole file and
of every tensor is computed from the bytes as they are written (the output is never re-read).

A file is written under a hidden, unique partial name (``.NAME.<pid>-<random>.flux-gguf.partial``)
and renamed to ``NAME`` only after the last byte has been
written and fsynced; on any failure the partial file is removed and an :class:`OutputError`
names the file that was not written and why.
"""
from __future__ import annotations

import dataclasses
import errno
import hashlib
import io
import os
import pathlib
import threading
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
from gguf import GGUF_DEFAULT_ALIGNMENT, GGMLQuantizationType, GGUFValueType, GGUFWriter
from gguf.gguf_writer import WriterState

from manifests.hashing import open_partial, partial_path, pwrite_all, stored, write_all

from . import direct_io
from .direct_io import IO_ALIGN, DirectRefused
from .errors import OutputError

ALIGNMENT = GGUF_DEFAULT_ALIGNMENT
PARTIAL_SUFFIX = ".partial"


@dataclass(frozen=True)
class KV:
    """One GGUF metadata entry (strings and unsigned ints are all this tool writes)."""

    key: str
    value: str | int
    vtype: GGUFValueType


@dataclass(frozen=True)
class TensorSlot:
    """A tensor as the tensor-info table declares it: shape is [out, in] (PyTorch order)."""

    name: str
    shape: tuple[int, ...]
    qtype: str  # GGML type name, e.g. "Q4_K"
    nbytes: int


@dataclass(frozen=True)
class TensorRecord:
    """Where one tensor's bytes landed and their sha256 (``offset`` is absolute in the file)."""

    name: str
    type: str
    shape: tuple[int, ...]
    offset: int
    nbytes: int
    sha256: str


@dataclass(frozen=True)
class ArtifactRecord:
    """A finished GGUF file: what the release/manifest step consumes."""

    path: pathlib.Path
    size: int
    sha256: str
    variant: str
    file_type: int
    tensors: list[TensorRecord] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["path"] = str(self.path)
        for t in d["tensors"]:
            t["shape"] = list(t["shape"])
        return d


def pad_to_alignment(n: int, align: int = ALIGNMENT) -> int:
    return (n + align - 1) // align * align


class _InMemoryGGUFWriter(GGUFWriter):
    """A GGUFWriter whose header, KV and tensor-info bytes go to memory instead of a file."""

    def __init__(self, arch: str) -> None:
        super().__init__(None, arch)
        self.buffer = io.BytesIO()

    def open_output_file(self, path: pathlib.Path | None = None) -> None:
        self.fout = [self.buffer]  # type: ignore[list-item]
        self.state = WriterState.EMPTY


def encode_header(kv: Sequence[KV], tensors: Sequence[TensorSlot]) -> bytes:
    """Header + KV + tensor infos, padded to the data alignment: the bytes before the first tensor.

    ``kv`` must start with ``general.architecture`` (gguf-py always writes it first).
    """
    if not kv or kv[0].key != "general.architecture":
        raise ValueError("the first KV entry must be general.architecture")
    w = _InMemoryGGUFWriter(str(kv[0].value))
    for item in kv[1:]:
        w.add_key_value(item.key, item.value, item.vtype)
    for t in tensors:
        qtype = GGMLQuantizationType[t.qtype]
        # A non-uint8 dtype makes gguf-py take the shape as element counts (no byte-shape fixup).
        w.add_tensor_info(t.name, t.shape, np.dtype(np.float32), t.nbytes, raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    raw = w.buffer.getvalue()
    return raw + bytes(pad_to_alignment(len(raw)) - len(raw))


def gguf_file_size(header_nbytes: int, tensors: Sequence[TensorSlot]) -> int:
    """Exact size of the file :class:`GGUFStreamWriter` writes (every tensor padded to ALIGNMENT)."""
    return header_nbytes + sum(pad_to_alignment(t.nbytes) for t in tensors)


class GGUFStreamWriter:
    """Writes one GGUF file tensor by tensor, hashing as it goes; use as a context manager.

    ``write_tensor`` must be called once per slot, in slot order; ``finish`` renames the
    completed file into place and returns its :class:`ArtifactRecord`. Leaving the ``with``
    block without ``finish`` (an exception, KeyboardInterrupt) removes the partial file.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        kv: Sequence[KV],
        tensors: Sequence[TensorSlot],
        *,
        variant: str,
        file_type: int,
        buffer_size: int = 8 << 20,
        file_hash: Any = None,
        any_order: bool = False,
        parallel: bool = False,
    ) -> None:
        """``file_hash``: an object with hashlib's ``update``/``hexdigest`` for the whole file's
        sha256 (the pipeline passes one that hashes on its own thread); default hashlib.sha256().
        ``parallel``: tensors are stored with ``reserve`` (in slot order) and ``write_at`` (from
        any thread, in any order) instead of ``write_tensor``, so several threads can write."""
        self.path = pathlib.Path(path)
        self.partial_path = partial_path(self.path)  # hidden, unique: see manifests.hashing
        self.variant = variant
        self.file_type = file_type
        self._slots = list(tensors)
        self._header = encode_header(kv, self._slots)
        self._next = 0
        self._offset = 0
        self._file_hash = hashlib.sha256() if file_hash is None else file_hash
        self._records: list[TensorRecord] = []
        self._pending_sha256: dict[int, Callable[[], str]] = {}  # record index -> digest still to come
        self._done = False
        self._synced = False
        # any_order: tensors may come in any order (a source read in its file order, e.g. streamed
        # from the Hub); each lands at its slot's offset, and the file's sha256 is computed by
        # reading the finished file back in sync().
        self._any_order = any_order
        self._slot_offsets: dict[str, tuple[int, TensorSlot]] = {}
        self._unordered: dict[str, TensorRecord] = {}
        # parallel: bytes reserve() promised and write_at() stored so far (sync checks they agree)
        self._parallel = parallel and not any_order
        self._reserved = 0
        self._stored = 0
        self._stored_lock = threading.Lock()
        if any_order or self._parallel:
            off = len(self._header)
            for slot in self._slots:
                self._slot_offsets[slot.name] = (off, slot)
                off += pad_to_alignment(slot.nbytes)
        try:
            self._fh: io.BufferedWriter | None = open_partial(self.partial_path, buffering=buffer_size)
        except OSError as e:
            self._fh = None
            raise self._os_error(e) from e
        # parallel: the whole pages of large tensors go straight to the disk (O_DIRECT, where the
        # file system allows it): an output is written once and not read back, and through the
        # page cache each byte costs a copy and a page (see direct_io). Partial pages, shared
        # with the neighbouring tensor or the header, go through the page cache.
        self._direct_fd: int | None = None
        self._direct_ok = False
        try:
            self._write(self._header)
            if any_order or self._parallel:
                try:
                    self._fh.flush()
                    os.ftruncate(self._fh.fileno(), self.expected_size)  # padding and gaps read as zeros
                except OSError as e:
                    raise self._os_error(e) from e
            if self._parallel:
                self._direct_fd = direct_io.open_direct(self.partial_path, os.O_WRONLY)
                self._direct_ok = self._direct_fd is not None
        except BaseException:
            self.abort()
            raise

    @property
    def direct(self) -> bool:
        """Whether large tensors are written with O_DIRECT (a parallel writer, where allowed)."""
        return self._direct_ok

    def offset_of(self, name: str) -> int:
        """Where tensor ``name``'s bytes go in the file (a parallel or any-order writer): a buffer
        whose address has this offset's remainder modulo IO_ALIGN is written without a copy."""
        if name not in self._slot_offsets:
            raise ValueError(f"{self.path}: no slot offsets for {name!r} (not in this file, or an ordered writer)")
        return self._slot_offsets[name][0]

    @property
    def expected_size(self) -> int:
        return gguf_file_size(len(self._header), self._slots)

    @property
    def next_tensor(self) -> str | None:
        """Name of the tensor ``write_tensor`` expects next (None when all are written)."""
        return self._slots[self._next].name if self._next < len(self._slots) else None

    def _os_error(self, e: OSError) -> OutputError:
        if e.errno == errno.ENOSPC:
            return OutputError(f"disk full while writing {self.path}")
        return OutputError(f"{self.path} was not written: {e.strerror or e}")

    def _write(self, data: bytes | memoryview) -> None:
        assert self._fh is not None, "writer is closed"
        # Hashed first: a hasher on its own thread (the pipeline's) then reads these bytes while
        # they are being written, instead of after. A failed write discards the file anyway.
        self._file_hash.update(data)
        try:
            write_all(self._fh, data)
        except OSError as e:
            raise self._os_error(e) from e
        self._offset += len(data)

    def write_tensor(self, name: str, data: np.ndarray | bytes | memoryview, *,
                     sha256: str | Callable[[], str] | None = None) -> TensorRecord:
        """Append the next tensor's encoded bytes (any C-contiguous buffer) plus alignment padding.

        ``sha256``: the bytes' digest when the caller has already computed it (hex), or a function
        giving it, called by ``commit`` (a digest still being computed on another thread: the
        bytes are written without waiting for it). The record returned then has an empty sha256."""
        if self._fh is None or self._done:
            raise ValueError(f"{self.path}: writer is closed")
        if self._next >= len(self._slots):
            raise ValueError(f"{self.path}: all {len(self._slots)} tensors are already written, got {name!r}")
        if self._any_order:
            return self._write_at(name, data)
        if self._parallel:
            raise ValueError(f"{self.path}: a parallel writer stores tensors with reserve() and write_at()")
        slot, buf = self._next_slot(name, data)
        offset = self._offset
        self._write(buf)
        self._write(bytes(pad_to_alignment(buf.nbytes) - buf.nbytes))
        if callable(sha256):
            self._pending_sha256[len(self._records)] = sha256
            digest = ""
        else:
            digest = sha256 or hashlib.sha256(buf).hexdigest()
        record = TensorRecord(slot.name, slot.qtype, slot.shape, offset, slot.nbytes, digest)
        self._records.append(record)
        self._next += 1
        return record

    def _next_slot(self, name: str, data: np.ndarray | bytes | memoryview) -> tuple[TensorSlot, memoryview]:
        """The slot ``name`` must be (the next one, in order) and ``data`` as bytes of its size."""
        slot = self._slots[self._next]
        if name != slot.name:
            raise ValueError(f"{self.path}: expected tensor {slot.name!r} next, got {name!r}")
        buf = memoryview(np.ascontiguousarray(data) if isinstance(data, np.ndarray) else data).cast("B")
        if buf.nbytes != slot.nbytes:
            raise ValueError(f"{self.path}: tensor {name} must be {slot.nbytes} bytes ({slot.qtype}), got {buf.nbytes}")
        return slot, buf

    def reserve(self, name: str, data: np.ndarray | bytes | memoryview, *,
                sha256: str | Callable[[], str] | None = None) -> int:
        """The ordered half of storing a tensor in a ``parallel`` writer: checks that ``name`` is
        the next slot and ``data`` its size, feeds the file's sha256 with the bytes and the
        padding, and records the tensor (``sha256`` as for ``write_tensor``). Returns the offset
        at which ``write_at`` must then store the same bytes, from any thread."""
        if not self._parallel:
            raise ValueError(f"{self.path}: reserve() needs a parallel writer")
        if self._fh is None or self._done:
            raise ValueError(f"{self.path}: writer is closed")
        if self._next >= len(self._slots):
            raise ValueError(f"{self.path}: all {len(self._slots)} tensors are already written, got {name!r}")
        slot, buf = self._next_slot(name, data)
        offset = self._offset
        self._file_hash.update(buf)
        self._file_hash.update(bytes(pad_to_alignment(buf.nbytes) - buf.nbytes))  # the padding: zeros (ftruncate)
        self._offset += pad_to_alignment(buf.nbytes)
        self._reserved += buf.nbytes
        if callable(sha256):
            self._pending_sha256[len(self._records)] = sha256
            digest = ""
        else:
            digest = sha256 or hashlib.sha256(buf).hexdigest()
        self._records.append(TensorRecord(slot.name, slot.qtype, slot.shape, offset, slot.nbytes, digest))
        self._next += 1
        return offset

    def write_at(self, offset: int, data: np.ndarray | bytes | memoryview) -> None:
        """Store bytes that ``reserve`` returned ``offset`` for (thread-safe: positioned writes)."""
        if self._fh is None:
            raise ValueError(f"{self.path}: writer is closed")
        buf = memoryview(np.ascontiguousarray(data) if isinstance(data, np.ndarray) else data).cast("B")
        fd = self._fh.fileno()
        try:
            if self._direct_ok and buf.nbytes >= direct_io.DIRECT_MIN_BYTES and self._direct_fd is not None:
                try:
                    self._write_direct(fd, self._direct_fd, offset, buf)
                except DirectRefused:
                    self._direct_ok = False  # the descriptor stays open until sync(): other threads
                    pwrite_all(fd, buf, offset)
            else:
                pwrite_all(fd, buf, offset)
        except OSError as e:
            raise self._os_error(e) from e
        with self._stored_lock:
            self._stored += buf.nbytes

    @staticmethod
    def _write_direct(fd: int, dfd: int, offset: int, buf: memoryview) -> None:
        """The whole pages of ``buf`` through ``dfd`` (from ``buf`` itself when its address lines
        up with ``offset``, else through this thread's bounce buffer), the rest through ``fd``."""
        n = buf.nbytes
        head, mid = direct_io.split(offset, n)
        if head:
            pwrite_all(fd, buf[:head], offset)
        if not mid:
            pass  # within one page, or across one boundary: no whole page to send direct
        elif (direct_io.address(buf) + head) % IO_ALIGN == 0:
            for k in range(0, mid, direct_io.CHUNK):
                m = min(direct_io.CHUNK, mid - k)
                _pwrite_direct(fd, dfd, buf[head + k:head + k + m], offset + head + k)
        else:
            bounce = direct_io.bounce_buffer()
            for k in range(0, mid, len(bounce)):
                m = min(len(bounce), mid - k)
                bounce[:m] = buf[head + k:head + k + m]
                _pwrite_direct(fd, dfd, bounce[:m], offset + head + k)
        if head + mid < n:
            pwrite_all(fd, buf[head + mid:], offset + head + mid)

    def _write_at(self, name: str, data: np.ndarray | bytes | memoryview) -> TensorRecord:
        if name not in self._slot_offsets or name in self._unordered:
            what = "already written" if name in self._unordered else "not in this file"
            raise ValueError(f"{self.path}: tensor {name!r} is {what}")
        offset, slot = self._slot_offsets[name]
        buf = memoryview(np.ascontiguousarray(data) if isinstance(data, np.ndarray) else data).cast("B")
        if buf.nbytes != slot.nbytes:
            raise ValueError(f"{self.path}: tensor {name} must be {slot.nbytes} bytes ({slot.qtype}), got {buf.nbytes}")
        assert self._fh is not None
        try:
            pwrite_all(self._fh.fileno(), buf, offset)
        except OSError as e:
            raise self._os_error(e) from e
        record = TensorRecord(slot.name, slot.qtype, slot.shape, offset, slot.nbytes, hashlib.sha256(buf).hexdigest())
        self._unordered[name] = record
        self._next += 1
        return record

    def _hash_back(self) -> None:
        """The sha256 of the finished file, read back (tensors were written out of order)."""
        self._file_hash.hexdigest()  # a threaded hasher (the pipeline's) saw only the header: let it stop
        h = hashlib.sha256()
        with open(self.partial_path, "rb") as f:
            chunk = bytearray(8 << 20)
            view = memoryview(chunk)
            while n := f.readinto(chunk):
                h.update(view[:n])
        self._file_hash = h
        self._offset = self.expected_size
        self._records = [self._unordered[slot.name] for slot in self._slots]

    def finish(self) -> ArtifactRecord:
        """fsync, rename NAME.partial -> NAME, fsync the directory; returns the record."""
        self.sync()
        return self.commit()

    def sync(self) -> None:
        """Flush and fsync the complete partial file and close it (the slow part of finishing)."""
        if self._fh is None or self._done:
            raise ValueError(f"{self.path}: writer is closed")
        if self._next != len(self._slots):
            raise ValueError(f"{self.path}: {len(self._slots) - self._next} tensors not written yet")
        if self._parallel and self._stored != self._reserved:
            raise ValueError(f"{self.path}: {self._reserved - self._stored} reserved bytes not written yet")
        fh, self._fh = self._fh, None
        try:
            fh.flush()
            os.fsync(fh.fileno())  # the direct writes' block allocations too: one inode
            self._close_direct()
            fh.close()
            if self._any_order:
                self._hash_back()
        except OSError as e:
            try:
                fh.close()
            except OSError:
                pass
            self._remove_partial()
            raise self._os_error(e) from e
        self._synced = True

    def commit(self) -> ArtifactRecord:
        """Rename the synced NAME.partial to NAME (atomic) and fsync the directory."""
        if not self._synced or self._done:
            raise ValueError(f"{self.path}: commit() needs a synced, unfinished writer")
        for i, digest in sorted(self._pending_sha256.items()):  # before the rename: a failed digest leaves no file
            try:
                self._records[i] = dataclasses.replace(self._records[i], sha256=digest())
            except BaseException:
                self._remove_partial()
                raise
        self._pending_sha256.clear()
        try:
            os.replace(self.partial_path, self.path)
        except OSError as e:
            self._remove_partial()
            raise self._os_error(e) from e
        _fsync_dir(self.path.parent)
        self._done = True
        assert self._offset == self.expected_size
        return ArtifactRecord(
            self.path, self._offset, self._file_hash.hexdigest(), self.variant, self.file_type, list(self._records)
        )

    def _close_direct(self) -> None:
        fd, self._direct_fd = self._direct_fd, None
        self._direct_ok = False
        if fd is not None:
            try:
                os.close(fd)
            except OSError:
                pass

    def abort(self) -> None:
        """Close and delete the partial file (idempotent; a finished file is left alone)."""
        self._close_direct()
        if self._fh is not None:
            fh, self._fh = self._fh, None
            try:
                fh.close()
            except OSError:
                pass  # the data is being discarded anyway (e.g. a full disk fails the final flush)
        if not self._done:
            self._remove_partial()

    def _remove_partial(self) -> None:
        try:
            self.partial_path.unlink()
        except FileNotFoundError:
            pass

    def __enter__(self) -> GGUFStreamWriter:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if not self._done:
            self.abort()


def _pwrite_direct(fd: int, dfd: int, buf: memoryview, offset: int) -> None:
    """``buf`` (aligned address, offset and length) through the O_DIRECT descriptor ``dfd``; a
    short write's misaligned rest through ``fd``. EINVAL (refused) raises DirectRefused."""
    done = 0
    while done < buf.nbytes:
        if done % IO_ALIGN:
            pwrite_all(fd, buf[done:], offset + done)
            return
        try:
            done += stored(os.pwrite(dfd, buf[done:], offset + done))
        except OSError as e:
            if e.errno == errno.EINVAL:
                raise DirectRefused() from None
            raise


def _fsync_dir(path: pathlib.Path) -> None:
    """Make the rename durable; some filesystems refuse to open a directory, which is harmless."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
