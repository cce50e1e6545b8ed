"""Large tensors read and encoded in row ranges (converter.pipeline._PIECE_BYTES): the same bytes,
the same errors, and raw buffers that no longer grow with the largest tensor."""
from __future__ import annotations

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from converter import pipeline
from converter.errors import OutputError
from converter.layout import FluxGeometry, flux2_geometry
from converter.pipeline import convert
from converter.sources import Source, open_source
from converter.synthetic import write_synthetic_flux
from imatrix_fixtures import synthetic_imatrix

GEO = FluxGeometry(double_blocks=1, single_blocks=1, hidden=256)
TYPES = ["Q4_K_M", "Q8_0", "Q3_K_S", "Q6_K", "F16", "BF16"]
SMALL = 8 << 10  # every 2-D weight of GEO is larger: each is split into several ranges


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    return write_synthetic_flux(tmp_path_factory.mktemp("src") / "tiny.safetensors", GEO, seed=3)


def _convert(src, out, types, piece, monkeypatch, **kw):
    monkeypatch.setattr(pipeline, "_PIECE_BYTES", piece)
    return {r.variant: r.path.read_bytes() for r in convert(src, out, types, **kw)}


def test_row_ranges_cover_each_tensor_in_equal_whole_rows():
    class Info:
        def __init__(self, shape, nbytes, dtype="BF16"):
            self.shape, self.nbytes, self.dtype = shape, nbytes, dtype

    rows, ranges = pipeline._row_ranges(Info((55296, 6144), 55296 * 6144 * 2), 64 << 20)
    assert rows == 55296 and ranges[0] == (0, ranges[0][1]) and ranges[-1][1] == rows
    assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
    assert max(r1 - r0 for r0, r1 in ranges) * 6144 * 2 <= (64 << 20) + 6144 * 2
    assert pipeline._row_ranges(Info((3072,), 6144), 1024) == (1, [(0, 1)])  # one row: never split
    assert pipeline._row_ranges(Info((64, 64), 8192), None) == (64, [(0, 64)])


@pytest.mark.parametrize("layout", ["bfl", "diffusers"])
def test_split_reads_give_the_bytes_of_whole_reads(src, tmp_path, monkeypatch, layout):
    path = src if layout == "bfl" else write_synthetic_flux(tmp_path / "d", GEO, layout="diffusers", seed=3,
                                                             shard_bytes=1 << 20)
    whole = _convert(path, tmp_path / "whole", TYPES, 1 << 40, monkeypatch)
    split = _convert(path, tmp_path / "split", TYPES, SMALL, monkeypatch)
    assert whole.keys() == split.keys() == set(TYPES)
    for t in TYPES:
        assert split[t] == whole[t], t


def test_split_reads_with_an_imatrix_give_the_same_bytes(src, tmp_path, monkeypatch):
    im = synthetic_imatrix(src, seed=5)
    whole = _convert(src, tmp_path / "whole", ["Q4_K_M", "Q3_K_S"], 1 << 40, monkeypatch, imatrix=im)
    split = _convert(src, tmp_path / "split", ["Q4_K_M", "Q3_K_S"], SMALL, monkeypatch, imatrix=im)
    assert split == whole


def test_range_reads_across_diffusers_parts_equal_the_whole_tensor(tmp_path):
    # diffusers holds qkv as three tensors and the final modulation with its halves swapped: a
    # row range crosses those parts.
    path = write_synthetic_flux(tmp_path / "d", GEO, layout="diffusers", seed=4, shard_bytes=1 << 20)
    with open_source(path) as s:
        for name in ("double_blocks.0.img_attn.qkv.weight", "single_blocks.0.linear1.weight",
                     "final_layer.adaLN_modulation.1.weight"):
            info = s.tensors[name]
            whole = np.empty(info.nbytes, np.uint8)
            s.read_raw_into(name, whole)
            n = info.shape[-1]
            for r0, r1 in [(0, 1), (5, 300), (info.shape[0] - 7, info.shape[0])]:
                part = np.empty((r1 - r0) * n * 2, np.uint8)
                s.read_raw_range_into(name, r0 * n, part)
                assert part.tobytes() == whole[r0 * n * 2:r1 * n * 2].tobytes(), (name, r0, r1)
        with pytest.raises(ValueError, match="do not fit tensor img_in.weight"):
            s.read_raw_range_into("img_in.weight", 64 * 255, np.empty(256, np.uint8))


def test_a_flux2_source_splits_the_same_way(tmp_path, monkeypatch):
    geo = flux2_geometry("flux2-klein-4b", hidden=256)
    path = write_synthetic_flux(tmp_path / "f2.safetensors", geo, seed=6)
    assert _convert(path, tmp_path / "s", ["Q4_K_M"], SMALL, monkeypatch) == \
        _convert(path, tmp_path / "w", ["Q4_K_M"], 1 << 40, monkeypatch)


@pytest.mark.parametrize("qtype", ["Q4_K_M", "F16"])
def test_a_bad_value_in_a_split_tensor_is_reported_over_the_whole_tensor(tmp_path, monkeypatch, qtype):
    base = write_synthetic_flux(tmp_path / "base.safetensors", GEO, dtype="F32", seed=7)
    weights = load_file(base)
    name = "single_blocks.0.linear1.weight"  # 1280 rows of 256: split into 160 ranges at SMALL
    x = weights[name].copy()
    x[900, 17], x[1201, 3] = np.nan, np.inf  # both past the first range
    weights[name] = x
    bad = tmp_path / "bad.safetensors"
    save_file(weights, bad)
    messages = []
    for piece in (1 << 40, SMALL):
        monkeypatch.setattr(pipeline, "_PIECE_BYTES", piece)
        with pytest.raises(OutputError) as e:
            convert(bad, tmp_path / f"out{piece}", [qtype])
        messages.append(str(e.value).replace(f"out{piece}", "OUT"))
        assert list((tmp_path / f"out{piece}").iterdir()) == []
    assert messages[0] == messages[1]
    assert "tensor single_blocks.0.linear1.weight: input holds 2 non-finite values" in messages[1]
    assert "first at row 900, column 17" in messages[1]


def test_raw_buffers_are_bounded_by_the_piece_size_not_the_largest_tensor(src, tmp_path, monkeypatch):
    sizes: list[int] = []
    original = Source.read_raw_range_into

    def recording(self, name, first, out):
        sizes.append(out.nbytes)
        return original(self, name, first, out)

    monkeypatch.setattr(Source, "read_raw_range_into", recording)
    capacities: list[int] = []
    real_buffers = pipeline._Buffers

    class Recording(real_buffers):
        def __init__(self, capacity):
            capacities.append(capacity)
            super().__init__(capacity)

    monkeypatch.setattr(pipeline, "_Buffers", Recording)
    _convert(src, tmp_path, ["Q4_K_M"], SMALL, monkeypatch)
    with open_source(src) as s:
        largest = max(t.nbytes for t in s.tensors.values())
        row = max(t.shape[-1] * 2 for t in s.tensors.values())
    assert largest > 4 * SMALL
    assert max(sizes) <= SMALL + row
    assert capacities[1] <= SMALL + row + pipeline.IO_ALIGN  # [0]: the encoded pool, [1]: the reader's


def test_a_tensor_transform_still_gets_whole_tensors(src, tmp_path, monkeypatch):
    seen = {}

    def transform(name, x):
        seen[name] = x.shape
        return x

    _convert(src, tmp_path, ["Q8_0"], SMALL, monkeypatch, tensor_transform=transform)
    with open_source(src) as s:
        assert seen == {n: t.shape for n, t in s.tensors.items()}
