"""Merge canonical LoRAs into BFL weights before quantization: validate first, then a per-tensor hook.

Why merge before quantizing: ``W + delta`` rounded once is the best a quantized file can hold;
merging after quantization rounds twice (lora.md). The merge is
``W' = W + strength * (alpha / rank) * (B @ A)`` in float32 on the upcast source weight, several
LoRAs stacking in the order given. ``B @ A`` comes from :mod:`converter.lora.lowrank`: exact products
summed in float64 in a fixed order and rounded once, so the merged weights (and therefore the
quantized bytes) are the same on every machine and for any thread count, and ``verify --source``
can re-derive a merged release anywhere. ``merger(name, w)`` is exactly ``w + merger.delta(name)``.

Full-tensor replacements (control-LoRA norm scales) are applied as they are whenever the LoRA's
strength is non-zero, the way diffusers and ComfyUI apply them, then the deltas are added.

Validation happens once, before any work: every target must exist in the base with a matching
shape, otherwise a LoraError lists the offending keys and the format detected.
"""
from __future__ import annotations

import json
import math
import pathlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from converter.errors import LoraError

from .formats import CanonicalLora, key_list, load_lora
from .lowrank import lowrank_product

Shapes = Mapping[str, tuple[int, ...]]


@dataclass(frozen=True)
class LoraSpec:
    """A LoRA the user asked for: ``--lora PATH[:STRENGTH]`` or a release spec's ``[[lora]]``."""

    path: pathlib.Path
    strength: float = 1.0
    name: str | None = None

    @property
    def label(self) -> str:
        """The name to show and record: ``name`` if given, else the file's stem."""
        return self.name or pathlib.Path(self.path).stem


def parse_lora_option(text: str) -> LoraSpec:
    """``"path.safetensors:0.8"`` -> LoraSpec(path, 0.8); no ``:STRENGTH`` means 1.0.

    Only the part after the last colon is read as a strength, and only when it is a number, so
    Windows drive letters and colons inside directory names stay part of the path.
    """
    text = text.strip()
    head, sep, tail = text.rpartition(":")
    strength = 1.0
    if sep and _is_number(tail):
        text, strength = head, float(tail)
    elif sep and head.lower().endswith(".safetensors"):
        raise LoraError(f"invalid LoRA strength {tail!r} in {text!r}; expected PATH[:STRENGTH], e.g. style.safetensors:0.8")
    if not text:
        raise LoraError("empty LoRA path; expected PATH[:STRENGTH], e.g. style.safetensors:0.8")
    if not math.isfinite(strength):
        raise LoraError(f"LoRA strength must be a finite number, got {strength} in {text!r}")
    return LoraSpec(path=pathlib.Path(text), strength=strength)


def parse_lora_entries(raw: object, base_dir: pathlib.Path, where: str) -> list[LoraSpec]:
    """A release spec's ``[[lora]]`` array (``path``, optional ``strength`` and ``name``) -> LoraSpecs.

    Paths are relative to ``base_dir`` (the spec's folder) and must exist; ``where`` names the
    spec file in messages.
    """
    if not isinstance(raw, list) or not all(isinstance(e, dict) for e in raw):
        raise LoraError(f"{where}: [[lora]] must be an array of tables with path, strength, name")
    specs = []
    for i, entry in enumerate(raw, 1):
        unknown = sorted(set(entry) - {"path", "strength", "name"})
        if unknown:
            raise LoraError(f"{where}: [[lora]] entry {i}: unknown key {unknown[0]!r}; expected path, strength, name")
        path, strength, name = entry.get("path"), entry.get("strength", 1.0), entry.get("name")
        if not isinstance(path, str) or not path:
            raise LoraError(f"{where}: [[lora]] entry {i}: path must be a non-empty string")
        if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not math.isfinite(strength):
            raise LoraError(f"{where}: [[lora]] entry {i}: strength must be a finite number, got {strength!r}")
        if name is not None and (not isinstance(name, str) or not name):
            raise LoraError(f"{where}: [[lora]] entry {i}: name must be a non-empty string")
        full = pathlib.Path(base_dir) / path
        if not full.is_file():
            raise LoraError(f"{where}: [[lora]] entry {i}: file not found: {full}")
        specs.append(LoraSpec(path=full, strength=float(strength), name=name))
    return specs


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _where(lora: CanonicalLora) -> str:
    return f"{lora.path or '<LoRA>'} ({lora.format})"


