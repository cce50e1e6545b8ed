"""Verify a release folder against its manifest: every byte, every file, nothing extra.

Order matters for safety: manifest.json is read (never through a symlink), validated against the
schema and its paths checked, and every listed path is ``lstat``-ed for symlinks, all *before*
any listed file is opened. Then each file is re-hashed once at disk speed.

Verdicts per file: ``ok``, ``mismatch`` (size or digest differ, not a plain file, or cannot be
read: detail ``cannot read: <reason>``), ``missing``, ``unexpected`` (present but not listed).
manifest.json is checked against the digest SHA256SUMS lists for it, and SHA256SUMS must agree
with the manifest on every file.
"""
from __future__ import annotations

import fnmatch
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

from .checksums import parse_sha256sums
from .errors import ManifestError, UnsafePathError
from .hashing import DEFAULT_CHUNK_SIZE, hash_bytes, hash_range, hash_stream
from .manifest import CHECKSUMS_NAME, GGUF_KIND, MANIFEST_NAME, ArtifactEntry, Manifest, load_manifest
from .paths import open_inside, resolve_inside

# manifest.json and SHA256SUMS are read whole; a release's are kilobytes to a few megabytes.
MAX_RECORD_BYTES = 256 << 20

OK, MISMATCH, MISSING, UNEXPECTED = "ok", "mismatch", "missing", "unexpected"
STATUSES = (OK, MISMATCH, MISSING, UNEXPECTED)

Progress = Callable[[int, int], None]
"""``progress(bytes_just_hashed, total_bytes_to_hash)``."""


@dataclass
class FileCheck:
    """The verdict for one file of the release."""

    path: str
    status: str
    expected_size: int | None = None
    actual_size: int | None = None
    expected_sha256: str | None = None
    actual_sha256: str | None = None
    detail: str | None = None
    damaged_tensors: list[str] | None = None

    @property
    def ok(self) -> bool:
        return self.status == OK

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "path": self.path, "status": self.status,
            "expected_size": self.expected_size, "actual_size": self.actual_size,
            "expected_sha256": self.expected_sha256, "actual_sha256": self.actual_sha256,
        }
        if self.detail is not None:
            out["detail"] = self.detail
        if self.damaged_tensors is not None:
            out["damaged_tensors"] = self.damaged_tensors
        return out


@dataclass
class VerifyReport:
    """Every file's verdict; ``ok`` only if all are ``ok``."""

    root: str
    manifest: Manifest
    files: list[FileCheck] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(f.ok for f in self.files)

    @property
    def problems(self) -> list[FileCheck]:
        return [f for f in self.files if not f.ok]

    def file(self, path: str) -> FileCheck:
        for f in self.files:
            if f.path == path:
                return f
        raise KeyError(path)

    def counts(self) -> dict[str, int]:
        return {s: sum(f.status == s for f in self.files) for s in STATUSES}

    def to_json(self) -> dict[str, Any]:
        return {"root": self.root, "ok": self.ok, "name": self.manifest.name,
                "counts": self.counts(), "files": [f.to_json() for f in self.files]}


def _read_manifest(root: Path) -> tuple[Manifest, bytes]:
    path = root / MANIFEST_NAME
    try:
        with open_inside(root, MANIFEST_NAME) as f:  # O_NOFOLLOW, then fstat: never through a link
            data = _read_bounded(f, path)
    except FileNotFoundError:
        raise ManifestError(f"{root}: no {MANIFEST_NAME}; not a flux-gguf release folder") from None
    except UnsafePathError as e:
        if e.reason == "is a symbolic link":
            raise
        raise ManifestError(f"{path}: not a regular file") from None
    except OSError as e:
        raise ManifestError(f"{path}: cannot read: {_reason(e)}") from None
    return load_manifest(data, source=str(path)), data


def _read_bounded(f: Any, path: Path) -> bytes:
    size = os.fstat(f.fileno()).st_size
    if size > MAX_RECORD_BYTES:
        raise ManifestError(f"{path}: {size} bytes; a release's {path.name} is at most {MAX_RECORD_BYTES} bytes")
    return f.read(MAX_RECORD_BYTES + 1)


def _reason(e: OSError) -> str:
    return e.strerror or str(e)


def _damaged_tensors(root: Path, artifact: ArtifactEntry, chunk_size: int) -> list[str]:
    """Names of tensors whose recorded byte range no longer hashes to the recorded digest."""
    damaged = []
    with open_inside(root, artifact.path) as f:
        for t in artifact.tensors or ():
            if hash_range(f, t.offset, t.nbytes, chunk_size=chunk_size) != t.sha256:
                damaged.append(t.name)
    return damaged


def _check_artifact(root: Path, artifact: ArtifactEntry, *, tensors: bool, chunk_size: int,
                    on_bytes: Callable[[int], None]) -> FileCheck:
    check = FileCheck(artifact.path, MISSING, expected_size=artifact.size, expected_sha256=artifact.sha256)
    try:  # open, then check what was opened: a link or FIFO swapped in since the pre-check is refused
        with open_inside(root, artifact.path) as f:
            digest = hash_stream(f, chunk_size=chunk_size, on_bytes=on_bytes)
    except FileNotFoundError:
        return check
    except UnsafePathError as e:
        if e.reason != "is not a regular file":
            raise
        check.status, check.detail = MISMATCH, "not a regular file"
        return check
    except OSError as e:  # unreadable (permissions, I/O error): a verdict for this file, not a crash
        check.status, check.detail = MISMATCH, f"cannot read: {_reason(e)}"
        return check
    check.actual_size, check.actual_sha256 = digest.size, digest.sha256
    if digest.size == artifact.size and digest.sha256 == artifact.sha256:
        check.status = OK
        return check
    check.status = MISMATCH
    if digest.size != artifact.size:
        check.detail = f"size {digest.size} bytes, expected {artifact.size}"
    else:
        check.detail = "same size, different content"
    if tensors and artifact.kind == GGUF_KIND:
        try:
            check.damaged_tensors = _damaged_tensors(root, artifact, chunk_size)
        except (OSError, UnsafePathError) as e:
            check.detail += f"; cannot read its tensors: {_reason(e) if isinstance(e, OSError) else e.reason}"
            return check
        if not check.damaged_tensors:
            check.detail += "; every tensor's data is intact (the damage is in the header, metadata or padding)"
        else:
            check.detail += f"; {len(check.damaged_tensors)} of {len(artifact.tensors or ())} tensors differ"
    return check


