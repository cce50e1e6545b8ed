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
qw = np.abs(x[0]) + 0.1
stats = {}
for spec in SPECS.values():
    if spec.is_float:
        continue
    quant_kernels.quantize(x, spec.qtype)
    if spec.is_kquant:
        quant_kernels.quantize(x, spec.qtype, imatrix=qw)
    mod = importlib.import_module(f"quant_kernels.{spec.module}")
    for fn in ("quantize_rows", "quantize_rows_imatrix"):
        d = getattr(mod, fn, None)
        if d is not None and d.signatures:
            stats[f"{spec.name}.{fn}"] = [sum(d.stats.cache_hits.values()), sum(d.stats.cache_misses.values())]
print(json.dumps(stats))
"""


def _run() -> dict[str, list[int]]:
    out = subprocess.run([sys.executable, "-c", SCRIPT], check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_second_process_compiles_nothing():
    _run()  # fills the cache if this checkout has not yet
    stats = _run()
    assert len(stats) == 11  # 6 types' reference kernels + 5 K-quants' imatrix kernels
    compiled = {k: v for k, v in stats.items() if v != [1, 0]}
    assert not compiled, f"kernels compiled again instead of loading from the cache: {compiled}"
