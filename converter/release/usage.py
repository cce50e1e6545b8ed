"""What a downstream user needs to run a release: one table of per-family facts, and the card's
"How to use" section rendered from it for the files in the release.

Every fact below was read in the consumers' stored code or docs (cited per entry); a family whose
facts could not be verified is left out (the card then says the consumers' docs are the reference).

Sources (read with the search tools, not from memory):
- ComfyUI-GGUF ``nodes.py`` (city96/ComfyUI-GGUF): ``UnetLoaderGGUF`` (title "Unet Loader (GGUF)")
  lists ``.gguf`` files of the ``unet_gguf`` key, registered as
  ``update_folder_names_and_paths("unet_gguf", ["diffusion_models", "unet"])``, i.e. the
  ``models/diffusion_models`` (or legacy ``models/unet``) folder; ``DualCLIPLoaderGGUF`` /
  ``CLIPLoaderGGUF`` take ComfyUI's own ``DualCLIPLoader`` / ``CLIPLoader`` ``type`` list and read
  ``text_encoders`` (``clip``) files. ComfyUI's ``DualCLIPLoader`` documents "flux: clip-l, t5";
  its ``CLIPLoader`` type list includes ``flux2``.
- stable-diffusion.cpp ``docs/flux.md``, ``docs/kontext.md``, ``docs/flux2.md`` and
  ``examples/cli/README.md`` (leejet/stable-diffusion.cpp): the ``sd-cli`` flags and the files.
- diffusers 0.42.1 (installed): ``FluxTransformer2DModel`` / ``Flux2Transformer2DModel`` are
  single-file loadable (``SINGLE_FILE_LOADABLE_CLASSES``); ``FluxPipeline``, ``FluxKontextPipeline``,
  ``Flux2Pipeline``, ``Flux2KleinPipeline`` (its ``transformer`` is a ``Flux2Transformer2DModel``).
"""
from __future__ import annotations

import shlex
from dataclasses import dataclass


@dataclass(frozen=True)
class Download:
    """A file the user fetches besides the GGUF: the name the examples use, the Hub repo, and the
    path inside it (a file: ``blob/main/PATH``; a folder, where the docs name only the folder: ``tree/main/PATH``)."""

    name: str
    repo: str
    path: str = ""
    folder: bool = False

    @property
    def url(self) -> str:
        kind = "tree" if self.folder or not self.path else "blob"
        return f"https://huggingface.co/{self.repo}/{kind}/main/{self.path}".rstrip("/")


@dataclass(frozen=True)
class FamilyUsage:
    """Everything the card's "How to use" needs for one model family."""

    label: str  # what users call it
    diffusers_repo: str  # the base repo: config (subfolder "transformer") and the rest of the pipeline
    transformer_class: str
    pipeline_class: str
    edits_images: bool  # takes a reference image (Kontext, FLUX.2): the pipeline gets ``image=``
    comfy_text_node: str  # ComfyUI-GGUF node for the text encoders
    comfy_text_type: str  # its ``type`` widget
    comfy_text_files: tuple[Download, ...]  # models/text_encoders
    comfy_vae: Download  # models/vae
    sdcpp_text_flags: tuple[tuple[str, Download], ...]  # sd-cli flag -> file
    sdcpp_vae: Download
    sdcpp_extra: tuple[str, ...]  # the rest of the documented command line
    prompt: str  # the docs' example prompt (sd.cpp docs), its quotes made double for the shell line


