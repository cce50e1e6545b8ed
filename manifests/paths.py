"""Path safety: a manifest may only name plain files inside the release folder.

A manifest comes from the network; trusting its paths would let a crafted release make
``verify`` read (or a downloader write) anywhere. So every path must be relative, POSIX,
free of ``.``/``..``/empty components and of characters SHA256SUMS cannot carry, and no
component on disk may be a symbolic link. These checks run before any listed file is opened.

One name policy for every name that becomes a file name (manifest paths, release and LoRA names,
extra files, ``convert --name``): no character that is invisible or reorders the text around it
(:func:`name_problem`: controls, format characters such as U+202E or U+200B, separators, spaces
other than U+0020, private-use and unassigned code points), NFC form only, and two names are one
when they match after NFKC and case folding (:func:`name_key`), so ``README.md``/``readme.md``,
``café`` composed/decomposed and fullwidth look-alikes never become two files that look the same.
"""
from __future__ import annotations

import errno
import io
import os
import re
import stat
import unicodedata
from pathlib import Path

from .errors import UnsafePathError

_DRIVE = re.compile(r"^[A-Za-z]:")
# Resource limits, checked before any work that grows with the path: PATH_MAX and NAME_MAX of
# Linux, and a depth no release needs (a 60,000-component path once cost minutes and gigabytes).
MAX_PATH_BYTES = 4096
MAX_COMPONENT_BYTES = 255
MAX_DEPTH = 32
_FORBIDDEN_CHARS = {"\\": "a backslash", "\n": "a newline", "\r": "a carriage return", "\0": "a NUL byte"}

_CATEGORY_PROBLEMS = {
    "Cc": "a control character",
    "Cf": "an invisible format character",
    "Cs": "a lone surrogate",
    "Co": "a private-use character",
    "Cn": f"a code point unassigned in Unicode {unicodedata.unidata_version}",
    "Zl": "a line separator",
    "Zp": "a paragraph separator",
    "Zs": "a space other than U+0020",
}
_BIDI_CONTROLS = frozenset("\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")
# Default-ignorable code points (Unicode DerivedCoreProperties) outside the categories above: marks
# and letters that render as nothing (fillers, variation selectors), plus the blank braille cell.
_INVISIBLE_RANGES = ((0x034F, 0x034F), (0x115F, 0x1160), (0x17B4, 0x17B5), (0x180B, 0x180F), (0x2800, 0x2800),
                     (0x3164, 0x3164), (0xFE00, 0xFE0F), (0xFFA0, 0xFFA0), (0xE0100, 0xE01EF))


def character_problem(ch: str) -> str | None:
    """Why character ``ch`` may not appear in a name (one that is invisible, or that changes how the
    text around it is shown), or None."""
    if ch == " ":
        return None
    if ch in _BIDI_CONTROLS:
        return "a bidirectional control character, which reorders how the text around it is shown"
    problem = _CATEGORY_PROBLEMS.get(unicodedata.category(ch))
    if problem is None and any(lo <= ord(ch) <= hi for lo, hi in _INVISIBLE_RANGES):
        problem = "an invisible character"
    return problem


def describe_character(ch: str) -> str:
    """``U+202E RIGHT-TO-LEFT OVERRIDE``: a character shown by code point, never raw."""
    name = unicodedata.name(ch, "")
    return f"U+{ord(ch):04X}" + (f" {name}" if name else "")


def name_problem(text: str) -> str | None:
    """Why ``text`` cannot be a name we turn into a file name (see the module's name policy), or None."""
    for ch in text:
        problem = character_problem(ch)
        if problem is not None:
            return f"contains {describe_character(ch)} ({problem})"
    if not unicodedata.is_normalized("NFC", text):
        return (f"is not in Unicode NFC form (it is {ascii(text)}; composed it would be "
                f"{ascii(unicodedata.normalize('NFC', text))})")
    return None


def name_key(text: str) -> str:
    """What two names must not share: equal after NFKC and case folding, they look like one name
    (and are one file on case- or normalization-insensitive file systems)."""
    return unicodedata.normalize("NFKC", unicodedata.normalize("NFKC", text).casefold())


def twin_difference(a: str, b: str) -> str:
    """How two names with one :func:`name_key` differ, for messages."""
    if a.casefold() == b.casefold():
        return "only by case"
    return "only by case or Unicode compatibility forms (fullwidth letters, ligatures and the like)"


def check_relative_path(path: object) -> str:
    """Return ``path`` if it is a safe relative POSIX path, else raise :class:`UnsafePathError`."""
    if not isinstance(path, str):
        raise UnsafePathError(repr(path), "expected a string")
    if not path:
        raise UnsafePathError(path, "empty path")
    try:
        encoded = path.encode("utf-8")
    except UnicodeEncodeError:
        raise UnsafePathError(path.encode("utf-8", "backslashreplace").decode("ascii", "replace"),
                              "is not valid UTF-8 text (lone surrogate)") from None
    if len(encoded) > MAX_PATH_BYTES:
        raise UnsafePathError(path[:60] + "...", f"is {len(encoded)} bytes long; at most {MAX_PATH_BYTES} are allowed")
    if path.count("/") >= MAX_DEPTH:
        raise UnsafePathError(path[:60] + "...", f"has {path.count('/') + 1} components; at most {MAX_DEPTH} are allowed")
    for ch, what in _FORBIDDEN_CHARS.items():
        if ch in path:
            raise UnsafePathError(path, f"contains {what}")
    if path.startswith("/"):
        raise UnsafePathError(path, "absolute paths are not allowed")
    if _DRIVE.match(path):
        raise UnsafePathError(path, "drive-qualified paths are not allowed")
    for part in path.split("/"):
        if part == "..":
            raise UnsafePathError(path, "'..' components are not allowed")
        if part == ".":
            raise UnsafePathError(path, "'.' components are not allowed")
        if part == "":
            raise UnsafePathError(path, "empty path component ('//' or trailing '/')")
        if len(part.encode("utf-8")) > MAX_COMPONENT_BYTES:
            raise UnsafePathError(path, f"a component is {len(part.encode('utf-8'))} bytes long; at most "
                                        f"{MAX_COMPONENT_BYTES} are allowed")
    problem = name_problem(path)
    if problem is not None:
        raise UnsafePathError(path, problem)
    return path


