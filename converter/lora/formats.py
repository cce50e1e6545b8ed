"""Every FLUX.1 LoRA file format (and FLUX.2's kohya / ComfyUI / BFL / diffusers names), detected and normalized into one canonical form in BFL naming.

Why one form: a LoRA is either merged into BFL-named weights before quantization or re-exported
as a kohya side-car, and both need the same answer to "which rows of which BFL tensor get which
low-rank update, scaled how", whatever trainer wrote the file. Key mappings follow diffusers'
``lora_conversion_utils.py`` and ComfyUI's ``lora.py`` / ``lora_convert.py``; see
/work/shared/docs/lora.md.

Canonical form, per BFL module (``double_blocks.0.img_attn.qkv``, ``single_blocks.3.linear1``):
a list of low-rank parts, each ``(A [r, in], B [rows, r], alpha, rows)``. Split diffusers targets
(to_q/to_k/to_v, add_*_proj, proj_mlp) stay separate parts covering row slices of the fused BFL
tensor: nothing is concatenated, so the merged delta is exactly what the trainer meant.

Decisions taken by reading diffusers and ComfyUI:
- ``lora_B.bias`` (BFL control LoRAs, PEFT ``lora_bias``) is a *delta* on the target's bias,
  scaled like the low-rank part (ComfyUI maps it to ``diff_b``; PEFT adds it inside lora_B).
- Full ``*_norm.scale`` tensors (BFL control LoRAs) are *replacements*: diffusers loads them with
  ``load_state_dict`` and ComfyUI maps them to ``set_weight``; neither scales them by strength.
- kohya/ComfyUI ``.diff`` / ``.diff_b`` tensors are full deltas (ComfyUI's ``diff`` patches).
- diffusers' ``norm_out.linear`` is BFL ``final_layer.adaLN_modulation.1`` with its two row
  halves (scale, shift) swapped; B (and a bias delta) are swapped back on load.
- alpha: kohya/ComfyUI/OneTrainer store one per module, missing or 0 meaning alpha = rank
  (scale 1); diffusers files may carry ``.alpha`` keys or a PEFT config in the safetensors
  metadata ``lora_adapter_metadata`` (lora_alpha, alpha_pattern, use_rslora); BFL control, fal
  Kontext and XLabs files have no alpha (scale 1).
"""
from __future__ import annotations

import json
import math
import pathlib
import re
import struct
from dataclasses import dataclass, field

import numpy as np

from converter.errors import LoraError
from converter.layout import MLP_RATIO
from converter.recipes import compile_override
from converter.safetensors_io import DTYPE_SIZES, upcast_into

_FLOAT_DTYPES = frozenset(DTYPE_SIZES) | {"F64"}

FORMATS = ("kohya", "comfyui", "diffusers", "onetrainer", "bfl", "bfl_control", "fal_kontext", "xlabs")

# Row slots of the fused BFL tensors, in units of the hidden size (the input width of A).
_Q, _K, _V, _MLP = (0, 1), (1, 2), (2, 3), (3, 3 + MLP_RATIO)
_SWAP = "swap"  # diffusers norm_out.linear: row halves swapped relative to BFL

