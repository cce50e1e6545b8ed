"""Release manifests: hashing, the manifest schema, SHA256SUMS and verification.

Pure functions over files and bytes: no network, and nothing imported from ``converter``
(the Hub and release code build on this package, never the other way round).
"""
from __future__ import annotations

from .checksums import format_sha256sums, parse_sha256sums
from .errors import ChecksumsFormatError, ManifestError, SchemaError, UnsafePathError
from .hashing import BackgroundHasher, FileDigest, HashingWriter, hash_bytes, hash_file
from .manifest import (
    CHECKSUMS_NAME,
    SIGNATURE_NAME,
    MANIFEST_NAME,
    MANIFEST_VERSION,
    ArtifactEntry,
    Manifest,
    SourceEntry,
    TensorEntry,
    dump_manifest,
    load_manifest,
)
from .paths import check_relative_path, resolve_inside
from .verify import FileCheck, VerifyReport, verify_release

__all__ = [
    "ArtifactEntry", "BackgroundHasher", "CHECKSUMS_NAME", "ChecksumsFormatError", "FileCheck",
    "FileDigest", "HashingWriter", "MANIFEST_NAME", "MANIFEST_VERSION", "Manifest", "ManifestError",
    "SchemaError", "SIGNATURE_NAME", "SourceEntry", "TensorEntry", "UnsafePathError", "VerifyReport",
    "check_relative_path", "dump_manifest", "format_sha256sums", "hash_bytes", "hash_file",
    "load_manifest", "parse_sha256sums", "resolve_inside", "verify_release",
]
