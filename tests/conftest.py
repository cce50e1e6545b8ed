import os
import shutil

import pytest

# Loaded before any test module imports the CLI, so the test process keeps numba's default vector
# width (the flux-gguf command asks for 512-bit vectors only as its process's first user of the
# kernels); tests/kernels/test_vector_width.py checks the 512-bit kernels in a process of their own.
import quant_kernels  # noqa: E402,F401


# Tests never reach a real Hub account.
os.environ["HF_TOKEN"] = ""
os.environ.setdefault("HF_HUB_OFFLINE", "0")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")


# Session-wide checkpoints (tests/flux_small.py) shared by several modules; the 3072-wide one is
# 2.7 GB on disk. They go when the session ends, passed or failed, so no run leaves them behind.
SHARED_FOLDERS = ("small-flux", "tiny-flux")


@pytest.fixture(scope="session", autouse=True)
def _remove_shared_checkpoints(tmp_path_factory):
    yield
    base = tmp_path_factory.getbasetemp()
    for name in SHARED_FOLDERS:
        shutil.rmtree(base / name, ignore_errors=True)


@pytest.fixture(scope="session", autouse=True)
def _kernels_compiled():
    """Compile (or load) every kernel once, up front: a fresh clone's first conversions would
    otherwise print the first-run compile notice on stderr in whichever test ran first, and the
    CLI tests compare stderr exactly. tests/cli/test_first_run.py checks the notice with a cache
    of its own."""
    import quant_kernels

    for name in quant_kernels.uncompiled_kernels(quant_kernels.supported_type_names()):
        quant_kernels.compile_kernel(name)
