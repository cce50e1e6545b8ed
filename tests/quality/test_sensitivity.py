"""``flux-gguf sensitivity`` on a small structured model, and the mixed file convert writes from it:
measured errors against an independent forward pass, the predictor's check, provenance, loading."""
from __future__ import annotations

import hashlib
import json
import math

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from gguf import GGUFReader

import quant_kernels
from converter import __version__
from converter.cli import main
from converter.cli.output import VERSION_KEY
from converter.imatrix import read_imatrix
from converter.layout import FluxGeometry
from converter.pipeline import KV_TARGET
from converter.quality.calibrate import build_transformer, diffusers_state_dict, probe_samples
from converter.quality.probes import ProbeSpec
from converter.quality.sensitivity import spearman
from converter.sources import open_source
from converter.synthetic import write_synthetic_flux

GEO = FluxGeometry(double_blocks=1, single_blocks=1, hidden=256)
PROBE = ["--probes", "2", "--height", "32", "--width", "32", "--text-tokens", "8", "--device", "cpu"]


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture(scope="module")
def measured(tmp_path_factory):
    d = tmp_path_factory.mktemp("sens")
    src = write_synthetic_flux(d / "flux.safetensors", GEO, dtype="BF16", structured=True)
    r = run("imatrix", src, "-o", d / "flux.imatrix.gguf", *PROBE)
    assert r.exit_code == 0, r.output
    r = run("sensitivity", src, "-o", d / "flux.sensitivity.json", "--imatrix", d / "flux.imatrix.gguf",
            "--check-tensors", "8", *PROBE)
    assert r.exit_code == 0, r.output
    return d, src, json.loads((d / "flux.sensitivity.json").read_text()), r.output


