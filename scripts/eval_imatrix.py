#!/usr/bin/env python
"""Static vs imatrix quantization at equal size: the transformer's output error against BF16.

Writes a synthetic FLUX checkpoint (structured by default: log-normal adaLN scales and
outlier text channels, the activation structure of trained DiTs; ``--plain`` for isotropic
Gaussian weights; ``--source`` takes an existing one), loads it once into diffusers'
FluxTransformer2DModel, collects an imatrix with ``flux-gguf imatrix``'s collector on
calibration probes (seeds 0..N-1), then for every recipe quantizes each tensor the recipe
quantizes twice with the byte-exact kernels (``convert`` writes the same bytes), once without and
once with the importance vector, puts the dequantized weights into the model and runs evaluation
probes with other seeds (1000, 1001, ...: disjoint from calibration). The reference is the BF16
checkpoint's own output (float32 compute on the CPU, bfloat16 on CUDA). Both files of a recipe
have the same tensor types, so the same size to the byte.

Examples:

    python scripts/eval_imatrix.py --json bench-out/imatrix.json
    python scripts/eval_imatrix.py --hidden 1024 --double-blocks 2 --single-blocks 2 --recipes Q3_K_S,Q4_K_M
    python scripts/eval_imatrix.py --plain          # isotropic weights: little for an imatrix to use
    python scripts/eval_imatrix.py --source /dev/shm/flux-structured.safetensors --device cuda --size 1024 \
        --text-tokens 512 --recipes Q4_K_M,Q3_K_S --threads 16     # full size on a GPU
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
from converter.quality.calibrate import (
    ImatrixCollector,
    build_transformer,
    probe_samples,
    probes_dataset,
    quantized_weight_names,
)
from converter.quality.probes import ProbeSpec, make_kontext_probe
from converter.quality.validate import compare_outputs
from converter.recipes import make_plan
from converter.sources import open_source
from converter.synthetic import write_synthetic_flux

RECIPES = ("Q2_K", "Q3_K_S", "Q4_K_M", "Q5_K_M")
EVAL_SEED = 1000


def _outputs(model: Any, probes: list[Any], device: str) -> np.ndarray:
    import torch

    from converter.quality.diffusers_model import compute_dtype

    outs = []
    with torch.inference_mode():
        for p in probes:
            kw = p.transformer_kwargs(device, compute_dtype(device), guidance_embeds=model.config.guidance_embeds)
            outs.append(model(**kw, return_dict=False)[0][:, : p.spec.target_tokens].float().cpu().numpy())
    return np.concatenate([o.reshape(-1) for o in outs])


def evaluation_setup(folder: pathlib.Path, source_path: pathlib.Path | None, geometry: FluxGeometry, *, seed: int,
                     plain: bool, size: int, text_tokens: int, evaluation_probes: int) -> tuple[Any, ProbeSpec, list[Any]]:
    """(checkpoint, calibration probe spec (seeds 0..), evaluation probes (seeds EVAL_SEED..)): the
    inputs of both benchmarks, calibration and evaluation disjoint."""
    src = source_path if source_path is not None else write_synthetic_flux(
        folder / "flux-eval.safetensors", geometry, dtype="BF16", seed=seed, structured=not plain)
    calib = ProbeSpec(height=size, width=size, text_tokens=text_tokens, seed=0)
    probes = [make_kontext_probe(ProbeSpec(height=size, width=size, text_tokens=text_tokens,
                                           seed=EVAL_SEED + i, timestep=(i + 0.5) / evaluation_probes))
              for i in range(evaluation_probes)]
    return src, calib, probes


def _synthetic_kind(path: pathlib.Path) -> str:
    """What write_synthetic_flux recorded in the file's metadata ("structured" or "plain Gaussian")."""
    import struct

    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        meta = json.loads(f.read(n)).get("__metadata__", {})
    tag = meta.get("flux_gguf.synthetic", "")
    return "structured" if tag.endswith("structured") else ("plain Gaussian" if tag else "not synthetic")


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
@click.option("--source", "source_path", type=click.Path(path_type=pathlib.Path, exists=True), default=None,
              help="Use this checkpoint (e.g. make_synthetic_flux.py --structured output) instead of writing one.")
