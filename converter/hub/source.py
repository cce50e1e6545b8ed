"""Read a checkpoint straight from the Hub: ``hf://OWNER/REPO[@REVISION][/PATH]``, no local copy.

Why this shape:
- Safetensors says in its header where every tensor lives, and the Hub serves byte ranges of
  LFS/Xet files, so a conversion needs no copy of the 23.8 GB file: the header comes by one range
  request, then the tensors in file order (:meth:`RemoteSource.read_order`, which the pipeline
  follows: its writers place each tensor at its offset), merged into large ranges (up to
  :data:`RANGE_BYTES`) and fetched ahead by a few connections while the kernels work, within a
  byte window (:data:`WINDOW_BYTES`), so memory stays bounded as for local files.
- The revision is resolved to a commit first and every range is read at that commit, so a
  branch moving mid-conversion cannot mix two versions of a file.
- Every request runs under the Hub client's deadline policy (:mod:`.network`): a connection that
  is silent, trickles below the minimum rate or drops mid-body is a failed attempt, resumed from
  the last byte received (a new ``Range`` request) after a backoff wait; the run fails once the
  policy's retries in a row are spent (an attempt that delivered a window's bytes restarts the count).
- The sha256 of every file is computed from the bytes as they arrive, in file order: a range
  that arrives ahead of the hash (connections finish in any order; a reader may ignore the file
  order) is held (within :data:`HASH_HOLD_BYTES`) or, past that, fetched again at the end. :meth:`RemoteSource.check_complete` (which the pipeline calls before any
  output is renamed into place) finishes the hash and compares it with the Hub's LFS sha256.
- ``--keep-source DIR`` writes the streamed bytes to ``DIR/PATH``: into a hidden unique partial
  name (every write's count checked) that is renamed only once the sha256 matched; a ``DIR/PATH``
  already there is left as is when it holds the Hub's bytes, and otherwise refused before any
  download (replaced with ``replace_kept``, the CLI's ``--force``).

The core (``converter.sources``) never imports this module: callers turn a SRC string into a
Source with :func:`open_any_source` and hand the opened Source to the pipeline.
"""
from __future__ import annotations

import contextlib
import dataclasses
import errno
import hashlib
import json
import os
import pathlib
import struct
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterator, Mapping
from urllib.parse import quote

import numpy as np

from converter.errors import (
    FluxGGUFError,
    HubAuthError,
    HubError,
    HubNotFoundError,
    HubPermissionError,
    HubVerificationError,
    OutputError,
    SourceError,
)
from converter.safetensors_io import (
    DTYPE_SIZES,
    MAX_HEADER_BYTES,
    RawTensor,
    _check_layout,
    _DuplicateKey,
    _parse_entry,
    _unique_pairs,
    upcast_into,
)
from converter.sources import (
    COMFYUI_PREFIXES,
    DIFFUSERS_INDEX,
    DIFFUSERS_WEIGHTS,
    Source,
    SourceFile,
    TensorInfo,
    _assemble_diffusers,
    assemble_shards,
    _looks_diffusers,
    _whole,
    parse_index,
    open_source,
)
from manifests.errors import UnsafePathError
from manifests.hashing import hash_stream, open_partial, partial_path, pwrite_all
from manifests.paths import check_relative_path, open_dir_inside, open_inside

from .client import SMALL_FILE_MAX_BYTES, _headers, _translate, fetch_model_info, hub_api
from .network import Attempt, Retries, body_pieces, fetch_whole, hub_request, response_of, transient

if TYPE_CHECKING:
    from huggingface_hub import HfApi

HF_PREFIX = "hf://"
HEADER_PROBE_BYTES = 1 << 20  # one request holds the header of any FLUX checkpoint (~100 kB)
RANGE_BYTES = 64 << 20  # tensors contiguous in the file are merged into requests up to this size
WINDOW_BYTES = 512 << 20  # fetched-but-unconsumed bytes, at most (one range always may be fetched)
HASH_HOLD_BYTES = 256 << 20  # bytes held for the hash when they arrive ahead of it; beyond: re-fetched
CONNECTIONS = 4


# ---- SRC strings ------------------------------------------------------------------------------
@dataclass(frozen=True)
class HubSpec:
    """``hf://OWNER/REPO[@REVISION][/PATH]``: PATH a ``.safetensors`` file or a folder (default: the repo)."""

    repo_id: str
    revision: str | None
    path: str

    def __str__(self) -> str:
        rev = f"@{self.revision}" if self.revision else ""
        return f"{HF_PREFIX}{self.repo_id}{rev}" + (f"/{self.path}" if self.path else "")


def is_hub_spec(spec: object) -> bool:
    return isinstance(spec, str) and spec.startswith(HF_PREFIX)


def parse_hub_spec(text: str) -> HubSpec:
    """Split ``hf://OWNER/REPO[@REVISION][/PATH]``; a revision such as ``refs/pr/3`` keeps its slashes."""
    if not is_hub_spec(text):
        raise HubError(f"{text!r} is not a Hub source (expected hf://OWNER/REPO[@REVISION][/PATH])")
    rest = text[len(HF_PREFIX):]
    parts = rest.split("/")
    if len(parts) < 2 or not parts[0] or not parts[1]:
        raise HubError(f"{text!r}: expected hf://OWNER/REPO[@REVISION][/PATH]")
    owner, name_rev, tail = parts[0], parts[1], parts[2:]
    name, at, revision = name_rev.partition("@")
    if at and revision == "refs" and len(tail) >= 2:  # refs/pr/N, refs/convert/...
        revision, tail = "/".join(["refs", *tail[:2]]), tail[2:]
    if at and not revision:
        raise HubError(f"{text!r}: the revision after '@' is empty")
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(f"{owner}/{name}")
    except HFValidationError:
        raise HubError(f"{text!r}: {owner}/{name} is not a Hub repo id") from None
    path = "/".join(p for p in tail if p)
    if any(p in (".", "..") for p in tail):
        raise HubError(f"{text!r}: the path may not contain '.' or '..'")
    return HubSpec(f"{owner}/{name}", revision or None, path)


