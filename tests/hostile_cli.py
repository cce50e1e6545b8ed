"""The CLI as the hostile-input tests drive it (test helper, never imported by code): in process
with CliRunner, or in a child with a wall-clock timeout and a 2 GiB address-space cap for cases
that could hang or allocate without bound; and the one exact ``Error:`` line they assert."""
from __future__ import annotations

import os
import resource
import subprocess
import sys
from pathlib import Path

from click.testing import CliRunner

from converter.cli import main

CHILD_TIMEOUT_S = 120  # generous: a loaded 2-core box needs ~4 s just to import numba
MEMORY_LIMIT = 2 << 30


def run(*args: object):
    return CliRunner().invoke(main, [str(a) for a in args])


def assert_error(result, line: str) -> None:
    assert result.exit_code == 1, result.output
    assert result.stdout == ""
    assert result.stderr == f"Error: {line}\n"


def _limit_memory() -> None:  # runs in the child before exec
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))


def run_child(*args: object) -> subprocess.CompletedProcess:
    """``flux-gguf ARGS`` in a child with a timeout and a memory cap (raises TimeoutExpired on a hang)."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(__file__).parents[1]), os.environ.get("PYTHONPATH", "")]))
    return subprocess.run([sys.executable, "-c", "from converter.cli import main; main()", *map(str, args)],
                          capture_output=True, text=True, timeout=CHILD_TIMEOUT_S, env=env,
                          preexec_fn=_limit_memory)


def child_error(proc: subprocess.CompletedProcess, line: str) -> None:
    assert proc.returncode == 1, proc.stderr
    assert proc.stdout == ""
    assert proc.stderr == f"Error: {line}\n"
