"""One deadline policy for every request flux-gguf sends to the Hub, and bounded reads of the answers.

Why this shape:
- huggingface_hub's shared HTTP client has no timeout at all, and httpx's timeouts bound one socket
  operation each: a server that sends a byte every few seconds never trips them. So each attempt
  runs under a window rule (:class:`Attempt`): within ``timeout`` seconds of its start it must
  connect, answer and bring ``min_rate * timeout`` bytes of body (or the whole body), and so on
  for every further window. The requests carry httpcore's ``trace`` extension, which hands over
  each network stream the request opens: connecting, a TLS handshake and every read are bounded
  by the window's end, so a server trickling its headers is cut off as surely as one trickling
  its body, and an attempt never outlasts its first window without the bytes it needs.
- A failed attempt (refused, silent, too slow, dropped mid-answer, HTTP 408/429/5xx) is retried
  after a backoff wait, up to ``retries`` times in a row (:class:`Retries`). Only a transfer that
  resumes (a range read, a download) may restart the count, and only after an attempt that
  delivered at least one window's bytes: a flaky link that makes progress keeps going, a server
  that sends one byte and drops does not.
- Answers read whole (model info, a shard index, manifest.json) are inflated here, at most
  :data:`PIECE_BYTES` per step, and refused past a cap (:func:`read_capped`): a compression bomb
  costs at most the cap, however far it would inflate.
- The policy is read from the environment for every transfer (``FLUX_GGUF_HUB_TIMEOUT``,
  ``FLUX_GGUF_HUB_RETRIES``, ``FLUX_GGUF_HUB_MIN_RATE``); a bad value is one :class:`SettingError`.
"""
from __future__ import annotations

import contextlib
import math
import os
import threading
import time
import zlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Iterator

from converter.errors import HubAnswerError, HubStalledError, SettingError

if TYPE_CHECKING:
    import httpx2 as httpx

TIMEOUT_ENV, RETRIES_ENV, MIN_RATE_ENV = "FLUX_GGUF_HUB_TIMEOUT", "FLUX_GGUF_HUB_RETRIES", "FLUX_GGUF_HUB_MIN_RATE"
DEFAULT_TIMEOUT_S = 15.0
DEFAULT_RETRIES = 5  # six attempts in all
DEFAULT_MIN_RATE = 10_000  # bytes per second: fewer than 150 kB in a 15 s window is a stall
RETRY_STATUSES = frozenset({408, 429, 500, 502, 503, 504})
PIECE_BYTES = 1 << 20  # the most one inflate step may produce
ERROR_BODY_BYTES = 64 << 10  # what is read of an error answer's body, for its message


# ---- the policy -------------------------------------------------------------------------------
@dataclass(frozen=True)
class NetPolicy:
    timeout: float = DEFAULT_TIMEOUT_S
    retries: int = DEFAULT_RETRIES
    min_rate: int = DEFAULT_MIN_RATE

    @property
    def window_bytes(self) -> int:
        """What each ``timeout``-second window of an answer must bring (at least one byte)."""
        return max(1, math.ceil(self.min_rate * self.timeout))

    def backoff(self, failures: int) -> float:
        """The wait after the ``failures``-th failed attempt in a row: 1, 2, 4, ... s, at most ``timeout``."""
        return min(2.0 ** (failures - 1), self.timeout)

    def worst_case_s(self) -> float:
        """The longest one request can take against a Hub that is silent or slower than ``min_rate``
        (DNS lookups aside): every attempt ends within its first window, connecting included."""
        return (self.retries + 1) * self.timeout + sum(self.backoff(k) for k in range(1, self.retries + 1))

    def describe(self) -> str:
        return (f"{TIMEOUT_ENV}={self.timeout:g} s, {MIN_RATE_ENV}={self.min_rate} bytes/s, "
                f"{RETRIES_ENV}={self.retries}")


def net_policy() -> NetPolicy:
    """The policy the environment sets now (defaults where a variable is unset or empty)."""
    return NetPolicy(timeout=_setting(TIMEOUT_ENV, DEFAULT_TIMEOUT_S, float, 0.01, 3600.0, "seconds"),
                     retries=_setting(RETRIES_ENV, DEFAULT_RETRIES, int, 0, 100, "retries"),
                     min_rate=_setting(MIN_RATE_ENV, DEFAULT_MIN_RATE, int, 0, 10**10, "bytes per second"))


