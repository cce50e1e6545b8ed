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

import contextlib
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
from converter.layout import FLUX1, bfl_tensor_shapes
from converter.recipes import kept_type
from converter.recipes import CANDIDATE_TYPES, SENSITIVITY_FORMAT, SENSITIVITY_VERSION
from converter.sources import open_source, source_fingerprint

from .calibrate import (
    ImatrixCollector,
    PipelineSpec,
    Sample,
    build_transformer,
    collect_with_pipeline,
    diffusers_state_dict,
    file_samples,
    list_images,
    pipeline_dataset,
    probe_samples,
    probes_dataset,
    quantized_weight_names,
    read_inputs_file,
    read_prompts,
)
from .diffusers_model import compute_dtype, require_diffusers, resolve_device
from .distributed import Ranks
from .pipeline_check import refuse_flux2_pipeline
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
    imatrix: Imatrix | None = None  # the one collected on the reference pass (collect_imatrix=True)
    ranks: int = 1


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
    """Runs the model on fixed samples and measures the relative squared change of its output.

    ``keep[i]``: the leading output tokens of sample ``i`` that count (a Kontext call's target
    tokens; None: all). ``after_each`` runs after each reference call (the imatrix collector's
    ``end_sample``: the reference pass is also the imatrix pass)."""

    def __init__(self, model: Any, samples: list[Any], keep: Sequence[int | None],
                 after_each: Callable[[], None] | None = None) -> None:
        self.model, self.samples, self.keep = model, samples, list(keep)
        self.reference = []
        for i, s in enumerate(samples):
            self.reference.append(self._run(i, s))
            if after_each is not None:
                after_each()
        self.norm = sum(float((r.double() ** 2).sum()) for r in self.reference)
        if not self.norm > 0 or not math.isfinite(self.norm):
            raise CalibrationError("the transformer's reference output is zero or not finite; cannot measure")

    def _run(self, i: int, sample: Any) -> Any:
        import torch

        with torch.inference_mode():
            y = self.model(**sample.kwargs, return_dict=False)[0]
        keep = self.keep[i]
        return (y if keep is None else y[:, :keep]).float()

    def __call__(self) -> float:
        total = 0.0
        for i, (s, r) in enumerate(zip(self.samples, self.reference)):
            total += float(((self._run(i, s) - r).double() ** 2).sum())
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


@dataclass
class _Inputs:
    """The samples every tensor is measured on, what the file records of them, and the imatrix of
    the pass that made them (when one was asked for)."""

    samples: list[Any]
    keep: list[int | None]
    doc: dict[str, Any]
    dataset: str
    chunk_size: int
    imatrix: Imatrix | None = None


def _target_tokens(img_ids: Any) -> int | None:
    """A Kontext call's target tokens: the leading image ids whose first coordinate is 0 (the
    context image's are 1, as FluxKontextPipeline marks them); None when every id is 0."""
    marks = img_ids.reshape(-1, img_ids.shape[-1])[:, 0]
    n = int((marks == 0).sum())
    return None if n == marks.numel() or not bool((marks[:n] == 0).all()) else n


def _pipeline_inputs(model: Any, spec: PipelineSpec, dev: str, dtype: Any) -> _Inputs:
    """Render the prompts with the Kontext pipeline around ``model``, capturing every transformer call
    (the samples) and collecting the imatrix on the way (what ``imatrix --pipeline`` collects)."""
    from .pipeline_check import _check_pipeline_dir, _load_image, load_pipeline

    prompts = read_prompts(spec.prompts_file)
    images = [_load_image(p) for p in list_images(spec.images_dir)] if spec.images_dir is not None else []
    _check_pipeline_dir(pathlib.Path(spec.pipeline_dir))
    pipe = load_pipeline(pathlib.Path(spec.pipeline_dir), model, dev)
    calls: list[dict[str, Any]] = []
    dataset = pipeline_dataset(spec.prompts_file, spec.images_dir)
    try:
        im, n_calls, _tokens = collect_with_pipeline(
            pipe, prompts, images=images, steps=spec.steps, guidance=spec.guidance, height=spec.height,
            width=spec.width, seed=spec.seed, max_sequence_length=spec.max_sequence_length, dataset=dataset,
            capture=calls)
    finally:
        pipe.transformer = None
        del pipe
    samples, keep = [], []
    for c in calls:
        kw = {k: v.to(dev, torch_dtype_of(v, dtype, k)) for k, v in c.items()}
        samples.append(Sample(kw, int(kw["hidden_states"].shape[1] + kw["encoder_hidden_states"].shape[1])))
        keep.append(_target_tokens(c["img_ids"]))
    doc = {"kind": "pipeline", "dataset": dataset, "samples": n_calls, "prompts": len(prompts), "steps": spec.steps}
    return _Inputs(samples, keep, doc, dataset, im.chunk_size, im)


