"""Crafted inputs through the CLI: each is a one-line ``Error:``, exit 1, nothing under a final
name, bounded memory and no hang (issue 12). Every input is generated here, byte by byte.

Cases that could hang or allocate without bound run in a child process with a wall-clock
timeout and a 2 GiB address-space limit (``subprocess.run(timeout=...)``), so a regression
fails the test instead of stalling the suite; there are no timed assertions.
"""
from __future__ import annotations

import json
import os
import struct
import subprocess
import threading
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from converter.layout import FluxGeometry
from converter.synthetic import write_synthetic_flux
from cli_child import assert_error, child_error, run, run_child
from manifests.locking import acquire

GEO = FluxGeometry(double_blocks=1, single_blocks=1, hidden=256)


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    return write_synthetic_flux(tmp_path_factory.mktemp("src") / "tiny.safetensors", GEO, seed=5)


def safetensors_bytes(header: str | bytes, data: bytes = b"") -> bytes:
    blob = header.encode("utf-8") if isinstance(header, str) else header
    blob += b" " * (-len(blob) % 8)
    return struct.pack("<Q", len(blob)) + blob + data


def finals(folder: Path) -> list[str]:
    """Everything in ``folder`` (a failed run must leave no final name, partial or lock file)."""
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


# ---- hostile safetensors headers ---------------------------------------------------------------

def test_a_block_index_of_100_million_is_refused_before_anything_is_sized_by_it(tmp_path):
    h = {"img_in.weight": {"dtype": "F32", "shape": [128, 64], "data_offsets": [0, 32768]},
         "double_blocks.100000000.img_mod.lin.weight": {"dtype": "F32", "shape": [0], "data_offsets": [32768, 32768]}}
    path = tmp_path / "block.safetensors"
    path.write_bytes(safetensors_bytes(json.dumps(h), bytes(32768)))
    out = tmp_path / "out"
    proc = run_child("convert", path, "-o", out, "--variant", "Q8_0")
    child_error(proc, f"{path}: double_blocks.100000000.img_mod.lin.weight names block 100000000, but the file "
                      "holds only 2 tensors; blocks are numbered from 0 without gaps")
    assert finals(out) == []
    proc = run_child("inspect", path, "--json")  # inspect reports the problem instead of failing
    assert proc.returncode == 0, proc.stderr
    assert "names block 100000000" in json.loads(proc.stdout)["problem"]


def test_an_integer_beyond_pythons_digit_limit_is_one_line(tmp_path):
    path = tmp_path / "bigint.safetensors"
    path.write_bytes(safetensors_bytes('{"a": {"dtype": "F32", "shape": [' + "9" * 5000 + '], "data_offsets": [0, 0]}}'))
    assert_error(run("inspect", path), f"{path}: not a safetensors file (header is not usable JSON: Exceeds the limit "
                                       "(4300 digits) for integer string conversion: value has 5000 digits)")


def test_deep_json_nesting_is_one_line(tmp_path):
    path = tmp_path / "deep.safetensors"
    path.write_bytes(safetensors_bytes("[" * 100_000 + "]" * 100_000))
    assert_error(run("inspect", path), f"{path}: not a safetensors file (header is JSON nested too deeply)")
    assert_error(run("convert", path, "-o", tmp_path / "out", "--variant", "Q8_0"),
                 f"{path}: not a safetensors file (header is JSON nested too deeply)")


def test_a_lone_surrogate_in_a_tensor_name_is_one_line_and_never_printed_raw(tmp_path):
    path = tmp_path / "surrogate.safetensors"
    path.write_bytes(safetensors_bytes('{"x\\ud800": {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]}}'))
    assert_error(run("inspect", path), f"{path}: header has a tensor name that is not valid Unicode text: x\\ud800")


def test_a_lone_surrogate_in_the_metadata_is_one_line(tmp_path):
    path = tmp_path / "meta.safetensors"
    path.write_bytes(safetensors_bytes('{"__metadata__": {"k": "\\udfff"}}'))
    assert_error(run("inspect", path), f"{path}: __metadata__ must be an object of strings")


def test_invalid_utf8_in_a_header_is_one_line(tmp_path):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(safetensors_bytes(b'{"\xff": 1}'))
    assert_error(run("inspect", path), f"{path}: not a safetensors file (header is not UTF-8 text: byte 2)")


def test_a_fifo_as_source_is_refused_at_once(tmp_path):
    fifo = tmp_path / "pipe.safetensors"
    os.mkfifo(fifo)
    out = tmp_path / "out"
    proc = run_child("convert", fifo, "-o", out, "--variant", "Q8_0")  # a hang raises TimeoutExpired
    child_error(proc, f"{fifo}: not a regular file (a FIFO, device or socket cannot be a checkpoint)")
    proc = run_child("inspect", fifo)
    child_error(proc, f"{fifo}: cannot read (not a regular file)")
    assert finals(out) == []


# ---- hostile GGUF files (inspect) ----------------------------------------------------------------

