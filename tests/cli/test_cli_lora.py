"""flux-gguf convert --lora PATH[:STRENGTH]: LoRAs merged before quantizing, recorded in the header."""
from __future__ import annotations

import hashlib
import json

import gguf
import numpy as np
import pytest
from click.testing import CliRunner
from lora_fixtures import GEO, make_truth, write_diffusers, write_kohya

import quant_kernels
from converter.cli import main
from converter.layout import FluxGeometry
from converter.lora.merge import LoraSpec, build_merger
from converter.sources import open_source
from converter.synthetic import write_synthetic_flux


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli-lora")
    write_synthetic_flux(root / "tiny.safetensors", GEO, seed=5)
    write_kohya(root / "a.safetensors", make_truth(GEO, seed=6))
    write_diffusers(root / "b.safetensors", make_truth(GEO, seed=7))
    return root


def _kv(reader: gguf.GGUFReader, key: str) -> str:
    field = reader.fields[key]
    return bytes(field.parts[field.data[0]]).decode()


def test_two_loras_stack_and_are_recorded(files, tmp_path):
    out = tmp_path / "out"
    r = CliRunner().invoke(main, ["convert", str(files / "tiny.safetensors"), "-o", str(out), "--variant", "Q4_K_M",
                                  "--lora", f"{files / 'a.safetensors'}:0.5", "--lora", str(files / "b.safetensors")])
    assert r.exit_code == 0, r.output
    reader = gguf.GGUFReader(out / "tiny-Q4_K_M.gguf")
    recorded = json.loads(_kv(reader, "flux_gguf.loras"))
    assert recorded == [
        {"name": "a", "sha256": hashlib.sha256((files / "a.safetensors").read_bytes()).hexdigest(),
         "strength": 0.5, "format": "kohya"},
        {"name": "b", "sha256": hashlib.sha256((files / "b.safetensors").read_bytes()).hexdigest(),
         "strength": 1.0, "format": "diffusers"},
    ]
    with open_source(files / "tiny.safetensors") as src:
        shapes = {n: t.shape for n, t in src.tensors.items()}
        merger = build_merger([LoraSpec(files / "a.safetensors", 0.5), LoraSpec(files / "b.safetensors", 1.0)], shapes)
        tensors = {t.name: t for t in reader.tensors}
        for name in ("double_blocks.0.txt_attn.qkv.weight", "single_blocks.0.linear2.weight"):
            merged = merger(name, src.read(name))
            qtype = tensors[name].tensor_type.name
            assert np.array_equal(np.asarray(tensors[name].data).reshape(-1),
                                  quant_kernels.quantize(merged, qtype).reshape(-1)), name


def test_dry_run_validates_the_lora_against_the_source(files, tmp_path):
    big = FluxGeometry(double_blocks=1, single_blocks=1, hidden=512)
    write_kohya(tmp_path / "wide.safetensors", make_truth(big, seed=8), big)
    r = CliRunner().invoke(main, ["convert", str(files / "tiny.safetensors"), "-o", str(tmp_path / "o"),
                                  "--variant", "Q8_0", "--dry-run", "--lora", str(tmp_path / "wide.safetensors")])
    assert r.exit_code == 1
    assert r.output.startswith(f"Error: {tmp_path / 'wide.safetensors'} (kohya): ")
    assert not (tmp_path / "o").exists()


def test_missing_lora_file_and_bad_strength(files, tmp_path):
    r = CliRunner().invoke(main, ["convert", str(files / "tiny.safetensors"), "-o", str(tmp_path / "o"),
                                  "--variant", "Q8_0", "--lora", str(tmp_path / "none.safetensors")])
    assert r.exit_code == 1 and "none.safetensors" in r.output and r.output.startswith("Error: ")
    r = CliRunner().invoke(main, ["convert", str(files / "tiny.safetensors"), "-o", str(tmp_path / "o"),
                                  "--variant", "Q8_0", "--lora", f"{files / 'a.safetensors'}:strong"])
    assert r.exit_code == 1
    assert "invalid LoRA strength 'strong'" in r.output
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())


def test_inspect_shows_the_merged_loras(files, tmp_path):
    out = tmp_path / "out"
    r = CliRunner().invoke(main, ["convert", str(files / "tiny.safetensors"), "-o", str(out), "--variant", "Q8_0",
                                  "--lora", f"{files / 'a.safetensors'}:0.25"])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(main, ["inspect", str(out / "tiny-Q8_0.gguf")])
    assert r.exit_code == 0, r.output
    line = next(x for x in r.output.splitlines() if x.startswith("flux_gguf.loras: "))
    assert json.loads(line.removeprefix("flux_gguf.loras: "))[0]["strength"] == 0.25
