"""What ``flux-gguf inspect`` reports about a safetensors checkpoint or a GGUF file.

Reads headers only (GGUF through the bounded header reader below, safetensors through
``open_source``), so inspecting a 24 GB checkpoint is instant.
"""
from __future__ import annotations

import io
import math
import os
import pathlib
import struct
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

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
                head = fh.read(8)
        except OSError as e:
            raise SourceError(f"{p}: cannot read ({e.strerror or e})") from None
        if head[:4] == GGUF_MAGIC:
            return _inspect_gguf(p)
        size = p.stat().st_size
        if len(head) == 8 and int.from_bytes(head, "little") > size - 8:  # no safetensors header length either
            raise SourceError(f"{p}: neither a GGUF file (it does not start with GGUF) nor a safetensors file (its "
                              f"first 8 bytes, {head!r}, are no header length that fits the {size:,}-byte file); "
                              "inspect reads .gguf and .safetensors files and diffusers folders")
    return _inspect_safetensors(p)


# ---------------------------------------------------------------------------------------------
# A bounded GGUF header reader. gguf-py's GGUFReader sizes its arrays from the counts in the file
# (a 113-byte file declaring 2^40 array elements made it allocate terabytes) and builds several
# numpy objects per string-array element (an 8-byte empty string in the file costs hundreds of
# bytes of memory), so nothing here hands a file to it: every count and length is checked against
# the bytes the file actually has left, strings have a maximum length, and the entries, tensors and
# array elements walked one by one share a budget (each costs Python work however few bytes it
# takes). Only the header is read; tensor data is never touched here.

_SCALAR_FORMATS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_SCALAR_SIZES = {t: struct.calcsize(f) for t, f in _SCALAR_FORMATS.items()}
_STRING, _ARRAY = 8, 9
_UINT32 = 4
MAX_GGUF_DIMS = 4  # GGML_MAX_DIMS
MAX_GGUF_ARRAY_DEPTH = 4
MAX_GGUF_STRING_BYTES = 1 << 24
"""Longest key, name or string value read (a chat template is kilobytes; a FLUX GGUF's longest is short)."""
MAX_GGUF_ITEMS = 1 << 20
"""Metadata entries, tensors and array elements a header may hold in all (a FLUX GGUF has under
2,000; a language model's tokenizer arrays, the largest seen in GGUFs, under a million)."""
GGUF_DEFAULT_ALIGNMENT = 32
KEY_ALIGNMENT = "general.alignment"


class GGUFStructureError(SourceError):
    """A GGUF header whose counts or lengths do not fit the file (``problem`` says which)."""

    def __init__(self, path: pathlib.Path, problem: str) -> None:
        self.path, self.problem = path, problem
        super().__init__(f"{path} is not a readable GGUF file: {problem}")


@dataclass(frozen=True)
class GGUFTensorInfo:
    """One tensor info of a GGUF header: ``dims`` in ggml order (``dims[0]`` is the row length),
    ``offset`` from the start of the data section."""

    name: str
    dims: tuple[int, ...]
    ggml_type: int
    offset: int


@dataclass(frozen=True)
class GGUFHeader:
    """A GGUF header read by :func:`read_gguf_header`: metadata values (those kept), tensor infos,
    and where the (aligned) data section starts."""

    version: int
    byte_order: str  # "<" or ">"
    metadata: dict[str, Any]
    tensors: list[GGUFTensorInfo]
    alignment: int
    data_start: int
    size: int


