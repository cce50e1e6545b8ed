"""Measure per-tensor output sensitivity: the file ``convert --target-size`` allocates from.

For each quantizable tensor ``t`` (the imatrix's set: 2-D, not a kept in/out layer):

* the weight error of every candidate type, ``w_t(k) = sum_ij imp_j (Q_k(W)_ij - W_ij)^2`` with
  ``imp`` the imatrix's importance vector (all ones without one) and ``Q_k`` the byte-exact
  kernels (with the imatrix where a K-quant takes one, as ``convert`` quantizes);
* the output error of ONE reference type (Q4_K): the transformer is run on the inputs with ``t``
  alone replaced by ``Q4_K(W)``; ``e_t = sum ||y' - y||^2 / sum ||y||^2`` over the samples;
* the gain ``g_t = e_t / w_t(Q4_K)``, and the prediction ``e_t(k) = g_t * w_t(k)`` for every
  other type (the source precision: 0, the source's weights are exact in it).

One forward pass per tensor and sample, plus the check: on a deterministic sample of tensors
(evenly spread in name order) the other types' output errors are measured the same way and
compared with the predictions (Spearman rank correlation over the (tensor, type) pairs, and the
median ratio); the file records both. Inputs are those of ``imatrix``: seeded probes (a smoke
default) or a saved inputs file.
"""
from __future__ import annotations

import math
import pathlib
import time
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import numpy as np

import quant_kernels
from converter import __version__
from converter.detect import detect_model
from converter.errors import CalibrationError, FluxGGUFError
from converter.imatrix import Imatrix, check_against, uses_imatrix
from converter.layout import bfl_tensor_shapes
from converter.recipes import kept_type
from converter.recipes import CANDIDATE_TYPES, SENSITIVITY_FORMAT, SENSITIVITY_VERSION
from converter.sources import open_source

from .calibrate import (
    build_transformer,
    diffusers_state_dict,
    file_samples,
    probe_samples,
    probes_dataset,
    quantized_weight_names,
    read_inputs_file,
)
from .diffusers_model import compute_dtype, require_diffusers, resolve_device
from .probes import ProbeSpec

ProgressFn = Callable[[int, int], None]
REFERENCE_TYPE = "Q4_K"
CHECK_TYPES = ("Q2_K", "Q3_K", "Q6_K")
DEFAULT_CHECK_TENSORS = 8


@dataclass(frozen=True)
class SensitivityReport:
    document: dict[str, Any]
    seconds: float
    device: str


def spearman(a: Sequence[float], b: Sequence[float]) -> float:
    """Spearman rank correlation (average ranks for ties); NaN for fewer than 3 pairs."""
    if len(a) < 3:
        return math.nan

    def ranks(x: Sequence[float]) -> np.ndarray:
        v = np.asarray(x, np.float64)
        order = np.argsort(v, kind="stable")
        r = np.empty(len(v))
        r[order] = np.arange(len(v), dtype=np.float64)
        for u in np.unique(v):  # ties share their mean rank
            m = v == u
            r[m] = r[m].mean()
        return r

    ra, rb = ranks(a), ranks(b)
    ra -= ra.mean()
    rb -= rb.mean()
    d = math.sqrt(float(ra @ ra) * float(rb @ rb))
    return float(ra @ rb) / d if d > 0 else math.nan


class _OutputError:
    """Runs the model on fixed samples and measures the relative squared change of its output."""

    def __init__(self, model: Any, samples: list[Any], keep_tokens: int | None) -> None:
        self.model, self.samples, self.keep = model, samples, keep_tokens
        self.reference = [self._run(s) for s in samples]
        self.norm = sum(float((r.double() ** 2).sum()) for r in self.reference)
        if not self.norm > 0 or not math.isfinite(self.norm):
            raise CalibrationError("the transformer's reference output is zero or not finite; cannot measure")

    def _run(self, sample: Any) -> Any:
        import torch

        with torch.inference_mode():
            y = self.model(**sample.kwargs, return_dict=False)[0]
        return (y if self.keep is None else y[:, : self.keep]).float()

    def __call__(self) -> float:
        total = 0.0
        for s, r in zip(self.samples, self.reference):
            total += float(((self._run(s) - r).double() ** 2).sum())
        return total / self.norm


