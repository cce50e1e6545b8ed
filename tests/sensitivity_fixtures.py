"""Seeded synthetic sensitivity documents (the file ``convert --target-size`` reads), for tests.

Gains span 50x across tensors (early double blocks most sensitive, as measured on FLUX.1-dev); the
predicted error of each type is the gain times RELATIVE (roughly 4x per bit, as K-quants behave).
"""
from __future__ import annotations

import math

import numpy as np

from converter.layout import FluxGeometry, bfl_tensor_shapes, is_kept_unquantized
from converter.recipes import CANDIDATE_TYPES

# Relative weight error per type.
RELATIVE = {"Q2_K": 1.0, "Q3_K": 0.26, "Q4_K": 0.065, "Q5_K": 0.016, "Q6_K": 0.004, "Q8_0": 0.0003, "BF16": 0.0}


def sensitivity_doc(geometry: FluxGeometry = FluxGeometry(), seed: int = 0, *, reverse: bool = False,
                    per_weight: bool = True) -> dict:
    """``per_weight``: gains scale with the tensor's element count (a tensor's error grows with its
    size); otherwise one seeded gain per tensor. Types whose block does not divide a row are left out."""
    rng = np.random.default_rng(seed)
    tensors = {}
    items = [(n, s) for n, s in bfl_tensor_shapes(geometry).items() if len(s) == 2 and not is_kept_unquantized(n)]
    for n, s in items:
        gain = float(np.exp(rng.uniform(0, math.log(50))))
        if per_weight:
            gain *= math.prod(s) / 1e9
        fits = [t for t in CANDIDATE_TYPES if s[-1] % (32 if t == "Q8_0" else 256) == 0] + ["BF16"]
        tensors[n] = {"shape": list(s), "predicted": {t: gain * RELATIVE[t] for t in fits}}
    if reverse:
        tensors = dict(reversed(list(tensors.items())))
    return {"format": "flux-gguf-sensitivity", "version": 1, "tensors": tensors}
