"""The kohya side-car: exact export, honest record, and the same transformer output in diffusers.

The diffusers check builds a FLUX-shaped FluxTransformer2DModel with the real hidden size (its
kohya converter hard-codes 3072 when splitting linear1) but one double and one single block, in
bfloat16 (about 1.1 GB), and compares its output with the original LoRA file loaded against its
output with our side-car loaded.
"""
from __future__ import annotations

import hashlib
import json

import lora_fixtures as F
import numpy as np
import pytest
import torch
from safetensors import safe_open

from converter.errors import LoraError, OutputError
from converter.layout import FluxGeometry
from converter.lora.export import export_kohya, kohya_tensors
from converter.lora.formats import load_lora

SHAPES = F.base_shapes()
TRUTH = F.make_truth()
WANT = F.dense_truth(TRUTH, SHAPES)
H = F.GEO.hidden


def export(lora, path, dtype="BF16"):
    return export_kohya(lora, path, dtype=dtype, base_model="black-forest-labs/FLUX.1-Kontext-dev", strength=0.8)


@pytest.mark.parametrize("dtype", ["BF16", "F16", "F32"])
def test_export_round_trips_exactly(tmp_path, dtype):
    lora = load_lora(F.write_diffusers(tmp_path / "d.safetensors", TRUTH, alpha="metadata"))
    rec = export(lora, tmp_path / "side.safetensors", dtype)
    data = (tmp_path / "side.safetensors").read_bytes()
    assert rec.path == tmp_path / "side.safetensors"
    assert rec.size == len(data)
    assert rec.sha256 == hashlib.sha256(data).hexdigest()
    assert list(tmp_path.glob("*.partial")) == [] and list(tmp_path.glob(".*")) == []
    back = load_lora(rec.path)
    assert back.format == "kohya"
    got = F.dense_canonical(back, SHAPES)
    assert sorted(got) == sorted(WANT)
    for name in WANT:  # bfloat16-valued truth and power-of-two scales: every dtype holds it exactly
        np.testing.assert_allclose(got[name], WANT[name], rtol=1e-6, atol=1e-6 * np.abs(WANT[name]).max(), err_msg=name)


def test_export_layout_dtypes_and_metadata(tmp_path):
    lora = load_lora(F.write_kohya(tmp_path / "k.safetensors", TRUTH))
    rec = export(lora, tmp_path / "side.safetensors")
    with safe_open(str(rec.path), framework="pt") as f:
        assert f.metadata() == {
            "format": "pt",
            "ss_network_module": "networks.lora_flux",
            "flux_gguf.base_model": "black-forest-labs/FLUX.1-Kontext-dev",
            "flux_gguf.recommended_strength": "0.8",
            "flux_gguf.source_format": "kohya",
        }
        qkv = "lora_unet_double_blocks_0_img_attn_qkv"
        assert f.get_slice(f"{qkv}.lora_down.weight").get_shape() == [10, H]  # ranks 4 + 2 + 4 stacked
        assert f.get_slice(f"{qkv}.lora_up.weight").get_shape() == [3 * H, 10]
        assert f.get_tensor(f"{qkv}.alpha").item() == 10.0
        assert f.get_slice("lora_unet_single_blocks_0_linear1.lora_up.weight").get_shape() == [7 * H, 20]
        assert f.get_slice(f"{qkv}.lora_up.weight").get_dtype() == "BF16"
        assert f.get_slice(f"{qkv}.alpha").get_dtype() == "F32"
        up = f.get_tensor(f"{qkv}.lora_up.weight").float().numpy()
    # block-diagonal: the k rows (rank 2, columns 4:6) hold nothing in the q and v columns
    assert not up[H:2 * H, :4].any() and not up[H:2 * H, 6:].any()
    # a whole-tensor module keeps its factors and alpha as they were
    tensors = kohya_tensors(lora)
    (img_in,) = TRUTH["img_in"]
    np.testing.assert_array_equal(tensors["lora_unet_img_in.lora_up.weight"], img_in.b)
    assert tensors["lora_unet_img_in.alpha"] == 4.0  # alpha None in the truth: written as rank
    assert tensors["lora_unet_double_blocks_0_txt_attn_qkv.alpha"] == 8.0
    # final_layer modules fold alpha (diffusers reads them without it)
    (final,) = TRUTH["final_layer.adaLN_modulation.1"]
    assert final.scale != 1.0
    assert tensors["lora_unet_final_layer_adaLN_modulation_1.alpha"] == 4.0
    np.testing.assert_array_equal(tensors["lora_unet_final_layer_adaLN_modulation_1.lora_up.weight"],
                                  final.b * np.float32(final.scale))


