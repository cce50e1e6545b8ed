"""``download`` against a careless user, a hostile release and a concurrent download (issue 12)."""
from __future__ import annotations

import dataclasses
import hashlib
import os
import pathlib
import stat

import pytest
from test_hub import emulator, error_line, make_release, run  # noqa: F401  (emulator is a fixture)

from manifests import (
    CHECKSUMS_NAME,
    MANIFEST_NAME,
    ArtifactEntry,
    dump_manifest,
    format_sha256sums,
    load_manifest,
    verify_release,
)
from manifests.locking import acquire


def _add_files(root: pathlib.Path, files: dict[str, bytes]) -> pathlib.Path:
    """Add extra files to a release folder (manifest and SHA256SUMS rewritten to list them, in order)."""
    manifest = load_manifest(root / MANIFEST_NAME)
    extra = []
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
        extra.append(ArtifactEntry(name, len(data), hashlib.sha256(data).hexdigest(), "extra"))
    manifest = dataclasses.replace(manifest, artifacts=tuple(extra) + manifest.artifacts)
    data = dump_manifest(manifest)
    (root / MANIFEST_NAME).write_bytes(data)
    sums = {a.path: a.sha256 for a in manifest.artifacts} | {MANIFEST_NAME: hashlib.sha256(data).hexdigest()}
    (root / CHECKSUMS_NAME).write_bytes(format_sha256sums(sums))
    assert verify_release(root).ok
    return root


def _publish(rel: pathlib.Path) -> None:
    res = run("upload", rel, "alice/demo")
    assert res.exit_code == 0, res.output


def test_a_users_own_file_is_not_overwritten_without_force(emulator, tmp_path):  # noqa: F811
    rel = make_release(tmp_path / "rel")
    _publish(rel)
    out = tmp_path / "models"
    out.mkdir()
    (out / "README.md").write_text("my own notes")
    before = len(emulator.requests("GET", "/resolve/"))
    res = run("download", "alice/demo", "-o", out)
    assert res.exit_code == 1
    commit = emulator.repos["alice/demo"].refs["main"]
    assert error_line(res) == (f"Error: {out / 'README.md'}: already there with other content than README.md of "
                               f"alice/demo at {commit[:12]}; download never overwrites a file it did not write: "
                               "move it away, or pass --force to replace it")
    assert (out / "README.md").read_text() == "my own notes"
    assert sorted(p.name for p in out.iterdir()) == ["README.md"]  # nothing else landed
    fetched = [r.path for r in emulator.requests("GET", "/resolve/")[before:]]
    assert all(p.endswith((MANIFEST_NAME, CHECKSUMS_NAME)) for p in fetched)

    res = run("download", "alice/demo", "-o", out, "--force")
    assert res.exit_code == 0, res.output
    assert (out / "README.md").read_bytes() == (rel / "README.md").read_bytes() and verify_release(out).ok


def test_a_release_listing_x_partial_before_x_downloads_both(emulator, tmp_path):  # noqa: F811
    rel = _add_files(make_release(tmp_path / "rel"), {"x.bin.partial": b"the partial-named file",
                                                      "x.bin": b"the file itself"})
    assert [a.path for a in load_manifest(rel / MANIFEST_NAME).artifacts][:2] == ["x.bin.partial", "x.bin"]
    _publish(rel)
    out = tmp_path / "out"
    res = run("download", "alice/demo", "-o", out)
    assert res.exit_code == 0, res.output
    assert (out / "x.bin.partial").read_bytes() == b"the partial-named file"
    assert (out / "x.bin").read_bytes() == b"the file itself"
    assert verify_release(out).ok and not [p for p in out.iterdir() if p.name.startswith(".")]


