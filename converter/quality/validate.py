"""How close a GGUF is to its source: per tensor, and end to end through diffusers.

Per tensor: every stored tensor is decoded and compared with the source tensor of the same BFL
name (tensor_error.py), then summarized per storage type and per block. End to end: the source
and the GGUF are each loaded as diffusers users load them (diffusers_model.py), one at a time,
and run on the same seeded probe of the model's family (probes.py: FLUX.1 Kontext's or
FLUX.2's); their outputs are compared by relative L2, cosine and PSNR.

``write_validation_json`` keeps one ``validation.json`` per folder, keyed by GGUF file name, so a
release folder holding several variants has one file that ``release build`` reads into the model
card (converter/modelcard.py takes the finite numbers under ``metrics``):

    {"schema_version": 1,
     "variants": {"NAME-Q4_K_M.gguf": {
         "file": "NAME-Q4_K_M.gguf", "variant": "Q4_K_M",
         "metrics": {"cosine": ..., "rel_l2": ..., "psnr": ...},   # transformer output vs source
         "gguf_bytes": ..., "source": ..., "tensor_types": {...},
         "tensors": {"summary_by_type": {...}, "summary_by_block": {...}, "per_tensor": [...]},
         "outputs": {...} | null, "probe": {...} | null, "pipeline": {...} | null,
         "device": ..., "environment": {...}}}}

Non-finite figures (an infinite PSNR for identical outputs) are written as null in ``outputs``
and left out of ``metrics``.
"""
from __future__ import annotations

import json
import math
import os
import pathlib
import platform
import re
import tempfile
from collections import Counter
from dataclasses import dataclass, field, replace
from typing import Any, Callable

import numpy as np

import quant_kernels
from converter.detect import detect_model
from converter.errors import FluxGGUFError, ValidationError
from converter.layout import FluxGeometry
from converter.sources import Source, open_source
from manifests.hashing import write_bytes_atomic
from quant_kernels.errors import UnsupportedTypeError

from .diffusers_model import (
    check_loadable,
    load_gguf_transformer,
    load_source_transformer,
    release_memory,
    require_diffusers,
    resolve_device,
    run_probe,
    write_transformer_config,
)
from .probes import ProbeSpec, make_probe
from .tensor_error import (
    ErrorSummary,
    TensorError,
    json_float,
    summarize_by_block,
    summarize_by_type,
    tensor_error,
)

SCHEMA_VERSION = 1
VALIDATION_FILE = "validation.json"
DEFAULT_PROBE = ProbeSpec(height=512, width=512)

ProgressFn = Callable[[int, int], None]  # (done, total)
LogFn = Callable[[str], None]


@dataclass(frozen=True)
class OutputComparison:
    """A candidate output against the reference output of the same inputs.

    rel_l2 = ||c - r|| / ||r||; PSNR uses the reference's value range as the peak
    (transformer outputs are not images, so there is no fixed peak); identical outputs give inf.
    """

    rel_l2: float
    cosine: float
    psnr_db: float
    max_abs: float

    def to_dict(self) -> dict[str, float | None]:
        return {k: json_float(v) for k, v in self.__dict__.items()}


def compare_outputs(reference: np.ndarray, candidate: np.ndarray) -> OutputComparison:
    if reference.shape != candidate.shape:
        raise ValidationError(f"output shapes differ: reference {reference.shape}, candidate {candidate.shape}")
    r = reference.astype(np.float64).reshape(-1)
    c = candidate.astype(np.float64).reshape(-1)
    if not (np.isfinite(r).all() and np.isfinite(c).all()):
        raise ValidationError("a transformer output holds NaN or inf")
    d = c - r
    rr, cc, dd = float(r @ r), float(c @ c), float(d @ d)
    rel = math.sqrt(dd / rr) if rr > 0 else (0.0 if dd == 0 else math.inf)
    if rr == 0 and cc == 0:
        cos = 1.0
    elif rr == 0 or cc == 0:
        cos = 0.0
    else:
        cos = max(-1.0, min(1.0, float(r @ c) / math.sqrt(rr * cc)))
    mse = dd / max(r.size, 1)
    peak = float(r.max() - r.min()) if r.size else 0.0
    if mse == 0:
        psnr = math.inf
    elif peak == 0:
        psnr = -math.inf
    else:
        psnr = 20 * math.log10(peak) - 10 * math.log10(mse)
    return OutputComparison(rel_l2=rel, cosine=cos, psnr_db=psnr, max_abs=float(np.abs(d).max()) if d.size else 0.0)


