"""The release's README.md: a Hub model card whose YAML front matter the Hub validates.

Front matter is written by ``huggingface_hub.ModelCardData.to_yaml()`` (the fields in
docs/hub.md); the body is plain Markdown with a table of files (size, bits per weight, tensor
types, sha256) and, when a validation report is given, its per-variant quality figures. The text
holds nothing that changes between two builds of the same spec (no dates, no absolute paths).

Validation report (``validation.json`` from ``flux-gguf validate``): read leniently, as it is
produced by another command. Accepted shapes: ``{"variants": {VARIANT: {...}}}`` or
``{"variants": [{"variant": VARIANT, ...}]}`` (an entry may name its ``file`` instead, and may
nest its figures under ``"metrics"``). Of each entry, the numeric fields in QUALITY_FIELDS are
shown; anything else is ignored.
"""
from __future__ import annotations

import math
from urllib.parse import quote
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

from huggingface_hub import ModelCardData

from converter import __version__
from converter.errors import ReleaseError
from manifests.errors import SchemaError
from manifests.manifest import parse_json
from manifests.paths import character_problem

from .spec import ReleaseSpec
from .usage import how_to_use, usage_family

QUALITY_FIELDS: dict[str, str] = {"cosine": "cosine", "rel_l2": "rel. L2", "psnr": "PSNR (dB)", "ssim": "SSIM"}
PERF_FIELDS: dict[str, str] = {"peak_memory_bytes": "peak VRAM", "seconds_per_step": "s/step"}
"""Measured by ``flux-gguf bench`` (converter/quality/bench.py ``BenchResult``), read from the validation report."""
ACTIVATIONS_1024_BYTES: int = 949_024_772
"""Peak activation memory of one FLUX.1 transformer step at 1024x1024 on top of the weights (0.884 GiB).

Measured once with ``python scripts/measure_activations.py --json activations.json`` (defaults: FLUX.1
Kontext, Q4_K_M made by our converter from a synthetic full-width checkpoint, hidden 3072 / 24 heads,
1 double + 1 single block, checked equal at 2 + 2; loaded with diffusers ``from_single_file`` and
``GGUFQuantizationConfig(compute_dtype=torch.bfloat16)``; one call under ``torch.inference_mode``) on
CPU, 2 cores (AMD EPYC), torch 2.13 CPU, diffusers 0.42.1: the maximum of torch.profiler's running
CPU-allocator total during the call minus its value before (exact; the peak-RSS cross-check gave
0.908 GiB, which adds glibc and the profiler's own memory).

Includes: the residual streams, attention and MLP intermediates, RoPE tables and output for 4096
target + 4096 reference-image + 512 T5 tokens, and the largest layer's weight as diffusers' GGUF layer
dequantizes it on the fly. Excludes: the weights themselves (the file size stands for them), the text
encoders and VAE, and on a GPU the CUDA context (a few hundred MiB) and the caching allocator's slack;
a GPU that runs diffusers' fused GGUF kernels does not materialize the dequantized weight. So the
card calls size + this an estimate from a CPU measurement. Peak activation memory does not grow
with depth under inference_mode (the script's docstring says why), so it holds for the 19 + 38 block
model. Text-to-image ([dev], [schnell]: no reference image) needs less; the figure is an upper bound there.
"""
KLEIN_4B_ACTIVATIONS_1024_BYTES: int = 1_286_438_914
"""The same for FLUX.2 [klein] 4B (1.198 GiB): ``python scripts/measure_activations.py --family flux2-klein-4b
--json klein4b.json``, same machine and method (hidden 3072 / 24 heads, context 7680, SwiGLU ratio 3; 1 + 1
blocks, equal to the byte at 2 + 2; peak-RSS cross-check 1.221 GiB); 4096 target + 4096 reference-image +
512 Qwen3 tokens. Includes and excludes what ``ACTIVATIONS_1024_BYTES`` does; an estimate from a CPU
measurement too, and an upper bound for text-to-image."""
KLEIN_9B_ACTIVATIONS_1024_BYTES: int = 1_796_341_762
"""FLUX.2 [klein] 9B (1.673 GiB): ``python scripts/measure_activations.py --family flux2-klein-9b --check-depth 0
--json klein9b.json``, same machine and method (hidden 4096 / 32 heads, context 12288; 1 + 1 blocks, peak-RSS
cross-check 1.696 GiB; the depth check was skipped here, the same code path gave equal peaks at 2 + 2 for
FLUX.1 and [klein] 4B); 4096 target + 4096 reference-image + 512 Qwen3 tokens. An estimate from a CPU
measurement, as above."""
FLUX2_DEV_ACTIVATIONS_1024_BYTES: int = 2_946_695_172
"""FLUX.2 [dev] (2.744 GiB): ``python scripts/measure_activations.py --family flux2-dev --check-depth 0
--json dev.json``, same machine and method (hidden 6144 / 48 heads, context 15360, guidance embedded;
1 + 1 blocks, peak-RSS cross-check 2.768 GiB); 4096 target + 4096 reference-image + 512 Mistral tokens.
An estimate from a CPU measurement, as above."""
ACTIVATIONS_1024_BY_FAMILY: dict[str, int] = {
    "flux-dev": ACTIVATIONS_1024_BYTES, "flux-kontext": ACTIVATIONS_1024_BYTES, "flux-schnell": ACTIVATIONS_1024_BYTES,
    "flux2-klein-4b": KLEIN_4B_ACTIVATIONS_1024_BYTES, "flux2-klein-9b": KLEIN_9B_ACTIVATIONS_1024_BYTES,
    "flux2-dev": FLUX2_DEV_ACTIVATIONS_1024_BYTES,
}
"""The activation figure per model family (``usage.usage_family``); a family without a measured figure
(Fill, Depth, Canny, unknown) gets the weights-only lower bound."""


