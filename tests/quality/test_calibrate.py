"""imatrix collection: sums against an independent computation, inputs files, errors, the CLI, the structured model."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

from converter import __version__
from converter.cli import main
from converter.cli.output import VERSION_KEY
from converter.errors import CalibrationError
from converter.imatrix import read_imatrix
from converter.layout import FluxGeometry, bfl_tensor_shapes
from converter.quality.calibrate import (
    ImatrixCollector,
    build_transformer,
    capture_transformer_inputs,
    collect_imatrix,
    probe_samples,
    quantized_weight_names,
    read_inputs_file,
    read_prompts,
    write_inputs_file,
)
from converter.quality.probes import ProbeSpec
from converter.sources import open_source
from converter.synthetic import TEXT_OUTLIER_GAIN, text_outlier_channels, write_synthetic_flux

GEO = FluxGeometry(double_blocks=1, single_blocks=1, hidden=256)
PROBE = ProbeSpec(height=32, width=32, text_tokens=8)  # 4 target + 4 context image tokens, 8 text tokens
NAMES = quantized_weight_names(bfl_tensor_shapes(GEO))


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    return write_synthetic_flux(tmp_path_factory.mktemp("calib") / "flux.safetensors", GEO, dtype="BF16",
                                structured=True)


@pytest.fixture(scope="module")
def model(src):
    with open_source(src) as s:
        return build_transformer(GEO, s.read, "cpu")


def test_quantized_weights_are_the_recipes_quantized_tensors():
    full = quantized_weight_names(bfl_tensor_shapes(FluxGeometry()))
    assert len(full) == 19 * 10 + 38 * 3 == 304
    assert NAMES == [
        "double_blocks.0.img_mod.lin.weight", "double_blocks.0.img_attn.qkv.weight",
        "double_blocks.0.img_attn.proj.weight", "double_blocks.0.img_mlp.0.weight", "double_blocks.0.img_mlp.2.weight",
        "double_blocks.0.txt_mod.lin.weight", "double_blocks.0.txt_attn.qkv.weight",
        "double_blocks.0.txt_attn.proj.weight", "double_blocks.0.txt_mlp.0.weight", "double_blocks.0.txt_mlp.2.weight",
        "single_blocks.0.linear1.weight", "single_blocks.0.linear2.weight", "single_blocks.0.modulation.lin.weight",
    ]


def test_built_model_holds_the_source_weights(src, model):
    with open_source(src) as s:
        qkv = s.read("double_blocks.0.img_attn.qkv.weight")
        linear1 = s.read("single_blocks.0.linear1.weight")
        final = s.read("final_layer.adaLN_modulation.1.weight")
    attn = model.transformer_blocks[0].attn
    assert np.array_equal(torch.cat([attn.to_q.weight, attn.to_k.weight, attn.to_v.weight]).numpy(), qkv)
    single = model.single_transformer_blocks[0]
    parts = [single.attn.to_q.weight, single.attn.to_k.weight, single.attn.to_v.weight, single.proj_mlp.weight]
    assert np.array_equal(torch.cat(parts).numpy(), linear1)
    half = final.shape[0] // 2  # diffusers holds (scale, shift), BFL (shift, scale)
    assert np.array_equal(model.norm_out.linear.weight.numpy(), np.concatenate([final[half:], final[:half]]))


def _raw_inputs(model, samples):
    """Every Linear's inputs, captured by independent hooks (float64 numpy)."""
    seen: dict[str, list[np.ndarray]] = {}
    handles = []
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear):
            def grab(_m, args, name=name):
                seen.setdefault(name, []).append(args[0].double().reshape(-1, args[0].shape[-1]).numpy())
            handles.append(mod.register_forward_pre_hook(grab))
    with torch.inference_mode():
        for s in samples:
            model(**s.kwargs, return_dict=False)
    for h in handles:
        h.remove()
    return {k: np.concatenate(v) for k, v in seen.items()}


