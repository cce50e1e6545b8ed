"""Open a FLUX.1 or FLUX.2 checkpoint in any layout users have, and present it in BFL naming.

Three layouts reach us: BFL single files, ComfyUI-saved single files (keys prefixed
``model.diffusion_model.`` or ``diffusion_model.``), and diffusers folders (a folder holding
``transformer/`` or the transformer folder itself, sharded with an index or a single
``diffusion_pytorch_model.safetensors``). A path that is a folder is read as diffusers; a file as a
single-file checkpoint (whose keys may still use diffusers naming).

Every later stage sees one thing: BFL tensor names, shapes and dtypes up front (from headers
only), and ``read(name)`` returning one float32 tensor at a time, upcast exactly, with diffusers
parts stacked and swapped back into their BFL form.
"""
from __future__ import annotations

import json
import os
import pathlib
import re
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from .diffusers_names import bfl_name_for, diffusers_arch, diffusers_parts
from .errors import SourceError
from .layout import FLUX1, FLUX2, FLUX2_MARKER, FluxGeometry, bfl_tensor_shapes
from .safetensors_io import DTYPE_SIZES, RawTensor, SafetensorsFile

COMFYUI_PREFIXES = ("model.diffusion_model.", "diffusion_model.")
DIFFUSERS_WEIGHTS = "diffusion_pytorch_model.safetensors"
DIFFUSERS_INDEX = "diffusion_pytorch_model.safetensors.index.json"


