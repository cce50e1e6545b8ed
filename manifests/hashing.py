"""SHA-256 of files and byte streams, in fixed-size chunks, without ever reading an output twice.

Why this shape:
- ``hash_file`` reads with ``readinto`` into one reused buffer (8 MiB by default): on the
  2-core build boxes that runs at hashlib's own speed (~1.6 GB/s with SHA-NI), i.e. disk speed.
- Outputs are hashed *while they are written* (``HashingWriter``, ``write_bytes_atomic``,
  ``copy_file_hashed``) so a release never re-reads what it just wrote.
- Sources are hashed by ``BackgroundHasher`` in a thread while the conversion runs: hashlib
  releases the GIL on large updates, so the hash overlaps the quantization instead of adding to it.
- Files are written to a hidden, unique, marked temporary name beside the final one
  (``.NAME.<pid>-<random>.flux-gguf.partial``, see ``partial_path``) and renamed only when
  complete: two runs never share one, and a user's own ``x.partial`` is never touched.
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import os
import secrets
import stat
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Callable, Iterable

DEFAULT_CHUNK_SIZE = 8 << 20
PARTIAL_SUFFIX = ".partial"
PARTIAL_MARK = ".flux-gguf" + PARTIAL_SUFFIX
"""Every temporary name of ours ends with this (and starts with a dot)."""
_MAX_NAME_BYTES = 255  # NAME_MAX on every file system we write to


@dataclass(frozen=True)
class FileDigest:
    """Size in bytes and lowercase hex SHA-256 of one file or byte string."""

    size: int
    sha256: str


def _check_chunk_size(chunk_size: int) -> None:
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive number of bytes, got {chunk_size}")


def hash_bytes(data: bytes | bytearray | memoryview) -> FileDigest:
    """Digest of an in-memory byte string (manifest.json, README.md, SHA256SUMS)."""
    view = memoryview(data)
    return FileDigest(view.nbytes, hashlib.sha256(view).hexdigest())


def hash_stream(
    stream: BinaryIO,
    *,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    stop: threading.Event | None = None,
    on_bytes: Callable[[int], None] | None = None,
) -> FileDigest:
    """Digest of everything left in a binary stream, read in ``chunk_size`` pieces.

    ``stop``, when set by another thread, abandons the work early (raises ``InterruptedError``).
    ``on_bytes(n)`` is called after each chunk (progress bars live in the CLI, not here).
    """
    _check_chunk_size(chunk_size)
    h = hashlib.sha256()
    buf = bytearray(chunk_size)
    view = memoryview(buf)
    size = 0
    while True:
        if stop is not None and stop.is_set():
            raise InterruptedError("hashing was cancelled")
        n = stream.readinto(view)  # type: ignore[attr-defined]
        if not n:
            break
        h.update(view[:n])
        size += n
        if on_bytes is not None:
            on_bytes(n)
    return FileDigest(size, h.hexdigest())


def hash_file(
    path: str | os.PathLike[str],
    *,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    on_bytes: Callable[[int], None] | None = None,
) -> FileDigest:
    """Size and SHA-256 of a regular file, read once in fixed-size chunks (a FIFO is refused, not waited on)."""
    with open_regular(path) as f:
        return hash_stream(f, chunk_size=chunk_size, on_bytes=on_bytes)


def hash_range(
    stream: BinaryIO,
    offset: int,
    length: int,
    *,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> str | None:
    """SHA-256 of ``length`` bytes at ``offset`` of a seekable stream; None if the stream is shorter.

    Used to pinpoint damaged tensors inside a GGUF by their recorded byte ranges, independently
    of the (possibly damaged) GGUF header.
    """
    _check_chunk_size(chunk_size)
    stream.seek(offset)
    h = hashlib.sha256()
    buf = bytearray(min(chunk_size, max(length, 1)))
    view = memoryview(buf)
    left = length
    while left:
        n = stream.readinto(view[: min(left, len(buf))])  # type: ignore[attr-defined]
        if not n:
            return None
        h.update(view[:n])
        left -= n
    return h.hexdigest()


def stored(written: int | None, path: str | os.PathLike[str] | None = None) -> int:
    """The count one write returned, refusing a write that stored nothing (None: a non-blocking
    file that would block; 0: nothing stored): a loop writing the rest would spin forever on it."""
    if not written:
        raise OSError(errno.EIO, "the write stored nothing", None if path is None else os.fspath(path))
    return written


def pwrite_all(fd: int, data: bytes | bytearray | memoryview, offset: int,
               path: str | os.PathLike[str] | None = None) -> None:
    """All of ``data`` at ``offset`` of ``fd``: a short ``pwrite`` (a disk filling up, a signal) has
    its rest written again, so the next call reports the error (ENOSPC) instead of leaving a hole."""
    view = memoryview(data).cast("B")
    done = 0
    while done < view.nbytes:
        done += stored(os.pwrite(fd, view[done:], offset + done), path)


def write_all(f: BinaryIO, data: bytes | bytearray | memoryview, path: str | os.PathLike[str] | None = None) -> int:
    """All of ``data`` through ``f.write``: an unbuffered file (``buffering=0``, ``FileIO``) may
    store only part of it, and a buffered one returns the whole length; the rest is written again."""
    view = memoryview(data).cast("B")
    done = 0
    while done < view.nbytes:
        done += stored(f.write(view[done:]), path)
    return view.nbytes


class HashingWriter:
    """Wraps a binary file: every ``write`` also feeds the hash, so the output is never re-read."""

    def __init__(self, raw: BinaryIO):
        self._raw = raw
        self._hash = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes | bytearray | memoryview) -> int:
        view = memoryview(data).cast("B")
        write_all(self._raw, view)
        self._hash.update(view)
        self.size += view.nbytes
        return view.nbytes

    def digest(self) -> FileDigest:
        return FileDigest(self.size, self._hash.hexdigest())


def _bounded(name: str, room: int) -> str:
    """``name`` cut to at most ``room`` bytes of UTF-8 (uniqueness comes from the token, not the name)."""
    raw = name.encode("utf-8", "surrogateescape")
    return name if len(raw) <= room else raw[:max(room, 0)].decode("utf-8", "ignore")


def partial_path(path: str | os.PathLike[str]) -> Path:
    """A fresh temporary name beside ``path``: hidden, unique to this call, marked as ours.

    ``.NAME.<pid>-<random>.flux-gguf.partial``: two runs writing the same output never share a
    partial file, and no name a user gives a file (``README.md.partial``, ``x.bin.partial``)
    is ever used, overwritten or removed. Very long names are shortened to fit NAME_MAX.
    """
    p = Path(path)
    tail = f".{os.getpid()}-{secrets.token_hex(6)}{PARTIAL_MARK}"
    return p.with_name("." + _bounded(p.name, _MAX_NAME_BYTES - 1 - len(tail)) + tail)


def resumable_partial_path(path: str | os.PathLike[str]) -> Path:
    """The one temporary name a download of ``path`` resumes from: ``.NAME.flux-gguf.partial``.

    Stable across runs (so an interrupted download resumes), hidden and marked; callers hold the
    folder's lock (:mod:`manifests.locking`) while they use it, so no two runs share it.
    """
    p = Path(path)
    return p.with_name("." + _bounded(p.name, _MAX_NAME_BYTES - 1 - len(PARTIAL_MARK)) + PARTIAL_MARK)


def is_partial_name(name: str) -> bool:
    """True for a temporary name of ours (what a release may never list as a file)."""
    return name.startswith(".") and name.endswith(PARTIAL_MARK)


def open_partial(path: str | os.PathLike[str], buffering: int = -1, *, dir_fd: int | None = None) -> io.BufferedWriter:
    """Open ``path`` (a name from ``partial_path``/``resumable_partial_path``) for writing as a
    fresh regular file; with ``dir_fd``, ``path`` is a name relative to that open folder.

    Whatever already sits under that name (a leftover partial file of ours, or a symbolic link
    someone planted) is unlinked first, and the new file is created with O_EXCL | O_NOFOLLOW, so bytes
    are never written through a link to a file outside the output folder.
    """
    p = Path(path)
    try:
        st = os.lstat(p, dir_fd=dir_fd)
    except FileNotFoundError:
        st = None
    if st is not None:
        if stat.S_ISDIR(st.st_mode):
            raise IsADirectoryError(errno.EISDIR, "a folder is in the way", str(p))
        os.unlink(p, dir_fd=dir_fd)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    fd = os.open(p, flags, 0o644, dir_fd=dir_fd)
    try:
        return open(fd, "wb", buffering=buffering)  # type: ignore[return-value]
    except BaseException:
        os.close(fd)
        raise


def write_bytes_atomic(path: str | os.PathLike[str], data: bytes) -> FileDigest:
    """Write ``data`` to ``path`` via a unique partial name and a rename; return its digest."""
    final = Path(path)
    tmp = partial_path(final)
    try:
        with open_partial(tmp) as f:
            w = HashingWriter(f)
            w.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return w.digest()


def copy_file_hashed(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    *,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> FileDigest:
    """Copy ``src`` to ``dst`` (via a unique partial name), hashing the bytes as they pass through.

    ``src`` may be a path or a binary file object opened by the caller (e.g. by
    :func:`manifests.paths.open_inside`, which checked what it opened); a path is opened here
    without blocking on a FIFO and must be a regular file.
    """
    _check_chunk_size(chunk_size)
    final = Path(dst)
    tmp = partial_path(final)
    buf = bytearray(chunk_size)
    view = memoryview(buf)
    try:
        with _open_source(src) as fin, open_partial(tmp) as fout:
            w = HashingWriter(fout)
            while n := fin.readinto(view):
                w.write(view[:n])
            fout.flush()
            os.fsync(fout.fileno())
        os.replace(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return w.digest()


def open_regular(path: str | os.PathLike[str]) -> io.FileIO:
    """Open ``path`` for reading, refusing (IsADirectoryError / OSError) anything but a regular file.

    Opened with O_NONBLOCK and checked with ``fstat`` on the descriptor, so a FIFO or device
    swapped in under the name is refused at once instead of blocking or reading forever.
    """
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise OSError(errno.EINVAL, "not a regular file", str(path))
        if hasattr(os, "set_blocking"):
            os.set_blocking(fd, True)
        return open(fd, "rb", buffering=0)  # type: ignore[return-value]
    except BaseException:
        os.close(fd)
        raise


def read_regular(path: str | os.PathLike[str], limit: int) -> bytes:
    """The whole of ``path``, a regular file of at most ``limit`` bytes (:func:`open_regular`'s checks).

    For small inputs read whole (keys, certificates, passwords, signatures): a sparse or growing
    file is refused from its size, never read past ``limit + 1`` bytes. Raises OSError(EFBIG)
    naming the size when it is larger.
    """
    with open_regular(path) as f:
        size = os.fstat(f.fileno()).st_size
        chunks: list[bytes] = []
        got = 0
        while size <= limit and got <= limit and (chunk := f.read(limit + 1 - got)):
            chunks.append(chunk)
            got += len(chunk)
    if size > limit or got > limit:
        raise OSError(errno.EFBIG, f"{max(size, got):,} bytes, more than the {limit:,} allowed", str(path))
    return b"".join(chunks)


def _open_source(src: object) -> "contextlib.AbstractContextManager[BinaryIO]":
    if hasattr(src, "readinto"):
        return contextlib.nullcontext(src)  # type: ignore[arg-type]
    return open_regular(src)  # type: ignore[arg-type]


def _lower_thread_priority() -> None:
    """Nice the calling thread only (Linux keeps a nice value per thread; elsewhere a no-op).

    Measured on 2 pinned cores converting a 1.09 GB source to Q4_K_M: hashing at normal
    priority added ~5 % to the wall time, niced ~1 %: the hash then fills the gaps the numba
    kernels leave (reads, writes, fsync) instead of pre-empting them.
    """
    if sys.platform.startswith("linux") and hasattr(os, "setpriority"):
        try:
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
        except OSError:
            pass


class BackgroundHasher:
    """Hashes a list of files in one background thread; ``result()`` joins and returns digests.

    A conversion reads its source one tensor at a time through mmap; hashing the same files here
    in parallel keeps the source digest off the critical path (hashlib drops the GIL). Use as a
    context manager so an exception in the conversion cancels the hashing promptly.
    """

    def __init__(
        self,
        paths: Iterable[str | os.PathLike[str]],
        *,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        low_priority: bool = True,
    ):
        _check_chunk_size(chunk_size)
        self.paths = [Path(p) for p in paths]
        self._chunk_size = chunk_size
        self._low_priority = low_priority
        self._stop = threading.Event()
        self._digests: dict[Path, FileDigest] = {}
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="flux-gguf-source-hasher", daemon=True)
        self._started = False

    def _run(self) -> None:
        if self._low_priority:
            _lower_thread_priority()
        try:
            for p in self.paths:
                with open(p, "rb", buffering=0) as f:
                    self._digests[p] = hash_stream(f, chunk_size=self._chunk_size, stop=self._stop)
        except BaseException as e:  # re-raised in the caller's thread by result()
            self._error = e

    def start(self) -> "BackgroundHasher":
        if not self._started:
            self._started = True
            self._thread.start()
        return self

    def cancel(self) -> None:
        self._stop.set()
        if self._started:
            self._thread.join()

    def result(self) -> dict[Path, FileDigest]:
        """Wait for the thread; digests by path in the order given. Re-raises the thread's error."""
        self.start()
        self._thread.join()
        if self._error is not None:
            raise self._error
        return {p: self._digests[p] for p in self.paths}

    def __enter__(self) -> "BackgroundHasher":
        return self.start()

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is not None:
            self.cancel()
