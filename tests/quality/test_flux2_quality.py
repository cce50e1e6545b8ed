"""validate, bench, imatrix, sensitivity and convert --target-size on FLUX.2, through the CLI, with the
FLUX.2 probe (Flux2Pipeline-shaped inputs: 128 channels, 4-axis ids, the model's text width, a
reference image).

The model is a synthetic FLUX.2 [klein] 4B layout (its real 5 + 20 blocks, hidden 256, seeded,
``structured``): small enough for the CPU, wide enough (256 columns) for every K-quant.
"""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from gguf import GGUFReader

from converter.cli import main
from converter.imatrix import read_imatrix
from converter.layout import FLUX2, bfl_tensor_shapes, flux2_geometry
from converter.quality.calibrate import (build_transformer, open_transformer, probe_samples,
                                         quantized_weight_names)
from converter.quality.diffusers_model import run_probe
from converter.quality.probes import (FLUX2_REFERENCE_T, Flux2Probe, KontextProbe, ProbeSpec, make_kontext_probe,
                                      make_probe)
from converter.sources import open_source
from converter.synthetic import write_synthetic_flux

GEO = flux2_geometry("flux2-klein-4b", hidden=256)
SPEC = ProbeSpec(height=32, width=48, text_tokens=8, seed=2)  # 2 x 3 target tokens + as many reference tokens
PROBE = ["--height", "32", "--width", "32", "--text-tokens", "8", "--device", "cpu"]
CALIBRATE = ["--probes", "2", *PROBE]


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """The source, its imatrix (CLI), and Q8_0 / Q3_K_S files (convert --imatrix)."""
    d = tmp_path_factory.mktemp("flux2q")
    src = write_synthetic_flux(d / "klein.safetensors", GEO, seed=3, structured=True)
    r = run("imatrix", src, "-o", d / "klein.imatrix.gguf", *CALIBRATE)
    assert r.exit_code == 0, r.output
    r = run("convert", src, "-o", d, "--variant", "Q8_0,Q3_K_S", "--imatrix", d / "klein.imatrix.gguf")
    assert r.exit_code == 0, r.output
    return d, src


# --------------------------------------------------------------------------- the probe


def test_flux2_probe_follows_the_flux2_pipeline():
    p = make_probe(SPEC, GEO)
    assert isinstance(p, Flux2Probe) and p.arch == FLUX2
    assert p.hidden_states.shape == (1, 12, 128)
    assert p.encoder_hidden_states.shape == (1, 8, GEO.context_dim) == (1, 8, 7680)
    # target (T=0) then the reference image (T=10), row-major (H, W), L = 0: Flux2Pipeline's ids
    grid = [(r, c) for r in range(2) for c in range(3)]
    assert p.img_ids.tolist() == [[0, r, c, 0] for r, c in grid] + [[FLUX2_REFERENCE_T, r, c, 0] for r, c in grid]
    assert p.txt_ids.tolist() == [[0, 0, 0, k] for k in range(8)]
    again = make_probe(SPEC, GEO)
    assert np.array_equal(again.hidden_states, p.hidden_states)
    assert np.array_equal(again.encoder_hidden_states, p.encoder_hidden_states)
    other = make_probe(ProbeSpec(height=32, width=48, text_tokens=8, seed=3), GEO)
    assert not np.array_equal(other.hidden_states, p.hidden_states)
    alone = make_probe(ProbeSpec(height=32, width=48, text_tokens=8, context_image=False), GEO)
    assert alone.hidden_states.shape == (1, 6, 128) and alone.img_ids[:, 0].tolist() == [0] * 6


def test_flux2_probe_kwargs_pass_guidance_only_to_models_that_embed_it():
    p = make_probe(SPEC, GEO)
    kw = p.transformer_kwargs("cpu", torch.bfloat16, guidance_embeds=False)  # [klein]
    assert set(kw) == {"hidden_states", "encoder_hidden_states", "timestep", "img_ids", "txt_ids"}
    assert kw["hidden_states"].dtype == torch.bfloat16 and kw["img_ids"].dtype == torch.float32
    dev = p.transformer_kwargs("cpu", torch.float32, guidance_embeds=True)  # [dev]
    assert dev["guidance"].tolist() == [SPEC.guidance] and dev["timestep"].tolist() == [SPEC.timestep]
    assert isinstance(make_probe(SPEC, flux2_geometry("flux2-dev", hidden=256)), Flux2Probe)


def test_run_probe_returns_the_target_tokens(work):
    _d, src = work
    with open_source(src) as s:
        model = build_transformer(GEO, s.read, "cpu")
    out = run_probe(model, make_probe(SPEC, GEO), "cpu")
    assert out.shape == (1, 6, 128) and out.dtype == np.float32 and np.isfinite(out).all()
    # the FLUX.1 probe (tests/quality/test_flux2_model.py: refused by this model) is still Kontext's
    assert isinstance(make_kontext_probe(SPEC), KontextProbe)


