"""Variants and plans: which GGML type every tensor gets, and exactly how big each file will be.

The rules follow the recipe the published FLUX GGUF files share (ComfyUI-GGUF's patched
``llama-quantize`` and stable-diffusion.cpp; see docs/flux-gguf.md "The recipes"):

* 1-D tensors are F32 (loaders require it);
* ``img_in.weight`` is F32, always: diffusers infers the model variant from its stored width and
  mistakes a BF16 ``img_in`` for FLUX Depth (diffusers issue 11839);
* tensors named ``img_in.`` ``txt_in.`` ``time_in.`` ``vector_in.`` ``guidance_in.`` ``final_layer.``
  keep the source precision: BF16, F16 and F32 as they are, FP8 (E4M3 / E5M2) as BF16: BF16 holds
  every FP8 value exactly, is what the original checkpoint and the published files use, and
  diffusers and ComfyUI-GGUF both read it;
* ``_M`` variants raise ``double_blocks.N.{img,txt}_attn.qkv.weight`` one step (llama.cpp's
  ATTENTION_QKV rule); everything else gets the variant's base type;
* a type whose block does not divide the row length falls back to F16 (as llama-quantize's last
  resort does); the plan lists these fallbacks.

Q3_K_L: in llama.cpp's ``llama_tensor_get_type`` Q3_K_L differs from Q3_K_M only on tensors
categorised as attn_v, ffn_down and attn_output (raised to Q5_K) and, like Q3_K_M, raises attn_qkv
to Q4_K. FLUX has no tensor in the first three categories (its attention is fused qkv, its MLPs
are ``mlp.0/2`` and ``linear1/2``), so on FLUX a Q3_K_L file holds exactly the tensor types of
Q3_K_M; only ``general.file_type`` differs (13 vs 12). We keep that faithful behaviour rather
than invent a FLUX mapping no published file follows; this is why the published tables list no
Q3_K_L.

Overrides (``REGEX=TYPE``, first match wins, ``re.search`` on the BFL name) apply to 2-D tensors
only (1-D tensors stay F32 whatever the user asks); unlike the recipe, an override never falls
back: a type that does not fit the row is an error naming the tensor.
"""
from __future__ import annotations

import decimal
import errno
import functools
import json
import math
import pathlib
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, Protocol, Sequence

from gguf import GGUFValueType

from manifests.paths import name_problem

from quant_kernels import resolve, supported_type_names
from quant_kernels.errors import UnsupportedTypeError

from . import __version__
from .errors import PlanError, SensitivityError
from .layout import FluxGeometry, bfl_tensor_shapes, is_kept_unquantized
from .writer import KV, TensorSlot, encode_header, gguf_file_size

SOURCE_DTYPES = ("BF16", "F16", "F32", "F8_E4M3", "F8_E5M2")
FLOAT_TYPES = ("F32", "F16", "BF16")
QKV_PATTERN = re.compile(r"^double_blocks\.\d+\.(img|txt)_attn\.qkv\.weight$")
FALLBACK_TYPE = "F16"
ALWAYS_F32 = ("img_in.weight",)
QUANTIZATION_VERSION = 2


@dataclass(frozen=True)
class Variant:
    """A named recipe: the base type for quantized tensors, the raised qkv type, llama's ftype."""

    name: str
    base_type: str
    file_type: int
    qkv_type: str | None = None


VARIANTS: dict[str, Variant] = {
    v.name: v
    for v in (
        Variant("Q2_K", "Q2_K", 10),
        Variant("Q3_K_S", "Q3_K", 11),
        Variant("Q3_K_M", "Q3_K", 12, "Q4_K"),
        Variant("Q3_K_L", "Q3_K", 13, "Q4_K"),
        Variant("Q4_K_S", "Q4_K", 14),
        Variant("Q4_K_M", "Q4_K", 15, "Q5_K"),
        Variant("Q5_K_S", "Q5_K", 16),
        Variant("Q5_K_M", "Q5_K", 17, "Q6_K"),
        Variant("Q6_K", "Q6_K", 18),
        Variant("Q8_0", "Q8_0", 7),
        Variant("F16", "F16", 1),
        Variant("BF16", "BF16", 32),
    )
}