def _setting(name: str, default: Any, kind: type, low: Any, high: Any, unit: str) -> Any:
    text = os.environ.get(name, "").strip()
    if not text:
        return default
    try:
        value = kind(text)
    except ValueError:
        value = None
    if value is None or not low <= value <= high:  # NaN fails the comparison too
        what = "a whole number" if kind is int else "a number"
        raise SettingError(f"{name}={text!r}: expected {what} of {unit} from {low} to {high} (default {default})")
    return value


# ---- one attempt ------------------------------------------------------------------------------
class _Stalled(Exception):
    """An attempt's window ended without the bytes it needed."""


class _Truncated(Exception):
    """A compressed body ended before its compressed stream did."""


class Attempt:
    """The window rule for one request attempt; ``received`` counts body bytes as sent."""

    def __init__(self, policy: NetPolicy) -> None:
        self.policy = policy
        self.answered = False  # the status line and headers arrived
        self.received = 0
        self._window_end = time.monotonic() + policy.timeout
        self._window_got = 0

    def remaining(self) -> float:
        """Seconds left in the current window; past its end, the attempt has stalled."""
        left = self._window_end - time.monotonic()
        if left <= 0:
            raise _Stalled()
        return left

    def landed(self, n: int) -> None:
        self.received += n
        self._window_got += n
        if self._window_got >= self.policy.window_bytes:  # this window is met: the next one starts
            self._window_end = time.monotonic() + self.policy.timeout
            self._window_got = 0
        elif time.monotonic() > self._window_end:  # a stream whose reads were not bounded (see _trace)
            raise _Stalled()

    def stall_reason(self) -> str:
        t = self.policy.timeout
        if not self.answered:
            return f"no answer within {t:g} s"
        return f"fewer than {self.policy.window_bytes} bytes in {t:g} s"


_local = threading.local()  # .attempt: the attempt this thread's request runs under


def _trace(event: str, info: dict[str, Any]) -> None:
    """httpcore's trace hook: bound the reads of every stream a request of ours opens, and the
    connection set-up by the window too (a redirect to a CDN opens a second connection)."""
    if event.endswith((".connect_tcp.complete", ".start_tls.complete")):
        stream = info.get("return_value")
        if stream is not None:
            _bound_reads(stream)
    elif event.endswith((".connect_tcp.started", ".start_tls.started")):
        attempt = getattr(_local, "attempt", None)
        if attempt is not None:
            left = attempt.remaining()  # nothing is begun once the window is over
            # httpcore hands over the very keywords of the call; where it did not, the call keeps
            # the client's own timeout (``timeout``), which still bounds it.
            if isinstance(info.get("timeout"), (int, float)):
                info["timeout"] = min(info["timeout"], left)


def _bound_reads(stream: Any) -> None:
    """Each read of ``stream`` waits no longer than the current attempt's window has left. The
    stream may serve later requests (keep-alive); each read asks its own thread's attempt."""
    read = stream.read
    if getattr(read, "bounded_by_attempt", False):
        return

    def bounded(max_bytes: int, timeout: float | None = None) -> bytes:
        attempt = getattr(_local, "attempt", None)
        if attempt is not None:
            left = attempt.remaining()
            timeout = left if timeout is None else min(timeout, left)
        return read(max_bytes, timeout)

    bounded.bounded_by_attempt = True  # type: ignore[attr-defined]
    stream.read = bounded


@contextlib.contextmanager
def _running(attempt: Attempt) -> Iterator[None]:
    previous = getattr(_local, "attempt", None)
    _local.attempt = attempt
    try:
        yield
    finally:
        _local.attempt = previous


def _add_trace(request: "httpx.Request") -> None:
    request.extensions.setdefault("trace", _trace)


def within_one_window(call: Callable[[], Any]) -> Any:
    """``call()``, any request it makes on huggingface_hub's shared client bounded by one window
    in all. For ``build_hf_headers``: once a process it fetches the Hub's agent registry with
    only a per-read timeout, which a trickling server would hold forever (its own errors are
    swallowed there, so a stall only leaves the registry empty)."""
    from huggingface_hub.utils import get_session

    session = get_session()
    hooks = session.event_hooks
    if _add_trace not in hooks["request"]:  # the client is shared: add, never replace
        session.event_hooks = {**hooks, "request": [*hooks["request"], _add_trace]}
    with _running(Attempt(net_policy())):
        return call()


