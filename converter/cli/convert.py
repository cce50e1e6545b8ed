"""``flux-gguf convert``: plan (``--dry-run``) or write one GGUF file per variant."""
from __future__ import annotations

import os
import pathlib
import time
from typing import Sequence

import click

from converter import direct_io
from converter.errors import PlanError
from converter.imatrix import load_imatrices
from converter.hub.source import RemoteSource, open_any_source
from converter.lora.merge import build_merger, merged_lora_metadata, parse_lora_option
from converter.pipeline import TargetMix, check_sensitivity_source, plan_source, plan_source_target
from converter.pipeline import convert as run_convert
from converter.recipes import Budget, bpw_budget, mix_variant, parse_overrides, read_sensitivity, resolve_variant, size_budget
from manifests.hashing import hash_file

from .output import (check_threads, describe_artifacts, describe_plans, echo_json, prepare_kernels, printable,
                     progress_bar)


def imatrix_json(imatrix, files: Sequence[pathlib.Path]) -> dict | None:
    if imatrix is None:
        return None
    return {"files": [str(f) for f in files], "entries": len(imatrix.entries), "datasets": list(imatrix.datasets),
            "chunk_count": imatrix.chunk_count, "chunk_size": imatrix.chunk_size}


def describe_imatrix(imatrix, files: Sequence[pathlib.Path]) -> str:
    datasets = ", ".join(map(printable, imatrix.datasets)) or "no dataset recorded"  # names from the file: escaped
    return (f"K-quant tensors quantized with the importance matrix {' + '.join(map(printable, files))} "
            f"({len(imatrix.entries)} entries, {imatrix.chunk_count} chunks; calibrated on: {datasets}); "
            "Q8_0/F16/BF16 files ignore it")


def split_variants(values: Sequence[str]) -> list[str]:
    """``--variant Q4_K_M --variant Q8_0`` and ``--variant Q4_K_M,Q8_0`` both work."""
    return [v.strip() for value in values for v in value.split(",") if v.strip()]

def _budget(names: Sequence[str], overrides: Sequence[str], target_size: str | None, target_bpw: str | None,
            sensitivity_file: pathlib.Path | None, mix_name: str | None) -> Budget | None:
    """The --target-size/--target-bpw budget (None for --variant runs); conflicting options: one line."""
    if target_size is not None and target_bpw is not None:
        raise PlanError("--target-size and --target-bpw exclude each other")
    if target_size is None and target_bpw is None:
        if sensitivity_file is not None or mix_name is not None:
            raise PlanError("--sensitivity and --mix-name need --target-size or --target-bpw")
        if not names:
            raise PlanError("give --variant (e.g. --variant Q4_K_M) or --target-size/--target-bpw")
        return None
    if names:
        raise PlanError("--target-size/--target-bpw choose every tensor's type; give no --variant with them")
    if overrides:
        raise PlanError("--override cannot be combined with --target-size/--target-bpw")
    if sensitivity_file is None:
        raise PlanError("--target-size/--target-bpw need --sensitivity FILE (from flux-gguf sensitivity)")
    return size_budget(target_size) if target_size is not None else bpw_budget(str(target_bpw))


def describe_mix(mix: TargetMix, sensitivity_file: pathlib.Path | None) -> str:
    lo, hi = mix.reachable
    shown = f"{lo / 1e9:.3f}-{hi / 1e9:.3f} GB" if mix.budget.kind == "size" else f"{lo:.3f}-{hi:.3f} bpw"
    lines = [f"target {mix.budget.text} (reachable {shown}): {mix.plan.file_size} bytes, "
             f"predicted output rel-L2 {mix.predicted_rel_l2:.4g} (from {sensitivity_file})"]
    table = mix.block_table()
    columns = list(dict.fromkeys(k for _, row in table for k in row))
    for block, row in table:
        cells = " ".join(f"{k}={row[k]}" for k in columns if k in row)
        lines.append(f"  {block:<18} {cells}")
    return "\n".join(lines)


def _provenance(source: object, extra: dict[str, str]) -> dict[str, object]:
    """A Hub source records its repo, resolved commit and the Hub's sha256 of each file."""
    if isinstance(source, RemoteSource):
        return {"source_sha256": source.sha256_by_name, "extra_metadata": {**extra, **source.provenance_metadata()}}
    return {"extra_metadata": extra}

@click.command("convert")
@click.argument("src")
@click.option("-o", "--out-dir", type=click.Path(path_type=pathlib.Path), required=True,
              help="Folder for the GGUF files (created if missing).")
