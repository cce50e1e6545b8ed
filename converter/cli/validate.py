"""``flux-gguf validate`` and ``flux-gguf bench``: quality and speed of GGUF files, as diffusers runs them."""
from __future__ import annotations

import contextlib
import pathlib

import click

from converter.errors import ValidationError
from converter.quality.probes import ProbeSpec
from converter.quality.validate import (
    VALIDATION_FILE,
    ValidationReport,
    write_validation_json,
)
from converter.quality.validate import validate as run_validate

from .output import GB, echo_json, printable, progress_bar

_DEVICE = click.Choice(["cpu", "cuda"])


def _quiet_libraries() -> None:
    """diffusers/transformers log warnings and draw bars of their own; we report progress ourselves."""
    for name in ("diffusers", "transformers"):
        with contextlib.suppress(ImportError):
            module = __import__(f"{name}.utils", fromlist=["logging"])
            module.logging.set_verbosity_error()
            module.logging.disable_progress_bar()


def _log(message: str) -> None:
    click.echo(message, err=True)


def _fmt(x: float | None, spec: str) -> str:
    if x is None:
        return "n/a"
    if x == float("inf"):
        return "inf"
    return format(x, spec)


def imatrix_text(meta: dict | None) -> str:
    """One line on how a GGUF was calibrated (its quantize.imatrix.* keys)."""
    if not meta:
        return "none (static quantization)"
    parts = [printable(meta.get("file", "?"))]  # the GGUF's own quantize.imatrix.* strings: escaped
    if "dataset" in meta:
        parts.append(f"dataset {printable(meta['dataset'])}")
    if "entries_count" in meta:
        parts.append(f"{meta['entries_count']} entries")
    if "chunks_count" in meta:
        parts.append(f"{meta['chunks_count']} chunks")
    return ", ".join(parts)


def describe_report(report: ValidationReport) -> str:
    """The human summary: per type, per block, outputs, pipeline."""
    lines = [f"{printable(report.gguf)}  {report.gguf_bytes / GB:.3f} GB  vs {printable(report.source)}"]
    lines.append(f"imatrix: {imatrix_text(report.imatrix)}")
    if report.tensors:
        lines.append(f"{'type':<8} {'tensors':>7} {'rel RMSE':>10} {'worst':>10} {'min cosine':>11}  worst tensor")
        for k, s in report.by_type.items():
            lines.append(f"{k:<8} {s.tensors:>7} {s.rel_rmse:>10.5f} {s.worst_rel_rmse:>10.5f} "
                         f"{s.min_cosine:>11.6f}  {printable(s.worst_tensor)}")
        lines.append(f"{'block':<17} {'rel RMSE':>10} {'min cosine':>11}")
        for k, s in report.by_block.items():
            lines.append(f"{k:<17} {s.rel_rmse:>10.5f} {s.min_cosine:>11.6f}")
    if report.outputs is not None and report.probe is not None:
        o, p = report.outputs, report.probe
        lines.append(
            f"transformer output ({p.width}x{p.height}, {p.image_tokens} image + {p.text_tokens} text tokens, "
            f"{report.device}): rel L2 {_fmt(o.rel_l2, '.5f')}, cosine {_fmt(o.cosine, '.6f')}, "
            f"PSNR {_fmt(o.psnr_db, '.2f')} dB"
        )
    if report.pipeline is not None:
        pl = report.pipeline
        verdict = "passes" if pl["passes"] else "fails"
        lines.append(f"pipeline render ({pl['width']}x{pl['height']}, {pl['steps']} steps): SSIM {pl['ssim']:.4f} "
                     f"({verdict} SSIM > {pl['ssim_bar']}), PSNR {_fmt(pl['psnr_db'], '.2f')} dB")
    return "\n".join(lines)


@click.command("validate")
@click.argument("gguf", type=click.Path(path_type=pathlib.Path))
@click.option("--source", type=click.Path(path_type=pathlib.Path), required=True,
              help="The checkpoint the GGUF was converted from (file or diffusers folder).")
