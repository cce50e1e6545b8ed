"""The ``flux-gguf`` command: a click group; every command lives in its own module of this package.

Adding a command is one line in COMMANDS. Commands raise the library's exceptions; the group
turns every one of them into ``Error: <one line>`` and exit status 1. ``output`` holds what the
commands share: progress bars, result tables, the one-line error.

The top layer: may import every other part of flux-gguf; nothing imports it.
"""
from __future__ import annotations

import importlib
import os
import sys
from typing import Any

# The command owns its process: its kernels may use 512-bit vectors where the CPU has AVX-512
# (quant_kernels._vector_width; 1.45-1.58x on the Q4_K search, same bytes). Only when the kernels
# are not loaded yet (a library user who imported them first keeps numba's default), and
# FLUX_GGUF_VECTOR_WIDTH=256 keeps 256-bit vectors.
if "quant_kernels" not in sys.modules:
    os.environ.setdefault("FLUX_GGUF_VECTOR_WIDTH", "512")

import click

from converter import __version__

from .output import as_click_exception

# "module:attribute" of a click.Command, in the order `flux-gguf --help` lists them.
COMMANDS = (
    "converter.cli.convert:convert",
    "converter.cli.inspect:inspect",
    "converter.cli.example:example",
    "converter.cli.release:release",
    "converter.cli.verify:verify",
    "converter.cli.hub:upload",
    "converter.cli.hub:download",
    "converter.cli.validate:validate",
    "converter.cli.validate:bench",
    "converter.cli.imatrix:imatrix",
    "converter.cli.sensitivity:sensitivity",
    "converter.cli.warmup:warmup",
)


class FluxGroup(click.Group):
    """A click group that maps every exception to ClickException (one line, exit 1); click's own
    usage errors and aborts pass through."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except Exception as e:  # noqa: BLE001 - library errors and the unexpected: one line, exit 1
            err = as_click_exception(e)
            if err is None:
                raise
            raise err from e


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
