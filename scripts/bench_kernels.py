#!/usr/bin/env python
"""Benchmark the quant_kernels quantizers against ggml's (tests/oracle.py), in one process.

For each type, quantizes a (rows, cols) N(0, 0.02) float32 matrix with ``quant_kernels.quantize``
at one thread and at all numba threads, and with ggml's ``ggml_quantize_chunk`` at one thread;
reports the best of --repeats runs (after an untimed warm-up round) in millions of weights per
second, and checks that our bytes equal ggml's for that matrix. Ratio 1T = ggml's time / ours
(above 1: ours is faster); scaling = ours at 1 thread / ours at all threads, in wall time. A type whose kernel module is not there
yet is reported as missing.

With ``--base REV`` (a git revision, or a folder holding a ``quant_kernels`` package) the kernels
of that revision are loaded beside the current ones, as the package ``quant_kernels_base``, and
timed in the same interleaved rounds: "vs base" is the base's time over ours (above 1: the
current kernels are faster), at one thread and at all threads, and the base's bytes must equal
ours. That is how a kernel change is measured on a noisy machine: both sides see the same load.

With ``--tiny`` it times something else: a tensor of one row of 3072 weights (a FLUX bias or
norm), at all threads, encoded the way the API does it (on the calling thread alone, below
``quant_kernels.api.SERIAL_BELOW`` elements) and forced through a parallel region, interleaved:
microseconds per tensor and the ratio.

Example:
    python scripts/bench_kernels.py --repeats 5 --json bench-out/kernels.json
    python scripts/bench_kernels.py --tiny --types F32,Q8_0,Q4_K
    python scripts/bench_kernels.py --types Q3_K,Q6_K --rows 1024 --imatrix
    python scripts/bench_kernels.py --types Q4_K,Q5_K --base HEAD~1 --repeats 7
"""
from __future__ import annotations

import argparse
import hashlib
import importlib
import importlib.util
import subprocess
import tarfile
import tempfile
import importlib.metadata
import json
import os
import pathlib
import platform
import sys
import time
from collections.abc import Callable
from types import ModuleType

import numba
import numpy as np

import quant_kernels

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "tests"))
import oracle  # noqa: E402  (test-only ggml wrapper; never imported by the package)
from kquant_cases import describe_mismatch  # noqa: E402

DEFAULT_TYPES = ["Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q8_0"]


def timed(fn: Callable[[], object]) -> tuple[float, float, object]:
    """(wall seconds, process CPU seconds, result) of one call."""
    w0, c0 = time.perf_counter(), time.process_time()
    result = fn()
    return time.perf_counter() - w0, time.process_time() - c0, result


def kernels_present(qtype: str) -> bool:
    spec = quant_kernels.resolve(qtype)
    try:
        module = importlib.import_module(f"quant_kernels.{spec.module}")
    except ModuleNotFoundError:
        return False
    return hasattr(module, "quantize_rows")


def load_base(spec: str) -> ModuleType:
    """The quant_kernels package of a git revision, or of a folder holding one, imported as
    ``quant_kernels_base`` (its modules import each other relatively, so the copy is self-contained).
    A revision is extracted once into the temp folder, keyed by its commit, so numba's cache of
    the base kernels survives between runs."""
    folder = pathlib.Path(spec)
    if (folder / "quant_kernels" / "__init__.py").is_file():
        pkg = folder / "quant_kernels"
    else:
        root = pathlib.Path(__file__).resolve().parents[1]
        try:
            commit = subprocess.run(["git", "rev-parse", "--verify", f"{spec}^{{commit}}"], cwd=root, check=True,
                                    capture_output=True, text=True).stdout.strip()
            archive = subprocess.run(["git", "archive", commit, "quant_kernels"], cwd=root, check=True,
                                     capture_output=True).stdout
        except (OSError, subprocess.CalledProcessError) as e:
            raise SystemExit(f"--base {spec}: not a folder holding quant_kernels/ nor a git revision here ({e})")
        dest = pathlib.Path(tempfile.gettempdir()) / f"flux-gguf-base-{hashlib.sha256(commit.encode()).hexdigest()[:16]}"
        pkg = dest / "quant_kernels"
        if not (pkg / "__init__.py").is_file():
            dest.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(suffix=".tar") as tmp:
                tmp.write(archive)
                tmp.flush()
                with tarfile.open(tmp.name) as tar:
                    tar.extractall(dest, filter="data")
    spec_obj = importlib.util.spec_from_file_location("quant_kernels_base", pkg / "__init__.py",
                                                      submodule_search_locations=[str(pkg)])
    assert spec_obj is not None and spec_obj.loader is not None
    module = importlib.util.module_from_spec(spec_obj)
    sys.modules["quant_kernels_base"] = module
    spec_obj.loader.exec_module(module)
    return module


