#!/usr/bin/env python
"""How one kernel scales with threads on this machine: wall time, process CPU time and their ratio.

Quantizes one (rows, cols) tensor of N(0, 0.02) weights from raw BF16 codes (the production path,
``quant_kernels.quantize_raw``) at each thread count, best of --repeats after a warm-up, and reports
Mw/s, CPU/wall (how many threads were really running on average inside the parallel region) and
the CPU time per weight relative to one thread (above 1: each thread got slower, e.g. cores
shared underneath). Variants at the largest count tell load balance from machine limits: one
region --tall times as long, numba's static split (chunk size 0), and chunks of one iteration.

Example (the 16-core figures in docs/benchmarks.md):
    python scripts/bench_scaling.py --type Q4_K --threads 1,8,15,16 --json scaling.json
"""
from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time

import numba
import numpy as np

import quant_kernels


def measure(codes: np.ndarray, qtype: str, threads: int, chunksize: int, repeats: int) -> dict:
    quant_kernels.set_threads(threads)
    previous = numba.set_parallel_chunksize(chunksize)
    try:
        quant_kernels.quantize_raw(codes[:256], "bf16", qtype)
        best = None
        for _ in range(repeats):
            c0, w0 = time.process_time(), time.perf_counter()
            quant_kernels.quantize_raw(codes, "bf16", qtype)
            w, c = time.perf_counter() - w0, time.process_time() - c0
            if best is None or w < best[0]:
                best = (w, c)
    finally:
        numba.set_parallel_chunksize(previous)
    w, c = best
    return {"threads": threads, "chunksize": chunksize, "weights": codes.size, "mw_s": round(codes.size / w / 1e6, 1),
            "wall_s": round(w, 4), "cpu_s": round(c, 4), "cpu_over_wall": round(c / w, 2)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--type", default="Q4_K")
    ap.add_argument("--rows", type=int, default=9216)
    ap.add_argument("--cols", type=int, default=3072)
    ap.add_argument("--threads", default="1,2,4,8,16", help="comma-separated thread counts")
    ap.add_argument("--tall", type=int, default=8, help="the long-region variant stacks the tensor this many times")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", type=pathlib.Path)
    args = ap.parse_args()
    counts = [t for t in (int(v) for v in args.threads.split(",")) if 1 <= t <= numba.config.NUMBA_NUM_THREADS]
    if not counts:
        ap.error(f"no thread count between 1 and {numba.config.NUMBA_NUM_THREADS}")
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((args.rows, args.cols)) * 0.02).astype(np.float32)
    codes = (x.view(np.uint32) >> 16).astype(np.uint16)
    print(f"{args.type} from BF16 codes, {args.rows} x {args.cols}, {quant_kernels.vector_width()}-bit vectors, "
          f"best of {args.repeats}", flush=True)
    runs = []
    one_cpu = None
    for t in counts:
        r = measure(codes, args.type, t, 4, args.repeats)
        runs.append(r)
        one_cpu = r["cpu_s"] if t == 1 else one_cpu
    top = max(counts)
    for label, arr, cs in (("one region --tall times as long", np.concatenate([codes] * args.tall), 4),
                           ("static split", codes, 0), ("chunks of one", codes, 1)):
        r = measure(arr, args.type, top, cs, args.repeats)
        r["variant"] = label
        runs.append(r)
    print(f"{'threads':>7} {'variant':<34} {'Mw/s':>8} {'speedup':>8} {'CPU/wall':>9} {'CPU per weight vs 1T':>21}")
    base = runs[0]["mw_s"] if counts[0] == 1 else None
    for r in runs:
        per_w = r["cpu_s"] / r["weights"]
        rel = per_w / (one_cpu / codes.size) if one_cpu else None
        print(f"{r['threads']:>7} {r.get('variant', ''):<34} {r['mw_s']:>8.1f} "
              f"{(r['mw_s'] / base if base else float('nan')):>7.2f}x {r['cpu_over_wall']:>9.2f} "
              f"{(f'{rel:.2f}x' if rel else '-'):>21}")
    if args.json:
        args.json.write_text(json.dumps({"type": args.type, "rows": args.rows, "cols": args.cols,
                                         "vector_width": quant_kernels.vector_width(), "runs": runs}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
