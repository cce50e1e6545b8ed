"""Importance-matrix files: llama.cpp's GGUF format, the legacy .dat files, merging, the checks."""
from __future__ import annotations

import struct

import numpy as np
import pytest
from gguf import GGUFReader

from converter.errors import ImatrixError
from converter.imatrix import (
    Imatrix,
    ImatrixEntry,
    check_against,
    merge_imatrices,
    quantize_kvs,
    read_imatrix,
    write_imatrix,
    write_imatrix_legacy,
)


def _im(seed: int = 0, widths=None, datasets=("probes:seed=0..3",)) -> Imatrix:
    rng = np.random.default_rng(seed)
    widths = widths or {"double_blocks.0.img_attn.qkv.weight": 64, "single_blocks.0.linear2.weight": 96,
                        "double_blocks.0.img_mod.lin.weight": 32}
    entries = {n: ImatrixEntry((rng.lognormal(size=w) * 100).astype(np.float32), float(rng.integers(50, 5000)))
               for n, w in widths.items()}
    return Imatrix(entries=entries, datasets=list(datasets), chunk_count=4, chunk_size=1280)


def _assert_same(a: Imatrix, b: Imatrix) -> None:
    assert sorted(a.entries) == sorted(b.entries)
    for n in a.entries:
        assert a.entries[n].in_sum2.dtype == np.float32 or b.entries[n].in_sum2.dtype == np.float32
        np.testing.assert_array_equal(np.asarray(a.entries[n].in_sum2, np.float32),
                                      np.asarray(b.entries[n].in_sum2, np.float32))
        assert a.entries[n].count == b.entries[n].count
    assert (a.datasets, a.chunk_count, a.chunk_size) == (b.datasets, b.chunk_count, b.chunk_size)


def _sd_cpp_dat(entries: dict[str, tuple[int, np.ndarray]], last_call: int) -> bytes:
    """Bytes as stable-diffusion.cpp's IMatrixCollector::save_imatrix lays them out (imatrix.hpp)."""
    out = struct.pack("<i", len(entries))
    for name, (ncall, vals) in entries.items():
        key = ("model.diffusion_model." + name).encode()
        out += struct.pack("<i", len(key)) + key + struct.pack("<ii", ncall, vals.size)
        out += vals.astype("<f4").tobytes()
    return out + struct.pack("<i", last_call)


def _llama_legacy_dat(entries: dict[str, tuple[int, np.ndarray]], last_chunk: int, dataset: str) -> bytes:
    """Bytes as llama.cpp's save_imatrix_legacy lays them out (dataset name at the end)."""
    out = struct.pack("<i", len(entries))
    for name, (ncall, vals) in sorted(entries.items()):
        key = name.encode()
        out += struct.pack("<i", len(key)) + key + struct.pack("<ii", ncall, vals.size) + vals.astype("<f4").tobytes()
    ds = dataset.encode()
    return out + struct.pack("<ii", last_chunk, len(ds)) + ds


def test_gguf_round_trip_is_exact(tmp_path):
    im = _im()
    path = tmp_path / "a.imatrix.gguf"
    write_imatrix(im, path)
    _assert_same(im, read_imatrix(path))
    assert not (tmp_path / "a.imatrix.gguf.partial").exists()


@pytest.mark.parametrize("legacy", [False, True])
def test_a_users_file_or_link_at_name_partial_is_never_touched(tmp_path, legacy):
    """Partial names are hidden and unique (manifests.hashing.partial_path), never PATH.partial."""
    victim = tmp_path / "victim.txt"
    victim.write_bytes(b"not yours")
    (tmp_path / "a.imatrix.partial").write_bytes(b"my own partial")
    (tmp_path / "b.imatrix.partial").symlink_to(victim)
    for name in ("a.imatrix", "b.imatrix"):
        write_imatrix_legacy(_im(), tmp_path / name) if legacy else write_imatrix(_im(), tmp_path / name)
    assert (tmp_path / "a.imatrix.partial").read_bytes() == b"my own partial"
    assert victim.read_bytes() == b"not yours" and (tmp_path / "b.imatrix.partial").is_symlink()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.imatrix", "a.imatrix.partial", "b.imatrix",
                                                          "b.imatrix.partial", "victim.txt"]
    assert sorted(read_imatrix(tmp_path / "a.imatrix").entries) == sorted(_im().entries)


