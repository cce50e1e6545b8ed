"""Plan rules, sizes of the published files, overrides and their errors (no weights are read)."""
from __future__ import annotations

import json

import pytest

from converter.errors import PlanError
from converter.layout import FluxGeometry, bfl_tensor_shapes
from converter.recipes import (
    VARIANTS,
    LayoutTensor,
    SourceRef,
    layout_tensors,
    make_plan,
    make_plans,
    parse_override,
    resolve_variant,
)

# docs/flux-gguf.md "The recipes": published FLUX.1 Kontext [dev] sizes, GB = 1e9 bytes.
PUBLISHED_GB = {
    "Q2_K": 4.024, "Q3_K_S": 5.226, "Q3_K_M": 5.368, "Q4_K_S": 6.797, "Q4_K_M": 6.932,
    "Q5_K_S": 8.277, "Q5_K_M": 8.419, "Q6_K": 9.848, "Q8_0": 12.714,
}
FILE_TYPES = {
    "Q8_0": 7, "Q2_K": 10, "Q3_K_S": 11, "Q3_K_M": 12, "Q3_K_L": 13, "Q4_K_S": 14, "Q4_K_M": 15,
    "Q5_K_S": 16, "Q5_K_M": 17, "Q6_K": 18, "F16": 1, "BF16": 32,
}
RAISED = {"Q3_K_M": ("Q3_K", "Q4_K"), "Q3_K_L": ("Q3_K", "Q4_K"), "Q4_K_M": ("Q4_K", "Q5_K"), "Q5_K_M": ("Q5_K", "Q6_K")}
KEPT_2D = {
    "img_in.weight", "txt_in.weight", "time_in.in_layer.weight", "time_in.out_layer.weight",
    "vector_in.in_layer.weight", "vector_in.out_layer.weight", "guidance_in.in_layer.weight",
    "guidance_in.out_layer.weight", "final_layer.linear.weight", "final_layer.adaLN_modulation.1.weight",
}
SMALL = FluxGeometry(double_blocks=2, single_blocks=1, hidden=256)


def plan(variant: str, tensors=None, **kw):
    kw.setdefault("name", "flux1-kontext-dev")
    kw.setdefault("family", "flux-dev")
    return make_plan(variant, layout_tensors() if tensors is None else tensors, **kw)


@pytest.mark.parametrize("variant", sorted(PUBLISHED_GB))
def test_full_size_plan_matches_published_size(variant):
    p = plan(variant)
    assert abs(p.file_size / 1e9 - PUBLISHED_GB[variant]) <= PUBLISHED_GB[variant] * 0.001
    assert len(p.entries) == 780
    assert p.n_params == 11_901_408_320


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_full_size_plan_type_counts(variant):
    p = plan(variant)
    v = VARIANTS[variant]
    assert p.file_type == FILE_TYPES[variant]
    one_d = [e for e in p.entries if len(e.shape) == 1]
    assert len(one_d) == 466 and {e.qtype for e in one_d} == {"F32"}
    kept = {e.name: e.qtype for e in p.entries if e.rule in ("kept", "img_in")}
    assert set(kept) == KEPT_2D
    assert kept.pop("img_in.weight") == "F32"
    assert set(kept.values()) == {"BF16"}
    targeted = [e for e in p.entries if e.targeted]
    assert len(targeted) == 304
    if variant in RAISED:
        base, up = RAISED[variant]
        raised = sorted(e.name for e in targeted if e.qtype == up)
        assert len(raised) == 38
        assert raised == sorted(f"double_blocks.{i}.{s}_attn.qkv.weight" for i in range(19) for s in ("img", "txt"))
        assert sum(e.qtype == base for e in targeted) == 266
    else:
        assert {e.qtype for e in targeted} == {v.base_type}
    assert p.fallbacks == ()


def test_q3_k_l_has_q3_k_m_tensor_types_and_its_own_file_type():
    m, l_ = plan("Q3_K_M"), plan("Q3_K_L")
    assert [(e.name, e.qtype) for e in m.entries] == [(e.name, e.qtype) for e in l_.entries]
    assert (m.file_type, l_.file_type) == (12, 13)
    assert m.file_size == l_.file_size  # same KV value lengths: "Q3_K_M" vs "Q3_K_L"


