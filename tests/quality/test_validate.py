"""validate: probe inputs, per-tensor error figures, validation.json, end to end through diffusers."""
from __future__ import annotations

import json
import math

import gguf
import numpy as np
import pytest
from click.testing import CliRunner

from converter import __version__
from converter.cli import main
from converter.cli.output import VERSION_KEY
from converter.errors import ValidationError
from converter.layout import bfl_tensor_shapes, is_kept_unquantized
from converter.quality.probes import ProbeSpec, make_kontext_probe
from converter.quality.tensor_error import (
    block_of,
    summarize_by_block,
    summarize_by_type,
    tensor_error,
)
from converter.quality.validate import (
    compare_outputs,
    label_for,
    validate,
    write_validation_json,
)
from converter.release.modelcard import CardFile, read_validation_report
from converter.sources import open_source
from tests.flux_small import TINY, small_flux, tiny_flux

SMALL_PROBE = ProbeSpec(height=64, width=32, text_tokens=24, seed=3)
SHAPES = bfl_tensor_shapes(TINY)
# The recipe: 1-D tensors and img_in.weight are F32; other img_in/txt_in/... 2-D tensors keep BF16.
N_F32 = sum(len(s) == 1 for s in SHAPES.values()) + 1
N_KEPT_2D = sum(len(s) == 2 and is_kept_unquantized(n) for n, s in SHAPES.items()) - 1


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_flux(tmp_path_factory)


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    return small_flux(tmp_path_factory)


# --------------------------------------------------------------------------- probes


def test_probe_shapes_follow_a_kontext_edit_at_1024():
    p = make_kontext_probe(ProbeSpec())
    assert p.spec.target_tokens == 64 * 64
    assert p.hidden_states.shape == (1, 2 * 4096, 64)
    assert p.img_ids.shape == (2 * 4096, 3)
    assert p.encoder_hidden_states.shape == (1, 512, 4096)
    assert p.pooled_projections.shape == (1, 768)
    assert p.txt_ids.shape == (512, 3) and not p.txt_ids.any()
    for a in (p.hidden_states, p.img_ids, p.encoder_hidden_states, p.pooled_projections):
        assert a.dtype == np.float32


def test_probe_ids_match_the_kontext_pipeline():
    from diffusers import FluxKontextPipeline

    spec = ProbeSpec(height=96, width=64)  # 6 x 4 packed grid: rows and columns are not swapped
    p = make_kontext_probe(spec)
    target = FluxKontextPipeline._prepare_latent_image_ids(1, 6, 4, "cpu", None).numpy()
    context = target.copy()
    context[:, 0] = 1  # what prepare_latents does to the context image's ids
    np.testing.assert_array_equal(p.img_ids, np.concatenate([target, context]))


def test_probe_is_deterministic_and_seeded():
    a, b = make_kontext_probe(SMALL_PROBE), make_kontext_probe(SMALL_PROBE)
    np.testing.assert_array_equal(a.hidden_states, b.hidden_states)
    np.testing.assert_array_equal(a.encoder_hidden_states, b.encoder_hidden_states)
    c = make_kontext_probe(ProbeSpec(height=64, width=32, text_tokens=24, seed=4))
    assert not np.array_equal(a.hidden_states, c.hidden_states)


def test_probe_without_context_image_has_single_tokens():
    p = make_kontext_probe(ProbeSpec(height=32, width=32, context_image=False))
    assert p.hidden_states.shape == (1, 4, 64) and not p.img_ids[:, 0].any()


def test_probe_torch_kwargs():
    import torch

    kw = make_kontext_probe(SMALL_PROBE).transformer_kwargs("cpu", torch.bfloat16)
    assert kw["hidden_states"].dtype == torch.bfloat16 and kw["hidden_states"].shape == (1, 16, 64)
    assert kw["img_ids"].dtype == torch.float32
    assert kw["timestep"].tolist() == [0.5] and kw["guidance"].tolist() == [2.5]
    assert "guidance" not in make_kontext_probe(SMALL_PROBE).transformer_kwargs("cpu", torch.float32, guidance_embeds=False)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"height": 1000}, "probe height must be a positive multiple of 16 pixels, got 1000"),
        ({"width": 0}, "probe width must be a positive multiple of 16 pixels, got 0"),
        ({"text_tokens": 0}, "probe text_tokens must be at least 1, got 0"),
        ({"timestep": 2.0}, "probe timestep must be a sigma in [0, 1], got 2.0"),
    ],
)
def test_probe_rejects_bad_specs(kwargs, message):
    with pytest.raises(ValidationError) as e:
        ProbeSpec(**kwargs)
    assert str(e.value) == message


