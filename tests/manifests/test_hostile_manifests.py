"""Hostile manifests, races and concurrent writers (issue 12): partial names, locks, open-then-check."""
from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import pytest
from click.testing import CliRunner
from test_verify import build_release

import manifests.verify as mv
from converter.cli import main
from manifests import MANIFEST_NAME, SchemaError, UnsafePathError, load_manifest, verify_release
from manifests.hashing import copy_file_hashed, is_partial_name, partial_path, resumable_partial_path, write_bytes_atomic
from manifests.locking import ForeignLockFileError, OutputBusyError, acquire, lock_path_for, locked
from manifests.paths import MAX_DEPTH, check_relative_path, open_inside


@pytest.fixture()
def release(tmp_path) -> Path:
    build_release(tmp_path / "rel")
    return tmp_path / "rel"


def verify_cli(*args: object):
    return CliRunner().invoke(main, ["verify", *map(str, args)])


# ---- partial names ------------------------------------------------------------------------------

def test_partial_names_are_hidden_unique_and_marked(tmp_path):
    a, b = partial_path(tmp_path / "x.bin"), partial_path(tmp_path / "x.bin")
    assert a != b and a.parent == b.parent == tmp_path
    for p in (a, b):
        assert p.name.startswith(".x.bin.") and p.name.endswith(".flux-gguf.partial") and is_partial_name(p.name)
        assert f".{os.getpid()}-" in p.name
    assert resumable_partial_path(tmp_path / "x.bin").name == ".x.bin.flux-gguf.partial"
    assert not is_partial_name("x.bin.partial") and not is_partial_name("README.md.partial")


def test_partial_names_of_long_names_fit_the_file_name_limit(tmp_path):
    long = "é" * 127 + ".gguf"  # 259 bytes of UTF-8... over NAME_MAX by itself
    for p in (partial_path(tmp_path / long), resumable_partial_path(tmp_path / long)):
        assert len(p.name.encode()) <= 255 and is_partial_name(p.name)


@pytest.mark.parametrize("name", ["README.md.partial", "manifest.json.partial", "x.bin.partial"])
def test_writing_never_touches_a_users_file_named_like_a_partial(tmp_path, name):
    final = tmp_path / name.removesuffix(".partial")
    (tmp_path / name).write_text("mine")
    write_bytes_atomic(final, b"new")
    src = tmp_path / "src.bin"
    src.write_bytes(b"copied")
    copy_file_hashed(src, tmp_path / "other")
    assert (tmp_path / name).read_text() == "mine" and final.read_bytes() == b"new"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([name, final.name, "src.bin", "other"])


# ---- locks --------------------------------------------------------------------------------------

def test_a_second_lock_fails_at_once_naming_the_holder_and_release_removes_the_file(tmp_path):
    target = tmp_path / "out.gguf"
    with acquire(target):
        assert lock_path_for(target).read_text().strip() == str(os.getpid())
        with pytest.raises(OutputBusyError) as e:
            acquire(target)
        assert str(e.value) == (f"{target}: another flux-gguf run (pid {os.getpid()}) is writing it; wait for it "
                                "to finish or choose another output")
    assert not lock_path_for(target).exists()
    with acquire(target):  # free again
        pass


