"""A hostile Hub (issue 26): one that never answers, answers 500 forever, sends one byte and hangs
up, trickles its body or its headers a byte at a time, sends a compression bomb, a huge
manifest.json or a list of millions of files. ``convert hf://``, ``inspect hf://`` and ``download``
each end in one ``Error:`` line, exit status 1, nothing under a final name.

Every case runs the CLI in a child process (tests/cli_child.py: a wall-clock timeout well above the
policy's worst case, a 2 GiB address-space cap) against the loopback emulator, with the deadlines
set short through the environment (:data:`POLICY`). The emulator's misbehaving answers give up by
themselves and when it stops. No timed assertions: the emulator's log shows how many attempts
each request got, which the policy fixes.
"""
from __future__ import annotations

import hashlib
import json
import pathlib
import socket
import struct

import numpy as np
import pytest
from cli_child import CHILD_TIMEOUT_S, child_error, run_child
from click.testing import CliRunner
from hub_emulator import HubEmulator, emulated_hub, gzip_bomb
from test_hub import make_release

from converter.cli import main
from converter.hub.client import MAX_SIBLINGS, MODEL_INFO_MAX_BYTES, SMALL_FILE_MAX_BYTES
from converter.hub.network import MIN_RATE_ENV, RETRIES_ENV, TIMEOUT_ENV, NetPolicy
from converter.hub.source import open_any_source
from converter.layout import FluxGeometry
from converter.synthetic import write_synthetic_flux
from manifests import CHECKSUMS_NAME, MANIFEST_NAME, verify_release
from manifests.hashing import is_partial_name

TOKEN = "hf_alice_write"
POLICY = NetPolicy(timeout=1.5, retries=2, min_rate=4000)  # 6000 bytes per 1.5 s window, 3 attempts
ATTEMPTS = POLICY.retries + 1
LIMITS = POLICY.describe()
TIMEOUT_S = CHILD_TIMEOUT_S + 4 * POLICY.worst_case_s()  # a few requests may each take the worst case
REASONS = {
    "silent": "no answer within 1.5 s",
    "500": "the Hub answered HTTP 500",
    "one_byte": "lost the connection mid-answer (RemoteProtocolError)",
    "trickle": f"fewer than {POLICY.window_bytes} bytes in 1.5 s",
    "trickle_headers": "no answer within 1.5 s",
    "connect": "no connection within 1.5 s",
}
BOMB = (b"{", b" " * (1 << 20), 4096, b"}")  # 4 GiB of JSON whitespace, about 4 MB on the wire
INDEX = "transformer/diffusion_pytorch_model.safetensors.index.json"


@pytest.fixture
def hub():
    hub = HubEmulator(tokens={TOKEN: "alice"}).start()
    try:
        yield hub
    finally:
        hub.stop()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> bytes:
    path = tmp_path_factory.mktemp("hostile-net") / "flux.safetensors"
    return write_synthetic_flux(path, FluxGeometry(double_blocks=1, single_blocks=1, hidden=128), dtype="BF16",
                                seed=7).read_bytes()


def flux_gguf(hub: HubEmulator | str, tmp_path: pathlib.Path, *args: object):
    env = {"HF_ENDPOINT": hub if isinstance(hub, str) else hub.url, "HF_HUB_DISABLE_XET": "1", "HF_HOME": str(tmp_path / "hf_home"),
           "HF_TOKEN": TOKEN, "NO_PROXY": "127.0.0.1", TIMEOUT_ENV: str(POLICY.timeout),
           RETRIES_ENV: str(POLICY.retries), MIN_RATE_ENV: str(POLICY.min_rate)}
    return run_child(*args, env=env, timeout=TIMEOUT_S)


def hostile(hub: HubEmulator, mode: str, path: str, skip: int = 0) -> None:
    if mode == "500":
        hub.fail(500, method="GET", path=path)
    else:
        hub.misbehave(mode, path=path, skip=skip)


def gave_up(what: str, mode: str, then: str) -> str:
    return f"{what}: {REASONS[mode]}; {ATTEMPTS} attempts in a row failed ({LIMITS}); {then}"


def finals(folder: pathlib.Path) -> list[str]:
    """What a failed run left under a final name (a resumable partial download is allowed)."""
    return sorted(p.name for p in folder.iterdir() if not is_partial_name(p.name)) if folder.exists() else []


def publish_release(hub: HubEmulator, root: pathlib.Path) -> str:
    files = {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}
    hub.put_files("alice/demo", {k: v for k, v in files.items() if k.endswith(".gguf")})
    return hub.put_files("alice/demo", {k: v for k, v in files.items() if not k.endswith(".gguf")}, lfs=False)