# --------------------------------------------------------------------------- tensor error


def _reference_error(ref, approx):
    r, a = ref.astype(np.float64).ravel(), approx.astype(np.float64).ravel()
    rel = np.linalg.norm(a - r) / np.linalg.norm(r)
    cos = r @ a / (np.linalg.norm(r) * np.linalg.norm(a))
    return rel, np.abs(a - r).max(), cos


def test_tensor_error_matches_plain_numpy(monkeypatch):
    rng = np.random.default_rng(1)
    ref = rng.standard_normal((300, 96)).astype(np.float32)
    approx = ref + 0.01 * rng.standard_normal(ref.shape).astype(np.float32)
    rel, mx, cos = _reference_error(ref, approx)
    import converter.quality.tensor_error as te

    for chunk in (7, 1000, 1 << 22):  # chunking never changes the figures beyond rounding
        monkeypatch.setattr(te, "_CHUNK_ELEMENTS", chunk)
        e = tensor_error("x.weight", "Q8_0", ref, approx)
        assert e.rel_rmse == pytest.approx(rel, rel=1e-12)
        assert e.max_abs == pytest.approx(mx, rel=1e-12)
        assert e.cosine == pytest.approx(cos, rel=1e-12)
    assert e.shape == (300, 96) and e.params == 28800


def test_tensor_error_edge_cases():
    z = np.zeros((4, 32), np.float32)
    same = tensor_error("z", "F32", z, z)
    assert (same.rel_rmse, same.max_abs, same.cosine) == (0.0, 0.0, 1.0)
    off = tensor_error("z", "F32", z, z + 1)
    assert off.rel_rmse == math.inf and off.cosine == 0.0 and off.max_abs == 1.0
    assert off.to_dict()["rel_rmse"] is None  # JSON has no inf
    x = np.arange(1, 33, dtype=np.float32).reshape(1, 32)
    assert tensor_error("x", "F32", x, -x).cosine == -1.0


def test_tensor_error_refuses_mismatches():
    a = np.ones((4, 32), np.float32)
    with pytest.raises(ValidationError) as e:
        tensor_error("double_blocks.0.img_mod.lin.weight", "Q8_0", a, np.ones((32, 4), np.float32))
    assert str(e.value) == (
        "tensor double_blocks.0.img_mod.lin.weight: stored shape (32, 4) does not match the source's (4, 32)"
    )
    b = a.copy()
    b[1, 2] = np.nan
    with pytest.raises(ValidationError) as e:
        tensor_error("t", "Q8_0", a, b)
    assert str(e.value) == "tensor t: the stored values hold NaN or inf"


def test_summaries_pool_exactly():
    rng = np.random.default_rng(2)
    refs = [rng.standard_normal((8, 32)).astype(np.float32) * s for s in (0.1, 1.0, 5.0)]
    approxs = [r + 0.05 * rng.standard_normal(r.shape).astype(np.float32) for r in refs]
    names = ["double_blocks.0.img_attn.qkv.weight", "double_blocks.0.txt_mlp.0.weight", "single_blocks.0.linear1.weight"]
    errs = [tensor_error(n, "Q4_K" if i < 2 else "Q5_K", r, a) for i, (n, r, a) in enumerate(zip(names, refs, approxs))]
    by_type = summarize_by_type(errs)
    r = np.concatenate([x.ravel() for x in refs[:2]]).astype(np.float64)
    a = np.concatenate([x.ravel() for x in approxs[:2]]).astype(np.float64)
    assert by_type["Q4_K"].rel_rmse == pytest.approx(np.linalg.norm(a - r) / np.linalg.norm(r), rel=1e-9)
    assert by_type["Q4_K"].tensors == 2 and by_type["Q4_K"].params == 512
    assert by_type["Q4_K"].worst_tensor == max(errs[:2], key=lambda e: e.rel_rmse).name
    assert list(summarize_by_block(errs)) == ["double_blocks.0", "single_blocks.0"]