def resolve_variant(name: str | Variant) -> Variant:
    """Case-insensitive lookup; an unknown name lists the valid ones."""
    if isinstance(name, Variant):
        return name
    v = VARIANTS.get(name.strip().upper())
    if v is None:
        raise PlanError(f"unknown variant {name!r}; valid variants: {', '.join(VARIANTS)}")
    return v


@dataclass(frozen=True)
class Override:
    """``--override REGEX=TYPE``: tensors whose BFL name matches REGEX (re.search) get TYPE."""

    pattern: str
    qtype: str
    # Compiled once: planning tries every override on every tensor, and a lookup in
    # compile_override's bounded cache recompiles each pattern once there are more than it holds.
    _search: Callable[[str], object] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_search", compile_override(self.pattern))

    @property
    def text(self) -> str:
        return f"{self.pattern}={self.qtype}"

    def matches(self, name: str) -> bool:
        return self._search(name) is not None


# Override regexes come from the command line or a release spec: a pattern like '(a+)+$' takes
# exponential time in Python's backtracking ``re``. RE2 (google-re2) matches in linear time, so
# no pattern can hang a conversion; its repeat counts are capped at 1000 and patterns at
# MAX_OVERRIDE_PATTERN characters. Without google-re2 installed, ``re`` is used (length-limited only).
MAX_OVERRIDE_PATTERN = 1000
# Planning tries the overrides on each tensor in order (first match wins, so they cannot be merged
# into one lookup): the work grows with overrides x tensors. 512 is one override per 2-D tensor of a
# full FLUX.1 model (313) with room to spare, and plans in about a second at worst on 2 cores;
# tens of thousands would take minutes before any weight is read.
MAX_OVERRIDES = 512
try:
    import re2 as _re2
except ImportError:  # pragma: no cover - google-re2 is a dependency
    _re2 = None


# RE2's errors for the Python syntax it lacks: a backreference (\1, (?P=name)) or lookaround.
_RE2_LACKS = re.compile(r"invalid escape sequence: \\[1-9]|invalid perl operator: \(\?(=|!|<=|<!|P=|P$)")


@functools.lru_cache(maxsize=256)
def compile_override(pattern: str) -> Callable[[str], object]:
    """The ``search`` function of ``pattern`` (RE2 when available); raises ValueError when it does not compile."""
    if len(pattern) > MAX_OVERRIDE_PATTERN:
        raise ValueError(f"the regular expression is {len(pattern)} characters long; at most "
                         f"{MAX_OVERRIDE_PATTERN} are allowed")
    if _re2 is not None:
        options = _re2.Options()
        options.log_errors = False  # RE2 would otherwise log parse errors to stderr itself
        try:
            return _re2.compile(pattern, options).search
        except _re2.error as e:
            msg = e.args[0] if e.args else e
            text = msg.decode("utf-8", "replace") if isinstance(msg, bytes) else str(msg)
            if _RE2_LACKS.search(text):  # Python syntax RE2 does not have: say so, not just "invalid"
                text += (" (backreferences such as \\1 and lookaround such as (?=...) are not supported: "
                         "patterns are matched by RE2, in linear time)")
            raise ValueError(text) from None
        except (TypeError, UnicodeError) as e:
            raise ValueError(str(e)) from None
    try:
        return re.compile(pattern).search
    except (re.error, OverflowError, RecursionError) as e:
        raise ValueError(str(e)) from None


def parse_overrides(texts: Iterable[str | Override], *, option: str = "") -> tuple[Override, ...]:
    """:func:`parse_override` on each, after checking there are at most :data:`MAX_OVERRIDES` of them
    (counted before any is compiled). ``option``: how the user gave them (``--override``), for the error."""
    items = tuple(texts)
    if len(items) > MAX_OVERRIDES:
        given = f"{option} given {len(items):,} times" if option else f"{len(items):,} overrides given"
        raise PlanError(f"{given}; at most {MAX_OVERRIDES} overrides are allowed")
    return tuple(parse_override(t) for t in items)