def sha256(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_file_records_every_tensor_and_its_provenance(measured):
    d, src, doc, output = measured
    assert output.startswith(f"wrote {d / 'flux.sensitivity.json'}: 13 tensors in ")
    assert (doc["format"], doc["version"], doc["reference_type"]) == ("flux-gguf-sensitivity", 1, "Q4_K")
    assert doc["source"] == {"file": "flux.safetensors", "sha256": sha256(src), "fingerprint": doc["source"]["fingerprint"]}
    assert len(doc["source"]["fingerprint"]) == 64
    assert doc["imatrix"] == {"file": "flux.imatrix.gguf", "sha256": sha256(d / "flux.imatrix.gguf")}
    assert doc["inputs"]["kind"] == "probes" and doc["inputs"]["samples"] == 2
    assert len(doc["tensors"]) == 13
    for name, t in doc["tensors"].items():
        assert set(t["predicted"]) == {"Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q8_0", "BF16"}, name
        assert t["predicted"]["BF16"] == 0.0
        assert t["predicted"]["Q4_K"] == pytest.approx(t["measured"]["Q4_K"], rel=1e-12)
        p = t["predicted"]
        assert p["Q2_K"] > p["Q3_K"] > p["Q4_K"] > p["Q5_K"] > p["Q6_K"] > p["Q8_0"] > 0, name


def test_measured_error_matches_an_independent_forward_pass(measured):
    """One check tensor at Q2_K, measured here with the model built afresh and our own loop."""
    d, src, doc, _ = measured
    name = doc["check"]["tensors"][0]
    im = read_imatrix(d / "flux.imatrix.gguf")
    spec = ProbeSpec(height=32, width=32, text_tokens=8, seed=0)
    with open_source(src) as s:
        model = build_transformer(GEO, s.read, "cpu")
        x = s.read(name)
    samples = list(probe_samples(2, spec, "cpu", torch.float32, GEO.guidance))

    def outputs():
        with torch.inference_mode():
            return [model(**smp.kwargs, return_dict=False)[0][:, : spec.target_tokens].double() for smp in samples]

    ref = outputs()
    q = quant_kernels.dequantize(quant_kernels.quantize(x, "Q2_K", imatrix=im.importance(name)), "Q2_K", x.shape)
    model.load_state_dict(diffusers_state_dict({name: q}, "cpu", torch.float32), strict=False)
    got = outputs()
    rel = sum(float(((a - b) ** 2).sum()) for a, b in zip(got, ref)) / sum(float((b ** 2).sum()) for b in ref)
    assert doc["tensors"][name]["measured"]["Q2_K"] == pytest.approx(rel, rel=1e-9)


def test_prediction_check_is_recorded_and_ranks_like_the_measurement(measured):
    from scipy.stats import spearmanr

    _, _, doc, output = measured
    check = doc["check"]
    assert check["pairs"] == 8 * 3 == len(check["rows"])
    rows = check["rows"]
    pred, meas = [r["predicted"] for r in rows], [r["measured"] for r in rows]
    assert check["spearman"] == pytest.approx(spearmanr(pred, meas).statistic, abs=1e-12)
    for qt, rho in check["spearman_by_type"].items():
        sub = [r for r in rows if r["type"] == qt]
        assert rho == pytest.approx(spearmanr([r["predicted"] for r in sub], [r["measured"] for r in sub]).statistic)
    # what the predictor must achieve to be worth allocating from (measured values: see docs)
    assert check["spearman"] > 0.95
    assert min(check["spearman_by_type"].values()) > 0.8
    assert 0.5 < check["median_predicted_over_measured"] < 2.0
    assert f"Spearman {check['spearman']:.3f}" in output


def test_json_summary_names_the_file_and_the_version(measured, tmp_path):
    d, src, _, _ = measured
    out = tmp_path / "again.sensitivity.json"
    r = run("sensitivity", src, "-o", out, "--check-tensors", "0", "--json", *PROBE)
    assert r.exit_code == 0, r.output
    summary = json.loads(r.stdout)
    assert summary[VERSION_KEY] == __version__
    assert summary["file"] == str(out) and summary["tensors"] == 13 and summary["check_pairs"] == 0
    assert len(json.loads(out.read_text())["tensors"]) == 13


def test_spearman_handles_ties_and_short_input():
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert spearman([1, 1, 2, 3], [1, 2, 3, 4]) == pytest.approx(0.9486832980505138)
    assert math.isnan(spearman([1, 2], [1, 2]))


def test_target_size_file_has_the_planned_bytes_records_the_choice_and_loads(measured, tmp_path):
    from diffusers.models.model_loading_utils import load_gguf_checkpoint
    from diffusers.quantizers.gguf.utils import dequantize_gguf_tensor

    d, src, doc, _ = measured
    sens, im = d / "flux.sensitivity.json", d / "flux.imatrix.gguf"
    args = ["convert", src, "-o", tmp_path, "--target-size", "5.3MB", "--sensitivity", sens, "--imatrix", im,
            "--mix-name", "Q3_K_A"]
    dry = run(*args, "--dry-run", "--json")
    assert dry.exit_code == 0, dry.output
    planned = json.loads(dry.stdout)["plans"][0]
    r = run(*args)
    assert r.exit_code == 0, r.output
    path = tmp_path / "flux-Q3_K_A.gguf"
    assert path.stat().st_size == planned["size"] <= 5_300_000
    assert planned["size"] >= 5_300_000 * 0.995
    reader = GGUFReader(path)

    def field(key):
        f = reader.fields[key]
        return f.contents()

    target = json.loads(field(KV_TARGET))
    assert target["sensitivity"] == {"file": "flux.sensitivity.json", "sha256": sha256(sens)}
    assert target["budget"] == {"kind": "size", "value": 5.3e6, "text": "5.3MB"}
    assert field("flux_gguf.recipe") == "Q3_K_A"
    assert field("quantize.imatrix.file") == im.name
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert {n: types[n] for n in target["types"]} == target["types"]
    assert len(set(target["types"].values())) >= 2  # a mix, not one type
    assert {t["name"]: t["type"] for t in planned["tensors"]} == types
    state = load_gguf_checkpoint(str(path))  # diffusers' GGUF loader reads every mixed type
    with open_source(src) as s:
        for t in reader.tensors:
            if t.name not in target["types"]:
                continue
            x = s.read(t.name)
            theirs = dequantize_gguf_tensor(state[t.name]).float().numpy().reshape(x.shape)
            ours = quant_kernels.dequantize(bytes(t.data.tobytes()), t.tensor_type.name, x.shape)
            # diffusers decodes the block scales in half precision: the bound test_diffusers_consumer uses
            assert np.linalg.norm(theirs - ours) / np.linalg.norm(ours) < 5e-3, t.name
            assert np.linalg.norm(ours - x) / np.linalg.norm(x) < 0.35, t.name


def test_bad_inputs_are_one_line_and_leave_no_file(measured, tmp_path):
    from safetensors.numpy import save_file

    d, src, _, _ = measured
    other = tmp_path / "other.safetensors"
    save_file({"encoder.weight": np.zeros((4, 4), np.float32)}, str(other))
    out = tmp_path / "s.json"
    r = run("sensitivity", other, "-o", out, *PROBE)
    assert r.exit_code == 1 and r.output.startswith("Error: ") and r.output.count("\n") == 1, r.output
    assert not out.exists()
    geo = FluxGeometry(double_blocks=1, single_blocks=1, hidden=512)
    big = write_synthetic_flux(tmp_path / "big.safetensors", geo, dtype="BF16")
    r = run("sensitivity", big, "-o", out, "--imatrix", d / "flux.imatrix.gguf", *PROBE)
    assert r.output == (f"Error: {d / 'flux.imatrix.gguf'}: tensor double_blocks.0.img_attn.proj.weight has 512 "
                        "input columns but its entry has 256 (an importance matrix for another model?)\n")
    assert set(tmp_path.iterdir()) == {other, big}  # no sensitivity file, no partial


def test_convert_refuses_a_sensitivity_file_of_another_checkpoint(measured, tmp_path):
    """The file records the source's fingerprint; a fine-tune (other weights, same inventory) is refused
    in one line unless --any-sensitivity-source; the same weights in a diffusers folder pass."""
    from converter.sources import source_fingerprint

    d, src, doc, _ = measured
    with open_source(src) as s:
        assert doc["source"]["fingerprint"] == source_fingerprint(s)
    tuned = write_synthetic_flux(tmp_path / "tuned.safetensors", GEO, dtype="BF16", structured=True, seed=5)
    sens = d / "flux.sensitivity.json"
    args = ["--target-size", "5.3MB", "--sensitivity", sens, "--dry-run"]
    r = run("convert", tuned, "-o", tmp_path / "out", *args)
    with open_source(tuned) as s:
        theirs = source_fingerprint(s)
    assert r.exit_code == 1 and r.stdout == ""
    assert r.stderr == (f"Error: flux.sensitivity.json: measured on another checkpoint (flux.safetensors, fingerprint "
                        f"{doc['source']['fingerprint'][:12]}...; tuned.safetensors has {theirs[:12]}...); measure "
                        "this one with flux-gguf sensitivity, or pass --any-sensitivity-source to use it anyway\n")
    assert run("convert", tuned, "-o", tmp_path / "out", *args, "--any-sensitivity-source").exit_code == 0
    folder = write_synthetic_flux(tmp_path / "same-diffusers", GEO, dtype="BF16", structured=True, layout="diffusers")
    r = run("convert", folder, "-o", tmp_path / "out", *args)
    assert r.exit_code == 0, r.output
    assert not (tmp_path / "out").exists()
