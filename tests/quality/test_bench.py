"""bench: records, the markdown table, a CPU run on the small model, and scripts/gpu_table.py --tiny."""
from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import pytest
from click.testing import CliRunner

from converter import __version__
from converter.cli import main
from converter.cli.output import VERSION_KEY
from converter.errors import ValidationError
from converter.quality.bench import (
    BenchRecord,
    BenchReport,
    bench,
    markdown_table,
    write_bench,
)
from converter.quality.probes import ProbeSpec
from tests.flux_small import small_flux, tiny_flux

PROBE = ProbeSpec(height=32, width=32, text_tokens=16)
REPO = pathlib.Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    return small_flux(tmp_path_factory)


def _report(records):
    return BenchReport(device="cuda", probe=ProbeSpec(), steps=3, warmup=2, records=tuple(records),
                       environment={"gpu": "NVIDIA H100 80GB HBM3"}, date="2026-01-02")


def test_markdown_table_formats_every_column():
    base = BenchRecord("BF16", "flux.safetensors", 23_802_816_640, 41.25, 25 * 2**30, 1.2345, (1.2, 1.3),
                       is_baseline=True)
    q = BenchRecord("Q4_K_M", "flux-Q4_K_M.gguf", 6_932_000_000, 9.0, int(7.5 * 2**30), 2.5, (2.5,), 0.99912345, 0.04321,
                    imatrix="kontext.imatrix.gguf")
    cpu = BenchRecord("Q8_0", "flux-Q8_0.gguf", 1_000, 1.0, None, 0.5, (0.5,))
    lines = markdown_table(_report([base, q, cpu])).splitlines()
    assert lines[0] == ("| file | type | imatrix | size (GB) | load (s) | peak VRAM (GiB) | s/step at 1024x1024 "
                        "| cosine vs BF16 | rel. L2 vs BF16 |")
    assert lines[2] == "| flux.safetensors | BF16 | n/a | 23.803 | 41.2 | 25.00 | 1.234 | reference | reference |"
    assert lines[3] == ("| flux-Q4_K_M.gguf | Q4_K_M | kontext.imatrix.gguf | 6.932 | 9.0 | 7.50 | 2.500 "
                        "| 0.999123 | 0.0432 |")
    assert lines[4] == "| flux-Q8_0.gguf | Q8_0 | none | 0.000 | 1.0 | n/a (CPU) | 0.500 | n/a | n/a |"


def test_bench_refuses_bad_arguments(small, tmp_path_factory):
    with pytest.raises(ValidationError) as e:
        bench([], device="cpu")
    assert str(e.value) == "bench needs at least one GGUF file or --baseline"
    with pytest.raises(ValidationError) as e:
        bench([small.q8_0], steps=0, device="cpu")
    assert str(e.value) == "bench needs at least 1 step and 1 warm-up step, got steps=0, warmup=2"
    tiny = tiny_flux(tmp_path_factory)
    with pytest.raises(ValidationError) as e:
        bench([tiny.q8_0], baseline=small.source, probe=PROBE, device="cpu")
    assert str(e.value).startswith(f"{tiny.q8_0}: its tensors describe FluxGeometry(double_blocks=2, single_blocks=2, "
                                   "hidden=256")
    with pytest.raises(ValidationError) as e:
        bench([tiny.q8_0], probe=PROBE, device="cpu")
    assert str(e.value).startswith("diffusers loads FLUX transformers with hidden size 3072 only")


