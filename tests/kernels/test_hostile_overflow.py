"""Finite inputs an output type cannot hold are refused (issue 12), as NaN/inf are: never inf bytes."""
from __future__ import annotations

import numpy as np
import pytest

import quant_kernels as qk
from quant_kernels.api import BF16_OVERFLOW, F16_OVERFLOW
from quant_kernels.errors import OverflowValueError

TYPES = ["F16", "BF16", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"]
# Largest magnitude a block of each type can represent: 65504 (float16 scale) x its code range.
BOUND = {"Q8_0": 65504.0 * 127, "Q2_K": 65504.0 * 45, "Q3_K": 65504.0 * 128, "Q4_K": 65504.0 * 945,
         "Q5_K": 65504.0 * 1953, "Q6_K": 65504.0 * 4064}


def rows(value: float, *, both_signs: bool = False) -> np.ndarray:
    x = np.random.default_rng(1).normal(0, 0.02, size=(3, 512)).astype(np.float32)
    x[2, 300] = value
    if both_signs:
        x[2, 301] = -value
    return x


@pytest.mark.parametrize("qtype", TYPES)
def test_bf16_max_is_refused_by_every_type_but_bf16(qtype):
    """A BF16 weight of 3.4e38 (finite in BF16) overflows everything narrower; BF16 itself holds 3.38e38."""
    x = rows(3.38e38)
    if qtype == "BF16":
        out = qk.quantize(x, qtype)
        assert np.isfinite(qk.dequantize(out, qtype, x.shape)).all()
        return
    with pytest.raises(OverflowValueError) as e:
        qk.quantize(x, qtype)
    assert e.value.qtype == qtype and e.value.where == (2, 300) and e.value.value == pytest.approx(3.38e38)
    assert str(e.value).startswith("value 3.38e+38 at row 2, column 300 overflows ")
    assert str(e.value).endswith("refused rather than written as inf")


def test_float_thresholds_are_exact():
    """F16 rounds |x| >= 65520 to inf (round to nearest even), BF16 |x| >= 0x7F7F8000."""
    below_f16 = np.float32(np.nextafter(np.float32(F16_OVERFLOW), np.float32(0)))
    assert np.isfinite(qk.dequantize(qk.quantize(rows(below_f16), "F16"), "F16", (3, 512))).all()
    with pytest.raises(OverflowValueError, match=r"^value -65520 at row 2, column 300 overflows F16: it would be "
                                                 r"stored as inf \(largest magnitude F16 can hold: 65504\)"):
        qk.quantize(rows(-F16_OVERFLOW), "F16")
    below_bf16 = np.float32(np.nextafter(np.float32(BF16_OVERFLOW), np.float32(0)))
    assert np.isfinite(qk.dequantize(qk.quantize(rows(below_bf16), "BF16"), "BF16", (3, 512))).all()
    with pytest.raises(OverflowValueError):
        qk.quantize(rows(BF16_OVERFLOW), "BF16")


@pytest.mark.parametrize("qtype", list(BOUND))
@pytest.mark.parametrize("scale", [0.01, 0.5, 0.99, 1.01, 4.0])
def test_quantized_types_never_write_a_non_finite_scale(qtype, scale):
    """Either the bytes decode to finite values, or the tensor is refused naming value and place."""
    x = rows(BOUND[qtype] * scale, both_signs=True)
    try:
        out = qk.quantize(x, qtype)
    except OverflowValueError as e:
        assert e.where[0] == 2 and e.where[1] in (300, 301)
        assert scale > 0.01  # small outliers always fit
        return
    assert scale < 1  # beyond the bound nothing is written
    y = qk.dequantize(out, qtype, x.shape)
    assert np.isfinite(y).all()


def test_ordinary_weights_are_unaffected():
    x = rows(0.5)
    for qtype in TYPES:
        assert np.isfinite(qk.dequantize(qk.quantize(x, qtype), qtype, x.shape)).all()
