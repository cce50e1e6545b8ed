"""Hostile importance matrices and calibration inputs (issues 26 and 28): every reader of an imatrix
(``convert --imatrix``, ``--dry-run``, ``release build``, ``verify --source --imatrix``), ``inspect``
and ``imatrix --inputs`` refuse devices, FIFOs, oversized or sparse files, count bombs and
overlapping tensor data in one ``Error:`` line, exit 1, leaving nothing under a final name; and
names read from such files reach the terminal escaped. Every input is generated here.

Cases that could hang or allocate without bound run in a child process with a wall-clock timeout
and an address-space cap (a regression fails the test instead of stalling the suite); there are
no timed assertions.
"""
from __future__ import annotations

import json
import os
import resource
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from imatrix_fixtures import synthetic_imatrix

from converter.cli import main
from converter.errors import CalibrationError, ImatrixError
from converter.imatrix import MAX_IMATRIX_BYTES, MAX_IMATRIX_ENTRIES, read_imatrix, write_imatrix
from converter.layout import FluxGeometry
from converter.quality.calibrate import MAX_TEXT_TOKENS, read_inputs_file
from converter.release.build import build_release
from converter.synthetic import write_synthetic_flux

GEO = FluxGeometry(double_blocks=1, single_blocks=1, hidden=256)
CHILD_TIMEOUT_S = 120  # generous: a loaded 2-core box needs seconds just to import numba and torch
MEMORY_LIMIT = 2 << 30
NOT_REGULAR = "cannot read the importance matrix (not a regular file)"


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    return write_synthetic_flux(tmp_path_factory.mktemp("src") / "tiny.safetensors", GEO, seed=5)


def _limit_memory() -> None:  # runs in the child before exec
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))


