"""Every FLUX LoRA format normalizes to the same canonical delta; every bad file gets its exact error."""
from __future__ import annotations

import json
import re

import lora_fixtures as F
import numpy as np
import pytest
import torch

from converter.errors import LoraError
from converter.lora.formats import detect_format, load_lora

SHAPES = F.base_shapes()
TRUTH = F.make_truth()
WANT = F.dense_truth(TRUTH, SHAPES)
H = F.GEO.hidden

# case -> (writer, format load_lora must report)
CASES = {
    "kohya": (lambda p: F.write_kohya(p, TRUTH), "kohya"),
    "kohya_bf16": (lambda p: F.write_kohya(p, TRUTH, dtype=torch.bfloat16), "kohya"),
    "comfyui_down_up": (lambda p: F.write_comfyui(p, TRUTH), "comfyui"),
    "comfyui_A_B": (lambda p: F.write_comfyui(p, TRUTH, ab=True), "comfyui"),
    "diffusers_peft_metadata": (lambda p: F.write_diffusers(p, TRUTH, alpha="metadata"), "diffusers"),
    "diffusers_alpha_keys": (lambda p: F.write_diffusers(p, TRUTH, alpha="keys"), "diffusers"),
    "diffusers_no_alpha": (lambda p: F.write_diffusers(p, TRUTH, alpha="fold"), "diffusers"),
    "onetrainer": (lambda p: F.write_onetrainer(p, TRUTH), "onetrainer"),
    "bfl": (lambda p: F.write_bfl(p, TRUTH), "bfl"),
    "fal_kontext": (lambda p: F.write_fal_kontext(p, TRUTH), "fal_kontext"),
}


def assert_same_deltas(got: dict, want: dict) -> None:
    assert sorted(got) == sorted(want)
    for name in want:
        np.testing.assert_allclose(got[name], want[name], rtol=1e-6, atol=1e-7 * np.abs(want[name]).max(), err_msg=name)


@pytest.mark.parametrize("case", sorted(CASES))
def test_every_format_normalizes_to_the_ground_truth(tmp_path, case):
    writer, fmt = CASES[case]
    lora = load_lora(writer(tmp_path / f"{case}.safetensors"))
    assert lora.format == fmt
    assert lora.full_deltas == {} and lora.replacements == {} and lora.ignored_keys == []
    assert_same_deltas(F.dense_canonical(lora, SHAPES), WANT)
    assert lora.tensor_names() == sorted(WANT)


def test_split_targets_stay_row_slices_of_the_fused_tensor(tmp_path):
    lora = load_lora(F.write_diffusers(tmp_path / "d.safetensors", TRUTH, alpha="keys"))
    qkv = lora.modules["double_blocks.0.img_attn.qkv"]
    assert [p.rows for p in qkv] == [(0, H), (H, 2 * H), (2 * H, 3 * H)]
    assert [p.rank for p in qkv] == [4, 2, 4]
    assert [p.alpha for p in qkv] == [8.0, None, 2.0]
    linear1 = sorted(lora.modules["single_blocks.0.linear1"], key=lambda p: p.rows)
    assert [p.rows for p in linear1] == [(0, H), (H, 2 * H), (2 * H, 3 * H), (3 * H, 7 * H)]
    assert linear1[3].key == "transformer.single_transformer_blocks.0.proj_mlp"
    # kohya holds one fused LoRA per BFL module: a single full-range part.
    fused = load_lora(F.write_kohya(tmp_path / "k.safetensors", TRUTH)).modules["double_blocks.0.img_attn.qkv"]
    assert len(fused) == 1 and fused[0].rows is None and fused[0].rank == 10 and fused[0].alpha == 10.0