def open_any_source(spec: str | os.PathLike[str], *, keep_source: str | os.PathLike[str] | None = None,
                    replace_kept: bool = False, api: "HfApi | None" = None) -> Source:
    """A local path (file or diffusers folder) or an ``hf://`` spec, opened (headers only so far)."""
    text = os.fspath(spec)
    if replace_kept and keep_source is None:
        raise HubError("--force only applies with --keep-source DIR (it replaces files already under DIR)")
    if is_hub_spec(text):
        return open_hub_source(parse_hub_spec(text), keep_source=keep_source, replace_kept=replace_kept, api=api)
    if keep_source is not None:
        raise HubError("--keep-source only applies to an hf:// source")
    return open_source(text)


# ---- errors -----------------------------------------------------------------------------------
def _status(exc: BaseException) -> tuple[int | None, str | None]:
    response = response_of(exc)
    if response is None:
        return None, None
    return int(response.status_code), response.headers.get("X-Error-Code")


@contextlib.contextmanager
def _reading(api: "HfApi", spec: HubSpec, what: str, has_token: bool, *, resumable: bool = False) -> Iterator[None]:
    """Turn what the client raised into one line saying what to do; with ``resumable``, a dropped
    connection or a transient status is left to the caller, who resumes."""
    try:
        yield
    except FluxGGUFError:
        raise
    except Exception as exc:  # translated below, or re-raised
        if resumable and _transient(exc):
            raise
        status, code = _status(exc)
        page = f"{api.endpoint}/{spec.repo_id}"
        rev = spec.revision or "main"
        if status == 401:
            if has_token:
                raise HubAuthError(f"{spec}: the Hub rejected the token (HTTP 401) while {what}: log in again with "
                                   "`hf auth login` or set HF_TOKEN to a valid token") from exc
            raise HubAuthError(f"{spec}: the Hub wants a token (HTTP 401) while {what}: set HF_TOKEN or run "
                               f"`hf auth login`, and accept the licence on {page} if the repo is gated") from exc
        if status == 403:
            if code == "GatedRepo":
                raise HubPermissionError(f"{spec}: {spec.repo_id} is gated and this token has no access (HTTP 403) "
                                         f"while {what}: accept the licence on {page} with this account") from exc
            raise HubPermissionError(f"{spec}: the token may not read {spec.repo_id} (HTTP 403) while {what}: "
                                     f"ask for access on {page} or use a token with read access") from exc
        if status == 404:
            if code == "RevisionNotFound":
                raise HubNotFoundError(f"{spec}: revision {rev!r} does not exist in {spec.repo_id}") from exc
            if code == "EntryNotFound":
                raise HubNotFoundError(f"{spec}: {spec.repo_id} at {rev} has no file {spec.path or '(root)'}") from exc
            raise HubNotFoundError(f"{spec}: repository {spec.repo_id} was not found on {api.endpoint} (or it is "
                                   "private and the token cannot see it)") from exc
        translated = _translate(exc, what, spec.repo_id, spec.revision, api.endpoint)
        if translated is not None:
            raise HubError(f"{spec}: {translated}") from exc
        raise


# ---- --keep-source ----------------------------------------------------------------------------
_NOT_KEPT = "--keep-source never overwrites a file it did not write: move it away, or pass --force to replace it"


def _kept_folder(root: pathlib.Path, repo_path: str) -> int:
    """A descriptor of the folder DIR/PATH goes in, created as needed, reached without following a link."""
    try:
        return open_dir_inside(root, repo_path.rpartition("/")[0], create=True)
    except UnsafePathError as e:
        raise OutputError(f"{root / repo_path}: {e.reason}; --keep-source never writes through a symbolic link") from None
    except OSError as e:
        raise OutputError(f"{root / repo_path}: cannot create its folder (--keep-source): {e.strerror or e}") from None


def _needs_keeping(root: pathlib.Path, repo_path: str, size: int, sha256: str, replace: bool, at: str) -> bool:
    """Whether DIR/PATH has to be written: not when it already holds the Hub's bytes (then it is left
    as is). One with other bytes is refused unless ``replace``; a link or anything but a regular file
    always. Called for every file before any byte range is fetched, so a refusal costs no download."""
    final = root / repo_path
    try:
        check_relative_path(repo_path)
    except UnsafePathError as e:
        raise HubError(f"{final}: the Hub names the file {repo_path!r}, which {e.reason}; not kept") from None
    os.close(_kept_folder(root, repo_path))
    try:
        with open_inside(root, repo_path) as f:  # opened, then checked: no link followed, regular files only
            if os.fstat(f.fileno()).st_size == size and hash_stream(f).sha256 == sha256:
                return False
    except FileNotFoundError:
        return True
    except UnsafePathError as e:
        raise OutputError(f"{final}: {e.reason}; --keep-source never writes through or replaces it: move it "
                          "away and re-run") from None
    except OSError as e:
        raise OutputError(f"{final}: cannot read the file already there: {e.strerror or e}") from None
    if not replace:
        raise OutputError(f"{final}: already there with other content than {repo_path} of {at}; {_NOT_KEPT}")
    return True


