#!/usr/bin/env python
"""Output error vs file size: static recipes, imatrix recipes and size-targeted mixes.

On a synthetic FLUX checkpoint (structured by default, as scripts/eval_imatrix.py; ``--source``
takes an existing one) loaded once into diffusers' FluxTransformer2DModel:

1. an imatrix is collected on calibration probes (seeds 0..N-1), then the sensitivity file is
   measured on the same probes (``flux-gguf sensitivity``'s code, with that imatrix);
2. for every recipe: the static file, the imatrix file, and the target-size mix planned at the
   recipe's exact file size (``convert --target-size`` with the sensitivity file and imatrix) are
   quantized with the byte-exact kernels, put into the model and run on evaluation probes with
   other seeds (1000, 1001, ...: disjoint from calibration); the table gives each one's output
   rel-L2 against the source's own output and its exact file bytes;
3. the sensitivity file's prediction check (Spearman over (tensor, type) pairs) is reported.

Examples:

    python scripts/eval_target_size.py --json bench-out/target-size.json
    python scripts/eval_target_size.py --hidden 1024 --double-blocks 4 --single-blocks 8 --threads 2
    python scripts/eval_target_size.py --source /dev/shm/flux-structured.safetensors --device cuda --size 1024 \
        --text-tokens 512 --threads 16      # full size on a GPU
"""
from __future__ import annotations

import json
import pathlib
import platform
import sys
import tempfile
import time
from typing import Any

import click
from tqdm import tqdm

import quant_kernels
from converter.errors import TargetRangeError
from converter.imatrix import read_imatrix, uses_imatrix, write_imatrix
from converter.layout import FluxGeometry
from converter.pipeline import plan_source_target
from converter.quality.calibrate import (
    ImatrixCollector,
    build_transformer,
    diffusers_state_dict,
    probe_samples,
    probes_dataset,
    quantized_weight_names,
)
from converter.quality.sensitivity import measure_sensitivity
from converter.quality.validate import compare_outputs
from converter.recipes import make_plan, parse_sensitivity, size_budget
from converter.sources import open_source

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from eval_imatrix import EVAL_SEED, _outputs, evaluation_setup  # noqa: E402 - the imatrix benchmark's evaluation

RECIPES = ("Q2_K", "Q3_K_S", "Q3_K_M", "Q4_K_S", "Q4_K_M", "Q5_K_M")


def _load(model: Any, source: Any, entries: Any, im: Any, device: str, dirty: set[str]) -> None:
    """Every tensor the plan quantizes, quantized (imatrix where given and taken) and put in the model.

    ``dirty``: the tensors an earlier file left quantized in the model. Those this plan does not
    quantize (kept in the source precision) are put back from the source; the others are simply
    overwritten, which halves the time per file at full size (each full-model reload of source
    weights was about as long as quantizing it)."""
    from converter.quality.diffusers_model import compute_dtype

    targeted = {e.name for e in entries if e.targeted}
    for name in sorted(dirty - targeted):
        model.load_state_dict(diffusers_state_dict({name: source.read(name)}, device, compute_dtype(device)),
                              strict=False)
    dirty.clear()
    for e in entries:
        if not e.targeted:
            continue
        x = source.read(e.name)
        qw = im.importance(e.name) if im is not None and uses_imatrix(e.qtype) else None
        q = quant_kernels.dequantize(quant_kernels.quantize(x, e.qtype, imatrix=qw), e.qtype, e.shape)
        model.load_state_dict(diffusers_state_dict({e.name: q}, device, compute_dtype(device)), strict=False)
        dirty.add(e.name)


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--hidden", default=1024, show_default=True, type=click.IntRange(128))
@click.option("--double-blocks", default=2, show_default=True, type=click.IntRange(1))
@click.option("--single-blocks", default=2, show_default=True, type=click.IntRange(1))
@click.option("--source", "source_path", type=click.Path(path_type=pathlib.Path, exists=True), default=None)
@click.option("--recipes", default=",".join(RECIPES), show_default=True, help="Comma-separated variants.")
@click.option("--calibration-probes", default=4, show_default=True, type=click.IntRange(1))
@click.option("--evaluation-probes", default=3, show_default=True, type=click.IntRange(1))
@click.option("--size", default=256, show_default=True, type=click.IntRange(16))
@click.option("--text-tokens", default=128, show_default=True, type=click.IntRange(1))
@click.option("--check-tensors", default=8, show_default=True, type=click.IntRange(0))
@click.option("--plain", is_flag=True, help="Isotropic Gaussian weights instead of the structured model.")
@click.option("--seed", default=0, show_default=True, type=int, help="Seed of the synthetic weights.")
@click.option("--device", default="cpu", show_default=True, type=click.Choice(["cpu", "cuda"]))
@click.option("--threads", default=None, type=click.IntRange(1), help="Quantization kernel and torch threads.")
@click.option("--sensitivity", "sensitivity_path", type=click.Path(path_type=pathlib.Path, dir_okay=False), default=None,
              help="Reuse a sensitivity file an earlier run of the same arguments kept (JSON.sensitivity.json).")
