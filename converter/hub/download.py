"""Download a release from the Hub, every file checked against the manifest as it arrives."""
from __future__ import annotations

import fnmatch
import hashlib
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, Callable, Sequence

from converter.errors import (
    HubError,
    HubNotFoundError,
    HubVerificationError,
    OutputError,
)
from manifests import (
    CHECKSUMS_NAME,
    MANIFEST_NAME,
    FileDigest,
    UnsafePathError,
    hash_file,
    load_manifest,
    parse_sha256sums,
    resolve_inside,
)
from manifests.hashing import (
    hash_stream,
    is_partial_name,
    open_partial,
    partial_path,
    resumable_partial_path,
    write_all,
    write_bytes_atomic,
)
from manifests.locking import OutputBusyError
from manifests.locking import acquire as acquire_lock
from manifests.paths import open_dir_inside, open_inside

if TYPE_CHECKING:
    from huggingface_hub import HfApi


from .client import (
    _CHUNK,
    Progress,
    _chunks,
    _fetch_bytes,
    _hub_errors,
    _open_remote,
    hub_api,
    parse_repo_spec,
)
from .network import Retries
from .remote import MISMATCH, MISSING, _compare, _describe, _model_info


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


def _already_there(out: Path, rel: str, want: FileDigest, on_bytes: Callable[[int], None]) -> bool | None:
    """True if ``out/rel`` already holds exactly the wanted bytes, False if it holds others, None if absent.

    Opened first, then checked (:func:`manifests.paths.open_inside`: no link followed, regular
    files only), and hashed only when the size matches.
    """
    dest = out / rel
    try:
        with open_inside(out, rel) as f:
            if os.fstat(f.fileno()).st_size != want.size:
                return False
            return hash_stream(f, on_bytes=on_bytes) == want
    except FileNotFoundError:
        return None
    except UnsafePathError as e:
        if e.reason == "is not a regular file":
            raise HubError(f"{dest}: exists and is not a regular file; move it away and re-run") from None
        raise OutputError(f"{dest}: {e.reason}; downloads are never written through a symbolic link") from None
    except OSError as e:
        raise OutputError(f"{dest}: cannot read the file already there: {e.strerror or e}") from None


_RESUME_FLAGS = (os.O_RDWR | os.O_APPEND | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
                 | getattr(os, "O_CLOEXEC", 0))


def _ours(st: os.stat_result) -> bool:
    """Whether what sits under the resumable partial name can be a file an earlier run of ours left:
    a regular file of our own with no other name. A hard link to a user's file (two names), a file
    of another user, a symbolic link, FIFO or folder is someone else's, whatever its name says."""
    return stat.S_ISREG(st.st_mode) and st.st_nlink == 1 and st.st_uid == os.geteuid()


class _NotOurs(Exception):
    """The resumable partial name holds something no run of ours left; it is never touched."""


def _open_resumable(partial: Path | str, limit: int, dir_fd: int | None = None) -> BinaryIO | None:
    """The partial file an earlier run left, opened to re-read and append, never through a link.

    Returns None when there is nothing to resume: a file of ours of 0 or more than ``limit`` bytes
    is unlinked first, so the download starts over in a fresh file. Raises :class:`_NotOurs` for
    anything else under the name (see :func:`_ours`): it is neither written nor removed. The check
    is made again on the opened descriptor, so a file swapped in since the ``lstat`` is never written.
    """
    try:
        st = os.lstat(partial, dir_fd=dir_fd)
    except FileNotFoundError:
        return None
    if not _ours(st):
        raise _NotOurs()
    if 0 < st.st_size <= limit:
        try:
            fd = os.open(partial, _RESUME_FLAGS, dir_fd=dir_fd)  # O_NOFOLLOW: a link swapped in since the lstat fails
        except OSError:
            raise _NotOurs() from None
        now = os.fstat(fd)
        if _ours(now) and (now.st_dev, now.st_ino) == (st.st_dev, st.st_ino):
            return open(fd, "r+b", buffering=0)
        os.close(fd)
        raise _NotOurs()
    _unlink(partial, dir_fd)
    return None


def _unlink(name: Path | str, dir_fd: int | None) -> None:
    try:
        os.unlink(name, dir_fd=dir_fd)
    except FileNotFoundError:
        pass


