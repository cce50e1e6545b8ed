"""What ``flux-gguf inspect`` reports about a safetensors checkpoint or a GGUF file.

Reads headers only (GGUF through gguf-py's memory-mapped reader, safetensors through
``open_source``), so inspecting a 24 GB checkpoint is instant.
"""
from __future__ import annotations

import os
import pathlib
from dataclasses import dataclass, field
from typing import Any

from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFReader, GGUFValueType

from manifests.hashing import open_regular

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
    if not p.is_dir():
        try:
            with open_regular(p) as fh:  # a FIFO or device is refused at once, never waited on
                magic = fh.read(4)
        except OSError as e:
            raise SourceError(f"{p}: cannot read ({e.strerror or e})") from None
        if magic == GGUF_MAGIC:
            return _inspect_gguf(p)
    return _inspect_safetensors(p)


# ---------------------------------------------------------------------------------------------
# A bounded walk over a GGUF header before gguf-py sees it: gguf-py sizes its arrays from the
# counts in the file, so a 113-byte file declaring 2^40 array elements made it allocate
# terabytes. Every count and length is checked against the bytes the file actually has left.

_SCALAR_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_STRING, _ARRAY = 8, 9
MAX_GGUF_DIMS = 4  # GGML_MAX_DIMS
MAX_GGUF_ARRAY_DEPTH = 4
_U32 = 4
_DEFAULT_ALIGNMENT = 32  # GGUF's, when general.alignment is absent


class GGUFStructureError(SourceError):
    """A GGUF header whose counts or lengths do not fit the file (``problem`` says which)."""

    def __init__(self, path: pathlib.Path, problem: str) -> None:
        self.path, self.problem = path, problem
        super().__init__(f"{path} is not a readable GGUF file: {problem}")


class _Bounded:
    def __init__(self, fh: Any, size: int, path: pathlib.Path, order: str) -> None:
        self.fh, self.size, self.path, self.order, self.pos = fh, size, path, order, 0

    def fail(self, what: str) -> SourceError:
        return GGUFStructureError(self.path, f"{what} (at byte {self.pos} of {self.size})")

    def take(self, n: int, what: str) -> bytes:
        if n > self.size - self.pos:
            raise self.fail(f"{what} needs {n} bytes but only {self.size - self.pos} are left")
        data = self.fh.read(n)
        if len(data) != n:
            raise self.fail(f"{what} is cut short")
        self.pos += n
        return data

    def skip(self, n: int, what: str) -> None:
        if n > self.size - self.pos:
            raise self.fail(f"{what} needs {n} bytes but only {self.size - self.pos} are left")
        self.pos += n
        self.fh.seek(self.pos)

    def u32(self, what: str) -> int:
        return int.from_bytes(self.take(4, what), self.order)

    def u64(self, what: str) -> int:
        return int.from_bytes(self.take(8, what), self.order)

    def string(self, what: str) -> str:
        n = self.u64(f"the length of {what}")
        raw = self.take(n, what)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise self.fail(f"{what} is not UTF-8 text (byte {e.start})") from None

    def count(self, what: str, min_item: int) -> int:
        n = self.u64(what)
        if n * min_item > self.size - self.pos:
            raise self.fail(f"{what} is {n}, but {self.size - self.pos} bytes cannot hold that many")
        return n

    def value(self, vtype: int, what: str, depth: int = 0) -> None:
        if vtype in _SCALAR_SIZES:
            self.skip(_SCALAR_SIZES[vtype], what)
        elif vtype == _STRING:
            self.string(what)
        elif vtype == _ARRAY:
            if depth >= MAX_GGUF_ARRAY_DEPTH:
                raise self.fail(f"{what} nests arrays more than {MAX_GGUF_ARRAY_DEPTH} deep")
            etype = self.u32(f"the element type of {what}")
            if etype in _SCALAR_SIZES:
                n = self.count(f"the element count of {what}", _SCALAR_SIZES[etype])
                self.skip(n * _SCALAR_SIZES[etype], what)
            elif etype in (_STRING, _ARRAY):
                n = self.count(f"the element count of {what}", 8 if etype == _STRING else 12)
                for i in range(n):
                    self.value(etype, f"{what}[{i}]", depth + 1)
            else:
                raise self.fail(f"{what} has unknown element type {etype}")
        else:
            raise self.fail(f"{what} has unknown value type {vtype}")


