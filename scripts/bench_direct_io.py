"""Benchmark the conversion's source reads and output writes: through the page cache and direct.

Both run through the code the pipeline runs (``SafetensorsFile.read_raw_into`` into buffers
placed as the pipeline places them, ``GGUFStreamWriter.write_at`` from two threads), once with
``FLUX_GGUF_DIRECT_IO=off`` and once with ``on``, alternated in one process, on a file in
``--work``. Before every read the file is dropped from the page cache (``posix_fadvise``
DONTNEED, no root needed), so each read comes from the disk as a conversion's would. Reported
per run: wall time, the process's CPU time (user + system; the kernel's copy and page handling
are system time), GB/s, and the ratio of the two ways' CPU times.

    python scripts/bench_direct_io.py --work /var/tmp/dio --gb 4            # 4 GB each way
    python scripts/bench_direct_io.py --work /var/tmp/dio --gb 4 --json dio.json

The folder must be on a file system that accepts O_DIRECT (ext4, xfs, btrfs; tmpfs does not, and
there both runs are buffered: the script says so). The bytes are the same either way (checked).
"""
from __future__ import annotations

import argparse
import concurrent.futures
import hashlib
import json
import os
import pathlib
import platform
import resource
import shutil
import sys
import time

import numpy as np
from gguf import GGUFValueType

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from converter import direct_io  # noqa: E402
from converter.direct_io import IO_ALIGN, placed  # noqa: E402
from converter.safetensors_io import SafetensorsFile, encode_header  # noqa: E402
from converter.writer import KV, GGUFStreamWriter, TensorSlot  # noqa: E402

GB = 1e9
TENSOR = 48 << 20  # bytes per tensor, about a FLUX double block's MLP weight in BF16
ODD = 2 * 1234  # the tensors start off page boundaries, as in a real checkpoint


def cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def make_source(path: pathlib.Path, count: int) -> list[str]:
    """A safetensors file of ``count`` BF16 tensors of TENSOR bytes (plus a small odd one first)."""
    names = [f"t{i}" for i in range(count)]
    block = np.random.default_rng(0).integers(0, 256, TENSOR, dtype=np.uint8)
    with open(path, "wb") as f:
        f.write(encode_header([("odd", "BF16", (ODD // 2,))] + [(n, "BF16", (TENSOR // 2,)) for n in names], {}))
        f.write(bytes(ODD))
        for i in range(count):
            block[:8] = np.frombuffer(i.to_bytes(8, "little"), np.uint8)  # every tensor different
            f.write(block.tobytes())
        f.flush()
        os.fsync(f.fileno())
    return names


def drop_from_cache(path: pathlib.Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def read_all(path: pathlib.Path, names: list[str]) -> tuple[dict, str]:
    """Every tensor into a reused buffer at its file phase (as the pipeline's reader does)."""
    drop_from_cache(path)
    buf = np.empty(TENSOR + IO_ALIGN, np.uint8)
    h = hashlib.sha256()
    f = SafetensorsFile(path)
    try:
        w0, c0, hash_wall, hash_cpu = time.perf_counter(), cpu(), 0.0, 0.0
        for n in names:
            out = placed(buf, f.raw_phase(n), TENSOR)
            f.read_raw_into(n, 0, out)
            t, c = time.perf_counter(), cpu()
            h.update(out)  # to check the bytes; its time is taken out
            hash_wall += time.perf_counter() - t
            hash_cpu += cpu() - c
        wall, cpus = time.perf_counter() - w0 - hash_wall, max(0.0, cpu() - c0 - hash_cpu)
        direct = f.direct
    finally:
        f.close()
    nbytes = TENSOR * len(names)
    return {"wall_s": round(wall, 3), "cpu_s": round(cpus, 3), "gb_s": round(nbytes / GB / wall, 3),
            "direct": direct}, h.hexdigest()


def write_all(folder: pathlib.Path, names: list[str]) -> tuple[dict, str]:
    """A GGUF of the same tensors through the pipeline's parallel writer, two writer threads;
    the sha256 of the file (computed by the writer from the bytes given)."""
    out = folder / "out.gguf"
    slots = [TensorSlot(n, (TENSOR,), "I8", TENSOR) for n in names]
    block = np.random.default_rng(1).integers(0, 256, TENSOR, dtype=np.uint8)
    kv = [KV("general.architecture", "flux", GGUFValueType.STRING)]
    w = GGUFStreamWriter(out, kv, slots, variant="bench", file_type=0, parallel=True)
    try:
        bufs = []
        for i, n in enumerate(names):
            offset = w.reserve(n, block, sha256=lambda: "")
            buf = placed(np.empty(TENSOR + IO_ALIGN, np.uint8), offset, TENSOR)
            buf[:] = block
            buf[:8] = np.frombuffer(i.to_bytes(8, "little"), np.uint8)
            bufs.append((offset, buf))
        direct = w.direct
        w0, c0 = time.perf_counter(), cpu()
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            list(pool.map(lambda job: w.write_at(*job), bufs))
        w.sync()
        wall, cpus = time.perf_counter() - w0, cpu() - c0
        record = w.commit()
    except BaseException:
        w.abort()
        raise
    with open(out, "rb") as f:  # the bytes landed: first and last tensor
        for offset, buf in (bufs[0], bufs[-1]):
            f.seek(offset)
            if f.read(TENSOR) != buf.tobytes():
                raise SystemExit(f"{out}: tensor at {offset} differs from what was written")
    out.unlink()
    nbytes = TENSOR * len(names)
    return {"wall_s": round(wall, 3), "cpu_s": round(cpus, 3), "gb_s": round(nbytes / GB / wall, 3),
            "direct": direct}, record.sha256


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", required=True, help="folder on the file system to measure (it is removed after)")
    ap.add_argument("--gb", type=float, default=4.0, help="bytes read and written per run, in GB (default 4)")
    ap.add_argument("--repeats", type=int, default=2, help="runs of each way, alternated (default 2)")
    ap.add_argument("--json", help="write the results here too")
    args = ap.parse_args()
    work = pathlib.Path(args.work)
    work.mkdir(parents=True, exist_ok=False)
    try:
        count = max(1, int(args.gb * GB // TENSOR))
        src = work / "source.safetensors"
        names = make_source(src, count)
        results: dict[str, list] = {"read_off": [], "read_on": [], "write_off": [], "write_on": []}
        read_digests, write_digests = set(), set()
        for _ in range(args.repeats):
            for way in ("off", "on"):
                os.environ[direct_io.ENV] = way
                r, d = read_all(src, names)
                results[f"read_{way}"].append(r)
                read_digests.add(d)
                r, d = write_all(work, names)
                results[f"write_{way}"].append(r)
                write_digests.add(d)
        if len(read_digests) != 1 or len(write_digests) != 1:
            raise SystemExit("direct and buffered runs gave different bytes")
        nbytes = TENSOR * count
        print(f"{nbytes / GB:.2f} GB each way in {work} ({platform.processor() or platform.machine()}, "
              f"{os.cpu_count()} CPUs)")
        if not results["read_on"][0]["direct"]:
            print("  this file system refuses O_DIRECT: both ways were buffered")
        print(f"  {'run':<14} {'wall s':>8} {'cpu s':>8} {'GB/s':>7}")
        for key, rows in results.items():
            for r in rows:
                print(f"  {key:<14} {r['wall_s']:>8.2f} {r['cpu_s']:>8.2f} {r['gb_s']:>7.2f}")
        for op in ("read", "write"):
            off = min(r["cpu_s"] for r in results[f"{op}_off"])
            on = min(r["cpu_s"] for r in results[f"{op}_on"])
            print(f"  {op}: CPU s buffered / direct (best runs) = {off:.2f} / {on:.2f}"
                  + (f" = {off / on:.1f}x" if on > 0 else ""))
        if args.json:
            pathlib.Path(args.json).write_text(json.dumps({"gb": nbytes / GB, "work": str(work), **results}, indent=1))
    finally:
        os.environ.pop(direct_io.ENV, None)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
