"""FLUX.2 ([dev], [klein] 4B / 9B): inventory, detection, diffusers naming, conversion bytes vs ggml.

The inventory is checked against diffusers' own ``Flux2Transformer2DModel`` (its state dict and
``convert_flux2_transformer_checkpoint_to_diffusers``), the full-size counts against headers of
sparse files (no disk used), and every quantized tensor against ggml's quantizer (tests/oracle.py).
Weights are synthetic (converter.synthetic): quality figures from them would say nothing.
"""
from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest
import torch
from gguf import GGUFReader
from safetensors.torch import load_file, save_file

from converter.detect import ModelInfo, detect_model
from converter.diffusers_names import bfl_name_for, diffusers_arch, diffusers_parts
from converter.errors import ModelDetectionError
from converter.layout import FLUX2, FLUX2_FAMILIES, bfl_tensor_shapes, flux2_geometry
from converter.pipeline import convert, plan_source
from converter.recipes import layout_tensors, make_plans
from converter.safetensors_io import encode_header
from converter.sources import open_source
from converter.synthetic import diffusers_config, write_synthetic_flux
from oracle import quantize as ggml_quantize

# (tensors, parameters) of the real models: 9 global tensors, 12 per double block, 4 per single block.
FULL = {
    "flux2-dev": (299, 32_223_281_152),
    "flux2-klein-4b": (149, 3_875_544_576),
    "flux2-klein-9b": (201, 9_078_581_248),
}
KLEIN = flux2_geometry("flux2-klein-4b", hidden=256)  # 2 heads: every row a multiple of 256


def _sparse(path, shapes, dtype="BF16"):
    header = encode_header([(n, dtype, s) for n, s in shapes.items()], {})
    with open(path, "wb") as f:
        f.write(header)
    os.truncate(path, len(header) + sum(math.prod(s) for s in shapes.values()) * 2)
    return path


@pytest.mark.parametrize("family", list(FULL))
def test_full_size_inventory_detected_from_headers_alone(tmp_path, family):
    geo = flux2_geometry(family)
    p = _sparse(tmp_path / f"{family}.safetensors", bfl_tensor_shapes(geo))
    with open_source(p) as src:
        assert detect_model(src) == ModelInfo(family, geo)
        assert (len(src.tensors), sum(math.prod(t.shape) for t in src.tensors.values())) == FULL[family]
        assert not any(n.endswith(".bias") or n.startswith("vector_in.") for n in src.tensors)
        assert ("guidance_in.in_layer.weight" in src.tensors) == (family == "flux2-dev")
    size = FLUX2_FAMILIES[family]
    assert (geo.hidden, geo.double_blocks, geo.single_blocks, geo.context_dim) == (
        size.hidden, size.double_blocks, size.single_blocks, size.context_dim)


def test_full_size_dev_shapes():
    s = bfl_tensor_shapes(flux2_geometry("flux2-dev"))
    assert s["img_in.weight"] == (6144, 128)
    assert s["txt_in.weight"] == (6144, 15360)
    assert s["double_stream_modulation_img.lin.weight"] == (36864, 6144)
    assert s["single_stream_modulation.lin.weight"] == (18432, 6144)
    assert s["double_blocks.7.img_mlp.0.weight"] == (36864, 6144)
    assert s["double_blocks.7.txt_mlp.2.weight"] == (6144, 18432)
    assert s["single_blocks.47.linear1.weight"] == (55296, 6144)
    assert s["single_blocks.47.linear2.weight"] == (6144, 24576)
    assert s["final_layer.linear.weight"] == (128, 6144)
    assert "single_blocks.48.linear1.weight" not in s and "double_blocks.8.img_attn.qkv.weight" not in s


