"""FLUX.2 LoRAs: diffusers names (Flux2Transformer2DModel's own Linear modules) and kohya names land
on the right BFL tensors and rows, and validate against a FLUX.2 [klein] model's shapes."""
from __future__ import annotations

import numpy as np
import torch
from safetensors.torch import save_file

from converter.layout import bfl_tensor_shapes, flux2_geometry
from converter.lora.formats import load_lora
from converter.lora.merge import validate_loras
from converter.synthetic import diffusers_config
from lora_fixtures import dense_canonical

GEO = flux2_geometry("flux2-klein-4b", hidden=128)
SHAPES = bfl_tensor_shapes(GEO)
RANK = 2
# diffusers module -> (BFL module, index of its third of the fused qkv or None), written from
# diffusers' convert_flux2_transformer_checkpoint_to_diffusers independently of converter.lora.formats.
_GLOBAL = {
    "x_embedder": "img_in", "context_embedder": "txt_in", "proj_out": "final_layer.linear",
    "time_guidance_embed.timestep_embedder.linear_1": "time_in.in_layer",
    "time_guidance_embed.timestep_embedder.linear_2": "time_in.out_layer",
    "double_stream_modulation_img.linear": "double_stream_modulation_img.lin",
    "double_stream_modulation_txt.linear": "double_stream_modulation_txt.lin",
    "single_stream_modulation.linear": "single_stream_modulation.lin",
}
_DOUBLE = {
    "attn.to_q": ("img_attn.qkv", 0), "attn.to_k": ("img_attn.qkv", 1), "attn.to_v": ("img_attn.qkv", 2),
    "attn.add_q_proj": ("txt_attn.qkv", 0), "attn.add_k_proj": ("txt_attn.qkv", 1),
    "attn.add_v_proj": ("txt_attn.qkv", 2), "attn.to_out.0": ("img_attn.proj", None),
    "attn.to_add_out": ("txt_attn.proj", None), "ff.linear_in": ("img_mlp.0", None),
    "ff.linear_out": ("img_mlp.2", None), "ff_context.linear_in": ("txt_mlp.0", None),
    "ff_context.linear_out": ("txt_mlp.2", None),
}
_SINGLE = {"attn.to_qkv_mlp_proj": ("linear1", None), "attn.to_out": ("linear2", None)}


def _target(module: str) -> tuple[str, int | None]:
    if module in _GLOBAL:
        return _GLOBAL[module], None
    kind, index, rest = module.split(".", 2)
    table, bfl = ({"transformer_blocks": (_DOUBLE, "double_blocks"),
                   "single_transformer_blocks": (_SINGLE, "single_blocks")}[kind])
    name, third = table[rest]
    return f"{bfl}.{index}.{name}", third


def test_diffusers_and_kohya_flux2_loras(tmp_path):
    from diffusers import Flux2Transformer2DModel

    config = {k: v for k, v in diffusers_config(GEO).items() if k != "_class_name"}
    with torch.device("meta"):
        model = Flux2Transformer2DModel(**config)
    rng = np.random.default_rng(0)
    tensors, expected = {}, {}
    for module, lin in model.named_modules():
        if not isinstance(lin, torch.nn.Linear) or module == "norm_out.linear":
            continue  # norm_out's swapped halves: the same rule as FLUX.1's (tests/lora/test_lora_formats.py)
        bfl, third = _target(module)
        a = rng.standard_normal((RANK, lin.in_features)).astype(np.float32)
        b = rng.standard_normal((lin.out_features, RANK)).astype(np.float32)
        tensors[f"transformer.{module}.lora_A.weight"] = torch.from_numpy(a)
        tensors[f"transformer.{module}.lora_B.weight"] = torch.from_numpy(b)
        d = expected.setdefault(f"{bfl}.weight", np.zeros(SHAPES[f"{bfl}.weight"]))
        r0 = 0 if third is None else third * lin.out_features
        d[r0:r0 + lin.out_features] += b.astype(np.float64) @ a.astype(np.float64)
    save_file(tensors, tmp_path / "diffusers.safetensors")
    lora = load_lora(tmp_path / "diffusers.safetensors")
    assert lora.format == "diffusers"
    # every 2-D weight of the model (kept ones too) but norm_out's is a target here
    assert set(expected) == {n for n, s in SHAPES.items() if len(s) == 2} - {"final_layer.adaLN_modulation.1.weight"}
    got = dense_canonical(lora, SHAPES)
    assert set(got) == set(expected)
    for name in expected:
        np.testing.assert_allclose(got[name], expected[name], rtol=1e-6, atol=1e-6, err_msg=name)
    validate_loras([(lora, 1.0)], SHAPES)

    kohya = {}
    for name in expected:
        module = name[: -len(".weight")].replace(".", "_")
        out_f, in_f = SHAPES[name]
        kohya[f"lora_unet_{module}.lora_down.weight"] = torch.ones(RANK, in_f)
        kohya[f"lora_unet_{module}.lora_up.weight"] = torch.ones(out_f, RANK)
        kohya[f"lora_unet_{module}.alpha"] = torch.tensor(float(RANK))
    save_file(kohya, tmp_path / "kohya.safetensors")
    k = load_lora(tmp_path / "kohya.safetensors")
    assert k.format == "kohya"
    assert sorted(f"{m}.weight" for m in k.modules) == sorted(expected)
    validate_loras([(k, 1.0)], SHAPES)
