"""The Hub client every module of this package shares: one HfApi, errors translated, streamed reads.

Why this shape:
- All Hub access goes through ``huggingface_hub``'s public API (``HfApi``, ``get_token``,
  ``build_hf_headers``, its shared HTTP client), so auth lookup and Xet/LFS choice are the
  client's. The requests flux-gguf makes itself (model info, files read whole, downloads, range
  reads) run under one deadline and retry policy with capped answers (:mod:`.network`). The
  endpoint is read when a client is made (:func:`hub_api`), not when ``huggingface_hub`` is
  imported, so callers and tests may point it anywhere at any time.
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
import json
import os
from typing import TYPE_CHECKING, Any, Callable, Iterator
from urllib.parse import quote

from converter import __version__
from converter.errors import (
    FluxGGUFError,
    HubAnswerError,
    HubAuthError,
    HubConnectionError,
    HubError,
    HubNotFoundError,
    HubPermissionError,
    HubRateLimitError,
)

from .network import Attempt, ItemLimit, decoded_pieces, fetch_whole, hub_request, net_policy, within_one_window
from .network import causes as _causes

if TYPE_CHECKING:
    from huggingface_hub import HfApi, ModelInfo

GB = 1000**3
LFS_MAX_FILE_BYTES = 50 * GB  # historical hard limit per file, still what plain Git LFS uploads get
XET_MAX_FILE_BYTES = 200 * GB  # the Hub's recommended per-file ceiling with Xet storage
HUB_MANAGED_FILES = frozenset({".gitattributes"})  # the Hub writes these itself
_CHUNK = 8 << 20
# Answers read whole, decoded: a FLUX repo's model info is kilobytes (a repo of thousands of files,
# a few MB), a diffusers index ~100 kB, a release's manifest.json ~200 kB per variant; regular
# (non-LFS) files on the Hub are at most 10 MB.
MODEL_INFO_MAX_BYTES = 16 << 20
MAX_SIBLINGS = 50_000
SMALL_FILE_MAX_BYTES = 16 << 20

Progress = Callable[[int, int], None]
"""``progress(bytes_just_done, total_bytes)``, the same shape ``manifests.verify_release`` uses."""


# ---- client and errors ------------------------------------------------------------------------
def hub_api(endpoint: str | None = None, token: str | None = None) -> "HfApi":
    """An ``HfApi`` for ``endpoint`` (else ``HF_ENDPOINT`` as set *now*, else the client's default).

    ``token=None`` leaves the lookup to huggingface_hub (``HF_TOKEN``, then the ``hf auth login`` file).
    """
    from huggingface_hub import HfApi, constants, get_token

    _check_token_text(token if token is not None else get_token())
    net_policy()  # a bad FLUX_GGUF_HUB_* value is refused before anything is sent
    endpoint = endpoint or os.environ.get("HF_ENDPOINT") or constants.ENDPOINT
    return HfApi(endpoint=endpoint.rstrip("/"), token=token, library_name="flux-gguf", library_version=__version__)


def _check_token_text(token: str | None) -> None:
    """A token HTTP headers cannot carry (non-ASCII, spaces, control characters) is refused up front,
    in one line that never shows the token (the HTTP client's own error quoted part of it)."""
    if token and not all(33 <= ord(ch) < 127 for ch in token):
        raise HubAuthError("the Hugging Face token (HF_TOKEN or the `hf auth login` file) holds non-ASCII, space or "
                           "control characters, which an HTTP header cannot carry: set it to the token exactly as "
                           "the Hub shows it")


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


def _translate(exc: BaseException, action: str, repo_id: str, revision: str | None, endpoint: str) -> HubError | None:
    """One clear line for what huggingface_hub raised, by what the user can do about it."""
    from huggingface_hub.errors import (
        HfHubHTTPError,
        RemoteEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )
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


def _headers(api: "HfApi") -> dict[str, str]:
    from huggingface_hub.utils import build_hf_headers

    return within_one_window(lambda: build_hf_headers(token=api.token, library_name="flux-gguf",
                                                      library_version=__version__))


def fetch_model_info(api: "HfApi", repo_id: str, revision: str | None, what: str) -> "ModelInfo":
    """``model_info(files_metadata=True)``, fetched here so the policy and a cap apply: the client
    would read and decode any answer whole. ``what`` names the request in errors."""
    from huggingface_hub import ModelInfo

    url = f"{api.endpoint}/api/models/{repo_id}"
    if revision is not None:
        url += f"/revision/{quote(revision, safe='')}"
    files = ItemLimit(b'"rfilename"', MAX_SIBLINGS,  # each file's key: an upper bound, counted as bytes arrive
                      f"the Hub lists more than {MAX_SIBLINGS} files in {repo_id}, the most flux-gguf reads; refused")
    data = fetch_whole(url, headers=_headers(api), params={"blobs": "true"}, what=what, cap=MODEL_INFO_MAX_BYTES,
                       compressed=True, items=files)
    try:
        info = ModelInfo(**json.loads(data))
    except (ValueError, RecursionError, TypeError, KeyError, AttributeError) as e:
        raise HubAnswerError(f"{what}: the Hub's model info for {repo_id} is not the JSON expected "
                             f"({type(e).__name__})") from None
    if not isinstance(info.sha, str) or not info.sha:
        raise HubAnswerError(f"{what}: the Hub's model info for {repo_id} names no commit")
    return info


@contextlib.contextmanager
def _open_remote(api: "HfApi", repo_id: str, commit: str, path: str, start: int, attempt: Attempt) -> Iterator[Any]:
    """One attempt (see :class:`.network.Retries`) of a streamed GET of one file at one commit
    (``Range`` from ``start``), errors raised as huggingface_hub's.

    With ``start``, an HTTP 416 (range not satisfiable: the file is not longer than ``start``) is
    yielded, not raised, so the caller can start over from 0.
    """
    # Built here, not with hf_hub_url: that one starts from the endpoint read at import time.
    url = f"{api.endpoint}/{repo_id}/resolve/{quote(commit, safe='')}/{quote(path)}"
    headers = _headers(api)
    headers["Accept-Encoding"] = "identity"  # the bytes hashed must be the file's bytes
    if start:
        headers["Range"] = f"bytes={start}-"
    with hub_request("GET", url, headers=headers, attempt=attempt, accept=(416,) if start else ()) as response:
        yield response


def _chunks(response: Any) -> Iterator[bytes]:
    """The body as sent (the file itself), decoded only if the server encoded it anyway despite
    ``Accept-Encoding: identity``; counted against the deadlines of the attempt it arrives in."""
    return decoded_pieces(response, what=str(response.url))


def _fetch_bytes(api: "HfApi", repo_id: str, commit: str, path: str) -> bytes:
    """A small file (manifest.json, SHA256SUMS, model.sig, a README), read whole and capped."""
    url = f"{api.endpoint}/{repo_id}/resolve/{quote(commit, safe='')}/{quote(path)}"
    with _hub_errors(api, f"downloading {path}", repo_id, commit):
        return fetch_whole(url, headers=_headers(api), what=f"{repo_id}@{commit[:12]}/{path}", cap=SMALL_FILE_MAX_BYTES)