# ---- silent, failing, dropping and trickling Hubs ------------------------------------------------
@pytest.mark.parametrize("mode, command", [("silent", "inspect"), ("500", "download"), ("one_byte", "convert"),
                                           ("trickle", "download"), ("trickle_headers", "inspect")])
def test_a_bad_answer_to_the_file_list_is_one_line_after_the_policys_attempts(hub, checkpoint, tmp_path, mode,
                                                                              command):
    hub.put_files("alice/flux", {"flux.safetensors": checkpoint})
    publish_release(hub, make_release(tmp_path / "rel"))
    hostile(hub, mode, r"^/api/models/alice/(flux|demo)$")
    out = tmp_path / "out"
    if command == "download":
        proc = flux_gguf(hub, tmp_path, "download", "alice/demo", "-o", out)
        child_error(proc, gave_up("alice/demo@main: reading the file list", mode, "re-run later"))
    else:
        spec = "hf://alice/flux/flux.safetensors"
        extra = ("-o", out, "--variant", "Q8_0") if command == "convert" else ()
        proc = flux_gguf(hub, tmp_path, command, spec, *extra)
        child_error(proc, gave_up(f"{spec}: reading the file list of alice/flux", mode, "re-run later"))
    assert len(hub.requests("GET", "/api/models/")) == ATTEMPTS
    assert finals(out) == []


def test_a_hub_that_never_accepts_the_connection_is_one_line(checkpoint, tmp_path):
    """A listening socket whose backlog is full: the kernel drops further SYNs, so connecting hangs."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(0)
        port = server.getsockname()[1]
        queued = [socket.socket() for _ in range(3)]
        for s in queued:
            s.setblocking(False)
            s.connect_ex(("127.0.0.1", port))
        try:
            proc = flux_gguf(f"http://127.0.0.1:{port}", tmp_path, "inspect", "hf://alice/flux/flux.safetensors")
        finally:
            for s in queued:
                s.close()
    child_error(proc, gave_up("hf://alice/flux/flux.safetensors: reading the file list of alice/flux", "connect",
                              "re-run later"))


@pytest.mark.parametrize("mode, command, skip", [("silent", "convert", 0), ("500", "inspect", 0),
                                                 ("one_byte", "convert", 1), ("trickle", "convert", 1),
                                                 ("trickle_headers", "inspect", 0)])
def test_a_bad_answer_to_a_range_read_is_one_line_and_no_output(hub, checkpoint, tmp_path, mode, command, skip):
    """``skip=1``: the header arrives; the tensors' range (read by a worker thread) misbehaves."""
    commit = hub.put_files("alice/flux", {"flux.safetensors": checkpoint})
    hostile(hub, mode, r"/resolve/.*/flux\.safetensors$", skip)
    out = tmp_path / "out"
    extra = ("-o", out, "--variant", "Q8_0") if command == "convert" else ()
    proc = flux_gguf(hub, tmp_path, command, "hf://alice/flux/flux.safetensors", *extra)
    (header_len,) = struct.unpack("<Q", checkpoint[:8])
    start, end = (8 + header_len, len(checkpoint)) if skip else (0, min(len(checkpoint), 1 << 20))
    line = gave_up(f"hf://alice/flux@{commit[:12]}/flux.safetensors: reading bytes {start}-{end - 1}", mode,
                   "nothing was written: re-run")
    if skip:  # a tensor's bytes: the conversion names the output and the tensor (the file's first)
        header = json.loads(checkpoint[8:8 + header_len])
        first = min((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][0])
        line = f"{out / 'flux-Q8_0.gguf'} was not written: tensor {first}: {line}"
    child_error(proc, line)
    assert len(hub.requests("GET", "/resolve/")) == skip + ATTEMPTS
    assert finals(out) == []


@pytest.mark.parametrize("mode, target", [("one_byte", MANIFEST_NAME), ("silent", "demo-Q8_0.gguf"),
                                          ("trickle", "demo-Q8_0.gguf"), ("500", MANIFEST_NAME)])
