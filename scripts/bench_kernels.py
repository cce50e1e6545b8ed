#!/usr/bin/env python
"""Benchmark the quant_kernels quantizers against ggml's (tests/oracle.py), in one process.

For each type, quantizes a (rows, cols) N(0, 0.02) float32 matrix with ``quant_kernels.quantize``
at one thread and at all numba threads, and with ggml's ``ggml_quantize_chunk`` at one thread;
reports the best of --repeats runs (after an untimed warm-up round) in millions of weights per
second, and checks that our bytes equal ggml's for that matrix. Ratio 1T = ggml's time / ours
(above 1: ours is faster); scaling = ours at 1 thread / ours at all threads, in wall time. A type whose kernel module is not there
yet is reported as missing.

Example:
    python scripts/bench_kernels.py --repeats 5 --json bench-out/kernels.json
    python scripts/bench_kernels.py --types Q3_K,Q6_K --rows 1024 --imatrix
"""
from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import json
import os
import pathlib
import platform
import sys
import time
from collections.abc import Callable

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


def bench_type(qtype: str, x: np.ndarray, imatrix: np.ndarray | None, repeats: int, threads: int) -> dict:
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
    wall = dict.fromkeys(runs, float("inf"))
    cpu = dict.fromkeys(runs, float("inf"))
    out: dict[str, object] = {}
    quant_kernels.quantize(x[:2], qtype, imatrix=imatrix)  # compile or load from cache
    for rep in range(repeats + 1):  # round 0 is the warm-up, untimed
        for key, (n_threads, fn) in runs.items():
            if n_threads is not None:
                quant_kernels.set_threads(n_threads)
            w, c, out[key] = timed(fn)
            if rep:
                wall[key] = min(wall[key], w)
                cpu[key] = min(cpu[key], c)
    quant_kernels.set_threads(threads)
    type_size = quant_kernels.resolve(qtype).type_size
    for key in ("ours_1t", "ours_nt"):
        msg = describe_mismatch(out[key], out["ggml_1t"], type_size)
        if msg:
            raise AssertionError(f"{qtype} ({key}) bytes differ from ggml's: {msg}")
    mw = {key: x.size / t / 1e6 for key, t in wall.items()}
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
    return "\n".join(lines)


def write_json(path: pathlib.Path, payload: dict) -> None:
    """Write to PATH.partial, then rename, so PATH only ever holds a complete report."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(payload, indent=2) + "\n")
    partial.replace(path)


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

    rng = np.random.default_rng(args.seed)
    x = (rng.standard_normal((args.rows, args.cols)) * 0.02).astype(np.float32)
    imatrix = None
    if args.imatrix:
        imatrix = (rng.random(args.cols) * 10.0 ** rng.uniform(-2, 2, args.cols)).astype(np.float32)

    machine = machine_description()
    print(f"{machine['cpu_model']}, {machine['usable_cpus']} usable CPUs, numba {machine['versions']['numba']}; "
          f"{args.rows}x{args.cols} N(0, 0.02) float32{' with imatrix' if args.imatrix else ''}, best of {args.repeats}",
          flush=True)
    results = []
    for qtype in types:
        results.append(bench_type(qtype, x, imatrix, args.repeats, args.threads))
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
