"""Synthetic FLUX.1 and FLUX.2 checkpoints (``layout.flux2_geometry``): real key names, shapes and dtypes, made-up weights, any size.

Tests, benchmarks and the CLI's built-in example need FLUX-shaped files without downloading 24 GB
of someone's weights. These files are written the way the real ones are laid out (BFL single
file, ComfyUI-prefixed single file, or a sharded diffusers folder with index and config.json) and
are deterministic: each element is a hash of (seed, BFL tensor name, element index) looked up in
a 65,536-entry table of normal quantiles. So

* a tensor does not depend on the order of writing or on the block count (a 1-block model's
  ``double_blocks.0`` equals the 19-block model's), and the three layouts hold the same BFL tensors;
* the F16 / BF16 / FP8 files are exactly the round-to-nearest-even of the F32 file;
* generation is a counter-based hash in a parallel numba kernel, fast enough that writing the
  full 23.8 GB model is limited by the disk, and memory stays at one fixed-size chunk.

Weights are ~N(0, std), biases ~N(0, std/10), RMSNorm scales ~1 + N(0, std).

``structured=True`` (opt-in; the default model's bytes do not change) adds the activation
structure of trained DiTs that isotropic weights hide and that calibration (imatrix) exploits:
the bias of every adaLN "scale" chunk (double blocks: chunks 1 and 4 of ``{img,txt}_mod.lin``;
single blocks: chunk 1 of ``modulation.lin``) becomes ``exp(1.2 z) - 1`` with z ~ N(0, 1) per
channel, so each modulated Linear input carries a log-normal per-channel gain ``1 + scale``; and
5 fixed rows of ``txt_in`` (weight and bias) are multiplied by 40, so the text stream carries 5
outlier channels, as T5-conditioned models do.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import pathlib
import shutil
import stat
import statistics
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from numba import njit, prange

from manifests.hashing import open_partial, partial_path
from quant_kernels.config import PARALLEL_JIT_OPTIONS
from quant_kernels.floats import to_bfloat16_bits

from .diffusers_names import diffusers_parts, part_rows
from .errors import OutputError
from .layout import (
    CONTEXT_DIM,
    FLUX2,
    FLUX2_MLP_RATIO,
    HEAD_DIM,
    TIME_DIM,
    OUT_CHANNELS,
    VEC_DIM,
    FluxGeometry,
    bfl_tensor_shapes,
)
from .safetensors_io import DTYPE_SIZES, F8_E4M3_TO_F32, F8_E5M2_TO_F32, encode_header
from .sources import DIFFUSERS_INDEX, DIFFUSERS_WEIGHTS

LAYOUTS = ("bfl", "comfyui", "diffusers")
COMFYUI_PREFIX = "model.diffusion_model."
BIAS_STD_FACTOR = 0.1
CHUNK_ELEMENTS = 1 << 22  # elements generated per kernel call: the writer's whole working memory
DEFAULT_SHARD_BYTES = 10_000_000_000  # diffusers' save_pretrained default ("10GB")
FULL_SIZE = FluxGeometry()  # FLUX.1 dev / Kontext: 19 + 38 blocks, hidden 3072
FLUX2_AXES_DIMS_ROPE = (32, 32, 32, 32)  # diffusers' and sd.cpp's FLUX.2 default
PARTIAL_MARKER = ".flux-gguf-partial"  # put in a NAME.partial folder by this writer: only such a folder is ever removed
# structured=True (see the module docstring)
STRUCTURE_SIGMA = 1.2  # log-normal spread of the modulation scales
TEXT_OUTLIER_CHANNELS = 5
TEXT_OUTLIER_GAIN = 40.0
_STORAGE = {"BF16": np.uint16, "F16": np.uint16, "F32": np.uint32, "F8_E4M3": np.uint8, "F8_E5M2": np.uint8}


# ---------------------------------------------------------------------------------------------
# Values


@njit(**PARALLEL_JIT_OPTIONS)
def _fill(out, table, key, first):  # pragma: no cover - compiled
    """out[i] = table[top 16 bits of splitmix64(key, first + i)]: any element, any order, any chunk."""
    golden = np.uint64(0x9E3779B97F4A7C15)
    for i in prange(out.shape[0]):
        z = key + (np.uint64(first + i) + np.uint64(1)) * golden
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
        out[i] = table[z >> np.uint64(48)]


def _tensor_key(seed: int, bfl_name: str) -> np.uint64:
    digest = hashlib.sha256(f"{seed}\0{bfl_name}".encode()).digest()
    return np.uint64(int.from_bytes(digest[:8], "little"))


@lru_cache(maxsize=1)
def _normal_quantiles() -> np.ndarray:
    """The 65,536 midpoint quantiles of N(0, 1): a fixed, exactly reproducible 'random' palette."""
    nd = statistics.NormalDist()
    return np.array([nd.inv_cdf((k + 0.5) / 65536) for k in range(65536)])


def _encode_f8(x: np.ndarray, decode: np.ndarray, max_code: int) -> np.ndarray:
    """float32 -> FP8 codes, round to nearest even, saturating at the largest finite value."""
    values = decode[: max_code + 1].astype(np.float64)  # ascending positive codes 0..max_code
    mag = np.abs(x.astype(np.float64))
    hi = np.clip(np.searchsorted(values, mag), 1, max_code)
    lo = hi - 1
    d_lo, d_hi = mag - values[lo], values[hi] - mag
    code = np.where(d_lo < d_hi, lo, np.where(d_hi < d_lo, hi, np.where(lo % 2 == 0, lo, hi)))
    code = np.where(mag >= values[max_code], max_code, code).astype(np.uint8)
    return code | np.where(np.signbit(x), np.uint8(0x80), np.uint8(0))


def encode_f32(x: np.ndarray, dtype: str) -> np.ndarray:
    """float32 values -> the bit patterns ``dtype`` stores (uint16 / uint32 / uint8), rounding to nearest even."""
    x = np.asarray(x, dtype=np.float32)
    if dtype == "F32":
        return x.view(np.uint32).copy()
    if dtype == "BF16":
        return to_bfloat16_bits(x)
    if dtype == "F16":
        return x.astype(np.float16).view(np.uint16)
    if dtype == "F8_E4M3":
        return _encode_f8(x, F8_E4M3_TO_F32, 0x7E)
    if dtype == "F8_E5M2":
        return _encode_f8(x, F8_E5M2_TO_F32, 0x7B)
    raise ValueError(f"dtype {dtype}; expected one of {', '.join(DTYPE_SIZES)}")


@lru_cache(maxsize=32)
def _table(dtype: str, mean: float, std: float) -> np.ndarray:
    return encode_f32((mean + std * _normal_quantiles()).astype(np.float32), dtype)


def _kind_table(bfl_name: str, dtype: str, std: float) -> np.ndarray:
    if bfl_name.endswith(".scale"):
        return _table(dtype, 1.0, std)
    if bfl_name.endswith(".bias"):
        return _table(dtype, 0.0, std * BIAS_STD_FACTOR)
    return _table(dtype, 0.0, std)


def text_outlier_channels(hidden: int) -> np.ndarray:
    """The fixed text-stream channels a structured model amplifies (spread over the width)."""
    return np.array([(hidden * (2 * k + 1)) // (2 * TEXT_OUTLIER_CHANNELS) + 3 for k in range(TEXT_OUTLIER_CHANNELS)])


def _scale_chunks(bfl_name: str) -> tuple[int, tuple[int, ...]] | None:
    """(chunks, indices of the 'scale' chunks) of an adaLN modulation bias; None for other tensors."""
    if bfl_name.endswith(("_mod.lin.bias",)) and bfl_name.startswith("double_blocks."):
        return 6, (1, 4)  # shift, scale, gate for attention, then for the MLP
    if bfl_name.endswith("modulation.lin.bias") and bfl_name.startswith("single_blocks."):
        return 3, (1,)
    return None


def _is_structured(bfl_name: str) -> bool:
    return _scale_chunks(bfl_name) is not None or bfl_name in ("txt_in.weight", "txt_in.bias")


def _structure(bfl_name: str, shape: tuple[int, ...], first: int, x: np.ndarray, seed: int) -> np.ndarray:
    """Elements [first, first + len(x)) of a structured tensor, from its plain values ``x`` (float32)."""
    idx = np.arange(first, first + x.shape[0], dtype=np.int64)
    chunks = _scale_chunks(bfl_name)
    if chunks is not None:
        n_chunks, scale = chunks
        mask = np.isin(idx // (shape[0] // n_chunks), scale)
        z = np.empty(x.shape[0], dtype=np.uint32)
        _fill(z, _table("F32", 0.0, 1.0), _tensor_key(seed, bfl_name + "#scale"), first)
        lognormal = np.exp(STRUCTURE_SIGMA * z.view(np.float32).astype(np.float64)) - 1.0
        return np.where(mask, lognormal, x).astype(np.float32)
    width = shape[1] if len(shape) == 2 else 1
    gain = np.where(np.isin(idx // width, text_outlier_channels(shape[0])), TEXT_OUTLIER_GAIN, 1.0)
    return (x * gain).astype(np.float32)


# ---------------------------------------------------------------------------------------------
# What goes where


@dataclass(frozen=True)
class _Stored:
    """A tensor in a file: its key there, shape, and the BFL element ranges it holds, in order."""

    key: str
    bfl: str
    shape: tuple[int, ...]
    ranges: tuple[tuple[int, int], ...]


def _plan(geometry: FluxGeometry, layout: str) -> list[_Stored]:
    out: list[_Stored] = []
    for name, shape in bfl_tensor_shapes(geometry).items():
        count = math.prod(shape)
        if layout != "diffusers":
            key = COMFYUI_PREFIX + name if layout == "comfyui" else name
            out.append(_Stored(key, name, shape, ((0, count),)))
            continue
        mapping = diffusers_parts(name, geometry.arch)
        assert mapping is not None
        width = count // shape[0]
        if mapping.swap_halves:  # diffusers holds (scale, shift); BFL (shift, scale)
            half = count // 2
            out.append(_Stored(mapping.parts[0], name, shape, ((half, count), (0, half))))
            continue
        row = 0
        for part, rows in zip(mapping.parts, part_rows(name, shape[0], geometry.arch), strict=True):
            out.append(_Stored(part, name, (rows, *shape[1:]), ((row * width, (row + rows) * width),)))
            row += rows
    return out


def _shards(stored: list[_Stored], dtype: str, shard_bytes: int) -> list[list[_Stored]]:
    """Split like diffusers' save_pretrained: start a new shard when the next tensor would overflow."""
    shards: list[list[_Stored]] = [[]]
    size = 0
    for s in stored:
        n = math.prod(s.shape) * DTYPE_SIZES[dtype]
        if shards[-1] and size + n > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(s)
        size += n
    return shards