@click.option("--variant", "variants", multiple=True, metavar="VARIANT",
              help="Q2_K, Q3_K_S/M/L, Q4_K_S/M, Q5_K_S/M, Q6_K, Q8_0, F16 or BF16; repeat for several files "
                   "written in one pass.")
@click.option("--name", default=None, help="File name stem: NAME-VARIANT.gguf (default: the source's stem).")
@click.option("--override", "overrides", multiple=True, metavar="REGEX=TYPE",
              help="Give tensors whose BFL name matches REGEX the type TYPE; first match wins; repeatable.")
@click.option("--lora", "loras", multiple=True, metavar="PATH[:STRENGTH]",
              help="Merge this LoRA (any FLUX format) into the weights before quantizing, at STRENGTH "
                   "(default 1); repeatable, LoRAs stack.")
@click.option("--imatrix", "imatrix_files", multiple=True, metavar="FILE",
              type=click.Path(path_type=pathlib.Path, dir_okay=False),
              help="Quantize K-quant tensors with this importance matrix (llama.cpp GGUF imatrix, or a "
                   "llama.cpp/stable-diffusion.cpp .dat); repeat to merge several, as llama.cpp does.")
@click.option("--target-size", default=None, metavar="SIZE",
              help="Instead of --variant: one file of at most SIZE bytes (e.g. 5.37GB, 5GiB), each tensor's type "
                   "chosen to minimise the output error --sensitivity predicts.")
@click.option("--target-bpw", default=None, metavar="BPW",
              help="Like --target-size, as bits per weight over every tensor (e.g. 4.5).")
@click.option("--sensitivity", "sensitivity_file", type=click.Path(path_type=pathlib.Path, dir_okay=False),
              default=None, help="With --target-size/--target-bpw: the file flux-gguf sensitivity wrote.")
@click.option("--any-sensitivity-source", "any_source", is_flag=True,
              help="Use --sensitivity even when it records another checkpoint than SRC (its fingerprint or sha256).")
@click.option("--mix-name", default=None, metavar="NAME",
              help="With --target-size/--target-bpw: the file's variant label, NAME-MIX.gguf (default: T<budget>).")
@click.option("--threads", type=int, default=None,  # range checked by check_threads: one Error: line
              help="Threads for the quantization kernels (default: all cores).")
@click.option("--direct-io", "direct", type=click.Choice(direct_io.MODES), default=None,
              help="Bypass the page cache (O_DIRECT) for the source and the outputs: auto (the default, or "
                   "FLUX_GGUF_DIRECT_IO) reads a source that is not already cached and writes the outputs "
                   "direct, where the file system allows it; on: also a cached source; off: never.")
@click.option("--dry-run", is_flag=True, help="Print the plan (types, exact sizes) without writing anything.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON on stdout.")
@click.option("--keep-source", type=click.Path(path_type=pathlib.Path), default=None, metavar="DIR",
              help="With an hf:// SRC: also keep the streamed source files under DIR (verified before kept; "
                   "a file already there with the Hub's bytes is left as is, one with other bytes refused).")
@click.option("--force", is_flag=True,
              help="With --keep-source: replace files under DIR that hold other bytes than the Hub's.")
