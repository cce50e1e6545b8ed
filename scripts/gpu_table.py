#!/usr/bin/env python
"""Produce docs/benchmarks.md on a GPU machine: generate, convert, bench, write the table.

    python scripts/gpu_table.py WORK_DIR OUT_DIR                   # everything, in one go
    python scripts/gpu_table.py WORK_DIR OUT_DIR --stage generate  # or stage by stage:
    python scripts/gpu_table.py WORK_DIR OUT_DIR --stage convert   #   each stage and each file's
    python scripts/gpu_table.py WORK_DIR OUT_DIR --stage bench     #   bench is saved as it ends,
    python scripts/gpu_table.py WORK_DIR OUT_DIR --stage report    #   so a killed run resumes
    python scripts/gpu_table.py WORK_DIR OUT_DIR --tiny            # CPU smoke run (1+1 blocks)

1. generate: the full-size synthetic FLUX.1 Kontext [dev] checkpoint in WORK_DIR (exact tensor
   names, shapes and BF16 dtype; seeded random weights; 23.8 GB), streamed by converter.synthetic;
2. convert: every variant in one pass over the source with all cores (timed);
3. bench: the BF16 source and then each GGUF, one model on the GPU at a time: load time, peak
   VRAM, seconds per transformer step at 1024x1024 with Kontext's doubled image tokens, output
   cosine / relative L2 against the BF16 output (converter.quality.bench);
4. report: OUT_DIR/benchmarks.md (the table, the setup, the commands) and benchmarks.json.

Progress goes to stdout line by line. Nothing touches the network (HF_HUB_OFFLINE=1): diffusers
gets its config from a local folder written from the geometry.
"""
from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import shutil
import sys
import time
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # run from a checkout too

import click  # noqa: E402
import numba  # noqa: E402
import numpy as np  # noqa: E402
from tqdm import tqdm  # noqa: E402

from converter.errors import FluxGGUFError  # noqa: E402
from converter.layout import FluxGeometry  # noqa: E402
from converter.pipeline import convert  # noqa: E402
from converter.quality.bench import (  # noqa: E402
    BenchRecord,
    BenchReport,
    baseline_label,
    bench_record,
    markdown_table,
    measure,
    progress_line,
)
from converter.quality.diffusers_model import (  # noqa: E402
    load_gguf_transformer,
    load_source_transformer,
    require_diffusers,
    resolve_device,
    write_transformer_config,
)
from converter.quality.probes import ProbeSpec, make_kontext_probe  # noqa: E402
from converter.quality.validate import environment  # noqa: E402
from converter.recipes import layout_tensors, make_plans  # noqa: E402
from converter.sources import open_source  # noqa: E402
from converter.synthetic import synthetic_nbytes, write_synthetic_flux  # noqa: E402

NAME = "flux1-kontext-dev-synthetic"
VARIANTS = ("Q8_0", "Q5_K_M", "Q4_K_M", "Q3_K_S", "Q2_K")
STATE = "benchmarks.json"
STAGES = ("all", "generate", "convert", "bench", "report")
FULL = FluxGeometry()
TINY = FluxGeometry(double_blocks=1, single_blocks=1)  # the smallest geometry diffusers loads


def say(message: str) -> None:
    click.echo(f"[{time.strftime('%H:%M:%S')}] {message}")


def write_json(path: pathlib.Path, doc: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".partial")
    tmp.write_text(json.dumps(doc, indent=2, allow_nan=False) + "\n")
    tmp.replace(path)


def load_state(out: pathlib.Path, settings: dict[str, Any]) -> dict[str, Any]:
    """Results so far; refuse to mix runs made with different settings."""
    path = out / STATE
    if not path.exists():
        return {"schema_version": 1, "settings": settings}
    state = json.loads(path.read_text())
    if state.get("settings") != settings:
        raise click.ClickException(
            f"{path} holds results made with other settings ({state.get('settings')}); "
            "use another OUT_DIR or pass --fresh")
    return state


def disk_needed(work: pathlib.Path, source: pathlib.Path, geometry: FluxGeometry, variants: list[str]) -> None:
    """Refuse up front when WORK_DIR cannot hold the checkpoint and every GGUF (convert writes all at once)."""
    plans = make_plans(variants, layout_tensors(geometry), name=NAME, family="flux-dev")
    present = [source] + [work / p.file_name for p in plans]
    need = sum(p.file_size for p in plans if not (work / p.file_name).exists())
    source_need = 0 if source.exists() else synthetic_nbytes(geometry, "BF16")
    if os.stat(source.parent).st_dev != os.stat(work).st_dev:
        if source_need > shutil.disk_usage(source.parent).free:
            raise click.ClickException(f"{source.parent}: needs {source_need / 1e9:.1f} GB free for the checkpoint, "
                                       f"has {shutil.disk_usage(source.parent).free / 1e9:.1f} GB")
    else:
        need += source_need
    free = shutil.disk_usage(work).free
    if need > free:
        have = sum(f.stat().st_size for f in present if f.exists())
        raise click.ClickException(
            f"{work}: needs {need / 1e9:.1f} GB more free disk (checkpoint and {len(plans)} GGUF files; "
            f"{have / 1e9:.1f} GB already there), has {free / 1e9:.1f} GB; use a larger disk or fewer --variants")


