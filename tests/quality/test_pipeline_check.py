"""The --pipeline check on a tiny randomly initialized FluxKontextPipeline, built here, offline.

Text encoders, tokenizers and VAE are tiny (made from in-memory vocabularies and configs); the
transformer is the small FLUX-layout model, loaded from its source file and from its GGUF files
exactly as a user's would be.
"""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
from click.testing import CliRunner

from converter.cli import main
from converter.errors import ValidationError
from converter.quality.pipeline_check import compare_images, pipeline_check
from tests.flux_small import small_flux

PROMPT = "make the cat wear a red hat"
WORDS = ["a", "cat", "dog", "red", "blue", "make", "the", "wear", "hat"]
RENDER = dict(steps=2, height=64, width=64, max_sequence_length=32, seed=7)


def _tiny_pipeline(folder):
    """Save a FluxKontextPipeline with tiny random components and no transformer."""
    import torch
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        FluxKontextPipeline,
    )
    from transformers import (
        CLIPTextConfig,
        CLIPTextModel,
        CLIPTokenizer,
        T5Config,
        T5EncoderModel,
        T5Tokenizer,
    )

    torch.manual_seed(0)
    clip_vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for w in WORDS:
        clip_vocab[w + "</w>"] = len(clip_vocab)
    for c in "abcdefghijklmnopqrstuvwxyz":
        clip_vocab.setdefault(c, len(clip_vocab))
        clip_vocab.setdefault(c + "</w>", len(clip_vocab))
    tokenizer = CLIPTokenizer(vocab=clip_vocab, merges=[], model_max_length=77)
    t5_vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + [("\u2581" + w, -1.0) for w in WORDS]
    t5_vocab += [(c, -2.0) for c in "abcdefghijklmnopqrstuvwxyz"]
    tokenizer_2 = T5Tokenizer(vocab=t5_vocab, extra_ids=0)
    # The transformer fixes the widths: CLIP's pooled output is 768 wide, T5's hidden states 4096.
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(clip_vocab), hidden_size=768, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=2, projection_dim=768, max_position_embeddings=77,
        bos_token_id=0, eos_token_id=1, pad_token_id=1))
    text_encoder_2 = T5EncoderModel(T5Config(
        vocab_size=len(t5_vocab), d_model=4096, d_ff=64, d_kv=16, num_layers=1, num_heads=2,
        relative_attention_num_buckets=8, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1))
    # Four blocks keep FLUX's 8x downsampling; 16 latent channels as FLUX's VAE has.
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(16, 16, 16, 16),
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=1, norm_num_groups=8, use_quant_conv=False, use_post_quant_conv=False,
        shift_factor=0.1159, scaling_factor=0.3611)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_image_seq_len=256,
                                                max_image_seq_len=4096, base_shift=0.5, max_shift=1.15)
    pipe = FluxKontextPipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                               text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2, transformer=None)
    pipe.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    return small_flux(tmp_path_factory)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from PIL import Image

    base = tmp_path_factory.mktemp("kontext")
    pipe = _tiny_pipeline(base / "pipeline")
    image = base / "cat.png"
    rng = np.random.default_rng(0)
    Image.fromarray((rng.random((48, 80, 3)) * 255).astype(np.uint8)).save(image)
    return pipe, image


def test_compare_images_known_values():
    from skimage.metrics import structural_similarity

    rng = np.random.default_rng(1)
    a = rng.random((32, 40, 3))
    assert compare_images(a, a) == (1.0, math.inf)
    b = np.clip(a + 0.1, 0, 1)
    ssim, psnr = compare_images(a, b)
    assert psnr == pytest.approx(10 * math.log10(1 / np.mean((a - b) ** 2)))
    assert ssim == pytest.approx(structural_similarity(a, b, channel_axis=-1, data_range=1.0))
    assert compare_images(a[:5, :5], a[:5, :5])[0] == 1.0  # smaller than SSIM's default window
    with pytest.raises(ValidationError, match=r"images must both be \(height, width, 3\)"):
        compare_images(a, a[..., :1])


