"""release build / verify / verify --source on small synthetic FLUX models, end to end.

A 256-wide FLUX with one block of each kind (about 2.5 M parameters) goes through the real
pipeline, so every behaviour here is the one a 12 B release gets.
"""
from __future__ import annotations

import builtins
import dataclasses
import errno
import hashlib
import io
import json
import os
import shutil
import subprocess
from pathlib import Path

import gguf
import pytest
import yaml
from click.testing import CliRunner

from converter.cli import main
from converter.errors import ModelDetectionError, OutputError, ReleaseError
from converter.layout import FluxGeometry
from converter.release.build import build_release, created_timestamp
from converter.release.rederive import rederive_release
from converter.release.spec import SpecExtension, parse_release_spec
from converter.synthetic import write_synthetic_flux
from manifests import load_manifest, parse_sha256sums, verify_release

GEO = FluxGeometry(double_blocks=1, single_blocks=1, hidden=256)
VARIANTS = ["Q3_K_S", "Q4_K_M", "BF16"]
NAME = "tiny-kontext"
SPEC = """\
name = "tiny-kontext"
source = "weights/tiny.safetensors"
base_model = "black-forest-labs/FLUX.1-Kontext-dev"
variants = ["Q3_K_S", "Q4_K_M", "BF16"]
extra_files = ["LICENSE.md"]
validation = "reports/validation.json"

[card]
license = "other"
license_name = "flux-1-dev-non-commercial-license"
license_link = "LICENSE.md"
quantized_by = "flux-gguf tests"
"""
VALIDATION = {"variants": {
    "Q3_K_S": {"cosine": 0.991234567, "rel_l2": 0.1312, "psnr": 27.456, "seconds": 3.0},
    "Q4_K_M": {"metrics": {"cosine": 0.997, "rel_l2": 0.0712, "psnr": 31.5}},
}}


def write_project(root: Path, spec: str = SPEC, seed: int = 0) -> Path:
    """A spec folder: weights, license, validation report, and SPEC.toml; returns the spec path."""
    (root / "weights").mkdir(parents=True)
    write_synthetic_flux(root / "weights" / "tiny.safetensors", GEO, seed=seed)
    (root / "LICENSE.md").write_text("FLUX.1 [dev] Non-Commercial License (test copy)\n")
    (root / "reports").mkdir()
    (root / "reports" / "validation.json").write_text(json.dumps(VALIDATION))
    (root / "release.toml").write_text(spec)
    return root / "release.toml"


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    return write_project(tmp_path_factory.mktemp("project"))


