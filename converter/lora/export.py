"""Write a canonical LoRA as a kohya side-car (``lora_unet_<bfl_module>``) to ship beside GGUF files.

Why kohya naming with fused BFL targets: ComfyUI, stable-diffusion.cpp and diffusers all load
``lora_unet_double_blocks_0_img_attn_qkv`` (lora.md), and it matches the BFL tensors of the GGUF.

How each module is written, always exactly:
- one part covering the whole tensor keeps its A, B and alpha (missing alpha written as rank);
- split parts (to_q/to_k/to_v, proj_mlp...) become one fused LoRA: A = the parts' A stacked
  (rank = sum of ranks), B block-diagonal with each part's alpha/rank folded in, alpha = that
  rank sum, so the scale is 1. Rows no part covers stay zero. diffusers' kohya converter splits
  this back exactly (it chunks A when B is block-diagonal in equal chunks, else copies A);
- ``final_layer.*`` modules always get alpha/rank folded into B and alpha = rank, because
  diffusers' kohya converter reads those modules without their alpha.

A kohya side-car cannot carry full-tensor deltas (bias deltas, ``.diff``) or replacements
(control-LoRA norm scales) that every runtime honours, so LoRAs holding them are refused: merge
those instead.

Known diffusers limitation (0.42): its kohya converter emits the embedder and final-layer
modules (x_embedder, context_embedder, time_text_embed.*, norm_out, proj_out) without the
``transformer.`` prefix, so ``FluxPipeline.load_lora_weights`` drops them; ComfyUI and
stable-diffusion.cpp apply them.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import pathlib
import struct
from dataclasses import dataclass

import numpy as np

from converter.errors import LoraError, OutputError
from manifests.hashing import open_partial, partial_path
from quant_kernels import to_bfloat16_bits, to_float16

from .formats import CanonicalLora, LoraPart, fused_row_count, key_list

SIDECAR_DTYPES = ("BF16", "F16", "F32")
KOHYA_PREFIX = "lora_unet_"


@dataclass(frozen=True)
class ExportRecord:
    """What was written: final path, byte size and the sha256 of exactly those bytes."""

    path: pathlib.Path
    size: int
    sha256: str


def _fused(module: str, parts: list[LoraPart]) -> tuple[np.ndarray, np.ndarray, float]:
    """Exact single-LoRA form of several row-slice parts: stacked A, block-diagonal scaled B."""
    hidden = parts[0].a.shape[1]
    if any(p.a.shape[1] != hidden for p in parts):
        raise LoraError(f"{module}: parts disagree on input width ({', '.join(p.key for p in parts)})")
    total = fused_row_count(module, hidden) if any(p.rows for p in parts) else parts[0].b.shape[0]
    parts = sorted(parts, key=lambda p: (p.rows or (0, 0))[0])
    rank = sum(p.rank for p in parts)
    a = np.concatenate([p.a for p in parts], axis=0)
    b = np.zeros((total, rank), dtype=np.float32)
    col = 0
    for p in parts:
        r0, r1 = p.rows or (0, total)
        b[r0:r1, col:col + p.rank] = p.b * np.float32(p.scale)
        col += p.rank
    return a, b, float(rank)


def kohya_tensors(lora: CanonicalLora) -> dict[str, np.ndarray]:
    """The side-car's tensors in float32, kohya-named, sorted by name."""
    extra = sorted(set(lora.full_deltas) | set(lora.replacements))
    if extra:
        raise LoraError(
            f"{lora.path} ({lora.format}): a kohya side-car cannot carry full-tensor deltas or "
            f"replacements: {key_list(extra)}; merge this LoRA instead"
        )
    if not lora.modules:
        raise LoraError(f"{lora.path} ({lora.format}): no low-rank modules to export")
    out: dict[str, np.ndarray] = {}
    for module in sorted(lora.modules):
        parts = lora.modules[module]
        if len(parts) == 1 and parts[0].rows is None and not module.startswith("final_layer."):
            p = parts[0]
            a, b, alpha = p.a, p.b, float(p.alpha if p.alpha is not None else p.rank)
        else:
            a, b, alpha = _fused(module, parts)
        name = KOHYA_PREFIX + module.replace(".", "_")
        out[f"{name}.alpha"] = np.array(alpha, dtype=np.float32)
        out[f"{name}.lora_down.weight"] = np.ascontiguousarray(a, dtype=np.float32)
        out[f"{name}.lora_up.weight"] = np.ascontiguousarray(b, dtype=np.float32)
    return dict(sorted(out.items()))


