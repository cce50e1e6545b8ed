#!/usr/bin/env python
"""Measure the transformer's activation memory for one 1024x1024 denoising step, as a GGUF user runs it.

The figure is what the model card's "Which file for my GPU" estimate adds to a file's size
(converter/release/modelcard.py ``ACTIVATIONS_1024_BYTES``). What is measured:

* a synthetic checkpoint at FULL WIDTH (FLUX.1: hidden 3072, 24 heads; FLUX.2: the family's width, e.g. [klein] 4B: hidden 3072,
  24 heads, context 7680, ``layout.flux2_geometry``) but reduced depth, converted to Q4_K_M by our
  converter and loaded with diffusers ``from_single_file(..., quantization_config=GGUFQuantizationConfig(
  compute_dtype=torch.bfloat16))`` and a local config folder, as the card's diffusers snippet does;
* one transformer call under ``torch.inference_mode`` in bfloat16 on the card's workload: a 1024x1024
  target (64x64 = 4096 latent tokens), one 1024x1024 reference image (4096 more tokens: FLUX.1 Kontext's
  and FLUX.2's image editing) and 512 text tokens (T5 for FLUX.1, Qwen3 for [klein]);
* the bytes allocated during the call on top of what was allocated before it (weights, inputs): the
  residual streams, the attention and MLP intermediates, the RoPE tables, the output, and the weight that
  diffusers' GGUF layer dequantizes on the fly for each matmul (``GGUFLinear.forward_native``: the
  dequantized copy, then its bf16 cast, live during ``F.linear``), so the largest layer's dequantized
  weight is in the peak.

Why the depth does not matter (and the measurement at reduced depth is the full model's):
under ``inference_mode`` autograd saves nothing, so a block's intermediates are freed when the block
returns; between blocks only the residual streams (image and text hidden states, each the same shape
after every block), the modulation vectors and the RoPE tables stay alive, and they do not grow with
the block count. Every double block has the same shapes, as does every single block, so the transient
peak inside one block is the same for each: peak(N double + M single) = what persists +
max(peak of a double block, peak of a single block) = peak(1 + 1) for any N, M >= 1. The script checks
this by measuring a second depth (``--check-depth``, default 2 + 2) and reports whether the peaks agree.

How it is measured (each depth in a fresh child process, so earlier loads leave nothing behind):

* CPU, exact: ``torch.profiler`` with ``profile_memory=True``; every allocation and free of torch's CPU
  allocator is an event carrying the allocator's running total ("Total Allocated"); the peak is its
  maximum over the call minus its value before the call's first allocation. It counts torch's
  allocator only (not oneDNN's or glibc's private scratch memory).
* CPU, cross-check: the process's peak resident set (``VmHWM``, reset through ``/proc/self/clear_refs``
  just before the call) minus the resident set then; the GGUF weights are memory-mapped, so every
  page of them is read before the reset, and glibc is told to return large blocks at once
  (``MALLOC_MMAP_THRESHOLD_``). It includes what the profiler misses and the profiler's own events.
* CUDA (``--device cuda``, for a GPU session to re-measure): ``torch.cuda.max_memory_allocated`` after
  ``reset_peak_memory_stats``, minus ``memory_allocated`` before; ``max_memory_reserved`` is reported
  beside it. Neither includes the CUDA context (a few hundred MiB per process) nor what the caching
  allocator keeps beyond its peak, and diffusers may use its fused CUDA GGUF kernels there (no
  dequantized weight then), so the CPU figure is an estimate of the GPU's.

Examples:

    python scripts/measure_activations.py --json activations.json                  # FLUX.1 Kontext, 1+1 and 2+2
    python scripts/measure_activations.py --family flux2-klein-4b --json klein.json
    python scripts/measure_activations.py --size 256 --check-depth 0               # a quick smoke run
    python scripts/measure_activations.py --device cuda --json gpu.json
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import pathlib
import platform
import subprocess
import sys
import tempfile
import time

import click

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

FAMILIES = ("flux1-kontext", "flux2-dev", "flux2-klein-4b", "flux2-klein-9b")
TOKEN_PIXELS = 16  # VAE 8x, then 2x2 patches
MMAP_THRESHOLD = 1 << 17  # glibc: blocks above 128 KiB are mmap'd and returned to the OS on free


def geometry(family: str, double_blocks: int, single_blocks: int):
    from converter.layout import FluxGeometry, flux2_geometry

    if family == "flux1-kontext":
        return FluxGeometry(double_blocks=double_blocks, single_blocks=single_blocks)  # hidden 3072
    return dataclasses.replace(flux2_geometry(family), double_blocks=double_blocks, single_blocks=single_blocks)


@contextlib.contextmanager
def _reduced_flux2_depth(family: str, double_blocks: int, single_blocks: int):
    """FLUX.2 files are detected by their published block counts (layout.FLUX2_SIZES), so a reduced-depth
    [klein] 4B would be refused: for this process only, the reduced depth is added as one more [klein] 4B
    size. The per-tensor rules (types, kept tensors) do not depend on the depth, so every tensor is
    converted as in the full model."""
    from converter import layout

    if not family.startswith("flux2"):
        yield
        return
    full = layout.FLUX2_FAMILIES[family]
    saved = layout.FLUX2_SIZES
    layout.FLUX2_SIZES = (*saved, dataclasses.replace(full, double_blocks=double_blocks, single_blocks=single_blocks))
    try:
        yield
    finally:
        layout.FLUX2_SIZES = saved


def build(folder: pathlib.Path, family: str, double_blocks: int, single_blocks: int) -> tuple[pathlib.Path, pathlib.Path]:
    """Synthetic BF16 checkpoint -> Q4_K_M GGUF (our converter) and its diffusers config folder."""
    from converter.pipeline import convert
    from converter.quality.diffusers_model import write_transformer_config
    from converter.synthetic import write_synthetic_flux

    geo = geometry(family, double_blocks, single_blocks)
    folder.mkdir(parents=True, exist_ok=True)
    name = f"{family}-{double_blocks}d{single_blocks}s"
    gguf = folder / f"{name}-Q4_K_M.gguf"
    config = folder / f"{name}-config"
    if not gguf.exists():
        source = folder / f"{name}.safetensors"
        write_synthetic_flux(source, geo, dtype="BF16", seed=0)
        with _reduced_flux2_depth(family, double_blocks, single_blocks):
            convert(source, folder, ["Q4_K_M"], name=name)
        source.unlink()
    write_transformer_config(geo, config)
    return gguf, config


def inputs(family: str, size: int, text_tokens: int, reference: bool, device: str, dtype):
    """One transformer call's keyword arguments (seeded; the values do not change the memory)."""
    import numpy as np
    import torch

    from converter.layout import CONTEXT_DIM, FLUX2_CHANNELS, FLUX2_FAMILIES, OUT_CHANNELS, VEC_DIM

    side = size // TOKEN_PIXELS
    images = 2 if reference else 1
    rng = np.random.default_rng(0)

    def t(a, dt=dtype):
        return torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32)).to(device=device, dtype=dt)

    rows, cols = np.meshgrid(np.arange(side), np.arange(side), indexing="ij")
    if family == "flux1-kontext":  # FluxKontextPipeline: ids (image index, row, column), text ids zero
        ids = [np.stack([np.full(side * side, k), rows.ravel(), cols.ravel()], 1) for k in range(images)]
        return dict(hidden_states=t(rng.standard_normal((1, images * side * side, OUT_CHANNELS))),
                    encoder_hidden_states=t(0.2 * rng.standard_normal((1, text_tokens, CONTEXT_DIM))),
                    pooled_projections=t(rng.standard_normal((1, VEC_DIM))),
                    timestep=torch.full((1,), 0.5, device=device, dtype=dtype),
                    img_ids=t(np.concatenate(ids), torch.float32), txt_ids=t(np.zeros((text_tokens, 3)), torch.float32),
                    guidance=torch.full((1,), 2.5, device=device, dtype=torch.float32))
    # Flux2KleinPipeline: 4-D ids (T, H, W, L); reference images get T = 10, 20, ... ; text ids (0, 0, 0, l)
    ids = [np.stack([np.full(side * side, 10 * k), rows.ravel(), cols.ravel(), np.zeros(side * side)], 1)
           for k in range(images)]
    txt = np.stack([np.zeros(text_tokens)] * 3 + [np.arange(text_tokens)], 1)
    size_ = FLUX2_FAMILIES[family]
    out = dict(hidden_states=t(rng.standard_normal((1, images * side * side, FLUX2_CHANNELS))),
               encoder_hidden_states=t(0.2 * rng.standard_normal((1, text_tokens, size_.context_dim))),
               timestep=torch.full((1,), 0.5, device=device, dtype=dtype),
               img_ids=t(np.concatenate(ids), torch.float32), txt_ids=t(txt, torch.float32))
    if size_.guidance:  # FLUX.2 [dev] embeds the guidance scale; [klein] has no guidance input
        out["guidance"] = torch.full((1,), 4.0, device=device, dtype=torch.float32)
    return out


