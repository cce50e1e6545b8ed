#!/usr/bin/env python
"""Throughput of ``flux-gguf imatrix`` on 1 and on N GPUs (torchrun, NCCL), and whether the files agree.

For a later session on a multi-GPU host (none was lent when this was written: no figure exists yet).
Runs ``flux-gguf imatrix SOURCE --probes P`` once as a single process and once per N in --ranks as
``torchrun --standalone --nproc-per-node N -m converter.cli imatrix ...``, each with ``--json``,
and reports per run the collection seconds (the run's seconds minus its loading seconds, from the
command's own summary), samples per second, the speed-up over one GPU and whether the written
imatrix is byte-identical to the single-process one. Target (issue 25): 2 GPUs >= 1.9x one.

Use a P that is a multiple of every N (so no rank idles in the last round) and large enough that
collection dominates (e.g. 64 probes at 1024x1024 on the full model).

Example:

    python scripts/make_synthetic_flux.py -o /dev/shm/flux.safetensors --structured
    python scripts/bench_distributed_imatrix.py /dev/shm/flux.safetensors --ranks 2 --ranks 4 \\
        --probes 64 --height 1024 --width 1024 --json distributed-imatrix.json
"""
from __future__ import annotations

import json
import pathlib
import subprocess
import sys
import tempfile
from typing import Any

import click


def _run(command: list[str]) -> dict[str, Any]:
    proc = subprocess.run(command, capture_output=True, text=True)
    if proc.returncode != 0:
        raise click.ClickException(f"{' '.join(command[:6])} ... failed: {proc.stderr.strip().splitlines()[-1:]}")
    return json.loads(proc.stdout)


@click.command()
@click.argument("source", type=click.Path(exists=True, path_type=pathlib.Path))
@click.option("--ranks", "worlds", type=click.IntRange(2), multiple=True, default=(2,), show_default=True,
              help="Process counts to run under torchrun (one GPU each); repeatable.")
@click.option("--probes", type=click.IntRange(1), default=64, show_default=True)
@click.option("--height", type=click.IntRange(16), default=1024, show_default=True)
@click.option("--width", type=click.IntRange(16), default=1024, show_default=True)
@click.option("--text-tokens", type=click.IntRange(1), default=512, show_default=True)
@click.option("--json", "json_out", type=click.Path(path_type=pathlib.Path, dir_okay=False), default=None)
def main(source: pathlib.Path, worlds: tuple[int, ...], probes: int, height: int, width: int, text_tokens: int,
         json_out: pathlib.Path | None) -> None:
    common = ["--probes", str(probes), "--height", str(height), "--width", str(width),
              "--text-tokens", str(text_tokens), "--device", "cuda", "--json"]
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-dist-imatrix-") as tmp:
        base = pathlib.Path(tmp) / "1.imatrix.gguf"
        one = _run([sys.executable, "-m", "converter.cli", "imatrix", str(source), "-o", str(base), *common])
        t1 = one["seconds"] - one["load_seconds"]
        rows.append({"ranks": 1, "collect_seconds": t1, "samples_per_second": one["samples"] / t1,
                     "speedup": 1.0, "identical": True})
        for n in worlds:
            out = pathlib.Path(tmp) / f"{n}.imatrix.gguf"
            r = _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(n),
                      "-m", "converter.cli", "imatrix", str(source), "-o", str(out), *common])
            t = r["seconds"] - r["load_seconds"]
            rows.append({"ranks": n, "collect_seconds": t, "samples_per_second": r["samples"] / t,
                         "speedup": t1 / t, "identical": out.read_bytes() == base.read_bytes()})
    for row in rows:
        click.echo(f"{row['ranks']} GPU(s): {row['collect_seconds']:.1f} s collecting, "
                   f"{row['samples_per_second']:.2f} samples/s, {row['speedup']:.2f}x, "
                   f"{'identical' if row['identical'] else 'DIFFERENT'} file")
    if json_out is not None:
        json_out.write_text(json.dumps({"source": str(source), "probes": probes, "height": height, "width": width,
                                        "text_tokens": text_tokens, "runs": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
