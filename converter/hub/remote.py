"""Check a published release on the Hub against its manifest, from the Hub's metadata, without downloading."""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

from converter.errors import (
    ReleaseError,
)
from manifests import (
    CHECKSUMS_NAME,
    MANIFEST_NAME,
    SIGNATURE_NAME,
    FileDigest,
    Manifest,
    hash_file,
    load_manifest,
)

if TYPE_CHECKING:
    from huggingface_hub import HfApi, ModelInfo


from .client import (
    HUB_MANAGED_FILES,
    _fetch_bytes,
    _hub_errors,
    fetch_model_info,
    hub_api,
    parse_repo_spec,
)

OK, MISMATCH, MISSING, UNEXPECTED = "ok", "mismatch", "missing", "unexpected"


@dataclass
class RemoteFileCheck:
    """One file's verdict: the manifest's size/sha256 against what the Hub holds.

    ``source`` says where the remote sha256 came from: ``"lfs"`` (the Hub's metadata, nothing
    downloaded) or ``"content"`` (a small regular file, fetched and hashed: the Hub gives no sha256).
    """

    path: str
    status: str
    expected_size: int | None = None
    expected_sha256: str | None = None
    remote_size: int | None = None
    remote_sha256: str | None = None
    source: str | None = None
    detail: str | None = None

    @property
    def ok(self) -> bool:
        return self.status == OK

    def to_json(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if v is not None}


@dataclass
class RemoteReport:
    """Every file's verdict for one repo at one commit; ``ok`` only if all are ok and nothing is extra."""

    repo_id: str
    revision: str | None
    commit: str
    files: list[RemoteFileCheck] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(f.ok for f in self.files)

    @property
    def problems(self) -> list[RemoteFileCheck]:
        return [f for f in self.files if not f.ok]

    def file(self, path: str) -> RemoteFileCheck:
        for f in self.files:
            if f.path == path:
                return f
        raise KeyError(path)

    def counts(self) -> dict[str, int]:
        return {s: sum(f.status == s for f in self.files) for s in (OK, MISMATCH, MISSING, UNEXPECTED)}

    def to_json(self) -> dict[str, Any]:
        return {"repo_id": self.repo_id, "revision": self.revision, "commit": self.commit, "ok": self.ok,
                "counts": self.counts(), "files": [f.to_json() for f in self.files]}


def _describe(problems: Sequence[RemoteFileCheck]) -> str:
    return "; ".join(f"{p.path} {p.status}" + (f" ({p.detail})" if p.detail else "") for p in problems)


def _compare(
    api: "HfApi", repo_id: str, info: "ModelInfo", expected: Mapping[str, FileDigest], *, fetch_regular: bool
) -> list[RemoteFileCheck]:
    remote = {s.rfilename: s for s in info.siblings or []}
    checks = []
    for path, want in expected.items():
        sibling = remote.get(path)
        check = RemoteFileCheck(path, OK, want.size, want.sha256)
        checks.append(check)
        if sibling is None:
            check.status, check.detail = MISSING, "not in the repo"
            continue
        check.remote_size = sibling.size
        if sibling.lfs is not None:
            check.source, check.remote_sha256 = "lfs", sibling.lfs.sha256
        elif fetch_regular and sibling.size == want.size:
            data = _fetch_bytes(api, repo_id, str(info.sha), path)
            check.source, check.remote_sha256 = "content", hashlib.sha256(data).hexdigest()
            check.remote_size = len(data)
        if check.remote_size != want.size:
            check.status, check.detail = MISMATCH, f"{check.remote_size} bytes on the Hub, the manifest says {want.size}"
        elif check.remote_sha256 is not None and check.remote_sha256 != want.sha256:
            what = "the Hub reports sha256" if check.source == "lfs" else "its content on the Hub hashes to"
            check.status, check.detail = MISMATCH, f"{what} {check.remote_sha256}, the manifest says {want.sha256}"
    for path in sorted(remote):
        if path not in expected and path not in HUB_MANAGED_FILES:
            checks.append(RemoteFileCheck(path, UNEXPECTED, remote_size=remote[path].size,
                                          detail="in the repo but not in the manifest"))
    return checks


def _model_info(api: "HfApi", repo_id: str, revision: str | None) -> "ModelInfo":
    with _hub_errors(api, f"reading the file list of {repo_id}", repo_id, revision):
        return fetch_model_info(api, repo_id, revision, f"{repo_id}@{revision or 'main'}: reading the file list")


def verify_remote(
    manifest: Manifest,
    repo_id: str,
    revision: str | None = None,
    *,
    extra: Mapping[str, FileDigest] | None = None,
    api: "HfApi | None" = None,
) -> RemoteReport:
    """Compare a manifest with the Hub's copy without downloading large files.

    LFS/Xet files are checked by the size and sha256 the Hub reports; regular files (the Hub gives
    no sha256 for them, and they are small) are fetched and hashed. ``extra`` adds files the
    manifest does not list (manifest.json and SHA256SUMS themselves).
    """
    api = api or hub_api()
    info = _model_info(api, repo_id, revision)
    expected = {a.path: FileDigest(a.size, a.sha256) for a in manifest.artifacts} | dict(extra or {})
    return RemoteReport(repo_id, revision, str(info.sha), _compare(api, repo_id, info, expected, fetch_regular=True))


def _local_manifest(root: Path) -> Manifest:
    if not root.is_dir():
        raise ReleaseError(f"{root}: not a folder")
    if not (root / MANIFEST_NAME).is_file():
        raise ReleaseError(f"{root}: no {MANIFEST_NAME}; not a flux-gguf release folder")
    return load_manifest(root / MANIFEST_NAME)


def verify_remote_release(release_dir: str | os.PathLike[str], repo_spec: str, *, api: "HfApi | None" = None) -> RemoteReport:
    """What ``flux-gguf verify DIR --remote REPO[@REV]`` runs: DIR's manifest (plus its manifest.json
    and SHA256SUMS bytes) against the repo. Only small local files are read; nothing large is hashed."""
    repo_id, revision = parse_repo_spec(repo_spec)
    root = Path(release_dir)
    manifest = _local_manifest(root)
    extra = {name: hash_file(root / name) for name in (MANIFEST_NAME, CHECKSUMS_NAME, SIGNATURE_NAME)
             if (root / name).is_file()}  # model.sig: a signed release's signature is published with it
    return verify_remote(manifest, repo_id, revision, extra=extra, api=api)