def test_norm_out_halves_are_swapped_back(tmp_path):
    (part,) = load_lora(F.write_diffusers(tmp_path / "d.safetensors", TRUTH, alpha="fold")).modules[
        "final_layer.adaLN_modulation.1"]
    (truth,) = TRUTH["final_layer.adaLN_modulation.1"]
    np.testing.assert_array_equal(part.b, truth.b * truth.scale)
    assert part.key == "transformer.norm_out.linear"


def test_peft_metadata_alpha_pattern_and_rslora(tmp_path):
    truth = {"img_in": TRUTH["img_in"], "single_blocks.0.linear2": TRUTH["single_blocks.0.linear2"]}
    path = F.write_diffusers(tmp_path / "d.safetensors", truth, alpha="fold")
    meta = {"lora_adapter_metadata": json.dumps({"r": 4, "lora_alpha": 16, "alpha_pattern": {"^proj_out": 2},
                                                 "use_rslora": True})}
    F.write_raw(path, {k: v for k, v in load_raw(path).items()}, meta)
    lora = load_lora(path)
    # rsLoRA scales by alpha / sqrt(r): 16 / 2 = 8 for x_embedder; single-block proj_out does not
    # match "^proj_out", so it gets lora_alpha too.
    assert lora.modules["img_in"][0].scale == pytest.approx(8.0)
    assert lora.modules["single_blocks.0.linear2"][0].scale == pytest.approx(8.0)


def load_raw(path) -> dict[str, np.ndarray]:
    from safetensors.torch import load_file

    return {k: v.float().numpy() for k, v in load_file(str(path)).items()}


@pytest.mark.parametrize("prefix", ["", "diffusion_model."])
def test_xlabs(tmp_path, prefix):
    truth = F.make_truth(xlabs=True)
    lora = load_lora(F.write_xlabs(tmp_path / "x.safetensors", truth, prefix=prefix))
    assert lora.format == "xlabs"
    assert lora.modules["single_blocks.0.linear1"][0].rows == (0, 3 * H)
    assert_same_deltas(F.dense_canonical(lora, SHAPES), F.dense_truth(truth, SHAPES))


def test_bfl_control_lora_bias_deltas_and_norm_replacements(tmp_path):
    truth = {m: TRUTH[m] for m in ("img_in", "double_blocks.0.img_attn.qkv", "single_blocks.0.linear1")}
    rng = np.random.default_rng(5)
    biases = {"img_in": rng.standard_normal(H).astype(np.float32),
              "double_blocks.0.img_attn.qkv": rng.standard_normal(3 * H).astype(np.float32)}
    norms = {"double_blocks.0.img_attn.norm.query_norm.scale": rng.standard_normal(128).astype(np.float32)}
    lora = load_lora(F.write_bfl(tmp_path / "control.safetensors", truth, biases=biases, norms=norms))
    assert lora.format == "bfl_control"
    assert sorted(lora.full_deltas) == ["double_blocks.0.img_attn.qkv.bias", "img_in.bias"]
    np.testing.assert_array_equal(lora.full_deltas["img_in.bias"], biases["img_in"])
    np.testing.assert_array_equal(lora.full_deltas["double_blocks.0.img_attn.qkv.bias"], biases["double_blocks.0.img_attn.qkv"])
    assert list(lora.replacements) == ["double_blocks.0.img_attn.norm.query_norm.scale"]
    np.testing.assert_array_equal(lora.replacements["double_blocks.0.img_attn.norm.query_norm.scale"], next(iter(norms.values())))
    weights = {k: v for k, v in F.dense_canonical(lora, SHAPES).items() if k.endswith(".weight")}
    assert_same_deltas(weights, F.dense_truth(truth, SHAPES))


