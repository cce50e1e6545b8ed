"""``flux-gguf convert``: plan (``--dry-run``) or write one GGUF file per variant.

Also holds the small presentation helpers other commands reuse (progress bar, result tables).
"""
from __future__ import annotations

import contextlib
import json
import pathlib
import time
from typing import Iterator, Sequence

import click
import numba
from tqdm import tqdm

from manifests.hashing import hash_file

from .lora_merge import build_merger, merged_lora_metadata, parse_lora_option
from .pipeline import ProgressFn, convert as run_convert, plan_source
from .recipes import Plan, parse_override, resolve_variant
from .sources import open_source
from .writer import ArtifactRecord

GB = 1e9


def split_variants(values: Sequence[str]) -> list[str]:
    """``--variant Q4_K_M --variant Q8_0`` and ``--variant Q4_K_M,Q8_0`` both work."""
    return [v.strip() for value in values for v in value.split(",") if v.strip()]


@contextlib.contextmanager
def progress_bar(desc: str, unit: str = "B") -> Iterator[ProgressFn]:
    """A tqdm bar on stderr (by default bytes of source processed, with rate and ETA) fed by a
    ``progress(done, total)`` callback."""
    bar = tqdm(total=0, unit=unit, unit_scale=True, unit_divisor=1000, desc=desc, disable=None,
               dynamic_ncols=True, leave=True)

    def update(done: int, total: int) -> None:
        if bar.total != total:
            bar.total = total
        bar.update(done - bar.n)

    try:
        yield update
    finally:
        bar.close()


def describe_plans(plans: Sequence[Plan], out_dir: pathlib.Path | None = None) -> str:
    lines = [f"{'variant':<8} {'file':<40} {'size GB':>9} {'bpw':>6} {'bpw q':>6}  types"]
    for p in plans:
        types = " ".join(f"{k}:{v}" for k, v in p.type_counts.items())
        path = str(out_dir / p.file_name) if out_dir is not None else p.file_name
        lines.append(f"{p.variant.name:<8} {path:<40} {p.file_size / GB:>9.3f} {p.bits_per_weight:>6.3f} "
                     f"{p.bits_per_weight_quantized:>6.3f}  {types}")
    for p in plans:
        if p.fallbacks:
            lines.append(f"note: {p.variant.name}: {len(p.fallbacks)} tensors fall back to F16 (rows not a "
                         f"multiple of the block size): {', '.join(p.fallbacks)}")
    return "\n".join(lines)


def describe_artifacts(records: Sequence[ArtifactRecord]) -> str:
    lines = []
    for r in records:
        counts: dict[str, int] = {}
        for t in r.tensors:
            counts[t.type] = counts.get(t.type, 0) + 1
        types = " ".join(f"{k}:{v}" for k, v in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))
        lines.append(f"{r.path}  {r.size / GB:.3f} GB  sha256 {r.sha256}  {types}")
    return "\n".join(lines)


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
                              progress=progress, tensor_transform=transform, extra_metadata=extra)
    if as_json:
        click.echo(json.dumps({"artifacts": [r.to_dict() for r in records]}, indent=2))
    else:
        click.echo(describe_artifacts(records))
        click.echo(f"done in {time.perf_counter() - start:.1f} s")