_FLUX1_VAE = Download("ae.safetensors", "black-forest-labs/FLUX.1-dev", "ae.safetensors")  # sd.cpp docs/flux.md, kontext.md
_CLIP_L = Download("clip_l.safetensors", "comfyanonymous/flux_text_encoders", "clip_l.safetensors")  # sd.cpp docs/flux.md
_T5XXL = Download("t5xxl_fp16.safetensors", "comfyanonymous/flux_text_encoders", "t5xxl_fp16.safetensors")  # sd.cpp docs/flux.md
# FLUX.2: sd.cpp docs/flux2.md names the repos (and folders) only; the file names are those of its examples
# (VAE from black-forest-labs/FLUX.2-dev saved as flux2_ae.safetensors; Mistral Small 3.2 GGUF from unsloth;
# Qwen3 4B from Comfy-Org/flux2-klein-4B split_files/text_encoders). ComfyUI's FLUX.2 files
# (mistral_3_small_flux2_bf16.safetensors, flux2-vae.safetensors in Comfy-Org/flux2-dev split_files/) are
# the names the ComfyUI FLUX.2 workflows load (seen in several stored workflow files; CLIPLoader type flux2).
_FLUX2_VAE_BFL = Download("flux2_ae.safetensors", "black-forest-labs/FLUX.2-dev")
_FLUX2_VAE_COMFY = Download("flux2-vae.safetensors", "Comfy-Org/flux2-dev", "split_files/vae/flux2-vae.safetensors")
_MISTRAL_GGUF = Download("Mistral-Small-3.2-24B-Instruct-2506-Q4_K_M.gguf", "unsloth/Mistral-Small-3.2-24B-Instruct-2506-GGUF")
_MISTRAL_COMFY = Download("mistral_3_small_flux2_bf16.safetensors", "Comfy-Org/flux2-dev",
                          "split_files/text_encoders/mistral_3_small_flux2_bf16.safetensors")
_QWEN3_4B = Download("qwen_3_4b.safetensors", "Comfy-Org/flux2-klein-4B", "split_files/text_encoders", folder=True)
# FLUX.2 [klein] 9B: sd.cpp docs/flux2.md ("Flux.2 klein 9B / Flux.2 klein base 9B") downloads Qwen3 8B from the
# folder Comfy-Org/flux2-klein-9B split_files/text_encoders and its examples pass it as --llm qwen_3_8b.safetensors,
# with the same VAE (black-forest-labs/FLUX.2-dev, flux2_ae.safetensors) and flags as [klein] 4B. ComfyUI: that repo's
# split_files/text_encoders/qwen_3_8b_fp8mixed.safetensors and split_files/vae/flux2-vae.safetensors are the files
# stored ComfyUI setups download (resolve/main URLs in Dockerfiles and download scripts) and the FLUX.2 [klein] 9B
# workflows load (CLIPLoader widgets ["qwen_3_8b_fp8mixed.safetensors", "flux2", "default"], VAELoader
# "flux2-vae.safetensors"). diffusers: black-forest-labs/FLUX.2-klein-9B (layout.FLUX2_SIZES) with Flux2KleinPipeline.
_QWEN3_8B = Download("qwen_3_8b.safetensors", "Comfy-Org/flux2-klein-9B", "split_files/text_encoders", folder=True)
_QWEN3_8B_COMFY = Download("qwen_3_8b_fp8mixed.safetensors", "Comfy-Org/flux2-klein-9B",
                           "split_files/text_encoders/qwen_3_8b_fp8mixed.safetensors")
_FLUX2_VAE_KLEIN9B_COMFY = Download("flux2-vae.safetensors", "Comfy-Org/flux2-klein-9B", "split_files/vae/flux2-vae.safetensors")
_KLEIN_SDCPP = ("--cfg-scale", "1.0", "--steps", "4", "--diffusion-fa", "--offload-to-cpu")  # sd.cpp docs/flux2.md
_FLUX1_SDCPP = ("--cfg-scale", "1.0", "--sampling-method", "euler")  # sd.cpp docs/flux.md: cfg-scale 1 recommended

_FLUX1 = dict(transformer_class="FluxTransformer2DModel", comfy_text_node="DualCLIPLoaderGGUF", comfy_text_type="flux",
              comfy_text_files=(_CLIP_L, _T5XXL), comfy_vae=_FLUX1_VAE,
              sdcpp_text_flags=(("--clip_l", _CLIP_L), ("--t5xxl", _T5XXL)), sdcpp_vae=_FLUX1_VAE)