def _download_one(api: "HfApi", repo_id: str, commit: str, path: str, want: FileDigest, dest: Path,
                  on_bytes: Callable[[int], None], root: Path | None = None) -> None:
    """Stream one file into its partial name (``.NAME.flux-gguf.partial``) while hashing; rename only
    if it matches ``want``.

    A regular partial file an earlier run left is re-hashed and resumed with a ``Range`` request;
    one that already holds all ``want.size`` bytes is renamed without any request if it matches
    (and discarded if not). A server that ignores the range, or answers 416, gets a fresh start.

    With ``root`` (the download folder; ``path`` is relative to it), the file's folder is opened
    once by an ``openat`` walk that follows no link, and the partial file is created, reopened,
    renamed and removed relative to that descriptor: a folder swapped for a symbolic link during
    the download cannot redirect a single byte outside ``root``.
    """
    partial = resumable_partial_path(dest)  # stable, so a re-run resumes; the folder's lock keeps it ours
    dfd: int | None = None
    pname: Path | str = partial
    dname: Path | str = dest
    if root is not None:
        try:
            dfd = open_dir_inside(root, path.rsplit("/", 1)[0] if "/" in path else "", create=True)
        except UnsafePathError as e:
            raise OutputError(f"{dest}: {e.reason}; downloads are never written through a symbolic link") from None
        except OSError as e:
            raise OutputError(f"{partial}: cannot write the download: {e.strerror or e}") from e
        pname, dname = partial.name, dest.name
    try:
        _download_into(api, repo_id, commit, path, want, dest, on_bytes, partial, pname, dname, dfd)
    finally:
        if dfd is not None:
            os.close(dfd)


