"""Importance matrices: llama.cpp's GGUF imatrix format, the legacy ``.dat`` files, merging, checks.

An importance matrix holds, for every quantizable weight ``W`` (out, in), the sum of ``x_c²``
over every token ``x`` that reached the weight during calibration, per input column ``c``, and
the number of tokens summed. ``in_sum2 / count`` is the vector llama-quantize hands to ggml's
K-quant quantizers as ``quant_weights``; :meth:`Imatrix.importance` computes it the same way
(float32 division, as ``tools/quantize/quantize.cpp`` does).

Formats read here:

- GGUF (llama.cpp's default since 2025, ``tools/imatrix/imatrix.cpp`` ``save_imatrix``):
  ``general.type = "imatrix"``, ``imatrix.datasets`` (strings), ``imatrix.chunk_count`` and
  ``imatrix.chunk_size`` (u32); per weight ``<name>.in_sum2`` (F32, ``n_cols`` x ``n_mat``) and
  ``<name>.counts`` (F32, 1 x ``n_mat``); an optional ``<name>.in_sum`` is read past.
- llama.cpp's legacy ``.dat``: int32 entry count; per entry int32 name length, the name, int32
  ``ncall``, int32 ``nval`` and ``nval`` float32 values that hold ``mean(x²) · ncall``; then
  optionally int32 last chunk, int32 dataset-name length and the name.
- stable-diffusion.cpp's ``.dat`` (``imatrix.hpp``): the same entries, then only int32 last call;
  its weight names carry ``model.diffusion_model.``, which is taken off here.

A legacy entry becomes ``in_sum2 = values``, ``count = ncall``, so its importance is exactly what
llama-quantize's ``load_legacy_imatrix`` computes (``values / ncall``), and two sd.cpp files
merge as sd.cpp merges them. (llama.cpp's own loader scales legacy sums and counts by its
current context size before merging them with GGUF ones; that guess has no meaning for FLUX, so
counts of a legacy file stay in calls.)

FLUX has one matrix per weight; an entry with several (a mixture-of-experts tensor) is refused.
"""
from __future__ import annotations

import dataclasses
import io
import math
import os
import pathlib
import struct
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Iterable, Mapping, Sequence

import numpy as np

from manifests.hashing import open_regular, partial_path, write_bytes_atomic

from .errors import ImatrixError

if TYPE_CHECKING:
    from .inspect_files import GGUFHeader
    from .recipes import Plan

SD_CPP_PREFIX = "model.diffusion_model."
GGUF_MAGIC = b"GGUF"
KEY_TYPE = "general.type"
KEY_DATASETS = "imatrix.datasets"
KEY_CHUNK_COUNT = "imatrix.chunk_count"
KEY_CHUNK_SIZE = "imatrix.chunk_size"
SUFFIX_SUM2 = ".in_sum2"
SUFFIX_SUM = ".in_sum"
SUFFIX_COUNTS = ".counts"
# What llama-quantize records in the GGUF it writes (src/llama-quant.cpp, tools/quantize).
KV_QUANTIZE_FILE = "quantize.imatrix.file"
KV_QUANTIZE_DATASET = "quantize.imatrix.dataset"
KV_QUANTIZE_ENTRIES = "quantize.imatrix.entries_count"
KV_QUANTIZE_CHUNKS = "quantize.imatrix.chunks_count"
_MAX_LISTED = 8  # names listed in a one-line error before "and N more"


@dataclass
class ImatrixEntry:
    """One weight's statistics: Σx² per input column and the number of tokens summed."""

    in_sum2: np.ndarray  # float32 (or float64 while accumulating) [n_cols]
    count: float


