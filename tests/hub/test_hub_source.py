"""Converting straight from the Hub (``hf://``), against the loopback emulator with the real client.

Every conversion is compared byte for byte with converting a local copy of the same files (given
the same provenance metadata, which a Hub source records); the emulator cuts connections
mid-body, lies about the sha256, damages bytes, gates a repo, and misses repos, files and revisions.
Small module constants (range size, window, hash hold) make a tiny checkpoint span many ranges.
"""
from __future__ import annotations

import hashlib
import json
import pathlib

import numpy as np
import pytest
from click.testing import CliRunner
from gguf import GGUFReader
from hub_emulator import HubEmulator, emulated_hub

import converter.hub.network as hub_network
import converter.hub.source as hub_source
from converter.cli import main
from converter.errors import HubError
from converter.hub.source import HubSpec, open_any_source, parse_hub_spec
from converter.layout import FluxGeometry
from converter.pipeline import convert
from converter.sources import open_source
from converter.synthetic import write_synthetic_flux

TOKEN = "hf_alice_write"
GEOMETRY = FluxGeometry(double_blocks=2, single_blocks=2, hidden=256)
VARIANTS = ["Q8_0", "Q4_K_M"]


@pytest.fixture
def emulator(monkeypatch: pytest.MonkeyPatch, tmp_path: pathlib.Path):
    with emulated_hub(monkeypatch, tmp_path / "hf_home", {TOKEN: "alice", "hf_bob_write": "bob"}, TOKEN) as hub_:
        # Many small ranges, a small window, and no real sleeping between resumes.
        monkeypatch.setattr(hub_source, "RANGE_BYTES", 64 << 10)
        monkeypatch.setattr(hub_source, "WINDOW_BYTES", 256 << 10)
        monkeypatch.setattr(hub_source, "HEADER_PROBE_BYTES", 16384)  # the test header is 8560 bytes
        monkeypatch.setattr(hub_network.time, "sleep", lambda s: None)
        yield hub_


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, pathlib.Path]:
    """A BFL single file (tensors in BFL order), the same weights saved by safetensors (sorted by
    name, as real checkpoints are), and a sharded diffusers folder."""
    root = tmp_path_factory.mktemp("hubsrc")
    single = write_synthetic_flux(root / "flux.safetensors", GEOMETRY, dtype="BF16", seed=3)
    from safetensors.torch import load_file, save_file

    sorted_file = root / "sorted" / "flux.safetensors"
    sorted_file.parent.mkdir()
    save_file(load_file(single), sorted_file)
    (root / "fluxd").mkdir()
    folder = write_synthetic_flux(root / "fluxd" / "transformer", GEOMETRY, dtype="BF16", layout="diffusers",
                                  seed=4, shard_bytes=1 << 20)
    return {"single": single, "sorted": sorted_file, "folder": folder}


def _publish_file(hub: HubEmulator, repo_id: str, path: str, local: pathlib.Path) -> str:
    return hub.put_files(repo_id, {path: local.read_bytes()})


def _publish_folder(hub: HubEmulator, repo_id: str, folder: pathlib.Path) -> str:
    files = {f"transformer/{p.name}": p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}
    commit = hub.put_files(repo_id, {k: v for k, v in files.items() if k.endswith(".safetensors")})
    return hub.put_files(repo_id, {k: v for k, v in files.items() if not k.endswith(".safetensors")}, lfs=False) \
        or commit


def run(*args: object):
    return CliRunner().invoke(main, [str(a) for a in args])


def error_line(result) -> str:
    lines = [ln.split("\r")[-1] for ln in result.output.split("\n")]
    lines = [ln for ln in lines if ln.startswith("Error: ")]
    assert len(lines) == 1, result.output
    assert result.exit_code == 1
    return lines[0]


def _local_twin(src: pathlib.Path, out: pathlib.Path, spec: str, name: str) -> dict[str, bytes]:
    """Convert the local copy with the provenance the Hub source records: the expected bytes."""
    with open_any_source(spec) as remote:
        sha, meta = remote.sha256_by_name, remote.provenance_metadata()
    records = convert(src, out, VARIANTS, name=name, source_sha256=sha, extra_metadata=meta)
    return {r.path.name: r.path.read_bytes() for r in records}