def _status(field: str) -> int:
    """A /proc/self/status memory field in bytes."""
    for line in pathlib.Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def _profiler_peak(trace: pathlib.Path) -> tuple[int, int]:
    """(peak bytes over the baseline, memory events) from a chrome trace of the CPU allocator."""
    events = [e for e in json.loads(trace.read_text())["traceEvents"] if e.get("name") == "[memory]"]
    events = [e for e in events if e["args"].get("Device Type") == 0]  # CPU
    if not events:
        raise RuntimeError(f"{trace}: the profiler recorded no CPU memory events")
    events.sort(key=lambda e: e["ts"])
    baseline = events[0]["args"]["Total Allocated"] - events[0]["args"]["Bytes"]
    return max(e["args"]["Total Allocated"] for e in events) - baseline, len(events)


def measure(gguf: pathlib.Path, config: pathlib.Path, family: str, size: int, text_tokens: int, reference: bool,
            device: str) -> dict:
    """Load ``gguf`` as diffusers users do and measure one call (run in a fresh process)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import diffusers
    import torch

    cls = diffusers.Flux2Transformer2DModel if family.startswith("flux2") else diffusers.FluxTransformer2DModel
    model = cls.from_single_file(str(gguf), config=str(config), local_files_only=True, torch_dtype=torch.bfloat16,
                                 quantization_config=diffusers.GGUFQuantizationConfig(compute_dtype=torch.bfloat16))
    if device == "cuda":
        model = model.to("cuda")
    kwargs = inputs(family, size, text_tokens, reference, device, torch.bfloat16)
    for p in model.parameters():  # read every (memory-mapped) weight page now, not during the call
        p.detach().as_subclass(torch.Tensor).reshape(-1)[::1024].sum()
    result = {"device": device, "tokens": {"image": kwargs["hidden_states"].shape[1],
                                           "text": kwargs["encoder_hidden_states"].shape[1]},
              "quantized_layers": sum(type(p).__name__ == "GGUFParameter" for p in model.parameters())}
    if device == "cuda":
        torch.cuda.synchronize()
        before, reserved = torch.cuda.memory_allocated(), torch.cuda.memory_reserved()
        torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        with torch.inference_mode():
            out = model(**kwargs, return_dict=False)[0]
        torch.cuda.synchronize()
        result.update(peak_bytes=torch.cuda.max_memory_allocated() - before,
                      reserved_peak_bytes=torch.cuda.max_memory_reserved() - reserved,
                      method="torch.cuda.max_memory_allocated - memory_allocated before",
                      gpu=torch.cuda.get_device_name())
    else:
        from torch.profiler import ProfilerActivity, profile

        pathlib.Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
        rss_before = _status("VmRSS")
        start = time.perf_counter()
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            with torch.inference_mode():
                out = model(**kwargs, return_dict=False)[0]
        seconds = time.perf_counter() - start
        rss_peak = _status("VmHWM") - rss_before
        with tempfile.TemporaryDirectory() as tmp:
            trace = pathlib.Path(tmp) / "trace.json"
            prof.export_chrome_trace(str(trace))
            peak, n_events = _profiler_peak(trace)
        result.update(peak_bytes=peak, rss_peak_bytes=rss_peak, memory_events=n_events,
                      method="torch.profiler profile_memory: max Total Allocated - before; cross-check VmHWM - VmRSS")
        result["seconds"] = seconds
    result.setdefault("seconds", time.perf_counter() - start)
    result["output_shape"] = list(out.shape)
    return result


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--family", default="flux1-kontext", show_default=True, type=click.Choice(FAMILIES))
@click.option("--double-blocks", default=1, show_default=True, type=click.IntRange(min=1))
@click.option("--single-blocks", default=1, show_default=True, type=click.IntRange(min=1))
@click.option("--check-depth", default="2,2", show_default=True,
              help="A second DOUBLE,SINGLE depth to measure; its peak must equal the first's ('0' skips it).")
@click.option("--size", default=1024, show_default=True, type=click.IntRange(min=TOKEN_PIXELS),
              help="Image side in pixels (target and reference).")
@click.option("--text-tokens", default=512, show_default=True, type=click.IntRange(min=1))
@click.option("--reference/--no-reference", default=True, show_default=True,
              help="One reference image as large as the target (Kontext / FLUX.2 editing).")
@click.option("--device", default="cpu", show_default=True, type=click.Choice(["cpu", "cuda"]))
@click.option("--threads", default=None, type=click.IntRange(min=1), help="torch CPU threads (default: torch's).")
@click.option("--workdir", default=None, type=click.Path(path_type=pathlib.Path),
              help="Where the synthetic files go (kept for the next run); default: a temporary folder.")
@click.option("--json", "json_out", default=None, type=click.Path(path_type=pathlib.Path), help="Write the results here.")
@click.option("--child", default=None, hidden=True)
def main(family, double_blocks, single_blocks, check_depth, size, text_tokens, reference, device, threads, workdir,
         json_out, child):
    """Measure one step's activation memory of a Q4_K_M GGUF transformer loaded by diffusers."""
    if size % TOKEN_PIXELS:
        raise click.BadParameter(f"{size} is not a multiple of {TOKEN_PIXELS}", param_hint="--size")
    if child:  # the measuring process: GGUF and config paths in, one JSON line out
        import torch

        if threads:
            torch.set_num_threads(threads)
        gguf, config = child.split(os.pathsep)
        click.echo(json.dumps(measure(pathlib.Path(gguf), pathlib.Path(config), family, size, text_tokens,
                                      reference, device)))
        return
    depths = [(double_blocks, single_blocks)]
    if check_depth != "0":
        try:
            d, s = (int(x) for x in check_depth.split(","))
        except ValueError:
            raise click.BadParameter(f"{check_depth!r}; expected DOUBLE,SINGLE or 0", param_hint="--check-depth")
        depths.append((d, s))
    with tempfile.TemporaryDirectory() as tmp:
        folder = workdir or pathlib.Path(tmp)
        runs = []
        for d, s in depths:
            start = time.perf_counter()
            gguf, config = build(folder, family, d, s)
            built = time.perf_counter() - start
            cmd = [sys.executable, __file__, "--family", family, "--size", str(size), "--text-tokens", str(text_tokens),
                   "--reference" if reference else "--no-reference", "--device", device,
                   "--child", f"{gguf}{os.pathsep}{config}", *(["--threads", str(threads)] if threads else [])]
            env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(MMAP_THRESHOLD), "MALLOC_TRIM_THRESHOLD_": "0"}
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
            if proc.returncode:
                raise click.ClickException(f"measuring {gguf.name} failed:\n{proc.stderr[-3000:]}")
            run = {"double_blocks": d, "single_blocks": s, "gguf_bytes": gguf.stat().st_size,
                   "build_seconds": round(built, 1), **json.loads(proc.stdout.strip().splitlines()[-1])}
            runs.append(run)
            click.echo(f"{d} double + {s} single: peak {run['peak_bytes']:,} B ({run['peak_bytes'] / 2**30:.3f} GiB)"
                       + (f", RSS cross-check {run['rss_peak_bytes'] / 2**30:.3f} GiB" if "rss_peak_bytes" in run else "")
                       + f", {run['seconds']:.0f} s", err=True)
    import diffusers
    import torch

    doc = {"family": family, "size": size, "text_tokens": text_tokens, "reference_image": reference,
           "variant": "Q4_K_M", "compute_dtype": "bfloat16",
           "width": dataclasses.asdict(geometry(family, 1, 1)) | {"double_blocks": None, "single_blocks": None},
           "torch": torch.__version__, "diffusers": diffusers.__version__, "cpu_threads": torch.get_num_threads(),
           "machine": f"{platform.machine()} {platform.processor() or ''}".strip(), "runs": runs,
           "peak_bytes": runs[0]["peak_bytes"],
           "depth_independent": len({r["peak_bytes"] for r in runs}) == 1 if len(runs) > 1 else None}
    text = json.dumps(doc, indent=2) + "\n"
    if json_out:
        json_out.write_text(text)
    click.echo(text)


if __name__ == "__main__":
    main()