def torch_dtype_of(value: Any, dtype: Any, key: str) -> Any:
    """The compute dtype, except for the ids and guidance, which the pipeline keeps in float32."""
    import torch

    return torch.float32 if key in ("img_ids", "txt_ids", "guidance") else dtype


def measure_sensitivity(
    source_path: str | pathlib.Path,
    *,
    inputs: str | pathlib.Path | None = None,
    pipeline: PipelineSpec | None = None,
    probes: int = 4,
    probe: ProbeSpec = ProbeSpec(height=512, width=512),
    device: str | None = None,
    imatrix: Imatrix | None = None,
    imatrix_file: Mapping[str, str] | None = None,
    imatrix_origin: str = "importance matrix",
    collect_imatrix: bool = False,
    source_sha256: str | None = None,
    check_tensors: int = DEFAULT_CHECK_TENSORS,
    progress: ProgressFn | None = None,
    model: Any = None,
    ranks: Ranks | None = None,
) -> SensitivityReport:
    """Measure every quantizable tensor of ``source_path`` (a checkpoint convert reads) on the seeded
    probes, the saved ``inputs`` or the transformer calls of a ``pipeline`` run.

    ``model``: the transformer already built from this source on ``device`` (build_transformer),
    to save building a second copy; its weights are put back as they were.

    ``collect_imatrix``: collect the imatrix on the reference pass (the pipeline run, or the
    reference outputs), exactly as ``flux-gguf imatrix`` would on the same inputs, and use it as
    ``imatrix`` (the report holds it, to be written too).

    ``ranks``: the tensors are shared out by index (tensor ``k`` in name order on rank ``k mod
    world``); every rank builds the samples and reference outputs itself, the results are gathered,
    and every rank returns the same document, whatever the number of ranks.

    ``imatrix_file``: {"file", "sha256"} of the imatrix, recorded in the file; ``source_sha256``
    likewise for the source (the CLI hashes it)."""
    require_diffusers()
    ranks = ranks or Ranks(device=resolve_device(device))
    dev = ranks.device
    dtype = compute_dtype(dev)
    start = time.perf_counter()
    if inputs is None and pipeline is None and probes < 1:
        raise CalibrationError(f"need at least one probe, got {probes}")
    if imatrix is not None and collect_imatrix:
        raise CalibrationError("give an importance matrix or collect one, not both")
    with contextlib.ExitStack() as stack:
        with ranks.step():
            try:
                source = stack.enter_context(open_source(source_path))
                geometry = detect_model(source).geometry
                if pipeline is not None:
                    refuse_flux2_pipeline(geometry)
            except CalibrationError:
                raise
            except FluxGGUFError as exc:
                raise CalibrationError(str(exc)) from exc
            fingerprint = source_fingerprint(source)
            shapes = bfl_tensor_shapes(geometry)
            names = quantized_weight_names(shapes)
            if imatrix is not None:  # before any forward pass: an imatrix for another model is one line
                check_against(imatrix, {n: shapes[n][-1] for n in names}, imatrix_origin)
            if model is None:
                model = build_transformer(geometry, source.read, dev)
        with ranks.step():
            got = _make_inputs(model, geometry, inputs, pipeline, probes, probe, dev, dtype, stack)
        ranks.same(len(got.samples), "samples")
        with ranks.step():
            if collect_imatrix and got.imatrix is None:
                collector = stack.enter_context(ImatrixCollector(model, names))
                measure = _OutputError(model, got.samples, got.keep, after_each=collector.end_sample)
                got.imatrix = collector.imatrix([got.dataset], len(got.samples), got.chunk_size)
                collector.close()
            else:
                measure = _OutputError(model, got.samples, got.keep)
        if collect_imatrix:
            imatrix = ranks.from_main(got.imatrix)  # the same computation on every rank; rank 0's, to be sure
        check = set(_check_sample(names, check_tensors))
        mine = ranks.mine(len(names))
        total_steps = len(mine) + sum(names[k] in check for k in mine)
        results: dict[str, tuple[dict[str, Any], list[dict[str, Any]]]] = {}
        done = 0
        if progress and ranks.main:
            progress(0, total_steps)
        for k in ranks.rounds(len(names)):
            with ranks.step():
                if k is not None:
                    name = names[k]
                    results[name] = _measure_tensor(source, model, name, imatrix, name in check, dev, dtype, measure,
                                                    geometry.arch)
                    done += 2 if name in check else 1
                    if progress and ranks.main:
                        progress(done, total_steps)
        with ranks.step():
            gathered = ranks.gather_objects(results)
            merged = {n: r for part in gathered for n, r in part.items()}
            tensors = {n: merged[n][0] for n in names}
            pairs = [p for n in names for p in merged[n][1]]
    doc = _document(source_path, {"sha256": source_sha256, "fingerprint": fingerprint}, got.doc, imatrix_file, dev, dtype, check, pairs, tensors)
    return SensitivityReport(doc, time.perf_counter() - start, dev,
                             imatrix=imatrix if collect_imatrix else None, ranks=ranks.world)