@dataclass
class Imatrix:
    """Importance statistics keyed by BFL weight name (``double_blocks.0.img_attn.qkv.weight``)."""

    entries: dict[str, ImatrixEntry]
    datasets: list[str] = field(default_factory=list)
    chunk_count: int = 0
    chunk_size: int = 0

    def importance(self, name: str) -> np.ndarray:
        """``in_sum2 / count`` as float32: what ``quant_kernels.quantize(imatrix=)`` takes."""
        try:
            e = self.entries[name]
        except KeyError:
            raise ImatrixError(f"the importance matrix has no entry for tensor {name}") from None
        sums = np.asarray(e.in_sum2, dtype=np.float32).reshape(-1)
        count = np.float32(e.count)
        if not count > 0:
            # llama-quantize's rule for a weight that never saw a token (partial data).
            return np.ones_like(sums)
        return sums / count


def _listed(names: Sequence[str]) -> str:
    shown = ", ".join(names[:_MAX_LISTED])
    more = len(names) - _MAX_LISTED
    return shown + (f" and {more} more" if more > 0 else "")


def strip_sd_cpp_prefix(name: str) -> str:
    """stable-diffusion.cpp's ``model.diffusion_model.X`` is our BFL name ``X``."""
    return name.removeprefix(SD_CPP_PREFIX)


def _entry_problem(name: str, e: ImatrixEntry) -> str | None:
    sums = np.asarray(e.in_sum2)
    if sums.ndim != 1 or sums.size == 0:
        return f"entry {name} must be one non-empty row of sums, found shape {tuple(sums.shape)}"
    if not math.isfinite(float(e.count)):
        return f"entry {name} has a count of {e.count}"
    if e.count <= 0:
        return f"entry {name} has a count of {e.count:g} (no token reached that weight during calibration)"
    if not np.isfinite(sums).all():
        bad = int(np.flatnonzero(~np.isfinite(sums))[0])
        return f"entry {name} holds a non-finite sum ({sums[bad]}) at column {bad}"
    if (sums < 0).any():
        bad = int(np.flatnonzero(sums < 0)[0])
        return f"entry {name} holds a negative sum of squares ({sums[bad]:g}) at column {bad}"
    return None


def check_entries(im: Imatrix, origin: str = "importance matrix") -> None:
    """Refuse NaN/inf or negative sums and zero or negative counts, naming the first bad entry."""
    if not im.entries:
        raise ImatrixError(f"{origin}: holds no entries")
    for name in sorted(im.entries):
        problem = _entry_problem(name, im.entries[name])
        if problem:
            raise ImatrixError(f"{origin}: {problem}")


def check_against(im: Imatrix, widths: Mapping[str, int], origin: str = "importance matrix") -> None:
    """Every weight in ``widths`` (name -> input columns) needs an entry of exactly that width.

    Tensors missing are listed; a wrong width names the tensor with the expected and found width
    (an imatrix collected on another model); bad values are refused as :func:`check_entries` does.
    """
    missing = sorted(n for n in widths if n not in im.entries)
    if missing:
        raise ImatrixError(f"{origin}: no entry for {len(missing)} of the {len(widths)} tensors quantized "
                           f"with it: {_listed(missing)} (was it collected on this model?)")
    for name in sorted(widths):
        e = im.entries[name]
        found = int(np.asarray(e.in_sum2).size)
        if found != int(widths[name]):
            raise ImatrixError(f"{origin}: tensor {name} has {widths[name]} input columns but its entry has "
                               f"{found} (an importance matrix for another model?)")
        problem = _entry_problem(name, e)
        if problem:
            raise ImatrixError(f"{origin}: {problem}")


# --- writing ---------------------------------------------------------------------------------