def flux2_diffusers_config(geometry: FluxGeometry) -> dict[str, object]:
    """The Flux2Transformer2DModel config.json diffusers needs to build this FLUX.2 geometry."""
    return {
        "_class_name": "Flux2Transformer2DModel",
        "attention_head_dim": HEAD_DIM,
        "axes_dims_rope": list(FLUX2_AXES_DIMS_ROPE),
        "eps": 1e-6,
        "guidance_embeds": geometry.guidance,
        "in_channels": geometry.img_in_channels,
        "joint_attention_dim": geometry.context_dim,
        "mlp_ratio": float(FLUX2_MLP_RATIO),
        "num_attention_heads": geometry.hidden // HEAD_DIM,
        "num_layers": geometry.double_blocks,
        "num_single_layers": geometry.single_blocks,
        "out_channels": None,
        "patch_size": 1,
        "rope_theta": 2000,
        "timestep_guidance_channels": TIME_DIM,
    }


def diffusers_config(geometry: FluxGeometry) -> dict[str, object]:
    """The FluxTransformer2DModel (FLUX.2: Flux2Transformer2DModel) config.json diffusers needs to build this geometry."""
    if geometry.arch == FLUX2:
        return flux2_diffusers_config(geometry)
    return {
        "_class_name": "FluxTransformer2DModel",
        "attention_head_dim": HEAD_DIM,
        "axes_dims_rope": [16, 56, 56],
        "guidance_embeds": geometry.guidance,
        "in_channels": geometry.img_in_channels,
        "joint_attention_dim": CONTEXT_DIM,
        "num_attention_heads": geometry.hidden // HEAD_DIM,
        "num_layers": geometry.double_blocks,
        "num_single_layers": geometry.single_blocks,
        "out_channels": OUT_CHANNELS,
        "patch_size": 1,
        "pooled_projection_dim": VEC_DIM,
    }


