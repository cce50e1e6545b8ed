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

The lock name is ours, but what sits there may not be: a hard link to a user's file, a file of
another user, a folder, or a file with content of its own. Only a file this run created
(``O_EXCL``), or one that looks exactly like a lock file a dead run left (a regular file with one
link, owned by us, empty or holding a pid), is ever written; anything else is refused, untouched.
"""
from __future__ import annotations

import contextlib
import errno
import os
import re
import stat
from pathlib import Path
from typing import Iterable, Iterator

from .errors import ManifestError
from .hashing import pwrite_all

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX: no locking (documented)
    fcntl = None  # type: ignore[assignment]

LOCK_SUFFIX = ".flux-gguf.lock"
# O_NOFOLLOW: a planted symbolic link is an error, never followed; O_NONBLOCK: a FIFO never blocks.
_OPEN_FLAGS = os.O_RDWR | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NONBLOCK", 0) \
    | getattr(os, "O_NOCTTY", 0)
_CREATE_FLAGS = _OPEN_FLAGS | os.O_CREAT | os.O_EXCL
_PID_CONTENT = re.compile(rb"[0-9]{1,20}\n?")  # what acquire writes: the holder's pid and a newline


class OutputBusyError(ManifestError):
    """Another run holds the lock on this output."""

    def __init__(self, target: str, holder: str):
        self.target = target
        self.holder = holder
        super().__init__(f"{target}: another flux-gguf run ({holder}) is writing it; wait for it to finish "
                         "or choose another output")


class ForeignLockFileError(ManifestError):
    """Something that is not a lock file of ours sits at the lock file's name; it was left as it is."""

    def __init__(self, path: str, target: str, reason: str):
        self.path = path
        self.target = target
        self.reason = reason
        super().__init__(f"{path}: is in the way of the lock on {target} and is not a flux-gguf lock file ({reason}); "
                         "it was left untouched: move it away or choose another output")


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


def _open_lock_file(path: Path, target: Path) -> tuple[int, bool]:
    """``(fd, created)``: the lock file created by us (``O_EXCL``), or the one already there (not yet
    trusted), or ``(-1, False)`` when it vanished between the two opens (the caller retries)."""
    try:
        return os.open(path, _CREATE_FLAGS, 0o644), True
    except FileExistsError:
        pass
    except OSError as e:
        _refuse_unopenable(e, path, target)
        raise
    try:
        # Looked at before it is opened, so a device planted there is never opened at all; what is
        # opened is checked again through its descriptor (it may have been swapped meanwhile).
        _refuse_non_regular(os.lstat(path).st_mode, path, target)
        return os.open(path, _OPEN_FLAGS), False
    except FileNotFoundError:
        return -1, False
    except OSError as e:
        _refuse_unopenable(e, path, target)
        raise


def _refuse_non_regular(mode: int, path: Path, target: Path) -> None:
    if stat.S_ISLNK(mode):
        raise ForeignLockFileError(str(path), str(target), "it is a symbolic link")
    if stat.S_ISDIR(mode):
        raise ForeignLockFileError(str(path), str(target), "it is a folder")
    if not stat.S_ISREG(mode):
        raise ForeignLockFileError(str(path), str(target), "it is not a regular file")


def _refuse_unopenable(e: OSError, path: Path, target: Path) -> None:
    """A symbolic link or a folder at the lock name is named as such, not as a bare OS error."""
    if e.errno == errno.ELOOP:
        _refuse_non_regular(stat.S_IFLNK, path, target)
    if e.errno == errno.EISDIR:
        _refuse_non_regular(stat.S_IFDIR, path, target)


def _check_found(fd: int, st: os.stat_result, path: Path, target: Path) -> None:
    """A lock file found in place (not created by this run) must be one a run of ours left: checked
    under the flock, so no run of ours is writing it, and before any byte is written.

    It may be one another run created a moment ago and has not locked yet: that file is empty, so
    it passes, and whichever run flocks it first holds the lock; the other gets OutputBusyError."""
    if st.st_nlink != 1:
        raise ForeignLockFileError(str(path), str(target), f"it has {st.st_nlink} hard links, so another name shares "
                                                           "its content")
    if hasattr(os, "geteuid") and st.st_uid != os.geteuid():
        raise ForeignLockFileError(str(path), str(target), f"it belongs to user id {st.st_uid}, not to this user "
                                                           f"({os.geteuid()})")
    content = os.pread(fd, 32, 0) if st.st_size <= 32 else None
    if content is None or (content and not _PID_CONTENT.fullmatch(content)):
        raise ForeignLockFileError(str(path), str(target), f"it holds {st.st_size} bytes that are not a process id")


def acquire(target: str | os.PathLike[str], lock_file: str | os.PathLike[str] | None = None) -> OutputLock:
    """Take the exclusive lock on ``target`` (lock file ``lock_file``, default :func:`lock_path_for`).

    Raises :class:`OutputBusyError` at once if another run holds it, :class:`ForeignLockFileError`
    if what is at the lock file's name is not a lock file of ours (nothing is written to it), and
    ``OSError`` if the lock file cannot be created (the caller names the output it was for).
    """
    tgt = Path(target)
    path = Path(lock_file) if lock_file is not None else lock_path_for(tgt)
    if fcntl is None:  # pragma: no cover
        return OutputLock(tgt, path, -1)
    for _ in range(100):
        fd, created = _open_lock_file(path, tgt)
        if fd < 0:
            continue  # the holder released (and removed) it between our two opens
        try:
            st = os.fstat(fd)
            _refuse_non_regular(st.st_mode, path, tgt)
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
            # A file we created is ours even where the file system gives it another owner (NFS
            # root squash); one found in place is trusted only if it looks like a lock file of ours.
            if not created:
                _check_found(fd, os.fstat(fd), path, tgt)
            os.ftruncate(fd, 0)
            pwrite_all(fd, f"{os.getpid()}\n".encode(), 0, path)  # every write checked, this one too
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