@contextlib.contextmanager
def hub_request(method: str, url: str, *, headers: dict[str, str], attempt: Attempt,
                params: dict[str, str] | None = None, accept: tuple[int, ...] = ()) -> Iterator["httpx.Response"]:
    """One attempt of a streamed request through huggingface_hub's shared client, under ``attempt``.

    An error status (400 and up, other than those in ``accept``) is raised as huggingface_hub's
    error (so callers translate it as ever), after reading at most :data:`ERROR_BODY_BYTES` of it.
    """
    from huggingface_hub.utils import get_session, httpx

    with _running(attempt), get_session().stream(method, url, headers=headers, params=params, follow_redirects=True,
                                                 timeout=httpx.Timeout(attempt.policy.timeout),
                                                 extensions={"trace": _trace}) as response:
        attempt.answered = True
        if response.status_code >= 400 and response.status_code not in accept:
            _raise_for_status(response, attempt)
        yield response


def _raise_for_status(response: "httpx.Response", attempt: Attempt) -> None:
    from huggingface_hub.utils import hf_raise_for_status, httpx

    body = bytearray()
    with contextlib.suppress(Exception):  # a broken error body: the status says enough
        for piece in decoded_pieces(response, attempt, str(response.url)):
            body += piece[:ERROR_BODY_BYTES - len(body)]
            if len(body) >= ERROR_BODY_BYTES:
                break
    framing = ("content-encoding", "content-length", "transfer-encoding")  # describe the wire, not `body`
    kept = [(k, v) for k, v in response.headers.multi_items() if k.lower() not in framing]
    hf_raise_for_status(httpx.Response(response.status_code, headers=kept, content=bytes(body),
                                       request=response.request))


def body_pieces(response: "httpx.Response", attempt: Attempt | None = None) -> Iterator[bytes]:
    """The body as sent, piece by piece as it arrives, each counted against the attempt's windows."""
    attempt = attempt or _local.attempt
    for chunk in response.iter_raw():
        attempt.landed(len(chunk))
        yield chunk


def decoded_pieces(response: "httpx.Response", attempt: Attempt | None = None, what: str = "") -> Iterator[bytes]:
    """The body decoded (gzip or deflate, whatever was asked for), in pieces of at most
    :data:`PIECE_BYTES`: one compressed piece never inflates into more than that at once."""
    raw = body_pieces(response, attempt)
    encoding = response.headers.get("Content-Encoding", "").strip().lower()
    if encoding in ("", "identity"):
        yield from raw
        return
    if encoding not in ("gzip", "x-gzip", "deflate"):
        raise HubAnswerError(f"{what}: the Hub sent the answer in Content-Encoding {encoding!r}, which flux-gguf "
                             "does not decode (expected gzip or none)")
    inflater = zlib.decompressobj(zlib.MAX_WBITS | 32)  # a gzip or a zlib header
    try:
        for chunk in raw:
            pending = chunk
            while not inflater.eof:
                out = inflater.decompress(pending, PIECE_BYTES)
                pending = inflater.unconsumed_tail
                if out:
                    yield out
                if not pending and len(out) < PIECE_BYTES:  # all in, nothing left to drain
                    break
            if inflater.eof:
                return
    except zlib.error as e:
        raise HubAnswerError(f"{what}: the Hub's {encoding} answer does not decode ({e})") from None
    raise _Truncated()


@dataclass(frozen=True)
class ItemLimit:
    """At most ``most`` occurrences of ``marker`` in an answer, counted as it arrives (the files of a
    model info: ``"rfilename"``), so a long list is refused before it is parsed; ``refusal`` says so."""

    marker: bytes
    most: int
    refusal: str


def read_capped(response: "httpx.Response", attempt: Attempt, cap: int, what: str,
                items: ItemLimit | None = None) -> bytes:
    """The whole decoded body, refused once it passes ``cap`` bytes or ``items`` (before anything more is read)."""
    def too_large(detail: str) -> HubAnswerError:
        return HubAnswerError(f"{what}: the Hub's answer is larger than {cap} bytes{detail}, the most flux-gguf "
                              "reads for it; refused")

    declared = response.headers.get("Content-Length", "")
    identity = response.headers.get("Content-Encoding", "identity").strip().lower() in ("", "identity")
    if identity and declared.isdigit() and int(declared) > cap:
        raise too_large(f" (Content-Length {declared})")
    out = bytearray()
    counted = 0
    for piece in decoded_pieces(response, attempt, what):
        if len(out) + len(piece) > cap:
            raise too_large("" if identity else " once decompressed")
        scan_from = max(0, len(out) - len(items.marker) + 1) if items else 0  # a marker may straddle pieces
        out += piece
        if items is not None:
            counted += out.count(items.marker, scan_from)
            if counted > items.most:
                raise HubAnswerError(f"{what}: {items.refusal}")
    return bytes(out)


