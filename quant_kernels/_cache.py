"""Keep numba's on-disk cache honest across edits and upgrades.

numba's ``cache=True`` checks only the timestamp of the file that defines a kernel; a kernel
that inlines helpers from another module (``_numeric``, ``_qkx``) would keep stale machine code
after that module changes. We stamp the cache with a digest of every source file of this
package and drop the package's cached kernels when the digest changes.
"""
from __future__ import annotations

import hashlib
import pathlib

import numba

_PKG = pathlib.Path(__file__).resolve().parent
_STAMP = "flux_gguf_kernel_sources.sha256"


def _sources_digest() -> str:
    h = hashlib.sha256(numba.__version__.encode())
    for path in sorted(_PKG.glob("*.py")):
        h.update(path.name.encode())
        h.update(path.read_bytes())
    return h.hexdigest()


def _cache_dirs() -> list[pathlib.Path]:
    dirs = [_PKG / "__pycache__"]
    if numba.config.CACHE_DIR:
        # numba mirrors the package path under NUMBA_CACHE_DIR
        root = pathlib.Path(numba.config.CACHE_DIR)
        dirs.append(root / str(_PKG).lstrip("/\\").replace(":", ""))
        dirs.append(root / _PKG.name)
    return dirs


def invalidate_stale_kernels() -> bool:
    """Delete this package's cached kernels if any source file changed. Best effort: a
    read-only install simply keeps numba's own behaviour. Returns True when it deleted."""
    digest = _sources_digest()
    deleted = False
    for cache in _cache_dirs():
        stamp = cache / _STAMP
        try:
            if stamp.read_text().strip() == digest:
                continue
        except OSError:
            pass
        try:
            if cache.is_dir():
                for f in list(cache.glob("*.nbi")) + list(cache.glob("*.nbc")):
                    f.unlink(missing_ok=True)
                    deleted = True
                stamp.write_text(digest + "\n")
            elif cache == _PKG / "__pycache__":
                cache.mkdir(exist_ok=True)
                stamp.write_text(digest + "\n")
        except OSError:
            continue
    return deleted


def is_cached(dispatcher: object, *args: object) -> bool:
    """Whether numba's on-disk cache holds machine code of ``dispatcher`` (an ``@njit(cache=True)``
    function) for these example arguments on this CPU, i.e. whether calling it loads instead of
    compiling. Asks numba's own cache index (private API, hence the broad fallback: when numba
    changes it, we answer True and simply stay silent as before)."""
    try:
        index = dispatcher._cache._cache_file._load_index()  # type: ignore[attr-defined]
        if not index:
            return False
        sig = tuple(numba.typeof(a) for a in args)
        magic = dispatcher.targetctx.codegen().magic_tuple()  # type: ignore[attr-defined]
        # keys are (signature, target magic tuple, code hashes); a stale source gives no index at all
        return any(key[0] == sig and key[1] == magic for key in index)
    except Exception:  # pragma: no cover - depends on numba internals
        return True
