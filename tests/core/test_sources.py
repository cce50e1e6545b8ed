"""Reading checkpoints: three layouts to the same BFL tensors, exact upcasts, one-line errors."""
from __future__ import annotations

import json
import math
import struct

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from converter.diffusers_names import bfl_name_for
from converter.errors import SourceError
from converter.layout import FluxGeometry, bfl_tensor_shapes
from converter.sources import DIFFUSERS_INDEX, open_source
from converter.synthetic import write_synthetic_flux

GEO = FluxGeometry(double_blocks=1, single_blocks=1, hidden=256)


@pytest.fixture(scope="module")
def layouts(tmp_path_factory):
    d = tmp_path_factory.mktemp("layouts")
    return {
        "bfl": write_synthetic_flux(d / "flux.safetensors", GEO, seed=7),
        "comfyui": write_synthetic_flux(d / "flux-comfy.safetensors", GEO, layout="comfyui", seed=7),
        # Shards of <= 1.5 MB: 8 shards, and the parts of linear1 spread over two of them.
        "diffusers": write_synthetic_flux(d / "flux-diffusers", GEO, layout="diffusers", seed=7,
                                          shard_bytes=1_500_000),
    }


def bits(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a).view(np.uint32)


def test_three_layouts_give_the_same_bfl_tensors_bit_for_bit(layouts):
    sources = {k: open_source(p) for k, p in layouts.items()}
    try:
        ref = sources["bfl"]
        assert {k: s.layout for k, s in sources.items()} == {k: k for k in sources}
        expected = bfl_tensor_shapes(GEO)
        for s in sources.values():
            assert list(s.tensors) == list(expected)  # BFL logical order
            assert {n: t.shape for n, t in s.tensors.items()} == expected
            assert s.tensors == ref.tensors  # names, shapes, dtypes, source bytes
            assert s.metadata == {"format": "pt", "flux_gguf.synthetic": "seed=7 std=0.02"}
        for name, info in ref.tensors.items():
            a = ref.read(name)
            assert a.dtype == np.float32 and a.flags.c_contiguous and a.shape == info.shape
            assert info.nbytes == math.prod(info.shape) * 2
            for other in ("comfyui", "diffusers"):
                np.testing.assert_array_equal(bits(sources[other].read(name)), bits(a), err_msg=name)
    finally:
        for s in sources.values():
            s.close()


def test_files_lists_every_file_read_with_its_size(layouts):
    folder = layouts["diffusers"]
    with open_source(folder) as src:
        names = [f.path.name for f in src.files]
        assert names[0] == DIFFUSERS_INDEX
        shards = sorted(p.name for p in folder.glob("*.safetensors"))
        assert len(shards) >= 3 and names[1:] == shards
        assert all(f.size == f.path.stat().st_size for f in src.files)
    # The shard size splits some fused BFL tensor across two shards, and reading still works.
    weight_map = json.loads((folder / DIFFUSERS_INDEX).read_text())["weight_map"]
    shards_of: dict[str, set[str]] = {}
    for key, shard in weight_map.items():
        shards_of.setdefault(bfl_name_for(key)[0], set()).add(shard)
    assert any(len(s) > 1 for s in shards_of.values())
    with open_source(layouts["bfl"]) as src:
        assert [(f.path, f.size) for f in src.files] == [(layouts["bfl"], layouts["bfl"].stat().st_size)]


def test_diffusers_parent_folder_with_transformer_subfolder(tmp_path):
    write_synthetic_flux(tmp_path / "transformer", GEO, layout="diffusers")
    with open_source(tmp_path) as src:
        assert src.layout == "diffusers" and src.path == tmp_path
        assert list(src.tensors) == list(bfl_tensor_shapes(GEO))
        assert [f.path.name for f in src.files] == ["diffusion_pytorch_model.safetensors"]


def test_order_is_logical_whatever_the_file_order_and_extras_come_last(tmp_path, layouts):
    sd = load_file(layouts["bfl"])
    sd["zz_extra.weight"] = torch.zeros(3, dtype=torch.bfloat16)
    sd["aa_extra.weight"] = torch.zeros(2, dtype=torch.bfloat16)
    p = tmp_path / "sorted.safetensors"
    save_file(sd, p)  # the safetensors package stores keys alphabetically
    with open_source(p) as src:
        assert list(src.tensors) == list(bfl_tensor_shapes(GEO)) + ["aa_extra.weight", "zz_extra.weight"]


