"""manifests.hashing: chunked digests agree with hashlib at every chunk size; writes are atomic."""
from __future__ import annotations

import errno
import hashlib
import io
import os
import sys
import threading

import numpy as np
import pytest

from manifests.hashing import (
    BackgroundHasher,
    FileDigest,
    HashingWriter,
    copy_file_hashed,
    hash_bytes,
    hash_file,
    hash_range,
    hash_stream,
    pwrite_all,
    read_regular,
    write_all,
    write_bytes_atomic,
)

CHUNK_SIZES = [1, 7, 64, 4096, 65536, 1 << 20, 8 << 20]
LENGTHS = [0, 1, 63, 64, 65, 4096, 100_003, 3 * (1 << 20) + 17]


def _data(n: int, seed: int = 0) -> bytes:
    return np.random.default_rng(seed).integers(0, 256, size=n, dtype=np.uint8).tobytes()


# Byte-at-a-time over megabytes would only prove the same thing slower.
CASES = [(n, c) for n in LENGTHS for c in CHUNK_SIZES if not (c == 1 and n > 100_003)]


@pytest.mark.parametrize(("length", "chunk_size"), CASES)
def test_hash_file_matches_hashlib_at_every_chunk_size(tmp_path, length, chunk_size):
    data = _data(length, seed=length)
    path = tmp_path / "f.bin"
    path.write_bytes(data)
    assert hash_file(path, chunk_size=chunk_size) == FileDigest(length, hashlib.sha256(data).hexdigest())


def test_hash_stream_reports_progress_per_chunk():
    data = _data(10_000)
    seen: list[int] = []
    digest = hash_stream(io.BytesIO(data), chunk_size=3000, on_bytes=seen.append)
    assert seen == [3000, 3000, 3000, 1000]
    assert digest == hash_bytes(data)


def test_chunk_size_must_be_positive(tmp_path):
    (tmp_path / "f").write_bytes(b"x")
    with pytest.raises(ValueError, match="chunk_size must be a positive number of bytes, got 0"):
        hash_file(tmp_path / "f", chunk_size=0)


@pytest.mark.parametrize("chunk_size", [1, 5, 1024, 8 << 20])
def test_hash_range_hashes_exactly_the_range(chunk_size):
    data = _data(5000, seed=3)
    f = io.BytesIO(data)
    for offset, length in [(0, 0), (0, 5000), (17, 1000), (4999, 1), (1234, 2345)]:
        assert hash_range(f, offset, length, chunk_size=chunk_size) == hashlib.sha256(data[offset:offset + length]).hexdigest()


def test_hash_range_past_the_end_is_none():
    f = io.BytesIO(_data(100))
    assert hash_range(f, 90, 11) is None
    assert hash_range(f, 200, 1) is None


def test_hashing_writer_hashes_what_it_writes():
    raw = io.BytesIO()
    w = HashingWriter(raw)
    parts = [b"abc", bytearray(b"defg"), memoryview(b"hij"), np.arange(10, dtype=np.float32)]
    for p in parts:
        w.write(p)
    assert raw.getvalue() == b"abcdefghij" + np.arange(10, dtype=np.float32).tobytes()
    assert w.digest() == hash_bytes(raw.getvalue())


class _ShortWriter(io.RawIOBase):
    """An unbuffered file that stores at most ``per_call`` bytes a call (what a raw FileIO may do)."""

    def __init__(self, per_call: int | None):
        self.data, self.per_call = bytearray(), per_call

    def writable(self) -> bool:
        return True

    def write(self, b) -> int | None:  # type: ignore[override]
        if self.per_call is None:
            return None  # a non-blocking file that would block
        n = min(len(b), self.per_call)
        self.data += bytes(b[:n])
        return n


def test_hashing_writer_and_write_all_complete_short_writes():
    data = _data(10_007)
    raw = _ShortWriter(per_call=3)
    w = HashingWriter(raw)
    w.write(data[:5000])
    w.write(np.frombuffer(data[5000:10_004], dtype=np.float32))
    assert write_all(raw, memoryview(data)[10_004:]) == 3
    assert bytes(raw.data) == data
    assert w.digest() == hash_bytes(data[:10_004])


@pytest.mark.parametrize("per_call", [0, None])
def test_a_write_that_stores_nothing_raises_eio_naming_the_file(per_call):
    with pytest.raises(OSError) as e:
        write_all(_ShortWriter(per_call), b"abc", "out/x.bin")
    assert (e.value.errno, e.value.strerror, e.value.filename) == (errno.EIO, "the write stored nothing", "out/x.bin")


