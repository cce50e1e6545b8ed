"""How far each stored tensor is from its source: relative RMSE, max abs error, cosine.

Sums run in float64 over row chunks, so a 66-million-weight tensor never needs a float64 copy
of itself and the figures do not depend on the chunk size beyond rounding. Summaries group the
per-tensor figures by storage type (what a recipe chose) and by block (where error piles up).
"""
from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from converter.errors import ValidationError

_CHUNK_ELEMENTS = 1 << 22  # ~32 MB of float64 per chunk
_BLOCK = re.compile(r"^(double_blocks|single_blocks)\.(\d+)\.")


@dataclass(frozen=True)
class TensorError:
    """One tensor's error. rel_rmse = ||approx - ref|| / ||ref||; cosine of the flattened pair.

    An all-zero reference gives rel_rmse 0 when the copy is zero too and inf otherwise.
    """

    name: str
    qtype: str
    shape: tuple[int, ...]
    rel_rmse: float
    max_abs: float
    cosine: float
    ref_rms: float  # sqrt(mean(ref^2)): lets summaries pool groups exactly
    err_rms: float  # sqrt(mean((approx - ref)^2))

    @property
    def params(self) -> int:
        return math.prod(self.shape)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["shape"] = list(self.shape)
        return {k: json_float(v) if isinstance(v, float) else v for k, v in d.items()}


@dataclass(frozen=True)
class ErrorSummary:
    """Error over a group of tensors. rel_rmse pools every weight of the group."""

    tensors: int
    params: int
    rel_rmse: float  # sqrt(sum of squared errors / sum of squared references) over the group
    worst_rel_rmse: float
    worst_tensor: str
    max_abs: float
    min_cosine: float

    def to_dict(self) -> dict[str, Any]:
        return {k: json_float(v) if isinstance(v, float) else v for k, v in asdict(self).items()}


def json_float(x: float) -> float | None:
    """JSON has no inf or NaN: they are written as null."""
    return float(x) if math.isfinite(x) else None


def _sums(reference: np.ndarray, approx: np.ndarray) -> tuple[float, float, float, float, float]:
    """(sum r^2, sum a^2, sum r*a, sum (a-r)^2, max |a-r|) in float64, chunk by chunk."""
    r = reference.reshape(-1)
    a = approx.reshape(-1)
    rr = aa = ra = dd = 0.0
    mx = 0.0
    for start in range(0, r.size, _CHUNK_ELEMENTS):
        rc = r[start : start + _CHUNK_ELEMENTS].astype(np.float64)
        ac = a[start : start + _CHUNK_ELEMENTS].astype(np.float64)
        d = ac - rc
        rr += float(rc @ rc)
        aa += float(ac @ ac)
        ra += float(rc @ ac)
        dd += float(d @ d)
        if d.size:
            mx = max(mx, float(np.abs(d).max()))
    return rr, aa, ra, dd, mx


def _ratio(num: float, den: float) -> float:
    if den > 0.0:
        return num / den
    return 0.0 if num == 0.0 else math.inf


def _cosine(rr: float, aa: float, ra: float) -> float:
    if rr == 0.0 and aa == 0.0:
        return 1.0
    if rr == 0.0 or aa == 0.0:
        return 0.0
    return max(-1.0, min(1.0, ra / math.sqrt(rr * aa)))


def tensor_error(name: str, qtype: str, reference: np.ndarray, approx: np.ndarray) -> TensorError:
    """Compare ``approx`` (the decoded stored tensor) with ``reference`` (the source)."""
    if reference.shape != approx.shape:
        raise ValidationError(
            f"tensor {name}: stored shape {tuple(approx.shape)} does not match the source's {tuple(reference.shape)}"
        )
    for what, arr in (("source", reference), ("stored", approx)):
        if not np.isfinite(arr).all():
            raise ValidationError(f"tensor {name}: the {what} values hold NaN or inf")
    rr, aa, ra, dd, mx = _sums(reference, approx)
    size = max(reference.size, 1)
    return TensorError(
        name=name,
        qtype=qtype,
        shape=tuple(int(s) for s in reference.shape),
        rel_rmse=math.sqrt(_ratio(dd, rr)),
        max_abs=mx,
        cosine=_cosine(rr, aa, ra),
        ref_rms=math.sqrt(rr / size),
        err_rms=math.sqrt(dd / size),
    )


def block_of(name: str) -> str:
    """The block a tensor belongs to: ``double_blocks.3``, ``single_blocks.12`` or ``other``."""
    m = _BLOCK.match(name)
    return f"{m.group(1)}.{m.group(2)}" if m else "other"


def _block_order(key: str) -> tuple[int, int]:
    m = re.fullmatch(r"(double_blocks|single_blocks)\.(\d+)", key)
    if not m:
        return (2, 0)
    return (0 if m.group(1) == "double_blocks" else 1, int(m.group(2)))


def summarize(errors: Iterable[TensorError], key: Callable[[TensorError], str]) -> dict[str, ErrorSummary]:
    """Group ``errors`` by ``key`` and pool each group (see ErrorSummary)."""
    groups: dict[str, list[TensorError]] = {}
    for e in errors:
        groups.setdefault(key(e), []).append(e)
    out: dict[str, ErrorSummary] = {}
    for k, members in groups.items():
        params = sum(e.params for e in members)
        err_sq = sum(e.err_rms**2 * e.params for e in members)
        ref_sq = sum(e.ref_rms**2 * e.params for e in members)
        worst = max(members, key=lambda e: e.rel_rmse)
        out[k] = ErrorSummary(
            tensors=len(members),
            params=params,
            rel_rmse=math.sqrt(_ratio(err_sq, ref_sq)),
            worst_rel_rmse=worst.rel_rmse,
            worst_tensor=worst.name,
            max_abs=max(e.max_abs for e in members),
            min_cosine=min(e.cosine for e in members),
        )
    return out


def summarize_by_type(errors: Iterable[TensorError]) -> dict[str, ErrorSummary]:
    return dict(sorted(summarize(errors, lambda e: e.qtype).items()))


def summarize_by_block(errors: Iterable[TensorError]) -> dict[str, ErrorSummary]:
    return dict(sorted(summarize(errors, lambda e: block_of(e.name)).items(), key=lambda kv: _block_order(kv[0])))