@click.option("--recipes", default=",".join(RECIPES), show_default=True, help="Comma-separated variants.")
@click.option("--calibration-probes", default=4, show_default=True, type=click.IntRange(1))
@click.option("--evaluation-probes", default=3, show_default=True, type=click.IntRange(1))
@click.option("--size", default=256, show_default=True, type=click.IntRange(16),
              help="Probe image side in pixels (Kontext: the context image doubles the image tokens).")
@click.option("--text-tokens", default=128, show_default=True, type=click.IntRange(1))
@click.option("--plain", is_flag=True, help="Isotropic Gaussian weights instead of the structured model.")
@click.option("--seed", default=0, show_default=True, type=int, help="Seed of the synthetic weights.")
@click.option("--device", default="cpu", show_default=True, type=click.Choice(["cpu", "cuda"]),
              help="cpu: float32 compute; cuda: bfloat16 compute.")
@click.option("--threads", default=None, type=click.IntRange(1), help="Quantization kernel threads.")
@click.option("--work", type=click.Path(path_type=pathlib.Path, file_okay=False), default=None,
              help="Folder for the checkpoint and imatrix (default: a temporary folder).")
@click.option("--json", "json_path", type=click.Path(path_type=pathlib.Path, dir_okay=False), default=None,
              help="Also write the results as JSON here (rewritten after every model, so a cut run keeps its rows).")