class _KeptCopy:
    """The copy ``--keep-source`` makes of one streamed file.

    Every range is written at its offset into a hidden name unique to this run
    (:func:`manifests.hashing.partial_path`), created with O_EXCL | O_NOFOLLOW relative to its
    folder's descriptor: no file of the user's, and no link planted under any name, is ever opened.
    Each write's count is checked (a disk filling up fails the run instead of leaving zeros), a
    failed write sticks (a range dropped before it was read cannot hide it), and the file gets its
    final name only in :meth:`commit`, after the file's sha256 matched the Hub's.
    """

    def __init__(self, root: pathlib.Path, repo_path: str, size: int, replace: bool) -> None:
        self.final = root / repo_path
        self._leaf = repo_path.rpartition("/")[2]
        self._replace = replace
        self._failed: OutputError | None = None
        self._lock = threading.Lock()  # a write never meets a descriptor closed (and reused) under it
        self._dfd = _kept_folder(root, repo_path)
        self._name: str | None = partial_path(self._leaf).name
        self._file: Any = None
        try:
            self._file = open_partial(self._name, buffering=0, dir_fd=self._dfd)
            os.ftruncate(self._file.fileno(), size)
        except OSError as e:
            self.discard()
            raise self._error(e) from None

    def _error(self, e: OSError) -> OutputError:
        if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
            return OutputError(f"{self.final}: disk full while keeping the source (--keep-source): {e.strerror}; "
                               "nothing was kept")
        return OutputError(f"{self.final}: cannot keep the source (--keep-source): {e.strerror or e}; nothing was kept")

    def write(self, offset: int, data: memoryview) -> None:
        with self._lock:
            if self._failed is not None:
                raise self._failed
            if self._file is None:  # discarded while a connection was still bringing bytes
                return
            try:
                pwrite_all(self._file.fileno(), data, offset, self.final)
            except OSError as e:
                self._failed = self._error(e)
                raise self._failed from e

    def _refuse_if_taken(self) -> None:
        if self._replace:
            return
        try:
            os.lstat(self._leaf, dir_fd=self._dfd)
        except FileNotFoundError:
            return
        raise OutputError(f"{self.final}: appeared while the source was streamed; {_NOT_KEPT}")

    def check(self) -> None:
        """Before any kept file is renamed: the writes all landed, and (without --force) DIR/PATH is still free."""
        if self._failed is not None:
            raise self._failed
        if self._name is not None:
            self._refuse_if_taken()

    def commit(self) -> None:
        """Give the verified copy its final name (replacing one there only with --force)."""
        self.check()
        if self._name is None:
            return
        with self._lock:
            try:
                os.fsync(self._file.fileno())
            except OSError as e:
                raise self._error(e) from None
            self._file.close()
            self._file = None
        try:
            if self._replace:
                os.replace(self._name, self._leaf, src_dir_fd=self._dfd, dst_dir_fd=self._dfd)
            else:
                self._link_without_replacing()
        except FileExistsError:
            raise OutputError(f"{self.final}: appeared while the source was streamed; {_NOT_KEPT}") from None
        except OSError as e:
            raise OutputError(f"{self.final}: cannot move the verified copy into place: {e.strerror or e}") from None
        self._name = None  # nothing of ours left to remove
        with contextlib.suppress(OSError):
            os.fsync(self._dfd)  # the new name survives a crash
        self.discard()

    def _link_without_replacing(self) -> None:
        """A new name that fails (EEXIST) rather than replace a file created since :meth:`check`."""
        try:
            os.link(self._name, self._leaf, src_dir_fd=self._dfd, dst_dir_fd=self._dfd,  # type: ignore[arg-type]
                    follow_symlinks=False)
        except FileExistsError:
            raise
        except OSError:  # a file system without hard links: check once more, then rename
            self._refuse_if_taken()
            os.replace(self._name, self._leaf, src_dir_fd=self._dfd, dst_dir_fd=self._dfd)  # type: ignore[arg-type]
            return
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._name, dir_fd=self._dfd)  # type: ignore[arg-type]

    def discard(self) -> None:
        """Remove this run's partial file (never anything else) and let go of the folder."""
        with self._lock:
            if self._file is not None:
                self._file.close()
                self._file = None
        if self._name is not None and self._dfd >= 0:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._name, dir_fd=self._dfd)
            self._name = None
        if self._dfd >= 0:
            os.close(self._dfd)
            self._dfd = -1


# ---- one remote file --------------------------------------------------------------------------
class _ShortBody(Exception):
    pass


