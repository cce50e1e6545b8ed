"""The parallel pipeline: same bytes at any thread count and chunk size, exact parallel upcasts,
bounded buffers, and a source truncated mid-conversion reported in one line (pread, not mmap)."""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys

import numba
import numpy as np
import pytest

import quant_kernels
from converter import pipeline
from converter.errors import OutputError, SourceError
from converter.layout import FluxGeometry
from converter.pipeline import collect_stage_stats, convert
from converter.safetensors_io import SafetensorsFile, upcast_into, upcast_rows
from converter.synthetic import write_synthetic_flux
from converter.writer import GGUFStreamWriter

GEO = FluxGeometry(double_blocks=1, single_blocks=2, hidden=256)
VARIANTS = ["Q4_K_M", "Q8_0", "Q3_K_S"]


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    return write_synthetic_flux(tmp_path_factory.mktemp("par") / "par.safetensors", GEO, seed=5)


def digests(records):
    return [(r.path.name, r.sha256, [(t.name, t.sha256) for t in r.tensors]) for r in records]


def _codes(dtype: str, rng: np.random.Generator) -> np.ndarray:
    """Every code of the dtype (and random F32 words, NaN payloads and infinities included), as bytes."""
    if dtype in ("BF16", "F16"):
        return np.arange(65536, dtype=np.uint32).astype("<u2").view(np.uint8)
    if dtype in ("F8_E4M3", "F8_E5M2"):
        return np.tile(np.arange(256, dtype=np.uint8), 256)  # 64K codes
    words = rng.integers(0, 2**32, 65536, dtype=np.uint64).astype("<u4")
    words[:4] = [0x7F800001, 0xFFC12345, 0x7F800000, 0x80000000]
    return words.view(np.uint8)


