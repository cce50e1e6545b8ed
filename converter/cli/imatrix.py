"""``flux-gguf imatrix``: collect an importance matrix for calibrated quantization (``convert --imatrix``)."""
from __future__ import annotations

import pathlib

import click


from .calibration_options import CalibrationInputs, as_rank, calibration_inputs, rank_log, rank_progress
from .output import echo_json, printable
from .validate import _quiet_libraries


@click.command("imatrix")
@as_rank  # outermost: option conflicts too are rank 0's to report
@click.argument("source")  # a path, or hf://OWNER/REPO[@REV][/PATH] (click.Path would fold the //)
@click.option("-o", "--output", type=click.Path(path_type=pathlib.Path, dir_okay=False), required=True,
              help="The imatrix file to write (llama.cpp's GGUF imatrix format), e.g. NAME.imatrix.gguf.")
@calibration_inputs
@click.option("--json", "as_json", is_flag=True, help="Print a JSON summary on stdout.")
def imatrix(source: str, output: pathlib.Path, calibration: CalibrationInputs, as_json: bool) -> None:
    """Collect an importance matrix for SOURCE (a checkpoint convert reads, or a GGUF file that fits small GPUs).

    Hooks every Linear whose weight a recipe quantizes and sums x^2 per input column over every
    token. Without --inputs or --pipeline it runs seeded random probes: a smoke test of the
    path, not a calibration set.

    Under torchrun (one process per GPU) the samples are shared out by index and rank 0 writes
    the file, byte for byte the one a single process writes (docs/calibration.md).

    \b
    Example:
      flux-gguf imatrix flux1-kontext-dev.safetensors -o kontext.imatrix.gguf --inputs captured.safetensors
      flux-gguf imatrix flux1-kontext-dev-Q8_0.gguf -o kontext.imatrix.gguf \\
          --pipeline ./FLUX.1-Kontext-dev --prompts prompts.txt --images photos/ --steps 20
      torchrun --nproc-per-node 8 -m converter.cli imatrix flux1-kontext-dev.safetensors \\
          -o kontext.imatrix.gguf --inputs captured.safetensors
      flux-gguf convert flux1-kontext-dev.safetensors -o out --variant Q4_K_M --imatrix kontext.imatrix.gguf
    """
    from converter.imatrix import write_imatrix
    from converter.quality.calibrate import collect_imatrix, collect_imatrix_pipeline
    from converter.quality.distributed import open_ranks

    c = calibration
    _quiet_libraries()
    with open_ranks(c.device) as ranks:
        log = rank_log(ranks.main)
        with rank_progress(ranks.main, "collecting", unit=" calls") as progress:
            if c.pipeline_dir is not None and c.prompts_file is not None:
                report = collect_imatrix_pipeline(source, c.pipeline_dir, c.prompts_file, progress=progress, log=log,
                                                  ranks=ranks, **c.pipeline_kwargs())
            else:
                report = collect_imatrix(source, inputs=c.inputs_file, probes=c.probes, probe=c.probe,
                                         progress=progress, log=log, ranks=ranks)
        with ranks.step():  # rank 0 writes; a failed write fails every rank
            if ranks.main:
                write_imatrix(report.imatrix, output)
        if not ranks.main:
            return
    summary = {"file": str(output), **report.to_dict()}
    if as_json:
        echo_json(summary, allow_nan=False)
        return
    on = f"{report.ranks} x {report.device}" if report.ranks > 1 else report.device
    click.echo(f"wrote {printable(output)}: {summary['tensors']} tensors, {report.samples} transformer calls, "
               f"{report.tokens} tokens, {report.seconds:.1f} s on {on} "
               f"(loading {report.load_seconds:.1f} s)")
    for note in report.notes:
        click.echo(f"note: {printable(note)}")
