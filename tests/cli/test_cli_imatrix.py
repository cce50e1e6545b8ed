"""``convert --imatrix``: one-line errors for bad importance matrices, the dry run says what it uses."""
from __future__ import annotations

import json
import struct

import numpy as np
import pytest
from click.testing import CliRunner
from gguf import GGUFReader
from imatrix_fixtures import synthetic_imatrix, write_synthetic_imatrix

from converter.cli import main
from converter.imatrix import ImatrixEntry, write_imatrix, write_imatrix_legacy
from converter.layout import FluxGeometry
from converter.synthetic import write_synthetic_flux

GEO = FluxGeometry(double_blocks=1, single_blocks=1, hidden=256)


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    return write_synthetic_flux(tmp_path_factory.mktemp("src") / "tiny.safetensors", GEO, seed=6)


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def assert_error(result, line):
    assert result.exit_code == 1, result.output
    assert result.stdout == ""
    assert result.stderr == f"Error: {line}\n"


def test_dry_run_reports_the_imatrix_and_exact_sizes(src, tmp_path):
    imx = write_synthetic_imatrix(src, tmp_path / "a.imatrix.gguf")
    r = run("convert", src, "-o", tmp_path / "out", "--variant", "Q4_K_M", "--imatrix", imx, "--dry-run")
    assert r.exit_code == 0, r.output
    assert f"K-quant tensors quantized with the importance matrix {imx} (" in r.stdout
    assert "calibrated on: test:seed=0" in r.stdout
    plan_doc = json.loads(run("convert", src, "-o", tmp_path / "out", "--variant", "Q4_K_M", "--imatrix", imx,
                          "--dry-run", "--json").stdout)
    plan = plan_doc["plans"][0]
    done = json.loads(run("convert", src, "-o", tmp_path / "out", "--variant", "Q4_K_M", "--imatrix", imx,
                          "--json").stdout)["artifacts"][0]
    assert plan["size"] == done["size"] == (tmp_path / "out" / "tiny-Q4_K_M.gguf").stat().st_size
    info = json.loads(run("convert", src, "-o", tmp_path / "out2", "--variant", "Q4_K_M", "--imatrix", imx,
                          "--dry-run", "--json").stdout)["imatrix"]
    assert info == {"files": [str(imx)], "entries": len(synthetic_imatrix(src).entries), "datasets": ["test:seed=0"], "chunk_count": 4,
                    "chunk_size": 1280}


def test_sd_cpp_dat_works_like_the_gguf_it_came_from(src, tmp_path):
    """A file stable-diffusion.cpp writes (prefixed names, mean·ncall values) quantizes the same."""
    im = synthetic_imatrix(src, 3)
    write_imatrix(im, tmp_path / "a.gguf")
    write_imatrix_legacy(im, tmp_path / "a.dat", sd_cpp=True)
    for name in ("a.gguf", "a.dat"):
        r = run("convert", src, "-o", tmp_path / name.replace(".", "_"), "--variant", "Q3_K_S", "--imatrix", tmp_path / name)
        assert r.exit_code == 0, r.output
    a, b = (GGUFReader(tmp_path / d / "tiny-Q3_K_S.gguf") for d in ("a_gguf", "a_dat"))
    assert {t.name: bytes(t.data.reshape(-1).view("u1")) for t in a.tensors} == \
           {t.name: bytes(t.data.reshape(-1).view("u1")) for t in b.tensors}
    assert b.fields["quantize.imatrix.file"].contents() == "a.dat"
    assert "quantize.imatrix.dataset" not in b.fields  # sd.cpp's .dat records no dataset


def test_missing_imatrix_file(src, tmp_path):
    assert_error(run("convert", src, "-o", tmp_path / "out", "--variant", "Q4_K_M", "--imatrix", tmp_path / "no.gguf"),
                 f"{tmp_path / 'no.gguf'}: cannot read the importance matrix (No such file or directory)")
    assert not (tmp_path / "out").exists()


def test_nan_entry_is_one_line(src, tmp_path):
    im = synthetic_imatrix(src)
    im.entries["single_blocks.0.linear1.weight"].in_sum2[7] = np.nan
    # write it the way a broken collector would: bypassing our own writer's check
    path = tmp_path / "nan.dat"
    name = b"single_blocks.0.linear1.weight"
    vals = im.entries["single_blocks.0.linear1.weight"].in_sum2
    path.write_bytes(struct.pack("<ii", 1, len(name)) + name + struct.pack("<ii", 4, vals.size) + vals.astype("<f4").tobytes())
    assert_error(run("convert", src, "-o", tmp_path / "out", "--variant", "Q4_K_M", "--imatrix", path),
                 f"{path}: entry single_blocks.0.linear1.weight holds a non-finite sum (nan) at column 7")


def test_imatrix_of_another_model(src, tmp_path):
    im = synthetic_imatrix(src)
    im.entries["double_blocks.0.img_mlp.2.weight"] = ImatrixEntry(np.ones(12288, np.float32), 5.0)
    write_imatrix(im, tmp_path / "big.gguf")
    assert_error(run("convert", src, "-o", tmp_path / "out", "--variant", "Q4_K_M", "--imatrix", tmp_path / "big.gguf"),
                 f"{tmp_path / 'big.gguf'}: tensor double_blocks.0.img_mlp.2.weight has 1024 input columns but its "
                 "entry has 12288 (an importance matrix for another model?)")
    assert not (tmp_path / "out").exists()