@dataclass(frozen=True)
class ValidationReport:
    """Everything ``validate`` measured for one GGUF file."""

    gguf: str  # file name
    gguf_bytes: int
    source: str  # file or folder name
    tensor_types: dict[str, int]  # storage type -> tensor count
    tensors: list[TensorError] = field(default_factory=list)
    outputs: OutputComparison | None = None
    probe: ProbeSpec | None = None
    device: str | None = None
    environment: dict[str, str] = field(default_factory=dict)
    pipeline: dict[str, Any] | None = None  # pipeline_check.ImageComparison.to_dict()
    imatrix: dict[str, Any] | None = None  # the GGUF's quantize.imatrix.* keys; None: static quantization

    @property
    def by_type(self) -> dict[str, ErrorSummary]:
        return summarize_by_type(self.tensors)

    @property
    def by_block(self) -> dict[str, ErrorSummary]:
        return summarize_by_block(self.tensors)

    def with_pipeline(self, result: dict[str, Any]) -> ValidationReport:
        return replace(self, pipeline=result)

    def metrics(self) -> dict[str, float]:
        """The model card's figures: transformer output vs source (finite values only)."""
        if self.outputs is None:
            return {}
        figures = {"cosine": self.outputs.cosine, "rel_l2": self.outputs.rel_l2, "psnr": self.outputs.psnr_db}
        return {k: v for k, v in figures.items() if math.isfinite(v)}

    def to_dict(self) -> dict[str, Any]:
        return {
            "file": self.gguf,
            "variant": label_for(self.gguf),
            "metrics": self.metrics(),
            "gguf_bytes": self.gguf_bytes,
            "source": self.source,
            "tensor_types": dict(sorted(self.tensor_types.items())),
            "tensors": {
                "summary_by_type": {k: v.to_dict() for k, v in self.by_type.items()},
                "summary_by_block": {k: v.to_dict() for k, v in self.by_block.items()},
                "per_tensor": [e.to_dict() for e in self.tensors],
            }
            if self.tensors
            else None,
            "outputs": self.outputs.to_dict() if self.outputs else None,
            "probe": self.probe.to_dict() if self.probe else None,
            "device": self.device,
            "environment": self.environment,
            "pipeline": self.pipeline,
            "imatrix": self.imatrix,
        }


# --------------------------------------------------------------------------- GGUF reading

_LABEL = re.compile(r"[-_.]((?:I?Q\d_[0-9A-Z]+(?:_[SMLX]L?)?)|BF16|F16|F32)\.gguf$", re.IGNORECASE)


def label_for(path: str | os.PathLike[str]) -> str:
    """The quant label in a file name (``flux1-kontext-dev-Q4_K_M.gguf`` -> ``Q4_K_M``), as the Hub reads it."""
    m = _LABEL.search(pathlib.Path(path).name)
    return m.group(1).upper() if m else pathlib.Path(path).stem



def open_gguf(path: str | os.PathLike[str]) -> Any:
    """A GGUFReader over ``path`` (memory-mapped), or a one-line error naming the file."""
    from gguf import GGUFReader

    from converter.inspect_files import GGUFStructureError, check_gguf_structure

    p = pathlib.Path(path)
    if not p.is_file():
        raise ValidationError(f"{p}: no such GGUF file")
    try:  # every count and length bounded by the file's size before gguf-py allocates from them
        check_gguf_structure(p)
    except GGUFStructureError as exc:
        raise ValidationError(f"{p}: not a readable GGUF file ({exc.problem})") from None
    except OSError as exc:
        raise ValidationError(f"{p}: cannot read ({exc.strerror or exc})") from None
    try:
        return GGUFReader(p)
    except (ValueError, OSError, IndexError, KeyError) as exc:
        why = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ValidationError(f"{p}: not a readable GGUF file ({why})") from None


