"""Small FLUX-layout checkpoints and their GGUF files, shared by the validate/bench/pipeline tests.

diffusers' single-file loader hard-codes hidden size 3072, so the model that goes through it has
1 double + 1 single block at full width (545 M parameters; 1.1 GB BF16, 2.2 GB as float32 in
memory): built once per test session with the real synthetic writer and converter, and reused
by every test module that asks (they share pytest's session base folder).
"""
from __future__ import annotations

import pathlib
from dataclasses import dataclass

from converter.layout import FluxGeometry
from converter.pipeline import convert
from converter.synthetic import write_synthetic_flux

SMALL = FluxGeometry(double_blocks=1, single_blocks=1)  # hidden 3072: loadable by diffusers
TINY = FluxGeometry(double_blocks=2, single_blocks=2, hidden=256)  # fast tensor-level tests


@dataclass(frozen=True)
class FluxFiles:
    geometry: FluxGeometry
    source: pathlib.Path
    bf16: pathlib.Path
    q8_0: pathlib.Path
    q4_k_m: pathlib.Path | None


def _build(folder: pathlib.Path, geometry: FluxGeometry, variants: list[str]) -> FluxFiles:
    source = folder / "flux.safetensors"
    names = {v: folder / f"flux-{v}.gguf" for v in variants}
    if not (source.exists() and all(p.exists() for p in names.values())):
        folder.mkdir(parents=True, exist_ok=True)
        write_synthetic_flux(source, geometry, dtype="BF16", seed=0)
        convert(source, folder, variants, name="flux")
    return FluxFiles(geometry, source, names["BF16"], names["Q8_0"], names.get("Q4_K_M"))


def small_flux(tmp_path_factory: object) -> FluxFiles:
    """The diffusers-loadable model with BF16 and Q8_0 GGUF files."""
    base = pathlib.Path(tmp_path_factory.getbasetemp())  # type: ignore[attr-defined]
    return _build(base / "small-flux", SMALL, ["BF16", "Q8_0"])


def tiny_flux(tmp_path_factory: object) -> FluxFiles:
    """A hidden-256 model (fast) with BF16, Q8_0 and Q4_K_M GGUF files, for tensor-level tests."""
    base = pathlib.Path(tmp_path_factory.getbasetemp())  # type: ignore[attr-defined]
    return _build(base / "tiny-flux", TINY, ["BF16", "Q8_0", "Q4_K_M"])