def test_a_planted_lock_symlink_is_not_followed(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    lock_path_for(tmp_path / "out").symlink_to(victim)
    with pytest.raises(ForeignLockFileError, match="it is a symbolic link"):
        acquire(tmp_path / "out")
    assert victim.read_text() == "precious"


def test_many_threads_racing_for_one_lock_never_hold_it_together(tmp_path):
    target = tmp_path / "out"
    holders, overlaps, lock = [0], [], threading.Lock()

    def worker() -> None:
        for _ in range(200):
            try:
                with acquire(target):
                    with lock:
                        holders[0] += 1
                        if holders[0] > 1:
                            overlaps.append(holders[0])
                    with lock:
                        holders[0] -= 1
            except OutputBusyError:
                pass
    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert overlaps == [] and not lock_path_for(target).exists()


def test_locked_takes_several_in_order_and_releases_all_on_failure(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    with acquire(b):
        with pytest.raises(OutputBusyError):
            with locked([b, a]):
                pass
        assert not lock_path_for(a).exists()  # a was taken first, then released


# ---- open-then-check ---------------------------------------------------------------------------------

def test_open_inside_refuses_links_and_non_regular_files(tmp_path):
    (tmp_path / "real").mkdir()
    (tmp_path / "real" / "f").write_text("x")
    (tmp_path / "link").symlink_to(tmp_path / "real")
    (tmp_path / "flink").symlink_to(tmp_path / "real" / "f")
    os.mkfifo(tmp_path / "fifo")
    with open_inside(tmp_path, "real/f") as f:
        assert f.read() == b"x"
    with pytest.raises(UnsafePathError, match="passes through symbolic link 'link'"):
        open_inside(tmp_path, "link/f")
    with pytest.raises(UnsafePathError, match="is a symbolic link"):
        open_inside(tmp_path, "flink")
    with pytest.raises(UnsafePathError, match="is not a regular file"):
        open_inside(tmp_path, "fifo")  # O_NONBLOCK: refused at once, never waits for a writer
    with pytest.raises(UnsafePathError, match="is not a regular file"):
        open_inside(tmp_path, "real")
    with pytest.raises(FileNotFoundError):
        open_inside(tmp_path, "real/missing")


def test_verify_never_reads_outside_when_a_file_becomes_a_link_after_the_check(release, monkeypatch):
    """The race: the pre-check sees a regular file, then it is swapped for a link to /dev/zero."""
    real_resolve = mv.resolve_inside
    swapped = []

    def resolve_then_swap(root, path):
        result = real_resolve(root, path)
        if path == "tiny-F32.gguf" and not swapped:
            target = Path(root) / path
            target.unlink()
            target.symlink_to("/dev/zero")
            swapped.append(path)
        return result
    monkeypatch.setattr(mv, "resolve_inside", resolve_then_swap)
    with pytest.raises(UnsafePathError, match=r"^unsafe path 'tiny-F32.gguf' in manifest: is a symbolic link$"):
        verify_release(release)
    assert swapped


def test_verify_reports_a_fifo_swapped_in_as_a_mismatch_without_blocking(release):
    (release / "README.md").unlink()
    os.mkfifo(release / "README.md")
    report = verify_release(release)
    check = report.file("README.md")
    assert (check.status, check.detail) == ("mismatch", "not a regular file")


def test_verify_cli_on_a_manifest_that_became_a_link_is_one_line(release, tmp_path):
    outside = tmp_path / "m.json"
    (release / MANIFEST_NAME).rename(outside)
    (release / MANIFEST_NAME).symlink_to(outside)
    r = verify_cli(release)
    assert r.exit_code == 1 and r.stderr == "Error: unsafe path 'manifest.json' in manifest: is a symbolic link\n"


# ---- resource limits on manifests ----------------------------------------------------------------

def _manifest_with_path(release: Path, path: str) -> None:
    doc = json.loads((release / MANIFEST_NAME).read_bytes())
    doc["artifacts"][2]["path"] = path
    (release / MANIFEST_NAME).write_text(json.dumps(doc))


def test_a_path_of_60000_components_is_refused_before_any_work_grows_with_it(release):
    path = "/".join(["a"] * 60_000)
    _manifest_with_path(release, path)
    r = verify_cli(release)
    assert r.exit_code == 1
    assert r.stderr == f"Error: unsafe path {path[:60] + '...'!r} in manifest: is 119999 bytes long; at most 4096 are allowed\n"
    deep = "/".join(["a"] * 100)
    _manifest_with_path(release, deep)
    r = verify_cli(release)
    assert r.exit_code == 1
    assert r.stderr == (f"Error: unsafe path {deep[:60] + '...'!r} in manifest: has 100 components; at most "
                        f"{MAX_DEPTH} are allowed\n")


@pytest.mark.parametrize(("path", "reason"), [
    ("x" * 300, "a component is 300 bytes long; at most 255 are allowed"),
    ("/".join(["ab"] * 2000), None),
])
def test_overlong_paths_are_refused(path, reason):
    with pytest.raises(UnsafePathError) as e:
        check_relative_path(path)
    if reason:
        assert e.value.reason == reason


def test_a_path_with_a_lone_surrogate_is_refused():
    with pytest.raises(UnsafePathError, match="is not valid UTF-8 text"):
        check_relative_path("a\ud800.gguf")


def test_a_sha256_with_a_trailing_newline_fails_the_schema(release):
    doc = json.loads((release / MANIFEST_NAME).read_bytes())
    doc["artifacts"][0]["sha256"] += "\n"
    with pytest.raises(SchemaError, match=r"artifacts\[0\]\.sha256: expected a string matching"):
        load_manifest(json.dumps(doc).encode())


@pytest.mark.parametrize(("text", "problem"), [
    ("[" * 100_000 + "]" * 100_000, "JSON nested too deeply"),
    ('{"version": ' + "1" * 5000 + "}", "not usable JSON: Exceeds the limit (4300 digits) for integer string "
                                        "conversion: value has 5000 digits"),
])
def test_hostile_json_is_one_line(release, text, problem):
    (release / MANIFEST_NAME).write_text(text)
    r = verify_cli(release)
    assert r.exit_code == 1 and r.stderr == f"Error: {release / MANIFEST_NAME}: {problem}\n"
