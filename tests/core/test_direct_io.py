"""Reads and writes that bypass the page cache (O_DIRECT): the same bytes as buffered I/O for every
offset, length and buffer address, one-line errors for a source cut short and a full disk, a
fallback where the file system refuses, and the pipeline's buffers placed so that direct
transfers need no copy."""
from __future__ import annotations

import errno
import hashlib
import os
import pathlib
import shutil
import tempfile

import numpy as np
import pytest

from converter import direct_io, pipeline
from converter import safetensors_io as sio
from converter import writer as writer_module
from converter.direct_io import IO_ALIGN
from converter.errors import OutputError, SettingError, SourceError
from converter.layout import FluxGeometry
from converter.pipeline import convert
from converter.recipes import layout_tensors, make_plan
from converter.safetensors_io import SafetensorsFile, encode_header
from converter.writer import GGUFStreamWriter
from converter.sources import open_source
from converter.synthetic import write_synthetic_flux

REPO = pathlib.Path(__file__).resolve().parents[2]


def _supports_direct(folder: pathlib.Path) -> bool:
    probe = folder / ".direct-probe"
    probe.write_bytes(b"\0" * IO_ALIGN)
    try:
        fd = os.open(probe, os.O_RDONLY | os.O_DIRECT)
    except OSError:
        return False
    finally:
        probe.unlink()
    os.close(fd)
    return True


@pytest.fixture
def disk_dir(tmp_path):
    """A folder on a file system that accepts O_DIRECT: tmp_path, or (where that is tmpfs) one
    beside the repository, which a clone keeps on a disk."""
    if _supports_direct(tmp_path):
        yield tmp_path
        return
    folder = pathlib.Path(tempfile.mkdtemp(prefix=".test-direct-", dir=REPO))
    try:
        assert _supports_direct(folder), f"neither {tmp_path} nor {folder} accepts O_DIRECT"
        yield folder
    finally:
        shutil.rmtree(folder)


