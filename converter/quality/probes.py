"""Fixed, seeded transformer inputs shaped like one FLUX.1 Kontext edit step.

validate and bench feed the same probe to the source transformer and to the GGUF one, so their
outputs can be compared number for number. The shapes follow diffusers' FluxKontextPipeline:
the target latent is packed into 2x2 patches (H/16 * W/16 tokens of 64 features), the context
image adds as many tokens again (its position ids carry a first coordinate of 1), the T5 text
holds ``text_tokens`` rows of 4096 features and CLIP's pooled vector 768. The transformer
multiplies ``timestep`` and ``guidance`` by 1000 itself, so they are passed as the pipeline does
(sigma in [0, 1] and the raw guidance scale).

FLUX.2 (:class:`Flux2Probe`, :func:`make_flux2_probe`) follows diffusers' Flux2Pipeline instead: 128
latent channels (the 32-channel VAE latent patchified 2x2, still 16 pixels per token side), 4-axis
position ids (T, H, W, L): the target's T is 0, the reference image's 10 (``_prepare_image_ids``'s
``scale``), the text's L counts the tokens; the text embedding has the model's ``context_dim`` features
(Mistral's or Qwen3's stacked hidden states) and there is no pooled vector.
:func:`make_probe` picks the family's probe from a geometry.

Values come from numpy's seeded generator, so a probe is identical on every machine and torch
version; only the device and dtype they are cast to differ.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, Union

import numpy as np

from converter.errors import ValidationError
from converter.layout import CONTEXT_DIM, FLUX1, FLUX2, FLUX2_CHANNELS, OUT_CHANNELS, VEC_DIM, FluxGeometry

if TYPE_CHECKING:  # torch is imported lazily: the converter itself never needs it.
    import torch

# Pixels per packed token side: the VAE downsamples 8x and latents are packed in 2x2 patches.
PIXELS_PER_TOKEN = 16


@dataclass(frozen=True)
class ProbeSpec:
    """What a probe looks like; recorded next to every measurement made with it."""

    height: int = 1024
    width: int = 1024
    text_tokens: int = 512
    seed: int = 0
    timestep: float = 0.5
    guidance: float = 2.5
    context_image: bool = True  # Kontext: a context image as large as the target

    def __post_init__(self) -> None:
        for side, value in (("height", self.height), ("width", self.width)):
            if value < PIXELS_PER_TOKEN or value % PIXELS_PER_TOKEN:
                raise ValidationError(
                    f"probe {side} must be a positive multiple of {PIXELS_PER_TOKEN} pixels, got {value}"
                )
        if self.text_tokens < 1:
            raise ValidationError(f"probe text_tokens must be at least 1, got {self.text_tokens}")
        if not 0.0 <= self.timestep <= 1.0:
            raise ValidationError(f"probe timestep must be a sigma in [0, 1], got {self.timestep}")

    @property
    def grid(self) -> tuple[int, int]:
        """Packed latent grid (rows, columns) of the target image."""
        return self.height // PIXELS_PER_TOKEN, self.width // PIXELS_PER_TOKEN

    @property
    def target_tokens(self) -> int:
        rows, cols = self.grid
        return rows * cols

    @property
    def image_tokens(self) -> int:
        """Image tokens the transformer sees: doubled when a context image is present."""
        return self.target_tokens * (2 if self.context_image else 1)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "target_tokens": self.target_tokens, "image_tokens": self.image_tokens}


@dataclass(frozen=True)
class KontextProbe:
    """One transformer call's inputs, as float32 numpy arrays (batch of 1)."""

    spec: ProbeSpec
    hidden_states: np.ndarray  # (1, image_tokens, 64): noisy target latents, then context latents
    img_ids: np.ndarray  # (image_tokens, 3)
    encoder_hidden_states: np.ndarray  # (1, text_tokens, 4096)
    pooled_projections: np.ndarray  # (1, 768)
    txt_ids: np.ndarray  # (text_tokens, 3), all zero as in the pipeline
    arch = FLUX1

    def transformer_kwargs(
        self, device: str | torch.device, dtype: torch.dtype, *, guidance_embeds: bool = True
    ) -> dict[str, torch.Tensor]:
        """Keyword arguments for ``FluxTransformer2DModel.forward`` on ``device``.

        Position ids stay float32 as the pipeline keeps them; guidance is passed only to models
        that embed it (FLUX.1 [schnell] has no guidance embedder).
        """
        return _call_kwargs(self, device, dtype, guidance_embeds, pooled=self.pooled_projections)


