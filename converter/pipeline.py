"""read -> plan -> quantize -> write, for several variants in one pass over the source.

Each source tensor is read once, upcast to float32, optionally transformed (the LoRA merge hook),
encoded once per distinct output type (variants that agree on a tensor share the bytes) and
appended to every output file. Every stage runs on its own threads so that no single core sets
the pace:

* reader threads ``pread`` the raw source bytes of the next tensors into reusable buffers
  (several tensors in flight; the reads release the GIL), with O_DIRECT when the source is not in
  the page cache (``direct_io``), each tensor placed at its file offset's phase so the read lands
  in place;
* the calling thread, the only one that launches numba's parallel regions, hands each tensor's raw
  codes to the fused kernels (``quant_kernels.quantize_raw``), one parallel region per output type:
  every kernel thread upcasts a chunk of rows (64 KB of float32) into its own buffer, which stays
  in cache, checks it and encodes it, so no float32 copy of a tensor is made and nothing else
  passes over it; float output types (F32/F16/BF16) are converted 8 MB per kernel thread at a time;
  tensors under 64K elements are encoded on the calling thread alone (``quant_kernels.api``);
* hashing threads compute each encoded tensor's sha256 (once per distinct type);
* two writer threads per output file write the tensors at their offsets, in parallel (whole pages
  with O_DIRECT where the file system allows it; each encoded tensor sits at the phase of its first
  file's offset, so that write needs no copy), and one
  more thread per file computes the whole-file sha256, which is one sequential stream (about
  1.2-1.5 GB/s on one core): the calling thread hands it each tensor in file order as soon as
  the tensor is encoded, and it may fall behind by a byte budget, so it never waits for a write.

Output bytes do not depend on the thread count: the kernels encode rows independently, chunks
are whole rows, and everything is written in plan order. Memory, with T kernel threads,
R = min(4, max(1, T // 4)) reader threads, the read piece P (a tensor whole, or a range of its
rows when it is larger than _PIECE_BYTES = 64 MiB, so P <= 64 MiB + one row, plus the 4 KB every
pooled buffer has to spare for placing) and the largest encoded tensor E:
(R + 2) * P of raw buffers + T * 64 KB of kernel buffers (T * 8 MB while
a float output type is converted) + at most Q * ((_QUEUE_DEPTH + 4) * E + 128 MB) of encoded tensors
(Q: distinct types per tensor, at most the variant count; each file has one tensor being encoded,
_QUEUE_DEPTH + 2 waiting for or in a write on its two writer threads, and up to 128 MB plus one
tensor queued at its whole-file hash, which may run that far behind); in practice the writers
and hashes keep up and two or three encoded tensors are alive at once. For the full FLUX.1 model
(E = 70 MB Q8_0) at 16 threads and three variants: 0.4 GB + 1 MB + at most 1.6 GB. FLUX.2
[dev]'s 680 MB BF16 single-block linear1 is read in 11 ranges. A ``tensor_transform`` needs
whole tensors (read unsplit, P = the largest source tensor) and adds the float32 tensor it is
given (2 P for a BF16 source) and whatever it allocates.
"""
from __future__ import annotations

import concurrent.futures
import contextlib
import hashlib
import json
import os
import pathlib
import queue
import threading
import time
import unicodedata
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import numba
import numpy as np

import quant_kernels
from manifests.locking import OutputBusyError, locked
from quant_kernels.errors import QuantError

from .detect import detect_model
from .errors import FluxGGUFError, OutputError, PlanError, SensitivityError, TargetRangeError
from .imatrix import Imatrix, attach_to_plans, load_imatrices, plan_widths, uses_imatrix
from .recipes import (
    CANDIDATE_TYPES,
    VARIANTS,
    Budget,
    Option,
    Override,
    Plan,
    Sensitivity,
    SourceRef,
    Variant,
    allocate,
    choose_type,
    kept_type,
    make_plan,
    make_plans,
    mix_variant,
    mostly_file_type,
    parse_overrides,
    predicted_rel_l2,
    resolve_variant,
    tensor_nbytes,
)
from . import direct_io
from .direct_io import IO_ALIGN
from .safetensors_io import DTYPE_SIZES, raw_codes, upcast_rows
from .sources import Source, open_source
from .writer import ArtifactRecord, GGUFStreamWriter, pad_to_alignment

ProgressFn = Callable[[int, int], None]
TensorTransform = Callable[[str, np.ndarray], np.ndarray]

_QUEUE_DEPTH = 2  # encoded tensors waiting per writer thread
# float32 elements per kernel thread converted at a time into a float output type (8 MB); the
# quantized types chunk inside their kernels (quant_kernels._source.CHUNK_WEIGHTS).
_CHUNK_PER_THREAD = 1 << 21
_PARALLEL_CHUNKSIZE = 4  # loop iterations a kernel thread takes at a time (0: numba's static split)
_MAX_READERS = 4  # reader threads: a quarter of the kernel threads, at least 1, at most this
_MAX_HASHERS = 8  # tensor-hash threads: half the kernel threads, at least 1, at most this
_FILE_HASH_BUDGET = 128 << 20  # bytes a file's sha256 may fall behind the tensors encoded for it
# A source tensor larger than this is read and encoded in ranges of whole rows of about this many
# source bytes (bytes unchanged: rows encode independently), so that the raw buffers in flight do
# not grow with the largest tensor: FLUX.2 [dev]'s fused single-block linear1 is 680 MB of BF16.
_PIECE_BYTES = 64 << 20


def default_name(path: str | os.PathLike[str]) -> str:
    """Output name stem from the source: the file stem, or the folder name (its parent's for a
    diffusers ``transformer/`` folder), in Unicode NFC form (macOS may hand names over decomposed;
    output names must be NFC, and this one the user did not write)."""
    p = pathlib.Path(path)
    if p.is_dir():
        p = p.resolve()
        stem = p.parent.name if p.name == "transformer" and p.parent.name else p.name
    else:
        stem = p.name.removesuffix(".safetensors") or p.stem
    return unicodedata.normalize("NFC", stem)


