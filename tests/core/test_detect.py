"""Model detection: each FLUX.1 family and geometry, missing or misshapen tensors, other models refused."""
from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from converter.detect import ModelInfo, detect_model
from converter.errors import ModelDetectionError
from converter.layout import FluxGeometry, bfl_tensor_shapes
from converter.safetensors_io import encode_header
from converter.sources import open_source
from converter.synthetic import write_synthetic_flux

SMALL = dict(double_blocks=2, single_blocks=3, hidden=256)


@pytest.mark.parametrize("family, channels, guidance", [
    ("flux-dev", 64, True),
    ("flux-schnell", 64, False),
    ("flux-fill", 384, True),
    ("flux-depth-canny", 128, True),
])
@pytest.mark.parametrize("layout", ["bfl", "comfyui", "diffusers"])
def test_each_family_in_each_layout(tmp_path, family, channels, guidance, layout):
    geo = FluxGeometry(**SMALL, img_in_channels=channels, guidance=guidance)
    path = write_synthetic_flux(tmp_path / "m", geo, layout=layout, dtype="F8_E4M3")
    with open_source(path) as src:
        assert detect_model(src) == ModelInfo(family, geo)


def test_full_size_geometry_from_headers_alone(tmp_path):
    """The real 19 + 38 block, 3072-wide model: detected from a header over a sparse 23.8 GB file."""
    shapes = bfl_tensor_shapes()
    header = encode_header([(n, "BF16", s) for n, s in shapes.items()], {})
    data = sum(math.prod(s) for s in shapes.values()) * 2
    p = tmp_path / "flux1-kontext-dev.safetensors"
    with open(p, "wb") as f:
        f.write(header)
    os.truncate(p, len(header) + data)  # sparse: no disk used
    with open_source(p) as src:
        assert detect_model(src) == ModelInfo("flux-dev", FluxGeometry())
        assert len(src.tensors) == 780
        assert sum(math.prod(t.shape) for t in src.tensors.values()) == 11_901_408_320
        assert sum(t.nbytes for t in src.tensors.values()) == 23_802_816_640


@pytest.fixture(scope="module")
def state(tmp_path_factory):
    p = write_synthetic_flux(tmp_path_factory.mktemp("det") / "m.safetensors", FluxGeometry(**SMALL))
    return load_file(p)


def refusal(tmp_path, tensors: dict) -> str:
    p = tmp_path / "model.safetensors"
    save_file(tensors, p)
    with open_source(p) as src, pytest.raises(ModelDetectionError) as e:
        detect_model(src)
    assert "\n" not in str(e.value)
    return str(e.value).replace(str(p), "MODEL")


def test_missing_block_tensors_are_named(tmp_path, state):
    sd = {k: v for k, v in state.items() if not k.startswith("single_blocks.2.linear2")
          and k != "single_blocks.2.modulation.lin.weight" and k != "final_layer.linear.bias"}
    assert refusal(tmp_path, sd) == "MODEL is missing single_blocks.2.linear2.weight (and 3 more)"
    sd = {k: v for k, v in state.items() if k != "guidance_in.out_layer.bias"}
    assert refusal(tmp_path, sd) == "MODEL is missing guidance_in.out_layer.bias"
    # A block in the middle gone: the highest index still sets the count.
    sd = {k: v for k, v in state.items() if not k.startswith("double_blocks.0.")}
    assert refusal(tmp_path, sd) == "MODEL is missing double_blocks.0.img_mod.lin.weight (and 23 more)"


def test_wrong_shapes_are_named(tmp_path, state):
    sd = dict(state)
    sd["double_blocks.1.txt_attn.qkv.weight"] = torch.zeros(768, 128, dtype=torch.bfloat16)
    sd["single_blocks.0.linear2.weight"] = torch.zeros(256, 1024, dtype=torch.bfloat16)
    assert refusal(tmp_path, sd) == ("MODEL: double_blocks.1.txt_attn.qkv.weight has shape [768, 128]; expected "
                                     "[768, 256] for hidden size 256 (and 1 more tensors have wrong shapes)")


