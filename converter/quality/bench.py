"""Speed and memory of GGUF files as diffusers runs them, and how far their output drifts.

Per file: load time (from_single_file until the model sits on the device), peak GPU memory
(``torch.cuda.max_memory_allocated`` from before the load to after the last step: weights plus
activations), seconds per transformer step on a Kontext-shaped probe (target and context image
tokens, so 2 * H/16 * W/16 image tokens plus the text tokens; FLUX.2: the Flux2Pipeline-shaped
probe, target plus one reference image, as many tokens), and the cosine / relative L2 of its
output against the BF16 baseline's output on the same probe.

Models are loaded one at a time and freed before the next, so the figures of one file do not
include another's weights. Timing numbers are wall-clock on whatever else the machine runs.
"""
from __future__ import annotations

import datetime
import json
import os
import pathlib
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Sequence

import numpy as np

from converter.detect import detect_model
from converter.errors import FluxGGUFError, ValidationError
from converter.layout import FluxGeometry
from converter.sources import open_source
from manifests.hashing import write_bytes_atomic

from .diffusers_model import (
    check_loadable,
    geometry_from_shapes,
    load_gguf_transformer,
    load_source_transformer,
    release_memory,
    require_diffusers,
    resolve_device,
    run_probe,
    write_transformer_config,
)
from .probes import Probe, ProbeSpec, make_probe
from .tensor_error import json_float
from .validate import (
    LogFn,
    compare_outputs,
    environment,
    gguf_shapes,
    imatrix_metadata,
    label_for,
    open_gguf,
    source_state_dict_reader,
)

SCHEMA_VERSION = 1
DEFAULT_PROBE = ProbeSpec(height=1024, width=1024)


@dataclass(frozen=True)
class BenchRecord:
    """One file's measurements. cosine / rel_l2 are None for the baseline itself or without one."""

    label: str
    file: str
    size_bytes: int
    load_seconds: float
    peak_memory_bytes: int | None  # CUDA only
    seconds_per_step: float  # median of the timed steps
    step_seconds: tuple[float, ...]
    cosine: float | None = None
    rel_l2: float | None = None
    is_baseline: bool = False
    imatrix: str | None = None  # the GGUF's quantize.imatrix.file; None: static (or the source itself)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["step_seconds"] = list(self.step_seconds)
        return {k: json_float(v) if isinstance(v, float) else v for k, v in d.items()}


@dataclass(frozen=True)
class BenchReport:
    device: str
    probe: ProbeSpec
    steps: int
    warmup: int
    records: tuple[BenchRecord, ...]
    environment: dict[str, str] = field(default_factory=dict)
    date: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema_version": SCHEMA_VERSION,
            "date": self.date,
            "device": self.device,
            "environment": self.environment,
            "probe": self.probe.to_dict(),
            "steps": self.steps,
            "warmup": self.warmup,
            "records": [r.to_dict() for r in self.records],
        }


@dataclass(frozen=True)
class Measurement:
    """What ``measure`` saw of one model."""

    load_seconds: float
    peak_memory_bytes: int | None  # CUDA only
    step_seconds: tuple[float, ...]
    output: np.ndarray  # float32 output of the first call on the probe (target tokens)


def measure(load: Callable[[], Any], probe: Probe, device: str, *, steps: int, warmup: int) -> Measurement:
    """Load a model, run ``warmup`` untimed then ``steps`` timed probe calls, free it."""
    import torch

    cuda = device == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    model = load()
    load_seconds = time.perf_counter() - t0
    try:
        first = run_probe(model, probe, device)  # the first call is the first warm-up step
        for _ in range(max(warmup - 1, 0)):
            run_probe(model, probe, device)
        times = []
        for _ in range(steps):
            if cuda:
                torch.cuda.synchronize()
            t = time.perf_counter()
            run_probe(model, probe, device)  # copies the output to the host, which synchronizes
            times.append(time.perf_counter() - t)
        peak = int(torch.cuda.max_memory_allocated()) if cuda else None
    finally:
        del model
        release_memory(device)
    return Measurement(load_seconds, peak, tuple(times), first)


def bench_record(label: str, path: str | os.PathLike[str], m: Measurement, reference: np.ndarray | None,
                 *, is_baseline: bool = False) -> BenchRecord:
    """A record from a measurement; compared with ``reference`` (the baseline's output) when given."""
    path = pathlib.Path(path)
    cmp = compare_outputs(reference, m.output) if reference is not None and not is_baseline else None
    return BenchRecord(
        label=label,
        file=path.name,
        size_bytes=checkpoint_size(path),
        load_seconds=m.load_seconds,
        peak_memory_bytes=m.peak_memory_bytes,
        seconds_per_step=statistics.median(m.step_seconds),
        step_seconds=m.step_seconds,
        cosine=cmp.cosine if cmp is not None else None,
        rel_l2=cmp.rel_l2 if cmp is not None else None,
        is_baseline=is_baseline,
        imatrix=_imatrix_file(path),
    )


def _imatrix_file(path: pathlib.Path) -> str | None:
    """The imatrix file a GGUF was quantized with (``quantize.imatrix.file``), None for static files and sources."""
    if path.suffix != ".gguf" or not path.is_file():
        return None
    meta = imatrix_metadata(open_gguf(path))
    return str(meta["file"]) if meta and "file" in meta else None


def checkpoint_size(path: pathlib.Path) -> int:
    """Bytes of a file, or of the safetensors files of a diffusers folder."""
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.rglob("*.safetensors"))


