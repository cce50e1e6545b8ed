"""Every conversation with the Hugging Face Hub: publish a release, check it remotely, download it verified.

Why this shape:
- All Hub access goes through ``huggingface_hub``'s public API (``HfApi``, ``get_token``,
  ``build_hf_headers``, ``http_stream_backoff``), so retries, auth lookup and Xet/LFS choice are
  the client's. The endpoint is read when a client is made (:func:`hub_api`), not when
  ``huggingface_hub`` is imported, so callers and tests may point it anywhere at any time.
- A release is checked locally (``manifests.verify_release``) before a byte is sent, and the
  Hub's metadata is read back after the commit: the manifest is the contract at both ends.
- The Hub reports a sha256 for LFS/Xet files only; small regular files (README.md,
  manifest.json, SHA256SUMS) are fetched and hashed instead, so every file is really checked.
- Downloads stream into ``NAME.partial`` while hashing and are renamed only once size and sha256
  match the manifest; a dropped connection keeps the partial file so a re-run resumes it. A
  partial file is only ever created fresh or reopened without following a link, so no byte is
  written through a symbolic link planted at either name.
- Library code never prints; the token is never put into a message, a file or a log.
"""
from __future__ import annotations

import contextlib
import fnmatch
import glob
import hashlib
import importlib.util
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, Callable, Iterator, Mapping, Sequence
from urllib.parse import quote

from manifests import (
    CHECKSUMS_NAME,
    MANIFEST_NAME,
    FileDigest,
    Manifest,
    hash_file,
    load_manifest,
    parse_sha256sums,
    UnsafePathError,
    resolve_inside,
    verify_release,
)
from manifests.hashing import open_partial, partial_path, write_bytes_atomic

from . import __version__
from .errors import (
    FluxGGUFError,
    HubAuthError,
    HubConnectionError,
    HubError,
    HubFileTooLargeError,
    HubNotFoundError,
    HubPermissionError,
    HubRateLimitError,
    HubVerificationError,
    OutputError,
    ReleaseError,
)

if TYPE_CHECKING:
    from huggingface_hub import HfApi, ModelInfo

GB = 1000**3
LFS_MAX_FILE_BYTES = 50 * GB  # historical hard limit per file, still what plain Git LFS uploads get
XET_MAX_FILE_BYTES = 200 * GB  # the Hub's recommended per-file ceiling with Xet storage
HUB_MANAGED_FILES = frozenset({".gitattributes"})  # the Hub writes these itself
OK, MISMATCH, MISSING, UNEXPECTED = "ok", "mismatch", "missing", "unexpected"
_CHUNK = 8 << 20

Progress = Callable[[int, int], None]
"""``progress(bytes_just_done, total_bytes)``, the same shape ``manifests.verify_release`` uses."""


# ---- client and errors ------------------------------------------------------------------------
def hub_api(endpoint: str | None = None, token: str | None = None) -> "HfApi":
    """An ``HfApi`` for ``endpoint`` (else ``HF_ENDPOINT`` as set *now*, else the client's default).

    ``token=None`` leaves the lookup to huggingface_hub (``HF_TOKEN``, then the ``hf auth login`` file).
    """
    from huggingface_hub import HfApi, constants

    endpoint = endpoint or os.environ.get("HF_ENDPOINT") or constants.ENDPOINT
    return HfApi(endpoint=endpoint.rstrip("/"), token=token, library_name="flux-gguf", library_version=__version__)


