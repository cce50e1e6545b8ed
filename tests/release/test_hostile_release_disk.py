"""``release build`` on a disk that fills up or fails while the release is written (issue 27).

Every file a build writes goes through one of a few write sites: the GGUF writer (its buffered
header, its positioned tensor writes, their direct-I/O variant), ``write_bytes_atomic`` (README.md,
manifest.json, SHA256SUMS, model.sig), ``copy_file_hashed`` (extra files, the validation report),
the LoRA side-car export, and the fsync of the finished folder. Each case here makes one site fail
and checks the whole command: one ``Error:`` line naming the file, exit status 1, nothing on
stdout, and nothing left beside the output folder (no release, no partial folder, no lock).

No mount is needed. The failures are the kernel's own: a child process lowers RLIMIT_FSIZE (with
SIGXFSZ ignored) when the chosen file is opened or the chosen tensor is about to be written, so its
next ``write``/``pwrite`` stores only the bytes below the limit (a short count, as on a disk that
fills mid-write) and the one after fails with EFBIG. ENOSPC itself, which no limit produces, is
injected at ``os.pwrite`` (a short count, then ENOSPC), and an I/O error at the folder's fsync.
Direct I/O: with ``FLUX_GGUF_DIRECT_IO=on`` the writer's O_DIRECT descriptor is a plain second
descriptor (whatever the test machine's file system allows), and every tensor of 4 KiB or more
takes the direct path, so its short-count handling is what runs; the child reports that it did.
"""
from __future__ import annotations

import json
import os
import re
import resource
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from lora_fixtures import make_truth, write_diffusers

import quant_kernels
from converter.layout import FluxGeometry
from converter.release.build import build_release
from converter.release.signing import signing_request
from converter.synthetic import write_synthetic_flux
from manifests import verify_release

GEO = FluxGeometry(double_blocks=1, single_blocks=1, hidden=256)
CHILD_TIMEOUT_S = 180  # a loaded 2-core box needs several seconds to import numba and convert
MEMORY_LIMIT = 2 << 30
SPEC = """\
name = "tiny"
source = "weights/tiny.safetensors"
base_model = "black-forest-labs/FLUX.1-Kontext-dev"
variants = ["Q8_0"]
extra_files = ["LICENSE.md"]
validation = "validation.json"

[[lora]]
path = "loras/style.safetensors"
name = "style"
strength = 0.8
mode = "sidecar"
dtype = "F16"

[card]
license = "apache-2.0"
"""

