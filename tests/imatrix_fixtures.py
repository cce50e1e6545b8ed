"""Deterministic importance matrices for test checkpoints (what a calibration run would produce).

Column energies are log-normal (a few columns far above the rest, as in trained DiTs), so an
imatrix visibly changes the K-quant choices; counts are whole token numbers.
"""
from __future__ import annotations

import pathlib

import numpy as np

from converter.imatrix import Imatrix, ImatrixEntry, write_imatrix
from converter.sources import open_source


def synthetic_imatrix(source: pathlib.Path, seed: int = 0, *, tokens: int = 4 * 1280,
                      dataset: str = "test:seed") -> Imatrix:
    """An entry for every 2-D tensor of ``source`` (BFL names), Σx² = count · exp(1.2·N(0,1))."""
    rng = np.random.default_rng(seed)
    with open_source(source) as src:
        shapes = {n: tuple(t.shape) for n, t in src.tensors.items()}
    entries = {}
    for name in sorted(shapes):
        if len(shapes[name]) != 2:
            continue
        mean_sq = np.exp(1.2 * rng.standard_normal(shapes[name][1])).astype(np.float32)
        entries[name] = ImatrixEntry((mean_sq * np.float32(tokens)).astype(np.float32), float(tokens))
    return Imatrix(entries=entries, datasets=[f"{dataset}={seed}"], chunk_count=4, chunk_size=tokens // 4)


def write_synthetic_imatrix(source: pathlib.Path, path: pathlib.Path, seed: int = 0) -> pathlib.Path:
    write_imatrix(synthetic_imatrix(source, seed), path)
    return path