def test_a_bad_answer_to_a_download_is_one_line_and_nothing_under_a_final_name(hub, tmp_path, mode, target):
    """Files verified before the failure stay (a re-run keeps them); the failed one and the
    release's records (written last) are not there."""
    rel = make_release(tmp_path / "rel", {"Q4_K_M": 3000, "Q8_0": 50_000})
    commit = publish_release(hub, rel)
    hostile(hub, mode, f"/resolve/[0-9a-f]+/{target}$")
    out = tmp_path / "out"
    proc = flux_gguf(hub, tmp_path, "download", "alice/demo", "-o", out)
    then = "re-run later" if target == MANIFEST_NAME else "re-run to resume"
    child_error(proc, gave_up(f"alice/demo@{commit[:12]}/{target}", mode, then))
    assert len(hub.requests("GET", f"/{target}")) == ATTEMPTS
    left = finals(out)
    assert not {target, MANIFEST_NAME, CHECKSUMS_NAME} & set(left)
    assert all((out / name).read_bytes() == (rel / name).read_bytes() for name in left)


def test_a_link_that_keeps_delivering_is_resumed_past_the_retry_count(hub, tmp_path):
    """Every answer is cut after one window's bytes: each attempt makes real progress, so the
    count restarts, and a file needing far more attempts than the policy's retries arrives whole."""
    rel = make_release(tmp_path / "rel", {"Q8_0": 60_000})
    publish_release(hub, rel)
    hub.drop_downloads(1, count=None, after_bytes=POLICY.window_bytes)
    out = tmp_path / "out"
    proc = flux_gguf(hub, tmp_path, "download", "alice/demo", "-o", out)
    assert proc.returncode == 0, proc.stderr
    assert verify_release(out).ok
    assert len(hub.requests("GET", "/demo-Q8_0.gguf")) >= 60_000 // POLICY.window_bytes > ATTEMPTS


# ---- bombs and huge answers -----------------------------------------------------------------------
def test_a_gzip_bomb_as_model_info_costs_at_most_the_cap(hub, checkpoint, tmp_path):
    hub.put_files("alice/flux", {"flux.safetensors": checkpoint})
    hub.answer_with(gzip_bomb(*BOMB), path=r"^/api/models/alice/flux$", headers={"Content-Encoding": "gzip"})
    spec = "hf://alice/flux/flux.safetensors"
    proc = flux_gguf(hub, tmp_path, "inspect", spec)
    child_error(proc, f"{spec}: reading the file list of alice/flux: the Hub's answer is larger than "
                      f"{MODEL_INFO_MAX_BYTES} bytes once decompressed, the most flux-gguf reads for it; refused")


def test_a_gzip_bomb_as_the_shard_index_costs_at_most_the_cap(hub, tmp_path):
    commit = hub.put_files("alice/fluxd", {INDEX: b'{"weight_map": {}}'}, lfs=False)
    hub.answer_with(gzip_bomb(*BOMB), path=r"/resolve/.*/diffusion_pytorch_model\.safetensors\.index\.json$",
                    headers={"Content-Encoding": "gzip"})
    out = tmp_path / "out"
    proc = flux_gguf(hub, tmp_path, "convert", "hf://alice/fluxd", "-o", out, "--variant", "Q8_0")
    child_error(proc, f"hf://alice/fluxd@{commit[:12]}/{INDEX}: the Hub's answer is larger than "
                      f"{SMALL_FILE_MAX_BYTES} bytes once decompressed, the most flux-gguf reads for it; refused")
    assert finals(out) == []


@pytest.mark.parametrize("encoding", ["gzip", "identity"])
def test_a_huge_manifest_is_refused_at_the_cap(hub, tmp_path, encoding):
    """A bomb is cut once it inflates past the cap; a plain huge one by its Content-Length, unread."""
    commit = publish_release(hub, make_release(tmp_path / "rel"))
    if encoding == "gzip":
        hub.answer_with(gzip_bomb(*BOMB), path=f"/{MANIFEST_NAME}$", headers={"Content-Encoding": "gzip"})
        detail = " once decompressed"
    else:
        body = b"{" + b" " * SMALL_FILE_MAX_BYTES + b"}"
        hub.answer_with(body, path=f"/{MANIFEST_NAME}$")
        detail = f" (Content-Length {len(body)})"
    out = tmp_path / "out"
    proc = flux_gguf(hub, tmp_path, "download", "alice/demo", "-o", out)
    child_error(proc, f"alice/demo@{commit[:12]}/{MANIFEST_NAME}: the Hub's answer is larger than "
                      f"{SMALL_FILE_MAX_BYTES} bytes{detail}, the most flux-gguf reads for it; refused")
    assert finals(out) == []