def write_imatrix(im: Imatrix, path: str | os.PathLike[str]) -> None:
    """Write llama.cpp's GGUF imatrix format through gguf-py (a hidden unique partial name, then a rename).

    Keys and tensor shapes are those of llama.cpp's ``save_imatrix``: no ``general.architecture``,
    entries in sorted name order, ``in_sum2`` [1, n_cols] and ``counts`` [1, 1] float32.
    """
    from gguf import GGUFWriter

    check_entries(im, "imatrix to write")
    final = pathlib.Path(path)
    tmp = partial_path(final)  # unique to this call: a user's PATH.partial is never touched
    try:
        w = GGUFWriter(tmp, arch="imatrix")
        w.kv_data[0].pop("general.architecture", None)  # llama.cpp's imatrix files carry none
        w.add_string(KEY_TYPE, "imatrix")
        w.add_array(KEY_DATASETS, [str(d) for d in im.datasets])
        w.add_uint32(KEY_CHUNK_COUNT, int(im.chunk_count))
        w.add_uint32(KEY_CHUNK_SIZE, int(im.chunk_size))
        for name in sorted(im.entries):
            e = im.entries[name]
            w.add_tensor(name + SUFFIX_SUM2, np.asarray(e.in_sum2, dtype=np.float32).reshape(1, -1))
            w.add_tensor(name + SUFFIX_COUNTS, np.array([[e.count]], dtype=np.float32))
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, final)
    except ImatrixError:
        raise
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise ImatrixError(f"{final}: cannot write the importance matrix ({exc.strerror or exc})") from exc
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_imatrix_legacy(im: Imatrix, path: str | os.PathLike[str], *, sd_cpp: bool = False) -> None:
    """Write the legacy ``.dat`` layout (llama.cpp's, or sd.cpp's with its name prefix and no dataset).

    Values are ``mean(x²) · ncall`` with ``ncall = round(count)`` as both writers store them.
    Meant for exchanging files with stable-diffusion.cpp (``--imat-in``) and for tests.
    """
    check_entries(im, "imatrix to write")
    final = pathlib.Path(path)
    out = bytearray(struct.pack("<i", len(im.entries)))
    for name in sorted(im.entries):
        e = im.entries[name]
        key = (SD_CPP_PREFIX + name if sd_cpp else name).encode()
        ncall = max(1, round(float(e.count)))
        vals = (np.asarray(e.in_sum2, dtype=np.float32) / np.float32(e.count)) * np.float32(ncall)
        out += struct.pack("<i", len(key)) + key + struct.pack("<ii", ncall, vals.size)
        out += vals.astype("<f4").tobytes()
    out += struct.pack("<i", int(im.chunk_count))
    if not sd_cpp:
        ds = (im.datasets[-1] if im.datasets else "").encode()
        out += struct.pack("<i", len(ds)) + ds
    try:
        write_bytes_atomic(final, bytes(out))
    except OSError as exc:
        raise ImatrixError(f"{final}: cannot write the importance matrix ({exc.strerror or exc})") from exc


# --- reading ---------------------------------------------------------------------------------
#
# An importance matrix is small (a full FLUX.1 one is 7 MB). Its size is checked first, so a
# device, FIFO or oversized (e.g. sparse) file is refused before a byte of it is read; a GGUF's
# header is read next and its tensor layout proven against the file's size before any data is
# read, and then the data is read once. Every count and length is bounded by the bytes present.
# gguf-py's GGUFReader is not used: it sizes arrays from the counts in the file and builds
# objects per array element before anything can check them (converter.inspect_files' bounded
# header reader parses the header instead).

MAX_IMATRIX_BYTES = 64 << 20
"""Largest importance matrix file read: about 9x a full FLUX.1 imatrix (7 MB; 14 MB with llama.cpp's ``in_sum``)."""
MAX_IMATRIX_ENTRIES = 1 << 15
"""Most weights an importance matrix may hold (FLUX.1 has 304; the largest language models a few thousand)."""
_GGUF_F32 = 0  # GGMLQuantizationType.F32
_GGUF_KEYS = frozenset({KEY_TYPE, KEY_DATASETS, KEY_CHUNK_COUNT, KEY_CHUNK_SIZE})