def imatrix_metadata(reader: Any) -> dict[str, Any] | None:
    """What a calibrated GGUF records about its imatrix (llama-quantize's ``quantize.imatrix.*`` keys):
    {"file", "dataset", "entries_count", "chunks_count"} as present; None for a statically quantized file."""
    from converter.imatrix import KV_QUANTIZE_CHUNKS, KV_QUANTIZE_DATASET, KV_QUANTIZE_ENTRIES, KV_QUANTIZE_FILE

    keys = {"file": KV_QUANTIZE_FILE, "dataset": KV_QUANTIZE_DATASET, "entries_count": KV_QUANTIZE_ENTRIES,
            "chunks_count": KV_QUANTIZE_CHUNKS}
    found = {}
    for label, key in keys.items():
        f = reader.fields.get(key)
        if f is not None:
            value = f.contents()
            found[label] = int(value) if isinstance(value, (int, np.integer)) else value
    return found or None


def gguf_shapes(reader: Any) -> dict[str, tuple[int, ...]]:
    """Tensor name -> PyTorch-order shape (GGUF stores dims reversed: ne0 is the row length)."""
    return {t.name: tuple(int(d) for d in reversed(t.shape.tolist())) for t in reader.tensors}


def decode_tensor(tensor: Any) -> np.ndarray:
    """A reader tensor decoded to float32 in PyTorch-order shape.

    quant_kernels decodes the types we write, as ggml does; gguf-py decodes any other type a
    third-party file may hold.
    """
    shape = tuple(int(d) for d in reversed(tensor.shape.tolist()))
    try:
        return quant_kernels.dequantize(tensor.data, tensor.tensor_type, shape)
    except UnsupportedTypeError:
        from gguf.quants import dequantize

        return np.asarray(dequantize(tensor.data, tensor.tensor_type), dtype=np.float32).reshape(shape)


def tensor_errors(
    gguf_path: str | os.PathLike[str], source: Source, *, progress: ProgressFn | None = None
) -> list[TensorError]:
    """Compare every GGUF tensor with its source tensor; the two must hold the same names and shapes."""
    path = pathlib.Path(gguf_path)
    stored = {t.name: t for t in open_gguf(path).tensors}
    missing = [n for n in source.tensors if n not in stored]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise ValidationError(f"{path} lacks source tensor {missing[0]}{more}")
    extra = [n for n in stored if n not in source.tensors]
    if extra:
        raise ValidationError(f"{path} holds {extra[0]}, which the source {source.path} does not have")
    total = sum(math.prod(info.shape) for info in source.tensors.values())
    done = 0
    errors = []
    for name, info in source.tensors.items():
        t = stored[name]
        shape = tuple(int(d) for d in reversed(t.shape.tolist()))
        if shape != tuple(info.shape):
            raise ValidationError(f"{path}: tensor {name} has shape {list(shape)}; the source's is {list(info.shape)}")
        errors.append(tensor_error(name, t.tensor_type.name, source.read(name), decode_tensor(t)))
        done += math.prod(info.shape)
        if progress:
            progress(done, total)
    return errors


# --------------------------------------------------------------------------- end to end


def environment(device: str | None) -> dict[str, str]:
    """Versions and hardware a measurement was made with (goes into the JSON next to it)."""
    import gguf

    from converter import __version__

    env = {"flux_gguf": __version__, "python": platform.python_version(), "numpy": np.__version__}
    try:
        env["gguf"] = gguf.__version__  # type: ignore[attr-defined]
    except AttributeError:
        from importlib.metadata import version

        env["gguf"] = version("gguf")
    try:
        import diffusers
        import torch

        env["torch"] = torch.__version__
        env["diffusers"] = diffusers.__version__
        if device == "cuda":
            env["gpu"] = torch.cuda.get_device_name()
    except ImportError:
        pass
    if device == "cpu":
        env["cpu"] = platform.processor() or platform.machine()
    return env


def source_state_dict_reader(source: Source, device: str) -> Callable[[], dict[str, Any]]:
    """For sources diffusers cannot open as one file: {BFL name: tensor in compute dtype}."""

    def read() -> dict[str, Any]:
        import torch

        from .diffusers_model import compute_dtype

        dtype = compute_dtype(device)
        return {name: torch.from_numpy(source.read(name)).to(dtype) for name in source.tensors}

    return read


