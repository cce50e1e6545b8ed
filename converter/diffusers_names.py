"""FLUX.1 and FLUX.2 transformer names: BFL <-> diffusers.

BFL naming (what GGUF files and ComfyUI use) fuses tensors diffusers keeps apart: the attention
``qkv`` of each double-block stream is diffusers' to_q/to_k/to_v (or add_q/k/v_proj) stacked by
rows, and ``single_blocks.N.linear1`` is to_q/to_k/to_v then proj_mlp. ``final_layer.adaLN_modulation.1``
is diffusers' ``norm_out.linear`` with its two row halves swapped (BFL: shift, scale; diffusers:
scale, shift). This module is the exact inverse of diffusers'
``convert_flux_transformer_checkpoint_to_diffusers`` and is pure naming: no tensors, no I/O.

FLUX.2 (``arch="flux2"``) is the inverse of ``convert_flux2_transformer_checkpoint_to_diffusers``
(diffusers 0.42.1): weights only (no biases), ``qkv`` still split into to_q/to_k/to_v (add_*_proj),
but ``single_blocks.N.linear1`` stays fused as ``attn.to_qkv_mlp_proj``, the MLPs are
``ff.linear_in`` / ``ff.linear_out``, the embedders live under ``time_guidance_embed`` and the shared
modulations ``double_stream_modulation_{img,txt}.lin`` / ``single_stream_modulation.lin`` become
``.linear``. :func:`diffusers_arch` tells the two apart from the keys.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterable

from .layout import FLUX1, FLUX2, MLP_RATIO


@dataclass(frozen=True)
class DiffusersParts:
    """How one BFL tensor is stored in diffusers naming.

    ``parts`` are diffusers keys whose tensors, concatenated along rows (axis 0) in this order,
    give the BFL tensor; with ``swap_halves`` the result's two row halves are then exchanged.
    """

    bfl: str
    parts: tuple[str, ...]
    swap_halves: bool = False


# Linears (each with .weight and .bias): BFL module -> diffusers modules stacked by rows.
_GLOBAL_LINEARS: dict[str, tuple[str, ...]] = {
    "img_in": ("x_embedder",),
    "time_in.in_layer": ("time_text_embed.timestep_embedder.linear_1",),
    "time_in.out_layer": ("time_text_embed.timestep_embedder.linear_2",),
    "vector_in.in_layer": ("time_text_embed.text_embedder.linear_1",),
    "vector_in.out_layer": ("time_text_embed.text_embedder.linear_2",),
    "guidance_in.in_layer": ("time_text_embed.guidance_embedder.linear_1",),
    "guidance_in.out_layer": ("time_text_embed.guidance_embedder.linear_2",),
    "txt_in": ("context_embedder",),
    "final_layer.linear": ("proj_out",),
    "final_layer.adaLN_modulation.1": ("norm_out.linear",),
}
_SWAPPED = "final_layer.adaLN_modulation.1"
_DOUBLE_LINEARS: dict[str, tuple[str, ...]] = {
    "img_mod.lin": ("norm1.linear",),
    "txt_mod.lin": ("norm1_context.linear",),
    "img_attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
    "txt_attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
    "img_attn.proj": ("attn.to_out.0",),
    "txt_attn.proj": ("attn.to_add_out",),
    "img_mlp.0": ("ff.net.0.proj",),
    "img_mlp.2": ("ff.net.2",),
    "txt_mlp.0": ("ff_context.net.0.proj",),
    "txt_mlp.2": ("ff_context.net.2",),
}
_DOUBLE_NORMS: dict[str, str] = {
    "img_attn.norm.query_norm.scale": "attn.norm_q.weight",
    "img_attn.norm.key_norm.scale": "attn.norm_k.weight",
    "txt_attn.norm.query_norm.scale": "attn.norm_added_q.weight",
    "txt_attn.norm.key_norm.scale": "attn.norm_added_k.weight",
}
_SINGLE_LINEARS: dict[str, tuple[str, ...]] = {
    "linear1": ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"),
    "linear2": ("proj_out",),
    "modulation.lin": ("norm.linear",),
}
_SINGLE_NORMS: dict[str, str] = {
    "norm.query_norm.scale": "attn.norm_q.weight",
    "norm.key_norm.scale": "attn.norm_k.weight",
}
_BLOCKS = {"double_blocks": "transformer_blocks", "single_blocks": "single_transformer_blocks"}
_BLOCK_TABLES = {
    "double_blocks": (_DOUBLE_LINEARS, _DOUBLE_NORMS),
    "single_blocks": (_SINGLE_LINEARS, _SINGLE_NORMS),
}
# FLUX.2 (weights only).
_FLUX2_GLOBAL_LINEARS: dict[str, tuple[str, ...]] = {
    "img_in": ("x_embedder",),
    "txt_in": ("context_embedder",),
    "time_in.in_layer": ("time_guidance_embed.timestep_embedder.linear_1",),
    "time_in.out_layer": ("time_guidance_embed.timestep_embedder.linear_2",),
    "guidance_in.in_layer": ("time_guidance_embed.guidance_embedder.linear_1",),
    "guidance_in.out_layer": ("time_guidance_embed.guidance_embedder.linear_2",),
    "double_stream_modulation_img.lin": ("double_stream_modulation_img.linear",),
    "double_stream_modulation_txt.lin": ("double_stream_modulation_txt.linear",),
    "single_stream_modulation.lin": ("single_stream_modulation.linear",),
    "final_layer.linear": ("proj_out",),
    "final_layer.adaLN_modulation.1": ("norm_out.linear",),
}
_FLUX2_DOUBLE_LINEARS: dict[str, tuple[str, ...]] = {
    "img_attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
    "txt_attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
    "img_attn.proj": ("attn.to_out.0",),
    "txt_attn.proj": ("attn.to_add_out",),
    "img_mlp.0": ("ff.linear_in",),
    "img_mlp.2": ("ff.linear_out",),
    "txt_mlp.0": ("ff_context.linear_in",),
    "txt_mlp.2": ("ff_context.linear_out",),
}
_FLUX2_SINGLE_LINEARS: dict[str, tuple[str, ...]] = {
    "linear1": ("attn.to_qkv_mlp_proj",),
    "linear2": ("attn.to_out",),
}
_FLUX2_BLOCK_TABLES = {
    "double_blocks": (_FLUX2_DOUBLE_LINEARS, _DOUBLE_NORMS),
    "single_blocks": (_FLUX2_SINGLE_LINEARS, _SINGLE_NORMS),
}
# Keys only a diffusers FLUX.2 transformer has.
_FLUX2_DIFFUSERS_MARKERS = ("double_stream_modulation_img.", "double_stream_modulation_txt.",
                            "single_stream_modulation.", "time_guidance_embed.")
_BFL_BLOCK = re.compile(r"^(double_blocks|single_blocks)\.(\d+)\.(.+)$")
_DIFFUSERS_BLOCK = re.compile(r"^(transformer_blocks|single_transformer_blocks)\.(\d+)\.(.+)$")


def _expand(bfl_prefix: str, dif_prefix: str, linears: dict[str, tuple[str, ...]],
            norms: dict[str, str], params: tuple[str, ...] = ("weight", "bias")) -> dict[str, DiffusersParts]:
    out: dict[str, DiffusersParts] = {}
    for bfl_mod, dif_mods in linears.items():
        for param in params:
            bfl = f"{bfl_prefix}{bfl_mod}.{param}"
            out[bfl] = DiffusersParts(bfl, tuple(f"{dif_prefix}{m}.{param}" for m in dif_mods),
                                      swap_halves=bfl_prefix + bfl_mod == _SWAPPED)
    for bfl_key, dif_key in norms.items():
        out[bfl_prefix + bfl_key] = DiffusersParts(bfl_prefix + bfl_key, (dif_prefix + dif_key,))
    return out


@dataclass(frozen=True)
class _Tables:
    """One architecture's naming tables, forward and reverse."""

    globals_: dict[str, DiffusersParts]
    blocks: dict[str, dict[str, DiffusersParts]]  # block kind -> templates with the index left out ("N.")
    global_reverse: dict[str, tuple[str, int]]
    block_reverse: dict[str, dict[str, tuple[str, int]]]


