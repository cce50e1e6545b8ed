"""Merging LoRAs before quantization: the math, the hook contract, validation errors, option parsing."""
from __future__ import annotations

import math
import pathlib

import lora_fixtures as F
import numpy as np
import pytest

import quant_kernels
from converter.errors import LoraError
from converter.layout import FluxGeometry, bfl_tensor_shapes
from converter.lora.formats import load_lora
from converter.lora.merge import (
    LoraMerger,
    LoraSpec,
    build_merger,
    parse_lora_entries,
    parse_lora_option,
    validate_loras,
)

SHAPES = F.base_shapes()
BASE = F.random_base(SHAPES)
TRUTH = F.make_truth()
WANT = F.dense_truth(TRUTH, SHAPES)
H = F.GEO.hidden


def qtype_for(name: str) -> str:
    """Q4_K where rows allow it (as the published recipes), F16 for img_in's 64-wide rows, F32 for 1-D."""
    shape = SHAPES[name]
    if len(shape) == 1:
        return "F32"
    return "Q4_K" if shape[1] % 256 == 0 else "F16"


def assert_close_to(got: np.ndarray, want: np.ndarray, name: str) -> None:
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6 * np.abs(want).max(), err_msg=name)


@pytest.fixture(scope="module")
def kohya_lora(tmp_path_factory):
    return load_lora(F.write_kohya(tmp_path_factory.mktemp("k") / "k.safetensors", TRUTH))


def test_merged_then_quantized_equals_quantize_of_w_plus_delta(kohya_lora):
    merger = LoraMerger([(kohya_lora, 0.8)], SHAPES)
    assert merger.targets == frozenset(WANT)
    for name in sorted(WANT):
        w = BASE[name]
        delta = merger.delta(name)
        assert delta.dtype == np.float32 and delta.shape == w.shape
        assert_close_to(delta, 0.8 * WANT[name], name)  # the merge math, against the float64 truth
        merged = merger(name, w)
        np.testing.assert_array_equal(merged, w + delta)
        qtype = qtype_for(name)
        q = quant_kernels.quantize(merged, qtype)
        np.testing.assert_array_equal(q, quant_kernels.quantize(w + delta, qtype), err_msg=name)
        assert not np.array_equal(q, quant_kernels.quantize(w, qtype)), name
    assert not np.shares_memory(merger("img_in.weight", BASE["img_in.weight"]), BASE["img_in.weight"])


def test_every_format_merges_to_the_same_weights(tmp_path, kohya_lora):
    reference = LoraMerger([(kohya_lora, 1.0)], SHAPES)
    other = load_lora(F.write_diffusers(tmp_path / "d.safetensors", TRUTH, alpha="metadata"))
    merger = LoraMerger([(other, 1.0)], SHAPES)
    for name in sorted(WANT):
        assert_close_to(merger(name, BASE[name]), reference(name, BASE[name]), name)


def test_loras_stack_with_their_strengths(tmp_path, kohya_lora):
    truth2 = F.make_truth(seed=1)
    second = load_lora(F.write_onetrainer(tmp_path / "o.safetensors", truth2))
    want2 = F.dense_truth(truth2, SHAPES)
    merger = LoraMerger([(kohya_lora, 0.8), (second, -0.5)], SHAPES)
    for name in sorted(WANT):
        assert_close_to(merger.delta(name), 0.8 * WANT[name] - 0.5 * want2[name], name)


def test_untouched_tensors_and_zero_strength_pass_through(kohya_lora):
    merger = LoraMerger([(kohya_lora, 1.0)], SHAPES)
    bias = BASE["img_in.bias"]
    assert merger("img_in.bias", bias) is bias
    assert merger.delta("img_in.bias") is None
    off = LoraMerger([(kohya_lora, 0.0)], SHAPES)
    assert off.targets == frozenset()
    w = BASE["double_blocks.0.img_attn.qkv.weight"]
    assert off("double_blocks.0.img_attn.qkv.weight", w) is w


def test_upcasts_other_float_dtypes(kohya_lora):
    merger = LoraMerger([(kohya_lora, 1.0)], SHAPES)
    name = "single_blocks.0.linear2.weight"
    w16 = BASE[name].astype(np.float16)
    merged = merger(name, w16)
    assert merged.dtype == np.float32
    np.testing.assert_array_equal(merged, w16.astype(np.float32) + merger.delta(name))