class _OrderedHasher:
    """sha256 of a file from ranges that may arrive out of order; holds early ones within a budget."""

    def __init__(self, hold: "_Budget") -> None:
        self.sha = hashlib.sha256()
        self.cursor = 0
        self._held: dict[int, memoryview] = {}
        self._hold = hold
        self._lock = threading.Lock()

    def offer(self, start: int, data: memoryview) -> None:
        with self._lock:
            end = start + len(data)
            if end <= self.cursor:
                return
            if start <= self.cursor:
                self.sha.update(data[self.cursor - start:])
                self.cursor = end
                self._drain()
            elif start not in self._held and self._hold.take(len(data)):
                self._held[start] = data

    def _drain(self) -> None:
        progressed = True
        while progressed:
            progressed = False
            for start in sorted(self._held):
                if start > self.cursor:
                    break
                data = self._held.pop(start)
                self._hold.give(len(data))
                end = start + len(data)
                if end > self.cursor:
                    self.sha.update(data[self.cursor - start:])
                    self.cursor = end
                progressed = True
                break

    def next_gap(self, size: int) -> tuple[int, int] | None:
        """The next byte range the hash still lacks (from the cursor to the next held range)."""
        with self._lock:
            if self.cursor >= size:
                return None
            later = [s for s in self._held if s > self.cursor]
            return self.cursor, min([size, *later])

    def release(self) -> None:
        with self._lock:
            for data in self._held.values():
                self._hold.give(len(data))
            self._held.clear()


class _Budget:
    def __init__(self, limit: int) -> None:
        self.limit, self.used = limit, 0
        self._lock = threading.Lock()

    def take(self, n: int) -> bool:
        with self._lock:
            if self.used + n > self.limit:
                return False
            self.used += n
            return True

    def give(self, n: int) -> None:
        with self._lock:
            self.used -= n


@dataclass
class FetchStats:
    """What the remote reader sent over the wire: tensor ranges, hash catch-up ranges, resumes."""

    requests: int = 0
    bytes: int = 0
    refetched_for_hash: int = 0
    resumes: int = 0
    peak_window: int = 0  # most bytes fetched (or being fetched) and not yet consumed, at any time


class RemoteFile:
    """One LFS/Xet safetensors file of a repo at one commit: header parsed, ranges fetched on request."""

    def __init__(self, client: "_Client", path: str, size: int, sha256: str, hold: _Budget,
                 kept: _KeptCopy | None) -> None:
        self.client, self.repo_path, self.size, self.expected_sha256 = client, path, size, sha256
        self.path = pathlib.PurePosixPath(path)
        self.label = f"{HF_PREFIX}{client.repo_id}@{client.commit[:12]}/{path}"
        self.hasher = _OrderedHasher(hold)
        self.kept = kept  # the --keep-source copy, or None
        self.metadata: dict[str, str] = {}
        self.tensors: dict[str, RawTensor] = {}
        try:
            self._read_header()
        except BaseException:
            self.close()  # the kept copy's partial file too
            raise

    def _fail(self, message: str) -> SourceError:
        return SourceError(f"{self.label}: {message}")

    def _read_header(self) -> None:
        if self.size < 8:
            raise self._fail(f"not a safetensors file (only {self.size} bytes)")
        probe = self.fetch(0, min(self.size, HEADER_PROBE_BYTES))
        (n,) = struct.unpack("<Q", bytes(probe[:8]))
        if probe[:4] == b"GGUF":
            raise self._fail("not a safetensors file (it is a GGUF file)")
        if n > self.size - 8 or n > MAX_HEADER_BYTES:
            raise self._fail(f"not a safetensors file (header length {n} does not fit in the {self.size}-byte file)")
        if 8 + n > len(probe):  # a header larger than the probe: one more request for the rest
            probe = memoryview(bytes(probe) + bytes(self.fetch(len(probe), 8 + n)))
        try:
            header = json.loads(bytes(probe[8:8 + n]).decode("utf-8"), object_pairs_hook=_unique_pairs)
        except UnicodeDecodeError as e:
            raise self._fail(f"not a safetensors file (header is not UTF-8 text: byte {e.start})") from None
        except json.JSONDecodeError as e:
            raise self._fail(f"not a safetensors file (header is not JSON: {e.msg} at byte {e.pos})") from None
        except _DuplicateKey as e:
            raise self._fail(f"header lies: key {e.args[0]} appears twice") from None
        if not isinstance(header, dict):
            raise self._fail("not a safetensors file (header is not a JSON object)")
        meta = header.pop("__metadata__", {})
        if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
            raise self._fail("__metadata__ must be an object of strings")
        self.metadata = dict(meta)
        where = pathlib.Path(self.label)
        self.tensors = {name: _parse_entry(where, name, entry, 8 + n) for name, entry in header.items()}
        _check_layout(where, list(self.tensors.values()), 8 + n, self.size)

    def fetch(self, start: int, end: int) -> memoryview:
        """Bytes [start, end) at the resolved commit, resuming a dropped body from the last byte."""
        buf = bytearray(end - start)
        view = memoryview(buf)
        received = [0]  # read_range counts the bytes it lands, also when the body breaks off
        retries = Retries(f"{self.label}: reading bytes {start}-{end - 1}", then="nothing was written: re-run")
        while received[0] < len(buf):
            before = received[0]
            attempt = retries.attempt()
            try:
                self.client.read_range(self.repo_path, start + before, end, view[before:], received, attempt)
                if received[0] < len(buf):
                    raise _ShortBody()
            except FluxGGUFError:
                raise
            except Exception as e:  # a dropped connection: resume from the last byte
                if not retries.again(e, attempt, received[0] - before):
                    raise
                self.client.count(resumes=1)
        self.client.count(bytes=len(buf))
        if self.kept is not None:
            self.kept.write(start, view)
        self.hasher.offer(start, view)
        return view

    def finish_hash(self) -> str:
        """Fetch whatever the hash still lacks, in order; the file's sha256."""
        while True:
            gap = self.hasher.next_gap(self.size)
            if gap is None:
                break
            lo, hi = gap
            hi = min(hi, lo + RANGE_BYTES)
            self.client.count(refetched_for_hash=hi - lo)
            self.fetch(lo, hi)
        return self.hasher.sha.hexdigest()

    def close(self) -> None:
        self.hasher.release()
        if self.kept is not None:
            self.kept.discard()  # after a commit: nothing left to remove


