"""One writer per output: an exclusive, non-blocking file lock held from planning to the rename.

Two runs writing the same output (two ``convert`` runs to one ``-o``, two ``release build`` of
one folder, two downloads into one folder) would otherwise race: the second could remove or
replace what the first is still writing. Each writer takes ``fcntl.flock`` on a hidden lock file
next to (or inside) its target before it plans anything; a second run fails at once, naming the
target and the holder's pid (written into the lock file), instead of waiting or interfering.

The lock file is removed when the lock is released. A run that finds the file replaced or removed
between its ``open`` and its ``flock`` (the previous holder just released it) retries on the new
file, so removing it never lets two runs hold the lock at once. A process that dies holds no lock
(the kernel drops it); its lock file is reused by the next run.
"""
from __future__ import annotations

import contextlib
import os
import stat
from pathlib import Path
from typing import Iterable, Iterator

from .errors import ManifestError

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX: no locking (documented)
    fcntl = None  # type: ignore[assignment]

LOCK_SUFFIX = ".flux-gguf.lock"
_FLAGS = os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NONBLOCK", 0)


class OutputBusyError(ManifestError):
    """Another run holds the lock on this output."""

    def __init__(self, target: str, holder: str):
        self.target = target
        self.holder = holder
        super().__init__(f"{target}: another flux-gguf run ({holder}) is writing it; wait for it to finish "
                         "or choose another output")


def lock_path_for(target: str | os.PathLike[str]) -> Path:
    """``DIR/.NAME.flux-gguf.lock`` beside ``target`` (a file or folder name)."""
    p = Path(target)
    return p.with_name(f".{p.name}{LOCK_SUFFIX}")


def _holder(fd: int) -> str:
    try:
        text = os.pread(fd, 64, 0).decode("ascii", "replace").strip()
    except OSError:
        text = ""
    return f"pid {text}" if text.isdigit() else "pid unknown"


class OutputLock:
    """An acquired lock; ``release()`` (or leaving the ``with`` block) removes the lock file."""

    def __init__(self, target: Path, path: Path, fd: int) -> None:
        self.target, self.path, self._fd = target, path, fd

    def release(self) -> None:
        if self._fd < 0:
            return
        try:
            st = os.fstat(self._fd)
            now = os.lstat(self.path)
            if (now.st_dev, now.st_ino) == (st.st_dev, st.st_ino):
                os.unlink(self.path)  # still holding the lock: the next run retries on a new file
        except OSError:
            pass
        finally:
            os.close(self._fd)  # drops the flock
            self._fd = -1

    def __enter__(self) -> "OutputLock":
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def acquire(target: str | os.PathLike[str], lock_file: str | os.PathLike[str] | None = None) -> OutputLock:
    """Take the exclusive lock on ``target`` (lock file ``lock_file``, default :func:`lock_path_for`).

    Raises :class:`OutputBusyError` at once if another run holds it, and ``OSError`` if the lock
    file cannot be created (the caller names the output it was for).
    """
    tgt = Path(target)
    path = Path(lock_file) if lock_file is not None else lock_path_for(tgt)
    if fcntl is None:  # pragma: no cover
        return OutputLock(tgt, path, -1)
    for _ in range(100):
        fd = os.open(path, _FLAGS, 0o644)  # O_NOFOLLOW: a planted link is an error, never followed
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise OSError(f"{path} is not a regular file")
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise OutputBusyError(str(tgt), _holder(fd)) from None
            try:
                now = os.lstat(path)
            except FileNotFoundError:
                now = None
            if now is None or (now.st_dev, now.st_ino) != (st.st_dev, st.st_ino):
                os.close(fd)  # the holder released (and removed) it between our open and flock
                continue
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
            return OutputLock(tgt, path, fd)
        except BaseException:
            with contextlib.suppress(OSError):
                os.close(fd)
            raise
    raise OSError(f"{path}: the lock file keeps being replaced")


@contextlib.contextmanager
def locked(targets: Iterable[str | os.PathLike[str]]) -> Iterator[list[OutputLock]]:
    """Hold the locks of several targets (taken in sorted order, so runs never deadlock)."""
    held: list[OutputLock] = []
    try:
        for t in sorted({Path(t) for t in targets}):
            held.append(acquire(t))
        yield held
    finally:
        for lock in reversed(held):
            lock.release()