def latent_image_ids(rows: int, cols: int, first: float = 0.0) -> np.ndarray:
    """Position ids of a packed latent grid: (first, row, column) per token, row-major.

    The same layout as FluxKontextPipeline._prepare_latent_image_ids; the context image uses
    first = 1 so the transformer can tell it from the target.
    """
    ids = np.zeros((rows, cols, 3), dtype=np.float32)
    ids[..., 0] = first
    ids[..., 1] = np.arange(rows, dtype=np.float32)[:, None]
    ids[..., 2] = np.arange(cols, dtype=np.float32)[None, :]
    return ids.reshape(rows * cols, 3)


def make_kontext_probe(spec: ProbeSpec = ProbeSpec()) -> KontextProbe:
    """Build the probe for ``spec``; the same spec always gives the same arrays."""
    rng = np.random.default_rng(spec.seed)
    rows, cols = spec.grid
    n = spec.target_tokens
    sigma = spec.timestep
    # A flow-matching step sees (1 - sigma) * clean + sigma * noise; clean latents are ~N(0, 1)
    # after the VAE's shift and scale, so the mix keeps roughly unit variance.
    clean = rng.standard_normal((1, n, OUT_CHANNELS), dtype=np.float32)
    noise = rng.standard_normal((1, n, OUT_CHANNELS), dtype=np.float32)
    target = (1.0 - sigma) * clean + sigma * noise
    parts = [target.astype(np.float32)]
    ids = [latent_image_ids(rows, cols, 0.0)]
    if spec.context_image:
        parts.append(rng.standard_normal((1, n, OUT_CHANNELS), dtype=np.float32))
        ids.append(latent_image_ids(rows, cols, 1.0))
    # T5-XXL hidden states are small (std ~0.2); CLIP's pooled output is near unit scale.
    text = 0.2 * rng.standard_normal((1, spec.text_tokens, CONTEXT_DIM), dtype=np.float32)
    pooled = rng.standard_normal((1, VEC_DIM), dtype=np.float32)
    return KontextProbe(
        spec=spec,
        hidden_states=np.concatenate(parts, axis=1),
        img_ids=np.concatenate(ids, axis=0),
        encoder_hidden_states=text.astype(np.float32),
        pooled_projections=pooled,
        txt_ids=np.zeros((spec.text_tokens, 3), dtype=np.float32),
    )


# Flux2Pipeline._prepare_image_ids: the i-th reference image's T coordinate is scale + scale * i.
FLUX2_REFERENCE_T = 10.0
# The text embedding's scale: intermediate LLM hidden states (Mistral Small 3.1 layers 10/20/30 for
# [dev], Qwen3 layers 9/18/27 for [klein]) are not normalized; unit variance is a plausible order of
# magnitude, not a measured one (real inputs: --inputs or a pipeline capture).
FLUX2_TEXT_STD = 1.0


@dataclass(frozen=True)
class Flux2Probe:
    """One FLUX.2 transformer call's inputs, as float32 numpy arrays (batch of 1)."""

    spec: ProbeSpec
    hidden_states: np.ndarray  # (1, image_tokens, 128): noisy target latents, then reference latents
    img_ids: np.ndarray  # (image_tokens, 4): (T, H, W, L)
    encoder_hidden_states: np.ndarray  # (1, text_tokens, context_dim)
    txt_ids: np.ndarray  # (text_tokens, 4): (0, 0, 0, token index)
    arch = FLUX2

    def transformer_kwargs(
        self, device: str | torch.device, dtype: torch.dtype, *, guidance_embeds: bool = True
    ) -> dict[str, torch.Tensor]:
        """Keyword arguments for ``Flux2Transformer2DModel.forward`` on ``device``: ids float32, the
        guidance scale only for models that embed it ([dev]; [klein] passes none, as its pipeline)."""
        return _call_kwargs(self, device, dtype, guidance_embeds)