def compare_end_to_end(
    gguf_path: str | os.PathLike[str],
    source: Source,
    geometry: FluxGeometry,
    *,
    probe: ProbeSpec,
    device: str,
    config_dir: str | os.PathLike[str] | None = None,
    log: LogFn | None = None,
) -> OutputComparison:
    """Run the source and the GGUF transformer on the same probe, one model in memory at a time."""
    say = log or (lambda _msg: None)
    check_loadable(geometry)
    inputs = make_probe(probe, geometry)
    with tempfile.TemporaryDirectory(prefix="flux-gguf-config-") as tmp:
        cfg = config_dir or write_transformer_config(geometry, tmp)
        say(f"loading source transformer {source.path} ({device})")
        model = load_source_transformer(source.path, cfg, device, source_state_dict_reader(source, device))
        say("running the probe on the source transformer")
        reference = run_probe(model, inputs, device)
        del model
        release_memory(device)
        say(f"loading GGUF transformer {gguf_path} ({device})")
        model = load_gguf_transformer(gguf_path, cfg, device)
        say("running the probe on the GGUF transformer")
        candidate = run_probe(model, inputs, device)
        del model
        release_memory(device)
    return compare_outputs(reference, candidate)


def validate(
    gguf_path: str | os.PathLike[str],
    source_path: str | os.PathLike[str],
    *,
    config_dir: str | os.PathLike[str] | None = None,
    device: str | None = None,
    probe: ProbeSpec | None = DEFAULT_PROBE,
    check_tensors: bool = True,
    progress: ProgressFn | None = None,
    log: LogFn | None = None,
) -> ValidationReport:
    """Validate ``gguf_path`` against ``source_path``.

    ``probe=None`` skips the end-to-end run (no diffusers needed); ``check_tensors=False`` skips
    the per-tensor pass. ``device`` None picks CUDA when available.
    """
    gguf_path = pathlib.Path(gguf_path)
    reader = open_gguf(gguf_path)
    types = Counter(t.tensor_type.name for t in reader.tensors)
    calibration = imatrix_metadata(reader)
    del reader
    dev: str | None = None
    if probe is not None:
        require_diffusers()
        dev = resolve_device(device)
    try:
        with open_source(source_path) as source:
            geometry = detect_model(source).geometry
            errors: list[TensorError] = []
            if check_tensors:
                if log:
                    log(f"comparing {sum(types.values())} tensors with {source.path}")
                errors = tensor_errors(gguf_path, source, progress=progress)
            outputs = None
            if probe is not None and dev is not None:
                outputs = compare_end_to_end(
                    gguf_path, source, geometry, probe=probe, device=dev, config_dir=config_dir, log=log
                )
    except ValidationError:
        raise
    except FluxGGUFError as exc:  # SourceError / ModelDetectionError keep their message
        raise ValidationError(str(exc)) from exc
    return ValidationReport(
        gguf=gguf_path.name,
        gguf_bytes=gguf_path.stat().st_size,
        source=pathlib.Path(source_path).name,
        tensor_types=dict(types),
        tensors=errors,
        outputs=outputs,
        probe=probe,
        device=dev,
        environment=environment(dev),
        imatrix=calibration,
    )


# --------------------------------------------------------------------------- validation.json


def write_validation_json(report: ValidationReport, path: str | os.PathLike[str]) -> pathlib.Path:
    """Add (or replace) ``report`` in the validation.json at ``path``; written atomically."""
    path = pathlib.Path(path)
    doc: dict[str, Any] = {"schema_version": SCHEMA_VERSION, "variants": {}}
    if path.exists():
        try:
            old = json.loads(path.read_text(encoding="utf-8"))
        except RecursionError:
            raise ValidationError(f"{path}: existing file is JSON nested too deeply; move it away or pick another "
                                  "--output") from None
        except (OSError, UnicodeDecodeError, ValueError) as exc:  # ValueError: bad JSON, or a huge integer
            raise ValidationError(
                f"{path}: existing file is not valid JSON ({exc}); move it away or pick another --output"
            ) from None
        valid = isinstance(old, dict) and isinstance(old.get("variants"), dict)
        if not valid or old.get("schema_version") != SCHEMA_VERSION:
            raise ValidationError(
                f"{path}: existing file is not a validation.json of schema_version {SCHEMA_VERSION}; "
                "move it away or pick another --output"
            )
        doc = old
    doc["variants"][report.gguf] = report.to_dict()
    doc["variants"] = dict(sorted(doc["variants"].items()))
    try:
        write_bytes_atomic(path, (json.dumps(doc, indent=2, allow_nan=False) + "\n").encode("utf-8"))
    except OSError as exc:
        raise ValidationError(f"{path}: cannot write ({exc.strerror or exc})") from None
    return path