_BFL_LINEARS = (
    "img_in", "txt_in", "time_in.in_layer", "time_in.out_layer", "vector_in.in_layer",
    "vector_in.out_layer", "guidance_in.in_layer", "guidance_in.out_layer",
    *(f"double_blocks.{{i}}.{s}_{m}" for s in ("img", "txt")
      for m in ("mod.lin", "attn.qkv", "attn.proj", "mlp.0", "mlp.2")),
    "single_blocks.{i}.linear1", "single_blocks.{i}.linear2", "single_blocks.{i}.modulation.lin",
    "final_layer.linear", "final_layer.adaLN_modulation.1",
    # FLUX.2: the shared modulations (its other linears have FLUX.1's BFL names)
    "double_stream_modulation_img.lin", "double_stream_modulation_txt.lin", "single_stream_modulation.lin",
)
_BFL_NORMS = (
    *(f"double_blocks.{{i}}.{s}_attn.norm.{n}_norm.scale" for s in ("img", "txt") for n in ("query", "key")),
    "single_blocks.{i}.norm.query_norm.scale", "single_blocks.{i}.norm.key_norm.scale",
)
_TB, _STB, _DB, _SB = "transformer_blocks.{i}", "single_transformer_blocks.{i}", "double_blocks.{i}", "single_blocks.{i}"
_DIFFUSERS_LINEARS: dict[str, tuple[str, object]] = {
    "x_embedder": ("img_in", None),
    "context_embedder": ("txt_in", None),
    "time_text_embed.timestep_embedder.linear_1": ("time_in.in_layer", None),
    "time_text_embed.timestep_embedder.linear_2": ("time_in.out_layer", None),
    "time_text_embed.text_embedder.linear_1": ("vector_in.in_layer", None),
    "time_text_embed.text_embedder.linear_2": ("vector_in.out_layer", None),
    "time_text_embed.guidance_embedder.linear_1": ("guidance_in.in_layer", None),
    "time_text_embed.guidance_embedder.linear_2": ("guidance_in.out_layer", None),
    f"{_TB}.norm1.linear": (f"{_DB}.img_mod.lin", None),
    f"{_TB}.norm1_context.linear": (f"{_DB}.txt_mod.lin", None),
    f"{_TB}.attn.to_q": (f"{_DB}.img_attn.qkv", _Q),
    f"{_TB}.attn.to_k": (f"{_DB}.img_attn.qkv", _K),
    f"{_TB}.attn.to_v": (f"{_DB}.img_attn.qkv", _V),
    f"{_TB}.attn.add_q_proj": (f"{_DB}.txt_attn.qkv", _Q),
    f"{_TB}.attn.add_k_proj": (f"{_DB}.txt_attn.qkv", _K),
    f"{_TB}.attn.add_v_proj": (f"{_DB}.txt_attn.qkv", _V),
    f"{_TB}.attn.to_out.0": (f"{_DB}.img_attn.proj", None),
    f"{_TB}.attn.to_add_out": (f"{_DB}.txt_attn.proj", None),
    f"{_TB}.ff.net.0.proj": (f"{_DB}.img_mlp.0", None),
    f"{_TB}.ff.net.2": (f"{_DB}.img_mlp.2", None),
    f"{_TB}.ff_context.net.0.proj": (f"{_DB}.txt_mlp.0", None),
    f"{_TB}.ff_context.net.2": (f"{_DB}.txt_mlp.2", None),
    f"{_STB}.attn.to_q": (f"{_SB}.linear1", _Q),
    f"{_STB}.attn.to_k": (f"{_SB}.linear1", _K),
    f"{_STB}.attn.to_v": (f"{_SB}.linear1", _V),
    f"{_STB}.proj_mlp": (f"{_SB}.linear1", _MLP),
    f"{_STB}.proj_out": (f"{_SB}.linear2", None),
    f"{_STB}.norm.linear": (f"{_SB}.modulation.lin", None),
    "norm_out.linear": ("final_layer.adaLN_modulation.1", _SWAP),
    "proj_out": ("final_layer.linear", None),
    # FLUX.2 (Flux2Transformer2DModel; converter.diffusers_names): no name here is a FLUX.1 one
    "time_guidance_embed.timestep_embedder.linear_1": ("time_in.in_layer", None),
    "time_guidance_embed.timestep_embedder.linear_2": ("time_in.out_layer", None),
    "time_guidance_embed.guidance_embedder.linear_1": ("guidance_in.in_layer", None),
    "time_guidance_embed.guidance_embedder.linear_2": ("guidance_in.out_layer", None),
    "double_stream_modulation_img.linear": ("double_stream_modulation_img.lin", None),
    "double_stream_modulation_txt.linear": ("double_stream_modulation_txt.lin", None),
    "single_stream_modulation.linear": ("single_stream_modulation.lin", None),
    f"{_TB}.ff.linear_in": (f"{_DB}.img_mlp.0", None),
    f"{_TB}.ff.linear_out": (f"{_DB}.img_mlp.2", None),
    f"{_TB}.ff_context.linear_in": (f"{_DB}.txt_mlp.0", None),
    f"{_TB}.ff_context.linear_out": (f"{_DB}.txt_mlp.2", None),
    f"{_STB}.attn.to_qkv_mlp_proj": (f"{_SB}.linear1", None),
    f"{_STB}.attn.to_out": (f"{_SB}.linear2", None),
}
_DIFFUSERS_NORMS = {
    f"{_TB}.attn.norm_q.weight": f"{_DB}.img_attn.norm.query_norm.scale",
    f"{_TB}.attn.norm_k.weight": f"{_DB}.img_attn.norm.key_norm.scale",
    f"{_TB}.attn.norm_added_q.weight": f"{_DB}.txt_attn.norm.query_norm.scale",
    f"{_TB}.attn.norm_added_k.weight": f"{_DB}.txt_attn.norm.key_norm.scale",
    f"{_STB}.attn.norm_q.weight": f"{_SB}.norm.query_norm.scale",
    f"{_STB}.attn.norm_k.weight": f"{_SB}.norm.key_norm.scale",
}
_XLABS = {
    "double_blocks.{i}.processor.qkv_lora1": (f"{_DB}.img_attn.qkv", None),
    "double_blocks.{i}.processor.proj_lora1": (f"{_DB}.img_attn.proj", None),
    "double_blocks.{i}.processor.qkv_lora2": (f"{_DB}.txt_attn.qkv", None),
    "double_blocks.{i}.processor.proj_lora2": (f"{_DB}.txt_attn.proj", None),
    "single_blocks.{i}.processor.qkv_lora": (f"{_SB}.linear1", (0, 3)),
    "single_blocks.{i}.processor.proj_lora": (f"{_SB}.linear2", None),
}
# How many hidden-size row groups a fused BFL tensor holds (for placing split parts and biases).
_FUSED_GROUPS = {"attn.qkv": 3, "linear1": 3 + MLP_RATIO}

