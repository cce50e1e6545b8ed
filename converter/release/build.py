"""``release build``: one spec in, a complete verifiable release folder out.

Everything is built in a hidden, unique partial folder beside ``DIR``
(``.DIR.<pid>-<random>.flux-gguf.partial``) and renamed to ``DIR`` only when the last file is in
place, so a folder under its final name is always a complete release. A build holds an exclusive
lock on ``DIR`` (``.DIR.flux-gguf.lock`` beside it) from its first check to the rename: a second
build of the same folder fails at once, naming the holder. The partial folder carries a marker
file (``.flux-gguf-partial``, removed before the rename); under the lock, partial folders of
``DIR`` that an interrupted build left (marker inside) are removed, and nothing else is touched. Any OSError while writing becomes one OutputError naming the file, with the
partial folder removed. Every write is checked whole (a short write is finished or fails), and the
folder is fsynced before the rename and its parent after it: a sync error fails the build too (the
rename is taken back), so a disk that fills or fails never leaves a release under ``DIR``.

Every digest is computed while the bytes are produced: GGUFs by the streaming writer, extra files
while they are copied, README/manifest/SHA256SUMS from the bytes in memory; the source files are
hashed by a background thread while the conversion reads them. Nothing is read back.

Reproducible: the same spec and source give byte-identical files. The manifest carries a
``created`` time only when ``SOURCE_DATE_EPOCH`` is set (then it is that time).
"""
from __future__ import annotations

import contextlib
import datetime as _dt
import errno
import os
import shutil
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Mapping, Sequence

import numpy as np

from converter import __version__
from converter.errors import OutputError, ReleaseError
from converter.detect import detect_model
from converter.imatrix import Imatrix, load_imatrices
from converter.pipeline import convert
from converter.recipes import bpw_budget, read_sensitivity, size_budget
from converter.hub.source import is_hub_spec, open_any_source
from converter.writer import ArtifactRecord
from manifests import (
    CHECKSUMS_NAME,
    UnsafePathError,
    MANIFEST_NAME,
    ArtifactEntry,
    BackgroundHasher,
    Manifest,
    SourceEntry,
    TensorEntry,
    dump_manifest,
    format_sha256sums,
)
from manifests.hashing import (
    PARTIAL_MARK,
    FileDigest,
    copy_file_hashed,
    hash_bytes,
    partial_path,
    write_bytes_atomic,
)
from manifests.locking import OutputBusyError
from manifests.locking import acquire as acquire_lock
from manifests.paths import open_inside

from . import lora  # noqa: F401  (registers the [[lora]] spec hook)
from .signing import PreparedSigner, SigningRequest, card_section, prepare_signer, release_digests, sign_release
from .modelcard import CardSource, card_file, read_validation_report, render_model_card
from .spec import (
    MODEL_CARD_NAME,
    VALIDATION_NAME,
    ExtensionOutput,
    ReleaseSpec,
    TensorTransform,
    parse_release_spec,
)

TOOL_NAME = "flux-gguf"
KIND_GGUF, KIND_CARD, KIND_VALIDATION, KIND_EXTRA = "gguf", "model-card", "validation-report", "extra"

PARTIAL_MARKER = ".flux-gguf-partial"
"""Present in ``DIR.partial`` while a build of ours owns it; removed just before the final rename."""

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


def _reason(e: OSError) -> str:
    return e.strerror or str(e)


@contextlib.contextmanager
def _writing(out: Path, what: str) -> Iterator[None]:
    """Turn an OSError (disk full, I/O error, permissions) of one output step into an OutputError."""
    try:
        yield
    except OSError as e:
        raise OutputError(f"{out} was not written: cannot {what}: {_reason(e)}") from None


def _is_cwd(path: Path) -> bool:
    try:
        return os.path.samefile(path, os.curdir)
    except OSError:
        return False