def _encode(name: str, x: np.ndarray, dtype: str) -> tuple[str, np.ndarray]:
    """(safetensors dtype, contiguous array holding the bytes); alpha scalars stay F32 (exact)."""
    if dtype == "F32" or x.ndim == 0:
        return "F32", np.ascontiguousarray(x, dtype=np.float32)
    if dtype == "F16":
        with np.errstate(over="ignore"):  # overflow is reported below, naming the tensor
            y = to_float16(x)
        if not np.isfinite(y).all():
            raise LoraError(f"{name} overflows F16 (largest magnitude {float(np.abs(x).max())}); export as BF16 or F32")
        return "F16", np.ascontiguousarray(y)
    return "BF16", np.ascontiguousarray(to_bfloat16_bits(x))


def _write_safetensors(path: pathlib.Path, tensors: dict[str, tuple[str, np.ndarray]], metadata: dict[str, str]) -> ExportRecord:
    """Stream header and tensors to a hidden partial name, hashing every byte written, then rename."""
    header: dict[str, object] = {"__metadata__": metadata}
    offset = 0
    for name, (dtype, arr) in tensors.items():
        header[name] = {"dtype": dtype, "shape": list(arr.shape), "data_offsets": [offset, offset + arr.nbytes]}
        offset += arr.nbytes
    blob = json.dumps(header, separators=(",", ":")).encode("utf-8")
    blob += b" " * (-len(blob) % 8)  # keep tensor data 8-byte aligned
    partial = partial_path(path)  # hidden and unique: a user's NAME.partial is never touched
    digest = hashlib.sha256()
    size = 0
    created = False
    try:
        with open_partial(partial) as f:  # a fresh regular file: never written through a planted link
            created = True
            for chunk in (struct.pack("<Q", len(blob)), blob, *(memoryview(a.reshape(-1).view(np.uint8)) for _, a in tensors.values())):
                f.write(chunk)
                digest.update(chunk)
                size += len(chunk)
            f.flush()
            os.fsync(f.fileno())
        os.replace(partial, path)
    except OSError as exc:
        if created:
            partial.unlink(missing_ok=True)
        if isinstance(exc, IsADirectoryError) and not created:
            raise OutputError(f"cannot write LoRA side-car {path}: a folder {partial} is in the way") from None
        raise OutputError(f"cannot write LoRA side-car {path}: {exc.strerror or exc}") from None
    except BaseException:
        if created:
            partial.unlink(missing_ok=True)
        raise
    return ExportRecord(path=path, size=size, sha256=digest.hexdigest())


def export_kohya(
    lora: CanonicalLora,
    path,
    *,
    dtype: str = "BF16",
    base_model: str,
    strength: float,
) -> ExportRecord:
    """Write ``lora`` as a kohya side-car safetensors at ``path`` (via a hidden unique partial name).

    The metadata names the base model and the recommended strength; the strength is not folded
    into the weights, so users keep it adjustable.
    """
    path = pathlib.Path(path)
    dtype = str(dtype).upper()
    if dtype not in SIDECAR_DTYPES:
        raise LoraError(f"unsupported side-car dtype {dtype!r}; expected one of {', '.join(SIDECAR_DTYPES)}")
    if not math.isfinite(strength):
        raise LoraError(f"recommended strength must be a finite number, got {strength}")
    if not base_model:
        raise LoraError("base_model must name the model the side-car is for")
    encoded = {name: _encode(name, x, dtype) for name, x in kohya_tensors(lora).items()}
    metadata = {
        "format": "pt",
        "ss_network_module": "networks.lora_flux",
        "flux_gguf.base_model": base_model,
        "flux_gguf.recommended_strength": repr(float(strength)),
        "flux_gguf.source_format": lora.format,
    }
    return _write_safetensors(path, encoded, metadata)
