#!/usr/bin/env python
"""Static vs imatrix quantization at equal size: the transformer's output error against BF16.

Writes a synthetic FLUX checkpoint (``--structured`` by default: log-normal adaLN scales and
outlier text channels, the activation structure of trained DiTs; ``--plain`` for isotropic
Gaussian weights), collects an imatrix with ``flux-gguf imatrix``'s collector on calibration
probes (seeds 0..N-1), then for every recipe quantizes each tensor the recipe quantizes twice
with the byte-exact kernels (``convert`` writes the same bytes), once without and once with the
importance vector, dequantizes, loads the result into diffusers' FluxTransformer2DModel and runs
evaluation probes with other seeds (1000, 1001, ...: disjoint from calibration). The reference
is the BF16 checkpoint itself, computed in float32 on the CPU. Both files of a recipe have the
same tensor types, so the same size to the byte.

Examples:

    python scripts/eval_imatrix.py --json bench-out/imatrix.json
    python scripts/eval_imatrix.py --hidden 1024 --double-blocks 2 --single-blocks 2 --recipes Q3_K_S,Q4_K_M
    python scripts/eval_imatrix.py --plain          # isotropic weights: little for an imatrix to use
"""
from __future__ import annotations

import json
import pathlib
import platform
import tempfile
import time
from typing import Any

import click
import numpy as np
from tqdm import tqdm

import quant_kernels
from converter.layout import FluxGeometry
from converter.quality.calibrate import build_transformer, collect_imatrix
from converter.quality.probes import ProbeSpec, make_kontext_probe
from converter.quality.validate import compare_outputs
from converter.recipes import make_plan
from converter.sources import open_source
from converter.synthetic import write_synthetic_flux

RECIPES = ("Q2_K", "Q3_K_S", "Q4_K_M", "Q5_K_M")
EVAL_SEED = 1000


def _outputs(model: Any, probes: list[Any]) -> np.ndarray:
    import torch

    outs = []
    with torch.inference_mode():
        for p in probes:
            kw = p.transformer_kwargs("cpu", torch.float32, guidance_embeds=model.config.guidance_embeds)
            outs.append(model(**kw, return_dict=False)[0][:, : p.spec.target_tokens].float().numpy())
    return np.concatenate([o.reshape(-1) for o in outs])


def _energy_ratio(im: Any) -> float:
    """Median over weights of p99/p50 of the per-column input energy: how much structure there is."""
    ratios = []
    for name in im.entries:
        v = im.importance(name).astype(np.float64)
        p50 = np.percentile(v, 50)
        if p50 > 0:
            ratios.append(np.percentile(v, 99) / p50)
    return float(np.median(ratios))


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--hidden", default=1024, show_default=True, type=click.IntRange(128))
@click.option("--double-blocks", default=2, show_default=True, type=click.IntRange(1))
@click.option("--single-blocks", default=2, show_default=True, type=click.IntRange(1))
@click.option("--recipes", default=",".join(RECIPES), show_default=True, help="Comma-separated variants.")
@click.option("--calibration-probes", default=4, show_default=True, type=click.IntRange(1))
@click.option("--evaluation-probes", default=3, show_default=True, type=click.IntRange(1))
@click.option("--size", default=256, show_default=True, type=click.IntRange(16),
              help="Probe image side in pixels (Kontext: the context image doubles the image tokens).")
@click.option("--text-tokens", default=128, show_default=True, type=click.IntRange(1))
@click.option("--plain", is_flag=True, help="Isotropic Gaussian weights instead of the structured model.")
@click.option("--seed", default=0, show_default=True, type=int, help="Seed of the synthetic weights.")
@click.option("--threads", default=None, type=click.IntRange(1), help="Quantization kernel threads.")
@click.option("--work", type=click.Path(path_type=pathlib.Path, file_okay=False), default=None,
              help="Folder for the checkpoint and imatrix (default: a temporary folder).")
@click.option("--json", "json_path", type=click.Path(path_type=pathlib.Path, dir_okay=False), default=None,
              help="Also write the results as JSON here.")