@dataclass(frozen=True)
class CardFile:
    """One GGUF as the card's table shows it."""

    path: str
    variant: str
    size: int
    sha256: str
    bits_per_weight: float
    type_counts: Mapping[str, int]


@dataclass(frozen=True)
class CardSource:
    name: str
    size: int
    sha256: str


def card_file(path: str, variant: str, size: int, sha256: str, tensors: Sequence[Any]) -> CardFile:
    """Summarize a GGUF from its tensor records (``type``, ``shape``, ``nbytes``)."""
    params = sum(math.prod(t.shape) for t in tensors)
    nbytes = sum(t.nbytes for t in tensors)
    counts: dict[str, int] = {}
    for t in tensors:
        counts[t.type] = counts.get(t.type, 0) + 1
    ordered = dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))
    return CardFile(path, variant, size, sha256, nbytes * 8 / max(params, 1), ordered)


def mix_tables(label: str, types: Mapping[str, str]) -> list[str]:
    """A mix's quantized types as one table per block kind (rows: blocks; columns: tensors)."""
    kinds: dict[str, dict[str, dict[str, str]]] = {}
    for name, qt in types.items():
        parts = name.removesuffix(".weight").split(".")
        if parts[0] in ("double_blocks", "single_blocks") and len(parts) > 2:
            kinds.setdefault(parts[0], {}).setdefault(parts[1], {})[".".join(parts[2:])] = qt
    out = [f"Types of `{label}` per block:"]
    for kind, blocks in kinds.items():
        cols = list(dict.fromkeys(c for row in blocks.values() for c in row))
        out += ["", f"| {kind} | " + " | ".join(f"`{c}`" for c in cols) + " |", "|--:|" + "---|" * len(cols)]
        out += [f"| {b} | " + " | ".join(row.get(c, "") for c in cols) + " |" for b, row in blocks.items()]
    return out


def _number(value: Any) -> bool:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:  # an integer beyond float's range
        return False