def read_imatrix(path: str | os.PathLike[str]) -> Imatrix:
    """Read a GGUF imatrix, a llama.cpp legacy ``.dat`` or a stable-diffusion.cpp ``.dat``.

    Names lose sd.cpp's ``model.diffusion_model.`` prefix; entries are checked (finite,
    non-negative sums, positive counts). Errors are one line naming the file. A symbolic link is
    followed (as for sources); what it names must be a regular file of at most
    :data:`MAX_IMATRIX_BYTES` (opened with O_NONBLOCK, then fstat-ed: a FIFO or device, or a
    link to one, is refused at once, never waited on or read).
    """
    p = pathlib.Path(path)
    try:
        with open_regular(p) as raw, io.BufferedReader(raw) as f:
            size = os.fstat(raw.fileno()).st_size
            if size > MAX_IMATRIX_BYTES:
                raise ImatrixError(f"{p}: {size:,} bytes is larger than any importance matrix (at most "
                                   f"{MAX_IMATRIX_BYTES:,} bytes are read; a FLUX.1 imatrix is about 7 MB)")
            if f.peek(4)[:4] == GGUF_MAGIC:
                im = _read_gguf(p, f, size)
            else:
                im = _read_legacy(p, _read_exactly(p, f, 0, size))
    except OSError as exc:
        raise ImatrixError(f"{p}: cannot read the importance matrix ({exc.strerror or exc})") from exc
    check_entries(im, str(p))
    return im


def _read_exactly(p: pathlib.Path, f: io.BufferedReader, start: int, end: int) -> bytearray:
    """Bytes ``start`` to ``end`` of the file, read once (a file that shrinks meanwhile is an error)."""
    data = bytearray(end - start)
    view, done = memoryview(data), 0
    f.seek(start)
    while done < len(data):
        got = f.readinto(view[done:])
        if not got:
            raise ImatrixError(f"{p}: the file shrank to {start + done} bytes while it was read (it had {end})")
        done += got
    return data


def _gguf_int(p: pathlib.Path, meta: Mapping[str, object], key: str) -> int:
    value = meta.get(key, 0)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ImatrixError(f"{p}: {key} is {value!r}, expected a non-negative integer")
    return value


def _gguf_datasets(p: pathlib.Path, meta: Mapping[str, object]) -> list[str]:
    value = meta.get(KEY_DATASETS, [])
    if isinstance(value, str):
        return [value]
    if not isinstance(value, list) or not all(isinstance(d, str) for d in value):
        raise ImatrixError(f"{p}: {KEY_DATASETS} must be an array of strings")
    return value


def _read_gguf(p: pathlib.Path, f: io.BufferedReader, size: int) -> Imatrix:
    from .inspect_files import GGUFStructureError, read_gguf_header

    try:
        header = read_gguf_header(f, size, p, keep=_GGUF_KEYS.__contains__, max_items=4 * MAX_IMATRIX_ENTRIES)
    except GGUFStructureError as exc:
        raise ImatrixError(f"{p}: not a readable GGUF file ({exc.problem})") from None
    meta = header.metadata
    gtype = meta.get(KEY_TYPE)
    if gtype is not None and gtype != "imatrix":
        raise ImatrixError(f"{p}: general.type is {gtype!r}, expected 'imatrix' (is this a model, not an importance matrix?)")
    datasets = _gguf_datasets(p, meta)
    chunk_count, chunk_size = _gguf_int(p, meta, KEY_CHUNK_COUNT), _gguf_int(p, meta, KEY_CHUNK_SIZE)
    spans = _gguf_layout(p, header)
    data = _read_exactly(p, f, header.data_start, size) if spans else bytearray()
    sums: dict[str, np.ndarray] = {}
    counts: dict[str, np.ndarray] = {}
    for t in header.tensors:
        name = t.name
        if name.endswith(SUFFIX_SUM2):
            target, base = sums, name[: -len(SUFFIX_SUM2)]
        elif name.endswith(SUFFIX_COUNTS):
            target, base = counts, name[: -len(SUFFIX_COUNTS)]
        else:
            continue  # .in_sum (mean activations) and anything else: llama-quantize ignores them too
        n_mat = math.prod(t.dims[1:])  # ggml order: dims[0] = columns, then matrices
        if target is sums and n_mat != 1:
            raise ImatrixError(f"{p}: {name} holds {n_mat} matrices (a mixture-of-experts tensor); FLUX weights have one")
        if base in target:
            raise ImatrixError(f"{p}: tensor {name} appears twice")
        offset, n = spans[name]
        target[base] = np.frombuffer(data, dtype=header.byte_order + "f4", count=n,
                                     offset=offset).astype(np.float32, copy=False)
    if not sums and not counts:
        raise ImatrixError(f"{p}: holds no .in_sum2/.counts tensors (not an importance matrix)")
    unpaired = sorted(set(sums) ^ set(counts))
    if unpaired:
        raise ImatrixError(f"{p}: mismatched sums and counts for {_listed(unpaired)}")
    entries = {}
    for base in sorted(sums):
        c = counts[base]
        if c.size != 1:
            raise ImatrixError(f"{p}: {base}{SUFFIX_COUNTS} holds {c.size} counts, expected 1")
        key = strip_sd_cpp_prefix(base)
        if key in entries:
            raise ImatrixError(f"{p}: weight {key} has two entries ({key} and {SD_CPP_PREFIX}{key})")
        entries[key] = ImatrixEntry(sums[base], float(c[0]))
    return Imatrix(entries=entries, datasets=datasets, chunk_count=chunk_count, chunk_size=chunk_size)


