#!/usr/bin/env python
"""Write a synthetic FLUX.1 checkpoint (real names, shapes and dtypes; made-up weights).

Examples:

    python scripts/make_synthetic_flux.py -o tiny.safetensors --double-blocks 1 --single-blocks 1 --hidden 256
    python scripts/make_synthetic_flux.py -o flux-synthetic.safetensors          # full size, 23.8 GB BF16
    python scripts/make_synthetic_flux.py -o tiny-diffusers --layout diffusers --hidden 256 \\
        --double-blocks 1 --single-blocks 1 --dtype F8_E4M3
    python scripts/make_synthetic_flux.py -o structured.safetensors --double-blocks 1 --single-blocks 1 --structured
"""
from __future__ import annotations

import pathlib
import time

import click
from tqdm import tqdm

from converter.errors import FluxGGUFError
from converter.layout import (
    DOUBLE_BLOCKS,
    HIDDEN,
    IMG_IN_CHANNELS,
    SINGLE_BLOCKS,
    FluxGeometry,
)
from converter.safetensors_io import DTYPE_SIZES
from converter.synthetic import LAYOUTS, synthetic_nbytes, write_synthetic_flux

FAMILIES = ("dev", "schnell", "fill", "depth", "canny")


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-o", "--output", required=True, type=click.Path(path_type=pathlib.Path),
              help="File to write (bfl, comfyui) or folder (diffusers).")
@click.option("--double-blocks", default=DOUBLE_BLOCKS, show_default=True, type=click.IntRange(min=0))
@click.option("--single-blocks", default=SINGLE_BLOCKS, show_default=True, type=click.IntRange(min=0))
@click.option("--hidden", default=HIDDEN, show_default=True, type=click.IntRange(min=128),
              help="Hidden size, a multiple of 128 (the attention head width).")
@click.option("--family", default="dev", show_default=True, type=click.Choice(FAMILIES),
              help="dev/Kontext (same shapes), schnell (no guidance_in), fill (img_in 384), depth/canny (128).")
@click.option("--dtype", default="BF16", show_default=True, type=click.Choice(list(DTYPE_SIZES)))
@click.option("--layout", default="bfl", show_default=True, type=click.Choice(LAYOUTS))
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--std", default=0.02, show_default=True, type=click.FloatRange(min=0, min_open=True),
              help="Standard deviation of the weights.")
@click.option("--structured", is_flag=True,
              help="Trained-model activation structure: log-normal adaLN scales, 5 outlier text channels "
                   "(for imatrix experiments; see converter/synthetic.py).")
@click.option("--shard-gb", default=10.0, show_default=True, type=click.FloatRange(min=0, min_open=True),
              help="Largest diffusers shard, in GB (10^9 bytes).")
def main(output: pathlib.Path, double_blocks: int, single_blocks: int, hidden: int, family: str, dtype: str,
         layout: str, seed: int, std: float, structured: bool, shard_gb: float) -> None:
    """Write a synthetic FLUX.1 checkpoint to OUTPUT, streamed one chunk at a time."""
    if hidden % 128:
        raise click.BadParameter(f"{hidden} is not a multiple of 128", param_hint="--hidden")
    geometry = FluxGeometry(double_blocks=double_blocks, single_blocks=single_blocks, hidden=hidden,
                            img_in_channels=IMG_IN_CHANNELS[family], guidance=family != "schnell")
    total = synthetic_nbytes(geometry, dtype)
    start = time.perf_counter()
    with tqdm(total=total, unit="B", unit_scale=True, desc=output.name) as bar:
        try:
            path = write_synthetic_flux(output, geometry, dtype=dtype, layout=layout, seed=seed, std=std,
                                        shard_bytes=int(shard_gb * 1e9), progress=bar.update,
                                        structured=structured)
        except FluxGGUFError as e:
            raise click.ClickException(str(e)) from None
    seconds = time.perf_counter() - start
    click.echo(f"wrote {path}: {total / 1e9:.3f} GB of tensors in {seconds:.1f} s "
               f"({total / 1e9 / max(seconds, 1e-9):.2f} GB/s)")


if __name__ == "__main__":
    main()