def test_bits_per_weight():
    p = plan("Q4_K_S")
    assert p.bits_per_weight_quantized == pytest.approx(4.5)  # 144 bytes per 256 weights
    assert p.bits_per_weight == pytest.approx(p.tensor_nbytes * 8 / p.n_params)
    assert plan("Q8_0").bits_per_weight_quantized == pytest.approx(8.5)
    assert plan("F16").bits_per_weight_quantized == pytest.approx(16.0)


@pytest.mark.parametrize("src, kept", [("BF16", "BF16"), ("F16", "F16"), ("F32", "F32"),
                                       ("F8_E4M3", "BF16"), ("F8_E5M2", "BF16")])
def test_kept_tensors_keep_source_precision(src, kept):
    p = plan("Q4_K_M", layout_tensors(SMALL, src))
    by = {e.name: e for e in p.entries}
    assert by["txt_in.weight"].qtype == kept
    assert by["final_layer.adaLN_modulation.1.weight"].qtype == kept
    assert by["img_in.weight"].qtype == "F32"
    assert by["img_in.bias"].qtype == "F32"
    assert by["double_blocks.0.img_attn.norm.query_norm.scale"].qtype == "F32"
    assert by["single_blocks.0.linear1.weight"].qtype == "Q4_K"
    assert by["double_blocks.1.txt_attn.qkv.weight"].qtype == "Q5_K"
    assert all(e.source_dtype == src for e in p.entries)


def test_fallback_to_f16_when_rows_do_not_fit_the_block():
    geo = FluxGeometry(double_blocks=1, single_blocks=1, hidden=384)  # rows of 384: not a multiple of 256
    p = plan("Q4_K_M", layout_tensors(geo))
    fb = set(p.fallbacks)
    assert "double_blocks.0.img_attn.qkv.weight" in fb
    assert "single_blocks.0.linear1.weight" in fb
    # linear2's rows are h + 4h = 1920 values: not a multiple of 256 either; mlp.2's 1536 are.
    assert "single_blocks.0.linear2.weight" in fb
    by = {e.name: e for e in p.entries}
    assert by["double_blocks.0.img_mlp.2.weight"].qtype == "Q4_K"
    assert all(by[n].qtype == "F16" and by[n].rule == "fallback" for n in fb)
    # Q8_0 blocks are 32 wide: everything fits.
    assert plan("Q8_0", layout_tensors(geo)).fallbacks == ()


def test_every_variant_plans_every_tensor_in_source_order():
    tensors = layout_tensors(SMALL)
    for p in make_plans(list(VARIANTS), tensors, name="m", family="flux-dev"):
        assert [e.name for e in p.entries] == list(bfl_tensor_shapes(SMALL))
        assert [e.shape for e in p.entries] == list(bfl_tensor_shapes(SMALL).values())


def test_make_plans_drops_duplicates_and_keeps_order():
    ps = make_plans(["q8_0", "Q4_K_M", "Q8_0"], layout_tensors(SMALL), name="m", family="flux-dev")
    assert [p.variant.name for p in ps] == ["Q8_0", "Q4_K_M"]
    assert [p.file_name for p in ps] == ["m-Q8_0.gguf", "m-Q4_K_M.gguf"]


def test_unknown_variant_lists_the_valid_ones():
    with pytest.raises(PlanError) as e:
        resolve_variant("Q4_K_X")
    assert str(e.value) == (
        "unknown variant 'Q4_K_X'; valid variants: Q2_K, Q3_K_S, Q3_K_M, Q3_K_L, Q4_K_S, Q4_K_M, "
        "Q5_K_S, Q5_K_M, Q6_K, Q8_0, F16, BF16"
    )
    with pytest.raises(PlanError, match="no variant given"):
        make_plans([], layout_tensors(SMALL), name="m", family="flux-dev")


def test_overrides_first_match_wins():
    p = plan("Q4_K_S", layout_tensors(SMALL), overrides=[r"double_blocks\.0\.=Q8_0", r"_attn\.qkv=Q6_K", "txt_in=q8_0"])
    by = {e.name: e for e in p.entries}
    assert by["double_blocks.0.img_attn.qkv.weight"].qtype == "Q8_0"  # first rule wins over the second
    assert by["double_blocks.1.img_attn.qkv.weight"].qtype == "Q6_K"
    assert by["double_blocks.1.img_mlp.0.weight"].qtype == "Q4_K"
    assert by["txt_in.weight"].qtype == "Q8_0" and by["txt_in.weight"].rule == "override"  # overrides beat "kept"
    assert by["txt_in.bias"].qtype == "F32"  # 1-D tensors stay F32 whatever matches
    assert by["double_blocks.0.img_attn.qkv.bias"].qtype == "F32"
    assert [o.text for o in p.overrides] == [r"double_blocks\.0\.=Q8_0", r"_attn\.qkv=Q6_K", "txt_in=Q8_0"]
    kv = {k.key: k.value for k in p.kv}
    assert json.loads(kv["flux_gguf.overrides"]) == [o.text for o in p.overrides]