def _gguf_layout(p: pathlib.Path, header: GGUFHeader) -> dict[str, tuple[int, int]]:
    """Tensor name -> (offset in the data section, float32 count), once the layout is proven sound
    from the header alone: F32 only, each tensor's data right after the previous one's (in header
    order, at the next aligned offset), nothing after the last but its padding. So no byte belongs
    to two tensors, and the file holds exactly what its entries need: a mostly empty (sparse) file
    is refused by its structure before its data is read."""
    align, expected = header.alignment, 0
    spans = {}
    for t in header.tensors:
        if t.ggml_type != _GGUF_F32:
            raise ImatrixError(f"{p}: tensor {t.name} is {_ggml_type_name(t.ggml_type)}, expected F32")
        if t.offset < expected:
            raise ImatrixError(f"{p}: the data of tensor {t.name} starts at offset {t.offset}, inside the data "
                               f"before it (expected {expected}: tensor data follows in order, without overlap)")
        if t.offset > expected:
            raise ImatrixError(f"{p}: {t.offset - expected} bytes before the data of tensor {t.name} belong to "
                               f"no tensor (its data starts at offset {t.offset}, expected {expected})")
        n = math.prod(t.dims)
        end = header.data_start + t.offset + 4 * n
        if end > header.size:
            raise ImatrixError(f"{p}: truncated: tensor {t.name} needs bytes up to {end} but the file has {header.size}")
        if t.name in spans:
            raise ImatrixError(f"{p}: tensor {t.name} appears twice")
        spans[t.name] = (t.offset, n)
        expected = -(-(t.offset + 4 * n) // align) * align
    if spans and header.size > header.data_start + expected:
        extra = header.size - header.data_start - expected
        raise ImatrixError(f"{p}: {extra} bytes after the data of the last tensor belong to no tensor")
    return spans


def _ggml_type_name(ggml_type: int) -> str:
    from gguf import GGMLQuantizationType

    try:
        return GGMLQuantizationType(ggml_type).name
    except ValueError:
        return f"type {ggml_type}"


class _Cursor:
    def __init__(self, data: bytearray, p: pathlib.Path):
        self.data, self.pos, self.p = data, 0, p

    def left(self) -> int:
        return len(self.data) - self.pos

    def _need(self, n: int, what: str) -> None:
        if n < 0 or self.left() < n:
            raise ImatrixError(f"{self.p}: truncated legacy imatrix: {what} needs {n} bytes at offset "
                               f"{self.pos}, {self.left()} remain")

    def take(self, n: int, what: str) -> bytes:
        self._need(n, what)
        b = bytes(self.data[self.pos:self.pos + n])
        self.pos += n
        return b

    def floats(self, n: int, what: str) -> np.ndarray:
        """``n`` little-endian float32 values as a view of the file's bytes (no copy)."""
        self._need(4 * n, what)
        vals = np.frombuffer(self.data, dtype="<f4", count=n, offset=self.pos)
        self.pos += 4 * n
        return vals.astype(np.float32, copy=False)

    def i32(self, what: str) -> int:
        return struct.unpack("<i", self.take(4, what))[0]


def _read_legacy(p: pathlib.Path, data: bytearray) -> Imatrix:
    cur = _Cursor(data, p)
    n_entries = cur.i32("the entry count") if cur.left() >= 4 else 0
    if n_entries < 1:
        raise ImatrixError(f"{p}: not an importance matrix (neither GGUF nor a legacy .dat with entries)")
    if n_entries > len(data) // 12:
        raise ImatrixError(f"{p}: not an importance matrix (claims {n_entries} entries in {len(data)} bytes)")
    if n_entries > MAX_IMATRIX_ENTRIES:
        raise ImatrixError(f"{p}: claims {n_entries:,} entries; an importance matrix of at most "
                           f"{MAX_IMATRIX_ENTRIES:,} weights is read")
    entries: dict[str, ImatrixEntry] = {}
    for i in range(n_entries):
        ln = cur.i32(f"entry {i + 1}'s name length")
        if not 0 < ln <= 4096:
            raise ImatrixError(f"{p}: entry {i + 1} has a name length of {ln} (not an importance matrix?)")
        raw = cur.take(ln, f"entry {i + 1}'s name")
        try:
            name = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise ImatrixError(f"{p}: entry {i + 1}'s name is not UTF-8 (not an importance matrix?)") from None
        ncall = cur.i32(f"{name}'s call count")
        nval = cur.i32(f"{name}'s value count")
        if nval < 1:
            raise ImatrixError(f"{p}: entry {name} holds {nval} values")
        vals = cur.floats(nval, f"{name}'s values")
        key = strip_sd_cpp_prefix(name)
        if key in entries:  # sd.cpp's loader sums repeated names; so does this
            have = entries[key]
            if have.in_sum2.size != vals.size:
                raise ImatrixError(f"{p}: entry {name} appears twice, with {have.in_sum2.size} and {vals.size} values")
            entries[key] = ImatrixEntry(have.in_sum2 + vals, have.count + ncall)
        else:
            entries[key] = ImatrixEntry(vals, float(ncall))
    chunk_count = cur.i32("the chunk count") if cur.left() >= 4 else 0
    datasets: list[str] = []
    if cur.left() >= 4:
        ln = cur.i32("the dataset name length")
        if ln < 0 or ln > cur.left():
            raise ImatrixError(f"{p}: dataset name length {ln} exceeds the {cur.left()} bytes left")
        datasets.append(cur.take(ln, "the dataset name").decode("utf-8", errors="replace"))
    if cur.left():
        raise ImatrixError(f"{p}: {cur.left()} unexpected bytes after the legacy imatrix data")
    return Imatrix(entries=entries, datasets=datasets, chunk_count=max(0, chunk_count), chunk_size=0)


# --- merging ---------------------------------------------------------------------------------

def merge_imatrices(ims: Sequence[Imatrix]) -> Imatrix:
    """Merge as llama.cpp merges ``--in-file`` imatrices: sums and counts add per weight.

    Datasets are concatenated in order; chunk counts add; the chunk size is the first non-zero
    one. A weight present in only some files keeps what those files hold. Widths must agree.
    """
    ims = list(ims)
    if not ims:
        raise ImatrixError("no importance matrix to merge")
    if len(ims) == 1:
        return _copy(ims[0])
    # llama.cpp adds float32 sums file by file; float64 inputs (a collector's) stay float64.
    acc = np.float64 if any(np.asarray(e.in_sum2).dtype == np.float64
                            for im in ims for e in im.entries.values()) else np.float32
    entries: dict[str, ImatrixEntry] = {}
    for k, im in enumerate(ims):
        for name, e in im.entries.items():
            sums = np.asarray(e.in_sum2, dtype=acc).reshape(-1)
            if name in entries:
                have = entries[name]
                if have.in_sum2.size != sums.size:
                    raise ImatrixError(f"cannot merge importance matrices: tensor {name} has {have.in_sum2.size} "
                                       f"columns in one file and {sums.size} in file {k + 1}")
                entries[name] = ImatrixEntry(have.in_sum2 + sums, have.count + float(e.count))
            else:
                entries[name] = ImatrixEntry(sums.copy(), float(e.count))
    return Imatrix(entries=dict(sorted(entries.items())),
                   datasets=[d for im in ims for d in im.datasets],
                   chunk_count=sum(int(im.chunk_count) for im in ims),
                   chunk_size=next((int(im.chunk_size) for im in ims if im.chunk_size), 0))


def _copy(im: Imatrix) -> Imatrix:
    return dataclasses.replace(im, entries={n: ImatrixEntry(np.array(e.in_sum2, copy=True), float(e.count))
                                            for n, e in im.entries.items()},
                               datasets=list(im.datasets))


def load_imatrices(paths: Iterable[str | os.PathLike[str]]) -> Imatrix:
    """Read every file and merge them (what ``convert --imatrix A --imatrix B`` uses)."""
    return merge_imatrices([read_imatrix(p) for p in paths])


def quantize_kvs(im: Imatrix, files: Sequence[str | os.PathLike[str]]) -> dict[str, str | int]:
    """The ``quantize.imatrix.*`` KVs llama-quantize writes: file (names joined by ','), first dataset,
    entries count and chunk count (the latter only when known, as llama-quantize does)."""
    kvs: dict[str, str | int] = {KV_QUANTIZE_FILE: ",".join(pathlib.Path(f).name for f in files)}
    if im.datasets:
        kvs[KV_QUANTIZE_DATASET] = im.datasets[0]
    kvs[KV_QUANTIZE_ENTRIES] = len(im.entries)
    if im.chunk_count > 0:
        kvs[KV_QUANTIZE_CHUNKS] = int(im.chunk_count)
    return kvs


# --- using an imatrix in a conversion ---------------------------------------------------------

def uses_imatrix(qtype: str) -> bool:
    """K-quants take the importance vector; Q8_0, F16, BF16 and F32 ignore it (as in ggml)."""
    from quant_kernels import resolve
    from quant_kernels.errors import UnsupportedTypeError

    try:
        return bool(resolve(qtype).is_kquant)
    except UnsupportedTypeError:  # a type name we cannot encode (e.g. from a foreign manifest) uses none
        return False


def plan_widths(plans: Sequence[Plan]) -> dict[str, int]:
    """Tensors some plan stores in a K-quant type -> their input columns (what needs an entry)."""
    return {e.name: int(e.shape[-1]) for p in plans for e in p.entries if len(e.shape) > 1 and uses_imatrix(e.qtype)}


def describe_files(files: Sequence[str | os.PathLike[str]]) -> str:
    return " + ".join(str(f) for f in files) if files else "importance matrix"


def attach_to_plans(plans: Sequence[Plan], im: Imatrix, files: Sequence[str | os.PathLike[str]] = ()) -> list[Plan]:
    """Check ``im`` against every K-quant tensor of ``plans`` and add the ``quantize.imatrix.*`` KVs
    (as llama-quantize records them) to each plan that quantizes some tensor with it.

    A plan with no K-quant tensor (Q8_0, F16, BF16) is returned unchanged: its bytes do not
    depend on the imatrix, so its file is the static one.
    """
    from gguf import GGUFValueType

    from .writer import KV, encode_header

    check_against(im, plan_widths(plans), describe_files(files))
    extra = []
    for key, value in quantize_kvs(im, files).items():
        vtype = GGUFValueType.STRING if isinstance(value, str) else GGUFValueType.INT32
        extra.append(KV(key, value, vtype))
    out = []
    for p in plans:
        if not any(len(e.shape) > 1 and uses_imatrix(e.qtype) for e in p.entries):
            out.append(p)
            continue
        kv = tuple(p.kv) + tuple(extra)
        out.append(dataclasses.replace(p, kv=kv, header_nbytes=len(encode_header(kv, p.slots))))
    return out