def _gguf(kv: bytes, n_kv: int = 1, n_tensors: int = 0, tail: bytes = b"") -> bytes:
    return b"GGUF" + struct.pack("<IQQ", 3, n_tensors, n_kv) + kv + tail


def _key(name: str) -> bytes:
    raw = name.encode()
    return struct.pack("<Q", len(raw)) + raw


def test_a_113_byte_gguf_declaring_2_to_the_40_array_elements_is_refused_in_bounded_memory(tmp_path):
    data = _gguf(_key("general.x") + struct.pack("<IIQ", 9, 4, 1 << 40))
    data += bytes(113 - len(data))
    path = tmp_path / "arr.gguf"
    path.write_bytes(data)
    assert len(data) == 113
    proc = run_child("inspect", path)
    child_error(proc, f"{path} is not a readable GGUF file: the element count of the value of 'general.x' is "
                      "1099511627776, but 56 bytes cannot hold that many (at byte 57 of 113)")


@pytest.mark.parametrize(("kv", "n_kv", "n_tensors", "tail", "problem"), [
    (_key("general.x") + struct.pack("<IQ", 8, 1 << 62), 1, 0, b"",
     "the value of 'general.x' needs 4611686018427387904 bytes but only 0 are left (at byte 53 of 53)"),
    (_key("general.x") + struct.pack("<IQ", 8, 2) + b"\xff\xfe", 1, 0, b"",
     "the value of 'general.x' is not UTF-8 text (byte 0) (at byte 55 of 55)"),
    (b"", 1 << 60, 0, b"", "the metadata entry count is 1152921504606846976, but 0 bytes cannot hold that many "
                           "(at byte 24 of 24)"),
    (b"", 0, 1, _key("t") + struct.pack("<I", 1 << 20) + bytes(40),
     "tensor 't' has 1048576 dimensions; at most 4 are allowed (at byte 37 of 77)"),
    (_key("general.x") + struct.pack("<I", 77), 1, 0, b"", "the value of 'general.x' has unknown value type 77 "
                                                           "(at byte 45 of 45)"),
])
def test_crafted_gguf_headers_are_one_line(tmp_path, kv, n_kv, n_tensors, tail, problem):
    path = tmp_path / "x.gguf"
    path.write_bytes(_gguf(kv, n_kv, n_tensors, tail))
    assert_error(run("inspect", path), f"{path} is not a readable GGUF file: {problem}")


def test_a_gguf_of_an_unknown_version_is_one_line(tmp_path):
    path = tmp_path / "v9.gguf"
    path.write_bytes(b"GGUF" + struct.pack("<IQQ", 9, 0, 0))
    assert_error(run("inspect", path), f"{path} is not a readable GGUF file: version 9; expected 2 or 3")


