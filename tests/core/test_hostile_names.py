"""Issue 28: lock files that are not ours, names that look like other names, refusals that named
nothing. Every input is generated here; each refusal is one exact ``Error:`` line, exit 1, and
nothing the run did not create is written, truncated or removed.

Cases that could hang (a backtracking regex) run in a child process with a timeout and a memory
cap (tests/cli_child.py, shared with test_hostile_inputs.py); there are no timed assertions.
"""
from __future__ import annotations

import json
import os
import shutil
import struct
import unicodedata
from pathlib import Path

import numpy as np
import pytest
from safetensors import safe_open

from converter.cli.output import one_line
from converter.layout import FluxGeometry
from converter.synthetic import write_synthetic_flux
from cli_child import assert_error, run, run_child
from lora_fixtures import make_truth, write_diffusers, write_raw
from manifests import SchemaError, UnsafePathError, load_manifest, parse_sha256sums
from manifests.errors import ChecksumsFormatError
from manifests.locking import ForeignLockFileError, OutputBusyError, acquire, lock_path_for
from manifests.paths import name_key, name_problem

GEO = FluxGeometry(double_blocks=1, single_blocks=1, hidden=256)


@pytest.fixture(scope="module")
def src(tmp_path_factory) -> Path:
    return write_synthetic_flux(tmp_path_factory.mktemp("src") / "tiny.safetensors", GEO, seed=5)


def project(root: Path, src: Path, name: str = "tiny", extra: list[str] | None = None, lora: str = "") -> Path:
    """A release project: weights, the extra files (created with their own names as content), a spec."""
    (root / "weights").mkdir(parents=True)
    (root / "weights" / "tiny.safetensors").symlink_to(src)
    for rel in extra or []:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(rel)
    files = ", ".join(json.dumps(e) for e in extra or [])
    (root / "release.toml").write_text(
        f'name = {json.dumps(name)}\nsource = "weights/tiny.safetensors"\nvariants = ["Q8_0"]\n'
        f'base_model = "black-forest-labs/FLUX.1-Kontext-dev"\nextra_files = [{files}]\n{lora}'
        '[card]\nlicense = "apache-2.0"\n')
    return root / "release.toml"


# ---- lock files that are not ours ----------------------------------------------------------------