def _make_inputs(model: Any, geometry: Any, inputs: str | pathlib.Path | None, pipeline: PipelineSpec | None,
                 probes: int, probe: ProbeSpec, dev: str, dtype: Any, stack: contextlib.ExitStack) -> _Inputs:
    if pipeline is not None:
        return _pipeline_inputs(model, pipeline, dev, dtype)
    if inputs is None:
        samples = list(probe_samples(probes, probe, dev, dtype, geometry.guidance, geometry))
        doc = {"kind": "probes", "dataset": probes_dataset(probes, probe), "samples": probes, "probe": probe.to_dict()}
        return _Inputs(samples, [probe.target_tokens] * probes, doc, doc["dataset"],
                       probe.image_tokens + probe.text_tokens)
    saved = stack.enter_context(read_inputs_file(inputs, geometry))
    samples = list(file_samples(saved, dev, dtype))
    doc = {"kind": "file", "dataset": pathlib.Path(inputs).name, "samples": len(samples)}
    return _Inputs(samples, [None] * len(samples), doc, doc["dataset"], saved.image_tokens + saved.text_tokens)


def _measure_tensor(source: Any, model: Any, name: str, imatrix: Imatrix | None, checked: bool, dev: str, dtype: Any,
                    measure: _OutputError, arch: str = FLUX1) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """One tensor's row of the file (weight errors, measured and predicted output errors) and its check pairs."""
    import torch

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
        if qt == REFERENCE_TYPE or checked:
            dequant[qt] = q
    ref = REFERENCE_TYPE if REFERENCE_TYPE in dequant else next(iter(dequant), None)
    measured: dict[str, float] = {}
    if ref is not None:
        measured[ref] = _inject(model, name, dequant[ref], x, dev, dtype, measure, arch)
    gain = measured[ref] / weight_err[ref] if ref is not None and weight_err[ref] > 0 else 0.0
    predicted = {qt: gain * w for qt, w in weight_err.items()}
    predicted[kept_type(src_dtype)] = 0.0
    pairs = []
    if checked:
        for qt in CHECK_TYPES:
            if qt in dequant:
                measured[qt] = _inject(model, name, dequant[qt], x, dev, dtype, measure, arch)
                pairs.append({"tensor": name, "type": qt, "predicted": predicted[qt], "measured": measured[qt]})
    row = {"shape": list(shape), "gain": gain, "weight_error": weight_err, "measured": measured, "predicted": predicted}
    return row, pairs


def _document(source_path: str | pathlib.Path, source_ids: dict[str, str | None], inputs_doc: dict[str, Any],
              imatrix_file: Mapping[str, str] | None, dev: str, dtype: Any, check: set[str],
              pairs: list[dict[str, Any]], tensors: dict[str, Any]) -> dict[str, Any]:
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
    return {
        "format": SENSITIVITY_FORMAT,
        "version": SENSITIVITY_VERSION,
        "tool_version": __version__,
        "metric": "relative squared output error sum||y_q - y||^2 / sum||y||^2, one tensor quantized at a time",
        "reference_type": REFERENCE_TYPE,
        "source": {"file": pathlib.Path(source_path).name, **source_ids},
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


def _inject(model: Any, name: str, q: np.ndarray, x: np.ndarray, dev: str, dtype: Any, measure: _OutputError,
            arch: str = FLUX1) -> float:
    """Output error with tensor ``name`` alone replaced by ``q``; the original weight is put back."""
    model.load_state_dict(diffusers_state_dict({name: q}, dev, dtype, arch), strict=False)
    try:
        return measure()
    finally:
        model.load_state_dict(diffusers_state_dict({name: x}, dev, dtype, arch), strict=False)


__all__ = ["REFERENCE_TYPE", "CHECK_TYPES", "SensitivityReport", "measure_sensitivity", "spearman"]