def test_our_own_gguf_still_inspects(src, tmp_path):
    r = run("convert", src, "-o", tmp_path, "--variant", "Q8_0")
    assert r.exit_code == 0, r.output
    r = run("inspect", tmp_path / "tiny-Q8_0.gguf", "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["variant"] == "Q8_0"


# ---- --override regexes ------------------------------------------------------------------------------

def test_a_catastrophic_override_regex_cannot_hang_a_conversion(src, tmp_path):
    """'(a|a)*b' style patterns take exponential time in Python's re; RE2 matches in linear time."""
    out = tmp_path / "out"
    proc = run_child("convert", src, "-o", out, "--variant", "Q8_0", "--override", r"^(\w+\.?|\w+\.?)*x$=Q4_K",
                     "--dry-run")
    child_error(proc, r"override '^(\w+\.?|\w+\.?)*x$=Q4_K' matches no 2-D tensor")


def test_an_override_regex_of_a_huge_repeat_count_is_one_line(src, tmp_path):
    assert_error(run("convert", src, "-o", tmp_path, "--variant", "Q8_0", "--override", "a{100000}=Q4_K"),
                 "override 'a{100000}=Q4_K': bad regular expression: invalid repetition size: {100000}")
    # Python's re raised OverflowError (a traceback) here; RE2 reads a count this long as literal text
    assert_error(run("convert", src, "-o", tmp_path, "--variant", "Q8_0", "--override", "a{99999999999}=Q4_K"),
                 "override 'a{99999999999}=Q4_K' matches no 2-D tensor")


def test_an_overlong_override_regex_is_one_line(src, tmp_path):
    pattern = "a" * 5000
    r = run("convert", src, "-o", tmp_path, "--variant", "Q8_0", "--override", f"{pattern}=Q4_K")
    assert_error(r, f"override '{'a' * 60}...{('a' * 5000 + '=Q4_K')[-15:]}': bad regular expression: the regular "
                    "expression is 5000 characters long; at most 1000 are allowed")


# ---- other arguments ---------------------------------------------------------------------------------

def test_threads_zero_is_one_line_not_usage(src, tmp_path):
    import numba
    assert_error(run("convert", src, "-o", tmp_path, "--variant", "Q8_0", "--threads", "0"),
                 f"--threads must be between 1 and {numba.config.NUMBA_NUM_THREADS} (the cores numba may use), got 0")


def test_a_name_over_the_file_name_limit_is_one_line(src, tmp_path):
    name = "n" * 300
    r = run("convert", src, "-o", tmp_path, "--variant", "Q8_0", "--name", name)
    assert r.exit_code == 1 and r.stdout == ""
    assert r.stderr.startswith("Error: ") and r.stderr.count("\n") == 1
    assert "File name too long" in r.stderr
    assert finals(tmp_path) == []


# ---- overflow: finite values the output type cannot hold ---------------------------------------

def _source_with(tmp_path: Path, tensor: str, value: float, src: Path) -> Path:
    from converter.sources import open_source

    with open_source(src) as s:
        arrays = {n: s.read(n) for n in s.tensors}
    arrays[tensor][3, 7] = np.float32(value)
    path = tmp_path / "big.safetensors"
    save_file(arrays, str(path))
    return path


@pytest.mark.parametrize(("variant", "value", "problem"), [
    ("F16", 3.4e38, "value 3.4e+38 at row 3, column 7 overflows F16: it would be stored as inf (largest magnitude "
                    "F16 can hold: 65504); refused rather than written as inf"),
    ("F16", 70000.0, "value 70000 at row 3, column 7 overflows F16: it would be stored as inf (largest magnitude "
                     "F16 can hold: 65504); refused rather than written as inf"),
    ("Q8_0", 1e9, "value 1e+09 at row 3, column 7 overflows Q8_0: a Q8_0 block holds at most 65504 (its float16 "
                  "scale) x 127; refused rather than written as inf"),
    ("Q4_K_S", 1e8, "value 1e+08 at row 3, column 7 overflows Q4_K: a Q4_K block holds at most 65504 (its float16 "
                    "scale) x 945; refused rather than written as inf"),
])
def test_values_overflowing_the_output_type_are_refused_naming_tensor_value_and_type(src, tmp_path, variant, value,
                                                                                      problem):
    tensor = "double_blocks.0.img_attn.proj.weight"
    path = _source_with(tmp_path, tensor, value, src)
    out = tmp_path / "out"
    r = run("convert", path, "-o", out, "--variant", variant)
    assert_error(r, f"{out / f'big-{variant}.gguf'} was not written: tensor {tensor}: {problem}")
    assert finals(out) == []


# ---- concurrent runs and partial names ---------------------------------------------------------

def test_a_second_convert_to_the_same_output_fails_at_once_naming_the_holder(src, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    with acquire(out / "tiny-Q8_0.gguf"):  # what a running convert holds from planning to rename
        r = run("convert", src, "-o", out, "--variant", "Q4_K_M,Q8_0")
    assert_error(r, f"{out / 'tiny-Q8_0.gguf'} was not written: another flux-gguf run (pid {os.getpid()}) is "
                    "writing it; wait for it to finish or choose another output folder")
    assert finals(out) == []  # nothing written, and the lock file went with the lock
    assert run("convert", src, "-o", out, "--variant", "Q8_0").exit_code == 0
    assert finals(out) == ["tiny-Q8_0.gguf"]


def test_two_concurrent_converts_exactly_one_succeeds_and_its_file_is_what_it_reports(src, tmp_path):
    out = tmp_path / "out"
    results: list[subprocess.CompletedProcess] = []

    def one() -> None:
        results.append(run_child("convert", src, "-o", out, "--variant", "Q4_K_M,Q8_0", "--json"))
    threads = [threading.Thread(target=one) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    codes = sorted(p.returncode for p in results)
    if codes == [0, 0]:  # the first finished before the second planned: both are complete and equal
        docs = [json.loads(p.stdout) for p in results]
        assert docs[0] == docs[1]
    else:
        assert codes == [0, 1]
        loser = next(p for p in results if p.returncode == 1)
        assert "another flux-gguf run (pid " in loser.stderr and loser.stderr.count("\n") == 1
    winner = json.loads(next(p for p in results if p.returncode == 0).stdout)
    import hashlib
    for a in winner["artifacts"]:
        data = Path(a["path"]).read_bytes()
        assert (len(data), hashlib.sha256(data).hexdigest()) == (a["size"], a["sha256"])
    assert finals(out) == ["tiny-Q4_K_M.gguf", "tiny-Q8_0.gguf"]


def test_a_users_file_named_like_an_old_partial_is_never_touched(src, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "tiny-Q8_0.gguf.partial").write_text("mine")
    assert run("convert", src, "-o", out, "--variant", "Q8_0").exit_code == 0
    assert (out / "tiny-Q8_0.gguf.partial").read_text() == "mine"
    assert finals(out) == ["tiny-Q8_0.gguf", "tiny-Q8_0.gguf.partial"]


def test_an_unexpected_exception_is_still_one_error_line(src, tmp_path, monkeypatch):
    import converter.cli.convert as cc

    def boom(*a, **k):
        raise RecursionError("maximum recursion depth exceeded")
    monkeypatch.setattr(cc, "run_convert", boom)
    assert_error(run("convert", src, "-o", tmp_path, "--variant", "Q8_0"),
                 "input nested too deeply to process (maximum recursion depth exceeded)")