def run_child(*args: object) -> subprocess.CompletedProcess:
    """``flux-gguf ARGS`` in a child with a timeout and a memory cap (raises TimeoutExpired on a hang)."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(__file__).parents[2]), os.environ.get("PYTHONPATH", "")]))
    return subprocess.run([sys.executable, "-c", "from converter.cli import main; main()", *map(str, args)],
                          capture_output=True, text=True, timeout=CHILD_TIMEOUT_S, env=env,
                          preexec_fn=_limit_memory)


def child_error(proc: subprocess.CompletedProcess, line: str) -> None:
    assert proc.returncode == 1, proc.stderr
    assert proc.stdout == ""
    assert proc.stderr == f"Error: {line}\n"


def run(*args: object):
    return CliRunner().invoke(main, [str(a) for a in args])


def listing(folder: Path) -> list[str]:
    """Everything in ``folder`` (a failed run must leave no final name, partial or lock file)."""
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


# ---- GGUF bytes, by hand -----------------------------------------------------------------------

def _s(text: str) -> bytes:
    raw = text.encode("utf-8")
    return struct.pack("<Q", len(raw)) + raw


def _kv_string(key: str, value: str) -> bytes:
    return _s(key) + struct.pack("<I", 8) + _s(value)


def _tensor(name: str, dims: list[int], offset: int, ggml_type: int = 0) -> bytes:
    return (_s(name) + struct.pack("<I", len(dims)) + b"".join(struct.pack("<Q", d) for d in dims)
            + struct.pack("<IQ", ggml_type, offset))


def _header(kvs: list[bytes], tensors: list[bytes]) -> bytes:
    head = b"GGUF" + struct.pack("<IQQ", 3, len(tensors), len(kvs)) + b"".join(kvs) + b"".join(tensors)
    return head + bytes(-len(head) % 32)


def _f32(*values: float) -> bytes:
    raw = struct.pack(f"<{len(values)}f", *values)
    return raw + bytes(-len(raw) % 32)


TYPE_KV = _kv_string("general.type", "imatrix")
ONE_ENTRY = [_tensor("w.in_sum2", [4, 1], 0), _tensor("w.counts", [1, 1], 32)]
ONE_ENTRY_DATA = _f32(1, 2, 3, 4) + _f32(8)


def _sparse(path: Path, head: bytes, size: int) -> Path:
    """``head`` followed by a hole up to ``size`` bytes (truncate: no disk space used)."""
    path.write_bytes(head)
    os.truncate(path, size)
    return path


@pytest.fixture
def fifo(tmp_path):
    """A FIFO with a writer that never writes: a reader that waits for data waits forever."""
    path = tmp_path / "pipe.imatrix.gguf"
    os.mkfifo(path)
    writer = os.open(path, os.O_RDWR | os.O_NONBLOCK)
    yield path
    os.close(writer)


# ---- devices, FIFOs and links to them: refused at once, by every reader ------------------------

def test_dev_zero_as_imatrix_is_refused_at_once(src, tmp_path):
    out = tmp_path / "out"
    proc = run_child("convert", src, "-o", out, "--variant", "Q4_K_M", "--imatrix", "/dev/zero", "--dry-run")
    child_error(proc, f"/dev/zero: {NOT_REGULAR}")
    assert listing(out) == []


def test_a_link_to_dev_urandom_as_imatrix_is_refused_at_once(src, tmp_path):
    link = tmp_path / "calib.imatrix.gguf"
    link.symlink_to("/dev/urandom")
    out = tmp_path / "out"
    proc = run_child("convert", src, "-o", out, "--variant", "Q4_K_M", "--imatrix", link)
    child_error(proc, f"{link}: {NOT_REGULAR}")
    assert listing(out) == []


def test_a_fifo_as_imatrix_is_refused_without_waiting_for_its_writer(src, tmp_path, fifo):
    out = tmp_path / "out"
    proc = run_child("convert", src, "-o", out, "--variant", "Q4_K_M", "--imatrix", fifo)
    child_error(proc, f"{fifo}: {NOT_REGULAR}")
    assert listing(out) == []


def test_a_fifo_as_calibration_inputs_is_refused_before_the_model_loads(src, tmp_path, fifo):
    out = tmp_path / "x.imatrix.gguf"
    proc = run_child("imatrix", src, "-o", out, "--inputs", fifo, "--device", "cpu")
    child_error(proc, f"{fifo}: not a regular file (a FIFO, device or socket cannot be an inputs file)")
    assert not out.exists()


def test_devices_and_links_to_them_are_refused_as_calibration_inputs(tmp_path):
    link = tmp_path / "inputs.safetensors"
    link.symlink_to("/dev/urandom")
    for path in ("/dev/zero", link):
        with pytest.raises(CalibrationError) as e:
            read_inputs_file(path)
        assert str(e.value) == f"{path}: not a regular file (a FIFO, device or socket cannot be an inputs file)"


def test_a_link_to_a_regular_imatrix_is_followed(src, tmp_path):
    real = tmp_path / "real.imatrix.gguf"
    write_imatrix(synthetic_imatrix(src, 1), real)
    link = tmp_path / "link.imatrix.gguf"
    link.symlink_to(real)
    r = run("convert", src, "-o", tmp_path / "out", "--variant", "Q4_K_M", "--imatrix", link, "--dry-run")
    assert r.exit_code == 0, r.output
    assert f"importance matrix {link} (" in r.stdout


# ---- oversized and sparse files: refused by their size or structure, not read -------------------

def test_a_sparse_2_gib_gguf_imatrix_is_refused_by_its_size(src, tmp_path):
    path = _sparse(tmp_path / "big.imatrix.gguf", _header([TYPE_KV], ONE_ENTRY) + ONE_ENTRY_DATA, 2 << 30)
    proc = run_child("convert", src, "-o", tmp_path / "out", "--variant", "Q4_K_M", "--imatrix", path, "--dry-run")
    child_error(proc, f"{path}: 2,147,483,648 bytes is larger than any importance matrix (at most "
                      f"{MAX_IMATRIX_BYTES:,} bytes are read; a FLUX.1 imatrix is about 7 MB)")
    assert listing(tmp_path / "out") == []


def test_a_sparse_3_gib_legacy_imatrix_is_refused_by_its_size(src, tmp_path):
    path = _sparse(tmp_path / "big.dat", struct.pack("<ii", 1, 4) + b"w.we", 3 << 30)
    proc = run_child("convert", src, "-o", tmp_path / "out", "--variant", "Q4_K_M", "--imatrix", path)
    child_error(proc, f"{path}: 3,221,225,472 bytes is larger than any importance matrix (at most "
                      f"{MAX_IMATRIX_BYTES:,} bytes are read; a FLUX.1 imatrix is about 7 MB)")
    assert listing(tmp_path / "out") == []


def test_a_mostly_empty_gguf_imatrix_under_the_cap_is_refused_by_its_structure(src, tmp_path):
    body = _header([TYPE_KV], ONE_ENTRY) + ONE_ENTRY_DATA
    path = _sparse(tmp_path / "holes.imatrix.gguf", body, 40 << 20)
    proc = run_child("convert", src, "-o", tmp_path / "out", "--variant", "Q4_K_M", "--imatrix", path, "--dry-run")
    child_error(proc, f"{path}: {(40 << 20) - len(body)} bytes after the data of the last tensor belong to no tensor")


def test_a_release_spec_with_a_sparse_imatrix_builds_nothing(src, tmp_path):
    project = tmp_path / "project"
    (project / "calib").mkdir(parents=True)
    _sparse(project / "calib" / "big.imatrix.gguf", _header([TYPE_KV], ONE_ENTRY) + ONE_ENTRY_DATA, 1 << 30)
    spec = project / "release.toml"
    spec.write_text(f'name = "cal"\nsource = "{src}"\nbase_model = "black-forest-labs/FLUX.1-Kontext-dev"\n'
                    'variants = ["Q4_K_M"]\nimatrix = "calib/big.imatrix.gguf"\n\n[card]\nlicense = "other"\n')
    dist = tmp_path / "dist"
    dist.mkdir()
    proc = run_child("release", "build", spec, "-o", dist / "cal")
    child_error(proc, f"{project / 'calib' / 'big.imatrix.gguf'}: 1,073,741,824 bytes is larger than any importance "
                      f"matrix (at most {MAX_IMATRIX_BYTES:,} bytes are read; a FLUX.1 imatrix is about 7 MB)")
    assert listing(dist) == []


def test_verify_source_with_dev_zero_as_imatrix_is_one_line(src, tmp_path):
    spec = tmp_path / "release.toml"
    spec.write_text(f'name = "st"\nsource = "{src}"\nbase_model = "black-forest-labs/FLUX.1-Kontext-dev"\n'
                    'variants = ["Q8_0"]\n\n[card]\nlicense = "other"\n')
    release = tmp_path / "dist"
    build_release(spec, release)
    before = listing(release)
    proc = run_child("verify", release, "--source", src, "--imatrix", "/dev/zero")
    child_error(proc, f"/dev/zero: {NOT_REGULAR}")
    assert listing(release) == before


# ---- count bombs, overlapping data, crafted layouts ----------------------------------------------

def test_a_uint8_array_of_2_to_the_40_elements_is_refused_by_the_bytes_present(src, tmp_path):
    kv = _s("general.x") + struct.pack("<IIQ", 9, 0, 1 << 40)
    head = b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + kv
    path = _sparse(tmp_path / "bomb.imatrix.gguf", head, 60 << 20)
    proc = run_child("convert", src, "-o", tmp_path / "out", "--variant", "Q4_K_M", "--imatrix", path, "--dry-run")
    left = (60 << 20) - len(head)
    child_error(proc, f"{path}: not a readable GGUF file (the element count of the value of 'general.x' is "
                      f"1099511627776, but {left} bytes cannot hold that many (at byte {len(head)} of {60 << 20}))")


def test_millions_of_empty_dataset_names_are_refused_before_they_are_walked(src, tmp_path):
    n = 7_000_000  # 8 bytes each (an empty string's length): 56 MB of holes
    head = b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + _s("imatrix.datasets") + struct.pack("<IIQ", 9, 8, n)
    path = _sparse(tmp_path / "names.imatrix.gguf", head, len(head) + 8 * n)
    proc = run_child("convert", src, "-o", tmp_path / "out", "--variant", "Q4_K_M", "--imatrix", path, "--dry-run")
    child_error(proc, f"{path}: not a readable GGUF file (the value of 'imatrix.datasets' takes the header past "
                      f"{4 * MAX_IMATRIX_ENTRIES:,} entries, tensors and array elements in all, more than this tool "
                      f"reads (at byte {len(head)} of {len(head) + 8 * n}))")


def test_inspect_refuses_a_string_array_bomb_in_bounded_memory(tmp_path):
    n = 100_000_000  # gguf-py built several objects per element: tens of GB
    head = b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + _s("tokenizer.ggml.tokens") + struct.pack("<IIQ", 9, 8, n)
    path = _sparse(tmp_path / "tokens.gguf", head, len(head) + 8 * n)
    proc = run_child("inspect", path)
    child_error(proc, f"{path} is not a readable GGUF file: the value of 'tokenizer.ggml.tokens' takes the header past "
                      f"1,048,576 entries, tensors and array elements in all, more than this tool reads "
                      f"(at byte {len(head)} of {len(head) + 8 * n})")


def test_tensors_sharing_one_data_region_are_refused_before_it_is_read_twice(src, tmp_path):
    n_cols = 1 << 18  # 1 MiB of sums; 1000 tensors over it would have been read as 1 GB
    tensors = [_tensor(f"w{i}.in_sum2", [n_cols, 1], 0) for i in range(1000)]
    path = tmp_path / "overlap.imatrix.gguf"
    path.write_bytes(_header([TYPE_KV], tensors) + bytes(4 * n_cols))
    proc = run_child("convert", src, "-o", tmp_path / "out", "--variant", "Q4_K_M", "--imatrix", path, "--dry-run")
    child_error(proc, f"{path}: the data of tensor w1.in_sum2 starts at offset 0, inside the data before it "
                      f"(expected {4 * n_cols}: tensor data follows in order, without overlap)")


def test_a_legacy_file_claiming_a_million_entries_is_refused_before_walking_them(src, tmp_path):
    path = _sparse(tmp_path / "many.dat", struct.pack("<i", 1 << 20), 60 << 20)
    proc = run_child("convert", src, "-o", tmp_path / "out", "--variant", "Q4_K_M", "--imatrix", path, "--dry-run")
    child_error(proc, f"{path}: claims 1,048,576 entries; an importance matrix of at most {MAX_IMATRIX_ENTRIES:,} "
                      "weights is read")


@pytest.mark.parametrize("tensors, data, message", [
    ([_tensor("w.in_sum2", [4, 1], 64), _tensor("w.counts", [1, 1], 0)], bytes(96),
     "64 bytes before the data of tensor w.in_sum2 belong to no tensor (its data starts at offset 64, expected 0)"),
    ([_tensor("w.in_sum2", [4, 1], 0), _tensor("w.counts", [1, 1], 64)], bytes(96),
     "32 bytes before the data of tensor w.counts belong to no tensor (its data starts at offset 64, expected 32)"),
    ([_tensor("w.in_sum2", [4, 1], 0), _tensor("w.counts", [1, 1], 0)], bytes(64),
     "the data of tensor w.counts starts at offset 0, inside the data before it (expected 32: tensor data "
     "follows in order, without overlap)"),
    ([_tensor("w.in_sum2", [4, 1], 0, ggml_type=1), _tensor("w.counts", [1, 1], 32)], bytes(64),
     "tensor w.in_sum2 is F16, expected F32"),
    ([_tensor("w.in_sum2", [4, 1], 0), _tensor("w.in_sum2", [4, 1], 32)], bytes(64),
     "tensor w.in_sum2 appears twice"),
])
def test_crafted_tensor_layouts_are_refused_in_one_line(tmp_path, tensors, data, message):
    path = tmp_path / "x.imatrix.gguf"
    path.write_bytes(_header([TYPE_KV], tensors) + data)
    with pytest.raises(ImatrixError) as e:
        read_imatrix(path)
    assert str(e.value) == f"{path}: {message}"


def test_dimensions_claiming_2_to_the_62_bytes_are_refused_by_the_bytes_present(tmp_path):
    path = tmp_path / "x.imatrix.gguf"
    head = _header([TYPE_KV], [_tensor("w.in_sum2", [1 << 40, 1 << 20], 0)])
    path.write_bytes(head + bytes(32))
    with pytest.raises(ImatrixError) as e:
        read_imatrix(path)
    assert str(e.value) == (f"{path}: truncated: tensor w.in_sum2 needs bytes up to {len(head) + 2 ** 62} but the "
                            f"file has {len(head) + 32}")


def test_the_well_formed_one_entry_file_these_cases_start_from_reads(tmp_path):
    path = tmp_path / "ok.imatrix.gguf"
    path.write_bytes(_header([TYPE_KV], ONE_ENTRY) + ONE_ENTRY_DATA)
    im = read_imatrix(path)
    assert list(im.entries) == ["w"] and im.entries["w"].count == 8.0
    assert im.entries["w"].in_sum2.tolist() == [1, 2, 3, 4]


# ---- calibration inputs whose header claims more than they hold ---------------------------------

def _inputs_header(path: Path, shapes: dict[str, list[int]], dtype: str = "F32") -> Path:
    """A safetensors inputs file with these shapes, its data a hole (truncate)."""
    header, offset = {}, 0
    for key, shape in shapes.items():
        n = 4 * int(np.prod(shape))
        header[key] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + n]}
        offset += n
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    return _sparse(path, struct.pack("<Q", len(blob)) + blob, 8 + len(blob) + offset)


def _shapes(samples: int, image_tokens: int, text_tokens: int) -> dict[str, list[int]]:
    return {"hidden_states": [samples, image_tokens, 64], "encoder_hidden_states": [samples, text_tokens, 4096],
            "pooled_projections": [samples, 768], "timestep": [samples], "guidance": [samples],
            "img_ids": [image_tokens, 3], "txt_ids": [text_tokens, 3]}


def test_a_sparse_inputs_file_claiming_4m_image_tokens_is_refused_before_anything_is_read(src, tmp_path):
    path = _inputs_header(tmp_path / "inputs.safetensors", _shapes(1, 4 << 20, 8))
    assert path.stat().st_size > 1 << 30
    out = tmp_path / "x.imatrix.gguf"
    proc = run_child("imatrix", src, "-o", out, "--inputs", path, "--device", "cpu")
    child_error(proc, f"{path}: hidden_states holds 4194304 image tokens per sample; 1 to 32768 are accepted "
                      "(two 2048x2048 latents)")
    assert not out.exists()


def test_more_text_tokens_than_t5_gives_are_refused(tmp_path):
    path = _inputs_header(tmp_path / "inputs.safetensors", _shapes(1, 8, MAX_TEXT_TOKENS + 1))
    with pytest.raises(CalibrationError) as e:
        read_inputs_file(path)
    assert str(e.value) == (f"{path}: encoder_hidden_states holds 513 text tokens per sample; at most 512 are "
                            "accepted (the FLUX pipelines' longest max_sequence_length)")


def test_an_inputs_header_claiming_more_bytes_than_the_file_has_is_refused(tmp_path):
    path = _inputs_header(tmp_path / "inputs.safetensors", _shapes(2, 8, 8))
    os.truncate(path, path.stat().st_size - 4)
    with pytest.raises(CalibrationError) as e:
        read_inputs_file(path)
    assert str(e.value).startswith(f"{path}: not a readable safetensors file (truncated file: tensor txt_ids needs "
                                   "bytes up to ")


# ---- names from files reach the terminal escaped --------------------------------------------------

EVIL = "calib\x1b[2K\r\nError: fake\u202etxt.gguf"
EVIL_SHOWN = "calib\\x1b[2K\\r\\nError: fake\\u202etxt.gguf"


def _assert_clean(text: str) -> None:
    assert "\x1b" not in text and "\r" not in text and "\u202e" not in text
    assert not any(line.startswith("Error:") for line in text.splitlines())


def test_a_dataset_name_is_printed_escaped_by_convert_dry_run(src, tmp_path):
    im = synthetic_imatrix(src, 1)
    im.datasets = [EVIL]
    path = tmp_path / "evil.imatrix.gguf"
    write_imatrix(im, path)
    r = run("convert", src, "-o", tmp_path / "out", "--variant", "Q4_K_M", "--imatrix", path, "--dry-run")
    assert r.exit_code == 0, r.output
    _assert_clean(r.stdout)
    assert f"calibrated on: {EVIL_SHOWN});" in r.stdout
    r = run("convert", src, "-o", tmp_path / "out", "--variant", "Q4_K_M", "--imatrix", path, "--dry-run", "--json")
    assert json.loads(r.stdout)["imatrix"]["datasets"] == [EVIL]  # JSON carries the name itself, escaped by JSON


def test_inspect_prints_tensor_names_and_metadata_escaped(tmp_path):
    from gguf import GGUFWriter

    path = tmp_path / "evil.gguf"
    w = GGUFWriter(path, arch="flux")
    w.add_string("flux_gguf.recipe", EVIL)
    w.add_tensor(EVIL, np.zeros((2, 2), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    r = run("inspect", path)
    assert r.exit_code == 0, r.output
    _assert_clean(r.stdout)
    assert f"flux_gguf.recipe: {EVIL_SHOWN}\n" in r.stdout
    assert f"variant:      {EVIL_SHOWN} (general.file_type None)\n" in r.stdout
    assert any(line.startswith(f"{EVIL_SHOWN}  F32") for line in r.stdout.splitlines())


def test_an_error_naming_a_crafted_tensor_shows_bidi_controls_escaped(src, tmp_path):
    path = tmp_path / "x.imatrix.gguf"
    path.write_bytes(_header([TYPE_KV], [_tensor("w\u202e.in_sum2", [4, 1], 0, ggml_type=1)]) + bytes(32))
    r = run("convert", src, "-o", tmp_path / "out", "--variant", "Q4_K_M", "--imatrix", path, "--dry-run")
    assert r.exit_code == 1 and r.stdout == ""
    assert r.stderr == f"Error: {path}: tensor w\\u202e.in_sum2 is F16, expected F32\n"