def test_bench_on_cpu_against_the_bf16_baseline(small, tmp_path):
    lines = []
    report = bench([small.bf16, small.q8_0], baseline=small.source, probe=PROBE, steps=2, warmup=1,
                   device="cpu", log=lines.append)
    base, bf16, q8 = report.records
    assert [r.label for r in report.records] == ["BF16", "BF16", "Q8_0"]
    assert base.is_baseline and base.file == small.source.name and base.cosine is None
    assert base.size_bytes == small.source.stat().st_size and q8.size_bytes == small.q8_0.stat().st_size
    # The BF16 GGUF holds the source's exact weights: identical output.
    assert (bf16.cosine, bf16.rel_l2) == (1.0, 0.0)
    assert q8.cosine > 0.999 and 0 < q8.rel_l2 < 0.05
    for r in report.records:
        assert r.peak_memory_bytes is None  # CPU: no CUDA allocator to ask
        assert len(r.step_seconds) == 2 and r.seconds_per_step > 0 and r.load_seconds > 0
    assert report.device == "cpu" and report.probe == PROBE
    assert any(line.startswith(f"{small.q8_0.name}: load ") for line in lines)

    js, md = write_bench(report, tmp_path / "out")
    doc = json.loads(js.read_text())
    assert doc["schema_version"] == 1 and doc["probe"]["image_tokens"] == 8
    assert [r["label"] for r in doc["records"]] == ["BF16", "BF16", "Q8_0"]
    assert md.read_text() == markdown_table(report)


def test_cli_bench_without_baseline(small, tmp_path):
    res = CliRunner().invoke(main, ["bench", str(small.q8_0), "--device", "cpu", "--height", "32", "--width", "32",
                                    "--text-tokens", "16", "--steps", "1", "--warmup", "1", "-o", str(tmp_path)])
    assert res.exit_code == 0, res.output
    rows = res.stdout.strip().splitlines()
    assert rows[0].startswith("| file | type |") and len(rows) == 3
    assert rows[2].startswith(f"| {small.q8_0.name} | Q8_0 | ") and rows[2].endswith("| n/a | n/a |")
    assert (tmp_path / "bench.json").is_file() and (tmp_path / "bench.md").read_text() == res.stdout


def test_cli_bench_json(small):
    res = CliRunner().invoke(main, ["bench", str(small.q8_0), "--device", "cpu", "--height", "32", "--width", "32",
                                    "--text-tokens", "16", "--steps", "1", "--warmup", "1", "--json"])
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    assert doc[VERSION_KEY] == __version__
    assert [r["label"] for r in doc["records"]] == ["Q8_0"] and doc["schema_version"] == 1


def test_cli_bench_error_line():
    res = CliRunner().invoke(main, ["bench", "--device", "cpu"])
    assert res.exit_code == 1
    assert res.output.strip().splitlines()[-1] == "Error: bench needs at least one GGUF file or --baseline"


def test_gpu_table_script_runs_tiny_on_cpu(tmp_path):
    """The GPU script end to end at the smallest geometry diffusers loads, so it is known to work."""
    env = dict(os.environ, HF_HUB_OFFLINE="1")

    def run(*extra):
        return subprocess.run(
            [sys.executable, str(REPO / "scripts" / "gpu_table.py"), str(tmp_path / "work"), str(tmp_path / "out"),
             "--tiny", "--variants", "Q8_0,Q4_K_M", "--warmup", "1", *extra],
            capture_output=True, text=True, env=env, cwd=REPO, timeout=1800,
        )

    res = run("--steps", "1")
    assert res.returncode == 0, res.stderr[-3000:]
    doc = json.loads((tmp_path / "out" / "benchmarks.json").read_text())
    assert [r["label"] for r in doc["bench"]["records"]] == ["BF16", "Q8_0", "Q4_K_M"]
    assert doc["convert"]["seconds"] > 0 and doc["convert"]["variants"] == ["Q8_0", "Q4_K_M"]
    md = (tmp_path / "out" / "benchmarks.md").read_text()
    assert "random weights" in md and "| flux1-kontext-dev-synthetic-Q4_K_M.gguf | Q4_K_M |" in md
    assert "python scripts/gpu_table.py" in md
    assert "converted" in res.stdout  # progress lines
    # A rerun resumes: every file measured before is kept, nothing is loaded again.
    again = run("--steps", "1", "--stage", "bench")
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.count("measured before, kept") == 3 and "loading on" not in again.stdout
    # Results made with other settings are never mixed in.
    other = run("--steps", "2", "--stage", "report")
    assert other.returncode == 1
    assert f"Error: {tmp_path / 'out' / 'benchmarks.json'} holds results made with other settings" in other.stderr
