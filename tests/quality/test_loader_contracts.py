"""Our GGUF files against ComfyUI-GGUF's and stable-diffusion.cpp's loader rules (issues 22, 24).

Neither loader installs here, so tests/loader_contracts.py re-states their rules from their source
(cited there, line by line) and these tests apply them to files the converter writes: every
published recipe, size-targeted mixes across the whole reachable range (so every candidate type is
written somewhere), a file with ``--override`` types, and FLUX.2 [klein] files (recipes and a mix).
Each file is read back with gguf-py's GGUFReader, as ComfyUI-GGUF itself does.

Per file, for ComfyUI-GGUF: the architecture is accepted, every tensor type is one it dequantizes
natively, the state-dict keys and (reversed-ggml) shapes are the BFL layout's, the q/k norm scales
(plain Parameters in ComfyUI's FLUX) are torch-compatible, ComfyUI's FLUX detection reads the right
model, and each tensor dequantized by ComfyUI-GGUF's procedure has the loader's shape, agrees with
gguf-py's reference dequantizer, and still correlates with the source weight (a transposed or
mis-shaped mapping would not). For stable-diffusion.cpp: ggml's GGUF reader accepts every tensor
(name length, dims, type, row divisible by the block, offsets), the version detection picks the
right FLUX model, block counts and guidance are read right, and no tensor is silently converted
(each stored type is the type sd.cpp allocates).

Weights are synthetic (converter.synthetic): shapes and types are what is tested, not quality.
"""
from __future__ import annotations

import math
import pathlib
import shutil

import numpy as np
import pytest
import torch
from gguf import GGUFReader, GGUFWriter, GGMLQuantizationType as T
from gguf.quants import dequantize as gguf_dequantize
from safetensors.torch import load_file

from converter.errors import TargetRangeError
from converter.layout import FluxGeometry, bfl_tensor_shapes, flux2_geometry
from converter.pipeline import convert, plan_source, plan_source_target
from converter.recipes import CANDIDATE_TYPES, FALLBACK_TYPE, FLOAT_TYPES, VARIANTS, parse_sensitivity, size_budget
from converter.safetensors_io import encode_header
from converter.sources import open_source
from converter.synthetic import write_synthetic_flux
from loader_contracts import (
    COMFY_DEQUANTIZE_FUNCTIONS,
    COMFY_PLAIN_PARAMETER,
    COMFY_READABLE,
    COMFY_TORCH_COMPATIBLE,
    GGML_MAX_NAME,
    PORTED_DEQUANTIZE_FUNCTIONS,
    SDCPP_PREFIX,
    ComfyTensor,
    LoaderRejects,
    SdTensorStorage,
    comfy_dequantize,
    comfy_detect_flux,
    comfy_gguf_sd_loader,
    comfy_state_dict_for_detection,
    sdcpp_flux_params,
    sdcpp_get_sd_version,
    sdcpp_model_type,
    sdcpp_read_gguf,
)
from sensitivity_fixtures import sensitivity_doc

FLUX1 = FluxGeometry(double_blocks=2, single_blocks=2, hidden=256)  # every row a multiple of 256
KLEIN = flux2_geometry("flux2-klein-4b", hidden=256)
# fractions of the reachable size range: both ends (all smallest, all largest) and points between
MIX_POINTS = (0.0, 0.1, 0.25, 0.4, 0.55, 0.7, 0.85, 1.0)
OVERRIDES = ("double_blocks\\.0\\.img_attn\\.qkv=Q8_0", "double_blocks\\.1\\.=Q2_K", "single_blocks\\.0\\.linear1=F16",
             "single_blocks\\.1\\.=BF16", "txt_in=Q5_K", "final_layer\\.linear=F32", "img_mod=Q3_K")
EDGE = 256
# cosine between the dequantized tensor and its source weight; Q2_K on Gaussian weights measures
# ~0.93, a transposed or scrambled mapping ~0
MIN_COSINE = 0.85