def _output_path(out_dir: str | os.PathLike[str], spec: ReleaseSpec) -> Path:
    """``-o`` as an absolute path (``-o .`` has no name to put ``.partial`` after), checked up front."""
    out = Path(os.path.abspath(out_dir))
    try:
        st = os.lstat(out)
    except FileNotFoundError:
        st = None
    except OSError as e:
        raise OutputError(f"{out}: cannot inspect the output folder: {_reason(e)}") from None
    if st is not None and stat.S_ISLNK(st.st_mode):
        # Refused rather than followed: the finished release is renamed into place, and a rename
        # replaces the link itself (or fails, for a folder over a link), not the folder it points to;
        # following it instead would build beside the target, outside the folder that was named.
        # Naming the target directly does what was meant, and says so on the command line.
        target = os.path.realpath(out)
        raise OutputError(f"{out}: is a symbolic link (to {target}); give the folder itself "
                          f"(-o {target}) or a new folder")
    try:
        occupied = st is not None and (not stat.S_ISDIR(st.st_mode) or any(out.iterdir()))
    except OSError as e:
        raise OutputError(f"{out}: cannot list the output folder: {_reason(e)}") from None
    if occupied:
        raise ReleaseError(f"{out}: already exists and is not an empty folder; choose a new output folder")
    if st is not None:
        # An empty folder is replaced by the finished release (rmdir, then rename). Neither works on
        # a mount point, and replacing the current folder would leave the shell in a deleted one.
        if os.path.ismount(out):
            raise OutputError(f"{out}: is a mount point, which the finished release cannot be renamed onto; "
                              f"name a new folder inside it, e.g. -o {out / spec.name}")
        if _is_cwd(out):
            raise OutputError(f"{out}: is the current folder, which the finished release would replace; "
                              f"name a new folder inside it, e.g. -o ./{spec.name}")
    return out


def _lock(out: Path) -> "contextlib.AbstractContextManager[object]":
    """The exclusive lock on ``out`` (``.NAME.flux-gguf.lock`` beside it), taken before any check."""
    with _writing(out, f"create {out.parent}"):
        out.parent.mkdir(parents=True, exist_ok=True)
    try:
        return acquire_lock(out)
    except OutputBusyError as e:
        raise OutputError(f"{out} was not written: another flux-gguf build ({e.holder}) is writing it; "
                          "wait for it to finish or choose another output folder") from None
    except OSError as e:
        raise OutputError(f"{out} was not written: cannot lock it: {_reason(e)}") from None


def _stale_partials(out: Path) -> list[Path]:
    """Partial folders of ``out`` that interrupted builds of ours left (our name and our marker)."""
    prefix = f".{out.name}."
    try:
        names = os.listdir(out.parent)
    except OSError:
        return []
    found = []
    for name in names:
        p = out.parent / name
        if name.startswith(prefix) and name.endswith(PARTIAL_MARK) and os.path.isdir(p) \
                and not os.path.islink(p) and os.path.lexists(p / PARTIAL_MARKER):
            found.append(p)
    return found


def _prepare(out: Path) -> Path:
    """Create a fresh unique partial folder (with our marker); called with ``out``'s lock held."""
    for stale in _stale_partials(out):  # the lock is ours, so no build is using them
        with _writing(out, f"remove the leftover {stale} of an interrupted build"):
            shutil.rmtree(stale)
    partial = partial_path(out)
    with _writing(out, f"create {partial}"):
        partial.mkdir()  # never exist_ok: the folder must be one this build created
    try:
        with _writing(out, f"create {partial / PARTIAL_MARKER}"):
            flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
            os.close(os.open(partial / PARTIAL_MARKER, flags, 0o644))
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
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
    sign: SigningRequest | None = None,
    before_quantize: Callable[..., None] | None = None,
) -> ReleaseResult:
    """Convert every variant of ``spec`` in one pass and write the release folder ``out_dir``.

    ``progress(done, total)`` reports source bytes converted; ``before_quantize`` is the
    pipeline's hook (the storage types, once, before the first tensor). Raises :class:`ReleaseError` for a
    bad spec or an occupied output folder; conversion errors come from the pipeline.
    ``sign``: write ``model.sig`` (checked up front; signed after the folder is complete and its digests
    re-read by model-signing; the folder is renamed into place only once signed).
    """
    if not isinstance(spec, ReleaseSpec):
        spec = parse_release_spec(spec)
    created = created_timestamp()
    signer: PreparedSigner | None = prepare_signer(sign) if sign is not None else None  # bad key: fail before work
    out = _output_path(out_dir, spec)
    with _lock(out):  # held from the checks to the rename
        out = _output_path(out_dir, spec)  # again, now that no other build can change it
        partial = _prepare(out)
        try:
            manifest, manifest_sha = _build_into(spec, out, partial, created, threads, progress,
                                                 signer.info.to_json() if signer else None, before_quantize)
            if signer is not None:
                sign_release(partial, signer, name=out.name, expected=release_digests(manifest, manifest_sha))
            with _writing(out, f"remove {partial / PARTIAL_MARKER}"):
                (partial / PARTIAL_MARKER).unlink()
            with _writing(out, f"sync {partial}"):
                _sync_folder(partial)  # every file's name in the folder on disk before the folder gets its name
            with _writing(out, f"move {partial} into place"):
                if os.path.lexists(out):
                    out.rmdir()  # empty when checked; fails (ENOTEMPTY) if something appeared since
                os.replace(partial, out)
                try:
                    _sync_folder(out.parent)
                except OSError:
                    os.replace(out, partial)  # a rename the disk may not keep: nothing under the final name
                    raise
        except BaseException:
            shutil.rmtree(partial, ignore_errors=True)
            raise
    return ReleaseResult(out, manifest, manifest_sha)


