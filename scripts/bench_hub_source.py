#!/usr/bin/env python
"""Converting from the Hub vs downloading and vs converting a local copy, over a throttled loopback link.

Target (issue 16): the wall time of ``flux-gguf convert hf://...`` stays within 1.1x of
max(download time, local convert time) at a given bandwidth. This script measures the three:

1. generates a synthetic FLUX.1-layout checkpoint (made-up weights; ``--hidden``/``--double``/
   ``--single`` set its size; ``--order sorted`` re-saves it with safetensors, tensors sorted by
   name as real checkpoints are, instead of the converter's read order);
2. serves it from ``tests/hub_emulator.py`` in a child process, every file body throttled to
   ``--bandwidth`` MB/s (one link shared by all connections);
3. times, each in its own child process: a plain download of the file over that link (one GET,
   bytes hashed and dropped), ``flux-gguf convert LOCAL``, and ``flux-gguf convert hf://...``;
   checks that both conversions give the same tensor bytes; reports the ratio.

    python scripts/bench_hub_source.py --work bench-out/hub --bandwidth 100 --bandwidth 200
    python scripts/bench_hub_source.py --work bench-out/hub --order sorted --json bench-out/hub.json

Uses a test helper (the loopback Hub emulator); nothing here reaches the network.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import pathlib
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
TOKEN = "hf_bench_token"
REPO = "bench/flux"
FILE = "flux.safetensors"
MB = 1e6


def serve(path: pathlib.Path, bandwidth: float, port_file: pathlib.Path) -> None:
    """Child mode: an emulator holding ``path`` as REPO/FILE, throttled; runs until killed."""
    sys.path.insert(0, str(ROOT / "tests"))
    from hub_emulator import HubEmulator

    hub = HubEmulator(tokens={TOKEN: "bench"}).start()
    hub.put_files(REPO, {FILE: path.read_bytes()})
    hub.throttle(bandwidth)

    def report(*_: object) -> None:  # bytes of file bodies sent, for the parent to read
        port_file.with_suffix(".bytes").write_text(str(sum(r.nbytes for r in hub.requests("GET", "/resolve/"))))
        sys.exit(0)

    signal.signal(signal.SIGTERM, report)
    port_file.write_text(hub.url)
    while True:
        time.sleep(3600)


def _env(url: str, home: pathlib.Path) -> dict[str, str]:
    env = dict(os.environ, HF_ENDPOINT=url, HF_HUB_DISABLE_XET="1", HF_TOKEN=TOKEN, HF_HOME=str(home),
               HF_HUB_DISABLE_TELEMETRY="1", PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return env


def _timed(cmd: list[str], env: dict[str, str]) -> tuple[float, str]:
    """Wall seconds and stdout of a child process."""
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(f"bench: {' '.join(cmd)} failed:\n{proc.stderr[-2000:]}")
    return wall, proc.stdout


DOWNLOAD = """
import hashlib, sys, time
from huggingface_hub.utils import httpx
url, token = sys.argv[1], sys.argv[2]
h, n = hashlib.sha256(), 0
with httpx.stream("GET", url, headers={"Authorization": f"Bearer {token}", "Accept-Encoding": "identity"},
                  timeout=600) as r:
    r.raise_for_status()
    for chunk in r.iter_raw():
        h.update(chunk); n += len(chunk)