# Parameter suffixes -> role. XLabs uses its own; the rest share one table.
_SUFFIXES = (
    (".lora_down.weight", "A"), (".lora_up.weight", "B"), (".lora_A.weight", "A"), (".lora_B.weight", "B"),
    (".lora_B.bias", "bias"), (".lora_up.bias", "bias"), (".alpha", "alpha"), (".diff_b", "diff_b"), (".diff", "diff"),
)
_XLABS_SUFFIXES = ((".down.weight", "A"), (".up.weight", "B"))
_TEXT_ENCODER_PREFIXES = ("lora_te", "text_encoder", "text_encoders.")
_LYCORIS_MARKERS = (".lokr_", ".hada_", ".lora_mid.", ".oft_", "lycoris_")
_DORA_MARKERS = ("dora_scale", "lora_magnitude_vector")


class _Names:
    """Template names (with an ``{i}`` block index) -> compiled matchers, dotted or underscored."""

    def __init__(self, templates, underscored: bool):
        self._rx = []
        for tpl, value in (templates.items() if isinstance(templates, dict) else ((t, t) for t in templates)):
            form = tpl.replace(".", "_") if underscored else tpl
            pattern = r"(\d+)".join(re.escape(piece) for piece in form.split("{i}"))
            self._rx.append((re.compile(f"^{pattern}$"), value))

    def lookup(self, name: str):
        """The mapped value with ``{i}`` filled in, or None when no template matches."""
        for rx, value in self._rx:
            m = rx.match(name)
            if m:
                fill = (lambda s: s.replace("{i}", m.group(1))) if m.groups() else (lambda s: s)
                return (fill(value[0]), value[1]) if isinstance(value, tuple) else fill(value)
        return None


_BFL_DOTTED = _Names({t: (t, None) for t in _BFL_LINEARS}, underscored=False)
_BFL_UNDERSCORED = _Names({t: (t, None) for t in _BFL_LINEARS}, underscored=True)
_BFL_NORM_NAMES = _Names(_BFL_NORMS, underscored=False)
_DIFF_DOTTED = _Names(_DIFFUSERS_LINEARS, underscored=False)
_DIFF_UNDERSCORED = _Names(_DIFFUSERS_LINEARS, underscored=True)
_DIFF_NORM_NAMES = _Names(_DIFFUSERS_NORMS, underscored=False)
_XLABS_NAMES = _Names(_XLABS, underscored=False)