def check_gguf_structure(path: pathlib.Path) -> None:
    """Walk the header, KV metadata and tensor infos with every count checked against the file size."""
    with open_regular(path) as fh:
        size = os.fstat(fh.fileno()).st_size
        head = fh.read(8)
        if len(head) < 8:
            raise GGUFStructureError(path, f"{size} bytes is shorter than its header")
        if head[:4] != GGUF_MAGIC:
            raise GGUFStructureError(path, f"it does not start with the GGUF magic (starts with {head[:4]!r})")
        order = "little"
        version = int.from_bytes(head[4:8], "little")
        if version & 0xFFFF == 0:  # written on a big-endian machine (gguf-py reads those too)
            order, version = "big", int.from_bytes(head[4:8], "big")
        if version not in (2, 3):
            raise GGUFStructureError(path, f"version {version}; expected 2 or 3")
        r = _Bounded(fh, size, path, order)
        r.pos = 8
        n_tensors = r.count("the tensor count", 8 + 4 + 8 + 4 + 8)
        n_kv = r.count("the metadata entry count", 8 + 4 + 1)
        alignment = _DEFAULT_ALIGNMENT
        for i in range(n_kv):
            key = r.string(f"the key of metadata entry {i}")
            vtype = r.u32(f"the value type of {key!r}")
            if key == "general.alignment":  # gguf-py pads by it; checked here so the message says where
                if vtype != _U32:
                    raise r.fail(f"general.alignment has value type {vtype}; expected {_U32} (u32)")
                alignment = r.u32("the value of 'general.alignment'")
                if alignment == 0 or alignment & (alignment - 1):
                    raise r.fail(f"general.alignment is {alignment}; expected a power of two")
                continue
            r.value(vtype, f"the value of {key!r}")
        infos = []
        for i in range(n_tensors):
            name = r.string(f"the name of tensor {i}")
            n_dims = r.u32(f"the dimension count of tensor {name!r}")
            if n_dims > MAX_GGUF_DIMS:
                raise r.fail(f"tensor {name!r} has {n_dims} dimensions; at most {MAX_GGUF_DIMS} are allowed")
            dims = [r.u64(f"the dimensions of tensor {name!r}") for _ in range(n_dims)]
            infos.append((name, dims, r.u32(f"the type of tensor {name!r}"), r.u64(f"the data offset of tensor {name!r}")))
        data_start = r.pos + (-r.pos % alignment)
        for name, dims, ttype, offset in infos:
            _check_tensor_extent(path, size, name, dims, ttype, data_start + offset)


def _check_tensor_extent(path: pathlib.Path, size: int, name: str, dims: list[int], ttype: int, start: int) -> None:
    """A tensor's type is one GGML knows, its rows fill whole blocks and its bytes lie inside the
    file: what gguf-py would otherwise trip over with numpy's own errors (reshape, dtype views)."""
    try:
        qtype = GGMLQuantizationType(ttype)
    except ValueError:
        raise GGUFStructureError(path, f"tensor {name!r} has unknown type {ttype}") from None
    block, type_size = GGML_QUANT_SIZES[qtype]
    shape = list(reversed(dims))  # GGUF stores ne0 (the row length) first
    if any(d >= 1 << 63 for d in dims):
        raise GGUFStructureError(path, f"tensor {name!r} has shape {shape}; no dimension may reach 2^63")
    if dims and dims[0] % block:
        raise GGUFStructureError(path, f"tensor {name!r} ({qtype.name}, shape {shape}) has rows of {dims[0]} values, "
                                       f"not a multiple of the {qtype.name} block of {block}")
    elements = 1
    for d in dims:
        elements *= d
    end = start + elements // block * type_size
    if end > size:
        raise GGUFStructureError(path, f"tensor {name!r} ({qtype.name}, shape {shape}) needs bytes {start} to {end}, "
                                       f"past the end of the {size}-byte file")


def _field_value(reader: GGUFReader, key: str) -> Any:
    f = reader.fields[key]
    if f.types and f.types[0] == GGUFValueType.ARRAY:
        return list(f.contents())
    return f.contents()


def _inspect_gguf(path: pathlib.Path) -> FileReport:
    check_gguf_structure(path)  # counts and lengths bounded by the file before gguf-py allocates
    try:
        reader = GGUFReader(path)
    except (ValueError, IndexError, KeyError, OSError, UnicodeDecodeError, OverflowError, MemoryError) as e:
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