def test_extra_tensors_are_refused(tmp_path, state):
    # ComfyUI "scaled fp8" files carry per-layer scales; reading their weights without them is wrong.
    sd = {**state, "scaled_fp8": torch.zeros(0, dtype=torch.float8_e4m3fn),
          "double_blocks.0.img_attn.qkv.scale_weight": torch.ones(1)}
    assert refusal(tmp_path, sd) == ("MODEL holds tensors a FLUX.1 transformer does not have: "
                                     "double_blocks.0.img_attn.qkv.scale_weight (and 1 more)")


def test_img_in_and_hidden_checks(tmp_path, state):
    sd = {**state, "img_in.weight": torch.zeros(256, 100, dtype=torch.bfloat16)}
    assert refusal(tmp_path, sd) == ("MODEL: img_in.weight has 100 input channels; expected 64 (dev, Kontext, "
                                     "schnell), 384 (Fill) or 128 (Depth/Canny)")
    sd = {**state, "img_in.weight": torch.zeros(200, 64, dtype=torch.bfloat16)}
    assert refusal(tmp_path, sd) == ("MODEL: img_in.weight has 200 rows; the hidden size must be a positive "
                                     "multiple of the 128-wide attention head")
    sd = {**state, "img_in.weight": torch.zeros(256 * 64, dtype=torch.bfloat16)}
    assert refusal(tmp_path, sd) == "MODEL: img_in.weight has shape [16384]; expected [hidden, channels]"


def test_other_models_are_refused(tmp_path):
    def w():
        return torch.zeros(4, 4)

    unet = {"input_blocks.0.0.weight": w(), "middle_block.0.in_layers.0.weight": w()}
    assert refusal(tmp_path, unet) == ("MODEL is a UNet (Stable Diffusion-style), not a FLUX.1 transformer: found "
                                       "input_blocks.0.0.weight; expected img_in.weight, double_blocks.N.* and "
                                       "single_blocks.N.*")
    diffusers_unet = {"conv_in.weight": w(), "down_blocks.0.resnets.0.conv1.weight": w()}
    assert refusal(tmp_path, diffusers_unet).startswith("MODEL is a UNet (Stable Diffusion-style), not a FLUX.1 "
                                                        "transformer: found down_blocks.0.resnets.0.conv1.weight;")
    sd3 = {"joint_blocks.0.x_block.attn.qkv.weight": w(), "x_embedder.proj.weight": w()}
    assert refusal(tmp_path, sd3) == ("MODEL is an SD3 (MMDiT) model, not a FLUX.1 transformer: found "
                                      "joint_blocks.0.x_block.attn.qkv.weight; expected img_in.weight, "
                                      "double_blocks.N.* and single_blocks.N.*")
    other = {f"encoder.layer.{i}.weight": w() for i in range(5)}
    assert refusal(tmp_path, other) == (
        "MODEL is not a FLUX.1 transformer: expected img_in.weight, double_blocks.N.* and single_blocks.N.*; "
        "found 5 tensors: encoder.layer.0.weight, encoder.layer.1.weight, encoder.layer.2.weight (and 2 more)")
    assert refusal(tmp_path, {"img_in.weight": torch.zeros(256, 64)}) == (
        "MODEL is not a FLUX.1 transformer: expected img_in.weight, double_blocks.N.* and single_blocks.N.*; "
        "found 1 tensors: img_in.weight")


def test_detection_reads_no_tensor_data(tmp_path):
    """Only headers: a file whose data region is all zeros still detects (and reads zeros)."""
    geo = FluxGeometry(**SMALL)
    shapes = bfl_tensor_shapes(geo)
    header = encode_header([(n, "F16", s) for n, s in shapes.items()], {})
    p = tmp_path / "zeros.safetensors"
    p.write_bytes(header + bytes(sum(math.prod(s) for s in shapes.values()) * 2))
    with open_source(p) as src:
        assert detect_model(src) == ModelInfo("flux-dev", geo)
        assert not np.any(src.read("txt_in.weight"))