def read_validation_report(path: Path, files: Sequence[CardFile]) -> dict[str, dict[str, float]]:
    """Quality figures per variant from a validation report; :class:`ReleaseError` if unreadable."""
    try:
        doc = parse_json(path.read_bytes(), str(path))  # strict: also NaN, duplicate keys, deep nesting, huge integers
    except OSError as e:
        raise ReleaseError(f"{path}: cannot read the validation report: {e.strerror or e}") from None
    except SchemaError as e:
        raise ReleaseError(f"{path}: cannot read the validation report: {e.problem}") from None
    entries = doc.get("variants") if isinstance(doc, dict) else None
    if isinstance(entries, dict):
        items = [(k, v) for k, v in entries.items()]
    elif isinstance(entries, list):
        items = [(e.get("variant") or e.get("file"), e) if isinstance(e, dict) else (None, e) for e in entries]
    else:
        raise ReleaseError(f"{path}: expected a 'variants' object or list in the validation report")
    by_file = {f.path: f.variant for f in files}
    out: dict[str, dict[str, float]] = {}
    for i, (key, entry) in enumerate(items):
        if not isinstance(entry, dict) or not isinstance(key, str):
            raise ReleaseError(f"{path}: variants[{i}] must be an object naming its 'variant' or 'file'")
        variant = by_file.get(key, key)
        figures = dict(entry.get("metrics", {})) if isinstance(entry.get("metrics"), dict) else {}
        figures.update({k: v for k, v in entry.items() if k in QUALITY_FIELDS or k in PERF_FIELDS})
        picked = {}
        for field, value in figures.items():
            if field not in QUALITY_FIELDS and field not in PERF_FIELDS:
                continue
            if not _number(value):
                raise ReleaseError(f"{path}: {field} of {variant} must be a finite number, got {value!r}")
            picked[field] = float(value)
        if picked:
            out[variant] = picked
    return out


