"""A loopback Hugging Face Hub for tests: the endpoints ``huggingface_hub`` speaks when Xet is off.

Why: no light public Hub emulator exists and tests must never reach the real Hub, yet the
upload/verify/download code should be exercised through the *real* client. This stdlib
``ThreadingHTTPServer`` answers the HTTP conversation described in docs/hub.md (repo creation,
YAML validation, preupload, the LFS batch API with basic and multipart transfers, ndjson
commits, model info with blobs, paths-info, tree, refs, branches and ``resolve``), keeps one
content-addressed LFS store (so a re-run skips objects that already landed, as the Hub does),
and logs every request so tests can assert on what was sent.

Knobs for failure tests: :meth:`HubEmulator.corrupt` (damage stored bytes, metadata untouched),
:meth:`HubEmulator.misreport_sha256` (metadata lies), :meth:`HubEmulator.drop_uploads` (the
network goes away on the Nth LFS data request), :meth:`HubEmulator.fail` (answer a status such
as 401/403/404/429 on matching requests). A hostile Hub: :meth:`HubEmulator.misbehave` (never
answer, one byte then hang up, trickle the body or the headers a byte at a time) and
:meth:`HubEmulator.answer_with` (any bytes and headers, e.g. :func:`gzip_bomb`); every such
answer gives up by itself after a bounded time, and at once when the emulator stops.

Never imported by production code.
"""
from __future__ import annotations

import base64
import contextlib
import fnmatch
import functools
import hashlib
import io
import json
import re
import socket
import struct
import threading
import time
import zlib
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Iterator
from urllib.parse import parse_qs, unquote, urlsplit

import yaml

DEFAULT_TOKENS = {"hf_alice_write": "alice", "hf_bob_write": "bob"}
DEFAULT_GITATTRIBUTES = (
    "*.gguf filter=lfs diff=lfs merge=lfs -text\n"
    "*.safetensors filter=lfs diff=lfs merge=lfs -text\n"
    "*.bin filter=lfs diff=lfs merge=lfs -text\n"
)
REGULAR_MAX_BYTES = 10 * 1024 * 1024  # the Hub refuses larger regular (non-LFS) files


def git_blob_id(data: bytes) -> str:
    """The git object id of a blob (what the Hub reports as ``blobId``/``oid`` for regular files)."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def lfs_pointer(oid: str, size: int) -> bytes:
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{oid}\nsize {size}\n".encode()


@functools.lru_cache(maxsize=8)
def gzip_bomb(prefix: bytes, unit: bytes, count: int, suffix: bytes = b"") -> bytes:
    """A valid gzip member inflating to ``prefix + unit * count + suffix``, about 1/1000 of that on
    the wire. After a full flush deflate starts afresh, so ``unit``'s compressed block is the same
    every time: it is compressed once and repeated."""
    deflate = zlib.compressobj(9, zlib.DEFLATED, -15)
    head = deflate.compress(prefix) + deflate.flush(zlib.Z_FULL_FLUSH)
    block = deflate.compress(unit) + deflate.flush(zlib.Z_FULL_FLUSH)
    tail = deflate.compress(suffix) + deflate.flush(zlib.Z_FINISH)
    crc = zlib.crc32(prefix)
    for _ in range(count):
        crc = zlib.crc32(unit, crc)
    crc = zlib.crc32(suffix, crc)
    size = len(prefix) + len(unit) * count + len(suffix)
    return (b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\x03" + head + block * count + tail
            + struct.pack("<II", crc & 0xFFFFFFFF, size & 0xFFFFFFFF))


@dataclass
class Entry:
    """One file of a commit's tree. LFS content lives in the shared store under ``sha256``."""

    size: int
    sha256: str
    lfs: bool
    content: bytes | None = None  # regular files only
    committed_blob_id: str | None = None  # kept by corrupt(): the metadata still describes the old bytes

    @property
    def blob_id(self) -> str:
        if self.lfs:
            return git_blob_id(lfs_pointer(self.sha256, self.size))
        return self.committed_blob_id or git_blob_id(self.content or b"")


@dataclass
class Commit:
    oid: str
    parent: str | None
    message: str
    tree: dict[str, Entry]


@dataclass
class Repo:
    repo_id: str
    owner: str
    private: bool
    commits: dict[str, Commit] = field(default_factory=dict)
    refs: dict[str, str] = field(default_factory=dict)  # "main", "dev", "refs/pr/1" -> commit oid
    next_pr: int = 1


@dataclass
class LoggedRequest:
    """What the emulator saw: ``status`` is None for a request whose connection was dropped."""

    method: str
    path: str
    status: int | None
    user: str | None = None
    oid: str | None = None
    nbytes: int = 0
    range: str | None = None  # the Range header, if the request sent one

    @property
    def dropped(self) -> bool:
        return self.status is None


@dataclass
class _FailRule:
    status: int
    method: str | None
    path_re: re.Pattern[str] | None
    times: int | None
    message: str
    error_code: str | None


MISBEHAVIOURS = ("silent", "one_byte", "trickle", "trickle_headers")


