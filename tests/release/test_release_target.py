"""A release with a size-targeted variant: spec ``variants = [{name, target_size}]`` and
``sensitivity``, the manifest lists the sensitivity file as a source, the card shows the mix,
verify and verify --source pass."""
from __future__ import annotations

import json
from pathlib import Path

import gguf
import pytest

from converter.errors import ReleaseError
from converter.layout import FluxGeometry
from converter.pipeline import KV_TARGET
from converter.release.build import build_release
from converter.release.rederive import rederive_release
from converter.release.spec import parse_release_spec
from converter.synthetic import write_synthetic_flux
from manifests import load_manifest, verify_release
from sensitivity_fixtures import sensitivity_doc

GEO = FluxGeometry(double_blocks=1, single_blocks=1, hidden=256)
SPEC = """\
name = "mix"
source = "weights/tiny.safetensors"
base_model = "black-forest-labs/FLUX.1-Kontext-dev"
variants = ["Q4_K_M", {name = "Q3_K_A", target_size = "5.3MB"}]
sensitivity = "calib/tiny.sensitivity.json"

[card]
license = "other"
"""


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("mixproject")
    (root / "weights").mkdir()
    write_synthetic_flux(root / "weights" / "tiny.safetensors", GEO)
    (root / "calib").mkdir()
    (root / "calib" / "tiny.sensitivity.json").write_text(json.dumps(sensitivity_doc(GEO, 3, per_weight=False)))
    (root / "release.toml").write_text(SPEC)
    return root / "release.toml"


@pytest.fixture(scope="module")
def built(project, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("mixrel") / "r"
    build_release(project, out)
    return out


def test_spec_records_the_target(project):
    spec = parse_release_spec(project)
    assert spec.variants == ("Q4_K_M", "Q3_K_A") and spec.fixed_variants == ("Q4_K_M",)
    assert spec.targets == {"Q3_K_A": ("target_size", "5.3MB")}
    rec = spec.to_json()
    assert rec["variants"] == ["Q4_K_M", {"name": "Q3_K_A", "target_size": "5.3MB"}]
    assert rec["sensitivity"] == "calib/tiny.sensitivity.json"


def test_release_holds_the_mix_within_its_budget(built, project):
    import hashlib

    m = load_manifest(built / "manifest.json")
    assert [a.variant for a in m.ggufs] == ["Q4_K_M", "Q3_K_A"]
    mix = next(a for a in m.ggufs if a.variant == "Q3_K_A")
    assert mix.path == "mix-Q3_K_A.gguf" and mix.size <= 5_300_000 and mix.size >= 5_300_000 * 0.995
    sens = project.parent / "calib" / "tiny.sensitivity.json"
    digest = hashlib.sha256(sens.read_bytes()).hexdigest()
    assert any(s.name == "calib/tiny.sensitivity.json" and s.sha256 == digest for s in m.sources)
    reader = gguf.GGUFReader(built / mix.path)
    target = json.loads(reader.fields[KV_TARGET].contents())
    assert target["sensitivity"] == {"file": "tiny.sensitivity.json", "sha256": digest}
    assert len(set(target["types"].values())) >= 2
    assert verify_release(built).ok


def test_card_says_how_the_mix_was_chosen(built):
    card = (built / "README.md").read_text()
    assert "`Q3_K_A` is a size-targeted mix (target size 5.3MB)" in card
    assert "Types of `Q3_K_A` per block:" in card
    assert "| double_blocks | `img_mod.lin` | `img_attn.qkv` |" in card
    assert "| single_blocks | `linear1` | `linear2` | `modulation.lin` |" in card


def test_verify_source_rederives_the_mix(built, project):
    m = load_manifest(built / "manifest.json")
    r = rederive_release(m, project.parent / "weights" / "tiny.safetensors")
    assert r.ok and r.problems == [] and r.recipe_problems == []
    assert r.tensors_checked == sum(len(a.tensors) for a in m.ggufs)


def test_verify_source_catches_a_mix_breaking_the_fixed_rules(built, project, tmp_path):
    doc = json.loads((built / "manifest.json").read_text())
    art = next(a for a in doc["artifacts"] if a.get("variant") == "Q3_K_A")
    t = next(t for t in art["tensors"] if t["name"] == "txt_in.weight")  # kept in source precision
    t["type"] = "Q8_0"
    (tmp_path / "manifest.json").write_text(json.dumps(doc))
    r = rederive_release(load_manifest(tmp_path / "manifest.json"), project.parent / "weights" / "tiny.safetensors")
    assert "mix-Q3_K_A.gguf: txt_in.weight is Q8_0, but recipe Q3_K_A gives BF16" in r.recipe_problems


BASE = 'name = "n"\nsource = "w.safetensors"\nbase_model = "b/m"\n'
CARD = '[card]\nlicense = "other"\n'


@pytest.mark.parametrize(("text", "message"), [
    (BASE + 'variants = [{name = "Q3_K_A", target_size = "5GB"}]\n' + CARD,
     "'sensitivity' is required by the size-targeted variant Q3_K_A: name the file flux-gguf sensitivity wrote"),
    (BASE + 'variants = ["Q4_K_M"]\nsensitivity = "s.json"\n' + CARD,
     "'sensitivity' is set but no variant has a target_size or target_bpw"),
    (BASE + 'variants = [{name = "Q3_K_A", target_size = "5GB", target_bpw = 3}]\nsensitivity = "s.json"\n' + CARD,
     "'variants[0]' needs exactly one of 'target_size' (e.g. \"5.37GB\") and 'target_bpw'"),
    (BASE + 'variants = [{name = "Q3_K_A", target_size = "big"}]\nsensitivity = "s.json"\n' + CARD,
     "'variants[0]' target size 'big': expected a number of bytes with an optional unit (B, KB, MB, GB, TB, "
     "KiB, MiB, GiB, TiB), e.g. 5.37GB"),
    (BASE + 'variants = [{name = "Q4_K_M", target_size = "5GB"}]\nsensitivity = "s.json"\n' + CARD,
     "'variants[0]' mix name 'Q4_K_M' is a fixed variant's name; choose another (e.g. Q3_K_A)"),
    (BASE + 'variants = [{name = "Q3_K_A", target_size = "5GB", colour = 1}]\nsensitivity = "s.json"\n' + CARD,
     "unknown key 'variants[0].colour'"),
    (BASE + 'variants = ["Q4_K_M", {name = "Q3_K_A", target_size = "5GB"}]\nsensitivity = "none.json"\n' + CARD,
     "'sensitivity' names 'none.json', which is not an existing file"),
])
def test_spec_errors(tmp_path, text, message):
    (tmp_path / "w.safetensors").write_bytes(b"")
    (tmp_path / "s.json").write_text("{}")
    (tmp_path / "s.toml").write_text(text)
    with pytest.raises(ReleaseError) as e:
        parse_release_spec(tmp_path / "s.toml")
    assert str(e.value).removeprefix(f"{tmp_path / 's.toml'}: ").startswith(message), str(e.value)
