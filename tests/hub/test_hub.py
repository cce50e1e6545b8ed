"""Hub publishing and verified downloads, run with the real huggingface_hub client against a loopback Hub.

No test reaches a real Hub: each one starts tests/hub_emulator.py on 127.0.0.1, points HF_ENDPOINT
at it, turns Xet off (the emulator speaks LFS), and gives huggingface_hub an empty HF_HOME so no
real login token can be found. huggingface_hub 2.4 has no setting for its retry waits, so the
fixture shrinks ``http_backoff``'s default waits (the number of retries stays the client's own).
"""
from __future__ import annotations

import hashlib
import json
import os
import pathlib
import subprocess
import sys

import pytest
from click.testing import CliRunner
from hub_emulator import emulated_hub
from huggingface_hub.utils import http_backoff

from converter import __version__
from converter.cli import main
from converter.cli.output import VERSION_KEY
from converter.errors import (
    HubConnectionError,
    HubError,
    HubFileTooLargeError,
    HubVerificationError,
)
from converter.hub.client import LFS_MAX_FILE_BYTES, parse_repo_spec
from converter.hub.download import download_release
from converter.hub.remote import verify_remote_release
from converter.hub.upload import plan_upload, upload_release
from manifests import (
    CHECKSUMS_NAME,
    MANIFEST_NAME,
    ArtifactEntry,
    Manifest,
    SourceEntry,
    TensorEntry,
    dump_manifest,
    format_sha256sums,
    load_manifest,
    verify_release,
)

TOKEN = "hf_alice_write"
SECRET = "hf_s3cret_never_print_me_7f3a9c"
CARD = """---
base_model: black-forest-labs/FLUX.1-Kontext-dev
base_model_relation: quantized
library_name: gguf
license: other
license_name: flux-1-dev-non-commercial-license
license_link: LICENSE.md
pipeline_tag: image-to-image
tags: [flux, kontext, gguf, image-to-image]
quantized_by: alice
---
# demo GGUF
"""


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def make_release(root: pathlib.Path, variants: dict[str, int] | None = None, *, seed: int = 0,
                 card: str = CARD, name: str = "demo") -> pathlib.Path:
    """A small release folder: fake GGUFs (GGUF magic + seeded bytes), README.md, manifest.json, SHA256SUMS."""
    import numpy as np

    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    artifacts = []
    for i, (variant, size) in enumerate((variants or {"Q4_K_M": 3000, "Q8_0": 5000}).items()):
        data = b"GGUF" + rng.integers(0, 256, size - 4, dtype=np.uint8).tobytes()
        path = f"{name}-{variant}.gguf"
        (root / path).write_bytes(data)
        tensor = TensorEntry("img_in.weight", "F16", (8, 16), 64, 256, _sha(data[64:320]))
        artifacts.append(ArtifactEntry(path, size, _sha(data), "gguf", variant, 15 + i, (tensor,)))
    (root / "README.md").write_text(card)
    artifacts.append(ArtifactEntry("README.md", len(card.encode()), _sha(card.encode()), "card"))
    manifest = Manifest("flux-gguf", "0.1.0", name, {"name": name},
                        (SourceEntry("flux1-kontext-dev.safetensors", 123, "0" * 64),), tuple(artifacts))
    manifest_bytes = dump_manifest(manifest)
    (root / MANIFEST_NAME).write_bytes(manifest_bytes)
    sums = {a.path: a.sha256 for a in artifacts} | {MANIFEST_NAME: _sha(manifest_bytes)}
    (root / CHECKSUMS_NAME).write_bytes(format_sha256sums(sums))
    assert verify_release(root).ok
    return root


@pytest.fixture
def emulator(monkeypatch: pytest.MonkeyPatch, tmp_path: pathlib.Path):
    with emulated_hub(monkeypatch, tmp_path / "hf_home", {TOKEN: "alice", "hf_bob_write": "bob", SECRET: "alice"},
                      TOKEN) as hub_:
        yield hub_


def run(*args: object):
    """``flux-gguf ARGS`` in this process (the fixture already pointed huggingface_hub at the emulator)."""
    return CliRunner().invoke(main, [str(a) for a in args])


def error_line(result) -> str:
    lines = [ln.split("\r")[-1] for ln in result.output.split("\n")]  # progress bars redraw with \r
    lines = [ln for ln in lines if ln.startswith("Error: ")]
    assert len(lines) == 1, result.output
    return lines[0]


