"""The CLI as the hostile-input tests drive it (test helper, never imported by code): in process
with CliRunner (:func:`run`), or in a child process (:func:`run_child`) with a wall-clock timeout
(a hang raises ``subprocess.TimeoutExpired`` and fails the test) and a 2 GiB address-space cap
(``RLIMIT_AS``), so a regression fails instead of stalling the suite or exhausting the machine; and
the one exact ``Error:`` line they assert. No timed assertions."""
from __future__ import annotations

import os
import resource
import subprocess
import sys
from pathlib import Path
from typing import Mapping

from click.testing import CliRunner

from converter.cli import main

CHILD_TIMEOUT_S = 120  # generous: a loaded 2-core box needs ~4 s just to import numba
MEMORY_LIMIT = 2 << 30
REPO_ROOT = Path(__file__).parents[1]


def run(*args: object):
    """``flux-gguf ARGS`` in this process (CliRunner): for cases that cannot hang."""
    return CliRunner().invoke(main, [str(a) for a in args])


def assert_error(result, line: str) -> None:
    """A CliRunner result that is exactly ``Error: LINE`` on stderr, nothing on stdout, exit status 1."""
    assert result.exit_code == 1, result.output
    assert result.stdout == ""
    assert result.stderr == f"Error: {line}\n"


def limit_memory() -> None:  # runs in the child before exec
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))


def run_child(*args: object, env: Mapping[str, str] | None = None, timeout: float = CHILD_TIMEOUT_S,
              cwd: Path | None = None) -> subprocess.CompletedProcess:
    """``flux-gguf ARGS`` from this checkout, with ``env`` added to the environment, in ``cwd``."""
    full = dict(os.environ, **(env or {}))
    full["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")])
    return subprocess.run([sys.executable, "-c", "from converter.cli import main; main()", *map(str, args)],
                          capture_output=True, text=True, timeout=timeout, env=full, preexec_fn=limit_memory,
                          cwd=cwd)


def child_error(proc: subprocess.CompletedProcess, line: str) -> None:
    """Exactly one line on stderr, ``Error: LINE``, nothing on stdout, exit status 1."""
    assert proc.returncode == 1, proc.stderr
    assert proc.stdout == "", proc.stdout
    assert proc.stderr == f"Error: {line}\n", proc.stderr  # (no assertion rewriting outside test modules)