def synthetic_nbytes(geometry: FluxGeometry, dtype: str = "BF16") -> int:
    """Tensor bytes of a synthetic checkpoint (headers excluded): the progress total."""
    return sum(math.prod(s) for s in bfl_tensor_shapes(geometry).values()) * DTYPE_SIZES[dtype]


# ---------------------------------------------------------------------------------------------
# Writing


def _write_file(path: pathlib.Path, stored: list[_Stored], dtype: str, metadata: dict[str, str],
                seed: int, std: float, progress: Callable[[int], None] | None, structured: bool = False) -> None:
    width = DTYPE_SIZES[dtype]
    buf = np.empty(CHUNK_ELEMENTS, dtype=_STORAGE[dtype])
    with open_partial(path) as f:  # a fresh regular file: never written through a planted link
        f.write(encode_header([(s.key, dtype, s.shape) for s in stored], metadata))
        for s in stored:
            table, key = _kind_table(s.bfl, dtype, std), _tensor_key(seed, s.bfl)
            special = structured and _is_structured(s.bfl)  # one diffusers part each: s.shape is the BFL shape
            f32 = _kind_table(s.bfl, "F32", std) if special else None
            for start, stop in s.ranges:
                for first in range(start, stop, CHUNK_ELEMENTS):
                    n = min(CHUNK_ELEMENTS, stop - first)
                    if special:
                        plain = np.empty(n, dtype=np.uint32)
                        _fill(plain, f32, key, first)
                        values = _structure(s.bfl, s.shape, first, plain.view(np.float32), seed)
                        f.write(encode_f32(values, dtype).data)
                    else:
                        _fill(buf[:n], table, key, first)
                        f.write(buf[:n].data)
                    if progress is not None:
                        progress(n * width)


