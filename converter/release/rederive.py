"""``verify --source``: re-derive every tensor of a release from source weights and compare digests.

File digests prove the bytes are the ones the manifest lists; this proves where the manifest's
tensors came from. Each source tensor is read once (float32, exactly as the converter reads it),
encoded once per type the release stores it in (the types recorded per tensor in the manifest),
and the sha256 of the encoded bytes must equal the recorded tensor digest. The recipe is checked
too: planning each variant with the recorded overrides must give exactly the recorded types, so
neither a tensor's bytes nor its type choice can have come from anywhere else.

The source may be laid out differently from the one the release was built from (a diffusers
folder for a single file): tensors are compared by BFL name. Whether the source *files* are the
very files the manifest lists is reported separately (``source_files``), and does not by itself
fail the check. LoRA files given with ``--lora`` are sources too, matched by sha256.

Only ``[[lora]]`` entries merged into the weights need their transform: a release whose LoRAs are
all side-cars re-derives from the base weights alone.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

import quant_kernels
from converter.detect import detect_model
from converter.errors import PlanError, ReleaseError
from converter.imatrix import Imatrix, check_against, uses_imatrix
from converter.pipeline import kernel_threads
from converter.recipes import make_plan, mix_variant, mostly_file_type
from converter.hub.source import is_hub_spec, open_any_source
from converter.sources import Source, open_source
from manifests import BackgroundHasher, Manifest
from manifests.hashing import FileDigest
from quant_kernels.errors import QuantError

from .lora import is_merge, manifest_lora_records
from .spec import EXTENSION_KEYS, TensorTransform

ProgressFn = Callable[[int, int], None]
OK, MISMATCH, MISSING, SHAPE = "ok", "mismatch", "missing-in-source", "shape-mismatch"


@dataclass(frozen=True)
class TensorProblem:
    """A tensor of the release that the source does not reproduce."""

    artifact: str
    tensor: str
    type: str
    status: str
    detail: str

    def to_json(self) -> dict[str, Any]:
        return {"artifact": self.artifact, "tensor": self.tensor, "type": self.type,
                "status": self.status, "detail": self.detail}


@dataclass(frozen=True)
class SourceFileCheck:
    """Does a source file given now equal one the manifest lists (by name, size and sha256)?"""

    name: str
    status: str  # ok / mismatch / missing / unexpected, as for release files
    expected_sha256: str | None
    actual_sha256: str | None

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "status": self.status,
                "expected_sha256": self.expected_sha256, "actual_sha256": self.actual_sha256}


@dataclass
class RederiveReport:
    """``ok`` when every recorded tensor re-derives bit for bit and every recipe choice matches."""

    source: str
    tensors_checked: int = 0
    encodings: int = 0
    problems: list[TensorProblem] = field(default_factory=list)
    recipe_problems: list[str] = field(default_factory=list)
    unused_source_tensors: list[str] = field(default_factory=list)
    source_files: list[SourceFileCheck] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems and not self.recipe_problems and not self.unused_source_tensors

    @property
    def source_files_match(self) -> bool:
        return all(f.status == "ok" for f in self.source_files)

    def to_json(self) -> dict[str, Any]:
        return {"source": self.source, "ok": self.ok, "tensors_checked": self.tensors_checked,
                "problems": [p.to_json() for p in self.problems], "recipe_problems": self.recipe_problems,
                "unused_source_tensors": self.unused_source_tensors,
                "source_files_match": self.source_files_match,
                "source_files": [f.to_json() for f in self.source_files]}


def encode_tensor(x: np.ndarray, qtype: str, importance: np.ndarray | None = None) -> np.ndarray:
    """A tensor's bytes in ``qtype`` as the converter writes them (a 1-D tensor is one row;
    ``importance``: the imatrix vector, which only K-quants use)."""
    rows = x.reshape(-1, x.shape[-1]) if x.ndim > 1 else x.reshape(1, -1)
    return quant_kernels.quantize(rows, qtype, imatrix=importance)


def _check_imatrix(manifest: Manifest, imatrix: Imatrix | None, origin: str) -> None:
    """A calibrated release re-derives only with its importance matrix; a static one without."""
    recorded = manifest.spec.get("imatrix")
    if recorded and imatrix is None:
        files = ", ".join(map(str, recorded)) if isinstance(recorded, list) else str(recorded)
        raise ReleaseError(f"manifest.json: this release was quantized with the importance matrix {files}; "
                           "re-deriving it needs that file too (--imatrix FILE)")
    if imatrix is not None and not recorded:
        raise ReleaseError("manifest.json: this release records no importance matrix, so --imatrix would "
                           "change the bytes it re-derives; leave it out")
    if imatrix is not None:
        widths = {t.name: int(t.shape[-1]) for art in manifest.ggufs for t in art.tensors or ()
                  if len(t.shape) > 1 and uses_imatrix(t.type)}
        check_against(imatrix, widths, origin)


def _recorded_overrides(manifest: Manifest) -> list[str]:
    overrides = manifest.spec.get("overrides", [])
    if not isinstance(overrides, list):
        raise ReleaseError(f"manifest.json: spec.overrides must be a list of REGEX=TYPE strings, got {overrides!r}")
    for i, o in enumerate(overrides):
        if not isinstance(o, str):
            raise ReleaseError(f"manifest.json: spec.overrides[{i}] must be a REGEX=TYPE string, got {o!r}")
    return overrides


def weight_changing_entries(manifest: Manifest) -> list[str]:
    """Spec keys whose entries changed the weights (so re-deriving needs their transform).

    ``lora`` counts only when some record was merged (a record without ``mode`` is a merge);
    side-car LoRAs leave the GGUFs alone. Raises ReleaseError for a malformed record.
    """
    used = []
    for key in EXTENSION_KEYS:
        if key not in manifest.spec:
            continue
        if key == "lora" and not any(is_merge(r) for r in manifest_lora_records(manifest.spec)):
            continue
        used.append(key)
    return used


def _target_names(manifest: Manifest) -> set[str]:
    """Size-targeted variants of the spec (``{name = ..., target_size = ...}`` entries)."""
    variants = manifest.spec.get("variants", [])
    return {v["name"] for v in variants if isinstance(v, dict) and isinstance(v.get("name"), str)} \
        if isinstance(variants, list) else set()


def _plan_recorded(manifest: Manifest, art: Any, source: Source, family: str, overrides: list[str],
                   targets: set[str]) -> Any:
    """The plan a recorded file must match. A size-targeted mix's choice came from a sensitivity
    file the release does not ship, so its recorded types are taken as the choice and checked
    against the recipe's fixed rules (1-D F32, img_in F32, kept layers, rows the block divides)
    and its file type against the "mostly" rule; its bytes are re-derived like any other."""
    if art.variant in targets:
        chosen = {t.name: t.type for t in art.tensors or ()}
        plan = make_plan(mix_variant(art.variant), source.tensors, name=manifest.name, family=family, types=chosen)
        params: dict[str, int] = {}
        for e in plan.entries:
            if e.rule == "target":
                params[e.qtype] = params.get(e.qtype, 0) + e.n_params
        return make_plan(mix_variant(art.variant, mostly_file_type(params)), source.tensors, name=manifest.name,
                         family=family, types=chosen)
    return make_plan(art.variant or "", source.tensors, name=manifest.name, family=family, overrides=overrides)


def _check_recipe(manifest: Manifest, source: Source, report: RederiveReport) -> None:
    overrides = _recorded_overrides(manifest)
    family = detect_model(source).family
    targets = _target_names(manifest)
    for art in manifest.ggufs:
        try:
            plan = _plan_recorded(manifest, art, source, family, overrides, targets)
        except PlanError as e:
            report.recipe_problems.append(f"{art.path}: {e}")
            continue
        if plan.file_type != art.file_type:
            report.recipe_problems.append(f"{art.path}: file type {art.file_type} recorded, variant {plan.variant.name} gives {plan.file_type}")
        planned = {e.name: e.qtype for e in plan.entries}
        recorded = {t.name: t.type for t in art.tensors or ()}
        for name, qtype in recorded.items():
            if name in planned and planned[name] != qtype:
                report.recipe_problems.append(f"{art.path}: {name} is {qtype}, but recipe {plan.variant.name} gives {planned[name]}")
        if list(recorded) != [n for n in planned if n in recorded]:
            report.recipe_problems.append(f"{art.path}: tensors are not in the order the converter writes them")


def _source_file_checks(manifest: Manifest, source_path: Path, digests: dict[Path, Any],
                        extra: Mapping[Path, FileDigest] | None = None,
                        named: Mapping[str, FileDigest] | None = None) -> list[SourceFileCheck]:
    """Source files by name (``named``: already keyed so, e.g. a Hub source's); then ``extra`` files
    (``--lora``, named anything) by size and sha256."""
    root = source_path if named is None and source_path.is_dir() else None
    given = dict(named) if named is not None else {
        (p.relative_to(root).as_posix() if root else p.name): d for p, d in digests.items()}
    by_content = {(d.size, d.sha256): p for p, d in (extra or {}).items()}
    checks = []
    for s in manifest.sources:
        d = given.pop(s.name, None)
        if d is None:
            found = by_content.pop((s.size, s.sha256), None)
            if found is not None:
                checks.append(SourceFileCheck(s.name, "ok", s.sha256, s.sha256))
            else:
                checks.append(SourceFileCheck(s.name, "missing", s.sha256, None))
        else:
            ok = d.size == s.size and d.sha256 == s.sha256
            by_content.pop((d.size, d.sha256), None)  # the same file given twice is not extra
            checks.append(SourceFileCheck(s.name, "ok" if ok else "mismatch", s.sha256, d.sha256))
    checks += [SourceFileCheck(n, "unexpected", None, d.sha256) for n, d in sorted(given.items())]
    checks += [SourceFileCheck(str(p), "unexpected", None, sha) for (_, sha), p in by_content.items()]
    return checks


def rederive_release(
    manifest: Manifest,
    source_path: str | os.PathLike[str],
    *,
    threads: int | None = None,
    progress: ProgressFn | None = None,
    tensor_transform: TensorTransform | None = None,
    extra_source_files: Mapping[Path, FileDigest] | None = None,
    imatrix: Imatrix | None = None,
    imatrix_files: Sequence[str | os.PathLike[str]] = (),
    before_quantize: Callable[..., None] | None = None,
) -> RederiveReport:
    """Re-encode every tensor the manifest lists from ``source_path`` and compare sha256 digests.

    ``progress(done, total)`` reports source bytes processed. A release whose spec merged
    extension entries into the weights (``[[lora]]`` with mode "merge") can only be re-derived
    with the same ``tensor_transform``. ``extra_source_files`` (e.g. the ``--lora`` files, already
    hashed) count as given source files when their size and sha256 match a listed source.
    ``imatrix`` (read from ``imatrix_files``): the importance matrix a calibrated release was
    quantized with; its K-quant tensors are re-encoded with it (pass the files' digests in
    ``extra_source_files`` to check them against the listed sources).
    ``before_quantize(types, imatrix=bool)``: called once with the storage types to encode, before the first tensor.
    """
    _recorded_overrides(manifest)  # a malformed spec is refused before any work starts
    _check_imatrix(manifest, imatrix, " + ".join(map(str, imatrix_files)) or "importance matrix")
    used = weight_changing_entries(manifest)
    if used and tensor_transform is None:
        raise ReleaseError(f"manifest.json: this release applied {used[0]!r} entries to the weights; "
                           "re-deriving it needs the same transform, which --source alone cannot rebuild")
    if is_hub_spec(os.fspath(source_path)):  # hf://...: streamed, its sha256 checked against the Hub's
        with kernel_threads(threads), open_any_source(os.fspath(source_path)) as remote:
            report = RederiveReport(os.fspath(source_path))
            _check_recipe(manifest, remote, report)
            _rederive_tensors(manifest, remote, report, progress, tensor_transform)
            remote.check_complete()
            named = {n: FileDigest(size, sha) for n, (size, sha) in remote.file_digests().items()}  # type: ignore[attr-defined]
            report.source_files = _source_file_checks(manifest, Path(), {}, extra_source_files, named=named)
            return report
    src = Path(source_path)
    with kernel_threads(threads), open_source(src) as source:
        report = RederiveReport(str(src))
        with BackgroundHasher([Path(f.path) for f in source.files]) as hasher:
            _check_recipe(manifest, source, report)
            if before_quantize is not None:
                # a recorded type we cannot encode is reported per tensor below, not compiled here
                before_quantize(sorted({t.type for art in manifest.ggufs for t in art.tensors or ()}
                                       & set(quant_kernels.supported_type_names())), imatrix=imatrix is not None)
            _rederive_tensors(manifest, source, report, progress, tensor_transform, imatrix)
            digests = hasher.result()
        report.source_files = _source_file_checks(manifest, src, digests, extra_source_files)
        return report


def _rederive_tensors(manifest: Manifest, source: Source, report: RederiveReport,
                      progress: ProgressFn | None, transform: TensorTransform | None,
                      imatrix: Imatrix | None = None) -> None:
    # name -> type -> [(artifact path, recorded entry)]: each tensor read once, each type encoded once.
    work: dict[str, dict[str, list[tuple[str, Any]]]] = {}
    for art in manifest.ggufs:
        for t in art.tensors or ():
            work.setdefault(t.name, {}).setdefault(t.type, []).append((art.path, t))
    for name in work:
        if name not in source.tensors:
            for qtype, uses in work[name].items():
                for path, t in uses:
                    report.problems.append(TensorProblem(path, name, qtype, MISSING, "the source has no tensor of that name"))
    report.unused_source_tensors = [n for n in source.tensors if n not in work]
    names = source.read_order([n for n in source.tensors if n in work])  # a Hub source: its file order
    total = sum(int(source.tensors[n].nbytes) for n in names)
    done = 0
    for name in names:
        x = source.read(name)
        if transform is not None:
            x = np.ascontiguousarray(transform(name, x), dtype=np.float32)
        for qtype, uses in work[name].items():
            shapes = {tuple(t.shape) for _, t in uses}
            if tuple(x.shape) not in shapes or len(shapes) > 1:
                for path, t in uses:
                    if tuple(t.shape) != tuple(x.shape):
                        report.problems.append(TensorProblem(path, name, qtype, SHAPE,
                                               f"recorded shape {list(t.shape)}, source has {list(x.shape)}"))
                uses = [(p, t) for p, t in uses if tuple(t.shape) == tuple(x.shape)]
                if not uses:
                    continue
            qw = imatrix.importance(name) if imatrix is not None and x.ndim > 1 and uses_imatrix(qtype) else None
            try:
                encoded = encode_tensor(x, qtype, qw)
            except QuantError as e:  # a type we cannot write, rows it cannot hold, values it overflows
                report.problems.extend(TensorProblem(path, name, qtype, MISMATCH, f"cannot be re-encoded as the "
                                                     f"recorded type: {e}") for path, _ in uses)
                continue
            digest = hashlib.sha256(memoryview(encoded).cast("B")).hexdigest()
            report.encodings += 1
            for path, t in uses:
                report.tensors_checked += 1
                if digest != t.sha256:
                    report.problems.append(TensorProblem(path, name, qtype, MISMATCH,
                                           "re-encoding the source tensor gives different bytes"))
        done += int(source.tensors[name].nbytes)
        if progress is not None:
            progress(done, total)
