"""The streaming writer: gguf-py reads back what the plan promised; hashes, partial files, errors."""
from __future__ import annotations

import hashlib
import os
import pathlib

import numpy as np
import pytest
from gguf import GGUFReader

from converter.errors import OutputError
from converter.layout import FluxGeometry
from converter.recipes import layout_tensors, make_plan
from converter.writer import GGUFStreamWriter, encode_header, pad_to_alignment

GEO = FluxGeometry(double_blocks=1, single_blocks=1, hidden=256)


def small_plan(variant="Q4_K_M"):
    return make_plan(variant, layout_tensors(GEO), name="tiny", family="flux-dev")


def fake_payloads(plan, seed=0):
    """Bytes of the planned size per tensor (the writer never interprets them)."""
    rng = np.random.default_rng(seed)
    return {e.name: rng.integers(0, 256, e.nbytes, dtype=np.uint8) for e in plan.entries}


def write(plan, out: pathlib.Path, payloads, **kw):
    with GGUFStreamWriter(out / plan.file_name, plan.kv, plan.slots, variant=plan.variant.name,
                          file_type=plan.file_type, **kw) as w:
        for e in plan.entries:
            w.write_tensor(e.name, payloads[e.name])
        return w.finish()


def field_value(reader: GGUFReader, key: str):
    return reader.fields[key].contents()


@pytest.mark.parametrize("variant", ["Q4_K_M", "Q8_0", "BF16"])
def test_written_file_reads_back_in_gguf_py(tmp_path, variant):
    plan = small_plan(variant)
    payloads = fake_payloads(plan)
    rec = write(plan, tmp_path, payloads)
    path = tmp_path / f"tiny-{variant}.gguf"
    assert rec.path == path and path.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"tiny-{variant}.gguf"]  # no partial left
    raw = path.read_bytes()
    assert rec.size == len(raw) == plan.file_size
    assert rec.sha256 == hashlib.sha256(raw).hexdigest()
    assert (rec.variant, rec.file_type) == (variant, plan.file_type)

    r = GGUFReader(path)
    assert field_value(r, "general.architecture") == "flux"
    assert field_value(r, "general.quantization_version") == 2
    assert field_value(r, "general.file_type") == plan.file_type
    assert field_value(r, "general.name") == "tiny"
    assert field_value(r, "flux_gguf.recipe") == variant
    assert field_value(r, "flux_gguf.model_family") == "flux-dev"
    assert field_value(r, "flux_gguf.tool_version")
    assert r.fields["general.quantization_version"].types[0].name == "UINT32"
    assert r.fields["general.file_type"].types[0].name == "UINT32"

    assert [t.name for t in r.tensors] == [e.name for e in plan.entries]
    for t, e, tr in zip(r.tensors, plan.entries, rec.tensors):
        assert t.tensor_type.name == e.qtype == tr.type
        assert tuple(int(x) for x in reversed(t.shape)) == e.shape == tr.shape  # GGUF dims are reversed
        assert int(t.n_bytes) == e.nbytes == tr.nbytes
        assert int(t.data_offset) == tr.offset and tr.offset % 32 == 0
        chunk = raw[tr.offset:tr.offset + tr.nbytes]
        assert chunk == payloads[e.name].tobytes()
        assert tr.sha256 == hashlib.sha256(chunk).hexdigest()
    assert len(encode_header(plan.kv, plan.slots)) == plan.header_nbytes == r.tensors[0].data_offset


def test_output_is_reproducible(tmp_path):
    plan = small_plan()
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    ra, rb = write(plan, a, fake_payloads(plan)), write(plan, b, fake_payloads(plan))
    assert ra.sha256 == rb.sha256
    assert (a / plan.file_name).read_bytes() == (b / plan.file_name).read_bytes()


@pytest.mark.parametrize("exc", [RuntimeError("boom"), KeyboardInterrupt()])
def test_failure_mid_write_leaves_no_file(tmp_path, exc):
    plan = small_plan()
    payloads = fake_payloads(plan)
    with pytest.raises(type(exc)):
        with GGUFStreamWriter(tmp_path / plan.file_name, plan.kv, plan.slots, variant="Q4_K_M", file_type=15) as w:
            for i, e in enumerate(plan.entries):
                if i == len(plan.entries) // 2:
                    assert w.partial_path.exists() and w.partial_path.parent == tmp_path
                    assert w.partial_path.name.startswith(f".{plan.file_name}.")  # hidden, marked, unique
                    assert w.partial_path.name.endswith(".flux-gguf.partial")
                    raise exc
                w.write_tensor(e.name, payloads[e.name])
    assert list(tmp_path.iterdir()) == []