def test_export_never_touches_what_sits_under_the_old_partial_names(tmp_path):
    """Partial files are hidden and unique (manifests.hashing.partial_path): a link or folder a user
    keeps under NAME.partial is neither written through nor in the way."""
    lora = load_lora(F.write_kohya(tmp_path / "k.safetensors", TRUTH))
    outside = tmp_path / "outside.bin"
    outside.write_bytes(b"not yours to overwrite")
    out = tmp_path / "out"
    out.mkdir()
    (out / "side.safetensors.partial").symlink_to(outside)
    rec = export(lora, out / "side.safetensors")
    assert outside.read_bytes() == b"not yours to overwrite"
    assert not rec.path.is_symlink() and rec.sha256 == hashlib.sha256(rec.path.read_bytes()).hexdigest()
    assert sorted(p.name for p in out.iterdir()) == ["side.safetensors", "side.safetensors.partial"]

    (out / "other.safetensors.partial").mkdir()
    (out / "other.safetensors.partial" / "keep.txt").write_text("mine")
    rec = export(lora, out / "other.safetensors")
    assert rec.sha256 == hashlib.sha256(rec.path.read_bytes()).hexdigest()
    assert (out / "other.safetensors.partial" / "keep.txt").read_text() == "mine"


def test_export_errors(tmp_path):
    lora = load_lora(F.write_kohya(tmp_path / "k.safetensors", TRUTH))
    with pytest.raises(LoraError) as err:
        export(lora, tmp_path / "side.safetensors", "Q8_0")
    assert str(err.value) == "unsupported side-car dtype 'Q8_0'; expected one of BF16, F16, F32"
    with pytest.raises(LoraError) as err:
        export_kohya(lora, tmp_path / "side.safetensors", base_model="", strength=1.0)
    assert str(err.value) == "base_model must name the model the side-car is for"
    with pytest.raises(LoraError) as err:
        export_kohya(lora, tmp_path / "side.safetensors", base_model="m", strength=float("inf"))
    assert str(err.value) == "recommended strength must be a finite number, got inf"
    missing_dir = tmp_path / "no" / "side.safetensors"
    with pytest.raises(OutputError) as err:
        export(lora, missing_dir)
    assert str(err.value) == f"cannot write LoRA side-car {missing_dir}: No such file or directory"
    assert not (tmp_path / "side.safetensors").exists()


def test_export_refuses_what_a_sidecar_cannot_carry(tmp_path):
    qkv = "double_blocks.0.img_attn.qkv"
    p = F.write_bfl(tmp_path / "c.safetensors", {qkv: TRUTH[qkv]}, biases={qkv: np.ones(3 * H, np.float32)},
                    norms={"single_blocks.0.norm.key_norm.scale": np.ones(128, np.float32)})
    with pytest.raises(LoraError) as err:
        export(load_lora(p), tmp_path / "side.safetensors")
    assert str(err.value) == (
        f"{p} (bfl_control): a kohya side-car cannot carry full-tensor deltas or replacements: "
        "double_blocks.0.img_attn.qkv.bias, single_blocks.0.norm.key_norm.scale; merge this LoRA instead")
    assert not (tmp_path / "side.safetensors").exists()


def test_export_f16_overflow(tmp_path):
    (part,) = TRUTH["img_in"]
    huge = {"img_in": [F.TruthPart(part.a, part.b * 1e6, None, None)]}
    lora = load_lora(F.write_kohya(tmp_path / "k.safetensors", huge))
    with pytest.raises(LoraError) as err:
        export(lora, tmp_path / "side.safetensors", "F16")
    assert str(err.value).startswith("lora_unet_img_in.lora_up.weight overflows F16 (largest magnitude ")
    assert str(err.value).endswith("); export as BF16 or F32")
    assert list(tmp_path.glob("side*")) == []


# ---- the side-car in diffusers ----

GEO_REAL = FluxGeometry(double_blocks=1, single_blocks=1)  # hidden 3072, real key shapes
N_MODULES = 30  # diffusers LoRA targets of 1 double + 1 single block + embedders and final layer


@pytest.fixture(scope="module")
def transformer():
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        model = FluxTransformer2DModel(
            patch_size=1, in_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=128,
            num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
            axes_dims_rope=(16, 56, 56),
        )
    finally:
        torch.set_default_dtype(previous)
    return model.eval()