def _check_args(geometry: FluxGeometry, dtype: str, layout: str, std: float, shard_bytes: int) -> None:
    if dtype not in DTYPE_SIZES:
        raise ValueError(f"dtype {dtype!r}; expected one of {', '.join(DTYPE_SIZES)}")
    if layout not in LAYOUTS:
        raise ValueError(f"layout {layout!r}; expected one of {', '.join(LAYOUTS)}")
    if geometry.hidden <= 0 or geometry.hidden % HEAD_DIM:
        raise ValueError(f"hidden size {geometry.hidden}; expected a positive multiple of {HEAD_DIM}")
    if geometry.double_blocks < 0 or geometry.single_blocks < 0 or geometry.img_in_channels <= 0:
        raise ValueError(f"geometry {geometry}: block counts must be >= 0 and img_in channels > 0")
    if not (std > 0 and math.isfinite(std)):
        raise ValueError(f"std {std}; expected a positive finite number")
    if shard_bytes <= 0:
        raise ValueError(f"shard_bytes {shard_bytes}; expected a positive number")


def write_synthetic_flux(
    path: str | os.PathLike,
    geometry: FluxGeometry = FULL_SIZE,
    dtype: str = "BF16",
    layout: str = "bfl",
    seed: int = 0,
    std: float = 0.02,
    *,
    shard_bytes: int = DEFAULT_SHARD_BYTES,
    progress: Callable[[int], None] | None = None,
    structured: bool = False,
) -> pathlib.Path:
    """Write a synthetic FLUX.1 checkpoint to ``path`` and return it.

    ``bfl`` and ``comfyui`` write one safetensors file; ``diffusers`` writes a transformer folder
    (shards of at most ``shard_bytes`` with an index, or one file, plus config.json) that
    ``FluxTransformer2DModel.from_pretrained`` loads. A file is written under a hidden name unique
    to this call (``manifests.hashing.partial_path``), a folder under ``<path>.partial``, and
    renamed when complete; an existing file is replaced, an existing folder refused. A
    ``<path>.partial`` folder is removed only if it carries the marker file this
    writer puts there (``.flux-gguf-partial``: an interrupted run of ours); any other is refused.
    ``progress`` is called with the bytes of tensor data written so far, per chunk.
    ``structured`` adds trained-model activation structure (module docstring); off, the bytes
    are exactly those of earlier releases.
    """
    _check_args(geometry, dtype, layout, std, shard_bytes)
    final = pathlib.Path(path)
    # A file: unique to this call, so a user's file, link or folder at NAME.partial is never touched.
    partial = final.with_name(final.name + ".partial") if layout == "diffusers" else partial_path(final)
    metadata = {"format": "pt", "flux_gguf.synthetic": f"seed={seed} std={std}" + (" structured" if structured else "")}
    stored = _plan(geometry, layout)
    created: str | None = None  # "file" or "folder": only what this call created is removed on failure
    try:
        if layout != "diffusers":
            created = "file"
            _write_file(partial, stored, dtype, metadata, seed, std, progress, structured)
            os.replace(partial, final)
            return final
        if _lstat_mode(final) is not None:
            raise OutputError(f"{final}: already exists; a diffusers folder is never overwritten")
        _clear_own_partial_folder(partial)
        partial.mkdir()
        created = "folder"
        _write_new(partial / PARTIAL_MARKER, b"")
        shards = _shards(stored, dtype, shard_bytes)
        names = [DIFFUSERS_WEIGHTS] if len(shards) == 1 else [
            f"diffusion_pytorch_model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
        for name, shard in zip(names, shards, strict=True):
            _write_file(partial / name, shard, dtype, metadata, seed, std, progress, structured)
        if len(shards) > 1:
            index = {"metadata": {"total_size": synthetic_nbytes(geometry, dtype)},
                     "weight_map": {s.key: name for name, shard in zip(names, shards, strict=True) for s in shard}}
            _write_new(partial / DIFFUSERS_INDEX, (json.dumps(index, indent=2) + "\n").encode())
        _write_new(partial / "config.json", (json.dumps(diffusers_config(geometry), indent=2) + "\n").encode())
        (partial / PARTIAL_MARKER).unlink()
        os.rename(partial, final)
        return final
    except OSError as e:
        _remove(partial, created)
        raise OutputError(f"{final}: cannot write ({e.strerror or e})") from None
    except BaseException:
        _remove(partial, created)
        raise


def _lstat_mode(p: pathlib.Path) -> int | None:
    """``st_mode`` of ``p`` itself (a link is not followed), or None if nothing is there."""
    try:
        return os.lstat(p).st_mode
    except (FileNotFoundError, NotADirectoryError):
        return None


def _clear_own_partial_folder(partial: pathlib.Path) -> None:
    """Remove ``partial`` if an interrupted run of this writer left it (it holds the marker); refuse anything else."""
    mode = _lstat_mode(partial)
    if mode is None:
        return
    marker = _lstat_mode(partial / PARTIAL_MARKER) if stat.S_ISDIR(mode) else None
    if marker is None or not stat.S_ISREG(marker):
        raise OutputError(f"{partial}: is in the way and was not left by this writer (no {PARTIAL_MARKER} "
                          "in it); move it away and re-run")
    shutil.rmtree(partial)


def _write_new(path: pathlib.Path, data: bytes) -> None:
    with open_partial(path) as f:
        f.write(data)


def _remove(p: pathlib.Path, created: str | None) -> None:
    """Remove what this call created at ``p`` (its partial file or folder), and nothing else."""
    mode = _lstat_mode(p)
    if created is None or mode is None:
        return
    if created == "folder" and stat.S_ISDIR(mode):
        shutil.rmtree(p, ignore_errors=True)
    elif created == "file" and not stat.S_ISDIR(mode):
        p.unlink(missing_ok=True)