# ---- upload + remote verify -------------------------------------------------------------------
def test_upload_creates_repo_uploads_and_verifies_the_hub_copy(emulator, tmp_path):
    rel = make_release(tmp_path / "rel")
    result = run("upload", rel, "alice/demo-GGUF")
    assert result.exit_code == 0, result.output
    commit = emulator.repos["alice/demo-GGUF"].refs["main"]
    assert f"URL:    {emulator.url}/alice/demo-GGUF" in result.output
    assert f"Commit: {emulator.url}/alice/demo-GGUF/commit/{commit}" in result.output
    assert "Hub copy verified: 5 files match the manifest" in result.output
    files = emulator.files("alice/demo-GGUF")
    assert set(files) == {".gitattributes", "README.md", MANIFEST_NAME, CHECKSUMS_NAME, "demo-Q4_K_M.gguf", "demo-Q8_0.gguf"}
    for name in files.keys() - {".gitattributes"}:
        assert emulator.file_bytes("alice/demo-GGUF", name) == (rel / name).read_bytes()
    assert files["demo-Q8_0.gguf"].lfs and not files["README.md"].lfs
    # the read-back really asked the Hub for file metadata of that commit
    assert emulator.requests("GET", f"/api/models/alice/demo-GGUF/revision/{commit}")

    report = verify_remote_release(rel, "alice/demo-GGUF")
    assert report.ok and report.commit == commit
    assert {f.path: f.source for f in report.files} == {
        "demo-Q4_K_M.gguf": "lfs", "demo-Q8_0.gguf": "lfs", "README.md": "content",
        MANIFEST_NAME: "content", CHECKSUMS_NAME: "content"}
    out = run("verify", rel, "--remote", "alice/demo-GGUF@main")
    assert out.exit_code == 0, out.output
    assert out.output.splitlines()[-1] == f"alice/demo-GGUF@main (commit {commit}): 5 ok"
    # remote verify downloads no LFS file
    assert not [r for r in emulator.requests("GET", "/resolve/") if r.path.endswith(".gguf")]


def test_upload_json_output_and_rerun_sends_nothing_again(emulator, tmp_path):
    rel = make_release(tmp_path / "rel")
    first = run("upload", rel, "alice/demo", "--json", "-m", "first release")
    assert first.exit_code == 0, first.output
    doc = json.loads(first.stdout)
    assert doc[VERSION_KEY] == __version__
    assert doc["commit_oid"] == emulator.repos["alice/demo"].refs["main"]
    assert doc["verified"]["ok"] and doc["verified"]["counts"]["ok"] == 5
    assert emulator.repos["alice/demo"].commits[doc["commit_oid"]].message == "first release"
    puts = len(emulator.lfs_uploads())
    assert puts == 2
    second = run("upload", rel, "alice/demo", "--json")
    assert second.exit_code == 0, second.output
    assert len(emulator.lfs_uploads()) == puts  # every object already on the Hub: nothing re-sent
    assert json.loads(second.stdout)["commit_oid"] == doc["commit_oid"]  # and no empty commit


def test_upload_to_a_branch_and_as_a_pull_request(emulator, tmp_path):
    rel = make_release(tmp_path / "rel")
    res = run("upload", rel, "alice/demo", "--revision", "dev", "--private")
    assert res.exit_code == 0, res.output
    repo = emulator.repos["alice/demo"]
    assert repo.private and "demo-Q8_0.gguf" in emulator.files("alice/demo", "dev")
    assert "demo-Q8_0.gguf" not in emulator.files("alice/demo", "main")
    assert f"URL:    {emulator.url}/alice/demo/tree/dev" in res.output

    pr = run("upload", rel, "alice/demo", "--create-pr")
    assert pr.exit_code == 0, pr.output
    assert f"Pull request: {emulator.url}/alice/demo/discussions/1" in pr.output
    assert "demo-Q8_0.gguf" in emulator.files("alice/demo", "refs/pr/1")
    assert "demo-Q8_0.gguf" not in emulator.files("alice/demo", "main")


def test_create_pr_with_revision_is_rejected_up_front(emulator, tmp_path):
    rel = make_release(tmp_path / "rel")
    res = run("upload", rel, "alice/demo", "--create-pr", "--revision", "dev")
    assert res.exit_code == 2
    assert "Error: --create-pr and --revision dev cannot be used together" in res.output
    assert emulator.log == []


def test_dry_run_lists_what_would_be_sent_and_contacts_nothing(emulator, tmp_path, monkeypatch):
    rel = make_release(tmp_path / "rel")
    monkeypatch.setenv("HF_TOKEN", "")  # no token needed for a dry run
    res = run("upload", rel, "alice/demo", "--dry-run")
    assert res.exit_code == 0, res.output
    assert res.output.splitlines()[0].startswith("Would upload 5 files (0.000 GB) from ")
    assert "to alice/demo (branch main) via LFS:" in res.output
    gguf = (rel / "demo-Q8_0.gguf").read_bytes()
    assert f"  {len(gguf):>15,}  {_sha(gguf)}  demo-Q8_0.gguf" in res.output.splitlines()
    doc = json.loads(run("upload", rel, "alice/demo", "--dry-run", "--json").stdout)
    assert doc["dry_run"] and doc["transfer"] == "lfs" and len(doc["files"]) == 5
    assert emulator.log == []


