"""read -> plan -> quantize -> write, for several variants in one pass over the source.

Each source tensor is read once, upcast to float32, optionally transformed (the LoRA merge hook),
encoded once per distinct output type (variants that agree on a tensor share the bytes) and
appended to every output file. Memory stays bounded by a few tensors at a time: a reader thread
prefetches the next tensor while the numba kernels (which release the GIL) encode the current
one, and one writer thread per output file writes and hashes while the next tensor is encoded.
"""
from __future__ import annotations

import contextlib
import os
import pathlib
import queue
import threading
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import numpy as np

import quant_kernels
from quant_kernels.errors import QuantError

from .detect import detect_model
from .errors import FluxGGUFError, OutputError, PlanError
from .recipes import (
    Override,
    Plan,
    SourceRef,
    Variant,
    make_plans,
    parse_override,
    resolve_variant,
)
from .sources import Source, open_source
from .writer import ArtifactRecord, GGUFStreamWriter

ProgressFn = Callable[[int, int], None]
TensorTransform = Callable[[str, np.ndarray], np.ndarray]

_QUEUE_DEPTH = 2  # encoded tensors waiting per writer thread


def default_name(path: str | os.PathLike[str]) -> str:
    """Output name stem from the source: the file stem, or the folder name (its parent's for a
    diffusers ``transformer/`` folder)."""
    p = pathlib.Path(path)
    if p.is_dir():
        p = p.resolve()
        return p.parent.name if p.name == "transformer" and p.parent.name else p.name
    return p.name.removesuffix(".safetensors") or p.stem


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
) -> list[Plan]:
    """Detect the model and plan every variant for it; reads headers only (``--dry-run``)."""
    info = detect_model(source)
    return make_plans(
        variants,
        source.tensors,
        name=name or default_name(source.path),
        family=info.family,
        overrides=tuple(overrides),
        sources=source_refs(source, source_sha256),
        extra_metadata=extra_metadata,
    )


def convert(
    src: str | os.PathLike[str],
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
    before_quantize: Callable[[Sequence[str]], None] | None = None,
) -> list[ArtifactRecord]:
    """Convert ``src`` into one GGUF file per variant (``NAME-VARIANT.gguf`` in ``out_dir``).

    ``progress(done, total)`` is called with source bytes processed so far;
    ``tensor_transform(name, x)`` gets each tensor as float32 after reading and returns the
    float32 array to quantize (same shape); ``extra_metadata`` adds ``flux_gguf.*`` string KV
    entries (e.g. the LoRAs merged by the transform). ``before_quantize(types)`` is called once with
    the storage types the plans use, after every check passed and before the first tensor is read
    (the CLI compiles missing numba kernels there, visibly). Returns one record per file, in variant order.
    """
    resolved = [resolve_variant(v) for v in variants]  # fail on a bad variant before reading
    parsed = [parse_override(o) for o in overrides]
    with kernel_threads(threads), open_source(src) as source:
        plans = plan_source(source, resolved, name=name, overrides=parsed, source_sha256=source_sha256,
                            extra_metadata=extra_metadata)
        out = _prepare_out_dir(pathlib.Path(out_dir), plans)
        if before_quantize is not None:
            before_quantize(sorted({e.qtype for p in plans for e in p.entries}))
        return _convert_planned(source, plans, out, progress, tensor_transform)


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
) -> list[ArtifactRecord]:
    order = [e.name for e in plans[0].entries]
    by_name = [{e.name: e for e in p.entries} for p in plans]
    total = sum(int(source.tensors[n].nbytes) for n in order)
    writers: list[GGUFStreamWriter] = []
    sinks: list[_WriterThread] = []
    reader: _Prefetcher | None = None
    records: list[ArtifactRecord] = []
    current = None
    try:
        for p in plans:
            writers.append(GGUFStreamWriter(out / p.file_name, p.kv, p.slots, variant=p.variant.name,
                                            file_type=p.file_type))
        sinks = [_WriterThread(w) for w in writers]
        reader = _Prefetcher(source, order)
        done = 0
        if progress is not None:
            progress(0, total)
        for tname, x in reader:
            current = tname
            if transform is not None:
                x = _apply_transform(transform, tname, x)
            entries = [b[tname] for b in by_name]
            if tuple(x.shape) != entries[0].shape:
                raise FluxGGUFError(f"got shape {tuple(x.shape)}, expected {entries[0].shape}")
            encoded = {qt: _encode(x, qt) for qt in dict.fromkeys(e.qtype for e in entries)}
            del x
            for sink, e in zip(sinks, entries):
                sink.put(tname, encoded[e.qtype])
            del encoded
            done += int(source.tensors[tname].nbytes)
            current = None
            if progress is not None:
                progress(done, total)
        for s in sinks:  # every file fully written before any is renamed into place
            s.drain()
        for w in writers:  # every file flushed and on disk before the first rename
            w.sync()
        for w in writers:
            records.append(w.commit())
        return records
    except BaseException as e:
        for s in sinks:
            s.cancel()
        if reader is not None:
            reader.close()
        for w in writers:
            w.abort()
        pending = plans[len(records):]  # files renamed into place before the failure stay: they are complete
        if isinstance(e, OutputError) and not records:
            raise  # a writer's own error already names its file and why
        cause = e.cause if isinstance(e, _TensorError) else e
        raise _not_written(pending, out, e, current, written=[r.path for r in records]) from cause
    finally:
        if reader is not None:
            reader.close()