def generate(source: pathlib.Path, geometry: FluxGeometry, state: dict[str, Any], out: pathlib.Path) -> None:
    if source.exists() and "generate" in state:
        say(f"generate: {source} exists, kept")
        return
    total = synthetic_nbytes(geometry, "BF16")
    say(f"generate: writing {source} ({total / 1e9:.2f} GB of random BF16 weights)")
    start = time.perf_counter()
    with tqdm(total=total, unit="B", unit_scale=True, desc="generate", mininterval=5) as bar:
        write_synthetic_flux(source, geometry, dtype="BF16", layout="bfl", seed=0, progress=bar.update)
    seconds = time.perf_counter() - start
    state["generate"] = {"file": source.name, "bytes": source.stat().st_size, "seconds": seconds}
    write_json(out / STATE, state)
    say(f"generate: done in {seconds:.0f} s")


def convert_all(source: pathlib.Path, work: pathlib.Path, variants: list[str], threads: int,
                state: dict[str, Any], out: pathlib.Path) -> None:
    done = state.get("convert", {})
    if done.get("variants") == variants and all((work / f["file"]).exists() for f in done["files"].values()):
        say(f"convert: {len(variants)} GGUF files exist, kept")
        return
    say(f"convert: {source.name} -> {', '.join(variants)} in one pass, {threads} threads")
    start = time.perf_counter()
    with tqdm(total=0, unit="B", unit_scale=True, desc="convert", mininterval=5) as bar:
        def progress(n: int, total: int) -> None:
            bar.total = total
            bar.update(n - bar.n)

        records = convert(source, work, variants, name=NAME, threads=threads, progress=progress)
    seconds = time.perf_counter() - start
    state["convert"] = {
        "seconds": seconds,
        "threads": threads,
        "cpu_count": os.cpu_count(),
        "variants": variants,
        "files": {v: {"file": pathlib.Path(r.path).name, "bytes": r.size, "sha256": r.sha256}
                  for v, r in zip(variants, records)},
    }
    state.pop("bench", None)  # new files: old measurements no longer describe them
    write_json(out / STATE, state)
    say(f"converted {len(variants)} files in {seconds:.1f} s ({threads} threads, {os.cpu_count()} cores)")


def bench_all(source: pathlib.Path, work: pathlib.Path, geometry: FluxGeometry, probe: ProbeSpec, steps: int,
              warmup: int, device: str, state: dict[str, Any], out: pathlib.Path,
              stop_at: float | None = None) -> None:
    """Baseline first, then each GGUF; every finished file is saved, so a rerun picks up where it stopped."""
    require_diffusers()
    dev = resolve_device(device)
    if "convert" not in state:
        raise click.ClickException("bench: run the convert stage first")
    bench = state.setdefault("bench", {"records": []})
    bench.update({"device": dev, "environment": environment(dev), "date": time.strftime("%Y-%m-%d", time.gmtime()),
                  "probe": probe.to_dict(), "steps": steps, "warmup": warmup})
    done = {r["file"] for r in bench["records"]}
    reference_path = work / "baseline-output.npy"
    inputs = make_kontext_probe(probe)
    cfg = write_transformer_config(geometry, work / "transformer-config")
    todo: list[tuple[str, pathlib.Path, bool]] = [("", source, True)]
    todo += [(v, work / f["file"], False) for v, f in state["convert"]["files"].items()]
    for label, path, is_baseline in todo:
        if path.name in done and (not is_baseline or reference_path.exists()):
            say(f"bench: {path.name} measured before, kept")
            continue
        if stop_at is not None and time.monotonic() > stop_at:
            say(f"bench: deadline reached before {path.name}; rerun to continue")
            break
        say(f"bench: {path.name}: loading on {dev}")
        if is_baseline:
            with open_source(path) as src:
                label = baseline_label(src)
            m = measure(lambda: load_source_transformer(path, cfg, dev), inputs, dev, steps=steps, warmup=warmup)
            np.save(reference_path, m.output)
            record = bench_record(label, path, m, None, is_baseline=True)
        else:
            reference = np.load(reference_path)
            m = measure(lambda p=path: load_gguf_transformer(p, cfg, dev), inputs, dev, steps=steps, warmup=warmup)
            record = bench_record(label, path, m, reference)
        bench["records"] = [r for r in bench["records"] if r["file"] != path.name] + [record.to_dict()]
        order = [source.name] + [f["file"] for f in state["convert"]["files"].values()]
        bench["records"].sort(key=lambda r: order.index(r["file"]) if r["file"] in order else len(order))
        write_json(out / STATE, state)
        say("bench: " + progress_line(record))