def test_diffusers_bias_on_a_split_target_lands_on_its_rows_scaled_by_alpha(tmp_path):
    rng = np.random.default_rng(6)
    q_bias = rng.standard_normal(H).astype(np.float32)
    out_bias = rng.standard_normal(2 * H).astype(np.float32)
    norm_k = rng.standard_normal(128).astype(np.float32)
    lora = load_lora(F.write_diffusers(
        tmp_path / "d.safetensors", TRUTH, alpha="keys",
        biases={"transformer_blocks.0.attn.to_q": q_bias, "norm_out.linear": out_bias},
        norms={"transformer.single_transformer_blocks.0.attn.norm_k.weight": norm_k}))
    qkv_bias = lora.full_deltas["double_blocks.0.img_attn.qkv.bias"]
    assert qkv_bias.shape == (3 * H,)
    np.testing.assert_array_equal(qkv_bias[:H], 2.0 * q_bias)  # to_q: alpha 8, rank 4
    assert not qkv_bias[H:].any()
    (final,) = TRUTH["final_layer.adaLN_modulation.1"]
    swapped = np.concatenate([out_bias[H:], out_bias[:H]])
    np.testing.assert_array_equal(lora.full_deltas["final_layer.adaLN_modulation.1.bias"], swapped * np.float32(final.scale))
    np.testing.assert_array_equal(lora.replacements["single_blocks.0.norm.key_norm.scale"], norm_k)
    assert lora.origins["single_blocks.0.norm.key_norm.scale"] == "transformer.single_transformer_blocks.0.attn.norm_k.weight"


def test_text_encoder_keys_are_reported_not_merged(tmp_path):
    kohya = load_lora(F.write_kohya(tmp_path / "k.safetensors", TRUTH, te=True))
    assert kohya.ignored_keys == sorted(k for k in F._te_tensors(F.TE_KOHYA))
    assert_same_deltas(F.dense_canonical(kohya, SHAPES), WANT)
    diffusers = load_lora(F.write_diffusers(tmp_path / "d.safetensors", TRUTH, alpha="fold", te=True))
    assert diffusers.ignored_keys == [
        "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight",
        "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_B.weight",
    ]


def test_metadata_is_kept(tmp_path):
    lora = load_lora(F.write_kohya(tmp_path / "k.safetensors", TRUTH))
    assert lora.metadata == {"ss_network_module": "networks.lora_flux"}


def test_detect_format_follows_diffusers_order():
    assert detect_format(["lora_unet_img_in.lora_down.weight"]) == "kohya"
    assert detect_format(["double_blocks.0.processor.qkv_lora1.down.weight"]) == "xlabs"
    assert detect_format(["single_blocks.0.norm.key_norm.scale", "img_in.lora_A.weight"]) == "bfl_control"
    assert detect_format(["img_in.lora_A.weight"]) == "bfl"
    assert detect_format(["base_model.model.img_in.lora_A.weight"]) == "fal_kontext"
    assert detect_format(["transformer.x_embedder.lora_A.weight"]) == "diffusers"
    assert detect_format(["unet.down_blocks.0.lora_A.weight"]) is None


# ---- errors: every message word for word ----

A4 = np.ones((4, 64), np.float32)
B4 = np.ones((H, 4), np.float32)


def expect(path, tensors, message, metadata=None):
    F.write_raw(path, tensors, metadata)
    with pytest.raises(LoraError) as err:
        load_lora(path)
    assert str(err.value) == message


def test_error_lycoris(tmp_path):
    p = tmp_path / "lokr.safetensors"
    expect(p, {"lora_unet_double_blocks_0_img_attn_qkv.lokr_w1": A4, "lora_unet_double_blocks_0_img_attn_qkv.lokr_w2": A4,
               "lora_unet_double_blocks_0_img_attn_qkv.alpha": np.array(1.0)},
           f"{p}: LyCORIS (LoKr/LoHa/LoCon) weights are not supported, only plain LoRA: "
           "lora_unet_double_blocks_0_img_attn_qkv.lokr_w1, lora_unet_double_blocks_0_img_attn_qkv.lokr_w2")


