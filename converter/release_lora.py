"""``[[lora]]`` entries of a release spec: merged into the weights, or shipped as side-cars.

```toml
[[lora]]
path = "Hyper-FLUX.1-dev-8steps-lora.safetensors"   # relative to the spec; any supported format
name = "hyper8"                                      # optional (default: the file's stem)
strength = 0.125
mode = "merge"            # "merge": W + strength * delta before quantizing, in every GGUF
                          # "sidecar": exported in kohya naming next to the GGUFs
dtype = "BF16"            # side-car only: BF16 | F16 | F32
```

Every entry is loaded (format detected and normalized) when the spec is read and checked
against the source's tensors before any conversion starts. Side-cars are written into the release
folder, hashed while written, listed in the manifest (kind ``lora``) and described in the model
card with how to use them. The LoRA files are sources of the release: their sha256 is recorded,
which is how ``verify --source SRC --lora FILE`` finds each file's strength again.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

from manifests.hashing import hash_file

from .errors import LoraError, ReleaseError
from .lora_export import SIDECAR_DTYPES, export_kohya
from .lora_formats import CanonicalLora, load_lora
from .lora_merge import LoraMerger, merged_lora_metadata, validate_loras
from .release_spec import ExtensionOutput, ReleaseSpec, SpecExtension, register_spec_hook

MODES = ("merge", "sidecar")
ENTRY_KEYS = ("path", "name", "strength", "mode", "dtype")
KIND_LORA = "lora"


@dataclass(frozen=True)
class LoraEntry:
    """One checked ``[[lora]]`` entry with its loaded, normalized LoRA."""

    path: Path
    written_path: str
    name: str
    strength: float
    mode: str
    dtype: str
    sha256: str
    lora: CanonicalLora

    def sidecar_name(self, release_name: str) -> str:
        return f"{release_name}-lora-{self.name}.safetensors"

    def record(self) -> dict[str, Any]:
        out: dict[str, Any] = {"path": self.written_path, "name": self.name, "strength": self.strength,
                               "mode": self.mode, "format": self.lora.format, "sha256": self.sha256}
        if self.mode == "sidecar":
            out["dtype"] = self.dtype
        return out


def _entry(raw: Any, i: int, spec_dir: Path, where: str) -> LoraEntry:
    prefix = f"{where}: [[lora]] entry {i}"
    if not isinstance(raw, dict):
        raise ReleaseError(f"{prefix}: expected a table with {', '.join(ENTRY_KEYS)}")
    unknown = sorted(set(raw) - set(ENTRY_KEYS))
    if unknown:
        raise ReleaseError(f"{prefix}: unknown key {unknown[0]!r}; expected one of {', '.join(ENTRY_KEYS)}")
    path = raw.get("path")
    if not isinstance(path, str) or not path or Path(path).is_absolute() or ".." in Path(path).parts:
        raise ReleaseError(f"{prefix}: path must be a relative path inside the spec's folder, got {path!r}")
    strength = raw.get("strength", 1.0)
    if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not math.isfinite(strength):
        raise ReleaseError(f"{prefix}: strength must be a finite number, got {strength!r}")
    mode = raw.get("mode", "merge")
    if mode not in MODES:
        raise ReleaseError(f"{prefix}: mode must be one of {', '.join(MODES)}, got {mode!r}")
    dtype = str(raw.get("dtype", "BF16")).upper()
    if dtype not in SIDECAR_DTYPES:
        raise ReleaseError(f"{prefix}: dtype must be one of {', '.join(SIDECAR_DTYPES)}, got {raw.get('dtype')!r}")
    if "dtype" in raw and mode != "sidecar":
        raise ReleaseError(f"{prefix}: dtype applies to mode = \"sidecar\" only")
    full = spec_dir / path
    if not full.is_file():
        raise ReleaseError(f"{prefix}: LoRA file not found: {full}")
    name = raw.get("name", Path(path).stem)
    if not isinstance(name, str) or not name or any(c in name for c in "/\\\0 "):
        raise ReleaseError(f"{prefix}: name must be a plain word (no spaces or slashes), got {name!r}")
    lora = load_lora(full)
    return LoraEntry(full, path, name, float(strength), mode, dtype, hash_file(full).sha256, lora)


def parse_lora_section(raw: Any, spec_dir: Path, where: str) -> list[LoraEntry]:
    """The spec's ``[[lora]]`` array -> checked entries (files loaded, formats detected)."""
    if not isinstance(raw, list) or not raw:
        raise ReleaseError(f"{where}: 'lora' must be a non-empty array of tables ([[lora]])")
    entries = [_entry(r, i, spec_dir, where) for i, r in enumerate(raw, 1)]
    names = [e.name for e in entries]
    dup = next((n for n in names if names.count(n) > 1), None)
    if dup is not None:
        raise ReleaseError(f"{where}: two [[lora]] entries are named {dup!r}; names must be unique")
    return entries