def parse_override(text: str | Override) -> Override:
    """Validate ``REGEX=TYPE``: the regex must compile, the type must be one we can write."""
    if isinstance(text, Override):
        text = text.text
    pattern, sep, qtype = text.rpartition("=")
    if not sep or not pattern or not qtype.strip():
        raise PlanError(f"override '{text}' must look like REGEX=TYPE (for example 'txt_attn\\.qkv=Q8_0')")
    try:
        compile_override(pattern)
    except ValueError as e:
        shown = text if len(text) <= 80 else text[:60] + "..." + text[-15:]
        raise PlanError(f"override '{shown}': bad regular expression: {e}") from None
    try:
        spec = resolve(qtype)
    except UnsupportedTypeError:
        raise PlanError(
            f"override '{text}': unknown type {qtype.strip()!r}; valid types: {', '.join(supported_type_names())}"
        ) from None
    return Override(pattern, spec.name)


class TensorLike(Protocol):
    shape: tuple[int, ...]
    dtype: str


@dataclass(frozen=True)
class LayoutTensor:
    """A tensor known only by shape and dtype (dry runs from the layout, no weights read)."""

    shape: tuple[int, ...]
    dtype: str


def layout_tensors(geometry: FluxGeometry = FluxGeometry(), dtype: str = "BF16") -> dict[str, LayoutTensor]:
    """The full inventory of a FLUX checkpoint of this geometry, as a plan's input."""
    return {name: LayoutTensor(shape, dtype) for name, shape in bfl_tensor_shapes(geometry).items()}


@dataclass(frozen=True)
class SourceRef:
    """A source file as recorded in ``flux_gguf.source``: its name (never an absolute path)."""

    file: str
    size: int
    sha256: str | None = None

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"file": self.file, "size": self.size}
        if self.sha256:
            d["sha256"] = self.sha256
        return d


@dataclass(frozen=True)
class PlanEntry:
    """One tensor of the output file. ``rule`` says why it got its type:
    "1-D", "img_in", "kept", "quantized", "raised" (the _M qkv bump), "fallback", "override",
    "target" (chosen by the --target-size allocator)."""

    name: str
    shape: tuple[int, ...]
    source_dtype: str
    qtype: str
    nbytes: int
    rule: str

    @property
    def n_params(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    @property
    def targeted(self) -> bool:
        """True for tensors the recipe (or an override) quantizes, as opposed to those it keeps."""
        return self.rule in ("quantized", "raised", "fallback", "override", "target")

    def slot(self) -> TensorSlot:
        return TensorSlot(self.name, self.shape, self.qtype, self.nbytes)


@dataclass(frozen=True)
class Plan:
    """Everything about one output file, computed before any weight is read."""

    variant: Variant
    name: str
    family: str
    entries: tuple[PlanEntry, ...]
    overrides: tuple[Override, ...]
    kv: tuple[KV, ...]
    header_nbytes: int

    @property
    def file_name(self) -> str:
        return f"{self.name}-{self.variant.name}.gguf"

    @property
    def file_type(self) -> int:
        return self.variant.file_type

    @property
    def slots(self) -> list[TensorSlot]:
        return [e.slot() for e in self.entries]

    @property
    def file_size(self) -> int:
        """Exact size in bytes: header, KV, tensor infos, tensor data and alignment padding."""
        return gguf_file_size(self.header_nbytes, self.slots)

    @property
    def n_params(self) -> int:
        return sum(e.n_params for e in self.entries)

    @property
    def tensor_nbytes(self) -> int:
        return sum(e.nbytes for e in self.entries)

    @property
    def bits_per_weight(self) -> float:
        """Over every tensor: tensor bytes * 8 / parameters (header and padding excluded)."""
        return self.tensor_nbytes * 8 / max(self.n_params, 1)

    @property
    def bits_per_weight_quantized(self) -> float:
        """Over the tensors the recipe quantizes (1-D and kept tensors excluded)."""
        t = [e for e in self.entries if e.targeted]
        return sum(e.nbytes for e in t) * 8 / max(sum(e.n_params for e in t), 1)

    @property
    def type_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for e in self.entries:
            counts[e.qtype] = counts.get(e.qtype, 0) + 1
        return dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))

    @property
    def fallbacks(self) -> tuple[str, ...]:
        return tuple(e.name for e in self.entries if e.rule == "fallback")

    def to_dict(self) -> dict[str, Any]:
        return {
            "file": self.file_name,
            "variant": self.variant.name,
            "file_type": self.file_type,
            "size": self.file_size,
            "n_params": self.n_params,
            "bits_per_weight": round(self.bits_per_weight, 4),
            "bits_per_weight_quantized": round(self.bits_per_weight_quantized, 4),
            "types": self.type_counts,
            "fallbacks": list(self.fallbacks),
            "overrides": [o.text for o in self.overrides],
            "tensors": [
                {"name": e.name, "shape": list(e.shape), "source_dtype": e.source_dtype,
                 "type": e.qtype, "nbytes": e.nbytes, "rule": e.rule}
                for e in self.entries
            ],
        }