def test_sums_and_counts_match_the_inputs_each_weight_saw(model):
    samples = list(probe_samples(2, PROBE, "cpu", torch.float32, True))
    raw = _raw_inputs(model, samples)
    with ImatrixCollector(model, NAMES) as c:
        with torch.inference_mode():
            for s in samples:
                model(**s.kwargs, return_dict=False)
        im = c.imatrix(["test"], 2, 16)
    assert sorted(im.entries) == sorted(NAMES) and im.chunk_count == 2 and im.datasets == ["test"]
    which = {
        "double_blocks.0.img_attn.qkv.weight": ("transformer_blocks.0.attn.to_q", 2 * 8),
        "double_blocks.0.txt_attn.qkv.weight": ("transformer_blocks.0.attn.add_q_proj", 2 * 8),
        "double_blocks.0.img_mlp.2.weight": ("transformer_blocks.0.ff.net.2", 2 * 8),
        "double_blocks.0.txt_attn.proj.weight": ("transformer_blocks.0.attn.to_add_out", 2 * 8),
        "double_blocks.0.img_mod.lin.weight": ("transformer_blocks.0.norm1.linear", 2),
        "single_blocks.0.linear1.weight": ("single_transformer_blocks.0.attn.to_q", 2 * 16),
        "single_blocks.0.linear2.weight": ("single_transformer_blocks.0.proj_out", 2 * 16),
    }
    for bfl, (module, tokens) in which.items():
        x = raw[module]
        e = im.entries[bfl]
        # a shared input (qkv, linear1) is counted once, not once per part
        assert e.count == tokens == x.shape[0], bfl
        assert e.in_sum2.dtype == np.float32 and e.in_sum2.shape == (x.shape[1],)
        np.testing.assert_allclose(e.in_sum2, (x * x).sum(axis=0), rtol=2e-5, err_msg=bfl)
    # the parts of a fused weight see the very same input
    assert np.array_equal(raw["single_transformer_blocks.0.attn.to_q"], raw["single_transformer_blocks.0.proj_mlp"])


def test_every_quantized_weight_needs_an_entry(model):
    with ImatrixCollector(model, NAMES) as c, pytest.raises(CalibrationError) as e:
        c.imatrix([], 0, 0)
    assert str(e.value) == ("no input reached 13 quantized weight(s): double_blocks.0.img_mod.lin.weight, "
                            "double_blocks.0.img_attn.qkv.weight, double_blocks.0.img_attn.proj.weight, "
                            "double_blocks.0.img_mlp.0.weight, double_blocks.0.img_mlp.2.weight (and 8 more)")
    with pytest.raises(CalibrationError) as e:
        ImatrixCollector(model, [*NAMES, "double_blocks.5.img_attn.qkv.weight"])
    assert str(e.value) == "the model has no Linear layer for 1 quantized weight(s): double_blocks.5.img_attn.qkv.weight"
    assert not any(m._forward_pre_hooks for m in model.modules())  # a refused collector leaves no hooks


def test_probe_collection_reports_a_smoke_default(src):
    r = collect_imatrix(src, probes=2, probe=PROBE, device="cpu")
    assert r.smoke and r.inputs == "probes" and r.samples == 2 and r.tokens == 2 * (8 + 8)
    assert r.datasets == ("probes:seed=0..1,32x32,text=8 (smoke default, not a calibration set)",)
    d = r.to_dict()
    assert d["tensors"] == 13 and d["smoke_default"] and d["min_count"] == 2 and d["max_count"] == 32
    assert 0 < d["load_seconds"] < d["seconds"] and d["seconds_per_sample"] == (r.seconds - r.load_seconds) / 2
    assert r.imatrix.chunk_count == 2 and r.imatrix.chunk_size == 16