def test_upload_refuses_a_release_that_does_not_verify(emulator, tmp_path):
    rel = make_release(tmp_path / "rel")
    data = bytearray((rel / "demo-Q4_K_M.gguf").read_bytes())
    data[100] ^= 1
    (rel / "demo-Q4_K_M.gguf").write_bytes(bytes(data))
    (rel / "stray.txt").write_text("not part of the release")
    res = run("upload", rel, "alice/demo")
    assert res.exit_code == 1
    line = error_line(res)
    assert line.startswith(f"Error: {rel} does not verify, refusing to upload: demo-Q4_K_M.gguf mismatch (same size, different content)")
    assert "stray.txt unexpected" in line
    assert emulator.log == []


def test_a_file_over_the_hub_limit_is_refused_before_hashing_or_sending(emulator, tmp_path):
    rel = make_release(tmp_path / "rel")
    big = LFS_MAX_FILE_BYTES + 1
    with open(rel / "huge.gguf", "wb") as f:
        f.truncate(big)  # sparse: costs no disk, and must never be read
    manifest = json.loads((rel / MANIFEST_NAME).read_text())
    manifest["artifacts"].append({"path": "huge.gguf", "size": big, "sha256": "a" * 64, "kind": "lora"})
    (rel / MANIFEST_NAME).write_text(json.dumps(manifest))
    with pytest.raises(HubFileTooLargeError) as e:
        plan_upload(rel, "alice/demo")
    assert str(e.value) == (f"huge.gguf: {big} bytes (50.0 GB) is over the Hub's 50 GB per-file limit "
                            "for LFS uploads; nothing was sent")
    assert emulator.log == []


def test_multipart_lfs_upload_round_trips(emulator, tmp_path):
    emulator.multipart_chunk_size = 1024
    rel = make_release(tmp_path / "rel", {"Q4_K_M": 4100, "Q8_0": 2048})
    res = run("upload", rel, "alice/demo")
    assert res.exit_code == 0, res.output
    parts = [r for r in emulator.lfs_uploads() if "/part/" in r.path]
    assert len(parts) == 5 + 2
    assert emulator.file_bytes("alice/demo", "demo-Q4_K_M.gguf") == (rel / "demo-Q4_K_M.gguf").read_bytes()


# ---- interrupted upload -----------------------------------------------------------------------
def test_dropped_connection_then_rerun_sends_only_the_missing_objects(emulator, tmp_path):
    sizes = {f"V{i}": 2000 + 300 * i for i in range(4)}
    rel = make_release(tmp_path / "rel", sizes)
    oids = {_sha((rel / f"demo-{v}.gguf").read_bytes()) for v in sizes}
    emulator.drop_uploads(3)  # the network goes away at the 3rd LFS data request and stays away
    with pytest.raises(HubConnectionError) as e:
        upload_release(plan_upload(rel, "alice/demo"))
    assert str(e.value).startswith(f"lost the connection to {emulator.url} while uploading {rel} to alice/demo")
    assert str(e.value).endswith("what already landed is kept; re-run the same command to resume")
    first = emulator.lfs_uploads()
    landed = {r.oid for r in first if r.status == 200}
    assert len(landed) == 2 and landed < oids
    assert [r for r in first if r.dropped]  # the client retried, and each retry was cut too
    assert set(emulator.lfs_store) == landed
    assert set(emulator.files("alice/demo")) == {".gitattributes"}  # no commit happened

    emulator.restore_network()
    n_first = len(first)
    res = run("upload", rel, "alice/demo")
    assert res.exit_code == 0, res.output
    second = emulator.lfs_uploads()[n_first:]
    assert {r.oid for r in second} == oids - landed
    assert all(r.status == 200 for r in second) and len(second) == len(oids - landed)
    assert verify_remote_release(rel, "alice/demo").ok


def test_dropped_connection_message_through_the_cli(emulator, tmp_path):
    rel = make_release(tmp_path / "rel")
    emulator.drop_uploads(1)
    res = run("upload", rel, "alice/demo")
    assert res.exit_code == 1
    assert error_line(res).endswith("re-run the same command to resume")