@pytest.mark.parametrize("dtype", ["BF16", "F16", "F8_E4M3", "F8_E5M2", "F32"])
@pytest.mark.parametrize("threads", [1, numba.config.NUMBA_NUM_THREADS])
def test_parallel_upcast_equals_the_exact_upcast_bit_for_bit(dtype, threads):
    raw = _codes(dtype, np.random.default_rng(0))
    width = {"BF16": 2, "F16": 2, "F32": 4}.get(dtype, 1)
    count = raw.size // width
    expect = np.empty(count, np.float32)
    upcast_into(raw, dtype, expect)
    # half the codes: under the size below which the upcast is serial; twice: parallel
    for part, want in ((raw[:raw.size // 2], expect[:count // 2]), (np.tile(raw, 2), np.tile(expect, 2))):
        got = np.full((want.size // 64, 64), -1.0, np.float32)
        with pipeline.kernel_threads(threads):
            upcast_rows(part, dtype, got)
        np.testing.assert_array_equal(got.reshape(-1).view(np.uint32), want.view(np.uint32))


def test_output_is_independent_of_threads_and_chunking(src, tmp_path, monkeypatch):
    many = numba.config.NUMBA_NUM_THREADS
    default = convert(src, tmp_path / "default", VARIANTS, threads=many)
    one = convert(src, tmp_path / "one", VARIANTS, threads=1)
    whole = convert(src, tmp_path / "whole", VARIANTS, threads=many, tensor_transform=lambda n, x: x)
    monkeypatch.setattr(pipeline, "_CHUNK_PER_THREAD", 64)  # one row per chunk: hundreds of chunks
    tiny = convert(src, tmp_path / "tiny", VARIANTS, threads=1)
    assert digests(one) == digests(default) == digests(whole) == digests(tiny)
    for recs in (default, one, whole, tiny):
        for r in recs:  # the digests computed on other threads are those of the bytes on disk
            raw = r.path.read_bytes()
            assert hashlib.sha256(raw).hexdigest() == r.sha256
            assert all(hashlib.sha256(raw[t.offset:t.offset + t.nbytes]).hexdigest() == t.sha256 for t in r.tensors)


def test_chunked_and_whole_tensor_encoding_match_quant_kernels(src, tmp_path, monkeypatch):
    """Chunks of rows encode to exactly quant_kernels.quantize of the whole upcast tensor."""
    monkeypatch.setattr(pipeline, "_CHUNK_PER_THREAD", 300)  # chunks that are not a power of two of rows
    [rec] = convert(src, tmp_path, ["Q4_K_M"], threads=1)
    name = "double_blocks.0.img_mlp.0.weight"
    f = SafetensorsFile(src)
    try:
        x = f.read(name)
    finally:
        f.close()
    t = next(t for t in rec.tensors if t.name == name)
    assert rec.path.read_bytes()[t.offset:t.offset + t.nbytes] == quant_kernels.quantize(x, t.type).tobytes()


def test_a_source_truncated_mid_conversion_is_one_line_and_leaves_nothing(src, tmp_path):
    victim = tmp_path / "victim.safetensors"
    victim.write_bytes(src.read_bytes())
    out = tmp_path / "out"
    cut = []

    def truncate_once(name, x):
        if not cut:  # the first tensor is in hand; everything after it is gone
            with open(victim, "r+b") as fh:
                fh.truncate(4096)
            cut.append(name)
        return x

    with pytest.raises(OutputError) as info:
        convert(victim, out, ["Q8_0", "Q4_K_M"], tensor_transform=truncate_once)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"{out / 'victim-Q8_0.gguf'}, {out / 'victim-Q4_K_M.gguf'} were not written: tensor ")
    assert f"{victim}: truncated while reading tensor " in message
    assert "but the file now has 4096" in message
    assert isinstance(info.value.__cause__, SourceError)
    assert list(out.iterdir()) == []


def test_a_file_truncated_after_opening_raises_source_error(src, tmp_path):
    victim = tmp_path / "v.safetensors"
    victim.write_bytes(src.read_bytes())
    f = SafetensorsFile(victim)
    try:
        last = max(f.tensors.values(), key=lambda t: t.end)
        f.read(last.name)  # fine while whole
        os.truncate(victim, last.end - 1)
        with pytest.raises(SourceError, match=rf"^{victim}: truncated while reading tensor {last.name}: it needs "
                                              rf"bytes up to {last.end} but the file now has {last.end - 1}"):
            f.read(last.name)
    finally:
        f.close()
    with pytest.raises(SourceError, match="read after close"):
        f.read(last.name)


def test_buffers_in_flight_stay_bounded_when_writing_is_slow(tmp_path, monkeypatch):
    """However many tensors, the pools hold at most the buffers the queues allow (module docstring).

    The whole-file hash may fall behind by a byte budget (128 MB), which holds every tensor of a
    model this small; with a budget of one byte it holds one tensor at a time, and the bound
    counts buffers (otherwise it would depend on how the hash thread is scheduled)."""
    src = write_synthetic_flux(tmp_path / "many.safetensors", FluxGeometry(double_blocks=2, single_blocks=4, hidden=128),
                               seed=3)
    made = []
    real_get = pipeline._Buffers.get

    def counting_get(self):
        with self._lock:
            fresh = not self._free
        if fresh:
            made.append(self.capacity)
        return real_get(self)

    real_write, real_write_at = GGUFStreamWriter.write_tensor, GGUFStreamWriter.write_at

    def slow_write(self, *a, **k):
        import time
        time.sleep(0.002)
        return real_write(self, *a, **k)

    def slow_write_at(self, *a, **k):  # the parallel writers' path
        import time
        time.sleep(0.002)
        return real_write_at(self, *a, **k)

    monkeypatch.setattr(pipeline, "_FILE_HASH_BUDGET", 1)
    monkeypatch.setattr(pipeline._Buffers, "get", counting_get)
    monkeypatch.setattr(GGUFStreamWriter, "write_tensor", slow_write)
    monkeypatch.setattr(GGUFStreamWriter, "write_at", slow_write_at)
    with collect_stage_stats() as stats:
        records = convert(src, tmp_path / "out", ["Q8_0", "Q4_K_M"], threads=1)
    tensors = len(records[0].tensors)
    workers = 1  # reader threads at 1 kernel thread
    q = 2  # distinct types per tensor at most
    bound = (workers + 2) + (pipeline._QUEUE_DEPTH + 5) * q
    assert tensors > 3 * bound  # the bound is not just the tensor count
    assert 0 < len(made) <= bound, (len(made), bound)
    assert stats.wall > 0 and {"read", "quantize", "hash", "write", "file_hash"} <= set(stats.busy)


def test_plain_conversion_under_the_workqueue_threading_layer(src, tmp_path):
    """Upcasts and quantizers run on numba's threads but launch from the calling thread only."""
    env = dict(os.environ, NUMBA_THREADING_LAYER="workqueue")
    cmd = [sys.executable, "-c", "from converter.cli import main; main()", "convert", str(src),
           "-o", str(tmp_path / "out"), "--variant", "Q8_0", "--variant", "Q4_K_M",
           "--threads", str(numba.config.NUMBA_NUM_THREADS)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["par-Q4_K_M.gguf", "par-Q8_0.gguf"]


def test_file_hasher_byte_budget_keeps_order_and_never_deadlocks():
    """The whole-file hash thread takes buffers up to a byte budget (one larger buffer is still
    taken when nothing is queued): the digest is that of the bytes in order, and close() lets a
    producer waiting for room go on."""
    import hashlib
    import threading

    from converter.pipeline import _FileHasher

    rng = np.random.default_rng(5)
    bufs = [rng.integers(0, 256, n, dtype=np.uint8) for n in (3 << 19, 10, 1 << 20, 5 << 19, 0, 7)]
    h = _FileHasher("budget", None, budget=1 << 20)
    for b in bufs:
        h.update(memoryview(b))
    assert h.hexdigest() == hashlib.sha256(b"".join(b.tobytes() for b in bufs)).hexdigest()

    stuck = _FileHasher("closing", None, budget=1 << 10)
    gate = threading.Event()
    stuck.call(gate.wait)  # the hash thread blocks here, so the budget fills up
    big = rng.integers(0, 256, 1 << 16, dtype=np.uint8)
    producer = threading.Thread(target=lambda: [stuck.update(memoryview(big)) for _ in range(4)])
    producer.start()
    producer.join(0.5)
    assert producer.is_alive()  # waiting for room
    closer = threading.Thread(target=stuck.close)
    closer.start()
    producer.join(10)
    gate.set()
    closer.join(10)
    assert not producer.is_alive() and not closer.is_alive()