def test_disk_full_is_reported_and_cleaned_up(tmp_path):
    if not os.path.exists("/dev/full"):
        pytest.fail("/dev/full is needed to simulate a full disk")
    plan = small_plan()
    import converter.writer as writer_module

    def open_full(path, buffering=-1):  # the partial file's writes hit a device that is always full
        return open("/dev/full", "wb", buffering=buffering)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(writer_module, "open_partial", open_full)
        with pytest.raises(OutputError) as e:
            write(plan, tmp_path, fake_payloads(plan), buffer_size=4096)
    assert str(e.value) == f"disk full while writing {tmp_path / plan.file_name}"
    assert list(tmp_path.iterdir()) == []


def test_unwritable_output_directory(tmp_path):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("x")
    plan = small_plan()
    with pytest.raises(OutputError) as e:
        write(plan, blocker, fake_payloads(plan))
    assert str(e.value) == f"{blocker / plan.file_name} was not written: Not a directory"


def test_out_of_order_or_wrong_size_writes_are_refused(tmp_path):
    plan = small_plan()
    payloads = fake_payloads(plan)
    first, second = plan.entries[0], plan.entries[1]
    with GGUFStreamWriter(tmp_path / plan.file_name, plan.kv, plan.slots, variant="Q4_K_M", file_type=15) as w:
        assert w.next_tensor == first.name
        with pytest.raises(ValueError, match=f"expected tensor '{first.name}' next, got '{second.name}'"):
            w.write_tensor(second.name, payloads[second.name])
        with pytest.raises(ValueError, match=f"tensor {first.name} must be {first.nbytes} bytes"):
            w.write_tensor(first.name, payloads[first.name][:-1])
        w.write_tensor(first.name, payloads[first.name])
        with pytest.raises(ValueError, match="tensors not written yet"):
            w.finish()
    assert list(tmp_path.iterdir()) == []


def test_pad_to_alignment():
    assert [pad_to_alignment(n) for n in (0, 1, 31, 32, 33)] == [0, 32, 32, 32, 64]


def test_a_planted_partial_symlink_is_not_written_through(tmp_path):
    plan = small_plan()
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    out = tmp_path / "out"
    out.mkdir()
    (out / (plan.file_name + ".partial")).symlink_to(victim)  # the old partial name: now just someone's link
    record = write(plan, out, fake_payloads(plan))
    assert victim.read_text() == "precious"
    assert (out / (plan.file_name + ".partial")).is_symlink()  # never touched
    final = out / plan.file_name
    assert final.is_file() and not final.is_symlink()
    assert final.stat().st_size == record.size