def test_comfyui_prefixes_stripped_and_foreign_keys_ignored(tmp_path, layouts):
    sd = load_file(layouts["bfl"])
    for prefix in ("model.diffusion_model.", "diffusion_model."):
        full = {prefix + k: v for k, v in sd.items()}
        full["first_stage_model.decoder.conv_in.weight"] = torch.ones(4, dtype=torch.bfloat16)
        p = tmp_path / "comfy.safetensors"
        save_file(full, p)
        with open_source(p) as src:
            assert src.layout == "comfyui"
            assert list(src.tensors) == list(bfl_tensor_shapes(GEO))
            assert src.ignored == ("first_stage_model.decoder.conv_in.weight",)
            np.testing.assert_array_equal(src.read("txt_in.weight"), sd["txt_in.weight"].float().numpy())


@pytest.mark.parametrize("dtype", ["BF16", "F16", "F32", "F8_E4M3", "F8_E5M2"])
def test_each_dtype_upcast_like_torch_float(tmp_path, dtype):
    p = write_synthetic_flux(tmp_path / f"{dtype}.safetensors", GEO, dtype=dtype)
    ref = load_file(p)
    with open_source(p) as src:
        for name, info in src.tensors.items():
            assert info.dtype == dtype
            np.testing.assert_array_equal(bits(src.read(name)), bits(ref[name].float().numpy()), err_msg=name)


def test_every_code_of_every_dtype_upcasts_exactly(tmp_path):
    codes16 = torch.from_numpy(np.arange(65536, dtype=np.uint32).astype(np.uint16).view(np.int16))
    codes8 = torch.arange(256, dtype=torch.int32).to(torch.uint8)
    specials = np.array([0.0, -0.0, np.inf, -np.inf, np.nan, 1e-45, -3e-39, 3.4e38, 1.0 / 3], dtype=np.float32)
    specials = np.concatenate([specials, np.array([0x7FA00000, 0xFFC00001], dtype=np.uint32).view(np.float32)])
    tensors = {
        "bf16": codes16.view(torch.bfloat16).reshape(256, 256),
        "f16": codes16.clone().view(torch.float16).reshape(256, 256),
        "f32": torch.from_numpy(specials),
        "e4m3": codes8.view(torch.float8_e4m3fn).reshape(16, 16),
        "e5m2": codes8.clone().view(torch.float8_e5m2),
    }
    p = tmp_path / "codes.safetensors"
    save_file(tensors, p)
    with open_source(p) as src:
        assert {n: t.dtype for n, t in src.tensors.items()} == {
            "bf16": "BF16", "f16": "F16", "f32": "F32", "e4m3": "F8_E4M3", "e5m2": "F8_E5M2"}
        for name, t in tensors.items():
            got = src.read(name)
            assert got.shape == tuple(t.shape)
            np.testing.assert_array_equal(bits(got), bits(t.float().numpy()), err_msg=name)


def test_diffusers_mapping_is_the_inverse_of_diffusers_own_converter(tmp_path):
    """Feed BFL tensors to diffusers' converter, read its output back: the same BFL tensors.

    The converter hard-codes hidden size 3072 when it splits ``linear1``, so the row counts are
    the real ones; it never looks at columns, so 2-D tensors keep only 3 columns (tiny, fast).
    """
    from diffusers.loaders.single_file_utils import (
        convert_flux_transformer_checkpoint_to_diffusers,
    )

    geo = FluxGeometry(double_blocks=2, single_blocks=2)
    gen = torch.Generator().manual_seed(0)
    bfl = {n: torch.randn(s[0], *([3] if len(s) == 2 else []), generator=gen).to(torch.bfloat16)
           for n, s in bfl_tensor_shapes(geo).items()}
    converted = convert_flux_transformer_checkpoint_to_diffusers(dict(bfl))
    assert len(converted) == len(bfl) + 8 * 2 + 6 * 2  # qkv: 2 -> 6 keys; linear1: 2 -> 8 keys
    folder = tmp_path / "transformer"
    folder.mkdir()
    save_file({k: v.contiguous() for k, v in converted.items()}, folder / "diffusion_pytorch_model.safetensors")
    with open_source(tmp_path) as src:
        assert src.layout == "diffusers"
        assert list(src.tensors) == list(bfl)
        for name, t in bfl.items():
            assert src.tensors[name].shape == tuple(t.shape)
            np.testing.assert_array_equal(bits(src.read(name)), bits(t.float().numpy()), err_msg=name)
    # And the synthetic diffusers layout uses exactly the converter's key names.
    ours = write_synthetic_flux(tmp_path / "ours", FluxGeometry(2, 2, hidden=256), layout="diffusers")
    assert set(load_file(ours / "diffusion_pytorch_model.safetensors")) == set(converted)