def kept_type(source_dtype: str) -> str:
    """The storage type for a tensor kept in source precision (FP8 widens to BF16, exactly)."""
    return source_dtype if source_dtype in FLOAT_TYPES else "BF16"


def tensor_nbytes(qtype: str, shape: tuple[int, ...]) -> int:
    spec = resolve(qtype)
    rows = 1
    for s in shape[:-1]:
        rows *= s
    return rows * spec.row_nbytes(shape[-1])


def _fits(qtype: str, shape: tuple[int, ...]) -> bool:
    return shape[-1] % resolve(qtype).block_size == 0


def choose_type(name: str, shape: tuple[int, ...], source_dtype: str, variant: Variant,
                overrides: Sequence[Override] = (), chosen: str | None = None) -> tuple[str, str]:
    """(GGML type, rule) for one tensor under a variant; see the module docstring for the rules.

    ``chosen``: the type a size-targeted mix picked for this tensor; it replaces the variant's
    type only where the recipe would quantize (the fixed rules above it still apply)."""
    if len(shape) <= 1:
        return "F32", "1-D"
    if name in ALWAYS_F32:  # before overrides: diffusers detects the model from it (issue 11839)
        return "F32", "img_in"
    for o in overrides:
        if o.matches(name):
            if not _fits(o.qtype, shape):
                raise PlanError(
                    f"override '{o.text}' puts {o.qtype} on {name}, whose rows of {shape[-1]} values are not "
                    f"a multiple of {o.qtype}'s block size {resolve(o.qtype).block_size}"
                )
            return o.qtype, "override"
    if is_kept_unquantized(name):
        return kept_type(source_dtype), "kept"
    if chosen is not None:
        if not _fits(chosen, shape):
            raise PlanError(f"{chosen} cannot hold {name}: its rows of {shape[-1]} values are not a multiple of "
                            f"the block size {resolve(chosen).block_size}")
        return chosen, "target"
    raised = variant.qkv_type is not None and QKV_PATTERN.match(name) is not None
    qtype = variant.qkv_type if raised and variant.qkv_type else variant.base_type
    if not _fits(qtype, shape):
        return FALLBACK_TYPE, "fallback"
    return qtype, "raised" if raised else "quantized"