class _Bounded:
    def __init__(self, fh: Any, size: int, path: pathlib.Path, order: str, max_items: int) -> None:
        self.fh, self.size, self.path, self.order, self.pos = fh, size, path, order, 0
        self.max_items, self.items_left = max_items, max_items

    def fail(self, what: str) -> SourceError:
        return GGUFStructureError(self.path, f"{what} (at byte {self.pos} of {self.size})")

    def _room(self, n: int, what: str) -> None:
        if n > self.size - self.pos:
            raise self.fail(f"{what} needs {n} bytes but only {self.size - self.pos} are left")

    def take(self, n: int, what: str) -> bytes:
        self._room(n, what)
        data = self.fh.read(n)
        if len(data) != n:
            raise self.fail(f"{what} is cut short")
        self.pos += n
        return data

    def skip(self, n: int, what: str) -> None:
        self._room(n, what)
        self.pos += n
        self.fh.seek(self.pos)

    def spend(self, n: int, what: str) -> None:
        """Walking ``n`` more items one by one: refused past the header's budget."""
        if n > self.items_left:
            raise self.fail(f"{what} takes the header past {self.max_items:,} entries, tensors and array "
                            "elements in all, more than this tool reads")
        self.items_left -= n

    def scalar(self, vtype: int, what: str) -> Any:
        return struct.unpack(self.order + _SCALAR_FORMATS[vtype], self.take(_SCALAR_SIZES[vtype], what))[0]

    def u32(self, what: str) -> int:
        return self.scalar(_UINT32, what)

    def u64(self, what: str) -> int:
        return self.scalar(10, what)

    def string(self, what: str) -> str:
        n = self.u64(f"the length of {what}")
        self._room(n, what)
        if n > MAX_GGUF_STRING_BYTES:
            raise self.fail(f"{what} is {n:,} bytes long; strings over {MAX_GGUF_STRING_BYTES:,} bytes are refused")
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

    def value(self, vtype: int, what: str, keep: bool, depth: int = 0) -> Any:
        """The value (None where ``keep`` is false: scalars and scalar arrays are then skipped unread)."""
        if vtype in _SCALAR_SIZES:
            if keep:
                return self.scalar(vtype, what)
            self.skip(_SCALAR_SIZES[vtype], what)
            return None
        if vtype == _STRING:
            text = self.string(what)
            return text if keep else None
        if vtype != _ARRAY:
            raise self.fail(f"{what} has unknown value type {vtype}")
        if depth >= MAX_GGUF_ARRAY_DEPTH:
            raise self.fail(f"{what} nests arrays more than {MAX_GGUF_ARRAY_DEPTH} deep")
        etype = self.u32(f"the element type of {what}")
        if etype in _SCALAR_SIZES:
            n = self.count(f"the element count of {what}", _SCALAR_SIZES[etype])
            if not keep:
                self.skip(n * _SCALAR_SIZES[etype], what)
                return None
            self.spend(n, what)
            raw = self.take(n * _SCALAR_SIZES[etype], what)
            return np.frombuffer(raw, dtype=self.order + _SCALAR_FORMATS[etype]).tolist()
        if etype in (_STRING, _ARRAY):
            n = self.count(f"the element count of {what}", 8 if etype == _STRING else 12)
            self.spend(n, what)
            items = [self.value(etype, f"{what}[{i}]", keep, depth + 1) for i in range(n)]
            return items if keep else None
        raise self.fail(f"{what} has unknown element type {etype}")