def test_any_order_writer_gives_the_bytes_of_the_ordered_one(tmp_path):
    """Tensors written in any order (a source read in its file order) land at their slots: the
    file, its sha256 and every tensor record equal those of writing them in order."""
    import hashlib as _hashlib

    from gguf import GGUFValueType as _VT

    from converter.writer import KV, GGUFStreamWriter, TensorSlot

    rng = np.random.default_rng(7)
    slots = [TensorSlot(f"t{i}", (2, 16 * (i + 1)), "F32", 2 * 16 * (i + 1) * 4) for i in range(5)]
    data = {s.name: rng.standard_normal(s.nbytes // 4).astype(np.float32) for s in slots}
    kv = [KV("general.architecture", "flux", _VT.STRING)]
    with GGUFStreamWriter(tmp_path / "a.gguf", kv, slots, variant="F32", file_type=0) as w:
        for s in slots:
            w.write_tensor(s.name, data[s.name])
        ordered = w.finish()
    with GGUFStreamWriter(tmp_path / "b.gguf", kv, slots, variant="F32", file_type=0, any_order=True) as w:
        for s in [slots[3], slots[0], slots[4], slots[2]]:
            w.write_tensor(s.name, data[s.name])
        with pytest.raises(ValueError, match="'t0' is already written"):
            w.write_tensor("t0", data["t0"])
        w.write_tensor("t1", data["t1"])
        unordered = w.finish()
    a, b = (tmp_path / "a.gguf").read_bytes(), (tmp_path / "b.gguf").read_bytes()
    assert a == b and unordered.sha256 == ordered.sha256 == _hashlib.sha256(a).hexdigest()
    assert unordered.tensors == ordered.tensors and unordered.size == ordered.size


def test_parallel_writer_gives_the_bytes_of_the_ordered_one(tmp_path):
    """reserve() in slot order, write_at() from several threads in reverse order: the same file,
    sha256 and tensor records as write_tensor() in order (what the pipeline's two writers rely on)."""
    import concurrent.futures

    plan = small_plan("Q4_K_M")
    payloads = fake_payloads(plan, seed=3)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    ordered = write(plan, tmp_path / "a", payloads)
    with GGUFStreamWriter(tmp_path / "b" / plan.file_name, plan.kv, plan.slots, variant=plan.variant.name,
                          file_type=plan.file_type, parallel=True) as w:
        offsets = [(w.reserve(e.name, payloads[e.name]), e.name) for e in plan.entries]
        with pytest.raises(ValueError, match="reserved bytes not written yet"):
            w.sync()
        with concurrent.futures.ThreadPoolExecutor(3) as pool:
            list(pool.map(lambda oe: w.write_at(oe[0], payloads[oe[1]]), reversed(offsets)))
        parallel = w.finish()
    a = (tmp_path / "a" / plan.file_name).read_bytes()
    assert (tmp_path / "b" / plan.file_name).read_bytes() == a
    assert parallel.sha256 == ordered.sha256 == hashlib.sha256(a).hexdigest()
    assert parallel.tensors == ordered.tensors and parallel.size == ordered.size
    assert [o for o, _ in offsets] == [t.offset for t in ordered.tensors]


def test_parallel_writer_refuses_misuse_and_leaves_nothing(tmp_path):
    plan = small_plan()
    payloads = fake_payloads(plan)
    first, second = plan.entries[0], plan.entries[1]
    with GGUFStreamWriter(tmp_path / plan.file_name, plan.kv, plan.slots, variant="Q4_K_M", file_type=15,
                          parallel=True) as w:
        with pytest.raises(ValueError, match=f"expected tensor '{first.name}' next, got '{second.name}'"):
            w.reserve(second.name, payloads[second.name])
        with pytest.raises(ValueError, match=f"tensor {first.name} must be {first.nbytes} bytes"):
            w.reserve(first.name, payloads[first.name][:-1])
        with pytest.raises(ValueError, match="stores tensors with reserve"):
            w.write_tensor(first.name, payloads[first.name])
        w.write_at(w.reserve(first.name, payloads[first.name]), payloads[first.name])
        with pytest.raises(ValueError, match="tensors not written yet"):
            w.finish()
    assert list(tmp_path.iterdir()) == []
    with GGUFStreamWriter(tmp_path / plan.file_name, plan.kv, plan.slots, variant="Q4_K_M", file_type=15) as w:
        with pytest.raises(ValueError, match="needs a parallel writer"):
            w.reserve(first.name, payloads[first.name])
    assert list(tmp_path.iterdir()) == []


def test_parallel_writer_reports_a_full_disk(tmp_path, monkeypatch):
    import errno

    import converter.writer as writer_module

    def full(fd, data, offset):
        raise OSError(errno.ENOSPC, "No space left on device")

    plan = small_plan()
    payloads = fake_payloads(plan)
    monkeypatch.setattr(writer_module.os, "pwrite", full)
    with pytest.raises(OutputError) as e:
        with GGUFStreamWriter(tmp_path / plan.file_name, plan.kv, plan.slots, variant="Q4_K_M", file_type=15,
                              parallel=True) as w:
            first = plan.entries[0]
            w.write_at(w.reserve(first.name, payloads[first.name]), payloads[first.name])
    assert str(e.value) == f"disk full while writing {tmp_path / plan.file_name}"
    assert list(tmp_path.iterdir()) == []