@click.option("--imatrix", "imatrix_path", type=click.Path(path_type=pathlib.Path, dir_okay=False, exists=True),
              default=None, help="Reuse the imatrix an earlier run kept (JSON.imatrix.gguf) instead of collecting.")
@click.option("--json", "json_path", type=click.Path(path_type=pathlib.Path, dir_okay=False), default=None)
def main(hidden: int, double_blocks: int, single_blocks: int, source_path: pathlib.Path | None, recipes: str,
         calibration_probes: int, evaluation_probes: int, size: int, text_tokens: int, check_tensors: int,
         plain: bool, seed: int, device: str, threads: int | None, sensitivity_path: pathlib.Path | None,
         imatrix_path: pathlib.Path | None, json_path: pathlib.Path | None) -> None:
    """Measure output rel-L2 vs file size for static, imatrix and target-size files."""
    import torch

    from converter.detect import detect_model
    from converter.quality.diffusers_model import compute_dtype

    if threads:
        quant_kernels.set_threads(threads)
        torch.set_num_threads(threads)
    names = [r.strip() for r in recipes.split(",") if r.strip()]
    started = time.perf_counter()
    result: dict[str, Any] = {"rows": []}

    def save() -> None:
        if json_path is not None:
            json_path.parent.mkdir(parents=True, exist_ok=True)
            json_path.write_text(json.dumps(result, indent=2) + "\n")

    with tempfile.TemporaryDirectory(prefix="eval-target-") as tmp:
        src, calib, eval_probes = evaluation_setup(
            pathlib.Path(tmp), source_path,
            FluxGeometry(double_blocks=double_blocks, single_blocks=single_blocks, hidden=hidden),
            seed=seed, plain=plain, size=size, text_tokens=text_tokens, evaluation_probes=evaluation_probes)
        with open_source(src) as source:
            geometry = detect_model(source).geometry
            model = build_transformer(geometry, source.read, device)
            t0 = time.perf_counter()
            shapes = {n: tuple(t.shape) for n, t in source.tensors.items()}
            if imatrix_path is not None:
                im = read_imatrix(imatrix_path)
            else:
                with ImatrixCollector(model, quantized_weight_names(shapes)) as collector:
                    with torch.inference_mode():
                        for sample in probe_samples(calibration_probes, calib, device, compute_dtype(device),
                                                    geometry.guidance):
                            model(**sample.kwargs, return_dict=False)
                    im = collector.imatrix([probes_dataset(calibration_probes, calib)], calibration_probes,
                                           calib.image_tokens + calib.text_tokens)
                if json_path is not None:  # kept, so that a later run can reuse the same imatrix
                    json_path.parent.mkdir(parents=True, exist_ok=True)
                    write_imatrix(im, json_path.with_suffix(".imatrix.gguf"))
            imatrix_seconds = time.perf_counter() - t0
            t0 = time.perf_counter()
            if sensitivity_path is not None:
                document = json.loads(sensitivity_path.read_text())
            else:
                with tqdm(desc="sensitivity", unit=" tensors") as bar:
                    def progress(done: int, total: int) -> None:
                        bar.total = total
                        bar.update(done - bar.n)
                    document = measure_sensitivity(src, probes=calibration_probes, probe=calib, device=device,
                                                   imatrix=im, check_tensors=check_tensors, progress=progress,
                                                   model=model).document
            sensitivity_seconds = time.perf_counter() - t0
            sens = parse_sensitivity(document, "eval.sensitivity.json")
            if json_path is not None:  # kept: the slow part of the run
                json_path.parent.mkdir(parents=True, exist_ok=True)
                json_path.with_suffix(".sensitivity.json").write_text(json.dumps(document, indent=1) + "\n")
            reference = _outputs(model, eval_probes, device)
            result.update({
                "model": {"geometry": geometry.__dict__, "weights": "plain Gaussian" if plain else "structured",
                          "synthetic": True, "dtype": "BF16", "seed": seed},
                "calibration": {"probes": calibration_probes, "seeds": f"0..{calibration_probes - 1}",
                                "size": size, "text_tokens": text_tokens},
                "evaluation": {"probes": evaluation_probes,
                               "seeds": f"{EVAL_SEED}..{EVAL_SEED + evaluation_probes - 1}"},
                "imatrix_seconds": imatrix_seconds, "sensitivity_seconds": sensitivity_seconds,
                "check": {k: v for k, v in document["check"].items() if k != "rows"},
                "sensitivity_reused": sensitivity_path is not None, "imatrix_reused": imatrix_path is not None,
                "device": torch.cuda.get_device_name() if device == "cuda" else platform.processor() or "cpu",
                "threads": quant_kernels.get_threads(),
            })
            jobs = []
            for recipe in names:
                static = make_plan(recipe, source.tensors, name="flux-eval", family="flux-dev")
                try:
                    mix = plan_source_target(source, sens, size_budget(str(static.file_size)), imatrix=im)
                except TargetRangeError as e:  # Q2_K: the all-Q2_K mix, whose header (its record) is larger
                    mix = plan_source_target(source, sens, size_budget(str(int(e.low) + 64)), imatrix=im)
                jobs += [(recipe, "static", static, None, None), (recipe, "imatrix", static, im, None),
                         (recipe, "target", mix.plan, im, mix.predicted_rel_l2)]
            dirty: set[str] = set()
            for recipe, mode, plan, imx, predicted in tqdm(jobs, desc="quantize + evaluate", unit=" models"):
                t_model = time.perf_counter()
                _load(model, source, plan.entries, imx, device, dirty)
                cmp = compare_outputs(reference, _outputs(model, eval_probes, device))
                result["rows"].append({"recipe": recipe, "mode": mode, "file_bytes": plan.file_size,
                                       "rel_l2": cmp.rel_l2, "predicted_rel_l2": predicted,
                                       "types": plan.type_counts, "seconds": time.perf_counter() - t_model})
                save()
    result["seconds"] = time.perf_counter() - started
    save()
    by = {(r["recipe"], r["mode"]): r for r in result["rows"]}
    g = result["model"]["geometry"]
    c = result["check"]
    click.echo(f"weights: {result['model']['weights']} synthetic; hidden {g['hidden']}, {g['double_blocks']} double + "
               f"{g['single_blocks']} single blocks; calibration seeds {result['calibration']['seeds']}, "
               f"evaluation seeds {result['evaluation']['seeds']}; sensitivity {sensitivity_seconds:.0f} s")
    click.echo(f"prediction check: Spearman {c['spearman']} over {c['pairs']} pairs, per type {c['spearman_by_type']}, "
               f"median predicted/measured {c['median_predicted_over_measured']}; imatrix-weighted weight error "
               f"alone vs output error: Spearman {c['weight_error_vs_output_error_spearman']}")
    click.echo("| recipe | static MB | static rel-L2 | imatrix rel-L2 | target MB | target rel-L2 (predicted) | "
               "target vs static |")
    click.echo("|---|--:|--:|--:|--:|--:|--:|")
    for recipe in names:
        s, i, t = by[(recipe, "static")], by[(recipe, "imatrix")], by[(recipe, "target")]
        click.echo(f"| {recipe} | {s['file_bytes'] / 1e6:.3f} | {s['rel_l2']:.4f} | {i['rel_l2']:.4f} | "
                   f"{t['file_bytes'] / 1e6:.3f} | {t['rel_l2']:.4f} ({t['predicted_rel_l2']:.4f}) | "
                   f"{100 * (t['rel_l2'] / s['rel_l2'] - 1):+.1f} % |")


if __name__ == "__main__":
    main()
