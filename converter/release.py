"""``release build``: one spec in, a complete verifiable release folder out.

Everything is built in ``DIR.partial`` and renamed to ``DIR`` only when the last file is in
place, so a folder under its final name is always a complete release. Every digest is computed
while the bytes are produced: GGUFs by the streaming writer, extra files while they are copied,
README/manifest/SHA256SUMS from the bytes in memory; the source files are hashed by a background
thread while the conversion reads them. Nothing is read back.

Reproducible: the same spec and source give byte-identical files. The manifest carries a
``created`` time only when ``SOURCE_DATE_EPOCH`` is set (then it is that time).
"""
from __future__ import annotations

import datetime as _dt
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np

from manifests import (
    CHECKSUMS_NAME,
    MANIFEST_NAME,
    ArtifactEntry,
    BackgroundHasher,
    Manifest,
    SourceEntry,
    TensorEntry,
    dump_manifest,
    format_sha256sums,
)
from manifests.hashing import FileDigest, copy_file_hashed, hash_bytes, write_bytes_atomic

from . import __version__
from . import release_lora  # noqa: F401  (registers the [[lora]] spec hook)
from .errors import OutputError, ReleaseError
from .modelcard import CardSource, card_file, read_validation_report, render_model_card
from .pipeline import convert
from .release_spec import (
    MODEL_CARD_NAME,
    VALIDATION_NAME,
    ExtensionOutput,
    ReleaseSpec,
    TensorTransform,
    parse_release_spec,
)
from .sources import open_source
from .writer import ArtifactRecord

TOOL_NAME = "flux-gguf"
KIND_GGUF, KIND_CARD, KIND_VALIDATION, KIND_EXTRA = "gguf", "model-card", "validation-report", "extra"

ProgressFn = Callable[[int, int], None]


@dataclass(frozen=True)
class ReleaseResult:
    """The finished release: where it is, its manifest, and the manifest's digest."""

    out_dir: Path
    manifest: Manifest
    manifest_sha256: str