def test_saved_inputs_give_the_same_imatrix_as_the_run_they_were_captured_from(src, model, tmp_path):
    samples = list(probe_samples(3, PROBE, "cpu", torch.float32, True))
    with capture_transformer_inputs(model) as calls, torch.inference_mode():
        for s in samples:
            model(**s.kwargs, return_dict=False)
    path = write_inputs_file(calls, tmp_path / "inputs.safetensors")
    with read_inputs_file(path, GEO) as saved:
        shapes = {k: list(v) for k, v in saved.shapes.items()}
        assert saved.tensor("timestep").tolist() == torch.cat([c["timestep"] for c in calls]).tolist()
    assert shapes == {
        "hidden_states": [3, 8, 64], "encoder_hidden_states": [3, 8, 4096], "pooled_projections": [3, 768],
        "timestep": [3], "guidance": [3], "img_ids": [8, 3], "txt_ids": [8, 3]}
    from_file = collect_imatrix(src, inputs=path, device="cpu")
    from_probes = collect_imatrix(src, probes=3, probe=PROBE, device="cpu")
    assert from_file.inputs == "file" and not from_file.smoke and from_file.datasets == ("inputs.safetensors",)
    assert from_file.samples == 3 and from_file.tokens == from_probes.tokens
    for n in NAMES:
        a, b = from_file.imatrix.entries[n], from_probes.imatrix.entries[n]
        assert a.count == b.count
        np.testing.assert_allclose(a.in_sum2, b.in_sum2, rtol=1e-5, err_msg=n)


def _inputs(**changes):
    t = {"hidden_states": torch.zeros(2, 8, 64), "encoder_hidden_states": torch.zeros(2, 5, 4096),
         "pooled_projections": torch.zeros(2, 768), "timestep": torch.full((2,), 0.5),
         "guidance": torch.full((2,), 2.5), "img_ids": torch.zeros(8, 3), "txt_ids": torch.zeros(5, 3)}
    t.update(changes)
    return {k: v for k, v in t.items() if v is not None}


@pytest.mark.parametrize("changes, message", [
    ({"guidance": None}, "missing key(s) guidance; an inputs file holds hidden_states, encoder_hidden_states, "
                         "pooled_projections, timestep, guidance, img_ids, txt_ids (the arguments of "
                         "FluxTransformer2DModel.forward)"),
    ({"latents": torch.zeros(1)}, "unexpected key(s) latents; expected exactly hidden_states, encoder_hidden_states, "
                                  "pooled_projections, timestep, guidance, img_ids, txt_ids"),
    ({"hidden_states": torch.zeros(2, 8, 16)}, "hidden_states has shape [2, 8, 16]; expected [samples, image tokens, 64]"),
    ({"encoder_hidden_states": torch.zeros(2, 5, 768)},
     "encoder_hidden_states has shape [2, 5, 768]; expected [2, 5, 4096] (hidden_states holds 2 samples of 8 image tokens)"),
    ({"encoder_hidden_states": torch.zeros(2, 4096)}, "encoder_hidden_states has shape [2, 4096]; expected "
                                                      "[2, text tokens, 4096]"),
    ({"timestep": torch.zeros(3)}, "timestep has shape [3]; expected [2] (hidden_states holds 2 samples of 8 image tokens)"),
    ({"img_ids": torch.zeros(9, 3)}, "img_ids has shape [9, 3]; expected [8, 3] (hidden_states holds 2 samples of 8 image tokens)"),
    ({"pooled_projections": torch.full((2, 768), float("nan"))}, "pooled_projections must hold finite floating-point values"),
])
def test_a_wrong_inputs_file_is_refused_in_one_line(tmp_path, changes, message):
    path = tmp_path / "in.safetensors"
    save_file(_inputs(**changes), str(path))
    with pytest.raises(CalibrationError) as e:
        read_inputs_file(path, GEO)
    assert str(e.value) == f"{path}: {message}"


def test_unreadable_inputs_and_prompts_files_are_refused(tmp_path):
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not safetensors")
    with pytest.raises(CalibrationError) as e:
        read_inputs_file(junk, GEO)
    assert str(e.value).startswith(f"{junk}: not a readable safetensors file (")
    with pytest.raises(CalibrationError) as e:
        read_inputs_file(tmp_path / "none.safetensors", GEO)
    assert str(e.value) == f"{tmp_path / 'none.safetensors'}: no such inputs file"
    empty = tmp_path / "prompts.txt"
    empty.write_text("\n   \n# only a comment\n")
    with pytest.raises(CalibrationError) as e:
        read_prompts(empty)
    assert str(e.value) == f"{empty}: the prompts file is empty; expected one prompt per line"
    empty.write_text("make it snow\n\n# skipped\n  add a hat  \n")
    assert read_prompts(empty) == ["make it snow", "add a hat"]