def test_block_of():
    assert block_of("double_blocks.12.img_attn.qkv.weight") == "double_blocks.12"
    assert block_of("single_blocks.3.linear2.bias") == "single_blocks.3"
    assert block_of("final_layer.linear.weight") == "other"


def test_label_for():
    assert label_for("out/flux1-kontext-dev-Q4_K_M.gguf") == "Q4_K_M"
    assert label_for("flux1-kontext-dev-Q8_0.gguf") == "Q8_0"
    assert label_for("x-bf16.gguf") == "BF16"
    assert label_for("model.gguf") == "model"


def test_compare_outputs():
    r = np.linspace(-1, 1, 64, dtype=np.float32).reshape(1, 16, 4)
    same = compare_outputs(r, r)
    assert (same.rel_l2, same.cosine, same.psnr_db) == (0.0, 1.0, math.inf)
    c = compare_outputs(r, r + 0.01)
    assert c.rel_l2 == pytest.approx(0.01 * 8 / np.linalg.norm(r.astype(np.float64)), rel=1e-5)
    assert c.psnr_db == pytest.approx(20 * math.log10(2.0 / 0.01), rel=1e-5)  # peak = value range 2
    with pytest.raises(ValidationError, match=r"output shapes differ"):
        compare_outputs(r, r[:, :8])


# --------------------------------------------------------------------------- per tensor, real files


def test_per_tensor_errors_of_real_files(tiny):
    bf16 = validate(tiny.bf16, tiny.source, probe=None)
    assert all(e.rel_rmse == 0.0 and e.cosine == 1.0 for e in bf16.tensors)
    assert bf16.tensor_types == {"F32": N_F32, "BF16": len(SHAPES) - N_F32}
    assert bf16.outputs is None and bf16.metrics() == {}

    q4 = validate(tiny.q4_k_m, tiny.source, probe=None)
    assert set(q4.by_type) == {"F32", "BF16", "Q4_K", "Q5_K"}
    # Every figure equals an independent computation with gguf-py's decoder.
    reader = gguf.GGUFReader(tiny.q4_k_m)
    stored = {t.name: t for t in reader.tensors}
    with open_source(tiny.source) as src:
        for e in q4.tensors:
            t = stored[e.name]
            approx = gguf.quants.dequantize(t.data, t.tensor_type).reshape(e.shape)
            rel, mx, cos = _reference_error(src.read(e.name), approx)
            if e.qtype in ("F32", "BF16"):
                assert e.rel_rmse == 0.0, e.name  # kept tensors are exact
            else:
                assert e.rel_rmse == pytest.approx(rel, rel=1e-9) and e.max_abs == pytest.approx(mx, rel=1e-6)
                assert e.cosine == pytest.approx(cos, rel=1e-12)
    # Q5_K (the raised qkv) is closer than Q4_K; both are in the range 4-5 bit K-quants reach on Gaussians.
    assert 0.02 < q4.by_type["Q5_K"].rel_rmse < q4.by_type["Q4_K"].rel_rmse < 0.12
    assert validate(tiny.q8_0, tiny.source, probe=None).by_type["Q8_0"].rel_rmse < 0.01


