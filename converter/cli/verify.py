"""``flux-gguf verify DIR``: re-hash a release, and with --source re-derive it from the weights."""
from __future__ import annotations

import json
import pathlib
from typing import Any

import click
import numba

from converter.release.rederive import RederiveReport, rederive_release
from manifests import ManifestError, verify_release
from manifests.verify import VerifyReport

from .hub import remote_option, run_remote_verify
from .output import increment_bar, prepare_kernels, progress_bar


def describe_verify(report: VerifyReport) -> str:
    lines = []
    for f in report.files:
        line = f"{f.status:<10}  {f.path}"
        if f.detail and not f.ok:
            line += f"  ({f.detail})"
        lines.append(line)
        for name in f.damaged_tensors or ():
            lines.append(f"{'':<12}  damaged tensor: {name}")
    c = report.counts()
    summary = ", ".join(f"{n} {s}" for s, n in c.items() if n)
    lines.append(f"{len(report.files)} files: {summary}")
    return "\n".join(lines)


def describe_rederive(r: RederiveReport) -> str:
    lines = [f"{p.status:<10}  {p.artifact}: {p.tensor} ({p.type}): {p.detail}" for p in r.problems]
    lines += [f"recipe      {msg}" for msg in r.recipe_problems]
    if r.unused_source_tensors:
        lines.append(f"unused      source tensors missing from every file: {', '.join(r.unused_source_tensors)}")
    verdict = "re-derived bit for bit" if r.ok else "NOT reproduced"
    lines.append(f"source {r.source}: {r.tensors_checked} tensors checked ({r.encodings} encodings), {verdict}")
    if r.source_files_match:
        lines.append("source files are byte-identical to those the manifest lists")
    else:
        diffs = ", ".join(f"{f.name} {f.status}" for f in r.source_files if f.status != "ok")
        lines.append(f"source files differ from those the manifest lists ({diffs}); tensors decide the check")
    return "\n".join(lines)


@click.command("verify")
@click.argument("directory", type=click.Path(path_type=pathlib.Path))
@click.option("--json", "as_json", is_flag=True, help="Print the full report as JSON on stdout.")
@click.option("--tensors", is_flag=True, help="For each damaged GGUF, list the tensors whose bytes differ.")
@click.option("--source", "source", type=click.Path(path_type=pathlib.Path), default=None,
              help="Re-derive every tensor from these source weights (file or diffusers folder) and check its digest.")
@click.option("--lora", "loras", multiple=True, type=click.Path(path_type=pathlib.Path), metavar="FILE",
              help="With --source: a LoRA file the release lists (matched to the manifest by sha256): a merged "
                   "one is applied, a side-car one only counts as a given source file; repeatable.")
@click.option("--ignore", "ignore", multiple=True, metavar="GLOB",
              help="Tolerate extra files matching GLOB (e.g. '.cache/huggingface/*'); repeatable.")
@click.option("--threads", type=click.IntRange(1, numba.config.NUMBA_NUM_THREADS), default=None,
              help="Threads for re-encoding with --source (default: all cores).")
@remote_option
def verify(directory: pathlib.Path, as_json: bool, tensors: bool, source: pathlib.Path | None,
           loras: tuple[pathlib.Path, ...], ignore: tuple[str, ...], threads: int | None,
           remote: str | None = None) -> None:
    """Check every file of a release folder against its manifest.json.

    Each file is reported ok, mismatch, missing or unexpected; the exit status is 1 if any is
    not ok (or --source does not reproduce the release). A manifest that fails its schema or
    names paths outside DIR is refused before any file is opened.

    \b
    Example:
      flux-gguf verify dist/flux1-kontext-dev
      flux-gguf verify dist/flux1-kontext-dev --tensors --json
      flux-gguf verify dist/flux1-kontext-dev --source flux1-kontext-dev.safetensors
      flux-gguf verify dist/NAME --source flux1-kontext-dev.safetensors --lora hyper8.safetensors
      flux-gguf verify dist/flux1-kontext-dev --remote me/FLUX.1-Kontext-dev-GGUF
    """
    if loras and source is None:
        raise click.UsageError("--lora only applies with --source (re-deriving a release that merged LoRAs)")
    if remote is not None:
        if source is not None or tensors:
            raise click.UsageError("--remote checks the Hub's copy; it cannot be combined with --source or --tensors")
        return run_remote_verify(directory, remote, as_json)
    try:
        with increment_bar("verifying") as progress:
            report = verify_release(directory, tensors=tensors, ignore=ignore, progress=progress)
    except ManifestError as e:  # manifests/ has its own exception family
        raise click.ClickException(str(e)) from e
    rederived = None
    if source is not None:
        transform, given = _lora_transform(report.manifest, source, loras)
        with progress_bar("re-deriving") as progress:
            rederived = rederive_release(report.manifest, source, threads=threads, progress=progress,
                                         tensor_transform=transform, extra_source_files=given,
                                         before_quantize=prepare_kernels)
    if as_json:
        doc: dict[str, Any] = report.to_json()
        if rederived is not None:
            doc["source"] = rederived.to_json()
            doc["ok"] = report.ok and rederived.ok
        click.echo(json.dumps(doc, indent=2))
    else:
        click.echo(describe_verify(report))
        if rederived is not None:
            click.echo(describe_rederive(rederived))
        good = report.ok and (rederived is None or rederived.ok)
        click.echo(f"release {directory}: {'OK' if good else 'PROBLEMS FOUND'}")
    if not report.ok or (rederived is not None and not rederived.ok):
        click.get_current_context().exit(1)


def _lora_transform(manifest: Any, source: pathlib.Path, loras: tuple[pathlib.Path, ...]) -> tuple[Any, Any]:
    """The merge transform the release applied (None when it merged none), rebuilt from its record
    and the user's LoRA files, and those files' digests (they count as given source files)."""
    from converter.release.lora import (
        check_lora_files,
        hash_lora_files,
        is_merge,
        manifest_lora_records,
        merger_for_manifest,
    )
    from converter.sources import open_source

    records = manifest_lora_records(manifest.spec)  # a malformed record is refused here, naming its key
    given = hash_lora_files(list(loras))
    if not loras or not any(is_merge(r) for r in records):
        # Nothing to apply (rederive refuses a merged release without its transform).
        check_lora_files(records, {p: d.sha256 for p, d in given.items()})
        return None, given
    with open_source(source) as src:
        shapes = {name: tuple(t.shape) for name, t in src.tensors.items()}
    return merger_for_manifest(records, {p: d.sha256 for p, d in given.items()}, shapes), given
