"""A calibrated release: spec ``imatrix``, the manifest lists it, the card says so, verify re-derives."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import gguf
import pytest
from click.testing import CliRunner
from imatrix_fixtures import write_synthetic_imatrix

from converter.cli import main
from converter.errors import ReleaseError
from converter.layout import FluxGeometry
from converter.release.build import build_release
from converter.release.spec import parse_release_spec
from converter.synthetic import write_synthetic_flux
from manifests import load_manifest

GEO = FluxGeometry(double_blocks=1, single_blocks=1, hidden=256)
SPEC = """\
name = "cal"
source = "weights/tiny.safetensors"
base_model = "black-forest-labs/FLUX.1-Kontext-dev"
variants = ["Q4_K_M", "Q8_0"]
imatrix = "calib/tiny.imatrix.gguf"

[card]
license = "other"
"""


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("calproject")
    (root / "weights").mkdir()
    (root / "calib").mkdir()
    src = write_synthetic_flux(root / "weights" / "tiny.safetensors", GEO, seed=5)
    write_synthetic_imatrix(src, root / "calib" / "tiny.imatrix.gguf", seed=1)
    write_synthetic_imatrix(src, root / "calib" / "other.imatrix.gguf", seed=2)
    (root / "release.toml").write_text(SPEC)
    return root


@pytest.fixture(scope="module")
def built(project, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("calreleases") / "r"
    build_release(project / "release.toml", out)
    return out


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_manifest_lists_the_imatrix_as_a_source(built, project):
    m = load_manifest(built / "manifest.json")
    assert m.spec["imatrix"] == ["calib/tiny.imatrix.gguf"]
    imx = project / "calib" / "tiny.imatrix.gguf"
    listed = {s.name: (s.size, s.sha256) for s in m.sources}
    assert listed["calib/tiny.imatrix.gguf"] == (imx.stat().st_size, sha(imx))
    assert "tiny.safetensors" in listed


def test_k_quant_file_records_the_imatrix_q8_0_does_not(built):
    r = gguf.GGUFReader(built / "cal-Q4_K_M.gguf")
    assert r.fields["quantize.imatrix.file"].contents() == "tiny.imatrix.gguf"
    assert r.fields["quantize.imatrix.dataset"].contents() == "test:seed=1"
    assert "quantize.imatrix.file" not in gguf.GGUFReader(built / "cal-Q8_0.gguf").fields


def test_model_card_says_calibrated_and_on_what(built):
    card = (built / "README.md").read_text()
    assert "**Calibrated**: K-quant tensors were quantized with the importance matrix `tiny.imatrix.gguf`" in card
    assert "collected on: test:seed=1 (4 chunks," in card
    assert "| calib/tiny.imatrix.gguf |" in card  # listed with its sha256 among the sources


def test_build_equals_convert_with_the_same_imatrix(built, project, tmp_path):
    r = run("convert", project / "weights" / "tiny.safetensors", "-o", tmp_path, "--variant", "Q4_K_M",
            "--name", "x", "--imatrix", project / "calib" / "tiny.imatrix.gguf", "--json")
    assert r.exit_code == 0, r.output
    a = {t.name: bytes(t.data.reshape(-1).view("u1")) for t in gguf.GGUFReader(tmp_path / "x-Q4_K_M.gguf").tensors}
    b = {t.name: bytes(t.data.reshape(-1).view("u1")) for t in gguf.GGUFReader(built / "cal-Q4_K_M.gguf").tensors}
    assert a == b


def test_verify_source_with_the_imatrix_re_derives(built, project):
    r = run("verify", built, "--source", project / "weights" / "tiny.safetensors",
            "--imatrix", project / "calib" / "tiny.imatrix.gguf", "--json")
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert doc["ok"] and doc["source"]["ok"] and doc["source"]["source_files_match"]
    assert doc["source"]["tensors_checked"] > 0


def test_verify_source_without_the_imatrix_is_a_one_line_error(built, project):
    r = run("verify", built, "--source", project / "weights" / "tiny.safetensors")
    assert r.exit_code == 1
    assert r.stderr.strip().splitlines()[-1] == (
        "Error: manifest.json: this release was quantized with the importance matrix calib/tiny.imatrix.gguf; "
        "re-deriving it needs that file too (--imatrix FILE)")


def test_verify_with_another_imatrix_is_not_reproduced(built, project):
    r = run("verify", built, "--source", project / "weights" / "tiny.safetensors",
            "--imatrix", project / "calib" / "other.imatrix.gguf", "--json")
    assert r.exit_code == 1
    doc = json.loads(r.stdout)
    src = doc["source"]
    assert not src["ok"]
    bad = {(p["artifact"], p["status"]) for p in src["problems"]}
    assert bad == {("cal-Q4_K_M.gguf", "mismatch")}  # Q8_0 does not use it
    files = {f["name"]: f["status"] for f in src["source_files"]}
    assert files["calib/tiny.imatrix.gguf"] == "missing"


def test_imatrix_on_a_static_release_is_refused(tmp_path, project):
    spec = SPEC.replace('imatrix = "calib/tiny.imatrix.gguf"\n', "")
    (project / "static.toml").write_text(spec)
    out = tmp_path / "static"
    build_release(project / "static.toml", out)
    r = run("verify", out, "--source", project / "weights" / "tiny.safetensors",
            "--imatrix", project / "calib" / "tiny.imatrix.gguf")
    assert r.exit_code == 1
    assert "this release records no importance matrix" in r.stderr


def test_spec_accepts_a_list_and_merges(project, tmp_path):
    spec = SPEC.replace('imatrix = "calib/tiny.imatrix.gguf"',
                        'imatrix = ["calib/tiny.imatrix.gguf", "calib/other.imatrix.gguf"]')
    (project / "two.toml").write_text(spec)
    s = parse_release_spec(project / "two.toml")
    assert s.imatrix == ("calib/tiny.imatrix.gguf", "calib/other.imatrix.gguf")
    out = tmp_path / "two"
    build_release(s, out)
    r = gguf.GGUFReader(out / "cal-Q4_K_M.gguf")
    assert r.fields["quantize.imatrix.file"].contents() == "tiny.imatrix.gguf,other.imatrix.gguf"
    r = run("verify", out, "--source", project / "weights" / "tiny.safetensors",
            "--imatrix", project / "calib" / "tiny.imatrix.gguf", "--imatrix", project / "calib" / "other.imatrix.gguf")
    assert r.exit_code == 0, r.output


@pytest.mark.parametrize(("line", "message"), [
    ('imatrix = "calib/absent.gguf"', "'imatrix' names 'calib/absent.gguf', which is not an existing file"),
    ('imatrix = "/abs/x.gguf"', "'imatrix' names '/abs/x.gguf', which is not an existing file (looked for /abs/x.gguf)"),
    ("imatrix = 3", "'imatrix' must be a file name or a list of file names, got 3"),
    ("imatrix = []", "'imatrix' must name at least one importance-matrix file"),
    ('imatrix = ["calib/tiny.imatrix.gguf", "calib/tiny.imatrix.gguf"]', "'imatrix' lists a file twice"),
])
def test_spec_errors(project, line, message):
    (project / "bad.toml").write_text(SPEC.replace('imatrix = "calib/tiny.imatrix.gguf"', line))
    with pytest.raises(ReleaseError) as e:
        parse_release_spec(project / "bad.toml")
    assert str(e.value) == f"{project / 'bad.toml'}: {message}" or str(e.value).startswith(f"{project / 'bad.toml'}: {message}")