def test_bf16_gguf_renders_the_same_image(small, setup, tmp_path):
    pipe, image = setup
    r = pipeline_check(small.bf16, small.source, pipe, image, PROMPT, device="cpu", save_dir=tmp_path, **RENDER)
    assert (r.ssim, r.psnr_db) == (1.0, math.inf) and r.passes
    assert (r.height, r.width, r.steps, r.seed, r.image) == (64, 64, 2, 7, "cat.png")
    src, gg = tmp_path / "render-source.png", tmp_path / f"render-{small.bf16.stem}.png"
    assert src.read_bytes() == gg.read_bytes()
    d = r.to_dict()
    assert d["psnr_db"] is None and d["passes"] is True and d["ssim_bar"] == 0.95


def test_q8_0_gguf_renders_a_close_image(small, setup, tmp_path):
    from PIL import Image

    pipe, image = setup
    r = pipeline_check(small.q8_0, small.source, pipe, image, PROMPT, device="cpu", save_dir=tmp_path, **RENDER)
    assert 0.95 < r.ssim < 1.0 and 25 < r.psnr_db < math.inf and r.passes
    # The metrics describe the images that were saved (8-bit rounding aside).
    a = np.asarray(Image.open(tmp_path / "render-source.png"), dtype=np.float64) / 255
    b = np.asarray(Image.open(tmp_path / f"render-{small.q8_0.stem}.png"), dtype=np.float64) / 255
    assert a.shape == (64, 64, 3)
    assert compare_images(a, b)[0] == pytest.approx(r.ssim, abs=0.02)


def test_pipeline_check_errors(small, setup, tmp_path):
    pipe, image = setup
    with pytest.raises(ValidationError) as e:
        pipeline_check(small.q8_0, small.source, tmp_path, image, PROMPT, device="cpu", **RENDER)
    assert str(e.value) == (
        f"{tmp_path}: not a diffusers pipeline folder (expected model_index.json, as in a local copy of "
        "black-forest-labs/FLUX.1-Kontext-dev)"
    )
    with pytest.raises(ValidationError) as e:
        pipeline_check(small.q8_0, small.source, pipe, tmp_path / "none.png", PROMPT, device="cpu", **RENDER)
    assert str(e.value) == f"{tmp_path / 'none.png'}: no such image file"
    (tmp_path / "text.png").write_text("not an image")
    with pytest.raises(ValidationError, match=r"text\.png: not a readable image"):
        pipeline_check(small.q8_0, small.source, pipe, tmp_path / "text.png", PROMPT, device="cpu", **RENDER)
    with pytest.raises(ValidationError) as e:
        pipeline_check(small.q8_0, small.source, pipe, image, PROMPT, device="cpu", height=64)
    assert str(e.value) == "give both --height and --width, or neither"


def test_cli_validate_with_pipeline(small, setup, tmp_path):
    pipe, image = setup
    out = tmp_path / "validation.json"
    res = CliRunner().invoke(main, [
        "validate", str(small.q8_0), "--source", str(small.source), "--device", "cpu",
        "--height", "32", "--width", "32", "--text-tokens", "16",
        "--pipeline", str(pipe), "--image", str(image), "--prompt", PROMPT, "--steps", "2", "--seed", "7",
        "--render-height", "64", "--render-width", "64", "--max-sequence-length", "32", "-o", str(out)])
    assert res.exit_code == 0, res.output
    assert "pipeline render (64x64, 2 steps): SSIM 0.9" in res.stdout and "passes SSIM > 0.95" in res.stdout
    entry = json.loads(out.read_text())["variants"][small.q8_0.name]
    assert entry["pipeline"]["passes"] is True and entry["pipeline"]["prompt"] == PROMPT
    assert entry["outputs"]["cosine"] > 0.999