def _mix_files(src: pathlib.Path, out: pathlib.Path, geo: FluxGeometry, points, tag: str):
    sens = parse_sensitivity(sensitivity_doc(geo), str(out / "s.json"), "ab" * 32)
    with open_source(src) as source:
        with pytest.raises(TargetRangeError) as e:
            plan_source_target(source, sens, size_budget("1"))
    # The header records the budget's text, so the range reported for "1" can sit one alignment
    # step (32 bytes) off the range of a 7-8 digit budget: keep EDGE bytes inside both ends. No
    # type swap is that small here (the smallest costs kilobytes), so the ends stay all-smallest
    # (Q2_K) and all-but-one-largest (BF16).
    lo, hi = int(e.value.low) + EDGE, int(e.value.high) - EDGE
    files = []
    for i, f in enumerate(points):
        budget = size_budget(str(lo + int(f * (hi - lo))))
        [rec] = convert(src, out, [], sensitivity=sens, budget=budget, mix_name=f"{tag}{i}")
        files.append((f"{tag}{i}@{f:.2f}", rec.path))
    return files


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    """name -> (path, geometry, source path): the files every contract test reads."""
    d = tmp_path_factory.mktemp("loaders")
    out: dict[str, tuple[pathlib.Path, FluxGeometry, pathlib.Path]] = {}
    src1 = write_synthetic_flux(d / "flux1.safetensors", FLUX1, seed=0)
    for rec in convert(src1, d / "recipes", list(VARIANTS), name="flux1"):
        out[f"flux1-{rec.variant}"] = (rec.path, FLUX1, src1)
    for label, path in _mix_files(src1, d / "mix", FLUX1, MIX_POINTS, "T"):
        out[f"flux1-mix-{label}"] = (path, FLUX1, src1)
    [rec] = convert(src1, d / "override", ["Q4_K_S"], name="flux1", overrides=OVERRIDES)
    out["flux1-override"] = (rec.path, FLUX1, src1)
    src2 = write_synthetic_flux(d / "klein.safetensors", KLEIN, seed=1)
    for rec in convert(src2, d / "klein", ["Q2_K", "Q4_K_M", "Q8_0"], name="klein"):
        out[f"klein-{rec.variant}"] = (rec.path, KLEIN, src2)
    for label, path in _mix_files(src2, d / "klein-mix", KLEIN, (0.0, 0.5, 1.0), "K"):
        out[f"klein-mix-{label}"] = (path, KLEIN, src2)
    yield out
    shutil.rmtree(d, ignore_errors=True)


FILES = ([f"flux1-{v}" for v in VARIANTS] + [f"flux1-mix-T{i}@{f:.2f}" for i, f in enumerate(MIX_POINTS)]
         + ["flux1-override", "klein-Q2_K", "klein-Q4_K_M", "klein-Q8_0"]
         + [f"klein-mix-K{i}@{f:.2f}" for i, f in enumerate((0.0, 0.5, 1.0))])


# --------------------------------------------------------------------------- the stand-ins themselves

def test_the_dequant_stand_in_offers_exactly_comfy_gguf_types():
    """diffusers' port of ComfyUI-GGUF's dequant.py has the key set quoted from ComfyUI-GGUF."""
    assert set(PORTED_DEQUANTIZE_FUNCTIONS) == COMFY_DEQUANTIZE_FUNCTIONS


def test_every_type_the_converter_can_write_is_readable_by_both_loaders():
    """Candidates of a mix, the float types, the fallback: ComfyUI-GGUF reads each natively, ggml knows each."""
    writable = set(CANDIDATE_TYPES) | set(FLOAT_TYPES) | {FALLBACK_TYPE}
    for name in writable:
        assert T[name] in COMFY_READABLE, name
    # sd.cpp: blck_size != 0 and type_size != 0 (gguf.cpp, gguf_io.cpp); gguf-py lists both for ggml's types
    for name in writable:
        assert sdcpp_model_type("x.weight", SdTensorStorage("x.weight", T[name], (256, 4), 0)) == T[name]


# --------------------------------------------------------------------------- every written file