def _card_section(entries: Sequence[LoraEntry], outputs: Sequence[ExtensionOutput]) -> list[str]:
    """The model card's LoRA section; ``outputs`` are the side-cars in entry order."""
    lines = ["## LoRAs", ""]
    merged = [e for e in entries if e.mode == "merge"]
    if merged:
        lines += ["Merged into every GGUF file above before quantization (`W + strength · (alpha/rank) · B·A`, "
                  "float32, then quantized once); nothing to load at run time:", ""]
        lines += [f"- `{e.name}` ({e.lora.format} format, strength {e.strength:g}), from `{e.written_path}` "
                  f"(sha256 `{e.sha256}`)" for e in merged]
        lines.append("")
    sidecars = list(zip([e for e in entries if e.mode == "sidecar"], outputs))
    if sidecars:
        lines += ["Shipped as side-car files in kohya naming (fused `qkv`/`linear1` targets, `.alpha` kept), "
                  "which ComfyUI, stable-diffusion.cpp and diffusers load; apply them at run time at the "
                  "recommended strength:", "",
                  "| File | LoRA | Recommended strength | Size | SHA-256 |", "|---|---|--:|--:|---|"]
        for e, o in sidecars:
            lines.append(f"| [{o.name}]({o.name}) | `{e.name}` ({e.lora.format}) | {e.strength:g} | "
                         f"{o.size:,} B | `{o.sha256}` |")
        e, o = sidecars[0]
        lines += ["", "Usage:", "",
                  f"- ComfyUI: *LoraLoaderModelOnly* after the GGUF loader, `strength_model = {e.strength:g}`.",
                  f"- stable-diffusion.cpp: put the file in `--lora-model-dir` and add "
                  f"`<lora:{Path(o.name).stem}:{e.strength:g}>` to the prompt.",
                  f"- diffusers: `pipe.load_lora_weights(\".\", weight_name=\"{o.name}\", adapter_name=\"{e.name}\")`, "
                  f"then `pipe.set_adapters([\"{e.name}\"], adapter_weights=[{e.strength:g}])`.", ""]
    return lines


def lora_spec_hook(raw: Any, spec_dir: Path, where: str) -> SpecExtension:
    """The ``register_spec_hook("lora", ...)`` hook."""
    entries = parse_lora_section(raw, spec_dir, where)

    def make_transform(shapes: Mapping[str, tuple[int, ...]]) -> Any:
        # Every entry, side-cars included, must fit the base before any work starts.
        validate_loras([(e.lora, e.strength) for e in entries], shapes)
        merged = [(e.lora, e.strength) for e in entries if e.mode == "merge"]
        return LoraMerger(merged, shapes) if merged else (lambda name, x: x)

    def write_outputs(folder: Path, spec: ReleaseSpec) -> list[ExtensionOutput]:
        outputs = []
        for e in entries:
            if e.mode != "sidecar":
                continue
            fname = e.sidecar_name(spec.name)
            rec = export_kohya(e.lora, folder / fname, dtype=e.dtype, base_model=spec.base_model, strength=e.strength)
            outputs.append(ExtensionOutput(fname, rec.size, rec.sha256, KIND_LORA))
        return outputs

    return SpecExtension(
        record=[e.record() for e in entries],
        files=tuple(e.path for e in entries),
        make_transform=make_transform,
        write_outputs=write_outputs if any(e.mode == "sidecar" for e in entries) else None,
        card_section=lambda outputs: _card_section(entries, outputs),
        gguf_metadata=merged_lora_metadata([(e.name, e.sha256, e.strength, e.lora.format)
                                            for e in entries if e.mode == "merge"]),
    )


def merger_for_manifest(records: Sequence[Mapping[str, Any]], lora_files: Sequence[Path],
                        shapes: Mapping[str, tuple[int, ...]]) -> LoraMerger:
    """Rebuild a release's merge transform from its recorded ``lora`` entries and the user's
    copies of the LoRA files (matched by sha256), for ``verify --source``."""
    by_sha = {hash_file(p).sha256: p for p in lora_files}
    merged = [r for r in records if r.get("mode", "merge") == "merge"]
    loras = []
    for r in merged:
        path = by_sha.get(r.get("sha256", ""))
        if path is None:
            raise LoraError(f"manifest.json: the release merged LoRA {r.get('name')!r} ({r.get('path')}, sha256 "
                            f"{r.get('sha256')}); pass that file with --lora")
        loras.append((load_lora(path), float(r["strength"])))
    unused = sorted(set(by_sha) - {r.get("sha256") for r in merged})
    if unused:
        raise LoraError(f"--lora {by_sha[unused[0]]}: this release merged no LoRA with that file's sha256")
    return LoraMerger(loras, shapes)


register_spec_hook("lora", lora_spec_hook)
