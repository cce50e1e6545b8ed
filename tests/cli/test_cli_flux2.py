"""The CLI on FLUX.2: ``example --model flux2-klein-4b`` then inspect, dry-run, release build and verify."""
from __future__ import annotations

import json

from gguf import GGUFReader

from cli_child import run


def test_example_flux2_klein_then_inspect_release_verify(tmp_path, monkeypatch):
    r = run("example", "-o", tmp_path / "ex", "--model", "flux2-klein-4b")
    assert r.exit_code == 0, r.output
    assert sorted(p.name for p in (tmp_path / "ex").iterdir()) == [
        "flux2-klein-4b-example-Q4_K_M.gguf", "flux2-klein-4b-example-Q8_0.gguf",
        "flux2-klein-4b-example.safetensors", "release.toml"]
    assert "a synthetic FLUX.2 [klein] 4B-layout checkpoint, BF16, 5 double + 20 single blocks, hidden size 256" in (
        r.stdout.splitlines()[0])
    gguf = tmp_path / "ex" / "flux2-klein-4b-example-Q4_K_M.gguf"
    reader = GGUFReader(gguf)
    assert len(reader.tensors) == 149
    assert reader.fields["flux_gguf.model_family"].contents() == "flux2-klein-4b"
    for path, kind in ((gguf, "gguf"), (tmp_path / "ex" / "flux2-klein-4b-example.safetensors", "safetensors")):
        rep = json.loads(run("inspect", path, "--json").stdout)
        assert (rep["kind"], rep["architecture"], rep["family"]) == (kind, "flux", "flux2-klein-4b")
    src = tmp_path / "ex" / "flux2-klein-4b-example.safetensors"
    dry = json.loads(run("convert", src, "-o", tmp_path / "dry", "--variant", "Q4_K_M", "--dry-run", "--json").stdout)
    assert dry["family"] == "flux2-klein-4b"
    assert dry["plans"][0]["size"] == gguf.stat().st_size
    assert 'base_model = "black-forest-labs/FLUX.2-klein-4B"' in (tmp_path / "ex" / "release.toml").read_text()
    monkeypatch.chdir(tmp_path)
    r = run("release", "build", "ex/release.toml", "-o", "dist/klein")
    assert r.exit_code == 0, r.output
    r = run("verify", "dist/klein")
    assert r.exit_code == 0, r.output
    manifest = json.loads((tmp_path / "dist" / "klein" / "manifest.json").read_text())
    assert manifest["spec"]["base_model"] == "black-forest-labs/FLUX.2-klein-4B"