def test_a_release_listing_our_partial_name_is_refused(emulator, tmp_path):  # noqa: F811
    rel = _add_files(make_release(tmp_path / "rel"), {".x.bin.flux-gguf.partial": b"sneaky", "x.bin": b"x"})
    _publish(rel)
    res = run("download", "alice/demo", "-o", tmp_path / "out")
    assert res.exit_code == 1
    assert error_line(res) == ("Error: alice/demo: manifest.json lists .x.bin.flux-gguf.partial, a name flux-gguf "
                               "reserves for partial downloads; refused")


def test_a_second_download_into_the_same_folder_fails_at_once(emulator, tmp_path):  # noqa: F811
    _publish(make_release(tmp_path / "rel"))
    out = tmp_path / "out"
    out.mkdir()
    with acquire(out, out / ".flux-gguf.lock"):  # what a running download holds
        res = run("download", "alice/demo", "-o", out)
    assert res.exit_code == 1
    assert error_line(res) == (f"Error: {out}: another flux-gguf download (pid {os.getpid()}) is writing into it; "
                               "wait for it to finish or choose another folder")
    assert list(out.iterdir()) == []
    assert run("download", "alice/demo", "-o", out).exit_code == 0 and verify_release(out).ok
    assert not (out / ".flux-gguf.lock").exists()


@pytest.mark.parametrize("token", ["hf_é_not_ascii", "hf_with space", "hf_bell\x07"])
def test_a_token_http_cannot_carry_is_one_line_and_never_shown(emulator, tmp_path, monkeypatch, token):  # noqa: F811
    monkeypatch.setenv("HF_TOKEN", token)
    res = run("download", "alice/demo", "-o", tmp_path / "out")
    assert res.exit_code == 1
    line = error_line(res)
    assert line == ("Error: the Hugging Face token (HF_TOKEN or the `hf auth login` file) holds non-ASCII, space or "
                    "control characters, which an HTTP header cannot carry: set it to the token exactly as the Hub "
                    "shows it")
    assert token not in res.output and "hf_" not in res.output


def test_a_folder_swapped_for_a_link_during_the_download_gets_no_byte(emulator, tmp_path, monkeypatch):  # noqa: F811
    """The race: every path is checked, then ``sub`` becomes a link to a folder outside before the write."""
    import converter.hub.download as dl

    _publish(_add_files(make_release(tmp_path / "rel"), {"sub/x.bin": b"payload"}))
    out, outside = tmp_path / "out", tmp_path / "outside"
    outside.mkdir()
    real, calls = dl._destination, []

    def destination_then_swap(root, path):
        result = real(root, path)
        calls.append(path)
        if path == "sub/x.bin" and calls.count(path) == 2:  # the download loop, after the pre-check
            (pathlib.Path(root) / "sub").symlink_to(outside)
        return result
    monkeypatch.setattr(dl, "_destination", destination_then_swap)
    res = run("download", "alice/demo", "-o", out)
    assert res.exit_code == 1
    assert error_line(res) == (f"Error: {out / 'sub' / 'x.bin'}: passes through symbolic link 'sub'; downloads are "
                               "never written through a symbolic link")
    assert list(outside.iterdir()) == []


# ---- what sits under the resumable partial name and is not ours (issue 28) ---------------------
PARTIAL_Q8 = ".demo-Q8_0.gguf.flux-gguf.partial"  # where a download of demo-Q8_0.gguf resumes from


def _plant(out: pathlib.Path, kind: str, mine: pathlib.Path, data: bytes, monkeypatch) -> None:
    """Put something that is not a partial file of ours under the resumable name. ``mine`` is the
    user's file, holding the first bytes of the real download (what a resume would append to)."""
    mine.write_bytes(data[:2000])
    partial = out / PARTIAL_Q8
    if kind == "hard link":
        os.link(mine, partial)
    elif kind == "complete hard link":  # all the right bytes: renaming it would make the download the user's file
        mine.write_bytes(data)
        os.link(mine, partial)
    elif kind == "other owner":  # a file we did not create; the test's own file, seen by another euid
        partial.write_bytes(data[:2000])
        uid = os.geteuid() + 1
        monkeypatch.setattr(os, "geteuid", lambda: uid)
    elif kind == "folder":
        partial.mkdir()
        (partial / "inside.txt").write_bytes(b"kept")
    else:
        raise AssertionError(kind)


