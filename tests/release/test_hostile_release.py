"""``release build`` against hostile specs, a careless user and a concurrent build (issue 12)."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from click.testing import CliRunner

from converter.cli import main
from converter.layout import FluxGeometry
from converter.synthetic import write_synthetic_flux
from manifests import load_manifest, verify_release
from manifests.locking import acquire

GEO = FluxGeometry(double_blocks=1, single_blocks=1, hidden=256)


def spec_text(name: str = "tiny", extra: list[str] | None = None, variants: str = '["Q8_0"]') -> str:
    files = ", ".join(f'"{e}"' for e in extra or [])
    return (f'name = {json.dumps(name)}\nsource = "weights/tiny.safetensors"\nvariants = {variants}\n'
            f'base_model = "black-forest-labs/FLUX.1-Kontext-dev"\nextra_files = [{files}]\n'
            '[card]\nlicense = "apache-2.0"\n')


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    return write_synthetic_flux(tmp_path_factory.mktemp("w") / "tiny.safetensors", GEO, seed=2)


def project(root: Path, weights: Path, spec: str, files: dict[str, str] | None = None) -> Path:
    (root / "weights").mkdir(parents=True)
    (root / "weights" / "tiny.safetensors").symlink_to(weights)
    for rel, text in (files or {}).items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    (root / "release.toml").write_text(spec)
    return root / "release.toml"


def build(*args: object):
    return CliRunner().invoke(main, ["release", "build", *map(str, args)])


def assert_error(r, line: str) -> None:
    assert r.exit_code == 1, r.output
    assert r.stderr == f"Error: {line}\n"


def ours(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith((".flux-gguf.partial", ".flux-gguf.lock")))


def test_extra_files_named_like_partials_are_shipped_not_lost(tmp_path, weights):
    extra = ["README.md.partial", "manifest.json.partial", "tiny-Q8_0.gguf.partial"]
    spec = project(tmp_path / "p", weights, spec_text(extra=extra), {e: f"content of {e}\n" for e in extra})
    out = tmp_path / "out"
    r = build(spec, "-o", out)
    assert r.exit_code == 0, r.output
    listed = {a.path for a in load_manifest(out / "manifest.json").artifacts}
    for e in extra:
        assert e in listed and (out / e).read_text() == f"content of {e}\n"
    assert verify_release(out).ok and ours(tmp_path) == []


def test_a_relative_extra_file_outside_the_spec_folder_is_refused(tmp_path, weights):
    (tmp_path / "secret.txt").write_text("not for release")
    spec = project(tmp_path / "p", weights, spec_text(extra=["../secret.txt"]))
    assert_error(build(spec, "-o", tmp_path / "out"),
                 f"{spec}: 'extra_files' must be a path inside the spec's folder or an absolute path, got '../secret.txt' "
                 "('..' leaves the folder)")
    assert not (tmp_path / "out").exists()


def test_an_extra_file_that_is_a_symlink_to_outside_is_refused_when_opened(tmp_path, weights):
    (tmp_path / "secret.txt").write_text("not for release")
    spec = project(tmp_path / "p", weights, spec_text(extra=["LICENSE.md"]))
    (tmp_path / "p" / "LICENSE.md").symlink_to(tmp_path / "secret.txt")
    out = tmp_path / "out"
    assert_error(build(spec, "-o", out),
                 f"{tmp_path / 'p'}: extra_files entry 'LICENSE.md' is a symbolic link; a release copies only "
                 "regular files, never through a symbolic link")
    assert not out.exists() and ours(tmp_path) == []


@pytest.mark.parametrize(("name", "shown"), [("tiny\x1b[31m", "U+001B"), ("tiny\x07", "U+0007"), ("ti\u0085ny", "U+0085")])
def test_control_characters_in_the_release_name_are_refused_and_never_echoed_raw(tmp_path, weights, name, shown):
    spec = project(tmp_path / "p", weights, spec_text(name=name))
    r = build(spec, "-o", tmp_path / "out")
    assert_error(r, f"{spec}: 'name' must be a plain file-name stem, but it contains {shown} (a control character)")
    assert "\x1b" not in r.output and "\x07" not in r.output


def test_extra_files_differing_only_by_case_collide_before_any_conversion(tmp_path, weights):
    spec = project(tmp_path / "p", weights, spec_text(extra=["a/License.md", "b/LICENSE.md"]),
                   {"a/License.md": "1", "b/LICENSE.md": "2"})
    assert_error(build(spec, "-o", tmp_path / "out"),
                 f"{spec}: 'extra_files' lists 'License.md' and 'LICENSE.md', which are one file where case does "
                 "not count")
    spec2 = project(tmp_path / "q", weights, spec_text(extra=["readme.md"]), {"readme.md": "mine"})
    assert_error(build(spec2, "-o", tmp_path / "out"),
                 f"{spec2}: 'extra_files' names 'readme.md', whose file name 'readme.md' (the same as 'README.md' "
                 "where case does not count) the release itself writes")


def test_a_second_build_of_the_same_folder_fails_at_once_naming_the_holder(tmp_path, weights):
    spec = project(tmp_path / "p", weights, spec_text())
    out = tmp_path / "out"
    with acquire(out):  # what a running build holds from its first check to the rename
        r = build(spec, "-o", out)
    assert_error(r, f"{out} was not written: another flux-gguf build (pid {os.getpid()}) is writing it; wait for "
                    "it to finish or choose another output folder")
    assert not out.exists() and ours(tmp_path) == []
    assert build(spec, "-o", out).exit_code == 0 and verify_release(out).ok
    assert ours(tmp_path) == []


def test_threads_zero_is_one_line(tmp_path, weights):
    import numba
    spec = project(tmp_path / "p", weights, spec_text())
    assert_error(build(spec, "-o", tmp_path / "out", "--threads", "0"),
                 f"--threads must be between 1 and {numba.config.NUMBA_NUM_THREADS} (the cores numba may use), got 0")


def test_two_concurrent_builds_of_one_folder_exactly_one_succeeds(tmp_path, weights):
    """Two real processes: the loser fails at once on the lock, or (if it starts after the winner's
    rename) on the finished folder; either way one line, exit 1, and the winner's folder verifies."""
    import subprocess
    import sys
    import threading

    spec = project(tmp_path / "p", weights, spec_text())
    out = tmp_path / "out"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(__file__).parents[2]), os.environ.get("PYTHONPATH", "")]))
    procs: list[subprocess.CompletedProcess] = []

    def one() -> None:
        procs.append(subprocess.run([sys.executable, "-c", "from converter.cli import main; main()", "release",
                                     "build", str(spec), "-o", str(out)],
                                    capture_output=True, text=True, timeout=300, env=env))
    threads = [threading.Thread(target=one) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(p.returncode for p in procs) == [0, 1]
    loser = next(p for p in procs if p.returncode == 1)
    errors = [ln for ln in loser.stderr.split("\n") if ln.startswith("Error: ")]
    assert len(errors) == 1 and (
        "another flux-gguf build (pid " in errors[0] or "already exists and is not an empty folder" in errors[0])
    assert verify_release(out).ok and ours(tmp_path) == []


# ---- tens of thousands of overrides (issue 27) -----------------------------------------------------
def run_child(*args: object) -> "subprocess.CompletedProcess[str]":
    """``flux-gguf ARGS`` in a child with a timeout (a regression that plans for minutes fails the test)."""
    import subprocess
    import sys

    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(__file__).parents[2]), os.environ.get("PYTHONPATH", "")]))
    return subprocess.run([sys.executable, "-c", "from converter.cli import main; main()", *map(str, args)],
                          capture_output=True, text=True, timeout=120, env=env)