def _write_gguf(path, tensors):
    w = gguf.GGUFWriter(path, "flux")
    for name, arr in tensors.items():
        w.add_tensor(name, arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_gguf_that_does_not_match_its_source(tiny, tmp_path):
    with open_source(tiny.source) as src:
        full = {n: src.read(n) for n in src.tensors}
    partial = dict(full)
    del partial["single_blocks.1.linear2.weight"]
    _write_gguf(tmp_path / "missing.gguf", partial)
    with pytest.raises(ValidationError) as e:
        validate(tmp_path / "missing.gguf", tiny.source, probe=None)
    assert str(e.value) == f"{tmp_path / 'missing.gguf'} lacks source tensor single_blocks.1.linear2.weight"

    wrong = dict(full)
    wrong["txt_in.bias"] = np.zeros(128, np.float32)
    _write_gguf(tmp_path / "shape.gguf", wrong)
    with pytest.raises(ValidationError) as e:
        validate(tmp_path / "shape.gguf", tiny.source, probe=None)
    assert str(e.value) == f"{tmp_path / 'shape.gguf'}: tensor txt_in.bias has shape [128]; the source's is [256]"

    extra = dict(full, **{"lora.extra.weight": np.zeros(32, np.float32)})
    _write_gguf(tmp_path / "extra.gguf", extra)
    with pytest.raises(ValidationError) as e:
        validate(tmp_path / "extra.gguf", tiny.source, probe=None)
    assert str(e.value) == (
        f"{tmp_path / 'extra.gguf'} holds lora.extra.weight, which the source {tiny.source} does not have"
    )


def test_unreadable_inputs(tiny, tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"NOPE" + bytes(60))
    with pytest.raises(ValidationError, match=r"bad\.gguf: not a readable GGUF file"):
        validate(bad, tiny.source, probe=None)
    with pytest.raises(ValidationError) as e:
        validate(tmp_path / "absent.gguf", tiny.source, probe=None)
    assert str(e.value) == f"{tmp_path / 'absent.gguf'}: no such GGUF file"
    with pytest.raises(ValidationError) as e:
        validate(tiny.bf16, tmp_path / "absent.safetensors", probe=None)
    assert str(e.value) == f"{tmp_path / 'absent.safetensors'}: no such file or folder"


def test_end_to_end_needs_a_diffusers_loadable_width(tiny):
    with pytest.raises(ValidationError) as e:
        validate(tiny.q8_0, tiny.source, probe=SMALL_PROBE, device="cpu", check_tensors=False)
    assert str(e.value) == (
        "diffusers loads FLUX transformers with hidden size 3072 only (its single-file conversion "
        "hard-codes it); this model has 256"
    )


# --------------------------------------------------------------------------- validation.json


def test_validation_json_merges_files_and_feeds_the_model_card(tiny, tmp_path):
    out = tmp_path / "validation.json"
    r1 = validate(tiny.q8_0, tiny.source, probe=None)
    r2 = validate(tiny.q4_k_m, tiny.source, probe=None)
    write_validation_json(r1, out)
    write_validation_json(r2, out)
    doc = json.loads(out.read_text())
    assert doc["schema_version"] == 1
    assert list(doc["variants"]) == ["flux-Q4_K_M.gguf", "flux-Q8_0.gguf"]
    entry = doc["variants"]["flux-Q8_0.gguf"]
    assert entry["variant"] == "Q8_0" and entry["file"] == "flux-Q8_0.gguf"
    assert entry["tensor_types"] == {"BF16": N_KEPT_2D, "F32": N_F32, "Q8_0": len(SHAPES) - N_F32 - N_KEPT_2D}
    assert len(entry["tensors"]["per_tensor"]) == len(SHAPES)
    assert entry["tensors"]["summary_by_type"]["Q8_0"]["rel_rmse"] == pytest.approx(r1.by_type["Q8_0"].rel_rmse)
    assert not list(tmp_path.glob("*.partial"))
    # With outputs measured, the card shows them.
    from converter.quality.validate import OutputComparison

    measured = r1.__class__(**{**r1.__dict__, "outputs": OutputComparison(0.01, 0.9999, 45.0, 0.1)})
    write_validation_json(measured, out)
    files = [CardFile("flux-Q8_0.gguf", "Q8_0", 1, "0" * 64, 8.5, {}), CardFile("flux-Q4_K_M.gguf", "Q4_K_M", 1, "0" * 64, 4.8, {})]
    assert read_validation_report(out, files) == {"Q8_0": {"cosine": 0.9999, "rel_l2": 0.01, "psnr": 45.0}}


def test_validation_json_refuses_a_foreign_file(tiny, tmp_path):
    out = tmp_path / "validation.json"
    out.write_text('{"something": "else"}')
    with pytest.raises(ValidationError) as e:
        write_validation_json(validate(tiny.q8_0, tiny.source, probe=None), out)
    assert str(e.value) == (
        f"{out}: existing file is not a validation.json of schema_version 1; move it away or pick another --output"
    )


# --------------------------------------------------------------------------- CLI


def test_cli_tensors_only(tiny, tmp_path):
    out = tmp_path / "v.json"
    res = CliRunner().invoke(main, ["validate", str(tiny.q4_k_m), "--source", str(tiny.source), "--tensors-only",
                                    "-o", str(out)])
    assert res.exit_code == 0, res.output
    assert "Q4_K" in res.stdout and "double_blocks.1" in res.stdout and f"wrote {out}" in res.stdout
    assert json.loads(out.read_text())["variants"]["flux-Q4_K_M.gguf"]["outputs"] is None


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--image", "x.png"], "Error: --image needs --pipeline"),
        (["--pipeline", "p"], "Error: --pipeline needs --image and --prompt"),
        (["--pipeline", "p", "--image", "x.png", "--prompt", "hat", "--tensors-only"],
         "Error: --tensors-only and --pipeline exclude each other"),
        (["--height", "100"], "Error: probe height must be a positive multiple of 16 pixels, got 100"),
    ],
)
def test_cli_rejects_bad_flags(tiny, extra, message):
    res = CliRunner().invoke(main, ["validate", str(tiny.q8_0), "--source", str(tiny.source), *extra])
    assert res.exit_code == 1
    assert res.output.strip().splitlines()[-1] == message