FAMILIES: dict[str, FamilyUsage] = {
    "flux-dev": FamilyUsage(label="FLUX.1 [dev]", diffusers_repo="black-forest-labs/FLUX.1-dev",
                            pipeline_class="FluxPipeline", edits_images=False, sdcpp_extra=_FLUX1_SDCPP,
                            prompt='a lovely cat holding a sign says "flux.cpp"', **_FLUX1),
    # dev and Kontext share every tensor: the spec's base_model tells them apart (kontext_family)
    "flux-kontext": FamilyUsage(label="FLUX.1 Kontext [dev]", diffusers_repo="black-forest-labs/FLUX.1-Kontext-dev",
                                pipeline_class="FluxKontextPipeline", edits_images=True,
                                sdcpp_extra=("-r", "input.png", *_FLUX1_SDCPP),
                                prompt='change "flux.cpp" to "kontext.cpp"', **_FLUX1),
    "flux-schnell": FamilyUsage(label="FLUX.1 [schnell]", diffusers_repo="black-forest-labs/FLUX.1-schnell",
                                pipeline_class="FluxPipeline", edits_images=False,
                                sdcpp_extra=(*_FLUX1_SDCPP, "--steps", "4"),
                                prompt='a lovely cat holding a sign says "flux.cpp"', **_FLUX1),
    "flux2-dev": FamilyUsage(label="FLUX.2 [dev]", diffusers_repo="black-forest-labs/FLUX.2-dev",
                             transformer_class="Flux2Transformer2DModel", pipeline_class="Flux2Pipeline",
                             edits_images=True, comfy_text_node="CLIPLoaderGGUF", comfy_text_type="flux2",
                             comfy_text_files=(_MISTRAL_COMFY,), comfy_vae=_FLUX2_VAE_COMFY,
                             sdcpp_text_flags=(("--llm", _MISTRAL_GGUF),), sdcpp_vae=_FLUX2_VAE_BFL,
                             sdcpp_extra=("-r", "input.png", "--cfg-scale", "1.0", "--sampling-method", "euler",
                                          "--diffusion-fa", "--offload-to-cpu"),
                             prompt='change "flux.cpp" to "flux2-dev.cpp"'),
    "flux2-klein-4b": FamilyUsage(label="FLUX.2 [klein] 4B", diffusers_repo="black-forest-labs/FLUX.2-klein-4B",
                                  transformer_class="Flux2Transformer2DModel", pipeline_class="Flux2KleinPipeline",
                                  edits_images=False, comfy_text_node="CLIPLoaderGGUF", comfy_text_type="flux2",
                                  comfy_text_files=(_QWEN3_4B,), comfy_vae=_FLUX2_VAE_COMFY,
                                  sdcpp_text_flags=(("--llm", _QWEN3_4B),), sdcpp_vae=_FLUX2_VAE_BFL,
                                  sdcpp_extra=_KLEIN_SDCPP, prompt="a lovely cat"),
    "flux2-klein-9b": FamilyUsage(label="FLUX.2 [klein] 9B", diffusers_repo="black-forest-labs/FLUX.2-klein-9B",
                                  transformer_class="Flux2Transformer2DModel", pipeline_class="Flux2KleinPipeline",
                                  edits_images=False, comfy_text_node="CLIPLoaderGGUF", comfy_text_type="flux2",
                                  comfy_text_files=(_QWEN3_8B_COMFY,), comfy_vae=_FLUX2_VAE_KLEIN9B_COMFY,
                                  sdcpp_text_flags=(("--llm", _QWEN3_8B),), sdcpp_vae=_FLUX2_VAE_BFL,
                                  sdcpp_extra=_KLEIN_SDCPP, prompt="a lovely cat"),
}
"""Family (``flux_gguf.model_family``, Kontext told apart by base_model) -> usage facts.
Left out for lack of verified facts: flux-fill, flux-depth-canny."""


def usage_family(model_family: str, base_model: str) -> str:
    """The FAMILIES key for a GGUF's ``flux_gguf.model_family`` and the spec's ``base_model``."""
    if model_family == "flux-dev" and "kontext" in base_model.lower():
        return "flux-kontext"
    return model_family


