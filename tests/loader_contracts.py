"""What ComfyUI-GGUF and stable-diffusion.cpp require of a FLUX GGUF file, re-stated from their code.

Neither loader can be installed here (ComfyUI-GGUF runs inside ComfyUI; stable-diffusion.cpp is
C++), so each function below transcribes the code path a FLUX diffusion-model file takes through
it, citing the repository, path and function and quoting the deciding lines. Versions read (the
search index's stored copies):

* city96/ComfyUI-GGUF: loader.py @001ffcf (``gguf_sd_loader``), dequant.py @03e0e54
  (``dequantize_tensor``, ``dequantize``, ``dequantize_functions``), ops.py @03842fa (``GGMLLayer``,
  ``GGMLOps``), nodes.py @014560d (``UnetLoaderGGUF.load_unet``);
* ComfyUI itself, where ComfyUI-GGUF hands the state dict over (``comfy.sd.load_diffusion_model_state_dict``,
  ``comfy/model_detection.py`` ``detect_unet_config``, ``comfy/ldm/flux/layers.py`` ``RMSNorm``), as found by
  code search (the index does not name the repository of those excerpts);
* leejet/stable-diffusion.cpp: src/model.cpp @06184f2 (``ModelLoader::init_from_gguf_file``,
  ``ModelLoader::get_sd_version``), src/model_io/gguf_io.cpp @1330ceb (``read_gguf_file``),
  src/flux.hpp @00086a2 (block names, ``forward_orig``), and its ggml (leejet/ggml src/gguf.cpp
  @cd69ca3, ``gguf_init_from_file_impl``); ``FluxRunner::FluxRunner``, ``RMSNorm::init_params``
  (flux.hpp) and ``Linear::init_params`` (ggml_extend.hpp) as code search returned them (the same
  code in every copy found; the index does not name the repository of those excerpts).

Each function raises ``LoaderRejects`` with the loader's own message (or the condition it tests)
where that loader would refuse the file or silently change a tensor; it returns what the loader
builds otherwise.
"""
from __future__ import annotations

import math
import pathlib
import re
from dataclasses import dataclass
from typing import Mapping

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as T, GGUFReader, GGUFValueType

# ComfyUI-GGUF dequantizes with torch functions of its own (dequant.py). diffusers ships a port of
# that file ("dequantize operations based on torch ports of GGUF dequantize_functions from City96",
# diffusers/quantizers/gguf/utils.py) with the same signature ``fn(blocks, block_size, type_size,
# dtype)``; it stands in for ComfyUI-GGUF's module, which imports ComfyUI and cannot load here. The
# tests check that the stand-in offers exactly the key set quoted below, and compare its values
# with gguf-py's reference ``gguf.quants.dequantize`` (ComfyUI-GGUF's own numpy fallback).
from diffusers.quantizers.gguf.utils import dequantize_functions as PORTED_DEQUANTIZE_FUNCTIONS


class LoaderRejects(ValueError):
    """The file fails a rule of the named loader."""


# --------------------------------------------------------------------------- ComfyUI-GGUF

# loader.py, module level:
#   IMG_ARCH_LIST = {"flux", "sd1", "sdxl", "sd3", "aura", "hidream", "cosmos", "ltxv", "hyvid", "wan",
#                    "lumina2", "qwen_image"}
# (no "flux2": a FLUX.2 file must say "flux"; ComfyUI tells FLUX.2 apart by tensor names, below)
COMFY_IMG_ARCH_LIST = frozenset({"flux", "sd1", "sdxl", "sd3", "aura", "hidream", "cosmos", "ltxv", "hyvid",
                                 "wan", "lumina2", "qwen_image"})

# dequant.py: TORCH_COMPATIBLE_QTYPES = (None, gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16)
# (ops.py GGMLLayer.torch_compatible_tensor_types is the same set): these are plain torch tensors.
COMFY_TORCH_COMPATIBLE = frozenset({T.F32, T.F16})