def resolve_inside(root: str | os.PathLike[str], path: str) -> Path:
    """The on-disk location of manifest path ``path`` under ``root``, refusing symbolic links.

    Each component is ``lstat``-ed (never followed): a symlink anywhere on the way raises
    :class:`UnsafePathError`. A component that does not exist is fine (the file is "missing").
    """
    check_relative_path(path)
    base = Path(root)
    current = base
    parts = path.split("/")
    for i, part in enumerate(parts):
        current = current / part
        try:
            st = os.lstat(current)
        except FileNotFoundError:
            return base.joinpath(*parts)
        except NotADirectoryError:
            return base.joinpath(*parts)
        if stat.S_ISLNK(st.st_mode):
            shown = "/".join(parts[: i + 1])
            reason = "is a symbolic link" if i == len(parts) - 1 else f"passes through symbolic link {shown!r}"
            raise UnsafePathError(path, reason)
    return current


def relative_posix(root: Path, path: Path) -> str:
    """``path`` relative to ``root`` with '/' separators (how manifests spell paths)."""
    return path.relative_to(root).as_posix()


_DIR_FLAGS = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
_FILE_FLAGS = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)


def _is_link_error(e: OSError) -> bool:
    return e.errno in (errno.ELOOP, errno.EMLINK, errno.ENOTDIR)


def open_inside(root: str | os.PathLike[str], path: str) -> io.FileIO:
    """Open manifest path ``path`` under ``root`` for reading: open first, then check what was opened.

    Each folder on the way is opened relative to the previous one's descriptor (``openat``) with
    O_NOFOLLOW | O_DIRECTORY, and the file itself with O_NOFOLLOW | O_NONBLOCK, then ``fstat``-ed:
    a symbolic link swapped in at any moment fails the open instead of being followed, and a
    FIFO or device is refused instead of blocking or reading forever. So whatever is read comes
    from a regular file inside ``root``, however the folder changes meanwhile.

    Raises :class:`UnsafePathError` for a link on the way or a non-regular file,
    ``FileNotFoundError`` when the file (or a folder on the way) does not exist, and other
    ``OSError`` (permissions, I/O) as they come.
    """
    check_relative_path(path)
    if not (hasattr(os, "O_NOFOLLOW") and os.open in os.supports_dir_fd):  # pragma: no cover - not POSIX
        resolved = resolve_inside(root, path)
        return open(resolved, "rb", buffering=0)  # type: ignore[return-value]
    parts = path.split("/")
    dfd = os.open(root, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | getattr(os, "O_CLOEXEC", 0))
    try:
        for i, part in enumerate(parts[:-1]):
            try:
                nfd = os.open(part, _DIR_FLAGS, dir_fd=dfd)
            except OSError as e:
                if isinstance(e, FileNotFoundError):
                    raise
                if _is_link_error(e):
                    if stat.S_ISLNK(os.lstat(part, dir_fd=dfd).st_mode):
                        raise UnsafePathError(path, f"passes through symbolic link {'/'.join(parts[: i + 1])!r}") from None
                    raise FileNotFoundError(errno.ENOENT, "not a folder", "/".join(parts[: i + 1])) from None
                raise
            os.close(dfd)
            dfd = nfd
        try:
            fd = os.open(parts[-1], _FILE_FLAGS, dir_fd=dfd)
        except OSError as e:
            if e.errno == errno.ELOOP:
                raise UnsafePathError(path, "is a symbolic link") from None
            raise
    finally:
        os.close(dfd)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise UnsafePathError(path, "is not a regular file")
        os.set_blocking(fd, True)
        return open(fd, "rb", buffering=0)  # type: ignore[return-value]
    except BaseException:
        os.close(fd)
        raise


def open_dir_inside(root: str | os.PathLike[str], folder: str, *, create: bool = False) -> int:
    """A descriptor of folder ``folder`` (a manifest path, or "" for ``root`` itself) under ``root``.

    Walked component by component with ``openat`` and O_NOFOLLOW | O_DIRECTORY (creating missing
    folders with ``mkdirat`` when ``create``), so files then created, renamed or removed relative
    to the descriptor land inside ``root`` however the folder changes meanwhile. Raises
    :class:`UnsafePathError` for a symbolic link on the way. The caller closes the descriptor.
    """
    parts = check_relative_path(folder).split("/") if folder else []
    dfd = os.open(root, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | getattr(os, "O_CLOEXEC", 0))
    try:
        for i, part in enumerate(parts):
            if create:
                try:
                    os.mkdir(part, 0o755, dir_fd=dfd)
                except FileExistsError:
                    pass
            try:
                nfd = os.open(part, _DIR_FLAGS, dir_fd=dfd)
            except OSError as e:
                if _is_link_error(e) and stat.S_ISLNK(os.lstat(part, dir_fd=dfd).st_mode):
                    raise UnsafePathError(folder, f"passes through symbolic link {'/'.join(parts[: i + 1])!r}") from None
                raise
            os.close(dfd)
            dfd = nfd
        return dfd
    except BaseException:
        os.close(dfd)
        raise
