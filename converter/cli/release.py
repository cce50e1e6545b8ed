"""``flux-gguf release build SPEC.toml -o DIR``: a complete, verifiable release from one spec."""
from __future__ import annotations

import pathlib

import click

from converter.release.build import build_release
from manifests import ManifestError

from .output import GB, check_threads, one_line, prepare_kernels, progress_bar
from .signing_options import request_from, sign_options


@click.group("release")
def release() -> None:
    """Build releases: GGUF files plus manifest.json, SHA256SUMS and a model card.

    \b
    Example:
      flux-gguf release build release.toml -o dist/flux1-kontext-dev
    """


@release.command("build")
@click.argument("spec", type=click.Path(dir_okay=False, path_type=pathlib.Path))
@click.option("-o", "--output", "out_dir", type=click.Path(path_type=pathlib.Path), required=True,
              help="Release folder to create (must not exist, or be empty).")
@click.option("--threads", type=int, default=None,  # range checked by check_threads: one Error: line
              help="Threads for the quantization kernels (default: all cores).")
@sign_options
def build(spec: pathlib.Path, out_dir: pathlib.Path, threads: int | None, **signing: object) -> None:
    """Convert every variant SPEC lists in one pass and write the release folder.

    Paths in SPEC are relative to SPEC, or absolute (recorded by file name only). The folder gets the GGUF files, README.md (a Hub model
    card), manifest.json, SHA256SUMS and the extra files SPEC lists; it appears under its name
    only when complete. Set SOURCE_DATE_EPOCH to record a build time (builds stay reproducible).

    \b
    Example:
      flux-gguf release build release.toml -o dist/flux1-kontext-dev
      cd dist/flux1-kontext-dev && sha256sum -c --strict SHA256SUMS
      flux-gguf release build release.toml -o dist/NAME --sign-key key.pem   # + model.sig

    With --sign-key (or --sign-certificate/--sign-chain, or --sign-sigstore) the finished folder is
    signed with OpenSSF model-signing (model.sig covers every file) before it gets its name.
    """
    check_threads(threads)
    sign = request_from(**signing)  # type: ignore[arg-type]
    try:
        with progress_bar("converting") as progress:
            result = build_release(spec, out_dir, threads=threads, progress=progress, sign=sign,
                                   before_quantize=prepare_kernels)
    except ManifestError as e:  # manifests/ has its own exception family
        raise click.ClickException(one_line(e)) from e
    for a in result.manifest.artifacts:
        size = f"{a.size / GB:.3f} GB" if a.size >= GB / 10 else f"{a.size:,} B"
        click.echo(f"{a.path}  {size}  sha256 {a.sha256}")
    if result.manifest.signature is not None:
        click.echo(f"model.sig  {result.manifest.signature['method']} signature over every file")
    click.echo(f"release written to {result.out_dir} (manifest.json sha256 {result.manifest_sha256})")