def parse_repo_spec(spec: str) -> tuple[str, str | None]:
    """``"owner/name@rev"`` -> ``("owner/name", "rev")``; the revision is optional."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    repo_id, _, revision = spec.partition("@")
    try:
        validate_repo_id(repo_id)
    except HFValidationError:
        raise HubError(f"{spec!r} is not a Hub repo id (expected OWNER/NAME or OWNER/NAME@REVISION)") from None
    if "/" not in repo_id:
        raise HubError(f"{spec!r} is not a Hub repo id: give the owner too (OWNER/NAME)")
    if spec.endswith("@"):
        raise HubError(f"{spec!r}: the revision after '@' is empty")
    return repo_id, revision or None


def _require_token(api: "HfApi") -> None:
    from huggingface_hub import get_token

    if not (api.token or get_token()):
        raise HubAuthError("no Hugging Face token found: set HF_TOKEN or log in with `hf auth login`")


def _causes(exc: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def _translate(exc: BaseException, action: str, repo_id: str, revision: str | None, endpoint: str) -> HubError | None:
    """One clear line for what huggingface_hub raised, by what the user can do about it."""
    from huggingface_hub.errors import HfHubHTTPError, RemoteEntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError
    from huggingface_hub.utils import httpx

    for e in _causes(exc):
        if isinstance(e, RevisionNotFoundError):
            return HubNotFoundError(f"revision {revision!r} does not exist in {repo_id} (while {action})")
        if isinstance(e, RepositoryNotFoundError):
            return HubNotFoundError(f"repository {repo_id} was not found on {endpoint}, or it is private and "
                                    f"the token cannot see it (while {action})")
        if isinstance(e, RemoteEntryNotFoundError):
            return HubNotFoundError(f"a file was not found in {repo_id} at {revision or 'main'} (while {action})")
        if isinstance(e, HfHubHTTPError):
            status = e.response.status_code if e.response is not None else None
            if status == 401:
                return HubAuthError(f"the Hub rejected the token (HTTP 401) while {action}: log in again with "
                                    "`hf auth login` or set HF_TOKEN to a valid token")
            if status == 403:
                return HubPermissionError(f"the token may not write to {repo_id} (HTTP 403) while {action}: the repo "
                                          "belongs to another user or organization, or the token is read-only")
            if status == 404:
                return HubNotFoundError(f"{repo_id} at {revision or 'main'}: not found (HTTP 404) while {action}")
            if status == 429:
                return HubRateLimitError(f"the Hub kept rate-limiting requests (HTTP 429) after the client's retries "
                                         f"while {action}: wait a few minutes and re-run (uploads resume where they stopped)")
            if status == 413:
                return HubError(f"the Hub refused the request as too large (HTTP 413) while {action}")
            return HubError(f"the Hub answered HTTP {status} while {action}: re-run to resume")
        if isinstance(e, (httpx.TransportError, ConnectionError)):
            return HubConnectionError(f"lost the connection to {endpoint} while {action} ({type(e).__name__}): what "
                                      "already landed is kept; re-run the same command to resume")
        if isinstance(e, ValueError) and str(e).startswith("Invalid metadata in README.md"):
            detail = " ".join(line.strip("- ") for line in str(e).splitlines()[1:] if line.strip())
            return HubError(f"the Hub rejected README.md's YAML front matter: {detail or 'invalid metadata'}")
    return None


@contextlib.contextmanager
def _hub_errors(api: "HfApi", action: str, repo_id: str, revision: str | None) -> Iterator[None]:
    try:
        yield
    except FluxGGUFError:
        raise
    except Exception as exc:
        translated = _translate(exc, action, repo_id, revision, api.endpoint)
        if translated is None:
            raise
        raise translated from exc


@contextlib.contextmanager
def _open_remote(api: "HfApi", repo_id: str, commit: str, path: str, start: int = 0) -> Iterator[Any]:
    """A streamed GET of one file at one commit (``Range`` from ``start``), errors raised as huggingface_hub's.

    With ``start``, an HTTP 416 (range not satisfiable: the file is not longer than ``start``) is
    yielded, not raised, so the caller can start over from 0.
    """
    from huggingface_hub.utils import build_hf_headers, hf_raise_for_status, http_stream_backoff

    # Built here, not with hf_hub_url: that one starts from the endpoint read at import time.
    url = f"{api.endpoint}/{repo_id}/resolve/{quote(commit, safe='')}/{quote(path)}"
    headers = build_hf_headers(token=api.token, library_name="flux-gguf", library_version=__version__)
    headers["Accept-Encoding"] = "identity"  # the bytes hashed must be the file's bytes
    if start:
        headers["Range"] = f"bytes={start}-"
    with http_stream_backoff("GET", url, headers=headers) as response:
        if response.status_code >= 400:
            response.read()  # so the error can quote the body
            if not (start and response.status_code == 416):
                hf_raise_for_status(response)
        yield response


def _chunks(response: Any) -> Iterator[bytes]:
    """The body as sent: ``iter_raw`` is ~4x faster than ``iter_bytes`` (no decoder, no re-chunking),
    and is the file itself unless the server encoded it anyway despite ``Accept-Encoding: identity``."""
    if response.headers.get("Content-Encoding", "identity").lower() in ("", "identity"):
        return response.iter_raw()
    return response.iter_bytes(_CHUNK)


def _fetch_bytes(api: "HfApi", repo_id: str, commit: str, path: str) -> bytes:
    with _hub_errors(api, f"downloading {path}", repo_id, commit), _open_remote(api, repo_id, commit, path) as r:
        return b"".join(_chunks(r))


# ---- remote verification ----------------------------------------------------------------------
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
        return api.model_info(repo_id, revision=revision, files_metadata=True)


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
    extra = {name: hash_file(root / name) for name in (MANIFEST_NAME, CHECKSUMS_NAME) if (root / name).is_file()}
    return verify_remote(manifest, repo_id, revision, extra=extra, api=api)


# ---- upload -----------------------------------------------------------------------------------
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
    report = verify_release(root, progress=progress)
    if not report.ok:
        raise ReleaseError(f"{root} does not verify, refusing to upload: "
                           + "; ".join(f"{f.path} {f.status}" + (f" ({f.detail})" if f.detail else "")
                                       for f in report.problems))
    files = [PlannedFile(f.path, int(f.actual_size or 0), str(f.actual_sha256)) for f in report.files]
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


# ---- download ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class DownloadedFile:
    path: str
    size: int
    sha256: str
    action: str  # "downloaded" or "present" (already there with the right bytes)


@dataclass
class DownloadResult:
    repo_id: str
    revision: str | None
    commit: str
    output_dir: Path
    files: list[DownloadedFile]

    def to_json(self) -> dict[str, Any]:
        return {"repo_id": self.repo_id, "revision": self.revision, "commit": self.commit,
                "output_dir": str(self.output_dir), "files": [f.__dict__ for f in self.files]}


def _already_there(path: Path, want: FileDigest, on_bytes: Callable[[int], None]) -> bool:
    """True if ``path`` already holds exactly the wanted bytes (hashed only when the size matches)."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return False
    if not stat.S_ISREG(st.st_mode):
        raise HubError(f"{path}: exists and is not a regular file; move it away and re-run")
    return st.st_size == want.size and hash_file(path, on_bytes=on_bytes) == want