# format -> (key prefix, module-name table, suffix table, full-tensor (norm) table)
_FORMAT_RULES = {
    "kohya": ("lora_unet_", _BFL_UNDERSCORED, _SUFFIXES, None),
    "comfyui": ("diffusion_model.", _BFL_DOTTED, _SUFFIXES, _BFL_NORM_NAMES),
    "fal_kontext": ("base_model.model.", _BFL_DOTTED, _SUFFIXES, _BFL_NORM_NAMES),
    "bfl": ("", _BFL_DOTTED, _SUFFIXES, _BFL_NORM_NAMES),
    "bfl_control": ("", _BFL_DOTTED, _SUFFIXES, _BFL_NORM_NAMES),
    "diffusers": ("transformer.", _DIFF_DOTTED, _SUFFIXES, _DIFF_NORM_NAMES),
    "onetrainer": ("lora_transformer_", _DIFF_UNDERSCORED, _SUFFIXES, None),
    "xlabs": ("", _XLABS_NAMES, _XLABS_SUFFIXES, None),
}
_NO_ALPHA_FORMATS = ("bfl", "bfl_control", "fal_kontext", "xlabs")


@dataclass(frozen=True, eq=False)
class LoraPart:
    """One low-rank update ``(alpha / rank) * B @ A`` onto ``rows`` of a BFL weight (None: all rows).

    ``alpha`` None means scale 1. ``key`` is the source module key, for messages.
    """

    a: np.ndarray
    b: np.ndarray
    alpha: float | None
    rows: tuple[int, int] | None
    key: str = ""

    @property
    def rank(self) -> int:
        return int(self.a.shape[0])

    @property
    def scale(self) -> float:
        return 1.0 if self.alpha is None else self.alpha / self.rank


@dataclass
class CanonicalLora:
    """A LoRA file normalized to BFL naming. Arrays are float32.

    ``modules``: BFL module name (no ``.weight``) -> low-rank parts.
    ``full_deltas``: BFL tensor name -> delta at strength 1 (bias deltas, ``.diff`` tensors).
    ``replacements``: BFL tensor name -> new value (control-LoRA norm scales; not scaled).
    ``ignored_keys``: text-encoder keys, reported and never merged.
    ``origins``: BFL tensor name -> source key of a full delta or replacement, for messages.
    """

    format: str
    modules: dict[str, list[LoraPart]]
    full_deltas: dict[str, np.ndarray]
    ignored_keys: list[str]
    metadata: dict[str, str]
    replacements: dict[str, np.ndarray] = field(default_factory=dict)
    path: str = ""
    origins: dict[str, str] = field(default_factory=dict)

    def tensor_names(self) -> list[str]:
        """Every BFL tensor this LoRA changes, sorted."""
        names = {f"{m}.weight" for m in self.modules} | set(self.full_deltas) | set(self.replacements)
        return sorted(names)


def fused_row_count(module: str, hidden: int) -> int | None:
    """Rows of a fused BFL target (qkv, linear1) for a given hidden size; None for other modules."""
    for suffix, groups in _FUSED_GROUPS.items():
        if module.endswith(suffix):
            return groups * hidden
    return None


def key_list(keys, limit: int = 5) -> str:
    """``a, b, c (+N more)``: how every LoRA message lists keys."""
    keys = list(keys)
    shown = ", ".join(keys[:limit])
    return shown + (f" (+{len(keys) - limit} more)" if len(keys) > limit else "")


def _is_bfl_key(key: str) -> bool:
    name, _ = _split_key(key, _SUFFIXES)
    return bool(name is not None and _BFL_DOTTED.lookup(name)) or _BFL_NORM_NAMES.lookup(key) is not None


def detect_format(keys) -> str | None:
    """The format of a key set (text-encoder keys removed), checked in diffusers' order; None if unknown."""
    keys = list(keys)
    for prefix, fmt in (("lora_unet_", "kohya"), ("lora_transformer_", "onetrainer")):
        if any(k.startswith(prefix) for k in keys):
            return fmt
    if any(".processor." in k for k in keys):
        return "xlabs"
    for prefix, fmt in (("base_model.model.", "fal_kontext"), ("diffusion_model.", "comfyui"), ("transformer.", "diffusers")):
        if any(k.startswith(prefix) for k in keys):
            return fmt
    if any(_is_bfl_key(k) for k in keys):
        control = any(_BFL_NORM_NAMES.lookup(k) is not None or k.endswith(".lora_B.bias") for k in keys)
        return "bfl_control" if control else "bfl"
    return None