def test_gguf_file_has_llama_cpp_keys_and_shapes(tmp_path):
    im = _im()
    path = tmp_path / "a.imatrix.gguf"
    write_imatrix(im, path)
    r = GGUFReader(path)
    keys = [k for k in r.fields if not k.startswith("GGUF.")]
    assert keys == ["general.type", "imatrix.datasets", "imatrix.chunk_count", "imatrix.chunk_size"]
    assert r.fields["general.type"].contents() == "imatrix"
    names = [t.name for t in r.tensors]
    assert names == [f"{n}{s}" for n in sorted(im.entries) for s in (".in_sum2", ".counts")]
    for t in r.tensors:
        assert t.tensor_type.name == "F32"
        n = t.name.rsplit(".", 1)[0]
        assert list(t.shape) == ([im.entries[n].in_sum2.size, 1] if t.name.endswith(".in_sum2") else [1, 1])


def test_ggml_loader_reads_our_file_as_llama_quantize_does(tmp_path):
    """ggml's own gguf_init_from_file + llama-quantize's load_imatrix logic accept the file."""
    from oracle import GGUF_TYPE_ARRAY, GGUF_TYPE_STRING, GGUF_TYPE_UINT32, ggml_read_imatrix

    im = _im(3)
    path = tmp_path / "a.imatrix.gguf"
    write_imatrix(im, path)
    got = ggml_read_imatrix(path)
    assert got["kv"] == {"general.type": GGUF_TYPE_STRING, "imatrix.datasets": GGUF_TYPE_ARRAY,
                         "imatrix.chunk_count": GGUF_TYPE_UINT32, "imatrix.chunk_size": GGUF_TYPE_UINT32}
    assert (got["datasets"], got["chunk_count"], got["chunk_size"]) == (im.datasets, 4, 1280)
    for name, e in im.entries.items():
        ne0, ne1, sums = got["tensors"][name + ".in_sum2"]
        _, _, counts = got["tensors"][name + ".counts"]
        assert (ne0, ne1) == (e.in_sum2.size, 1)
        # llama-quantize: e[i] = sums[i] / count, in float
        np.testing.assert_array_equal(sums / np.float32(counts[0]), im.importance(name))


def test_importance_is_float32_mean_of_squares():
    im = _im()
    n = "single_blocks.0.linear2.weight"
    e = im.entries[n]
    got = im.importance(n)
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, e.in_sum2 / np.float32(e.count))
    with pytest.raises(ImatrixError, match="no entry for tensor nope.weight"):
        im.importance("nope.weight")


def test_reads_stable_diffusion_cpp_dat_and_strips_its_prefix(tmp_path):
    rng = np.random.default_rng(1)
    v1 = (rng.random(64) * 7).astype(np.float32)
    v2 = (rng.random(96) * 3).astype(np.float32)
    path = tmp_path / "sdcpp.dat"
    path.write_bytes(_sd_cpp_dat({"double_blocks.0.img_attn.qkv.weight": (20, v1),
                                  "single_blocks.0.linear2.weight": (20, v2)}, last_call=20))
    im = read_imatrix(path)
    assert sorted(im.entries) == ["double_blocks.0.img_attn.qkv.weight", "single_blocks.0.linear2.weight"]
    # sd.cpp stores mean(x^2) * ncall; the importance is what llama-quantize's legacy loader computes
    np.testing.assert_array_equal(im.importance("double_blocks.0.img_attn.qkv.weight"), v1 / np.float32(20))
    assert im.chunk_count == 20 and im.datasets == []


def test_two_sd_cpp_files_merge_as_sd_cpp_merges_them(tmp_path):
    rng = np.random.default_rng(2)
    a, b = (rng.random(64) * 5).astype(np.float32), (rng.random(64) * 9).astype(np.float32)
    name = "double_blocks.0.img_attn.qkv.weight"
    (tmp_path / "a.dat").write_bytes(_sd_cpp_dat({name: (10, a)}, 10))
    (tmp_path / "b.dat").write_bytes(_sd_cpp_dat({name: (30, b)}, 30))
    merged = merge_imatrices([read_imatrix(tmp_path / "a.dat"), read_imatrix(tmp_path / "b.dat")])
    # sd.cpp's load_imatrix: values += tmp, counts += ncall
    np.testing.assert_array_equal(merged.entries[name].in_sum2, a + b)
    assert merged.entries[name].count == 40


def test_reads_llama_cpp_legacy_dat_with_dataset(tmp_path):
    v = (np.arange(32, dtype=np.float32) + 1) * 3
    path = tmp_path / "legacy.dat"
    path.write_bytes(_llama_legacy_dat({"double_blocks.0.img_mod.lin.weight": (3, v)}, 7, "calib.txt"))
    im = read_imatrix(path)
    np.testing.assert_array_equal(im.importance("double_blocks.0.img_mod.lin.weight"), v / np.float32(3))
    assert im.datasets == ["calib.txt"] and im.chunk_count == 7