def flux_metadata(variant: Variant, name: str, family: str, overrides: Sequence[Override],
                  sources: Sequence[SourceRef], extra: Mapping[str, str] | None = None) -> tuple[KV, ...]:
    """The KV entries every file carries, in the order they are written (no timestamps).

    ``extra``: further ``flux_gguf.*`` string entries (e.g. ``flux_gguf.loras`` for merged LoRAs)."""
    s, u32 = GGUFValueType.STRING, GGUFValueType.UINT32
    own = (
        KV("general.architecture", "flux", s),
        KV("general.name", name, s),
        KV("general.quantization_version", QUANTIZATION_VERSION, u32),
        KV("general.file_type", variant.file_type, u32),
        KV("flux_gguf.tool_version", __version__, s),
        KV("flux_gguf.recipe", variant.name, s),
        KV("flux_gguf.overrides", json.dumps([o.text for o in overrides]), s),
        KV("flux_gguf.source", json.dumps([r.to_dict() for r in sources], sort_keys=True), s),
        KV("flux_gguf.model_family", family, s),
    )
    for key in extra or {}:
        if not key.startswith("flux_gguf.") or any(key == kv.key for kv in own):
            raise PlanError(f"extra metadata key {key!r} must be a new flux_gguf.* key")
    return own + tuple(KV(k, v, s) for k, v in sorted((extra or {}).items()))


def make_plan(
    variant: str | Variant,
    tensors: Mapping[str, TensorLike],
    *,
    name: str,
    family: str,
    overrides: Iterable[str | Override] = (),
    sources: Sequence[SourceRef] = (),
    extra_metadata: Mapping[str, str] | None = None,
    types: Mapping[str, str] | None = None,
) -> Plan:
    """Plan one output file for ``tensors`` (BFL names in output order, with shape and dtype).

    ``types``: a size-targeted mix's type per quantized tensor (see choose_type's ``chosen``)."""
    v = resolve_variant(variant)
    ovr = parse_overrides(overrides)
    _check_name(name)
    return _make_plan(v, tensors, name, family, ovr, _first_matches(ovr, tensors), sources, extra_metadata, types)


def _first_matches(ovr: Sequence[Override], tensors: Mapping[str, TensorLike]) -> dict[str, Override]:
    """For each 2-D tensor (``img_in.weight`` aside) that an override matches, the first that does,
    after checking that every override matches one: the pass over overrides x tensors that planning
    makes once, for all variants."""
    eligible = [n for n, t in tensors.items() if len(t.shape) > 1 and n not in ALWAYS_F32]
    first = {}
    for n in eligible:
        hit = next((o for o in ovr if o.matches(n)), None)
        if hit is not None:
            first[n] = hit
    used = set(first.values())
    for o in ovr:
        if o not in used and not any(o.matches(n) for n in eligible):
            if any(o.matches(n) for n in ALWAYS_F32):
                raise PlanError(f"override '{o.text}' matches only {', '.join(ALWAYS_F32)}, which stays F32 "
                                "so diffusers detects the model correctly")
            raise PlanError(f"override '{o.text}' matches no 2-D tensor")
    return first


def _make_plan(v: Variant, tensors: Mapping[str, TensorLike], name: str, family: str, ovr: tuple[Override, ...],
               first: Mapping[str, Override], sources: Sequence[SourceRef],
               extra_metadata: Mapping[str, str] | None, types: Mapping[str, str] | None = None) -> Plan:
    entries = []
    for tname, t in tensors.items():
        shape = tuple(int(s) for s in t.shape)
        if t.dtype not in SOURCE_DTYPES:
            raise PlanError(f"tensor {tname} has dtype {t.dtype}; expected one of {', '.join(SOURCE_DTYPES)}")
        if not shape:
            raise PlanError(f"tensor {tname} is a scalar; expected a 1-D or 2-D tensor")
        hit = first.get(tname)
        qtype, rule = choose_type(tname, shape, t.dtype, v, (hit,) if hit is not None else (), (types or {}).get(tname))
        entries.append(PlanEntry(tname, shape, t.dtype, qtype, tensor_nbytes(qtype, shape), rule))
    kv = flux_metadata(v, name, family, ovr, sources, extra_metadata)
    header = encode_header(kv, [e.slot() for e in entries])
    return Plan(v, name, family, tuple(entries), ovr, kv, len(header))