def test_control_lora_replaces_norm_scales_and_adds_bias_deltas(tmp_path):
    rng = np.random.default_rng(3)
    bias = rng.standard_normal(3 * H).astype(np.float32)
    scale = rng.standard_normal(128).astype(np.float32)
    norm = "double_blocks.0.img_attn.norm.query_norm.scale"
    qkv = "double_blocks.0.img_attn.qkv"
    lora = load_lora(F.write_bfl(tmp_path / "c.safetensors", {qkv: TRUTH[qkv]}, biases={qkv: bias}, norms={norm: scale}))
    merger = LoraMerger([(lora, 0.5)], SHAPES)
    assert merger.targets == {f"{qkv}.weight", f"{qkv}.bias", norm}
    np.testing.assert_array_equal(merger(norm, BASE[norm]), scale)  # replaced, not scaled by strength
    assert merger.delta(norm) is None
    qkv_bias = "double_blocks.0.img_attn.qkv.bias"
    np.testing.assert_array_equal(merger(qkv_bias, BASE[qkv_bias]), BASE[qkv_bias] + np.float32(0.5) * bias)


def test_build_merger_from_specs(tmp_path):
    path = F.write_comfyui(tmp_path / "c.safetensors", TRUTH)
    merger = build_merger([parse_lora_option(f"{path}:0.25")], SHAPES)
    assert [(lora.format, s) for lora, s in merger.loras] == [("comfyui", 0.25)]
    name = "double_blocks.0.txt_attn.qkv.weight"
    assert_close_to(merger.delta(name), 0.25 * WANT[name], name)
    assert build_merger([], SHAPES).targets == frozenset()


# ---- validation errors, word for word ----

def _expect_validate(loras, shapes, message):
    with pytest.raises(LoraError) as err:
        validate_loras(loras, shapes)
    assert str(err.value) == message
    with pytest.raises(LoraError):
        LoraMerger(loras, shapes)


def test_error_targets_missing_from_the_base(tmp_path):
    geo2 = FluxGeometry(double_blocks=2, single_blocks=1, hidden=H)
    truth = {m: p for m, p in F.make_truth(geo2).items() if m in ("double_blocks.1.img_attn.proj", "double_blocks.1.txt_mlp.0")}
    p = F.write_kohya(tmp_path / "k.safetensors", truth, geo2)
    _expect_validate([(load_lora(p), 1.0)], SHAPES,
                     f"{p} (kohya): 2 LoRA targets not in the base model: "
                     "lora_unet_double_blocks_1_img_attn_proj -> double_blocks.1.img_attn.proj.weight, "
                     "lora_unet_double_blocks_1_txt_mlp_0 -> double_blocks.1.txt_mlp.0.weight")


def test_error_guidance_lora_on_a_schnell_base(tmp_path):
    p = F.write_diffusers(tmp_path / "d.safetensors", {"guidance_in.in_layer": TRUTH["guidance_in.in_layer"]}, alpha="fold")
    schnell = bfl_tensor_shapes(FluxGeometry(double_blocks=1, single_blocks=1, hidden=H, guidance=False))
    _expect_validate([(load_lora(p), 1.0)], schnell,
                     f"{p} (diffusers): 1 LoRA target not in the base model: "
                     "transformer.time_text_embed.guidance_embedder.linear_1 -> guidance_in.in_layer.weight")


def test_error_lora_for_another_hidden_size(tmp_path):
    small = FluxGeometry(double_blocks=1, single_blocks=1, hidden=128)
    truth = {"double_blocks.0.img_attn.qkv": F.make_truth(small)["double_blocks.0.img_attn.qkv"]}
    p = F.write_diffusers(tmp_path / "d.safetensors", truth, small, alpha="fold")
    _expect_validate([(load_lora(p), 1.0)], SHAPES,
                     f"{p} (diffusers): shape mismatch: "
                     "transformer.transformer_blocks.0.attn.to_q gives a [128, 128] delta for rows 0:128 of "
                     "double_blocks.0.img_attn.qkv.weight, which is [768, 256], "
                     "transformer.transformer_blocks.0.attn.to_k gives a [128, 128] delta for rows 128:256 of "
                     "double_blocks.0.img_attn.qkv.weight, which is [768, 256], "
                     "transformer.transformer_blocks.0.attn.to_v gives a [128, 128] delta for rows 256:384 of "
                     "double_blocks.0.img_attn.qkv.weight, which is [768, 256]")


def test_error_depth_control_lora_on_kontext_but_fine_on_depth(tmp_path):
    depth = FluxGeometry(double_blocks=1, single_blocks=1, hidden=H, img_in_channels=128)
    p = F.write_bfl(tmp_path / "depth.safetensors", {"img_in": F.make_truth(depth)["img_in"]}, depth,
                    norms={"single_blocks.0.norm.key_norm.scale": np.ones(128, np.float32)})
    lora = load_lora(p)
    _expect_validate([(lora, 1.0)], SHAPES,
                     f"{p} (bfl_control): shape mismatch: img_in gives a [256, 128] delta for rows 0:256 of "
                     "img_in.weight, which is [256, 64]")
    validate_loras([(lora, 1.0)], bfl_tensor_shapes(depth))