def test_cli_writes_an_imatrix_file_and_a_json_summary(src, tmp_path):
    out = tmp_path / "flux.imatrix.gguf"
    res = CliRunner().invoke(main, ["imatrix", str(src), "-o", str(out), "--probes", "1", "--height", "32",
                                    "--width", "32", "--text-tokens", "8", "--device", "cpu", "--json"])
    assert res.exit_code == 0, res.output
    import json

    summary = json.loads(res.stdout)
    assert summary[VERSION_KEY] == __version__
    assert summary["tensors"] == 13 and summary["samples"] == 1 and summary["tokens"] == 16
    assert summary["smoke_default"] is True and summary["file"] == str(out)
    im = read_imatrix(out)
    assert sorted(im.entries) == sorted(NAMES) and im.chunk_count == 1 and im.chunk_size == 16
    assert im.datasets == ["probes:seed=0..0,32x32,text=8 (smoke default, not a calibration set)"]
    assert im.entries["single_blocks.0.linear1.weight"].count == 16


@pytest.mark.parametrize("args, message", [
    (["--prompts", "p.txt"], "--prompts needs --pipeline"),
    (["--pipeline", "pipe", "--inputs", "in.safetensors"], "--inputs and --pipeline exclude each other"),
    (["--pipeline", "pipe"], "--pipeline needs --prompts"),
    (["--height", "512"], "give both --height and --width, or neither"),
])
def test_cli_refuses_conflicting_options(src, tmp_path, args, message):
    res = CliRunner().invoke(main, ["imatrix", str(src), "-o", str(tmp_path / "x.gguf"), *args])
    assert res.exit_code == 1
    assert res.output.strip().splitlines()[-1] == f"Error: {message}"
    assert not (tmp_path / "x.gguf").exists()