# Element counts around the page size and the direct-read threshold, and one that spans several
# direct requests; dtypes of every width.
TENSORS = [
    ("tiny", "BF16", 3),
    ("page", "F32", IO_ALIGN // 4 + 1),
    ("just_below", "BF16", direct_io.DIRECT_MIN_BYTES // 2 - 1),
    ("at_threshold", "F8_E4M3", direct_io.DIRECT_MIN_BYTES),
    ("odd", "BF16", 1_500_001),
    ("big", "F32", (direct_io.CHUNK + 3 * IO_ALIGN) // 4 + 5),
]


def _write(path: pathlib.Path) -> dict[str, bytes]:
    rng = np.random.default_rng(7)
    width = {"BF16": 2, "F32": 4, "F8_E4M3": 1}
    data = {name: rng.integers(0, 256, n * width[dt], dtype=np.uint8).tobytes() for name, dt, n in TENSORS}
    with open(path, "wb") as f:
        f.write(encode_header([(name, dt, (n,)) for name, dt, n in TENSORS], {}))
        for name, _, _ in TENSORS:
            f.write(data[name])
    return data


def _read_everywhere(f: SafetensorsFile, data: dict[str, bytes]) -> None:
    """Every tensor from elements 0, 1 and 5, into buffers at the file's phase (in place) and off it
    by 2 and 64 bytes (bounced), compared with the bytes written."""
    width = {"BF16": 2, "F32": 4, "F8_E4M3": 1}
    for name, dt, n in TENSORS:
        for first in (0, 1, 5):
            if first >= n:
                continue
            want = data[name][first * width[dt]:]
            for shift in (0, 2, 64):
                buf = np.zeros(len(want) + 2 * IO_ALIGN, np.uint8)
                out = direct_io.placed(buf, f.raw_phase(name, first) + shift, len(want))
                at = direct_io.address(out) - direct_io.address(buf)
                f.read_raw_into(name, first, out)
                assert out.tobytes() == want, (name, first, shift)
                assert not buf[:at].any() and not buf[at + len(want):].any(), "wrote outside the buffer"


@pytest.fixture
def opened(disk_dir, monkeypatch):
    """opened(mode) -> (path, the bytes written, the file opened under FLUX_GGUF_DIRECT_IO=mode);
    every file is closed after the test."""
    files = []

    def open_(mode: str):
        path = disk_dir / "t.safetensors"
        data = _write(path)
        monkeypatch.setenv(direct_io.ENV, mode)
        files.append(SafetensorsFile(path))
        return path, data, files[-1]

    yield open_
    for f in files:
        f.close()


@pytest.mark.parametrize("mode", ["on", "off"])
def test_reads_give_the_file_bytes_at_every_offset_length_and_address(opened, mode):
    _, data, f = opened(mode)
    _read_everywhere(f, data)
    assert f.direct is (mode == "on")


def test_auto_reads_a_cached_file_through_the_cache(opened):
    path, data, f = opened("auto")  # just written: in the page cache
    fd = os.open(path, os.O_RDONLY)
    try:
        cached = direct_io.mostly_cached(fd, path.stat().st_size)
    finally:
        os.close(fd)
    _read_everywhere(f, data)
    assert f.direct is (cached is not True)  # where mincore cannot tell (None), auto reads direct


def test_an_unknown_io_mode_is_refused_in_one_line(opened):
    _, _, f = opened("sideways")
    with pytest.raises(SettingError, match=r"^FLUX_GGUF_DIRECT_IO='sideways': expected one of auto, on, off$"):
        f.read("tiny")


def test_a_file_cut_short_under_a_direct_read_is_one_line(opened):
    path, data, f = opened("on")
    t = f.tensors["odd"]
    f.read_raw_into("tiny", 0, np.empty(len(data["tiny"]), np.uint8))  # opens it, direct
    assert f.direct
    cut = t.begin + 3 * IO_ALIGN + 100
    os.truncate(path, cut)
    for shift in (0, 2):  # in place and bounced
        buf = np.zeros(t.nbytes + 2 * IO_ALIGN, np.uint8)
        with pytest.raises(SourceError, match=rf"^{path}: truncated while reading tensor odd: it needs bytes "
                                              rf"up to {t.end} but the file now has {cut} \(it had "):
            f.read_raw_into("odd", 0, direct_io.placed(buf, f.raw_phase("odd") + shift, t.nbytes))


def test_a_file_system_that_refuses_a_direct_read_gets_buffered_reads(opened, monkeypatch):
    _, data, f = opened("on")
    real = os.preadv
    refused = []

    def preadv(fd, buffers, offset, *flags):
        if fd == f._direct_fd:
            refused.append(offset)
            raise OSError(errno.EINVAL, "Invalid argument")
        return real(fd, buffers, offset, *flags)

    monkeypatch.setattr(sio.os, "preadv", preadv)
    f.read_raw_into("tiny", 0, np.empty(len(data["tiny"]), np.uint8))
    assert f.direct
    out = np.empty(len(data["big"]), np.uint8)
    f.read_raw_into("big", 0, out)
    assert out.tobytes() == data["big"]
    assert len(refused) == 1 and not f.direct
    _read_everywhere(f, data)
    assert len(refused) == 1


def test_the_pipeline_reads_and_writes_in_place_and_gives_the_buffered_bytes(disk_dir, monkeypatch):
    """One variant: every read and write lands in place (no bounce copy, the buffers sit at their
    file phase); several variants: the bytes of the buffered conversion."""
    src = write_synthetic_flux(disk_dir / "s.safetensors", FluxGeometry(double_blocks=1, single_blocks=1, hidden=256),
                               seed=3)
    with open_source(src) as source:
        assert all(source.raw_phase(n) % sio.DTYPE_SIZES[t.dtype] == 0 for n, t in source.tensors.items())
    bounced = []
    real = direct_io.bounce_buffer

    def spy():
        bounced.append(1)
        return real()

    monkeypatch.setattr(direct_io, "bounce_buffer", spy)
    monkeypatch.setattr(direct_io, "DIRECT_MIN_BYTES", 1)  # every tensor direct, small ones too
    monkeypatch.setenv(direct_io.ENV, "off")
    buffered = convert(src, disk_dir / "buffered", ["Q4_K_M", "Q8_0"])
    monkeypatch.setenv(direct_io.ENV, "on")
    [one] = convert(src, disk_dir / "one", ["Q4_K_M"])
    assert bounced == []
    assert one.path.read_bytes() == buffered[0].path.read_bytes()
    direct = convert(src, disk_dir / "direct", ["Q4_K_M", "Q8_0"])
    assert [r.sha256 for r in direct] == [r.sha256 for r in buffered]
    assert [r.path.read_bytes() for r in direct] == [r.path.read_bytes() for r in buffered]
    assert [r.tensors for r in direct] == [r.tensors for r in buffered]


def test_the_reader_buffers_keep_element_alignment(disk_dir, monkeypatch):
    """A tensor whose file offset is not a multiple of its element width is not placed at its
    phase (the kernels view BF16 codes as uint16); it is read through the bounce buffer."""
    path = disk_dir / "odd.safetensors"
    rng = np.random.default_rng(1)
    pad = rng.integers(0, 256, 1, dtype=np.uint8).tobytes()
    body = rng.integers(0, 256, 2 * 70_000, dtype=np.uint8).tobytes()
    with open(path, "wb") as f:
        f.write(encode_header([("pad", "F8_E4M3", (1,)), ("w", "BF16", (70_000,))], {}))
        f.write(pad + body)
    monkeypatch.setattr(direct_io, "DIRECT_MIN_BYTES", 1)
    monkeypatch.setenv(direct_io.ENV, "on")
    with open_source(path) as source:
        assert source.raw_phase("w") % 2 == 1
        reader = pipeline._Reader(source, ["pad", "w"], 1, None)
        try:
            got = {}
            for name, raw in reader:
                assert direct_io.address(raw.data) % sio.DTYPE_SIZES[raw.dtype] == 0
                got[name] = raw.data.tobytes()
                reader.release(raw)
        finally:
            reader.close()
    assert got == {"pad": pad, "w": body}


# ---------------------------------------------------------------------------------------------
# Writes


def _plan():
    return make_plan("Q4_K_M", layout_tensors(FluxGeometry(double_blocks=1, single_blocks=1, hidden=256)),
                     name="tiny", family="flux-dev")


def _payloads(plan):
    """Each tensor's bytes at an address of its own choosing: in phase with the file, or 2 bytes off."""
    rng = np.random.default_rng(11)
    return {e.name: rng.integers(0, 256, e.nbytes, dtype=np.uint8) for e in plan.entries}


def _write_parallel(plan, folder: pathlib.Path, payloads, shift_every: int = 2):
    import concurrent.futures

    folder.mkdir()
    with GGUFStreamWriter(folder / plan.file_name, plan.kv, plan.slots, variant=plan.variant.name,
                          file_type=plan.file_type, parallel=True) as w:
        jobs = []
        for i, e in enumerate(plan.entries):
            offset = w.reserve(e.name, payloads[e.name])
            assert offset == w.offset_of(e.name)
            buf = np.empty(e.nbytes + 2 * IO_ALIGN, np.uint8)
            placed = direct_io.placed(buf, offset + (2 if i % shift_every else 0), e.nbytes)
            placed[:] = payloads[e.name]
            jobs.append((offset, placed))
        direct = w.direct
        with concurrent.futures.ThreadPoolExecutor(3) as pool:
            list(pool.map(lambda job: w.write_at(*job), reversed(jobs)))
        return w.finish(), direct


def _failing_direct_writes(monkeypatch, code: int, text: str) -> list[int]:
    """Every write through an O_DIRECT descriptor raises OSError(code); returns their offsets."""
    real_pwrite, real_open = os.pwrite, direct_io.open_direct
    direct_fds: set[int] = set()
    failed: list[int] = []

    def open_direct(path, flags):
        fd = real_open(path, flags)
        direct_fds.add(fd)
        return fd

    def pwrite(fd, data, offset):
        if fd in direct_fds:
            failed.append(offset)
            raise OSError(code, text)
        return real_pwrite(fd, data, offset)

    monkeypatch.setattr(direct_io, "open_direct", open_direct)
    monkeypatch.setattr(writer_module.os, "pwrite", pwrite)
    return failed


def test_direct_writes_give_the_bytes_of_buffered_ones(disk_dir, monkeypatch):
    plan = _plan()
    payloads = _payloads(plan)
    monkeypatch.setattr(direct_io, "DIRECT_MIN_BYTES", 1)
    monkeypatch.setenv(direct_io.ENV, "off")
    buffered, was_direct = _write_parallel(plan, disk_dir / "off", payloads)
    assert not was_direct
    monkeypatch.setenv(direct_io.ENV, "on")
    direct, was_direct = _write_parallel(plan, disk_dir / "on", payloads)
    assert was_direct
    assert direct.path.read_bytes() == buffered.path.read_bytes()
    assert direct.sha256 == buffered.sha256 == hashlib.sha256(direct.path.read_bytes()).hexdigest()
    assert direct.tensors == buffered.tensors
    assert sorted(p.name for p in (disk_dir / "on").iterdir()) == [plan.file_name]


def test_a_file_system_that_refuses_a_direct_write_gets_buffered_writes(disk_dir, monkeypatch):
    plan = _plan()
    payloads = _payloads(plan)
    monkeypatch.setattr(direct_io, "DIRECT_MIN_BYTES", 1)
    monkeypatch.setenv(direct_io.ENV, "off")
    buffered, _ = _write_parallel(plan, disk_dir / "off", payloads)
    monkeypatch.setenv(direct_io.ENV, "on")
    refused = _failing_direct_writes(monkeypatch, errno.EINVAL, "Invalid argument")
    direct, was_direct = _write_parallel(plan, disk_dir / "on", payloads)
    assert was_direct and len(refused) == 1
    assert direct.path.read_bytes() == buffered.path.read_bytes()


def test_a_full_disk_under_a_direct_write_is_one_line_and_leaves_nothing(disk_dir, monkeypatch):
    plan = _plan()
    payloads = _payloads(plan)
    monkeypatch.setattr(direct_io, "DIRECT_MIN_BYTES", 1)
    monkeypatch.setenv(direct_io.ENV, "on")
    _failing_direct_writes(monkeypatch, errno.ENOSPC, "No space left on device")
    with pytest.raises(OutputError) as e:
        _write_parallel(plan, disk_dir / "full", payloads)
    assert str(e.value) == f"disk full while writing {disk_dir / 'full' / plan.file_name}"
    assert list((disk_dir / "full").iterdir()) == []