def _shape_problems(lora: CanonicalLora, base_shapes: Shapes) -> tuple[list[str], list[str]]:
    """(targets missing from the base, shape mismatches), each as 'source key -> what' strings."""
    missing, wrong = [], []
    for module, parts in lora.modules.items():
        tensor = f"{module}.weight"
        shape = base_shapes.get(tensor)
        for part in parts:
            if shape is None:
                missing.append(f"{part.key} -> {tensor}")
                continue
            rows = part.rows or (0, shape[0])
            if len(shape) != 2 or part.a.shape[1] != shape[1] or rows[1] > shape[0] or part.b.shape[0] != rows[1] - rows[0]:
                wrong.append(
                    f"{part.key} gives a [{part.b.shape[0]}, {part.a.shape[1]}] delta for rows "
                    f"{rows[0]}:{rows[1]} of {tensor}, which is {list(shape)}"
                )
    for kind, tensors in (("delta", lora.full_deltas), ("replacement", lora.replacements)):
        for tensor, value in tensors.items():
            key = lora.origins.get(tensor, tensor)
            shape = base_shapes.get(tensor)
            if shape is None:
                missing.append(f"{key} -> {tensor}")
            elif tuple(value.shape) != tuple(shape):
                wrong.append(f"{key} gives a {list(value.shape)} {kind} for {tensor}, which is {list(shape)}")
    return missing, wrong


_F32_MAX = float(np.finfo(np.float32).max)


def _check_scales(lora: CanonicalLora, strength: float) -> None:
    """Each factor the merge multiplies by in float32 (strength, strength * alpha / rank) must be a
    float32: one beyond it would turn every weight it touches into inf."""
    if abs(strength) > _F32_MAX:
        raise LoraError(f"{_where(lora)}: strength {strength:g} is beyond float32's range ({_F32_MAX:.4g})")
    for parts in lora.modules.values():
        for part in parts:
            factor = strength * part.scale
            if not math.isfinite(factor) or abs(factor) > _F32_MAX:
                raise LoraError(f"{_where(lora)}: {part.key}: strength {strength:g} x alpha/rank {part.scale:g} = "
                                f"{factor:g} is beyond float32's range ({_F32_MAX:.4g})")


def validate_loras(loras: Sequence[tuple[CanonicalLora, float]], base_shapes: Shapes) -> None:
    """Check every LoRA against the base before any work; raise LoraError on the first bad one.

    Refuses non-finite strengths, targets the base lacks (another variant, more blocks), shape
    mismatches (another hidden size, a widened img_in) and two LoRAs replacing the same tensor.
    """
    replaced: dict[str, str] = {}
    for lora, strength in loras:
        if not math.isfinite(strength):
            raise LoraError(f"{_where(lora)}: strength must be a finite number, got {strength}")
        _check_scales(lora, strength)
        missing, wrong = _shape_problems(lora, base_shapes)
        if missing:
            raise LoraError(
                f"{_where(lora)}: {len(missing)} LoRA target{'s' if len(missing) != 1 else ''} "
                f"not in the base model: {key_list(missing)}"
            )
        if wrong:
            raise LoraError(f"{_where(lora)}: shape mismatch: {key_list(wrong, limit=3)}")
        for tensor in lora.replacements if strength != 0 else ():
            if tensor in replaced:
                raise LoraError(
                    f"{_where(lora)}: {lora.origins.get(tensor, tensor)} replaces {tensor}, "
                    f"which {replaced[tensor]} already replaces"
                )
            replaced[tensor] = lora.path or lora.format