def test_cli_pipeline_refuses_an_empty_prompts_file_before_loading_anything(src, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n")
    res = CliRunner().invoke(main, ["imatrix", str(src), "-o", str(tmp_path / "x.gguf"), "--pipeline",
                                    str(tmp_path), "--prompts", str(prompts)])
    assert res.exit_code == 1
    assert res.output.strip().splitlines()[-1] == f"Error: {prompts}: the prompts file is empty; expected one prompt per line"


def test_structured_model_changes_only_modulation_scales_and_text_outliers(tmp_path):
    geo = FluxGeometry(double_blocks=1, single_blocks=1, hidden=256)
    plain = write_synthetic_flux(tmp_path / "plain.safetensors", geo, dtype="F32")
    structured = write_synthetic_flux(tmp_path / "s.safetensors", geo, dtype="F32", structured=True)
    folder = write_synthetic_flux(tmp_path / "s-diffusers", geo, dtype="F32", structured=True, layout="diffusers")
    with open_source(plain) as p, open_source(structured) as s, open_source(folder) as d:
        changed = [n for n in p.tensors if not np.array_equal(p.read(n), s.read(n))]
        assert changed == ["txt_in.weight", "txt_in.bias", "double_blocks.0.img_mod.lin.bias",
                           "double_blocks.0.txt_mod.lin.bias", "single_blocks.0.modulation.lin.bias"]
        assert all(np.array_equal(s.read(n), d.read(n)) for n in s.tensors)  # every layout holds the same model
        rows = text_outlier_channels(256)
        w_plain, w = p.read("txt_in.weight"), s.read("txt_in.weight")
        assert np.array_equal(w[rows], (w_plain[rows] * TEXT_OUTLIER_GAIN).astype(np.float32))
        others = np.setdiff1d(np.arange(256), rows)
        assert np.array_equal(w[others], w_plain[others])
        bias, bias_plain = s.read("double_blocks.0.img_mod.lin.bias").reshape(6, 256), \
            p.read("double_blocks.0.img_mod.lin.bias").reshape(6, 256)
        assert np.array_equal(bias[[0, 2, 3, 5]], bias_plain[[0, 2, 3, 5]])  # shift and gate chunks unchanged
        gain = 1.0 + bias[[1, 4]].astype(np.float64)  # the scale chunks: 1 + scale is log-normal
        assert (gain > 0).all()
        assert abs(np.log(gain).std() - 1.2) < 0.15 and abs(np.median(np.log(gain))) < 0.2


def test_validate_and_bench_report_the_imatrix_a_gguf_records(tmp_path):
    import gguf

    from converter.cli.validate import imatrix_text
    from converter.imatrix import KV_QUANTIZE_CHUNKS, KV_QUANTIZE_DATASET, KV_QUANTIZE_ENTRIES, KV_QUANTIZE_FILE
    from converter.quality.bench import _imatrix_file
    from converter.quality.validate import imatrix_metadata, open_gguf

    def gguf_file(path, kv):
        w = gguf.GGUFWriter(str(path), "flux")
        for key, value in kv.items():
            (w.add_uint32 if isinstance(value, int) else w.add_string)(key, value)
        w.add_tensor("double_blocks.0.img_attn.qkv.weight", np.zeros((2, 32), dtype=np.float32))
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        return path

    calibrated = gguf_file(tmp_path / "flux-Q4_K_M.gguf", {
        KV_QUANTIZE_FILE: "kontext.imatrix.gguf", KV_QUANTIZE_DATASET: "prompts.txt",
        KV_QUANTIZE_ENTRIES: 304, KV_QUANTIZE_CHUNKS: 560})
    static = gguf_file(tmp_path / "flux-Q8_0.gguf", {})
    meta = imatrix_metadata(open_gguf(calibrated))
    assert meta == {"file": "kontext.imatrix.gguf", "dataset": "prompts.txt", "entries_count": 304, "chunks_count": 560}
    assert imatrix_text(meta) == "kontext.imatrix.gguf, dataset prompts.txt, 304 entries, 560 chunks"
    assert imatrix_metadata(open_gguf(static)) is None and imatrix_text(None) == "none (static quantization)"
    assert _imatrix_file(calibrated) == "kontext.imatrix.gguf" and _imatrix_file(static) is None


# --------------------------------------------------------------------------- a tiny random Kontext pipeline


def _tiny_tokenizer(max_length):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = "make it snow add a red hat blue cat dog".split()
    vocab = {"[PAD]": 0, "[UNK]": 1, "</s>": 2, **{w: i + 3 for i, w in enumerate(words)}}
    t = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    t.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=t, model_max_length=max_length, pad_token="[PAD]",
                                   unk_token="[UNK]", eos_token="</s>")


@pytest.fixture(scope="module")
def tiny_pipeline(model, tmp_path_factory):
    """FluxKontextPipeline with randomly initialised one-layer text encoders (CLIP 768 wide, T5 4096 wide:
    the widths the transformer takes), a two-level VAE and our hidden-256 transformer; saved without it."""
    import diffusers
    from PIL import Image
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    torch.manual_seed(0)
    clip = CLIPTextModel(CLIPTextConfig(vocab_size=16, hidden_size=768, intermediate_size=32, num_hidden_layers=1,
                                        num_attention_heads=2, max_position_embeddings=77, bos_token_id=0,
                                        eos_token_id=2, pad_token_id=0)).eval()
    t5 = T5EncoderModel(T5Config(vocab_size=16, d_model=4096, d_ff=32, d_kv=8, num_layers=1, num_heads=2,
                                 pad_token_id=0, eos_token_id=2)).eval()
    vae = diffusers.AutoencoderKL(in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(8, 16),
                                  down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                                  norm_num_groups=8, layers_per_block=1, shift_factor=0.1, scaling_factor=0.5).eval()
    pipe = diffusers.FluxKontextPipeline(scheduler=diffusers.FlowMatchEulerDiscreteScheduler(), vae=vae,
                                         text_encoder=clip, tokenizer=_tiny_tokenizer(77), text_encoder_2=t5,
                                         tokenizer_2=_tiny_tokenizer(512), transformer=model)
    pipe.set_progress_bar_config(disable=True)
    folder = tmp_path_factory.mktemp("pipeline")
    image = Image.fromarray((np.random.default_rng(0).random((32, 32, 3)) * 255).astype(np.uint8))
    (folder / "images").mkdir()
    image.save(folder / "images" / "a.png")
    pipe.transformer = None  # the folder holds everything but the transformer, which we pass in
    pipe.save_pretrained(folder / "pipe")
    pipe.transformer = model
    return pipe, image, folder


