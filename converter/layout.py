"""The FLUX.1 transformer's tensor inventory in BFL naming (the naming GGUF files use).

Shapes are [out, in] as PyTorch stores them. One function builds the inventory for any block
count and any variant, so tests can make small FLUX-shaped models with the real key names.
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

    @property
    def mlp_hidden(self) -> int:
        return self.hidden * MLP_RATIO


def _linear(shapes: dict, name: str, out_f: int, in_f: int) -> None:
    shapes[f"{name}.weight"] = (out_f, in_f)
    shapes[f"{name}.bias"] = (out_f,)


def bfl_tensor_shapes(geo: FluxGeometry = FluxGeometry()) -> dict[str, tuple[int, ...]]:
    """Every tensor of a FLUX.1 transformer in BFL naming, in a stable logical order."""
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
    _linear(s, "txt_in", h, CONTEXT_DIM)
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


def is_kept_unquantized(name: str) -> bool:
    """True for tensors the published recipes keep in source precision (and every 1-D tensor)."""
    return any(p in name for p in UNQUANTIZED_PREFIXES)