def _transient(e: BaseException) -> bool:
    return isinstance(e, _ShortBody) or transient(e)


class _Client:
    """Ranged GETs of one repo at one commit, through huggingface_hub's HTTP session and headers."""

    def __init__(self, api: "HfApi", spec: HubSpec, commit: str, has_token: bool) -> None:
        self.api, self.spec, self.repo_id, self.commit = api, spec, spec.repo_id, commit
        self.has_token = has_token
        self.stats = FetchStats()
        self.index: tuple[str, int, str] | None = None  # a diffusers index: (repo path, size, sha256)
        self._stats_lock = threading.Lock()

    def url(self, path: str) -> str:
        return f"{self.api.endpoint}/{self.repo_id}/resolve/{quote(self.commit, safe='')}/{quote(path)}"

    def read_range(self, path: str, start: int, end: int, into: memoryview, received: list[int],
                   attempt: Attempt) -> None:
        """One attempt to GET bytes [start, end) into ``into``, adding each chunk's length to
        ``received[0]`` as it lands (a body that breaks off or stalls raises, with what arrived counted)."""
        headers = _headers(self.api)
        headers["Accept-Encoding"] = "identity"
        headers["Range"] = f"bytes={start}-{end - 1}"
        self.count(requests=1)
        with _reading(self.api, dataclasses.replace(self.spec, path=path), f"reading bytes {start}-{end - 1} of {path}",
                      self.has_token, resumable=True), hub_request("GET", self.url(path), headers=headers,
                                                                   attempt=attempt) as r:
            if r.status_code != 206 or not r.headers.get("Content-Range", "").startswith(f"bytes {start}-"):
                raise HubError(f"{HF_PREFIX}{self.repo_id}/{path}: the server ignored the byte range "
                               f"(HTTP {r.status_code}, Content-Range {r.headers.get('Content-Range')!r})")
            pos = 0
            for chunk in body_pieces(r, attempt):
                n = min(len(chunk), len(into) - pos)
                into[pos:pos + n] = chunk[:n]
                pos += n
                received[0] += n
                if pos >= len(into):
                    break

    def count(self, **amounts: int) -> None:
        with self._stats_lock:
            for key, n in amounts.items():
                setattr(self.stats, key, getattr(self.stats, key) + n)


# ---- the Source -------------------------------------------------------------------------------
@dataclass
class _Range:
    file: RemoteFile
    start: int
    end: int
    users: int = 0
    data: memoryview | None = None
    error: BaseException | None = None
    state: str = "waiting"  # waiting, fetching, done, released


@dataclass(frozen=True)
class _Slice:
    """Elements of a piece: ``count`` elements of ``dtype`` at ``lo`` in range ``rng``, to element ``dest``."""

    rng: int
    lo: int
    count: int
    dtype: str
    dest: int


