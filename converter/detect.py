"""Which FLUX.1 model a source holds, checked tensor by tensor before any work starts.

The family comes from shapes alone: ``img_in`` input width (64 dev/Kontext/schnell, 384 Fill,
128 Depth/Canny) and whether ``guidance_in`` exists (schnell has none). Dev and Kontext have the
same tensors, so both report "flux-dev". Block counts come from the keys and the hidden size from
``img_in.weight``'s rows, so small FLUX-shaped test models (hidden 256, one block of each kind)
are detected like the real 3072-wide, 19 + 38 block model.

FLUX.2 is told apart by ``double_stream_modulation_img.lin.weight`` (its shared modulation, as
stable-diffusion.cpp does); its family comes from the block counts (8 + 48 [dev], 5 + 20 [klein]
4B, 8 + 24 [klein] 9B, as sd.cpp tells [dev] by ``single_blocks.47``), and ``txt_in``'s width and
``guidance_in`` must be that model's. The hidden size is read from ``img_in`` like FLUX.1's, so small
test models keep the real block counts at a narrow width. Then every tensor the geometry implies
must exist with its exact shape and nothing else may be present: a converter that silently drops
or invents tensors produces files that load and give garbage.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from .errors import ModelDetectionError
from .layout import FLUX2, FLUX2_CHANNELS, FLUX2_MARKER, FLUX2_SIZES, HEAD_DIM, FluxGeometry, bfl_tensor_shapes, flux2_size_of
from .sources import Source

FAMILIES_BY_IMG_IN = {64: "flux-dev", 384: "flux-fill", 128: "flux-depth-canny"}
_BLOCK_INDEX = re.compile(r"^(double_blocks|single_blocks)\.(\d+)\.")
# Key fragments of other model kinds, and what to call them.
_OTHER_MODELS = (
    (("input_blocks.", "down_blocks."), "a UNet (Stable Diffusion-style)"),
    (("joint_blocks.",), "an SD3 (MMDiT) model"),
)


@dataclass(frozen=True)
class ModelInfo:
    """family: "flux-dev" (dev and Kontext), "flux-schnell", "flux-fill", "flux-depth-canny", or for
    FLUX.2 "flux2-dev", "flux2-klein-4b", "flux2-klein-9b"."""

    family: str
    geometry: FluxGeometry


def _listing(names: list[str]) -> str:
    more = f" (and {len(names) - 1} more)" if len(names) > 1 else ""
    return f"{names[0]}{more}"


def _shape(shape: tuple[int, ...]) -> str:
    return "[" + ", ".join(str(d) for d in shape) + "]"


def _refuse_other_models(source: Source) -> None:
    names = list(source.tensors)
    for fragments, what in _OTHER_MODELS:
        hit = next((n for n in names if any(f in n for f in fragments)), None)
        if hit is not None:
            raise ModelDetectionError(
                f"{source.path} is {what}, not a FLUX.1 transformer: found {hit}; expected img_in.weight, "
                "double_blocks.N.* and single_blocks.N.*")
    if "img_in.weight" not in source.tensors or not any(_BLOCK_INDEX.match(n) for n in names):
        found = ", ".join(names[:3]) + (f" (and {len(names) - 3} more)" if len(names) > 3 else "")
        raise ModelDetectionError(
            f"{source.path} is not a FLUX.1 transformer: expected img_in.weight, double_blocks.N.* and "
            f"single_blocks.N.*; found {len(names)} tensors: {found or 'none'}")


def _geometry(source: Source) -> FluxGeometry:
    img_in = source.tensors["img_in.weight"].shape
    if len(img_in) != 2:
        raise ModelDetectionError(
            f"{source.path}: img_in.weight has shape {_shape(img_in)}; expected [hidden, channels]")
    hidden, channels = img_in
    if hidden == 0 or hidden % HEAD_DIM:
        raise ModelDetectionError(
            f"{source.path}: img_in.weight has {hidden} rows; the hidden size must be a positive multiple "
            f"of the {HEAD_DIM}-wide attention head")
    if FLUX2_MARKER in source.tensors:
        return _flux2_geometry(source, hidden, channels)
    if channels not in FAMILIES_BY_IMG_IN:
        raise ModelDetectionError(
            f"{source.path}: img_in.weight has {channels} input channels; expected 64 (dev, Kontext, "
            "schnell), 384 (Fill) or 128 (Depth/Canny)")
    counts = _block_counts(source)
    guidance = any(n.startswith("guidance_in.") for n in source.tensors)
    return FluxGeometry(double_blocks=counts["double_blocks"], single_blocks=counts["single_blocks"],
                        hidden=hidden, img_in_channels=channels, guidance=guidance)


def _flux2_geometry(source: Source, hidden: int, channels: int) -> FluxGeometry:
    """A FLUX.2 geometry: the family from the block counts; txt_in, img_in and guidance_in must agree."""
    counts = _block_counts(source)
    guidance = "guidance_in.in_layer.weight" in source.tensors
    found = (f"{counts['double_blocks']} double + {counts['single_blocks']} single blocks, hidden size {hidden}"
             f"{', guidance_in' if guidance else ''}")
    geo = FluxGeometry(double_blocks=counts["double_blocks"], single_blocks=counts["single_blocks"], hidden=hidden,
                       img_in_channels=channels, guidance=guidance, arch=FLUX2)
    size = flux2_size_of(geo)
    if size is None:
        known = "; ".join(f"{s.double_blocks} + {s.single_blocks} ({s.family})" for s in FLUX2_SIZES)
        raise ModelDetectionError(f"{source.path}: a FLUX.2 transformer of unknown size: {found}; expected {known}")
    if channels != FLUX2_CHANNELS:
        raise ModelDetectionError(f"{source.path}: img_in.weight has {channels} input channels; FLUX.2 "
                                  f"({size.family}) has {FLUX2_CHANNELS}")
    if guidance != size.guidance:
        raise ModelDetectionError(
            f"{source.path}: {found} is {size.family}, which has "
            f"{'a guidance_in embedder' if size.guidance else 'no guidance_in embedder'}; this file has "
            f"{'one' if guidance else 'none'}")
    txt_in = source.tensors.get("txt_in.weight")
    context = txt_in.shape[1] if txt_in is not None and len(txt_in.shape) == 2 else None
    if context != size.context_dim:
        raise ModelDetectionError(
            f"{source.path}: txt_in.weight has shape {_shape(txt_in.shape) if txt_in is not None else 'none'}; "
            f"{size.family} takes {size.context_dim}-wide text features (expected [{hidden}, {size.context_dim}])")
    return FluxGeometry(double_blocks=geo.double_blocks, single_blocks=geo.single_blocks, hidden=hidden,
                        img_in_channels=channels, guidance=guidance, arch=FLUX2, context_dim=size.context_dim)


def _block_counts(source: Source) -> dict[str, int]:
    counts = {"double_blocks": 0, "single_blocks": 0}
    for name in source.tensors:
        m = _BLOCK_INDEX.match(name)
        if m is not None:
            # Checked before anything is sized by it: every block has several tensors, so an index
            # at or beyond the file's tensor count can only mean missing blocks (a crafted header
            # naming block 100000000 would otherwise make us build an inventory of billions).
            digits = m.group(2)
            if len(digits) > 9 or int(digits) >= len(source.tensors):
                raise ModelDetectionError(
                    f"{source.path}: {name} names block {digits if len(digits) <= 20 else digits[:20] + '...'}, "
                    f"but the file holds only {len(source.tensors)} tensors; blocks are numbered from 0 "
                    "without gaps")
            counts[m.group(1)] = max(counts[m.group(1)], int(digits) + 1)
    return counts


def detect_model(source: Source) -> ModelInfo:
    """Identify the FLUX.1 / FLUX.2 family and geometry, or refuse saying what was expected and found."""
    _refuse_other_models(source)
    geo = _geometry(source)
    expected = bfl_tensor_shapes(geo)
    missing = [n for n in expected if n not in source.tensors]
    if missing:
        raise ModelDetectionError(f"{source.path} is missing {_listing(missing)}")
    wrong = [n for n, shape in expected.items() if source.tensors[n].shape != shape]
    if wrong:
        n = wrong[0]
        more = f" (and {len(wrong) - 1} more tensors have wrong shapes)" if len(wrong) > 1 else ""
        raise ModelDetectionError(
            f"{source.path}: {n} has shape {_shape(source.tensors[n].shape)}; expected {_shape(expected[n])} "
            f"for hidden size {geo.hidden}{more}")
    extra = [n for n in source.tensors if n not in expected]
    if extra:
        what = "FLUX.2" if geo.arch == FLUX2 else "FLUX.1"
        raise ModelDetectionError(
            f"{source.path} holds tensors a {what} transformer does not have: {_listing(extra)}")
    if geo.arch == FLUX2:
        size = flux2_size_of(geo)
        assert size is not None  # _flux2_geometry refused other sizes
        return ModelInfo(size.family, geo)
    family = FAMILIES_BY_IMG_IN[geo.img_in_channels]
    if family == "flux-dev" and not geo.guidance:
        family = "flux-schnell"
    return ModelInfo(family, geo)