def test_probe_samples_are_flux2_probes_with_spread_timesteps():
    samples = list(probe_samples(3, SPEC, "cpu", torch.float32, GEO.guidance, GEO))
    assert [s.kwargs["timestep"].item() for s in samples] == [0.25, 0.5, 0.75]
    assert all(s.kwargs["img_ids"].shape == (12, 4) and "guidance" not in s.kwargs for s in samples)
    assert all(s.tokens == 12 + 8 for s in samples)


# --------------------------------------------------------------------------- validate and bench


def test_validate_flux2_q8_0_beats_q3_k_s(work):
    d, src = work
    metrics = {}
    for variant in ("Q8_0", "Q3_K_S"):
        r = run("validate", d / f"klein-{variant}.gguf", "--source", src, "--json", *PROBE)
        assert r.exit_code == 0, r.output
        doc = json.loads(r.stdout)
        assert doc["probe"]["image_tokens"] == 8 and doc["device"] == "cpu"
        metrics[variant] = doc["outputs"]
        assert math.isfinite(doc["outputs"]["rel_l2"]) and math.isfinite(doc["outputs"]["cosine"])
        assert 0 < doc["outputs"]["rel_l2"] < 1 and 0.9 < doc["outputs"]["cosine"] < 1
    assert metrics["Q8_0"]["rel_l2"] < metrics["Q3_K_S"]["rel_l2"]
    assert metrics["Q8_0"]["cosine"] > metrics["Q3_K_S"]["cosine"]


def test_bench_flux2_with_baseline(work, tmp_path):
    d, src = work
    r = run("bench", d / "klein-Q8_0.gguf", d / "klein-Q3_K_S.gguf", "--baseline", src, "--steps", "1",
            "--warmup", "1", "--json", "-o", tmp_path, *PROBE)
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    base, q8, q3 = doc["records"]
    assert base["is_baseline"] and base["label"] == "BF16"
    assert (q8["label"], q8["imatrix"]) == ("Q8_0", None)  # Q8_0 takes no imatrix
    assert (q3["label"], q3["imatrix"]) == ("Q3_K_S", "klein.imatrix.gguf")
    for rec in (q8, q3):
        assert 0 < rec["rel_l2"] < 1 and 0.9 < rec["cosine"] < 1 and rec["seconds_per_step"] > 0
    assert q8["rel_l2"] < q3["rel_l2"]
    assert (tmp_path / "bench.md").is_file()


# --------------------------------------------------------------------------- imatrix


def test_imatrix_covers_the_flux2_tensors_and_convert_uses_it(work):
    d, src = work
    im = read_imatrix(d / "klein.imatrix.gguf")
    shapes = bfl_tensor_shapes(GEO)
    names = quantized_weight_names(shapes)
    assert set(im.entries) == set(names)
    assert {"double_stream_modulation_img.lin.weight", "double_stream_modulation_txt.lin.weight",
            "single_stream_modulation.lin.weight", "single_blocks.19.linear1.weight"} <= set(im.entries)
    for n, e in im.entries.items():
        assert e.in_sum2.shape == (shapes[n][1],) and e.count > 0 and np.isfinite(e.in_sum2).all(), n
    # 2 probes of 4 target + 4 reference + 8 text tokens, every token seen once by the double blocks' image
    # stream: 8 image tokens a probe
    assert im.entries["double_blocks.0.img_attn.qkv.weight"].count == 2 * 8
    assert im.entries["single_blocks.0.linear1.weight"].count == 2 * 16
    reader = GGUFReader(d / "klein-Q3_K_S.gguf")
    assert reader.fields["quantize.imatrix.file"].contents() == "klein.imatrix.gguf"


def test_pipeline_paths_refuse_flux2_in_one_line(work, tmp_path):
    from PIL import Image

    d, src = work
    pipe = tmp_path / "pipe"
    pipe.mkdir()
    (pipe / "model_index.json").write_text("{}")
    Image.new("RGB", (32, 32)).save(tmp_path / "in.png")
    (tmp_path / "prompts.txt").write_text("make it snow\n")
    line = ("Error: --pipeline renders with FluxKontextPipeline (FLUX.1 Kontext: T5 and CLIP text encoders); "
            "this is a FLUX.2 transformer, whose Flux2Pipeline (Mistral or Qwen3 text encoder) flux-gguf does not "
            "drive: use the seeded probes or --inputs (captured Flux2Pipeline calls)")
    r = run("validate", d / "klein-Q8_0.gguf", "--source", src, "--device", "cpu", "--pipeline", pipe,
            "--image", tmp_path / "in.png", "--prompt", "make it snow")
    assert r.exit_code == 1 and r.output.strip().splitlines()[-1] == line
    for command in ("imatrix", "sensitivity"):
        r = run(command, src, "-o", tmp_path / f"x.{command}", "--device", "cpu", "--pipeline", pipe,
                "--prompts", tmp_path / "prompts.txt")
        assert r.exit_code == 1 and r.output.strip().splitlines()[-1] == line, (command, r.output)
        assert not (tmp_path / f"x.{command}").exists()


# --------------------------------------------------------------------------- sensitivity and --target-size