def test_single_file_in_diffusers_naming_is_mapped(tmp_path, layouts):
    sd = {}
    for shard in sorted(layouts["diffusers"].glob("*.safetensors")):
        sd.update(load_file(shard))
    p = tmp_path / "diffusers-named.safetensors"
    save_file(sd, p)
    with open_source(p) as src, open_source(layouts["bfl"]) as ref:
        assert src.layout == "diffusers" and src.tensors == ref.tensors
        np.testing.assert_array_equal(bits(src.read("final_layer.adaLN_modulation.1.weight")),
                                      bits(ref.read("final_layer.adaLN_modulation.1.weight")))


# ---------------------------------------------------------------------------------------------
# Errors: one line each, naming the file and the tensor or key.


def raw_file(path, header: object, data: bytes = b"", length: int | None = None) -> None:
    blob = json.dumps(header).encode() if not isinstance(header, bytes) else header
    path.write_bytes(struct.pack("<Q", len(blob) if length is None else length) + blob + data)


def error_of(path) -> str:
    with pytest.raises(SourceError) as e:
        open_source(path)
    message = str(e.value)
    assert "\n" not in message
    return message


def entry(dtype: str, shape: list[int], begin: int, end: int) -> dict:
    return {"dtype": dtype, "shape": shape, "data_offsets": [begin, end]}


def test_missing_path(tmp_path):
    assert error_of(tmp_path / "nope.safetensors") == f"{tmp_path / 'nope.safetensors'}: no such file or folder"


def test_not_safetensors(tmp_path):
    p = tmp_path / "x.safetensors"
    p.write_bytes(b"abc")
    assert error_of(p) == (f"{p}: not a safetensors file (only 3 bytes; a safetensors file starts with an "
                           "8-byte header length)")
    raw_file(p, {}, length=1_000_000)
    assert error_of(p) == f"{p}: not a safetensors file (header length 1000000 does not fit in the 10-byte file)"
    raw_file(p, b"{not json")
    assert error_of(p) == (f"{p}: not a safetensors file (header is not JSON: Expecting property name "
                           "enclosed in double quotes at byte 1)")
    raw_file(p, b"\xff\xfe[]")
    assert error_of(p) == f"{p}: not a safetensors file (header is not UTF-8 text: byte 0)"
    raw_file(p, [1, 2])
    assert error_of(p) == f"{p}: not a safetensors file (header is a JSON list, expected an object)"
    p.write_bytes(b"GGUF\x03\x00\x00\x00" + bytes(32))
    assert error_of(p) == f"{p}: not a safetensors file (it is a GGUF file)"


def test_truncated_file(tmp_path, layouts):
    p = tmp_path / "cut.safetensors"
    full = layouts["bfl"].read_bytes()
    p.write_bytes(full[:-1000])
    assert error_of(p) == (f"{p}: truncated file: tensor final_layer.adaLN_modulation.1.bias needs bytes up to "
                           f"{len(full)} but the file has {len(full) - 1000}")


def test_header_lies(tmp_path):
    p = tmp_path / "lies.safetensors"
    raw_file(p, {"a": entry("F32", [2, 2], 0, 12)}, bytes(12))
    assert error_of(p) == (f"{p}: header lies about tensor a: data_offsets [0, 12] span 12 bytes but shape "
                           "[2, 2] x F32 needs 16")
    raw_file(p, {"a": entry("F32", [4], 16, 0)}, bytes(16))
    assert error_of(p) == f"{p}: header lies about tensor a: data_offsets [16, 0] are out of order"
    raw_file(p, {"a": entry("F32", [4], 0, 16), "b": entry("F32", [4], 8, 24)}, bytes(24))
    assert error_of(p) == f"{p}: header lies: tensors a and b overlap (data_offsets [0, 16] and [8, 24])"
    raw_file(p, {"b": entry("F32", [4], 20, 36), "a": entry("F32", [4], 0, 16)}, bytes(36))
    assert error_of(p) == f"{p}: header lies: 4 bytes before tensor b belong to no tensor"
    raw_file(p, {"a": entry("F32", [4], 0, 16)}, bytes(20))
    assert error_of(p) == f"{p}: header lies: 4 bytes after the last tensor belong to no tensor"
    raw_file(p, b'{"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, '
                b'"a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}', bytes(8))
    assert error_of(p) == f"{p}: header lies: key a appears twice"
    raw_file(p, {"a": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}, bytes(4))
    assert error_of(p) == f"{p}: tensor a: shape must be a list of non-negative integers, got [-1]"
    raw_file(p, {"a": entry("F32", [1], 0, 4), "__metadata__": {"n": 1}}, bytes(4))
    assert error_of(p) == f"{p}: __metadata__ must be an object of strings"