# dequant.py: dequantize_functions = {gguf.GGMLQuantizationType.BF16: dequantize_blocks_BF16,
#   Q8_0, Q5_1, Q5_0, Q4_1, Q4_0, Q6_K, Q5_K, Q4_K, Q3_K, Q2_K, IQ4_NL, IQ4_XS}
# Anything else reaches dequantize_tensor's last resort:
#   tqdm.write(f"Falling back to numpy dequant for qtype: ...")   # "this is incredibly slow"
#   new = gguf.quants.dequantize(tensor.cpu().numpy(), qtype)
# which runs on the CPU at every forward pass; we count a type that needs it as not supported.
COMFY_DEQUANTIZE_FUNCTIONS = frozenset({T.BF16, T.Q8_0, T.Q5_1, T.Q5_0, T.Q4_1, T.Q4_0, T.Q6_K, T.Q5_K,
                                        T.Q4_K, T.Q3_K, T.Q2_K, T.IQ4_NL, T.IQ4_XS})
COMFY_READABLE = COMFY_TORCH_COMPATIBLE | COMFY_DEQUANTIZE_FUNCTIONS

# nodes.py UnetLoaderGGUF.load_unet: ``sd = gguf_sd_loader(unet_path)`` (default
# handle_prefix="model.diffusion_model."), then comfy.sd.load_diffusion_model_state_dict(sd, ...).
COMFY_HANDLE_PREFIX = "model.diffusion_model."


@dataclass(frozen=True)
class ComfyTensor:
    """One entry of the state dict gguf_sd_loader returns (a GGMLTensor): raw data, type, torch shape."""

    data: np.ndarray
    tensor_type: T
    tensor_shape: tuple[int, ...]


def _string_field(reader: GGUFReader, key: str) -> str | None:
    # loader.py get_field(reader, field_name, str):
    #   if len(field.types) != 1 or field.types[0] != gguf.GGUFValueType.STRING:
    #       raise TypeError(f"Bad type for GGUF {field_name} key: expected string, got {field.types!r}")
    #   return str(field.parts[field.data[-1]], encoding="utf-8")
    field = reader.get_field(key)
    if field is None:
        return None
    if len(field.types) != 1 or field.types[0] != GGUFValueType.STRING:
        raise LoaderRejects(f"ComfyUI-GGUF: Bad type for GGUF {key} key: expected string, got {field.types!r}")
    return str(bytes(field.parts[field.data[-1]]), encoding="utf-8")


def _orig_shape(reader: GGUFReader, name: str) -> tuple[int, ...] | None:
    # loader.py get_orig_shape: a "comfy.gguf.orig_shape.{tensor_name}" KV (ARRAY of INT32) overrides
    # the stored shape; anything else there raises TypeError("Bad original shape metadata ...").
    field = reader.get_field(f"comfy.gguf.orig_shape.{name}")
    if field is None:
        return None
    if len(field.types) != 2 or field.types[0] != GGUFValueType.ARRAY or field.types[1] != GGUFValueType.INT32:
        raise LoaderRejects(f"ComfyUI-GGUF: Bad original shape metadata for comfy.gguf.orig_shape.{name}")
    return tuple(int(field.parts[i][0]) for i in field.data)


