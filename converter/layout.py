"""The FLUX.1 and FLUX.2 transformers' tensor inventories in BFL naming (the naming GGUF files use).

Shapes are [out, in] as PyTorch stores them. One function builds the inventory for any block
count and any variant, so tests can make small FLUX-shaped models with the real key names.

FLUX.2 (``arch="flux2"``; diffusers ``Flux2Transformer2DModel``, BFL ``flux2`` checkpoints) differs
from FLUX.1 in these tensors (diffusers 0.42.1 ``transformer_flux2.py`` and
``convert_flux2_transformer_checkpoint_to_diffusers``; stable-diffusion.cpp ``flux.hpp``):

* no biases anywhere, no ``vector_in`` (no pooled text vector); ``guidance_in`` only in [dev];
* ``img_in`` takes 128 channels (32 latent channels x 2x2 patch) and ``final_layer.linear`` gives 128;
* ``txt_in`` takes the text encoder's stacked hidden states: 15360 ([dev], Mistral Small 3.1,
  3 x 5120), 7680 ([klein] 4B, Qwen3-4B, 3 x 2560), 12288 ([klein] 9B, Qwen3-8B, 3 x 4096);
* the adaLN modulation is shared: ``double_stream_modulation_img.lin`` / ``_txt.lin`` [6h, h] and
  ``single_stream_modulation.lin`` [3h, h] replace every block's ``*_mod.lin`` / ``modulation.lin``;
* the MLPs are SwiGLU with ratio 3: ``{img,txt}_mlp.0`` [6h, h] (gate and up fused), ``{img,txt}_mlp.2``
  [h, 3h]; ``single_blocks.N.linear1`` is q, k, v then the 2 x 3h MLP input [9h, h], ``linear2`` [h, 4h].

Sizes (:data:`FLUX2_SIZES`): [dev] 8 double + 48 single blocks, hidden 6144 (48 heads of 128);
[klein] 4B 5 + 20, hidden 3072 (24 heads); [klein] 9B 8 + 24, hidden 4096 (32 heads). The 9B block
counts come from the parameter presets of InvokeAI and sd.cpp's tensor-driven reading; the issue
text's "6 + 24" gives 8.1B parameters, 8 + 24 gives the published 9.1B.
"""
from __future__ import annotations

from dataclasses import dataclass

HIDDEN = 3072
HEAD_DIM = 128
MLP_RATIO = 4
CONTEXT_DIM = 4096  # T5-XXL
VEC_DIM = 768  # CLIP-L pooled
TIME_DIM = 256
OUT_CHANNELS = 64  # 16 latent channels x 2x2 patch
DOUBLE_BLOCKS = 19
SINGLE_BLOCKS = 38

# img_in input width per model family.
IMG_IN_CHANNELS = {"dev": 64, "schnell": 64, "kontext": 64, "fill": 384, "depth": 128, "canny": 128}

# FLUX.2 (see the module docstring).
FLUX1, FLUX2 = "flux1", "flux2"
FLUX2_MLP_RATIO = 3
FLUX2_CHANNELS = 128  # img_in input width and final_layer output width
# The key FLUX.2 has and FLUX.1 does not (what stable-diffusion.cpp detects FLUX.2 by).
FLUX2_MARKER = "double_stream_modulation_img.lin.weight"


@dataclass(frozen=True)
class Flux2Size:
    """One published FLUX.2 model: its family string, block counts, hidden size, text width, guidance."""

    family: str
    double_blocks: int
    single_blocks: int
    hidden: int
    context_dim: int
    guidance: bool
    base_model: str  # the Hub repository of the original weights (a release's ``base_model``)


FLUX2_SIZES = (
    Flux2Size("flux2-dev", 8, 48, 6144, 15360, True, "black-forest-labs/FLUX.2-dev"),
    Flux2Size("flux2-klein-4b", 5, 20, 3072, 7680, False, "black-forest-labs/FLUX.2-klein-4B"),
    Flux2Size("flux2-klein-9b", 8, 24, 4096, 12288, False, "black-forest-labs/FLUX.2-klein-9B"),
)
FLUX2_FAMILIES = {s.family: s for s in FLUX2_SIZES}

# Tensors published recipes never quantize (any name containing one of these).
UNQUANTIZED_PREFIXES = ("img_in.", "txt_in.", "time_in.", "vector_in.", "guidance_in.", "final_layer.")


@dataclass(frozen=True)
class FluxGeometry:
    """What distinguishes one FLUX-layout checkpoint from another."""

    double_blocks: int = DOUBLE_BLOCKS
    single_blocks: int = SINGLE_BLOCKS
    hidden: int = HIDDEN
    img_in_channels: int = 64
    guidance: bool = True
    arch: str = FLUX1  # "flux1" or "flux2"
    context_dim: int = CONTEXT_DIM  # txt_in input width (FLUX.1: T5-XXL's 4096)

    @property
    def mlp_hidden(self) -> int:
        return self.hidden * (FLUX2_MLP_RATIO if self.arch == FLUX2 else MLP_RATIO)


def flux2_geometry(family: str, hidden: int | None = None) -> FluxGeometry:
    """The geometry of FLUX.2 model ``family`` (``FLUX2_SIZES``); ``hidden`` narrows it for small test models."""
    size = FLUX2_FAMILIES[family]
    return FluxGeometry(double_blocks=size.double_blocks, single_blocks=size.single_blocks,
                        hidden=size.hidden if hidden is None else hidden, img_in_channels=FLUX2_CHANNELS,
                        guidance=size.guidance, arch=FLUX2, context_dim=size.context_dim)