def test_a_spec_with_100000_overrides_is_refused_from_the_count(tmp_path, weights):
    overrides = ", ".join(['"double_blocks\\\\.0\\\\.img_attn\\\\.qkv=Q8_0"'] * 100_000)
    spec = project(tmp_path / "p", weights, spec_text().replace("[card]", f"overrides = [{overrides}]\n[card]"))
    proc = run_child("release", "build", spec, "-o", tmp_path / "out")
    assert (proc.returncode, proc.stdout) == (1, "")
    assert proc.stderr == f"Error: {spec}: 'overrides' has 100,000 entries; at most 512 are allowed\n"
    assert not (tmp_path / "out").exists() and ours(tmp_path) == []


def test_convert_with_20000_overrides_is_refused_from_the_count(tmp_path, weights):
    proc = run_child("convert", weights, "-o", tmp_path / "out", "--variant", "Q8_0",
                     *["--override", "double_blocks\\.0=Q8_0"] * 20_000)
    assert (proc.returncode, proc.stdout) == (1, "")
    assert proc.stderr == "Error: --override given 20,000 times; at most 512 overrides are allowed\n"
    assert not (tmp_path / "out").exists()


def test_512_overrides_plan_and_513_are_refused():
    """The limit itself: 512 overrides (one per 2-D tensor and then some, first match wins) plan
    every variant; one more is refused before any pattern is compiled."""
    from converter.errors import PlanError
    from converter.recipes import MAX_OVERRIDES, layout_tensors, make_plans

    tensors = layout_tensors(GEO)
    two_d = [n for n, t in tensors.items() if len(t.shape) == 2 and n != "img_in.weight"]
    overrides = [f"^{n.replace('.', '[.]')}$=Q8_0" for n in two_d]
    overrides += ["double_blocks=Q8_0"] * (MAX_OVERRIDES - len(overrides))
    plans = make_plans(["Q4_K_M", "Q8_0"], tensors, name="m", family="flux-dev", overrides=overrides)
    assert all(e.qtype == "Q8_0" and e.rule == "override" for p in plans for e in p.entries if e.name in two_d)
    with pytest.raises(PlanError, match="^513 overrides given; at most 512 overrides are allowed$"):
        make_plans(["Q8_0"], tensors, name="m", family="flux-dev", overrides=overrides + ["x=Q8_0"])
