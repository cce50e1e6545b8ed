#!/usr/bin/env python
"""Benchmark the converter on the FLUX.1 layout (synthetic weights; full size: 23.8 GB BF16).

Generates the checkpoint with converter.synthetic (or reuses it), then measures, each in a child
process of its own (``os.wait4`` gives that child's CPU time and peak RSS):

* **stages**: every stage of a conversion alone, one tensor at a time on the calling thread
  (read = the source bytes into a buffer placed as the pipeline places its own, so O_DIRECT
  where the pipeline would use it, quantize = the fused kernels from the raw source codes for
  every type the variants need, as the pipeline runs them, hash = each tensor's and each file's
  sha256, write = the bytes through the pipeline's writer and fsync): wall time, CPU time and GB/s per
  stage. Their sum is what a conversion would take with nothing overlapped; ``quantize`` alone
  is "the kernels alone for the same tensors at the same thread count". ``upcast`` (the parallel
  BF16/F16/FP8 -> float32 kernels over whole tensors) is shown for reference: the pipeline no
  longer runs it, the fused kernels upcast a cache-sized chunk at a time.
* **scenarios**: ``flux-gguf convert`` itself (the pipeline), with the busy time of each stage
  inside it (from ``converter.pipeline.collect_stage_stats``): the slowest stage is the bottleneck.
* **sweep**: one scenario at 1, 2, 4, 8, 16 threads (those the machine has), with the speedup.

Outputs are deleted after each run, so the disk holds the source plus one run's files.

    python scripts/bench_convert.py --work /dev/shm/bench                          # full size, everything
    python scripts/bench_convert.py --work bench-out --hidden 3072 --double-blocks 2 --single-blocks 4 \\
        --scenario Q4_K_M --sweep Q4_K_M --json bench.json                          # a 2.6 GB profile
    python scripts/bench_convert.py --work bench-out --smoke                       # checks the script only

Targets (issue 15; full model, BF16): 16 cores with source and outputs in RAM: Q4_K_M <= 15 s,
Q8_0 <= 10 s, Q4_K_M + Q8_0 + Q3_K_S <= 25 s, 16 threads <= 1/8 of 1 thread; 2 cores: Q4_K_M
within 1.2x the kernels alone, peak RSS <= 1.5 GB.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import shutil
import subprocess
import sys
import tempfile
import time

GB = 1e9
SCENARIOS = {
    "Q4_K_M": ["Q4_K_M"],
    "Q8_0": ["Q8_0"],
    "Q3_K_S": ["Q3_K_S"],
    "Q5_K_M": ["Q5_K_M"],
    "Q4_K_M+Q8_0+Q3_K_S": ["Q4_K_M", "Q8_0", "Q3_K_S"],
    "Q3_K_S+Q4_K_M+Q5_K_M": ["Q3_K_S", "Q4_K_M", "Q5_K_M"],
}
DEFAULT_SCENARIOS = ["Q4_K_M", "Q8_0", "Q4_K_M+Q8_0+Q3_K_S"]
STAGES = ["read", "upcast", "quantize", "hash", "write"]
CHUNK_PER_THREAD: int | None = None  # --chunk-per-thread: the pipeline's default unless given
SWITCH_INTERVAL: float | None = None  # --switch-interval: Python's GIL switch interval in convert children
TRACE = False  # --trace: convert children record every timed interval per thread


# ---------------------------------------------------------------------------------------------
# Children (run as ``bench_convert.py _child KIND JSON``): the measured work itself.


def _child_convert(args: dict) -> dict:
    from converter import pipeline
    from converter.pipeline import collect_stage_stats, convert

    if args.get("chunksize") is not None:  # A/B of the parallel loops' scheduling
        pipeline._PARALLEL_CHUNKSIZE = args["chunksize"]
    if args.get("switch_interval"):  # A/B of the GIL's switch interval
        sys.setswitchinterval(args["switch_interval"])
    if args.get("chunk_per_thread"):  # rows upcast and encoded at a time, in float32 elements per thread
        pipeline._CHUNK_PER_THREAD = args["chunk_per_thread"]
    if args.get("helpers"):  # A/B of the reader and tensor-hash thread counts
        pipeline._MAX_READERS, pipeline._MAX_HASHERS = args["helpers"]
    with collect_stage_stats(trace=bool(args.get("trace"))) as stats:
        records = convert(args["src"], args["out"], args["variants"], threads=args["threads"])
    result = {"files": {r.path.name: r.size for r in records}, "sha256": {r.path.name: r.sha256 for r in records},
              "stages": stats.to_dict()}
    if stats.events is not None:
        result["events"] = stats.events
    return result


def _child_stages(args: dict) -> dict:
    """Each stage alone, in sequence, per tensor (nothing overlaps, so each stage's time is its own)."""
    import hashlib
    import resource

    import numpy as np

    import quant_kernels
    from converter.direct_io import IO_ALIGN, placed
    from converter.pipeline import kernel_threads, plan_source
    from converter.safetensors_io import DTYPE_SIZES, raw_codes, upcast_rows
    from converter.sources import open_source
    from converter.writer import GGUFStreamWriter

    class NoHash:  # the file hash is its own stage here
        def update(self, data) -> None:
            pass

        def hexdigest(self) -> str:
            return ""

    def cpu() -> float:
        r = resource.getrusage(resource.RUSAGE_SELF)
        return r.ru_utime + r.ru_stime

    wall = dict.fromkeys(STAGES, 0.0)
    cpus = dict.fromkeys(STAGES, 0.0)
    nbytes = dict.fromkeys(STAGES, 0)
    out = pathlib.Path(args["out"])
    out.mkdir(parents=True, exist_ok=True)
    with kernel_threads(args["threads"]), open_source(args["src"]) as source:
        plans = plan_source(source, args["variants"])
        order = [e.name for e in plans[0].entries]
        raw_buf = np.empty(max(source.tensors[n].nbytes for n in order) + IO_ALIGN, np.uint8)
        f32 = np.empty(max(source.tensors[n].nbytes // DTYPE_SIZES[source.tensors[n].dtype] for n in order), np.float32)
        enc_capacity = max(e.nbytes for p in plans for e in p.entries) + IO_ALIGN
        enc_bufs: dict[str, np.ndarray] = {}
        # The pipeline's writer (positioned writes, O_DIRECT where the file system allows it).
        writers = [GGUFStreamWriter(out / p.file_name, p.kv, p.slots, variant=p.variant.name, file_type=p.file_type,
                                    file_hash=NoHash(), parallel=True) for p in plans]
        file_hashes = [hashlib.sha256() for _ in plans]
        for kernel in quant_kernels.uncompiled_kernels(  # compile/load outside the timing
                sorted({e.qtype for p in plans for e in p.entries}),
                sources=sorted({source.tensors[n].dtype for n in order})):
            quant_kernels.compile_kernel(kernel)

        def stage(name: str, fn, size: int):
            w0, c0 = time.perf_counter(), cpu()
            result = fn()
            wall[name] += time.perf_counter() - w0
            cpus[name] += cpu() - c0
            nbytes[name] += size
            return result

        for tname in order:
            info = source.tensors[tname]
            phase = source.raw_phase(tname)
            raw = placed(raw_buf, phase if phase % DTYPE_SIZES[info.dtype] == 0 else 0, info.nbytes)
            stage("read", lambda: source.read_raw_into(tname, raw), info.nbytes)
            n = info.shape[-1] if info.shape else 1
            rows = info.nbytes // DTYPE_SIZES[info.dtype] // n
            x = f32[:rows * n].reshape(rows, n)
            stage("upcast", lambda: upcast_rows(raw, info.dtype, x), x.nbytes)
            entries = [{e.name: e for e in p.entries}[tname] for p in plans]
            encoded = {}
            codes, kind, table = raw_codes(raw, info.dtype, rows, n)
            for qt in dict.fromkeys(e.qtype for e in entries):
                # into a buffer placed for the first file of this type, as the pipeline does
                w = next(w for w, e in zip(writers, entries) if e.qtype == qt)
                buf = enc_bufs.setdefault(qt, np.empty(enc_capacity, np.uint8))
                dest = placed(buf, w.offset_of(tname), rows * quant_kernels.row_nbytes(qt, n))
                dest = dest.reshape(rows, -1)
                stage("quantize", lambda: quant_kernels.quantize_raw(codes, kind, qt, table=table, out=dest), x.nbytes)
                encoded[qt] = dest
            for qt, data in encoded.items():  # once per distinct type, as the pipeline does
                stage("hash", lambda: hashlib.sha256(data).hexdigest(), data.nbytes)
            for e, w, h in zip(entries, writers, file_hashes):
                data = encoded[e.qtype]
                stage("hash", lambda: h.update(data), data.nbytes)
                stage("write", lambda: w.write_at(w.reserve(tname, data, sha256=lambda: ""), data), data.nbytes)

        def sync() -> None:
            for w in writers:
                w.sync()
                w.commit()

        stage("write", sync, 0)
    return {"stages": {s: {"wall_s": round(wall[s], 3), "cpu_s": round(cpus[s], 3), "gb": round(nbytes[s] / GB, 3),
                           "gb_s": round(nbytes[s] / GB / wall[s], 3) if wall[s] else None} for s in STAGES}}


def _child_warm(args: dict) -> dict:
    """Compile (or load) every kernel the variants need for this source, so no timed child compiles."""
    import quant_kernels
    from converter.pipeline import plan_source
    from converter.sources import open_source

    with open_source(args["src"]) as source:
        plans = plan_source(source, args["variants"])
        missing = quant_kernels.uncompiled_kernels(sorted({e.qtype for p in plans for e in p.entries}),
                                                   sources=sorted({t.dtype for t in source.tensors.values()}))
    start = time.perf_counter()
    for kernel in missing:
        quant_kernels.compile_kernel(kernel)
    return {"compiled": missing, "compile_s": round(time.perf_counter() - start, 2),
            "vector_width": quant_kernels.vector_width()}


def _child_main(kind: str, payload: str) -> None:
    args = json.loads(payload)
    result = {"convert": _child_convert, "stages": _child_stages, "warm": _child_warm}[kind](args)
    sys.stdout.write(json.dumps(result))


# ---------------------------------------------------------------------------------------------
# The parent: generate, run children, report.


def free_bytes(path: pathlib.Path) -> int:
    return shutil.disk_usage(path).free


def write_sparse_source(path: pathlib.Path, geo) -> pathlib.Path:
    """A BF16 checkpoint of ``geo`` whose data region is a hole (all zeros, no disk used)."""
    import math

    from converter.layout import bfl_tensor_shapes
    from converter.safetensors_io import encode_header

    shapes = bfl_tensor_shapes(geo)
    header = encode_header([(n, "BF16", s) for n, s in shapes.items()], {})
    with open(path, "wb") as f:
        f.write(header)
    os.truncate(path, len(header) + sum(math.prod(s) for s in shapes.values()) * 2)
    return path


def ensure_source(work: pathlib.Path, geo, sparse: bool = False) -> tuple[pathlib.Path, float | None]:
    from converter.layout import FLUX2, FluxGeometry, flux2_size_of
    from converter.synthetic import synthetic_nbytes, write_synthetic_flux

    size = flux2_size_of(geo) if geo.arch == FLUX2 else None
    stem = ("flux1-synthetic-full" if geo == FluxGeometry()
            else f"{size.family}-synthetic-full" if size is not None and size.hidden == geo.hidden
            else f"{geo.arch}-synthetic-{geo.double_blocks}d{geo.single_blocks}s{geo.hidden}")
    src = work / f"{stem}{'-sparse' if sparse else ''}.safetensors"
    need = synthetic_nbytes(geo, "BF16")
    if src.exists() and src.stat().st_size >= need:
        return src, None
    if sparse:
        return write_sparse_source(src, geo), None
    if free_bytes(work) < need * 1.05:
        sys.exit(f"bench: need {need / GB:.1f} GB free in {work} for the source, have {free_bytes(work) / GB:.1f} GB")
    start = time.perf_counter()
    write_synthetic_flux(src, geo, dtype="BF16", seed=0)
    return src, time.perf_counter() - start


def run_child(kind: str, args: dict, env: dict | None = None) -> tuple[dict, float, float, float]:
    """(result, wall s, cpu s, peak RSS GB) of one child (``env``: added to its environment)."""
    cmd = [sys.executable, str(pathlib.Path(__file__).resolve()), "_child", kind, json.dumps(args)]
    # The child's output goes to files, not pipes: a full pipe would block it while we sit in wait4.
    with tempfile.TemporaryFile() as out_f, tempfile.TemporaryFile() as err_f:
        start = time.perf_counter()
        child = subprocess.Popen(cmd, stdout=out_f, stderr=err_f, env={**os.environ, **(env or {})})
        _, status, usage = os.wait4(child.pid, 0)  # this child's own rusage
        wall = time.perf_counter() - start
        child.returncode = os.waitstatus_to_exitcode(status)  # already reaped: keep Popen from waiting
        out_f.seek(0)
        err_f.seek(0)
        stdout, stderr = out_f.read(), err_f.read()
    if child.returncode != 0:
        sys.exit(f"bench: {kind} failed ({child.returncode}): {stderr.decode(errors='replace').strip()[-2000:]}")
    return json.loads(stdout), wall, usage.ru_utime + usage.ru_stime, usage.ru_maxrss * 1024 / GB


# libgomp's default wait (spin 300,000 times after a region), which quant_kernels replaces by PASSIVE
SPINNING = {"OMP_WAIT_POLICY": "ACTIVE", "GOMP_SPINCOUNT": "300000"}


def measure(kind: str, src: pathlib.Path, out: pathlib.Path, variants: list[str], threads: int,
            chunksize: int | None = None, env: dict | None = None, helpers: list[int] | None = None) -> dict:
    if out.exists():
        shutil.rmtree(out)
    result, wall, cpu, rss = run_child(kind, {"src": str(src), "out": str(out), "variants": variants,
                                              "threads": threads, "chunksize": chunksize,
                                              "chunk_per_thread": CHUNK_PER_THREAD,
                                              "switch_interval": SWITCH_INTERVAL, "trace": TRACE,
                                              "helpers": helpers}, env)
    written = sum(p.stat().st_size for p in out.iterdir()) if out.exists() else 0
    shutil.rmtree(out, ignore_errors=True)
    return {"kind": kind, "scenario": "+".join(variants), "threads": threads, "wall_s": round(wall, 2),
            "cpu_s": round(cpu, 2), "peak_rss_gb": round(rss, 3), "output_gb": round(written / GB, 3),
            "read_gb_s": round(src.stat().st_size / wall / GB, 3), **result}


# Thread roles in a trace, by thread-name prefix (converter.pipeline names its threads).
ROLES = (("main", "MainThread"), ("reader", "flux-gguf-reader"), ("hash", "flux-gguf-hash"),
         ("writer", "flux-gguf-writer"), ("filehash", "flux-gguf-filehash"))


def timeline(events: list, bin_s: float = 1.0) -> list[dict]:
    """Per time bin: for each thread role and stage, the busy thread-seconds in that bin divided
    by the bin (so 1.0 = one thread busy all the time; roles with several threads can exceed 1)."""
    end = max((e[3] for e in events), default=0.0)
    n = int(end / bin_s) + 1
    bins: list[dict] = [{} for _ in range(n)]
    for thread, stage, t0, t1 in events:
        role = next((r for r, prefix in ROLES if thread.startswith(prefix)), thread)
        key = f"{role}.{stage}"
        b = int(t0 / bin_s)
        while b < n and t0 < t1:
            edge = min(t1, (b + 1) * bin_s)
            bins[b][key] = bins[b].get(key, 0.0) + (edge - t0) / bin_s
            t0, b = edge, b + 1
    return [{k: round(v, 2) for k, v in sorted(d.items())} for d in bins]


def print_timeline(r: dict) -> None:
    cols = [("main.quantize", "quant"), ("main.wait_write", "w.wait"), ("main.wait_read", "r.wait"),
            ("main.wait_file_hash", "w.fhash"), ("reader.read", "read"), ("hash.hash", "thash"),
            ("writer.write", "write"), ("filehash.file_hash", "fhash"), ("filehash.file_hash_idle", "fh.idle")]
    print(f"  timeline ({r['scenario']}, busy threads per 1 s bin):")
    print("  " + f"{'t s':>4} " + " ".join(f"{label:>7}" for _, label in cols))
    for i, b in enumerate(timeline(r["events"])):
        print("  " + f"{i:>4} " + " ".join(f"{b.get(key, 0.0):>7.2f}" for key, _ in cols))


def print_stages(r: dict) -> None:
    print(f"\nstages alone: {r['scenario']} at {r['threads']} threads (child: {r['wall_s']} s wall incl. start-up, "
          f"{r['cpu_s']} s CPU, peak RSS {r['peak_rss_gb']} GB)")
    print(f"  {'stage':<10} {'wall s':>8} {'cpu s':>8} {'cpu/wall':>9} {'GB':>8} {'GB/s':>8}")
    total = 0.0
    for s in STAGES:
        st = r["stages"][s]
        total += st["wall_s"] if s != "upcast" else 0.0
        ratio = st["cpu_s"] / st["wall_s"] if st["wall_s"] else 0
        print(f"  {s:<10} {st['wall_s']:>8.2f} {st['cpu_s']:>8.2f} {ratio:>9.2f} {st['gb']:>8.2f} "
              f"{st['gb_s'] if st['gb_s'] is not None else 0:>8.2f}")
    print(f"  {'sum':<10} {total:>8.2f}   (nothing overlapped; upcast left out: the fused kernels do it)")


def print_convert(r: dict, alone: dict | None) -> None:
    st = r["stages"]
    line = (f"\nconvert {r['scenario']} at {r['threads']} threads: {r['wall_s']} s wall (pipeline {st['wall_s']} s), "
            f"{r['cpu_s']} s CPU, peak RSS {r['peak_rss_gb']} GB, {r['output_gb']} GB written")
    if alone is not None:
        q = alone["stages"]["quantize"]["wall_s"]
        line += f"; {st['wall_s'] / q:.2f}x the kernels alone ({q} s)" if q else ""
    print(line)
    busy, cpu = st["busy_s"], st["cpu_s"]
    print("  busy s per stage inside the pipeline (summed over its threads; cpu where Python threads ran it):")
    print("  " + ", ".join(f"{k} {v:.2f}" + (f" (cpu {cpu[k]:.2f})" if k in cpu else "") for k, v in busy.items()))


def main() -> None:
    if len(sys.argv) == 4 and sys.argv[1] == "_child":
        _child_main(sys.argv[2], sys.argv[3])
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=pathlib.Path, default=pathlib.Path("bench-out/convert"),
                    help="folder for the source and the outputs (default: bench-out/convert; /dev/shm/... for RAM)")
    ap.add_argument("--scenario", choices=list(SCENARIOS), action="append",
                    help=f"convert this at --threads (repeatable; default: {', '.join(DEFAULT_SCENARIOS)})")
    ap.add_argument("--stages", choices=list(SCENARIOS), action="append",
                    help="stage breakdown of this scenario at --threads (repeatable; default: the first scenario)")
    ap.add_argument("--sweep", choices=list(SCENARIOS), default=None,
                    help="this scenario at every --sweep-threads count (default: the first scenario)")
    ap.add_argument("--sweep-threads", default="1,2,4,8,16",
                    help="thread counts for the sweep; those above the machine's cores are skipped (default 1,2,4,8,16)")
    ap.add_argument("--no-sweep", action="store_true", help="skip the sweep")
    ap.add_argument("--no-stages", action="store_true", help="skip the stage breakdown")
    ap.add_argument("--switch-interval", type=float, default=None,
                    help="sys.setswitchinterval in the convert children (seconds; Python's default 0.005)")
    ap.add_argument("--ab-spin", action="store_true",
                    help="also run every scenario with numba's OpenMP workers spinning after each region "
                         "(libgomp's default; quant_kernels sets OMP_WAIT_POLICY=PASSIVE)")
    ap.add_argument("--ab-static", action="store_true",
                    help="also run the first scenario with numba's static loop split (parallel chunksize 0)")
    ap.add_argument("--ab-helpers", default=None, metavar="R,H",
                    help="also run the first scenario with at most R reader and H tensor-hash threads "
                         "(the pipeline's defaults: 4 and 8)")
    ap.add_argument("--vector-width", choices=("256", "512"), default="512",
                    help="FLUX_GGUF_VECTOR_WIDTH for every child (default 512, as the flux-gguf command: "
                         "512-bit vectors where the CPU has AVX-512)")
    ap.add_argument("--trace", action="store_true",
                    help="record every stage interval per thread in the scenario runs; prints a timeline per "
                         "run and keeps the events in --json")
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="threads for scenarios and stages (default: all)")
    ap.add_argument("--double-blocks", type=int, default=None)
    ap.add_argument("--single-blocks", type=int, default=None)
    ap.add_argument("--hidden", type=int, default=None, help="a multiple of 128 (default: FLUX.1's 3072)")
    ap.add_argument("--flux2", choices=("flux2-dev", "flux2-klein-4b", "flux2-klein-9b"), default=None,
                    help="the FLUX.2 model's layout instead of FLUX.1's (--hidden narrows it)")
    ap.add_argument("--sparse", action="store_true",
                    help="a sparse all-zero source (headers only on disk) instead of synthetic weights: for sizes "
                         "the disk cannot hold twice; zero weights make the kernels' work lighter than real ones")
    ap.add_argument("--smoke", action="store_true", help="2 + 2 blocks of hidden 512 (checks the script, not speed)")
    ap.add_argument("--json", type=pathlib.Path, default=None, help="also write the results here (after every run)")
    ap.add_argument("--remove-source", action="store_true", help="delete the generated source afterwards")
    ap.add_argument("--chunk-per-thread", type=int, default=None,
                    help="float32 elements per kernel thread the pipeline upcasts and encodes at a time "
                         "(default: the pipeline's, 2^21 = 8 MB)")
    args = ap.parse_args()
    os.environ["FLUX_GGUF_VECTOR_WIDTH"] = args.vector_width  # inherited by every child
    global CHUNK_PER_THREAD, SWITCH_INTERVAL, TRACE
    CHUNK_PER_THREAD = args.chunk_per_thread
    SWITCH_INTERVAL = args.switch_interval
    TRACE = args.trace

    from converter.layout import DOUBLE_BLOCKS, HIDDEN, SINGLE_BLOCKS, FluxGeometry, flux2_geometry

    if args.flux2:
        geo = flux2_geometry(args.flux2, args.hidden)
    elif args.smoke:
        geo = FluxGeometry(double_blocks=2, single_blocks=2, hidden=512)
    else:
        geo = FluxGeometry(double_blocks=DOUBLE_BLOCKS if args.double_blocks is None else args.double_blocks,
                           single_blocks=SINGLE_BLOCKS if args.single_blocks is None else args.single_blocks,
                           hidden=HIDDEN if args.hidden is None else args.hidden)
    args.work.mkdir(parents=True, exist_ok=True)
    src, gen_s = ensure_source(args.work, geo, args.sparse)
    scenarios = args.scenario or DEFAULT_SCENARIOS
    cores = os.cpu_count() or 1
    results: dict = {
        "machine": {"cpus": cores, "python": platform.python_version(), "platform": platform.platform(),
                    "processor": _cpu_model(), "work": str(args.work),
                    "load_avg_at_start": [round(x, 2) for x in os.getloadavg()]},
        "geometry": {"arch": geo.arch, "double_blocks": geo.double_blocks, "single_blocks": geo.single_blocks,
                     "hidden": geo.hidden},
        "source": {"path": src.name, "bytes": src.stat().st_size, "generate_s": None if gen_s is None else round(gen_s, 1)},
        "stages": [], "runs": [], "sweep": [],
    }

    def save() -> None:
        results["machine"]["load_avg_now"] = [round(x, 2) for x in os.getloadavg()]
        if args.json:
            args.json.write_text(json.dumps(results, indent=2) + "\n")

    out = args.work / "out"
    every = sorted({v for name in scenarios + (args.stages or []) + [args.sweep or scenarios[0]] for v in SCENARIOS[name]})
    warm, _, _, _ = run_child("warm", {"src": str(src), "variants": every})
    results["warm"] = warm
    results["machine"]["vector_width"] = warm["vector_width"]
    print(f"numba cache: compiled {', '.join(warm['compiled']) or 'nothing'} in {warm['compile_s']} s (outside every timing); "
          f"{warm['vector_width']}-bit vectors")
    alone_by_scenario = {}
    for name in [] if args.no_stages else args.stages or scenarios[:1]:
        r = measure("stages", src, out, SCENARIOS[name], args.threads)
        alone_by_scenario[name] = r
        results["stages"].append(r)
        save()
        print_stages(r)
    for name in scenarios:
        r = measure("convert", src, out, SCENARIOS[name], args.threads)
        results["runs"].append(r)
        save()
        print_convert(r, alone_by_scenario.get(name))
        if "events" in r:
            print_timeline(r)
    if args.ab_spin:
        results["ab_spin"] = []
        for name in scenarios:
            r = measure("convert", src, out, SCENARIOS[name], args.threads, env=SPINNING)
            results["ab_spin"].append(r)
            save()
            print(f"\nA/B: {name} at {args.threads} threads, OpenMP workers spinning: {r['wall_s']} s wall "
                  f"(pipeline {r['stages']['wall_s']} s, {r['cpu_s']} s CPU)")
    if args.ab_static:
        name = scenarios[0]
        r = measure("convert", src, out, SCENARIOS[name], args.threads, chunksize=0)
        results["ab_static"] = r
        save()
        print(f"\nA/B: {name} at {args.threads} threads with numba's static loop split: {r['wall_s']} s wall "
              f"(pipeline {r['stages']['wall_s']} s)")
    if args.ab_helpers:
        name = scenarios[0]
        helpers = [int(v) for v in args.ab_helpers.split(",")]
        r = measure("convert", src, out, SCENARIOS[name], args.threads, helpers=helpers)
        results["ab_helpers"] = {"readers_hashers": helpers, **r}
        save()
        print(f"\nA/B: {name} at {args.threads} threads with at most {helpers[0]} reader and {helpers[1]} tensor-hash "
              f"threads: {r['wall_s']} s wall (pipeline {r['stages']['wall_s']} s)")
    if not args.no_sweep:
        name = args.sweep or scenarios[0]
        # most threads first: the quick runs land before the slow single-thread one
        counts = sorted((t for t in (int(c) for c in args.sweep_threads.split(",")) if 1 <= t <= cores), reverse=True)
        for t in counts:
            same = next((r for r in results["runs"] if r["scenario"] == "+".join(SCENARIOS[name]) and r["threads"] == t),
                        None)
            r = same or measure("convert", src, out, SCENARIOS[name], t)
            results["sweep"].append(r)
            save()
            print(f"sweep {name}: {t} threads {r['wall_s']} s")
        one = [r for r in results["sweep"] if r["threads"] == 1]
        base = one[0]["wall_s"] if one else None
        print(f"\nthread sweep, {name} ({cores} cores, source {src.stat().st_size / GB:.2f} GB in {args.work}):")
        print(f"  {'threads':>7} {'wall s':>8} {'cpu s':>8} {'peak RSS GB':>12} {'speedup':>8}")
        for r in results["sweep"]:
            print(f"  {r['threads']:>7} {r['wall_s']:>8.2f} {r['cpu_s']:>8.2f} {r['peak_rss_gb']:>12.3f} "
                  + (f"{base / r['wall_s']:>8.2f}" if base else f"{'-':>8}"))
    save()
    print(f"\n{'scenario':<22} {'threads':>7} {'wall s':>8} {'cpu s':>8} {'peak RSS GB':>12} {'read GB/s':>10}")
    for r in results["runs"]:
        print(f"{r['scenario']:<22} {r['threads']:>7} {r['wall_s']:>8.2f} {r['cpu_s']:>8.2f} {r['peak_rss_gb']:>12.3f} "
              f"{r['read_gb_s']:>10.3f}")
    if args.remove_source:
        src.unlink()


def _cpu_model() -> str:
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


if __name__ == "__main__":
    main()
