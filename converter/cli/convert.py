"""``flux-gguf convert``: plan (``--dry-run``) or write one GGUF file per variant."""
from __future__ import annotations

import json
import pathlib
import time
from typing import Sequence

import click
import numba

from converter.lora.merge import build_merger, merged_lora_metadata, parse_lora_option
from converter.pipeline import convert as run_convert
from converter.pipeline import plan_source
from converter.recipes import parse_override, resolve_variant
from converter.sources import open_source
from manifests.hashing import hash_file

from .output import describe_artifacts, describe_plans, prepare_kernels, progress_bar


def split_variants(values: Sequence[str]) -> list[str]:
    """``--variant Q4_K_M --variant Q8_0`` and ``--variant Q4_K_M,Q8_0`` both work."""
    return [v.strip() for value in values for v in value.split(",") if v.strip()]



@click.command("convert")
@click.argument("src", type=click.Path(path_type=pathlib.Path))
@click.option("-o", "--out-dir", type=click.Path(path_type=pathlib.Path), required=True,
              help="Folder for the GGUF files (created if missing).")
@click.option("--variant", "variants", multiple=True, required=True, metavar="VARIANT",
              help="Q2_K, Q3_K_S/M/L, Q4_K_S/M, Q5_K_S/M, Q6_K, Q8_0, F16 or BF16; repeat for several files "
                   "written in one pass.")
@click.option("--name", default=None, help="File name stem: NAME-VARIANT.gguf (default: the source's stem).")
@click.option("--override", "overrides", multiple=True, metavar="REGEX=TYPE",
              help="Give tensors whose BFL name matches REGEX the type TYPE; first match wins; repeatable.")
@click.option("--lora", "loras", multiple=True, metavar="PATH[:STRENGTH]",
              help="Merge this LoRA (any FLUX format) into the weights before quantizing, at STRENGTH "
                   "(default 1); repeatable, LoRAs stack.")
@click.option("--threads", type=click.IntRange(1, numba.config.NUMBA_NUM_THREADS), default=None,
              help="Threads for the quantization kernels (default: all cores).")
@click.option("--dry-run", is_flag=True, help="Print the plan (types, exact sizes) without writing anything.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON on stdout.")
def convert(src: pathlib.Path, out_dir: pathlib.Path, variants: tuple[str, ...], name: str | None,
            overrides: tuple[str, ...], loras: tuple[str, ...], threads: int | None, dry_run: bool,
            as_json: bool) -> None:
    """Convert a FLUX.1 safetensors checkpoint (file or diffusers folder) into GGUF files.

    \b
    Example:
      flux-gguf convert flux1-kontext-dev.safetensors -o out --variant Q4_K_M --variant Q8_0
      flux-gguf convert flux1-kontext-dev.safetensors -o out --variant Q4_K_S \\
          --override 'double_blocks\\.[0-3]\\.=Q5_K' --dry-run
      flux-gguf convert flux1-kontext-dev.safetensors -o out --variant Q4_K_M \\
          --lora Hyper-FLUX.1-dev-8steps-lora.safetensors:0.125
    """
    names = split_variants(variants)
    for v in names:  # reject bad arguments before opening the source
        resolve_variant(v)
    for o in overrides:
        parse_override(o)
    lora_specs = [parse_lora_option(text) for text in loras]
    transform, extra = None, {}
    if lora_specs:  # validated against the source before any weight is read
        with open_source(src) as source:
            shapes = {n: tuple(t.shape) for n, t in source.tensors.items()}
        transform = build_merger(lora_specs, shapes)
        extra = merged_lora_metadata([(s.label, hash_file(s.path).sha256, s.strength, lora.format)
                                      for s, (lora, _) in zip(lora_specs, transform.loras)])
    if dry_run:
        with open_source(src) as source:
            plans = plan_source(source, names, name=name, overrides=overrides, extra_metadata=extra)
            layout = source.layout
        if as_json:
            click.echo(json.dumps({"source": str(src), "layout": layout, "family": plans[0].family,
                                   "plans": [p.to_dict() for p in plans]}, indent=2))
        else:
            click.echo(f"{src} ({layout} layout, {plans[0].family}): {len(plans[0].entries)} tensors, "
                       f"{plans[0].n_params:,} parameters")
            click.echo(describe_plans(plans, out_dir))
            for spec in lora_specs:
                click.echo(f"LoRA {spec.label} ({spec.path}) merged at strength {spec.strength:g} before quantizing")
        return
    start = time.perf_counter()
    with progress_bar("converting") as progress:
        records = run_convert(src, out_dir, names, name=name, overrides=overrides, threads=threads,
                              progress=progress, before_quantize=prepare_kernels, tensor_transform=transform, extra_metadata=extra)
    if as_json:
        click.echo(json.dumps({"artifacts": [r.to_dict() for r in records]}, indent=2))
    else:
        click.echo(describe_artifacts(records))
        click.echo(f"done in {time.perf_counter() - start:.1f} s")
