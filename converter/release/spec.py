"""The release spec (``SPEC.toml``): parsed, checked and normalized before any work starts.

A release is declared in a small reviewable TOML file; everything it names is checked up front
(unknown keys, wrong types, unknown variants, bad overrides, files that do not exist), each error
one line naming the spec file and the key. Paths in the spec are relative to the spec file;
``source``, ``extra_files`` (and ``[[lora]]`` paths) may also be absolute (checkpoints often live on
another disk): the manifest then records only the file name (sizes and sha256 are recorded anyway),
so no absolute path ever lands in a manifest, model card or GGUF header.

Extension point: keys other engineers own (``[[lora]]`` today) are parsed by a hook registered
with :func:`register_spec_hook`; the hook returns a :class:`SpecExtension` saying what the key
adds to the build (a tensor transform, extra input files to hash) and what to record. A spec
that uses such a key while no hook is registered is refused with a clear error.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from converter.errors import PlanError, ReleaseError
from converter.recipes import MAX_OVERRIDES, bpw_budget, mix_variant, parse_override, resolve_variant, size_budget
from manifests import CHECKSUMS_NAME, MANIFEST_NAME
from manifests.paths import name_key, name_problem

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

MODEL_CARD_NAME = "README.md"
VALIDATION_NAME = "validation.json"
TOP_KEYS = ("name", "source", "base_model", "variants", "overrides", "extra_files", "validation", "card", "imatrix",
            "sensitivity")
TARGET_KEYS = ("name", "target_size", "target_bpw")
EXTENSION_KEYS = ("lora",)
CARD_KEYS = ("license", "license_name", "license_link", "quantized_by", "pipeline_tag", "tags", "title", "description")
DEFAULT_TAGS = ("flux", "kontext", "gguf", "image-to-image")
DEFAULT_PIPELINE_TAG = "image-to-image"

TensorTransform = Callable[[str, np.ndarray], np.ndarray]


TransformFactory = Callable[[Mapping[str, tuple[int, ...]]], TensorTransform]
"""Called once with the source's tensor shapes (BFL names) before conversion starts, so the
extension can validate against the model (e.g. LoRA targets) and return the per-tensor transform."""


@dataclass(frozen=True)
class SpecExtension:
    """What a hook-parsed key (e.g. ``[[lora]]``) contributes to the build.

    ``record``: JSON-able, stored as ``manifest.spec[key]``; ``files``: further inputs, hashed and
    listed as sources; ``make_transform``: builds the transform applied to each float32 tensor
    before quantization (see :data:`TransformFactory`); ``write_outputs``: writes extra release
    files (listed in the manifest and SHA256SUMS); ``card_section``: the model card's Markdown
    lines for this key, given those outputs; ``gguf_metadata``: ``flux_gguf.*`` string entries
    added to every GGUF header; ``output_names``: the file names ``write_outputs`` will write, given
    the release name (checked against the other files of the release before any work).
    """

    record: Any
    files: tuple[Path, ...] = ()
    make_transform: TransformFactory | None = None
    write_outputs: OutputWriter | None = None
    card_section: Callable[[Sequence[ExtensionOutput]], list[str]] | None = None
    gguf_metadata: Mapping[str, str] = field(default_factory=dict)
    output_names: Callable[[str], Sequence[str]] | None = None


@dataclass(frozen=True)
class ExtensionOutput:
    """A file an extension adds to the release (e.g. a LoRA side-car), with the digest computed
    while it was written."""

    name: str  # file name inside the release folder
    size: int
    sha256: str
    kind: str  # manifest artifact kind, e.g. "lora"


OutputWriter = Callable[[Path, "ReleaseSpec"], Sequence[ExtensionOutput]]
"""``write(release folder being built, spec) -> outputs``; called after the GGUFs are written."""


SpecHook = Callable[[Any, Path, str], SpecExtension]
"""``hook(raw TOML value, spec folder, spec file name for messages) -> SpecExtension``."""

_HOOKS: dict[str, SpecHook] = {}


def register_spec_hook(key: str, hook: SpecHook) -> None:
    """Let the module that owns ``key`` (one of EXTENSION_KEYS) parse it."""
    if key not in EXTENSION_KEYS:
        raise ValueError(f"{key!r} is not a spec extension key; expected one of {', '.join(EXTENSION_KEYS)}")
    _HOOKS[key] = hook


@dataclass(frozen=True)
class CardSpec:
    """The ``[card]`` table: model-card front matter and text."""

    license: str
    license_name: str | None = None
    license_link: str | None = None
    quantized_by: str | None = None
    pipeline_tag: str = DEFAULT_PIPELINE_TAG
    tags: tuple[str, ...] = DEFAULT_TAGS
    title: str | None = None
    description: str | None = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"license": self.license}
        for key in ("license_name", "license_link", "quantized_by"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        out["pipeline_tag"] = self.pipeline_tag
        out["tags"] = list(self.tags)
        for key in ("title", "description"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        return out


@dataclass(frozen=True)
class ReleaseSpec:
    """A checked spec. ``*_path`` fields are resolved; the ``to_json`` record keeps them as written."""

    spec_path: Path
    name: str
    source: str
    base_model: str
    variants: tuple[str, ...]
    card: CardSpec
    overrides: tuple[str, ...] = ()
    extra_files: tuple[str, ...] = ()
    validation: str | None = None
    extensions: Mapping[str, SpecExtension] = field(default_factory=dict)
    imatrix: tuple[str, ...] = ()  # importance matrices (relative paths), merged; K-quants use them
    # size-targeted variants: name -> ("target_size" | "target_bpw", value as written); their names
    # are in ``variants`` too, in spec order; ``sensitivity`` is the file they are chosen from
    targets: Mapping[str, tuple[str, str]] = field(default_factory=dict)
    sensitivity: str | None = None

    @property
    def base_dir(self) -> Path:
        return self.spec_path.parent

    @property
    def source_path(self) -> Path:
        return self.base_dir / self.source

    @property
    def extra_file_paths(self) -> dict[str, Path]:
        """Release name (the file name) -> file on disk."""
        return {Path(f).name: self.base_dir / f for f in self.extra_files}

    @property
    def imatrix_paths(self) -> tuple[Path, ...]:
        return tuple(self.base_dir / f for f in self.imatrix)

    @property
    def sensitivity_path(self) -> Path | None:
        return None if self.sensitivity is None else self.base_dir / self.sensitivity

    @property
    def fixed_variants(self) -> tuple[str, ...]:
        return tuple(v for v in self.variants if v not in self.targets)

    @property
    def validation_path(self) -> Path | None:
        return None if self.validation is None else self.base_dir / self.validation

    def gguf_name(self, variant: str) -> str:
        return f"{self.name}-{variant}.gguf"

    def to_json(self) -> dict[str, Any]:
        """The spec as recorded in the manifest: normalized, relative paths as written, absolute
        paths reduced to their file name (never an absolute path)."""
        out: dict[str, Any] = {"name": self.name, "source": recorded_path(self.source), "base_model": self.base_model,
                               "variants": [{"name": v, self.targets[v][0]: self.targets[v][1]}
                                            if v in self.targets else v for v in self.variants]}
        if self.overrides:
            out["overrides"] = list(self.overrides)
        if self.extra_files:
            out["extra_files"] = [recorded_path(f) for f in self.extra_files]
        if self.validation is not None:
            out["validation"] = self.validation
        if self.imatrix:
            out["imatrix"] = [recorded_path(f) for f in self.imatrix]
        if self.sensitivity is not None:
            out["sensitivity"] = recorded_path(self.sensitivity)
        out["card"] = self.card.to_json()
        for key, ext in self.extensions.items():
            out[key] = ext.record
        return out


class _Checker:
    """Type checks that name the spec file and key in every message."""

    def __init__(self, spec_name: str):
        self.spec_name = spec_name

    def error(self, key: str, problem: str) -> ReleaseError:
        return ReleaseError(f"{self.spec_name}: {key!r} {problem}" if key else f"{self.spec_name}: {problem}")

    def string(self, table: Mapping[str, Any], key: str, prefix: str = "", *, required: bool = False) -> str | None:
        full = prefix + key
        if key not in table:
            if required:
                raise ReleaseError(f"{self.spec_name}: missing required key {full!r}")
            return None
        value = table[key]
        if not isinstance(value, str) or not value.strip():
            raise self.error(full, f"must be a non-empty string, got {value!r}")
        return value

    def strings(self, table: Mapping[str, Any], key: str, prefix: str = "") -> tuple[str, ...] | None:
        full = prefix + key
        if key not in table:
            return None
        value = table[key]
        if not isinstance(value, list) or not all(isinstance(v, str) and v.strip() for v in value):
            raise self.error(full, f"must be a list of non-empty strings, got {value!r}")
        return tuple(value)

    def unknown(self, table: Mapping[str, Any], allowed: tuple[str, ...], prefix: str = "") -> None:
        for key in table:
            if key not in allowed:
                raise ReleaseError(
                    f"{self.spec_name}: unknown key {prefix + key!r}; expected one of {', '.join(prefix + k for k in allowed)}")


def _check_name(c: _Checker, name: str) -> str:
    if name.strip() != name or any(ch in name for ch in "/\\\0\n\r") or name in (".", ".."):
        raise c.error("name", "must be a plain file-name stem (no slashes or surrounding spaces)")
    problem = name_problem(name)  # the one name policy of manifests.paths: every release file carries it
    if problem is not None:
        raise c.error("name", f"must be a plain file-name stem, but it {problem}")
    if len(name.encode("utf-8")) > 200:
        raise c.error("name", f"is {len(name.encode('utf-8'))} bytes long; at most 200 (file names hold 255)")
    return name


def recorded_path(value: str) -> str:
    """What a manifest records for a spec path: as written when relative, the bare file name when
    absolute (the local disk layout is nobody else's business; size and sha256 identify the file)."""
    return Path(value).name if Path(value).is_absolute() else value


def _check_relative(c: _Checker, key: str, value: str) -> str:
    if Path(value).is_absolute():
        raise c.error(key, f"must be a path relative to the spec file, got the absolute path {value!r}")
    return value


def _check_path(c: _Checker, key: str, value: str) -> str:
    """A file copied into the release: absolute (recorded by name only), or relative to the spec file
    and inside its folder: a relative '..' would quietly pull in files from elsewhere."""
    if not Path(value).is_absolute() and ".." in Path(value).parts:
        raise c.error(key, f"must be a path inside the spec's folder or an absolute path, got {value!r} "
                           "('..' leaves the folder)")
    # What the release records (the relative path as written, or the file name) follows the name policy.
    problem = name_problem(recorded_path(value))
    if problem is not None:
        raise c.error(key, f"names {value!r}, which {problem}")
    return value


def _same_where(a: str, b: str) -> str:
    """Where two names with one :func:`~manifests.paths.name_key` are the same, for messages."""
    return "where case does not count" if a.casefold() == b.casefold() else \
        "where case and Unicode compatibility forms (fullwidth letters, ligatures) do not count"


def _parse_variants(c: _Checker, raw: Any) -> tuple[tuple[str, ...], dict[str, tuple[str, str]]]:
    """``variants = ["Q4_K_M", {name = "Q3_K_A", target_size = "5.37GB"}]``: names in order, and the
    size-targeted ones with their budget (``target_size`` or ``target_bpw``)."""
    if not raw:
        raise ReleaseError(f"{c.spec_name}: 'variants' must list at least one variant")
    if not isinstance(raw, list):
        raise c.error("variants", f"must be a list of variant names or {{name, target_size}} tables, got {raw!r}")
    names: list[str] = []
    targets: dict[str, tuple[str, str]] = {}
    for i, v in enumerate(raw):
        key = f"variants[{i}]"
        if isinstance(v, dict):
            c.unknown(v, TARGET_KEYS, key + ".")
            label = c.string(v, "name", key + ".", required=True)
            budgets = [k for k in ("target_size", "target_bpw") if k in v]
            if len(budgets) != 1:
                raise c.error(key, "needs exactly one of 'target_size' (e.g. \"5.37GB\") and 'target_bpw'")
            value = v[budgets[0]]
            if not isinstance(value, (str, int, float)) or isinstance(value, bool):
                raise c.error(f"{key}.{budgets[0]}", f"must be a size or a number, got {value!r}")
            try:
                mix_variant(label)  # type: ignore[arg-type]
                size_budget(str(value)) if budgets[0] == "target_size" else bpw_budget(str(value))
            except PlanError as e:
                raise c.error(key, str(e)) from None
            name = str(label)
            targets[name] = (budgets[0], str(value))
        elif isinstance(v, str) and v.strip():
            try:
                name = resolve_variant(v).name
            except PlanError as e:
                raise c.error("variants", str(e)) from None
        else:
            raise c.error(key, f"must be a variant name or a table with 'name' and 'target_size', got {v!r}")
        if name in names:
            raise c.error("variants", f"lists {name} twice")
        names.append(name)
    return tuple(names), targets


def _parse_imatrix(c: _Checker, raw: Mapping[str, Any]) -> tuple[str, ...]:
    """``imatrix = "FILE"`` or ``imatrix = ["A", "B"]`` (merged), paths relative to the spec."""
    value = raw.get("imatrix")
    if value is None:
        return ()
    if not isinstance(value, (str, list)):
        raise c.error("imatrix", f"must be a file name or a list of file names, got {value!r}")
    files = (c.string(raw, "imatrix"),) if isinstance(value, str) else c.strings(raw, "imatrix")
    if not files:
        raise c.error("imatrix", "must name at least one importance-matrix file")
    if len(set(files)) != len(files):
        raise c.error("imatrix", "lists a file twice")
    return tuple(files)  # type: ignore[arg-type]  (relative to the spec file, or absolute: hashed, recorded by name)


def _parse_card(c: _Checker, raw: Any) -> CardSpec:
    if raw is None:
        raise ReleaseError(f"{c.spec_name}: missing required table [card] (at least card.license)")
    if not isinstance(raw, dict):
        raise c.error("card", "must be a table ([card])")
    c.unknown(raw, CARD_KEYS, "card.")
    license_ = c.string(raw, "license", "card.", required=True)
    tags = c.strings(raw, "tags", "card.")
    return CardSpec(
        license=license_,  # type: ignore[arg-type]
        license_name=c.string(raw, "license_name", "card."),
        license_link=c.string(raw, "license_link", "card."),
        quantized_by=c.string(raw, "quantized_by", "card."),
        pipeline_tag=c.string(raw, "pipeline_tag", "card.") or DEFAULT_PIPELINE_TAG,
        tags=DEFAULT_TAGS if tags is None else tags,
        title=c.string(raw, "title", "card."),
        description=c.string(raw, "description", "card."),
    )


def _check_files(c: _Checker, spec: ReleaseSpec) -> None:
    """Every named input exists, extra files do not collide with generated files."""
    src = spec.source_path
    if not spec.source.startswith("hf://") and not src.exists():  # an hf:// source is checked when opened
        raise c.error("source", f"names {spec.source!r}, which does not exist (looked for {src})")
    reserved = {MANIFEST_NAME, CHECKSUMS_NAME, MODEL_CARD_NAME, VALIDATION_NAME} | {spec.gguf_name(v) for v in spec.variants}
    for key, ext in spec.extensions.items():
        for out_name in ext.output_names(spec.name) if ext.output_names else ():
            if len(out_name.encode("utf-8")) > 255:  # found before converting, not when the file is written
                raise c.error(key, f"entries would write {out_name[:60]!r}..., a file name of "
                                   f"{len(out_name.encode('utf-8'))} bytes; file names hold 255")
            reserved.add(out_name)
    seen: set[str] = set()
    # Compared by name_key: on macOS/Windows file systems README.md and readme.md are one file, and
    # fullwidth or ligature look-alikes would be two files a reader cannot tell apart.
    reserved_folded = {name_key(r): r for r in reserved}
    seen_folded: dict[str, str] = {}
    for rel in spec.extra_files:
        path = spec.base_dir / rel
        if not path.is_file():
            raise c.error("extra_files", f"names {rel!r}, which is not an existing file (looked for {path})")
        name = path.name
        key = name_key(name)
        if key in reserved_folded:
            mine = reserved_folded[key]
            same = f"{name!r}" if mine == name else f"{name!r} (the same as {mine!r} {_same_where(name, mine)})"
            raise c.error("extra_files", f"names {rel!r}, whose file name {same} the release itself writes")
        if key in seen_folded:
            other = seen_folded[key]
            raise c.error("extra_files", f"lists two files named {name!r}" if other == name else
                          f"lists {other!r} and {name!r}, which are one file {_same_where(name, other)}")
        seen.add(name)
        seen_folded[key] = name
    for rel in spec.imatrix:
        if not (spec.base_dir / rel).is_file():
            raise c.error("imatrix", f"names {rel!r}, which is not an existing file (looked for {spec.base_dir / rel})")
    if spec.sensitivity_path is not None and not spec.sensitivity_path.is_file():
        raise c.error("sensitivity", f"names {spec.sensitivity!r}, which is not an existing file "
                                     f"(looked for {spec.sensitivity_path})")
    if spec.validation is not None and not (spec.base_dir / spec.validation).is_file():
        raise c.error("validation", f"names {spec.validation!r}, which is not an existing file")
    link = spec.card.license_link
    if link is not None and "://" not in link and link not in seen:
        raise c.error("card.license_link", f"is the relative link {link!r}, but 'extra_files' ships no file of that name")


def parse_release_spec(path: str | Path) -> ReleaseSpec:
    """Read and check ``SPEC.toml``; raises :class:`ReleaseError` naming the file and key at fault."""
    spec_path = Path(path)
    c = _Checker(str(spec_path))
    try:
        raw = tomllib.loads(spec_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ReleaseError(f"{spec_path}: release spec not found") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ReleaseError(f"{spec_path}: cannot read the release spec: {e}") from None
    except tomllib.TOMLDecodeError as e:
        raise ReleaseError(f"{spec_path}: not valid TOML: {e}") from None
    c.unknown(raw, TOP_KEYS + EXTENSION_KEYS)
    overrides = c.strings(raw, "overrides") or ()
    if len(overrides) > MAX_OVERRIDES:  # counted before any pattern is compiled
        raise c.error("overrides", f"has {len(overrides):,} entries; at most {MAX_OVERRIDES} are allowed")
    for o in overrides:
        try:
            parse_override(o)
        except PlanError as e:
            raise c.error("overrides", str(e)) from None
    name = _check_name(c, c.string(raw, "name", required=True))  # type: ignore[arg-type]
    source = c.string(raw, "source", required=True)  # relative to the spec file, absolute, or hf://OWNER/REPO...
    base_model = c.string(raw, "base_model", required=True)
    variants, targets = _parse_variants(c, raw.get("variants"))
    sensitivity = c.string(raw, "sensitivity")
    if sensitivity is not None:
        _check_path(c, "sensitivity", sensitivity)
    if targets and sensitivity is None:
        raise c.error("sensitivity", f"is required by the size-targeted variant {next(iter(targets))}: name the file "
                                     "flux-gguf sensitivity wrote")
    if sensitivity is not None and not targets:
        raise c.error("sensitivity", "is set but no variant has a target_size or target_bpw")
    extra_files = tuple(_check_path(c, "extra_files", f) for f in c.strings(raw, "extra_files") or ())
    imatrix = _parse_imatrix(c, raw)
    validation = c.string(raw, "validation")
    if validation is not None:
        _check_relative(c, "validation", validation)
    extensions: dict[str, SpecExtension] = {}
    for key in EXTENSION_KEYS:
        if key in raw:
            hook = _HOOKS.get(key)
            if hook is None:
                raise c.error(key, "entries need the module that handles them, which this flux-gguf does not have")
            extensions[key] = hook(raw[key], spec_path.parent, str(spec_path))
    spec = ReleaseSpec(
        spec_path=spec_path, name=name, source=source, base_model=base_model,  # type: ignore[arg-type]
        variants=variants, card=_parse_card(c, raw.get("card")), overrides=overrides,
        extra_files=extra_files, validation=validation, extensions=extensions, imatrix=imatrix,
        targets=targets, sensitivity=sensitivity,
    )
    _check_files(c, spec)
    return spec