@pytest.fixture(scope="module")
def built(project, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("releases") / "r1"
    build_release(project, out)
    return out


@pytest.fixture()
def release(built, tmp_path) -> Path:
    """A private copy of the built release, free to damage."""
    dst = tmp_path / "release"
    shutil.copytree(built, dst)
    return dst


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# --- the spec ------------------------------------------------------------------------------------

def test_spec_parses_and_normalizes(project):
    spec = parse_release_spec(project)
    assert spec.name == NAME and spec.variants == tuple(VARIANTS)
    assert spec.source_path == project.parent / "weights" / "tiny.safetensors"
    assert spec.extra_file_paths == {"LICENSE.md": project.parent / "LICENSE.md"}
    assert spec.card.tags == ("flux", "kontext", "gguf", "image-to-image")
    rec = spec.to_json()
    assert rec["source"] == "weights/tiny.safetensors"  # as written: never an absolute path
    assert rec["card"]["quantized_by"] == "flux-gguf tests"
    assert "overrides" not in rec


def _spec_error(tmp_path: Path, text: str, *, extra: dict[str, str] | None = None) -> str:
    for name, content in (extra or {}).items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(content)
    (tmp_path / "s.toml").write_text(text)
    with pytest.raises(ReleaseError) as e:
        parse_release_spec(tmp_path / "s.toml")
    return str(e.value).removeprefix(f"{tmp_path / 's.toml'}: ")


BASE = 'name = "n"\nsource = "w.safetensors"\nbase_model = "b/m"\nvariants = ["Q4_K_M"]\n'
CARD = '[card]\nlicense = "other"\n'


@pytest.mark.parametrize(("text", "message"), [
    (BASE + 'flavour = "x"\n' + CARD,
     "unknown key 'flavour'; expected one of name, source, base_model, variants, overrides, extra_files, validation, card, imatrix, sensitivity, lora"),
    (BASE + CARD + 'color = "red"\n',
     "unknown key 'card.color'; expected one of card.license, card.license_name, card.license_link, card.quantized_by, "
     "card.pipeline_tag, card.tags, card.title, card.description"),
    ('source = "w.safetensors"\nbase_model = "b/m"\nvariants = ["Q4_K_M"]\n' + CARD, "missing required key 'name'"),
    (BASE, "missing required table [card] (at least card.license)"),
    (BASE + '[card]\nlicense_name = "x"\n', "missing required key 'card.license'"),
    (BASE.replace('variants = ["Q4_K_M"]', 'variants = "Q4_K_M"') + CARD, "'variants' must be a list of variant names or {name, target_size} tables, got 'Q4_K_M'"),
    (BASE.replace('variants = ["Q4_K_M"]', "variants = []") + CARD, "'variants' must list at least one variant"),
    (BASE.replace('"Q4_K_M"]', '"Q4_K_M", "q4_k_m"]') + CARD, "'variants' lists Q4_K_M twice"),
    (BASE.replace('"Q4_K_M"]', '"Q9_K"]') + CARD, "'variants' unknown variant 'Q9_K'; valid variants: Q2_K, Q3_K_S"),
    (BASE + 'overrides = ["nope"]\n' + CARD, "'overrides' override 'nope' must look like REGEX=TYPE"),
    (BASE.replace('name = "n"', 'name = "a/b"') + CARD, "'name' must be a plain file-name stem (no slashes or surrounding spaces)"),
    (BASE.replace('"w.safetensors"', '"/abs/w.safetensors"') + CARD, "'source' names '/abs/w.safetensors', which does not exist"),
    (BASE + CARD, "'source' names 'w.safetensors', which does not exist"),
    (BASE + 'extra_files = ["LICENSE.md"]\n' + CARD, "'extra_files' names 'LICENSE.md', which is not an existing file"),
    (BASE + 'extra_files = ["README.md"]\n' + CARD, "'extra_files' names 'README.md', whose file name 'README.md' the release itself writes"),
    (BASE + 'extra_files = ["a/L.md", "b/L.md"]\n' + CARD, "'extra_files' lists two files named 'L.md'"),
    (BASE + 'validation = "v.json"\n' + CARD, "'validation' names 'v.json', which is not an existing file"),
    (BASE + CARD + 'license_link = "LICENSE.md"\n', "'card.license_link' is the relative link 'LICENSE.md', but 'extra_files' ships no file of that name"),
    ("name = \n", "not valid TOML: "),
])
def test_spec_errors_name_the_key(tmp_path, text, message):
    extra = {"README.md": "x", "a/L.md": "x", "b/L.md": "x"}
    if "does not exist" not in message:
        extra["w.safetensors"] = "x"
    assert _spec_error(tmp_path, text, extra=extra).startswith(message)


def test_extension_key_without_a_hook_is_refused(tmp_path, monkeypatch):
    from converter.release import spec as release_spec
    monkeypatch.setattr(release_spec, "_HOOKS", {"other": None})  # hooks known, none for 'lora'
    message = _spec_error(tmp_path, BASE + "[[lora]]\npath = \"x.safetensors\"\n" + CARD, extra={"w.safetensors": "x"})
    assert message.startswith("'lora' entries need the module that handles them, which this flux-gguf does not have")


def test_spec_not_found(tmp_path):
    with pytest.raises(ReleaseError, match=r"absent.toml: release spec not found$"):
        parse_release_spec(tmp_path / "absent.toml")


def test_lora_key_is_handed_to_the_registered_hook(tmp_path, monkeypatch):
    from converter.release import spec as release_spec
    seen = []

    def hook(raw, base_dir, spec_name):
        seen.append((raw, base_dir, spec_name))
        return SpecExtension(record=[{"name": e["name"]} for e in raw], files=(base_dir / raw[0]["path"],))

    monkeypatch.setattr(release_spec, "_HOOKS", {})
    release_spec.register_spec_hook("lora", hook)
    (tmp_path / "w.safetensors").write_text("x")
    (tmp_path / "s.toml").write_text(BASE + '[[lora]]\npath = "l.safetensors"\nname = "style"\nstrength = 0.8\n' + CARD)
    spec = parse_release_spec(tmp_path / "s.toml")
    assert seen == [([{"path": "l.safetensors", "name": "style", "strength": 0.8}], tmp_path, str(tmp_path / "s.toml"))]
    assert spec.extensions["lora"].files == (tmp_path / "l.safetensors",)
    assert spec.to_json()["lora"] == [{"name": "style"}]
    with pytest.raises(ValueError, match="'tags' is not a spec extension key"):
        release_spec.register_spec_hook("tags", hook)


def test_extension_hook_drives_the_build(project, built, tmp_path, monkeypatch):
    """A registered [[lora]] hook: its transform changes the weights, its files become sources."""
    import numpy as np

    from converter.release import spec as release_spec
    target = "double_blocks.0.img_mlp.0.weight"
    shapes_seen = []

    def make_transform(shapes):
        shapes_seen.append(shapes[target])
        return lambda name, x: x + np.float32(0.5) if name == target else x

    def hook(raw, base_dir, spec_name):
        return SpecExtension(record=raw, files=tuple(base_dir / e["path"] for e in raw), make_transform=make_transform)

    monkeypatch.setattr(release_spec, "_HOOKS", {"lora": hook})
    root = tmp_path / "p"
    spec = write_project(root, SPEC.replace("[card]", '[[lora]]\npath = "style.safetensors"\nstrength = 0.5\n\n[card]'))
    (root / "style.safetensors").write_bytes(b"pretend LoRA")
    build_release(spec, tmp_path / "out")
    m = load_manifest(tmp_path / "out" / "manifest.json")
    assert shapes_seen == [(4 * 256, 256)]
    assert m.spec["lora"] == [{"path": "style.safetensors", "strength": 0.5}]
    assert [s.name for s in m.sources] == ["tiny.safetensors", "style.safetensors"]
    assert m.sources[1].sha256 == hashlib.sha256(b"pretend LoRA").hexdigest()
    plain = load_manifest(built / "manifest.json")
    for a, b in zip(m.ggufs, plain.ggufs):
        differ = {t.name for t, u in zip(a.tensors, b.tensors) if t.sha256 != u.sha256}
        assert differ == {target}
    assert "`lora` entries from the spec were applied" in (tmp_path / "out" / "README.md").read_text()
    src = root / "weights" / "tiny.safetensors"
    assert rederive_release(m, src, tensor_transform=make_transform({target: (1024, 256)})).ok
    assert not rederive_release(dataclasses.replace(m, spec=plain.spec), src).ok


def test_release_from_a_diffusers_folder(tmp_path):
    root = tmp_path / "p"
    spec = write_project(root, SPEC.replace('"weights/tiny.safetensors"', '"weights/transformer"'))
    write_synthetic_flux(root / "weights" / "transformer", GEO, layout="diffusers", shard_bytes=3_000_000)
    build_release(spec, tmp_path / "out")
    m = load_manifest(tmp_path / "out" / "manifest.json")
    folder = root / "weights" / "transformer"
    assert len(m.sources) > 2
    for s in m.sources:  # names relative to the folder, digests of the files read
        assert sha(folder / s.name) == s.sha256
    assert "diffusion_pytorch_model.safetensors.index.json" in {s.name for s in m.sources}
    assert verify_release(tmp_path / "out").ok
    assert rederive_release(m, folder).source_files_match


@pytest.mark.parametrize(("content", "message"), [
    ("not json", "cannot read the validation report"),
    ('{"results": []}', "expected a 'variants' object or list in the validation report"),
    ('{"variants": [{"cosine": 1}]}', "variants[0] must be an object naming its 'variant' or 'file'"),
    ('{"variants": {"Q4_K_M": {"psnr": "high"}}}', "psnr of Q4_K_M must be a finite number, got 'high'"),
])
def test_bad_validation_report_is_refused(tmp_path, content, message):
    root = tmp_path / "p"
    spec = write_project(root)
    (root / "reports" / "validation.json").write_text(content)
    with pytest.raises(ReleaseError) as e:
        build_release(spec, tmp_path / "out")
    assert str(e.value).startswith(f"{root / 'reports' / 'validation.json'}: {message}")
    assert not (tmp_path / "out").exists() and _leftovers(tmp_path) == []


@pytest.mark.parametrize("report", [
    {"variants": [{"file": f"{NAME}-BF16.gguf", "cosine": 0.9999991, "psnr": 60.0}]},
    # what `flux-gguf validate` writes: keyed by file name, figures under "metrics"
    {"schema_version": 1, "variants": {f"{NAME}-BF16.gguf": {
        "file": f"{NAME}-BF16.gguf", "variant": "BF16", "metrics": {"cosine": 0.9999991, "psnr": 60.0},
        "gguf_bytes": 1, "tensors": {"summary_by_type": {}}, "outputs": None}}},
])
def test_validation_report_keyed_by_file_name(tmp_path, report):
    root = tmp_path / "p"
    spec = write_project(root)
    (root / "reports" / "validation.json").write_text(json.dumps(report))
    build_release(spec, tmp_path / "out")
    body = (tmp_path / "out" / "README.md").read_text()
    assert "| cosine | PSNR (dB) | SHA-256 |" in body
    assert " | 0.999999 | 60.00 | " in body


# --- a fresh release -------------------------------------------------------------------------------

def test_release_holds_every_file(built):
    names = sorted(p.relative_to(built).as_posix() for p in built.rglob("*"))
    assert names == sorted([f"{NAME}-{v}.gguf" for v in VARIANTS] +
                           ["LICENSE.md", "README.md", "SHA256SUMS", "manifest.json", "validation.json"])
    assert not built.with_name(built.name + ".partial").exists()


def test_fresh_release_verifies(built):
    report = verify_release(built, tensors=True)
    assert report.ok, [f for f in report.files if not f.ok]
    assert report.counts() == {"ok": 8, "mismatch": 0, "missing": 0, "unexpected": 0}


def test_sha256sum_strict_passes_on_a_fresh_release(built):
    done = subprocess.run(["sha256sum", "-c", "--strict", "SHA256SUMS"], cwd=built, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    assert sorted(done.stdout.splitlines()) == sorted(
        f"{n}: OK" for n in [*(f"{NAME}-{v}.gguf" for v in VARIANTS), "LICENSE.md", "README.md", "manifest.json", "validation.json"])


def test_sha256sums_lists_everything_but_itself(built):
    sums = parse_sha256sums((built / "SHA256SUMS").read_bytes())
    for p in built.iterdir():
        if p.name != "SHA256SUMS":
            assert sums.pop(p.name) == sha(p)
    assert sums == {}


def test_manifest_records_tool_spec_sources_and_artifacts(built, project):
    m = load_manifest(built / "manifest.json")
    assert (m.tool_name, m.tool_version, m.name, m.created) == ("flux-gguf", "0.1.0", NAME, None)
    assert m.spec == parse_release_spec(project).to_json()
    src = project.parent / "weights" / "tiny.safetensors"
    assert [(s.name, s.size, s.sha256) for s in m.sources] == [("tiny.safetensors", src.stat().st_size, sha(src))]
    assert [(a.path, a.kind) for a in m.artifacts] == [
        (f"{NAME}-Q3_K_S.gguf", "gguf"), (f"{NAME}-Q4_K_M.gguf", "gguf"), (f"{NAME}-BF16.gguf", "gguf"),
        ("README.md", "model-card"), ("validation.json", "validation-report"), ("LICENSE.md", "extra")]
    for a in m.artifacts:
        assert (a.size, a.sha256) == ((built / a.path).stat().st_size, sha(built / a.path))
    assert [(a.variant, a.file_type) for a in m.ggufs] == [("Q3_K_S", 11), ("Q4_K_M", 15), ("BF16", 32)]
    assert {t.type for t in m.artifact(f"{NAME}-Q4_K_M.gguf").tensors} == {"F32", "BF16", "Q4_K", "Q5_K"}


def test_manifest_tensors_match_the_gguf_files(built):
    """Every recorded tensor is where gguf-py finds it, with its type and shape, and hashes right."""
    m = load_manifest(built / "manifest.json")
    for a in m.ggufs:
        data = (built / a.path).read_bytes()
        reader = gguf.GGUFReader(str(built / a.path))
        assert [t.name for t in a.tensors] == [t.name for t in reader.tensors]
        for t, rt in zip(a.tensors, reader.tensors):
            assert (t.type, t.offset, t.nbytes) == (rt.tensor_type.name, int(rt.data_offset), int(rt.n_bytes))
            assert list(t.shape) == [int(d) for d in reversed(rt.shape)]  # GGUF dims are reversed
            assert hashlib.sha256(data[t.offset:t.offset + t.nbytes]).hexdigest() == t.sha256


def test_building_twice_gives_identical_bytes(built, project, tmp_path):
    again = tmp_path / "r2"
    build_release(project, again)
    assert sorted(p.name for p in again.iterdir()) == sorted(p.name for p in built.iterdir())
    for p in built.iterdir():
        assert (again / p.name).read_bytes() == p.read_bytes(), p.name


def test_source_date_epoch_is_recorded_and_reproducible(project, tmp_path, monkeypatch):
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")
    a, b = tmp_path / "a", tmp_path / "b"
    build_release(project, a)
    build_release(project, b)
    assert load_manifest(a / "manifest.json").created == "2023-11-14T22:13:20Z"
    assert (a / "manifest.json").read_bytes() == (b / "manifest.json").read_bytes()
    assert (a / "SHA256SUMS").read_bytes() == (b / "SHA256SUMS").read_bytes()


def test_created_timestamp_validation():
    assert created_timestamp({}) is None
    assert created_timestamp({"SOURCE_DATE_EPOCH": "0"}) == "1970-01-01T00:00:00Z"
    with pytest.raises(ReleaseError, match=r"SOURCE_DATE_EPOCH must be a whole number of seconds since 1970, got 'soon'"):
        created_timestamp({"SOURCE_DATE_EPOCH": "soon"})


def test_outputs_are_never_read_back(project, tmp_path, monkeypatch):
    """Digests come from the bytes as they are written: no file under the output is opened for reading."""
    out = tmp_path / "out"
    partial = tmp_path / ".out."  # the prefix of every partial name of this build
    reads = []
    real_open, real_io_open = builtins.open, io.open

    def guard(opener):
        def wrapped(file, mode="r", *args, **kwargs):
            p = str(file) if isinstance(file, (str, os.PathLike)) else ""
            if ("r" in mode or "+" in mode) and (p.startswith(str(out)) or p.startswith(str(partial))):
                reads.append(p)
            return opener(file, mode, *args, **kwargs)
        return wrapped
    monkeypatch.setattr(builtins, "open", guard(real_open))
    monkeypatch.setattr(io, "open", guard(real_io_open))
    build_release(project, out)
    monkeypatch.undo()
    assert reads == []
    assert verify_release(out).ok


def test_model_card_front_matter_and_table(built):
    text = (built / "README.md").read_text()
    assert text.startswith("---\n")
    front, body = text[4:].split("\n---\n", 1)
    meta = yaml.safe_load(front)
    assert meta == {
        "base_model": "black-forest-labs/FLUX.1-Kontext-dev", "base_model_relation": "quantized",
        "library_name": "gguf", "license": "other", "license_name": "flux-1-dev-non-commercial-license",
        "license_link": "LICENSE.md", "pipeline_tag": "image-to-image",
        "tags": ["flux", "kontext", "gguf", "image-to-image"], "quantized_by": "flux-gguf tests",
    }
    m = load_manifest(built / "manifest.json")
    rows = {line.split(" | ")[1]: line for line in body.splitlines() if line.startswith("| [")}
    assert set(rows) == set(VARIANTS)
    assert "| File | Variant | Size | Bits/weight | Tensor types | cosine | rel. L2 | PSNR (dB) | SHA-256 |" in body
    for a in m.ggufs:
        row = rows[a.variant]
        assert f"`{a.sha256}`" in row and f"[{a.path}]({a.path})" in row
        bits = sum(t.nbytes for t in a.tensors) * 8 / sum(__import__("math").prod(t.shape) for t in a.tensors)
        assert f" | {bits:.2f} | " in row
        assert f"{a.size / 1e6:.3f} MB" in row
    assert " | 0.991235 | 0.1312 | 27.46 | " in rows["Q3_K_S"]
    assert " | 0.997000 | 0.0712 | 31.50 | " in rows["Q4_K_M"]
    assert " | – | – | – | " in rows["BF16"]
    assert "2 Q5_K" in rows["Q4_K_M"]  # the _M qkv bump shows in the types
    assert "License: `flux-1-dev-non-commercial-license`; see [LICENSE.md](LICENSE.md)." in body
    assert "sha256sum -c --strict SHA256SUMS" in body
    src = m.sources[0]
    assert f"| tiny.safetensors | {src.size / 1e6:.3f} MB | `{src.sha256}` |" in body


def test_occupied_output_folder_is_refused(project, tmp_path):
    out = tmp_path / "occupied"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(ReleaseError, match=r"occupied: already exists and is not an empty folder; choose a new output folder$"):
        build_release(project, out)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_failed_build_leaves_nothing(tmp_path):
    spec = write_project(tmp_path / "p")
    (tmp_path / "p" / "weights" / "tiny.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ")
    out = tmp_path / "out"
    with pytest.raises(ModelDetectionError) as e:
        build_release(spec, out)
    assert str(e.value) == (f"{tmp_path / 'p' / 'weights' / 'tiny.safetensors'} is not a FLUX.1 transformer: expected "
                            "img_in.weight, double_blocks.N.* and single_blocks.N.*; found 0 tensors: none")
    assert not out.exists() and _leftovers(tmp_path) == []


# --- output folders: where the release goes, and what may already be there ---------------------------

def cli_error(*args: str) -> tuple[int, list[str]]:
    """Exit code and output lines of a failing command (exceptions are not caught: none may escape)."""
    result = CliRunner().invoke(main, list(args), catch_exceptions=False)
    return result.exit_code, result.output.strip().splitlines()


def test_output_dot_in_an_empty_current_folder_is_refused_clearly(project, tmp_path, monkeypatch):
    here = tmp_path / "here"
    here.mkdir()
    monkeypatch.chdir(here)
    code, lines = cli_error("release", "build", str(project), "-o", ".")
    assert code == 1
    assert lines == [f"Error: {here}: is the current folder, which the finished release would replace; "
                     f"name a new folder inside it, e.g. -o ./{NAME}"]
    assert list(here.iterdir()) == [] and sorted(p.name for p in tmp_path.iterdir()) == ["here"]


def test_relative_output_is_resolved(project, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = build_release(project, "rel")
    assert result.out_dir == tmp_path / "rel" and result.out_dir.is_absolute()
    assert verify_release(tmp_path / "rel").ok
    assert _leftovers(tmp_path) == []


@pytest.mark.parametrize("target", ["empty", "absent"])
def test_symlinked_output_is_refused_before_converting(project, tmp_path, monkeypatch, target):
    if target == "empty":
        (tmp_path / target).mkdir()
    link = tmp_path / "link"
    link.symlink_to(tmp_path / target)
    monkeypatch.setattr("converter.release.build.convert", lambda *a, **k: pytest.fail("converted before refusing"))
    code, lines = cli_error("release", "build", str(project), "-o", str(link))
    assert code == 1
    assert lines == [f"Error: {link}: is a symbolic link (to {tmp_path / target}); give the folder itself "
                     f"(-o {tmp_path / target}) or a new folder"]
    assert link.is_symlink() and _leftovers(tmp_path) == []
    if target == "empty":
        assert list((tmp_path / target).iterdir()) == []


def test_mount_point_output_is_refused(project, tmp_path, monkeypatch):
    out = tmp_path / "mnt"
    out.mkdir()
    real = os.path.ismount
    monkeypatch.setattr(os.path, "ismount", lambda p: Path(p) == out or real(p))
    code, lines = cli_error("release", "build", str(project), "-o", str(out))
    assert code == 1
    assert lines == [f"Error: {out}: is a mount point, which the finished release cannot be renamed onto; "
                     f"name a new folder inside it, e.g. -o {out / NAME}"]
    assert list(out.iterdir()) == [] and _leftovers(tmp_path) == []


def _fail_on(monkeypatch, step: str, partial: Path) -> str:
    """Make one late output step fail with ENOSPC; returns what the error names."""
    from converter.release import build as rel
    enospc = OSError(errno.ENOSPC, "No space left on device")
    if step in ("README.md", "manifest.json", "SHA256SUMS"):
        real = rel.write_bytes_atomic

        def write(path, data):
            if Path(path).name == step:
                raise enospc
            return real(path, data)
        monkeypatch.setattr(rel, "write_bytes_atomic", write)
        return f"write {partial / step}"
    if step in ("LICENSE.md", "validation.json"):
        real_copy = rel.copy_file_hashed

        def copy(src, dst):
            if Path(dst).name == step:
                raise enospc
            return real_copy(src, dst)
        monkeypatch.setattr(rel, "copy_file_hashed", copy)
        src = {"LICENSE.md": "LICENSE.md", "validation.json": "reports/validation.json"}[step]
        return f"copy {partial.parent / 'p' / src} to {partial / step}"
    real_replace = os.replace

    def replace(src, dst, *a, **k):
        if Path(src) == partial:
            raise OSError(errno.EXDEV, "Invalid cross-device link")
        return real_replace(src, dst, *a, **k)
    monkeypatch.setattr(os, "replace", replace)
    return f"move {partial} into place"


def _fixed_partial(monkeypatch, tmp_path, name="out"):
    """Make the build's unique partial folder name predictable, so a test can watch it."""
    from converter.release import build as rel
    partial = tmp_path / f".{name}.1-test.flux-gguf.partial"
    monkeypatch.setattr(rel, "partial_path", lambda out: partial)
    return partial


def _leftovers(folder):
    """Partial folders and lock files of ours left in ``folder``."""
    return sorted(p.name for p in folder.iterdir() if p.name.endswith((".flux-gguf.partial", ".flux-gguf.lock")))


@pytest.mark.parametrize("step", ["README.md", "manifest.json", "SHA256SUMS", "LICENSE.md", "validation.json", "rename"])
def test_write_failure_after_the_ggufs_is_one_line_and_leaves_nothing(tmp_path, monkeypatch, step):
    spec = write_project(tmp_path / "p")
    out = tmp_path / "out"
    partial = _fixed_partial(monkeypatch, tmp_path)
    what = _fail_on(monkeypatch, step, partial)
    reason = "Invalid cross-device link" if step == "rename" else "No space left on device"
    code, lines = cli_error("release", "build", str(spec), "-o", str(out))
    assert code == 1
    assert lines == [f"Error: {out} was not written: cannot {what}: {reason}"]
    assert not out.exists() and not partial.exists() and _leftovers(tmp_path) == []


def test_rename_onto_a_folder_filled_during_the_build_is_one_line(project, tmp_path, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    partial = _fixed_partial(monkeypatch, tmp_path)

    def progress(done, total):
        if not (out / "late.txt").exists():
            (out / "late.txt").write_text("appeared mid-build")
    with pytest.raises(OutputError) as e:
        build_release(project, out, progress=progress)
    assert str(e.value) == f"{out} was not written: cannot move {partial} into place: Directory not empty"
    assert [p.name for p in out.iterdir()] == ["late.txt"] and _leftovers(tmp_path) == []


def test_a_users_partial_folder_is_never_touched(project, tmp_path):
    out = tmp_path / "out"
    theirs = tmp_path / "out.partial"  # the old partial name: now simply someone's folder
    theirs.mkdir()
    (theirs / ".flux-gguf-partial").write_text("")
    (theirs / "notes.txt").write_text("my work")
    build_release(project, out)
    assert (theirs / "notes.txt").read_text() == "my work" and verify_release(out).ok


@pytest.mark.parametrize("kind", ["file", "symlink"])
def test_a_users_file_or_link_named_like_a_partial_is_left_alone(project, tmp_path, kind):
    out = tmp_path / "out"
    theirs = tmp_path / "out.partial"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / ".flux-gguf-partial").write_text("")
    (elsewhere / "keep.txt").write_text("keep")
    if kind == "file":
        theirs.write_text("a file")
    else:
        theirs.symlink_to(elsewhere)
    build_release(project, out)
    assert os.path.lexists(theirs) and (elsewhere / "keep.txt").exists() and verify_release(out).ok


def test_our_stale_partial_folder_is_removed_under_the_lock_and_the_marker_never_shipped(project, tmp_path,
                                                                                           monkeypatch):
    out = tmp_path / "out"
    stale = tmp_path / ".out.999-0123456789ab.flux-gguf.partial"  # what a killed build of ours leaves
    stale.mkdir()
    (stale / ".flux-gguf-partial").write_text("")
    (stale / f"{NAME}-Q4_K_M.gguf").write_bytes(b"half a file")
    unmarked = tmp_path / ".out.998-0123456789ab.flux-gguf.partial"  # no marker: not ours, kept
    unmarked.mkdir()
    partial = _fixed_partial(monkeypatch, tmp_path)
    seen = []
    build_release(project, out, progress=lambda done, total: seen.append((partial / ".flux-gguf-partial").is_file()))
    assert seen and all(seen)  # the marker is there while the build runs
    assert not stale.exists() and unmarked.is_dir()
    assert ".flux-gguf-partial" not in {p.name for p in out.iterdir()}
    assert ".flux-gguf-partial" not in (out / "SHA256SUMS").read_text()
    assert ".flux-gguf-partial" not in {a.path for a in load_manifest(out / "manifest.json").artifacts}
    assert verify_release(out).ok


# --- verify --source ----------------------------------------------------------------------------------

def test_rederive_from_the_source(built, project):
    m = load_manifest(built / "manifest.json")
    r = rederive_release(m, project.parent / "weights" / "tiny.safetensors")
    n_tensors = sum(len(a.tensors) for a in m.ggufs)
    assert r.ok and r.problems == [] and r.recipe_problems == [] and r.unused_source_tensors == []
    assert r.tensors_checked == n_tensors
    assert r.encodings < n_tensors  # shared types across variants are encoded once
    assert r.source_files_match


def test_rederive_from_a_diffusers_folder_of_the_same_weights(built, tmp_path):
    folder = write_synthetic_flux(tmp_path / "transformer", GEO, layout="diffusers", shard_bytes=3_000_000)
    r = rederive_release(load_manifest(built / "manifest.json"), folder)
    assert r.ok
    assert not r.source_files_match
    statuses = {f.name: f.status for f in r.source_files}
    assert statuses["tiny.safetensors"] == "missing"
    assert set(statuses.values()) == {"missing", "unexpected"}


def test_rederive_from_other_weights_fails(built, tmp_path):
    other = write_synthetic_flux(tmp_path / "other.safetensors", GEO, seed=1)
    m = load_manifest(built / "manifest.json")
    r = rederive_release(m, other)
    assert not r.ok
    assert {p.status for p in r.problems} == {"mismatch"}
    assert len(r.problems) == sum(len(a.tensors) for a in m.ggufs)


def test_rederive_catches_a_recorded_type_the_recipe_would_not_give(built, project):
    m = load_manifest(built / "manifest.json")
    art = m.artifact(f"{NAME}-Q3_K_S.gguf")
    t = next(t for t in art.tensors if t.name == "single_blocks.0.linear2.weight")
    forged_tensors = tuple(dataclasses.replace(x, type="Q4_K") if x is t else x for x in art.tensors)
    forged = dataclasses.replace(m, artifacts=tuple(dataclasses.replace(a, tensors=forged_tensors) if a is art else a
                                                    for a in m.artifacts))
    r = rederive_release(forged, project.parent / "weights" / "tiny.safetensors")
    assert r.recipe_problems == [f"{NAME}-Q3_K_S.gguf: single_blocks.0.linear2.weight is Q4_K, but recipe Q3_K_S gives Q3_K"]
    assert [(p.tensor, p.type, p.status) for p in r.problems] == [("single_blocks.0.linear2.weight", "Q4_K", "mismatch")]


def test_rederive_refuses_extension_releases_without_their_transform(built, project):
    m = load_manifest(built / "manifest.json")
    src = project.parent / "weights" / "tiny.safetensors"
    for records in ([{"name": "style"}], [{"name": "a", "mode": "sidecar"}, {"name": "b", "mode": "merge"}]):
        with_lora = dataclasses.replace(m, spec=m.spec | {"lora": records})
        with pytest.raises(ReleaseError, match=r"this release applied 'lora' entries to the weights"):
            rederive_release(with_lora, src)


def test_rederive_needs_no_transform_when_every_lora_is_a_sidecar(built, project):
    m = load_manifest(built / "manifest.json")
    sidecars = dataclasses.replace(m, spec=m.spec | {"lora": [{"name": "a", "mode": "sidecar"},
                                                               {"name": "b", "mode": "sidecar"}]})
    assert rederive_release(sidecars, project.parent / "weights" / "tiny.safetensors").ok


@pytest.mark.parametrize(("edit", "message"), [
    ({"overrides": [1]}, "manifest.json: spec.overrides[0] must be a REGEX=TYPE string, got 1"),
    ({"overrides": "x=Q8_0"}, "manifest.json: spec.overrides must be a list of REGEX=TYPE strings, got 'x=Q8_0'"),
    ({"lora": "abc"}, "manifest.json: spec.lora must be a list of tables (the [[lora]] entries), got 'abc'"),
    ({"lora": [1]}, "manifest.json: spec.lora[0] must be a table (one [[lora]] entry), got 1"),
    ({"lora": [{"mode": "sidecar"}, {"mode": 3}]}, "manifest.json: spec.lora[1].mode must be one of merge, sidecar, got 3"),
])
def test_cli_verify_source_refuses_a_malformed_spec_in_one_line(release, project, edit, message):
    doc = json.loads((release / "manifest.json").read_text())
    doc["spec"].update(edit)
    (release / "manifest.json").write_text(json.dumps(doc))
    code, lines = cli_error("verify", str(release), "--source", str(project.parent / "weights" / "tiny.safetensors"))
    assert code == 1
    assert lines == [f"Error: {message}"]


# --- the CLI: every way a download can be damaged --------------------------------------------------

def run(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(main, list(args), catch_exceptions=False)
    return result.exit_code, result.stdout


def _lines(out: str) -> list[str]:
    return out.splitlines()


def test_cli_build_and_verify(project, tmp_path):
    out = tmp_path / "cli-release"
    code, text = run("release", "build", str(project), "-o", str(out))
    assert code == 0, text
    assert _lines(text)[-1].startswith(f"release written to {out} (manifest.json sha256 ")
    assert f"sha256 {sha(out / 'README.md')}" in text
    code, text = run("verify", str(out))
    assert code == 0
    assert _lines(text)[-2:] == ["8 files: 8 ok", f"release {out}: OK"]


def test_cli_build_error_is_one_line(tmp_path):
    (tmp_path / "s.toml").write_text("bogus = 1\n")
    result = CliRunner().invoke(main, ["release", "build", str(tmp_path / "s.toml"), "-o", str(tmp_path / "o")])
    assert result.exit_code == 1
    assert result.output.strip().splitlines() == [f"Error: {tmp_path / 's.toml'}: unknown key 'bogus'; expected one of name, "
                                                   "source, base_model, variants, overrides, extra_files, validation, card, imatrix, sensitivity, lora"]


def _flip_tensor_byte(release: Path, path: str, tensor: str) -> None:
    t = next(t for t in load_manifest(release / "manifest.json").artifact(path).tensors if t.name == tensor)
    with open(release / path, "r+b") as f:
        f.seek(t.offset + t.nbytes // 2)
        b = f.read(1)
        f.seek(t.offset + t.nbytes // 2)
        f.write(bytes([b[0] ^ 0x10]))


Q3, Q4, BF = (f"{NAME}-{v}.gguf" for v in VARIANTS)


def _statuses(out: str) -> dict[str, str]:
    found = {}
    for line in _lines(out):
        parts = line.split()
        if len(parts) >= 2 and parts[0] in ("ok", "mismatch", "missing", "unexpected"):
            found[parts[1]] = parts[0]
    return found


ALL_OK = {"manifest.json": "ok", "SHA256SUMS": "ok", Q3: "ok", Q4: "ok", BF: "ok", "README.md": "ok",
          "validation.json": "ok", "LICENSE.md": "ok"}


def test_cli_flipped_byte_in_a_tensor(release):
    _flip_tensor_byte(release, Q4, "double_blocks.0.txt_mlp.2.weight")
    code, text = run("verify", str(release), "--tensors")
    assert code == 1
    assert _statuses(text) == ALL_OK | {Q4: "mismatch"}
    assert f"mismatch    {Q4}  (same size, different content; 1 of 52 tensors differ)" in _lines(text)
    assert "              damaged tensor: double_blocks.0.txt_mlp.2.weight" in _lines(text)
    assert _lines(text)[-2:] == ["8 files: 7 ok, 1 mismatch", f"release {release}: PROBLEMS FOUND"]


def test_cli_truncation(release):
    size = (release / BF).stat().st_size
    os.truncate(release / BF, size - 4096)
    code, text = run("verify", str(release), "--json")
    assert code == 1
    doc = json.loads(text)
    assert doc["ok"] is False and doc["counts"] == {"ok": 7, "mismatch": 1, "missing": 0, "unexpected": 0}
    bad = next(f for f in doc["files"] if f["path"] == BF)
    assert (bad["status"], bad["expected_size"], bad["actual_size"]) == ("mismatch", size, size - 4096)
    assert bad["detail"] == f"size {size - 4096} bytes, expected {size}"


def test_cli_missing_file(release):
    (release / "LICENSE.md").unlink()
    code, text = run("verify", str(release))
    assert code == 1 and _statuses(text) == ALL_OK | {"LICENSE.md": "missing"}


def test_cli_extra_file(release):
    (release / "bonus.gguf").write_bytes(b"GGUF")
    code, text = run("verify", str(release))
    assert code == 1 and _statuses(text) == ALL_OK | {"bonus.gguf": "unexpected"}
    assert "unexpected  bonus.gguf  (not listed in the manifest)" in _lines(text)
    code, _ = run("verify", str(release), "--ignore", "bonus.*")
    assert code == 0


def test_cli_swapped_files(release):
    tmp = release / "swap"
    (release / Q3).rename(tmp)
    (release / Q4).rename(release / Q3)
    tmp.rename(release / Q4)
    code, text = run("verify", str(release), "--json")
    assert code == 1
    doc = json.loads(text)
    got = {f["path"]: f for f in doc["files"]}
    assert {p: f["status"] for p, f in got.items()} == ALL_OK | {Q3: "mismatch", Q4: "mismatch"}
    assert got[Q3]["actual_sha256"] == got[Q4]["expected_sha256"]


def test_cli_edited_manifest(release):
    doc = json.loads((release / "manifest.json").read_text())
    doc["artifacts"][5]["size"] += 1  # LICENSE.md
    (release / "manifest.json").write_text(json.dumps(doc, indent=2) + "\n")
    code, text = run("verify", str(release))
    assert code == 1
    assert _statuses(text) == ALL_OK | {"manifest.json": "mismatch", "LICENSE.md": "mismatch"}


def test_cli_path_traversal_manifest(release):
    doc = json.loads((release / "manifest.json").read_text())
    doc["artifacts"][5]["path"] = "../../etc/passwd"
    (release / "manifest.json").write_text(json.dumps(doc))
    result = CliRunner().invoke(main, ["verify", str(release)])
    assert result.exit_code == 1
    assert result.output.strip().splitlines() == ["Error: unsafe path '../../etc/passwd' in manifest: '..' components are not allowed"]


def test_cli_schema_invalid_manifest(release):
    doc = json.loads((release / "manifest.json").read_text())
    doc["artifacts"][0]["tensors"][0]["sha256"] = "xyz"
    (release / "manifest.json").write_text(json.dumps(doc))
    result = CliRunner().invoke(main, ["verify", str(release)])
    assert result.exit_code == 1
    assert result.output.strip() == (f"Error: {release / 'manifest.json'}: artifacts[0].tensors[0].sha256: "
                                     "expected a string matching ^[0-9a-f]{64}$, got 'xyz'")


def test_cli_verify_source(release, project, tmp_path):
    code, text = run("verify", str(release), "--source", str(project.parent / "weights" / "tiny.safetensors"))
    assert code == 0, text
    assert "source files are byte-identical to those the manifest lists" in text
    assert _lines(text)[-1] == f"release {release}: OK"
    other = write_synthetic_flux(tmp_path / "other.safetensors", GEO, seed=7)
    code, text = run("verify", str(release), "--source", str(other), "--json")
    assert code == 1
    doc = json.loads(text)
    assert doc["ok"] is False and doc["source"]["ok"] is False
    assert [(f["name"], f["status"]) for f in doc["source"]["source_files"]] == [
        ("tiny.safetensors", "missing"), ("other.safetensors", "unexpected")]
    assert doc["source"]["problems"][0]["status"] == "mismatch"
