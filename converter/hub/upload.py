"""Publish a verified release folder to the Hub and read the Hub's metadata back."""
from __future__ import annotations

import contextlib
import glob
import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from converter import __version__
from converter.errors import (
    HubError,
    HubFileTooLargeError,
    HubVerificationError,
    ReleaseError,
)
from manifests import (
    SIGNATURE_NAME,
    FileDigest,
    Manifest,
    hash_file,
    resolve_inside,
    verify_release,
)

if TYPE_CHECKING:
    from huggingface_hub import HfApi


from .client import (
    GB,
    LFS_MAX_FILE_BYTES,
    XET_MAX_FILE_BYTES,
    Progress,
    _hub_errors,
    _require_token,
    hub_api,
    parse_repo_spec,
)
from .remote import (
    UNEXPECTED,
    RemoteReport,
    _compare,
    _describe,
    _local_manifest,
    _model_info,
)


@dataclass(frozen=True)
class PlannedFile:
    path: str
    size: int
    sha256: str


@dataclass
class UploadPlan:
    """What ``upload`` will send, decided and checked locally before any network access (``--dry-run`` prints it)."""

    release_dir: Path
    repo_id: str
    revision: str | None
    create_pr: bool
    private: bool
    manifest: Manifest
    files: list[PlannedFile]
    transfer: str  # "xet" or "lfs"
    max_file_bytes: int

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files)

    def to_json(self) -> dict[str, Any]:
        return {"release_dir": str(self.release_dir), "repo_id": self.repo_id, "revision": self.revision,
                "create_pr": self.create_pr, "private": self.private, "transfer": self.transfer,
                "total_bytes": self.total_bytes, "files": [f.__dict__ for f in self.files]}


@dataclass
class UploadResult:
    plan: UploadPlan
    url: str
    commit_url: str
    commit_oid: str
    pr_url: str | None
    report: RemoteReport

    def to_json(self) -> dict[str, Any]:
        return {"repo_id": self.plan.repo_id, "revision": self.plan.revision, "url": self.url,
                "commit_url": self.commit_url, "commit_oid": self.commit_oid, "pr_url": self.pr_url,
                "verified": self.report.to_json()}


def upload_transfer() -> tuple[str, int]:
    """How huggingface_hub will send large files now (Xet if installed and not disabled, else LFS) and the per-file limit."""
    from huggingface_hub import constants

    if not constants.HF_HUB_DISABLE_XET and importlib.util.find_spec("hf_xet") is not None:
        return "xet", XET_MAX_FILE_BYTES
    return "lfs", LFS_MAX_FILE_BYTES


def check_target(repo_id: str, revision: str | None, create_pr: bool) -> None:
    """Reject flag combinations the Hub would refuse, before any work."""
    if "@" in repo_id:
        raise HubError(f"{repo_id!r}: give the branch with --revision, not '@'")
    parse_repo_spec(repo_id)
    if create_pr and revision is not None:
        raise HubError(f"--create-pr and --revision {revision} cannot be used together: a pull request is always "
                       "opened against the default branch (to add to an open one, use --revision refs/pr/N alone)")


def plan_upload(
    release_dir: str | os.PathLike[str],
    repo_id: str,
    *,
    revision: str | None = None,
    create_pr: bool = False,
    private: bool = False,
    progress: Progress | None = None,
) -> UploadPlan:
    """Verify the release folder and decide what to send; raises if it does not verify or a file is too big.

    Sizes are checked from ``stat`` before anything is hashed, so an oversized file fails at once.
    """
    check_target(repo_id, revision, create_pr)
    root = Path(release_dir)
    manifest = _local_manifest(root)
    transfer, limit = upload_transfer()
    for artifact in manifest.artifacts:
        path = resolve_inside(root, artifact.path)
        with contextlib.suppress(FileNotFoundError, NotADirectoryError):
            size = os.stat(path).st_size
            if size > limit:
                raise HubFileTooLargeError(
                    f"{artifact.path}: {size} bytes ({size / GB:.1f} GB) is over the Hub's {limit // GB} GB per-file "
                    f"limit for {transfer.upper()} uploads; nothing was sent")
    report = verify_release(root, progress=progress, ignore=[SIGNATURE_NAME])  # model.sig: checked by the caller
    if not report.ok:
        raise ReleaseError(f"{root} does not verify, refusing to upload: "
                           + "; ".join(f"{f.path} {f.status}" + (f" ({f.detail})" if f.detail else "")
                                       for f in report.problems))
    files = [PlannedFile(f.path, int(f.actual_size or 0), str(f.actual_sha256)) for f in report.files]
    if (root / SIGNATURE_NAME).is_file() and not (root / SIGNATURE_NAME).is_symlink():  # signed: publish model.sig
        sig = hash_file(root / SIGNATURE_NAME)
        files.append(PlannedFile(SIGNATURE_NAME, sig.size, sig.sha256))
    return UploadPlan(root, repo_id, revision, create_pr, private, manifest, files, transfer, limit)


def upload_release(plan: UploadPlan, *, message: str | None = None, api: "HfApi | None" = None) -> UploadResult:
    """Create the repo/branch if needed, upload the planned files, then check the Hub's copy against them.

    Re-running after an interruption resumes: objects the Hub already holds are not sent again.
    Raises :class:`HubVerificationError` if the committed files do not match what was planned.
    """
    api = api or hub_api()
    _require_token(api)
    repo_id, revision = plan.repo_id, plan.revision
    with _hub_errors(api, f"creating {repo_id}", repo_id, revision):
        repo_url = api.create_repo(repo_id, private=True if plan.private else None, exist_ok=True)
    if revision not in (None, "main") and not str(revision).startswith("refs/pr/"):
        with _hub_errors(api, f"creating branch {revision}", repo_id, revision):
            api.create_branch(repo_id, branch=str(revision), exist_ok=True)
    summary = message or f"Upload {plan.manifest.name} (flux-gguf {__version__})"
    with _hub_errors(api, f"uploading {plan.release_dir} to {repo_id}", repo_id, revision):
        info = api.upload_folder(
            repo_id=repo_id, folder_path=str(plan.release_dir), revision=revision, create_pr=plan.create_pr or None,
            commit_message=summary, allow_patterns=[glob.escape(f.path) for f in plan.files],
        )
    expected = {f.path: FileDigest(f.size, f.sha256) for f in plan.files}
    remote = _model_info(api, repo_id, info.oid)
    report = RemoteReport(repo_id, revision, str(info.oid), _compare(api, repo_id, remote, expected, fetch_regular=True))
    bad = [f for f in report.problems if f.status != UNEXPECTED]
    if bad:
        raise HubVerificationError(f"committed {info.commit_url}, but the Hub's copy does not match the release: "
                                   + _describe(bad))
    url = str(repo_url).rstrip("/") + (f"/tree/{revision}" if revision not in (None, "main") else "")
    return UploadResult(plan, url, str(info.commit_url), str(info.oid), info.pr_url, report)


