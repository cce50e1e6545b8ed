"""cache=True in practice: a second process loads every kernel from numba's cache, compiling nothing."""
from __future__ import annotations

import json
import subprocess
import sys

SCRIPT = r"""
import json, importlib
import numpy as np
import quant_kernels
from quant_kernels.types import SPECS
x = np.random.default_rng(0).standard_normal((4, 512)).astype(np.float32)
bf16 = (x.view(np.uint32) >> 16).astype(np.uint16)
qw = np.abs(x[0]) + 0.1
stats = {}
for spec in SPECS.values():
    if spec.is_float:
        continue
    quant_kernels.quantize(x, spec.qtype)  # the fused kernel on float32 bits
    if spec.is_kquant:
        quant_kernels.quantize(x, spec.qtype, imatrix=qw)  # the same kernel
    quant_kernels.quantize_raw(bf16, "bf16", spec.qtype)  # the fused kernel on 16-bit codes
    d = importlib.import_module(f"quant_kernels.{spec.module}").quantize_codes
    stats[spec.name] = [sum(d.stats.cache_hits.values()), sum(d.stats.cache_misses.values())]
print(json.dumps(stats))
"""


def _run() -> dict[str, list[int]]:
    out = subprocess.run([sys.executable, "-c", SCRIPT], check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_second_process_compiles_nothing():
    _run()  # fills the cache if this checkout has not yet
    stats = _run()
    assert len(stats) == 6  # one fused kernel per quantized type, loaded for 32-bit and 16-bit codes
    compiled = {k: v for k, v in stats.items() if v != [2, 0]}
    assert not compiled, f"kernels compiled again instead of loading from the cache: {compiled}"