def test_pipeline_collection_covers_every_step_and_equals_its_captured_inputs(tiny_pipeline, model, tmp_path):
    from converter.quality.calibrate import collect_with_pipeline, file_samples

    pipe, image, _ = tiny_pipeline
    seen = []
    with capture_transformer_inputs(model) as calls:
        im, n_calls, tokens = collect_with_pipeline(pipe, ["make it snow", "add a red hat"], images=[image], steps=3,
                                                    height=32, width=32, max_sequence_length=16,
                                                    progress=lambda d, n: seen.append((d, n)))
    # 2 prompts x 3 steps; a 32x32 edit: 8x8 packed target tokens + as many context tokens, 16 text tokens
    assert n_calls == 6 and len(calls) == 6 and seen[-1] == (6, 6) and tokens == 6 * (128 + 16)
    assert im.chunk_count == 6 and im.chunk_size == 144 and im.datasets == ["pipeline"]
    assert im.entries["double_blocks.0.img_attn.qkv.weight"].count == 6 * 128
    assert im.entries["double_blocks.0.txt_attn.qkv.weight"].count == 6 * 16
    assert im.entries["single_blocks.0.linear1.weight"].count == 6 * 144
    assert im.entries["double_blocks.0.img_mod.lin.weight"].count == 6
    # the documented capture path: the same calls saved to a file and replayed give the same sums
    path = write_inputs_file(calls, tmp_path / "captured.safetensors")
    with ImatrixCollector(model, NAMES) as c, read_inputs_file(path, GEO) as saved, torch.inference_mode():
        for s in file_samples(saved, "cpu", torch.float32):
            model(**s.kwargs, return_dict=False)
        replayed = c.imatrix(["file"], 6, 144)
    for n in NAMES:
        assert replayed.entries[n].count == im.entries[n].count
        np.testing.assert_allclose(replayed.entries[n].in_sum2, im.entries[n].in_sum2, rtol=1e-5, err_msg=n)


def test_cli_collects_through_a_pipeline_folder(tiny_pipeline, src, tmp_path):
    import json

    _, _, folder = tiny_pipeline
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("make it snow\n# a comment\nadd a red hat\n")
    out = tmp_path / "p.imatrix.gguf"
    res = CliRunner().invoke(main, ["imatrix", str(src), "-o", str(out), "--pipeline", str(folder / "pipe"),
                                    "--prompts", str(prompts), "--images", str(folder / "images"), "--steps", "2",
                                    "--height", "32", "--width", "32", "--device", "cpu", "--json"])
    assert res.exit_code == 0, res.output
    summary = json.loads(res.stdout)
    assert summary["inputs"] == "pipeline" and summary["smoke_default"] is False
    assert summary["samples"] == 4 and summary["datasets"] == ["prompts.txt+images"]
    im = read_imatrix(out)
    assert sorted(im.entries) == sorted(NAMES) and im.chunk_count == 4
    assert im.entries["double_blocks.0.img_attn.qkv.weight"].count == 4 * 128


