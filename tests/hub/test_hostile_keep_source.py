"""``convert hf://... --keep-source DIR`` against planted files, a user's own files and a full disk
(issues 26 and 28), with the Hub emulator and the real client.

The kept copy is written under a hidden name unique to the run and renamed only once its sha256
matched the Hub's: a link or a file of the user's under any name is never opened, a file already
under the final name is refused before any download (unless it holds the Hub's bytes, or --force),
and a write that stores less than asked fails the run instead of leaving zeros in a kept file.
"""
from __future__ import annotations

import errno
import hashlib
import os
import pathlib

import pytest
from test_hub_source import (  # noqa: F401  (emulator and checkpoints are fixtures)
    _publish_file,
    _publish_folder,
    checkpoints,
    emulator,
    error_line,
    run,
)

from converter.hub.source import open_any_source
from manifests.hashing import PARTIAL_MARK

SPEC = "hf://alice/flux/flux.safetensors"


def _files(folder: pathlib.Path) -> list[str]:
    """Every entry under ``folder`` (links and hidden names included), relative, sorted."""
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*"))


def _convert(out: pathlib.Path, keep: pathlib.Path, *extra: object):
    return run("convert", SPEC, "-o", out, "--variant", "Q8_0", "--keep-source", keep, *extra)


def _downloads(emulator) -> int:  # noqa: F811
    return len(emulator.requests("GET", "/resolve/"))


def _at(emulator) -> str:  # noqa: F811
    return f"alice/flux at main (commit {emulator.repos['alice/flux'].refs['main'][:12]})"


# ---- names planted beside the kept file --------------------------------------------------------
@pytest.mark.parametrize("planted", ["flux.safetensors.partial", ".flux.safetensors" + PARTIAL_MARK])
def test_a_link_planted_at_a_partial_name_is_never_followed(emulator, checkpoints, tmp_path, planted):  # noqa: F811
    _publish_file(emulator, "alice/flux", "flux.safetensors", checkpoints["single"])
    keep, victim = tmp_path / "kept", tmp_path / "victim.txt"
    keep.mkdir()
    victim.write_bytes(b"any file the user can write")
    (keep / planted).symlink_to(victim)
    result = _convert(tmp_path / "out", keep)
    assert result.exit_code == 0, result.output
    assert victim.read_bytes() == b"any file the user can write"
    assert os.readlink(keep / planted) == str(victim)
    assert _files(keep) == sorted(["flux.safetensors", planted])
    assert (keep / "flux.safetensors").read_bytes() == checkpoints["single"].read_bytes()


def test_a_users_own_partial_file_survives_a_sha256_mismatch(emulator, checkpoints, tmp_path):  # noqa: F811
    _publish_file(emulator, "alice/flux", "flux.safetensors", checkpoints["single"])
    emulator.misreport_sha256("alice/flux", "flux.safetensors")
    keep, out = tmp_path / "kept", tmp_path / "out"
    keep.mkdir()
    (keep / "flux.safetensors.partial").write_bytes(b"my half-copied checkpoint")
    result = _convert(out, keep)
    line = error_line(result)
    assert "hf://alice/flux@" in line and "Hub reports" in line
    assert _files(keep) == ["flux.safetensors.partial"]  # nothing under the final name, no partial of ours
    assert (keep / "flux.safetensors.partial").read_bytes() == b"my half-copied checkpoint"
    assert list(out.iterdir()) == []


# ---- a file already under the final name -------------------------------------------------------
@pytest.mark.parametrize("kind", ["file", "hard link"])
def test_a_file_already_kept_with_other_bytes_is_refused_before_any_download(emulator, checkpoints, tmp_path,  # noqa: F811
                                                                            kind):
    _publish_file(emulator, "alice/flux", "flux.safetensors", checkpoints["single"])
    keep, out, mine = tmp_path / "kept", tmp_path / "out", tmp_path / "mine.safetensors"
    keep.mkdir()
    mine.write_bytes(b"the user's own weights")
    if kind == "file":
        (keep / "flux.safetensors").write_bytes(mine.read_bytes())
    else:
        os.link(mine, keep / "flux.safetensors")
    result = _convert(out, keep)
    assert error_line(result) == (
        f"Error: {keep / 'flux.safetensors'}: already there with other content than flux.safetensors of "
        f"{_at(emulator)}; --keep-source never overwrites a file it did not write: move it away, or pass "
        "--force to replace it")
    assert _downloads(emulator) == 0
    assert (keep / "flux.safetensors").read_bytes() == mine.read_bytes() == b"the user's own weights"
    assert _files(keep) == ["flux.safetensors"] and not out.exists()

    result = _convert(out, keep, "--force")  # replaced, by a rename: a linked file keeps its bytes
    assert result.exit_code == 0, result.output
    assert (keep / "flux.safetensors").read_bytes() == checkpoints["single"].read_bytes()
    assert mine.read_bytes() == b"the user's own weights"
    assert _files(keep) == ["flux.safetensors"]