# ---- tampered Hub copies ----------------------------------------------------------------------
def _published(emulator, tmp_path) -> pathlib.Path:
    rel = make_release(tmp_path / "rel")
    assert run("upload", rel, "alice/demo").exit_code == 0
    return rel


def test_corrupt_small_file_fails_remote_verify_and_download(emulator, tmp_path):
    rel = _published(emulator, tmp_path)
    emulator.corrupt("alice/demo", "README.md")
    res = run("verify", rel, "--remote", "alice/demo")
    assert res.exit_code == 1
    assert any(ln.startswith("mismatch    README.md") and "its content on the Hub hashes to" in ln
               for ln in res.output.splitlines())
    assert error_line(res) == f"Error: alice/demo does not match the manifest of {rel}: README.md (mismatch)"

    out = tmp_path / "out"
    dl = run("download", "alice/demo", "-o", out)
    assert dl.exit_code == 1
    assert error_line(dl).startswith("Error: README.md: the Hub sent ")
    assert not (out / "README.md").exists() and not (out / "README.md.partial").exists()
    assert not (out / MANIFEST_NAME).exists()
    with pytest.raises(HubVerificationError, match=r"^README\.md: the Hub sent \d+ bytes hashing to [0-9a-f]{64}, "):
        download_release("alice/demo", out, include=["README.md"])


def test_corrupt_lfs_file_fails_download_and_keeps_what_the_user_had(emulator, tmp_path):
    _published(emulator, tmp_path)
    emulator.corrupt("alice/demo", "demo-Q8_0.gguf")
    out = tmp_path / "out"
    out.mkdir()
    (out / "demo-Q8_0.gguf").write_bytes(b"the user's older copy")
    (out / "notes.txt").write_text("mine")
    res = run("download", "alice/demo", "--include", "*Q8_0*", "-o", out, "--force")
    assert res.exit_code == 1
    want = emulator.files("alice/demo")["demo-Q8_0.gguf"]
    assert error_line(res).startswith(f"Error: demo-Q8_0.gguf: the Hub sent {want.size} bytes hashing to ")
    assert error_line(res).endswith(f"the manifest says {want.size} bytes with sha256 {want.sha256}; "
                                    "nothing was written under its name")
    assert (out / "demo-Q8_0.gguf").read_bytes() == b"the user's older copy"
    assert (out / "notes.txt").read_text() == "mine"
    assert sorted(p.name for p in out.iterdir()) == ["demo-Q8_0.gguf", "notes.txt"]


def test_misreported_sha256_fails_remote_verify_and_download_before_any_transfer(emulator, tmp_path):
    rel = _published(emulator, tmp_path)
    emulator.misreport_sha256("alice/demo", "demo-Q4_K_M.gguf")
    report = verify_remote_release(rel, "alice/demo")
    bad = report.file("demo-Q4_K_M.gguf")
    assert not report.ok and [p.path for p in report.problems] == ["demo-Q4_K_M.gguf"]
    assert bad.status == "mismatch" and bad.source == "lfs"
    assert bad.detail == f"the Hub reports sha256 {bad.remote_sha256}, the manifest says {bad.expected_sha256}"
    res = run("verify", rel, "--remote", "alice/demo", "--json")
    assert res.exit_code == 1
    doc = json.loads(res.stdout)
    assert doc["counts"] == {"ok": 4, "mismatch": 1, "missing": 0, "unexpected": 0}

    before = len(emulator.requests("GET", "/resolve/"))
    dl = run("download", "alice/demo", "-o", tmp_path / "out")
    assert dl.exit_code == 1
    assert error_line(dl).startswith("Error: alice/demo at ")
    assert "does not match its manifest: demo-Q4_K_M.gguf mismatch (the Hub reports sha256" in error_line(dl)
    assert error_line(dl).endswith("nothing was downloaded")
    fetched = [r.path for r in emulator.requests("GET", "/resolve/")[before:]]
    assert all(p.endswith((MANIFEST_NAME, CHECKSUMS_NAME)) for p in fetched)


def test_remote_verify_reports_missing_and_unexpected_files(emulator, tmp_path):
    _published(emulator, tmp_path)
    other = make_release(tmp_path / "other", {"Q4_K_M": 3000, "Q5_K_S": 4000})  # same seed: Q4_K_M identical
    res = run("verify", other, "--remote", "alice/demo")
    assert res.exit_code == 1
    status = {ln.split()[1]: ln.split()[0] for ln in res.output.splitlines()[:-2]}
    assert status["demo-Q4_K_M.gguf"] == "ok"
    assert status["demo-Q5_K_S.gguf"] == "missing"
    assert status["demo-Q8_0.gguf"] == "unexpected"
    assert status[MANIFEST_NAME] == "mismatch" and status[CHECKSUMS_NAME] == "mismatch"


