"""``flux-gguf warmup``: compile every quantization kernel a conversion or ``verify --source`` can
use, now, with a bar, instead of a few at a time at each first use of a new type or source."""
from __future__ import annotations

import time

import click

import quant_kernels

from .output import compile_kernels, echo_json, printable

# Every width of source code the fused kernels read (32-bit for F32 sources and for verify --source,
# which re-encodes float32; 16-bit for BF16/F16; 8-bit for FP8): one source dtype per width.
SOURCE_WIDTHS = ("F32", "BF16", "F8_E4M3")


def missing_kernels() -> list[str]:
    """The kernels numba's cache does not hold yet, over every quantized type and source width
    (one kernel serves with and without an importance matrix)."""
    return quant_kernels.uncompiled_kernels(quant_kernels.supported_type_names(), sources=list(SOURCE_WIDTHS))


@click.command("warmup")
@click.option("--json", "as_json", is_flag=True, help="Print what was compiled as JSON on stdout.")
def warmup(as_json: bool) -> None:
    """Compile every quantization kernel now (once per install: about 2 minutes on 2 cores).

    Without it, each conversion or `verify --source` compiles the kernels it needs the first time
    it needs them (about 5 s each: a new type, a new source dtype). Afterwards every run loads
    them from numba's cache in milliseconds. A second warmup finds them cached and compiles none.
    Not covered (compiled at their first use, a few seconds each): the LoRA merge product, the
    example's checkpoint generator and the dequantizers `validate` uses.

    \b
    Example:
      flux-gguf warmup
    """
    start = time.perf_counter()
    missing = missing_kernels()
    if missing:
        compile_kernels(missing, leave=True)
    seconds = time.perf_counter() - start
    left = missing_kernels()  # a read-only install cannot cache: say so rather than claim success
    if as_json:
        echo_json({"compiled": missing, "seconds": round(seconds, 3), "still_uncached": left})
        return
    if not missing:
        click.echo("every quantization kernel is already compiled and cached: nothing to do")
    else:
        click.echo(f"compiled {len(missing)} quantization kernels in {seconds:.1f} s; later runs load them from "
                   "numba's cache")
    if left:
        click.echo(f"note: numba could not cache {len(left)} of them (is the install read-only? NUMBA_CACHE_DIR "
                   f"chooses a writable folder): {', '.join(map(printable, left))}")
