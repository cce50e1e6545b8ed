"""[[lora]] in a release spec: merged before quantization, or shipped as a hashed kohya side-car."""
from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import yaml
from click.testing import CliRunner
from lora_fixtures import GEO, dense_canonical, make_truth, write_diffusers, write_kohya

import quant_kernels
from converter.cli import main
from converter.errors import LoraError, ReleaseError
from converter.layout import bfl_tensor_shapes
from converter.lora.formats import load_lora
from converter.lora.merge import LoraSpec, build_merger
from converter.release.build import build_release
from converter.release.spec import parse_release_spec
from converter.sources import open_source
from converter.synthetic import write_synthetic_flux
from manifests import load_manifest, verify_release

SPEC = """\
name = "tiny"
source = "weights/tiny.safetensors"
base_model = "black-forest-labs/FLUX.1-Kontext-dev"
variants = ["Q4_K_M", "Q8_0"]

[[lora]]
path = "loras/speed.safetensors"
name = "speed"
strength = 0.5
mode = "merge"

[[lora]]
path = "loras/style.safetensors"
name = "style"
strength = 0.8
mode = "sidecar"
dtype = "F16"

[card]
license = "other"
"""


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("lora-release")
    (root / "weights").mkdir()
    (root / "loras").mkdir()
    write_synthetic_flux(root / "weights" / "tiny.safetensors", GEO, seed=3)
    write_kohya(root / "loras" / "speed.safetensors", make_truth(GEO, seed=1))
    write_diffusers(root / "loras" / "style.safetensors", make_truth(GEO, seed=2))
    (root / "release.toml").write_text(SPEC)
    return root


