"""The model card as a downstream user reads it: front matter the Hub accepts, links that resolve
inside the release, tables a Markdown parser reads as tables, and usage snippets that work.

The consumers' documented arguments are transcribed below with their sources, so a snippet
that names a flag, node or folder they do not have fails here, not on a user's machine.
"""
from __future__ import annotations

import importlib.util
import re
import shlex
from pathlib import Path

import pytest
import yaml
from flux_small import small_flux
from huggingface_hub import ModelCard, ModelCardData
from imatrix_fixtures import write_synthetic_imatrix
from markdown_it import MarkdownIt

from converter.cli.example import EXAMPLE_GEOMETRY, EXAMPLE_NAME, example_spec
from converter.layout import FluxGeometry
from converter.quality.diffusers_model import write_transformer_config
from converter.release.build import build_release
from converter.release.modelcard import (ACTIVATIONS_1024_BY_FAMILY, ACTIVATIONS_1024_BYTES, FLUX2_DEV_ACTIVATIONS_1024_BYTES,
                                        KLEIN_4B_ACTIVATIONS_1024_BYTES, KLEIN_9B_ACTIVATIONS_1024_BYTES,
                                        CardFile, gpu_section, md_text)
from converter.release.usage import FAMILIES
from converter.synthetic import write_synthetic_flux

# stable-diffusion.cpp examples/cli/README.md (leejet/stable-diffusion.cpp): the sd-cli options the card
# may use; those that take a value are listed with True.
SDCPP_FLAGS = {"--diffusion-model": True, "--vae": True, "--clip_l": True, "--t5xxl": True, "--llm": True,
               "-p": True, "--prompt": True, "--cfg-scale": True, "--sampling-method": True, "--steps": True,
               "-r": True, "--ref-image": True, "-v": False, "--verbose": False, "--diffusion-fa": False,
               "--offload-to-cpu": False, "--clip-on-cpu": False, "-o": True, "-H": True, "-W": True}
SDCPP_SAMPLERS = {"euler", "euler_a", "heun", "dpm2", "dpm++2s_a", "dpm++2m", "dpm++2mv2", "ipndm", "ipndm_v", "lcm",
                  "ddim_trailing", "tcd", "res_multistep", "res_2s"}
# city96/ComfyUI-GGUF nodes.py: NODE_CLASS_MAPPINGS, the UnetLoaderGGUF TITLE, and the folders its
# update_folder_names_and_paths("unet_gguf", ["diffusion_models", "unet"]) / ("clip_gguf", ["text_encoders", "clip"]) use.
COMFY_NODES = {"UnetLoaderGGUF", "CLIPLoaderGGUF", "DualCLIPLoaderGGUF", "TripleCLIPLoaderGGUF",
               "QuadrupleCLIPLoaderGGUF", "UnetLoaderGGUFAdvanced"}
COMFY_UNET_TITLE = "Unet Loader (GGUF)"
COMFY_FOLDERS = {"ComfyUI/models/diffusion_models", "ComfyUI/models/unet", "ComfyUI/models/text_encoders",
                 "ComfyUI/models/vae", "ComfyUI/custom_nodes"}
# ComfyUI nodes.py DualCLIPLoader ("flux: clip-l, t5") and CLIPLoader (… "flux2" …) type lists (the parts used here).
COMFY_TYPES = {"DualCLIPLoaderGGUF": {"sdxl", "sd3", "flux", "hunyuan_video", "hidream"},
               "CLIPLoaderGGUF": {"stable_diffusion", "sd3", "flux2", "qwen_image"}}

BIDI = "\u202e"


def _front_and_body(text: str) -> tuple[dict, str]:
    assert text.startswith("---\n")
    front, body = text[4:].split("\n---\n", 1)
    return yaml.safe_load(front), body


def check_card(folder: Path) -> str:
    """The checks every card must pass; returns the body."""
    text = (folder / "README.md").read_text(encoding="utf-8")
    card = ModelCard(text)  # huggingface_hub's own parser: front matter must be a YAML mapping
    meta, body = _front_and_body(text)
    assert card.data.to_dict() == ModelCardData(**meta).to_dict()
    assert meta["library_name"] == "gguf" and meta["base_model_relation"] == "quantized"
    assert isinstance(meta["base_model"], str) and re.fullmatch(r"[\w.-]+/[\w.-]+", meta["base_model"])
    md = MarkdownIt("commonmark").enable("table")
    tokens = md.parse(body)
    links = [c.attrs["href"] for t in tokens if t.type == "inline" for c in (t.children or []) if c.type == "link_open"]
    assert links
    for href in links:
        if "://" not in href:
            assert (folder / href).is_file(), f"broken relative link {href}"
    separators = [ln for ln in body.splitlines() if re.fullmatch(r"\|(\s*:?-+:?\s*\|)+", ln)]
    assert len([t for t in tokens if t.type == "table_open"]) == len(separators) > 0
    for t in tokens:
        assert BIDI not in (t.content or "")
    return body