def _report_from_state(state: dict[str, Any]) -> BenchReport:
    b = state["bench"]
    records = []
    for r in b["records"]:
        r = dict(r, step_seconds=tuple(r["step_seconds"]))
        records.append(BenchRecord(**r))
    p = {k: v for k, v in b["probe"].items() if k not in ("target_tokens", "image_tokens")}
    return BenchReport(device=b["device"], probe=ProbeSpec(**p), steps=b["steps"], warmup=b["warmup"],
                       records=tuple(records), environment=b["environment"], date=b["date"])


def command_line(args: dict[str, Any]) -> str:
    flags = [f"--{k.replace('_', '-')}" + ("" if v is True else f" {v}") for k, v in args.items() if v is not None]
    return " ".join(["python scripts/gpu_table.py WORK_DIR OUT_DIR", *flags])


def render_markdown(state: dict[str, Any], argv: dict[str, Any]) -> str:
    s, conv = state["settings"], state.get("convert")
    report = _report_from_state(state) if state.get("bench", {}).get("records") else None
    env = report.environment if report else {}
    where = env.get("gpu") or ("CPU" if report else "not measured yet")
    geo = s["geometry"]
    lines = ["# Benchmarks: FLUX.1 Kontext [dev] GGUF files in diffusers", ""]
    if s["tiny"]:
        lines += ["**Tiny smoke run** (1 double + 1 single block): checks that the script works; "
                  "these numbers describe nothing.", ""]
    lines += [
        f"Measured on **{where}**" + (f" on {report.date}" if report else "") + ", with "
        + ", ".join(f"{k} {env[k]}" for k in ("torch", "diffusers", "gguf", "flux_gguf", "python") if k in env) + ".",
        "",
        "**The weights are random.** The checkpoint is synthetic: the exact tensor names, shapes and dtypes of "
        f"FLUX.1 Kontext [dev] ({geo['double_blocks']} double + {geo['single_blocks']} single blocks, hidden "
        f"{geo['hidden']}, all BF16), filled with seeded Gaussian noise. File sizes, memory and speed carry over "
        "to the real model; output similarity on random weights does not predict image quality on the real one.",
        "",
    ]
    if report:
        p = report.probe
        dtype = "bfloat16" if report.device == "cuda" else "float32"
        lines += ["## Results", "", markdown_table(report).rstrip("\n"), "",
                  "- **size**: file size, GB = 10^9 bytes. BF16 is the source safetensors file.",
                  "- **load**: `FluxTransformer2DModel.from_single_file` (GGUF through `GGUFQuantizationConfig`), "
                  "loaded on the CPU and moved to the device, as diffusers' GGUF guide does.",
                  "- **peak VRAM**: `torch.cuda.max_memory_allocated()` from before the load to after the last "
                  "step: weights plus the activations of one transformer call; GiB = 2^30 bytes.",
                  f"- **s/step**: median of {report.steps} timed transformer calls after {report.warmup} warm-up "
                  f"calls, batch 1, {dtype} compute, at {p.width}x{p.height} with Kontext's context image: "
                  f"{p.image_tokens} image tokens (target + context) and {p.text_tokens} text tokens. GGUF weights "
                  "are dequantized by diffusers' own torch code on every call.",
                  "- **cosine / rel. L2**: the transformer's output on the target tokens for the same seeded "
                  f"probe (seed {p.seed}, timestep {p.timestep}, guidance {p.guidance}), against the BF16 "
                  "checkpoint's output: rel. L2 = ||gguf - bf16|| / ||bf16||.", ""]
    if conv:
        cores = conv["cpu_count"]
        lines += ["## Conversion", "",
                  f"Converting the BF16 checkpoint into {', '.join(conv['variants'])} in one pass (each source "
                  f"tensor read once and encoded once per type) took **{conv['seconds']:.0f} s** with "
                  f"{conv['threads']} threads on a {cores}-core machine (`flux-gguf convert ... --threads "
                  f"{conv['threads']}`).", ""]
    lines += ["## Reproduce", "", "```sh",
              "# everything at once (full size: about 62 GB of disk for the checkpoint and the five GGUF files):",
              command_line(argv),
              "# or stage by stage; each file's measurements are saved as it finishes:",
              *(command_line({**argv, "stage": st}) for st in ("generate", "convert", "bench", "report")),
              "# the same measurements with the CLI:",
              f"flux-gguf bench WORK_DIR/{NAME}-*.gguf --baseline WORK_DIR/{NAME}.safetensors "
              f"--steps {report.steps if report else 5} --warmup {report.warmup if report else 2} -o OUT_DIR",
              "```", ""]
    return "\n".join(lines)


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("work_dir", type=click.Path(path_type=pathlib.Path, file_okay=False))
@click.argument("out_dir", type=click.Path(path_type=pathlib.Path, file_okay=False))
@click.option("--stage", type=click.Choice(STAGES), default="all", show_default=True)
@click.option("--tiny", is_flag=True, help="1 double + 1 single block and a small probe: a CPU smoke run.")
@click.option("--variants", default=",".join(VARIANTS), show_default=True, help="Comma-separated variants.")
@click.option("--height", type=int, default=None, help="Probe height (default 1024; 32 with --tiny).")
@click.option("--width", type=int, default=None, help="Probe width (default 1024; 32 with --tiny).")
@click.option("--text-tokens", type=int, default=None, help="T5 tokens (default 512; 16 with --tiny).")
@click.option("--steps", type=click.IntRange(1), default=5, show_default=True, help="Timed steps per file.")
@click.option("--warmup", type=click.IntRange(1), default=2, show_default=True, help="Warm-up steps per file.")
@click.option("--threads", type=click.IntRange(1, numba.config.NUMBA_NUM_THREADS), default=None,
              help="Conversion threads (default: all cores).")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default=None, help="Default: cuda if available.")
