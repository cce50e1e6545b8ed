"""The light install: converting, inspecting, releasing and verifying work without torch or diffusers.

Each command runs in a fresh interpreter in which torch, diffusers and the rest of the
``[validate]`` extra cannot be imported (a meta-path finder refuses them as if they were not
installed, and records every attempt). The commands must succeed without even trying; ``validate``
and ``bench`` must fail with one line naming the install command. ``.ci/run`` also installs the
package into a second venv without torch and runs ``flux-gguf example`` there.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from lora_fixtures import GEO, make_truth, write_kohya

from converter.synthetic import write_synthetic_flux

HEAVY = ("torch", "diffusers", "accelerate", "transformers", "skimage", "peft", "torchvision")

# Runs `flux-gguf ARGS...` with the heavy packages made unimportable; the names asked for go to
# the file named by FLUX_GGUF_BLOCKED_LOG.
RUNNER = f"""
import importlib.abc, os, sys
HEAVY = {HEAVY!r}
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in HEAVY:
            with open(os.environ["FLUX_GGUF_BLOCKED_LOG"], "a") as f:
                f.write(name + "\\n")
            raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
        return None
sys.meta_path.insert(0, Block())
for name in list(sys.modules):
    if name.split(".")[0] in HEAVY:
        del sys.modules[name]
from converter.cli import main
sys.argv[0] = "flux-gguf"
main()
"""


def flux_gguf(cwd: Path, *args: object) -> tuple[subprocess.CompletedProcess, list[str]]:
    log = cwd / "blocked.log"
    log.unlink(missing_ok=True)
    env = {**os.environ, "FLUX_GGUF_BLOCKED_LOG": str(log)}
    r = subprocess.run([sys.executable, "-c", RUNNER, *map(str, args)], cwd=cwd, env=env,
                       capture_output=True, text=True, timeout=600)
    asked = log.read_text().split() if log.exists() else []
    return r, asked


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Iterator[Path]:
    folder = tmp_path_factory.mktemp("light")
    yield folder
    shutil.rmtree(folder, ignore_errors=True)  # ~190 MB of example, release and outputs


def test_the_readme_path_needs_no_torch(work):
    for args in (("example", "-o", "example-out"),
                 ("release", "build", "example-out/release.toml", "-o", "dist/example"),
                 ("verify", "dist/example"),
                 ("verify", "dist/example", "--source", "example-out/flux1-example.safetensors"),
                 ("inspect", "dist/example/flux1-example-Q4_K_M.gguf"),
                 ("convert", "example-out/flux1-example.safetensors", "-o", "out", "--variant", "Q8_0", "--dry-run"),
                 ("validate", "example-out/flux1-example-Q8_0.gguf", "--source",
                  "example-out/flux1-example.safetensors", "--tensors-only", "-o", "validation.json")):
        r, asked = flux_gguf(work, *args)
        assert r.returncode == 0, (args, r.stderr)
        if args[0] == "validate":  # it looks for diffusers' logging to quiet it; the tensor pass needs none
            assert set(asked) <= {"diffusers", "transformers"}, asked
        else:
            assert asked == [], f"flux-gguf {' '.join(args)} tried to import {asked}"
        if args[0] == "verify":
            assert r.stdout.splitlines()[-1] == "release dist/example: OK"
    assert json.loads((work / "validation.json").read_text())


def test_lora_merge_needs_no_torch(work):
    src = write_synthetic_flux(work / "tiny.safetensors", GEO, seed=3)
    write_kohya(work / "speed.safetensors", make_truth(GEO, seed=1))  # written here, with torch
    r, asked = flux_gguf(work, "convert", src, "-o", "merged", "--variant", "Q4_K_M", "--lora", "speed.safetensors:0.5")
    assert r.returncode == 0, r.stderr
    assert asked == []
    assert (work / "merged" / "tiny-Q4_K_M.gguf").is_file()


@pytest.mark.parametrize("args", [
    ("validate", "example-out/flux1-example-Q8_0.gguf", "--source", "example-out/flux1-example.safetensors"),
    ("bench", "example-out/flux1-example-Q8_0.gguf"),
])
def test_model_commands_name_the_extra(work, args):
    if not (work / "example-out").is_dir():
        assert flux_gguf(work, "example", "-o", "example-out")[0].returncode == 0
    r, asked = flux_gguf(work, *args)
    assert r.returncode == 1
    assert r.stdout == ""
    lines = [line for line in r.stderr.splitlines() if line.startswith("Error: ")]
    assert lines == [r.stderr.splitlines()[-1]]
    assert lines[0].endswith("install them with: pip install 'flux-gguf[validate]'")
    assert asked  # it did try, and said what to install
