"""``flux-gguf sensitivity``: measure per-tensor output sensitivity for ``convert --target-size``."""
from __future__ import annotations

import json
import pathlib

import click

from converter.errors import CalibrationError

from .calibration_options import CalibrationInputs, as_rank, calibration_inputs, rank_progress
from .output import echo_json, printable
from .validate import _quiet_libraries


@click.command("sensitivity")
@as_rank  # outermost: option conflicts too are rank 0's to report
@click.argument("source", type=click.Path(path_type=pathlib.Path, exists=True))
@click.option("-o", "--output", type=click.Path(path_type=pathlib.Path, dir_okay=False), required=True,
              help="The sensitivity file to write (JSON), e.g. NAME.sensitivity.json.")
@click.option("--imatrix", "imatrix_file", type=click.Path(path_type=pathlib.Path, dir_okay=False), default=None,
              help="Weight the errors with this importance matrix and quantize K-quants with it, as convert "
                   "--imatrix will (use the same file for both).")
@click.option("--imatrix-out", "imatrix_out", type=click.Path(path_type=pathlib.Path, dir_okay=False), default=None,
              help="Instead of --imatrix: collect the importance matrix on the same pass (the bytes flux-gguf "
                   "imatrix writes for these inputs), write it here and weight the errors with it.")
@calibration_inputs
@click.option("--check-tensors", type=click.IntRange(0), default=8, show_default=True,
              help="Tensors whose other types' output errors are measured to check the prediction.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON summary on stdout.")
def sensitivity(source: pathlib.Path, output: pathlib.Path, imatrix_file: pathlib.Path | None,
                imatrix_out: pathlib.Path | None, calibration: CalibrationInputs, check_tensors: int,
                as_json: bool) -> None:
    """Measure how much each tensor's quantization error moves SOURCE's output (for convert --target-size).

    Per quantizable tensor: the output error with the tensor alone at Q4_K (one forward pass per
    input), scaled to the other types by their (imatrix-weighted) weight error; a sample of
    tensors is also measured at Q2_K/Q3_K/Q6_K and the prediction's rank correlation recorded.
    Inputs as for imatrix: seeded probes, --inputs, or --pipeline/--prompts/--images. Under
    torchrun the tensors are shared out over the ranks; the file is the same for any number.

    \b
    Example:
      flux-gguf sensitivity flux1-kontext-dev.safetensors -o kontext.sensitivity.json \\
          --imatrix-out kontext.imatrix.gguf --inputs captured.safetensors
      torchrun --nproc-per-node 8 -m converter.cli sensitivity flux1-kontext-dev.safetensors \\
          -o kontext.sensitivity.json --imatrix-out kontext.imatrix.gguf --inputs captured.safetensors
      flux-gguf convert flux1-kontext-dev.safetensors -o out --target-size 5.37GB \\
          --sensitivity kontext.sensitivity.json --imatrix kontext.imatrix.gguf
    """
    from converter.imatrix import read_imatrix, write_imatrix
    from converter.quality.distributed import open_ranks
    from converter.quality.sensitivity import measure_sensitivity
    from manifests.hashing import hash_file, write_bytes_atomic

    if imatrix_file is not None and imatrix_out is not None:
        raise CalibrationError("--imatrix and --imatrix-out exclude each other")
    c = calibration
    _quiet_libraries()
    with open_ranks(c.device) as ranks:
        with ranks.step():
            imatrix = read_imatrix(imatrix_file) if imatrix_file is not None else None
            imatrix_ref = ({"file": imatrix_file.name, "sha256": hash_file(imatrix_file).sha256}
                           if imatrix_file is not None else None)
            source_sha = hash_file(source).sha256 if ranks.main and source.is_file() else None
        with rank_progress(ranks.main, "measuring", unit=" tensors") as progress:
            report = measure_sensitivity(source, inputs=c.inputs_file, pipeline=c.pipeline_spec(), probes=c.probes,
                                         probe=c.probe, imatrix=imatrix, imatrix_file=imatrix_ref,
                                         imatrix_origin=str(imatrix_file), collect_imatrix=imatrix_out is not None,
                                         source_sha256=source_sha, check_tensors=check_tensors, progress=progress,
                                         ranks=ranks)
        doc = report.document
        with ranks.step():  # rank 0 writes both files, or neither
            if ranks.main:
                if imatrix_out is not None and report.imatrix is not None:
                    write_imatrix(report.imatrix, imatrix_out)
                    doc["imatrix"] = {"file": imatrix_out.name, "sha256": hash_file(imatrix_out).sha256}
                try:
                    write_bytes_atomic(output, (json.dumps(doc, indent=1, sort_keys=True, allow_nan=False)
                                                + "\n").encode())
                except BaseException:
                    if imatrix_out is not None:
                        imatrix_out.unlink(missing_ok=True)
                    raise
        if not ranks.main:
            return
    check = doc["check"]
    summary = {"file": str(output), "tensors": len(doc["tensors"]), "seconds": report.seconds, "device": report.device,
               "ranks": report.ranks, "imatrix_file": str(imatrix_out) if imatrix_out is not None else None,
               "check_pairs": check["pairs"], "spearman": check["spearman"],
               "spearman_by_type": check["spearman_by_type"],
               "median_predicted_over_measured": check["median_predicted_over_measured"]}
    if as_json:
        echo_json(summary, allow_nan=False)
        return
    rho = "n/a" if check["spearman"] is None else f"{check['spearman']:.3f}"
    by_type = ", ".join(f"{k} {v:.3f}" for k, v in check["spearman_by_type"].items()) or "n/a"
    on = f"{report.ranks} x {report.device}" if report.ranks > 1 else report.device
    click.echo(f"wrote {printable(output)}: {summary['tensors']} tensors in {report.seconds:.1f} s on {on}; "
               f"prediction check on {check['pairs']} (tensor, type) pairs: Spearman {rho} "
               f"(per type: {by_type})")
    if imatrix_out is not None:
        click.echo(f"wrote {printable(imatrix_out)}: the importance matrix of the same pass")