def read_gguf_header(fh: Any, size: int, path: pathlib.Path, *, keep: Callable[[str], bool] = lambda _key: True,
                     max_items: int = MAX_GGUF_ITEMS) -> GGUFHeader:
    """Read a GGUF header from ``fh`` (positioned at byte 0 of a ``size``-byte file) with every count
    and length bounded by the bytes left; metadata values are kept for keys where ``keep(key)``
    (``general.alignment`` always). Raises :class:`GGUFStructureError` naming what does not fit."""
    head = fh.read(8)
    if len(head) < 8:
        raise GGUFStructureError(path, f"{size} bytes is shorter than its header")
    if head[:4] != GGUF_MAGIC:
        raise GGUFStructureError(path, f"it does not start with the GGUF magic (starts with {head[:4]!r})")
    order = "<"
    version = int.from_bytes(head[4:8], "little")
    if version & 0xFFFF == 0:  # written on a big-endian machine (gguf-py reads those too)
        order, version = ">", int.from_bytes(head[4:8], "big")
    if version not in (2, 3):
        raise GGUFStructureError(path, f"version {version}; expected 2 or 3")
    r = _Bounded(fh, size, path, order, max_items)
    r.pos = 8
    n_tensors = r.count("the tensor count", 8 + 4 + 8 + 4 + 8)
    n_kv = r.count("the metadata entry count", 8 + 4 + 1)
    r.spend(n_kv, "the metadata entry count")
    r.spend(n_tensors, "the tensor count")
    metadata: dict[str, Any] = {}
    seen: set[str] = set()
    alignment = GGUF_DEFAULT_ALIGNMENT
    for i in range(n_kv):
        key = r.string(f"the key of metadata entry {i}")
        vtype = r.u32(f"the value type of {key!r}")
        wanted = keep(key)
        value = r.value(vtype, f"the value of {key!r}", keep=wanted or key == KEY_ALIGNMENT)
        if key in seen:
            raise r.fail(f"metadata key {key!r} appears twice")
        seen.add(key)
        if key == KEY_ALIGNMENT:
            if vtype != _UINT32:
                raise r.fail(f"{KEY_ALIGNMENT} has value type {vtype}; expected {_UINT32} (u32)")
            if not value or value & (value - 1):
                raise r.fail(f"{KEY_ALIGNMENT} is {value!r}; expected a power of two")
            alignment = value
        if wanted:
            metadata[key] = value
    tensors = []
    for i in range(n_tensors):
        name = r.string(f"the name of tensor {i}")
        n_dims = r.u32(f"the dimension count of tensor {name!r}")
        if n_dims > MAX_GGUF_DIMS:
            raise r.fail(f"tensor {name!r} has {n_dims} dimensions; at most {MAX_GGUF_DIMS} are allowed")
        r._room(8 * n_dims + 4 + 8, f"the info of tensor {name!r}")
        dims = tuple(r.u64(f"dimension {d} of tensor {name!r}") for d in range(n_dims))
        ggml_type = r.u32(f"the type of tensor {name!r}")
        tensors.append(GGUFTensorInfo(name, dims, ggml_type, r.u64(f"the data offset of tensor {name!r}")))
    data_start = -(-r.pos // alignment) * alignment
    return GGUFHeader(version, order, metadata, tensors, alignment, data_start, size)


def check_gguf_structure(path: pathlib.Path) -> None:
    """Walk the header, KV metadata and tensor infos with every count checked against the file size."""
    with open_regular(path) as raw, io.BufferedReader(raw) as fh:
        header = read_gguf_header(fh, os.fstat(raw.fileno()).st_size, path, keep=lambda _key: False)
    for t in header.tensors:
        tensor_nbytes(t, path, header)


def tensor_nbytes(info: GGUFTensorInfo, path: pathlib.Path, header: GGUFHeader | None = None) -> int:
    """Bytes of one tensor's data, from its ggml type's block size, after checking what gguf-py would
    otherwise trip over with numpy's own words (reshape, dtype views): a type ggml knows, rows that
    fill whole blocks, no dimension of 2^63 or more, and (given ``header``) bytes inside the file."""
    try:
        qtype = GGMLQuantizationType(info.ggml_type)
        block, type_size = GGML_QUANT_SIZES[qtype]
    except (ValueError, KeyError):
        raise GGUFStructureError(path, f"tensor {info.name!r} has unknown type {info.ggml_type}") from None
    shape = list(reversed(info.dims))  # GGUF stores ne0 (the row length) first
    if any(d >= 1 << 63 for d in info.dims):
        raise GGUFStructureError(path, f"tensor {info.name!r} has shape {shape}; no dimension may reach 2^63")
    if info.dims and info.dims[0] % block:
        raise GGUFStructureError(path, f"tensor {info.name!r} ({qtype.name}, shape {shape}) has rows of "
                                       f"{info.dims[0]} values, not a multiple of the {qtype.name} block of {block}")
    nbytes = math.prod(info.dims) // block * type_size
    if header is not None and header.data_start + info.offset + nbytes > header.size:
        raise GGUFStructureError(path, f"tensor {info.name!r} needs bytes up to {header.data_start + info.offset + nbytes} "
                                       f"but the file has {header.size}")
    return nbytes


def _inspect_gguf(path: pathlib.Path) -> FileReport:
    with open_regular(path) as raw, io.BufferedReader(raw) as fh:
        size = os.fstat(raw.fileno()).st_size
        header = read_gguf_header(fh, size, path)
    tensors = []
    for t in header.tensors:
        nbytes = tensor_nbytes(t, path, header)
        tensors.append(TensorRow(t.name, GGMLQuantizationType(t.ggml_type).name, tuple(reversed(t.dims)), nbytes))
    meta = header.metadata
    file_type = meta.get("general.file_type")
    variant = meta.get("flux_gguf.recipe") or _FTYPE_TO_VARIANT.get(file_type)  # type: ignore[arg-type]
    return FileReport(
        path, "gguf", size, None, meta.get("general.architecture"),
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
