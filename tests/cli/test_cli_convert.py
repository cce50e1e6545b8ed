"""The CLI through click's CliRunner: exact error lines and exit codes, JSON output, dry runs."""
from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner
from gguf import GGUFReader
from safetensors.numpy import save_file

from converter.cli import COMMANDS, main
from converter.layout import FluxGeometry
from converter.sources import open_source
from converter.synthetic import write_synthetic_flux

GEO = FluxGeometry(double_blocks=1, single_blocks=1, hidden=256)


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    return write_synthetic_flux(tmp_path_factory.mktemp("src") / "tiny.safetensors", GEO, seed=3)


def run(*args: str):
    return CliRunner().invoke(main, [str(a) for a in args])


def assert_error(result, line: str):
    assert result.exit_code == 1, result.output
    assert result.stdout == ""
    assert result.stderr == f"Error: {line}\n"


def test_not_a_safetensors_file(tmp_path):
    p = tmp_path / "notes.safetensors"
    p.write_text("hello world, not a checkpoint")
    r = run("convert", p, "-o", tmp_path / "out", "--variant", "Q4_K_M")
    assert_error(r, f"{p}: not a safetensors file (header length 8031924123371070824 does not fit in the 29-byte file)")
    assert not (tmp_path / "out").exists()


def test_truncated_file(src, tmp_path):
    p = tmp_path / "cut.safetensors"
    data = src.read_bytes()
    p.write_bytes(data[:-1000])
    r = run("convert", p, "-o", tmp_path / "out", "--variant", "Q4_K_M")
    assert_error(r, f"{p}: truncated file: tensor final_layer.adaLN_modulation.1.bias needs bytes up to "
                    f"{len(data)} but the file has {len(data) - 1000}")


def test_non_flux_model(tmp_path):
    p = tmp_path / "llm.safetensors"
    save_file({"model.layers.0.self_attn.q_proj.weight": np.zeros((4, 4), np.float32)}, p)
    r = run("convert", p, "-o", tmp_path / "out", "--variant", "Q8_0")
    assert_error(r, f"{p} is not a FLUX.1 transformer: expected img_in.weight, double_blocks.N.* and "
                    "single_blocks.N.*; found 1 tensors: model.layers.0.self_attn.q_proj.weight")


def test_missing_tensors(src, tmp_path):
    p = tmp_path / "partial.safetensors"
    with open_source(src) as s:
        save_file({n: s.read(n) for n in s.tensors if not n.startswith("double_blocks.0.img_mlp.")}, p)
    r = run("convert", p, "-o", tmp_path / "out", "--variant", "Q8_0")
    assert_error(r, f"{p} is missing double_blocks.0.img_mlp.0.weight (and 3 more)")


def test_missing_source(tmp_path):
    r = run("convert", tmp_path / "nope.safetensors", "-o", tmp_path, "--variant", "Q8_0")
    assert_error(r, f"{tmp_path / 'nope.safetensors'}: no such file or folder")


def test_unknown_variant(src, tmp_path):
    r = run("convert", src, "-o", tmp_path, "--variant", "Q8_0", "--variant", "Q4_K_X")
    assert_error(r, "unknown variant 'Q4_K_X'; valid variants: Q2_K, Q3_K_S, Q3_K_M, Q3_K_L, Q4_K_S, Q4_K_M, "
                    "Q5_K_S, Q5_K_M, Q6_K, Q8_0, F16, BF16")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("override, line", [
    ("a[=Q4_K", "override 'a[=Q4_K': bad regular expression: missing ]: ["),
    ("(qkv)\\1=Q4_K", "override '(qkv)\\1=Q4_K': bad regular expression: invalid escape sequence: \\1 (backreferences "
                      "such as \\1 and lookaround such as (?=...) are not supported: patterns are matched by RE2, in "
                      "linear time)"),
    ("(?<!txt_)attn=Q4_K", "override '(?<!txt_)attn=Q4_K': bad regular expression: invalid perl operator: (?<! "
                           "(backreferences such as \\1 and lookaround such as (?=...) are not supported: patterns "
                           "are matched by RE2, in linear time)"),
    ("qkv=IQ4_XS", "override 'qkv=IQ4_XS': unknown type 'IQ4_XS'; valid types: F32, F16, BF16, Q8_0, Q2_K, "
                   "Q3_K, Q4_K, Q5_K, Q6_K"),
    ("qkv", "override 'qkv' must look like REGEX=TYPE (for example 'txt_attn\\.qkv=Q8_0')"),
    ("^img_in=Q6_K", "override '^img_in=Q6_K' matches only img_in.weight, which stays F32 so diffusers detects "
                     "the model correctly"),
])
def test_bad_override(src, tmp_path, override, line):
    r = run("convert", src, "-o", tmp_path / "out", "--variant", "Q4_K_M", "--override", override)
    assert_error(r, line)
    assert not (tmp_path / "out").exists() or list((tmp_path / "out").iterdir()) == []