def test_legacy_writers_round_trip_the_importance(tmp_path):
    im = _im(4)
    for sd_cpp in (False, True):
        path = tmp_path / f"x{int(sd_cpp)}.dat"
        write_imatrix_legacy(im, path, sd_cpp=sd_cpp)
        back = read_imatrix(path)
        assert sorted(back.entries) == sorted(im.entries)
        for n in im.entries:
            np.testing.assert_allclose(back.importance(n), im.importance(n), rtol=2e-7)
    raw = (tmp_path / "x1.dat").read_bytes()
    assert b"model.diffusion_model.double_blocks.0.img_attn.qkv.weight" in raw


def test_merge_adds_sums_and_counts_like_llama_cpp(tmp_path):
    a, b = _im(5, datasets=["a.txt"]), _im(6, datasets=["b.txt"])
    b.entries["double_blocks.1.txt_mlp.0.weight"] = ImatrixEntry(np.ones(16, np.float32), 8.0)
    write_imatrix(a, tmp_path / "a.gguf")
    write_imatrix(b, tmp_path / "b.gguf")
    m = merge_imatrices([read_imatrix(tmp_path / "a.gguf"), read_imatrix(tmp_path / "b.gguf")])
    for n in a.entries:
        np.testing.assert_array_equal(m.entries[n].in_sum2, a.entries[n].in_sum2 + b.entries[n].in_sum2)
        assert m.entries[n].count == a.entries[n].count + b.entries[n].count
    assert m.entries["double_blocks.1.txt_mlp.0.weight"].count == 8.0
    assert m.datasets == ["a.txt", "b.txt"] and m.chunk_count == 8 and m.chunk_size == 1280
    # the merged file round-trips too
    write_imatrix(m, tmp_path / "m.gguf")
    _assert_same(m, read_imatrix(tmp_path / "m.gguf"))


def test_merge_refuses_different_widths():
    a = _im(0)
    b = _im(1, widths={"double_blocks.0.img_attn.qkv.weight": 48})
    with pytest.raises(ImatrixError, match=r"double_blocks.0.img_attn.qkv.weight has 64 columns .* 48"):
        merge_imatrices([a, b])


@pytest.mark.parametrize("bad, message", [
    (lambda e: e.in_sum2.__setitem__(5, np.nan), r"non-finite sum \(nan\) at column 5"),
    (lambda e: e.in_sum2.__setitem__(2, -1.0), r"negative sum of squares \(-1\) at column 2"),
    (lambda e: setattr(e, "count", 0.0), r"count of 0 \(no token reached"),
])
def test_bad_values_in_a_file_are_refused_naming_the_entry(tmp_path, bad, message):
    im = _im()
    name = "single_blocks.0.linear2.weight"
    # write a valid file, then corrupt it with the reference writer so the reader's check is what runs
    good = tmp_path / "good.dat"
    write_imatrix_legacy(im, good)
    bad(im.entries[name])
    raw = bytearray(good.read_bytes())
    key = name.encode()
    at = raw.index(key) + len(key)
    ncall = round(float(im.entries[name].count)) if im.entries[name].count else 0
    vals = im.entries[name].in_sum2 / np.float32(max(im.entries[name].count, 1)) * np.float32(max(ncall, 1))
    raw[at:at + 8 + 4 * vals.size] = struct.pack("<ii", ncall, vals.size) + vals.astype("<f4").tobytes()
    path = tmp_path / "bad.dat"
    path.write_bytes(bytes(raw))
    with pytest.raises(ImatrixError, match=rf"bad.dat: entry {name} .*{message}"):
        read_imatrix(path)
    with pytest.raises(ImatrixError, match=name):
        write_imatrix(im, tmp_path / "never.gguf")
    assert not list(tmp_path.glob("never*"))


def test_check_against_lists_missing_tensors_and_names_wrong_widths():
    im = _im()
    widths = {n: e.in_sum2.size for n, e in im.entries.items()}
    check_against(im, widths)
    with pytest.raises(ImatrixError, match=r"no entry for 2 of the 5 tensors .*double_blocks.3.img_mlp.0.weight, "
                                           r"final_layer.linear.weight"):
        check_against(im, {**widths, "double_blocks.3.img_mlp.0.weight": 64, "final_layer.linear.weight": 64})
    with pytest.raises(ImatrixError, match=r"tensor single_blocks.0.linear2.weight has 15360 input columns but its "
                                           r"entry has 96"):
        check_against(im, {**widths, "single_blocks.0.linear2.weight": 15360})