def human_size(n: int) -> str:
    """Decimal units, as the Hub and the published tables show sizes."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.3f} {unit}"
    return f"{n} B"


def _figure(field: str, value: float | None) -> str:
    if value is None:
        return "–"
    if field == "cosine":
        return f"{value:.6f}"
    if field == "psnr":
        return f"{value:.2f}"
    return f"{value:.4g}"


_MD_SPECIAL = set("\\`*[]<>|~&")  # what can start markup mid-line (the text never starts a line; an intraword _ never emphasises)


def _visible(c: str, escape: str) -> str:
    """A character as the card may hold it: invisible ones (controls, line breaks, bidi overrides,
    zero-width: what Python cannot print or the name policy flags) as their escape, ``\\u202e``."""
    if not c.isprintable() or character_problem(c) is not None:
        return escape + ascii(c)[1:-1]
    return c


def md_text(text: object) -> str:
    """User-controlled text (a title, a dataset name) as inert Markdown on one line: Markdown's
    punctuation backslash-escaped and invisible characters shown as escapes, so it can neither
    format the card nor hide or reorder text."""
    return "".join("\\" + c if c in _MD_SPECIAL else _visible(c, "\\") for c in str(text))


def md_code(text: object) -> str:
    """User-controlled text for inside a code span (no escapes work there): backticks become
    quotes, invisible characters are shown as escapes."""
    return "".join("'" if c == "`" else _visible(c, "") for c in str(text))


def md_prose(text: str) -> str:
    """The spec author's own Markdown (``card.description``): kept as Markdown, but invisible
    characters shown as escapes (line breaks kept)."""
    return "".join(c if c == "\n" else _visible(c, "\\") for c in text)


def link_target(path: str) -> str:
    """A relative link to a release file, percent-encoded (spaces, parentheses)."""
    return quote(path)


def _cell(text: str) -> str:
    """Text inside a table cell (or inline): escaped as :func:`md_text`."""
    return md_text(text)


def front_matter(spec: ReleaseSpec) -> str:
    card = spec.card
    data = ModelCardData(
        base_model=spec.base_model,
        base_model_relation="quantized",
        library_name="gguf",
        license=card.license,
        license_name=card.license_name,
        license_link=card.license_link,
        pipeline_tag=card.pipeline_tag,
        tags=list(card.tags),
        **({"quantized_by": card.quantized_by} if card.quantized_by else {}),
    )
    return "---\n" + data.to_yaml() + "\n---\n"


def _files_table(files: Sequence[CardFile], quality: Mapping[str, Mapping[str, float]]) -> list[str]:
    fields = [f for f in QUALITY_FIELDS if any(f in q for q in quality.values())]
    head = ["File", "Variant", "Size", "Bits/weight", "Tensor types", *[QUALITY_FIELDS[f] for f in fields], "SHA-256"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---", "---", "--:", "--:", "---", *["--:"] * len(fields), "---"]) + "|"]
    for f in files:
        types = ", ".join(f"{n} {t}" for t, n in f.type_counts.items())
        q = quality.get(f.variant, {})
        row = [f"[{_cell(f.path)}]({link_target(f.path)})", f.variant, human_size(f.size),
               f"{f.bits_per_weight:.2f}", types, *[_figure(x, q.get(x)) for x in fields], f"`{f.sha256}`"]
        lines.append("| " + " | ".join(row) + " |")
    return lines


def gpu_section(files: Sequence[CardFile], figures: Mapping[str, Mapping[str, float]], family: str = "") -> list[str]:
    """"Which file for my GPU": measured peak VRAM and s/step where the report has them, else an estimate
    (file size + the family's activation figure, ``ACTIVATIONS_1024_BY_FAMILY``; the weights alone for a
    family without one)."""
    ggufs = [f for f in files if f.path.endswith(".gguf") and f.variant]
    if not ggufs:
        return []
    activations = ACTIVATIONS_1024_BY_FAMILY.get(family)
    estimated = False
    rows = ["## Which file for my GPU", "",
            "| File | Bits/weight | Size | Peak VRAM | s/step | Source of the memory figure |", "|---|--:|--:|--:|--:|---|"]
    for f in ggufs:
        q = figures.get(f.variant, {})
        if "peak_memory_bytes" in q:
            mem, how = f"{q['peak_memory_bytes'] / 2**30:.2f} GiB", "measured (`flux-gguf bench`, `validation.json`)"
        elif activations is not None:
            mem, estimated = f"≈ {(f.size + activations) / 2**30:.2f} GiB", True
            how = "estimate: file size + activations at 1024x1024 measured on CPU"
        else:
            mem, how = f"≥ {f.size / 2**30:.2f} GiB", "estimate: the weights alone (file size); activations come on top"
        step = f"{q['seconds_per_step']:.3f}" if "seconds_per_step" in q else "–"
        rows.append(f"| {_cell(f.path)} | {f.bits_per_weight:.2f} | {human_size(f.size)} | {mem} | {step} | {how} |")
    if estimated:
        rows += ["", f"The ≈ figures are an estimate, not a GPU measurement: the file size plus "
                 f"{activations / 2**30:.2f} GiB of activations, measured on CPU (bf16, diffusers' GGUF loader) for "
                 "one 1024x1024 step with a 1024x1024 reference image and 512 text tokens. A GPU adds its CUDA "
                 "context and allocator slack; text-to-image without a reference image needs less."]
    rows += ["", "Text encoders and VAE are loaded besides the transformer (ComfyUI and diffusers can offload them to "
             "the CPU). Quality figures per file are in the table above.", ""]
    return rows


def calibration_sentence(datasets: Sequence[str]) -> str:
    """What the calibration data was, said for a user (the dataset names flux-gguf calibrate writes:
    converter/quality/calibrate.py ``probes_dataset`` and the inputs/prompts file names)."""
    if not datasets:
        return "The file does not say what it was collected on"
    if all(d.startswith("probes:") for d in datasets):
        return ("It was collected on seeded random probe inputs (the smoke default), not on real prompts or images, "
                "so it says little about real use")
    return ("It was collected by running the model on the inputs named above (a prompts/images set or a saved "
            "inputs file chosen by the publisher)")


def imatrix_card_line(files: Sequence[str], imatrix: Any) -> str:
    """The card's line for a calibrated release: which importance matrix, collected on what."""
    names = ", ".join(f"`{md_code(Path(f).name)}`" for f in files)
    what = ""
    if imatrix is not None:
        datasets = "; ".join(imatrix.datasets) or "no dataset recorded in the file"
        what = (f", collected on: {_cell(datasets)} ({imatrix.chunk_count} chunks, "
                f"{len(imatrix.entries)} tensors). {calibration_sentence(imatrix.datasets)}")
    return (f"- **Calibrated**: K-quant tensors were quantized with the importance matrix {names}{what}; "
            "it is listed with its sha256 under the source files and recorded as `quantize.imatrix.*` in each "
            "GGUF that uses it. Q8_0, F16 and BF16 files do not use it.")


