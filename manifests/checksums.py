"""SHA256SUMS: the checksum list every downstream user can check with coreutils alone.

Format (what ``sha256sum`` writes and ``sha256sum -c --strict`` accepts): one line per file,
``<64 lowercase hex><two spaces><relative path>``, LF line ends, sorted by path so the file is
reproducible. Paths that ``sha256sum`` would have to escape (backslash, newline) never appear:
``check_relative_path`` refuses them when the release is built.
"""
from __future__ import annotations

import re
from typing import Iterable, Mapping

from .errors import ChecksumsFormatError, UnsafePathError
from .paths import check_relative_path

_SHA256 = re.compile(r"^[0-9a-f]{64}$")
# sha256sum's own reading: digest, a space, then ' ' (text mode) or '*' (binary mode), then the name.
_LINE = re.compile(r"^([0-9a-fA-F]{64}) ([ *])(.+)$")


def format_sha256sums(entries: Mapping[str, str] | Iterable[tuple[str, str]]) -> bytes:
    """SHA256SUMS bytes for ``{relative path: sha256}``, sorted by path."""
    pairs = list(entries.items()) if isinstance(entries, Mapping) else list(entries)
    seen: set[str] = set()
    lines = []
    for path, digest in sorted(pairs, key=lambda p: p[0].encode("utf-8")):
        check_relative_path(path)
        if path in seen:
            raise ValueError(f"{path!r} is listed twice")
        seen.add(path)
        if not _SHA256.match(digest):
            raise ValueError(f"sha256 of {path!r} must be 64 lowercase hex digits, got {digest!r}")
        lines.append(f"{digest}  {path}\n")
    return "".join(lines).encode("utf-8")


def parse_sha256sums(data: bytes, *, source: str = "SHA256SUMS") -> dict[str, str]:
    """``{relative path: lowercase sha256}`` from SHA256SUMS bytes, strictly.

    Every line must be well formed (``--strict`` semantics) and every path safe and unique;
    otherwise :class:`ChecksumsFormatError` names the line.
    """
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ChecksumsFormatError(source, data[: e.start].count(b"\n") + 1, "not UTF-8 text") from None
    if text and not text.endswith("\n"):
        raise ChecksumsFormatError(source, text.count("\n") + 1, "the last line does not end with a newline")
    out: dict[str, str] = {}
    for number, line in enumerate(text.split("\n")[:-1] if text else [], start=1):
        m = _LINE.match(line)
        if not m:
            raise ChecksumsFormatError(source, number, "expected '<64 hex digits>  <relative path>'")
        digest, path = m.group(1).lower(), m.group(3)
        try:
            check_relative_path(path)
        except UnsafePathError as e:
            raise ChecksumsFormatError(source, number, f"path {path!r}: {e.reason}") from None
        if path in out:
            raise ChecksumsFormatError(source, number, f"{path!r} is listed twice")
        out[path] = digest
    return out