def test_pwrite_all_writes_the_rest_of_a_short_pwrite_and_reports_a_full_disk(tmp_path, monkeypatch):
    data, real, room = _data(70_001), os.pwrite, [50_000]

    def short(fd, buf, offset):  # at most 4093 bytes a call; ENOSPC once the room is used
        if room[0] == 0:
            raise OSError(errno.ENOSPC, "No space left on device")
        n = min(len(buf), 4093, room[0])
        room[0] -= n
        return real(fd, buf[:n], offset)
    monkeypatch.setattr(os, "pwrite", short)
    fd = os.open(tmp_path / "x.bin", os.O_WRONLY | os.O_CREAT)
    try:
        pwrite_all(fd, data[:30_000], 100)
        assert (tmp_path / "x.bin").read_bytes() == bytes(100) + data[:30_000]
        with pytest.raises(OSError) as e:
            pwrite_all(fd, data, 0)
        assert e.value.errno == errno.ENOSPC
    finally:
        os.close(fd)


def test_read_regular_reads_small_files_and_refuses_the_rest(tmp_path):
    (tmp_path / "key.pem").write_bytes(b"x" * 100)
    assert read_regular(tmp_path / "key.pem", 100) == b"x" * 100
    with open(tmp_path / "sparse", "wb") as f:
        f.truncate(2 << 30)  # never read: refused from its size
    with pytest.raises(OSError, match=r"^\[Errno 27\] 2,147,483,648 bytes, more than the 100 allowed"):
        read_regular(tmp_path / "sparse", 100)
    os.mkfifo(tmp_path / "fifo")
    for path in (tmp_path / "fifo", tmp_path, "/dev/zero"):  # refused at once, never waited on or read
        with pytest.raises(OSError, match="not a regular file"):
            read_regular(path, 100)


def test_write_bytes_atomic_leaves_no_partial(tmp_path):
    target = tmp_path / "README.md"
    digest = write_bytes_atomic(target, b"hello\n")
    assert target.read_bytes() == b"hello\n"
    assert digest == hash_bytes(b"hello\n")
    assert sorted(os.listdir(tmp_path)) == ["README.md"]


@pytest.mark.parametrize("chunk_size", [1, 1000, 8 << 20])
def test_copy_file_hashed_copies_and_hashes_in_one_pass(tmp_path, chunk_size):
    data = _data(12_345, seed=9)
    (tmp_path / "src").write_bytes(data)
    digest = copy_file_hashed(tmp_path / "src", tmp_path / "dst", chunk_size=chunk_size)
    assert (tmp_path / "dst").read_bytes() == data
    assert digest == FileDigest(len(data), hashlib.sha256(data).hexdigest())
    assert not (tmp_path / "dst.partial").exists()


def test_copy_file_hashed_failure_leaves_nothing_under_either_name(tmp_path):
    with pytest.raises(FileNotFoundError):
        copy_file_hashed(tmp_path / "absent", tmp_path / "dst")
    assert os.listdir(tmp_path) == []


def test_background_hasher_matches_hashlib(tmp_path):
    paths = []
    for i, n in enumerate([0, 1, 999_999, 2_500_000]):
        p = tmp_path / f"shard-{i}.safetensors"
        p.write_bytes(_data(n, seed=i))
        paths.append(p)
    with BackgroundHasher(paths, chunk_size=1 << 16) as hasher:
        pass  # the conversion would run here
    result = hasher.result()
    assert list(result) == paths
    for p in paths:
        assert result[p] == FileDigest(p.stat().st_size, hashlib.sha256(p.read_bytes()).hexdigest())


def test_background_hasher_reraises_in_caller(tmp_path):
    hasher = BackgroundHasher([tmp_path / "missing.safetensors"]).start()
    with pytest.raises(FileNotFoundError):
        hasher.result()


def test_background_hasher_is_cancelled_when_the_body_fails(tmp_path):
    p = tmp_path / "big"
    p.write_bytes(_data(4 << 20))
    with pytest.raises(RuntimeError, match="conversion failed"):
        with BackgroundHasher([p], chunk_size=1) as hasher:
            raise RuntimeError("conversion failed")
    assert not hasher._thread.is_alive()
    with pytest.raises(InterruptedError, match="hashing was cancelled"):
        hasher.result()


def test_hash_stream_stop_event():
    stop = threading.Event()
    stop.set()
    with pytest.raises(InterruptedError):
        hash_stream(io.BytesIO(b"abc"), stop=stop)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="per-thread nice values are a Linux feature")
def test_background_hasher_runs_niced_without_touching_the_caller(tmp_path):
    p = tmp_path / "f"
    p.write_bytes(b"x" * 1000)
    seen = []

    class Probe(BackgroundHasher):
        def _run(self):
            super()._run()
            seen.append(os.getpriority(os.PRIO_PROCESS, threading.get_native_id()))

    before = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    assert Probe([p]).result()[p].size == 1000
    assert seen == [19]
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == before
    seen.clear()
    Probe([p], low_priority=False).result()
    assert seen == [before]