def _tables(global_linears: dict[str, tuple[str, ...]], block_tables: dict[str, tuple[dict, dict]],
            params: tuple[str, ...]) -> _Tables:
    globals_ = _expand("", "", global_linears, {}, params)
    blocks = {kind: _expand("", "", lin, norms, params) for kind, (lin, norms) in block_tables.items()}
    return _Tables(
        globals_, blocks,
        {p: (m.bfl, i) for m in globals_.values() for i, p in enumerate(m.parts)},
        {_BLOCKS[kind]: {p: (m.bfl, i) for m in table.values() for i, p in enumerate(m.parts)}
         for kind, table in blocks.items()},
    )


_TABLES = {
    FLUX1: _tables(_GLOBAL_LINEARS, _BLOCK_TABLES, ("weight", "bias")),
    FLUX2: _tables(_FLUX2_GLOBAL_LINEARS, _FLUX2_BLOCK_TABLES, ("weight",)),
}
_DIFFUSERS_TO_BFL_BLOCKS = {v: k for k, v in _BLOCKS.items()}


def _arch_tables(arch: str) -> _Tables:
    try:
        return _TABLES[arch]
    except KeyError:
        raise ValueError(f"architecture {arch!r}; expected {FLUX1!r} or {FLUX2!r}") from None


