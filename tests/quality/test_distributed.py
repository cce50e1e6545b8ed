"""imatrix collection over several processes (gloo on the CPU, as torchrun starts them): the file is
byte for byte the one a single process writes, and a rank's failure is every rank's one-line error.

Every run here, one process or several, is a child with one torch thread (torchrun's default for
several processes), so the float32 reductions are the same computation in each."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from converter.layout import FluxGeometry
from converter.synthetic import write_synthetic_flux

GEO = FluxGeometry(double_blocks=1, single_blocks=1, hidden=256)
PROBES = ["--height", "32", "--width", "32", "--text-tokens", "8", "--device", "cpu"]
REPO = Path(__file__).parents[2]
TIMEOUT_S = 600  # a loaded 2-core box: each child imports torch, diffusers and numba


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    return write_synthetic_flux(tmp_path_factory.mktemp("dist") / "flux.safetensors", GEO, dtype="BF16",
                                structured=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    env.pop("WORLD_SIZE", None)
    return {**env, **extra}


def launch(world: int, *args: object, cwd: list[Path] | None = None) -> list[subprocess.CompletedProcess]:
    """``python -m converter.cli ARGS`` as ``world`` ranks, with the variables torchrun sets."""
    port = str(_free_port())
    procs = []
    for rank in range(world):
        env = _env(MASTER_ADDR="127.0.0.1", MASTER_PORT=port, WORLD_SIZE=str(world), RANK=str(rank),
                   LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
        procs.append(subprocess.Popen([sys.executable, "-m", "converter.cli", *map(str, args)], env=env,
                                      cwd=cwd[rank] if cwd else None, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    done = []
    for p in procs:
        out, err = p.communicate(timeout=TIMEOUT_S)
        done.append(subprocess.CompletedProcess(p.args, p.returncode, out, err))
    return done


def single(*args: object) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "converter.cli", *map(str, args)], env=_env(), capture_output=True,
                          text=True, timeout=TIMEOUT_S)


def test_one_two_and_three_ranks_write_the_same_bytes(src, tmp_path):
    one = single("imatrix", src, "-o", tmp_path / "1.gguf", "--probes", "5", *PROBES, "--json")
    assert one.returncode == 0, one.stderr
    for world in (2, 3):  # 5 probes: the last round leaves ranks without a sample
        runs = launch(world, "imatrix", src, "-o", tmp_path / f"{world}.gguf", "--probes", "5", *PROBES)
        assert [r.returncode for r in runs] == [0] * world, [r.stderr for r in runs]
        assert runs[0].stdout.startswith(f"wrote {tmp_path / f'{world}.gguf'}: 13 tensors, 5 transformer calls, ")
        assert f" on {world} x cpu " in runs[0].stdout
        assert all(r.stdout == "" and r.stderr == "" for r in runs[1:])  # progress and results: rank 0 only
        assert (tmp_path / f"{world}.gguf").read_bytes() == (tmp_path / "1.gguf").read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["1.gguf", "2.gguf", "3.gguf"]  # no partial left


def test_torchrun_itself_starts_the_ranks(src, tmp_path):
    """The documented command: torchrun's own rendezvous, ``-m converter.cli``; also on an inputs file."""
    from converter.quality.calibrate import capture_transformer_inputs, build_transformer, probe_samples, write_inputs_file
    from converter.quality.probes import ProbeSpec
    from converter.sources import open_source
    import torch

    with open_source(src) as s:
        model = build_transformer(GEO, s.read, "cpu")
    with capture_transformer_inputs(model) as calls, torch.inference_mode():
        for smp in probe_samples(3, ProbeSpec(height=32, width=32, text_tokens=8, seed=7), "cpu", torch.float32, True):
            model(**smp.kwargs, return_dict=False)
    inputs = write_inputs_file(calls, tmp_path / "inputs.safetensors")
    one = single("imatrix", src, "-o", tmp_path / "1.gguf", "--inputs", inputs, "--device", "cpu")
    assert one.returncode == 0, one.stderr
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          "-m", "converter.cli", "imatrix", str(src), "-o", str(tmp_path / "2.gguf"), "--inputs",
                          str(inputs), "--device", "cpu", "--json"],
                         env=_env(), capture_output=True, text=True, timeout=TIMEOUT_S)
    assert run.returncode == 0, run.stderr
    import json

    summary = json.loads(run.stdout)  # one JSON document: rank 1 printed nothing
    assert summary["ranks"] == 2 and summary["samples"] == 3 and summary["inputs"] == "file"
    assert (tmp_path / "2.gguf").read_bytes() == (tmp_path / "1.gguf").read_bytes()


def test_a_failing_rank_stops_every_rank_with_its_reason(src, tmp_path):
    """Rank 1's host lacks the checkpoint (its working folder has none): both exit 1, rank 0 says why."""
    here, there = tmp_path / "a", tmp_path / "b"
    here.mkdir()
    there.mkdir()
    (here / "flux.safetensors").symlink_to(src)
    runs = launch(2, "imatrix", "flux.safetensors", "-o", "out.gguf", "--probes", "2", *PROBES, cwd=[here, there])
    assert [r.returncode for r in runs] == [1, 1]
    assert runs[0].stdout == "" and runs[1].stdout == "" and runs[1].stderr == ""
    reason = single("imatrix", there / "flux.safetensors", "-o", there / "x.gguf", *PROBES)
    assert reason.returncode == 1
    expected = reason.stderr.removeprefix("Error: ").replace(str(there / "flux.safetensors"), "flux.safetensors")
    assert runs[0].stderr == f"Error: rank 1: {expected}"
    assert runs[0].stderr.count("\n") == 1
    assert sorted(p.name for p in here.iterdir()) == ["flux.safetensors"] and not any(there.iterdir())