def test_a_file_already_kept_with_the_hubs_bytes_is_left_as_is(emulator, checkpoints, tmp_path):  # noqa: F811
    _publish_file(emulator, "alice/flux", "flux.safetensors", checkpoints["single"])
    keep = tmp_path / "kept"
    keep.mkdir()
    (keep / "flux.safetensors").write_bytes(checkpoints["single"].read_bytes())
    os.utime(keep / "flux.safetensors", ns=(1_000_000_000, 1_000_000_000))
    before = os.stat(keep / "flux.safetensors")
    result = _convert(tmp_path / "out", keep)
    assert result.exit_code == 0, result.output
    now = os.stat(keep / "flux.safetensors")
    assert (now.st_ino, now.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)  # never rewritten
    assert _files(keep) == ["flux.safetensors"]


@pytest.mark.parametrize("force", [False, True])
def test_a_link_at_the_final_name_is_refused_even_with_force(emulator, checkpoints, tmp_path, force):  # noqa: F811
    _publish_file(emulator, "alice/flux", "flux.safetensors", checkpoints["single"])
    keep, victim = tmp_path / "kept", tmp_path / "victim.txt"
    keep.mkdir()
    victim.write_bytes(b"not yours")
    (keep / "flux.safetensors").symlink_to(victim)
    result = _convert(tmp_path / "out", keep, *(["--force"] if force else []))
    assert error_line(result) == (f"Error: {keep / 'flux.safetensors'}: is a symbolic link; --keep-source never "
                                  "writes through or replaces it: move it away and re-run")
    assert _downloads(emulator) == 0
    assert victim.read_bytes() == b"not yours" and os.readlink(keep / "flux.safetensors") == str(victim)
    assert _files(keep) == ["flux.safetensors"]


def test_a_folder_of_the_repo_that_is_a_link_under_dir_gets_no_byte(emulator, checkpoints, tmp_path):  # noqa: F811
    _publish_folder(emulator, "alice/fluxd", checkpoints["folder"])
    keep, outside = tmp_path / "kept", tmp_path / "outside"
    keep.mkdir()
    outside.mkdir()
    (keep / "transformer").symlink_to(outside)
    result = run("convert", "hf://alice/fluxd", "-o", tmp_path / "out", "--variant", "Q8_0", "--keep-source", keep)
    shard = sorted(p.name for p in checkpoints["folder"].glob("*.safetensors"))[0]
    assert error_line(result) == (f"Error: {keep / 'transformer' / shard}: passes through symbolic link "
                                  "'transformer'; --keep-source never writes through a symbolic link")
    assert list(outside.iterdir()) == []


def test_force_needs_keep_source(emulator, checkpoints, tmp_path):  # noqa: F811
    _publish_file(emulator, "alice/flux", "flux.safetensors", checkpoints["single"])
    result = run("convert", SPEC, "-o", tmp_path / "out", "--variant", "Q8_0", "--force")
    assert error_line(result) == ("Error: --force only applies with --keep-source DIR (it replaces files already "
                                  "under DIR)")
    assert _downloads(emulator) == 0


# ---- writes that store less than asked ---------------------------------------------------------
def _kept_fd(fd: int, keep: pathlib.Path) -> bool:
    try:
        return os.readlink(f"/proc/self/fd/{fd}").startswith(str(keep) + "/")
    except OSError:
        return False


