"""verify_release: a fresh release verifies; every way a download can be damaged gets its verdict."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import gguf
import numpy as np
import pytest

from manifests import (
    CHECKSUMS_NAME,
    MANIFEST_NAME,
    ArtifactEntry,
    Manifest,
    ManifestError,
    SchemaError,
    SourceEntry,
    TensorEntry,
    UnsafePathError,
    dump_manifest,
    format_sha256sums,
    hash_bytes,
    hash_file,
    verify_release,
)
from manifests.hashing import hash_range

TENSORS = {  # name -> shape (PyTorch order)
    "double_blocks.0.img_attn.qkv.weight": (8, 64),
    "double_blocks.0.img_attn.qkv.bias": (8,),
    "single_blocks.0.linear1.weight": (16, 64),
    "final_layer.linear.weight": (4, 64),
}


def _write_gguf(path: Path, seed: int) -> list[TensorEntry]:
    """A small real GGUF (gguf-py writes it); tensor ranges read back with GGUFReader."""
    rng = np.random.default_rng(seed)
    w = gguf.GGUFWriter(str(path), "flux")
    for name, shape in TENSORS.items():
        w.add_tensor(name, rng.standard_normal(shape).astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    data = path.read_bytes()
    entries = []
    for t in gguf.GGUFReader(str(path)).tensors:
        off, n = int(t.data_offset), int(t.n_bytes)
        entries.append(TensorEntry(t.name, t.tensor_type.name, TENSORS[t.name], off, n, hash_bytes(data[off:off + n]).sha256))
    return entries


def build_release(root: Path) -> Manifest:
    """A release folder as `release build` lays it out: GGUFs, README, an extra file, manifest, sums."""
    root.mkdir()
    artifacts = []
    for seed, variant in enumerate(["F32", "F32B"]):
        path = root / f"tiny-{variant}.gguf"
        tensors = _write_gguf(path, seed)
        d = hash_file(path)
        artifacts.append(ArtifactEntry(path.name, d.size, d.sha256, "gguf", variant, 0, tuple(tensors)))
    (root / "README.md").write_text("---\nlicense: other\n---\n# tiny\n")
    (root / "docs").mkdir()
    (root / "docs" / "LICENSE.md").write_text("license text\n")
    for name, kind in [("README.md", "model-card"), ("docs/LICENSE.md", "extra")]:
        d = hash_file(root / name)
        artifacts.append(ArtifactEntry(name, d.size, d.sha256, kind))
    manifest = Manifest("flux-gguf", "0.1.0", "tiny", {"name": "tiny"},
                        (SourceEntry("tiny.safetensors", 10, "0" * 64),), tuple(artifacts))
    data = dump_manifest(manifest)
    (root / MANIFEST_NAME).write_bytes(data)
    sums = {a.path: a.sha256 for a in artifacts} | {MANIFEST_NAME: hash_bytes(data).sha256}
    (root / CHECKSUMS_NAME).write_bytes(format_sha256sums(sums))
    return manifest


@pytest.fixture()
def release(tmp_path) -> Path:
    root = tmp_path / "release"
    build_release(root)
    return root


def verdicts(report) -> dict[str, str]:
    return {f.path: f.status for f in report.files}


ALL_OK = {"manifest.json": "ok", "SHA256SUMS": "ok", "tiny-F32.gguf": "ok", "tiny-F32B.gguf": "ok",
          "README.md": "ok", "docs/LICENSE.md": "ok"}


def test_fresh_release_verifies(release):
    report = verify_release(release, tensors=True)
    assert report.ok
    assert verdicts(report) == ALL_OK
    assert report.counts() == {"ok": 6, "mismatch": 0, "missing": 0, "unexpected": 0}
    gguf_check = report.file("tiny-F32.gguf")
    assert gguf_check.actual_sha256 == gguf_check.expected_sha256 and gguf_check.damaged_tensors is None
    assert json.loads(json.dumps(report.to_json()))["ok"] is True


def test_fresh_release_passes_sha256sum_strict(release):
    done = subprocess.run(["sha256sum", "-c", "--strict", CHECKSUMS_NAME], cwd=release, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.splitlines() == [f"{p}: OK" for p in
                                        ["README.md", "docs/LICENSE.md", "manifest.json", "tiny-F32.gguf", "tiny-F32B.gguf"]]


def test_progress_counts_every_artifact_byte(release):
    seen = []
    verify_release(release, progress=lambda n, total: seen.append((n, total)), chunk_size=4096)
    total = sum(a.size for a in verify_release(release).manifest.artifacts)
    assert sum(n for n, _ in seen) == total and {t for _, t in seen} == {total}


def _tensor(manifest, path, name):
    return next(t for t in manifest.artifact(path).tensors if t.name == name)


def test_one_flipped_byte_in_a_tensor(release):
    report0 = verify_release(release)
    t = _tensor(report0.manifest, "tiny-F32.gguf", "single_blocks.0.linear1.weight")
    path = release / "tiny-F32.gguf"
    with open(path, "r+b") as f:
        f.seek(t.offset + 100)
        b = f.read(1)
        f.seek(t.offset + 100)
        f.write(bytes([b[0] ^ 0x01]))
    report = verify_release(release)
    assert verdicts(report) == ALL_OK | {"tiny-F32.gguf": "mismatch"}
    check = report.file("tiny-F32.gguf")
    assert check.expected_size == check.actual_size and check.detail == "same size, different content"
    assert check.damaged_tensors is None
    detailed = verify_release(release, tensors=True).file("tiny-F32.gguf")
    assert detailed.damaged_tensors == ["single_blocks.0.linear1.weight"]
    assert detailed.detail == "same size, different content; 1 of 4 tensors differ"


def test_flipped_byte_in_header_is_outside_tensor_data(release):
    path = release / "tiny-F32B.gguf"
    with open(path, "r+b") as f:
        f.seek(30)
        b = f.read(1)
        f.seek(30)
        f.write(bytes([b[0] ^ 0xFF]))
    check = verify_release(release, tensors=True).file("tiny-F32B.gguf")
    assert check.status == "mismatch" and check.damaged_tensors == []
    assert "every tensor's data is intact (the damage is in the header, metadata or padding)" in check.detail


def test_truncation(release):
    path = release / "tiny-F32.gguf"
    size = path.stat().st_size
    last = max(verify_release(release).manifest.artifact("tiny-F32.gguf").tensors, key=lambda t: t.offset)
    os.truncate(path, last.offset + 10)
    report = verify_release(release, tensors=True)
    assert verdicts(report) == ALL_OK | {"tiny-F32.gguf": "mismatch"}
    check = report.file("tiny-F32.gguf")
    assert (check.expected_size, check.actual_size) == (size, last.offset + 10)
    assert check.detail.startswith(f"size {last.offset + 10} bytes, expected {size}")
    assert check.damaged_tensors == [last.name]


def test_missing_file(release):
    (release / "docs" / "LICENSE.md").unlink()
    report = verify_release(release)
    assert verdicts(report) == ALL_OK | {"docs/LICENSE.md": "missing"}
    check = report.file("docs/LICENSE.md")
    assert check.actual_size is None and check.actual_sha256 is None and check.expected_size == 13


def test_extra_files(release):
    (release / "evil.gguf").write_bytes(b"GGUF")
    (release / "docs" / "notes.txt").write_text("hi")
    (release / "link").symlink_to(release / "README.md")
    report = verify_release(release)
    assert verdicts(report) == ALL_OK | {"docs/notes.txt": "unexpected", "evil.gguf": "unexpected", "link": "unexpected"}
    assert report.file("link").detail == "symbolic link"
    assert report.file("evil.gguf").actual_size == 4
    assert verify_release(release, ignore=["docs/*", "evil.*", "link"]).ok


def test_swapped_files(release):
    a, b, tmp = release / "tiny-F32.gguf", release / "tiny-F32B.gguf", release / "swap"
    a.rename(tmp)
    b.rename(a)
    tmp.rename(b)
    report = verify_release(release, tensors=True)
    assert verdicts(report) == ALL_OK | {"tiny-F32.gguf": "mismatch", "tiny-F32B.gguf": "mismatch"}
    # each one holds exactly the bytes the other should
    assert report.file("tiny-F32.gguf").actual_sha256 == report.file("tiny-F32B.gguf").expected_sha256
    assert report.file("tiny-F32B.gguf").actual_sha256 == report.file("tiny-F32.gguf").expected_sha256
    assert report.file("tiny-F32.gguf").damaged_tensors == list(TENSORS)


def test_edited_manifest_recorded_digest(release):
    doc = json.loads((release / MANIFEST_NAME).read_bytes())
    doc["artifacts"][2]["sha256"] = "f" * 64  # README.md
    (release / MANIFEST_NAME).write_text(json.dumps(doc))
    report = verify_release(release)
    assert verdicts(report) == ALL_OK | {"manifest.json": "mismatch", "SHA256SUMS": "mismatch", "README.md": "mismatch"}
    assert report.file("SHA256SUMS").detail == "digest differs from manifest.json for README.md"
    assert report.file("manifest.json").detail.startswith("differs from the digest SHA256SUMS lists for it")


def test_edited_manifest_whitespace_only(release):
    (release / MANIFEST_NAME).write_bytes((release / MANIFEST_NAME).read_bytes() + b"\n")
    assert verdicts(verify_release(release)) == ALL_OK | {"manifest.json": "mismatch"}


def test_edited_sha256sums(release):
    sums = (release / CHECKSUMS_NAME).read_text().splitlines()
    (release / CHECKSUMS_NAME).write_text("\n".join(s for s in sums if not s.endswith("README.md")) + "\n")
    report = verify_release(release)
    assert verdicts(report) == ALL_OK | {"SHA256SUMS": "mismatch"}
    assert report.file("SHA256SUMS").detail == "does not list README.md"
    (release / CHECKSUMS_NAME).write_text("garbage\n")
    report = verify_release(release)
    assert report.file("SHA256SUMS").status == "mismatch"
    assert report.file("SHA256SUMS").detail == "SHA256SUMS line 1: expected '<64 hex digits>  <relative path>'"


def test_missing_sha256sums(release):
    (release / CHECKSUMS_NAME).unlink()
    report = verify_release(release)
    assert verdicts(report) == ALL_OK | {"SHA256SUMS": "missing"}
    assert report.file("manifest.json").detail == "not covered: SHA256SUMS gives no digest for it"


def test_manifest_not_matching_schema_is_rejected(release):
    doc = json.loads((release / MANIFEST_NAME).read_bytes())
    doc["artifacts"][0]["size"] = "big"
    (release / MANIFEST_NAME).write_text(json.dumps(doc))
    with pytest.raises(SchemaError, match=r"manifest.json: artifacts\[0\].size: expected integer, got string 'big'"):
        verify_release(release)


def _never_open(monkeypatch):
    """Fail the test if verify opens any listed file (it must reject the manifest first)."""
    import builtins
    real_open = builtins.open

    real_os_open = os.open

    def guarded(file, *args, **kwargs):
        if not isinstance(file, int) and not str(file).endswith(MANIFEST_NAME):  # an int: vetted by os.open below
            raise AssertionError(f"opened {file} before rejecting the manifest")
        return real_open(file, *args, **kwargs)

    def guarded_os_open(file, flags, *args, **kwargs):
        folder = kwargs.get("dir_fd") is None and os.path.isdir(file)  # the release folder itself
        if not folder and not str(file).endswith(MANIFEST_NAME):
            raise AssertionError(f"opened {file} before rejecting the manifest")
        return real_os_open(file, flags, *args, **kwargs)
    monkeypatch.setattr(builtins, "open", guarded)
    monkeypatch.setattr(os, "open", guarded_os_open)


@pytest.mark.parametrize(("path", "reason"), [
    ("../outside.gguf", "'..' components are not allowed"),
    ("/etc/passwd", "absolute paths are not allowed"),
    ("docs/../../outside", "'..' components are not allowed"),
])
def test_path_traversal_manifest_is_rejected_before_opening_anything(release, monkeypatch, path, reason):
    (release.parent / "outside.gguf").write_bytes(b"secret")
    doc = json.loads((release / MANIFEST_NAME).read_bytes())
    doc["artifacts"][2]["path"] = path
    (release / MANIFEST_NAME).write_text(json.dumps(doc))
    _never_open(monkeypatch)
    with pytest.raises(UnsafePathError) as e:
        verify_release(release)
    assert str(e.value) == f"unsafe path {path!r} in manifest: {reason}"


def test_symlinked_artifact_is_rejected_before_opening_anything(release, monkeypatch):
    outside = release.parent / "elsewhere.md"
    shutil.move(release / "README.md", outside)
    (release / "README.md").symlink_to(outside)
    _never_open(monkeypatch)
    with pytest.raises(UnsafePathError, match=r"^unsafe path 'README.md' in manifest: is a symbolic link$"):
        verify_release(release)


def test_symlinked_folder_is_rejected(release):
    shutil.move(release / "docs", release.parent / "docs")
    (release / "docs").symlink_to(release.parent / "docs")
    with pytest.raises(UnsafePathError, match=r"'docs/LICENSE.md' in manifest: passes through symbolic link 'docs'"):
        verify_release(release)


def test_symlinked_manifest_is_rejected(release):
    shutil.move(release / MANIFEST_NAME, release.parent / MANIFEST_NAME)
    (release / MANIFEST_NAME).symlink_to(release.parent / MANIFEST_NAME)
    with pytest.raises(UnsafePathError, match=r"'manifest.json' in manifest: is a symbolic link"):
        verify_release(release)


def test_not_a_release_folder(tmp_path):
    with pytest.raises(ManifestError, match=r": no manifest.json; not a flux-gguf release folder$"):
        verify_release(tmp_path)
    with pytest.raises(ManifestError, match=r"absent: not a folder$"):
        verify_release(tmp_path / "absent")


def test_a_folder_where_a_file_should_be(release):
    (release / "README.md").unlink()
    (release / "README.md").mkdir()
    check = verify_release(release).file("README.md")
    assert (check.status, check.detail) == ("mismatch", "not a regular file")


def test_recorded_tensor_ranges_match_gguf_reader(release):
    """The ranges verify relies on are where gguf-py finds the tensors."""
    manifest = verify_release(release).manifest
    for art in manifest.ggufs:
        reader = gguf.GGUFReader(str(release / art.path))
        with open(release / art.path, "rb") as f:
            for t, rt in zip(art.tensors, reader.tensors):
                assert (t.name, t.offset, t.nbytes) == (rt.name, int(rt.data_offset), int(rt.n_bytes))
                assert hash_range(f, t.offset, t.nbytes) == t.sha256


# --- unreadable files: a verdict each, never a traceback -------------------------------------------

def _unreadable(monkeypatch, name: str, error: OSError) -> None:
    """Make reading one listed file fail (tests run as root, so chmod would not stop the read)."""
    import manifests.verify as mv
    real_open_inside = mv.open_inside

    def open_inside_failing(root, path):
        if Path(path).name == name:
            raise error
        return real_open_inside(root, path)
    monkeypatch.setattr(mv, "open_inside", open_inside_failing)


@pytest.mark.parametrize(("name", "error", "reason"), [
    ("README.md", PermissionError(13, "Permission denied"), "Permission denied"),
    ("tiny-F32.gguf", OSError(5, "Input/output error"), "Input/output error"),
])
def test_unreadable_file_is_a_mismatch_not_a_crash(release, monkeypatch, name, error, reason):
    _unreadable(monkeypatch, name, error)
    report = verify_release(release, tensors=True)
    assert verdicts(report) == ALL_OK | {name: "mismatch"}
    check = report.file(name)
    assert check.detail == f"cannot read: {reason}"
    assert check.actual_size is None and check.actual_sha256 is None


def test_cli_unreadable_file_is_reported_and_exits_1(release, monkeypatch):
    from click.testing import CliRunner

    from converter.cli import main
    _unreadable(monkeypatch, "README.md", PermissionError(13, "Permission denied"))
    result = CliRunner().invoke(main, ["verify", str(release)], catch_exceptions=False)
    assert result.exit_code == 1
    lines = result.output.splitlines()
    assert "mismatch    README.md  (cannot read: Permission denied)" in lines
    assert lines[-2:] == ["6 files: 5 ok, 1 mismatch", f"release {release}: PROBLEMS FOUND"]


def test_unreadable_sha256sums_is_a_mismatch(release, monkeypatch):
    _unreadable(monkeypatch, CHECKSUMS_NAME, OSError(5, "Input/output error"))
    report = verify_release(release)
    assert verdicts(report) == ALL_OK | {CHECKSUMS_NAME: "mismatch"}
    assert report.file(CHECKSUMS_NAME).detail == "cannot read: Input/output error"
    assert report.file(MANIFEST_NAME).detail == "not covered: SHA256SUMS gives no digest for it"


def test_cli_unreadable_manifest_is_one_line(release, monkeypatch):
    from click.testing import CliRunner

    from converter.cli import main
    _unreadable(monkeypatch, MANIFEST_NAME, PermissionError(13, "Permission denied"))
    result = CliRunner().invoke(main, ["verify", str(release)], catch_exceptions=False)
    assert result.exit_code == 1
    assert result.output.strip().splitlines() == [f"Error: {release / MANIFEST_NAME}: cannot read: Permission denied"]


def test_gguf_unreadable_while_listing_damaged_tensors(release, monkeypatch):
    path = release / "tiny-F32.gguf"
    with open(path, "r+b") as f:
        f.seek(40)
        b = f.read(1)
        f.seek(40)
        f.write(bytes([b[0] ^ 0xFF]))
    import manifests.verify as mv

    def failing(*args, **kwargs):
        raise OSError(5, "Input/output error")
    monkeypatch.setattr(mv, "_damaged_tensors", failing)
    check = verify_release(release, tensors=True).file("tiny-F32.gguf")
    assert check.status == "mismatch" and check.damaged_tensors is None
    assert check.detail == "same size, different content; cannot read its tensors: Input/output error"