def comfy_gguf_sd_loader(path: str | pathlib.Path,
                         handle_prefix: str | None = COMFY_HANDLE_PREFIX) -> tuple[dict[str, ComfyTensor], str]:
    """loader.py ``gguf_sd_loader(path)`` as UnetLoaderGGUF calls it: (state dict, arch string)."""
    reader = GGUFReader(path)
    # "filter and strip prefix": only when some tensor carries the prefix are others dropped.
    #   has_prefix = any(s.startswith(handle_prefix) for s in tensor_names)
    #   if has_prefix: if not tensor_name.startswith(handle_prefix): continue; sd_key = tensor_name[prefix_len:]
    names = [t.name for t in reader.tensors]
    has_prefix = handle_prefix is not None and any(n.startswith(handle_prefix) for n in names)
    tensors = []
    for t in reader.tensors:
        if has_prefix:
            if not t.name.startswith(handle_prefix):
                continue
            tensors.append((t.name[len(handle_prefix):], t))
        else:
            tensors.append((t.name, t))
    # "detect and verify architecture":
    #   arch_str = get_field(reader, "general.architecture", str)
    #   if arch_str in [None, "pig"]: ... compat = "sd.cpp" ... detect_arch(...)   (compatibility mode, warns)
    #   elif arch_str not in IMG_ARCH_LIST and not is_text_model:
    #       raise ValueError(f"Unexpected architecture type in GGUF file: {arch_str!r}")
    arch = _string_field(reader, "general.architecture")
    if arch in (None, "pig"):
        raise LoaderRejects(f"ComfyUI-GGUF: {path}: general.architecture is {arch!r}: loaded only in compatibility "
                            "mode, by guessing the model from tensor names (tools/convert.py detect_arch)")
    if arch not in COMFY_IMG_ARCH_LIST:
        raise LoaderRejects(f"ComfyUI-GGUF: Unexpected architecture type in GGUF file: {arch!r}")
    sd: dict[str, ComfyTensor] = {}
    for key, t in tensors:
        # shape = get_orig_shape(reader, tensor_name)
        # if shape is None: shape = torch.Size(tuple(int(v) for v in reversed(tensor.shape)))
        shape = _orig_shape(reader, t.name) or tuple(int(v) for v in reversed(t.shape))
        # if tensor.tensor_type in {F32, F16}: torch_tensor = torch_tensor.view(*shape)
        if t.tensor_type in COMFY_TORCH_COMPATIBLE and t.data.size != math.prod(shape):
            raise LoaderRejects(f"ComfyUI-GGUF: {t.name}: view(*{shape}) of {t.data.size} elements fails")
        sd[key] = ComfyTensor(t.data, T(t.tensor_type), shape)
    return sd, arch


