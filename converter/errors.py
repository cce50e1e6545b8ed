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


class OutputError(FluxGGUFError):
    """The output cannot be written (unwritable directory, disk full, interrupted)."""


class ReleaseError(FluxGGUFError):
    """A release spec or release folder is invalid."""


class LoraError(FluxGGUFError):
    """A LoRA file cannot be read, normalized or applied."""


class HubError(FluxGGUFError):
    """The Hub refused or failed a request."""


class ValidationError(FluxGGUFError):
    """validate/bench cannot run on the given inputs."""