def _state(path: pathlib.Path) -> tuple:
    """What must not change: the bytes, the inode, the link count and the mtime."""
    st = os.lstat(path)
    data = path.read_bytes() if path.is_file() else sorted(p.name for p in path.iterdir())
    return data, st.st_ino, st.st_nlink, st.st_mtime_ns


@pytest.mark.parametrize("kind", ["hard link", "complete hard link", "other owner", "folder"])
def test_a_partial_name_that_is_not_ours_is_never_resumed_or_touched(emulator, tmp_path, monkeypatch, kind):  # noqa: F811
    rel = make_release(tmp_path / "rel")
    _publish(rel)
    data = (rel / "demo-Q8_0.gguf").read_bytes()
    out, mine = tmp_path / "out", tmp_path / "mine.bin"
    out.mkdir()
    _plant(out, kind, mine, data, monkeypatch)
    before = {p: _state(p) for p in (out / PARTIAL_Q8, mine)}
    res = run("download", "alice/demo", "--include", "demo-Q8_0.gguf", "-o", out)
    assert res.exit_code == 0, res.output
    assert {p: _state(p) for p in before} == before
    dest = out / "demo-Q8_0.gguf"
    assert dest.read_bytes() == data and os.stat(dest).st_nlink == 1
    assert sorted(p.name for p in out.iterdir()) == sorted([PARTIAL_Q8, "demo-Q8_0.gguf", MANIFEST_NAME,
                                                            CHECKSUMS_NAME])
    last = [r for r in emulator.requests("GET", "/resolve/") if r.path.endswith("/demo-Q8_0.gguf")][-1]
    assert (last.status, last.range) == (200, None)  # the whole file, into a name of this run's own


def test_a_fifo_at_the_partial_name_is_never_opened_for_writing(emulator, tmp_path):  # noqa: F811
    rel = make_release(tmp_path / "rel")
    _publish(rel)
    out = tmp_path / "out"
    out.mkdir()
    os.mkfifo(out / PARTIAL_Q8)
    reader = os.open(out / PARTIAL_Q8, os.O_RDONLY | os.O_NONBLOCK)  # held open: a writer could not block
    try:
        res = run("download", "alice/demo", "--include", "demo-Q8_0.gguf", "-o", out)
        assert res.exit_code == 0, res.output
        assert os.read(reader, 1 << 16) == b""  # nothing was written into it
    finally:
        os.close(reader)
    assert stat.S_ISFIFO(os.lstat(out / PARTIAL_Q8).st_mode)
    assert (out / "demo-Q8_0.gguf").read_bytes() == (rel / "demo-Q8_0.gguf").read_bytes()


def test_a_failed_download_beside_a_partial_not_ours_removes_only_its_own(emulator, tmp_path, monkeypatch):  # noqa: F811
    rel = make_release(tmp_path / "rel")
    _publish(rel)
    emulator.corrupt("alice/demo", "demo-Q8_0.gguf")
    out, mine = tmp_path / "out", tmp_path / "mine.bin"
    out.mkdir()
    _plant(out, "hard link", mine, (rel / "demo-Q8_0.gguf").read_bytes(), monkeypatch)
    before = {p: _state(p) for p in (out / PARTIAL_Q8, mine)}
    res = run("download", "alice/demo", "--include", "demo-Q8_0.gguf", "-o", out)
    assert res.exit_code == 1
    assert error_line(res).startswith("Error: demo-Q8_0.gguf: the Hub sent ")
    assert {p: _state(p) for p in before} == before
    assert sorted(p.name for p in out.iterdir()) == [PARTIAL_Q8]  # no partial of this run's left behind