def test_error_dora(tmp_path):
    p = tmp_path / "dora.safetensors"
    expect(p, {"transformer.x_embedder.lora_A.weight": A4, "transformer.x_embedder.lora_B.weight": B4,
               "transformer.x_embedder.lora_magnitude_vector": np.ones(H, np.float32)},
           f"{p}: DoRA weights are not supported, only plain LoRA: transformer.x_embedder.lora_magnitude_vector")


def test_error_lora_for_another_model(tmp_path):
    p = tmp_path / "sdxl.safetensors"
    sdxl = "lora_unet_down_blocks_1_attentions_0_proj_in"
    expect(p, {f"{sdxl}.alpha": np.array(4.0), f"{sdxl}.lora_down.weight": A4, f"{sdxl}.lora_up.weight": B4},
           f"{p}: no key maps to a FLUX.1 transformer module (kohya naming); is it a LoRA for another model? "
           f"First keys: {sdxl}.alpha, {sdxl}.lora_down.weight, {sdxl}.lora_up.weight")


def test_error_unknown_format(tmp_path):
    p = tmp_path / "unet.safetensors"
    expect(p, {"unet.down_blocks.0.attentions.0.proj_in.lora_A.weight": A4},
           f"{p}: not a FLUX.1 LoRA: no key matches a known FLUX LoRA format (kohya, comfyui, diffusers, "
           "onetrainer, bfl, bfl_control, fal_kontext, xlabs); first keys: unet.down_blocks.0.attentions.0.proj_in.lora_A.weight")


def test_error_unknown_keys(tmp_path):
    p = tmp_path / "k.safetensors"
    expect(p, {"lora_unet_img_in.lora_down.weight": A4, "lora_unet_img_in.lora_up.weight": B4,
               "lora_unet_double_blocks_0_img_attn_foo.lora_down.weight": A4,
               "lora_unet_double_blocks_0_img_attn_foo.lora_up.weight": B4},
           f"{p} (kohya): 2 unknown keys: lora_unet_double_blocks_0_img_attn_foo.lora_down.weight, "
           "lora_unet_double_blocks_0_img_attn_foo.lora_up.weight")


def test_error_duplicate_target_same_rows_two_keys(tmp_path):
    p = tmp_path / "x.safetensors"
    t = {}
    for prefix in ("", "diffusion_model."):
        t[f"{prefix}double_blocks.0.processor.proj_lora1.down.weight"] = np.ones((4, H), np.float32)
        t[f"{prefix}double_blocks.0.processor.proj_lora1.up.weight"] = B4
    expect(p, t, f"{p} (xlabs): duplicate target: double_blocks.0.processor.proj_lora1 targets all rows of "
                 "double_blocks.0.img_attn.proj.weight, already targeted by diffusion_model.double_blocks.0.processor.proj_lora1")


def test_error_duplicate_parameter_aliases(tmp_path):
    p = tmp_path / "c.safetensors"
    expect(p, {"diffusion_model.img_in.lora_A.weight": A4, "diffusion_model.img_in.lora_B.weight": B4,
               "diffusion_model.img_in.lora_down.weight": A4, "diffusion_model.img_in.lora_up.weight": B4},
           f"{p} (comfyui): duplicate target: diffusion_model.img_in.lora_down.weight and "
           "diffusion_model.img_in.lora_A.weight are the same parameter of img_in")


def test_error_duplicate_diff_and_lora_on_one_weight(tmp_path):
    p = tmp_path / "k.safetensors"
    expect(p, {"lora_unet_img_in.lora_down.weight": A4, "lora_unet_img_in.lora_up.weight": B4,
               "lora_unet_img_in.diff": np.ones((H, 64), np.float32)},
           f"{p} (kohya): duplicate target: lora_unet_img_in.diff targets all rows of img_in.weight, "
           "already targeted by lora_unet_img_in")


