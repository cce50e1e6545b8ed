"""The kernel cache is dropped when any kernel source changes (numba alone only sees its own file)."""
from __future__ import annotations

import numba

from quant_kernels import _cache


def test_cache_dropped_when_a_helper_module_changes(tmp_path, monkeypatch):
    pkg = tmp_path / "pkg"
    cache = pkg / "__pycache__"
    cache.mkdir(parents=True)
    (pkg / "_numeric.py").write_text("A = 1\n")
    (pkg / "q4_k.py").write_text("B = 2\n")
    monkeypatch.setattr(_cache, "_PKG", pkg)
    monkeypatch.setattr(numba.config, "CACHE_DIR", "")

    (cache / "q4_k.quantize_rows-1.py311.nbi").write_bytes(b"index")
    (cache / "q4_k.quantize_rows-1.py311.1.nbc").write_bytes(b"code")
    assert _cache.invalidate_stale_kernels() is True  # no stamp yet: unknown provenance
    assert not list(cache.glob("*.nb?"))

    (cache / "q4_k.quantize_rows-1.py311.nbi").write_bytes(b"index")
    assert _cache.invalidate_stale_kernels() is False  # sources unchanged: cache kept
    assert (cache / "q4_k.quantize_rows-1.py311.nbi").exists()

    (pkg / "_numeric.py").write_text("A = 3\n")  # a helper changes, q4_k.py does not
    assert _cache.invalidate_stale_kernels() is True
    assert not (cache / "q4_k.quantize_rows-1.py311.nbi").exists()


def test_read_only_cache_is_left_alone(tmp_path, monkeypatch):
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "x.py").write_text("")
    (pkg / "__pycache__").write_text("not a directory")  # cannot hold a stamp
    monkeypatch.setattr(_cache, "_PKG", pkg)
    monkeypatch.setattr(numba.config, "CACHE_DIR", "")
    assert _cache.invalidate_stale_kernels() is False
