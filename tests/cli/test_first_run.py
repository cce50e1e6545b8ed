"""The first run after an install: numba compiles the kernels once, and the user is told so.

A fresh NUMBA_CACHE_DIR stands for a fresh install: the first conversion says once on stderr that
it compiles the kernels it needs (and which), the second finds them in the cache and says nothing.
`flux-gguf warmup` compiles every kernel a conversion or `verify --source` can need, after which no
combination of type and source dtype has anything left to compile. Bars draw on a terminal whose
size is unset (a fresh pty reports 0 x 0).
"""
from __future__ import annotations

import json
import os
import pty
import subprocess
import sys

import numpy as np

import quant_kernels
from cli_child import REPO_ROOT, run
from converter import __version__
from converter.cli.output import FALLBACK_COLUMNS, VERSION_KEY, terminal_columns
from converter.cli.warmup import missing_kernels
from converter.layout import FluxGeometry
from converter.synthetic import write_synthetic_flux

CLI = "import sys; from converter.cli import main; sys.argv[0] = 'flux-gguf'; main()"
NOTICE = ("compiling 3 quantization kernels this run needs (about 15 s, cached for later runs; `flux-gguf warmup` "
          "compiles all of them at once): input checks, source upcasts, Q8_0 (16-bit codes)")
# (the source is BF16: the kernel reading 16-bit codes)


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


def test_warmup_leaves_nothing_to_compile_for_any_type_or_source():
    first = run("warmup", "--json")
    assert first.exit_code == 0, first.output
    doc = json.loads(first.stdout)
    assert doc[VERSION_KEY] == __version__ and doc["still_uncached"] == []
    assert missing_kernels() == []
    every_source = ["F32", "BF16", "F16", "F8_E4M3", "F8_E5M2"]
    types = quant_kernels.supported_type_names()
    for imatrix in (False, True):  # what convert (sources given) and verify --source (float32) ask for
        assert quant_kernels.uncompiled_kernels(types, imatrix=imatrix, sources=every_source) == []
        assert quant_kernels.uncompiled_kernels(types, imatrix=imatrix) == []
    again = run("warmup")
    assert again.exit_code == 0, again.output
    assert again.stdout == "every quantization kernel is already compiled and cached: nothing to do\n"


BAR = """
import sys
from converter.cli.output import progress_bar
with progress_bar("converting") as progress:
    for done in range(0, 5001, 1000):
        progress(done, 5000)
"""


def read_pty(cmd: list[str], env: dict[str, str]) -> str:
    """What ``cmd`` writes on a fresh pseudo-terminal (one that reports its size as 0 x 0)."""
    leader, follower = pty.openpty()
    proc = subprocess.Popen(cmd, stdin=follower, stdout=follower, stderr=follower, env=env, cwd=REPO_ROOT)
    os.close(follower)
    chunks = []
    while True:
        try:
            data = os.read(leader, 65536)
        except OSError:  # EIO: the child closed its end
            break
        if not data:
            break
        chunks.append(data)
    os.close(leader)
    assert proc.wait(timeout=120) == 0
    return b"".join(chunks).decode("utf-8", "replace")


def test_bars_draw_on_a_terminal_whose_size_is_unset():
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")}
    leader, follower = pty.openpty()
    assert os.get_terminal_size(follower) == (0, 0)  # the case: a terminal whose size nobody set
    os.close(leader)
    os.close(follower)
    out = read_pty([sys.executable, "-c", BAR], env)
    final = [line.strip() for line in out.split("\r") if line.strip()][-1]  # the bar's last redraw
    assert final.startswith("converting: 100%|") and final.endswith("B/s]"), out
    assert len(final) <= FALLBACK_COLUMNS


def test_terminal_columns_from_columns_or_the_terminal(monkeypatch):
    monkeypatch.setenv("COLUMNS", "132")
    assert terminal_columns() == 132  # a known width: the bar follows the terminal (dynamic_ncols)
    monkeypatch.setenv("COLUMNS", "0")
    assert terminal_columns() == 0  # pytest's stderr is no terminal: no size known
    leader, follower = pty.openpty()
    with open(follower, "w") as tty:
        assert terminal_columns(tty) == 0  # a pty of unset size: the fixed FALLBACK_COLUMNS bar
    os.close(leader)