# --------------------------------------------------------------------------- end to end (diffusers)


def test_end_to_end_q8_0_is_close_to_the_source(small):
    r = validate(small.q8_0, small.source, probe=SMALL_PROBE, device="cpu", check_tensors=False)
    assert r.device == "cpu" and r.probe == SMALL_PROBE
    o = r.outputs
    assert o is not None
    assert o.cosine > 0.999 and 0 < o.rel_l2 < 0.05 and 30 < o.psnr_db < math.inf
    assert r.environment["diffusers"] and r.environment["torch"]
    assert set(r.metrics()) == {"cosine", "rel_l2", "psnr"}


def test_cli_end_to_end_bf16_is_identical(small, tmp_path):
    out = tmp_path / "validation.json"
    res = CliRunner().invoke(main, ["validate", str(small.bf16), "--source", str(small.source), "--device", "cpu",
                                    "--height", "32", "--width", "32", "--text-tokens", "16", "--json",
                                    "-o", str(out)])
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    assert doc.pop(VERSION_KEY) == __version__
    # The BF16 GGUF holds the source's exact values: diffusers computes the same output bit for bit.
    assert doc["outputs"] == {"rel_l2": 0.0, "cosine": 1.0, "psnr_db": None, "max_abs": 0.0}
    assert doc["metrics"] == {"cosine": 1.0, "rel_l2": 0.0}
    assert doc["probe"]["image_tokens"] == 8 and doc["probe"]["text_tokens"] == 16
    assert all(e["rel_rmse"] == 0.0 for e in doc["tensors"]["per_tensor"])
    assert json.loads(out.read_text())["variants"][small.bf16.name] == doc


def test_end_to_end_without_diffusers_says_what_to_install(tiny, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "diffusers", None)  # as if it were not installed
    with pytest.raises(ValidationError) as e:
        validate(tiny.q8_0, tiny.source, probe=SMALL_PROBE, device="cpu")
    assert str(e.value) == (
        "validate and bench need diffusers and torch (diffusers is missing); "
        "install them with: pip install 'flux-gguf[validate]'"
    )
    assert validate(tiny.q8_0, tiny.source, probe=None).tensors  # the per-tensor pass needs neither


def test_types_we_never_write_are_decoded_by_gguf_py(tiny, tmp_path):
    """A third-party file may hold Q4_0; its error is still measured (gguf-py decodes it)."""
    q = gguf.GGMLQuantizationType.Q4_0
    w = gguf.GGUFWriter(tmp_path / "other-Q4_0.gguf", "flux")
    with open_source(tiny.source) as src:
        for name in src.tensors:
            x = src.read(name)
            if x.ndim == 2 and not is_kept_unquantized(name):
                data = gguf.quants.quantize(x, q)
                w.add_tensor(name, data, raw_shape=data.shape, raw_dtype=q)
            else:
                w.add_tensor(name, x)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        r = validate(tmp_path / "other-Q4_0.gguf", tiny.source, probe=None)
        e = next(e for e in r.tensors if e.name == "double_blocks.0.img_mod.lin.weight")
        x = src.read(e.name)
    rel, _, _ = _reference_error(x, gguf.quants.dequantize(gguf.quants.quantize(x, q), q))
    assert e.qtype == "Q4_0" and e.rel_rmse == pytest.approx(rel, rel=1e-9)
    assert 0.05 < r.by_type["Q4_0"].rel_rmse < 0.2
