"""The guide's image check: the same seeded Kontext edit rendered with both transformers.

Where the user has the whole FLUX.1 Kontext pipeline locally (text encoders, VAE, scheduler,
tokenizers in a diffusers folder), the edit is rendered once with the source transformer and
once with the GGUF one, everything else identical (same pipeline objects, same seed, same
input image and prompt), and the two images are compared by SSIM and PSNR (scikit-image;
pixels in [0, 1], SSIM over the three colour channels). The guide's bar is SSIM > 0.95.

Only one transformer is in memory at a time: the pipeline is loaded around the source
transformer, renders, drops it, and is handed the GGUF transformer explicitly.
"""
from __future__ import annotations

import io
import math
import os
import pathlib
import tempfile
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from converter.detect import detect_model
from converter.errors import FluxGGUFError, ValidationError
from converter.layout import FLUX2, FluxGeometry
from converter.sources import open_source
from manifests.hashing import write_bytes_atomic

from .diffusers_model import (
    check_loadable,
    compute_dtype,
    dtype_kwargs,
    load_gguf_transformer,
    load_source_transformer,
    release_memory,
    require_diffusers,
    resolve_device,
    write_transformer_config,
)
from .tensor_error import json_float
from .validate import LogFn, source_state_dict_reader

SSIM_BAR = 0.95  # what the guide asks of a usable quantization


@dataclass(frozen=True)
class ImageComparison:
    """SSIM and PSNR (dB, peak 1.0) of the GGUF render against the source render."""

    ssim: float
    psnr_db: float
    height: int
    width: int
    steps: int
    seed: int
    guidance: float
    prompt: str
    image: str  # input image file name

    @property
    def passes(self) -> bool:
        return self.ssim > SSIM_BAR

    def to_dict(self) -> dict[str, Any]:
        d = {k: json_float(v) if isinstance(v, float) else v for k, v in asdict(self).items()}
        d["ssim_bar"] = SSIM_BAR
        d["passes"] = self.passes
        return d


def compare_images(reference: np.ndarray, candidate: np.ndarray) -> tuple[float, float]:
    """(SSIM, PSNR in dB) of two (H, W, 3) float images in [0, 1]; identical images give (1.0, inf)."""
    try:
        from skimage.metrics import structural_similarity
    except ImportError:
        raise ValidationError(
            "the --pipeline check needs scikit-image; install it with: pip install 'flux-gguf[validate]'"
        ) from None
    if reference.shape != candidate.shape or reference.ndim != 3 or reference.shape[-1] != 3:
        raise ValidationError(
            f"images must both be (height, width, 3); got {reference.shape} and {candidate.shape}"
        )
    a = reference.astype(np.float64)
    b = candidate.astype(np.float64)
    # SSIM's default 7x7 window needs images at least that large; smaller ones use their odd side.
    win = min(7, *(s if s % 2 else s - 1 for s in a.shape[:2]))
    ssim = float(structural_similarity(a, b, channel_axis=-1, data_range=1.0, win_size=win))
    mse = float(np.mean((a - b) ** 2))
    psnr = math.inf if mse == 0 else 10 * math.log10(1.0 / mse)
    return ssim, psnr


def _load_image(path: pathlib.Path) -> Any:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            return img.convert("RGB")
    except FileNotFoundError:
        raise ValidationError(f"{path}: no such image file") from None
    except (UnidentifiedImageError, OSError) as exc:
        raise ValidationError(f"{path}: not a readable image ({exc})") from None


def _check_pipeline_dir(pipeline_dir: pathlib.Path) -> None:
    if not (pipeline_dir / "model_index.json").is_file():
        raise ValidationError(
            f"{pipeline_dir}: not a diffusers pipeline folder (expected model_index.json, as in a "
            "local copy of black-forest-labs/FLUX.1-Kontext-dev)"
        )


FLUX2_NO_PIPELINE = ("--pipeline renders with FluxKontextPipeline (FLUX.1 Kontext: T5 and CLIP text encoders); "
                     "this is a FLUX.2 transformer, whose Flux2Pipeline (Mistral or Qwen3 text encoder) flux-gguf "
                     "does not drive: use the seeded probes or --inputs (captured Flux2Pipeline calls)")


def refuse_flux2_pipeline(geometry: FluxGeometry) -> None:
    """The --pipeline paths are FLUX.1 Kontext's: a FLUX.2 model gets one line, before anything loads."""
    if geometry.arch == FLUX2:
        raise ValidationError(FLUX2_NO_PIPELINE)


