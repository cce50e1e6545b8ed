"""Load a FLUX transformer through diffusers, the way users load our files, and run a probe.

validate, bench and the pipeline check all load models here, so the source and the GGUF go
through exactly the same code path: ``FluxTransformer2DModel.from_single_file`` with a local
config folder (no network) and, for GGUF, ``GGUFQuantizationConfig``. diffusers and torch are
imported lazily: converting needs neither.

Compute runs in float32 on CPU (small test models; bfloat16 matmuls on CPU are slow and noisy)
and bfloat16 on CUDA (how the full model runs on a GPU).
"""
from __future__ import annotations

import gc
import json
import os
import pathlib
from typing import TYPE_CHECKING, Any, Mapping

import numpy as np

from converter.errors import ValidationError
from converter.layout import CONTEXT_DIM, FLUX1, FLUX2, FLUX2_MARKER, HEAD_DIM, OUT_CHANNELS, VEC_DIM, FluxGeometry
from converter.synthetic import flux2_diffusers_config
from manifests.hashing import write_bytes_atomic

from .probes import Probe

if TYPE_CHECKING:
    import torch

# diffusers' BFL -> diffusers conversion hard-codes these (inner_dim 3072 when splitting linear1).
DIFFUSERS_HIDDEN = 3072
AXES_DIMS_ROPE = (16, 56, 56)
DEVICES = ("cpu", "cuda")
# What from_single_file raises on a file it cannot use (IndexError: no double/single blocks).
_LOAD_ERRORS = (OSError, ValueError, KeyError, IndexError, RuntimeError)