def source_refs(source: Source, sha256: Mapping[str, str] | None = None) -> list[SourceRef]:
    """The source files as ``flux_gguf.source`` records them: names relative to the source, never
    absolute paths; sha256 where the caller knows it (keyed by that relative name)."""
    root = pathlib.Path(source.path)
    refs = []
    for f in source.files:
        fp = pathlib.Path(f.path)
        try:
            rel = fp.relative_to(root).as_posix() if root.is_dir() else fp.name
        except ValueError:
            rel = fp.name
        refs.append(SourceRef(rel, int(f.size), (sha256 or {}).get(rel)))
    return refs


def plan_source(
    source: Source,
    variants: Iterable[str | Variant],
    *,
    name: str | None = None,
    overrides: Iterable[str | Override] = (),
    source_sha256: Mapping[str, str] | None = None,
    extra_metadata: Mapping[str, str] | None = None,
    imatrix: Imatrix | None = None,
    imatrix_files: Sequence[str | os.PathLike[str]] = (),
) -> list[Plan]:
    """Detect the model and plan every variant for it; reads headers only (``--dry-run``).

    With ``imatrix``, every K-quant tensor must have an entry of its width, and the plans that use
    it carry the ``quantize.imatrix.*`` KVs (``imatrix_files`` name it there)."""
    info = detect_model(source)
    plans = make_plans(
        variants,
        source.tensors,
        name=name or default_name(source.path),
        family=info.family,
        overrides=tuple(overrides),
        sources=source_refs(source, source_sha256),
        extra_metadata=extra_metadata,
    )
    return plans if imatrix is None else attach_to_plans(plans, imatrix, imatrix_files)


def plan_source_target(
    source: Source,
    sensitivity: Sensitivity,
    budget: Budget,
    *,
    mix_name: str | None = None,
    name: str | None = None,
    source_sha256: Mapping[str, str] | None = None,
    extra_metadata: Mapping[str, str] | None = None,
    imatrix: Imatrix | None = None,
    imatrix_files: Sequence[str | os.PathLike[str]] = (),
) -> TargetMix:
    """The size-targeted mix for ``source`` (``--dry-run --target-size``); reads headers only.

    ``mix_name`` labels the file (``NAME-MIX.gguf``); default ``T`` + the budget (e.g. T5.37GB)."""
    return plan_target(source, sensitivity, budget, label=mix_name or default_mix_name(budget),
                       name=name or default_name(source.path), sources=source_refs(source, source_sha256),
                       extra_metadata=extra_metadata, imatrix=imatrix, imatrix_files=imatrix_files)


def check_sensitivity_source(sensitivity: Sensitivity, source: Source) -> None:
    """Refuse a sensitivity file measured on another checkpoint than ``source`` (one line naming both).

    The file records the source's fingerprint (converter.sources.source_fingerprint: inventory and
    a few KB of weights, cheap for any size) and, for a single file, its sha256. The fingerprint
    is compared when recorded; a file from before it was recorded is compared by sha256 (the Hub's
    for an hf:// source; a local file is hashed). A file that records neither (written by hand)
    is not checked."""
    from manifests.hashing import hash_file

    from .sources import source_fingerprint

    recorded = sensitivity.document.get("source")
    recorded = recorded if isinstance(recorded, dict) else {}
    label = recorded.get("file") or "its source"
    fingerprint, sha256 = recorded.get("fingerprint"), recorded.get("sha256")
    if isinstance(fingerprint, str) and fingerprint:
        found, what = source_fingerprint(source), "fingerprint"
        if found == fingerprint:
            return
        expected = fingerprint
    elif isinstance(sha256, str) and sha256:
        known = getattr(source, "sha256_by_name", None) or {}
        if len(source.files) != 1:
            return
        found = next(iter(known.values()), None) if len(known) == 1 else hash_file(source.files[0].path).sha256
        what, expected = "sha256", sha256
        if found == sha256:
            return
    else:
        return
    raise SensitivityError(f"{sensitivity.file}: measured on another checkpoint ({label}, {what} {expected[:12]}...; "
                           f"{source.path.name} has {str(found)[:12]}...); measure this one with flux-gguf "
                           "sensitivity, or pass --any-sensitivity-source to use it anyway", sensitivity.file)


def default_mix_name(budget: Budget) -> str:
    return "T" + "".join(c for c in budget.text if c.isalnum() or c in "._-")


# --------------------------------------------------------------------------- size-targeted mixes
# Plans for size-targeted mixes: ``convert --target-size/--target-bpw --sensitivity FILE``.
#
# The allocator (converter.recipes.allocate) picks a type per quantized tensor; this section
# applies the recipe's fixed rules around it (1-D F32, ``img_in.weight`` F32, the in/out layers kept,
# types whose block does not divide a row never offered), turns the budget into exact bytes and
# records the choice in the file (``flux_gguf.recipe_target``).
#
# Exact bytes: the header's size depends on the metadata, which names the chosen types, so the
# allocation runs against the budget minus an upper bound of the header (every type name at its
# longest, the predicted error at its fixed width); the final file is then at most the budget and
# short of it by the header's slack (about a hundred bytes) plus whatever no swap could fill.

KV_TARGET = "flux_gguf.recipe_target"
_PROBE_VARIANT = VARIANTS["Q4_K_S"]  # any single-type variant: tells which tensors a recipe quantizes
_LONGEST_TYPE = "Q8_0"  # a longest candidate name (4 characters), for the header's upper bound
_LONGEST_FLOAT = -2.2250738585072014e-308  # a float whose JSON form is as long as any (24 characters)
_BOUND_TEXT = 40  # budget texts (and labels) up to this long give the same header bound
_GB = 1e9


@dataclass(frozen=True)
class TargetMix:
    """A planned size-targeted file: the plan, the budget, the choice and its predicted error."""

    plan: Plan
    budget: Budget
    types: Mapping[str, str]
    predicted_error: float  # summed relative squared output error
    reachable: tuple[float, float]  # the budget's range: bytes (size) or bits per weight (bpw)

    @property
    def predicted_rel_l2(self) -> float:
        return predicted_rel_l2(self.predicted_error)

    def block_table(self) -> list[tuple[str, dict[str, str]]]:
        """(block, {tensor suffix: type}) per double/single block, in file order; other tensors as 'other'."""
        rows: dict[str, dict[str, str]] = {}
        for name, qt in self.types.items():
            parts = name.split(".")
            block, rest = (".".join(parts[:2]), ".".join(parts[2:])) if parts[0] in (
                "double_blocks", "single_blocks") else ("other", name)
            rows.setdefault(block, {})[rest.removesuffix(".weight")] = qt
        return list(rows.items())