def test_ranks_that_see_different_inputs_are_refused(src, tmp_path):
    """Work is shared out by index: rank 1 with another probe count would deadlock; it is refused instead."""
    port = str(_free_port())
    procs = []
    for rank, probes in enumerate(("2", "3")):
        env = _env(MASTER_ADDR="127.0.0.1", MASTER_PORT=port, WORLD_SIZE="2", RANK=str(rank), LOCAL_RANK=str(rank))
        procs.append(subprocess.Popen([sys.executable, "-m", "converter.cli", "imatrix", str(src), "-o",
                                       str(tmp_path / "x.gguf"), "--probes", probes, *PROBES], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    results = [p.communicate(timeout=TIMEOUT_S) for p in procs]
    assert [p.returncode for p in procs] == [1, 1]
    assert results[0] == ("", "Error: rank 1 sees (samples, image tokens, text tokens) (3, 0, 0) where rank 0 sees "
                              "(2, 0, 0); every rank needs the same inputs\n")
    assert results[1] == ("", "")
    assert not any(tmp_path.iterdir())


def test_sensitivity_on_two_ranks_writes_the_file_one_writes_and_the_imatrix_of_its_pass(src, tmp_path):
    """sensitivity --imatrix-out: the imatrix file is the one flux-gguf imatrix writes on the same probes,
    and the sensitivity file (weighted with it) is the same for 1 and 2 ranks."""
    probes = ["--probes", "2", *PROBES, "--check-tensors", "3"]
    alone = single("imatrix", src, "-o", tmp_path / "alone.gguf", "--probes", "2", *PROBES)
    assert alone.returncode == 0, alone.stderr
    one = single("sensitivity", src, "-o", tmp_path / "1.json", "--imatrix-out", tmp_path / "1.gguf", *probes)
    assert one.returncode == 0, one.stderr
    runs = launch(2, "sensitivity", src, "-o", tmp_path / "2.json", "--imatrix-out", tmp_path / "2.gguf", *probes)
    assert [r.returncode for r in runs] == [0, 0], [r.stderr for r in runs]
    assert runs[1].stdout == "" and runs[1].stderr == ""
    assert (tmp_path / "1.gguf").read_bytes() == (tmp_path / "2.gguf").read_bytes() == \
        (tmp_path / "alone.gguf").read_bytes()
    import json

    a, b = (json.loads((tmp_path / f"{n}.json").read_text()) for n in (1, 2))
    assert a["imatrix"]["file"] == "1.gguf" and b["imatrix"]["file"] == "2.gguf"
    a["imatrix"]["file"] = b["imatrix"]["file"]
    assert a == b and len(a["tensors"]) == 13 and a["check"]["pairs"] == 9


CHILD = """
import sys, torch
from converter.errors import CalibrationError
from converter.layout import FluxGeometry, bfl_tensor_shapes
from converter.quality.calibrate import ImatrixCollector, _collect_rounds, build_transformer, probe_sample, quantized_weight_names
from converter.quality.distributed import open_ranks
from converter.quality.probes import ProbeSpec
from converter.sources import open_source

geo = FluxGeometry(double_blocks=1, single_blocks=1, hidden=256)
spec = ProbeSpec(height=32, width=32, text_tokens=8)
with open_ranks("cpu") as ranks, open_source(sys.argv[1]) as s:
    model = build_transformer(geo, s.read, "cpu")
    def run_one(i):
        if i == 3:
            raise CalibrationError("sample 3 is bad")
        p = probe_sample(i, 6, spec, "cpu", torch.float32, True)
        model(**p.kwargs, return_dict=False)
        return p.tokens, 1
    with ImatrixCollector(model, quantized_weight_names(bfl_tensor_shapes(geo))) as c:
        try:
            _collect_rounds(ranks, c, 6, run_one, None)
        except CalibrationError as e:
            print(type(e).__name__, e)
            sys.exit(1)
"""


def test_a_sample_that_fails_on_one_rank_stops_every_rank_in_that_round(src):
    """Sample 3 runs on rank 1 of 2 (round 1): rank 1 raises its own error, rank 0 RankFailed with its reason."""
    port = str(_free_port())
    procs = [subprocess.Popen([sys.executable, "-c", CHILD, str(src)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env=_env(MASTER_ADDR="127.0.0.1", MASTER_PORT=port, WORLD_SIZE="2",
                                                  RANK=str(r), LOCAL_RANK=str(r)))
             for r in range(2)]
    outs = [p.communicate(timeout=TIMEOUT_S)[0] for p in procs]
    assert [p.returncode for p in procs] == [1, 1]
    assert outs == ["RankFailed rank 1: sample 3 is bad\n", "CalibrationError sample 3 is bad\n"]