@click.option("--fresh", is_flag=True, help="Forget earlier results in OUT_DIR (files in WORK_DIR are kept).")
@click.option("--source-dir", type=click.Path(path_type=pathlib.Path), default=None,
              help="Where the synthetic checkpoint lives (default WORK_DIR), e.g. /dev/shm when the disk "
                   "cannot hold the checkpoint and every GGUF.")
@click.option("--deadline", type=click.FloatRange(min=0), default=None,
              help="Seconds after start past which no further file is benched (the report is still written); "
                   "a rerun continues.")
def main(work_dir: pathlib.Path, out_dir: pathlib.Path, stage: str, tiny: bool, variants: str, height: int | None,
         width: int | None, text_tokens: int | None, steps: int, warmup: int, threads: int | None,
         device: str | None, fresh: bool, source_dir: pathlib.Path | None, deadline: float | None) -> None:
    """Generate, convert and bench the synthetic full-size Kontext checkpoint; write benchmarks.md."""
    names = [v.strip() for v in variants.split(",") if v.strip()]
    geometry = TINY if tiny else FULL
    small = 32 if tiny else None
    probe = ProbeSpec(height=height or small or 1024, width=width or small or 1024,
                      text_tokens=text_tokens or (16 if tiny else 512))
    threads = threads or numba.config.NUMBA_NUM_THREADS
    settings = {"tiny": tiny, "geometry": dataclasses.asdict(geometry), "variants": names, "probe": probe.to_dict(),
                "steps": steps, "warmup": warmup}
    work_dir.mkdir(parents=True, exist_ok=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    if fresh:
        (out_dir / STATE).unlink(missing_ok=True)
        (work_dir / "baseline-output.npy").unlink(missing_ok=True)
    argv = {"tiny": True if tiny else None, "variants": variants if names != list(VARIANTS) else None,
            "height": height, "width": width, "text_tokens": text_tokens, "steps": steps, "warmup": warmup}
    argv = {k: v for k, v in argv.items() if v is not None}
    (source_dir or work_dir).mkdir(parents=True, exist_ok=True)
    source = (source_dir or work_dir) / f"{NAME}.safetensors"
    stop_at = None if deadline is None else time.monotonic() + deadline
    try:
        state = load_state(out_dir, settings)
        if stage in ("all", "generate", "convert"):
            disk_needed(work_dir, source, geometry, names)
        if stage in ("all", "generate"):
            generate(source, geometry, state, out_dir)
        if stage in ("all", "convert"):
            convert_all(source, work_dir, names, threads, state, out_dir)
        if stage in ("all", "bench"):
            bench_all(source, work_dir, geometry, probe, steps, warmup, device, state, out_dir, stop_at)
    except FluxGGUFError as e:
        raise click.ClickException(str(e)) from None
    write_json(out_dir / STATE, state)
    md = out_dir / "benchmarks.md"
    md.with_name(md.name + ".partial").write_text(render_markdown(state, argv))
    md.with_name(md.name + ".partial").replace(md)
    say(f"wrote {out_dir / 'benchmarks.md'} and {out_dir / STATE}")


if __name__ == "__main__":
    main()
