"""The registry of supported types: ggml ids and block sizes come from gguf, never redefined."""
from __future__ import annotations

from dataclasses import dataclass

from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from .errors import UnsupportedTypeError


@dataclass(frozen=True)
class QuantSpec:
    """One storage type: its ggml id, block geometry and the module holding its kernels."""

    qtype: GGMLQuantizationType
    module: str  # quant_kernels.<module> exports quantize_rows / dequantize_rows (+ _imatrix)
    is_kquant: bool = False

    @property
    def name(self) -> str:
        return self.qtype.name

    @property
    def block_size(self) -> int:
        return GGML_QUANT_SIZES[self.qtype][0]

    @property
    def type_size(self) -> int:
        return GGML_QUANT_SIZES[self.qtype][1]

    @property
    def is_float(self) -> bool:
        return self.qtype in (GGMLQuantizationType.F32, GGMLQuantizationType.F16, GGMLQuantizationType.BF16)

    def row_nbytes(self, n: int) -> int:
        return n // self.block_size * self.type_size

    def bits_per_weight(self) -> float:
        return self.type_size * 8 / self.block_size


_Q = GGMLQuantizationType
SPECS: dict[GGMLQuantizationType, QuantSpec] = {
    s.qtype: s
    for s in (
        QuantSpec(_Q.F32, "floats"),
        QuantSpec(_Q.F16, "floats"),
        QuantSpec(_Q.BF16, "floats"),
        QuantSpec(_Q.Q8_0, "q8_0"),
        QuantSpec(_Q.Q2_K, "q2_k", is_kquant=True),
        QuantSpec(_Q.Q3_K, "q3_k", is_kquant=True),
        QuantSpec(_Q.Q4_K, "q4_k", is_kquant=True),
        QuantSpec(_Q.Q5_K, "q5_k", is_kquant=True),
        QuantSpec(_Q.Q6_K, "q6_k", is_kquant=True),
    )
}


def supported_type_names() -> list[str]:
    return [q.name for q in SPECS]


def resolve(qtype: GGMLQuantizationType | str | int) -> QuantSpec:
    """Accept a GGMLQuantizationType, its integer id, or a case-insensitive name like 'q4_k'."""
    try:
        if isinstance(qtype, str):
            key = GGMLQuantizationType[qtype.strip().upper()]
        else:
            key = GGMLQuantizationType(qtype)
    except (KeyError, ValueError):
        raise UnsupportedTypeError(qtype, supported_type_names()) from None
    spec = SPECS.get(key)
    if spec is None:
        raise UnsupportedTypeError(key.name, supported_type_names())
    return spec


def block_geometry(qtype: GGMLQuantizationType) -> tuple[int, int]:
    """(weights per block, bytes per block) from gguf's table, for the kernels' compile-time constants."""
    return GGML_QUANT_SIZES[qtype]
