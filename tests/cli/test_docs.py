"""The docs say what the code does: the command reference is the commands' own --help, README.md
stays short, every command in it runs as written (or is marked with what it needs), and .ci/run
runs README's fresh-machine steps."""
from __future__ import annotations

import importlib.util
import re
import shlex

import click
import pytest
from cli_child import REPO_ROOT, run_child

from converter.cli import main

README = REPO_ROOT / "README.md"
NEEDS = "# needs:"  # first line of a README block that cannot run offline in an empty folder
REGENERATE = "python scripts/gen_cli_reference.py"


def load_generator():
    spec = importlib.util.spec_from_file_location("gen_cli_reference", REPO_ROOT / "scripts" / "gen_cli_reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def sh_blocks(text: str) -> list[list[str]]:
    """README's ```sh blocks, as lists of commands (backslash continuations joined)."""
    blocks = []
    for body in re.findall(r"^```sh\n(.*?)^```", text, re.S | re.M):
        blocks.append([line.strip() for line in body.replace("\\\n", " ").splitlines() if line.strip()])
    return blocks


def flux_commands(lines: list[str]) -> list[list[str]]:
    """The ``flux-gguf`` invocations of a block, split as the shell would (no comment lines)."""
    return [shlex.split(line, comments=True)[1:] for line in lines if line.startswith("flux-gguf ")]


def test_reference_is_the_commands_help():
    gen = load_generator()
    stale = gen.stale(gen.render())
    assert not stale, f"docs/reference is out of step with --help ({', '.join(stale)}): run `{REGENERATE}`"


def test_readme_is_short_and_points_to_the_rest():
    text = README.read_text()
    assert len(text.splitlines()) <= 250
    for target in ("docs/guide.md", "docs/reference/README.md", "docs/benchmarks.md", "CHANGELOG.md"):
        assert f"]({target})" in text and (REPO_ROOT / target).is_file(), target


def test_readme_blocks_that_need_something_still_parse():
    """A block marked `# needs: ...` is not run, but each flux-gguf line in it names a real command
    with options and arguments that command accepts."""
    marked = [b for b in sh_blocks(README.read_text()) if b[0].startswith(NEEDS)]
    assert marked
    for block in marked:
        for args in flux_commands(block):
            cmd, ctx = main, None
            while isinstance(cmd, click.Group):
                ctx = cmd.make_context(cmd.name or "flux-gguf", list(args), parent=ctx, resilient_parsing=True)
                name, cmd, args = cmd.resolve_command(ctx, args)
            cmd.make_context(name, list(args), parent=ctx)  # raises on an unknown option or a missing argument


def test_readme_commands_run_as_written(tmp_path):
    blocks = [b for b in sh_blocks(README.read_text()) if not b[0].startswith(NEEDS)]
    commands = [args for b in blocks for args in flux_commands(b)]
    assert len(commands) == sum(len(b) for b in blocks), "a runnable README block holds a line that is not flux-gguf"
    assert ["example", "-o", "example-out"] in commands
    for args in commands:
        r = run_child(*args, cwd=tmp_path, timeout=900)
        assert r.returncode == 0, f"flux-gguf {shlex.join(args)}: {r.stderr}"


@pytest.mark.parametrize("step", [0, 1, 2])
def test_ci_runs_the_fresh_machine_steps(step):
    ci = (REPO_ROOT / ".ci" / "run").read_text()
    fresh = README.read_text().split("## Fresh machine", 1)[1].split("\n## ", 1)[0]
    block = sh_blocks(fresh)[step]
    for line in block:
        if line.startswith(NEEDS):
            continue
        for part in line.split(" && "):
            part = part.replace(". .venv-test/bin/activate", '. "$VENV/bin/activate"')
            if part.startswith("python3 -m venv"):
                venv = part.split()[-1]
                assert f":-{venv}}}" in ci or venv == ".venv", part  # step 2's own venv name
                continue
            if part.startswith(". .venv/") or part == "python -m pytest -q":
                continue  # step 1's venv is CI's $LIGHT; CI runs pytest with its own checks
            assert part.replace("flux-gguf ", '"$light_bin/flux-gguf" ') in ci or part in ci, part