def _outputs(folder: pathlib.Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def _tensor_bytes(data: dict[str, bytes], tmp: pathlib.Path) -> dict[str, dict[str, str]]:
    out = {}
    for name, blob in data.items():
        p = tmp / f"probe-{name}"
        p.write_bytes(blob)
        r = GGUFReader(p)
        out[name] = {t.name: hashlib.sha256(np.asarray(t.data).tobytes()).hexdigest() for t in r.tensors}
        del r
        p.unlink()
    return out


# ---- conversions ------------------------------------------------------------------------------
def test_single_file_from_the_hub_is_byte_identical_to_a_local_conversion(emulator, checkpoints, tmp_path):
    commit = _publish_file(emulator, "alice/flux", "flux.safetensors", checkpoints["single"])
    spec = "hf://alice/flux@main/flux.safetensors"
    result = run("convert", spec, "-o", tmp_path / "remote", "--variant", ",".join(VARIANTS))
    assert result.exit_code == 0, result.output
    remote = _outputs(tmp_path / "remote")
    assert sorted(remote) == ["flux-Q4_K_M.gguf", "flux-Q8_0.gguf"]
    assert remote == _local_twin(checkpoints["single"], tmp_path / "local", spec, "flux")
    # The tensors equal those of a plain local conversion (only the provenance keys differ).
    plain = {r.path.name: r.path.read_bytes() for r in convert(checkpoints["single"], tmp_path / "plain", VARIANTS)}
    assert _tensor_bytes(remote, tmp_path) == _tensor_bytes(plain, tmp_path)
    # The header records the repo, the resolved commit and the Hub's sha256.
    reader = GGUFReader(tmp_path / "remote" / "flux-Q8_0.gguf")
    field = reader.fields["flux_gguf.hub_source"]
    prov = json.loads(bytes(field.parts[field.data[0]]).decode())
    sha = hashlib.sha256(checkpoints["single"].read_bytes()).hexdigest()
    assert prov == {"repo_id": "alice/flux", "revision": "main", "commit": commit,
                    "files": [{"path": "flux.safetensors", "size": checkpoints["single"].stat().st_size,
                               "sha256": sha}]}
    field = reader.fields["flux_gguf.source"]
    assert sha in bytes(field.parts[field.data[0]]).decode()
    # One range request for the header, then ranges; nothing fetched twice; every request a range.
    gets = emulator.requests("GET", "/resolve/")
    assert gets and all(r.range and r.status == 206 for r in gets)
    assert gets[0].range == "bytes=0-16383"
    assert sum(r.nbytes for r in gets) == checkpoints["single"].stat().st_size + _overlap(gets)


def _overlap(gets) -> int:
    """Bytes fetched more than once (the header probe overlaps the first tensor range)."""
    spans = sorted((int(r.range[6:].split("-")[0]), int(r.range.split("-")[1]) + 1) for r in gets)
    covered, end, total = 0, 0, sum(b - a for a, b in spans)
    for a, b in spans:
        covered += max(0, b - max(a, end))
        end = max(end, b)
    return total - covered


def test_a_diffusers_repo_with_shards_converts_like_the_local_folder(emulator, checkpoints, tmp_path):
    _publish_folder(emulator, "alice/fluxd", checkpoints["folder"])
    spec = "hf://alice/fluxd"
    result = run("convert", spec, "-o", tmp_path / "remote", "--variant", ",".join(VARIANTS), "--name", "fluxd")
    assert result.exit_code == 0, result.output
    assert _outputs(tmp_path / "remote") == _local_twin(checkpoints["folder"], tmp_path / "local", spec, "fluxd")
    with open_any_source(spec) as source, open_source(checkpoints["folder"]) as local:
        assert source.layout == "diffusers" and list(source.tensors) == list(local.tensors)
        assert len(source.remote_files) > 2  # really sharded


def test_a_file_sorted_by_name_is_read_in_file_order_and_fetched_once(emulator, checkpoints, tmp_path, monkeypatch):
    """Real checkpoints are sorted by name, not in the order the GGUF holds tensors: the pipeline
    reads them in file order (each lands at its offset in the outputs), so the sha256 keeps up
    and nothing is fetched twice, with the smallest hold budget (the ranges in flight)."""
    monkeypatch.setattr(hub_source, "HASH_HOLD_BYTES", 0)
    _publish_file(emulator, "alice/sorted", "flux.safetensors", checkpoints["sorted"])
    spec = "hf://alice/sorted/flux.safetensors"
    with open_any_source(spec) as source:
        assert source.read_order(list(source.tensors)) != list(source.tensors)  # really another order
        records = convert(source, tmp_path / "remote", VARIANTS, source_sha256=source.sha256_by_name,
                          extra_metadata=source.provenance_metadata())
        stats = source.stats
    assert stats.refetched_for_hash == 0
    assert stats.bytes == checkpoints["sorted"].stat().st_size + _overlap(emulator.requests("GET", "/resolve/"))
    assert stats.peak_window <= (256 << 10) + (64 << 10)
    remote = {r.path.name: r.path.read_bytes() for r in records}
    assert remote == _local_twin(checkpoints["sorted"], tmp_path / "local", spec, "flux")


def test_reads_out_of_file_order_are_served_and_the_hash_catches_up(emulator, checkpoints, monkeypatch):
    """A reader that ignores read_order (BFL order on a name-sorted file) still gets every tensor
    exactly; ranges that arrive ahead of the hash beyond the hold budget are fetched again at the end."""
    monkeypatch.setattr(hub_source, "HASH_HOLD_BYTES", 0)
    _publish_file(emulator, "alice/sorted", "flux.safetensors", checkpoints["sorted"])
    with open_any_source("hf://alice/sorted/flux.safetensors") as source, open_source(checkpoints["sorted"]) as local:
        names = list(source.tensors)
        for name in names[::2] + names[1::2]:  # out of order, and back again: those are fetched alone
            np.testing.assert_array_equal(source.read(name).view(np.uint32), local.read(name).view(np.uint32))
        source.check_complete()
        assert source.stats.refetched_for_hash > 0


def test_connections_dropped_mid_tensor_resume_and_give_identical_bytes(emulator, checkpoints, tmp_path):
    _publish_file(emulator, "alice/flux", "flux.safetensors", checkpoints["single"])
    spec = "hf://alice/flux/flux.safetensors"
    expected = _local_twin(checkpoints["single"], tmp_path / "local", spec, "flux")
    emulator.log.clear()
    emulator.drop_downloads(3, count=4, after_bytes=10_000)  # ranges 3..6 cut 10 kB into their body
    result = run("convert", spec, "-o", tmp_path / "remote", "--variant", ",".join(VARIANTS))
    assert result.exit_code == 0, result.output
    assert _outputs(tmp_path / "remote") == expected
    gets = emulator.requests("GET", "/resolve/")
    dropped = [r for r in gets if r.dropped]
    assert len(dropped) == 4 and all(r.nbytes == 10_000 for r in dropped)
    for d in dropped:  # each was resumed from the byte after the last one received
        first, last = (int(x) for x in d.range[6:].split("-"))
        assert [r.range for r in gets].count(f"bytes={first + 10_000}-{last}") == 1  # (cut again, maybe)


def test_a_connection_that_never_comes_back_fails_in_one_line_and_writes_nothing(emulator, checkpoints, tmp_path):
    _publish_file(emulator, "alice/flux", "flux.safetensors", checkpoints["single"])
    emulator.drop_downloads(4, count=None, after_bytes=0)
    out = tmp_path / "out"
    result = run("convert", "hf://alice/flux/flux.safetensors", "-o", out, "--variant", "Q8_0")
    line = error_line(result)
    assert "lost the connection" in line and "flux.safetensors" in line
    assert list(out.iterdir()) == []


@pytest.mark.parametrize("damage", ["misreport", "corrupt"])
def test_a_wrong_sha256_fails_and_leaves_no_output(emulator, checkpoints, tmp_path, damage):
    _publish_file(emulator, "alice/flux", "flux.safetensors", checkpoints["single"])
    if damage == "misreport":
        emulator.misreport_sha256("alice/flux", "flux.safetensors")
    else:
        emulator.corrupt("alice/flux", "flux.safetensors")
    out, keep = tmp_path / "out", tmp_path / "kept"
    result = run("convert", "hf://alice/flux/flux.safetensors", "-o", out, "--variant", "Q8_0,Q4_K_M",
                 "--keep-source", keep)
    line = error_line(result)
    assert "flux.safetensors" in line and "sha256" in line and "Hub reports" in line
    assert list(out.iterdir()) == []  # no GGUF, no .partial
    assert not keep.exists() or not any(p.is_file() for p in keep.rglob("*"))


def test_keep_source_keeps_a_verified_copy_and_nothing_else_is_written(emulator, checkpoints, tmp_path):
    _publish_folder(emulator, "alice/fluxd", checkpoints["folder"])
    keep = tmp_path / "kept"
    result = run("convert", "hf://alice/fluxd", "-o", tmp_path / "out", "--variant", "Q8_0", "--keep-source", keep)
    assert result.exit_code == 0, result.output
    kept = sorted(p.relative_to(keep).as_posix() for p in keep.rglob("*") if p.is_file())
    shards = sorted(p.name for p in checkpoints["folder"].glob("*.safetensors"))
    assert kept == [f"transformer/{n}" for n in shards]
    for n in shards:
        assert (keep / "transformer" / n).read_bytes() == (checkpoints["folder"] / n).read_bytes()
    # Without --keep-source: only the outputs appear, no cache copy under HF_HOME or anywhere in tmp.
    before = {p for p in tmp_path.rglob("*")}
    result = run("convert", "hf://alice/fluxd", "-o", tmp_path / "out2", "--variant", "Q8_0")
    assert result.exit_code == 0, result.output
    assert {p for p in tmp_path.rglob("*")} - before == {tmp_path / "out2", tmp_path / "out2" / "fluxd-Q8_0.gguf"}


def test_dry_run_and_inspect_read_headers_only(emulator, checkpoints, tmp_path):
    _publish_file(emulator, "alice/flux", "flux.safetensors", checkpoints["single"])
    spec = "hf://alice/flux/flux.safetensors"
    result = run("convert", spec, "-o", tmp_path / "out", "--variant", "Q4_K_M", "--dry-run", "--json")
    assert result.exit_code == 0, result.output
    plan = json.loads(result.output)
    assert plan["layout"] == "bfl" and plan["plans"][0]["file"] == "flux-Q4_K_M.gguf"
    gets = emulator.requests("GET", "/resolve/")
    assert [r.range for r in gets] == ["bytes=0-16383"]  # the header, by one range request
    assert not (tmp_path / "out").exists()


# ---- errors -----------------------------------------------------------------------------------
def test_gated_repo_without_a_token_says_to_log_in_and_accept_the_licence(emulator, checkpoints, tmp_path,
                                                                          monkeypatch):
    _publish_file(emulator, "bfl/gated", "flux.safetensors", checkpoints["single"])
    emulator.gate("bfl/gated", {"alice"})
    monkeypatch.setenv("HF_TOKEN", "")
    result = run("convert", "hf://bfl/gated/flux.safetensors", "-o", tmp_path / "out", "--variant", "Q8_0")
    line = error_line(result)
    assert "HTTP 401" in line and "HF_TOKEN" in line and "hf auth login" in line
    assert f"{emulator.url}/bfl/gated" in line and "licence" in line


def test_gated_repo_with_a_token_that_has_no_access_says_to_accept_the_licence(emulator, checkpoints, tmp_path,
                                                                              monkeypatch):
    _publish_file(emulator, "bfl/gated", "flux.safetensors", checkpoints["single"])
    emulator.gate("bfl/gated", {"alice"})
    monkeypatch.setenv("HF_TOKEN", "hf_bob_write")
    result = run("convert", "hf://bfl/gated/flux.safetensors", "-o", tmp_path / "out", "--variant", "Q8_0")
    line = error_line(result)
    assert "HTTP 403" in line and "gated" in line and f"accept the licence on {emulator.url}/bfl/gated" in line
    monkeypatch.setenv("HF_TOKEN", TOKEN)  # alice accepted it: the same command works
    result = run("convert", "hf://bfl/gated/flux.safetensors", "-o", tmp_path / "out", "--variant", "Q8_0")
    assert result.exit_code == 0, result.output


def test_a_bad_token_is_a_401_line(emulator, checkpoints, tmp_path, monkeypatch):
    _publish_file(emulator, "alice/flux", "flux.safetensors", checkpoints["single"])
    monkeypatch.setenv("HF_TOKEN", "hf_not_a_real_token")
    line = error_line(run("inspect", "hf://alice/flux/flux.safetensors"))
    assert "rejected the token (HTTP 401)" in line and "hf auth login" in line


@pytest.mark.parametrize("spec, words", [
    ("hf://alice/nope/flux.safetensors", ["repository alice/nope was not found"]),
    ("hf://alice/flux@v9/flux.safetensors", ["revision 'v9' does not exist in alice/flux"]),
    ("hf://alice/flux/other.safetensors", ["alice/flux at main", "has no file other.safetensors"]),
    ("hf://alice/flux", ["no diffusers transformer weights", "the repo root"]),
])
def test_missing_repo_revision_or_file_is_a_404_line_naming_it(emulator, checkpoints, tmp_path, spec, words):
    _publish_file(emulator, "alice/flux", "flux.safetensors", checkpoints["single"])
    line = error_line(run("convert", spec, "-o", tmp_path / "out", "--variant", "Q8_0"))
    assert spec in line and all(w in line for w in words), line
    assert not (tmp_path / "out").exists()


def test_inspect_a_hub_checkpoint(emulator, checkpoints, monkeypatch):
    monkeypatch.setattr(hub_source, "HEADER_PROBE_BYTES", 4096)  # smaller than the header: one more request
    _publish_file(emulator, "alice/flux", "flux.safetensors", checkpoints["single"])
    result = run("inspect", "hf://alice/flux/flux.safetensors", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    with open_source(checkpoints["single"]) as local:
        assert [t["name"] for t in report["tensors"]] == list(local.tensors)
    assert report["size"] == checkpoints["single"].stat().st_size
    assert report["layout"] == "bfl"
    assert [r.range for r in emulator.requests("GET", "/resolve/")] == ["bytes=0-4095", "bytes=4096-8567"]


# ---- SRC strings ------------------------------------------------------------------------------
def test_parse_hub_spec():
    assert parse_hub_spec("hf://o/r") == HubSpec("o/r", None, "")
    assert parse_hub_spec("hf://o/r@dev/a/b.safetensors") == HubSpec("o/r", "dev", "a/b.safetensors")
    assert parse_hub_spec("hf://o/r@refs/pr/3/x.safetensors") == HubSpec("o/r", "refs/pr/3", "x.safetensors")
    assert str(parse_hub_spec("hf://o/r@v1/transformer")) == "hf://o/r@v1/transformer"
    for bad in ("hf://o", "hf://o/r@/x.safetensors", "hf://o/r/../x.safetensors", "hf:///r"):
        with pytest.raises(HubError):
            parse_hub_spec(bad)


# ---- releases: build from the Hub, re-derive from the Hub --------------------------------------
SPEC = """\
name = "hubflux"
source = "{source}"
base_model = "black-forest-labs/FLUX.1-Kontext-dev"
variants = ["Q8_0", "Q4_K_M"]

[card]
license = "other"
license_name = "flux-1-dev-non-commercial-license"
quantized_by = "flux-gguf tests"
"""


def _spec(root: pathlib.Path, source: str) -> pathlib.Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "release.toml").write_text(SPEC.format(source=source))
    return root / "release.toml"


def test_release_build_from_the_hub_and_verify_source_from_the_hub(emulator, checkpoints, tmp_path):
    from converter.release.build import build_release
    from manifests import load_manifest, verify_release

    _publish_folder(emulator, "alice/fluxd", checkpoints["folder"])
    # A release built from a local copy of the repo (the model folder: names transformer/...)...
    local_root = tmp_path / "local"
    (local_root / "weights").mkdir(parents=True)
    import shutil
    shutil.copytree(checkpoints["folder"], local_root / "weights" / "transformer")
    local = build_release(_spec(local_root, "weights"), tmp_path / "dist-local")
    # ... and one built straight from the Hub list the same source files, sizes and sha256.
    remote = build_release(_spec(tmp_path / "remote", "hf://alice/fluxd"), tmp_path / "dist-remote")
    assert verify_release(tmp_path / "dist-remote").ok
    manifest = load_manifest(tmp_path / "dist-remote" / "manifest.json")
    assert [(s.name, s.size, s.sha256) for s in manifest.sources] == \
        [(s.name, s.size, s.sha256) for s in local.manifest.sources]
    commit = emulator.repos["alice/fluxd"].refs["main"]
    assert [s.hub for s in manifest.sources] == [
        {"repo_id": "alice/fluxd", "revision": "main", "commit": commit, "path": s.name} for s in manifest.sources]
    assert manifest.spec["source"] == "hf://alice/fluxd"
    tensors = {a.path: [(t.name, t.sha256) for t in a.tensors or ()] for a in manifest.artifacts if a.kind == "gguf"}
    assert tensors == {a.path: [(t.name, t.sha256) for t in a.tensors or ()]
                       for a in local.manifest.artifacts if a.kind == "gguf"}
    assert remote.manifest.sources == manifest.sources
    # verify --source hf://: every tensor re-derived from the streamed weights; the files are the listed ones.
    result = run("verify", tmp_path / "dist-local", "--source", "hf://alice/fluxd", "--json")
    assert result.exit_code == 0, result.output
    doc = json.loads(result.output)
    assert doc["ok"] and doc["source"]["source_files_match"] and doc["source"]["tensors_checked"] > 0
    # A Hub whose sha256 disagrees with the bytes fails the re-derivation in one line.
    shard = next(p for p in sorted(emulator.files("alice/fluxd")) if p.endswith(".safetensors"))
    emulator.misreport_sha256("alice/fluxd", shard)
    line = error_line(run("verify", tmp_path / "dist-local", "--source", "hf://alice/fluxd"))
    assert shard in line and "Hub reports" in line


def test_release_spec_keeps_hub_sources_as_written(tmp_path):
    from converter.release.spec import parse_release_spec

    spec = parse_release_spec(_spec(tmp_path, "hf://alice/fluxd@v1/transformer"))
    assert spec.source == "hf://alice/fluxd@v1/transformer"


def test_transient_statuses_on_ranges_are_retried(emulator, checkpoints, tmp_path):
    _publish_file(emulator, "alice/flux", "flux.safetensors", checkpoints["single"])
    spec = "hf://alice/flux/flux.safetensors"
    expected = _local_twin(checkpoints["single"], tmp_path / "local", spec, "flux")
    emulator.fail(503, method="GET", path="/resolve/", times=2)
    emulator.fail(429, method="GET", path="/resolve/", times=1)
    result = run("convert", spec, "-o", tmp_path / "remote", "--variant", ",".join(VARIANTS))
    assert result.exit_code == 0, result.output
    assert _outputs(tmp_path / "remote") == expected
    assert [r.status for r in emulator.requests("GET", "/resolve/")].count(503) >= 2


def test_imatrix_collects_from_the_hub_exactly_as_from_a_local_copy(emulator, checkpoints, tmp_path):
    """`flux-gguf imatrix hf://...` streams the checkpoint and sums exactly what a local copy gives."""
    from converter.imatrix import read_imatrix

    _publish_file(emulator, "alice/flux", "flux.safetensors", checkpoints["single"])
    common = ["--probes", "1", "--height", "32", "--width", "32", "--text-tokens", "8", "--device", "cpu"]
    remote = run("imatrix", "hf://alice/flux/flux.safetensors", "-o", tmp_path / "remote.imatrix.gguf", *common)
    assert remote.exit_code == 0, remote.output
    local = run("imatrix", checkpoints["single"], "-o", tmp_path / "local.imatrix.gguf", *common)
    assert local.exit_code == 0, local.output
    a, b = read_imatrix(tmp_path / "remote.imatrix.gguf"), read_imatrix(tmp_path / "local.imatrix.gguf")
    assert sorted(a.entries) == sorted(b.entries) and len(a.entries) > 0
    for name, entry in a.entries.items():
        assert entry.count == b.entries[name].count
        assert np.array_equal(entry.in_sum2, b.entries[name].in_sum2), name