@pytest.fixture(scope="module")
def built(project, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("out") / "tiny"
    build_release(project / "release.toml", out)
    return out


def test_release_records_both_loras_and_verifies(built, project):
    assert verify_release(built).ok
    m = load_manifest(built / "manifest.json")
    recs = {r["name"]: r for r in m.spec["lora"]}
    assert recs["speed"]["mode"] == "merge" and recs["speed"]["strength"] == 0.5 and recs["speed"]["format"] == "kohya"
    assert recs["style"]["mode"] == "sidecar" and recs["style"]["dtype"] == "F16"
    assert recs["speed"]["sha256"] == hashlib.sha256((project / "loras" / "speed.safetensors").read_bytes()).hexdigest()
    side = m.artifact("tiny-lora-style.safetensors")
    assert side.kind == "lora"
    assert side.sha256 == hashlib.sha256((built / "tiny-lora-style.safetensors").read_bytes()).hexdigest()
    assert [s.name for s in m.sources] == ["tiny.safetensors", "loras/speed.safetensors", "loras/style.safetensors"]
    sums = (built / "SHA256SUMS").read_text()
    assert "  tiny-lora-style.safetensors\n" in sums
    subprocess.run(["sha256sum", "-c", "--strict", "--quiet", "SHA256SUMS"], cwd=built, check=True)


def test_merged_tensors_equal_quantize_of_merged_weights(built, project):
    m = load_manifest(built / "manifest.json")
    with open_source(project / "weights" / "tiny.safetensors") as src:
        shapes = {n: t.shape for n, t in src.tensors.items()}
        merger = build_merger([LoraSpec(project / "loras" / "speed.safetensors", 0.5)], shapes)
        gguf = next(a for a in m.ggufs if a.variant == "Q4_K_M")
        by_name = {t.name: t for t in gguf.tensors}
        for name in ("double_blocks.0.img_attn.qkv.weight", "single_blocks.0.linear1.weight"):
            w = src.read(name)
            merged = merger(name, w)
            assert not np.array_equal(merged, w)
            t = by_name[name]
            expected = quant_kernels.quantize(merged, t.type).tobytes()
            assert hashlib.sha256(expected).hexdigest() == t.sha256, name


def test_sidecar_holds_the_style_lora_and_names_the_base(built, project):
    side = load_lora(built / "tiny-lora-style.safetensors")
    orig = load_lora(project / "loras" / "style.safetensors")
    shapes = bfl_tensor_shapes(GEO)
    a, b = dense_canonical(side, shapes), dense_canonical(orig, shapes)
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_allclose(a[k], b[k], rtol=2e-3, atol=1e-5)  # stored as F16
    assert side.metadata["flux_gguf.base_model"] == "black-forest-labs/FLUX.1-Kontext-dev"
    assert float(side.metadata["flux_gguf.recommended_strength"]) == 0.8


def test_model_card_describes_merge_and_sidecar(built):
    text = (built / "README.md").read_text()
    front = yaml.safe_load(text.split("---")[1])
    assert front["base_model"] == "black-forest-labs/FLUX.1-Kontext-dev"
    assert "## LoRAs" in text
    assert "- `speed` (kohya format, strength 0.5), from `loras/speed.safetensors`" in text
    assert "| [tiny-lora-style.safetensors](tiny-lora-style.safetensors) | `style` (diffusers) | 0.8 |" in text
    assert "<lora:tiny-lora-style:0.8>" in text


def test_build_is_reproducible(project, built, tmp_path):
    again = tmp_path / "again"
    build_release(project / "release.toml", again)
    for f in sorted(p.name for p in built.iterdir()):
        assert (again / f).read_bytes() == (built / f).read_bytes(), f


def test_verify_source_needs_and_uses_the_merged_lora(built, project):
    src = str(project / "weights" / "tiny.safetensors")
    r = CliRunner().invoke(main, ["verify", str(built), "--source", src])
    assert r.exit_code == 1
    assert "this release applied 'lora' entries to the weights" in r.output
    r = CliRunner().invoke(main, ["verify", str(built), "--source", src,
                                  "--lora", str(project / "loras" / "speed.safetensors")])
    assert r.exit_code == 0, r.output
    assert f"release {built}: OK" in r.output
    r = CliRunner().invoke(main, ["verify", str(built), "--source", src,
                                  "--lora", str(project / "loras" / "style.safetensors")])
    assert r.exit_code == 1
    assert "Error: manifest.json: the release merged LoRA 'speed' (loras/speed.safetensors, sha256 " in r.output
    r = CliRunner().invoke(main, ["verify", str(built), "--lora", str(project / "loras" / "speed.safetensors")])
    assert r.exit_code == 2 and "--lora only applies with --source" in r.output


@pytest.mark.parametrize("entry, message", [
    ('path = "loras/speed.safetensors"\nmode = "fuse"\n', "[[lora]] entry 1: mode must be one of merge, sidecar, got 'fuse'"),
    ('path = "loras/speed.safetensors"\nweight = 1\n', "[[lora]] entry 1: unknown key 'weight'; expected one of path, name, strength, mode, dtype"),
    ('path = "loras/none.safetensors"\n', "[[lora]] entry 1: LoRA file not found: "),
    ('path = "../x.safetensors"\n', "[[lora]] entry 1: path must be an absolute path or a relative path inside the spec's folder, got '../x.safetensors'"),
    ('path = "loras/speed.safetensors"\ndtype = "F16"\n', '[[lora]] entry 1: dtype applies to mode = "sidecar" only'),
    ('path = "loras/speed.safetensors"\nstrength = "high"\n', "[[lora]] entry 1: strength must be a finite number, got 'high'"),
])
def test_lora_entry_errors_name_the_entry(project, tmp_path, entry, message):
    spec = project / f"bad-{abs(hash(entry))}.toml"
    spec.write_text(SPEC.split("[[lora]]")[0] + "[[lora]]\n" + entry + "\n[card]\nlicense = \"other\"\n")
    with pytest.raises(ReleaseError) as e:
        parse_release_spec(spec)
    assert str(e.value).startswith(f"{spec}: {message}")


def test_lora_for_another_size_is_refused_before_converting(project, tmp_path):
    from converter.layout import FluxGeometry
    big = FluxGeometry(double_blocks=1, single_blocks=1, hidden=512)
    write_kohya(project / "loras" / "wide.safetensors", make_truth(big, seed=4), big)
    spec = project / "wide.toml"
    spec.write_text(SPEC.split("[[lora]]")[0] + '[[lora]]\npath = "loras/wide.safetensors"\n\n[card]\nlicense = "other"\n')
    out = tmp_path / "never"
    with pytest.raises(LoraError, match=r"wide\.safetensors \(kohya\)"):
        build_release(spec, out)
    assert not out.exists() and not (tmp_path / "never.partial").exists()


def test_release_ggufs_name_the_merged_lora_in_their_header(built, project):
    import json as _json

    import gguf
    reader = gguf.GGUFReader(built / "tiny-Q8_0.gguf")
    field = reader.fields["flux_gguf.loras"]
    doc = _json.loads(bytes(field.parts[field.data[0]]).decode())
    assert doc == [{"name": "speed", "strength": 0.5, "format": "kohya",
                    "sha256": hashlib.sha256((project / "loras" / "speed.safetensors").read_bytes()).hexdigest()}]


# --- verify --source: side-car-only releases, --lora files as sources, edited records ---------------

SIDECAR_ONLY = SPEC.split("[[lora]]")[0] + """[[lora]]
path = "loras/style.safetensors"
name = "style"
strength = 0.8
mode = "sidecar"

[card]
license = "other"
"""


def _verify(*args: str) -> tuple[int, str]:
    r = CliRunner().invoke(main, ["verify", *args], catch_exceptions=False)
    return r.exit_code, r.output


@pytest.fixture(scope="module")
def sidecar_only(project, tmp_path_factory) -> Path:
    spec = project / "sidecar-only.toml"
    spec.write_text(SIDECAR_ONLY.replace('variants = ["Q4_K_M", "Q8_0"]', 'variants = ["Q8_0"]'))
    out = tmp_path_factory.mktemp("sidecar") / "tiny"
    build_release(spec, out)
    return out


def test_verify_source_of_a_sidecar_only_release_needs_no_lora(sidecar_only, project):
    src = str(project / "weights" / "tiny.safetensors")
    code, out = _verify(str(sidecar_only), "--source", src)
    assert code == 0, out
    assert "re-derived bit for bit" in out
    assert ("source files differ from those the manifest lists (loras/style.safetensors missing); "
            "tensors decide the check") in out.splitlines()
    assert out.splitlines()[-1] == f"release {sidecar_only}: OK"
    # the side-car's source file may be given too: it is then a present source, not applied
    code, out = _verify(str(sidecar_only), "--source", src, "--lora", str(project / "loras" / "style.safetensors"))
    assert code == 0, out
    assert "source files are byte-identical to those the manifest lists" in out.splitlines()


def test_verify_source_counts_the_given_lora_files_as_present(built, project):
    src = str(project / "weights" / "tiny.safetensors")
    speed, style = str(project / "loras" / "speed.safetensors"), str(project / "loras" / "style.safetensors")
    code, out = _verify(str(built), "--source", src, "--lora", speed, "--json")
    assert code == 0, out
    files = json.loads(out)["source"]["source_files"]
    assert [(f["name"], f["status"]) for f in files] == [
        ("tiny.safetensors", "ok"), ("loras/speed.safetensors", "ok"), ("loras/style.safetensors", "missing")]
    assert files[1]["actual_sha256"] == hashlib.sha256((project / "loras" / "speed.safetensors").read_bytes()).hexdigest()
    code, out = _verify(str(built), "--source", src, "--lora", speed, "--lora", style)
    assert code == 0, out
    assert "source files are byte-identical to those the manifest lists" in out.splitlines()


def test_verify_lora_file_errors_are_one_line(built, project, tmp_path):
    src = str(project / "weights" / "tiny.safetensors")
    absent = tmp_path / "absent.safetensors"
    code, out = _verify(str(built), "--source", src, "--lora", str(absent))
    assert code == 1
    assert out.strip().splitlines() == [f"Error: --lora {absent}: cannot read: No such file or directory"]
    other = tmp_path / "other.safetensors"
    write_kohya(other, make_truth(GEO, seed=9))
    code, out = _verify(str(built), "--source", src, "--lora", str(project / "loras" / "speed.safetensors"),
                        "--lora", str(other))
    assert code == 1
    assert out.strip().splitlines() == [f"Error: --lora {other}: this release records no LoRA with that file's sha256 "
                                        f"({hashlib.sha256(other.read_bytes()).hexdigest()})"]


@pytest.mark.parametrize(("edit", "message"), [
    (lambda recs: recs.__setitem__(0, recs[0] | {"strength": "high"}),
     "manifest.json: spec.lora[0].strength must be a finite number, got 'high'"),
    (lambda recs: recs[0].pop("strength"), "manifest.json: spec.lora[0].strength must be a finite number, got None"),
    (lambda recs: recs.__setitem__(0, recs[0] | {"sha256": 7}), "manifest.json: spec.lora[0].sha256 must be 64 lowercase hex digits, got 7"),
    (lambda recs: recs.__setitem__(1, recs[1] | {"mode": "fuse"}), "manifest.json: spec.lora[1].mode must be one of merge, sidecar, got 'fuse'"),
    (lambda recs: recs.__setitem__(1, "style"), "manifest.json: spec.lora[1] must be a table (one [[lora]] entry), got 'style'"),
])
def test_verify_source_refuses_edited_lora_records_in_one_line(built, project, tmp_path, edit, message):
    release = tmp_path / "release"
    shutil.copytree(built, release)
    doc = json.loads((release / "manifest.json").read_text())
    edit(doc["spec"]["lora"])
    (release / "manifest.json").write_text(json.dumps(doc))
    code, out = _verify(str(release), "--source", str(project / "weights" / "tiny.safetensors"),
                        "--lora", str(project / "loras" / "speed.safetensors"))
    assert code == 1
    assert out.strip().splitlines() == [f"Error: {message}"]


def test_absolute_paths_are_accepted_and_recorded_by_name_only(project, tmp_path):
    """Checkpoints live on other disks: absolute source, LoRA and extra-file paths build, and the
    release records only file names (with size and sha256), never the absolute path."""
    elsewhere = tmp_path / "other-disk"
    elsewhere.mkdir()
    license_file = elsewhere / "LICENSE.md"
    license_file.write_text("test licence\n")
    spec_dir = tmp_path / "specs"
    spec_dir.mkdir()
    text = (SPEC.replace('"weights/tiny.safetensors"', f'"{project / "weights" / "tiny.safetensors"}"')
                .replace('"loras/speed.safetensors"', f'"{project / "loras" / "speed.safetensors"}"')
                .replace('"loras/style.safetensors"', f'"{project / "loras" / "style.safetensors"}"'))
    head, rest = text.split("[[lora]]", 1)  # extra_files is a top-level key: before the first [[lora]]
    text = head + f'extra_files = ["{license_file}"]\n\n[[lora]]' + rest
    (spec_dir / "release.toml").write_text(text)
    out = tmp_path / "out" / "tiny"
    build_release(spec_dir / "release.toml", out)
    assert verify_release(out).ok
    m = load_manifest(out / "manifest.json")
    assert m.spec["source"] == "tiny.safetensors"
    assert m.spec["extra_files"] == ["LICENSE.md"]
    assert {r["path"] for r in m.spec["lora"]} == {"speed.safetensors", "style.safetensors"}
    assert (out / "LICENSE.md").read_text() == "test licence\n"
    for f in out.iterdir():  # manifest, SHA256SUMS, card, GGUF headers, side-cars: no local path anywhere
        data = f.read_bytes()
        assert str(tmp_path).encode() not in data, f.name
        assert str(project).encode() not in data, f.name