def _filling_disk(monkeypatch, keep: pathlib.Path, room: int | None, per_call: int) -> None:
    """os.pwrite as on a disk with ``room`` bytes left (None: unlimited) for the kept files: each
    call stores at most ``per_call`` bytes, the one reaching the end of the room stores what fits
    (a short write), and the next fails with ENOSPC. Other files are written as usual."""
    real, left = os.pwrite, [room]

    def pwrite(fd, data, offset):
        if not _kept_fd(fd, keep):
            return real(fd, data, offset)
        n = min(len(memoryview(data).cast("B")), per_call)
        if left[0] is not None:
            if left[0] == 0:
                raise OSError(errno.ENOSPC, "No space left on device")
            n = min(n, left[0])
            left[0] -= n
        return real(fd, memoryview(data).cast("B")[:n], offset)
    monkeypatch.setattr(os, "pwrite", pwrite)


def test_a_disk_that_fills_fails_the_run_and_keeps_nothing(emulator, checkpoints, tmp_path, monkeypatch):  # noqa: F811
    """The kept file must never get its final name with the bytes a full disk did not store."""
    _publish_file(emulator, "alice/flux", "flux.safetensors", checkpoints["single"])
    keep, out = tmp_path / "kept", tmp_path / "out"
    keep.mkdir()
    (keep / "notes.txt").write_bytes(b"mine")
    _filling_disk(monkeypatch, keep, room=100_000, per_call=1 << 30)
    result = _convert(out, keep)
    # The tensor being read when the write failed fails its outputs, which name it and the kept file.
    line = error_line(result)
    assert line.startswith(f"Error: {out / 'flux-Q8_0.gguf'} was not written: tensor ")
    assert line.endswith(f": {keep / 'flux.safetensors'}: disk full while keeping the source (--keep-source): "
                         "No space left on device; nothing was kept")
    assert _files(keep) == ["notes.txt"] and (keep / "notes.txt").read_bytes() == b"mine"
    assert list(out.iterdir()) == []


def test_short_writes_are_completed_and_the_kept_copy_is_exact(emulator, checkpoints, tmp_path, monkeypatch):  # noqa: F811
    _publish_file(emulator, "alice/flux", "flux.safetensors", checkpoints["single"])
    keep = tmp_path / "kept"
    _filling_disk(monkeypatch, keep.resolve(), room=None, per_call=4093)  # every write short, none failing
    result = _convert(tmp_path / "out", keep)
    assert result.exit_code == 0, result.output
    kept = (keep / "flux.safetensors").read_bytes()
    assert hashlib.sha256(kept).digest() == hashlib.sha256(checkpoints["single"].read_bytes()).digest()
    assert _files(keep) == ["flux.safetensors"]


def test_a_write_that_stores_nothing_fails_instead_of_spinning(emulator, checkpoints, tmp_path, monkeypatch):  # noqa: F811
    _publish_file(emulator, "alice/flux", "flux.safetensors", checkpoints["single"])
    keep, out = tmp_path / "kept", tmp_path / "out"
    keep.mkdir()
    real = os.pwrite
    monkeypatch.setattr(os, "pwrite", lambda fd, data, offset: 0 if _kept_fd(fd, keep) else real(fd, data, offset))
    result = _convert(out, keep)  # the header's bytes are the first written: it fails at once
    assert error_line(result) == (f"Error: {keep / 'flux.safetensors'}: cannot keep the source (--keep-source): "
                                  "the write stored nothing; nothing was kept")
    assert _files(keep) == [] and not out.exists()


# ---- Ctrl-C ------------------------------------------------------------------------------------
def test_an_interrupted_conversion_removes_only_its_own_partial(emulator, checkpoints, tmp_path):  # noqa: F811
    _publish_file(emulator, "alice/flux", "flux.safetensors", checkpoints["single"])
    keep = tmp_path / "kept"
    keep.mkdir()
    (keep / "flux.safetensors.partial").write_bytes(b"mine")
    with pytest.raises(KeyboardInterrupt), open_any_source(SPEC, keep_source=keep) as source:
        for i, name in enumerate(source.read_order(list(source.tensors))):
            source.read(name)
            if i == 3:
                ours = [n for n in _files(keep) if n.endswith(PARTIAL_MARK)]
                assert len(ours) == 1 and ours[0].startswith(".flux.safetensors.")  # hidden, unique
                raise KeyboardInterrupt
    assert _files(keep) == ["flux.safetensors.partial"]
    assert (keep / "flux.safetensors.partial").read_bytes() == b"mine"