def created_timestamp(env: Mapping[str, str] = os.environ) -> str | None:
    """``SOURCE_DATE_EPOCH`` as an ISO-8601 UTC time, or None when unset (reproducible builds)."""
    raw = env.get("SOURCE_DATE_EPOCH")
    if raw is None or raw == "":
        return None
    try:
        seconds = int(raw)
        return _dt.datetime.fromtimestamp(seconds, _dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    except (ValueError, OverflowError, OSError):
        raise ReleaseError(f"SOURCE_DATE_EPOCH must be a whole number of seconds since 1970, got {raw!r}") from None


def _source_names(source_root: Path, files: Sequence[Path]) -> list[str]:
    """Names the manifest records: relative to a source folder, or the bare file name."""
    if source_root.is_dir():
        return [f.relative_to(source_root).as_posix() for f in files]
    return [f.name for f in files]


def _compose(transforms: Sequence[TensorTransform]) -> TensorTransform | None:
    if not transforms:
        return None
    if len(transforms) == 1:
        return transforms[0]

    def chained(name: str, x: np.ndarray) -> np.ndarray:
        for t in transforms:
            x = t(name, x)
        return x
    return chained


def _prepare(out: Path) -> Path:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ReleaseError(f"{out}: already exists and is not an empty folder; choose a new output folder")
    partial = out.with_name(out.name + ".partial")
    if partial.is_dir() and not partial.is_symlink():
        shutil.rmtree(partial)  # left over from an interrupted build of ours
    try:
        partial.mkdir(parents=True)
    except OSError as e:
        raise OutputError(f"{out} was not written: cannot create {partial}: {e.strerror or e}") from None
    return partial


def _gguf_entry(record: ArtifactRecord) -> ArtifactEntry:
    return ArtifactEntry(
        path=Path(record.path).name, size=record.size, sha256=record.sha256, kind=KIND_GGUF,
        variant=record.variant, file_type=record.file_type,
        tensors=tuple(TensorEntry(t.name, t.type, tuple(t.shape), t.offset, t.nbytes, t.sha256) for t in record.tensors),
    )


def _file_entry(name: str, digest: FileDigest, kind: str) -> ArtifactEntry:
    return ArtifactEntry(path=name, size=digest.size, sha256=digest.sha256, kind=kind)


def build_release(
    spec: ReleaseSpec | str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    threads: int | None = None,
    progress: ProgressFn | None = None,
) -> ReleaseResult:
    """Convert every variant of ``spec`` in one pass and write the release folder ``out_dir``.

    ``progress(done, total)`` reports source bytes converted. Raises :class:`ReleaseError` for a
    bad spec or an occupied output folder; conversion errors come from the pipeline.
    """
    if not isinstance(spec, ReleaseSpec):
        spec = parse_release_spec(spec)
    created = created_timestamp()
    out = Path(out_dir)
    partial = _prepare(out)
    try:
        manifest, manifest_sha = _build_into(spec, partial, created, threads, progress)
        if out.exists():
            out.rmdir()  # checked empty above
        os.replace(partial, out)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return ReleaseResult(out, manifest, manifest_sha)


def _build_into(spec: ReleaseSpec, partial: Path, created: str | None, threads: int | None,
                progress: ProgressFn | None) -> tuple[Manifest, str]:
    with open_source(spec.source_path) as source:
        source_files = [Path(f.path) for f in source.files]
        shapes = {name: tuple(t.shape) for name, t in source.tensors.items()}
    names = _source_names(spec.source_path, source_files)
    ext_files = [f for ext in spec.extensions.values() for f in ext.files]
    names += [Path(os.path.relpath(f, spec.base_dir)).as_posix() for f in ext_files]
    transform = _compose([e.make_transform(shapes) for e in spec.extensions.values() if e.make_transform is not None])

    inputs = source_files + list(ext_files)
    with BackgroundHasher(inputs) as hasher:
        records = convert(spec.source_path, partial, list(spec.variants), name=spec.name,
                          overrides=spec.overrides, threads=threads, progress=progress,
                          tensor_transform=transform,
                          extra_metadata={k: v for e in spec.extensions.values() for k, v in e.gguf_metadata.items()})
        digests = hasher.result()
    sources = tuple(SourceEntry(n, digests[p].size, digests[p].sha256) for n, p in zip(names, inputs))

    artifacts = [_gguf_entry(r) for r in records]
    ext_outputs: dict[str, list[ExtensionOutput]] = {}
    for key, ext in spec.extensions.items():
        if ext.write_outputs is not None:
            ext_outputs[key] = list(ext.write_outputs(partial, spec))
            artifacts += [ArtifactEntry(path=o.name, size=o.size, sha256=o.sha256, kind=o.kind) for o in ext_outputs[key]]
    files = [card_file(a.path, a.variant or "", a.size, a.sha256, a.tensors or ()) for a in artifacts]
    quality = {}
    extra: list[ArtifactEntry] = []
    if spec.validation_path is not None:
        quality = read_validation_report(spec.validation_path, files)
        extra.append(_file_entry(VALIDATION_NAME, copy_file_hashed(spec.validation_path, partial / VALIDATION_NAME),
                                 KIND_VALIDATION))
    for name, path in spec.extra_file_paths.items():
        extra.append(_file_entry(name, copy_file_hashed(path, partial / name), KIND_EXTRA))

    card = render_model_card(spec, files, [CardSource(s.name, s.size, s.sha256) for s in sources], quality,
                             extension_outputs=ext_outputs)
    card_digest = write_bytes_atomic(partial / MODEL_CARD_NAME, card.encode("utf-8"))
    artifacts += [_file_entry(MODEL_CARD_NAME, card_digest, KIND_CARD)] + extra

    manifest = Manifest(tool_name=TOOL_NAME, tool_version=__version__, name=spec.name, spec=spec.to_json(),
                        sources=sources, artifacts=tuple(artifacts), created=created)
    data = dump_manifest(manifest)
    manifest_sha = hash_bytes(data).sha256
    write_bytes_atomic(partial / MANIFEST_NAME, data)
    sums = {a.path: a.sha256 for a in artifacts} | {MANIFEST_NAME: manifest_sha}
    write_bytes_atomic(partial / CHECKSUMS_NAME, format_sha256sums(sums))
    return manifest, manifest_sha
