"""convert with an importance matrix: ggml's bytes for the same quant weights, the KVs, the checks."""
from __future__ import annotations

import hashlib

import numpy as np
import pytest
from gguf import GGUFReader
from imatrix_fixtures import synthetic_imatrix, write_synthetic_imatrix
from oracle import quantize as ggml_quantize

from converter.errors import ImatrixError
from converter.imatrix import ImatrixEntry, read_imatrix, uses_imatrix, write_imatrix
from converter.layout import FluxGeometry
from converter.pipeline import convert, plan_source
from converter.sources import open_source
from converter.synthetic import write_synthetic_flux

GEO = FluxGeometry(double_blocks=1, single_blocks=1, hidden=256)
CALIBRATED = ["Q2_K", "Q3_K_S", "Q4_K_M", "Q5_K_M", "Q6_K"]


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    return write_synthetic_flux(tmp_path_factory.mktemp("src") / "tiny.safetensors", GEO, seed=4)


@pytest.fixture(scope="module")
def imx(src, tmp_path_factory):
    return write_synthetic_imatrix(src, tmp_path_factory.mktemp("imx") / "tiny.imatrix.gguf", seed=1)


@pytest.fixture(scope="module")
def converted(src, imx, tmp_path_factory):
    out = tmp_path_factory.mktemp("out")
    records = convert(src, out, CALIBRATED + ["Q8_0"], name="cal", imatrix_files=[imx])
    static = convert(src, tmp_path_factory.mktemp("static"), ["Q4_K_M", "Q8_0"], name="cal")
    return {r.variant: r for r in records}, {r.variant: r for r in static}


def _tensors(path):
    r = GGUFReader(path)
    return {t.name: (t.tensor_type.name, bytes(t.data.reshape(-1).view(np.uint8))) for t in r.tensors}


def _sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_bytes_equal_ggml_quantize_chunk_with_the_same_quant_weights(src, imx, converted):
    im = read_imatrix(imx)
    n_weighted, types = 0, set()
    for variant in CALIBRATED:
        n_weighted += _check_against_ggml(src, im, converted[0][variant].path, types)
    assert n_weighted >= 5 * 10
    assert types == {"Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"}


def _check_against_ggml(src, im, path, types):
    got = _tensors(path)
    n_weighted = 0
    with open_source(src) as source:
        for name, (qtype, data) in got.items():
            x = source.read(name)
            if x.ndim != 2 or not uses_imatrix(qtype):
                continue
            # what llama-quantize hands ggml: in_sum2 / counts, float32
            qw = im.entries[name].in_sum2 / np.float32(im.entries[name].count)
            assert data == ggml_quantize(x, qtype, imatrix=qw).tobytes(), (path.name, name)
            n_weighted += 1
            types.add(qtype)
    return n_weighted


def test_imatrix_changes_the_k_quant_bytes_only(converted):
    cal, static = converted
    a, b = _tensors(cal["Q4_K_M"].path), _tensors(static["Q4_K_M"].path)
    changed = [n for n in a if a[n] != b[n]]
    assert changed and all(uses_imatrix(a[n][0]) for n in changed)
    assert all(a[n] == b[n] for n in a if not uses_imatrix(a[n][0]))
    # a file with no K-quant tensor is the static file, byte for byte (no imatrix KVs either)
    assert _sha(cal["Q8_0"].path) == _sha(static["Q8_0"].path)


def test_k_quant_files_record_what_llama_quantize_records(converted, imx):
    r = GGUFReader(converted[0]["Q4_K_M"].path)
    f = {k: r.fields[k].contents() for k in r.fields if k.startswith("quantize.imatrix.")}
    n_entries = len(read_imatrix(imx).entries)
    assert f == {"quantize.imatrix.file": "tiny.imatrix.gguf", "quantize.imatrix.dataset": "test:seed=1",
                 "quantize.imatrix.entries_count": n_entries, "quantize.imatrix.chunks_count": 4}
    assert r.fields["quantize.imatrix.entries_count"].types[0].name == "INT32"
    assert not any(k.startswith("quantize.") for k in GGUFReader(converted[0]["Q8_0"].path).fields)


def test_plan_size_includes_the_kvs(src, imx, converted):
    with open_source(src) as source:
        plans = plan_source(source, ["Q4_K_M", "Q8_0"], name="cal", imatrix=read_imatrix(imx), imatrix_files=[imx])
    assert [p.file_size for p in plans] == [converted[0]["Q4_K_M"].size, converted[0]["Q8_0"].size]


def test_several_files_merge(src, tmp_path):
    a, b = synthetic_imatrix(src, 1), synthetic_imatrix(src, 2)
    write_imatrix(a, tmp_path / "a.gguf")
    write_imatrix(b, tmp_path / "b.gguf")
    rec = convert(src, tmp_path / "out", ["Q4_K_S"], name="m", imatrix_files=[tmp_path / "a.gguf", tmp_path / "b.gguf"])[0]
    name = "double_blocks.0.img_mlp.2.weight"
    qtype, data = _tensors(rec.path)[name]
    ea, eb = a.entries[name], b.entries[name]
    qw = (ea.in_sum2 + eb.in_sum2) / np.float32(ea.count + eb.count)
    with open_source(src) as source:
        assert data == ggml_quantize(source.read(name), qtype, imatrix=qw).tobytes()
    f = GGUFReader(rec.path).fields
    assert f["quantize.imatrix.file"].contents() == "a.gguf,b.gguf"
    assert f["quantize.imatrix.chunks_count"].contents() == 8


def test_missing_entries_are_listed_before_anything_is_written(src, tmp_path):
    im = synthetic_imatrix(src)
    del im.entries["single_blocks.0.linear2.weight"], im.entries["double_blocks.0.txt_mlp.0.weight"]
    write_imatrix(im, tmp_path / "part.gguf")
    with pytest.raises(ImatrixError, match=r"part.gguf: no entry for 2 of the \d+ tensors quantized with it: "
                                           r"double_blocks.0.txt_mlp.0.weight, single_blocks.0.linear2.weight"):
        convert(src, tmp_path / "out", ["Q4_K_M"], imatrix_files=[tmp_path / "part.gguf"])
    assert not (tmp_path / "out").exists()


def test_an_imatrix_for_another_model_names_tensor_and_widths(src, tmp_path):
    im = synthetic_imatrix(src)
    im.entries["double_blocks.0.img_attn.qkv.weight"] = ImatrixEntry(np.ones(3072, np.float32), 10.0)
    write_imatrix(im, tmp_path / "other.gguf")
    with pytest.raises(ImatrixError, match=r"other.gguf: tensor double_blocks.0.img_attn.qkv.weight has 256 input "
                                           r"columns but its entry has 3072"):
        convert(src, tmp_path / "out", ["Q4_K_M"], imatrix_files=[tmp_path / "other.gguf"])
    assert not (tmp_path / "out").exists()


def test_q8_0_only_needs_no_entries(src, tmp_path):
    """An imatrix with no matching entry is fine for a Q8_0 file: nothing uses it."""
    im = synthetic_imatrix(src)
    im.entries = {"unrelated.weight": ImatrixEntry(np.ones(8, np.float32), 1.0)}
    write_imatrix(im, tmp_path / "x.gguf")
    convert(src, tmp_path / "out", ["Q8_0"], imatrix_files=[tmp_path / "x.gguf"])
    assert (tmp_path / "out").is_dir()