Probe = Union[KontextProbe, Flux2Probe]


def _call_kwargs(probe: Any, device: str, dtype: Any, guidance_embeds: bool, pooled: np.ndarray | None = None) -> dict:
    """A probe's arrays as the transformer's keyword arguments on ``device`` (ids in float32, as the
    pipelines pass them; the guidance scale only for a model that embeds it)."""
    import torch

    def t(a: np.ndarray, dt: torch.dtype) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(a)).to(device=device, dtype=dt)

    kwargs = {"hidden_states": t(probe.hidden_states, dtype), "encoder_hidden_states": t(probe.encoder_hidden_states, dtype)}
    if pooled is not None:
        kwargs["pooled_projections"] = t(pooled, dtype)
    kwargs.update(timestep=torch.full((1,), probe.spec.timestep, device=device, dtype=dtype),
                  img_ids=t(probe.img_ids, torch.float32), txt_ids=t(probe.txt_ids, torch.float32))
    if guidance_embeds:
        kwargs["guidance"] = torch.full((1,), probe.spec.guidance, device=device, dtype=torch.float32)
    return kwargs


def flux2_image_ids(rows: int, cols: int, t: float = 0.0) -> np.ndarray:
    """FLUX.2 position ids of a packed latent grid: (t, row, column, 0) per token, row-major
    (Flux2Pipeline._prepare_latent_ids with t = 0; _prepare_image_ids with t = 10 for a reference)."""
    ids = np.zeros((rows, cols, 4), dtype=np.float32)
    ids[..., 0] = t
    ids[..., 1] = np.arange(rows, dtype=np.float32)[:, None]
    ids[..., 2] = np.arange(cols, dtype=np.float32)[None, :]
    return ids.reshape(rows * cols, 4)


def flux2_text_ids(tokens: int) -> np.ndarray:
    """FLUX.2 text position ids: (0, 0, 0, l) for token l (Flux2Pipeline._prepare_text_ids)."""
    ids = np.zeros((tokens, 4), dtype=np.float32)
    ids[:, 3] = np.arange(tokens, dtype=np.float32)
    return ids


def make_flux2_probe(spec: ProbeSpec, context_dim: int, channels: int = FLUX2_CHANNELS) -> Flux2Probe:
    """The FLUX.2 probe for ``spec``: the target latent (the flow-matching mix at sigma = timestep),
    then, with ``spec.context_image``, one reference image as large as the target; the same spec and
    width always give the same arrays."""
    if context_dim < 1:
        raise ValidationError(f"a FLUX.2 probe needs the model's text width (txt_in's input), got {context_dim}")
    rng = np.random.default_rng(spec.seed)
    rows, cols = spec.grid
    n = spec.target_tokens
    sigma = spec.timestep
    # Flux2Pipeline normalizes the VAE latents by its batch-norm statistics: ~N(0, 1), as for FLUX.1.
    clean = rng.standard_normal((1, n, channels), dtype=np.float32)
    noise = rng.standard_normal((1, n, channels), dtype=np.float32)
    parts = [((1.0 - sigma) * clean + sigma * noise).astype(np.float32)]
    ids = [flux2_image_ids(rows, cols, 0.0)]
    if spec.context_image:
        parts.append(rng.standard_normal((1, n, channels), dtype=np.float32))
        ids.append(flux2_image_ids(rows, cols, FLUX2_REFERENCE_T))
    text = FLUX2_TEXT_STD * rng.standard_normal((1, spec.text_tokens, context_dim), dtype=np.float32)
    return Flux2Probe(
        spec=spec,
        hidden_states=np.concatenate(parts, axis=1),
        img_ids=np.concatenate(ids, axis=0),
        encoder_hidden_states=text.astype(np.float32),
        txt_ids=flux2_text_ids(spec.text_tokens),
    )


def make_probe(spec: ProbeSpec, geometry: FluxGeometry) -> Probe:
    """The probe of ``geometry``'s family: FLUX.1 Kontext's, or FLUX.2's at the model's text width
    and latent channels."""
    if geometry.arch == FLUX2:
        return make_flux2_probe(spec, geometry.context_dim, geometry.img_in_channels)
    return make_kontext_probe(spec)