def _encode(x: np.ndarray, qtype: str) -> np.ndarray:
    """One tensor's bytes in ``qtype``; 1-D tensors are a single row."""
    rows = x.reshape(-1, x.shape[-1]) if x.ndim > 1 else x.reshape(1, -1)
    return quant_kernels.quantize(rows, qtype)


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


_DONE = object()


class _Prefetcher:
    """Reads tensors in a background thread, one ahead of the consumer.

    Only I/O and upcasting happen here: numba's parallel kernels (quantizers, the LoRA product)
    run in the calling thread alone, since two threads launching parallel regions at once abort
    the process under numba's workqueue threading layer, and ``set_num_threads`` is per thread.
    """

    def __init__(self, source: Source, names: Sequence[str]) -> None:
        self._source, self._names = source, names
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=1)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="flux-gguf-reader", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        name = ""
        try:
            for name in self._names:
                if self._stop.is_set():
                    return
                x = self._source.read(name)
                if not self._put((name, x)):
                    return
        except BaseException as e:  # noqa: BLE001 - handed to the consumer thread
            self._put(_TensorError(name, e))
            return
        self._put(_DONE)

    def _put(self, item: Any) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def __iter__(self) -> Iterator[tuple[str, np.ndarray]]:
        while True:
            item = self._queue.get()
            if item is _DONE:
                return
            if isinstance(item, _TensorError):
                raise item
            yield item

    def close(self) -> None:
        self._stop.set()
        while True:  # unblock a put in progress
            try:
                self._queue.get_nowait()
            except queue.Empty:
                break
        self._thread.join()


class _WriterThread:
    """Feeds one GGUFStreamWriter from a bounded queue so writing/hashing overlaps encoding."""

    def __init__(self, writer: GGUFStreamWriter) -> None:
        self.writer = writer
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=_QUEUE_DEPTH)
        self._error: BaseException | None = None
        self._cancelled = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"flux-gguf-writer-{writer.variant}", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            if self._error is not None or self._cancelled.is_set():
                continue  # keep draining so the producer never blocks
            try:
                self.writer.write_tensor(*item)
            except BaseException as e:  # noqa: BLE001 - re-raised in the producer thread
                self._error = e

    def put(self, name: str, data: np.ndarray) -> None:
        if self._error is not None:
            raise self._error
        self._queue.put((name, data))

    def drain(self) -> None:
        """Wait until every queued tensor is written; re-raise the writer's error if any."""
        self._queue.put(None)
        self._thread.join()
        if self._error is not None:
            raise self._error

    def cancel(self) -> None:
        self._cancelled.set()
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()
