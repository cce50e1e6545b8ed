"""What ``flux-gguf inspect`` reports about a safetensors checkpoint or a GGUF file.

Reads headers only (GGUF through gguf-py's memory-mapped reader, safetensors through
``open_source``), so inspecting a 24 GB checkpoint is instant.
"""
from __future__ import annotations

import os
import pathlib
from dataclasses import dataclass, field
from typing import Any

from gguf import GGUFReader, GGUFValueType

from .detect import detect_model
from .errors import FluxGGUFError, SourceError
from .recipes import VARIANTS
from .sources import Source, open_source

GGUF_MAGIC = b"GGUF"
_FTYPE_TO_VARIANT = {v.file_type: v.name for v in VARIANTS.values()}


@dataclass(frozen=True)
class TensorRow:
    """A tensor as stored: name, storage type, [out, in] shape, bytes."""

    name: str
    type: str
    shape: tuple[int, ...]
    nbytes: int


@dataclass(frozen=True)
class FileReport:
    """``kind`` is "gguf" or "safetensors"; ``family`` is None when unknown (``problem`` says why)."""

    path: pathlib.Path
    kind: str
    size: int
    layout: str | None
    architecture: str | None
    family: str | None
    variant: str | None
    file_type: int | None
    tensors: list[TensorRow]
    metadata: dict[str, Any] = field(default_factory=dict)
    problem: str | None = None

    @property
    def type_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for t in self.tensors:
            counts[t.type] = counts.get(t.type, 0) + 1
        return dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))

    @property
    def n_params(self) -> int:
        total = 0
        for t in self.tensors:
            n = 1
            for s in t.shape:
                n *= s
            total += n
        return total

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": str(self.path), "kind": self.kind, "size": self.size, "layout": self.layout,
            "architecture": self.architecture, "family": self.family, "variant": self.variant,
            "file_type": self.file_type, "n_params": self.n_params, "types": self.type_counts,
            "metadata": self.metadata, "problem": self.problem,
            "tensors": [{"name": t.name, "type": t.type, "shape": list(t.shape), "nbytes": t.nbytes}
                        for t in self.tensors],
        }


def inspect_path(path: str | os.PathLike[str]) -> FileReport:
    """Report on a GGUF file, a safetensors file or a diffusers folder (decided by content)."""
    p = pathlib.Path(path)
    if not p.exists():
        raise SourceError(f"{p}: no such file or folder")
    if p.is_file():
        with open(p, "rb") as fh:
            if fh.read(4) == GGUF_MAGIC:
                return _inspect_gguf(p)
    return _inspect_safetensors(p)


def _field_value(reader: GGUFReader, key: str) -> Any:
    f = reader.fields[key]
    if f.types and f.types[0] == GGUFValueType.ARRAY:
        return list(f.contents())
    return f.contents()


def _inspect_gguf(path: pathlib.Path) -> FileReport:
    try:
        reader = GGUFReader(path)
    except (ValueError, IndexError, KeyError, OSError) as e:
        raise SourceError(f"{path} is not a readable GGUF file: {e}") from None
    meta = {k: _field_value(reader, k) for k in reader.fields if not k.startswith("GGUF.")}
    tensors = [
        TensorRow(t.name, t.tensor_type.name, tuple(int(d) for d in reversed(t.shape)), int(t.n_bytes))
        for t in reader.tensors
    ]
    file_type = meta.get("general.file_type")
    variant = meta.get("flux_gguf.recipe") or _FTYPE_TO_VARIANT.get(file_type)  # type: ignore[arg-type]
    return FileReport(
        path, "gguf", path.stat().st_size, None, meta.get("general.architecture"),
        meta.get("flux_gguf.model_family"), variant, file_type, tensors, meta,
    )


def _inspect_safetensors(path: pathlib.Path) -> FileReport:
    with open_source(path) as source:
        return inspect_source(source, path)


def inspect_source(source: Source, path: str | os.PathLike[str]) -> FileReport:
    """Report on an opened checkpoint (e.g. one on the Hub), named ``path``; headers only."""
    tensors = [TensorRow(t.name, t.dtype, tuple(t.shape), int(t.nbytes)) for t in source.tensors.values()]
    size = sum(int(f.size) for f in source.files)
    family, problem = None, None
    try:
        family = detect_model(source).family
    except FluxGGUFError as e:
        problem = str(e)
    return FileReport(path, "safetensors", size, source.layout, "flux" if family else None, family, None,
                      None, tensors, dict(source.metadata), problem)
