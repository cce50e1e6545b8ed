"""Synthetic checkpoints: deterministic, real names and dtypes, loadable by diffusers, streamed, atomic."""
from __future__ import annotations

import hashlib
import json
import math
import pathlib
import subprocess
import sys
import tracemalloc

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import converter.synthetic as synthetic
from converter.detect import ModelInfo, detect_model
from converter.errors import OutputError
from converter.layout import FluxGeometry, bfl_tensor_shapes
from converter.safetensors_io import F8_E4M3_TO_F32, F8_E5M2_TO_F32
from converter.sources import DIFFUSERS_INDEX, open_source
from converter.synthetic import (
    diffusers_config,
    encode_f32,
    synthetic_nbytes,
    write_synthetic_flux,
)

GEO = FluxGeometry(double_blocks=1, single_blocks=1, hidden=256)
REPO = pathlib.Path(__file__).resolve().parents[2]


def sha(path: pathlib.Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_deterministic_and_seeded(tmp_path):
    a = write_synthetic_flux(tmp_path / "a.safetensors", GEO, seed=3)
    b = write_synthetic_flux(tmp_path / "b.safetensors", GEO, seed=3)
    c = write_synthetic_flux(tmp_path / "c.safetensors", GEO, seed=4)
    assert sha(a) == sha(b) != sha(c)
    ta, tc = load_file(a), load_file(c)
    assert all(not torch.equal(ta[k], tc[k]) for k in ta)  # every tensor changes with the seed


def test_tensors_do_not_depend_on_block_count_or_order(tmp_path):
    small = write_synthetic_flux(tmp_path / "small.safetensors", GEO, seed=1)
    big = write_synthetic_flux(tmp_path / "big.safetensors", FluxGeometry(3, 4, hidden=256), seed=1)
    s, b = load_file(small), load_file(big)
    assert set(s) < set(b)
    for k in s:
        assert torch.equal(s[k], b[k]), k


def test_real_names_shapes_and_dtypes(tmp_path):
    torch_dtypes = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32,
                    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}
    for dtype, td in torch_dtypes.items():
        p = write_synthetic_flux(tmp_path / f"{dtype}.safetensors", GEO, dtype=dtype)
        sd = load_file(p)
        assert {k: tuple(v.shape) for k, v in sd.items()} == bfl_tensor_shapes(GEO)
        assert {v.dtype for v in sd.values()} == {td}
        header_and_data = p.stat().st_size
        assert header_and_data - synthetic_nbytes(GEO, dtype) < 16_384  # the rest is the header
    comfy = load_file(write_synthetic_flux(tmp_path / "c.safetensors", GEO, layout="comfyui"))
    assert set(comfy) == {"model.diffusion_model." + k for k in bfl_tensor_shapes(GEO)}


def test_lower_precisions_are_the_f32_file_rounded_to_nearest_even(tmp_path):
    f32 = load_file(write_synthetic_flux(tmp_path / "f32.safetensors", GEO, dtype="F32", seed=5))
    for dtype, td in (("BF16", torch.bfloat16), ("F16", torch.float16),
                      ("F8_E4M3", torch.float8_e4m3fn), ("F8_E5M2", torch.float8_e5m2)):
        low = load_file(write_synthetic_flux(tmp_path / f"{dtype}.safetensors", GEO, dtype=dtype, seed=5))
        for k, v in f32.items():
            assert torch.equal(v.to(td).view(torch.uint8), low[k].view(torch.uint8)), (dtype, k)


@pytest.mark.parametrize("dtype, torch_dtype, decode, max_code", [
    ("F8_E4M3", torch.float8_e4m3fn, F8_E4M3_TO_F32, 0x7E),
    ("F8_E5M2", torch.float8_e5m2, F8_E5M2_TO_F32, 0x7B),
])
def test_fp8_encoding_matches_torch_including_ties(dtype, torch_dtype, decode, max_code):
    finite = decode[: max_code + 1].astype(np.float64)
    midpoints = ((finite[:-1] + finite[1:]) / 2).astype(np.float32)  # exact ties in float32
    rng = np.random.default_rng(0)
    x = np.concatenate([finite.astype(np.float32), midpoints, np.nextafter(midpoints, np.float32(0)),
                        rng.standard_normal(10_000).astype(np.float32) * np.float32(finite[-1] / 8)])
    x = np.concatenate([x, -x])
    ours = encode_f32(x, dtype)
    theirs = torch.from_numpy(x).to(torch_dtype).view(torch.uint8).numpy()
    np.testing.assert_array_equal(ours, theirs)
    # Beyond the largest finite value we saturate (torch's e4m3fn cast would give NaN).
    assert encode_f32(np.array([1e6, -1e6], dtype=np.float32), dtype).tolist() == [max_code, 0x80 | max_code]