def test_sensitivity_then_target_size_fits_the_budget_and_diffusers_runs_it(work, tmp_path):
    d, src = work
    sens = tmp_path / "klein.sensitivity.json"
    r = run("sensitivity", src, "-o", sens, "--imatrix", d / "klein.imatrix.gguf", "--check-tensors", "4",
            *CALIBRATE)
    assert r.exit_code == 0, r.output
    doc = json.loads(sens.read_text())
    names = quantized_weight_names(bfl_tensor_shapes(GEO))
    assert set(doc["tensors"]) == set(names)
    mod = doc["tensors"]["double_stream_modulation_img.lin.weight"]
    assert mod["measured"]["Q4_K"] > 0 and mod["gain"] > 0  # the shared modulation was injected and measured
    assert all(t["measured"]["Q4_K"] >= 0 and math.isfinite(t["gain"]) for t in doc["tensors"].values())
    assert doc["inputs"]["kind"] == "probes" and doc["check"]["pairs"] > 0

    # a budget between the Q3_K_S and Q8_0 files: the allocator must mix types
    budget = (d / "klein-Q3_K_S.gguf").stat().st_size + (d / "klein-Q8_0.gguf").stat().st_size
    budget //= 2
    args = ["convert", src, "-o", tmp_path, "--target-size", f"{budget}B", "--sensitivity", sens,
            "--imatrix", d / "klein.imatrix.gguf", "--mix-name", "MIX"]
    dry = run(*args, "--dry-run", "--json")
    assert dry.exit_code == 0, dry.output
    planned = json.loads(dry.stdout)["plans"][0]
    r = run(*args)
    assert r.exit_code == 0, r.output
    path = tmp_path / "klein-MIX.gguf"
    assert path.stat().st_size == planned["size"] <= budget
    types = {t.tensor_type.name for t in GGUFReader(path).tensors if t.name in names}
    assert len(types) >= 2, types
    with open_transformer(path, "cpu") as (model, geometry, kind):  # diffusers' GGUF loading
        assert (kind, geometry) == ("gguf", GEO) and type(model).__name__ == "Flux2Transformer2DModel"
        out = run_probe(model, make_probe(SPEC, geometry), "cpu")
    assert out.shape == (1, 6, 128) and np.isfinite(out).all()


# --------------------------------------------------------------------------- saved inputs


def test_captured_flux2_calls_make_an_inputs_file_imatrix_reads(work, tmp_path):
    from converter.quality.calibrate import capture_transformer_inputs, read_inputs_file, write_inputs_file

    d, src = work
    with open_source(src) as s:
        model = build_transformer(GEO, s.read, "cpu")
    with capture_transformer_inputs(model) as calls, torch.inference_mode():
        for smp in probe_samples(2, SPEC, "cpu", torch.float32, GEO.guidance, GEO):
            kw = dict(smp.kwargs)  # as Flux2Pipeline passes them: batched int64 ids
            kw["img_ids"], kw["txt_ids"] = kw["img_ids"][None].long(), kw["txt_ids"][None].long()
            model(**kw, return_dict=False)
    path = write_inputs_file(calls, tmp_path / "flux2-inputs.safetensors")
    with read_inputs_file(path, GEO) as f:
        assert f.shapes == {"hidden_states": (2, 12, 128), "encoder_hidden_states": (2, 8, 7680), "timestep": (2,),
                            "img_ids": (12, 4), "txt_ids": (8, 4)}
        assert f.dtypes["img_ids"] == "F32" and f.tensor("txt_ids")[:, 3].tolist() == list(range(8))
    out = tmp_path / "from-inputs.imatrix.gguf"
    r = run("imatrix", src, "-o", out, "--inputs", path, "--device", "cpu")
    assert r.exit_code == 0, r.output
    im = read_imatrix(out)
    assert set(im.entries) == set(quantized_weight_names(bfl_tensor_shapes(GEO)))
    assert im.entries["single_blocks.0.linear1.weight"].count == 2 * (12 + 8)


def test_a_flux1_inputs_file_against_a_flux2_model_is_one_line(work, tmp_path):
    from safetensors.numpy import save_file

    _d, src = work
    f32 = np.float32
    save_file({"hidden_states": np.zeros((1, 4, 64), f32), "encoder_hidden_states": np.zeros((1, 2, 4096), f32),
               "pooled_projections": np.zeros((1, 768), f32), "timestep": np.zeros(1, f32),
               "img_ids": np.zeros((4, 3), f32), "txt_ids": np.zeros((2, 3), f32)}, str(tmp_path / "f1.safetensors"))
    r = run("imatrix", src, "-o", tmp_path / "x.gguf", "--inputs", tmp_path / "f1.safetensors", "--device", "cpu")
    assert r.exit_code == 1
    assert r.output.strip().splitlines()[-1] == (
        f"Error: {tmp_path / 'f1.safetensors'}: unexpected key(s) pooled_projections; expected exactly "
        "hidden_states, encoder_hidden_states, timestep, img_ids, txt_ids")