def _fence_safe(text: str) -> str:
    """A file name inside a code block: quoted for the shell, never able to close the fence."""
    return shlex.quote(text.replace("`", "'"))


def _links(files: tuple[Download, ...]) -> str:
    return ", ".join(f"[`{f.name}`]({f.url})" for f in files)


def sdcpp_command(u: FamilyUsage, gguf_name: str) -> list[str]:
    """The ``sd-cli`` argument list the card shows (files as the user saves them, in the current folder)."""
    args = ["sd-cli", "--diffusion-model", gguf_name, "--vae", u.sdcpp_vae.name]
    for flag, f in u.sdcpp_text_flags:
        args += [flag, f.name]
    return args + ["-p", u.prompt, *u.sdcpp_extra, "-v"]


def diffusers_snippet(u: FamilyUsage, gguf_name: str) -> list[str]:
    """Python that loads ``gguf_name`` as diffusers users do, then builds the family's pipeline."""
    call = "image = pipe(image=load_image(\"input.png\"), prompt=PROMPT).images[0]" if u.edits_images \
        else "image = pipe(prompt=PROMPT).images[0]"
    return [
        "import torch",
        f"from diffusers import {u.pipeline_class}, {u.transformer_class}, GGUFQuantizationConfig",
        *(["from diffusers.utils import load_image"] if u.edits_images else []),
        "",
        f"transformer = {u.transformer_class}.from_single_file(",
        f"    {gguf_name!r},  # the file you downloaded",
        "    quantization_config=GGUFQuantizationConfig(compute_dtype=torch.bfloat16),",
        f"    config={u.diffusers_repo!r},",
        "    subfolder=\"transformer\",",
        "    torch_dtype=torch.bfloat16,",
        ")",
        f"pipe = {u.pipeline_class}.from_pretrained({u.diffusers_repo!r}, transformer=transformer, torch_dtype=torch.bfloat16)",
        "pipe.enable_model_cpu_offload()",
        f"PROMPT = {u.prompt!r}",
        call,
        "image.save(\"output.png\")",
    ]


def how_to_use(family: str, gguf_names: list[str]) -> list[str]:
    """The card's "How to use" section for ``family`` (a FAMILIES key), with the release's first file."""
    u = FAMILIES.get(family)
    if u is None or not gguf_names:
        return ["## How to use", "",
                f"This release's model family (`{family}`) has no verified usage notes here; the files load "
                "wherever FLUX GGUF files do (ComfyUI-GGUF, diffusers, stable-diffusion.cpp).", ""]
    name = gguf_names[0]
    text = " and ".join(f"`{f.name}`" for f in u.comfy_text_files)
    out = ["## How to use", "",
           f"Any file below stands in for `{name}`; the examples run {u.label}.", "",
           "### ComfyUI (ComfyUI-GGUF)", "",
           "1. Install [ComfyUI-GGUF](https://github.com/city96/ComfyUI-GGUF) into `ComfyUI/custom_nodes`.",
           f"2. Put `{name}` into `ComfyUI/models/diffusion_models` (or the older `ComfyUI/models/unet`) and load it "
           "with the **Unet Loader (GGUF)** node (`UnetLoaderGGUF`).",
           f"3. Text encoders into `ComfyUI/models/text_encoders`: {_links(u.comfy_text_files)}; load {text} with "
           f"`{u.comfy_text_node}`, type `{u.comfy_text_type}`.",
           f"4. VAE into `ComfyUI/models/vae`: {_links((u.comfy_vae,))}; load it with `VAELoader`.", "",
           "### diffusers", "",
           "Needs `pip install diffusers gguf accelerate`; the rest of the pipeline (text encoders, VAE) "
           f"comes from [{u.diffusers_repo}](https://huggingface.co/{u.diffusers_repo}).", "",
           "```python", *diffusers_snippet(u, name), "```", "",
           "### stable-diffusion.cpp", "",
           "Files: " + _links((u.sdcpp_vae, *(f for _, f in u.sdcpp_text_flags))) + ".", "",
           "```sh", " ".join(_fence_safe(a) for a in sdcpp_command(u, name)), "```", ""]
    return out