# ---- download ---------------------------------------------------------------------------------
def test_download_verifies_everything_and_a_rerun_keeps_present_files(emulator, tmp_path):
    rel = _published(emulator, tmp_path)
    out = tmp_path / "out"
    res = run("download", "alice/demo", "-o", out)
    assert res.exit_code == 0, res.output
    for name in ("demo-Q4_K_M.gguf", "demo-Q8_0.gguf", "README.md", MANIFEST_NAME, CHECKSUMS_NAME):
        assert (out / name).read_bytes() == (rel / name).read_bytes()
    assert verify_release(out).ok
    assert not list(out.glob("*.partial")) and not list(out.glob(".*"))
    assert "3 files verified against the manifest of alice/demo at commit" in res.output

    before = len(emulator.requests("GET", "/resolve/"))
    again = run("download", "alice/demo", "-o", out, "--json")
    doc = json.loads(again.stdout)
    assert doc[VERSION_KEY] == __version__
    assert {f["action"] for f in doc["files"]} == {"present"}
    fetched = [r.path for r in emulator.requests("GET", "/resolve/")[before:]]
    assert not [p for p in fetched if p.endswith(".gguf")]


def test_download_include_and_revision(emulator, tmp_path):
    rel = _published(emulator, tmp_path)
    commit = emulator.repos["alice/demo"].refs["main"]
    out = tmp_path / "out"
    res = run("download", "alice/demo", "--revision", commit, "--include", "*Q4_K_M*", "-o", out, "--json")
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    assert doc["commit"] == commit and [f["path"] for f in doc["files"]] == ["demo-Q4_K_M.gguf"]
    assert sorted(p.name for p in out.iterdir()) == sorted([CHECKSUMS_NAME, MANIFEST_NAME, "demo-Q4_K_M.gguf"])
    assert (out / "demo-Q4_K_M.gguf").read_bytes() == (rel / "demo-Q4_K_M.gguf").read_bytes()
    none = run("download", "alice/demo", "--include", "*Q2_K*", "-o", out)
    assert error_line(none) == ("Error: no file of alice/demo matches --include *Q2_K*; it has: "
                                "demo-Q4_K_M.gguf, demo-Q8_0.gguf, README.md")


PARTIAL_Q8 = ".demo-Q8_0.gguf.flux-gguf.partial"  # where a download of demo-Q8_0.gguf resumes from


