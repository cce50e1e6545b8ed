#!/usr/bin/env python
"""Benchmark the converter on the full-size FLUX.1 layout (synthetic weights, 23.8 GB BF16).

Generates the checkpoint with converter.synthetic (or reuses it), then runs ``flux-gguf convert``
in a child process for each scenario and measures that child alone (``os.wait4``): wall time,
CPU time, peak RSS, and source-read / output-write throughput. Outputs are deleted after each
scenario so the disk only ever holds the source plus one scenario's files.

    python scripts/bench_convert.py --work bench-out/convert              # both scenarios
    python scripts/bench_convert.py --work bench-out/convert --json bench.json --scenario Q4_K_M

Targets (2 cores): peak RSS <= 3 GB, Q4_K_M <= 3 minutes.
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

from converter.layout import FluxGeometry
from converter.recipes import layout_tensors, make_plans
from converter.synthetic import synthetic_nbytes, write_synthetic_flux

SCENARIOS = {
    "Q4_K_M": ["Q4_K_M"],
    "Q3_K_S": ["Q3_K_S"],
    "Q5_K_M": ["Q5_K_M"],
    # one pass for all three, to compare with the sum of the three single runs above
    "Q3_K_S+Q4_K_M+Q5_K_M": ["Q3_K_S", "Q4_K_M", "Q5_K_M"],
}
SOURCE_NAME = "flux1-synthetic-full.safetensors"
GB = 1e9


def free_bytes(path: pathlib.Path) -> int:
    return shutil.disk_usage(path).free


def ensure_source(work: pathlib.Path, geo: FluxGeometry) -> tuple[pathlib.Path, float | None]:
    src = work / (SOURCE_NAME if geo == FluxGeometry() else "flux1-synthetic-smoke.safetensors")
    need = synthetic_nbytes(geo, "BF16")
    if src.exists() and src.stat().st_size >= need:
        return src, None
    if free_bytes(work) < need * 1.05:
        sys.exit(f"bench: need {need / GB:.1f} GB free in {work} for the source, have {free_bytes(work) / GB:.1f} GB")
    start = time.perf_counter()
    write_synthetic_flux(src, geo, dtype="BF16", seed=0)
    return src, time.perf_counter() - start


def run_scenario(src: pathlib.Path, out: pathlib.Path, variants: list[str], threads: int | None,
                 geo: FluxGeometry) -> dict:
    planned = make_plans(variants, layout_tensors(geo), name=src.stem, family="flux-dev")
    need = sum(p.file_size for p in planned)
    if free_bytes(out.parent) < need * 1.05:
        sys.exit(f"bench: need {need / GB:.1f} GB free for {'+'.join(variants)}, have {free_bytes(out.parent) / GB:.1f} GB")
    if out.exists():
        shutil.rmtree(out)
    cmd = [sys.executable, "-c", "from converter.cli import main; main()", "convert", str(src), "-o", str(out),
           "--json"] + [a for v in variants for a in ("--variant", v)]
    if threads:
        cmd += ["--threads", str(threads)]
    # The child's output goes to files, not pipes: a full pipe would block it while we sit in wait4.
    with tempfile.TemporaryFile() as out_f, tempfile.TemporaryFile() as err_f:
        start = time.perf_counter()
        child = subprocess.Popen(cmd, stdout=out_f, stderr=err_f)
        # wait4 gives this child's own rusage (RUSAGE_CHILDREN would mix in earlier children).
        _, status, usage = os.wait4(child.pid, 0)
        wall = time.perf_counter() - start
        child.returncode = os.waitstatus_to_exitcode(status)  # already reaped: keep Popen from waiting
        out_f.seek(0)
        err_f.seek(0)
        stdout, stderr = out_f.read(), err_f.read()
    code = child.returncode
    if code != 0:
        sys.exit(f"bench: convert failed ({code}): {stderr.decode(errors='replace').strip()[-2000:]}")
    artifacts = json.loads(stdout)["artifacts"]
    written = sum(a["size"] for a in artifacts)
    source_bytes = src.stat().st_size
    shutil.rmtree(out)
    return {
        "scenario": "+".join(variants),
        "variants": variants,
        "wall_s": round(wall, 1),
        "cpu_s": round(usage.ru_utime + usage.ru_stime, 1),
        "peak_rss_gb": round(usage.ru_maxrss * 1024 / GB, 3),  # ru_maxrss is KiB on Linux
        "read_gb_s": round(source_bytes / wall / GB, 3),
        "write_gb_s": round(written / wall / GB, 3),
        "output_gb": round(written / GB, 3),
        "files": {pathlib.Path(a["path"]).name: a["size"] for a in artifacts},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=pathlib.Path, default=pathlib.Path("bench-out/convert"),
                    help="folder for the 23.8 GB source and the outputs (default: bench-out/convert)")
    ap.add_argument("--scenario", choices=list(SCENARIOS), action="append",
                    help="run only this scenario (repeatable; default: all)")
    ap.add_argument("--threads", type=int, default=None, help="--threads for convert (default: all cores)")
    ap.add_argument("--json", type=pathlib.Path, default=None, help="also write the results here")
    ap.add_argument("--remove-source", action="store_true", help="delete the generated source afterwards")
    ap.add_argument("--smoke", action="store_true",
                    help="a 2 + 2 block, hidden 512 model instead of the full size (checks the script, not speed)")
    args = ap.parse_args()

    geo = FluxGeometry(double_blocks=2, single_blocks=2, hidden=512) if args.smoke else FluxGeometry()
    args.work.mkdir(parents=True, exist_ok=True)
    src, gen_s = ensure_source(args.work, geo)
    results = {
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform(),
                    "load_avg_at_start": [round(x, 2) for x in os.getloadavg()]},
        "geometry": {"double_blocks": geo.double_blocks, "single_blocks": geo.single_blocks, "hidden": geo.hidden},
        "source": {"path": src.name, "bytes": src.stat().st_size, "generate_s": None if gen_s is None else round(gen_s, 1)},
        "runs": [],
    }
    for name in args.scenario or list(SCENARIOS):
        results["runs"].append(run_scenario(src, args.work / "out", SCENARIOS[name], args.threads, geo))
    results["machine"]["load_avg_at_end"] = [round(x, 2) for x in os.getloadavg()]

    text = json.dumps(results, indent=2)
    if args.json:
        args.json.write_text(text + "\n")
    print(text)
    print()
    print(f"{'scenario':<24} {'wall s':>8} {'cpu s':>8} {'peak RSS GB':>12} {'read GB/s':>10} {'write GB/s':>11}")
    for r in results["runs"]:
        print(f"{r['scenario']:<24} {r['wall_s']:>8.1f} {r['cpu_s']:>8.1f} {r['peak_rss_gb']:>12.3f} "
              f"{r['read_gb_s']:>10.3f} {r['write_gb_s']:>11.3f}")
    walls = {r["scenario"]: r["wall_s"] for r in results["runs"]}
    singles = ["Q3_K_S", "Q4_K_M", "Q5_K_M"]
    if all(s in walls for s in singles) and "Q3_K_S+Q4_K_M+Q5_K_M" in walls:
        total = sum(walls[s] for s in singles)
        print(f"one pass for three variants: {walls['Q3_K_S+Q4_K_M+Q5_K_M']:.1f} s vs {total:.1f} s for three "
              f"separate runs ({walls['Q3_K_S+Q4_K_M+Q5_K_M'] / total:.2f}x)")
    if args.remove_source:
        src.unlink()


if __name__ == "__main__":
    main()