def _download_into(api: "HfApi", repo_id: str, commit: str, path: str, want: FileDigest, dest: Path,
                   on_bytes: Callable[[int], None], partial: Path, pname: Path | str, dname: Path | str,
                   dfd: int | None) -> None:
    h, have = hashlib.sha256(), 0
    out: BinaryIO | None = None
    resumable = True  # under the stable name: left in place on failure, for a re-run to resume

    def start_over() -> None:
        nonlocal out, h, have
        if out is not None:
            out.close()
            out = None
        h, have = hashlib.sha256(), 0

    try:
        if dfd is None:
            dest.parent.mkdir(parents=True, exist_ok=True)
        try:
            out = _open_resumable(pname, want.size, dfd)
        except _NotOurs:  # left as it is; this run writes under a name of its own, removed on failure
            partial, resumable = partial_path(dest), False
            pname = partial.name if dfd is not None else partial
        if out is not None:  # resume: re-hash what an earlier run left
            while chunk := out.read(_CHUNK):
                h.update(chunk)
                have += len(chunk)
                on_bytes(len(chunk))
            if have == want.size:  # complete already: nothing to ask the Hub for
                if h.hexdigest() == want.sha256:
                    out.close()
                    out = None
                    os.replace(pname, dname, src_dir_fd=dfd, dst_dir_fd=dfd)
                    return
                start_over()
        retries = Retries(f"{repo_id}@{commit[:12]}/{path}", then="re-run to resume")
        while True:
            with _hub_errors(api, f"downloading {path}", repo_id, commit), retries.trying(lambda: have) as attempt, \
                    _open_remote(api, repo_id, commit, path, have, attempt) as r:
                if have and r.status_code == 416:  # nothing past what we have: ask for the whole file
                    start_over()
                    continue
                if have and r.status_code != 206:  # the server ignored the Range: start over
                    start_over()
                if out is None:
                    out = open_partial(pname, dir_fd=dfd)  # a fresh regular file, whatever sat under that name
                for chunk in _chunks(r):
                    write_all(out, chunk, partial)  # a resumed partial is unbuffered: it may store less
                    h.update(chunk)
                    have += len(chunk)
                    on_bytes(len(chunk))
                    if have > want.size:
                        break
                out.flush()
                os.fsync(out.fileno())
            if not retries.failed:  # else: resumed from what landed, after the backoff wait
                break
    except OSError as e:  # the local side: disk full, permissions (Hub errors arrive translated)
        if not resumable:
            _unlink(pname, dfd)
        raise OutputError(f"{partial}: cannot write the download: {e.strerror or e}") from e
    except BaseException:
        if not resumable:  # no later run would find it
            _unlink(pname, dfd)
        raise
    finally:
        if out is not None:
            out.close()
    got = h.hexdigest()
    if have != want.size or got != want.sha256:
        _unlink(pname, dfd)
        raise HubVerificationError(
            f"{path}: the Hub sent {have if have <= want.size else 'more than ' + str(want.size)} bytes hashing to "
            f"{got}, the manifest says {want.size} bytes with sha256 {want.sha256}; nothing was written under its name")
    try:  # onto a symbolic link this replaces the link; nothing is written through it
        os.replace(pname, dname, src_dir_fd=dfd, dst_dir_fd=dfd)
    except OSError as e:
        raise OutputError(f"{dest}: cannot move the verified download into place: {e.strerror or e}") from e


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
    force: bool = False,
) -> DownloadResult:
    """Download a release's manifest, then the chosen files, each checked against it as it arrives.

    ``include``: glob patterns of artifact paths (default: all). Everything comes from one commit.
    Files already present with the right bytes are kept; a file is replaced only by verified bytes;
    on any mismatch nothing the user had is deleted and the error names the file.

    The release's manifest.json and SHA256SUMS (the whole release's, also with ``include``) are
    written last, once every chosen file is verified. If ``output_dir`` already holds a
    manifest.json or SHA256SUMS with other content (another release, or another commit of this
    one), nothing is downloaded and :class:`HubError` names that file: it is never overwritten,
    so each release belongs in a folder of its own. The same holds for every chosen file: one
    already there with other bytes (the user's own README.md, say) is refused before any
    transfer; ``force=True`` replaces such files (still only with verified bytes).

    The folder is locked (``.flux-gguf.lock`` inside it) for the whole download: a second
    download into the same folder fails at once, naming the holder.
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

    ours = [a.path for a in manifest.artifacts if is_partial_name(a.path.rsplit("/", 1)[-1])]
    if ours:
        raise HubVerificationError(f"{repo_id}: {MANIFEST_NAME} lists {ours[0]}, a name flux-gguf reserves for "
                                   "partial downloads; refused")
    chosen = [a for a in manifest.artifacts if not include or any(fnmatch.fnmatchcase(a.path, p) for p in include)]
    if not chosen:
        raise HubError(f"no file of {repo_id} matches --include {' '.join(include)}; it has: "
                       + ", ".join(a.path for a in manifest.artifacts))
    expected = {a.path: FileDigest(a.size, a.sha256) for a in chosen}
    bad = [c for c in _compare(api, repo_id, info, expected, fetch_regular=False) if c.status in (MISMATCH, MISSING)]
    if bad:
        raise HubVerificationError(f"{repo_id} at {commit[:12]} does not match its manifest: {_describe(bad)}; nothing was downloaded")

    out = Path(output_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
        lock = acquire_lock(out, out / ".flux-gguf.lock")
    except OutputBusyError as e:
        raise OutputError(f"{out}: another flux-gguf download ({e.holder}) is writing into it; wait for it to "
                          "finish or choose another folder") from None
    except OSError as e:
        raise OutputError(f"{out}: cannot create or lock the download folder: {e.strerror or e}") from None
    with lock:
        return _download_locked(api, repo_id, revision, commit, out, manifest_bytes, sums_bytes, chosen,
                                expected, progress, force)


def _download_locked(api: "HfApi", repo_id: str, revision: str | None, commit: str, out: Path,
                     manifest_bytes: bytes, sums_bytes: bytes | None, chosen: list[Any],
                     expected: dict[str, FileDigest], progress: Progress | None, force: bool) -> DownloadResult:
    records = {MANIFEST_NAME: manifest_bytes} | ({CHECKSUMS_NAME: sums_bytes} if sums_bytes is not None else {})
    if not force:
        for name, data in records.items():  # before any transfer: a different one is never overwritten
            _check_own_record(_destination(out, name), data, repo_id, commit)
    total = sum(a.size for a in chosen)

    def on_bytes(n: int) -> None:
        if progress is not None:
            progress(n, total)

    present: dict[str, bool] = {}
    for artifact in chosen:  # before any transfer: a file the user has with other bytes is never replaced
        _destination(out, artifact.path)
        state = _already_there(out, artifact.path, expected[artifact.path], on_bytes)
        if state is False and not force:
            raise HubError(f"{out / artifact.path}: already there with other content than {artifact.path} of "
                           f"{repo_id} at {commit[:12]}; download never overwrites a file it did not write: "
                           "move it away, or pass --force to replace it")
        present[artifact.path] = bool(state)

    files = []
    for artifact in chosen:
        want = expected[artifact.path]
        dest = _destination(out, artifact.path)
        if present[artifact.path]:
            files.append(DownloadedFile(artifact.path, want.size, want.sha256, "present"))
            continue
        _download_one(api, repo_id, commit, artifact.path, want, dest, on_bytes, root=out)
        files.append(DownloadedFile(artifact.path, want.size, want.sha256, "downloaded"))
    for name, data in reversed(records.items()):  # last, manifest.json last of all: every chosen file is verified
        dest = _destination(out, name)
        if not force:
            _check_own_record(dest, data, repo_id, commit)
        write_bytes_atomic(dest, data)
    return DownloadResult(repo_id, revision, commit, out, files)