def test_download_resumes_a_partial_file_with_a_range_request(emulator, tmp_path):
    rel = _published(emulator, tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    data = (rel / "demo-Q8_0.gguf").read_bytes()
    (out / PARTIAL_Q8).write_bytes(data[:2000])
    result = download_release("alice/demo", out, include=["demo-Q8_0.gguf"])
    assert [f.action for f in result.files] == ["downloaded"]
    assert (out / "demo-Q8_0.gguf").read_bytes() == data
    last = [r for r in emulator.requests("GET", "/resolve/") if r.path.endswith("demo-Q8_0.gguf")][-1]
    assert last.status == 206


def _file_gets(emulator, name: str) -> list:
    return [r for r in emulator.requests("GET", "/resolve/") if r.path.endswith("/" + name)]


def test_emulator_answers_416_for_a_range_at_or_past_the_end_like_real_servers(emulator, tmp_path):
    from huggingface_hub.utils import get_session

    rel = _published(emulator, tmp_path)
    size = len((rel / "demo-Q8_0.gguf").read_bytes())
    commit = emulator.repos["alice/demo"].refs["main"]
    url = f"{emulator.url}/alice/demo/resolve/{commit}/demo-Q8_0.gguf"
    for start in (size, size + 10):
        r = get_session().get(url, headers={"Range": f"bytes={start}-", "Authorization": f"Bearer {TOKEN}"})
        assert (r.status_code, r.headers["Content-Range"]) == (416, f"bytes */{size}")
    r = get_session().get(url, headers={"Range": f"bytes={size - 1}-", "Authorization": f"Bearer {TOKEN}"})
    assert r.status_code == 206 and len(r.content) == 1


def test_download_finishes_a_complete_partial_without_any_request(emulator, tmp_path):
    rel = _published(emulator, tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    data = (rel / "demo-Q8_0.gguf").read_bytes()
    (out / PARTIAL_Q8).write_bytes(data)  # an earlier run got every byte, then stopped
    before = len(_file_gets(emulator, "demo-Q8_0.gguf"))
    for _ in range(2):  # and a re-run is not stuck either
        res = run("download", "alice/demo", "--include", "demo-Q8_0.gguf", "-o", out)
        assert res.exit_code == 0, res.output
    assert len(_file_gets(emulator, "demo-Q8_0.gguf")) == before
    assert (out / "demo-Q8_0.gguf").read_bytes() == data
    assert not list(out.glob("*.partial")) and not list(out.glob(".*"))


def test_download_discards_a_complete_partial_with_wrong_bytes_and_starts_over(emulator, tmp_path):
    rel = _published(emulator, tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    data = (rel / "demo-Q8_0.gguf").read_bytes()
    (out / PARTIAL_Q8).write_bytes(bytes(len(data)))
    result = download_release("alice/demo", out, include=["demo-Q8_0.gguf"])
    assert [f.action for f in result.files] == ["downloaded"]
    assert (out / "demo-Q8_0.gguf").read_bytes() == data
    last = _file_gets(emulator, "demo-Q8_0.gguf")[-1]
    assert (last.status, last.range) == (200, None)


def test_download_starts_over_when_the_server_answers_416_to_the_resume(emulator, tmp_path):
    rel = _published(emulator, tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    data = (rel / "demo-Q8_0.gguf").read_bytes()
    (out / PARTIAL_Q8).write_bytes(data[:2000])
    emulator.fail(416, method="GET", path=r"demo-Q8_0\.gguf$", times=1, message="Range Not Satisfiable")
    result = download_release("alice/demo", out, include=["demo-Q8_0.gguf"])
    assert [f.action for f in result.files] == ["downloaded"]
    assert (out / "demo-Q8_0.gguf").read_bytes() == data
    gets = _file_gets(emulator, "demo-Q8_0.gguf")[-2:]
    assert [(r.status, r.range) for r in gets] == [(416, "bytes=2000-"), (200, None)]


@pytest.mark.parametrize("target_exists", [True, False])
def test_download_never_writes_through_a_symlinked_partial(emulator, tmp_path, target_exists):
    rel = _published(emulator, tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    target = tmp_path / "elsewhere.bin"
    if target_exists:
        target.write_bytes(b"not yours to overwrite")
    (out / PARTIAL_Q8).symlink_to(target)
    res = run("download", "alice/demo", "--include", "demo-Q8_0.gguf", "-o", out)
    assert res.exit_code == 0, res.output
    if target_exists:
        assert target.read_bytes() == b"not yours to overwrite"
    else:
        assert not os.path.lexists(target)
    dest = out / "demo-Q8_0.gguf"
    assert not dest.is_symlink() and dest.read_bytes() == (rel / "demo-Q8_0.gguf").read_bytes()
    # Not a partial file of ours: left as it is (the download went to a name of its own).
    assert os.readlink(out / PARTIAL_Q8) == str(target)
    assert sorted(p.name for p in out.iterdir()) == sorted([PARTIAL_Q8, "demo-Q8_0.gguf", "manifest.json",
                                                            "SHA256SUMS"])
    last = _file_gets(emulator, "demo-Q8_0.gguf")[-1]
    assert (last.status, last.range) == (200, None)


def test_download_refuses_to_overwrite_a_different_manifest_or_checksums(emulator, tmp_path):
    rel = _published(emulator, tmp_path)
    other = make_release(tmp_path / "other-rel", {"Q5_K_S": 4000}, seed=1, name="other")
    assert run("upload", other, "alice/other").exit_code == 0
    out = tmp_path / "out"
    assert run("download", "alice/demo", "--include", "*Q4_K_M*", "-o", out).exit_code == 0
    mine = {name: (out / name).read_bytes() for name in (MANIFEST_NAME, CHECKSUMS_NAME)}
    commit = emulator.repos["alice/other"].refs["main"]

    before = len(emulator.requests("GET", "/resolve/"))
    res = run("download", "alice/other", "--include", "*Q5_K_S*", "-o", out)
    assert error_line(res) == (f"Error: {out}/{MANIFEST_NAME}: already there and differs from the {MANIFEST_NAME} of "
                               f"alice/other at {commit[:12]}; it is never overwritten: download into another "
                               "folder (-o) or move it away")
    fetched = [r.path for r in emulator.requests("GET", "/resolve/")[before:]]
    assert not [p for p in fetched if p.endswith(".gguf")]  # refused before any transfer
    assert not (out / "other-Q5_K_S.gguf").exists()
    assert {name: (out / name).read_bytes() for name in mine} == mine

    (out / MANIFEST_NAME).unlink()
    with pytest.raises(HubError, match=rf"^{out}/{CHECKSUMS_NAME}: already there and differs from the "
                                           rf"{CHECKSUMS_NAME} of alice/other at {commit[:12]}; "):
        download_release("alice/other", out)
    assert (out / CHECKSUMS_NAME).read_bytes() == mine[CHECKSUMS_NAME]

    again = run("download", "alice/demo", "--include", "*Q8_0*", "-o", out)  # its own release: fine
    assert again.exit_code == 0, again.output
    assert (out / MANIFEST_NAME).read_bytes() == (rel / MANIFEST_NAME).read_bytes()
    helped = " ".join(run("download", "--help").output.split())
    assert "If the folder already holds a different manifest.json or SHA256SUMS" in helped


def test_download_of_a_repo_without_manifest(emulator, tmp_path):
    emulator.add_repo("alice/plain")
    res = run("download", "alice/plain", "-o", tmp_path / "out")
    assert error_line(res) == "Error: alice/plain at main has no manifest.json: not a flux-gguf release"


# ---- Hub refusals -----------------------------------------------------------------------------
def test_no_token(emulator, tmp_path, monkeypatch):
    rel = make_release(tmp_path / "rel")
    monkeypatch.setenv("HF_TOKEN", "")
    res = run("upload", rel, "alice/demo")
    assert error_line(res) == "Error: no Hugging Face token found: set HF_TOKEN or log in with `hf auth login`"
    assert emulator.log == []


def test_bad_token_401(emulator, tmp_path, monkeypatch):
    rel = make_release(tmp_path / "rel")
    monkeypatch.setenv("HF_TOKEN", "hf_revoked_token")
    res = run("upload", rel, "alice/demo")
    assert res.exit_code == 1
    assert error_line(res) == ("Error: the Hub rejected the token (HTTP 401) while creating alice/demo: log in again "
                               "with `hf auth login` or set HF_TOKEN to a valid token")
    assert "hf_revoked_token" not in res.output


def test_someone_elses_repo_403(emulator, tmp_path):
    emulator.add_repo("bob/model", owner="bob")
    rel = make_release(tmp_path / "rel")
    res = run("upload", rel, "bob/model")
    assert res.exit_code == 1
    assert error_line(res) == (f"Error: the token may not write to bob/model (HTTP 403) while uploading {rel} to "
                               "bob/model: the repo belongs to another user or organization, or the token is read-only")
    assert emulator.lfs_store == {} and set(emulator.files("bob/model")) == {".gitattributes"}


def test_missing_repo_or_revision_404(emulator, tmp_path):
    rel = _published(emulator, tmp_path)
    res = run("verify", rel, "--remote", "alice/nothing-here")
    assert error_line(res) == (f"Error: repository alice/nothing-here was not found on {emulator.url}, or it is private "
                               "and the token cannot see it (while reading the file list of alice/nothing-here)")
    res = run("verify", rel, "--remote", "alice/demo@no-such-branch")
    assert error_line(res) == ("Error: revision 'no-such-branch' does not exist in alice/demo "
                               "(while reading the file list of alice/demo)")
    res = run("download", "alice/nothing-here", "-o", tmp_path / "out")
    assert "repository alice/nothing-here was not found" in error_line(res)


def test_rate_limited_after_the_clients_retries_429(emulator, tmp_path):
    rel = make_release(tmp_path / "rel")
    emulator.fail(429, path="/preupload/")
    res = run("upload", rel, "alice/demo")
    assert res.exit_code == 1
    assert error_line(res) == (f"Error: the Hub kept rate-limiting requests (HTTP 429) after the client's retries while "
                               f"uploading {rel} to alice/demo: wait a few minutes and re-run (uploads resume where "
                               "they stopped)")
    retries = http_backoff.__kwdefaults__["max_retries"]
    assert len(emulator.requests("POST", "/preupload/")) == 1 + retries


def test_invalid_card_metadata_is_reported(emulator, tmp_path):
    rel = make_release(tmp_path / "rel", card="---\ntags: [unclosed\n---\n# card\n")
    res = run("upload", rel, "alice/demo")
    assert error_line(res).startswith("Error: the Hub rejected README.md's YAML front matter: invalid YAML")


def test_repo_spec_parsing():
    assert parse_repo_spec("alice/demo") == ("alice/demo", None)
    assert parse_repo_spec("alice/demo@refs/pr/3") == ("alice/demo", "refs/pr/3")
    for bad in ("demo", "alice/demo@", "al ice/demo", "a/b/c"):
        with pytest.raises(HubError):
            parse_repo_spec(bad)


# ---- the real entry point, environment only, token never shown ---------------------------------
def test_cli_subprocess_never_prints_or_writes_the_token(emulator, tmp_path):
    rel = make_release(tmp_path / "rel")
    home = tmp_path / "hf_home_sub"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING"))}
    env.update(HF_ENDPOINT=emulator.url, HF_HUB_DISABLE_XET="1", HF_HOME=str(home), HF_TOKEN=SECRET,
               HF_HUB_DISABLE_TELEMETRY="1", PYTHONPATH=str(pathlib.Path(__file__).resolve().parents[1]))
    script = "from converter.cli import main; main()"
    outputs = []
    for args in (["upload", str(rel), "alice/sub"], ["download", "alice/sub", "-o", str(tmp_path / "dl")]):
        proc = subprocess.run([sys.executable, "-c", script, *args], env=env, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
        outputs.append(proc.stdout + proc.stderr)
    assert "Commit: " in outputs[0] and "verified against the manifest" in outputs[1]
    assert emulator.requests("POST", "/api/repos/create")[0].user == "alice"  # the token was used...
    for text in outputs:
        assert SECRET not in text  # ...but never shown
    for path in tmp_path.rglob("*"):
        if path.is_file() and path.stat().st_size < 1 << 20:
            assert SECRET.encode() not in path.read_bytes(), path


def test_verify_remote_cannot_be_combined_with_source(emulator, tmp_path):
    rel = make_release(tmp_path / "rel")
    res = run("verify", rel, "--remote", "alice/demo", "--tensors")
    assert res.exit_code == 2
    assert "Error: --remote checks the Hub's copy; it cannot be combined with --source or --tensors" in res.output
    assert emulator.log == []


# ---- a release built by the real pipeline ------------------------------------------------------
def test_a_real_release_uploads_verifies_remotely_and_downloads(emulator, tmp_path):
    from converter.layout import FluxGeometry
    from converter.release.build import build_release
    from converter.synthetic import write_synthetic_flux

    project = tmp_path / "project"
    (project / "weights").mkdir(parents=True)
    write_synthetic_flux(project / "weights" / "tiny.safetensors", FluxGeometry(double_blocks=1, single_blocks=1, hidden=256))
    (project / "LICENSE.md").write_text("FLUX.1 [dev] Non-Commercial License (test copy)\n")
    (project / "release.toml").write_text(
        'name = "tiny-kontext"\nsource = "weights/tiny.safetensors"\n'
        'base_model = "black-forest-labs/FLUX.1-Kontext-dev"\nvariants = ["Q8_0", "BF16"]\n'
        'extra_files = ["LICENSE.md"]\n\n[card]\nlicense = "other"\n'
        'license_name = "flux-1-dev-non-commercial-license"\nlicense_link = "LICENSE.md"\nquantized_by = "alice"\n')
    rel = build_release(project / "release.toml", tmp_path / "release").out_dir

    up = run("upload", rel, "alice/tiny-kontext-GGUF", "--json")
    assert up.exit_code == 0, up.output
    doc = json.loads(up.stdout)
    listed = {a.path for a in load_manifest(rel / MANIFEST_NAME).artifacts} | {MANIFEST_NAME, CHECKSUMS_NAME}
    assert {f["path"] for f in doc["verified"]["files"]} == listed and doc["verified"]["ok"]
    ggufs = [p for p in listed if p.endswith(".gguf")]
    assert len(ggufs) == 2 and all(emulator.files("alice/tiny-kontext-GGUF")[p].lfs for p in ggufs)

    remote = run("verify", rel, "--remote", "alice/tiny-kontext-GGUF")
    assert remote.exit_code == 0, remote.output
    out = tmp_path / "downloaded"
    down = run("download", "alice/tiny-kontext-GGUF", "-o", out)
    assert down.exit_code == 0, down.output
    local = run("verify", out)
    assert local.exit_code == 0, local.output
    for name in listed:
        assert (out / name).read_bytes() == (rel / name).read_bytes()


def test_download_never_writes_through_a_symlink(emulator, tmp_path):
    _published(emulator, tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    target = tmp_path / "elsewhere.bin"
    target.write_bytes(b"not yours to overwrite")
    (out / "demo-Q8_0.gguf").symlink_to(target)
    res = run("download", "alice/demo", "--include", "demo-Q8_0.gguf", "-o", out)
    assert error_line(res) == (f"Error: {out}/demo-Q8_0.gguf: is a symbolic link; downloads are never written "
                               "through a symbolic link")
    assert target.read_bytes() == b"not yours to overwrite"

    (out / "demo-Q8_0.gguf").unlink()
    (out / MANIFEST_NAME).symlink_to(target)
    res = run("download", "alice/demo", "--include", "demo-Q8_0.gguf", "-o", out)
    assert error_line(res) == (f"Error: {out}/{MANIFEST_NAME}: is a symbolic link; downloads are never written "
                               "through a symbolic link")
    assert target.read_bytes() == b"not yours to overwrite"