def convert(src: str, out_dir: pathlib.Path, variants: tuple[str, ...], name: str | None,
            overrides: tuple[str, ...], loras: tuple[str, ...], imatrix_files: tuple[pathlib.Path, ...],
            target_size: str | None, target_bpw: str | None, sensitivity_file: pathlib.Path | None,
            any_source: bool, mix_name: str | None, threads: int | None, direct: str | None, dry_run: bool, as_json: bool,
            keep_source: pathlib.Path | None, force: bool) -> None:
    """Convert a FLUX.1 safetensors checkpoint (file or diffusers folder) into GGUF files.

    SRC may be on the Hub: hf://OWNER/REPO[@REVISION]/PATH.safetensors, or hf://OWNER/REPO[@REVISION]
    for a diffusers transformer/ folder; it is streamed, never copied to disk, and its sha256 is
    checked against the Hub's before any output is renamed into place.

    \b
    Example:
      flux-gguf convert flux1-kontext-dev.safetensors -o out --variant Q4_K_M --variant Q8_0
      flux-gguf convert flux1-kontext-dev.safetensors -o out --variant Q4_K_S \\
          --override 'double_blocks\\.[0-3]\\.=Q5_K' --dry-run
      flux-gguf convert flux1-kontext-dev.safetensors -o out --variant Q4_K_M \\
          --lora Hyper-FLUX.1-dev-8steps-lora.safetensors:0.125
      flux-gguf convert flux1-kontext-dev.safetensors -o out --variant Q4_K_M \\
          --imatrix flux1-kontext-dev.imatrix.gguf
      flux-gguf convert flux1-kontext-dev.safetensors -o out --target-size 5.37GB \\
          --sensitivity kontext.sensitivity.json --imatrix kontext.imatrix.gguf --mix-name Q3_K_A
    """
    check_threads(threads)
    if direct is not None:
        os.environ[direct_io.ENV] = direct  # this process's readers and writers (the CLI owns it)
    direct_io.mode()  # a bad FLUX_GGUF_DIRECT_IO: one line now, not at the first read
    names = split_variants(variants)
    budget = _budget(names, overrides, target_size, target_bpw, sensitivity_file, mix_name)
    sens = read_sensitivity(sensitivity_file) if budget is not None and sensitivity_file is not None else None
    if mix_name is not None:
        mix_variant(mix_name)
    for v in names:  # reject bad arguments before opening the source
        resolve_variant(v)
    parse_overrides(overrides, option="--override")
    lora_specs = [parse_lora_option(text) for text in loras]
    imatrix = load_imatrices(imatrix_files) if imatrix_files else None
    transform, extra = None, {}
    if lora_specs:  # validated against the source before any weight is read
        with open_any_source(src) as source:
            shapes = {n: tuple(t.shape) for n, t in source.tensors.items()}
        transform = build_merger(lora_specs, shapes)
        extra = merged_lora_metadata([(s.label, hash_file(s.path).sha256, s.strength, lora.format)
                                      for s, (lora, _) in zip(lora_specs, transform.loras)])
    if dry_run and budget is not None and sens is not None:
        with open_any_source(src) as source:
            if not any_source:
                check_sensitivity_source(sens, source)
            mix = plan_source_target(source, sens, budget, mix_name=mix_name, name=name, imatrix=imatrix,
                                     imatrix_files=imatrix_files, **_provenance(source, extra))
        if as_json:
            doc = {"source": str(src), "family": mix.plan.family, "plans": [mix.plan.to_dict()],
                   "target": {"budget": budget.to_dict(), "reachable": list(mix.reachable),
                              "predicted_rel_l2": mix.predicted_rel_l2, "sensitivity": str(sensitivity_file)}}
            echo_json(doc)
        else:
            click.echo(describe_plans([mix.plan], out_dir))
            click.echo(describe_mix(mix, sensitivity_file))
        return
    if dry_run:
        with open_any_source(src) as source:
            plans = plan_source(source, names, name=name, overrides=overrides, imatrix=imatrix,
                                imatrix_files=imatrix_files, **_provenance(source, extra))
            layout = source.layout
        if as_json:
            doc = {"source": str(src), "layout": layout, "family": plans[0].family,
                   "plans": [p.to_dict() for p in plans]}
            if imatrix is not None:
                doc["imatrix"] = imatrix_json(imatrix, imatrix_files)
            echo_json(doc)
        else:
            click.echo(f"{printable(src)} ({layout} layout, {plans[0].family}): {len(plans[0].entries)} tensors, "
                       f"{plans[0].n_params:,} parameters")
            click.echo(describe_plans(plans, out_dir))
            for spec in lora_specs:
                click.echo(f"LoRA {printable(spec.label)} ({printable(spec.path)}) merged at strength {spec.strength:g} "
                           "before quantizing")
            if imatrix is not None:
                click.echo(describe_imatrix(imatrix, imatrix_files))
        return
    start = time.perf_counter()
    with progress_bar("converting") as progress, open_any_source(src, keep_source=keep_source,
                                                                     replace_kept=force) as source:
        if sens is not None and not any_source:
            check_sensitivity_source(sens, source)
        records = run_convert(source, out_dir, names, name=name, overrides=overrides, threads=threads,
                              progress=progress, before_quantize=prepare_kernels, tensor_transform=transform,
                              imatrix=imatrix, sensitivity=sens, budget=budget, mix_name=mix_name,
                              imatrix_files=imatrix_files, **_provenance(source, extra))
    if as_json:
        doc = {"artifacts": [r.to_dict() for r in records]}
        if imatrix is not None:
            doc["imatrix"] = imatrix_json(imatrix, imatrix_files)
        echo_json(doc)
    else:
        click.echo(describe_artifacts(records))
        if imatrix is not None:
            click.echo(describe_imatrix(imatrix, imatrix_files))
        click.echo(f"done in {time.perf_counter() - start:.1f} s")
