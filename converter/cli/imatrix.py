"""``flux-gguf imatrix``: collect an importance matrix for calibrated quantization (``convert --imatrix``)."""
from __future__ import annotations

import pathlib

import click

from converter.errors import CalibrationError
from converter.quality.probes import ProbeSpec

from .output import echo_json, printable, progress_bar
from .validate import _DEVICE, _log, _quiet_libraries


@click.command("imatrix")
@click.argument("source")  # a path, or hf://OWNER/REPO[@REV][/PATH] (click.Path would fold the //)
@click.option("-o", "--output", type=click.Path(path_type=pathlib.Path, dir_okay=False), required=True,
              help="The imatrix file to write (llama.cpp's GGUF imatrix format), e.g. NAME.imatrix.gguf.")
@click.option("--inputs", "inputs_file", type=click.Path(path_type=pathlib.Path, dir_okay=False), default=None,
              help="Saved transformer inputs (safetensors; keys named like FluxTransformer2DModel.forward's arguments).")
@click.option("--pipeline", "pipeline_dir", type=click.Path(path_type=pathlib.Path, file_okay=False), default=None,
              help="Local FLUX.1 Kontext diffusers pipeline folder: collect while it renders --prompts.")
@click.option("--prompts", "prompts_file", type=click.Path(path_type=pathlib.Path, dir_okay=False), default=None,
              help="With --pipeline: a text file, one prompt per line.")
@click.option("--images", "images_dir", type=click.Path(path_type=pathlib.Path, file_okay=False), default=None,
              help="With --pipeline: folder of input images; prompt i edits image i (cycling).")
@click.option("--steps", type=click.IntRange(1), default=28, show_default=True,
              help="With --pipeline: denoising steps per prompt (collected at every step).")
@click.option("--guidance", type=float, default=2.5, show_default=True, help="With --pipeline: guidance scale.")
@click.option("--height", type=click.IntRange(16), default=None,
              help="Probe height in pixels (default 512), or the render height with --pipeline (default: automatic).")
@click.option("--width", type=click.IntRange(16), default=None,
              help="Probe width in pixels (default 512), or the render width with --pipeline (default: automatic).")
@click.option("--probes", type=click.IntRange(1), default=4, show_default=True,
              help="Without --inputs/--pipeline: how many seeded probes (a smoke default, not a calibration set).")
@click.option("--text-tokens", type=click.IntRange(1), default=512, show_default=True, help="T5 tokens of each probe.")
@click.option("--seed", type=int, default=0, show_default=True, help="First probe seed, or the render seed.")
@click.option("--device", type=_DEVICE, default=None, help="Where the transformer runs (default: cuda if available).")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON summary on stdout.")
def imatrix(source: str, output: pathlib.Path, inputs_file: pathlib.Path | None,
            pipeline_dir: pathlib.Path | None, prompts_file: pathlib.Path | None, images_dir: pathlib.Path | None,
            steps: int, guidance: float, height: int | None, width: int | None, probes: int, text_tokens: int,
            seed: int, device: str | None, as_json: bool) -> None:
    """Collect an importance matrix for SOURCE (a checkpoint convert reads, or a GGUF file that fits small GPUs).

    Hooks every Linear whose weight a recipe quantizes and sums x^2 per input column over every
    token. Without --inputs or --pipeline it runs seeded random probes: a smoke test of the
    path, not a calibration set.

    \b
    Example:
      flux-gguf imatrix flux1-kontext-dev.safetensors -o kontext.imatrix.gguf --inputs captured.safetensors
      flux-gguf imatrix flux1-kontext-dev-Q8_0.gguf -o kontext.imatrix.gguf \\
          --pipeline ./FLUX.1-Kontext-dev --prompts prompts.txt --images photos/ --steps 20
      flux-gguf convert flux1-kontext-dev.safetensors -o out --variant Q4_K_M --imatrix kontext.imatrix.gguf
    """
    from converter.imatrix import write_imatrix
    from converter.quality.calibrate import collect_imatrix, collect_imatrix_pipeline

    pipeline_only = {"--prompts": prompts_file, "--images": images_dir}
    given = [flag for flag, value in pipeline_only.items() if value is not None]
    if pipeline_dir is None and given:
        raise CalibrationError(f"{given[0]} needs --pipeline")
    if pipeline_dir is not None and inputs_file is not None:
        raise CalibrationError("--inputs and --pipeline exclude each other")
    if pipeline_dir is not None and prompts_file is None:
        raise CalibrationError("--pipeline needs --prompts")
    if (height is None) != (width is None):
        raise CalibrationError("give both --height and --width, or neither")
    _quiet_libraries()

    def log(message: str) -> None:  # messages name files (and their names come from anywhere): escaped
        _log(printable(message))

    with progress_bar("collecting", unit=" calls") as progress:
        if pipeline_dir is not None and prompts_file is not None:
            report = collect_imatrix_pipeline(source, pipeline_dir, prompts_file, images_dir=images_dir, steps=steps,
                                              guidance=guidance, height=height, width=width, seed=seed,
                                              device=device, progress=progress, log=log)
        else:
            probe = ProbeSpec(height=height or 512, width=width or 512, text_tokens=text_tokens, seed=seed)
            report = collect_imatrix(source, inputs=inputs_file, probes=probes, probe=probe, device=device,
                                     progress=progress, log=log)
    write_imatrix(report.imatrix, output)
    summary = {"file": str(output), **report.to_dict()}
    if as_json:
        echo_json(summary, allow_nan=False)
        return
    click.echo(f"wrote {printable(output)}: {summary['tensors']} tensors, {report.samples} transformer calls, "
               f"{report.tokens} tokens, {report.seconds:.1f} s on {report.device} "
               f"(loading {report.load_seconds:.1f} s)")
    for note in report.notes:
        click.echo(f"note: {printable(note)}")
