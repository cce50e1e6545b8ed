"""`flux-gguf --version`, and the version in every command's `--json` document.

Every command with a --json option is found by walking the click tree, so a new one cannot be
missed: the light ones run here on the built-in example's files; the ones that need a Hub
(emulated) or torch assert the key in the tests that already run them with --json (HEAVY).
"""
from __future__ import annotations

import json
from pathlib import Path

import click
import pytest
from cli_child import run

from converter import __version__
from converter.cli import main
from converter.cli.output import VERSION_KEY

TESTS = Path(__file__).parents[1]

# command -> the test module that runs it with --json and checks VERSION_KEY there (Hub, torch, slow)
HEAVY = {
    "upload": "hub/test_hub.py",
    "download": "hub/test_hub.py",
    "validate": "quality/test_validate.py",
    "bench": "quality/test_bench.py",
    "imatrix": "quality/test_calibrate.py",
    "sensitivity": "quality/test_sensitivity.py",
    "warmup": "cli/test_first_run.py",
}


def json_commands(group: click.Group = main, prefix: str = "") -> list[str]:
    """Every command (groups walked) that has a --json option, as it is typed: "convert", "release build"."""
    found = []
    for name, cmd in sorted(group.commands.items()):
        if isinstance(cmd, click.Group):
            found += json_commands(cmd, f"{prefix}{name} ")
        elif any("--json" in p.opts for p in cmd.params if isinstance(p, click.Option)):
            found.append(prefix + name)
    return found


@pytest.fixture(scope="module")
def release(tmp_path_factory) -> Path:
    """The README's first steps: the example, then its release."""
    work = tmp_path_factory.mktemp("json-version")
    assert run("example", "-o", work / "example-out").exit_code == 0
    built = run("release", "build", work / "example-out" / "release.toml", "-o", work / "dist" / "example")
    assert built.exit_code == 0, built.output
    return work


def light_runs(work: Path) -> dict[str, list[list[object]]]:
    src = work / "example-out" / "flux1-example.safetensors"
    gguf = work / "example-out" / "flux1-example-Q8_0.gguf"
    return {
        "convert": [["convert", src, "-o", work / "conv", "--variant", "Q8_0", "--dry-run", "--json"],
                    ["convert", src, "-o", work / "conv", "--variant", "Q8_0", "--json"]],
        "inspect": [["inspect", gguf, "--json"], ["inspect", src, "--json"]],
        "verify": [["verify", work / "dist" / "example", "--json"]],
    }


def test_version_option():
    r = run("--version")
    assert r.exit_code == 0 and r.stdout == f"flux-gguf, version {__version__}\n"


def test_every_json_command_is_covered():
    assert sorted(json_commands()) == sorted(["convert", "inspect", "verify", *HEAVY])
    for command, module in HEAVY.items():
        assert "VERSION_KEY" in (TESTS / module).read_text(), f"{module} should check {command}'s {VERSION_KEY}"


@pytest.mark.parametrize("command", ["convert", "inspect", "verify"])
def test_json_carries_the_version_first(release, command):
    for args in light_runs(release)[command]:
        r = run(*args)
        assert r.exit_code == 0, r.output
        doc = json.loads(r.stdout)
        assert next(iter(doc)) == VERSION_KEY and doc[VERSION_KEY] == __version__