def _check_checksums(root: Path, manifest: Manifest) -> tuple[FileCheck, dict[str, str] | None]:
    check = FileCheck(CHECKSUMS_NAME, MISSING)
    try:
        with open_inside(root, CHECKSUMS_NAME) as f:
            data = _read_bounded(f, root / CHECKSUMS_NAME)
    except FileNotFoundError:
        return check, None
    except UnsafePathError as e:
        if e.reason != "is not a regular file":
            raise
        check.status, check.detail = MISMATCH, "not a regular file"
        return check, None
    except OSError as e:
        check.status, check.detail = MISMATCH, f"cannot read: {_reason(e)}"
        return check, None
    except ManifestError as e:
        check.status, check.detail = MISMATCH, str(e)
        return check, None
    digest = hash_bytes(data)
    check.actual_size, check.actual_sha256 = digest.size, digest.sha256
    try:
        sums = parse_sha256sums(data, source=CHECKSUMS_NAME)
    except ManifestError as e:
        check.status, check.detail = MISMATCH, str(e)
        return check, None
    expected = {a.path: a.sha256 for a in manifest.artifacts}
    disagree = sorted(p for p in expected if p in sums and sums[p] != expected[p])
    absent = sorted(p for p in expected if p not in sums)
    extra = sorted(p for p in sums if p not in expected and p != MANIFEST_NAME)
    notes = []
    if disagree:
        notes.append("digest differs from manifest.json for " + ", ".join(disagree))
    if absent:
        notes.append("does not list " + ", ".join(absent))
    if MANIFEST_NAME not in sums:
        notes.append(f"does not list {MANIFEST_NAME}")
    if extra:
        notes.append("lists files the manifest does not: " + ", ".join(extra))
    check.status = MISMATCH if notes else OK
    check.detail = "; ".join(notes) or None
    return check, sums


def _walk_files(root: Path) -> Iterable[str]:
    """Every non-directory entry under root (symlinks reported, never followed)."""
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        base = Path(dirpath)
        for name in filenames:
            yield (base / name).relative_to(root).as_posix()
        for name in dirnames:
            if (base / name).is_symlink():
                yield (base / name).relative_to(root).as_posix()


def verify_release(
    root: str | os.PathLike[str],
    *,
    tensors: bool = False,
    ignore: Iterable[str] = (),
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    progress: Progress | None = None,
) -> VerifyReport:
    """Re-hash every file a release lists and report each as ok / mismatch / missing / unexpected.

    Raises before opening any listed file if the manifest is unreadable, does not match the
    schema, or names an unsafe path (absolute, ``..``, or through a symlink). ``tensors=True``
    also lists, for each damaged GGUF, the tensors whose bytes differ. ``ignore``: glob patterns
    of extra files to tolerate (e.g. ``.cache/huggingface/*`` after a Hub download).
    """
    base = Path(root)
    if not base.is_dir():
        raise ManifestError(f"{base}: not a folder")
    manifest, manifest_bytes = _read_manifest(base)
    for artifact in manifest.artifacts:  # refuse symlinks before any listed file is opened
        resolve_inside(base, artifact.path)
    if (base / CHECKSUMS_NAME).is_symlink():
        raise UnsafePathError(CHECKSUMS_NAME, "is a symbolic link")

    manifest_digest = hash_bytes(manifest_bytes)
    sums_check, sums = _check_checksums(base, manifest)
    listed_sha = (sums or {}).get(MANIFEST_NAME)
    manifest_check = FileCheck(MANIFEST_NAME, OK, actual_size=manifest_digest.size,
                               actual_sha256=manifest_digest.sha256, expected_sha256=listed_sha)
    if listed_sha is not None and listed_sha != manifest_digest.sha256:
        manifest_check.status = MISMATCH
        manifest_check.detail = f"differs from the digest {CHECKSUMS_NAME} lists for it (edited after the release was built?)"
    elif listed_sha is None:
        manifest_check.detail = f"not covered: {CHECKSUMS_NAME} gives no digest for it"
    report = VerifyReport(str(base), manifest, [manifest_check, sums_check])

    total = sum(a.size for a in manifest.artifacts)

    def on_bytes(n: int) -> None:
        if progress is not None:
            progress(n, total)

    for artifact in manifest.artifacts:
        report.files.append(_check_artifact(base, artifact, tensors=tensors, chunk_size=chunk_size, on_bytes=on_bytes))

    listed = {a.path for a in manifest.artifacts} | {MANIFEST_NAME, CHECKSUMS_NAME}
    patterns = list(ignore)
    for rel in sorted(_walk_files(base)):
        if rel in listed or any(fnmatch.fnmatchcase(rel, p) for p in patterns):
            continue
        st = os.lstat(base / rel)
        report.files.append(FileCheck(rel, UNEXPECTED, actual_size=st.st_size,
                                      detail="symbolic link" if stat.S_ISLNK(st.st_mode) else "not listed in the manifest"))
    return report