def bench_type(qtype: str, x: np.ndarray, imatrix: np.ndarray | None, repeats: int, threads: int,
               base: ModuleType | None = None) -> dict:
    """Time one type; raises AssertionError if our bytes differ from ggml's.

    The three measurements are interleaved (ours at 1 thread, ggml, ours at all threads, then
    again) so that load from other processes spreads over all of them; each keeps its best.
    Single-thread runs also record process CPU time, which other processes disturb less.
    """
    if not kernels_present(qtype):
        return {"type": qtype, "status": "missing"}
    runs = {
        "ours_1t": (1, lambda: quant_kernels.quantize(x, qtype, imatrix=imatrix)),
        "ggml_1t": (None, lambda: oracle.quantize(x, qtype, imatrix)),
        "ours_nt": (threads, lambda: quant_kernels.quantize(x, qtype, imatrix=imatrix)),
    }
    if base is not None:
        base.quantize(x[:2], qtype, imatrix=imatrix)  # compile or load from cache
        runs["base_1t"] = (1, lambda: base.quantize(x, qtype, imatrix=imatrix))
        runs["base_nt"] = (threads, lambda: base.quantize(x, qtype, imatrix=imatrix))
    wall = dict.fromkeys(runs, float("inf"))
    cpu = dict.fromkeys(runs, float("inf"))
    out: dict[str, object] = {}
    quant_kernels.quantize(x[:2], qtype, imatrix=imatrix)  # compile or load from cache
    for rep in range(repeats + 1):  # round 0 is the warm-up, untimed
        for key, (n_threads, fn) in runs.items():
            if n_threads is not None:
                quant_kernels.set_threads(n_threads)
                if base is not None:
                    base.set_threads(n_threads)
            w, c, out[key] = timed(fn)
            if rep:
                wall[key] = min(wall[key], w)
                cpu[key] = min(cpu[key], c)
    quant_kernels.set_threads(threads)
    type_size = quant_kernels.resolve(qtype).type_size
    for key in [k for k in out if k != "ggml_1t"]:
        msg = describe_mismatch(out[key], out["ggml_1t"], type_size)
        if msg:
            raise AssertionError(f"{qtype} ({key}) bytes differ from ggml's: {msg}")
    mw = {key: x.size / t / 1e6 for key, t in wall.items()}
    vs_base = {}
    if base is not None:
        vs_base = {"base_1t_mw_s": mw["base_1t"], "base_nt_mw_s": mw["base_nt"],
                   "vs_base_1t": wall["base_1t"] / wall["ours_1t"], "vs_base_nt": wall["base_nt"] / wall["ours_nt"],
                   "vs_base_1t_cpu": cpu["base_1t"] / cpu["ours_1t"]}
    return {
        "type": qtype,
        "status": "ok",
        "bytes_equal_ggml": True,
        "ours_1t_mw_s": mw["ours_1t"],
        "ours_nt_mw_s": mw["ours_nt"],
        "ggml_1t_mw_s": mw["ggml_1t"],
        "ratio_1t": wall["ggml_1t"] / wall["ours_1t"],
        "scaling": wall["ours_1t"] / wall["ours_nt"],
        "ours_1t_cpu_mw_s": x.size / cpu["ours_1t"] / 1e6,
        "ggml_1t_cpu_mw_s": x.size / cpu["ggml_1t"] / 1e6,
        "ratio_1t_cpu": cpu["ggml_1t"] / cpu["ours_1t"],
        # CPU time of all threads over CPU time at one: 1.0 means threads add no work, so on
        # otherwise idle cores the wall time divides by the thread count
        "nt_cpu_over_1t_cpu": cpu["ours_nt"] / cpu["ours_1t"],
        **vs_base,
        "wall_seconds": wall,
        "cpu_seconds": cpu,
    }


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def machine_description() -> dict:
    model = None
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    return {
        "cpu_model": model or platform.processor() or None,
        "logical_cpus": os.cpu_count(),
        "usable_cpus": usable,
        "numba_threads": numba.config.NUMBA_NUM_THREADS,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "versions": {d: _version(d) for d in ("numpy", "numba", "llvmlite", "gguf", "libggml-python", "flux-gguf")},
    }


