"""Path safety: a manifest may only name plain files inside the release folder.

A manifest comes from the network; trusting its paths would let a crafted release make
``verify`` read (or a downloader write) anywhere. So every path must be relative, POSIX,
free of ``.``/``..``/empty components and of characters SHA256SUMS cannot carry, and no
component on disk may be a symbolic link. These checks run before any listed file is opened.
"""
from __future__ import annotations

import os
import re
import stat
from pathlib import Path

from .errors import UnsafePathError

_DRIVE = re.compile(r"^[A-Za-z]:")
_FORBIDDEN_CHARS = {"\\": "a backslash", "\n": "a newline", "\r": "a carriage return", "\0": "a NUL byte"}


def check_relative_path(path: object) -> str:
    """Return ``path`` if it is a safe relative POSIX path, else raise :class:`UnsafePathError`."""
    if not isinstance(path, str):
        raise UnsafePathError(repr(path), "expected a string")
    if not path:
        raise UnsafePathError(path, "empty path")
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