def main(hidden: int, double_blocks: int, single_blocks: int, source_path: pathlib.Path | None, recipes: str,
         calibration_probes: int, evaluation_probes: int, size: int, text_tokens: int, plain: bool, seed: int,
         device: str, threads: int | None, work: pathlib.Path | None, json_path: pathlib.Path | None) -> None:
    """Measure output rel-L2 vs BF16 of static and imatrix quantization at equal size."""
    import torch

    from converter.detect import detect_model
    from converter.imatrix import write_imatrix
    from converter.quality.calibrate import diffusers_state_dict
    from converter.quality.diffusers_model import compute_dtype

    if threads:
        quant_kernels.set_threads(threads)
        torch.set_num_threads(threads)
    names = [r.strip() for r in recipes.split(",") if r.strip()]
    started = time.perf_counter()
    result: dict[str, Any] = {}

    def save() -> None:
        if json_path is not None:
            json_path.parent.mkdir(parents=True, exist_ok=True)
            json_path.write_text(json.dumps(result, indent=2) + "\n")

    with tempfile.TemporaryDirectory(prefix="eval-imatrix-") as tmp:
        folder = work or pathlib.Path(tmp)
        folder.mkdir(parents=True, exist_ok=True)
        src, calib, eval_probes = evaluation_setup(
            folder, source_path, FluxGeometry(double_blocks=double_blocks, single_blocks=single_blocks, hidden=hidden),
            seed=seed, plain=plain, size=size, text_tokens=text_tokens, evaluation_probes=evaluation_probes)
        with open_source(src) as source:
            geometry = detect_model(source).geometry
            structure = _synthetic_kind(pathlib.Path(src))
            plans = {r: make_plan(r, source.tensors, name="flux-eval", family="flux-dev") for r in names}
            model = build_transformer(geometry, source.read, device)
            click.echo(f"collecting on {calibration_probes} calibration probes (seeds 0..{calibration_probes - 1})",
                       err=True)
            t0 = time.perf_counter()
            with ImatrixCollector(model, quantized_weight_names({n: tuple(t.shape) for n, t in source.tensors.items()})) as collector:
                samples = list(probe_samples(calibration_probes, calib, device, compute_dtype(device),
                                             geometry.guidance))
                with torch.inference_mode():
                    for sample in samples:
                        model(**sample.kwargs, return_dict=False)
                im = collector.imatrix([probes_dataset(calibration_probes, calib)], calibration_probes,
                                       calib.image_tokens + calib.text_tokens)
            calibration_seconds = time.perf_counter() - t0
            write_imatrix(im, folder / "flux-eval.imatrix.gguf")
            reference = _outputs(model, eval_probes, device)
            result.update({
                "model": {"geometry": geometry.__dict__, "weights": structure, "dtype": "BF16", "seed": seed,
                          "synthetic": True, "source": pathlib.Path(src).name},
                "calibration": {"probes": calibration_probes, "seeds": f"0..{calibration_probes - 1}",
                                "size": size, "text_tokens": text_tokens, "seconds": calibration_seconds},
                "evaluation": {"probes": evaluation_probes,
                               "seeds": f"{EVAL_SEED}..{EVAL_SEED + evaluation_probes - 1}",
                               "size": size, "text_tokens": text_tokens},
                "median_p99_over_p50_column_energy": _energy_ratio(im),
                "device": torch.cuda.get_device_name() if device == "cuda" else platform.processor() or "cpu",
                "compute_dtype": str(compute_dtype(device)),
                "machine": {"python": platform.python_version(), "torch": torch.__version__,
                            "threads": quant_kernels.get_threads()},
                "rows": [],
            })
            jobs = [(r, mode) for r in names for mode in ("static", "imatrix")]
            for recipe, mode in tqdm(jobs, desc="quantize + evaluate", unit=" models"):
                plan = plans[recipe]
                t0 = time.perf_counter()
                for e in plan.entries:  # only the tensors the recipe quantizes change; the rest stay BF16
                    if not e.targeted:
                        continue
                    x = source.read(e.name)
                    qw = im.importance(e.name) if mode == "imatrix" else None
                    q = quant_kernels.dequantize(quant_kernels.quantize(x, e.qtype, imatrix=qw), e.qtype, e.shape)
                    model.load_state_dict(diffusers_state_dict({e.name: q}, device, compute_dtype(device)),
                                          strict=False)
                quantize_seconds = time.perf_counter() - t0
                cmp = compare_outputs(reference, _outputs(model, eval_probes, device))
                result["rows"].append({"recipe": recipe, "mode": mode, "file_bytes": plan.file_size,
                                       "rel_l2": cmp.rel_l2, "cosine": cmp.cosine, "types": plan.type_counts,
                                       "quantize_seconds": quantize_seconds})
                save()
    by = {(r["recipe"], r["mode"]): r for r in result["rows"]}
    table = []
    for recipe in names:
        s, i = by[(recipe, "static")], by[(recipe, "imatrix")]
        table.append({"recipe": recipe, "file_bytes": s["file_bytes"], "static_rel_l2": s["rel_l2"],
                      "imatrix_rel_l2": i["rel_l2"], "change": i["rel_l2"] / s["rel_l2"] - 1.0})
    result["table"] = table
    result["seconds"] = time.perf_counter() - started
    save()
    g = result["model"]["geometry"]
    click.echo(f"weights: {result['model']['weights']}; hidden {g['hidden']}, {g['double_blocks']} double + "
               f"{g['single_blocks']} single blocks; median p99/p50 column energy "
               f"{result['median_p99_over_p50_column_energy']:.1f}")
    click.echo("| recipe | file size (MB) | rel. L2 static | rel. L2 imatrix | change |")
    click.echo("|---|--:|--:|--:|--:|")
    for t in table:
        click.echo(f"| {t['recipe']} | {t['file_bytes'] / 1e6:.2f} | {t['static_rel_l2']:.4f} | "
                   f"{t['imatrix_rel_l2']:.4f} | {100 * t['change']:+.1f} % |")


if __name__ == "__main__":
    main()