def make_plans(
    variants: Iterable[str | Variant],
    tensors: Mapping[str, TensorLike],
    *,
    name: str,
    family: str,
    overrides: Iterable[str | Override] = (),
    sources: Sequence[SourceRef] = (),
    extra_metadata: Mapping[str, str] | None = None,
) -> list[Plan]:
    """One plan per distinct variant, in the order given (duplicates dropped)."""
    seen: dict[str, Variant] = {}
    for v in variants:
        r = resolve_variant(v)
        seen.setdefault(r.name, r)
    if not seen:
        raise PlanError(f"no variant given; valid variants: {', '.join(VARIANTS)}")
    ovr = parse_overrides(overrides)
    _check_name(name)
    first = _first_matches(ovr, tensors)  # which override a tensor gets does not depend on the variant
    return [_make_plan(v, tensors, name, family, ovr, first, sources, extra_metadata) for v in seen.values()]


def _check_name(name: str) -> None:
    if not name or name.strip() != name or any(c in name for c in "/\\\0") or name in (".", ".."):
        raise PlanError(f"output name {name!r} must be a plain file-name stem (no slashes, not empty)")
    problem = name_problem(name)  # the name policy every file name we write follows (manifests.paths)
    if problem is not None:
        raise PlanError(f"output name {name!r} must be a plain file-name stem, but it {problem}")


# =========================================================================== size-targeted mixes
#
# Sensitivity files and the byte-budget allocator behind ``convert --target-size/--target-bpw``.
#
# A sensitivity file (JSON, written by ``flux-gguf sensitivity``, converter.quality.sensitivity)
# holds, for every quantizable tensor and candidate type, the predicted *relative squared output
# error* ``||y_q - y||^2 / ||y||^2`` the transformer's output takes when that tensor alone carries
# its quantization error in that type. Errors of different tensors are treated as additive (small,
# independent perturbations), so a mix's predicted output rel-L2 is ``sqrt(sum of its tensors')``.
#
# The allocator picks one type per quantizable tensor minimising that sum within a byte budget:
#
# 1. per tensor, the candidates that fit its rows (the recipe rules: 1-D, ``img_in`` and the kept
#    in/out layers are fixed and not candidates), reduced to their lower convex hull in
#    (bytes, error);
# 2. from the all-cheapest mix, hull steps are taken in order of error saved per byte (exactly the
#    Lagrangian solution for every multiplier: a step is taken when its slope beats lambda); a step
#    that no longer fits is skipped together with the later steps of its tensor, smaller steps of
#    other tensors are still taken (greedy top-up along the hull);
# 3. a last top-up tries every (tensor, type) swap that lowers the error and still fits, best
#    first, until none does (non-hull points can fill the last bytes).
#
# Ties break by tensor name and type order, so the choice is deterministic for a given source,
# sensitivity file and budget.

SENSITIVITY_FORMAT = "flux-gguf-sensitivity"
SENSITIVITY_VERSION = 1
# Candidate quantized types, cheapest first; the source precision (kept_type) is added per tensor.
CANDIDATE_TYPES = ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q8_0")
MAX_SENSITIVITY_BYTES = 64 << 20  # a real file is ~100 KB for the full model; refuse absurd ones unread
# general.file_type of a mix: llama.cpp's "mostly X" ftype of the type holding most parameters.
MOSTLY_FILE_TYPE = {"Q2_K": 10, "Q3_K": 11, "Q4_K": 14, "Q5_K": 16, "Q6_K": 18, "Q8_0": 7,
                    "F16": 1, "BF16": 32, "F32": 0}
_SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
               "KIB": 1 << 10, "MIB": 1 << 20, "GIB": 1 << 30, "TIB": 1 << 40}


@dataclass(frozen=True)
class Sensitivity:
    """A loaded sensitivity file: ``errors[tensor][type]`` = predicted relative squared output error."""

    errors: Mapping[str, Mapping[str, float]]
    shapes: Mapping[str, tuple[int, ...]]
    document: Mapping[str, Any]
    file: str = ""
    sha256: str = ""

    @property
    def source_sha256(self) -> str | None:
        return (self.document.get("source") or {}).get("sha256")


