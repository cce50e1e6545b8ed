"""The kernels built with 512-bit vectors (the flux-gguf command's setting on AVX-512 CPUs) give
ggml's bytes, like the 256-bit build the rest of the suite runs.

numba fixes the vector width for the whole process when it defines its first function, so the
check runs in a child process started with FLUX_GGUF_VECTOR_WIDTH=512. On a CPU without AVX-512
the setting is declined (256-bit vectors) and the bytes are checked all the same.
"""
from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import llvmlite.binding as ll

TESTS = pathlib.Path(__file__).resolve().parents[1]

CHILD = r"""
import json, sys
import numpy as np
sys.path.insert(0, sys.argv[1])
import quant_kernels
import oracle
from kquant_cases import describe_mismatch, input_families, random_imatrix, type_size

rng = np.random.default_rng(3)
cases = dict(input_families(n=1024, rows=4))
# trial levels out of nearest_int's range (the tile search's integer path): all-negative
# heavy-tailed groups with sparse importance weights, and groups a few subnormal steps wide
cases["degenerate"] = (-np.exp(rng.standard_normal((4, 1024)) * 3.0)).astype(np.float32)
tiny = (rng.standard_normal((4, 1024)) * 0.02).astype(np.float32)
tiny[:, 64:96] = np.float32(1e-45) * rng.integers(0, 4, (4, 32)).astype(np.float32)
cases["tiny_range"] = tiny
sparse_w = (rng.random(1024) * (rng.random(1024) < 0.5)).astype(np.float32)
mismatches, checked = [], 0
for qtype in ("Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"):
    for name, x in cases.items():
        for label, qw in (("reference", None), ("imatrix", random_imatrix(x.shape[1], seed=5)),
                          ("sparse imatrix", sparse_w)):
            ref = oracle.quantize(x, qtype, qw)
            ours = quant_kernels.quantize(x, qtype, imatrix=qw)
            bits = x.view(np.uint32)
            bf16 = (bits >> 16).astype(np.uint16)  # the production path: raw BF16 codes
            ref_bf16 = oracle.quantize((bf16.astype(np.uint32) << 16).view(np.float32), qtype, qw)
            raw = quant_kernels.quantize_raw(bf16, "bf16", qtype, imatrix=qw)
            for what, a, b in (("float32", ours, ref), ("bf16 codes", raw, ref_bf16)):
                checked += 1
                msg = describe_mismatch(a, b, type_size(qtype))
                if msg:
                    mismatches.append(f"{qtype} {name} {label} {what}: {msg}")
print(json.dumps({"width": quant_kernels.vector_width(), "cases": len(cases), "checked": checked,
                  "mismatches": mismatches}))
"""


def test_512_bit_kernels_match_ggml() -> None:
    env = {**os.environ, "FLUX_GGUF_VECTOR_WIDTH": "512"}
    env.pop("NUMBA_CPU_FEATURES", None)
    env.pop("NUMBA_CPU_NAME", None)
    done = subprocess.run([sys.executable, "-c", CHILD, str(TESTS)], env=env, capture_output=True, text=True,
                          timeout=1500)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    ll.initialize_native_target()
    avx512 = "+avx512f" in ll.get_host_cpu_features().flatten().split(",")
    assert result["width"] == (512 if avx512 else 256)
    assert result["cases"] >= 20 and result["checked"] == 6 * result["cases"] * 3 * 2
    assert result["mismatches"] == []


def test_library_import_keeps_numba_default() -> None:
    """Importing the kernels as a library does not change numba's code generator for the process."""
    env = {k: v for k, v in os.environ.items() if k not in ("FLUX_GGUF_VECTOR_WIDTH", "NUMBA_CPU_FEATURES", "NUMBA_CPU_NAME")}
    code = "import quant_kernels, os; print(quant_kernels.vector_width(), os.environ.get('NUMBA_CPU_FEATURES'))"
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["256", "None"]


def test_a_cpu_name_the_user_chose_is_kept() -> None:
    """NUMBA_CPU_NAME (e.g. generic, for a cache shared between machines) is the user's choice:
    FLUX_GGUF_VECTOR_WIDTH=512 does not add CPU features behind it."""
    env = {**os.environ, "FLUX_GGUF_VECTOR_WIDTH": "512", "NUMBA_CPU_NAME": "generic"}
    env.pop("NUMBA_CPU_FEATURES", None)
    code = "import quant_kernels._vector_width as v, os; print(v.prefer_512_bit(), os.environ.get('NUMBA_CPU_FEATURES'))"
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["False", "None"]