def test_override_kquant_on_rows_not_multiple_of_256_is_an_error():
    narrow = FluxGeometry(double_blocks=1, single_blocks=1, hidden=384)  # rows of 384
    with pytest.raises(PlanError) as e:
        plan("Q8_0", layout_tensors(narrow), overrides=[r"txt_attn\.proj=Q4_K"])
    assert str(e.value) == (
        "override 'txt_attn\\.proj=Q4_K' puts Q4_K on double_blocks.0.txt_attn.proj.weight, whose rows of 384 "
        "values are not a multiple of Q4_K's block size 256"
    )


def test_img_in_weight_stays_f32_whatever_the_overrides():
    p = plan("Q8_0", layout_tensors(SMALL), overrides=[r"weight$=Q8_0"])
    by = {e.name: e for e in p.entries}
    assert by["img_in.weight"].qtype == "F32" and by["img_in.weight"].rule == "img_in"
    assert by["txt_in.weight"].qtype == "Q8_0"
    with pytest.raises(PlanError) as e:
        plan("Q8_0", layout_tensors(SMALL), overrides=[r"^img_in\.=Q8_0"])
    assert str(e.value) == ("override '^img_in\\.=Q8_0' matches only img_in.weight, which stays F32 so diffusers "
                            "detects the model correctly")


@pytest.mark.parametrize("text, message", [
    ("txt_in", "override 'txt_in' must look like REGEX=TYPE (for example 'txt_attn\\.qkv=Q8_0')"),
    ("=Q8_0", "override '=Q8_0' must look like REGEX=TYPE (for example 'txt_attn\\.qkv=Q8_0')"),
    ("txt_in=", "override 'txt_in=' must look like REGEX=TYPE (for example 'txt_attn\\.qkv=Q8_0')"),
    ("qkv[=Q8_0", "override 'qkv[=Q8_0': bad regular expression: missing ]: ["),
    ("qkv=Q4_0", "override 'qkv=Q4_0': unknown type 'Q4_0'; valid types: F32, F16, BF16, Q8_0, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K"),
])
def test_bad_overrides(text, message):
    with pytest.raises(PlanError) as e:
        parse_override(text)
    assert str(e.value) == message


def test_override_that_matches_nothing_is_an_error():
    with pytest.raises(PlanError) as e:
        plan("Q8_0", layout_tensors(SMALL), overrides=["double_blocks\\.7\\.=Q6_K"])
    assert str(e.value) == "override 'double_blocks\\.7\\.=Q6_K' matches no 2-D tensor"


def test_bad_source_dtype_and_name():
    t = dict(layout_tensors(SMALL))
    t["txt_in.weight"] = LayoutTensor((256, 4096), "I8")
    with pytest.raises(PlanError, match=r"^tensor txt_in.weight has dtype I8; expected one of BF16, F16, F32, F8_E4M3, F8_E5M2$"):
        plan("Q8_0", t)
    with pytest.raises(PlanError, match="must be a plain file-name stem"):
        plan("Q8_0", layout_tensors(SMALL), name="../evil")


def test_metadata_keys():
    src = [SourceRef("flux1-kontext-dev.safetensors", 123, "ab" * 32)]
    p = plan("Q5_K_M", layout_tensors(SMALL), name="kontext", family="flux-dev", sources=src)
    kv = {k.key: (k.value, k.vtype.name) for k in p.kv}
    assert kv["general.architecture"] == ("flux", "STRING")
    assert kv["general.quantization_version"] == (2, "UINT32")
    assert kv["general.file_type"] == (17, "UINT32")
    assert kv["general.name"] == ("kontext", "STRING")
    assert kv["flux_gguf.recipe"] == ("Q5_K_M", "STRING")
    assert kv["flux_gguf.model_family"] == ("flux-dev", "STRING")
    assert json.loads(kv["flux_gguf.source"][0]) == [
        {"file": "flux1-kontext-dev.safetensors", "size": 123, "sha256": "ab" * 32}
    ]
    assert p.to_dict()["types"] == p.type_counts
    json.dumps(p.to_dict())