def test_a_gguf_transformer_collects_like_its_source(tmp_path_factory):
    """diffusers' GGUFLinear layers are hooked like nn.Linear: same entries and counts, sums within Q8_0's error."""
    from tests.flux_small import small_flux

    small = small_flux(tmp_path_factory)  # hidden 3072 (diffusers' GGUF loader needs it), 1 + 1 blocks
    names = quantized_weight_names(bfl_tensor_shapes(small.geometry))
    source = collect_imatrix(small.source, probes=1, probe=PROBE, device="cpu")
    gguf = collect_imatrix(small.q8_0, probes=1, probe=PROBE, device="cpu")
    assert source.model == "source" and gguf.model == "gguf" and sorted(gguf.imatrix.entries) == sorted(names)
    for n in names:
        a, b = source.imatrix.entries[n], gguf.imatrix.entries[n]
        assert a.count == b.count, n
        x, y = a.in_sum2.astype(np.float64), b.in_sum2.astype(np.float64)
        assert np.linalg.norm(x - y) <= 0.05 * np.linalg.norm(x), n


def test_collect_convert_validate_end_to_end(src, tmp_path):
    """flux-gguf imatrix -> convert --imatrix -> validate/bench name the imatrix the file was quantized with."""
    import json

    from converter.quality.bench import _imatrix_file

    runner = CliRunner()
    im = tmp_path / "tiny.imatrix.gguf"
    res = runner.invoke(main, ["imatrix", str(src), "-o", str(im), "--probes", "2", "--height", "32", "--width",
                               "32", "--text-tokens", "8", "--device", "cpu"])
    assert res.exit_code == 0, res.output
    res = runner.invoke(main, ["convert", str(src), "-o", str(tmp_path / "out"), "--variant", "Q4_K_M,Q8_0",
                               "--imatrix", str(im), "--name", "tiny"])
    assert res.exit_code == 0, res.output
    q4, q8 = tmp_path / "out" / "tiny-Q4_K_M.gguf", tmp_path / "out" / "tiny-Q8_0.gguf"
    res = runner.invoke(main, ["validate", str(q4), "--source", str(src), "--tensors-only", "--json",
                               "-o", str(tmp_path / "validation.json")])
    assert res.exit_code == 0, res.output
    meta = json.loads(res.stdout)["imatrix"]
    assert meta == {"file": "tiny.imatrix.gguf",
                    "dataset": "probes:seed=0..1,32x32,text=8 (smoke default, not a calibration set)",
                    "entries_count": 13, "chunks_count": 2}
    assert _imatrix_file(q4) == "tiny.imatrix.gguf"
    assert _imatrix_file(q8) is None  # Q8_0 ignores an imatrix, so its file does not claim one


def test_sensitivity_through_the_pipeline_collects_the_imatrix_imatrix_collects(tiny_pipeline, src, tmp_path):
    """sensitivity --pipeline --imatrix-out: the imatrix is the bytes imatrix --pipeline writes, and every
    transformer call of the render is a sample."""
    import json

    _, _, folder = tiny_pipeline
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("make it snow\nadd a red hat\n")
    inputs = ["--pipeline", folder / "pipe", "--prompts", prompts, "--images", folder / "images", "--steps", "2",
              "--height", "32", "--width", "32", "--device", "cpu"]
    runner = CliRunner()
    res = runner.invoke(main, ["imatrix", str(src), "-o", str(tmp_path / "a.gguf"), *map(str, inputs)])
    assert res.exit_code == 0, res.output
    res = runner.invoke(main, ["sensitivity", str(src), "-o", str(tmp_path / "s.json"), "--imatrix-out",
                               str(tmp_path / "b.gguf"), "--check-tensors", "2", *map(str, inputs)])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "a.gguf").read_bytes() == (tmp_path / "b.gguf").read_bytes()
    doc = json.loads((tmp_path / "s.json").read_text())
    assert doc["inputs"] == {"kind": "pipeline", "dataset": "prompts.txt+images", "samples": 4, "prompts": 2,
                             "steps": 2}
    assert doc["imatrix"]["file"] == "b.gguf" and len(doc["tensors"]) == 13
    assert all(t["measured"]["Q4_K"] > 0 for t in doc["tensors"].values())