@click.option("--config", "config_dir", type=click.Path(path_type=pathlib.Path, file_okay=False), default=None,
              help="Folder with the transformer's diffusers config.json (default: written from the source's shapes).")
@click.option("--device", type=_DEVICE, default=None, help="Where the models run (default: cuda if available).")
@click.option("-o", "--output", type=click.Path(path_type=pathlib.Path, dir_okay=False), default=None,
              help="validation.json to add this file's report to (default: validation.json beside the GGUF).")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON on stdout.")
@click.option("--tensors-only", is_flag=True, help="Compare tensors only; skip running the transformers.")
@click.option("--height", type=int, default=512, show_default=True, help="Probe image height in pixels.")
@click.option("--width", type=int, default=512, show_default=True, help="Probe image width in pixels.")
@click.option("--text-tokens", type=click.IntRange(1), default=512, show_default=True, help="Probe text tokens (T5 for FLUX.1).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the probe and of the render.")
@click.option("--pipeline", "pipeline_dir", type=click.Path(path_type=pathlib.Path), default=None,
              help="Local FLUX.1 Kontext diffusers pipeline folder: also render an edit with both transformers.")
@click.option("--image", type=click.Path(path_type=pathlib.Path), default=None, help="Input image of the edit.")
@click.option("--prompt", default=None, help="Edit instruction.")
@click.option("--steps", type=click.IntRange(1), default=28, show_default=True, help="Render steps.")
@click.option("--guidance", type=float, default=2.5, show_default=True, help="Render guidance scale.")
@click.option("--render-height", type=int, default=None, help="Render height (default: Kontext's preferred size).")
@click.option("--render-width", type=int, default=None, help="Render width (default: Kontext's preferred size).")
@click.option("--max-sequence-length", type=click.IntRange(1, 512), default=512, show_default=True,
              help="T5 tokens of the render's prompt.")
@click.option("--save-images", type=click.Path(path_type=pathlib.Path, file_okay=False), default=None,
              help="Keep both renders as PNG in this folder.")
def validate(gguf: pathlib.Path, source: pathlib.Path, config_dir: pathlib.Path | None, device: str | None,
             output: pathlib.Path | None, as_json: bool, tensors_only: bool, height: int, width: int,
             text_tokens: int, seed: int, pipeline_dir: pathlib.Path | None, image: pathlib.Path | None,
             prompt: str | None, steps: int, guidance: float, render_height: int | None,
             render_width: int | None, max_sequence_length: int, save_images: pathlib.Path | None) -> None:
    """Measure how far a GGUF file is from its source: per tensor, and end to end through diffusers.

    Writes the report into validation.json (one entry per GGUF file), which `release build`
    puts into the model card. FLUX.1 and FLUX.2 files run on their family's probe; --pipeline
    is FLUX.1 Kontext's.

    \b
    Example:
      flux-gguf validate out/flux1-kontext-dev-Q4_K_M.gguf --source flux1-kontext-dev.safetensors
      flux-gguf validate out/flux1-kontext-dev-Q4_K_M.gguf --source flux1-kontext-dev.safetensors \\
          --pipeline ./FLUX.1-Kontext-dev --image cat.png --prompt "make the cat wear a red hat"
    """
    render = {"--image": image, "--prompt": prompt, "--save-images": save_images,
              "--render-height": render_height, "--render-width": render_width}
    given = [flag for flag, value in render.items() if value is not None]
    if pipeline_dir is None and given:
        raise ValidationError(f"{given[0]} needs --pipeline")
    if pipeline_dir is not None:
        if image is None or prompt is None:
            raise ValidationError("--pipeline needs --image and --prompt")
        if tensors_only:
            raise ValidationError("--tensors-only and --pipeline exclude each other")
    probe = None if tensors_only else ProbeSpec(height=height, width=width, text_tokens=text_tokens, seed=seed)
    _quiet_libraries()
    with progress_bar("comparing tensors", unit=" weights") as progress:
        report = run_validate(gguf, source, config_dir=config_dir, device=device, probe=probe,
                              progress=progress, log=_log)
    if pipeline_dir is not None and image is not None and prompt is not None:
        from converter.quality.pipeline_check import pipeline_check

        result = pipeline_check(gguf, source, pipeline_dir, image, prompt, config_dir=config_dir, device=device,
                                seed=seed, steps=steps, guidance=guidance, height=render_height,
                                width=render_width, max_sequence_length=max_sequence_length,
                                save_dir=save_images, log=_log)
        report = report.with_pipeline(result.to_dict())
    path = write_validation_json(report, output or gguf.parent / VALIDATION_FILE)
    if as_json:
        echo_json(report.to_dict(), allow_nan=False)
    else:
        click.echo(describe_report(report))
        click.echo(f"wrote {path}")