@pytest.mark.parametrize("files", [MAX_SIBLINGS + 1, 2_000_000])
def test_a_file_list_longer_than_the_limit_is_refused_as_it_streams(hub, tmp_path, files):
    """2,000,000 files (36 MB of JSON, sent gzipped) are refused at the 50,001st, before the size cap."""
    commit = publish_release(hub, make_release(tmp_path / "rel"))
    entry, per_unit = b'{"rfilename": "f"}', 50_000
    units, rest = divmod(files - 1, per_unit)
    prefix = b'{"id": "alice/demo", "sha": "%s", "siblings": [' % commit.encode()
    hub.answer_with(gzip_bomb(prefix, (entry + b",") * per_unit, units, (entry + b",") * rest + entry + b"]}"),
                    path=r"^/api/models/alice/demo$", headers={"Content-Encoding": "gzip"})
    out = tmp_path / "out"
    proc = flux_gguf(hub, tmp_path, "download", "alice/demo", "-o", out)
    child_error(proc, f"alice/demo@main: reading the file list: the Hub lists more than {MAX_SIBLINGS} files in "
                      "alice/demo, the most flux-gguf reads; refused")
    assert finals(out) == []


# ---- a large header, and the settings themselves ---------------------------------------------------
def _many_tensors(n: int) -> bytes:
    """A safetensors file of ``n`` two-element BF16 tensors (a 1.7 MB header: more than one probe)."""
    header = {f"blocks.{i}.padding_to_make_the_header_long": {"dtype": "BF16", "shape": [2],
                                                              "data_offsets": [4 * i, 4 * i + 4]} for i in range(n)}
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    data = np.random.default_rng(3).integers(0, 1 << 16, 2 * n, dtype=np.uint16).tobytes()
    return struct.pack("<Q", len(blob)) + blob + data


def test_a_header_of_16384_tensors_inspects_from_the_hub(hub, tmp_path):
    hub.put_files("alice/big", {"big.safetensors": _many_tensors(16384)})
    proc = flux_gguf(hub, tmp_path, "inspect", "hf://alice/big/big.safetensors", "--json")
    assert proc.returncode == 0, proc.stderr
    assert len(json.loads(proc.stdout)["tensors"]) == 16384


def test_16384_tensors_stream_from_the_hub_each_looked_at_once(monkeypatch, tmp_path):
    """Every tensor read in file order, byte for byte; the pass-over bookkeeping was once a scan of
    all tensors per read (quadratic: seconds at this count, minutes at a few times more)."""
    data = _many_tensors(16384)
    with emulated_hub(monkeypatch, tmp_path / "hf_home", {TOKEN: "alice"}, TOKEN) as hub_:
        hub_.put_files("alice/big", {"big.safetensors": data})
        with open_any_source("hf://alice/big/big.safetensors") as source:
            names = source.read_order(list(source.tensors))
            got = bytearray()
            for name in names:
                out = np.empty(source.tensors[name].shape, dtype=np.uint16)
                source.read_raw_into(name, out)
                got += out.tobytes()
            source.check_complete()
    (header_len,) = struct.unpack("<Q", data[:8])
    assert hashlib.sha256(got).digest() == hashlib.sha256(data[8 + header_len:]).digest()


@pytest.mark.parametrize("name, value, expected", [
    (TIMEOUT_ENV, "soon", "a number of seconds from 0.01 to 3600.0 (default 15.0)"),
    (TIMEOUT_ENV, "0", "a number of seconds from 0.01 to 3600.0 (default 15.0)"),
    (TIMEOUT_ENV, "nan", "a number of seconds from 0.01 to 3600.0 (default 15.0)"),
    (RETRIES_ENV, "-1", "a whole number of retries from 0 to 100 (default 5)"),
    (RETRIES_ENV, "2.5", "a whole number of retries from 0 to 100 (default 5)"),
    (MIN_RATE_ENV, "10kB", "a whole number of bytes per second from 0 to 10000000000 (default 10000)"),
])
def test_a_bad_setting_is_one_line_before_any_request(monkeypatch, tmp_path, name, value, expected):
    with emulated_hub(monkeypatch, tmp_path / "hf_home", {TOKEN: "alice"}, TOKEN) as hub_:
        monkeypatch.setenv(name, value)
        for args in (["inspect", "hf://alice/flux/flux.safetensors"], ["download", "alice/demo", "-o", tmp_path / "o"]):
            result = CliRunner().invoke(main, [str(a) for a in args])
            assert result.exit_code == 1 and result.stdout == ""
            assert result.stderr == f"Error: {name}={value!r}: expected {expected}\n"
        assert hub_.log == []
    assert not (tmp_path / "o").exists()