def baseline_label(source: Any) -> str:
    """"BF16" for an all-BF16 source (the official checkpoint), else "source"."""
    return "BF16" if all(t.dtype == "BF16" for t in source.tensors.values()) else "source"


def progress_line(r: BenchRecord) -> str:
    sim = f", cosine {r.cosine:.6f}, rel L2 {r.rel_l2:.4g}" if r.cosine is not None and r.rel_l2 is not None else ""
    mem = f", peak {r.peak_memory_bytes / 2**30:.2f} GiB" if r.peak_memory_bytes is not None else ""
    return f"{r.file}: load {r.load_seconds:.1f} s{mem}, {r.seconds_per_step:.3f} s/step{sim}"


def _geometry_of_gguf(path: pathlib.Path) -> FluxGeometry:
    return geometry_from_shapes(gguf_shapes(open_gguf(path)), str(path))


def bench(
    gguf_paths: Sequence[str | os.PathLike[str]],
    *,
    baseline: str | os.PathLike[str] | None = None,
    probe: ProbeSpec = DEFAULT_PROBE,
    steps: int = 3,
    warmup: int = 2,
    device: str | None = None,
    config_dir: str | os.PathLike[str] | None = None,
    log: LogFn | None = None,
) -> BenchReport:
    """Measure the baseline (when given, first) and then each GGUF file."""
    say = log or (lambda _msg: None)
    if steps < 1 or warmup < 1:
        raise ValidationError(f"bench needs at least 1 step and 1 warm-up step, got steps={steps}, warmup={warmup}")
    if not gguf_paths and baseline is None:
        raise ValidationError("bench needs at least one GGUF file or --baseline")
    require_diffusers()
    dev = resolve_device(device)
    paths = [pathlib.Path(p) for p in gguf_paths]
    geometries = {p: _geometry_of_gguf(p) for p in paths}
    source = None
    records: list[BenchRecord] = []
    try:
        try:
            source = open_source(baseline) if baseline is not None else None
            geometry = detect_model(source).geometry if source is not None else geometries[paths[0]]
        except FluxGGUFError as exc:  # SourceError / ModelDetectionError: keep the message
            raise ValidationError(str(exc)) from exc
        for p, g in geometries.items():
            if g != geometry:
                what = f"the baseline {baseline}" if baseline is not None else paths[0].name
                raise ValidationError(f"{p}: its tensors describe {g}, unlike {what} ({geometry})")
        check_loadable(geometry)
        inputs = make_probe(probe, geometry)
        reference: np.ndarray | None = None
        with tempfile.TemporaryDirectory(prefix="flux-gguf-config-") as tmp:
            cfg = config_dir or write_transformer_config(geometry, tmp)
            if source is not None:
                say(f"baseline {source.path}: loading on {dev}")
                reader = source_state_dict_reader(source, dev)
                src = source
                m = measure(lambda: load_source_transformer(src.path, cfg, dev, reader),
                            inputs, dev, steps=steps, warmup=warmup)
                reference = m.output
                records.append(bench_record(baseline_label(source), source.path, m, None, is_baseline=True))
                say(progress_line(records[-1]))
            for p in paths:
                say(f"{p.name}: loading on {dev}")
                m = measure(lambda p=p: load_gguf_transformer(p, cfg, dev), inputs, dev, steps=steps, warmup=warmup)
                records.append(bench_record(label_for(p), p, m, reference))
                say(progress_line(records[-1]))
    finally:
        if source is not None:
            source.close()
    return BenchReport(
        device=dev,
        probe=probe,
        steps=steps,
        warmup=warmup,
        records=tuple(records),
        environment=environment(dev),
        date=datetime.datetime.now(datetime.timezone.utc).date().isoformat(),
    )


# --------------------------------------------------------------------------- output


def markdown_table(report: BenchReport) -> str:
    """The table as docs/benchmarks.md shows it (GB = 10^9 bytes, GiB = 2^30 bytes)."""
    p = report.probe
    head = (
        f"| file | type | imatrix | size (GB) | load (s) | peak VRAM (GiB) | s/step at {p.width}x{p.height} "
        "| cosine vs BF16 | rel. L2 vs BF16 |\n|---|---|---|---:|---:|---:|---:|---:|---:|\n"
    )
    rows = []
    for r in report.records:
        mem = f"{r.peak_memory_bytes / 2**30:.2f}" if r.peak_memory_bytes is not None else "n/a (CPU)"
        if r.is_baseline:
            cos = rel = "reference"
        else:
            cos = f"{r.cosine:.6f}" if r.cosine is not None else "n/a"
            rel = f"{r.rel_l2:.4f}" if r.rel_l2 is not None else "n/a"
        rows.append(
            f"| {r.file} | {r.label} | {'n/a' if r.is_baseline else (r.imatrix or 'none')} | {r.size_bytes / 1e9:.3f} | {r.load_seconds:.1f} | {mem} "
            f"| {r.seconds_per_step:.3f} | {cos} | {rel} |"
        )
    return head + "\n".join(rows) + "\n"


def write_bench(report: BenchReport, out_dir: str | os.PathLike[str]) -> tuple[pathlib.Path, pathlib.Path]:
    """Write ``bench.json`` and ``bench.md`` into ``out_dir``, each atomically."""
    out = pathlib.Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
        paths = (out / "bench.json", out / "bench.md")
        texts = (json.dumps(report.to_dict(), indent=2, allow_nan=False) + "\n", markdown_table(report))
        for path, text in zip(paths, texts):
            write_bytes_atomic(path, text.encode("utf-8"))
    except OSError as exc:
        raise ValidationError(f"{out}: cannot write bench results ({exc.strerror or exc})") from None
    return paths