_RESUME_FLAGS = (os.O_RDWR | os.O_APPEND | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
                 | getattr(os, "O_CLOEXEC", 0))


def _open_resumable(partial: Path, limit: int) -> BinaryIO | None:
    """The ``.partial`` file an earlier run left, opened to re-read and append, never through a link.

    Returns None when there is nothing to resume; a partial that is not a regular file of 1 to
    ``limit`` bytes (a symbolic link, a FIFO, an oversized file) is unlinked first, so the download
    starts over in a fresh file. A folder is left alone (``open_partial`` then refuses it, naming it).
    """
    try:
        st = os.lstat(partial)
    except FileNotFoundError:
        return None
    if stat.S_ISDIR(st.st_mode):
        return None
    if stat.S_ISREG(st.st_mode) and 0 < st.st_size <= limit:
        try:
            fd = os.open(partial, _RESUME_FLAGS)  # O_NOFOLLOW: a link swapped in since the lstat fails here
        except OSError:
            fd = -1
        if fd >= 0:
            now = os.fstat(fd)
            if stat.S_ISREG(now.st_mode) and (now.st_dev, now.st_ino) == (st.st_dev, st.st_ino):
                return open(fd, "r+b", buffering=0)
            os.close(fd)
    partial.unlink(missing_ok=True)  # a link is removed, never followed
    return None