def _threading_layer() -> str | None:
    try:
        return numba.threading_layer()
    except ValueError:  # no parallel kernel has run (every type missing)
        return None


def format_table(results: list[dict], threads: int) -> str:
    head = (f"{'type':<6} {'ours 1T Mw/s':>13} {f'ours {threads}T Mw/s':>13} {'ggml 1T Mw/s':>13} {'ratio 1T':>9} "
            f"{'scaling':>8} {'ratio 1T (CPU time)':>20}")
    lines = [head, "-" * len(head)]
    for r in results:
        if r["status"] != "ok":
            lines.append(f"{r['type']:<6} {r['status']}")
            continue
        lines.append(
            f"{r['type']:<6} {r['ours_1t_mw_s']:>13.1f} {r['ours_nt_mw_s']:>13.1f} {r['ggml_1t_mw_s']:>13.1f} "
            f"{r['ratio_1t']:>8.2f}x {r['scaling']:>7.2f}x {r['ratio_1t_cpu']:>19.2f}x"
        )
    based = [r for r in results if r["status"] == "ok" and "vs_base_1t" in r]
    if based:
        head = (f"{'type':<6} {'base 1T Mw/s':>13} {'ours 1T Mw/s':>13} {'vs base 1T':>11} {'(CPU time)':>11} "
                f"{f'base {threads}T':>10} {f'ours {threads}T':>10} {f'vs base {threads}T':>12}")
        lines += ["", head, "-" * len(head)]
        for r in based:
            lines.append(
                f"{r['type']:<6} {r['base_1t_mw_s']:>13.1f} {r['ours_1t_mw_s']:>13.1f} {r['vs_base_1t']:>10.2f}x "
                f"{r['vs_base_1t_cpu']:>10.2f}x {r['base_nt_mw_s']:>10.1f} {r['ours_nt_mw_s']:>10.1f} "
                f"{r['vs_base_nt']:>11.2f}x")
    return "\n".join(lines)