def read_sensitivity(path: str | pathlib.Path) -> Sensitivity:
    """Load and check a sensitivity file; any problem is one SensitivityError naming the file."""
    import hashlib

    from manifests.hashing import read_regular

    p = pathlib.Path(path)
    try:
        data = read_regular(p, MAX_SENSITIVITY_BYTES)  # regular files only; an oversized one refused unread
    except OSError as e:
        if e.errno == errno.EFBIG:
            raise SensitivityError(f"{p}: larger than {MAX_SENSITIVITY_BYTES} bytes; not a sensitivity file", str(p)) from None
        raise SensitivityError(f"{p}: cannot read the sensitivity file: {e.strerror or e}", str(p)) from None
    try:
        doc = json.loads(data)
    except (ValueError, UnicodeDecodeError) as e:
        raise SensitivityError(f"{p}: not JSON ({e}); expected a flux-gguf sensitivity file", str(p)) from None
    return parse_sensitivity(doc, str(p), hashlib.sha256(data).hexdigest())


def parse_sensitivity(doc: Any, origin: str = "sensitivity file", sha256: str = "") -> Sensitivity:
    if not isinstance(doc, dict) or doc.get("format") != SENSITIVITY_FORMAT:
        raise SensitivityError(f"{origin}: expected a JSON object with \"format\": \"{SENSITIVITY_FORMAT}\"", origin)
    if doc.get("version") != SENSITIVITY_VERSION:
        raise SensitivityError(f"{origin}: version {doc.get('version')!r}; this flux-gguf reads version {SENSITIVITY_VERSION}",
                               origin)
    tensors = doc.get("tensors")
    if not isinstance(tensors, dict) or not tensors:
        raise SensitivityError(f"{origin}: \"tensors\" must be a non-empty object", origin)
    errors: dict[str, dict[str, float]] = {}
    shapes: dict[str, tuple[int, ...]] = {}
    for name, t in tensors.items():
        pred = t.get("predicted") if isinstance(t, dict) else None
        shape = t.get("shape") if isinstance(t, dict) else None
        if not isinstance(pred, dict) or not pred or not isinstance(shape, list) \
                or not all(isinstance(s, int) and s > 0 for s in shape):
            raise SensitivityError(f"{origin}: tensor {name}: expected \"shape\" (positive integers) and "
                                   "\"predicted\" (type -> error)", origin)
        row = {}
        for qt, v in pred.items():
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                raise SensitivityError(f"{origin}: tensor {name}: predicted error for {qt} must be a finite "
                                       f"number >= 0, got {v!r}", origin)
            row[str(qt)] = float(v)
        errors[name] = row
        shapes[name] = tuple(shape)
    return Sensitivity(errors, shapes, doc, pathlib.Path(origin).name, sha256)


# --------------------------------------------------------------------------- budgets


@dataclass(frozen=True)
class Budget:
    """``--target-size`` (``kind="size"``: whole-file bytes) or ``--target-bpw`` (``kind="bpw"``:
    bits per weight over every tensor, Plan.bits_per_weight)."""

    kind: str
    value: float
    text: str

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "value": self.value, "text": self.text}


def parse_size(text: str) -> int:
    """'5.37GB' (decimal units, as the published tables use), '5GiB', '5370000000': bytes."""
    m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([A-Za-z]*)\s*", str(text))
    unit = m.group(2).upper() if m else ""
    if m is None or unit not in _SIZE_UNITS:
        raise PlanError(f"target size {text!r}: expected a number of bytes with an optional unit "
                        "(B, KB, MB, GB, TB, KiB, MiB, GiB, TiB), e.g. 5.37GB")
    n = int(decimal.Decimal(m.group(1)) * _SIZE_UNITS[unit])  # exact: 4.02GB is 4020000000, not ...999
    if n <= 0:
        raise PlanError(f"target size {text!r} must be positive")
    return n


def size_budget(text: str) -> Budget:
    return Budget("size", float(parse_size(text)), str(text).strip())


def bpw_budget(value: float | str) -> Budget:
    try:
        v = float(value)
    except ValueError:
        raise PlanError(f"target bits per weight {value!r}: expected a number such as 4.5") from None
    if not math.isfinite(v) or v <= 0:
        raise PlanError(f"target bits per weight {value!r} must be a positive number")
    return Budget("bpw", v, f"{v:g}bpw")


