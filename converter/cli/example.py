"""``flux-gguf example``: the main job end to end on a small generated checkpoint, no download.

Writes a FLUX-layout checkpoint (real key names and dtypes, 2 + 2 blocks of hidden size 512,
made-up weights) with converter.synthetic, then converts it to Q8_0 and Q4_K_M in one pass, and
leaves a ready ``release.toml`` beside the checkpoint so ``flux-gguf release build`` and
``flux-gguf verify`` run as the README writes them.
"""
from __future__ import annotations

import pathlib
import time

import click

from converter.layout import FLUX2_FAMILIES, FluxGeometry, flux2_geometry
from converter.pipeline import convert as run_convert
from converter.pipeline import plan_source
from converter.sources import open_source
from converter.synthetic import write_synthetic_flux
from manifests.hashing import write_bytes_atomic

from .output import describe_artifacts, describe_plans, prepare_kernels, printable, progress_bar

EXAMPLE_GEOMETRY = FluxGeometry(double_blocks=2, single_blocks=2, hidden=512)
EXAMPLE_VARIANTS = ("Q8_0", "Q4_K_M")
EXAMPLE_NAME = "flux1-example"
EXAMPLE_SPEC_NAME = "release.toml"
# FLUX.2 examples keep the real block counts and text width at hidden size 256 (2 heads).
FLUX2_EXAMPLE_HIDDEN = 256
EXAMPLE_MODELS = ("flux1-dev", *FLUX2_FAMILIES)
_TITLES = {"flux1-dev": "FLUX.1 [dev]", "flux2-dev": "FLUX.2 [dev]", "flux2-klein-4b": "FLUX.2 [klein] 4B",
           "flux2-klein-9b": "FLUX.2 [klein] 9B"}


def example_model(model: str) -> tuple[str, FluxGeometry, str]:
    """(file stem, geometry, base_model) of ``flux-gguf example --model MODEL``."""
    if model == "flux1-dev":
        return EXAMPLE_NAME, EXAMPLE_GEOMETRY, "black-forest-labs/FLUX.1-dev"
    return f"{model}-example", flux2_geometry(model, FLUX2_EXAMPLE_HIDDEN), FLUX2_FAMILIES[model].base_model


def example_spec(checkpoint: str, model: str = "flux1-dev") -> str:
    """The release spec ``flux-gguf example`` writes beside its checkpoint (paths relative to it)."""
    variants = ", ".join(f'"{v}"' for v in EXAMPLE_VARIANTS)
    name, _, base_model = example_model(model)
    return f"""\
# Written by `flux-gguf example`: a release of the synthetic example checkpoint.
#   flux-gguf release build {EXAMPLE_SPEC_NAME} -o dist/example   (paths here are relative to this file)
name = "{name}"
source = "{checkpoint}"
base_model = "{base_model}"
variants = [{variants}]

[card]
license = "apache-2.0"
title = "{name} GGUF (synthetic example)"
description = "Made-up weights in the {_TITLES[model]} layout, written by `flux-gguf example`; not a usable model."
"""


def write_text_atomic(path: pathlib.Path, text: str) -> None:
    """Write under a temporary name, then rename: never a half-written file under the final name."""
    try:
        write_bytes_atomic(path, text.encode("utf-8"))
    except OSError as e:
        raise click.ClickException(f"cannot write {path}: {e.strerror or e}") from None


@click.command("example")
@click.option("-o", "--out-dir", type=click.Path(path_type=pathlib.Path), required=True,
              help="Folder for the generated checkpoint and the GGUF files.")
@click.option("--model", type=click.Choice(EXAMPLE_MODELS), default="flux1-dev", show_default=True,
              help="Which model's layout: FLUX.1 [dev] (2 + 2 blocks, hidden 512) or a FLUX.2 model "
                   f"(its real block counts at hidden {FLUX2_EXAMPLE_HIDDEN}).")
def example(out_dir: pathlib.Path, model: str) -> None:
    """Generate a small FLUX-layout checkpoint and convert it to Q8_0 + Q4_K_M.

    \b
    Example:
      flux-gguf example -o example-out
      flux-gguf example -o klein-out --model flux2-klein-4b
    """
    start = time.perf_counter()
    earlier = [f.name for f in example_files(out_dir, example_model(model)[0]) if f.exists()]
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise click.ClickException(f"cannot create {out_dir}: {e.strerror or e}") from None
    name, g, _ = example_model(model)
    src = write_synthetic_flux(out_dir / f"{name}.safetensors", g, dtype="BF16", seed=0)
    if earlier:  # the same files again (same seed: same bytes), but never silently
        click.echo(f"note: replacing the files of an earlier `flux-gguf example` in {printable(out_dir)}: "
                   f"{', '.join(map(printable, earlier))}")
    click.echo(f"1. wrote {src} ({src.stat().st_size / 1e6:.1f} MB): a synthetic {_TITLES[model]}-layout checkpoint, "
               f"BF16, {g.double_blocks} double + {g.single_blocks} single blocks, hidden size {g.hidden}")
    with open_source(src) as source:
        plans = plan_source(source, EXAMPLE_VARIANTS, name=name)
    click.echo(f"2. planned {', '.join(EXAMPLE_VARIANTS)} ({len(plans[0].entries)} tensors each):")
    click.echo(describe_plans(plans, out_dir))
    with progress_bar("converting") as progress:
        records = run_convert(src, out_dir, EXAMPLE_VARIANTS, name=name, progress=progress,
                              before_quantize=prepare_kernels)
    click.echo("3. read each tensor once, quantized it once per type, wrote both files in one pass:")
    click.echo(describe_artifacts(records))
    spec = out_dir / EXAMPLE_SPEC_NAME
    write_text_atomic(spec, example_spec(src.name, model))
    click.echo(f"4. wrote {spec}: a release spec for this checkpoint")
    click.echo(f"done in {time.perf_counter() - start:.1f} s; try:")
    click.echo(f"  flux-gguf inspect {records[-1].path}")
    dist = free_folder(pathlib.Path("dist") / "example")
    click.echo(f"  flux-gguf release build {printable(spec)} -o {printable(dist)}")
    click.echo(f"  flux-gguf verify {printable(dist)}")


def example_files(out_dir: pathlib.Path, name: str = EXAMPLE_NAME) -> list[pathlib.Path]:
    """The files ``flux-gguf example -o OUT_DIR`` writes (``name``: the model's file stem)."""
    names = [f"{name}.safetensors", *(f"{name}-{v}.gguf" for v in EXAMPLE_VARIANTS), EXAMPLE_SPEC_NAME]
    return [out_dir / n for n in names]


def free_folder(base: pathlib.Path) -> pathlib.Path:
    """``base``, or ``base-2``, ``base-3`` ... : the first that does not exist yet (``release build``
    refuses a folder that exists and is not empty)."""
    candidate, n = base, 1
    while candidate.exists():
        n += 1
        candidate = base.with_name(f"{base.name}-{n}")
    return candidate