def comfy_dequantize(t: ComfyTensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """dequant.py ``dequantize_tensor`` (GGMLLayer.get_weight calls it before every matmul)."""
    # if qtype in TORCH_COMPATIBLE_QTYPES: return tensor.to(dtype)
    if t.tensor_type in COMFY_TORCH_COMPATIBLE:
        return torch.from_numpy(np.array(t.data)).view(*t.tensor_shape).to(dtype)
    if t.tensor_type not in COMFY_DEQUANTIZE_FUNCTIONS:
        raise LoaderRejects(f"ComfyUI-GGUF: Falling back to numpy dequant for qtype: {t.tensor_type.name}")
    # dequantize(data, qtype, oshape, dtype):
    #   block_size, type_size = gguf.GGML_QUANT_SIZES[qtype]
    #   rows = data.reshape((-1, data.shape[-1])).view(torch.uint8)
    #   n_blocks = rows.numel() // type_size
    #   blocks = rows.reshape((n_blocks, type_size))
    #   blocks = dequantize_blocks(blocks, block_size, type_size, dtype)
    #   return blocks.reshape(oshape)
    block_size, type_size = GGML_QUANT_SIZES[t.tensor_type]
    data = torch.from_numpy(np.array(t.data))
    rows = data.reshape((-1, data.shape[-1])).view(torch.uint8)
    n_blocks = rows.numel() // type_size
    blocks = rows.reshape((n_blocks, type_size))
    blocks = PORTED_DEQUANTIZE_FUNCTIONS[t.tensor_type](blocks, block_size, type_size, dtype)
    return blocks.reshape(t.tensor_shape).to(dtype)


def comfy_state_dict_for_detection(sd: Mapping[str, ComfyTensor]) -> dict[str, ComfyTensor]:
    """comfy.sd.load_diffusion_model_state_dict's prefix step (model_detection.unet_prefix_from_state_dict):

        candidates = ("model.diffusion_model.", "net.")
        for prefix in candidates:
            if sum(1 for k in state_dict if k.startswith(prefix)) > 5: return prefix
        return "model."  # etc.
        ...
        temp_sd = comfy.utils.state_dict_prefix_replace(sd, {diffusion_model_prefix: ""}, filter_keys=True)
        if len(temp_sd) > 0: sd = temp_sd
    """
    prefix = next((p for p in ("model.diffusion_model.", "net.") if sum(k.startswith(p) for k in sd) > 5), "model.")
    stripped = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    return stripped if stripped else dict(sd)


def _count_blocks(keys: set[str], template: str) -> int:
    # comfy/model_detection.py count_blocks: counts i = 0, 1, ... while some key starts with template.format(i)
    count = 0
    while any(k.startswith(template.format(count)) for k in keys):
        count += 1
    return count


def comfy_detect_flux(sd: Mapping[str, ComfyTensor]) -> dict:
    """The Flux.1 / Flux.2 branch of comfy/model_detection.py ``detect_unet_config`` (key_prefix "")."""
    keys = set(sd)
    #   if ("{}double_blocks.0.img_attn.norm.key_norm.scale" in state_dict_keys or ...key_norm.weight ...)
    #      and ("{}img_in.weight" in state_dict_keys or ...distilled_guidance_layer.norms.0.scale...):  # Flux.1 / Flux.2
    if not ({"double_blocks.0.img_attn.norm.key_norm.scale", "double_blocks.0.img_attn.norm.key_norm.weight"} & keys
            and "img_in.weight" in keys):
        raise LoaderRejects("ComfyUI: detect_unet_config finds no Flux model (double_blocks.0.img_attn.norm."
                            "key_norm.scale and img_in.weight)")
    cfg: dict = {}
    #   if "{}double_stream_modulation_img.lin.weight" in state_dict_keys: image_model "flux2",
    #       axes_dim [32, 32, 32, 32], mlp_ratio 3.0, patch_size 1 ...
    #   else: image_model "flux", axes_dim [16, 56, 56], mlp_ratio 4.0, qkv_bias True, patch_size 2
    if "double_stream_modulation_img.lin.weight" in keys:
        cfg.update(image_model="flux2", axes_dim=[32, 32, 32, 32], mlp_ratio=3.0, qkv_bias=False)
        patch = 1
    else:
        cfg.update(image_model="flux", axes_dim=[16, 56, 56], mlp_ratio=4.0, qkv_bias=True)
        patch = 2
    #   w = state_dict["img_in.weight"]; in_channels = int(w.shape[1] // (patch_size * patch_size));
    #   hidden_size = int(w.shape[0]); txt_in.weight -> context_in_dim = shape[1], hidden_size = shape[0]
    #   vector_in.in_layer.weight -> vec_in_dim = shape[1], else None
    #   num_heads = int(hidden_size // sum(axes_dim)); depth = count_blocks(..."double_blocks.{}."), ...
    #   guidance_embed = "guidance_in.in_layer.weight" in state_dict_keys
    w = sd["img_in.weight"].tensor_shape
    cfg["in_channels"], cfg["hidden_size"] = w[1] // (patch * patch), w[0]
    if "txt_in.weight" in keys:
        cfg["context_in_dim"], cfg["hidden_size"] = sd["txt_in.weight"].tensor_shape[1], sd["txt_in.weight"].tensor_shape[0]
    cfg["vec_in_dim"] = sd["vector_in.in_layer.weight"].tensor_shape[1] if "vector_in.in_layer.weight" in keys else None
    cfg["num_heads"] = cfg["hidden_size"] // sum(cfg["axes_dim"])
    cfg["depth"] = _count_blocks(keys, "double_blocks.{}.")
    cfg["depth_single_blocks"] = _count_blocks(keys, "single_blocks.{}.")
    cfg["guidance_embed"] = "guidance_in.in_layer.weight" in keys
    return cfg


# ComfyUI-GGUF dequantizes on the fly only inside its GGMLOps layers (ops.py: class GGMLOps with
# Linear, Conv2d, Embedding, LayerNorm, GroupNorm; GGMLLayer._load_from_state_dict takes the GGML
# path ``if self.is_ggml_quantized(weight=weight, bias=bias) or isinstance(self, torch.nn.Linear)``).
# FLUX's q/k norm scales are no such layer: comfy/ldm/flux/layers.py
#   class RMSNorm(torch.nn.Module): self.scale = nn.Parameter(torch.empty((dim), ...))
#   def forward(self, x): return comfy.ldm.common_dit.rms_norm(x, self.scale, 1e-6)
# so they are read as plain tensors and must be torch-compatible (F32/F16), not BF16 (a uint8 view
# in gguf-py) or quantized. Every other FLUX tensor is the weight or bias of an operations.Linear.
COMFY_PLAIN_PARAMETER = re.compile(r"\.norm\.(query|key)_norm\.(scale|weight)$")


# --------------------------------------------------------------------------- stable-diffusion.cpp

# src/stable-diffusion.cpp (and examples): model_loader.init_from_file(diffusion_model_path, "model.diffusion_model.")
# src/model.cpp ModelLoader::init_from_gguf_file:
#   if (!starts_with(tensor_storage.name, prefix)) { tensor_storage.name = prefix + tensor_storage.name; }
SDCPP_PREFIX = "model.diffusion_model."
# ggml include/ggml.h: #define GGML_MAX_NAME 64 (the default; gguf.cpp: "if (name.length() >= GGML_MAX_NAME) ... too long")
GGML_MAX_NAME = 64
GGML_MAX_DIMS = 4
GGUF_DEFAULT_ALIGNMENT = 32


@dataclass(frozen=True)
class SdTensorStorage:
    """sd.cpp's TensorStorage: prefixed name, ggml type, ne (ggml order, innermost first), data offset."""

    name: str
    type: T
    ne: tuple[int, ...]
    offset: int


def sdcpp_read_gguf(path: str | pathlib.Path, prefix: str = SDCPP_PREFIX) -> list[SdTensorStorage]:
    """gguf_io.cpp ``read_gguf_file`` (ggml's ``gguf_init_from_file``, then the size check) and the prefix
    of ``init_from_gguf_file``. sd.cpp reads no KV of a diffusion model: no general.architecture check."""
    reader = GGUFReader(path)
    # gguf.cpp gguf_init_from_file_impl: version 1 is refused ("GGUFv1 is no longer supported"), and
    # "general.alignment" must be a power of 2 when present.
    version = int(reader.fields["GGUF.version"].parts[-1][0])
    if version < 2:
        raise LoaderRejects(f"ggml: {path}: GGUF version {version} is not supported")
    align_field = reader.get_field("general.alignment")
    alignment = int(align_field.parts[-1][0]) if align_field is not None else GGUF_DEFAULT_ALIGNMENT
    if alignment <= 0 or alignment & (alignment - 1):
        raise LoaderRejects(f"ggml: alignment {alignment} is not a power of 2")
    out: list[SdTensorStorage] = []
    seen: set[str] = set()
    expected_offset = 0
    for t in reader.tensors:
        # "if (name.length() >= GGML_MAX_NAME) { ... tensor name %d is too long" ; "duplicate tensor name"
        if len(t.name.encode()) >= GGML_MAX_NAME:
            raise LoaderRejects(f"ggml: tensor name {t.name!r} is too long: {len(t.name)} >= {GGML_MAX_NAME}")
        if t.name in seen:
            raise LoaderRejects(f"ggml: duplicate tensor name {t.name!r}")
        seen.add(t.name)
        ne = tuple(int(v) for v in t.shape)
        # "if (n_dims > GGML_MAX_DIMS) ... has invalid number of dimensions"
        if len(ne) > GGML_MAX_DIMS:
            raise LoaderRejects(f"ggml: tensor {t.name!r} has invalid number of dimensions: {len(ne)}")
        # "if (info.t.type < 0 || info.t.type >= GGML_TYPE_COUNT) ... has invalid ggml type";
        # gguf_io.cpp: "ggml_get_type_traits(type)->type_size == 0" -> "unsupported GGUF tensor type"
        qtype = T(t.tensor_type)
        if qtype not in GGML_QUANT_SIZES:
            raise LoaderRejects(f"sd.cpp: unsupported GGUF tensor type (tensor {t.name!r})")
        block, type_size = GGML_QUANT_SIZES[qtype]
        # "if (blck_size == 0 || info.t.ne[0] % blck_size != 0) ... not a multiple of block size"
        if ne[0] % block:
            raise LoaderRejects(f"ggml: tensor {t.name!r} of type {qtype.name} has {ne[0]} elements per row, "
                                f"not a multiple of block size ({block})")
        # data section: "if (ti.offset != ctx->size) ... tensor '%s' has offset %, expected %zu";
        #   ctx->size += GGML_PAD(ggml_nbytes(&ti.t), ctx->alignment)
        rel = int(t.data_offset) - int(reader.data_offset)
        if rel != expected_offset:
            raise LoaderRejects(f"ggml: tensor {t.name!r} has offset {rel}, expected {expected_offset}")
        nbytes = math.prod(ne) // block * type_size
        # gguf_io.cpp: if (ggml_nbytes(dummy) != tensor_storage.nbytes()) -> "size mismatch for tensor"
        if nbytes != int(t.n_bytes):
            raise LoaderRejects(f"sd.cpp: size mismatch for tensor {t.name!r}")
        expected_offset += -(-nbytes // alignment) * alignment
        name = t.name if t.name.startswith(prefix) else prefix + t.name
        out.append(SdTensorStorage(name, qtype, ne, rel))
    return out


def sdcpp_get_sd_version(storages: list[SdTensorStorage]) -> str:
    """model.cpp ``ModelLoader::get_sd_version``, the branches a FLUX file can reach."""
    names = [s.name for s in storages]

    def has(fragment: str) -> bool:  # tensor_storage.name.find(fragment) != std::string::npos
        return any(fragment in n for n in names)

    # early returns that would claim a FLUX file for another model:
    #   "model.diffusion_model.nerf_final_layer_conv." -> CHROMA_RADIANCE; "model.diffusion_model.joint_blocks." -> SD3;
    #   "model.diffusion_model.transformer_blocks.0.img_mod.1.weight" -> QWEN_IMAGE;
    #   "model.diffusion_model.double_blocks.0.img_mlp.gate_proj.weight" -> OVIS_IMAGE; ...
    for fragment, version in (("model.diffusion_model.nerf_final_layer_conv.", "VERSION_CHROMA_RADIANCE"),
                              ("model.diffusion_model.joint_blocks.", "VERSION_SD3"),
                              ("model.diffusion_model.transformer_blocks.0.img_mod.1.weight", "VERSION_QWEN_IMAGE"),
                              ("model.diffusion_model.double_blocks.0.img_mlp.gate_proj.weight", "VERSION_OVIS_IMAGE"),
                              ("model.diffusion_model.cap_embedder.0.weight", "VERSION_Z_IMAGE")):
        if has(fragment):
            return version
    # is_flux  = name.find("model.diffusion_model.double_blocks.") ...
    # is_flux2 = name.find("model.diffusion_model.double_stream_modulation_img.lin.weight") ...
    # has_single_block_47 = name.find("single_blocks.47.linear1.weight") ...
    # input_block_weight = the "model.diffusion_model.img_in.weight" storage
    is_flux = has("model.diffusion_model.double_blocks.")
    is_flux2 = has("model.diffusion_model.double_stream_modulation_img.lin.weight")
    img_in = next((s for s in storages if s.name == "model.diffusion_model.img_in.weight"), None)
    if is_flux and not is_flux2:
        # if (input_block_weight.ne[0] == 384) FLUX_FILL; == 128 FLUX_CONTROLS; == 196 FLEX_2; else FLUX
        ne0 = img_in.ne[0] if img_in is not None else 0
        return {384: "VERSION_FLUX_FILL", 128: "VERSION_FLUX_CONTROLS", 196: "VERSION_FLEX_2"}.get(ne0, "VERSION_FLUX")
    if is_flux2:
        # if (has_single_block_47) return VERSION_FLUX2; return VERSION_FLUX2_KLEIN;
        return "VERSION_FLUX2" if has("single_blocks.47.linear1.weight") else "VERSION_FLUX2_KLEIN"
    raise LoaderRejects("sd.cpp: get_sd_version finds no FLUX model (no model.diffusion_model.double_blocks.)")


def sdcpp_flux_params(storages: list[SdTensorStorage], prefix: str = SDCPP_PREFIX) -> dict:
    """flux.hpp ``FluxRunner::FluxRunner``: the block counts and guidance flag read from tensor names.

        if (tensor_name.find("guidance_in.in_layer.weight") != npos) flux_params.guidance_embed = true;
        size_t db = tensor_name.find("double_blocks.");
        ... int block_depth = atoi(tensor_name.substr(14, tensor_name.find(".", 14)).c_str());
        if (block_depth + 1 > flux_params.depth) flux_params.depth = block_depth + 1;
        (the same for "single_blocks." -> depth_single_blocks)
    """
    params = {"depth": 0, "depth_single_blocks": 0, "guidance_embed": False}
    for s in storages:
        if not s.name.startswith(prefix):
            continue
        name = s.name
        if "guidance_in.in_layer.weight" in name:
            params["guidance_embed"] = True
        for marker, key in (("double_blocks.", "depth"), ("single_blocks.", "depth_single_blocks")):
            at = name.find(marker)
            if at >= 0:
                rest = name[at:]
                digits = re.match(r"\d*", rest[14:]).group()  # atoi of substr(14, ...)
                params[key] = max(params[key], int(digits or 0) + 1)
    return params


def sdcpp_model_type(name: str, stored: SdTensorStorage) -> T:
    """The ggml type sd.cpp allocates for a FLUX tensor; load_tensors converts the file's data when
    the stored type differs (convert_tensor), and refuses a shape that differs.

    ggml_extend.hpp Linear::init_params:
        enum ggml_type wtype = get_type(prefix + "weight", tensor_storage_map, GGML_TYPE_F32);
        if (in_features % ggml_blck_size(wtype) != 0 || force_f32) { wtype = GGML_TYPE_F32; }
        params["weight"] = ggml_new_tensor_2d(ctx, wtype, in_features, out_features);
        if (bias) { enum ggml_type wtype = GGML_TYPE_F32; params["bias"] = ggml_new_tensor_1d(...); }
    flux.hpp RMSNorm::init_params: ggml_type wtype = GGML_TYPE_F32; params["scale"] = ggml_new_tensor_1d(...)
    """
    if name.endswith(".weight") and len(stored.ne) == 2:
        block = GGML_QUANT_SIZES[stored.type][0]
        return stored.type if stored.ne[0] % block == 0 else T.F32
    return T.F32  # Linear biases and RMSNorm scales


__all__ = [
    "LoaderRejects", "COMFY_IMG_ARCH_LIST", "COMFY_TORCH_COMPATIBLE", "COMFY_DEQUANTIZE_FUNCTIONS", "COMFY_READABLE",
    "COMFY_PLAIN_PARAMETER", "ComfyTensor", "comfy_gguf_sd_loader", "comfy_dequantize",
    "comfy_state_dict_for_detection", "comfy_detect_flux", "PORTED_DEQUANTIZE_FUNCTIONS", "SDCPP_PREFIX",
    "GGML_MAX_NAME", "SdTensorStorage", "sdcpp_read_gguf", "sdcpp_get_sd_version", "sdcpp_flux_params",
    "sdcpp_model_type",
]