def main(hidden: int, double_blocks: int, single_blocks: int, recipes: str, calibration_probes: int,
         evaluation_probes: int, size: int, text_tokens: int, plain: bool, seed: int, threads: int | None,
         work: pathlib.Path | None, json_path: pathlib.Path | None) -> None:
    """Measure output rel-L2 vs BF16 of static and imatrix quantization at equal size."""
    import torch

    from converter.imatrix import write_imatrix

    if threads:
        quant_kernels.set_threads(threads)
        torch.set_num_threads(threads)
    geometry = FluxGeometry(double_blocks=double_blocks, single_blocks=single_blocks, hidden=hidden)
    names = [r.strip() for r in recipes.split(",") if r.strip()]
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="eval-imatrix-") as tmp:
        folder = work or pathlib.Path(tmp)
        folder.mkdir(parents=True, exist_ok=True)
        src = write_synthetic_flux(folder / "flux-eval.safetensors", geometry, dtype="BF16", seed=seed,
                                   structured=not plain)
        calib = ProbeSpec(height=size, width=size, text_tokens=text_tokens, seed=0)
        click.echo(f"collecting on {calibration_probes} calibration probes (seeds 0..{calibration_probes - 1})",
                   err=True)
        collected = collect_imatrix(src, probes=calibration_probes, probe=calib, device="cpu")
        im = collected.imatrix
        write_imatrix(im, folder / "flux-eval.imatrix.gguf")
        eval_probes = [make_kontext_probe(ProbeSpec(height=size, width=size, text_tokens=text_tokens,
                                                    seed=EVAL_SEED + i, timestep=(i + 0.5) / evaluation_probes))
                       for i in range(evaluation_probes)]
        with open_source(src) as source:
            weights = {n: source.read(n) for n in source.tensors}
            plans = {r: make_plan(r, source.tensors, name="flux-eval", family="flux-dev") for r in names}
        reference = _outputs(build_transformer(geometry, weights.__getitem__, "cpu"), eval_probes)
        rows = []
        jobs = [(r, mode) for r in names for mode in ("static", "imatrix")]
        for recipe, mode in tqdm(jobs, desc="quantize + evaluate", unit=" models"):
            plan = plans[recipe]
            quantized = dict(weights)
            for e in plan.entries:
                if not e.targeted:
                    continue
                qw = im.importance(e.name) if mode == "imatrix" else None
                data = quant_kernels.quantize(weights[e.name], e.qtype, imatrix=qw)
                quantized[e.name] = quant_kernels.dequantize(data, e.qtype, e.shape)
            out = _outputs(build_transformer(geometry, quantized.__getitem__, "cpu"), eval_probes)
            cmp = compare_outputs(reference, out)
            rows.append({"recipe": recipe, "mode": mode, "file_bytes": plan.file_size, "rel_l2": cmp.rel_l2,
                         "cosine": cmp.cosine, "types": plan.type_counts})
            del quantized
    by = {(r["recipe"], r["mode"]): r for r in rows}
    table = []
    for recipe in names:
        s, i = by[(recipe, "static")], by[(recipe, "imatrix")]
        table.append({"recipe": recipe, "file_bytes": s["file_bytes"], "static_rel_l2": s["rel_l2"],
                      "imatrix_rel_l2": i["rel_l2"], "change": i["rel_l2"] / s["rel_l2"] - 1.0})
    result = {
        "model": {"geometry": geometry.__dict__, "weights": "plain Gaussian" if plain else "structured",
                  "dtype": "BF16", "seed": seed, "synthetic": True},
        "calibration": {"probes": calibration_probes, "seeds": f"0..{calibration_probes - 1}",
                        "size": size, "text_tokens": text_tokens, "seconds": collected.seconds},
        "evaluation": {"probes": evaluation_probes, "seeds": f"{EVAL_SEED}..{EVAL_SEED + evaluation_probes - 1}",
                       "size": size, "text_tokens": text_tokens},
        "median_p99_over_p50_column_energy": _energy_ratio(im),
        "table": table,
        "rows": rows,
        "machine": {"cpu": platform.processor() or platform.machine(), "python": platform.python_version(),
                    "torch": torch.__version__, "threads": torch.get_num_threads()},
        "seconds": time.perf_counter() - started,
    }
    if json_path is not None:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(result, indent=2) + "\n")
    click.echo(f"{'weights: plain' if plain else 'weights: structured'}; hidden {hidden}, {double_blocks} double + "
               f"{single_blocks} single blocks; median p99/p50 column energy {result['median_p99_over_p50_column_energy']:.1f}")
    click.echo("| recipe | file size (MB) | rel. L2 static | rel. L2 imatrix | change |")
    click.echo("|---|--:|--:|--:|--:|")
    for t in table:
        click.echo(f"| {t['recipe']} | {t['file_bytes'] / 1e6:.2f} | {t['static_rel_l2']:.4f} | "
                   f"{t['imatrix_rel_l2']:.4f} | {100 * t['change']:+.1f} % |")


if __name__ == "__main__":
    main()