def test_unsupported_dtype_names_tensor_and_dtype(tmp_path):
    p = tmp_path / "i64.safetensors"
    save_file({"ok": torch.zeros(2), "steps": torch.zeros(2, dtype=torch.int64)}, p)
    assert error_of(p) == f"{p}: tensor steps has dtype I64; supported: BF16, F16, F32, F8_E4M3, F8_E5M2"


def copy_folder(src, dst):
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def test_diffusers_folder_errors(tmp_path, layouts):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert error_of(empty) == (f"{empty}: no diffusers transformer weights (expected "
                               "diffusion_pytorch_model.safetensors or diffusion_pytorch_model.safetensors."
                               "index.json; a single-file checkpoint is passed as a file)")

    folder = copy_folder(layouts["diffusers"], tmp_path / "missing-shard")
    index = folder / DIFFUSERS_INDEX
    weight_map = json.loads(index.read_text())["weight_map"]
    shard = sorted(set(weight_map.values()))[1]
    (folder / shard).unlink()
    first_key = next(k for k, v in weight_map.items() if v == shard)
    assert error_of(folder) == f"{index}: shard {shard} (named for {first_key}) is missing"

    folder = copy_folder(layouts["diffusers"], tmp_path / "wrong-index")
    index = folder / DIFFUSERS_INDEX
    data = json.loads(index.read_text())
    first_shard = sorted(set(data["weight_map"].values()))[0]
    assert data["weight_map"]["proj_out.weight"] != first_shard
    data["weight_map"]["proj_out.weight"] = first_shard
    index.write_text(json.dumps(data))
    assert error_of(folder) == (f"{folder / first_shard}: the index names proj_out.weight in this shard but "
                                "the shard does not hold it")
    index.write_text("[1, 2")
    assert error_of(folder).startswith(f"{index}: not a diffusers index (not JSON: ")
    index.write_text('{"metadata": {}}')
    assert error_of(folder) == (f"{index}: not a diffusers index (expected a weight_map object of key -> "
                                "shard file)")


def test_unknown_or_incomplete_diffusers_keys(tmp_path):
    folder = tmp_path / "unknown"
    folder.mkdir()
    p = folder / "diffusion_pytorch_model.safetensors"
    base = {"x_embedder.weight": torch.zeros(4, 2), "x_embedder.bias": torch.zeros(4)}
    save_file({**base, "pos_embed.proj.weight": torch.zeros(2), "pos_embed.proj.bias": torch.zeros(2)}, p)
    assert error_of(folder) == (f"{p}: unknown diffusers key pos_embed.proj.bias (and 1 more): it maps to no "
                                "FLUX.1 transformer tensor")
    qk = {f"transformer_blocks.0.attn.to_{c}.weight": torch.zeros(4, 2) for c in "qk"}
    save_file({**base, **qk}, p)
    assert error_of(folder) == (
        f"{p}: double_blocks.0.img_attn.qkv.weight needs diffusers keys transformer_blocks.0.attn.to_q.weight, "
        "transformer_blocks.0.attn.to_k.weight, transformer_blocks.0.attn.to_v.weight; "
        "transformer_blocks.0.attn.to_v.weight is missing")
    qkv = {**qk, "transformer_blocks.0.attn.to_v.weight": torch.zeros(4, 3)}
    save_file({**base, **qkv}, p)
    assert error_of(folder) == (
        f"{p}: the parts of double_blocks.0.img_attn.qkv.weight cannot be stacked by rows ("
        "transformer_blocks.0.attn.to_q.weight [4, 2], transformer_blocks.0.attn.to_k.weight [4, 2], "
        "transformer_blocks.0.attn.to_v.weight [4, 3])")


def test_read_errors(layouts):
    src = open_source(layouts["bfl"])
    with pytest.raises(SourceError, match=r"flux.safetensors: no tensor img_in.scale$"):
        src.read("img_in.scale")
    src.close()
    with pytest.raises(SourceError) as e:
        src.read("img_in.weight")
    assert str(e.value) == f"{layouts['bfl']}: read after close()"
