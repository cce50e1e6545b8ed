"""Exceptions raised by quant_kernels. Each carries the fields a caller needs."""
from __future__ import annotations


class QuantError(ValueError):
    """Base class: bad input to a quantizer or dequantizer."""


class UnsupportedTypeError(QuantError):
    def __init__(self, qtype: object, supported: list[str]):
        self.qtype = qtype
        self.supported = supported
        super().__init__(f"unsupported quantization type {qtype!r}; expected one of {', '.join(supported)}")


class ShapeError(QuantError):
    pass


class BlockSizeError(ShapeError):
    def __init__(self, qtype: str, block_size: int, row_length: int):
        self.qtype = qtype
        self.block_size = block_size
        self.row_length = row_length
        super().__init__(
            f"{qtype} needs rows that are a multiple of its block size {block_size}, "
            f"got rows of length {row_length}"
        )


class NonFiniteError(QuantError):
    def __init__(self, count: int, first_index: tuple[int, int], value: float):
        self.count = count
        self.first_index = first_index
        self.value = value
        super().__init__(
            f"input holds {count} non-finite value{'s' if count != 1 else ''} (NaN or inf); "
            f"first at row {first_index[0]}, column {first_index[1]} ({value})"
        )


class OverflowValueError(QuantError):
    """A finite input value the output type cannot hold (it would be written as inf)."""

    def __init__(self, qtype: str, value: float, where: tuple[int, int], limit: float | None, what: str):
        self.qtype = qtype
        self.value = value
        self.where = where
        self.limit = limit
        bound = f" (largest magnitude {qtype} can hold: {limit:g})" if limit is not None else ""
        super().__init__(
            f"value {value:g} at row {where[0]}, column {where[1]} overflows {qtype}: {what}{bound}; "
            "refused rather than written as inf"
        )