def test_value_distributions(tmp_path):
    geo = FluxGeometry(2, 2, hidden=256)
    for std in (0.02, 0.1):
        with open_source(write_synthetic_flux(tmp_path / f"{std}.safetensors", geo, dtype="F32", std=std)) as src:
            weights = src.read("double_blocks.1.img_mlp.0.weight")
            biases = np.concatenate([src.read(n) for n in src.tensors if n.endswith(".bias")])
            scales = np.concatenate([src.read(n) for n in src.tensors if n.endswith(".scale")])
        assert abs(weights.mean()) < std / 100 and abs(weights.std() / std - 1) < 0.01
        assert abs(biases.mean()) < std / 100 and abs(biases.std() / (std / 10) - 1) < 0.02
        assert abs(scales.mean() - 1) < std / 5 and abs(scales.std() / std - 1) < 0.1
        assert abs(weights).max() < 4.5 * std


def test_diffusers_layout_loads_in_diffusers(tmp_path):
    from diffusers import FluxTransformer2DModel

    geo = FluxGeometry(2, 1, hidden=256, img_in_channels=384)
    folder = write_synthetic_flux(tmp_path / "transformer", geo, layout="diffusers", shard_bytes=2_000_000)
    index = json.loads((folder / DIFFUSERS_INDEX).read_text())
    shards = sorted(folder.glob("*.safetensors"))
    assert [p.name for p in shards] == [f"diffusion_pytorch_model-{i:05d}-of-{len(shards):05d}.safetensors"
                                        for i in range(1, len(shards) + 1)]
    stored = {}
    for p in shards:
        part = load_file(p)
        assert sum(v.numel() * 2 for v in part.values()) <= 2_000_000 or len(part) == 1
        assert {k for k, v in index["weight_map"].items() if v == p.name} == set(part)
        stored.update(part)
    assert index["metadata"]["total_size"] == synthetic_nbytes(geo) == sum(v.numel() * 2 for v in stored.values())
    assert json.loads((folder / "config.json").read_text()) == diffusers_config(geo) == {
        "_class_name": "FluxTransformer2DModel", "attention_head_dim": 128, "axes_dims_rope": [16, 56, 56],
        "guidance_embeds": True, "in_channels": 384, "joint_attention_dim": 4096, "num_attention_heads": 2,
        "num_layers": 2, "num_single_layers": 1, "out_channels": 64, "patch_size": 1,
        "pooled_projection_dim": 768}

    model = FluxTransformer2DModel.from_pretrained(folder, torch_dtype=torch.bfloat16)
    params = model.state_dict()
    assert set(params) == set(stored)
    for k, v in stored.items():
        assert v.dtype == torch.bfloat16 and torch.equal(params[k], v), k
    with open_source(tmp_path) as src:
        assert detect_model(src) == ModelInfo("flux-fill", geo)
        # Spot-check the mapping on a fused tensor: to_k is the middle third of BFL qkv.
        qkv = src.read("double_blocks.1.img_attn.qkv.weight")
        np.testing.assert_array_equal(qkv[256:512], stored["transformer_blocks.1.attn.to_k.weight"].float().numpy())


def test_outputs_appear_only_when_complete(tmp_path, monkeypatch):
    target = tmp_path / "m.safetensors"
    write_synthetic_flux(target, GEO)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.safetensors"]

    calls = []

    def interrupt(n: int) -> None:
        calls.append(n)
        if len(calls) == 10:
            raise KeyboardInterrupt

    before = sha(target)
    for layout, name in (("bfl", "m.safetensors"), ("diffusers", "d")):
        calls.clear()
        with pytest.raises(KeyboardInterrupt):
            write_synthetic_flux(tmp_path / name, GEO, layout=layout, seed=9, progress=interrupt)
        assert sorted(p.name for p in tmp_path.iterdir()) == ["m.safetensors"]  # no partial, no half folder
    assert sha(target) == before

    missing = tmp_path / "no" / "such" / "dir.safetensors"
    with pytest.raises(OutputError) as e:
        write_synthetic_flux(missing, GEO)
    assert str(e.value) == f"{missing}: cannot write (No such file or directory)"

    folder = write_synthetic_flux(tmp_path / "d", GEO, layout="diffusers")
    with pytest.raises(OutputError) as e:
        write_synthetic_flux(folder, GEO, layout="diffusers")
    assert str(e.value) == f"{folder}: already exists; a diffusers folder is never overwritten"


