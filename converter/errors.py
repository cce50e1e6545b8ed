"""Every exception the converter raises. The CLI turns each into one line and a non-zero exit.

Messages name the file, tensor or key and say what was expected.
"""
from __future__ import annotations


class FluxGGUFError(Exception):
    """Base class for errors meant for the user (the CLI prints ``Error: <message>``)."""


class SourceError(FluxGGUFError):
    """A source checkpoint cannot be read (not safetensors, truncated, header lies, bad dtype)."""


class ModelDetectionError(FluxGGUFError):
    """The source is not a FLUX.1 transformer, or is missing tensors."""


class PlanError(FluxGGUFError):
    """A recipe, variant or override cannot be applied."""


class SensitivityError(PlanError):
    """A sensitivity file is unreadable, malformed, or does not describe the source it is used with."""

    def __init__(self, message: str, path: str | None = None) -> None:
        super().__init__(message)
        self.path = path


class TargetRangeError(PlanError):
    """A size or bits-per-weight budget outside what the source can reach; ``low``/``high`` in the
    budget's unit (bytes, or bits per weight)."""

    def __init__(self, message: str, low: float, high: float) -> None:
        super().__init__(message)
        self.low = low
        self.high = high


class OutputError(FluxGGUFError):
    """The output cannot be written (unwritable directory, disk full, interrupted)."""


class SettingError(FluxGGUFError):
    """An environment variable of ours has a value we do not accept (e.g. FLUX_GGUF_DIRECT_IO)."""


class ReleaseError(FluxGGUFError):
    """A release spec or release folder is invalid."""


class LoraError(FluxGGUFError):
    """A LoRA file cannot be read, normalized or applied."""


class HubError(FluxGGUFError):
    """The Hub refused or failed a request."""


class ValidationError(FluxGGUFError):
    """validate/bench cannot run on the given inputs."""


class ImatrixError(FluxGGUFError):
    """An importance matrix cannot be read, written, merged or used for this model."""


class CalibrationError(ImatrixError):
    """imatrix collection cannot run on the given inputs, or left a quantized weight without an entry."""


# Hub failures, by what the user can do about them (converter/hub.py raises these).
class HubAuthError(HubError):
    """No token was found, or the Hub rejected it (HTTP 401)."""


class HubPermissionError(HubError):
    """The token may not write to that repo: someone else's namespace, or a read-only token (HTTP 403)."""


class HubNotFoundError(HubError):
    """The repo, revision or file does not exist, or is private and invisible to the token (HTTP 404)."""


class HubRateLimitError(HubError):
    """The Hub kept answering HTTP 429 after the client's own retries."""


class HubConnectionError(HubError):
    """The network went away mid-transfer; what already landed is kept, so a re-run resumes."""


class HubStalledError(HubConnectionError):
    """Every attempt a request was allowed failed: refused, silent, too slow, dropped, or HTTP 408/429/5xx."""

    def __init__(self, message: str, *, attempts: int, reason: str) -> None:
        super().__init__(message)
        self.attempts, self.reason = attempts, reason


class HubAnswerError(HubError):
    """The Hub's answer cannot be used: larger than flux-gguf accepts, badly encoded, or not the JSON expected."""


class HubFileTooLargeError(HubError):
    """A release file exceeds what the Hub accepts in one file; refused before anything is sent."""


class HubVerificationError(HubError):
    """The Hub's copy (metadata or downloaded bytes) does not match the release manifest."""