def load_pipeline(pipeline_dir: pathlib.Path, transformer: Any, device: str) -> Any:
    """FluxKontextPipeline from a local diffusers folder, around ``transformer`` (its own is never loaded)."""
    diffusers = require_diffusers()
    if type(transformer).__name__ == "Flux2Transformer2DModel":
        raise ValidationError(FLUX2_NO_PIPELINE)
    _check_pipeline_dir(pipeline_dir)
    try:
        pipe = diffusers.FluxKontextPipeline.from_pretrained(
            str(pipeline_dir), transformer=transformer, local_files_only=True, **dtype_kwargs(compute_dtype(device))
        )
    except ImportError as exc:
        raise ValidationError(
            f"the --pipeline check needs transformers for the text encoders ({exc}); "
            "install it with: pip install transformers"
        ) from None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ValidationError(f"{pipeline_dir}: cannot load the Kontext pipeline: {str(exc).splitlines()[0]}") from exc
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def render(pipe: Any, image: Any, prompt: str, *, seed: int, steps: int, guidance: float,
           height: int | None, width: int | None, max_sequence_length: int) -> np.ndarray:
    """One seeded Kontext edit as a (H, W, 3) float32 image in [0, 1].

    The noise comes from a CPU generator, so it is the same on every device. With height and
    width given, the image is resized to exactly that (no snapping to Kontext's preferred sizes).
    """
    import torch

    size: dict[str, Any] = {}
    if height is not None and width is not None:
        size = {"height": height, "width": width, "max_area": height * width, "_auto_resize": False}
    out = pipe(
        image=image,
        prompt=prompt,
        num_inference_steps=steps,
        guidance_scale=guidance,
        generator=torch.Generator(device="cpu").manual_seed(seed),
        max_sequence_length=max_sequence_length,
        output_type="np",
        **size,
    )
    return np.asarray(out.images[0], dtype=np.float32)


def _save_png(array: np.ndarray, path: pathlib.Path) -> None:
    from PIL import Image

    png = io.BytesIO()
    Image.fromarray((np.clip(array, 0, 1) * 255).round().astype(np.uint8)).save(png, format="PNG")
    write_bytes_atomic(path, png.getvalue())


def pipeline_check(
    gguf_path: str | os.PathLike[str],
    source_path: str | os.PathLike[str],
    pipeline_dir: str | os.PathLike[str],
    image_path: str | os.PathLike[str],
    prompt: str,
    *,
    config_dir: str | os.PathLike[str] | None = None,
    device: str | None = None,
    seed: int = 0,
    steps: int = 28,
    guidance: float = 2.5,
    height: int | None = None,
    width: int | None = None,
    max_sequence_length: int = 512,
    save_dir: str | os.PathLike[str] | None = None,
    log: LogFn | None = None,
) -> ImageComparison:
    """Render the edit with the source and with the GGUF transformer and compare the images.

    ``save_dir`` keeps both renders (``render-source.png``, ``render-<gguf stem>.png``).
    """
    say = log or (lambda _msg: None)
    if steps < 1:
        raise ValidationError(f"--steps must be at least 1, got {steps}")
    if (height is None) != (width is None):
        raise ValidationError("give both --height and --width, or neither")
    require_diffusers()
    dev = resolve_device(device)
    gguf_path, pipeline_dir, image_path = (pathlib.Path(p) for p in (gguf_path, pipeline_dir, image_path))
    if not gguf_path.is_file():
        raise ValidationError(f"{gguf_path}: no such GGUF file")
    _check_pipeline_dir(pipeline_dir)
    image = _load_image(image_path)
    compare_images(np.zeros((8, 8, 3)), np.zeros((8, 8, 3)))  # fail on a missing scikit-image before any work
    kwargs = dict(seed=seed, steps=steps, guidance=guidance, height=height, width=width,
                  max_sequence_length=max_sequence_length)
    try:
        with open_source(source_path) as source, tempfile.TemporaryDirectory(prefix="flux-gguf-config-") as tmp:
            geometry = detect_model(source).geometry
            refuse_flux2_pipeline(geometry)
            check_loadable(geometry)
            cfg = config_dir or write_transformer_config(geometry, tmp)
            say(f"loading source transformer {source.path} ({dev})")
            model = load_source_transformer(source.path, cfg, dev, source_state_dict_reader(source, dev))
            say(f"loading the pipeline from {pipeline_dir}")
            pipe = load_pipeline(pipeline_dir, model, dev)
            del model
            say(f"rendering with the source transformer ({steps} steps)")
            reference = render(pipe, image, prompt, **kwargs)
            pipe.transformer = None  # the pipeline held the last reference: free it first
            release_memory(dev)
            say(f"loading GGUF transformer {gguf_path} ({dev})")
            pipe.transformer = load_gguf_transformer(gguf_path, cfg, dev)
            say(f"rendering with the GGUF transformer ({steps} steps)")
            candidate = render(pipe, image, prompt, **kwargs)
            del pipe
            release_memory(dev)
    except ValidationError:
        raise
    except FluxGGUFError as exc:
        raise ValidationError(str(exc)) from exc
    if save_dir is not None:
        out = pathlib.Path(save_dir)
        out.mkdir(parents=True, exist_ok=True)
        _save_png(reference, out / "render-source.png")
        _save_png(candidate, out / f"render-{gguf_path.stem}.png")
    ssim, psnr = compare_images(reference, candidate)
    h, w = reference.shape[:2]
    return ImageComparison(ssim=ssim, psnr_db=psnr, height=h, width=w, steps=steps, seed=seed,
                           guidance=guidance, prompt=prompt, image=image_path.name)
