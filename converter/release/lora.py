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

from converter.errors import LoraError, ReleaseError
from converter.lora.export import SIDECAR_DTYPES, export_kohya
from converter.lora.formats import CanonicalLora, load_lora
from converter.lora.merge import LoraMerger, merged_lora_metadata, validate_loras
from manifests.hashing import FileDigest, hash_file
from manifests.paths import name_key, name_problem, twin_difference

from .spec import ExtensionOutput, ReleaseSpec, SpecExtension, recorded_path, register_spec_hook

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
    if not isinstance(path, str) or not path or (not Path(path).is_absolute() and ".." in Path(path).parts):
        raise ReleaseError(f"{prefix}: path must be an absolute path or a relative path inside the spec's folder, "
                           f"got {path!r}")
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
    if not isinstance(name, str) or not name or any(c in name for c in "/\\\0 ") or name in (".", ".."):
        raise ReleaseError(f"{prefix}: name must be a plain word (no spaces or slashes), got {name!r}")
    problem = name_problem(name)  # it names a side-car file and shows in every GGUF header and the card
    if problem is not None:
        raise ReleaseError(f"{prefix}: name {name!r} must be a plain word, but it {problem}")
    lora = load_lora(full)
    # An absolute path is recorded by its file name only (with its sha256): no local paths in manifests.
    return LoraEntry(full, recorded_path(path), name, float(strength), mode, dtype, hash_file(full).sha256, lora)


def parse_lora_section(raw: Any, spec_dir: Path, where: str) -> list[LoraEntry]:
    """The spec's ``[[lora]]`` array -> checked entries (files loaded, formats detected)."""
    if not isinstance(raw, list) or not raw:
        raise ReleaseError(f"{where}: 'lora' must be a non-empty array of tables ([[lora]])")
    entries = [_entry(r, i, spec_dir, where) for i, r in enumerate(raw, 1)]
    seen: dict[str, str] = {}
    for e in entries:  # side-car names differing only by case are one file on macOS and Windows
        key = name_key(e.name)
        if key in seen:
            first = seen[key]
            raise ReleaseError(f"{where}: two [[lora]] entries are named {first!r}; names must be unique" if first == e.name
                               else f"{where}: [[lora]] entries named {first!r} and {e.name!r} differ "
                                    f"{twin_difference(first, e.name)}; names must be unique")
        seen[key] = e.name
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
        output_names=lambda release_name: [e.sidecar_name(release_name) for e in entries if e.mode == "sidecar"],
    )


def _where(i: int, key: str | None = None) -> str:
    return f"manifest.json: spec.lora[{i}]" + (f".{key}" if key else "")


def manifest_lora_records(spec: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    """The ``lora`` records of a manifest's ``spec`` (empty when it has none), type-checked.

    A manifest can be edited by hand, so every shape ``verify --source`` relies on is checked here
    and refused with a :class:`ReleaseError` naming the key. Records without ``mode`` (written
    before side-cars existed) are merges.
    """
    raw = spec.get("lora")
    if raw is None:
        return []
    if not isinstance(raw, list):
        raise ReleaseError(f"manifest.json: spec.lora must be a list of tables (the [[lora]] entries), got {raw!r}")
    for i, r in enumerate(raw):
        if not isinstance(r, dict):
            raise ReleaseError(f"{_where(i)} must be a table (one [[lora]] entry), got {r!r}")
        mode = r.get("mode", "merge")
        if mode not in MODES:
            raise ReleaseError(f"{_where(i, 'mode')} must be one of {', '.join(MODES)}, got {mode!r}")
    return list(raw)


def is_merge(record: Mapping[str, Any]) -> bool:
    """Did this (checked) record change the weights?"""
    return record.get("mode", "merge") == "merge"


def hash_lora_files(paths: Sequence[Path]) -> dict[Path, FileDigest]:
    """Size and sha256 of each ``--lora`` file; an unreadable one is a one-line LoraError."""
    out = {}
    for p in paths:
        try:
            out[Path(p)] = hash_file(p)
        except OSError as e:
            raise LoraError(f"--lora {p}: cannot read: {e.strerror or e}") from None
    return out


def _check_sha256(value: Any, i: int) -> str:
    if not isinstance(value, str) or len(value) != 64 or any(c not in "0123456789abcdef" for c in value):
        raise ReleaseError(f"{_where(i, 'sha256')} must be 64 lowercase hex digits, got {value!r}")
    return value


def check_lora_files(records: Sequence[Mapping[str, Any]], lora_files: Mapping[Path, str]) -> None:
    """Every given file (path -> sha256) must be one the release records, merged or side-car."""
    known = {r.get("sha256") for r in records}
    for path, sha in lora_files.items():
        if sha not in known:
            raise LoraError(f"--lora {path}: this release records no LoRA with that file's sha256 ({sha})")


def merger_for_manifest(records: Sequence[Mapping[str, Any]], lora_files: Sequence[Path] | Mapping[Path, str],
                        shapes: Mapping[str, tuple[int, ...]]) -> LoraMerger:
    """Rebuild a release's merge transform from its recorded ``lora`` entries and the user's
    copies of the LoRA files (matched by sha256), for ``verify --source``.

    ``records`` come from :func:`manifest_lora_records`; ``lora_files`` are paths, or paths with
    their sha256 already computed. Files of side-car entries are accepted and not applied.
    """
    if isinstance(lora_files, Mapping):
        sha_by_path = {Path(p): s for p, s in lora_files.items()}
    else:
        sha_by_path = {p: d.sha256 for p, d in hash_lora_files(lora_files).items()}
    by_sha = {s: p for p, s in sha_by_path.items()}
    loras = []
    for i, r in enumerate(records):
        if not is_merge(r):
            continue
        sha = _check_sha256(r.get("sha256"), i)
        strength = r.get("strength")
        if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not math.isfinite(strength):
            raise ReleaseError(f"{_where(i, 'strength')} must be a finite number, got {strength!r}")
        path = by_sha.get(sha)
        if path is None:
            raise LoraError(f"manifest.json: the release merged LoRA {r.get('name')!r} ({r.get('path')}, sha256 "
                            f"{sha}); pass that file with --lora")
        loras.append((load_lora(path), float(strength)))
    check_lora_files(records, sha_by_path)
    return LoraMerger(loras, shapes)


register_spec_hook("lora", lora_spec_hook)