print(n, h.hexdigest())
"""


def tensor_digests(doc: dict) -> list[list[tuple[str, str]]]:
    return [[(t["name"], t["sha256"]) for t in a["tensors"]] for a in doc["artifacts"]]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=pathlib.Path, required=True)
    ap.add_argument("--bandwidth", type=float, action="append", help="MB/s of the emulated link; repeatable")
    ap.add_argument("--variant", default="Q4_K_M")
    ap.add_argument("--hidden", type=int, default=3072)
    ap.add_argument("--double", type=int, default=2)
    ap.add_argument("--single", type=int, default=2)
    ap.add_argument("--order", choices=["bfl", "sorted"], default="bfl")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", type=pathlib.Path, default=None)
    ap.add_argument("--serve", type=pathlib.Path, help=argparse.SUPPRESS)
    ap.add_argument("--port-file", type=pathlib.Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve:
        return serve(args.serve, args.bandwidth[0] * MB, args.port_file)

    from converter.layout import FluxGeometry
    from converter.synthetic import write_synthetic_flux

    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    geo = FluxGeometry(double_blocks=args.double, single_blocks=args.single, hidden=args.hidden)
    src = work / f"flux-{args.hidden}-{args.double}-{args.single}-{args.order}.safetensors"
    if not src.exists():
        plain = write_synthetic_flux(work / "plain.safetensors", geo, dtype="BF16", seed=0)
        if args.order == "sorted":
            from safetensors.torch import load_file, save_file
            save_file(load_file(plain), src)
            plain.unlink()
        else:
            plain.rename(src)
    size = src.stat().st_size
    sha = hashlib.sha256(src.read_bytes()).hexdigest()
    threads = ["--threads", str(args.threads)] if args.threads else []
    py = sys.executable
    cli = [py, "-m", "converter.cli"] if (ROOT / "converter" / "cli" / "__main__.py").exists() else ["flux-gguf"]

    home = pathlib.Path(tempfile.mkdtemp(prefix="bench-hf-home-"))
    out = work / "out"
    shutil.rmtree(out, ignore_errors=True)
    env0 = _env("http://127.0.0.1:1", home)
    local_runs = []
    for _ in range(2):  # the first run may fill the page cache / numba cache: the better of two counts
        wall, local_out = _timed([*cli, "convert", str(src), "-o", str(out / "local"), "--variant",
                                  args.variant, "--json", *threads], env0)
        local_runs.append(wall)
        shutil.rmtree(out / "local")
    local_wall = min(local_runs)
    local_doc = json.loads(local_out)
    rows = []
    for bw in args.bandwidth or [200.0]:
        port_file = work / "emulator-url"
        port_file.unlink(missing_ok=True)
        server = subprocess.Popen([py, __file__, "--work", str(work), "--serve", str(src), "--bandwidth", str(bw),
                                   "--port-file", str(port_file)])
        try:
            while not port_file.exists():
                if server.poll() is not None:
                    sys.exit("bench: the emulator did not start")
                time.sleep(0.1)
            time.sleep(0.2)
            url = port_file.read_text()
            env = _env(url, home)
            dl_wall, dl_out = _timed([py, "-c", DOWNLOAD, f"{url}/{REPO}/resolve/main/{FILE}", TOKEN], env)
            n, got = dl_out.split()
            assert int(n) == size and got == sha, "the download does not match the file"
            remote_wall, remote_out = _timed([*cli, "convert", f"hf://{REPO}/{FILE}", "-o", str(out / "remote"),
                                                    "--variant", args.variant, "--json", *threads], env)
            same = tensor_digests(json.loads(remote_out)) == tensor_digests(local_doc)
            shutil.rmtree(out / "remote")
        finally:
            server.terminate()
            server.wait()
        served = int(port_file.with_suffix(".bytes").read_text()) - size  # minus the plain download
        bound = max(dl_wall, local_wall)
        rows.append({"bandwidth_MBps": bw, "download_s": round(dl_wall, 2), "local_convert_s": round(local_wall, 2),
                     "hub_convert_s": round(remote_wall, 2), "ratio_to_max": round(remote_wall / bound, 3),
                     "identical_tensors": same, "hub_bytes_over_file_size": round(served / size, 3)})
    shutil.rmtree(home, ignore_errors=True)
    doc = {"machine": f"{platform.machine()} {os.cpu_count()} cores, Python {platform.python_version()}",
           "source": {"bytes": size, "order": args.order, "geometry": [args.hidden, args.double, args.single],
                      "weights": "synthetic"},
           "variant": args.variant, "rows": rows}
    print(f"source {size / 1e9:.2f} GB ({args.order} order, synthetic), {args.variant}; local convert {local_wall:.1f} s")
    print("| link MB/s | download | local convert | convert hf:// | hf:// / max(download, local) | same tensors "
          "| bytes fetched / file size |")
    print("|--:|--:|--:|--:|--:|:-:|--:|")
    for r in rows:
        print(f"| {r['bandwidth_MBps']:g} | {r['download_s']} s | {r['local_convert_s']} s | {r['hub_convert_s']} s "
              f"| {r['ratio_to_max']}x | {'yes' if r['identical_tensors'] else 'NO'} | {r['hub_bytes_over_file_size']} |")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(doc, indent=2) + "\n")


if __name__ == "__main__":
    main()