@pytest.mark.parametrize("key", FILES)
def test_comfy_gguf_loads_the_file(written, key):
    path, geo, src = written[key]
    expected = bfl_tensor_shapes(geo)
    sd, arch = comfy_gguf_sd_loader(path)
    assert arch == "flux"
    assert set(sd) == set(expected)
    # no comfy.gguf.orig_shape.* KV: the shapes ComfyUI-GGUF uses are the reversed ggml dims
    assert not [k for k in GGUFReader(path).fields if k.startswith("comfy.gguf.orig_shape.")]
    source = load_file(str(src))
    for name, t in sd.items():
        assert t.tensor_shape == tuple(expected[name]), name
        assert t.tensor_type in COMFY_READABLE, (name, t.tensor_type.name)
        if COMFY_PLAIN_PARAMETER.search(name) or len(t.tensor_shape) == 1:
            assert t.tensor_type in COMFY_TORCH_COMPATIBLE, (name, t.tensor_type.name)
        w = comfy_dequantize(t)
        assert tuple(w.shape) == t.tensor_shape and torch.isfinite(w).all(), name
        # the stand-in computes what gguf-py's reference dequantizer computes
        ref = gguf_dequantize(np.asarray(t.data), t.tensor_type).reshape(t.tensor_shape)
        np.testing.assert_allclose(w.numpy(), ref, rtol=1e-6, atol=1e-7, err_msg=name)
        # and what the loader hands the model is that tensor, oriented as the source
        orig = source[name].float().numpy()
        cos = float(np.dot(w.numpy().ravel(), orig.ravel()) / (np.linalg.norm(w.numpy()) * np.linalg.norm(orig) + 1e-30))
        assert cos > MIN_COSINE or np.allclose(orig, 0), (name, t.tensor_type.name, cos)


@pytest.mark.parametrize("key", FILES)
def test_comfyui_detects_the_model(written, key):
    path, geo, _ = written[key]
    sd, _ = comfy_gguf_sd_loader(path)
    for_detection = comfy_state_dict_for_detection(sd)
    assert set(for_detection) == set(sd)  # no key starts with "model.": ComfyUI keeps them as they are
    cfg = comfy_detect_flux(for_detection)
    assert cfg["image_model"] == ("flux2" if geo.arch == "flux2" else "flux")
    assert (cfg["depth"], cfg["depth_single_blocks"]) == (geo.double_blocks, geo.single_blocks)
    assert cfg["hidden_size"] == geo.hidden and cfg["num_heads"] * sum(cfg["axes_dim"]) == geo.hidden
    assert cfg["guidance_embed"] == geo.guidance
    patch = 1 if geo.arch == "flux2" else 2
    assert cfg["in_channels"] * patch * patch == geo.img_in_channels
    assert cfg["vec_in_dim"] == (None if geo.arch == "flux2" else 768)


@pytest.mark.parametrize("key", FILES)
def test_stable_diffusion_cpp_loads_the_file(written, key):
    path, geo, _ = written[key]
    expected = bfl_tensor_shapes(geo)
    storages = sdcpp_read_gguf(path)
    assert all(s.name.startswith(SDCPP_PREFIX) for s in storages)
    by_name = {s.name[len(SDCPP_PREFIX):]: s for s in storages}
    assert set(by_name) == set(expected)
    for name, s in by_name.items():
        assert len(name) < GGML_MAX_NAME, name  # ggml checks the stored name; sd.cpp's prefix is a std::string
        assert s.ne == tuple(reversed(expected[name])), name  # Linear: ggml_new_tensor_2d(ctx, wtype, in, out)
        assert sdcpp_model_type(name, s) == s.type, (name, s.type.name)  # nothing converted at load
    version = sdcpp_get_sd_version(storages)
    assert version == ("VERSION_FLUX2_KLEIN" if geo.arch == "flux2" else "VERSION_FLUX")
    assert sdcpp_flux_params(storages) == {"depth": geo.double_blocks, "depth_single_blocks": geo.single_blocks,
                                           "guidance_embed": geo.guidance}


def test_the_mixes_write_every_candidate_type(written):
    """The budgets span the whole range: every candidate and the kept BF16 appear in some mix."""
    seen: set[str] = set()
    sizes = []
    for key in FILES:
        if key.startswith("flux1-mix-"):
            storages = sdcpp_read_gguf(written[key][0])
            seen |= {s.type.name for s in storages}
            sizes.append(written[key][0].stat().st_size)
    assert set(CANDIDATE_TYPES) | {"BF16", "F32"} <= seen, sorted(seen)
    assert sizes == sorted(sizes) and sizes[0] < sizes[-1]


def test_the_override_file_holds_the_asked_types(written):
    storages = {s.name[len(SDCPP_PREFIX):]: s.type.name for s in sdcpp_read_gguf(written["flux1-override"][0])}
    assert storages["double_blocks.0.img_attn.qkv.weight"] == "Q8_0"
    assert storages["double_blocks.1.img_mlp.0.weight"] == "Q2_K"
    assert storages["single_blocks.0.linear1.weight"] == "F16"
    assert storages["single_blocks.1.linear2.weight"] == "BF16"
    assert storages["txt_in.weight"] == "Q5_K"
    assert storages["final_layer.linear.weight"] == "F32"
    assert storages["double_blocks.0.img_mod.lin.weight"] == "Q3_K"
    assert storages["double_blocks.0.img_attn.norm.key_norm.scale"] == "F32"  # 1-D stay F32 whatever is asked