def test_unwritable_output_dir(src, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    r = run("convert", src, "-o", blocker / "out", "--variant", "Q8_0", "--variant", "Q4_K_M")
    assert_error(r, f"{blocker / 'out' / 'tiny-Q8_0.gguf'}, {blocker / 'out' / 'tiny-Q4_K_M.gguf'} were not "
                    f"written: cannot create {blocker / 'out'}: Not a directory")


def test_threads_out_of_range(src, tmp_path):
    import numba
    r = run("convert", src, "-o", tmp_path, "--variant", "Q8_0", "--threads", "0")
    assert_error(r, f"--threads must be between 1 and {numba.config.NUMBA_NUM_THREADS} (the cores numba may use), got 0")


def test_direct_io_choices_give_the_same_files_and_a_bad_setting_is_one_line(src, tmp_path, monkeypatch):
    from converter import direct_io
    monkeypatch.setenv(direct_io.ENV, "auto")  # the CLI sets it for its process: restored after
    digests = []
    for mode in ("off", "on"):
        r = run("convert", src, "-o", tmp_path / mode, "--variant", "Q4_K_M", "--direct-io", mode, "--json")
        assert r.exit_code == 0, r.output
        digests.append([a["sha256"] for a in json.loads(r.stdout)["artifacts"]])
    assert digests[0] == digests[1]
    monkeypatch.setenv(direct_io.ENV, "sideways")
    assert_error(run("convert", src, "-o", tmp_path / "bad", "--variant", "Q8_0"),
                 "FLUX_GGUF_DIRECT_IO='sideways': expected one of auto, on, off")
    assert not (tmp_path / "bad").exists()
    r = run("convert", src, "-o", tmp_path / "bad", "--variant", "Q8_0", "--direct-io", "sideways")
    assert r.exit_code == 2 and "'sideways' is not one of 'auto', 'on', 'off'" in r.stderr


def test_convert_json(src, tmp_path):
    r = run("convert", src, "-o", tmp_path, "--variant", "Q4_K_M,Q8_0", "--name", "kontext", "--threads", "1", "--json",
            "--override", r"single_blocks\.0\.linear2=Q6_K")
    assert r.exit_code == 0, r.output
    arts = json.loads(r.stdout)["artifacts"]
    assert [a["variant"] for a in arts] == ["Q4_K_M", "Q8_0"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kontext-Q4_K_M.gguf", "kontext-Q8_0.gguf"]
    for a in arts:
        reader = GGUFReader(a["path"])
        types = {t.name: t.tensor_type.name for t in reader.tensors}
        assert types["single_blocks.0.linear2.weight"] == "Q6_K"
        assert {t["name"]: t["type"] for t in a["tensors"]} == types
        assert json.loads(reader.fields["flux_gguf.overrides"].contents()) == [r"single_blocks\.0\.linear2=Q6_K"]


def test_convert_text_output(src, tmp_path):
    r = run("convert", src, "-o", tmp_path, "--variant", "Q5_K_S")
    assert r.exit_code == 0, r.output
    first = r.stdout.splitlines()[0]
    assert first.startswith(f"{tmp_path / 'tiny-Q5_K_S.gguf'}  ") and " sha256 " in first
    assert r.stdout.splitlines()[-1].startswith("done in ")


def test_dry_run_writes_nothing(src, tmp_path):
    r = run("convert", src, "-o", tmp_path / "out", "--variant", "Q4_K_M", "--variant", "Q3_K_L", "--dry-run")
    assert r.exit_code == 0, r.output
    lines = r.stdout.splitlines()
    assert lines[0].startswith(f"{src} (bfl layout, flux-dev): 52 tensors, 5,092,928 parameters")
    assert lines[2].split()[:2] == ["Q4_K_M", str(tmp_path / "out" / "tiny-Q4_K_M.gguf")]
    assert lines[3].split()[0] == "Q3_K_L"
    assert not (tmp_path / "out").exists()

    r = run("convert", src, "-o", tmp_path / "out", "--variant", "Q4_K_M", "--dry-run", "--json")
    plan = json.loads(r.stdout)["plans"][0]
    assert not (tmp_path / "out").exists()
    r = run("convert", src, "-o", tmp_path / "out", "--variant", "Q4_K_M")
    assert r.exit_code == 0, r.output
    assert (tmp_path / "out" / "tiny-Q4_K_M.gguf").stat().st_size == plan["size"]


def test_dry_run_reports_fallbacks(tmp_path):
    geo = FluxGeometry(double_blocks=1, single_blocks=1, hidden=384)
    p = write_synthetic_flux(tmp_path / "odd.safetensors", geo)
    r = run("convert", p, "-o", tmp_path / "out", "--variant", "Q4_K_S", "--dry-run")
    assert r.exit_code == 0, r.output
    note = r.stdout.splitlines()[-1]
    assert note.startswith("note: Q4_K_S: 11 tensors fall back to F16 (rows not a multiple of the block size): ")


def test_inspect_gguf_and_safetensors(src, tmp_path):
    assert run("convert", src, "-o", tmp_path, "--variant", "Q4_K_M").exit_code == 0
    gg = tmp_path / "tiny-Q4_K_M.gguf"
    r = run("inspect", gg, "--json")
    assert r.exit_code == 0, r.output
    rep = json.loads(r.stdout)
    assert (rep["kind"], rep["architecture"], rep["family"], rep["variant"], rep["file_type"]) == \
        ("gguf", "flux", "flux-dev", "Q4_K_M", 15)
    assert rep["size"] == gg.stat().st_size
    assert rep["types"] == {"F32": 30, "Q4_K": 11, "BF16": 9, "Q5_K": 2}
    assert {"name": "img_in.weight", "type": "F32", "shape": [256, 64], "nbytes": 256 * 64 * 4} in rep["tensors"]
    text = run("inspect", gg).stdout
    assert "variant:      Q4_K_M (general.file_type 15)" in text
    assert "types:        F32:30 Q4_K:11 BF16:9 Q5_K:2" in text
    flux_keys = [k for k in rep["metadata"] if k.startswith("flux_gguf.")]
    assert {"flux_gguf.recipe", "flux_gguf.model_family", "flux_gguf.source"} <= set(flux_keys)
    for key in flux_keys:  # the text shows every key --json shows
        assert f"{key}: {rep['metadata'][key]}\n" in text
    assert "flux_gguf.recipe: Q4_K_M\n" in text and "flux_gguf.model_family: flux-dev\n" in text

    rep = json.loads(run("inspect", src, "--json").stdout)
    assert (rep["kind"], rep["layout"], rep["family"], rep["problem"]) == ("safetensors", "bfl", "flux-dev", None)
    assert rep["types"] == {"BF16": 52}


def test_inspect_errors(tmp_path):
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF" + bytes(6))
    r = run("inspect", bad)
    assert r.exit_code == 1 and r.stderr.startswith(f"Error: {bad} is not a readable GGUF file: ")
    assert len(r.stderr.splitlines()) == 1
    assert_error(run("inspect", tmp_path / "none.gguf"), f"{tmp_path / 'none.gguf'}: no such file or folder")


def test_inspect_reports_a_non_flux_checkpoint(tmp_path):
    p = tmp_path / "unet.safetensors"
    save_file({"input_blocks.0.0.weight": np.zeros((4, 4), np.float32)}, p)
    rep = json.loads(run("inspect", p, "--json").stdout)
    assert rep["family"] is None
    assert rep["problem"] == (f"{p} is a UNet (Stable Diffusion-style), not a FLUX.1 transformer: found "
                              "input_blocks.0.0.weight; expected img_in.weight, double_blocks.N.* and single_blocks.N.*")


def test_example_command(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the suggested release folder is the first free dist/example[-N] here
    r = run("example", "-o", tmp_path / "ex")
    assert r.exit_code == 0, r.output
    assert sorted(p.name for p in (tmp_path / "ex").iterdir()) == [
        "flux1-example-Q4_K_M.gguf", "flux1-example-Q8_0.gguf", "flux1-example.safetensors", "release.toml"]
    assert r.stdout.splitlines()[0].startswith(f"1. wrote {tmp_path / 'ex' / 'flux1-example.safetensors'}")
    for v in ("Q8_0", "Q4_K_M"):
        reader = GGUFReader(tmp_path / "ex" / f"flux1-example-{v}.gguf")
        assert reader.fields["flux_gguf.recipe"].contents() == v
        assert len(reader.tensors) == 84  # 52 for 1 + 1 blocks, 24 per double and 8 per single block more
    # The README's next commands, run as written from the folder the example ran in.
    assert f"  flux-gguf release build {tmp_path / 'ex' / 'release.toml'} -o dist/example" in r.stdout
    r = run("release", "build", "ex/release.toml", "-o", "dist/example")
    assert r.exit_code == 0, r.output
    r = run("verify", "dist/example")
    assert r.exit_code == 0, r.output
    assert r.stdout.splitlines()[-1] == "release dist/example: OK"
    manifest = json.loads((tmp_path / "dist" / "example" / "manifest.json").read_text())
    assert manifest["spec"]["source"] == "flux1-example.safetensors"
    assert [a["variant"] for a in manifest["artifacts"] if a["kind"] == "gguf"] == ["Q8_0", "Q4_K_M"]
    # the release's GGUFs are the example's own files, byte for byte
    for v in ("Q8_0", "Q4_K_M"):
        name = f"flux1-example-{v}.gguf"
        assert (tmp_path / "dist" / "example" / name).read_bytes() == (tmp_path / "ex" / name).read_bytes()


def test_help_lists_every_command():
    r = run("--help")
    assert r.exit_code == 0
    for spec in COMMANDS:
        assert f"  {spec.split(':')[1]} " in r.stdout


def test_dry_run_on_a_full_size_header_matches_the_published_sizes(tmp_path):
    """The full FLUX.1 layout as a sparse file: a real header, 23.8 GB of holes; nothing is read."""
    import math

    from converter.layout import bfl_tensor_shapes
    from converter.safetensors_io import encode_header

    shapes = bfl_tensor_shapes(FluxGeometry())
    p = tmp_path / "flux1-kontext-dev.safetensors"
    header = encode_header([(n, "BF16", s) for n, s in shapes.items()], {"format": "pt"})
    with open(p, "wb") as f:
        f.write(header)
        f.truncate(len(header) + sum(math.prod(s) * 2 for s in shapes.values()))
    published = {"Q2_K": 4.024, "Q3_K_S": 5.226, "Q3_K_M": 5.368, "Q4_K_S": 6.797, "Q4_K_M": 6.932,
                 "Q5_K_S": 8.277, "Q5_K_M": 8.419, "Q6_K": 9.848, "Q8_0": 12.714}
    r = run("convert", p, "-o", tmp_path / "out", "--variant", ",".join(published), "--dry-run", "--json")
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert out["family"] == "flux-dev"
    sizes = {pl["variant"]: pl["size"] for pl in out["plans"]}
    assert sizes.keys() == published.keys()
    for v, gb in published.items():
        assert abs(sizes[v] / 1e9 - gb) <= gb * 0.001, v
    assert not (tmp_path / "out").exists()
