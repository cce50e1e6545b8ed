#!/usr/bin/env python
"""What signing a release costs: sha256 of every file (one read) vs ``sign_release`` vs ``check_signature``.

Signing with OpenSSF model-signing re-reads every file of the release once (the library hashes
them; the build computed its own digests while writing and reads nothing back). This script
measures that read against a plain sha256 pass over the same files, and counts the bytes each
step reads (``rchar`` of /proc/self/io, page-cache hits included) to show signing reads the
release exactly once.

    python scripts/bench_signing.py --work bench-out/signing --gb 3            # a synthetic folder
    python scripts/bench_signing.py --release dist/flux1-kontext-dev --work bench-out/signing

``--gb``: a folder of a few GGUF-sized files of seeded random bytes (content does not matter to
hashing). ``--release``: measure a release folder you have, in place (model.sig is written there
and removed afterwards; a folder that already has one is refused: move it aside). ``--cold``
also measures with the files dropped from the page cache (posix_fadvise DONTNEED; no root needed).
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import shutil
import sys
import time

import numpy as np
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from converter.release.signing import (
    check_signature,
    prepare_signer,
    sign_release,
    signing_request,
    trust_from_options,
)
from manifests import SIGNATURE_NAME, hash_file

GB = 1e9
BLOCK = 64 * 1024 * 1024


def rchar() -> int:
    with open("/proc/self/io") as f:
        return int(next(line for line in f if line.startswith("rchar:")).split()[1])


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown"


def make_folder(folder: pathlib.Path, total: float, files: int) -> None:
    """``files`` files of seeded random bytes summing to ``total`` bytes (one 64 MiB block, tiled)."""
    folder.mkdir(parents=True, exist_ok=True)
    block = np.random.default_rng(0).integers(0, 256, BLOCK, dtype=np.uint8).tobytes()
    each = int(total // files)
    for i in range(files):
        path = folder / f"synthetic-{i}.gguf"
        if path.exists() and path.stat().st_size == each:
            continue
        with open(path, "wb") as f:
            left = each
            while left:
                n = min(left, len(block))
                f.write(block[:n])
                left -= n
    (folder / "README.md").write_text("# synthetic release for bench_signing.py\n")


def drop_cache(paths: list[pathlib.Path]) -> None:
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def measure(label: str, fn, size: int, cold: bool, paths: list[pathlib.Path]) -> dict:
    if cold:
        drop_cache(paths)
    before, start = rchar(), time.perf_counter()
    result = fn()
    seconds = time.perf_counter() - start
    read = rchar() - before
    return {"step": label, "cache": "cold" if cold else "warm", "seconds": round(seconds, 3),
            "gb_per_s": round(size / GB / seconds, 3), "bytes_read": read, "reads_of_release": round(read / size, 3),
            "result": result}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=pathlib.Path, required=True, help="folder for the key (and the synthetic files)")
    ap.add_argument("--release", type=pathlib.Path, help="measure this release folder instead of synthetic files")
    ap.add_argument("--gb", type=float, default=3.0, help="size of the synthetic folder (GB)")
    ap.add_argument("--files", type=int, default=3, help="number of synthetic files")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--cold", action="store_true", help="also measure with the files dropped from the page cache")
    ap.add_argument("--keep", action="store_true", help="keep the synthetic files")
    ap.add_argument("--json", type=pathlib.Path, help="write the results here")
    args = ap.parse_args()

    args.work.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    key_path, pub_path = args.work / "bench-key.pem", args.work / "bench-pub.pem"
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    pub_path.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                       serialization.PublicFormat.SubjectPublicKeyInfo))
    folder = args.release or args.work / "synthetic-release"
    had_sig = (folder / SIGNATURE_NAME).exists()
    if args.release is None:
        start = time.perf_counter()
        make_folder(folder, args.gb * GB, args.files)
        print(f"generated {folder} in {time.perf_counter() - start:.1f} s", file=sys.stderr)
    elif had_sig:
        sys.exit(f"{folder} already has {SIGNATURE_NAME}; measure a copy without it")
    paths = sorted(p for p in folder.rglob("*") if p.is_file())
    size = sum(p.stat().st_size for p in paths)
    signer = prepare_signer(signing_request(key=key_path))
    trust = trust_from_options(public_key=pub_path)

    def hash_all() -> str:
        for p in paths:
            hash_file(p)
        return "sha256 of every file"

    digests = {p.relative_to(folder).as_posix(): hash_file(p).sha256 for p in paths}  # also warms the cache

    def sign() -> str:
        (folder / SIGNATURE_NAME).unlink(missing_ok=True)
        r = sign_release(folder, signer, name=folder.name, expected=digests)
        return f"signed {r.files} files"

    def verify() -> str:
        return check_signature(folder, trust).status

    rows = []
    load_before = os.getloadavg()
    for cold in ([False, True] if args.cold else [False]):
        for _ in range(args.repeats):
            rows.append(measure("sha256 (one read)", hash_all, size, cold, paths))
            rows.append(measure("sign_release", sign, size, cold, paths))
            rows.append(measure("check_signature", verify, size, cold, paths))
    load_after = os.getloadavg()
    if not had_sig:
        (folder / SIGNATURE_NAME).unlink(missing_ok=True)
    best: dict[tuple[str, str], dict] = {}
    for r in rows:
        k = (r["step"], r["cache"])
        if k not in best or r["seconds"] < best[k]["seconds"]:
            best[k] = r
    for cache in sorted({c for _, c in best}):
        base = best[("sha256 (one read)", cache)]["seconds"]
        for (step, c), r in best.items():
            if c == cache:
                r["vs_sha256"] = round(r["seconds"] / base, 3)
    machine = {"cpu": cpu_model(), "cores": os.cpu_count(), "python": platform.python_version(),
               "load_average_before": [round(x, 2) for x in load_before],
               "load_average_after": [round(x, 2) for x in load_after]}
    out = {"folder": str(folder), "files": len(paths), "bytes": size, "machine": machine,
           "best": list(best.values()), "runs": rows}
    print(f"{len(paths)} files, {size / GB:.3f} GB; {machine['cpu']}, {machine['cores']} cores, "
          f"load {machine['load_average_before'][0]} -> {machine['load_average_after'][0]}")
    for r in best.values():
        print(f"{r['step']:<20} {r['cache']:<5} {r['seconds']:8.2f} s  {r['gb_per_s']:6.3f} GB/s  "
              f"{r['vs_sha256']:5.2f}x sha256  reads of the release: {r['reads_of_release']:.2f}  ({r['result']})")
    if args.json:
        args.json.write_text(json.dumps(out, indent=2) + "\n")
    if args.release is None and not args.keep:
        shutil.rmtree(folder)


if __name__ == "__main__":
    main()