def test_partial_names_are_never_written_through_or_wiped(tmp_path):
    outside = tmp_path / "outside.bin"
    outside.write_bytes(b"not yours to overwrite")
    out = tmp_path / "out"
    out.mkdir()
    (out / "m.safetensors.partial").symlink_to(outside)
    (out / "n.safetensors.partial").mkdir()  # someone's folder and file under NAME.partial: not in the way
    (out / "n.safetensors.partial" / "keep.txt").write_text("mine")
    (out / "o.safetensors.partial").write_bytes(b"my own partial")
    for name in ("m", "n", "o"):
        target = write_synthetic_flux(out / f"{name}.safetensors", GEO)
        assert not target.is_symlink() and target.stat().st_size > 1000
    assert outside.read_bytes() == b"not yours to overwrite" and (out / "m.safetensors.partial").is_symlink()
    assert (out / "n.safetensors.partial" / "keep.txt").read_text() == "mine"
    assert (out / "o.safetensors.partial").read_bytes() == b"my own partial"
    assert sorted(p.name for p in out.iterdir()) == sorted(f"{n}.safetensors{s}" for n in "mno" for s in ("", ".partial"))


def test_diffusers_partial_folder_is_removed_only_if_this_writer_left_it(tmp_path):
    partial = tmp_path / "d.partial"
    partial.mkdir()
    (partial / "keep.txt").write_text("mine")
    with pytest.raises(OutputError) as e:
        write_synthetic_flux(tmp_path / "d", GEO, layout="diffusers")
    assert str(e.value) == (f"{partial}: is in the way and was not left by this writer "
                            f"(no {synthetic.PARTIAL_MARKER} in it); move it away and re-run")
    assert (partial / "keep.txt").read_text() == "mine" and not (tmp_path / "d").exists()

    (partial / synthetic.PARTIAL_MARKER).write_bytes(b"")  # what an interrupted (killed) run of ours leaves
    folder = write_synthetic_flux(tmp_path / "d", GEO, layout="diffusers")
    assert not partial.exists()
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "diffusion_pytorch_model.safetensors"]

    link = tmp_path / "e.partial"
    link.symlink_to(partial.parent / "elsewhere", target_is_directory=True)
    with pytest.raises(OutputError, match=r"e\.partial: is in the way and was not left by this writer"):
        write_synthetic_flux(tmp_path / "e", GEO, layout="diffusers")
    assert link.is_symlink() and not (tmp_path / "elsewhere").exists()


def test_streams_in_chunks_never_a_whole_tensor(tmp_path, monkeypatch):
    monkeypatch.setattr(synthetic, "CHUNK_ELEMENTS", 4096)
    geo = FluxGeometry(2, 2, hidden=512)
    largest = max(math.prod(s) for s in bfl_tensor_shapes(geo).values()) * 2
    write_synthetic_flux(tmp_path / "warm.safetensors", FluxGeometry(0, 0, hidden=128))  # tables, JIT
    tracemalloc.start()
    try:
        p = write_synthetic_flux(tmp_path / "m.safetensors", geo)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert p.stat().st_size > 10 * largest
    assert peak < largest / 8, (peak, largest)


def test_bad_arguments():
    cases = {
        "dtype 'I8'; expected one of BF16, F16, F32, F8_E4M3, F8_E5M2": dict(dtype="I8"),
        "layout 'gguf'; expected one of bfl, comfyui, diffusers": dict(layout="gguf"),
        "hidden size 200; expected a positive multiple of 128": dict(geometry=FluxGeometry(hidden=200)),
        "std 0.0; expected a positive finite number": dict(std=0.0),
    }
    for message, kwargs in cases.items():
        with pytest.raises(ValueError) as e:
            write_synthetic_flux("/nonexistent/x.safetensors", **kwargs)
        assert str(e.value) == message


def test_script(tmp_path):
    out = tmp_path / "tiny"
    run = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "make_synthetic_flux.py"), "-o", str(out), "--double-blocks", "1",
         "--single-blocks", "2", "--hidden", "256", "--family", "schnell", "--dtype", "F16", "--layout",
         "diffusers", "--seed", "2", "--shard-gb", "0.002"],
        capture_output=True, text=True, cwd=REPO)
    assert run.returncode == 0, run.stderr
    assert run.stdout.startswith(f"wrote {out}: 0.0")
    with open_source(out) as src:
        assert detect_model(src) == ModelInfo("flux-schnell", FluxGeometry(1, 2, hidden=256, guidance=False))
        assert {t.dtype for t in src.tensors.values()} == {"F16"}
        assert src.metadata["flux_gguf.synthetic"] == "seed=2 std=0.02"
    assert (out / DIFFUSERS_INDEX).exists()

    bad = subprocess.run([sys.executable, str(REPO / "scripts" / "make_synthetic_flux.py"), "-o", str(out),
                          "--hidden", "320"], capture_output=True, text=True, cwd=REPO)
    assert bad.returncode == 2
    assert bad.stderr.splitlines()[-1] == "Error: Invalid value for --hidden: 320 is not a multiple of 128"