def _sync_folder(path: Path) -> None:
    """fsync a folder, so the renames into it are on disk. Unlike the writer's best-effort sync of a
    GGUF's folder, an error (a failing or full disk) fails the build; only a file system that cannot
    sync folders at all (EINVAL) is passed over."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | getattr(os, "O_CLOEXEC", 0))
    except PermissionError:
        return  # a folder we may write into but not read (mode -wx): there is no descriptor to sync it with
    try:
        os.fsync(fd)
    except OSError as e:
        if e.errno != errno.EINVAL:
            raise
    finally:
        os.close(fd)


@contextlib.contextmanager
def _extra_file(spec: ReleaseSpec, path: Path) -> Iterator[object]:
    """An extra file opened without following a link, regular files only (openat): inside the spec's
    folder for a relative entry, in its own folder for an absolute one (the spec names it outright)."""
    root = spec.base_dir if path.is_relative_to(spec.base_dir) else path.parent
    try:
        rel = Path(os.path.relpath(path, root)).as_posix()
        with open_inside(root, rel) as f:
            yield f
    except UnsafePathError as e:
        raise ReleaseError(f"{root}: extra_files entry {e.path!r} {e.reason}; a release copies only "
                           "regular files, never through a symbolic link") from None


def _convert_remote(spec: ReleaseSpec, partial: Path, threads: int | None, progress: ProgressFn | None,
                    transform: Callable[..., np.ndarray] | None, extra_metadata: Mapping[str, str],
                    imatrix: Imatrix | None = None,
                    before_quantize: Callable[..., None] | None = None,
                    ) -> tuple[list[ArtifactRecord], tuple[SourceEntry, ...]]:
    """Convert an hf:// source; its files' sizes and sha256 are the Hub's, checked against the streamed bytes."""
    with open_any_source(spec.source) as source:
        records = convert(source, partial, list(spec.variants), name=spec.name, overrides=spec.overrides,
                          threads=threads, progress=progress, tensor_transform=transform,
                          source_sha256=source.sha256_by_name,  # type: ignore[attr-defined]
                          imatrix=imatrix, imatrix_files=spec.imatrix_paths, before_quantize=before_quantize,
                          extra_metadata={**extra_metadata, **source.provenance_metadata()})  # type: ignore[attr-defined]
        digests = source.file_digests()  # type: ignore[attr-defined]
        hub = source.hub_records()  # type: ignore[attr-defined]
    return records, tuple(SourceEntry(n, size, sha, hub[n]) for n, (size, sha) in digests.items())