def _weight_error(x: Any, q: np.ndarray, importance: Any, dev: str) -> float:
    """``sum_ij imp_j (q_ij - x_ij)^2`` in float64, on the measuring device.

    ``x`` and ``importance`` come as float64 torch tensors already on ``dev`` (made once per tensor,
    for all candidate types). Torch's threads (or the GPU) do the arithmetic: numpy's single-threaded
    float64 passes took 1.3 s per 3072 x 12288 tensor and type, about 35 minutes for the full
    model's 304 tensors x 7 types, many times the quantization itself."""
    import torch

    d = torch.from_numpy(q).to(device=dev, dtype=torch.float64).sub_(x).square_()
    if importance is not None:
        d.mul_(importance)
    return float(d.sum())


def _check_sample(names: Sequence[str], count: int) -> list[str]:
    if count <= 0:
        return []
    ordered = sorted(names)
    if count >= len(ordered):
        return ordered
    step = len(ordered) / count
    return [ordered[int(i * step)] for i in range(count)]


def measure_sensitivity(
    source_path: str | pathlib.Path,
    *,
    inputs: str | pathlib.Path | None = None,
    probes: int = 4,
    probe: ProbeSpec = ProbeSpec(height=512, width=512),
    device: str | None = None,
    imatrix: Imatrix | None = None,
    imatrix_file: Mapping[str, str] | None = None,
    imatrix_origin: str = "importance matrix",
    source_sha256: str | None = None,
    check_tensors: int = DEFAULT_CHECK_TENSORS,
    progress: ProgressFn | None = None,
    model: Any = None,
) -> SensitivityReport:
    """Measure every quantizable tensor of ``source_path`` (a checkpoint convert reads).

    ``model``: the transformer already built from this source on ``device`` (build_transformer),
    to save building a second copy; its weights are put back as they were.

    ``imatrix_file``: {"file", "sha256"} of the imatrix, recorded in the file; ``source_sha256``
    likewise for the source (the CLI hashes it)."""
    import torch

    require_diffusers()
    dev = resolve_device(device)
    dtype = compute_dtype(dev)
    start = time.perf_counter()
    if inputs is None and probes < 1:
        raise CalibrationError(f"need at least one probe, got {probes}")
    try:
        source_cm = open_source(source_path)
        source = source_cm.__enter__()
    except FluxGGUFError as exc:
        raise CalibrationError(str(exc)) from exc
    try:
        try:
            geometry = detect_model(source).geometry
        except FluxGGUFError as exc:
            raise CalibrationError(str(exc)) from exc
        if model is None:
            model = build_transformer(geometry, source.read, dev)
        if inputs is None:
            samples = list(probe_samples(probes, probe, dev, dtype, geometry.guidance))
            inputs_doc = {"kind": "probes", "dataset": probes_dataset(probes, probe), "samples": probes,
                          "probe": probe.to_dict()}
            keep: int | None = probe.target_tokens
        else:
            saved = read_inputs_file(inputs, geometry)
            samples = list(file_samples(saved, dev, dtype))
            inputs_doc = {"kind": "file", "dataset": pathlib.Path(inputs).name, "samples": len(samples)}
            keep = None
        shapes = bfl_tensor_shapes(geometry)
        names = quantized_weight_names(shapes)
        if imatrix is not None:  # before any forward pass: an imatrix for another model is one line
            check_against(imatrix, {n: shapes[n][-1] for n in names}, imatrix_origin)
        check = set(_check_sample(names, check_tensors))
        total_steps = len(names) + len(check)
        measure = _OutputError(model, samples, keep)
        tensors: dict[str, Any] = {}
        pairs: list[dict[str, Any]] = []
        done = 0
        if progress:
            progress(0, total_steps)
        for name in names:
            x = source.read(name)
            shape = tuple(x.shape)
            src_dtype = source.tensors[name].dtype
            imp = imatrix.importance(name) if imatrix is not None else None
            x64 = torch.from_numpy(x).to(device=dev, dtype=torch.float64)
            imp64 = None if imp is None else torch.from_numpy(np.asarray(imp)).to(device=dev, dtype=torch.float64)
            weight_err: dict[str, float] = {}
            dequant: dict[str, np.ndarray] = {}
            for qt in CANDIDATE_TYPES:
                if shape[-1] % quant_kernels.resolve(qt).block_size:
                    continue
                qw = imp if imp is not None and uses_imatrix(qt) else None
                q = quant_kernels.dequantize(quant_kernels.quantize(x, qt, imatrix=qw), qt, shape)
                weight_err[qt] = _weight_error(x64, q, imp64, dev)
                if qt == REFERENCE_TYPE or name in check:
                    dequant[qt] = q
            ref = REFERENCE_TYPE if REFERENCE_TYPE in dequant else next(iter(dequant), None)
            measured: dict[str, float] = {}
            if ref is not None:
                measured[ref] = _inject(model, name, dequant[ref], x, dev, dtype, measure)
            done += 1
            if progress:
                progress(done, total_steps)
            gain = measured[ref] / weight_err[ref] if ref is not None and weight_err[ref] > 0 else 0.0
            predicted = {qt: gain * w for qt, w in weight_err.items()}
            predicted[kept_type(src_dtype)] = 0.0
            if name in check:
                for qt in CHECK_TYPES:
                    if qt in dequant:
                        measured[qt] = _inject(model, name, dequant[qt], x, dev, dtype, measure)
                        pairs.append({"tensor": name, "type": qt, "predicted": predicted[qt], "measured": measured[qt]})
                done += 1
                if progress:
                    progress(done, total_steps)
            tensors[name] = {"shape": list(shape), "gain": gain, "weight_error": weight_err,
                             "measured": measured, "predicted": predicted}
        ratios = [p["predicted"] / p["measured"] for p in pairs if p["measured"] > 0]
        by_type = {}  # ranking tensors at one type: what the allocator relies on (across types is easier)
        for qt in CHECK_TYPES:
            rows = [p for p in pairs if p["type"] == qt]
            r = spearman([p["predicted"] for p in rows], [p["measured"] for p in rows])
            if not math.isnan(r):
                by_type[qt] = r
        rho = spearman([p["predicted"] for p in pairs], [p["measured"] for p in pairs])
        rho_ref = spearman([t["measured"].get(REFERENCE_TYPE, 0.0) for t in tensors.values()],
                           [t["weight_error"].get(REFERENCE_TYPE, 0.0) for t in tensors.values()])
        doc = {
            "format": SENSITIVITY_FORMAT,
            "version": SENSITIVITY_VERSION,
            "tool_version": __version__,
            "metric": "relative squared output error sum||y_q - y||^2 / sum||y||^2, one tensor quantized at a time",
            "reference_type": REFERENCE_TYPE,
            "source": {"file": pathlib.Path(source_path).name, "sha256": source_sha256},
            "inputs": inputs_doc,
            "imatrix": dict(imatrix_file) if imatrix_file else None,
            "device": dev,
            "compute_dtype": str(dtype).removeprefix("torch."),
            "check": {
                "types": list(CHECK_TYPES),
                "tensors": sorted(check),
                "pairs": len(pairs),
                "spearman": None if math.isnan(rho) else rho,
                "spearman_by_type": by_type,
                "median_predicted_over_measured": float(np.median(ratios)) if ratios else None,
                "weight_error_vs_output_error_spearman": None if math.isnan(rho_ref) else rho_ref,
                "rows": pairs,
            },
            "tensors": tensors,
        }
    finally:
        source_cm.__exit__(None, None, None)
    return SensitivityReport(doc, time.perf_counter() - start, dev)


def _inject(model: Any, name: str, q: np.ndarray, x: np.ndarray, dev: str, dtype: Any, measure: _OutputError) -> float:
    """Output error with tensor ``name`` alone replaced by ``q``; the original weight is put back."""
    model.load_state_dict(diffusers_state_dict({name: q}, dev, dtype), strict=False)
    try:
        return measure()
    finally:
        model.load_state_dict(diffusers_state_dict({name: x}, dev, dtype), strict=False)


__all__ = ["REFERENCE_TYPE", "CHECK_TYPES", "SensitivityReport", "measure_sensitivity", "spearman"]
