"""Let LLVM use 512-bit vectors for the kernels, where the CPU has AVX-512 (opt-in per process).

LLVM's Intel AVX-512 targets (Skylake-X through Emerald Rapids) prefer 256-bit vectors by default
("prefer-256-bit"). The kernels are bound by vector arithmetic (the tile search runs about 18
vector operations per weight and step), so twice the lanes per instruction pays: the Q4_K tile
search 1.45-1.58x faster on one thread of an Emerald Rapids core (11.0-12.7 -> 7.6-8.0 ns per
weight). Bytes do not change: no fast-math, so LLVM keeps every operation and its order within a
lane; only how many lanes one instruction covers differs (tests/kernels/test_vector_width.py
checks every type against ggml with it on).

It is a setting of numba's one code generator for the whole process, fixed when the first numba
function is defined, so it is not changed behind a library user's back: ``quant_kernels`` turns it
on at import when ``FLUX_GGUF_VECTOR_WIDTH=512`` is set (the ``flux-gguf`` command sets it unless
told otherwise, being the process's owner), and a ``NUMBA_CPU_FEATURES`` or ``NUMBA_CPU_NAME``
the user chose wins.
numba's cache keeps the machine code of each setting apart (its key holds the CPU features).
"""
from __future__ import annotations

import os
import sys

ENV = "FLUX_GGUF_VECTOR_WIDTH"


def prefer_512_bit() -> bool:
    """Ask LLVM for 512-bit vectors if the CPU has AVX-512 and numba has not made its code
    generator yet (call before the first ``@njit`` runs). Returns whether the setting was made."""
    if os.environ.get("NUMBA_CPU_FEATURES") or os.environ.get("NUMBA_CPU_NAME"):
        return False  # the user's own choice (e.g. NUMBA_CPU_NAME=generic for a portable cache)
    import llvmlite.binding as ll

    ll.initialize_native_target()
    features = ll.get_host_cpu_features().flatten()
    if "+avx512f" not in features.split(","):
        return False
    value = features + ",-prefer-256-bit"
    os.environ["NUMBA_CPU_FEATURES"] = value  # read by numba at import, and by child processes
    if "numba" in sys.modules:  # already imported: its config was read; set it there too
        from numba.core import config

        config.CPU_FEATURES = value
    return True


def vector_width() -> int:
    """The widest vectors numba's code generator uses in this process (512 or 256 bits)."""
    from numba.core.registry import cpu_target

    features = cpu_target.target_context.codegen()._tm_features  # type: ignore[attr-defined]
    wide = "+avx512f" in features.split(",") and "-prefer-256-bit" in features.split(",")
    return 512 if wide else 256