# ---- retries ----------------------------------------------------------------------------------
def causes(exc: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def response_of(exc: BaseException) -> Any:
    """The HTTP response an error (or one of its causes) carries, if any."""
    for e in causes(exc):
        response = getattr(e, "response", None)
        if response is not None and getattr(response, "status_code", None):
            return response
    return None


def transient(exc: BaseException) -> bool:
    """A failure another attempt may not meet: the network, a timeout, HTTP 408/429/5xx."""
    from huggingface_hub.utils import httpx

    if isinstance(exc, (_Stalled, _Truncated, ConnectionError, TimeoutError, httpx.TransportError)):
        return True
    response = response_of(exc)
    return response is not None and response.status_code in RETRY_STATUSES


def _reason(exc: BaseException, attempt: Attempt) -> str:
    from huggingface_hub.utils import httpx

    t = attempt.policy.timeout
    response = response_of(exc)
    if response is not None:
        return f"the Hub answered HTTP {response.status_code}"
    if isinstance(exc, (_Stalled, httpx.ReadTimeout)):  # a read waits at most what the window has left
        return attempt.stall_reason()
    if isinstance(exc, httpx.ConnectTimeout):
        return f"no connection within {t:g} s"
    if isinstance(exc, httpx.ConnectError):
        return f"could not connect ({exc})"
    if isinstance(exc, httpx.TimeoutException):  # writing the request, or waiting for a pooled connection
        return f"no progress for {t:g} s"
    return f"lost the connection mid-answer ({type(exc).__name__})"


def _retry_after(exc: BaseException) -> float | None:
    response = response_of(exc)
    text = response.headers.get("Retry-After", "") if response is not None else ""
    return float(text) if text.strip().isdigit() else None


class Retries:
    """The failed attempts of one transfer, in a row, and the waits between them.

    ``what`` starts the message when the attempts are spent (naming the file or the request) and
    ``then`` ends it (what the user can do).
    """

    def __init__(self, what: str, then: str = "re-run later", policy: NetPolicy | None = None) -> None:
        self.policy = policy or net_policy()
        self.what, self.then = what, then
        self.failures = 0
        self.failed = False  # the last block of :meth:`trying` ended in a retryable failure

    def attempt(self) -> Attempt:
        return Attempt(self.policy)

    def again(self, exc: BaseException, attempt: Attempt, progressed: int = 0) -> bool:
        """After a failed attempt: True once the backoff wait is over, so the caller tries again;
        False when ``exc`` is no network failure (the caller re-raises it). Raises
        :class:`HubStalledError` when the attempts are spent. ``progressed``: the bytes this
        attempt added to a transfer that resumes; a window's worth restarts the count."""
        if not transient(exc):
            return False
        if progressed >= self.policy.window_bytes:
            self.failures = 0
        self.failures += 1
        if self.failures > self.policy.retries:
            reason = _reason(exc, attempt)
            raise HubStalledError(f"{self.what}: {reason}; {self.failures} attempts in a row failed "
                                  f"({self.policy.describe()}); {self.then}",
                                  attempts=self.failures, reason=reason) from exc
        wait = self.policy.backoff(self.failures)
        asked = _retry_after(exc)
        if asked is not None:
            wait = min(max(wait, asked), self.policy.timeout)
        time.sleep(wait)
        return True

    @contextlib.contextmanager
    def trying(self, progress: Callable[[], int] = lambda: 0) -> Iterator[Attempt]:
        """One attempt as a block: a network failure inside it is swallowed once the backoff wait
        is over, and :attr:`failed` tells the caller to loop (``progress()``: the transfer's
        position, for :meth:`again`); any other error, or the last failure, propagates."""
        attempt = self.attempt()
        start = progress()
        self.failed = False
        try:
            yield attempt
        except Exception as e:
            if not self.again(e, attempt, progress() - start):
                raise
            self.failed = True


def fetch_whole(url: str, *, headers: dict[str, str], what: str, cap: int, params: dict[str, str] | None = None,
                compressed: bool = False, items: ItemLimit | None = None) -> bytes:
    """GET a small answer whole (at most ``cap`` bytes decoded), retried under the policy.
    ``compressed``: ask for gzip (API answers); files are asked for as they are."""
    headers = {**headers, "Accept-Encoding": "gzip" if compressed else "identity"}
    retries = Retries(what)
    while True:
        attempt = retries.attempt()
        try:
            with hub_request("GET", url, headers=headers, params=params, attempt=attempt) as response:
                return read_capped(response, attempt, cap, what, items)
        except Exception as e:
            if not retries.again(e, attempt):
                raise