@dataclass(frozen=True)
class TensorInfo:
    """A tensor as the source holds it: BFL name, [out, in] shape, safetensors dtype, source bytes."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    nbytes: int


@dataclass(frozen=True)
class SourceFile:
    """A file the source was read from (for manifests)."""

    path: pathlib.Path
    size: int


@dataclass(frozen=True)
class _Piece:
    """Elements [first, first+count) of ``key`` in ``file`` land at element ``dest`` of the BFL tensor."""

    file: SafetensorsFile
    key: str
    first: int
    count: int
    dest: int


def _whole(file: SafetensorsFile, raw: RawTensor) -> list[_Piece]:
    return [_Piece(file, raw.name, 0, raw.count, 0)]


# ---------------------------------------------------------------------------------------------
# BFL logical order, for any block count, without building an inventory per index.

_BLOCK = re.compile(r"^(double_blocks|single_blocks)\.(\d+)\.(.+)$")


def _positions(arch: str) -> tuple[dict[str, int], int]:
    template = list(bfl_tensor_shapes(FluxGeometry(double_blocks=1, single_blocks=1, arch=arch)))
    return {name: i for i, name in enumerate(template)}, template.index("double_blocks.0.img_attn.qkv.weight")


_POSITIONS = {arch: _positions(arch) for arch in (FLUX1, FLUX2)}


def _order_key(name: str, arch: str = FLUX1) -> tuple[int, int, int]:
    pos_of, first_block = _POSITIONS[arch]
    m = _BLOCK.match(name)
    if m is not None:
        kind, index, rest = m.groups()
        pos = pos_of.get(f"{kind}.0.{rest}")
        if pos is not None:
            return (1 if kind == "double_blocks" else 2, int(index) if len(index) <= 9 else 10**9, pos)
    elif name in pos_of:
        return (0 if pos_of[name] < first_block else 3, 0, pos_of[name])
    return (4, 0, 0)  # not a FLUX tensor: after the known ones, in file order (sort is stable)


def _in_bfl_order(tensors: dict[str, TensorInfo]) -> dict[str, TensorInfo]:
    arch = FLUX2 if FLUX2_MARKER in tensors else FLUX1
    return {name: tensors[name] for name in sorted(tensors, key=lambda n: _order_key(n, arch))}


# ---------------------------------------------------------------------------------------------


class Source:
    """A checkpoint opened for reading: BFL names up front, tensors on demand. Close to release the files."""

    def __init__(self, path: pathlib.Path, layout: str, shards: list[SafetensorsFile],
                 tensors: dict[str, TensorInfo], pieces: dict[str, list[_Piece]],
                 files: list[SourceFile], ignored: tuple[str, ...] = ()) -> None:
        self.path = path
        self.layout = layout
        self.tensors = _in_bfl_order(tensors)
        self.files = files
        self.metadata: dict[str, str] = {}
        for shard in shards:
            self.metadata.update(shard.metadata)
        # Keys outside the diffusion-model prefix of a ComfyUI full checkpoint (VAE, text encoders).
        self.ignored = ignored
        self._shards = shards
        self._pieces = pieces

    def read(self, name: str) -> np.ndarray:
        """Tensor ``name`` (BFL) as C-contiguous float32 of its TensorInfo shape, upcast exactly."""
        info = self.tensors.get(name)
        if info is None:
            raise SourceError(f"{self.path}: no tensor {name}")
        out = np.empty(info.shape, dtype=np.float32)
        flat = out.reshape(-1)
        for p in self._pieces[name]:
            p.file.read_elements_into(p.key, p.first, flat[p.dest:p.dest + p.count])
        return out

    # The pipeline may read a large tensor in row ranges (read_raw_range_into); a source that can
    # only stream each tensor whole (converter.hub.source) sets this False.
    partial_reads = True

    def read_raw_into(self, name: str, out: np.ndarray) -> None:
        """Tensor ``name``'s source bytes (its TensorInfo dtype, little-endian, BFL element order:
        diffusers parts stacked and halves swapped) into ``out``, a C-contiguous uint8 array of
        exactly ``nbytes``; no upcast. Several threads may read different tensors at once."""
        info = self.tensors.get(name)
        if info is None:
            raise SourceError(f"{self.path}: no tensor {name}")
        if out.nbytes != info.nbytes:
            raise ValueError(f"tensor {name} has {info.nbytes} source bytes, the buffer {out.nbytes}")
        self.read_raw_range_into(name, 0, out)

    def read_raw_range_into(self, name: str, first: int, out: np.ndarray) -> None:
        """Elements ``[first, first + out.nbytes // width)`` of tensor ``name`` (BFL element order),
        raw, into ``out`` (C-contiguous): a row range of a tensor too large to hold whole."""
        info = self.tensors.get(name)
        if info is None:
            raise SourceError(f"{self.path}: no tensor {name}")
        width = DTYPE_SIZES[info.dtype]
        count = out.nbytes // width
        if out.nbytes % width or first < 0 or (first + count) * width > info.nbytes:
            raise ValueError(f"{out.nbytes} bytes from element {first} do not fit tensor {name} ({info.nbytes} bytes)")
        flat = out.reshape(-1).view(np.uint8)
        end = first + count
        for p in self._pieces[name]:
            lo, hi = max(first, p.dest), min(end, p.dest + p.count)
            if lo < hi:
                p.file.read_raw_into(p.key, p.first + lo - p.dest, flat[(lo - first) * width:(hi - first) * width])

    def raw_phase(self, name: str, first: int = 0) -> int:
        """Where element ``first`` of tensor ``name``'s source bytes lies, modulo the direct-read
        alignment: a buffer at an address with this remainder receives them without a copy (see
        safetensors_io)."""
        for p in self._pieces.get(name, ()):
            if p.dest <= first < p.dest + p.count or (first == 0 and p.count == 0):
                phase = getattr(p.file, "raw_phase", None)  # remote shards have none
                return int(phase(p.key, p.first + first - p.dest)) if phase is not None else 0
        return 0

    def read_order(self, names: list[str]) -> list[str]:
        """The order in which to read ``names`` (a remote source prefers its file order). Local: as given."""
        return list(names)

    def check_complete(self) -> None:
        """Called once every tensor has been read, before any output is renamed into place: a source
        that verifies its bytes as they stream (``converter.hub.source``) raises here. Local: nothing."""

    def close(self) -> None:
        for shard in self._shards:
            shard.close()

    def __enter__(self) -> Source:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Source({str(self.path)!r}, layout={self.layout!r}, {len(self.tensors)} tensors)"


def open_source(path: str | os.PathLike) -> Source:
    """Open a BFL / ComfyUI single file or a diffusers folder; only headers are read now."""
    p = pathlib.Path(path)
    if not p.exists():
        raise SourceError(f"{p}: no such file or folder")
    return _open_diffusers_folder(p) if p.is_dir() else _open_single_file(p)


def _looks_diffusers(keys: list[str]) -> bool:
    return "x_embedder.weight" in keys or any(
        k.startswith(("transformer_blocks.", "single_transformer_blocks.")) for k in keys)


def _open_single_file(path: pathlib.Path) -> Source:
    f = SafetensorsFile(path)
    try:
        keys = list(f.tensors)
        files = [SourceFile(path, f.size)]
        prefix = next((p for p in COMFYUI_PREFIXES if any(k.startswith(p) for k in keys)), None)
        if prefix is not None:
            kept = {k[len(prefix):]: f.tensors[k] for k in keys if k.startswith(prefix)}
            ignored = tuple(k for k in keys if not k.startswith(prefix))
            tensors = {n: TensorInfo(n, r.shape, r.dtype, r.nbytes) for n, r in kept.items()}
            pieces = {n: _whole(f, r) for n, r in kept.items()}
            return Source(path, "comfyui", [f], tensors, pieces, files, ignored)
        if _looks_diffusers(keys):
            tensors, pieces = _assemble_diffusers({k: (f, r) for k, r in f.tensors.items()})
            return Source(path, "diffusers", [f], tensors, pieces, files)
        tensors = {k: TensorInfo(k, r.shape, r.dtype, r.nbytes) for k, r in f.tensors.items()}
        return Source(path, "bfl", [f], tensors, {k: _whole(f, r) for k, r in f.tensors.items()}, files)
    except BaseException:
        f.close()
        raise


# ---------------------------------------------------------------------------------------------
# diffusers folders


def assemble_shards(shards: Sequence[Any], weight_map: Mapping[str, str] | None,
                    shard_label: Callable[[Any], str], named: Callable[[str], str],
                    ) -> tuple[dict[str, TensorInfo], dict[str, list[Any]]]:
    """The BFL tensors of a diffusers folder's shards (local files or Hub files: anything with
    ``.path`` and ``.tensors``): every key in one shard only, where the index's ``weight_map`` says.
    ``shard_label(shard)`` and ``named(shard_file_name)`` name a shard in errors."""
    raw: dict[str, tuple[Any, RawTensor]] = {}
    for shard in shards:
        for key, t in shard.tensors.items():
            if key in raw:
                raise SourceError(f"{shard_label(shard)}: key {key} is also in {raw[key][0].path.name}")
            raw[key] = (shard, t)
    if weight_map is not None:
        for key, shard_name in weight_map.items():
            if key not in raw or raw[key][0].path.name != shard_name:
                raise SourceError(f"{named(shard_name)}: the index names {key} in this shard "
                                  "but the shard does not hold it")
    return _assemble_diffusers(raw)


def _read_index(index: pathlib.Path) -> dict[str, str]:
    return parse_index(index.read_bytes(), str(index))


def parse_index(content: bytes, label: str) -> dict[str, str]:
    """A diffusers ``*.safetensors.index.json``'s weight map (key -> shard file name in the same
    folder), from a local file or a Hub repo (``label`` names it in errors)."""
    try:
        data = json.loads(content.decode("utf-8"))
    except RecursionError:
        raise SourceError(f"{label}: not a diffusers index (JSON nested too deeply)") from None
    except (UnicodeDecodeError, ValueError) as e:  # ValueError: bad JSON, or an integer past the digit limit
        raise SourceError(f"{label}: not a diffusers index (not JSON: {str(e).split(';')[0]})") from None
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()):
        raise SourceError(f"{label}: not a diffusers index (expected a weight_map object of key -> shard file)")
    for key, shard in weight_map.items():
        if pathlib.PurePosixPath(shard).name != shard or shard in (".", ".."):
            raise SourceError(f"{label}: shard {shard!r} named for {key} is not a file name in the folder")
    return weight_map


def _open_diffusers_folder(path: pathlib.Path) -> Source:
    folder = path / "transformer" if (path / "transformer").is_dir() else path
    index, single = folder / DIFFUSERS_INDEX, folder / DIFFUSERS_WEIGHTS
    weight_map: dict[str, str] | None = None
    if index.is_file():
        weight_map = _read_index(index)
        names = list(dict.fromkeys(weight_map.values()))
        for name in names:
            if not (folder / name).is_file():
                key = next(k for k, v in weight_map.items() if v == name)
                raise SourceError(f"{index}: shard {name} (named for {key}) is missing")
        files = [SourceFile(index, index.stat().st_size)]
    elif single.is_file():
        names, files = [DIFFUSERS_WEIGHTS], []
    else:
        raise SourceError(f"{folder}: no diffusers transformer weights (expected {DIFFUSERS_WEIGHTS} or "
                          f"{DIFFUSERS_INDEX}; a single-file checkpoint is passed as a file)")
    shards: list[SafetensorsFile] = []
    try:
        for name in names:
            shard = SafetensorsFile(folder / name)
            shards.append(shard)
            files.append(SourceFile(shard.path, shard.size))
        tensors, pieces = assemble_shards(shards, weight_map, str, lambda name: str(folder / name))
        return Source(path, "diffusers", shards, tensors, pieces, files)
    except BaseException:
        for opened in shards:
            opened.close()
        raise


def _assemble_diffusers(raw: dict[str, tuple[SafetensorsFile, RawTensor]]
                        ) -> tuple[dict[str, TensorInfo], dict[str, list[_Piece]]]:
    """Group diffusers keys into BFL tensors: rows stacked in part order, halves swapped back."""
    groups: dict[str, None] = {}
    arch = diffusers_arch(raw)
    unknown = [k for k in raw if bfl_name_for(k, arch) is None]
    if unknown:
        more = f" (and {len(unknown) - 1} more)" if len(unknown) > 1 else ""
        what = "FLUX.2" if arch == FLUX2 else "FLUX.1"
        raise SourceError(f"{raw[unknown[0]][0].path}: unknown diffusers key {unknown[0]}{more}: "
                          f"it maps to no {what} transformer tensor")
    for key in raw:
        groups[bfl_name_for(key, arch)[0]] = None  # type: ignore[index]
    tensors: dict[str, TensorInfo] = {}
    pieces: dict[str, list[_Piece]] = {}
    for bfl in groups:
        mapping = diffusers_parts(bfl, arch)
        assert mapping is not None
        present = [p for p in mapping.parts if p in raw]
        missing = [p for p in mapping.parts if p not in raw]
        where = raw[present[0]][0].path
        if missing:
            raise SourceError(f"{where}: {bfl} needs diffusers keys {', '.join(mapping.parts)}; "
                              f"{missing[0]} is missing")
        parts = [raw[p] for p in mapping.parts]
        dtypes = {t.dtype for _, t in parts}
        if len(dtypes) > 1:
            raise SourceError(f"{where}: the parts of {bfl} have different dtypes ("
                              + ", ".join(f"{t.name} {t.dtype}" for _, t in parts) + ")")
        trailing = {t.shape[1:] for _, t in parts}
        if len(trailing) > 1 or any(not t.shape for _, t in parts):
            raise SourceError(f"{where}: the parts of {bfl} cannot be stacked by rows ("
                              + ", ".join(f"{t.name} {list(t.shape)}" for _, t in parts) + ")")
        rows = sum(t.shape[0] for _, t in parts)
        shape = (rows, *parts[0][1].shape[1:])
        width = parts[0][1].count // parts[0][1].shape[0] if parts[0][1].shape[0] else 0
        if mapping.swap_halves:
            (f, t), = parts
            if rows % 2:
                raise SourceError(f"{where}: {t.name} has {rows} rows; expected an even count (scale, shift)")
            half = rows // 2 * width
            # diffusers holds (scale, shift), BFL (shift, scale): each half goes to the other place.
            pieces[bfl] = [_Piece(f, t.name, half, half, 0), _Piece(f, t.name, 0, half, half)]
        else:
            dest, plist = 0, []
            for f, t in parts:
                plist.append(_Piece(f, t.name, 0, t.count, dest))
                dest += t.count
            pieces[bfl] = plist
        tensors[bfl] = TensorInfo(bfl, shape, parts[0][1].dtype, sum(t.nbytes for _, t in parts))
    return tensors, pieces


FINGERPRINT_TENSORS = 8
FINGERPRINT_VALUES = 1024


def source_fingerprint(source: Source) -> str:
    """A cheap identity of a checkpoint's weights: the sha256 of its inventory (BFL names and shapes,
    in BFL order) and of the first :data:`FINGERPRINT_VALUES` values (as float32) of
    :data:`FINGERPRINT_TENSORS` tensors spread evenly over it. The same for every layout of the same
    weights (single file, diffusers folder; an exact float32 copy of a BF16 file); a fine-tune
    changes it (its weights differ everywhere). Reads about 32 KB, whatever the checkpoint's size."""
    import hashlib

    h = hashlib.sha256(json.dumps([[n, list(t.shape)] for n, t in source.tensors.items()]).encode())
    names = list(source.tensors)
    step = max(1, len(names) // FINGERPRINT_TENSORS)
    for name in names[::step][:FINGERPRINT_TENSORS]:
        count = min(FINGERPRINT_VALUES, int(np.prod(source.tensors[name].shape)))
        head = np.empty(count, dtype=np.float32)
        for p in source._pieces[name]:
            lo, hi = p.dest, min(p.dest + p.count, count)
            if lo < hi:
                p.file.read_elements_into(p.key, p.first, head[lo:hi])
        h.update(name.encode() + b"\0" + head.astype("<f4").tobytes())
    return h.hexdigest()