@pytest.mark.parametrize("content, message", [
    (b"", "not an importance matrix"),
    (struct.pack("<ii", 1, 50) + b"abcdefgh", "truncated legacy imatrix: entry 1's name needs 50 bytes"),
    (struct.pack("<ii", 9, 50) + b"abcdefgh", r"claims 9 entries in 16 bytes"),
    (struct.pack("<i", 1) + struct.pack("<i", 3) + b"abc" + struct.pack("<ii", 1, 4) + b"\0" * 8, "truncated"),
])
def test_damaged_files_fail_in_one_line_naming_the_file(tmp_path, content, message):
    path = tmp_path / "broken.imatrix"
    path.write_bytes(content)
    with pytest.raises(ImatrixError, match=message) as info:
        read_imatrix(path)
    assert "broken.imatrix" in str(info.value) and "\n" not in str(info.value)


def test_a_model_gguf_is_not_an_imatrix(tmp_path):
    from gguf import GGUFWriter

    path = tmp_path / "model.gguf"
    w = GGUFWriter(path, arch="flux")
    w.add_string("general.type", "model")
    w.add_tensor("img_in.weight", np.zeros((4, 4), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ImatrixError, match=r"model.gguf: general.type is 'model', expected 'imatrix'"):
        read_imatrix(path)


def test_write_into_a_missing_folder_fails_cleanly(tmp_path):
    with pytest.raises(ImatrixError, match=r"nowhere/x.gguf: cannot write"):
        write_imatrix(_im(), tmp_path / "nowhere" / "x.gguf")


def test_quantize_kvs_are_what_llama_quantize_records():
    im = _im()
    assert quantize_kvs(im, ["/some/where/a.imatrix.gguf"]) == {
        "quantize.imatrix.file": "a.imatrix.gguf", "quantize.imatrix.dataset": "probes:seed=0..3",
        "quantize.imatrix.entries_count": 3, "quantize.imatrix.chunks_count": 4}


def _llama_cpp_style_gguf(path, entries, *, n_mat=1, with_in_sum=True, datasets=("wiki.train.raw",)):
    """A GGUF laid out as llama.cpp's current save_imatrix writes it (in_sum included, counts [1, n_mat])."""
    from gguf import GGUFWriter

    w = GGUFWriter(path, arch="imatrix")
    w.kv_data[0].pop("general.architecture", None)
    w.add_string("general.type", "imatrix")
    w.add_array("imatrix.datasets", list(datasets))
    w.add_uint32("imatrix.chunk_count", 10)
    w.add_uint32("imatrix.chunk_size", 512)
    for name, (sums, count) in sorted(entries.items()):
        w.add_tensor(name + ".in_sum2", np.tile(sums, (n_mat, 1)).astype(np.float32))
        w.add_tensor(name + ".counts", np.full((n_mat, 1), count, np.float32))
        if with_in_sum:
            w.add_tensor(name + ".in_sum", np.tile(np.sqrt(sums), (n_mat, 1)).astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_reads_a_llama_cpp_gguf_with_in_sum(tmp_path):
    sums = (np.arange(64, dtype=np.float32) + 1) * 5
    _llama_cpp_style_gguf(tmp_path / "l.gguf", {"model.diffusion_model.single_blocks.0.linear1.weight": (sums, 5120.0)})
    im = read_imatrix(tmp_path / "l.gguf")
    assert list(im.entries) == ["single_blocks.0.linear1.weight"]
    np.testing.assert_array_equal(im.importance("single_blocks.0.linear1.weight"), sums / np.float32(5120))
    assert (im.datasets, im.chunk_count, im.chunk_size) == (["wiki.train.raw"], 10, 512)


def test_several_matrices_per_weight_are_refused(tmp_path):
    _llama_cpp_style_gguf(tmp_path / "moe.gguf", {"blk.0.ffn_up_exps.weight": (np.ones(32, np.float32), 9.0)}, n_mat=4)
    with pytest.raises(ImatrixError, match=r"moe.gguf: blk.0.ffn_up_exps.weight.in_sum2 holds 4 matrices"):
        read_imatrix(tmp_path / "moe.gguf")


def test_no_datasets_round_trip(tmp_path):
    im = _im(datasets=())
    write_imatrix(im, tmp_path / "n.gguf")
    assert read_imatrix(tmp_path / "n.gguf").datasets == []


def test_only_k_quants_use_an_imatrix():
    from converter.imatrix import uses_imatrix

    assert [uses_imatrix(t) for t in ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")] == [True] * 5
    assert [uses_imatrix(t) for t in ("Q8_0", "F16", "BF16", "F32", "NOT_A_TYPE")] == [False] * 5
