"""``flux-gguf verify DIR``: re-hash a release, and with --source re-derive it from the weights."""
from __future__ import annotations

import pathlib
from typing import Any

import click

from converter.release.rederive import RederiveReport, rederive_release
from converter.release.signing import check_signature
from manifests import SIGNATURE_NAME, ManifestError, verify_release
from manifests.verify import VerifyReport

from .hub import remote_option, run_remote_verify
from .output import check_threads, echo_json, increment_bar, one_line, prepare_kernels, printable, progress_bar
from .signing_options import signature_line, trust_from, trust_options


def describe_verify(report: VerifyReport) -> str:
    """The text report; names from the folder and the manifest are shown escaped (see ``printable``)."""
    lines = []
    for f in report.files:
        line = f"{f.status:<10}  {printable(f.path)}"  # paths, details and tensor names come from the release: escaped
        if f.detail and not f.ok:
            line += f"  ({printable(f.detail)})"
        lines.append(line)
        for name in f.damaged_tensors or ():
            lines.append(f"{'':<12}  damaged tensor: {printable(name)}")
    c = report.counts()
    summary = ", ".join(f"{n} {s}" for s, n in c.items() if n)
    lines.append(f"{len(report.files)} files: {summary}")
    return "\n".join(lines)


def describe_rederive(r: RederiveReport) -> str:
    lines = [f"{p.status:<10}  {printable(p.artifact)}: {printable(p.tensor)} ({printable(p.type)}): {printable(p.detail)}"
             for p in r.problems]
    lines += [f"recipe      {printable(msg)}" for msg in r.recipe_problems]
    if r.unused_source_tensors:
        lines.append(f"unused      source tensors missing from every file: "
                     f"{', '.join(map(printable, r.unused_source_tensors))}")
    verdict = "re-derived bit for bit" if r.ok else "NOT reproduced"
    lines.append(f"source {printable(r.source)}: {r.tensors_checked} tensors checked ({r.encodings} encodings), {verdict}")
    if r.source_files_match:
        lines.append("source files are byte-identical to those the manifest lists")
    else:
        diffs = ", ".join(f"{printable(f.name)} {f.status}" for f in r.source_files if f.status != "ok")
        lines.append(f"source files differ from those the manifest lists ({diffs}); tensors decide the check")
    return "\n".join(lines)


@click.command("verify")
@click.argument("directory", type=click.Path(path_type=pathlib.Path))
@click.option("--json", "as_json", is_flag=True, help="Print the full report as JSON on stdout.")
@click.option("--tensors", is_flag=True, help="For each damaged GGUF, list the tensors whose bytes differ.")
@click.option("--source", "source", default=None,
              help="Re-derive every tensor from these source weights (file or diffusers folder, or "
                   "hf://OWNER/REPO[@REV][/PATH] streamed from the Hub) and check its digest.")
@click.option("--lora", "loras", multiple=True, type=click.Path(path_type=pathlib.Path), metavar="FILE",
              help="With --source: a LoRA file the release lists (matched to the manifest by sha256): a merged "
                   "one is applied, a side-car one only counts as a given source file; repeatable.")
@click.option("--imatrix", "imatrix_files", multiple=True, type=click.Path(path_type=pathlib.Path, dir_okay=False),
              metavar="FILE", help="With --source: the importance matrix a calibrated release was quantized with "
                                   "(checked against the manifest by sha256); repeat for each file it lists.")
@click.option("--ignore", "ignore", multiple=True, metavar="GLOB",
              help="Tolerate extra files matching GLOB (e.g. '.cache/huggingface/*'); repeatable.")
@click.option("--threads", type=int, default=None,  # range checked by check_threads: one Error: line
              help="Threads for re-encoding with --source (default: all cores).")