def _lora_delta(lora: CanonicalLora, name: str, shape: tuple[int, ...], strength: float) -> np.ndarray | None:
    """strength * (one LoRA's change to tensor ``name``), float32, or None if it has none.

    Parts of one LoRA never overlap (load_lora refuses that), so each part's ``B @ A`` is written
    straight into its own rows of the output: no temporaries the size of the tensor.
    """
    out = None
    module = name[: -len(".weight")] if name.endswith(".weight") else None
    parts = lora.modules.get(module, ()) if module else ()
    if parts:
        covered = sum((p.rows[1] - p.rows[0]) if p.rows else shape[0] for p in parts)
        out = np.empty(shape, dtype=np.float32) if covered == shape[0] else np.zeros(shape, dtype=np.float32)
        for part in parts:
            r0, r1 = part.rows or (0, shape[0])
            block = out[r0:r1]
            lowrank_product(part.b, part.a, out=block)  # same bits on every machine
            with np.errstate(over="ignore", invalid="ignore"):  # inf is refused, naming the tensor, when quantized
                block *= np.float32(strength * part.scale)
    full = lora.full_deltas.get(name)
    if full is not None:
        with np.errstate(over="ignore", invalid="ignore"):
            scaled = full * np.float32(strength)
            out = scaled if out is None else np.add(out, scaled, out=out)
    return out


class LoraMerger:
    """A ``tensor_transform`` hook: ``merger(name, w)`` returns w with every LoRA merged in.

    Tensors no LoRA touches come back as the very same object, so the pipeline can stream them.
    """

    def __init__(self, loras: Sequence[tuple[CanonicalLora, float]], base_shapes: Shapes):
        validate_loras(loras, base_shapes)
        self._loras = [(lora, float(strength)) for lora, strength in loras]
        self._shapes = {k: tuple(v) for k, v in base_shapes.items()}
        self.targets: frozenset[str] = frozenset(
            name for lora, strength in self._loras if strength != 0 for name in lora.tensor_names()
        )

    @property
    def loras(self) -> list[tuple[CanonicalLora, float]]:
        return list(self._loras)

    def delta(self, name: str) -> np.ndarray | None:
        """The summed float32 delta for BFL tensor ``name`` (replacements excluded), None if none."""
        if name not in self.targets:
            return None
        total = None
        for lora, strength in self._loras:
            if strength == 0:
                continue
            d = _lora_delta(lora, name, self._shapes[name], strength)
            if d is not None:
                total = d if total is None else np.add(total, d, out=total)
        return total

    def replacement(self, name: str) -> np.ndarray | None:
        """The value a LoRA replaces tensor ``name`` with, None if none does."""
        for lora, strength in self._loras:
            if strength != 0 and name in lora.replacements:
                return lora.replacements[name]
        return None

    def __call__(self, name: str, w: np.ndarray) -> np.ndarray:
        """``w`` (float, upcast source) with the LoRAs merged, float32; untouched tensors returned as is."""
        if name not in self.targets:
            return w
        if tuple(w.shape) != self._shapes[name]:
            raise LoraError(f"tensor {name} has shape {list(w.shape)}, but the LoRAs were validated against {list(self._shapes[name])}")
        if not np.issubdtype(np.asarray(w).dtype, np.floating):
            raise LoraError(f"tensor {name} must be upcast to float before merging LoRAs, got dtype {np.asarray(w).dtype}")
        base = self.replacement(name)
        out = np.asarray(w if base is None else base, dtype=np.float32)
        delta = self.delta(name)
        if delta is None:
            return out.copy()
        with np.errstate(over="ignore", invalid="ignore"):  # an overflow to inf is refused when quantized
            return np.add(out, delta, out=delta)  # == out + delta bit for bit; reuses our own buffer


def build_merger(specs: Sequence[LoraSpec], base_shapes: Shapes) -> LoraMerger:
    """Load every LoRA of ``specs`` (any format), validate them against the base, return the hook."""
    return LoraMerger([(load_lora(spec.path), spec.strength) for spec in specs], base_shapes)


def merged_lora_metadata(entries: Sequence[tuple[str, str, float, str]]) -> dict[str, str]:
    """``flux_gguf.loras`` for the GGUF header: (name, file sha256, strength, format) of each merged
    LoRA, so a file says what was baked into it. Empty when nothing was merged."""
    if not entries:
        return {}
    doc = [{"name": n, "sha256": h, "strength": st, "format": f} for n, h, st, f in entries]
    return {"flux_gguf.loras": json.dumps(doc, sort_keys=True)}