def flux2_size_of(geo: FluxGeometry) -> Flux2Size | None:
    """The published FLUX.2 size with ``geo``'s block counts (the hidden size may be narrowed), or None."""
    return next((s for s in FLUX2_SIZES if (s.double_blocks, s.single_blocks) == (geo.double_blocks, geo.single_blocks)),
                None)


def _linear(shapes: dict, name: str, out_f: int, in_f: int, bias: bool = True) -> None:
    shapes[f"{name}.weight"] = (out_f, in_f)
    if bias:
        shapes[f"{name}.bias"] = (out_f,)


def bfl_tensor_shapes(geo: FluxGeometry = FluxGeometry()) -> dict[str, tuple[int, ...]]:
    """Every tensor of a FLUX.1 or FLUX.2 transformer (``geo.arch``) in BFL naming, in a stable logical order."""
    if geo.arch == FLUX2:
        return _flux2_tensor_shapes(geo)
    h, m = geo.hidden, geo.mlp_hidden
    s: dict[str, tuple[int, ...]] = {}
    _linear(s, "img_in", h, geo.img_in_channels)
    _linear(s, "time_in.in_layer", h, TIME_DIM)
    _linear(s, "time_in.out_layer", h, h)
    _linear(s, "vector_in.in_layer", h, VEC_DIM)
    _linear(s, "vector_in.out_layer", h, h)
    if geo.guidance:
        _linear(s, "guidance_in.in_layer", h, TIME_DIM)
        _linear(s, "guidance_in.out_layer", h, h)
    _linear(s, "txt_in", h, geo.context_dim)
    for i in range(geo.double_blocks):
        p = f"double_blocks.{i}"
        for stream in ("img", "txt"):
            _linear(s, f"{p}.{stream}_mod.lin", 6 * h, h)
            _linear(s, f"{p}.{stream}_attn.qkv", 3 * h, h)
            s[f"{p}.{stream}_attn.norm.query_norm.scale"] = (HEAD_DIM,)
            s[f"{p}.{stream}_attn.norm.key_norm.scale"] = (HEAD_DIM,)
            _linear(s, f"{p}.{stream}_attn.proj", h, h)
            _linear(s, f"{p}.{stream}_mlp.0", m, h)
            _linear(s, f"{p}.{stream}_mlp.2", h, m)
    for i in range(geo.single_blocks):
        p = f"single_blocks.{i}"
        _linear(s, f"{p}.linear1", 3 * h + m, h)
        _linear(s, f"{p}.linear2", h, h + m)
        s[f"{p}.norm.query_norm.scale"] = (HEAD_DIM,)
        s[f"{p}.norm.key_norm.scale"] = (HEAD_DIM,)
        _linear(s, f"{p}.modulation.lin", 3 * h, h)
    _linear(s, "final_layer.linear", OUT_CHANNELS, h)
    _linear(s, "final_layer.adaLN_modulation.1", 2 * h, h)
    return s


def _flux2_tensor_shapes(geo: FluxGeometry) -> dict[str, tuple[int, ...]]:
    h, m = geo.hidden, geo.mlp_hidden
    s: dict[str, tuple[int, ...]] = {}

    def lin(name: str, out_f: int, in_f: int) -> None:
        _linear(s, name, out_f, in_f, bias=False)

    lin("img_in", h, geo.img_in_channels)
    lin("time_in.in_layer", h, TIME_DIM)
    lin("time_in.out_layer", h, h)
    if geo.guidance:
        lin("guidance_in.in_layer", h, TIME_DIM)
        lin("guidance_in.out_layer", h, h)
    lin("double_stream_modulation_img.lin", 6 * h, h)
    lin("double_stream_modulation_txt.lin", 6 * h, h)
    lin("single_stream_modulation.lin", 3 * h, h)
    lin("txt_in", h, geo.context_dim)
    for i in range(geo.double_blocks):
        p = f"double_blocks.{i}"
        for stream in ("img", "txt"):
            lin(f"{p}.{stream}_attn.qkv", 3 * h, h)
            s[f"{p}.{stream}_attn.norm.query_norm.scale"] = (HEAD_DIM,)
            s[f"{p}.{stream}_attn.norm.key_norm.scale"] = (HEAD_DIM,)
            lin(f"{p}.{stream}_attn.proj", h, h)
            lin(f"{p}.{stream}_mlp.0", 2 * m, h)
            lin(f"{p}.{stream}_mlp.2", h, m)
    for i in range(geo.single_blocks):
        p = f"single_blocks.{i}"
        lin(f"{p}.linear1", 3 * h + 2 * m, h)
        lin(f"{p}.linear2", h, h + m)
        s[f"{p}.norm.query_norm.scale"] = (HEAD_DIM,)
        s[f"{p}.norm.key_norm.scale"] = (HEAD_DIM,)
    lin("final_layer.linear", geo.img_in_channels, h)
    lin("final_layer.adaLN_modulation.1", 2 * h, h)
    return s


def is_kept_unquantized(name: str) -> bool:
    """True for tensors the published recipes keep in source precision (and every 1-D tensor)."""
    return any(p in name for p in UNQUANTIZED_PREFIXES)