# --------------------------------------------------------------------------- full-size inventories (headers only)

def _sparse(path: pathlib.Path, shapes) -> pathlib.Path:
    header = encode_header([(n, "BF16", s) for n, s in shapes.items()], {})
    with open(path, "wb") as f:
        f.write(header)
        f.truncate(len(header) + sum(math.prod(s) for s in shapes.values()) * 2)
    return path


@pytest.mark.parametrize("family,geo,version", [
    ("flux1-dev", FluxGeometry(), "VERSION_FLUX"),
    ("flux2-dev", flux2_geometry("flux2-dev"), "VERSION_FLUX2"),
    ("flux2-klein-4b", flux2_geometry("flux2-klein-4b"), "VERSION_FLUX2_KLEIN"),
    ("flux2-klein-9b", flux2_geometry("flux2-klein-9b"), "VERSION_FLUX2_KLEIN"),
])
def test_full_size_plans_are_detected_as_their_model(tmp_path, family, geo, version):
    """The planned tensors of the real sizes (no weights read): sd.cpp's FLUX.2 [dev] marker is
    single_blocks.47 (48 single blocks), which only [dev] has; ComfyUI counts the blocks."""
    src = _sparse(tmp_path / f"{family}.safetensors", bfl_tensor_shapes(geo))
    with open_source(src) as source:
        plan = plan_source(source, ["Q4_K_M"])[0]
    storages = [SdTensorStorage(SDCPP_PREFIX + e.name, T[e.qtype], tuple(reversed(e.shape)), 0) for e in plan.entries]
    assert sdcpp_get_sd_version(storages) == version
    assert sdcpp_flux_params(storages)["depth_single_blocks"] == geo.single_blocks
    assert max(len(e.name) for e in plan.entries) < GGML_MAX_NAME
    sd = {e.name: ComfyTensor(np.zeros(0, np.uint8), T[e.qtype], tuple(e.shape)) for e in plan.entries}
    cfg = comfy_detect_flux(comfy_state_dict_for_detection(sd))
    assert (cfg["image_model"], cfg["depth"], cfg["depth_single_blocks"], cfg["hidden_size"]) == (
        "flux2" if geo.arch == "flux2" else "flux", geo.double_blocks, geo.single_blocks, geo.hidden)
    assert cfg["num_heads"] * sum(cfg["axes_dim"]) == geo.hidden


# --------------------------------------------------------------------------- the rules have teeth

def _gguf(path: pathlib.Path, arch: str, tensors: dict[str, np.ndarray]) -> pathlib.Path:
    w = GGUFWriter(str(path), arch)
    for name, x in tensors.items():
        w.add_tensor(name, x)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_comfy_gguf_refuses_an_architecture_outside_its_list(tmp_path):
    p = _gguf(tmp_path / "a.gguf", "flux2", {"img_in.weight": np.zeros((4, 8), np.float32)})
    with pytest.raises(LoaderRejects, match="Unexpected architecture type in GGUF file: 'flux2'"):
        comfy_gguf_sd_loader(p)


def test_ggml_refuses_a_tensor_name_of_64_bytes(tmp_path):
    p = _gguf(tmp_path / "n.gguf", "flux", {"x" * 64: np.zeros(4, np.float32)})
    with pytest.raises(LoaderRejects, match="too long"):
        sdcpp_read_gguf(p, prefix="")


def test_a_type_without_a_comfy_gguf_dequantizer_is_refused():
    t = ComfyTensor(np.zeros((1, 66), np.uint8), T.IQ2_XXS, (1, 256))
    with pytest.raises(LoaderRejects, match="Falling back to numpy dequant for qtype: IQ2_XXS"):
        comfy_dequantize(t)


def test_sdcpp_converts_a_quantized_row_its_block_does_not_divide():
    assert sdcpp_model_type("img_in.weight", SdTensorStorage("img_in.weight", T.Q4_K, (64, 256), 0)) == T.F32
    assert sdcpp_model_type("x.norm.key_norm.scale", SdTensorStorage("s", T.BF16, (128,), 0)) == T.F32