def test_a_hard_link_at_converts_lock_name_is_refused_and_the_users_file_untouched(src, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    victim = tmp_path / "thesis.txt"
    victim.write_text("years of work")
    lock = out / ".tiny-Q8_0.gguf.flux-gguf.lock"
    os.link(victim, lock)
    r = run("convert", src, "-o", out, "--variant", "Q8_0")
    assert_error(r, f"{lock}: is in the way of the lock on {out / 'tiny-Q8_0.gguf'} and is not a flux-gguf lock "
                    "file (it has 2 hard links, so another name shares its content); it was left untouched: move it "
                    "away or choose another output")
    assert victim.read_text() == "years of work" and lock.exists()
    assert sorted(p.name for p in out.iterdir()) == [lock.name]  # no GGUF, no partial


def test_a_hard_link_beside_a_release_folder_is_refused_and_untouched(src, tmp_path):
    spec = project(tmp_path / "p", src)
    out = tmp_path / "rel"
    victim = tmp_path / "notes.md"
    victim.write_text("mine")
    os.link(victim, lock_path_for(out))
    r = run("release", "build", spec, "-o", out)
    assert_error(r, f"{lock_path_for(out)}: is in the way of the lock on {out} and is not a flux-gguf lock file (it "
                    "has 2 hard links, so another name shares its content); it was left untouched: move it away or "
                    "choose another output")
    assert victim.read_text() == "mine" and not out.exists()


def test_a_hard_link_at_the_download_lock_name_is_refused_untouched(tmp_path):
    folder = tmp_path / "dl"
    folder.mkdir()
    victim = tmp_path / "keys.txt"
    victim.write_text("secret")
    os.link(victim, folder / ".flux-gguf.lock")
    with pytest.raises(ForeignLockFileError) as e:
        acquire(folder, folder / ".flux-gguf.lock")  # what download takes before it fetches anything
    assert e.value.reason == "it has 2 hard links, so another name shares its content"
    assert victim.read_text() == "secret"


@pytest.mark.parametrize(("content", "reason"), [
    (b"my notes, not a pid\n", "it holds 20 bytes that are not a process id"),
    (b"12 34\n", "it holds 6 bytes that are not a process id"),
    (b"9" * 40, "it holds 40 bytes that are not a process id"),
])
def test_a_file_with_content_of_its_own_at_the_lock_name_is_refused_untouched(tmp_path, content, reason):
    target = tmp_path / "out.gguf"
    lock_path_for(target).write_bytes(content)
    with pytest.raises(ForeignLockFileError) as e:
        acquire(target)
    assert (e.value.path, e.value.reason) == (str(lock_path_for(target)), reason)
    assert lock_path_for(target).read_bytes() == content


def test_a_lock_file_of_another_user_is_refused_untouched(tmp_path, monkeypatch):
    target = tmp_path / "out.gguf"
    lock_path_for(target).write_text("4242\n")
    me = os.geteuid()
    monkeypatch.setattr(os, "geteuid", lambda: me + 1)  # the file is now someone else's
    with pytest.raises(ForeignLockFileError) as e:
        acquire(target)
    assert e.value.reason == f"it belongs to user id {me}, not to this user ({me + 1})"
    assert lock_path_for(target).read_text() == "4242\n"


def test_a_fifo_or_a_folder_at_the_lock_name_is_refused_at_once(tmp_path):
    os.mkfifo(lock_path_for(tmp_path / "a"))
    with pytest.raises(ForeignLockFileError, match=r"\(it is not a regular file\)"):
        acquire(tmp_path / "a")  # looked at, never opened: a FIFO cannot block
    lock_path_for(tmp_path / "b").mkdir()
    with pytest.raises(ForeignLockFileError, match=r"\(it is a folder\)"):
        acquire(tmp_path / "b")


@pytest.mark.parametrize("content", [b"", b"31337\n", b"31337"])
def test_a_stale_lock_file_of_a_dead_run_is_reused_and_removed(tmp_path, content):
    target = tmp_path / "out.gguf"
    lock_path_for(target).write_bytes(content)
    with acquire(target):
        assert lock_path_for(target).read_text() == f"{os.getpid()}\n"
        with pytest.raises(OutputBusyError):  # held: a second run still fails at once
            acquire(target)
    assert not lock_path_for(target).exists()


def test_a_lock_created_by_this_run_is_trusted_even_when_the_file_system_says_another_owner(tmp_path, monkeypatch):
    """NFS root squash gives new files another owner; a file made with O_EXCL is ours regardless."""
    me = os.geteuid()
    monkeypatch.setattr(os, "geteuid", lambda: me + 1)
    with acquire(tmp_path / "out.gguf"):
        assert lock_path_for(tmp_path / "out.gguf").read_text() == f"{os.getpid()}\n"
    assert not lock_path_for(tmp_path / "out.gguf").exists()


# ---- one name policy ---------------------------------------------------------------------------------

HOSTILE = [
    ("\u202e", "U+202E RIGHT-TO-LEFT OVERRIDE (a bidirectional control character, which reorders how the text "
               "around it is shown)"),
    ("\u200b", "U+200B ZERO WIDTH SPACE (an invisible format character)"),
    ("\ufeff", "U+FEFF ZERO WIDTH NO-BREAK SPACE (an invisible format character)"),
    ("\u2028", "U+2028 LINE SEPARATOR (a line separator)"),
    ("\u00a0", "U+00A0 NO-BREAK SPACE (a space other than U+0020)"),
    ("\ue000", "U+E000 (a private-use character)"),
    ("\u0378", f"U+0378 (a code point unassigned in Unicode {unicodedata.unidata_version})"),
    ("\u3164", "U+3164 HANGUL FILLER (an invisible character)"),
    ("\x1b", "U+001B (a control character)"),
]


@pytest.mark.parametrize(("ch", "shown"), HOSTILE)
def test_an_invisible_or_reordering_character_in_the_release_name_is_refused_by_code_point(src, tmp_path, ch, shown):
    spec = project(tmp_path / "p", src, name=f"tiny{ch}gguf")
    r = run("release", "build", spec, "-o", tmp_path / "out")
    assert_error(r, f"{spec}: 'name' must be a plain file-name stem, but it contains {shown}")
    assert ch not in r.output and not (tmp_path / "out").exists()


@pytest.mark.parametrize(("ch", "shown"), HOSTILE[:4])
def test_an_invisible_character_in_an_extra_files_name_is_refused(src, tmp_path, ch, shown):
    name = f"LICENSE{ch}.md"
    spec = project(tmp_path / "p", src, extra=[name])
    r = run("release", "build", spec, "-o", tmp_path / "out")
    assert_error(r, f"{spec}: 'extra_files' names {name!r}, which contains {shown}")
    assert not (tmp_path / "out").exists()


def test_an_nfd_name_is_refused_so_nfc_and_nfd_twins_never_both_ship(src, tmp_path):
    nfc, nfd = "caf\u00e9.md", "cafe\u0301.md"
    spec = project(tmp_path / "p", src, extra=[nfc, nfd])
    assert_error(run("release", "build", spec, "-o", tmp_path / "out"),
                 f"{spec}: 'extra_files' names {nfd!r}, which is not in Unicode NFC form (it is 'cafe\\u0301.md'; "
                 "composed it would be 'caf\\xe9.md')")
    spec = project(tmp_path / "q", src, name="cafe\u0301")
    assert_error(run("release", "build", spec, "-o", tmp_path / "out"),
                 f"{spec}: 'name' must be a plain file-name stem, but it is not in Unicode NFC form (it is "
                 "'cafe\\u0301'; composed it would be 'caf\\xe9')")


def test_fullwidth_and_ligature_twins_of_a_file_the_release_writes_are_refused(src, tmp_path):
    spec = project(tmp_path / "p", src, extra=["docs/\uff32\uff25\uff21\uff24\uff2d\uff25.md"])  # fullwidth README
    assert_error(run("release", "build", spec, "-o", tmp_path / "out"),
                 f"{spec}: 'extra_files' names 'docs/ＲＥＡＤＭＥ.md', whose file name 'ＲＥＡＤＭＥ.md' (the same as "
                 "'README.md' where case and Unicode compatibility forms (fullwidth letters, ligatures) do not count) "
                 "the release itself writes")
    spec = project(tmp_path / "q", src, extra=["a/\uff46ile.txt", "b/FILE.txt"])  # a fullwidth f
    assert_error(run("release", "build", spec, "-o", tmp_path / "out"),
                 f"{spec}: 'extra_files' lists 'ｆile.txt' and 'FILE.txt', which are one file where case and Unicode "
                 "compatibility forms (fullwidth letters, ligatures) do not count")
    spec = project(tmp_path / "r", src, extra=["a/\ufb01le.txt", "b/FILE.txt"])  # the "ﬁ" ligature case-folds to "fi"
    assert_error(run("release", "build", spec, "-o", tmp_path / "out"),
                 f"{spec}: 'extra_files' lists 'ﬁle.txt' and 'FILE.txt', which are one file where case does not count")


@pytest.fixture(scope="module")
def lora_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("lora") / "style.safetensors"
    write_diffusers(path, make_truth(GEO, seed=3))
    return path


def test_lora_names_follow_the_policy_and_case_twins_collide(src, tmp_path, lora_file):
    shutil.copy(lora_file, tmp_path / "a.safetensors")
    entry = '[[lora]]\npath = "a.safetensors"\nname = "{}"\nmode = "sidecar"\n'
    spec = project(tmp_path / "p", src, lora=entry.format("hyper\\u200b8"))
    shutil.copy(lora_file, tmp_path / "p" / "a.safetensors")
    assert_error(run("release", "build", spec, "-o", tmp_path / "out"),
                 f"{spec}: [[lora]] entry 1: name 'hyper\\u200b8' must be a plain word, but it contains U+200B ZERO "
                 "WIDTH SPACE (an invisible format character)")
    spec = project(tmp_path / "q", src, lora=entry.format("Hyper8") + entry.format("hyper8"))
    shutil.copy(lora_file, tmp_path / "q" / "a.safetensors")
    assert_error(run("release", "build", spec, "-o", tmp_path / "out"),
                 f"{spec}: [[lora]] entries named 'Hyper8' and 'hyper8' differ only by case; names must be unique")
    assert not (tmp_path / "out").exists()


def test_convert_name_follows_the_policy_and_a_decomposed_source_name_becomes_nfc(src, tmp_path):
    out = tmp_path / "out"
    assert_error(run("convert", src, "-o", out, "--variant", "Q8_0", "--name", "evil\u202egguf.exe"),
                 "output name 'evil\\u202egguf.exe' must be a plain file-name stem, but it contains U+202E "
                 "RIGHT-TO-LEFT OVERRIDE (a bidirectional control character, which reorders how the text around it "
                 "is shown)")
    assert not out.exists() or list(out.iterdir()) == []
    nfd = tmp_path / "cafe\u0301.safetensors"
    nfd.symlink_to(src)
    r = run("convert", nfd, "-o", out, "--variant", "Q8_0")
    assert r.exit_code == 0, r.output
    assert [p.name for p in out.iterdir()] == ["caf\u00e9-Q8_0.gguf"]


def _manifest(paths: list[str]) -> bytes:
    sha = "0" * 64
    return json.dumps({"manifest_version": 1, "tool": {"name": "flux-gguf", "version": "1"}, "name": "n", "spec": {},
                       "sources": [{"name": "w.safetensors", "size": 1, "sha256": sha}], "artifacts": [{"path": p, "size": 1, "sha256": sha, "kind": "extra"}
                                                     for p in paths]}).encode()


@pytest.mark.parametrize(("paths", "message"), [
    (["docs/README\u202egnp.md"], "unsafe path 'docs/README\\u202egnp.md' in manifest: contains U+202E RIGHT-TO-LEFT "
                                  "OVERRIDE (a bidirectional control character, which reorders how the text around "
                                  "it is shown)"),
    (["a\u2028b"], "unsafe path 'a\\u2028b' in manifest: contains U+2028 LINE SEPARATOR (a line separator)"),
    (["a\tb"], "unsafe path 'a\\tb' in manifest: contains U+0009 (a control character)"),
    (["cafe\u0301.txt"], "unsafe path 'cafe\u0301.txt' in manifest: is not in Unicode NFC form (it is 'cafe\\u0301.txt'; "
                         "composed it would be 'caf\\xe9.txt')"),
    (["model.gguf", "\uff4d\uff4f\uff44\uff45\uff4c.gguf"],
     "manifest.json: artifacts[1].path: 'ｍｏｄｅｌ.gguf' is listed twice (or differs from 'model.gguf' only by case "
     "or Unicode compatibility forms (fullwidth letters, ligatures and the like))"),
    (["Docs", "\uff44ocs/a.md"], "manifest.json: artifacts: 'Docs' is listed as a file and as a folder of other files"),
])
def test_manifest_paths_follow_the_policy_and_look_alike_twins_collide(paths, message):
    with pytest.raises((SchemaError, UnsafePathError)) as e:
        load_manifest(_manifest(paths))
    assert str(e.value) == message


def test_a_sha256sums_line_with_a_bidi_override_is_refused_naming_the_line():
    with pytest.raises(ChecksumsFormatError) as e:
        parse_sha256sums(b"0" * 64 + b"  ok.gguf\n" + b"0" * 64 + "  evil\u202egguf.exe\n".encode())
    assert str(e.value) == ("SHA256SUMS line 2: path 'evil\\u202egguf.exe': contains U+202E RIGHT-TO-LEFT OVERRIDE (a "
                            "bidirectional control character, which reorders how the text around it is shown)")


def test_the_policy_accepts_ordinary_names_of_any_script():
    for name in ("flux1-kontext-dev Q4_K_M", "Müller_v2", "模型-量化", "модель.gguf", "שלום", "café"):
        assert name_problem(name) is None, name
    assert name_key("README.md") == name_key("readme.MD") == name_key("ＲＥＡＤＭＥ.md")
    assert name_key("straße") == name_key("STRASSE")


def test_error_lines_show_separators_and_bidi_escaped_never_split_or_raw():
    assert one_line("a\u2028b \u202e c\u0085d\nnext") == "a\\u2028b \\u202e c\\x85d next"


def test_verify_shows_a_crafted_file_name_escaped(release, tmp_path):
    folder = tmp_path / "rel"
    shutil.copytree(release, folder)
    (folder / "evil\x1b[2J\u202etxt.exe").write_text("x")
    r = run("verify", folder)
    assert r.exit_code == 1
    assert "unexpected  evil\\x1b[2J\\u202etxt.exe  (not listed in the manifest)" in r.stdout.splitlines()
    assert "\x1b" not in r.output and "\u202e" not in r.output


# ---- refusals that named nothing -------------------------------------------------------------------

def _peft_lora(tmp_path: Path, lora_file: Path, config: str) -> Path:
    with safe_open(str(lora_file), "numpy") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    path = tmp_path / "peft.safetensors"
    write_raw(path, tensors, {**meta, "lora_adapter_metadata": config})
    return path


@pytest.mark.parametrize(("config", "problem"), [
    ('{"transformer.lora_alpha": "x"}', "metadata lora_adapter_metadata: lora_alpha must be a finite number within "
                                        "float32's range, got 'x'"),
    ('{"transformer.lora_alpha": [8]}', "metadata lora_adapter_metadata: lora_alpha must be a finite number within "
                                        "float32's range, got [8]"),
    ('{"transformer.lora_alpha": NaN}', "metadata lora_adapter_metadata: lora_alpha must be a finite number within "
                                        "float32's range, got nan"),
    ('{"transformer.lora_alpha": 1e300}', "metadata lora_adapter_metadata: lora_alpha must be a finite number within "
                                          "float32's range, got 1e+300"),
    ('{"transformer.lora_alpha": ' + "9" * 400 + "}", "metadata lora_adapter_metadata: lora_alpha must be a finite "
                                                      "number within float32's range, got 9999999999999999999999999"
                                                      "99999999999999999999999999999999..."),
    ('{"transformer.alpha_pattern": 1}', "metadata lora_adapter_metadata: alpha_pattern must be an object of regular "
                                         "expression -> alpha, got 1"),
    ('{"transformer.alpha_pattern": {"(": 4}}', "metadata lora_adapter_metadata: alpha_pattern '(' is not a usable "
                                                "regular expression: missing ): ^(.*\\.)?(()$"),
    ('{"transformer.alpha_pattern": {"^single": "y"}}', "metadata lora_adapter_metadata: "
                                                        "alpha_pattern['^single'] must be a finite number within "
                                                        "float32's range, got 'y'"),
    ('{"transformer.lora_alpha": ' + "9" * 5000 + "}", "metadata lora_adapter_metadata is not usable JSON (Exceeds "
                                                       "the limit (4300 digits) for integer string conversion: value "
                                                       "has 5000 digits)"),
    ("[" * 100_000, "metadata lora_adapter_metadata is JSON nested too deeply"),
])
def test_a_hostile_peft_config_is_one_line_naming_the_lora_file(src, tmp_path, lora_file, config, problem):
    path = _peft_lora(tmp_path, lora_file, config)
    assert_error(run("convert", src, "-o", tmp_path / "out", "--variant", "Q8_0", "--lora", path, "--dry-run"),
                 f"{path}: {problem}")


def test_a_backtracking_alpha_pattern_cannot_hang_the_load(src, tmp_path, lora_file):
    """'(\\w|\\w)*!' backtracks 2^n times in Python's re on every 30-character module name."""
    path = _peft_lora(tmp_path, lora_file, '{"transformer.lora_alpha": 4, "transformer.alpha_pattern": {"(\\\\w|\\\\w)*!": 2}}')
    proc = run_child("convert", src, "-o", tmp_path / "out", "--variant", "Q8_0", "--lora", path, "--dry-run")
    assert proc.returncode == 0, proc.stderr


def test_a_lora_strength_beyond_float32_is_refused_before_any_work(src, tmp_path, lora_file):
    assert_error(run("convert", src, "-o", tmp_path / "out", "--variant", "Q8_0", "--lora", f"{lora_file}:1e300"),
                 f"{lora_file} (diffusers): strength 1e+300 is beyond float32's range (3.403e+38)")
    assert not (tmp_path / "out").exists() or list((tmp_path / "out").iterdir()) == []


@pytest.fixture(scope="module")
def release(src, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("release")
    spec = project(root / "p", src)
    r = run("release", "build", spec, "-o", root / "rel")
    assert r.exit_code == 0, r.output
    return root / "rel"


def test_nan_in_a_manifest_names_the_file_once(release, tmp_path):
    folder = tmp_path / "rel"
    shutil.copytree(release, folder)
    (folder / "manifest.json").write_text((release / "manifest.json").read_text().replace('"size": ', '"size": NaN, "x": ', 1))
    assert_error(run("verify", folder), f"{folder / 'manifest.json'}: NaN is not valid JSON")


def test_verify_source_reports_a_recorded_type_it_cannot_encode_as_a_problem_of_that_tensor(release, src, tmp_path):
    folder = tmp_path / "rel"
    shutil.copytree(release, folder)
    doc = json.loads((folder / "manifest.json").read_text())
    doc["artifacts"][0]["tensors"][0]["type"] = "Q9_9"
    (folder / "manifest.json").write_text(json.dumps(doc))
    r = run("verify", folder, "--source", src)
    assert r.exit_code == 1 and r.stderr == ""
    tensor = doc["artifacts"][0]["tensors"][0]["name"]
    assert (f"mismatch    tiny-Q8_0.gguf: {tensor} (Q9_9): cannot be re-encoded as the recorded type: unsupported "
            "quantization type 'Q9_9'; expected one of F32, F16, BF16, Q8_0, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K"
            ) in r.stdout.splitlines()


def _gguf(kv: bytes, n_kv: int, tensors: bytes, n_tensors: int, data: bytes = b"") -> bytes:
    head = b"GGUF" + struct.pack("<IQQ", 3, n_tensors, n_kv) + kv + tensors
    return head + bytes(-len(head) % 32) + data


def _key(name: str) -> bytes:
    raw = name.encode()
    return struct.pack("<Q", len(raw)) + raw


def _tensor(name: str, dims: list[int], ttype: int, offset: int = 0) -> bytes:
    return _key(name) + struct.pack("<I", len(dims)) + b"".join(struct.pack("<Q", d) for d in dims) + \
        struct.pack("<IQ", ttype, offset)


@pytest.mark.parametrize(("kv", "n_kv", "tensors", "data", "problem"), [
    (_key("general.alignment") + struct.pack("<II", 4, 0), 1, b"", b"",
     "general.alignment is 0; expected a power of two (at byte 57 of 64)"),
    (_key("general.alignment") + struct.pack("<IQ", 10, 32), 1, b"", b"",
     "general.alignment has value type 10; expected 4 (u32) (at byte 61 of 64)"),
    (b"", 0, _tensor("t", [32], 99), bytes(128), "tensor 't' has unknown type 99"),
    (b"", 0, _tensor("t", [100], 8), bytes(128), "tensor 't' (Q8_0, shape [100]) has rows of 100 values, not a "
                                                 "multiple of the Q8_0 block of 32"),
    (b"", 0, _tensor("t", [4, 1024], 0), bytes(64), "tensor 't' needs bytes up to 16480 but the file "
                                                    "has 160"),
])
def test_a_gguf_whose_tensors_do_not_fit_is_one_line_naming_the_tensor(tmp_path, kv, n_kv, tensors, data, problem):
    path = tmp_path / "x.gguf"
    path.write_bytes(_gguf(kv, n_kv, tensors, 1 if tensors else 0, data))
    assert_error(run("inspect", path), f"{path} is not a readable GGUF file: {problem}")


@pytest.mark.parametrize(("content", "problem"), [
    (b"[" * 100_000, "JSON nested too deeply"),
    (b'{"weight_map": ' + b"9" * 5000 + b"}", "not JSON: Exceeds the limit (4300 digits) for integer string "
                                              "conversion: value has 5000 digits"),
])
def test_a_hostile_diffusers_index_is_one_line_naming_it(tmp_path, content, problem):
    folder = tmp_path / "transformer"
    folder.mkdir()
    index = folder / "diffusion_pytorch_model.safetensors.index.json"
    index.write_bytes(content)
    assert_error(run("inspect", tmp_path), f"{index}: not a diffusers index ({problem})")


@pytest.mark.parametrize(("content", "problem"), [
    (b"[" * 100_000, "cannot read the validation report: JSON nested too deeply"),
    (b'{"variants": {"Q8_0": {"cosine": ' + b"9" * 400 + b"}}}", "cosine of Q8_0 must be a finite number, got "
                                                                  + "9" * 400),
])
def test_a_hostile_validation_report_is_one_line_naming_it(src, tmp_path, content, problem):
    spec = project(tmp_path / "p", src)
    spec.write_text(spec.read_text().replace("[card]", 'validation = "v.json"\n[card]'))
    (tmp_path / "p" / "v.json").write_bytes(content)
    assert_error(run("release", "build", spec, "-o", tmp_path / "out"), f"{tmp_path / 'p' / 'v.json'}: {problem}")
    assert not (tmp_path / "out").exists()


def test_a_merge_that_overflows_float32_prints_no_numpy_warning(src, tmp_path, lora_file):
    """Factors within float32 whose product is not: the inf is refused naming the tensor, and numpy's
    RuntimeWarning lines never reach stderr."""
    with safe_open(str(lora_file), "numpy") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) * np.float32(1000) for k in f.keys()}
    big = tmp_path / "big.safetensors"
    write_raw(big, tensors, meta)
    r = run_child("convert", src, "-o", tmp_path / "out", "--variant", "Q8_0", "--lora", f"{big}:1e36")  # real stderr
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and "Warning" not in r.stderr, r.stderr
    assert r.stderr.startswith(f"Error: {tmp_path / 'out' / 'tiny-Q8_0.gguf'} was not written: tensor ")
    assert "non-finite values (NaN or inf)" in r.stderr


def test_an_extra_file_named_like_a_lora_side_car_collides_before_any_conversion(src, tmp_path, lora_file):
    entry = '[[lora]]\npath = "style.safetensors"\nname = "{}"\nmode = "sidecar"\n'
    spec = project(tmp_path / "p", src, extra=["docs/tiny-lora-Style.safetensors"], lora=entry.format("style"))
    shutil.copy(lora_file, tmp_path / "p" / "style.safetensors")
    assert_error(run("release", "build", spec, "-o", tmp_path / "out"),
                 f"{spec}: 'extra_files' names 'docs/tiny-lora-Style.safetensors', whose file name "
                 "'tiny-lora-Style.safetensors' (the same as 'tiny-lora-style.safetensors' where case does not count) "
                 "the release itself writes")
    spec = project(tmp_path / "q", src, lora=entry.format("s" * 250))
    shutil.copy(lora_file, tmp_path / "q" / "style.safetensors")
    assert_error(run("release", "build", spec, "-o", tmp_path / "out"),
                 f"{spec}: 'lora' entries would write 'tiny-lora-{'s' * 50}'..., a file name of 272 bytes; file "
                 "names hold 255")
    assert not (tmp_path / "out").exists()