@click.command("bench")
@click.argument("ggufs", nargs=-1, type=click.Path(path_type=pathlib.Path))
@click.option("--baseline", type=click.Path(path_type=pathlib.Path), default=None,
              help="The BF16 source: measured first, and every file's output is compared with its output.")
@click.option("--height", type=int, default=1024, show_default=True, help="Image height in pixels.")
@click.option("--width", type=int, default=1024, show_default=True, help="Image width in pixels.")
@click.option("--steps", type=click.IntRange(1), default=3, show_default=True, help="Timed transformer steps.")
@click.option("--warmup", type=click.IntRange(1), default=2, show_default=True, help="Untimed steps first.")
@click.option("--text-tokens", type=click.IntRange(1), default=512, show_default=True, help="Text tokens (T5 for FLUX.1).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the probe inputs.")
@click.option("--device", type=_DEVICE, default=None, help="Where the models run (default: cuda if available).")
@click.option("--config", "config_dir", type=click.Path(path_type=pathlib.Path, file_okay=False), default=None,
              help="Folder with the transformer's diffusers config.json (default: written from the shapes).")
@click.option("-o", "--out-dir", type=click.Path(path_type=pathlib.Path, file_okay=False), default=None,
              help="Also write bench.json and bench.md into this folder.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON on stdout instead of the markdown table.")
def bench(ggufs: tuple[pathlib.Path, ...], baseline: pathlib.Path | None, height: int, width: int, steps: int,
          warmup: int, text_tokens: int, seed: int, device: str | None, config_dir: pathlib.Path | None,
          out_dir: pathlib.Path | None, as_json: bool) -> None:
    """Time GGUF files in diffusers: load time, peak GPU memory, seconds per Kontext step, output drift.

    Each step runs the transformer on a Kontext edit at HEIGHTxWIDTH (target plus context image
    tokens; FLUX.2: Flux2Pipeline's inputs with one reference image); with --baseline every file's
    output is compared with the BF16 source's.

    \b
    Example:
      flux-gguf bench out/*.gguf --baseline flux1-kontext-dev.safetensors --steps 5 -o bench-out
    """
    from converter.quality.bench import bench as run_bench
    from converter.quality.bench import markdown_table, write_bench

    probe = ProbeSpec(height=height, width=width, text_tokens=text_tokens, seed=seed)
    _quiet_libraries()
    report = run_bench(list(ggufs), baseline=baseline, probe=probe, steps=steps, warmup=warmup, device=device,
                       config_dir=config_dir, log=_log)
    if out_dir is not None:
        for p in write_bench(report, out_dir):
            _log(f"wrote {p}")
    if as_json:
        echo_json(report.to_dict(), allow_nan=False)
    else:
        # the table holds each GGUF's quantize.imatrix.file: control characters escaped line by line
        click.echo("".join(printable(line) + "\n" for line in markdown_table(report).splitlines()), nl=False)
