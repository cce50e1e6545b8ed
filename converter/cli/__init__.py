"""The ``flux-gguf`` command: a click group; every command lives in its own module.

Adding a command is one line in COMMANDS. Commands raise the library's exceptions; the group
turns every FluxGGUFError / QuantError into ``Error: <one line>`` and exit status 1.
"""
from __future__ import annotations

import importlib
from typing import Any

import click

from quant_kernels.errors import QuantError

from . import __version__
from .errors import FluxGGUFError

# "module:attribute" of a click.Command, in the order `flux-gguf --help` lists them.
COMMANDS = (
    "converter.cli_convert:convert",
    "converter.cli_inspect:inspect",
    "converter.cli_example:example",
    "converter.cli_release:release",
    "converter.cli_verify:verify",
    "converter.cli_hub:upload",
    "converter.cli_hub:download",
    "converter.cli_validate:validate",
    "converter.cli_validate:bench",
)


def one_line(message: object) -> str:
    """Collapse a (possibly multi-line) message into one line for ``Error: ...``."""
    return " ".join(part.strip() for part in str(message).splitlines() if part.strip())


class FluxGroup(click.Group):
    """A click group that maps our exceptions to ClickException (one line, exit 1)."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (FluxGGUFError, QuantError) as e:
            raise click.ClickException(one_line(e)) from e


@click.group(cls=FluxGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="flux-gguf")
def main() -> None:
    """Convert FLUX.1 (Kontext) safetensors checkpoints into quantized GGUF files.

    \b
    Example:
      flux-gguf convert flux1-kontext-dev.safetensors -o out --variant Q4_K_M --variant Q8_0
    """


for _spec in COMMANDS:
    _module, _attr = _spec.split(":")
    main.add_command(getattr(importlib.import_module(_module), _attr))