def _download_one(api: "HfApi", repo_id: str, commit: str, path: str, want: FileDigest, dest: Path,
                  on_bytes: Callable[[int], None]) -> None:
    """Stream one file into ``dest.partial`` while hashing; rename only if it matches ``want``.

    A regular partial file an earlier run left is re-hashed and resumed with a ``Range`` request;
    one that already holds all ``want.size`` bytes is renamed without any request if it matches
    (and discarded if not). A server that ignores the range, or answers 416, gets a fresh start.
    """
    partial = partial_path(dest)
    h, have = hashlib.sha256(), 0
    out: BinaryIO | None = None

    def start_over() -> None:
        nonlocal out, h, have
        if out is not None:
            out.close()
            out = None
        h, have = hashlib.sha256(), 0

    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        out = _open_resumable(partial, want.size)
        if out is not None:  # resume: re-hash what an earlier run left
            while chunk := out.read(_CHUNK):
                h.update(chunk)
                have += len(chunk)
                on_bytes(len(chunk))
            if have == want.size:  # complete already: nothing to ask the Hub for
                if h.hexdigest() == want.sha256:
                    out.close()
                    os.replace(partial, dest)
                    return
                start_over()
        while True:
            with _hub_errors(api, f"downloading {path}", repo_id, commit), \
                    _open_remote(api, repo_id, commit, path, have) as r:
                if have and r.status_code == 416:  # nothing past what we have: ask for the whole file
                    start_over()
                    continue
                if have and r.status_code != 206:  # the server ignored the Range: start over
                    start_over()
                if out is None:
                    out = open_partial(partial)  # a fresh regular file, whatever sat under that name
                for chunk in _chunks(r):
                    out.write(chunk)
                    h.update(chunk)
                    have += len(chunk)
                    on_bytes(len(chunk))
                    if have > want.size:
                        break
                out.flush()
                os.fsync(out.fileno())
            break
    except OSError as e:  # the local side: disk full, permissions (Hub errors arrive translated)
        raise OutputError(f"{partial}: cannot write the download: {e.strerror or e}") from e
    finally:
        if out is not None:
            out.close()
    got = h.hexdigest()
    if have != want.size or got != want.sha256:
        partial.unlink(missing_ok=True)
        raise HubVerificationError(
            f"{path}: the Hub sent {have if have <= want.size else 'more than ' + str(want.size)} bytes hashing to "
            f"{got}, the manifest says {want.size} bytes with sha256 {want.sha256}; nothing was written under its name")
    os.replace(partial, dest)  # onto a symbolic link this replaces the link; nothing is written through it


def _check_own_record(dest: Path, data: bytes, repo_id: str, commit: str) -> None:
    """Refuse when ``dest`` (manifest.json or SHA256SUMS) exists with content other than ``data``."""
    try:
        st = os.lstat(dest)
    except FileNotFoundError:
        return
    if not stat.S_ISREG(st.st_mode):
        raise HubError(f"{dest}: exists and is not a regular file; move it away and re-run")
    if st.st_size == len(data) and hash_file(dest).sha256 == hashlib.sha256(data).hexdigest():
        return
    raise HubError(f"{dest}: already there and differs from the {dest.name} of {repo_id} at {commit[:12]}; it is "
                   "never overwritten: download into another folder (-o) or move it away")


def _destination(out: Path, path: str) -> Path:
    try:
        return resolve_inside(out, path)
    except UnsafePathError as e:
        raise OutputError(f"{out / path}: {e.reason}; downloads are never written through a symbolic link") from None