@pytest.fixture(scope="module")
def example_release(tmp_path_factory) -> Path:
    """The release `flux-gguf example` sets up: its checkpoint and its spec, built."""
    root = tmp_path_factory.mktemp("example")
    write_synthetic_flux(root / f"{EXAMPLE_NAME}.safetensors", EXAMPLE_GEOMETRY, dtype="BF16", seed=0)
    (root / "release.toml").write_text(example_spec(f"{EXAMPLE_NAME}.safetensors"))
    out = root / "dist"
    build_release(root / "release.toml", out)
    return out


@pytest.fixture(scope="module")
def calibrated_release(tmp_path_factory) -> Path:
    """A calibrated Kontext release whose title and imatrix dataset carry bidi and Markdown characters."""
    root = tmp_path_factory.mktemp("cal")
    src = write_synthetic_flux(root / "tiny.safetensors", FluxGeometry(double_blocks=1, single_blocks=1, hidden=256), seed=5)
    write_synthetic_imatrix(src, root / "tiny.imatrix.gguf", seed=1)
    (root / "release.toml").write_text(
        'name = "cal"\nsource = "tiny.safetensors"\nbase_model = "black-forest-labs/FLUX.1-Kontext-dev"\n'
        'variants = ["Q4_K_M", "Q8_0"]\nimatrix = "tiny.imatrix.gguf"\n\n[card]\nlicense = "other"\n'
        f'title = "cal {BIDI}fdp.exe *bold* [x](http://evil)"\n')
    out = root / "dist"
    build_release(root / "release.toml", out)
    return out