# The child: arm one fault, then run the CLI. Notes (which paths ran) go to a file written at exit,
# after the file-size limit is lifted again.
DRIVER = r"""
import atexit, errno, json, os, resource, signal, stat, sys, threading
from pathlib import Path

site, target, notes_path, *cli_args = sys.argv[1:]
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # past RLIMIT_FSIZE a write fails with EFBIG instead
_, HARD = resource.getrlimit(resource.RLIMIT_FSIZE)
notes, lock = [], threading.Lock()

def limit_file_size(nbytes):
    resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, HARD))

def write_notes():
    resource.setrlimit(resource.RLIMIT_FSIZE, (HARD, HARD))
    Path(notes_path).write_text(json.dumps(notes))

atexit.register(write_notes)

import manifests.hashing as hashing
import converter.direct_io as direct_io
import converter.lora.export as export
import converter.writer as writer

if site == "open":  # the first write to TARGET stores 16 bytes, the next fails
    real_open = hashing.open_partial
    def open_partial(path, *args, **kwargs):
        f = real_open(path, *args, **kwargs)
        if Path(path).name.startswith("." + target + "."):
            notes.append("opened " + target)
            limit_file_size(16)
        return f
    for module in (hashing, writer, export):
        module.open_partial = open_partial

if site in ("tensor", "enospc"):  # the first tensor of 16 KiB or more written to TARGET stores half, then fails
    if direct_io.mode() == "on":
        direct_io.open_direct = lambda path, flags: os.open(path, flags | os.O_CLOEXEC)
        direct_io.DIRECT_MIN_BYTES = 4096
    real_write_at, real_pwrite_direct = writer.GGUFStreamWriter.write_at, writer._pwrite_direct
    armed = []
    def write_at(self, offset, data):
        n = memoryview(data).nbytes
        with lock:
            if self.path.name == target and n >= 16384 and not armed:
                armed.extend([offset + n // 2 + 7, offset + n])  # odd: a direct write's short count leaves a misaligned rest
                notes.append("armed")
                if site == "tensor":
                    limit_file_size(armed[0])
        return real_write_at(self, offset, data)
    def pwrite_direct(fd, dfd, buf, offset):
        with lock:
            notes.append("direct")
        return real_pwrite_direct(fd, dfd, buf, offset)
    writer.GGUFStreamWriter.write_at = write_at
    writer._pwrite_direct = pwrite_direct

if site == "enospc":
    real_pwrite = os.pwrite
    def pwrite(fd, data, offset):  # the armed tensor's second half finds the disk full
        if armed and offset < armed[1] and offset + memoryview(data).nbytes > armed[0]:
            if offset < armed[0]:
                with lock:
                    notes.append("short")
                return real_pwrite(fd, memoryview(data)[:armed[0] - offset], offset)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_pwrite(fd, data, offset)
    os.pwrite = pwrite

if site == "fsync":  # fsync of the folder TARGET names fails with EIO
    real_fsync = os.fsync
    def fsync(fd):
        where = os.readlink(f"/proc/self/fd/{fd}")
        if stat.S_ISDIR(os.fstat(fd).st_mode) and (where == target or target == "partial" and where.endswith(".flux-gguf.partial")):
            notes.append("fsync " + target)
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        return real_fsync(fd)
    os.fsync = fsync

from converter.cli import main
sys.argv = ["flux-gguf", *cli_args]
main()
"""

PARTIAL = r"\.out\.\d+-[0-9a-f]{12}\.flux-gguf\.partial"


def _compile_quietly(types, *, imatrix: bool = False, sources=()) -> None:
    """Compile (and cache) the kernels the build needs here, so no child prints that it compiles."""
    for name in quant_kernels.uncompiled_kernels(list(types), imatrix=imatrix, sources=list(sources)):
        quant_kernels.compile_kernel(name)


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    """A spec with every kind of file a build writes, and a key; built once here, so it is known to build."""
    root = tmp_path_factory.mktemp("disk")
    (root / "weights").mkdir()
    (root / "loras").mkdir()
    write_synthetic_flux(root / "weights" / "tiny.safetensors", GEO, seed=4)
    write_diffusers(root / "loras" / "style.safetensors", make_truth(GEO, seed=2))
    (root / "LICENSE.md").write_text("test licence\n" * 200)
    (root / "validation.json").write_text(json.dumps({"variants": {"Q8_0": {"cosine": 0.999, "psnr": 40.0}}}))
    (root / "release.toml").write_text(SPEC)
    key = ec.generate_private_key(ec.SECP256R1())
    (root / "key.pem").write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                     serialization.NoEncryption()))
    good = root / "good" / "out"
    build_release(root / "release.toml", good, sign=signing_request(key=root / "key.pem"),
                  before_quantize=_compile_quietly)
    assert verify_release(good, ignore=("model.sig",)).ok
    assert sorted(p.name for p in good.iterdir()) == ["LICENSE.md", "README.md", "SHA256SUMS", "manifest.json",
                                                      "model.sig", "tiny-Q8_0.gguf", "tiny-lora-style.safetensors",
                                                      "validation.json"]
    return root


def _limit_memory() -> None:  # runs in the child before exec
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))