def download_release(
    repo_id: str,
    output_dir: str | os.PathLike[str],
    *,
    revision: str | None = None,
    include: Sequence[str] = (),
    api: "HfApi | None" = None,
    progress: Progress | None = None,
) -> DownloadResult:
    """Download a release's manifest, then the chosen files, each checked against it as it arrives.

    ``include``: glob patterns of artifact paths (default: all). Everything comes from one commit.
    Files already present with the right bytes are kept; a file is replaced only by verified bytes;
    on any mismatch nothing the user had is deleted and the error names the file.

    The release's manifest.json and SHA256SUMS (the whole release's, also with ``include``) are
    written last, once every chosen file is verified. If ``output_dir`` already holds a
    manifest.json or SHA256SUMS with other content (another release, or another commit of this
    one), nothing is downloaded and :class:`HubError` names that file: it is never overwritten,
    so each release belongs in a folder of its own.
    """
    api = api or hub_api()
    parse_repo_spec(repo_id)
    info = _model_info(api, repo_id, revision)
    commit = str(info.sha)
    names = {s.rfilename for s in info.siblings or []}
    if MANIFEST_NAME not in names:
        raise HubNotFoundError(f"{repo_id} at {revision or 'main'} has no {MANIFEST_NAME}: not a flux-gguf release")
    manifest_bytes = _fetch_bytes(api, repo_id, commit, MANIFEST_NAME)
    manifest = load_manifest(manifest_bytes, source=f"{repo_id}@{commit[:12]}/{MANIFEST_NAME}")
    sums_bytes = _fetch_bytes(api, repo_id, commit, CHECKSUMS_NAME) if CHECKSUMS_NAME in names else None
    if sums_bytes is not None:
        sums = parse_sha256sums(sums_bytes, source=f"{repo_id}@{commit[:12]}/{CHECKSUMS_NAME}")
        listed = {a.path: a.sha256 for a in manifest.artifacts} | {MANIFEST_NAME: hashlib.sha256(manifest_bytes).hexdigest()}
        disagree = sorted(p for p, d in listed.items() if p in sums and sums[p] != d)
        if disagree:
            raise HubVerificationError(f"{repo_id}: {CHECKSUMS_NAME} and {MANIFEST_NAME} disagree on " + ", ".join(disagree))

    chosen = [a for a in manifest.artifacts if not include or any(fnmatch.fnmatchcase(a.path, p) for p in include)]
    if not chosen:
        raise HubError(f"no file of {repo_id} matches --include {' '.join(include)}; it has: "
                       + ", ".join(a.path for a in manifest.artifacts))
    expected = {a.path: FileDigest(a.size, a.sha256) for a in chosen}
    bad = [c for c in _compare(api, repo_id, info, expected, fetch_regular=False) if c.status in (MISMATCH, MISSING)]
    if bad:
        raise HubVerificationError(f"{repo_id} at {commit[:12]} does not match its manifest: {_describe(bad)}; nothing was downloaded")

    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    records = {MANIFEST_NAME: manifest_bytes} | ({CHECKSUMS_NAME: sums_bytes} if sums_bytes is not None else {})
    for name, data in records.items():  # before any transfer: a different one is never overwritten
        _check_own_record(_destination(out, name), data, repo_id, commit)
    total = sum(a.size for a in chosen)

    def on_bytes(n: int) -> None:
        if progress is not None:
            progress(n, total)

    files = []
    for artifact in chosen:
        want = expected[artifact.path]
        dest = _destination(out, artifact.path)
        if _already_there(dest, want, on_bytes):
            files.append(DownloadedFile(artifact.path, want.size, want.sha256, "present"))
            continue
        _download_one(api, repo_id, commit, artifact.path, want, dest, on_bytes)
        files.append(DownloadedFile(artifact.path, want.size, want.sha256, "downloaded"))
    for name, data in reversed(records.items()):  # last, manifest.json last of all: every chosen file is verified
        dest = _destination(out, name)
        _check_own_record(dest, data, repo_id, commit)
        write_bytes_atomic(dest, data)
    return DownloadResult(repo_id, revision, commit, out, files)