def test_error_non_finite(tmp_path):
    p = tmp_path / "nan.safetensors"
    up = B4.copy()
    up[3, 1] = np.nan
    up[5, 0] = np.inf
    expect(p, {"lora_unet_img_in.lora_down.weight": A4, "lora_unet_img_in.lora_up.weight": up},
           f"{p}: tensor lora_unet_img_in.lora_up.weight holds 2 non-finite values (NaN or inf)")


def test_error_missing_partner(tmp_path):
    p = tmp_path / "k.safetensors"
    expect(p, {"lora_unet_img_in.lora_down.weight": A4, "lora_unet_img_in.alpha": np.array(4.0)},
           f"{p} (kohya): lora_unet_img_in.lora_down.weight has no partner lora_unet_img_in.lora_up.weight")


def test_error_orphan_alpha(tmp_path):
    p = tmp_path / "k.safetensors"
    expect(p, {"lora_unet_img_in.lora_down.weight": A4, "lora_unet_img_in.lora_up.weight": B4,
               "lora_unet_txt_in.alpha": np.array(4.0)},
           f"{p} (kohya): lora_unet_txt_in.alpha has no lora_down/lora_A and lora_up/lora_B weights beside it")


def test_error_rank_mismatch(tmp_path):
    p = tmp_path / "k.safetensors"
    expect(p, {"lora_unet_img_in.lora_down.weight": A4, "lora_unet_img_in.lora_up.weight": np.ones((H, 2), np.float32)},
           f"{p} (kohya): lora_unet_img_in: lora_unet_img_in.lora_down.weight has rank 4 but "
           "lora_unet_img_in.lora_up.weight has rank 2")


def test_error_alpha_not_scalar(tmp_path):
    p = tmp_path / "k.safetensors"
    expect(p, {"lora_unet_img_in.lora_down.weight": A4, "lora_unet_img_in.lora_up.weight": B4,
               "lora_unet_img_in.alpha": np.ones(2, np.float32)},
           f"{p} (kohya): lora_unet_img_in.alpha must be a scalar, got shape [2]")


def test_error_integer_tensor(tmp_path):
    from safetensors.torch import save_file

    p = tmp_path / "int.safetensors"
    save_file({"lora_unet_img_in.lora_down.weight": torch.ones(4, 64, dtype=torch.int32),
               "lora_unet_img_in.lora_up.weight": torch.ones(H, 4)}, str(p))
    with pytest.raises(LoraError) as err:
        load_lora(p)
    assert str(err.value) == f"{p}: tensor lora_unet_img_in.lora_down.weight has dtype int32; expected a float type"


def test_error_bad_peft_metadata(tmp_path):
    p = tmp_path / "d.safetensors"
    t = {"transformer.x_embedder.lora_A.weight": A4, "transformer.x_embedder.lora_B.weight": B4}
    expect(p, t, f"{p}: metadata lora_adapter_metadata is not valid JSON (Expecting value)",
           {"lora_adapter_metadata": "not json"})
    expect(p, t, f"{p}: DoRA adapters (use_dora in lora_adapter_metadata) are not supported; only plain LoRA",
           {"lora_adapter_metadata": json.dumps({"transformer.r": 4, "transformer.use_dora": True})})


def test_error_only_text_encoder(tmp_path):
    p = tmp_path / "te.safetensors"
    expect(p, F._te_tensors(F.TE_KOHYA[:1]),
           f"{p}: holds only text-encoder keys (lora_te1_text_model_encoder_layers_0_self_attn_q_proj.alpha, "
           "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight, "
           "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight); nothing to apply to the FLUX transformer")


def test_error_missing_and_unreadable_files(tmp_path):
    missing = tmp_path / "nope.safetensors"
    with pytest.raises(LoraError) as err:
        load_lora(missing)
    assert str(err.value) == f"LoRA file not found: {missing}"
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not a header....")
    with pytest.raises(LoraError) as err:
        load_lora(junk)
    assert re.fullmatch(rf"{re.escape(str(junk))}: not a readable safetensors file \(.+\)", str(err.value))
