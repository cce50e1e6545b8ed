"""``flux-gguf sensitivity``: measure per-tensor output sensitivity for ``convert --target-size``."""
from __future__ import annotations

import json
import pathlib

import click

from converter.quality.probes import ProbeSpec

from .output import echo_json, progress_bar
from .validate import _DEVICE, _quiet_libraries


@click.command("sensitivity")
@click.argument("source", type=click.Path(path_type=pathlib.Path, exists=True))
@click.option("-o", "--output", type=click.Path(path_type=pathlib.Path, dir_okay=False), required=True,
              help="The sensitivity file to write (JSON), e.g. NAME.sensitivity.json.")
@click.option("--imatrix", "imatrix_file", type=click.Path(path_type=pathlib.Path, dir_okay=False), default=None,
              help="Weight the errors with this importance matrix and quantize K-quants with it, as convert "
                   "--imatrix will (use the same file for both).")
@click.option("--inputs", "inputs_file", type=click.Path(path_type=pathlib.Path, dir_okay=False), default=None,
              help="Saved transformer inputs (as for imatrix --inputs).")
@click.option("--probes", type=click.IntRange(1), default=4, show_default=True,
              help="Without --inputs: how many seeded probes (a smoke default, not a calibration set).")
@click.option("--height", type=click.IntRange(16), default=512, show_default=True, help="Probe height in pixels.")
@click.option("--width", type=click.IntRange(16), default=512, show_default=True, help="Probe width in pixels.")
@click.option("--text-tokens", type=click.IntRange(1), default=512, show_default=True, help="T5 tokens of each probe.")
@click.option("--seed", type=int, default=0, show_default=True, help="First probe seed.")
@click.option("--check-tensors", type=click.IntRange(0), default=8, show_default=True,
              help="Tensors whose other types' output errors are measured to check the prediction.")
@click.option("--device", type=_DEVICE, default=None, help="Where the transformer runs (default: cuda if available).")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON summary on stdout.")
def sensitivity(source: pathlib.Path, output: pathlib.Path, imatrix_file: pathlib.Path | None,
                inputs_file: pathlib.Path | None, probes: int, height: int, width: int, text_tokens: int, seed: int,
                check_tensors: int, device: str | None, as_json: bool) -> None:
    """Measure how much each tensor's quantization error moves SOURCE's output (for convert --target-size).

    Per quantizable tensor: the output error with the tensor alone at Q4_K (one forward pass per
    input), scaled to the other types by their (imatrix-weighted) weight error; a sample of
    tensors is also measured at Q2_K/Q3_K/Q6_K and the prediction's rank correlation recorded.

    \b
    Example:
      flux-gguf sensitivity flux1-kontext-dev.safetensors -o kontext.sensitivity.json \\
          --imatrix kontext.imatrix.gguf --inputs captured.safetensors
      flux-gguf convert flux1-kontext-dev.safetensors -o out --target-size 5.37GB \\
          --sensitivity kontext.sensitivity.json --imatrix kontext.imatrix.gguf
    """
    from converter.imatrix import read_imatrix
    from converter.quality.sensitivity import measure_sensitivity
    from manifests.hashing import hash_file, write_bytes_atomic

    imatrix = read_imatrix(imatrix_file) if imatrix_file is not None else None
    imatrix_ref = ({"file": imatrix_file.name, "sha256": hash_file(imatrix_file).sha256}
                   if imatrix_file is not None else None)
    source_sha = hash_file(source).sha256 if source.is_file() else None
    _quiet_libraries()
    probe = ProbeSpec(height=height, width=width, text_tokens=text_tokens, seed=seed)
    with progress_bar("measuring", unit=" tensors") as progress:
        report = measure_sensitivity(source, inputs=inputs_file, probes=probes, probe=probe, device=device,
                                     imatrix=imatrix, imatrix_file=imatrix_ref,
                                     imatrix_origin=str(imatrix_file), source_sha256=source_sha,
                                     check_tensors=check_tensors, progress=progress)
    doc = report.document
    write_bytes_atomic(output, (json.dumps(doc, indent=1, sort_keys=True, allow_nan=False) + "\n").encode())
    check = doc["check"]
    summary = {"file": str(output), "tensors": len(doc["tensors"]), "seconds": report.seconds, "device": report.device,
               "check_pairs": check["pairs"], "spearman": check["spearman"],
               "spearman_by_type": check["spearman_by_type"],
               "median_predicted_over_measured": check["median_predicted_over_measured"]}
    if as_json:
        echo_json(summary, allow_nan=False)
        return
    rho = "n/a" if check["spearman"] is None else f"{check['spearman']:.3f}"
    by_type = ", ".join(f"{k} {v:.3f}" for k, v in check["spearman_by_type"].items()) or "n/a"
    click.echo(f"wrote {output}: {summary['tensors']} tensors in {report.seconds:.1f} s on {report.device}; "
               f"prediction check on {check['pairs']} (tensor, type) pairs: Spearman {rho} "
               f"(per type: {by_type})")