def render_model_card(
    spec: ReleaseSpec,
    files: Sequence[CardFile],
    sources: Sequence[CardSource],
    quality: Mapping[str, Mapping[str, float]] | None = None,
    *,
    extension_outputs: Mapping[str, Sequence[Any]] | None = None,
    imatrix: Any = None,
    signature_section: Sequence[str] = (),
    mixes: Mapping[str, Mapping[str, str]] | None = None,
    model_family: str = "",
) -> str:
    """The full README.md text (front matter + body), deterministic for a given input."""
    quality = quality or {}
    card = spec.card
    title = md_text(card.title or f"{spec.name} GGUF")
    base_link = f"[{spec.base_model}](https://huggingface.co/{spec.base_model})"
    out = [front_matter(spec), f"# {title}", "",
           f"GGUF quantizations of {base_link}, made with flux-gguf {__version__} from the spec recorded in "
           "`manifest.json`. Tensor names follow the BFL layout that ComfyUI-GGUF, diffusers and "
           "stable-diffusion.cpp load.", ""]
    if card.description:
        out += [md_prose(card.description.strip()), ""]
    out += ["## Files", ""] + _files_table(files, quality) + [""]
    if quality:
        out += ["Quality figures compare each file's output with the unquantized source model "
                "(from the validation report shipped as `validation.json`).", ""]
    out += ["Bits/weight counts every tensor's bytes (F32 biases and norms included) over all parameters.", ""]
    family = usage_family(model_family, spec.base_model)
    out += gpu_section(files, quality, family)
    ggufs = [f.path for f in files if f.path.endswith(".gguf") and f.variant]
    out += how_to_use(family, ggufs)
    out += ["## How the files were made", "",
            "- 1-D tensors (biases, norm scales) are F32; `img_in.weight` is F32 so diffusers detects the model correctly.",
            "- Tensors under `img_in.`, `txt_in.`, `time_in.`, `vector_in.`, `guidance_in.` and `final_layer.` keep "
            "the source precision.",
            "- `_M` variants raise the fused attention `double_blocks.N.{img,txt}_attn.qkv.weight` one type.",
            ]
    if spec.imatrix:
        out.append(imatrix_card_line(spec.imatrix, imatrix))
    for label, (kind, value) in spec.targets.items():
        out.append(f"- `{md_code(label)}` is a size-targeted mix ({kind.replace('_', ' ')} {value}): each quantized tensor's "
                   "type (Q2_K to Q8_0 or the source precision) was chosen to minimise the output error predicted "
                   f"from measured per-tensor sensitivity (`flux-gguf sensitivity`, file `{md_code(spec.sensitivity or '')}`,"
                   " listed with its sha256 under the source files) within the budget; `flux_gguf.recipe_target` "
                   "in the file records the choice. Its types per block are below.")
    if spec.overrides:
        out.append("- Overrides (REGEX=TYPE, first match wins): " + ", ".join(f"`{md_code(o)}`" for o in spec.overrides) + ".")
    sections: list[str] = []
    for key, ext in spec.extensions.items():
        if ext.card_section is not None:
            sections += ext.card_section((extension_outputs or {}).get(key, ()))
        else:
            out.append(f"- `{key}` entries from the spec were applied; `manifest.json` records them.")
    if sections:
        out += [""] + sections
    for label, types in (mixes or {}).items():
        out += [""] + mix_tables(label, types)
    out += ["", "Source files:", "", "| File | Size | SHA-256 |", "|---|--:|---|"]
    out += [f"| {_cell(s.name)} | {human_size(s.size)} | `{s.sha256}` |" for s in sources]
    out += ["", "## Verify your download", "",
            "Every file's sha256 is listed in `SHA256SUMS` (and, per tensor, in `manifest.json`):", "",
            "```sh", "sha256sum -c --strict SHA256SUMS            # all files",
            "sha256sum -c --ignore-missing SHA256SUMS    # only the files you downloaded",
            "flux-gguf verify .                          # ok / mismatch / missing / unexpected per file",
            "flux-gguf verify . --tensors                # which tensors of a damaged file differ",
            "flux-gguf verify . --source SOURCE          # re-derive every tensor from the source weights",
            "```", ""]
    out += list(signature_section)  # signed releases: how to check model.sig (release/signing.py)
    if card.license_link or card.license_name:
        name = card.license_name or card.license
        out += ["## License", "", f"License: `{md_code(name)}`" +
                (f"; see [{_cell(card.license_link)}]({link_target(card.license_link)})." if card.license_link else "."), ""]
    return "\n".join(out)
