#!/usr/bin/env python
"""Cost of imatrix collection per transformer step against a plain forward, and its peak memory.

Loads a FLUX checkpoint (e.g. the full-size synthetic one from scripts/make_synthetic_flux.py)
through converter.quality.calibrate.build_transformer, then times on one seeded Kontext probe
(HEIGHTxWIDTH target + context image, TEXT tokens): plain forwards; forwards with the collector
``flux-gguf imatrix`` uses (float32 reduction per call, float64 vector per quantized weight,
shared qkv/linear1 inputs once); and, for comparison, naive hooks (every Linear's input upcast to
float64 and squared). Each mode: WARMUP untimed then STEPS timed calls, synchronized; the peak is
``torch.cuda.max_memory_allocated`` over that mode's calls.

Example:

    python scripts/make_synthetic_flux.py -o /dev/shm/flux.safetensors --structured
    python scripts/time_imatrix.py /dev/shm/flux.safetensors --json imatrix-timing.json
"""
from __future__ import annotations

import json
import pathlib
import statistics
import time
from typing import Any

import click


def _naive_hooks(model: Any) -> list[Any]:
    import torch

    sums: dict[str, Any] = {}
    handles = []
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear):
            def hook(_m: Any, args: tuple[Any, ...], name: str = name) -> None:
                x = args[0].double()
                s = x.pow(2).sum(dim=tuple(range(x.dim() - 1)))
                sums[name] = sums[name] + s if name in sums else s
            handles.append(mod.register_forward_pre_hook(hook))
    return handles


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("source", type=click.Path(path_type=pathlib.Path, exists=True))
@click.option("--height", default=1024, show_default=True)
@click.option("--width", default=1024, show_default=True)
@click.option("--text-tokens", default=512, show_default=True)
@click.option("--steps", default=5, show_default=True)
@click.option("--warmup", default=2, show_default=True)
@click.option("--device", default="cuda", show_default=True)
@click.option("--json", "json_path", type=click.Path(path_type=pathlib.Path, dir_okay=False), default=None)
def main(source: pathlib.Path, height: int, width: int, text_tokens: int, steps: int, warmup: int, device: str,
         json_path: pathlib.Path | None) -> None:
    """Time plain forwards, collecting forwards and naive-hook forwards on SOURCE."""
    import torch

    from converter.detect import detect_model
    from converter.layout import bfl_tensor_shapes
    from converter.quality.calibrate import ImatrixCollector, build_transformer, quantized_weight_names
    from converter.quality.diffusers_model import compute_dtype
    from converter.quality.probes import ProbeSpec, make_kontext_probe
    from converter.sources import open_source

    cuda = device == "cuda"
    t0 = time.perf_counter()
    with open_source(source) as s:
        geometry = detect_model(s).geometry
        model = build_transformer(geometry, s.read, device)
    load_seconds = time.perf_counter() - t0
    spec = ProbeSpec(height=height, width=width, text_tokens=text_tokens)
    kwargs = make_kontext_probe(spec).transformer_kwargs(device, compute_dtype(device),
                                                         guidance_embeds=geometry.guidance)
    names = quantized_weight_names(bfl_tensor_shapes(geometry))

    def run(n: int) -> list[float]:
        times = []
        with torch.inference_mode():
            for _ in range(n):
                if cuda:
                    torch.cuda.synchronize()
                t = time.perf_counter()
                model(**kwargs, return_dict=False)
                if cuda:
                    torch.cuda.synchronize()
                times.append(time.perf_counter() - t)
        return times

    def measure(label: str) -> dict[str, Any]:
        run(warmup)
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        times = run(steps)
        peak = int(torch.cuda.max_memory_allocated()) if cuda else None
        mem = f", peak {peak / 2**30:.2f} GiB" if peak is not None else ""
        click.echo(f"{label}: {statistics.median(times):.4f} s/step{mem}", err=True)
        return {"seconds_per_step": statistics.median(times), "step_seconds": times, "peak_memory_bytes": peak}

    results = {"plain": measure("plain forward")}
    with ImatrixCollector(model, names) as collector:
        results["collect"] = measure("collecting (flux-gguf imatrix)")
        im = collector.imatrix(["timing"], warmup + steps, spec.image_tokens + spec.text_tokens)
    handles = _naive_hooks(model)
    results["naive_float64"] = measure("naive float64 hooks")
    for h in handles:
        h.remove()
    plain = results["plain"]["seconds_per_step"]
    doc = {
        "source": source.name,
        "geometry": geometry.__dict__,
        "probe": spec.to_dict(),
        "device": torch.cuda.get_device_name() if cuda else device,
        "torch": torch.__version__,
        "dtype": str(compute_dtype(device)),
        "load_seconds": load_seconds,
        "steps": steps,
        "warmup": warmup,
        "entries": len(im.entries),
        "results": results,
        "collect_over_plain": results["collect"]["seconds_per_step"] / plain,
        "naive_over_plain": results["naive_float64"]["seconds_per_step"] / plain,
    }
    text = json.dumps(doc, indent=2)
    if json_path is not None:
        json_path.write_text(text + "\n")
    click.echo(text)


if __name__ == "__main__":
    main()
