"""Exceptions raised by manifests/. Each names the file, path or key at fault and what was expected.

``manifests`` imports nothing from ``converter``, so it keeps its own small hierarchy; the CLI
maps :class:`ManifestError` to one ``Error: ...`` line just like the converter's errors.
"""
from __future__ import annotations


class ManifestError(ValueError):
    """A manifest, checksum list or release folder cannot be trusted as given."""


class SchemaError(ManifestError):
    """A manifest is not valid JSON or does not match ``manifest.schema.json``."""

    def __init__(self, source: str, where: str, problem: str):
        self.source = source
        self.where = where
        self.problem = problem
        super().__init__(f"{source}: {where}: {problem}" if where else f"{source}: {problem}")


class UnsafePathError(ManifestError):
    """A manifest names a path that could reach outside the release folder."""

    def __init__(self, path: str, reason: str):
        self.path = path
        self.reason = reason
        super().__init__(f"unsafe path {path!r} in manifest: {reason}")


class ChecksumsFormatError(ManifestError):
    """A SHA256SUMS file has a line that is not ``<64 hex>  <relative path>``."""

    def __init__(self, source: str, line_number: int, problem: str):
        self.source = source
        self.line_number = line_number
        self.problem = problem
        super().__init__(f"{source} line {line_number}: {problem}")