def _build_into(spec: ReleaseSpec, out: Path, partial: Path, created: str | None, threads: int | None,
                progress: ProgressFn | None, signature: dict | None = None,
                before_quantize: Callable[..., None] | None = None) -> tuple[Manifest, str]:
    remote = is_hub_spec(spec.source)  # hf://: streamed from the Hub, its digests from the Hub's sha256
    with open_any_source(spec.source if remote else spec.source_path) as source:
        source_files = [] if remote else [Path(f.path) for f in source.files]
        shapes = {name: tuple(t.shape) for name, t in source.tensors.items()}
        family = detect_model(source).family  # the card's usage notes are per family
    names = _source_names(spec.source_path, source_files)
    ext_files = [f for ext in spec.extensions.values() for f in ext.files]
    names += [Path(os.path.relpath(f, spec.base_dir)).as_posix() for f in ext_files]
    imatrix = load_imatrices(spec.imatrix_paths) if spec.imatrix else None  # a source too: hashed, listed
    sensitivity = read_sensitivity(spec.sensitivity_path) if spec.sensitivity_path is not None else None
    inputs_too = list(spec.imatrix_paths) + ([spec.sensitivity_path] if spec.sensitivity_path is not None else [])
    ext_files = list(ext_files) + inputs_too  # the sensitivity file is a source like the imatrix
    names += [Path(os.path.relpath(f, spec.base_dir)).as_posix() for f in inputs_too]
    if remote and spec.targets:
        raise ReleaseError(f"{spec.spec_path}: size-targeted variants ({', '.join(spec.targets)}) need a local "
                           "source for now; download it first (flux-gguf download)")
    transform = _compose([e.make_transform(shapes) for e in spec.extensions.values() if e.make_transform is not None])

    inputs = source_files + list(ext_files)
    extra_metadata = {k: v for e in spec.extensions.values() for k, v in e.gguf_metadata.items()}
    remote_sources: tuple[SourceEntry, ...] = ()
    with BackgroundHasher(inputs) as hasher:
        if remote:
            records, remote_sources = _convert_remote(spec, partial, threads, progress, transform, extra_metadata,
                                                       imatrix, before_quantize)
        else:
            common = dict(name=spec.name, threads=threads, progress=progress, tensor_transform=transform,
                          extra_metadata=extra_metadata, before_quantize=before_quantize, imatrix=imatrix,
                          imatrix_files=spec.imatrix_paths)
            by_variant = {}
            if spec.fixed_variants:  # one pass for every fixed variant, one per size-targeted one
                for r in convert(spec.source_path, partial, list(spec.fixed_variants), overrides=spec.overrides,
                                 **common):
                    by_variant[r.variant] = r
            for label, (kind, value) in spec.targets.items():
                budget = size_budget(value) if kind == "target_size" else bpw_budget(value)
                (r,) = convert(spec.source_path, partial, [], sensitivity=sensitivity, budget=budget, mix_name=label,
                               **common)
                by_variant[label] = r
            records = [by_variant[v] for v in spec.variants]
        try:
            digests = hasher.result()
        except OSError as e:
            what = f" {e.filename}" if e.filename else "s"
            raise OutputError(f"{out} was not written: cannot read the source file{what}: {_reason(e)}") from None
    sources = remote_sources + tuple(SourceEntry(n, digests[p].size, digests[p].sha256) for n, p in zip(names, inputs))

    artifacts = [_gguf_entry(r) for r in records]
    ext_outputs: dict[str, list[ExtensionOutput]] = {}
    for key, ext in spec.extensions.items():
        if ext.write_outputs is not None:
            with _writing(out, f"write the {key!r} outputs into {partial}"):
                ext_outputs[key] = list(ext.write_outputs(partial, spec))
            artifacts += [ArtifactEntry(path=o.name, size=o.size, sha256=o.sha256, kind=o.kind) for o in ext_outputs[key]]
    files = [card_file(a.path, a.variant or "", a.size, a.sha256, a.tensors or ()) for a in artifacts]
    quality = {}
    extra: list[ArtifactEntry] = []
    if spec.validation_path is not None:
        quality = read_validation_report(spec.validation_path, files)
        with _writing(out, f"copy {spec.validation_path} to {partial / VALIDATION_NAME}"):
            digest = copy_file_hashed(spec.validation_path, partial / VALIDATION_NAME)
        extra.append(_file_entry(VALIDATION_NAME, digest, KIND_VALIDATION))
    for name, path in spec.extra_file_paths.items():
        with _writing(out, f"copy {path} to {partial / name}"), _extra_file(spec, path) as src:
            digest = copy_file_hashed(src, partial / name)
        extra.append(_file_entry(name, digest, KIND_EXTRA))

    card = render_model_card(spec, files, [CardSource(s.name, s.size, s.sha256) for s in sources], quality,
                             extension_outputs=ext_outputs, imatrix=imatrix,
                             mixes={r.variant: {t.name: t.type for t in r.tensors if len(t.shape) > 1}
                                    for r in records if r.variant in spec.targets},
                             signature_section=card_section(signature) if signature else (), model_family=family)
    with _writing(out, f"write {partial / MODEL_CARD_NAME}"):
        card_digest = write_bytes_atomic(partial / MODEL_CARD_NAME, card.encode("utf-8"))
    artifacts += [_file_entry(MODEL_CARD_NAME, card_digest, KIND_CARD)] + extra

    manifest = Manifest(tool_name=TOOL_NAME, tool_version=__version__, name=spec.name, spec=spec.to_json(),
                        sources=sources, artifacts=tuple(artifacts), created=created,
                        signature=signature)
    data = dump_manifest(manifest)
    manifest_sha = hash_bytes(data).sha256
    with _writing(out, f"write {partial / MANIFEST_NAME}"):
        write_bytes_atomic(partial / MANIFEST_NAME, data)
    sums = {a.path: a.sha256 for a in artifacts} | {MANIFEST_NAME: manifest_sha}
    with _writing(out, f"write {partial / CHECKSUMS_NAME}"):
        write_bytes_atomic(partial / CHECKSUMS_NAME, format_sha256sums(sums))
    return manifest, manifest_sha