def write_json(path: pathlib.Path, payload: dict) -> None:
    """Write to PATH.partial, then rename, so PATH only ever holds a complete report."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(payload, indent=2) + "\n")
    partial.replace(path)


def bench_tiny(types: list[str], threads: int, repeats: int, calls: int = 300) -> list[dict]:
    """Per type: microseconds per call of quantize on a (1, 3072) tensor at ``threads`` threads,
    serial below SERIAL_BELOW (as shipped) and with a parallel region forced, interleaved."""
    from quant_kernels import api

    x = (np.random.default_rng(0).standard_normal((1, 3072)) * 0.02).astype(np.float32)
    shipped = api.SERIAL_BELOW
    rows = []
    quant_kernels.set_threads(threads)
    for qtype in types:
        best = {"serial": float("inf"), "parallel": float("inf")}
        same = set()
        for _ in range(repeats + 1):  # the first round is a warm-up
            for way, below in (("serial", shipped), ("parallel", 0)):
                api.SERIAL_BELOW = below
                try:
                    same.add(quant_kernels.quantize(x, qtype).tobytes())
                    t = time.perf_counter()
                    for _ in range(calls):
                        quant_kernels.quantize(x, qtype)
                    best[way] = min(best[way], (time.perf_counter() - t) / calls * 1e6)
                finally:
                    api.SERIAL_BELOW = shipped
        if len(same) != 1:
            raise SystemExit(f"{qtype}: the serial and the parallel call gave different bytes")
        rows.append({"type": qtype, "threads": threads, "serial_us": round(best["serial"], 1),
                     "parallel_us": round(best["parallel"], 1),
                     "ratio": round(best["parallel"] / best["serial"], 2)})
        r = rows[-1]
        print(f"  {qtype}: {r['serial_us']} us serial, {r['parallel_us']} us in a parallel region of {threads} "
              f"threads ({r['ratio']}x), same bytes", flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=4096)
    ap.add_argument("--cols", type=int, default=4096, help="a multiple of 256")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per measurement; the best counts")
    ap.add_argument("--types", default=",".join(DEFAULT_TYPES), help="comma-separated, e.g. Q3_K,Q8_0")
    ap.add_argument("--threads", type=int, default=numba.config.NUMBA_NUM_THREADS, help="the 'all threads' count")
    ap.add_argument("--imatrix", action="store_true", help="time the importance-weighted variants instead")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=pathlib.Path, help="also write the results here")
    ap.add_argument("--tiny", action="store_true",
                    help="time one-row (1 x 3072) tensors, serial as shipped vs a forced parallel region")
    ap.add_argument("--base", help="also time the kernels of this git revision (or a folder holding "
                                   "quant_kernels/) in the same rounds, e.g. HEAD~1")
    args = ap.parse_args(argv)
    if args.cols % 256 or args.cols <= 0 or args.rows <= 0:
        ap.error(f"--rows must be positive and --cols a positive multiple of 256, got {args.rows}x{args.cols}")
    if not 1 <= args.threads <= numba.config.NUMBA_NUM_THREADS:
        ap.error(f"--threads must be between 1 and {numba.config.NUMBA_NUM_THREADS}, got {args.threads}")
    if args.repeats < 1:
        ap.error(f"--repeats must be at least 1, got {args.repeats}")
    try:
        types = [quant_kernels.resolve(t).name for t in args.types.split(",") if t.strip()]
    except quant_kernels.UnsupportedTypeError as e:
        ap.error(str(e))

    if args.tiny:
        machine = machine_description()
        print(f"{machine['cpu_model']}, {machine['usable_cpus']} usable CPUs, numba {machine['versions']['numba']}; "
              f"1 x 3072 N(0, 0.02) float32, best of {args.repeats}", flush=True)
        rows = bench_tiny(types, args.threads, args.repeats)
        if args.json:
            write_json(args.json, {"benchmark": "tiny tensors: serial vs parallel region", "machine": machine,
                                   "threading_layer": _threading_layer(), "results": rows})
        return 0

    rng = np.random.default_rng(args.seed)
    x = (rng.standard_normal((args.rows, args.cols)) * 0.02).astype(np.float32)
    imatrix = None
    if args.imatrix:
        imatrix = (rng.random(args.cols) * 10.0 ** rng.uniform(-2, 2, args.cols)).astype(np.float32)

    base = load_base(args.base) if args.base else None
    machine = machine_description()
    machine["vector_width"] = quant_kernels.vector_width()
    print(f"{machine['cpu_model']}, {machine['usable_cpus']} usable CPUs, numba {machine['versions']['numba']}, "
          f"{machine['vector_width']}-bit vectors (FLUX_GGUF_VECTOR_WIDTH=512 for 512); "
          f"{args.rows}x{args.cols} N(0, 0.02) float32{' with imatrix' if args.imatrix else ''}, best of {args.repeats}",
          flush=True)
    results = []
    for qtype in types:
        results.append(bench_type(qtype, x, imatrix, args.repeats, args.threads, base))
        r = results[-1]
        print(f"  {qtype}: " + ("missing" if r["status"] != "ok" else f"ratio 1T {r['ratio_1t']:.2f}x, bytes equal ggml's"),
              flush=True)
    print()
    print(format_table(results, args.threads))
    if args.json:
        payload = {
            "benchmark": "quant_kernels vs ggml_quantize_chunk",
            "matrix": {"rows": args.rows, "cols": args.cols, "dist": "normal(0, 0.02)", "seed": args.seed,
                       "imatrix": args.imatrix},
            "repeats": args.repeats,
            "base": args.base,
            "threads": args.threads,
            "threading_layer": _threading_layer(),
            "machine": machine,
            "results": results,
        }
        write_json(args.json, payload)
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