def diffusers_arch(keys: Iterable[str]) -> str:
    """"flux2" when diffusers keys hold a FLUX.2 transformer's (its shared modulations, its embedder), else "flux1"."""
    return FLUX2 if any(k.startswith(_FLUX2_DIFFUSERS_MARKERS) for k in keys) else FLUX1


def diffusers_parts(bfl_name: str, arch: str = FLUX1) -> DiffusersParts | None:
    """The diffusers keys holding BFL tensor ``bfl_name``; None for a name the architecture does not have."""
    t = _arch_tables(arch)
    if bfl_name in t.globals_:
        return t.globals_[bfl_name]
    m = _BFL_BLOCK.match(bfl_name)
    if m is None:
        return None
    kind, index, rest = m.groups()
    template = t.blocks[kind].get(rest)
    if template is None:
        return None
    prefix = f"{_BLOCKS[kind]}.{index}."
    return DiffusersParts(bfl_name, tuple(prefix + p for p in template.parts), template.swap_halves)


def bfl_name_for(diffusers_key: str, arch: str = FLUX1) -> tuple[str, int] | None:
    """(BFL tensor name, index of this key among its parts) for a diffusers key; None if unknown."""
    t = _arch_tables(arch)
    if diffusers_key in t.global_reverse:
        return t.global_reverse[diffusers_key]
    m = _DIFFUSERS_BLOCK.match(diffusers_key)
    if m is None:
        return None
    kind, index, rest = m.groups()
    hit = t.block_reverse[kind].get(rest)
    if hit is None:
        return None
    return f"{_DIFFUSERS_TO_BFL_BLOCKS[kind]}.{index}.{hit[0]}", hit[1]


def part_rows(bfl_name: str, rows: int, arch: str = FLUX1) -> tuple[int, ...]:
    """Rows of each diffusers part of a BFL tensor with ``rows`` rows (for splitting, e.g. writers).

    ``qkv`` splits in three equal parts; FLUX.1's ``linear1`` in q, k, v of hidden rows each then the
    MLP (MLP_RATIO x hidden rows), so hidden = rows / (3 + MLP_RATIO); FLUX.2's ``linear1`` is one part.
    Raises ValueError when the rows do not divide that way or the name is not a tensor of ``arch``.
    """
    mapping = diffusers_parts(bfl_name, arch)
    if mapping is None:
        what = "FLUX.2" if arch == FLUX2 else "FLUX.1"
        raise ValueError(f"{bfl_name} is not a {what} transformer tensor")
    n = len(mapping.parts)
    if n == 1:
        return (rows,)
    if n == 3:
        if rows % 3:
            raise ValueError(f"{bfl_name}: {rows} rows do not split into q, k, v")
        return (rows // 3,) * 3
    if rows % (3 + MLP_RATIO):
        raise ValueError(f"{bfl_name}: {rows} rows do not split into q, k, v, mlp")
    h = rows // (3 + MLP_RATIO)
    return (h, h, h, MLP_RATIO * h)