@dataclass
class _Misbehaviour:
    mode: str  # one of MISBEHAVIOURS
    method: str | None
    path_re: re.Pattern[str] | None
    interval: float
    limit_s: float
    skip: int  # matching requests still to answer properly first


@dataclass
class _Canned:
    method: str | None
    path_re: re.Pattern[str] | None
    status: int
    body: bytes
    content_type: str
    headers: dict[str, str]


def _matches(rule: Any, method: str, path: str) -> bool:
    return rule.method in (None, method) and (rule.path_re is None or bool(rule.path_re.search(path)))


class _Dropped(Exception):
    """The handler cut the connection on purpose; nothing may be written back."""


class _HTTPFail(Exception):
    def __init__(self, status: int, message: str, error_code: str | None = None, **extra: Any):
        super().__init__(message)
        self.status, self.message, self.error_code, self.extra = status, message, error_code, extra


class HubEmulator:
    """State and knobs of the loopback Hub; ``start()`` serves it on 127.0.0.1 at a free port."""

    def __init__(self, tokens: dict[str, str] | None = None, multipart_chunk_size: int | None = None):
        self.tokens = dict(DEFAULT_TOKENS if tokens is None else tokens)
        self.multipart_chunk_size = multipart_chunk_size  # LFS objects larger than this go multipart
        self.repos: dict[str, Repo] = {}
        self.lfs_store: dict[str, bytes] = {}
        self.log: list[LoggedRequest] = []
        self._parts: dict[tuple[str, int], bytes] = {}
        self._lock = threading.RLock()
        self._fail_rules: list[_FailRule] = []
        self._misreported: set[tuple[str, str]] = set()
        self._upload_count = 0
        self._drop_from: int | None = None
        self._drop_count: int | None = None
        self._commit_counter = 0
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        # Download knobs (resolve GETs): see throttle(), drop_downloads(), gate().
        self.bandwidth: float | None = None
        self._link_free_at = 0.0
        self._link_lock = threading.Lock()
        self._download_count = 0
        self._download_drops: tuple[int, int | None, int] | None = None
        self.gated: dict[str, set[str]] = {}
        # Hostile knobs: see misbehave(), answer_with(). _stopping ends every misbehaving answer.
        self._misbehaviours: list[_Misbehaviour] = []
        self._canned: list[_Canned] = []
        self._stopping = threading.Event()

    # ---- lifecycle -------------------------------------------------------------------------
    def start(self) -> "HubEmulator":
        self._stopping.clear()
        handler = type("_BoundHandler", (_Handler,), {"hub": self})
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                                        name="hub-emulator", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopping.set()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> "HubEmulator":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def url(self) -> str:
        assert self._server is not None, "emulator not started"
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    # ---- setup and knobs -------------------------------------------------------------------
    def add_repo(self, repo_id: str, owner: str | None = None, private: bool = False) -> Repo:
        """Create a repo directly (e.g. one owned by someone else), with the Hub's initial commit."""
        with self._lock:
            owner = owner or repo_id.split("/")[0]
            repo = Repo(repo_id, owner, private)
            tree = {".gitattributes": self._regular(DEFAULT_GITATTRIBUTES.encode())}
            self._new_commit(repo, None, "initial commit", tree, "main")
            self.repos[repo_id] = repo
            return repo

    def corrupt(self, repo_id: str, path: str, revision: str = "main") -> None:
        """Flip one byte of a stored file; the metadata (size, sha256, blob id) stays as committed."""
        with self._lock:
            entry = self._tree(self.repos[repo_id], revision)[path]
            data = bytearray(self.lfs_store[entry.sha256] if entry.lfs else entry.content or b"")
            data[len(data) // 2] ^= 0xFF
            if entry.lfs:
                self.lfs_store[entry.sha256] = bytes(data)
            else:
                entry.committed_blob_id = entry.blob_id
                entry.content = bytes(data)

    def misreport_sha256(self, repo_id: str, path: str) -> None:
        """Make every metadata answer (model info, paths-info, tree, resolve headers) lie about a file's sha256."""
        with self._lock:
            self._misreported.add((repo_id, path))

    def drop_uploads(self, nth: int, count: int | None = None) -> None:
        """Cut the connection on LFS data requests number ``nth`` .. ``nth+count-1`` (1-based, counted
        from now on); ``count=None`` means every one from ``nth`` on (the network is gone)."""
        with self._lock:
            self._upload_count = 0
            self._drop_from, self._drop_count = nth, count

    def restore_network(self) -> None:
        with self._lock:
            self._drop_from = self._drop_count = None

    def fail(
        self,
        status: int,
        *,
        method: str | None = None,
        path: str | None = None,
        times: int | None = None,
        message: str = "injected failure",
        error_code: str | None = None,
    ) -> None:
        """Answer ``status`` to requests matching ``method`` and the ``path`` regex (``times`` of them, or all)."""
        with self._lock:
            rx = re.compile(path) if path is not None else None
            self._fail_rules.append(_FailRule(status, method, rx, times, message, error_code))

    def put_files(self, repo_id: str, files: dict[str, bytes], revision: str = "main", *,
                  lfs: bool = True) -> str:
        """Commit ``files`` (path -> bytes) to a repo directly (created if missing); returns the commit id."""
        with self._lock:
            repo = self.repos.get(repo_id) or self.add_repo(repo_id)
            base = self._resolve(repo, revision) if revision in repo.refs else self._resolve(repo, "main")
            tree = dict(base.tree)
            for path, data in files.items():
                if lfs:
                    sha = hashlib.sha256(data).hexdigest()
                    self.lfs_store[sha] = data
                    tree[path] = Entry(len(data), sha, True)
                else:
                    tree[path] = self._regular(data)
            return self._new_commit(repo, base.oid, f"add {len(files)} files", tree, revision).oid

    # ---- download knobs (file bodies of resolve GETs) ------------------------------------------
    def throttle(self, bytes_per_second: float | None) -> None:
        """Share one link of this bandwidth among all file bodies sent (None: as fast as loopback)."""
        with self._lock:
            self.bandwidth = bytes_per_second
            self._link_free_at = 0.0

    def drop_downloads(self, nth: int, count: int | None = 1, after_bytes: int = 0) -> None:
        """Cut the connection after ``after_bytes`` of the body of resolve GETs number ``nth`` ..
        ``nth+count-1`` (1-based, counted from now on; ``count=None``: every one from ``nth`` on)."""
        with self._lock:
            self._download_count = 0
            self._download_drops = (nth, count, after_bytes)

    def gate(self, repo_id: str, allowed: set[str] | frozenset[str] = frozenset()) -> None:
        """Make a repo gated: its files answer 401 without a token, 403 to users not in ``allowed``
        (with the Hub's ``X-Error-Code: GatedRepo``); metadata stays readable, as on the Hub."""
        with self._lock:
            self.gated[repo_id] = set(allowed)

    def clear_failures(self) -> None:
        with self._lock:
            self._fail_rules.clear()
            self._misbehaviours.clear()
            self._canned.clear()

    # ---- a hostile Hub ---------------------------------------------------------------------------
    def misbehave(self, mode: str, *, method: str | None = "GET", path: str | None = None,
                  interval: float = 0.05, limit_s: float = 20.0, skip: int = 0) -> None:
        """Answer every request matching ``method`` and the ``path`` regex (after the first ``skip``) badly:

        - ``silent``: read the request, never answer (the connection stays open);
        - ``one_byte``: the status line, the headers (the real Content-Length) and one byte of the
          body, then hang up;
        - ``trickle``: the headers, then the body one byte per ``interval`` seconds;
        - ``trickle_headers``: the status line and headers one byte per ``interval`` seconds.

        Each answer gives up (and hangs up) after ``limit_s`` seconds, or at once on :meth:`stop`.
        """
        assert mode in MISBEHAVIOURS, mode
        with self._lock:
            rx = re.compile(path) if path is not None else None
            self._misbehaviours.append(_Misbehaviour(mode, method, rx, interval, limit_s, skip))

    def answer_with(self, body: bytes, *, path: str, method: str | None = "GET", status: int = 200,
                    content_type: str = "application/json", headers: dict[str, str] | None = None) -> None:
        """Answer requests matching ``method`` and the ``path`` regex with ``body`` and ``headers``
        as given (``Content-Encoding: gzip`` and a :func:`gzip_bomb`, a huge JSON, ...)."""
        with self._lock:
            self._canned.append(_Canned(method, re.compile(path), status, body, content_type, dict(headers or {})))

    # ---- queries for assertions ------------------------------------------------------------
    def requests(self, method: str | None = None, path_contains: str = "") -> list[LoggedRequest]:
        with self._lock:
            return [r for r in self.log if (method is None or r.method == method) and path_contains in r.path]

    def lfs_uploads(self) -> list[LoggedRequest]:
        """Every LFS data request (single PUT or multipart part), dropped or not."""
        return [r for r in self.requests("PUT") if r.path.startswith("/_lfs/")]

    def files(self, repo_id: str, revision: str = "main") -> dict[str, Entry]:
        with self._lock:
            return dict(self._tree(self.repos[repo_id], revision))

    def file_bytes(self, repo_id: str, path: str, revision: str = "main") -> bytes:
        with self._lock:
            entry = self._tree(self.repos[repo_id], revision)[path]
            return self.lfs_store[entry.sha256] if entry.lfs else entry.content or b""

    # ---- state helpers (lock held) ---------------------------------------------------------
    @staticmethod
    def _regular(data: bytes) -> Entry:
        return Entry(len(data), hashlib.sha256(data).hexdigest(), False, data)

    def _new_commit(self, repo: Repo, parent: str | None, message: str, tree: dict[str, Entry], ref: str) -> Commit:
        self._commit_counter += 1
        seed = json.dumps([repo.repo_id, parent, message, sorted(tree), self._commit_counter]).encode()
        commit = Commit(hashlib.sha1(seed).hexdigest(), parent, message, tree)
        repo.commits[commit.oid] = commit
        repo.refs[ref] = commit.oid
        return commit

    def _resolve(self, repo: Repo, revision: str) -> Commit:
        oid = repo.refs.get(revision)
        if oid is None and revision in repo.commits:
            oid = revision
        if oid is None:
            raise _HTTPFail(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        return repo.commits[oid]

    def _tree(self, repo: Repo, revision: str) -> dict[str, Entry]:
        return self._resolve(repo, revision).tree

    def _reported_sha256(self, repo_id: str, path: str, entry: Entry) -> str:
        if (repo_id, path) in self._misreported:
            return entry.sha256[:-1] + ("0" if entry.sha256[-1] != "0" else "1")
        return entry.sha256

    def _file_json(self, repo_id: str, path: str, entry: Entry, *, sibling: bool) -> dict[str, Any]:
        lfs = None
        if entry.lfs:
            sha = self._reported_sha256(repo_id, path, entry)
            pointer_size = len(lfs_pointer(entry.sha256, entry.size))
            lfs = {"size": entry.size, "pointerSize": pointer_size, ("sha256" if sibling else "oid"): sha}
        if sibling:
            out: dict[str, Any] = {"rfilename": path, "size": entry.size, "blobId": entry.blob_id}
        else:
            out = {"type": "file", "path": path, "size": entry.size, "oid": entry.blob_id}
        if lfs is not None:
            out["lfs"] = lfs
        return out


class _Handler(BaseHTTPRequestHandler):
    """Routes one request; every answer carries a Content-Length so keep-alive works."""

    hub: HubEmulator
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # headers and body leave together: no 40 ms delayed-ACK stalls
    wbufsize = 1 << 16  # flushed after each request by BaseHTTPRequestHandler

    def log_message(self, format: str, *args: object) -> None:  # keep test output clean
        return

    # ---- plumbing --------------------------------------------------------------------------
    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_HEAD(self) -> None:
        self._dispatch("HEAD")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_PUT(self) -> None:
        self._dispatch("PUT")

    def _dispatch(self, method: str) -> None:
        url = urlsplit(self.path)
        self._query = parse_qs(url.query)
        self._record = LoggedRequest(method, unquote(url.path), None, range=self.headers.get("Range"))
        with self.hub._lock:
            self.hub.log.append(self._record)
        self._cached_body: bytes | None = None
        self._deferred: tuple[int, bytes, dict[str, str], int | None] | None = None
        self._hostile: tuple[_Misbehaviour, int, bytes, dict[str, str]] | None = None
        if not (method == "PUT" and self._record.path.startswith("/_lfs/")):
            self._body()  # read now, so an early error answer never leaves bytes on a kept-alive socket
        try:
            canned = self._canned_answer(method, self._record.path)
            if canned is not None:
                self._send(canned.status, canned.body, canned.content_type, canned.headers)
            else:
                self._user = self._authenticate()
                self._apply_fail_rules(method, self._record.path)
                self._route(method, url.path)
                if self._deferred is not None:  # a file body: sent outside the lock, throttled/dropped as set
                    self._send_body(*self._deferred)
        except _Dropped:
            self.close_connection = True
        except _HTTPFail as e:
            self._send_json(e.status, {"error": e.message, **e.extra}, error_code=e.error_code, error_message=e.message)
        except (BrokenPipeError, ConnectionResetError):  # the client hung up mid-answer (e.g. on a bomb)
            self._hang_up()
        if self._hostile is not None:  # outside the lock, which routing holds: other requests go on
            self._misbehave(*self._hostile)

    def _body(self) -> bytes:
        if self._cached_body is None:
            self._cached_body = self._read_body()
        return self._cached_body

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                if size == 0:
                    self.rfile.readline()
                    break
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            return b"".join(chunks)
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _json_body(self) -> Any:
        return json.loads(self._body() or b"{}")

    def _send(self, status: int, body: bytes, content_type: str, headers: dict[str, str] | None = None) -> None:
        if self._defer_if_hostile(status, body, {"Content-Type": content_type, **(headers or {})}):
            return
        self._record.status = status
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _send_json(
        self, status: int, payload: Any, *, error_code: str | None = None, error_message: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        extra = dict(headers or {})
        if error_code:
            extra["X-Error-Code"] = error_code
        if error_message:
            extra["X-Error-Message"] = error_message
        self._send(status, json.dumps(payload).encode(), "application/json", extra)

    # ---- a hostile Hub ---------------------------------------------------------------------------
    def _canned_answer(self, method: str, path: str) -> _Canned | None:
        with self.hub._lock:
            return next((c for c in self.hub._canned if _matches(c, method, path)), None)

    def _defer_if_hostile(self, status: int, body: bytes, headers: dict[str, str]) -> bool:
        """Keep the answer for :meth:`_misbehave` if a misbehaviour matches this request."""
        with self.hub._lock:
            rule = next((m for m in self.hub._misbehaviours if _matches(m, self.command, self._record.path)), None)
            if rule is not None and rule.skip > 0:
                rule.skip -= 1
                return False
        if rule is not None:
            self._hostile = (rule, status, body, headers)
        return rule is not None

    def _misbehave(self, rule: _Misbehaviour, status: int, body: bytes, headers: dict[str, str]) -> None:
        self._hostile = None
        self.close_connection = True
        self._record.status = None  # logged as dropped: no whole answer went out
        stopping = self.hub._stopping
        deadline = time.monotonic() + rule.limit_s
        lines = [f"HTTP/1.1 {status} {self.responses.get(status, ('',))[0]}",
                 *(f"{k}: {v}" for k, v in {"Content-Length": str(len(body)), **headers}.items())]
        head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
        try:
            if rule.mode == "silent":
                stopping.wait(rule.limit_s)
            elif rule.mode == "trickle_headers":
                self._trickle(head + body, rule.interval, deadline)
            else:
                self.wfile.write(head)
                if rule.mode == "one_byte":
                    self.wfile.write(body[:1])
                    self.wfile.flush()
                else:
                    self._trickle(body, rule.interval, deadline)
        except OSError:  # the client hung up
            pass
        self._hang_up()

    def _hang_up(self) -> None:
        self.close_connection = True
        with contextlib.suppress(OSError):
            self.connection.shutdown(socket.SHUT_RDWR)
        self.wfile = io.BytesIO()  # what a failed write left buffered is never flushed into the dead socket

    def _trickle(self, data: bytes, interval: float, deadline: float) -> None:
        for i in range(len(data)):
            if self.hub._stopping.is_set() or time.monotonic() > deadline:
                return
            self.wfile.write(data[i:i + 1])
            self.wfile.flush()
            self.hub._stopping.wait(interval)

    def _authenticate(self) -> str | None:
        auth = self.headers.get("Authorization")
        if not auth:
            return None
        token = auth.removeprefix("Bearer ").strip()
        user = self.hub.tokens.get(token)
        if user is None:
            self._body()
            raise _HTTPFail(401, "Invalid credentials in Authorization header")
        self._record.user = user
        return user

    def _apply_fail_rules(self, method: str, path: str) -> None:
        with self.hub._lock:
            for rule in self.hub._fail_rules:
                if rule.method not in (None, method) or (rule.path_re and not rule.path_re.search(path)):
                    continue
                if rule.times is not None:
                    if rule.times <= 0:
                        continue
                    rule.times -= 1
                self._body()
                raise _HTTPFail(rule.status, rule.message, rule.error_code)

    def _require_user(self) -> str:
        if self._user is None:
            raise _HTTPFail(401, "Invalid username or password.")
        return self._user

    def _repo(self, repo_id: str, *, write: bool = False) -> Repo:
        repo = self.hub.repos.get(repo_id)
        visible = repo is not None and (not repo.private or self._user == repo.owner)
        if not visible:
            raise _HTTPFail(404, "Repository not found", "RepoNotFound")
        assert repo is not None
        if write:
            user = self._require_user()
            if user != repo.owner:
                raise _HTTPFail(403, f"You don't have the rights to write to {repo_id}")
        return repo

    # ---- routing ---------------------------------------------------------------------------
    def _route(self, method: str, raw_path: str) -> None:
        parts = [unquote(p) for p in raw_path.strip("/").split("/")]
        with self.hub._lock:
            if method == "POST" and parts == ["api", "repos", "create"]:
                return self._create_repo()
            if method == "POST" and parts == ["api", "validate-yaml"]:
                return self._validate_yaml()
            if parts[:2] == ["api", "models"] and len(parts) >= 4:
                return self._model_api(method, f"{parts[2]}/{parts[3]}", parts[4:])
            if parts[0] == "_lfs" and len(parts) >= 2:
                return self._lfs_transfer(method, parts[1], parts[2:])
            if len(parts) == 6 and parts[2:] == ["info", "lfs", "objects", "batch"] and parts[1].endswith(".git"):
                return self._lfs_batch(f"{parts[0]}/{parts[1][:-4]}")
            if len(parts) >= 5 and parts[2] == "resolve" and method in ("GET", "HEAD"):
                return self._resolve_file(f"{parts[0]}/{parts[1]}", parts[3], "/".join(parts[4:]))
        raise _HTTPFail(404, f"no route for {method} {raw_path}")

    def _model_api(self, method: str, repo_id: str, rest: list[str]) -> None:
        if method == "GET" and not rest:
            return self._model_info(repo_id, "main")
        if method == "GET" and len(rest) == 2 and rest[0] == "revision":
            return self._model_info(repo_id, rest[1])
        if method == "GET" and rest[:1] == ["tree"] and len(rest) >= 2:
            return self._tree_listing(repo_id, rest[1], "/".join(rest[2:]))
        if method == "GET" and rest == ["refs"]:
            repo = self._repo(repo_id)
            branches = [{"name": n, "ref": f"refs/heads/{n}", "targetCommit": o}
                        for n, o in repo.refs.items() if not n.startswith("refs/")]
            return self._send_json(200, {"branches": branches, "tags": [], "converts": []})
        if method == "POST" and len(rest) == 2 and rest[0] == "preupload":
            return self._preupload(repo_id, rest[1])
        if method == "POST" and len(rest) == 2 and rest[0] == "commit":
            return self._commit(repo_id, rest[1])
        if method == "POST" and len(rest) == 2 and rest[0] == "paths-info":
            return self._paths_info(repo_id, rest[1])
        if method == "POST" and len(rest) == 2 and rest[0] == "branch":
            return self._create_branch(repo_id, rest[1])
        raise _HTTPFail(404, f"no route for {method} /api/models/{repo_id}/{'/'.join(rest)}")

    # ---- endpoints -------------------------------------------------------------------------
    def _create_repo(self) -> None:
        body = self._json_body()
        user = self._require_user()
        namespace = body.get("organization") or user
        repo_id = f"{namespace}/{body['name']}"
        existing = self.hub.repos.get(repo_id)
        if namespace != user:
            raise _HTTPFail(403, f"You don't have the rights to create a model under the namespace {namespace!r}")
        if existing is not None:
            raise _HTTPFail(409, "You already created this model repo", url=f"{self.hub.url}/{repo_id}")
        private = body.get("visibility") == "private" or bool(body.get("private"))
        self.hub.add_repo(repo_id, owner=user, private=private)
        self._send_json(200, {"url": f"{self.hub.url}/{repo_id}", "name": repo_id})

    def _validate_yaml(self) -> None:
        content = self._json_body().get("content", "")
        match = re.match(r"^---\s*\n(.*?)\n---\s*(\n|$)", content, re.S)
        if match is None:
            return self._send_json(200, {"warnings": [{"message": "empty or missing yaml metadata"}]})
        try:
            meta = yaml.safe_load(match.group(1))
        except yaml.YAMLError as e:
            return self._send_json(400, {"errors": [{"message": f"invalid YAML: {e}"}]})
        if meta is not None and not isinstance(meta, dict):
            return self._send_json(400, {"errors": [{"message": "metadata must be a YAML mapping"}]})
        self._send_json(200, {})

    def _model_info(self, repo_id: str, revision: str) -> None:
        repo = self._repo(repo_id)
        commit = self.hub._resolve(repo, revision)
        info: dict[str, Any] = {"id": repo_id, "author": repo.owner, "sha": commit.oid, "private": repo.private}
        blobs = self._query.get("blobs", ["false"])[0].lower() == "true"
        info["siblings"] = [
            self.hub._file_json(repo_id, p, e, sibling=True) if blobs else {"rfilename": p}
            for p, e in sorted(commit.tree.items())
        ]
        self._send_json(200, info)

    def _tree_listing(self, repo_id: str, revision: str, prefix: str) -> None:
        repo = self._repo(repo_id)
        tree = self.hub._tree(repo, revision)
        recursive = self._query.get("recursive", ["false"])[0].lower() == "true"
        out, folders = [], set()
        for path, entry in sorted(tree.items()):
            if prefix and not path.startswith(prefix.rstrip("/") + "/"):
                continue
            rel = path[len(prefix.rstrip("/")) + 1:] if prefix else path
            if "/" in rel and not recursive:
                folders.add((prefix.rstrip("/") + "/" if prefix else "") + rel.split("/")[0])
                continue
            out.append(self.hub._file_json(repo_id, path, entry, sibling=False))
        out += [{"type": "directory", "path": f, "oid": git_blob_id(f.encode())} for f in sorted(folders)]
        self._send_json(200, out)

    def _paths_info(self, repo_id: str, revision: str) -> None:
        body = self._body().decode()
        if self.headers.get("Content-Type", "").startswith("application/json"):
            paths = json.loads(body).get("paths", [])
        else:
            paths = parse_qs(body).get("paths", [])
        repo = self._repo(repo_id)
        tree = self.hub._tree(repo, revision)
        out = [self.hub._file_json(repo_id, p, tree[p], sibling=False) for p in paths if p in tree]
        self._send_json(200, out)

    def _create_branch(self, repo_id: str, branch: str) -> None:
        body = self._json_body()
        repo = self._repo(repo_id, write=True)
        if branch in repo.refs:
            raise _HTTPFail(409, f"Reference already exists: refs/heads/{branch}")
        start = self.hub._resolve(repo, body.get("startingPoint") or "main")
        repo.refs[branch] = start.oid
        self._send_json(200, {})

    def _preupload(self, repo_id: str, revision: str) -> None:
        body = self._json_body()
        repo = self._repo(repo_id, write=True)
        tree = self.hub._tree(repo, "main" if "create_pr" in self._query else revision)
        patterns = []
        if ".gitattributes" in tree and tree[".gitattributes"].content is not None:
            for line in tree[".gitattributes"].content.decode().splitlines():
                if "filter=lfs" in line:
                    patterns.append(line.split()[0])
        files = []
        for f in body["files"]:
            sample = base64.b64decode(f["sample"])
            lfs = (any(fnmatch.fnmatch(f["path"].rsplit("/", 1)[-1], p) for p in patterns)
                   or f["size"] > REGULAR_MAX_BYTES or b"\0" in sample)
            existing = tree.get(f["path"])
            oid = None
            if existing is not None:
                oid = existing.sha256 if existing.lfs else existing.blob_id
            files.append({"path": f["path"], "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False,
                          "oid": oid})
        self._send_json(200, {"files": files, "commitOid": self.hub._resolve(repo, revision).oid})

    def _lfs_batch(self, repo_id: str) -> None:
        body = self._json_body()
        self._repo(repo_id, write=True)
        objects = []
        chunk = self.hub.multipart_chunk_size
        for obj in body.get("objects", []):
            oid, size = obj["oid"], obj["size"]
            stored = self.hub.lfs_store.get(oid)
            if stored is not None and len(stored) == size:
                objects.append({"oid": oid, "size": size})  # already there: no actions, nothing to send
                continue
            href = f"{self.hub.url}/_lfs/{oid}"
            upload: dict[str, Any] = {"href": href}
            if chunk is not None and size > chunk:
                n_parts = -(-size // chunk)
                upload["header"] = {"chunk_size": str(chunk),
                                    **{str(i): f"{href}/part/{i}" for i in range(1, n_parts + 1)}}
            objects.append({"oid": oid, "size": size, "authenticated": True,
                            "actions": {"upload": upload, "verify": {"href": f"{href}/verify"}}})
        transfer = "multipart" if chunk is not None else "basic"
        self._send(200, json.dumps({"transfer": transfer, "objects": objects}).encode(),
                   "application/vnd.git-lfs+json")

    def _count_upload_or_drop(self) -> None:
        """Count one LFS data request; if the network is 'down' for it, read half the body and hang up."""
        hub = self.hub
        hub._upload_count += 1
        n = hub._upload_count
        if hub._drop_from is None or n < hub._drop_from:
            return
        if hub._drop_count is not None and n >= hub._drop_from + hub._drop_count:
            return
        length = int(self.headers.get("Content-Length") or 0)
        if length:
            self.rfile.read(length // 2)
        try:
            self.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        raise _Dropped()

    def _lfs_transfer(self, method: str, oid: str, rest: list[str]) -> None:
        self._record.oid = oid
        if method == "PUT" and not rest:  # basic transfer: the whole object
            self._count_upload_or_drop()
            data = self._body()
            self._record.nbytes = len(data)
            if hashlib.sha256(data).hexdigest() != oid:
                raise _HTTPFail(400, f"content does not hash to {oid}")
            self.hub.lfs_store[oid] = data
            return self._send(200, b"", "text/plain")
        if method == "PUT" and len(rest) == 2 and rest[0] == "part":
            self._count_upload_or_drop()
            data = self._body()
            self._record.nbytes = len(data)
            self.hub._parts[(oid, int(rest[1]))] = data
            return self._send(200, b"", "text/plain", {"ETag": f'"{hashlib.md5(data).hexdigest()}"'})
        if method == "POST" and not rest:  # multipart completion
            body = self._json_body()
            pieces = []
            for part in body["parts"]:
                data = self.hub._parts.get((oid, part["partNumber"]))
                if data is None or f'"{hashlib.md5(data).hexdigest()}"' != part["etag"]:
                    raise _HTTPFail(400, f"part {part['partNumber']} of {oid} missing or etag mismatch")
                pieces.append(data)
            data = b"".join(pieces)
            if hashlib.sha256(data).hexdigest() != oid:
                raise _HTTPFail(400, f"assembled content does not hash to {oid}")
            self.hub.lfs_store[oid] = data
            return self._send_json(200, {})
        if method == "POST" and rest == ["verify"]:
            body = self._json_body()
            stored = self.hub.lfs_store.get(oid)
            if stored is None or len(stored) != body.get("size"):
                raise _HTTPFail(404, f"object {oid} not found")
            return self._send_json(200, {})
        raise _HTTPFail(404, f"no LFS route {method} {rest}")

    def _commit(self, repo_id: str, revision: str) -> None:
        raw = self._body()
        repo = self._repo(repo_id, write=True)
        lines = [json.loads(line) for line in raw.decode().splitlines() if line.strip()]
        if not lines or lines[0].get("key") != "header":
            raise _HTTPFail(400, "first ndjson line must be the header")
        header = lines[0]["value"]
        create_pr = "create_pr" in self._query
        base = self.hub._resolve(repo, "main" if create_pr else revision)
        if header.get("parentCommit") and not base.oid.startswith(header["parentCommit"]):
            raise _HTTPFail(412, "parent commit is not the head of the revision")
        tree = dict(base.tree)
        for line in lines[1:]:
            value = line["value"]
            if line["key"] == "file":
                tree[value["path"]] = self.hub._regular(base64.b64decode(value["content"]))
            elif line["key"] == "lfsFile":
                stored = self.hub.lfs_store.get(value["oid"])
                if stored is None or ("size" in value and len(stored) != value["size"]):
                    raise _HTTPFail(422, f"LFS object {value['oid']} for {value['path']} was never uploaded")
                tree[value["path"]] = Entry(len(stored), value["oid"], True)
            elif line["key"] in ("deletedFile", "deletedFolder"):
                for p in [p for p in tree if p == value["path"] or p.startswith(value["path"].rstrip("/") + "/")]:
                    del tree[p]
            else:
                raise _HTTPFail(400, f"unknown commit operation {line['key']!r}")
        answer: dict[str, Any] = {}
        if create_pr:
            ref = f"refs/pr/{repo.next_pr}"
            answer["pullRequestUrl"] = f"{self.hub.url}/{repo_id}/discussions/{repo.next_pr}"
            repo.next_pr += 1
        else:
            ref = revision if revision in repo.refs else "main"
        commit = self.hub._new_commit(repo, base.oid, header.get("summary", ""), tree, ref)
        answer.update(commitUrl=f"{self.hub.url}/{repo_id}/commit/{commit.oid}", commitOid=commit.oid)
        self._send_json(200, answer)

    def _resolve_file(self, repo_id: str, revision: str, path: str) -> None:
        repo = self._repo(repo_id)
        if repo_id in self.hub.gated and self._user not in self.hub.gated[repo_id]:
            status = 401 if self._user is None else 403
            raise _HTTPFail(status, f"Access to model {repo_id} is restricted. Visit {self.hub.url}/{repo_id} "
                                    "to ask for access.", "GatedRepo")
        commit = self.hub._resolve(repo, revision)
        entry = commit.tree.get(path)
        if entry is None:
            raise _HTTPFail(404, "Entry not found", "EntryNotFound")
        data = self.hub.lfs_store[entry.sha256] if entry.lfs else entry.content or b""
        headers = {"X-Repo-Commit": commit.oid}
        if entry.lfs:
            sha = self.hub._reported_sha256(repo_id, path, entry)
            headers.update({"ETag": f'"{sha}"', "X-Linked-Etag": f'"{sha}"', "X-Linked-Size": str(entry.size)})
        else:
            headers["ETag"] = f'"{entry.blob_id}"'
        status = 200
        rng = self.headers.get("Range")
        if rng and rng.startswith("bytes="):
            start_s, _, end_s = rng[6:].partition("-")
            start = int(start_s or 0)
            if start >= len(data):  # like real servers: nothing at or past the end to send
                headers.update({"Content-Range": f"bytes */{len(data)}", "Accept-Ranges": "bytes"})
                return self._send(416, b"", "text/plain", headers)
            end = min(int(end_s), len(data) - 1) if end_s else len(data) - 1
            headers["Content-Range"] = f"bytes {start}-{end}/{len(data)}"
            data, status = data[start:end + 1], 206
        headers["Accept-Ranges"] = "bytes"
        drop_after = None
        self._record.nbytes = len(data) if self.command == "GET" else 0
        if self.command == "GET":
            hub = self.hub
            hub._download_count += 1
            if hub._download_drops is not None:
                nth, count, after = hub._download_drops
                if hub._download_count >= nth and (count is None or hub._download_count < nth + count):
                    drop_after = min(after, len(data))
        if self.command == "GET" and (drop_after is not None or self.hub.bandwidth):
            self._deferred = (status, data, headers, drop_after)
            return
        self._send(status, data, "application/octet-stream", headers)

    def _send_body(self, status: int, data: bytes, headers: dict[str, str], drop_after: int | None) -> None:
        """Headers, then the body in 64 KiB pieces at the emulated link's pace; cut after ``drop_after`` bytes."""
        if self._defer_if_hostile(status, data, {"Content-Type": "application/octet-stream", **headers}):
            return self._misbehave(*self._hostile)  # type: ignore[misc]
        self._record.status = status
        self.send_response(status)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(data)))
        for k, v in headers.items():
            self.send_header(k, v)
        self.end_headers()
        view = memoryview(data)
        limit = len(data) if drop_after is None else drop_after
        pos = 0
        while pos < limit:
            piece = view[pos:min(limit, pos + (1 << 16))]
            bw = self.hub.bandwidth
            if bw:
                with self.hub._link_lock:
                    now = time.monotonic()
                    start = max(now, self.hub._link_free_at)
                    self.hub._link_free_at = start + len(piece) / bw
                wait = start + len(piece) / bw - time.monotonic()
                if wait > 0:
                    time.sleep(wait)
            self.wfile.write(piece)
            pos += len(piece)
        self._record.nbytes = pos
        if drop_after is not None:
            self.wfile.flush()
            try:
                self.connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            self.close_connection = True
            self._record.status = None


def _refuse_other_hosts(request: Any) -> None:
    if request.url.host != "127.0.0.1":
        raise AssertionError(f"a test tried to reach {request.url}")


@contextlib.contextmanager
def emulated_hub(monkeypatch: Any, home: Any, tokens: dict[str, str], token: str) -> Iterator["HubEmulator"]:
    """A started emulator with huggingface_hub pointed at it (environment and the constants it read
    at import), ``token`` as HF_TOKEN, fast retries, and a client that fails any request to another
    host; everything is restored afterwards."""
    from huggingface_hub import constants, set_client_factory
    from huggingface_hub.utils import http_backoff, httpx
    from huggingface_hub.utils._http import default_client_factory

    hub = HubEmulator(tokens=tokens).start()
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_TOKEN", token)
    monkeypatch.setattr(constants, "ENDPOINT", hub.url)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", hub.url + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr(constants, "HF_URL_HOSTS", constants.HF_URL_HOSTS | {"127.0.0.1"})
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(home / "token"))
    monkeypatch.setattr(constants, "HF_STORED_TOKENS_PATH", str(home / "stored_tokens"))
    monkeypatch.setitem(http_backoff.__kwdefaults__, "base_wait_time", 0.001)
    monkeypatch.setitem(http_backoff.__kwdefaults__, "max_wait_time", 0.002)
    set_client_factory(lambda: httpx.Client(event_hooks={"request": [_refuse_other_hosts]},
                                            follow_redirects=True, timeout=60))
    try:
        yield hub
    finally:
        set_client_factory(default_client_factory)
        hub.stop()

