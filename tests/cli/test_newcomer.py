"""What a newcomer tripped on, following the README on a fresh clone: each now says what it means."""
from __future__ import annotations

from cli_child import REPO_ROOT, assert_error, run


def test_example_twice_says_it_replaces_and_suggests_a_free_release_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    first = run("example", "-o", "example-out")
    assert first.exit_code == 0, first.output
    assert "note: replacing" not in first.stdout
    assert first.stdout.endswith("  flux-gguf release build example-out/release.toml -o dist/example\n"
                                 "  flux-gguf verify dist/example\n")
    built = run("release", "build", "example-out/release.toml", "-o", "dist/example")
    assert built.exit_code == 0, built.output
    verified = run("verify", "dist/example")
    assert verified.exit_code == 0, verified.output
    assert verified.stdout.splitlines()[0] == "signature   unsigned: no model.sig in the folder"

    again = run("example", "-o", "example-out")
    assert again.exit_code == 0, again.output
    assert ("note: replacing the files of an earlier `flux-gguf example` in example-out: flux1-example.safetensors, "
            "flux1-example-Q8_0.gguf, flux1-example-Q4_K_M.gguf, release.toml\n") in again.stdout
    assert again.stdout.endswith("  flux-gguf release build example-out/release.toml -o dist/example-2\n"
                                 "  flux-gguf verify dist/example-2\n")
    rebuilt = run("release", "build", "example-out/release.toml", "-o", "dist/example-2")
    assert rebuilt.exit_code == 0, rebuilt.output  # the same seed: the same files
    assert (tmp_path / "dist/example-2/flux1-example-Q8_0.gguf").read_bytes() == \
        (tmp_path / "dist/example/flux1-example-Q8_0.gguf").read_bytes()


def test_inspect_on_a_text_file_says_what_inspect_reads():
    readme = REPO_ROOT / "README.md"
    size = readme.stat().st_size
    head = readme.read_bytes()[:8]
    assert_error(run("inspect", readme),
                 f"{readme}: neither a GGUF file (it does not start with GGUF) nor a safetensors file (its first 8 "
                 f"bytes, {head!r}, are no header length that fits the {size:,}-byte file); inspect reads .gguf and "
                 ".safetensors files and diffusers folders")


def test_verify_threads_out_of_range_is_one_line(tmp_path):
    import numba

    # checked in the command (as convert does), so --help shows no machine-dependent range
    assert_error(run("verify", tmp_path, "--threads", "0"),
                 f"--threads must be between 1 and {numba.config.NUMBA_NUM_THREADS} (the cores numba may use), got 0")