def test_error_non_finite_strength(kohya_lora):
    _expect_validate([(kohya_lora, math.nan)], SHAPES, f"{kohya_lora.path} (kohya): strength must be a finite number, got nan")


def test_error_two_loras_replace_one_tensor(tmp_path):
    norm = "single_blocks.0.norm.key_norm.scale"
    loras = []
    for i in range(2):
        p = F.write_bfl(tmp_path / f"c{i}.safetensors", {"img_in": TRUTH["img_in"]}, norms={norm: np.ones(128, np.float32)})
        loras.append((load_lora(p), 1.0))
    _expect_validate(loras, SHAPES, f"{loras[1][0].path} (bfl_control): {norm} replaces {norm}, "
                                    f"which {loras[0][0].path} already replaces")


def test_error_call_with_a_tensor_of_another_shape(kohya_lora):
    merger = LoraMerger([(kohya_lora, 1.0)], SHAPES)
    with pytest.raises(LoraError) as err:
        merger("img_in.weight", np.zeros((3, 64), np.float32))
    assert str(err.value) == "tensor img_in.weight has shape [3, 64], but the LoRAs were validated against [256, 64]"
    with pytest.raises(LoraError) as err:
        merger("img_in.weight", np.zeros((256, 64), np.uint16))
    assert str(err.value) == "tensor img_in.weight must be upcast to float before merging LoRAs, got dtype uint16"


# ---- --lora PATH[:STRENGTH] and [[lora]] ----

@pytest.mark.parametrize("text, path, strength", [
    ("style.safetensors", "style.safetensors", 1.0),
    ("loras/style.safetensors:0.8", "loras/style.safetensors", 0.8),
    ("style.safetensors:-1.5", "style.safetensors", -1.5),
    ("style.safetensors:1e-1", "style.safetensors", 0.1),
    ("C:\\loras\\style.safetensors", "C:\\loras\\style.safetensors", 1.0),
    ("C:\\loras\\style.safetensors:0.5", "C:\\loras\\style.safetensors", 0.5),
    ("dir:with:colons/style.safetensors", "dir:with:colons/style.safetensors", 1.0),
])
def test_parse_lora_option(text, path, strength):
    spec = parse_lora_option(text)
    assert spec == LoraSpec(path=pathlib.Path(path), strength=strength)
    assert spec.name is None


@pytest.mark.parametrize("text, message", [
    ("style.safetensors:strong", "invalid LoRA strength 'strong' in 'style.safetensors:strong'; "
                                 "expected PATH[:STRENGTH], e.g. style.safetensors:0.8"),
    ("style.safetensors:nan", "LoRA strength must be a finite number, got nan in 'style.safetensors'"),
    ("", "empty LoRA path; expected PATH[:STRENGTH], e.g. style.safetensors:0.8"),
    (":0.5", "empty LoRA path; expected PATH[:STRENGTH], e.g. style.safetensors:0.8"),
])
def test_parse_lora_option_errors(text, message):
    with pytest.raises(LoraError) as err:
        parse_lora_option(text)
    assert str(err.value) == message


def test_parse_lora_entries(tmp_path):
    (tmp_path / "a.safetensors").write_bytes(b"")
    specs = parse_lora_entries([{"path": "a.safetensors"}, {"path": "a.safetensors", "strength": 0.125, "name": "hyper"}],
                               tmp_path, "SPEC.toml")
    assert specs == [LoraSpec(tmp_path / "a.safetensors", 1.0), LoraSpec(tmp_path / "a.safetensors", 0.125, "hyper")]
    assert [s.label for s in specs] == ["a", "hyper"]


@pytest.mark.parametrize("raw, message", [
    ({"path": "a"}, "SPEC.toml: [[lora]] must be an array of tables with path, strength, name"),
    ([{"path": "a.safetensors", "weight": 1}], "SPEC.toml: [[lora]] entry 1: unknown key 'weight'; expected path, strength, name"),
    ([{"strength": 1}], "SPEC.toml: [[lora]] entry 1: path must be a non-empty string"),
    ([{"path": "a.safetensors", "strength": "high"}], "SPEC.toml: [[lora]] entry 1: strength must be a finite number, got 'high'"),
    ([{"path": "a.safetensors", "name": ""}], "SPEC.toml: [[lora]] entry 1: name must be a non-empty string"),
])
def test_parse_lora_entries_errors(tmp_path, raw, message):
    (tmp_path / "a.safetensors").write_bytes(b"")
    with pytest.raises(LoraError) as err:
        parse_lora_entries(raw, tmp_path, "SPEC.toml")
    assert str(err.value) == message
    with pytest.raises(LoraError) as err:
        parse_lora_entries([{"path": "a.safetensors"}, {"path": "missing.safetensors"}], tmp_path, "SPEC.toml")
    assert str(err.value) == f"SPEC.toml: [[lora]] entry 2: file not found: {tmp_path / 'missing.safetensors'}"