def _split_key(key: str, suffixes) -> tuple[str | None, str | None]:
    for suffix, role in suffixes:
        if key.endswith(suffix):
            return key[: -len(suffix)], role
    return None, None


# safetensors dtype names -> the names PyTorch prints (what our messages have always said).
_DTYPE_NAMES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
                "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2", "I64": "int64", "I32": "int32",
                "I16": "int16", "I8": "int8", "U64": "uint64", "U32": "uint32", "U16": "uint16", "U8": "uint8",
                "BOOL": "bool"}


class _LoraFile:
    """A LoRA safetensors file: the safetensors package checks it and lists keys and metadata
    (numpy framework: no torch needed); tensor bytes are read from the header's offsets and
    upcast by :func:`converter.safetensors_io.upcast_into` (exactly PyTorch's ``.float()``)."""

    def __init__(self, path: pathlib.Path) -> None:
        from safetensors import safe_open

        self.path = path
        self._handle = safe_open(str(path), framework="numpy")
        with open(path, "rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            self._entries = json.loads(f.read(length))
        self._data_start = 8 + length

    def __enter__(self) -> _LoraFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self._handle.__exit__(None, None, None)

    def keys(self) -> list[str]:
        return list(self._handle.keys())

    def metadata(self) -> dict[str, str] | None:
        return self._handle.metadata()

    def dtype(self, key: str) -> str:
        return str(self._entries[key]["dtype"])

    def read_f32(self, key: str) -> np.ndarray:
        entry = self._entries[key]
        begin, end = entry["data_offsets"]
        shape = tuple(int(d) for d in entry["shape"])
        raw = np.fromfile(self.path, dtype=np.uint8, count=end - begin, offset=self._data_start + begin)
        out = np.empty(shape, dtype=np.float32)
        if entry["dtype"] == "F64":
            out.reshape(-1)[...] = raw.view("<f8")
        else:
            upcast_into(raw, entry["dtype"], out.reshape(-1))
        return out


def _open(path: pathlib.Path) -> _LoraFile:
    """A LoRA file handle (context manager), or a LoraError naming the file."""
    try:
        return _LoraFile(path)
    except FileNotFoundError:
        raise LoraError(f"LoRA file not found: {path}") from None
    except Exception as exc:  # safetensors raises its own error types for bad headers
        raise LoraError(f"{path}: not a readable safetensors file ({exc})") from None


def _tensor(handle: _LoraFile, path, key: str) -> np.ndarray:
    """One tensor as float32, refusing non-float dtypes, unreadable data and NaN/inf."""
    dtype = handle.dtype(key)
    if dtype not in _FLOAT_DTYPES:
        raise LoraError(f"{path}: tensor {key} has dtype {_DTYPE_NAMES.get(dtype, dtype)}; expected a float type")
    try:
        arr = handle.read_f32(key)  # own memory, never a view of the file
    except Exception as exc:
        raise LoraError(f"{path}: cannot read tensor {key} ({exc})") from None
    bad = int(arr.size - np.count_nonzero(np.isfinite(arr)))
    if bad:
        raise LoraError(f"{path}: tensor {key} holds {bad} non-finite value{'s' if bad != 1 else ''} (NaN or inf)")
    return arr


_PEFT_METADATA = "lora_adapter_metadata"


def _peft_config(metadata: dict[str, str], path) -> dict | None:
    """The PEFT LoraConfig dict diffusers stores in ``lora_adapter_metadata``, if any; the keys read
    here (``lora_alpha``, ``alpha_pattern``) are checked, each problem a LoraError naming the key."""
    raw = metadata.get(_PEFT_METADATA)
    if not raw:
        return None
    try:
        cfg = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise LoraError(f"{path}: metadata {_PEFT_METADATA} is not valid JSON ({exc.msg})") from None
    except RecursionError:
        raise LoraError(f"{path}: metadata {_PEFT_METADATA} is JSON nested too deeply") from None
    except ValueError as exc:  # an integer beyond Python's digit limit
        raise LoraError(f"{path}: metadata {_PEFT_METADATA} is not usable JSON ({str(exc).split(';')[0]})") from None
    if not isinstance(cfg, dict):
        raise LoraError(f"{path}: metadata {_PEFT_METADATA} must be a JSON object")
    prefixed = {k.removeprefix("transformer."): v for k, v in cfg.items() if k.startswith("transformer.")}
    cfg = prefixed or cfg
    if cfg.get("use_dora"):
        raise LoraError(f"{path}: DoRA adapters (use_dora in {_PEFT_METADATA}) are not supported; only plain LoRA")
    if cfg.get("lora_alpha") is not None:
        cfg["lora_alpha"] = _peft_number(cfg["lora_alpha"], path, "lora_alpha")
    patterns = cfg.get("alpha_pattern") or {}
    if not isinstance(patterns, dict):
        raise LoraError(f"{path}: metadata {_PEFT_METADATA}: alpha_pattern must be an object of regular expression "
                        f"-> alpha, got {_shown(patterns)}")
    cfg["alpha_pattern"] = {pattern: (_peft_pattern(pattern, path), _peft_number(value, path, f"alpha_pattern[{pattern!r}]"))
                            for pattern, value in patterns.items()}
    return cfg


def _shown(value: object, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _peft_number(value: object, path, key: str) -> float:
    """A PEFT alpha as a float whose alpha/rank scale float32 can hold (numeric strings accepted)."""
    try:
        number = float(value) if isinstance(value, (int, float, str)) and not isinstance(value, bool) else None
    except (ValueError, OverflowError):
        number = None
    if number is None or not math.isfinite(number) or abs(number) > float(np.finfo(np.float32).max):
        raise LoraError(f"{path}: metadata {_PEFT_METADATA}: {key} must be a finite number within float32's range, "
                        f"got {_shown(value)}")
    return number


def _peft_pattern(pattern: str, path) -> object:
    """PEFT matches ``(.*\\.)?(PATTERN)$`` from the start of the module name; compiled with the
    override compiler (RE2, linear time), so a pattern crafted to backtrack cannot hang a load."""
    try:
        return compile_override(rf"^(.*\.)?({pattern})$")
    except ValueError as exc:
        raise LoraError(f"{path}: metadata {_PEFT_METADATA}: alpha_pattern {_shown(pattern)} is not a usable "
                        f"regular expression: {exc}") from None


def _peft_alpha(cfg: dict | None, module: str, rank: int) -> float | None:
    """PEFT's alpha for a module: first alpha_pattern match (PEFT's own regex), else lora_alpha."""
    if not cfg:
        return None
    alpha = cfg.get("lora_alpha")
    for search, value in cfg.get("alpha_pattern", {}).values():
        if search(module):
            alpha = value
            break
    if alpha is None:
        return None
    # rsLoRA scales by alpha / sqrt(r); store the alpha that gives that scale as alpha / r.
    return alpha * math.sqrt(rank) if cfg.get("use_rslora") else alpha


class _Builder:
    """Accumulates parts and full tensors, refusing any two keys that touch the same rows."""

    def __init__(self, path, fmt: str, cfg: dict | None):
        self.path, self.fmt, self.cfg = path, fmt, cfg
        self.modules: dict[str, list[LoraPart]] = {}
        self.full: dict[str, np.ndarray] = {}
        self.replacements: dict[str, np.ndarray] = {}
        self.origins: dict[str, str] = {}
        self._cover: dict[str, list[tuple[tuple[int, int] | None, str]]] = {}

    def fail(self, message: str) -> LoraError:
        return LoraError(f"{self.path} ({self.fmt}): {message}")

    def _claim(self, tensor: str, rows: tuple[int, int] | None, key: str) -> None:
        for other_rows, other_key in self._cover.get(tensor, []):
            if rows is None or other_rows is None or (rows[0] < other_rows[1] and other_rows[0] < rows[1]):
                where = "all rows" if rows is None else f"rows {rows[0]}:{rows[1]}"
                raise self.fail(f"duplicate target: {key} targets {where} of {tensor}, already targeted by {other_key}")
        self._cover.setdefault(tensor, []).append((rows, key))

    def part(self, module: str, part: LoraPart) -> None:
        self._claim(f"{module}.weight", part.rows, part.key)
        self.modules.setdefault(module, []).append(part)

    def delta(self, tensor: str, value: np.ndarray, rows: tuple[int, int] | None, total: int | None, key: str) -> None:
        self._claim(tensor, rows, key)
        if rows is None:
            self.full[tensor] = value
        else:
            full = self.full.setdefault(tensor, np.zeros((total, *value.shape[1:]), dtype=np.float32))
            full[rows[0]:rows[1]] += value
        self.origins.setdefault(tensor, key)

    def replace(self, tensor: str, value: np.ndarray, key: str) -> None:
        self._claim(tensor, None, key)
        self.replacements[tensor] = value
        self.origins[tensor] = key


_PARTNER = {".lora_down.weight": ".lora_up.weight", ".lora_A.weight": ".lora_B.weight", ".down.weight": ".up.weight"}
_PARTNER.update({v: k for k, v in list(_PARTNER.items())})


def _swap_halves(x: np.ndarray) -> np.ndarray:
    half = x.shape[0] // 2
    return np.concatenate([x[half:], x[:half]], axis=0)


def _pair(builder: _Builder, src: str, params: dict) -> tuple[np.ndarray, np.ndarray] | None:
    """The (A, B) factors of one source module, checked to pair up; None for full-delta-only modules."""
    a, b = params.get("A"), params.get("B")
    if a is None and b is None:
        orphan = params.get("bias") or params.get("alpha")
        if orphan:  # a bias or alpha means nothing without the factors it belongs to
            raise builder.fail(f"{orphan[0]} has no lora_down/lora_A and lora_up/lora_B weights beside it")
        return None
    if a is None or b is None:
        present = (a or b)[0]
        suffix = present[len(src):]
        raise builder.fail(f"{present} has no partner {src}{_PARTNER[suffix]}")
    (ka, a), (kb, b) = a, b
    if a.ndim != 2 or b.ndim != 2:
        raise builder.fail(f"{src} is not a linear LoRA ({ka} {list(a.shape)}, {kb} {list(b.shape)})")
    if a.shape[0] != b.shape[1]:
        raise builder.fail(f"{src}: {ka} has rank {a.shape[0]} but {kb} has rank {b.shape[1]}")
    return a, b


def _build_module(builder: _Builder, src: str, name: str, target, params: dict) -> None:
    """Turn one source module's tensors (A, B, alpha, bias, diff...) into canonical entries."""
    module, slot = target
    pair = _pair(builder, src, params)
    hidden = pair[0].shape[1] if pair else (params["diff"][1].shape[-1] if "diff" in params else None)
    alpha = None
    if "alpha" in params:
        key, value = params["alpha"]
        if value.size != 1:
            raise builder.fail(f"{key} must be a scalar, got shape {list(value.shape)}")
        alpha = float(value.reshape(-1)[0]) or None  # 0 means alpha = rank (kohya, ComfyUI)
    elif pair and builder.fmt == "diffusers":
        alpha = _peft_alpha(builder.cfg, name, pair[0].shape[0])
    rows, total = None, None
    if isinstance(slot, tuple):
        if hidden is None:
            raise builder.fail(f"{src} holds no lora_down/lora_A or .diff weight, so its rows in {module} cannot be placed")
        rows, total = (slot[0] * hidden, slot[1] * hidden), fused_row_count(module, hidden)
    swap = slot == _SWAP
    if pair:
        a, b = pair
        part = LoraPart(a=a, b=_swap_halves(b) if swap else b, alpha=alpha, rows=rows, key=src)
        builder.part(module, part)
        if "bias" in params:
            key, bias = params["bias"]
            if bias.shape != (b.shape[0],):
                raise builder.fail(f"{key} has shape {list(bias.shape)}; expected [{b.shape[0]}]")
            bias = (_swap_halves(bias) if swap else bias) * np.float32(part.scale)
            builder.delta(f"{module}.bias", bias, rows, total, key)
    for role, suffix in (("diff", "weight"), ("diff_b", "bias")):
        if role in params:
            key, value = params[role]
            builder.delta(f"{module}.{suffix}", _swap_halves(value) if swap else value, rows, total, key)


def _local_name(key: str, fmt: str, prefix: str) -> str | None:
    """The key without its format prefix (XLabs keys may carry ComfyUI's), None if it lacks it."""
    if fmt == "xlabs" and key.startswith("diffusion_model."):
        return key[len("diffusion_model."):]
    return key[len(prefix):] if key.startswith(prefix) else None


def load_lora(path) -> CanonicalLora:
    """Read a LoRA safetensors file of any supported format into the canonical BFL form.

    Raises LoraError naming the file and keys for LyCORIS/DoRA files, LoRAs for other models,
    unknown keys, duplicate targets, unpaired or mis-shaped factors and NaN/inf weights.
    """
    path = pathlib.Path(path)
    with _open(path) as handle:
        return _normalize(path, handle, sorted(handle.keys()), dict(handle.metadata() or {}))


def _normalize(path: pathlib.Path, handle, keys: list[str], metadata: dict[str, str]) -> CanonicalLora:
    """load_lora's body: classify every key, then build the canonical entries."""
    lycoris = [k for k in keys if any(m in k for m in _LYCORIS_MARKERS)]
    if lycoris:
        raise LoraError(f"{path}: LyCORIS (LoKr/LoHa/LoCon) weights are not supported, only plain LoRA: {key_list(lycoris)}")
    dora = [k for k in keys if any(m in k for m in _DORA_MARKERS)]
    if dora:
        raise LoraError(f"{path}: DoRA weights are not supported, only plain LoRA: {key_list(dora)}")
    ignored = sorted(k for k in keys if k.startswith(_TEXT_ENCODER_PREFIXES))
    keys = [k for k in keys if not k.startswith(_TEXT_ENCODER_PREFIXES)]
    if not keys:
        what = f"only text-encoder keys ({key_list(ignored)})" if ignored else "no tensors"
        raise LoraError(f"{path}: holds {what}; nothing to apply to the FLUX transformer")
    fmt = detect_format(keys)
    if fmt is None:
        raise LoraError(
            f"{path}: not a FLUX.1 LoRA: no key matches a known FLUX LoRA format "
            f"({', '.join(FORMATS)}); first keys: {key_list(keys)}"
        )
    prefix, names, suffixes, norms = _FORMAT_RULES[fmt]
    builder = _Builder(path, fmt, _peft_config(metadata, path) if fmt == "diffusers" else None)
    groups: dict[str, tuple[str, tuple, dict[str, str]]] = {}  # source module -> (name, target, role -> key)
    norm_keys: list[tuple[str, str]] = []
    unknown: list[str] = []
    for key in keys:
        local = _local_name(key, fmt, prefix)
        norm = norms.lookup(local) if norms is not None and local is not None else None
        if norm is not None:
            norm_keys.append((key, norm))
            continue
        name, role = _split_key(local, suffixes) if local is not None else (None, None)
        target = names.lookup(name) if name is not None else None
        if target is None or (role == "alpha" and fmt in _NO_ALPHA_FORMATS):
            unknown.append(key)
            continue
        src = key[: len(key) - len(local)] + name
        roles = groups.setdefault(src, (name, target, {}))[2]
        if role in roles:
            raise builder.fail(f"duplicate target: {key} and {roles[role]} are the same parameter of {target[0]}")
        roles[role] = key
    if unknown and not (groups or norm_keys):
        raise LoraError(
            f"{path}: no key maps to a FLUX.1 transformer module ({fmt} naming); "
            f"is it a LoRA for another model? First keys: {key_list(unknown)}"
        )
    if unknown:
        raise builder.fail(f"{len(unknown)} unknown key{'s' if len(unknown) != 1 else ''}: {key_list(unknown)}")
    for src, (name, target, roles) in groups.items():
        params = {role: (k, _tensor(handle, path, k)) for role, k in roles.items()}
        _build_module(builder, src, name, target, params)
    for key, tensor in norm_keys:
        builder.replace(tensor, _tensor(handle, path, key), key)
    modules = {m: sorted(parts, key=lambda p: p.rows[0] if p.rows else -1) for m, parts in builder.modules.items()}
    return CanonicalLora(
        format=fmt, modules=modules, full_deltas=builder.full, ignored_keys=ignored,
        metadata=metadata, replacements=builder.replacements, path=str(path), origins=builder.origins,
    )