@pytest.mark.parametrize("family", list(FULL))
def test_names_are_diffusers_own(family):
    """Our BFL -> diffusers table gives exactly Flux2Transformer2DModel's keys and shapes, and diffusers'
    converter maps our BFL names onto them (built on the meta device: no memory)."""
    from diffusers import Flux2Transformer2DModel
    from diffusers.loaders.single_file_utils import convert_flux2_transformer_checkpoint_to_diffusers

    geo = flux2_geometry(family, hidden=128)
    config = {k: v for k, v in diffusers_config(geo).items() if k != "_class_name"}
    with torch.device("meta"):
        model = Flux2Transformer2DModel(**config)
    theirs = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    shapes = bfl_tensor_shapes(geo)
    ours: dict[str, tuple[int, ...]] = {}
    for name, shape in shapes.items():
        parts = diffusers_parts(name, FLUX2)
        assert parts is not None, name
        for i, key in enumerate(parts.parts):
            ours[key] = (shape[0] // len(parts.parts), *shape[1:])
            assert bfl_name_for(key, FLUX2) == (name, i)
    assert ours == theirs
    assert diffusers_arch(theirs) == FLUX2
    converted = convert_flux2_transformer_checkpoint_to_diffusers(
        {n: torch.empty(s, device="meta") for n, s in shapes.items()})
    assert {k: tuple(v.shape) for k, v in converted.items()} == theirs


@pytest.mark.parametrize("layout", ["bfl", "comfyui", "diffusers"])
@pytest.mark.parametrize("family", list(FULL))
def test_each_family_in_each_layout(tmp_path, family, layout):
    geo = flux2_geometry(family, hidden=128)
    path = write_synthetic_flux(tmp_path / "m", geo, layout=layout, dtype="F8_E4M3", shard_bytes=3_000_000)
    if layout == "diffusers":
        assert len(list(path.glob("*-of-*.safetensors"))) > 1  # sharded, with an index
    with open_source(path) as src:
        assert detect_model(src) == ModelInfo(family, geo)
        assert list(src.tensors) == list(bfl_tensor_shapes(geo))


@pytest.fixture(scope="module")
def klein_state(tmp_path_factory):
    p = write_synthetic_flux(tmp_path_factory.mktemp("k") / "k.safetensors", flux2_geometry("flux2-klein-4b", hidden=128))
    return load_file(p)


def refusal(tmp_path, tensors) -> str:
    p = tmp_path / "model.safetensors"
    save_file(tensors, p)
    with open_source(p) as src, pytest.raises(ModelDetectionError) as e:
        detect_model(src)
    assert "\n" not in str(e.value)
    return str(e.value).replace(str(p), "MODEL")


def test_unknown_size_names_what_was_found(tmp_path, klein_state):
    sd = {k: v for k, v in klein_state.items() if not k.startswith("single_blocks.19.")}
    assert refusal(tmp_path, sd) == (
        "MODEL: a FLUX.2 transformer of unknown size: 5 double + 19 single blocks, hidden size 128; expected "
        "8 + 48 (flux2-dev); 5 + 20 (flux2-klein-4b); 8 + 24 (flux2-klein-9b)")


def test_wrong_text_width_guidance_and_channels(tmp_path, klein_state):
    sd = {**klein_state, "txt_in.weight": torch.zeros(128, 4096, dtype=torch.bfloat16)}
    assert refusal(tmp_path, sd) == ("MODEL: txt_in.weight has shape [128, 4096]; flux2-klein-4b takes 7680-wide "
                                     "text features (expected [128, 7680])")
    sd = {**klein_state, "guidance_in.in_layer.weight": torch.zeros(128, 256, dtype=torch.bfloat16)}
    assert refusal(tmp_path, sd) == ("MODEL: 5 double + 20 single blocks, hidden size 128, guidance_in is "
                                     "flux2-klein-4b, which has no guidance_in embedder; this file has one")
    sd = {**klein_state, "img_in.weight": torch.zeros(128, 64, dtype=torch.bfloat16)}
    assert refusal(tmp_path, sd) == "MODEL: img_in.weight has 64 input channels; FLUX.2 (flux2-klein-4b) has 128"
    # FLUX.1 tensors in a FLUX.2 file, and a FLUX.2 tensor missing, are named.
    sd = {**klein_state, "double_blocks.0.img_mod.lin.weight": torch.zeros(768, 128, dtype=torch.bfloat16)}
    assert refusal(tmp_path, sd) == ("MODEL holds tensors a FLUX.2 transformer does not have: "
                                     "double_blocks.0.img_mod.lin.weight")
    sd = {k: v for k, v in klein_state.items() if k != "single_stream_modulation.lin.weight"}
    assert refusal(tmp_path, sd) == "MODEL is missing single_stream_modulation.lin.weight"


@pytest.fixture(scope="module")
def klein(tmp_path_factory):
    return write_synthetic_flux(tmp_path_factory.mktemp("klein") / "klein.safetensors", KLEIN, seed=3)


def _tensors(path):
    return {t.name: (t.tensor_type.name, bytes(t.data.reshape(-1).view(np.uint8))) for t in GGUFReader(path).tensors}


@pytest.mark.parametrize("variant", ["Q4_K_M", "Q2_K", "Q3_K_S", "Q5_K_M", "Q6_K", "Q8_0"])
def test_every_tensor_equals_ggml(klein, tmp_path, variant):
    [rec] = convert(klein, tmp_path, [variant])
    stored = _tensors(rec.path)
    raw = {k: v.view(torch.int16).numpy().tobytes() for k, v in load_file(klein).items()}
    quantized = 0
    with open_source(klein) as s:
        assert list(stored) == list(s.tensors)
        for name in s.tensors:
            qtype, data = stored[name]
            x = s.read(name)
            if x.ndim == 1 or name == "img_in.weight":
                assert qtype == "F32", name
            elif name.startswith(("txt_in.", "time_in.", "final_layer.")):
                assert (qtype, data) == ("BF16", raw[name]), name  # kept: the source's own bits
            else:
                assert data == ggml_quantize(x, qtype).tobytes(), name
                quantized += 1
    # qkv (2 per double block) raised in _M; the shared modulations get the base type.
    assert quantized == 5 * 8 + 20 * 2 + 3  # 8 weights per double block, 2 per single, 3 shared modulations
    types = {n: t for n, (t, _) in stored.items()}
    base = {"Q4_K_M": "Q4_K", "Q2_K": "Q2_K", "Q3_K_S": "Q3_K", "Q5_K_M": "Q5_K", "Q6_K": "Q6_K", "Q8_0": "Q8_0"}[variant]
    assert types["double_stream_modulation_img.lin.weight"] == base
    assert types["double_blocks.4.txt_attn.qkv.weight"] == {"Q4_K_M": "Q5_K", "Q5_K_M": "Q6_K"}.get(variant, base)
    r = GGUFReader(rec.path)
    assert r.fields["general.architecture"].contents() == "flux"
    assert r.fields["flux_gguf.model_family"].contents() == "flux2-klein-4b"


def test_sharded_diffusers_folder_converts_to_the_same_bytes(klein, tmp_path):
    folder = write_synthetic_flux(tmp_path / "transformer", KLEIN, layout="diffusers", seed=3, shard_bytes=8_000_000)
    assert len(list(folder.glob("*-of-*.safetensors"))) > 1
    [a] = convert(klein, tmp_path / "a", ["Q4_K_M"], name="k")
    [b] = convert(folder, tmp_path / "b", ["Q4_K_M"], name="k")
    assert _tensors(a.path) == _tensors(b.path)


def test_dry_run_sizes_are_exact(klein, tmp_path):
    variants = ["Q4_K_M", "Q8_0", "BF16"]
    with open_source(klein) as s:
        plans = plan_source(s, variants, name="klein")  # what --dry-run prints
    written = convert(klein, tmp_path, variants, name="klein")
    assert [p.file_size for p in plans] == [r.size for r in written] == [r.path.stat().st_size for r in written]


def test_full_size_dev_plan():
    """Q4_K_M of the 64 GB [dev] layout, planned from shapes alone."""
    [plan] = make_plans(["Q4_K_M"], layout_tensors(flux2_geometry("flux2-dev")), name="flux2-dev", family="flux2-dev")
    types = {e.name: e.qtype for e in plan.entries}
    assert types["img_in.weight"] == "F32" and types["txt_in.weight"] == "BF16"
    assert types["double_blocks.0.img_attn.qkv.weight"] == "Q5_K"
    assert types["single_blocks.47.linear1.weight"] == "Q4_K"
    assert not any(e.rule == "fallback" for e in plan.entries)
    assert 18_000_000_000 < plan.file_size < 19_000_000_000


def test_diffusers_loads_our_gguf(klein, tmp_path):
    """Flux2Transformer2DModel.from_single_file + GGUFQuantizationConfig reads our files: the BF16 GGUF
    gives the source's output exactly, Q4_K_M close to it."""
    import diffusers

    cfg = tmp_path / "cfg"
    cfg.mkdir()
    (cfg / "config.json").write_text(json.dumps(diffusers_config(KLEIN)))
    recs = convert(klein, tmp_path, ["BF16", "Q4_K_M"])
    f32 = {"torch_dtype": torch.float32}
    ref = diffusers.Flux2Transformer2DModel.from_single_file(str(klein), config=str(cfg), local_files_only=True, **f32)
    gen = torch.Generator().manual_seed(0)
    kw = dict(hidden_states=torch.randn(1, 16, 128, generator=gen),
              encoder_hidden_states=torch.randn(1, 8, KLEIN.context_dim, generator=gen),
              timestep=torch.tensor([0.5]), img_ids=torch.zeros(16, 4), txt_ids=torch.zeros(8, 4), return_dict=False)
    with torch.inference_mode():
        want = ref(**kw)[0]
        errors = []
        for rec in recs:
            model = diffusers.Flux2Transformer2DModel.from_single_file(
                str(rec.path), config=str(cfg), local_files_only=True,
                quantization_config=diffusers.GGUFQuantizationConfig(compute_dtype=torch.float32), **f32)
            got = model(**kw)[0]
            errors.append(float((got - want).norm() / want.norm()))
    assert errors[0] == 0.0
    assert 0 < errors[1] < 0.05