@remote_option
@trust_options
@click.option("--require-signature", is_flag=True, help="Fail unless model.sig is present and verified.")
def verify(directory: pathlib.Path, as_json: bool, tensors: bool, source: str | None,
           loras: tuple[pathlib.Path, ...], ignore: tuple[str, ...], threads: int | None,
           remote: str | None = None, imatrix_files: tuple[pathlib.Path, ...] = (),
           require_signature: bool = False, **trust_opts: Any) -> None:
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
      flux-gguf verify dist/NAME --source flux1-kontext-dev.safetensors --imatrix kontext.imatrix.gguf
      flux-gguf verify dist/flux1-kontext-dev --remote me/FLUX.1-Kontext-dev-GGUF
      flux-gguf verify dist/flux1-kontext-dev --public-key pub.pem --require-signature

    A signed release (model.sig) is checked with --public-key, --certificate-chain or
    --identity/--issuer: the signature must verify against it and cover exactly the folder's files
    and bytes, besides every manifest check (one read of each file serves both). Without them a
    signature is reported "present, not checked"; --require-signature fails unless it verifies.
    """
    check_threads(threads)
    trust = trust_from(**trust_opts)
    if loras and source is None:
        raise click.UsageError("--lora only applies with --source (re-deriving a release that merged LoRAs)")
    if imatrix_files and source is None:
        raise click.UsageError("--imatrix only applies with --source (re-deriving a calibrated release)")
    if remote is not None:
        if source is not None or tensors:
            raise click.UsageError("--remote checks the Hub's copy; it cannot be combined with --source or --tensors")
        if trust is not None or require_signature:
            raise click.UsageError("--remote checks the Hub's metadata only; check a signature on a local copy")
        return run_remote_verify(directory, remote, as_json)
    try:
        with increment_bar("verifying") as progress:
            report = verify_release(directory, tensors=tensors, ignore=ignore + (SIGNATURE_NAME,), progress=progress)
    except ManifestError as e:  # manifests/ has its own exception family
        raise click.ClickException(one_line(e)) from e
    # the signature (model.sig against the trusted key/chain/identity, then every file against what it signs),
    # reusing the digests just computed, so a signed release is read once
    signature = check_signature(directory, trust, require=require_signature, declared=report.manifest.signature,
                                ignore=ignore, known={f.path: f.actual_sha256 for f in report.files if f.actual_sha256})
    rederived = None
    if source is not None:
        transform, given = _lora_transform(report.manifest, source, loras)
        imatrix, imatrix_digests = _imatrix(imatrix_files)
        with progress_bar("re-deriving") as progress:
            rederived = rederive_release(report.manifest, source, threads=threads, progress=progress,
                                         tensor_transform=transform, extra_source_files={**given, **imatrix_digests},
                                         imatrix=imatrix, imatrix_files=imatrix_files,
                                         before_quantize=prepare_kernels)
    if as_json:
        doc: dict[str, Any] = report.to_json()
        if rederived is not None:
            doc["source"] = rederived.to_json()
            doc["ok"] = report.ok and rederived.ok
        doc["signature"] = signature.to_json()
        doc["ok"] = doc["ok"] and signature.ok
        echo_json(doc)
    else:
        click.echo(signature_line(signature))
        click.echo(describe_verify(report))
        if rederived is not None:
            click.echo(describe_rederive(rederived))
        good = report.ok and (rederived is None or rederived.ok) and signature.ok
        click.echo(f"release {printable(directory)}: {'OK' if good else 'PROBLEMS FOUND'}")
    if not report.ok or (rederived is not None and not rederived.ok) or not signature.ok:
        click.get_current_context().exit(1)


def _imatrix(files: tuple[pathlib.Path, ...]) -> tuple[Any, dict[pathlib.Path, Any]]:
    """The merged importance matrix of ``files`` (None without any) and the files' digests."""
    if not files:
        return None, {}
    from converter.imatrix import load_imatrices
    from manifests.hashing import hash_file

    return load_imatrices(files), {p: hash_file(p) for p in files}


def _lora_transform(manifest: Any, source: str, loras: tuple[pathlib.Path, ...]) -> tuple[Any, Any]:
    """The merge transform the release applied (None when it merged none), rebuilt from its record
    and the user's LoRA files, and those files' digests (they count as given source files)."""
    from converter.release.lora import (
        check_lora_files,
        hash_lora_files,
        is_merge,
        manifest_lora_records,
        merger_for_manifest,
    )
    from converter.hub.source import open_any_source

    records = manifest_lora_records(manifest.spec)  # a malformed record is refused here, naming its key
    given = hash_lora_files(list(loras))
    if not loras or not any(is_merge(r) for r in records):
        # Nothing to apply (rederive refuses a merged release without its transform).
        check_lora_files(records, {p: d.sha256 for p, d in given.items()})
        return None, given
    with open_any_source(source) as src:
        shapes = {name: tuple(t.shape) for name, t in src.tensors.items()}
    return merger_for_manifest(records, {p: d.sha256 for p, d in given.items()}, shapes), given