def build_with_fault(project: Path, tmp_path: Path, site: str, target: str, direct: str = "auto"):
    """``release build`` (signed) in a child with one fault armed; returns (process, notes, the output's parent)."""
    releases = tmp_path / "releases"
    releases.mkdir()
    target = os.path.realpath(releases) if target == "parent" else target
    notes = tmp_path / "notes.json"
    env = dict(os.environ, FLUX_GGUF_DIRECT_IO=direct,
               PYTHONPATH=os.pathsep.join([str(Path(__file__).parents[2]), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-c", DRIVER, site, target, str(notes),
                           "release", "build", str(project / "release.toml"), "-o", str(releases / "out"),
                           "--sign-key", str(project / "key.pem")],
                          capture_output=True, text=True, timeout=CHILD_TIMEOUT_S, env=env, preexec_fn=_limit_memory)
    return proc, json.loads(notes.read_text()), releases


def assert_failed_cleanly(proc: subprocess.CompletedProcess, releases: Path, line: str) -> None:
    """Exit 1, one ``Error:`` line matching ``line`` (a regular expression), nothing beside the output."""
    assert proc.returncode == 1, proc.stderr
    assert proc.stdout == ""
    assert re.fullmatch(f"Error: {line}\n", proc.stderr), proc.stderr
    assert sorted(os.listdir(releases)) == []  # no release, no partial folder, no lock file


@pytest.mark.parametrize("name, line", [
    ("tiny-Q8_0.gguf", "{partial}/tiny-Q8_0\\.gguf was not written: File too large"),
    ("LICENSE.md", "{out} was not written: cannot copy {project}/LICENSE\\.md to {partial}/LICENSE\\.md: File too large"),
    ("validation.json", ("{out} was not written: cannot copy {project}/validation\\.json to {partial}/validation\\.json: "
                         "File too large")),
    ("tiny-lora-style.safetensors", "cannot write LoRA side-car {partial}/tiny-lora-style\\.safetensors: File too large"),
    ("README.md", "{out} was not written: cannot write {partial}/README\\.md: File too large"),
    ("manifest.json", "{out} was not written: cannot write {partial}/manifest\\.json: File too large"),
    ("SHA256SUMS", "{out} was not written: cannot write {partial}/SHA256SUMS: File too large"),
    ("model.sig", "{partial}/model\\.sig was not written: File too large"),
])
def test_a_file_that_cannot_be_written_whole_fails_the_build(project, tmp_path, name, line):
    proc, notes, releases = build_with_fault(project, tmp_path, "open", name)
    assert notes == [f"opened {name}"]
    where = {"out": re.escape(str(releases / "out")), "partial": re.escape(str(releases)) + "/" + PARTIAL,
             "project": re.escape(str(project))}
    assert_failed_cleanly(proc, releases, line.format(**where))


@pytest.mark.parametrize("direct", ["on", "off"])
@pytest.mark.parametrize("site, reason", [("tensor", "was not written: File too large"),
                                          ("enospc", "disk full while writing")])
def test_a_tensor_write_cut_short_fails_the_build(project, tmp_path, site, reason, direct):
    proc, notes, releases = build_with_fault(project, tmp_path, site, "tiny-Q8_0.gguf", direct)
    assert "armed" in notes and ("direct" in notes) == (direct == "on")
    if site == "enospc":
        assert "short" in notes  # the short count came first, then ENOSPC
    gguf = re.escape(str(releases)) + "/" + PARTIAL + "/tiny-Q8_0\\.gguf"
    line = f"disk full while writing {gguf}" if site == "enospc" else f"{gguf} {reason}"
    assert_failed_cleanly(proc, releases, line)


@pytest.mark.parametrize("folder", ["partial", "parent"])
def test_a_folder_sync_that_fails_fails_the_build(project, tmp_path, folder):
    """The finished folder's fsync (its files' names on disk) and the parent's after the rename (the
    release's own name): an I/O error in either is the build's, and the renamed folder is taken back."""
    proc, notes, releases = build_with_fault(project, tmp_path, "fsync", folder)
    out, partial = re.escape(str(releases / "out")), re.escape(str(releases)) + "/" + PARTIAL
    doing = f"sync {partial}" if folder == "partial" else f"move {partial} into place"
    assert notes[-1] == f"fsync {os.path.realpath(releases) if folder == 'parent' else 'partial'}"
    assert_failed_cleanly(proc, releases, f"{out} was not written: cannot {doing}: Input/output error")