def require_diffusers() -> Any:
    """Import diffusers (and torch) or fail with the install hint."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # every file we load is local
    try:
        import diffusers
        import torch  # noqa: F401
    except ImportError as exc:
        raise ValidationError(
            f"validate and bench need diffusers and torch ({exc.name} is missing); "
            "install them with: pip install 'flux-gguf[validate]'"
        ) from None
    return diffusers


def resolve_device(device: str | None) -> str:
    """'cpu' or 'cuda'; None picks CUDA when a GPU is visible."""
    import torch

    if device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device not in DEVICES:
        raise ValidationError(f"device must be one of {', '.join(DEVICES)}, got {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValidationError("device 'cuda' was asked for but torch sees no CUDA GPU")
    return device


def compute_dtype(device: str) -> torch.dtype:
    import torch

    return torch.bfloat16 if device == "cuda" else torch.float32


def dtype_kwargs(dtype: torch.dtype) -> dict[str, Any]:
    """``dtype=`` where diffusers has it (newer releases deprecate ``torch_dtype``), else ``torch_dtype=``."""
    try:
        from diffusers.utils.deprecation_utils import _resolve_dtype  # noqa: F401
    except ImportError:
        return {"torch_dtype": dtype}
    return {"dtype": dtype}


def transformer_class_name(geometry: FluxGeometry) -> str:
    """The diffusers model class of a geometry: ``Flux2Transformer2DModel`` for FLUX.2."""
    return "Flux2Transformer2DModel" if geometry.arch == FLUX2 else "FluxTransformer2DModel"


def transformer_config(geometry: FluxGeometry) -> dict[str, Any]:
    """The diffusers ``FluxTransformer2DModel`` config for a FLUX geometry (Kontext: in_channels 64);
    for FLUX.2 the ``Flux2Transformer2DModel`` one."""
    if geometry.hidden % HEAD_DIM:
        raise ValidationError(f"hidden size {geometry.hidden} is not a multiple of the head size {HEAD_DIM}")
    if geometry.arch == FLUX2:
        return dict(flux2_diffusers_config(geometry))
    return {
        "_class_name": "FluxTransformer2DModel",
        "patch_size": 1,
        "in_channels": geometry.img_in_channels,
        "out_channels": OUT_CHANNELS if geometry.img_in_channels != OUT_CHANNELS else None,
        "num_layers": geometry.double_blocks,
        "num_single_layers": geometry.single_blocks,
        "attention_head_dim": HEAD_DIM,
        "num_attention_heads": geometry.hidden // HEAD_DIM,
        "joint_attention_dim": CONTEXT_DIM,
        "pooled_projection_dim": VEC_DIM,
        "guidance_embeds": geometry.guidance,
        "axes_dims_rope": list(AXES_DIMS_ROPE),
    }


def write_transformer_config(geometry: FluxGeometry, folder: str | os.PathLike[str]) -> pathlib.Path:
    """Write ``config.json`` for ``geometry`` into ``folder`` (for from_single_file's ``config=``)."""
    folder = pathlib.Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "config.json"
    write_bytes_atomic(path, (json.dumps(transformer_config(geometry), indent=2) + "\n").encode("utf-8"))
    return folder


def check_loadable(geometry: FluxGeometry) -> None:
    """diffusers can only load FLUX geometries its single-file converter understands (FLUX.2's
    converter splits by chunks, so any hidden size loads)."""
    if geometry.hidden != DIFFUSERS_HIDDEN and geometry.arch != FLUX2:
        raise ValidationError(
            f"diffusers loads FLUX transformers with hidden size {DIFFUSERS_HIDDEN} only "
            f"(its single-file conversion hard-codes it); this model has {geometry.hidden}"
        )
    if geometry.double_blocks < 1 or geometry.single_blocks < 1:
        raise ValidationError(
            "diffusers needs at least one double and one single block to load a FLUX transformer; "
            f"this model has {geometry.double_blocks} and {geometry.single_blocks}"
        )


def geometry_from_shapes(shapes: Mapping[str, tuple[int, ...]], where: str) -> FluxGeometry:
    """FLUX geometry from BFL tensor names and shapes (used for GGUF files, which carry no config)."""
    img_in = shapes.get("img_in.weight")
    if img_in is None or len(img_in) != 2:
        raise ValidationError(f"{where}: no 2-D img_in.weight tensor; not a FLUX transformer in BFL naming")

    def count(prefix: str) -> int:
        ids = {int(n.split(".")[1]) for n in shapes if n.startswith(prefix) and n.split(".")[1].isdigit()}
        return max(ids) + 1 if ids else 0

    txt_in = shapes.get("txt_in.weight")
    flux2 = FLUX2_MARKER in shapes
    return FluxGeometry(
        double_blocks=count("double_blocks."),
        single_blocks=count("single_blocks."),
        hidden=int(img_in[0]),
        img_in_channels=int(img_in[1]),
        guidance="guidance_in.in_layer.weight" in shapes,
        **({"arch": FLUX2, "context_dim": int(txt_in[1]) if txt_in is not None and len(txt_in) == 2 else 0}
           if flux2 else {}),
    )


def model_class(diffusers: Any, config_dir: str | os.PathLike[str]) -> Any:
    """The diffusers class ``config_dir``'s config.json names (FLUX.1's when it names none)."""
    try:
        name = json.loads((pathlib.Path(config_dir) / "config.json").read_text("utf-8")).get("_class_name")
    except (OSError, ValueError, AttributeError):
        name = None
    return diffusers.Flux2Transformer2DModel if name == "Flux2Transformer2DModel" else diffusers.FluxTransformer2DModel


def load_gguf_transformer(path: str | os.PathLike[str], config_dir: str | os.PathLike[str], device: str) -> Any:
    """A GGUF file as diffusers loads it: quantized weights kept, dequantized per matmul."""
    diffusers = require_diffusers()
    dtype = compute_dtype(device)
    try:
        model = model_class(diffusers, config_dir).from_single_file(
            str(path),
            config=str(config_dir),
            quantization_config=diffusers.GGUFQuantizationConfig(compute_dtype=dtype),
            **dtype_kwargs(dtype),
            local_files_only=True,
        )
    except _LOAD_ERRORS as exc:
        raise ValidationError(f"{path}: diffusers could not load this GGUF: {_first_line(exc)}") from exc
    return _to_device(model, device)


def load_source_transformer(
    path: str | os.PathLike[str],
    config_dir: str | os.PathLike[str],
    device: str,
    read_state_dict: Any = None,
) -> Any:
    """The source checkpoint as a diffusers model in the compute dtype.

    A single .safetensors file (BFL, ComfyUI or diffusers keys) goes straight to from_single_file,
    memory-mapped. Anything else (a sharded diffusers folder) is read tensor by tensor through
    ``read_state_dict()`` -> {BFL name: torch tensor} and handed over as a dict.
    """
    diffusers = require_diffusers()
    dtype = compute_dtype(device)
    path = pathlib.Path(path)
    source: Any = str(path)
    if not (path.is_file() and path.suffix == ".safetensors"):
        if read_state_dict is None:
            raise ValidationError(f"{path}: expected a .safetensors file")
        source = read_state_dict()
    try:
        model = model_class(diffusers, config_dir).from_single_file(
            source, config=str(config_dir), local_files_only=True, **dtype_kwargs(dtype)
        )
    except _LOAD_ERRORS as exc:
        raise ValidationError(f"{path}: diffusers could not load this checkpoint: {_first_line(exc)}") from exc
    del source
    return _to_device(model, device)


def _to_device(model: Any, device: str) -> Any:
    """Models load on the CPU and then move, as diffusers' GGUF documentation does."""
    if device != "cpu":
        import torch

        model = model.to(device)
        torch.cuda.synchronize()
    return model


def run_probe(model: Any, probe: Probe, device: str) -> np.ndarray:
    """One transformer call on ``probe``; the target tokens' output as float32 (1, N, C): C = 64 for
    FLUX.1, 128 for FLUX.2.

    The context (reference) image's tokens are dropped, as FluxKontextPipeline and Flux2Pipeline
    drop them. The probe must be the model's family's (:func:`converter.quality.probes.make_probe`).
    """
    import torch

    arch = FLUX2 if type(model).__name__ == "Flux2Transformer2DModel" else FLUX1
    if probe.arch != arch:
        raise ValidationError(f"the probe is {_FAMILY[probe.arch]}'s but the model is {_FAMILY[arch]}; "
                              "build it with make_probe(spec, geometry) for this model")
    kwargs = probe.transformer_kwargs(device, compute_dtype(device), guidance_embeds=model.config.guidance_embeds)
    with torch.inference_mode():
        out = model(**kwargs, return_dict=False)[0]
    return out[:, : probe.spec.target_tokens].float().cpu().numpy()


_FAMILY = {FLUX1: "FLUX.1", FLUX2: "FLUX.2"}


def release_memory(device: str) -> None:
    """Return freed model memory (call after dropping the last reference to a model)."""
    gc.collect()
    if device == "cuda":
        import torch

        torch.cuda.empty_cache()


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