def _blocks(body: str, lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", body, re.S)


def test_example_card_passes_front_matter_links_and_tables(example_release):
    body = check_card(example_release)
    assert "## How to use" in body and "## Which file for my GPU" in body
    for variant in ("Q8_0", "Q4_K_M"):  # a FLUX.1 [dev] release without validation.json: size + activations
        f = example_release / f"{EXAMPLE_NAME}-{variant}.gguf"
        row = next(ln for ln in body.splitlines() if ln.startswith(f"| {f.name} |"))
        assert f"≈ {(f.stat().st_size + ACTIVATIONS_1024_BYTES) / 2**30:.2f} GiB" in row and "estimate" in row
    assert "The ≈ figures are an estimate, not a GPU measurement" in body


def test_calibrated_card_escapes_and_says_what_calibration_was(calibrated_release):
    body = check_card(calibrated_release)
    title = next(ln for ln in body.splitlines() if ln.startswith("# "))
    assert title == "# " + md_text(f"cal {BIDI}fdp.exe *bold* [x](http://evil)")
    assert "\\u202e" in title and "\\*bold\\*" in title and "\\[x\\]" in title
    assert "collected on: test:seed=1" in body
    assert "It was collected by running the model on the inputs named above" in body
    assert "FluxKontextPipeline" in body  # base_model tells Kontext from dev


def test_sdcpp_command_uses_only_documented_flags(example_release):
    body = (example_release / "README.md").read_text()
    (cmd,) = [b for b in _blocks(body, "sh") if b.startswith("sd-cli")]
    args = shlex.split(cmd)
    assert args[0] == "sd-cli"
    i, seen = 1, {}
    while i < len(args):
        flag = args[i]
        assert flag in SDCPP_FLAGS, f"{flag} is not an sd-cli option"
        if SDCPP_FLAGS[flag]:
            seen[flag] = args[i + 1]
            i += 2
        else:
            seen[flag] = None
            i += 1
    assert (example_release / seen["--diffusion-model"]).is_file()
    assert seen["--sampling-method"] in SDCPP_SAMPLERS and float(seen["--cfg-scale"]) == 1.0
    u = FAMILIES["flux-dev"]
    assert seen["--vae"] == u.sdcpp_vae.name and seen["--t5xxl"] == "t5xxl_fp16.safetensors"


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_every_family_names_only_documented_nodes_folders_and_flags(family):
    from converter.release.usage import how_to_use, sdcpp_command
    u = FAMILIES[family]
    text = "\n".join(how_to_use(family, ["x-Q4_K_M.gguf"]))
    assert COMFY_UNET_TITLE in text and "`UnetLoaderGGUF`" in text
    assert u.comfy_text_node in COMFY_NODES and u.comfy_text_type in COMFY_TYPES[u.comfy_text_node]
    for folder in re.findall(r"`(ComfyUI/[\w/]+)`", text):
        assert folder in COMFY_FOLDERS
    args = sdcpp_command(u, "x-Q4_K_M.gguf")
    assert [a for a in args[1:] if a.startswith("-") and a not in SDCPP_FLAGS] == []
    assert ("-r" in args) == u.edits_images


def test_diffusers_snippet_from_the_card_loads_the_gguf(example_release, tmp_path_factory, tmp_path):
    """Runs the card's diffusers code up to the loaded transformer. Offline, two things must differ:
    the GGUF is the diffusers-loadable small model's (the example's hidden size 512 is one diffusers'
    single-file converter cannot take), and ``config`` names a local folder holding ``transformer/config.json``
    instead of the Hub repo (``subfolder="transformer"`` stays as the card writes it). The pipeline line
    needs the base repo's text encoders and VAE from the Hub, so the snippet is cut before it."""
    body = (example_release / "README.md").read_text()
    (code,) = _blocks(body, "python")
    u = FAMILIES["flux-dev"]
    gguf_name = f"{EXAMPLE_NAME}-Q8_0.gguf"
    assert f"    {gguf_name!r},  # the file you downloaded" in code
    assert f"config={u.diffusers_repo!r}," in code and 'subfolder="transformer",' in code
    small = small_flux(tmp_path_factory)
    write_transformer_config(small.geometry, tmp_path / "base" / "transformer")
    head = code.split("\npipe = ")[0]
    head = head.replace(repr(gguf_name), repr(str(small.q8_0))).replace(repr(u.diffusers_repo), repr(str(tmp_path / "base")))
    scope: dict = {}
    exec(compile(head, "card-snippet", "exec"), scope)  # noqa: S102 - the card's own code
    model = scope["transformer"]
    assert type(model).__name__ == "FluxTransformer2DModel"
    assert any(type(p).__name__ == "GGUFParameter" for p in model.parameters())  # kept quantized


def test_measured_vram_and_speed_from_the_validation_report_replace_the_estimate(tmp_path):
    from converter.release.modelcard import CardFile, gpu_section, read_validation_report
    files = [CardFile("m-Q4_K_M.gguf", "Q4_K_M", 6_932_000_000, "0" * 64, 4.66, {}),
             CardFile("m-Q8_0.gguf", "Q8_0", 12_714_000_000, "1" * 64, 8.5, {})]
    report = tmp_path / "validation.json"
    report.write_text('{"variants": [{"file": "m-Q4_K_M.gguf", "peak_memory_bytes": 9663676416, '
                      '"seconds_per_step": 0.8123, "ssim": 0.97}]}')
    figures = read_validation_report(report, files)
    assert figures == {"Q4_K_M": {"peak_memory_bytes": 9663676416.0, "seconds_per_step": 0.8123, "ssim": 0.97}}
    rows = {ln.split(" | ")[0]: ln for ln in gpu_section(files, figures) if ln.startswith("| m-")}
    assert rows["| m-Q4_K_M.gguf"] == ("| m-Q4_K_M.gguf | 4.66 | 6.932 GB | 9.00 GiB | 0.812 | "
                                       "measured (`flux-gguf bench`, `validation.json`) |")
    assert " | ≥ 11.84 GiB | – | estimate: the weights alone" in rows["| m-Q8_0.gguf"]


def _rows(lines: list[str]) -> dict[str, str]:
    return {ln.split(" | ")[0].removeprefix("| "): ln for ln in lines if ln.startswith("| m-")}


CARD_FILES = [CardFile("m-Q4_K_M.gguf", "Q4_K_M", 6_932_000_000, "0" * 64, 4.66, {}),
              CardFile("m-Q8_0.gguf", "Q8_0", 12_714_000_000, "1" * 64, 8.5, {})]


@pytest.mark.parametrize("family, activations", [("flux-dev", ACTIVATIONS_1024_BYTES),
                                                  ("flux-kontext", ACTIVATIONS_1024_BYTES),
                                                  ("flux-schnell", ACTIVATIONS_1024_BYTES),
                                                  ("flux2-klein-4b", KLEIN_4B_ACTIVATIONS_1024_BYTES),
                                                  ("flux2-klein-9b", KLEIN_9B_ACTIVATIONS_1024_BYTES),
                                                  ("flux2-dev", FLUX2_DEV_ACTIVATIONS_1024_BYTES)])
def test_estimate_is_file_size_plus_the_familys_measured_activations(family, activations):
    assert ACTIVATIONS_1024_BY_FAMILY[family] == activations > 0
    lines = gpu_section(CARD_FILES, {}, family)
    for f in CARD_FILES:
        row = _rows(lines)[f.path]
        assert f" | ≈ {(f.size + activations) / 2**30:.2f} GiB | – | " in row
        assert row.endswith("| estimate: file size + activations at 1024x1024 measured on CPU |")
    note = next(ln for ln in lines if ln.startswith("The ≈ figures"))
    assert "estimate" in note and "measured on CPU" in note and f"{activations / 2**30:.2f} GiB" in note


def test_flux2_klein_4b_has_its_own_figure_not_flux1s():
    assert KLEIN_4B_ACTIVATIONS_1024_BYTES != ACTIVATIONS_1024_BYTES
    klein = _rows(gpu_section(CARD_FILES, {}, "flux2-klein-4b"))["m-Q8_0.gguf"]
    assert f"≈ {(CARD_FILES[1].size + ACTIVATIONS_1024_BYTES) / 2**30:.2f} GiB" not in klein


@pytest.mark.parametrize("family", ["flux-fill", "flux-depth-canny", ""])
def test_a_family_without_its_own_figure_gets_no_flux1_estimate(family):
    assert family not in ACTIVATIONS_1024_BY_FAMILY
    lines = gpu_section(CARD_FILES, {}, family)
    for f in CARD_FILES:
        row = _rows(lines)[f.path]
        assert f" | ≥ {f.size / 2**30:.2f} GiB | " in row and "the weights alone" in row and "≈" not in row
    assert not any(ln.startswith("The ≈ figures") for ln in lines)


def test_a_measured_figure_replaces_the_estimate_for_a_family_that_has_one(tmp_path):
    from converter.release.modelcard import read_validation_report
    report = tmp_path / "validation.json"
    report.write_text('{"variants": {"Q8_0": {"peak_memory_bytes": 14000000000}}}')
    rows = _rows(gpu_section(CARD_FILES, read_validation_report(report, CARD_FILES), "flux-kontext"))
    assert f" | {14e9 / 2**30:.2f} GiB | – | measured" in rows["m-Q8_0.gguf"]
    assert f"≈ {(CARD_FILES[0].size + ACTIVATIONS_1024_BYTES) / 2**30:.2f} GiB" in rows["m-Q4_K_M.gguf"]


def test_activation_measurement_counts_exactly_the_bytes_allocated_during_the_call(tmp_path):
    """scripts/measure_activations.py's CPU method: the profiler's running allocator total, peak minus
    the value before the call; memory allocated before the call is not counted, a free lowers the total."""
    import torch
    from torch.profiler import ProfilerActivity, profile
    path = Path(__file__).resolve().parents[2] / "scripts" / "measure_activations.py"
    spec = importlib.util.spec_from_file_location("measure_activations", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    mib = 1 << 20
    before = torch.empty(7 * mib, dtype=torch.uint8)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        a = torch.empty(3 * mib, dtype=torch.uint8)
        b = torch.empty(5 * mib, dtype=torch.uint8)
        del a
        c = torch.empty(2 * mib, dtype=torch.uint8)
        del b, c
    prof.export_chrome_trace(str(tmp_path / "trace.json"))
    peak, events = script._profiler_peak(tmp_path / "trace.json")
    assert (peak, events) == (8 * mib, 6)
    del before


def test_klein_9b_usage_names_qwen3_8b_and_the_9b_repos():
    from converter.release.usage import how_to_use, sdcpp_command
    u = FAMILIES["flux2-klein-9b"]
    text = "\n".join(how_to_use("flux2-klein-9b", ["x-Q4_K_M.gguf"]))
    assert "FLUX.2 [klein] 9B" in text and "Flux2KleinPipeline" in text and "Flux2Transformer2DModel" in text
    assert "config='black-forest-labs/FLUX.2-klein-9B'" in text
    assert "https://huggingface.co/Comfy-Org/flux2-klein-9B/blob/main/split_files/text_encoders/qwen_3_8b_fp8mixed.safetensors" in text
    assert "https://huggingface.co/Comfy-Org/flux2-klein-9B/tree/main/split_files/text_encoders" in text
    args = sdcpp_command(u, "x-Q4_K_M.gguf")
    assert args[args.index("--llm") + 1] == "qwen_3_8b.safetensors" and args[args.index("--vae") + 1] == "flux2_ae.safetensors"
    assert "qwen_3_4b" not in text  # not the 4B's encoder