def _candidates(name: str, shape: tuple[int, ...], dtype: str, sens: Sensitivity) -> list[str]:
    known = sens.errors.get(name)
    if known is None:
        raise SensitivityError(f"{sens.file}: has no entry for tensor {name}; was it measured on another model?",
                               sens.file)
    if tuple(sens.shapes[name]) != tuple(shape):
        raise SensitivityError(f"{sens.file}: tensor {name} has shape {list(sens.shapes[name])} there, "
                               f"{list(shape)} in the source; it was measured on another model", sens.file)
    offered = [t for t in CANDIDATE_TYPES if shape[-1] % _block(t) == 0] + [kept_type(dtype)]
    out = [t for t in dict.fromkeys(offered) if t in known]
    if not out:
        raise SensitivityError(f"{sens.file}: tensor {name} has no error for any of {', '.join(offered)}", sens.file)
    return out


def _block(qtype: str) -> int:
    from quant_kernels import resolve

    return resolve(qtype).block_size


def plan_target(
    source: Any,
    sensitivity: Sensitivity,
    budget: Budget,
    *,
    label: str,
    name: str,
    sources: Sequence[SourceRef] = (),
    extra_metadata: Mapping[str, str] | None = None,
    imatrix: Imatrix | None = None,
    imatrix_files: Sequence[Any] = (),
) -> TargetMix:
    """The mix of ``source``'s tensors minimising predicted output error within ``budget``."""
    family = detect_model(source).family
    tensors = source.tensors
    choosable: dict[str, list[str]] = {}
    for tname, t in tensors.items():
        shape = tuple(int(s) for s in t.shape)
        _, rule = choose_type(tname, shape, t.dtype, _PROBE_VARIANT)
        if rule in ("quantized", "fallback"):
            choosable[tname] = _candidates(tname, shape, t.dtype, sensitivity)
    if not choosable:
        raise PlanError("the source has no tensor a recipe quantizes; nothing to choose")

    def build(types: Mapping[str, str], predicted: float, file_type: int, bound: bool = False) -> Plan:
        # The bound's header holds the budget and the label at a width no real one of up to
        # _BOUND_TEXT characters exceeds: the reachable range it gives (and reports when a budget
        # is refused) then does not depend on how the budget was written ("5.8MB" or "5807808").
        shown = Budget(budget.kind, _LONGEST_FLOAT, "x" * max(_BOUND_TEXT, len(json.dumps(budget.text)))) if bound else budget
        doc = {
            "budget": shown.to_dict(),
            "sensitivity": {"file": sensitivity.file, "sha256": sensitivity.sha256},
            "predicted_rel_l2": f"{predicted_rel_l2(predicted):.6e}",
            "method": "per-tensor types minimising predicted output error (flux-gguf sensitivity) within the budget",
            "types": dict(sorted(types.items())),
        }
        extra = {**(extra_metadata or {}), KV_TARGET: json.dumps(doc, sort_keys=True)}
        plan = make_plan(mix_variant("T" * max(_BOUND_TEXT + 1, len(label.encode())) if bound else label, file_type),
                         tensors, name=name, family=family, sources=sources,
                         extra_metadata=extra, types=types)
        return plan if imatrix is None else attach_to_plans([plan], imatrix, imatrix_files)[0]

    # every name 4 characters, and a K-quant wherever one fits, so that the bound carries the
    # quantize.imatrix.* KVs whenever the final mix could
    bound = build({n: next((t for t in cands if uses_imatrix(t)), _LONGEST_TYPE) for n, cands in choosable.items()},
                  0.0, 0, bound=True)
    fixed = [e for e in bound.entries if e.name not in choosable]
    n_params = bound.n_params
    if budget.kind == "size":
        def cost(qt: str, shape: tuple[int, ...]) -> int:
            return pad_to_alignment(tensor_nbytes(qt, shape))
        overhead = bound.header_nbytes + sum(pad_to_alignment(e.nbytes) for e in fixed)
        limit = int(budget.value)
    else:
        def cost(qt: str, shape: tuple[int, ...]) -> int:
            return tensor_nbytes(qt, shape)
        overhead = sum(e.nbytes for e in fixed)
        limit = int(budget.value * n_params // 8)
    options = {
        n: [Option(qt, cost(qt, tuple(tensors[n].shape)), sensitivity.errors[n][qt]) for qt in cands]
        for n, cands in choosable.items()
    }
    lo = overhead + sum(min(o.cost for o in opts) for opts in options.values())
    hi = overhead + sum(max(o.cost for o in opts) for opts in options.values())
    reachable = (lo, hi) if budget.kind == "size" else (lo * 8 / n_params, hi * 8 / n_params)
    if not lo <= limit <= hi:
        if budget.kind == "size":
            raise TargetRangeError(f"target size {budget.text} ({limit} bytes) is outside the reachable range "
                                   f"{lo / _GB:.3f}-{hi / _GB:.3f} GB ({lo}-{hi} bytes) for this source", lo, hi)
        raise TargetRangeError(f"target {budget.text} is outside the reachable range {reachable[0]:.3f}-"
                               f"{reachable[1]:.3f} bits per weight for this source", *reachable)
    chosen = allocate(options, limit - overhead)
    types = {n: chosen[n].qtype for n in tensors if n in chosen}
    predicted = sum(o.error for o in chosen.values())
    by_name = {e.name: e for e in bound.entries}
    params: dict[str, int] = {}
    for n, qt in types.items():
        params[qt] = params.get(qt, 0) + by_name[n].n_params
    plan = build(types, predicted, mostly_file_type(params))
    if budget.kind == "size" and plan.file_size > limit:  # the header bound failed: a bug, never a silent overrun
        raise PlanError(f"internal error: the mix is {plan.file_size} bytes, over the budget of {limit}")
    return TargetMix(plan, budget, types, predicted, reachable)


def convert(
    src: str | os.PathLike[str] | Source,
    out_dir: str | os.PathLike[str],
    variants: Sequence[str | Variant],
    *,
    name: str | None = None,
    overrides: Iterable[str | Override] = (),
    threads: int | None = None,
    progress: ProgressFn | None = None,
    tensor_transform: TensorTransform | None = None,
    source_sha256: Mapping[str, str] | None = None,
    extra_metadata: Mapping[str, str] | None = None,
    imatrix: Imatrix | None = None,
    imatrix_files: Sequence[str | os.PathLike[str]] = (),
    before_quantize: Callable[..., None] | None = None,
    sensitivity: Sensitivity | None = None,
    budget: Budget | None = None,
    mix_name: str | None = None,
) -> list[ArtifactRecord]:
    """Convert ``src`` into one GGUF file per variant (``NAME-VARIANT.gguf`` in ``out_dir``).

    ``src`` is a path, or a Source already opened (e.g. a Hub source: ``converter.hub.source``),
    which the caller closes.

    ``progress(done, total)`` is called with source bytes processed so far;
    ``tensor_transform(name, x)`` gets each tensor as float32 after reading and returns the
    float32 array to quantize (same shape); ``extra_metadata`` adds ``flux_gguf.*`` string KV
    entries (e.g. the LoRAs merged by the transform). ``imatrix_files`` (merged) or ``imatrix``:
    K-quant tensors are quantized with its importance vectors.
    ``before_quantize(types, imatrix=bool, sources=dtypes)`` is called once with the storage types the plans use
    and the source dtypes (e.g. "BF16"), after every
    check passed and before the first tensor is read (the CLI compiles missing numba kernels there,
    visibly). Returns one record per file, in variant order.

    ``budget`` with ``sensitivity`` (and no ``variants``): one size-targeted file instead
    (plan_target; ``mix_name`` labels it).
    """
    overrides = tuple(overrides)
    if (budget is None) != (sensitivity is None):
        raise PlanError("a target size or bits per weight needs a sensitivity file, and a sensitivity file a target")
    if budget is not None and (variants or overrides):
        raise PlanError("a target size or bits per weight chooses every type itself; give no variant or override")
    resolved = [resolve_variant(v) for v in variants]  # fail on a bad variant before reading
    parsed = parse_overrides(overrides)
    if imatrix is None and imatrix_files:
        imatrix = load_imatrices(imatrix_files)
    with kernel_threads(threads), (contextlib.nullcontext(src) if isinstance(src, Source) else open_source(src)) as source:
        if budget is not None and sensitivity is not None:
            plans = [plan_source_target(source, sensitivity, budget, mix_name=mix_name, name=name,
                                        source_sha256=source_sha256, extra_metadata=extra_metadata,
                                        imatrix=imatrix, imatrix_files=imatrix_files).plan]
        else:
            plans = plan_source(source, resolved, name=name, overrides=parsed, source_sha256=source_sha256,
                                extra_metadata=extra_metadata, imatrix=imatrix, imatrix_files=imatrix_files)
        out = _prepare_out_dir(pathlib.Path(out_dir), plans)
        with _output_locks(out, plans):  # held until every file is renamed into place
            if before_quantize is not None:
                before_quantize(sorted({e.qtype for p in plans for e in p.entries}), imatrix=imatrix is not None,
                                sources=sorted({source.tensors[e.name].dtype for e in plans[0].entries}))
            return _convert_planned(source, plans, out, progress, tensor_transform, imatrix)


@contextlib.contextmanager
def _output_locks(out: pathlib.Path, plans: Sequence[Plan]) -> Iterator[None]:
    """One lock per output file (``OUT/.NAME.gguf.flux-gguf.lock``); a second run fails at once."""
    try:
        cm = locked(out / p.file_name for p in plans)
        cm.__enter__()
    except OutputBusyError as e:
        raise OutputError(f"{e.target} was not written: another flux-gguf run ({e.holder}) is writing it; "
                          "wait for it to finish or choose another output folder") from None
    except OSError as e:
        files = ", ".join(str(out / p.file_name) for p in plans)
        raise OutputError(f"{files} {_was(plans)} not written: cannot lock the output: {e.strerror or e}") from None
    try:
        yield
    finally:
        cm.__exit__(None, None, None)


@contextlib.contextmanager
def kernel_threads(threads: int | None) -> Iterator[None]:
    """Run the quantization kernels on ``threads`` threads inside the block (None: as they are),
    restoring the previous count after; a count out of range is a PlanError."""
    previous = quant_kernels.get_threads()
    if threads is not None:
        try:
            quant_kernels.set_threads(threads)
        except ValueError as e:
            raise PlanError(str(e)) from None
    try:
        yield
    finally:
        quant_kernels.set_threads(previous)


def _prepare_out_dir(out: pathlib.Path, plans: Sequence[Plan]) -> pathlib.Path:
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        files = ", ".join(str(out / p.file_name) for p in plans)
        raise OutputError(f"{files} {_was(plans)} not written: cannot create {out}: {e.strerror or e}") from None
    return out


def _was(items: Sequence[Any]) -> str:
    return "was" if len(items) == 1 else "were"


def _convert_planned(
    source: Source,
    plans: Sequence[Plan],
    out: pathlib.Path,
    progress: ProgressFn | None,
    transform: TensorTransform | None,
    imatrix: Imatrix | None = None,
) -> list[ArtifactRecord]:
    order = [e.name for e in plans[0].entries]
    weighted = plan_widths(plans) if imatrix is not None else {}
    read_order = source.read_order(order)  # a streamed source reads in its file order; writers place each tensor
    by_name = [{e.name: e for e in p.entries} for p in plans]
    total = sum(int(source.tensors[n].nbytes) for n in order)
    threads = quant_kernels.get_threads()
    stats = _STATS.get()
    writers: list[GGUFStreamWriter] = []
    file_hashes: list[_FileHasher] = []
    sinks: list[_FileSink] = []
    reader: _Reader | None = None
    hashers: concurrent.futures.ThreadPoolExecutor | None = None
    records: list[ArtifactRecord] = []
    current = None
    started = time.perf_counter()
    # Parallel loops hand out iterations in small chunks as threads come free, instead of one
    # equal share per thread fixed at launch: a kernel thread delayed by the reader, hashing or
    # writer threads (or another process) no longer holds up the whole region. Same bytes.
    previous_chunksize = numba.set_parallel_chunksize(_PARALLEL_CHUNKSIZE)
    try:
        for p in plans:
            file_hashes.append(_FileHasher(p.file_name, stats))
            writers.append(GGUFStreamWriter(out / p.file_name, p.kv, p.slots, variant=p.variant.name,
                                            file_type=p.file_type, file_hash=file_hashes[-1],
                                            any_order=read_order != order, parallel=True))
        sinks = [_FileSink(w, h, stats) for w, h in zip(writers, file_hashes)]
        hashers = concurrent.futures.ThreadPoolExecutor(max(1, min(_MAX_HASHERS, threads // 2)),
                                                        thread_name_prefix="flux-gguf-hash")
        encoded_pool = _Buffers(max((e.nbytes for p in plans for e in p.entries), default=0) + IO_ALIGN)
        reader = _Reader(source, read_order, max(1, min(_MAX_READERS, threads // 4)), stats,
                         whole=transform is not None)
        chunk_size = threads * _CHUNK_PER_THREAD
        done = 0
        if progress is not None:
            progress(0, total)
        encoded: dict[str, _Shared] = {}
        for tname, raw in reader:
            current = tname
            info = source.tensors[tname]
            entries = [b[tname] for b in by_name]
            qtypes = list(dict.fromkeys(e.qtype for e in entries))
            qw = imatrix.importance(tname) if imatrix is not None and tname in weighted else None
            n = entries[0].shape[-1] if entries[0].shape else 1
            rows = raw.data.nbytes // max(1, _width(raw.dtype) * n) if raw.whole else raw.rows
            if raw.first:
                users = {qt: sum(sink.users for sink, e in zip(sinks, entries) if e.qtype == qt) for qt in qtypes}
                # Each type's bytes placed for the first file that holds them (a direct write from
                # there needs no copy; a second file of the same type at another phase gets one).
                phase = {qt: next((w.offset_of(tname) for w, e in zip(writers, entries)
                                   if e.qtype == qt and w.direct), 0) for qt in qtypes}
                encoded = {qt: _Shared(encoded_pool, users[qt] + 1, rows,
                                       quant_kernels.row_nbytes(qt, n) if n else 0, phase[qt])
                           for qt in qtypes}
            try:
                if transform is not None:
                    x = np.empty(info.shape, np.float32)
                    with _timed(stats, "upcast"):
                        upcast_rows(raw.data, raw.dtype, x.reshape(rows, n))
                    reader.release(raw)
                    x = _apply_transform(transform, tname, x)
                    if tuple(x.shape) != entries[0].shape:
                        raise FluxGGUFError(f"got shape {tuple(x.shape)}, expected {entries[0].shape}")
                    with _timed(stats, "quantize"):
                        for qt in qtypes:
                            _encode(x, qt, qw, out=encoded[qt].array)
                    del x
                else:
                    try:
                        _encode_raw(raw, raw.dtype, rows if raw.whole else raw.r1 - raw.r0, n,
                                    {qt: sh.array if raw.whole else sh.array[raw.r0:raw.r1]
                                     for qt, sh in encoded.items()},
                                    chunk_size, stats, qw)
                    except QuantError:
                        if not raw.whole:  # the error as the whole tensor gives it (counts, positions)
                            reader.release(raw)
                            _whole_tensor_error(source, tname, qtypes, qw)
                        raise
                    reader.release(raw)
            except BaseException:
                for shared in encoded.values():
                    shared.discard()
                encoded = {}
                raise
            done += int(info.nbytes) if raw.whole else int(raw.data.nbytes)
            if raw.last:
                digests = {qt: hashers.submit(_tensor_sha256, shared, stats) for qt, shared in encoded.items()}
                for sink, e in zip(sinks, entries):
                    sink.put(tname, encoded[e.qtype], digests[e.qtype])
                encoded, digests = {}, {}
                current = None
            if progress is not None:
                progress(done, total)
        for s in sinks:  # every file fully written before any is renamed into place
            s.drain()
        for w in writers:  # every file flushed and on disk before the first rename
            with _timed(stats, "sync"):
                w.sync()
        source.check_complete()  # a streamed source's sha256 against what its origin reports
        for w in writers:
            records.append(w.commit())
        if stats is not None:
            stats.wall = time.perf_counter() - started
            stats.threads = threads
        return records
    except BaseException as e:
        for s in sinks:
            s.cancel()
        if reader is not None:
            reader.close()
        for h in file_hashes:
            h.close()
        for w in writers:
            w.abort()
        pending = plans[len(records):]  # files renamed into place before the failure stay: they are complete
        if isinstance(e, OutputError) and not records:
            raise  # a writer's own error already names its file and why
        cause = e.cause if isinstance(e, _TensorError) else e
        raise _not_written(pending, out, e, current, written=[r.path for r in records]) from cause
    finally:
        numba.set_parallel_chunksize(previous_chunksize)
        if reader is not None:
            reader.close()
        for h in file_hashes:
            h.close()
        if hashers is not None:
            hashers.shutdown(wait=True, cancel_futures=True)


def _width(dtype: str) -> int:
    return DTYPE_SIZES[dtype]


def _encode_raw(raw: _RawTensor, dtype: str, rows: int, n: int, encoded: Mapping[str, np.ndarray],
                chunk_size: int, stats: StageStats | None, importance: np.ndarray | None = None) -> None:
    """Encode a tensor's rows from their raw source bytes into every output type's array.

    Quantized types: one call of the fused kernels per type, which upcast a cache-sized chunk of
    rows at a time on every kernel thread and encode it (no float32 copy of the tensor). Float
    output types (F32/F16/BF16) are converted ``chunk_size`` elements of whole rows at a time, so
    no float32 copy of a large tensor is made either. Either way the bytes, and the errors, are
    those of encoding the float32 rows at once."""
    if rows == 0 or n == 0:
        return
    codes, kind, table = raw_codes(raw.data, dtype, rows, n)
    for qt, out in encoded.items():
        with _timed(stats, "quantize"):
            if not quant_kernels.resolve(qt).is_float:
                quant_kernels.quantize_raw(codes, kind, qt, table=table, imatrix=importance, out=out)
                continue
            step = max(1, chunk_size // n)
            for r0 in range(0, rows, step):
                r1 = min(rows, r0 + step)
                try:
                    quant_kernels.quantize_raw(codes[r0:r1], kind, qt, table=table, out=out[r0:r1])
                except QuantError:
                    quant_kernels.quantize_raw(codes, kind, qt, table=table)  # positions over all the rows
                    raise


def _whole_tensor_error(source: Source, name: str, qtypes: Sequence[str], importance: np.ndarray | None) -> None:
    """A row range of ``name`` failed to encode: read the whole tensor once and encode it, so the
    error raised counts and places its values over the whole tensor, as an unsplit read would.
    (Only on this failure path does a tensor larger than _PIECE_BYTES sit in memory whole.)"""
    info = source.tensors[name]
    data = np.empty(int(info.nbytes), np.uint8)
    source.read_raw_into(name, data)
    n = int(info.shape[-1]) if info.shape else 1
    rows = int(info.nbytes) // max(1, DTYPE_SIZES[info.dtype] * n)
    codes, kind, table = raw_codes(data, info.dtype, rows, n)
    for qt in qtypes:
        quant_kernels.quantize_raw(codes, kind, qt, table=table,
                                   imatrix=None if quant_kernels.resolve(qt).is_float else importance)


def _tensor_sha256(shared: _Shared, stats: StageStats | None) -> str:
    try:
        with _timed(stats, "hash", cpu=True):
            return hashlib.sha256(memoryview(shared.array).cast("B")).hexdigest()
    finally:
        shared.release()


def _encode(x: np.ndarray, qtype: str, importance: np.ndarray | None = None,
            out: np.ndarray | None = None) -> np.ndarray:
    """One tensor's bytes in ``qtype``; 1-D tensors are a single row. ``importance``: the imatrix
    vector (one weight per column), used by K-quants and ignored by the other types."""
    rows = x.reshape(-1, x.shape[-1]) if x.ndim > 1 else x.reshape(1, -1)
    return quant_kernels.quantize(rows, qtype, imatrix=importance, out=out)


def _apply_transform(transform: TensorTransform, name: str, x: np.ndarray) -> np.ndarray:
    y = transform(name, x)
    if not isinstance(y, np.ndarray):
        raise FluxGGUFError(f"tensor_transform returned {type(y).__name__}, expected a numpy array")
    return np.ascontiguousarray(y, dtype=np.float32)


def _not_written(plans: Sequence[Plan], out: pathlib.Path, e: BaseException, tensor: str | None,
                 written: Sequence[pathlib.Path] = ()) -> OutputError:
    if isinstance(e, _TensorError):
        tensor, e = e.tensor, e.cause
    if isinstance(e, KeyboardInterrupt):
        why = "interrupted"
    elif isinstance(e, (FluxGGUFError, QuantError)):
        why = str(e)
    else:
        why = f"{type(e).__name__}: {e}"
    if tensor is not None:
        why = f"tensor {tensor}: {why}"
    files = ", ".join(str(out / p.file_name) for p in plans)
    done = f" ({', '.join(map(str, written))} {_was(written)} complete)" if written else ""
    return OutputError(f"{files} {_was(plans)} not written: {why}{done}")


class _TensorError(Exception):
    """An exception raised while reading or transforming one tensor, carried across threads."""

    def __init__(self, tensor: str, cause: BaseException) -> None:
        super().__init__(f"tensor {tensor}: {cause}")
        self.tensor = tensor
        self.cause = cause


# ---------------------------------------------------------------------------------------------
# Stage timing (for scripts/bench_convert.py; off unless a caller collects).


class StageStats:
    """Busy time per stage of one conversion, summed over the threads that ran it.

    ``wall[stage]``: seconds spent in the stage; ``cpu[stage]``: the CPU seconds of the Python
    threads that ran it (read, hash, file hash, write; the upcast and quantize stages run on
    numba's threads, whose CPU the calling thread cannot see, so theirs is left out). Waits are
    stages too: ``wait_read`` and ``wait_write`` (the calling thread), ``write_idle`` (a writer
    with nothing to write), ``file_hash_idle`` and ``wait_file_hash`` (a writer held back by its
    file's hash; counted inside ``write`` as well).
    """

    def __init__(self, trace: bool = False) -> None:
        self.busy: dict[str, float] = {}
        self.cpu: dict[str, float] = {}
        self.wall = 0.0
        self.threads = 0
        self._lock = threading.Lock()
        # with trace: (thread name, stage, start s, end s) of every timed interval, from origin
        self.events: list[tuple[str, str, float, float]] | None = [] if trace else None
        self.origin = time.perf_counter()

    def add(self, stage: str, seconds: float, cpu: float | None, end: float | None = None) -> None:
        with self._lock:
            self.busy[stage] = self.busy.get(stage, 0.0) + seconds
            if cpu is not None:
                self.cpu[stage] = self.cpu.get(stage, 0.0) + cpu
            if self.events is not None and end is not None:
                t1 = end - self.origin
                self.events.append((threading.current_thread().name, stage, round(t1 - seconds, 6), round(t1, 6)))

    def to_dict(self) -> dict[str, Any]:
        return {"wall_s": round(self.wall, 3), "threads": self.threads,
                "busy_s": {k: round(v, 3) for k, v in self.busy.items()},
                "cpu_s": {k: round(v, 3) for k, v in self.cpu.items()}}


class _StatsSlot:
    def __init__(self) -> None:
        self.value: StageStats | None = None

    def get(self) -> StageStats | None:
        return self.value


_STATS = _StatsSlot()


@contextlib.contextmanager
def collect_stage_stats(trace: bool = False) -> Iterator[StageStats]:
    """Record the stage timings of the conversions run inside the block (one at a time); with
    ``trace``, every timed interval too, per thread (``StageStats.events``)."""
    stats, previous = StageStats(trace), _STATS.value
    _STATS.value = stats
    try:
        yield stats
    finally:
        _STATS.value = previous


@contextlib.contextmanager
def _timed(stats: StageStats | None, stage: str, cpu: bool = False) -> Iterator[None]:
    if stats is None:
        yield
        return
    w0 = time.perf_counter()
    c0 = time.thread_time() if cpu else 0.0
    try:
        yield
    finally:
        w1 = time.perf_counter()
        stats.add(stage, w1 - w0, time.thread_time() - c0 if cpu else None, w1)


# ---------------------------------------------------------------------------------------------
# Buffers and threads.


class _Buffers:
    """Reusable byte buffers of one capacity: steady-state conversion allocates (and page-faults)
    nothing. The free list never holds more buffers than were in use at once."""

    def __init__(self, capacity: int) -> None:
        self.capacity = max(1, capacity)
        self._free: list[np.ndarray] = []
        self._lock = threading.Lock()

    def get(self) -> np.ndarray:
        with self._lock:
            if self._free:
                return self._free.pop()
        return np.empty(self.capacity, np.uint8)

    def put(self, buf: np.ndarray) -> None:
        with self._lock:
            self._free.append(buf)


class _Shared:
    """One encoded tensor in a pooled buffer, returned to the pool when every user released it
    (each writer whose file holds this type, and the tensor's hash)."""

    def __init__(self, pool: _Buffers, users: int, rows: int, row_bytes: int, phase: int = 0) -> None:
        """``phase``: the array starts at an address with this remainder modulo IO_ALIGN (the
        pool's buffers have IO_ALIGN bytes to spare), so direct writes to a file offset with the
        same remainder need no bounce copy."""
        self._pool, self._users = pool, users
        self._buf = pool.get()
        self.array = direct_io.placed(self._buf, phase, rows * row_bytes).reshape(rows, row_bytes)
        self._lock = threading.Lock()

    def release(self) -> None:
        with self._lock:
            self._users -= 1
            last = self._users == 0
        if last:
            self._pool.put(self._buf)

    def discard(self) -> None:
        with self._lock:
            self._users = 0
        self._pool.put(self._buf)


class _RawTensor:
    """Rows ``[r0, r1)`` of a tensor of ``rows`` rows, its raw source bytes (``dtype``,
    little-endian) in a pooled buffer; ``r0 == 0`` and ``r1 == rows`` when read whole."""

    def __init__(self, buf: np.ndarray, data: np.ndarray, dtype: str, r0: int = 0, r1: int = 1,
                 rows: int = 1) -> None:
        self.buf, self.data, self.dtype = buf, data, dtype
        self.r0, self.r1, self.rows = r0, r1, rows

    @property
    def first(self) -> bool:
        return self.r0 == 0

    @property
    def last(self) -> bool:
        return self.r1 >= self.rows

    @property
    def whole(self) -> bool:
        return self.first and self.last


def _row_ranges(info: Any, piece_bytes: int | None) -> tuple[int, list[tuple[int, int]]]:
    """A tensor's row count and the row ranges it is read in: whole, unless ``piece_bytes`` is
    given and the tensor is larger (then ranges of equal whole rows, each about that size)."""
    n = int(info.shape[-1]) if info.shape else 1
    row_bytes = max(1, DTYPE_SIZES[info.dtype] * n)
    rows = int(info.nbytes) // row_bytes
    if piece_bytes is None or int(info.nbytes) <= piece_bytes or rows < 2:
        return rows, [(0, rows)]
    k = min(rows, -(-int(info.nbytes) // piece_bytes))
    step = -(-rows // k)
    return rows, [(r0, min(rows, r0 + step)) for r0 in range(0, rows, step)]


class _Reader:
    """Reads the raw bytes of the next tensors (or row ranges of a large tensor, see _PIECE_BYTES)
    on ``workers`` threads, ``workers + 1`` ahead of the consumer, in order, into reusable buffers
    (``release`` gives one back).

    Only I/O happens here: numba's parallel kernels (upcast, quantizers, the LoRA product) run in
    the calling thread alone, since two threads launching parallel regions at once abort the
    process under numba's workqueue threading layer, and ``set_num_threads`` is per thread.
    ``whole``: every tensor in one piece (a tensor transform needs the whole tensor; a streamed
    source serves whole tensors only).
    """

    def __init__(self, source: Source, names: Sequence[str], workers: int, stats: StageStats | None,
                 whole: bool = False) -> None:
        self._source, self._stats = source, stats
        piece = None if whole or not getattr(source, "partial_reads", False) else _PIECE_BYTES
        self._items: list[tuple[str, int, int, int]] = []
        largest = 0
        for name in names:
            info = source.tensors[name]
            rows, ranges = _row_ranges(info, piece)
            row_bytes = int(info.nbytes) // max(1, rows)
            for r0, r1 in ranges:
                self._items.append((name, r0, r1, rows))
                largest = max(largest, (r1 - r0) * row_bytes if len(ranges) > 1 else int(info.nbytes))
        # IO_ALIGN spare bytes, so that each piece can start at its file offset's phase (direct
        # reads then land in place, without a bounce copy).
        self._pool = _Buffers(largest + IO_ALIGN)
        self._ahead = workers + 1
        self._stop = threading.Event()
        self._executor = concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="flux-gguf-reader")
        self._pending: deque[tuple[str, concurrent.futures.Future[_RawTensor]]] = deque()
        self._next = 0
        self._closed = False

    def _read(self, name: str, r0: int, r1: int, rows: int) -> _RawTensor:
        if self._stop.is_set():
            raise _TensorError(name, KeyboardInterrupt())
        buf = self._pool.get()
        info = self._source.tensors[name]
        row_bytes = int(info.nbytes) // max(1, rows)
        whole = r0 == 0 and r1 >= rows
        nbytes = int(info.nbytes) if whole else (r1 - r0) * row_bytes
        first = 0 if whole else r0 * (row_bytes // DTYPE_SIZES[info.dtype])
        # At its file phase only where the tensor's elements stay aligned to their width (the kernels
        # take BF16/F16 codes as uint16); otherwise a direct read goes through the bounce buffer.
        phase = self._source.raw_phase(name, first)
        data = direct_io.placed(buf, phase, nbytes) if phase % DTYPE_SIZES[info.dtype] == 0 else buf[:nbytes]
        try:
            with _timed(self._stats, "read", cpu=True):
                if whole:
                    self._source.read_raw_into(name, data)
                else:
                    self._source.read_raw_range_into(name, first, data)
        except BaseException:
            self._pool.put(buf)
            raise
        return _RawTensor(buf, data, info.dtype, r0, r1, rows)

    def _fill(self) -> None:
        while len(self._pending) < self._ahead and self._next < len(self._items):
            item = self._items[self._next]
            self._next += 1
            self._pending.append((item[0], self._executor.submit(self._read, *item)))

    def __iter__(self) -> Iterator[tuple[str, _RawTensor]]:
        while True:
            self._fill()
            if not self._pending:
                return
            name, future = self._pending.popleft()
            try:
                with _timed(self._stats, "wait_read"):
                    raw = future.result()
            except _TensorError:
                raise
            except BaseException as e:  # noqa: BLE001 - named after its tensor
                raise _TensorError(name, e) from None
            self._fill()
            yield name, raw

    def release(self, raw: _RawTensor) -> None:
        self._pool.put(raw.buf)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._stop.set()
        self._executor.shutdown(wait=True, cancel_futures=True)
        self._pending.clear()


class _FileHasher:
    """A file's sha256, computed on its own thread in the order the bytes were written.

    ``update`` queues a buffer (the caller keeps it alive until a later ``call`` runs) and waits
    only while more than ``budget`` bytes are queued (a buffer larger than that is still taken
    when nothing else is): the hash of a whole file is one sequential stream, the slowest stage
    for a fast type on many cores, so the writer is allowed to run ahead of it by a byte budget,
    not by a count of buffers, and it always has its next buffer in hand. ``call`` queues a
    function to run once everything queued before it is hashed; ``hexdigest`` waits."""

    def __init__(self, label: str, stats: StageStats | None, budget: int | None = None) -> None:
        self._hash = hashlib.sha256()
        self._stats = stats
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()  # bounded by the byte budget
        self._room = threading.Condition()
        self._queued = 0
        self._budget = _FILE_HASH_BUDGET if budget is None else budget
        self._digest: str | None = None
        self._closed = False
        self._thread = threading.Thread(target=self._run, name=f"flux-gguf-filehash-{label}", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            with _timed(self._stats, "file_hash_idle"):
                kind, item = self._queue.get()
            if kind == "data":
                with _timed(self._stats, "file_hash", cpu=True):
                    self._hash.update(item)
                self._done_with(len(item))
            elif kind == "call":
                item()
            else:
                return

    def _done_with(self, nbytes: int) -> None:
        with self._room:
            self._queued -= nbytes
            self._room.notify_all()

    def update(self, data: bytes | memoryview) -> None:
        n = len(data)
        if n < 1 << 16:  # headers and padding: small, copied now
            data = bytes(data)
        with self._room:
            if self._queued and self._queued + n > self._budget:
                with _timed(self._stats, "wait_file_hash"):
                    while not self._closed and self._queued and self._queued + n > self._budget:
                        self._room.wait()
            self._queued += n
        self._queue.put(("data", data))

    def call(self, fn: Callable[[], None]) -> None:
        self._queue.put(("call", fn))

    def hexdigest(self) -> str:
        if self._digest is None:
            self._queue.put(("stop", None))
            self._thread.join()
            self._closed = True
            self._digest = self._hash.hexdigest()
        return self._digest

    def close(self) -> None:
        if self._closed:
            return
        with self._room:
            self._closed = True  # a writer waiting for room goes on (its bytes are discarded)
            self._room.notify_all()
        while True:  # drop what is queued (the conversion failed), then stop the thread
            try:
                kind, item = self._queue.get_nowait()
            except queue.Empty:
                break
            if kind == "call":
                item()
        self._queue.put(("stop", None))
        self._thread.join()


class _FileSink:
    """Stores one output file's tensors: the calling thread reserves each tensor in plan order
    (which feeds the whole-file sha256 on its hash thread and records the tensor), and
    ``workers`` threads write the bytes at their offsets, in parallel: one thread's writes into
    the page cache (about 1.5-2.5 GB/s into tmpfs) would otherwise pace a fast type. A file whose
    tensors arrive in any order (a streamed source) is written by one thread, as they come.
    At most ``_QUEUE_DEPTH + workers`` tensors wait for or are in a write."""

    def __init__(self, writer: GGUFStreamWriter, file_hash: _FileHasher, stats: StageStats | None,
                 workers: int = 2) -> None:
        self.writer = writer
        self._file_hash = file_hash
        self._stats = stats
        self._ordered = not writer._any_order
        workers = workers if self._ordered else 1
        self._pool = concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix=f"flux-gguf-writer-{writer.variant}")
        self._room = threading.Semaphore(_QUEUE_DEPTH + workers)
        self._error: BaseException | None = None
        self._cancelled = threading.Event()

    @property
    def users(self) -> int:
        """How many releases of an encoded tensor this file makes (its hash, its write)."""
        return 2 if self._ordered else 1

    def _store(self, write: Callable[[], object], shared: _Shared) -> None:
        """On a writer thread: ``write()`` (unless an earlier write failed or the file was
        cancelled), then give back the buffer and the queue slot."""
        try:
            if self._error is None and not self._cancelled.is_set():
                with _timed(self._stats, "write", cpu=True):
                    write()
        except BaseException as e:  # noqa: BLE001 - re-raised in the producer thread
            self._error = e
        finally:
            shared.release()
            self._room.release()

    def put(self, name: str, shared: _Shared, digest: concurrent.futures.Future[str]) -> None:
        """Hand over one encoded tensor (``users`` releases of ``shared`` follow, even on error)."""
        if self._error is not None:
            for _ in range(self.users):
                shared.release()
            raise self._error
        with _timed(self._stats, "wait_write"):
            self._room.acquire()
        if not self._ordered:
            self._pool.submit(self._store, lambda: self.writer.write_tensor(name, shared.array, sha256=digest.result),
                              shared)
            return
        try:
            # The tensor's digest is still being computed on a hashing thread: the record takes
            # it when the file is committed.
            offset = self.writer.reserve(name, shared.array, sha256=digest.result)
        except BaseException:
            self._room.release()
            for _ in range(self.users):
                shared.release()
            raise
        self._file_hash.call(shared.release)  # once the file hash has read the bytes
        self._pool.submit(self._store, lambda: self.writer.write_at(offset, shared.array), shared)

    def drain(self) -> None:
        """Wait until every tensor is written; re-raise the first write error if any."""
        self._pool.shutdown(wait=True)
        if self._error is not None:
            raise self._error

    def cancel(self) -> None:
        self._cancelled.set()
        self._pool.shutdown(wait=True, cancel_futures=True)