# --------------------------------------------------------------------------- the allocator


@dataclass(frozen=True)
class Option:
    qtype: str
    cost: int  # bytes this tensor adds under the budget
    error: float


def _hull(options: Sequence[Option]) -> list[Option]:
    """Lower convex hull of (cost, error), cheapest first; dominated points dropped."""
    pts: list[Option] = []
    for o in sorted(options, key=lambda o: (o.cost, o.error)):
        if pts and o.error >= pts[-1].error:
            continue  # costs more (or the same) and is no better
        while len(pts) >= 2:
            a, b = pts[-2], pts[-1]
            # b lies on or above the segment a -> o: it is never the best for any multiplier
            if (b.error - a.error) * (o.cost - a.cost) >= (o.error - a.error) * (b.cost - a.cost):
                pts.pop()
            else:
                break
        pts.append(o)
    return pts


def allocate(options: Mapping[str, Sequence[Option]], capacity: int) -> dict[str, Option]:
    """One option per tensor, minimising the summed error with summed cost <= capacity.

    ``capacity`` must be at least the all-cheapest cost (the caller checks the range)."""
    names = sorted(options)
    hulls = {n: _hull(options[n]) for n in names}
    chosen = {n: hulls[n][0] for n in names}
    used = sum(o.cost for o in chosen.values())
    steps = []
    for n in names:
        h = hulls[n]
        for i in range(1, len(h)):
            slope = (h[i - 1].error - h[i].error) / max(1, h[i].cost - h[i - 1].cost)
            steps.append((-slope, n, i))
    steps.sort()
    blocked: set[str] = set()
    for _, n, i in steps:
        if n in blocked:
            continue
        prev, nxt = hulls[n][i - 1], hulls[n][i]
        if chosen[n] is not prev:  # an earlier step of this tensor was skipped
            continue
        if used - prev.cost + nxt.cost <= capacity:
            used += nxt.cost - prev.cost
            chosen[n] = nxt
        else:
            blocked.add(n)
    while True:  # top-up: the best single swap that fits, until none does
        best = None
        for n in names:
            cur = chosen[n]
            for o in options[n]:
                gain = cur.error - o.error
                if gain > 0 and used - cur.cost + o.cost <= capacity:
                    key = (-gain, n, o.qtype)
                    if best is None or key < best[0]:
                        best = (key, n, o)
        if best is None:
            return chosen
        _, n, o = best
        used += o.cost - chosen[n].cost
        chosen[n] = o


def mix_variant(label: str, file_type: int = 0) -> Variant:
    _check_name(label)
    if label.upper() in VARIANTS:
        raise PlanError(f"mix name {label!r} is a fixed variant's name; choose another (e.g. Q3_K_A)")
    return Variant(label, "mix", file_type)


def predicted_rel_l2(total_relative_squared_error: float) -> float:
    return math.sqrt(max(0.0, total_relative_squared_error))


def mostly_file_type(params_by_type: Mapping[str, int]) -> int:
    """llama.cpp's ``general.file_type`` for a mix: the 'mostly X' of the type holding most parameters."""
    top = max(sorted(params_by_type), key=lambda t: params_by_type[t])
    return MOSTLY_FILE_TYPE.get(top, 0)


__all__ = [
    "VARIANTS", "Variant", "resolve_variant", "Override", "parse_override", "parse_overrides", "LayoutTensor",
    "layout_tensors",
    "SourceRef", "PlanEntry", "Plan", "choose_type", "kept_type", "tensor_nbytes", "flux_metadata",
    "make_plan", "make_plans", "SENSITIVITY_FORMAT", "SENSITIVITY_VERSION", "CANDIDATE_TYPES", "Sensitivity",
    "read_sensitivity", "parse_sensitivity", "Budget", "parse_size", "size_budget", "bpw_budget", "Option",
    "allocate", "predicted_rel_l2", "mostly_file_type", "mix_variant",
]
