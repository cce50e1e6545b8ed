"""The first run after an install: numba compiles the kernels once, and the user is told so.

A fresh NUMBA_CACHE_DIR stands for a fresh install: the first conversion says once on stderr that
it compiles the kernels it needs (and which), the second finds them in the cache and says nothing.
"""
from __future__ import annotations

import os
import subprocess
import sys

import numpy as np

import quant_kernels
from converter.layout import FluxGeometry
from converter.synthetic import write_synthetic_flux

CLI = "import sys; from converter.cli import main; sys.argv[0] = 'flux-gguf'; main()"
NOTICE = ("compiling quantization kernels (once per install, about 15 s): input checks, source upcasts, "
          "Q8_0 (16-bit codes)")  # the source is BF16: the kernel reading 16-bit codes


def test_first_conversion_announces_the_compile_once(tmp_path):
    src = write_synthetic_flux(tmp_path / "tiny.safetensors", FluxGeometry(1, 1, 256), seed=1)
    env = {**os.environ, "NUMBA_CACHE_DIR": str(tmp_path / "numba-cache")}
    runs = [subprocess.run([sys.executable, "-c", CLI, "convert", str(src), "-o", str(tmp_path / f"out{i}"),
                            "--variant", "Q8_0"], env=env, capture_output=True, text=True, timeout=900)
            for i in range(2)]
    for r in runs:
        assert r.returncode == 0, r.stderr
    assert runs[0].stderr.splitlines().count(NOTICE) == 1  # stderr is no terminal here: no bars, just the line
    assert "compiling" not in runs[1].stderr
    assert (tmp_path / "out0" / "tiny-Q8_0.gguf").read_bytes() == (tmp_path / "out1" / "tiny-Q8_0.gguf").read_bytes()


def test_uncompiled_kernels_reads_numbas_cache():
    x = np.zeros((1, 256), dtype=np.float32)
    quant_kernels.quantize(x, "Q6_K")  # compiled (or loaded) now, so on disk
    assert quant_kernels.uncompiled_kernels(["Q6_K", "F32", "BF16"]) == []
    assert "Q6_K" not in quant_kernels.uncompiled_kernels(["Q6_K"], imatrix=False)
    quant_kernels.compile_kernel("Q6_K+imatrix")
    assert quant_kernels.uncompiled_kernels(["Q6_K"], imatrix=True) == []
    quant_kernels.compile_kernel("Q6_K (8-bit codes)")  # one kernel per source code width, imatrix or not
    assert quant_kernels.uncompiled_kernels(["Q6_K"], imatrix=True, sources=["F8_E4M3", "F8_E5M2"]) == []