class RemoteSource(Source):
    """A Source whose shards are files of a Hub repo at one commit; tensors arrive by ranged GETs.

    ``repo_id``, ``commit`` (resolved) and ``remote_files`` (each with the size and sha256 the Hub
    reports) describe the provenance; :meth:`check_complete` verifies every file's streamed sha256
    against the Hub's. Tensors are fetched ahead in file order (:meth:`read_order`, which the
    pipeline follows, placing each tensor in the GGUF files by offset); a tensor read out of that
    order is still served, ranges it passed over are dropped, and one read twice is fetched alone.
    """

    def __init__(self, spec: HubSpec, client: _Client, layout: str, shards: list[RemoteFile],
                 tensors: dict[str, TensorInfo], pieces: dict[str, list[Any]], files: list[SourceFile],
                 ignored: tuple[str, ...] = (), *, connections: int, window: int) -> None:
        # The path names the file (or the repo) without the hf:// prefix or revision: default output
        # names and the names flux_gguf.source records come out as for a local copy.
        path = pathlib.Path(spec.repo_id.split("/")[1], spec.path)
        super().__init__(path, layout, shards, tensors, pieces, files, ignored)  # type: ignore[arg-type]
        self.spec, self.client = spec, client
        self.repo_id, self.commit = spec.repo_id, client.commit
        self.remote_files = shards
        index = {id(f): i for i, f in enumerate(shards)}
        width = {n: DTYPE_SIZES[t.dtype] for n, t in tensors.items()}
        # Where each tensor starts in the files (its first piece): reading in this order streams
        # every file front to back, so the sha256 keeps up with the bytes and nothing is fetched twice.
        self._file_key = {n: min((index[id(p.file)], p.file.tensors[p.key].begin + p.first * width[n])
                                 for p in pieces[n]) if pieces[n] else (0, 0) for n in tensors}
        self._plan(connections, window)

    partial_reads = False  # each tensor streams whole, once, in file order

    def read_order(self, names: list[str]) -> list[str]:
        """``names`` in file order (stable for ties): what the fetch-ahead schedule follows."""
        return sorted(names, key=lambda n: self._file_key[n])

    # -- provenance
    @property
    def stats(self) -> FetchStats:
        return self.client.stats

    @property
    def sha256_by_name(self) -> dict[str, str]:
        """The Hub's sha256 of each file, keyed by the name ``flux_gguf.source`` records (the file name)."""
        return {f.path.name: f.expected_sha256 for f in self.remote_files}

    def file_digests(self) -> dict[str, tuple[int, str]]:
        """name -> (size, sha256) of every file read, as a manifest lists sources: names relative to
        the folder the spec names (``transformer/...`` for a repo), the file name for a single file.
        Shards carry the Hub's sha256, which :meth:`check_complete` has checked the bytes against."""
        base = "" if self.spec.path.endswith(".safetensors") else self.spec.path.strip("/")

        def name(repo_path: str) -> str:
            if not base:
                return repo_path if not self.spec.path else pathlib.PurePosixPath(repo_path).name
            return repo_path[len(base) + 1:] if repo_path.startswith(base + "/") else repo_path

        return {name(path): (size, sha) for path, (size, sha) in self._repo_files().items()}

    def hub_records(self) -> dict[str, dict[str, str]]:
        """Keyed like :meth:`file_digests`: where each file came from (repo_id, revision, commit, path)."""
        names = list(self.file_digests())
        return {n: {"repo_id": self.repo_id, "revision": self.spec.revision or "main", "commit": self.commit,
                    "path": path} for n, path in zip(names, self._repo_files())}

    def _repo_files(self) -> dict[str, tuple[int, str]]:
        out: dict[str, tuple[int, str]] = {}
        if self.client.index is not None:
            path, size, sha = self.client.index
            out[path] = (size, sha)
        for f in self.remote_files:
            out[f.repo_path] = (f.size, f.expected_sha256)
        return out

    def provenance(self) -> dict[str, Any]:
        return {"repo_id": self.repo_id, "revision": self.spec.revision or "main", "commit": self.commit,
                "files": [{"path": f.repo_path, "size": f.size, "sha256": f.expected_sha256}
                          for f in self.remote_files]}

    def provenance_metadata(self) -> dict[str, str]:
        """GGUF KV entries recording where the weights came from (repo, resolved commit, sha256)."""
        return {"flux_gguf.hub_source": json.dumps(self.provenance(), separators=(",", ":"))}

    # -- scheduling
    def _plan(self, connections: int, window: int) -> None:
        self._ranges: list[_Range] = []
        self._slices: dict[str, list[_Slice]] = {}
        schedule = self.read_order(list(self.tensors))
        self._schedule = schedule
        self._passed = 0  # every tensor before this index of the schedule has been read or passed over
        self._position = {name: i for i, name in enumerate(schedule)}
        for name in schedule:
            out: list[_Slice] = []
            for p in self._pieces[name]:
                f: RemoteFile = p.file
                t = f.tensors[p.key]
                width = DTYPE_SIZES[t.dtype]
                lo, hi = t.begin + p.first * width, t.begin + (p.first + p.count) * width
                dest = p.dest
                while lo < hi:
                    last = self._ranges[-1] if self._ranges else None
                    room = last.start + RANGE_BYTES - last.end if last is not None else 0
                    if last is not None and last.file is f and last.end == lo and room >= width:
                        take = min(hi, lo + room // width * width)  # whole elements only
                        last.end = take
                    else:
                        take = min(hi, lo + RANGE_BYTES // width * width)
                        self._ranges.append(_Range(f, lo, take))
                    idx = len(self._ranges) - 1
                    count = (take - lo) // width
                    out.append(_Slice(idx, lo - self._ranges[idx].start, count, t.dtype, dest))
                    self._ranges[idx].users += 1
                    dest += count
                    lo = take
            self._slices[name] = out
        self._cond = threading.Condition()
        self._next_range = 0
        self._live = 0
        self._window = window
        self._consumed: set[str] = set()
        self._stop = False
        self._workers = [threading.Thread(target=self._work, name=f"flux-gguf-hub-{i}", daemon=True)
                         for i in range(max(1, connections))]
        self._started = False

    def _start(self) -> None:
        if not self._started:
            self._started = True
            for w in self._workers:
                w.start()

    def _work(self) -> None:
        while True:
            with self._cond:
                while True:
                    if self._stop or self._next_range >= len(self._ranges):
                        return
                    r = self._ranges[self._next_range]
                    size = r.end - r.start
                    if r.state == "released":  # every tensor using it was skipped before it was fetched
                        self._next_range += 1
                        continue
                    if self._live == 0 or self._live + size <= self._window:
                        break
                    self._cond.wait()
                self._next_range += 1
                self._live += size
                self.client.stats.peak_window = max(self.client.stats.peak_window, self._live)
                r.state = "fetching"
            try:
                data, error = r.file.fetch(r.start, r.end), None
            except BaseException as e:  # handed to the reader of this range
                data, error = None, e
            with self._cond:
                if r.state == "released":  # skipped while in flight
                    self._live -= size
                else:
                    r.data, r.error, r.state = data, error, "done"
                self._cond.notify_all()

    def _release(self, idx: int) -> None:
        r = self._ranges[idx]
        r.users -= 1
        if r.users <= 0 and r.state != "released":
            if r.state == "done":  # one still fetching is taken off the window by its worker
                self._live -= r.end - r.start
            r.state, r.data = "released", None
            self._cond.notify_all()

    def read(self, name: str) -> np.ndarray:
        info = self.tensors.get(name)
        if info is None:
            raise SourceError(f"{self.spec}: no tensor {name}")
        out = np.empty(info.shape, dtype=np.float32)
        flat = out.reshape(-1)
        for s, raw in self._stream(name):
            upcast_into(np.frombuffer(raw, dtype=np.uint8), s.dtype, flat[s.dest:s.dest + s.count])
        return out

    def read_raw_into(self, name: str, out: np.ndarray) -> None:
        """Tensor ``name``'s source bytes, no upcast (as :meth:`Source.read_raw_into`), from the stream."""
        info = self.tensors.get(name)
        if info is None:
            raise SourceError(f"{self.spec}: no tensor {name}")
        if out.nbytes != info.nbytes:
            raise ValueError(f"tensor {name} has {info.nbytes} source bytes, the buffer {out.nbytes}")
        flat = out.reshape(-1).view(np.uint8)
        for s, raw in self._stream(name):
            width = DTYPE_SIZES[s.dtype]
            flat[s.dest * width:(s.dest + s.count) * width] = np.frombuffer(raw, dtype=np.uint8)

    def _stream(self, name: str) -> Iterator[tuple[Any, Any]]:
        """Each slice of tensor ``name`` with its raw bytes, in order; a slice's range is released
        once the caller has consumed its bytes (before the next one is yielded)."""
        self._start()
        with self._cond:
            again = name in self._consumed
            self._consumed.add(name)
            pos = self._position[name]
            # Tensors passed over are not coming back. Everything before _passed is consumed already,
            # so each tensor is looked at once over the whole run (a scan of all per read was quadratic).
            for other in self._schedule[self._passed:pos]:
                if other not in self._consumed:
                    self._consumed.add(other)
                    for s in self._slices[other]:
                        self._release(s.rng)
            self._passed = max(self._passed, pos)
        for s in self._slices[name]:
            r = self._ranges[s.rng]
            width = DTYPE_SIZES[s.dtype]
            if again:  # read twice: its bytes are gone, fetch them directly
                raw = r.file.fetch(r.start + s.lo, r.start + s.lo + s.count * width)
            else:
                with self._cond:
                    while r.state in ("waiting", "fetching"):
                        self._cond.wait()
                    if r.error is not None:
                        raise r.error
                    raw = r.data[s.lo:s.lo + s.count * width]  # type: ignore[index]
            yield s, raw
            if not again:
                with self._cond:
                    self._release(s.rng)

    def check_complete(self) -> None:
        """Finish each file's sha256 (fetching what the hash still lacks) and compare with the Hub's."""
        for f in self.remote_files:
            got = f.finish_hash()
            if got != f.expected_sha256:
                raise HubVerificationError(f"{f.label}: the bytes streamed from the Hub hash to sha256 {got}, but the "
                                           f"Hub reports {f.expected_sha256}: the download is corrupt or the Hub's "
                                           "metadata is wrong; nothing was written")
        kept = [f.kept for f in self.remote_files if f.kept is not None]
        for k in kept:  # every copy checked before the first is renamed
            k.check()
        for k in kept:
            k.commit()

    def close(self) -> None:
        with self._cond:
            self._stop = True
            for r in self._ranges:
                r.data = None
            self._cond.notify_all()
        for w in self._workers:  # a worker inside a request finishes it first; do not wait long on
            if w.is_alive():     # a slow link (Ctrl-C): the threads are daemons, their result unused
                w.join(timeout=2.0)
        for f in self.remote_files:
            f.close()

    def __repr__(self) -> str:
        return f"RemoteSource({str(self.spec)!r}@{self.commit[:12]}, layout={self.layout!r}, {len(self.tensors)} tensors)"


# ---- opening ----------------------------------------------------------------------------------
def open_hub_source(spec: HubSpec, *, keep_source: str | os.PathLike[str] | None = None,
                    replace_kept: bool = False, api: "HfApi | None" = None, connections: int | None = None,
                    window: int | None = None) -> RemoteSource:
    """Resolve the revision to a commit, find the weights, and read their headers (one range request each).

    ``keep_source``: also keep the streamed files under that folder (see :class:`_KeptCopy`); a
    file already there with other bytes is refused before any range is fetched, unless
    ``replace_kept``."""
    from huggingface_hub import get_token

    api = api or hub_api()
    connections = CONNECTIONS if connections is None else connections
    window = WINDOW_BYTES if window is None else window
    has_token = bool(api.token or get_token())
    with _reading(api, spec, f"reading the file list of {spec.repo_id}", has_token):
        info = fetch_model_info(api, spec.repo_id, spec.revision, f"{spec}: reading the file list of {spec.repo_id}")
    commit = str(info.sha)
    siblings = {s.rfilename: s for s in info.siblings or []}
    client = _Client(api, spec, commit, has_token)
    rev = spec.revision or "main"
    at = f"{spec.repo_id} at {rev} (commit {commit[:12]})"

    if spec.path.endswith(".safetensors"):
        if spec.path not in siblings:
            raise HubNotFoundError(f"{spec}: {at} has no file {spec.path}")
        names, weight_map = [spec.path], None
        folder = None
    else:
        base = spec.path.rstrip("/")
        candidates = [f"{base}/transformer" if base else "transformer", base]
        folder = next((c for c in candidates
                       if _join(c, DIFFUSERS_INDEX) in siblings or _join(c, DIFFUSERS_WEIGHTS) in siblings), None)
        if folder is None:
            where = spec.path or "the repo root"
            raise HubNotFoundError(f"{spec}: {at} has no diffusers transformer weights under {where} (expected "
                                   f"transformer/{DIFFUSERS_WEIGHTS} or transformer/{DIFFUSERS_INDEX}; a single "
                                   "file is given as hf://OWNER/REPO/PATH.safetensors)")
        weight_map = None
        if _join(folder, DIFFUSERS_INDEX) in siblings:
            weight_map, index_size, index_sha = _read_remote_index(api, client, spec, _join(folder, DIFFUSERS_INDEX),
                                                                  has_token)
            client.index = (_join(folder, DIFFUSERS_INDEX), index_size, index_sha)
            names = [_join(folder, n) for n in dict.fromkeys(weight_map.values())]
            for n in names:
                if n not in siblings:
                    raise HubNotFoundError(f"{spec}: the index names shard {n}, which {at} does not have")
        else:
            names = [_join(folder, DIFFUSERS_WEIGHTS)]
    expected: dict[str, tuple[int, str]] = {}
    for name in names:
        s = siblings[name]
        if s.lfs is None or not getattr(s.lfs, "sha256", None):
            raise HubVerificationError(f"{spec}: the Hub reports no LFS sha256 for {name}, so its bytes "
                                       "cannot be verified")
        expected[name] = (int(s.size), str(s.lfs.sha256))
    keep = pathlib.Path(keep_source) if keep_source is not None else None
    to_keep: set[str] = set()
    if keep is not None:
        try:
            keep.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise OutputError(f"{keep}: cannot create the --keep-source folder: {e.strerror or e}") from None
        to_keep = {n for n, (size, sha) in expected.items() if _needs_keeping(keep, n, size, sha, replace_kept, at)}
    # Ranges in flight finish in any order: the hold must fit all but one of them, or the hash
    # would fall behind for good at the first range it could not hold.
    hold = _Budget(max(HASH_HOLD_BYTES, connections * RANGE_BYTES))
    shards: list[RemoteFile] = []
    try:
        for name in names:
            size, sha = expected[name]
            kept = _KeptCopy(keep, name, size, replace_kept) if keep is not None and name in to_keep else None
            shards.append(RemoteFile(client, name, size, sha, hold, kept))
        files = [SourceFile(f.path, f.size) for f in shards]  # type: ignore[arg-type]
        if weight_map is not None:  # listed first, as for a local folder
            index = _join(folder or "", DIFFUSERS_INDEX)
            files.insert(0, SourceFile(pathlib.PurePosixPath(index), int(siblings[index].size or 0)))  # type: ignore[arg-type]
        if folder is None:
            return _single(spec, client, shards[0], files, connections, window)
        return _diffusers(spec, client, shards, files, weight_map, connections, window)
    except BaseException:
        for f in shards:
            f.close()
        raise


def _join(folder: str, name: str) -> str:
    return f"{folder}/{name}" if folder else name


def _read_remote_index(api: "HfApi", client: _Client, spec: HubSpec, path: str, has_token: bool
                       ) -> tuple[dict[str, str], int, str]:
    """The index's weight map, and its size and sha256 (a small regular file: fetched whole, capped, and hashed)."""
    label = f"{HF_PREFIX}{spec.repo_id}@{client.commit[:12]}/{path}"
    with _reading(api, spec, f"reading {path}", has_token):
        content = fetch_whole(client.url(path), headers=_headers(api), what=label, cap=SMALL_FILE_MAX_BYTES)
    return parse_index(content, label), len(content), hashlib.sha256(content).hexdigest()


def _single(spec: HubSpec, client: _Client, f: RemoteFile, files: list[SourceFile], connections: int,
            window: int) -> RemoteSource:
    keys = list(f.tensors)
    prefix = next((p for p in COMFYUI_PREFIXES if any(k.startswith(p) for k in keys)), None)
    if prefix is not None:
        kept = {k[len(prefix):]: f.tensors[k] for k in keys if k.startswith(prefix)}
        ignored = tuple(k for k in keys if not k.startswith(prefix))
        tensors = {n: TensorInfo(n, r.shape, r.dtype, r.nbytes) for n, r in kept.items()}
        pieces = {n: _whole(f, r) for n, r in kept.items()}  # type: ignore[arg-type]
        return RemoteSource(spec, client, "comfyui", [f], tensors, pieces, files, ignored,
                            connections=connections, window=window)
    if _looks_diffusers(keys):
        tensors, pieces = _assemble_diffusers({k: (f, r) for k, r in f.tensors.items()})  # type: ignore[misc]
        return RemoteSource(spec, client, "diffusers", [f], tensors, pieces, files,
                            connections=connections, window=window)
    tensors = {k: TensorInfo(k, r.shape, r.dtype, r.nbytes) for k, r in f.tensors.items()}
    pieces = {k: _whole(f, r) for k, r in f.tensors.items()}  # type: ignore[arg-type]
    return RemoteSource(spec, client, "bfl", [f], tensors, pieces, files, connections=connections, window=window)


def _diffusers(spec: HubSpec, client: _Client, shards: list[RemoteFile], files: list[SourceFile],
               weight_map: Mapping[str, str] | None, connections: int, window: int) -> RemoteSource:
    tensors, pieces = assemble_shards(shards, weight_map, lambda s: s.label, lambda name: f"{spec}/{name}")
    return RemoteSource(spec, client, "diffusers", shards, tensors, pieces, files,
                        connections=connections, window=window)