def run(model) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    img_ids = torch.zeros(16, 3)
    img_ids[:, 1], img_ids[:, 2] = torch.arange(16) // 4, torch.arange(16) % 4
    with torch.no_grad():
        out = model(
            hidden_states=torch.randn(1, 16, 64, generator=g).bfloat16(),
            encoder_hidden_states=torch.randn(1, 8, 4096, generator=g).bfloat16(),
            pooled_projections=torch.randn(1, 768, generator=g).bfloat16(),
            timestep=torch.tensor([0.5]).bfloat16(), guidance=torch.tensor([3.5]).bfloat16(),
            img_ids=img_ids, txt_ids=torch.zeros(8, 3),
        ).sample
    return out.float()


def load_adapter(model, path, name: str) -> int:
    """diffusers' own FLUX LoRA reading (format detection + conversion), then PEFT loading.

    diffusers 0.42's kohya converter leaves embedder and final-layer keys without the
    ``transformer.`` prefix, which ``load_lora_adapter(prefix="transformer")`` would drop; both
    files go through the same prefix-free loading so every module is compared.
    """
    from diffusers import FluxPipeline
    from peft.tuners.lora import LoraLayer

    sd, alphas, meta = FluxPipeline.lora_state_dict(str(path), return_alphas=True, return_lora_metadata=True)
    assert not alphas
    sd = {k.removeprefix("transformer."): v for k, v in sd.items()}
    meta = {k.removeprefix("transformer."): v for k, v in meta.items()} if meta else None
    model.load_lora_adapter(sd, prefix=None, metadata=meta, adapter_name=name)
    return sum(1 for _, m in model.named_modules() if isinstance(m, LoraLayer) and name in m.lora_A)


def outputs_with(model, path, name: str) -> torch.Tensor:
    assert load_adapter(model, path, name) == N_MODULES
    try:
        return run(model)
    finally:
        model.delete_adapters(name)


@pytest.mark.parametrize("origin, dtype", [("diffusers", "F32"), ("kohya", "BF16")])
def test_sidecar_gives_the_original_output_in_diffusers(transformer, tmp_path, origin, dtype):
    truth = F.make_truth(GEO_REAL, seed=7)
    if origin == "diffusers":  # split q/k/v/proj_mlp, alphas in PEFT metadata
        original = F.write_diffusers(tmp_path / "orig.safetensors", truth, GEO_REAL, alpha="metadata")
    else:
        # diffusers reads kohya final_layer modules without their alpha; keep it at rank here so
        # diffusers reads the original right (the next test covers alpha != rank).
        for module in ("final_layer.linear", "final_layer.adaLN_modulation.1"):
            truth[module][0].alpha = None
        original = F.write_kohya(tmp_path / "orig.safetensors", truth, GEO_REAL, dtype=torch.bfloat16)
    sidecar = export(load_lora(original), tmp_path / "side.safetensors", dtype).path

    base = run(transformer)
    out_original = outputs_with(transformer, original, "original")
    out_sidecar = outputs_with(transformer, sidecar, "sidecar")
    effect = (out_original - base).abs().max().item()
    assert effect > 0.05 * base.abs().max().item()  # the LoRA changes the output for real
    assert (out_sidecar - out_original).abs().max().item() <= 0.01 * effect
    torch.testing.assert_close(run(transformer), base)  # adapters removed cleanly


def test_sidecar_of_a_kohya_lora_with_final_layer_alpha(transformer, tmp_path):
    """Final-layer alpha != rank: the side-car folds it, so diffusers gets what the PEFT file gives."""
    truth = F.make_truth(GEO_REAL, seed=8)
    assert truth["final_layer.adaLN_modulation.1"][0].scale == 2.0
    reference = F.write_diffusers(tmp_path / "ref.safetensors", truth, GEO_REAL, alpha="metadata")
    kohya = F.write_kohya(tmp_path / "orig.safetensors", truth, GEO_REAL)
    sidecar = export(load_lora(kohya), tmp_path / "side.safetensors", "F32").path
    base = run(transformer)
    out_reference = outputs_with(transformer, reference, "reference")
    out_sidecar = outputs_with(transformer, sidecar, "sidecar")
    effect = (out_reference - base).abs().max().item()
    assert (out_sidecar - out_reference).abs().max().item() <= 0.01 * effect


def test_peft_metadata_in_the_original_is_what_diffusers_reads(tmp_path):
    """The fixture's PEFT config (alpha_pattern etc.) is the one diffusers hands to LoraConfig."""
    from diffusers import FluxPipeline

    original = F.write_diffusers(tmp_path / "orig.safetensors", F.make_truth(GEO_REAL, seed=7), GEO_REAL)
    _, _, meta = FluxPipeline.lora_state_dict(str(original), return_alphas=True, return_lora_metadata=True)
    with safe_open(str(original), framework="pt") as f:
        assert meta == json.loads(f.metadata()["lora_adapter_metadata"])
    assert meta["transformer.alpha_pattern"]  # alphas differ per module, so the pattern is exercised
