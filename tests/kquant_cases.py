"""Input families for byte-exactness tests, and a comparison that explains differences."""
from __future__ import annotations

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType


def input_families(n: int = 512, rows: int = 8, seed: int = 0) -> dict[str, np.ndarray]:
    """Deterministic (rows, n) float32 inputs covering what real weights and edge cases look like."""
    rng = np.random.default_rng(seed)
    fam: dict[str, np.ndarray] = {}
    for scale in (1e-4, 1e-3, 0.02, 1.0, 10.0):
        fam[f"gauss_{scale:g}"] = (rng.standard_normal((rows, n)) * scale).astype(np.float32)
    fam["student_t3"] = (rng.standard_t(3, (rows, n)) * 0.02).astype(np.float32)
    fam["student_t1_5"] = (rng.standard_t(1.5, (rows, n)) * 0.01).astype(np.float32)
    fam["zeros"] = np.zeros((rows, n), np.float32)
    const = np.full((rows, n), 0.25, np.float32)
    const[1::2] = -0.125
    fam["constant"] = const
    mixed = (rng.standard_normal((rows, n)) * 0.02).astype(np.float32)
    mixed[:, :256] = 0.0  # an all-zero block next to a normal one
    mixed[:, 256:288] = 0.5  # a constant group
    fam["mixed_zero_const"] = mixed
    outl = (rng.standard_normal((rows, n)) * 0.02).astype(np.float32)
    outl[np.arange(rows), rng.integers(0, n, rows)] = 40.0
    outl[0, 5] = -80.0
    fam["outliers"] = outl
    fam["fp16_subnormal"] = (rng.standard_normal((rows, n)) * 3e-6).astype(np.float32)
    fam["tiny_1e-15"] = (rng.standard_normal((rows, n)) * 1e-15).astype(np.float32)
    fam["tiny_1e-13"] = (rng.standard_normal((rows, n)) * 1e-13).astype(np.float32)
    fam["tiny_1e-17"] = (rng.standard_normal((rows, n)) * 1e-17).astype(np.float32)
    pos = np.abs(rng.standard_normal((rows, n)) * 0.02).astype(np.float32)
    fam["all_positive"] = pos
    fam["all_negative"] = -pos
    sparse = (rng.standard_normal((rows, n)) * 0.02).astype(np.float32)
    sparse[rng.random((rows, n)) < 0.9] = 0.0
    fam["sparse"] = sparse
    fam["bf16_grid"] = ((rng.standard_normal((rows, n)) * 0.02).astype(np.float32).view(np.uint32) & 0xFFFF0000).view(np.float32)
    fam["ties"] = (rng.integers(-8, 8, (rows, n)) * 0.5).astype(np.float32)
    return fam


def describe_mismatch(ours: np.ndarray, ref: np.ndarray, block_bytes: int) -> str:
    """'' when equal, else which blocks differ and the worst one (for assertion messages)."""
    if ours.shape != ref.shape:
        return f"shape {ours.shape} != {ref.shape}"
    a = ours.reshape(-1, block_bytes)
    b = ref.reshape(-1, block_bytes)
    diff = (a != b)
    bad = np.flatnonzero(diff.any(axis=1))
    if bad.size == 0:
        return ""
    counts = diff.sum(axis=1)
    worst = int(bad[np.argmax(counts[bad])])
    cols = np.flatnonzero(diff[worst])
    return (
        f"{bad.size} of {a.shape[0]} blocks differ (first {bad[:8].tolist()}); worst block {worst} "
        f"has {int(counts[worst])} differing bytes at offsets {cols[:16].tolist()}: "
        f"ours {a[worst, cols[:8]].tolist()} vs ggml {b[worst, cols[:8]].tolist()}"
    )


def type_size(qtype: str) -> int:
    """Bytes in one block of ``qtype``."""
    return GGML_QUANT_SIZES[GGMLQuantizationType[qtype]][1]


def random_imatrix(n: int, seed: int) -> np.ndarray:
    """Random positive per-column weights spanning four decades, about one in eight zero."""
    rng = np.random.default_rng(seed)
    qw = (rng.random(n) * 10.0 ** rng.uniform(-2, 2, n)).astype(np.float32)
    qw[rng.random(n) < 0.125] = 0.0
    return qw


def assert_same_bytes(x: np.ndarray, qtype: str, imatrix: np.ndarray | None = None) -> np.ndarray:
    """Quantize with ours and with ggml; fail with describe_mismatch's report unless equal."""
    import oracle

    import quant_kernels

    ours = quant_kernels.quantize(x, qtype, imatrix=imatrix)
    ref = oracle.quantize(x, qtype, imatrix)
    msg = describe_mismatch(ours, ref, type_size(qtype))
    assert not msg, msg
    return ours
