"""Presentation shared by every command: progress bars on stderr, result tables, one-line errors.

Library code reports progress through ``progress(done, total)`` callbacks and never prints; these
helpers turn those callbacks into tqdm bars and results into the text the commands echo.
"""
from __future__ import annotations

import contextlib
import functools
import json
import os
import pathlib
import re
import sys
import threading
from typing import Any, Callable, Iterable, Iterator, Sequence, TypeVar

import click
from tqdm import tqdm

from converter import __version__
from converter.errors import FluxGGUFError, PlanError
from converter.pipeline import ProgressFn
from converter.recipes import Plan
from converter.writer import ArtifactRecord
from manifests import ManifestError
from manifests.paths import character_problem
import quant_kernels
from quant_kernels.errors import QuantError

F = TypeVar("F", bound=Callable[..., Any])
LIBRARY_ERRORS = (FluxGGUFError, QuantError, ManifestError)
"""What commands raise for bad input; the group (and :func:`errors_as_click`) make them one line."""


def printable(text: object) -> str:
    """``text`` safe to print on a terminal: every character Python does not count as printable
    (control characters and ESC, newlines, bidi overrides and other format characters, lone
    surrogates, line separators) is shown as its escape (``\\x1b``, ``\\n``, ``\\u202e``), so a name
    read from a file cannot move the cursor, recolour the screen or fake an ``Error:`` line."""
    s = str(text)
    if s.isprintable() and not any(character_problem(c) for c in s):
        return s
    # isprintable: what Python cannot show; character_problem: the name policy's invisible ones too
    return "".join(c if c.isprintable() and character_problem(c) is None else ascii(c)[1:-1] for c in s)


def one_line(message: object) -> str:
    """Collapse a (possibly multi-line) message into one line for ``Error: ...``; characters that are
    not printable (from crafted file names or headers) are shown escaped (:func:`printable`)."""
    return printable(" ".join(part.strip() for part in _LINE_BREAK.split(str(message)) if part.strip()))


_LINE_BREAK = re.compile("\r\n|[\r\n]")  # only real line ends: U+2028 or U+0085 are shown escaped


def describe_unexpected(e: BaseException) -> str:
    """One line for an exception no library code turned into a message of its own (a last resort:
    a crafted input still gets ``Error:`` and exit 1, never a traceback)."""
    if isinstance(e, OSError) and e.strerror:
        where = f"{e.filename}: " if e.filename is not None else ""
        return f"{where}{e.strerror}"
    if isinstance(e, RecursionError):
        return f"input nested too deeply to process ({e})"
    if isinstance(e, MemoryError):
        return "out of memory (the input asks for more than this machine has)"
    return f"{type(e).__name__}: {e}"


_CLICK_OWN = (click.exceptions.ClickException, click.exceptions.Abort, click.exceptions.Exit)


def as_click_exception(e: Exception) -> click.ClickException | None:
    """The ``Error:`` line for ``e``, or None for click's own exceptions (which click presents)."""
    if isinstance(e, _CLICK_OWN):
        return None
    if isinstance(e, LIBRARY_ERRORS):
        return click.ClickException(one_line(e))
    return click.ClickException(one_line(describe_unexpected(e)))


def errors_as_click(fn: F) -> F:
    """Library errors -> ``Error: <one line>``, exit 1, also when a command is invoked on its own."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except Exception as e:  # noqa: BLE001 - every exception becomes one line
            err = as_click_exception(e)
            if err is None:
                raise
            raise err from e

    return wrapper  # type: ignore[return-value]


GB = 1e9

VERSION_KEY = "flux_gguf_version"
"""The key every ``--json`` document carries the version of flux-gguf that wrote it under."""


def echo_json(doc: dict[str, Any], **dumps: Any) -> None:
    """Print a command's ``--json`` document on stdout, with the flux-gguf version first
    (``VERSION_KEY``); ``dumps``: json.dumps options (``allow_nan=False``, ``default=str``)."""
    click.echo(json.dumps({VERSION_KEY: __version__, **doc}, indent=2, **dumps))


def check_threads(threads: int | None) -> None:
    """``--threads`` out of range is one ``Error:`` line (click's IntRange printed usage and exit 2)."""
    import numba

    if threads is not None and not 1 <= threads <= numba.config.NUMBA_NUM_THREADS:
        raise PlanError(f"--threads must be between 1 and {numba.config.NUMBA_NUM_THREADS} (the cores numba "
                        f"may use), got {threads}")


FALLBACK_COLUMNS, FALLBACK_ROWS = 80, 24
"""The size assumed for a terminal that reports none (a fresh pty, some CI runners and containers:
``stty size`` says 0 0), where tqdm's own sizing draws nothing at all (it takes the rows for -1)."""


def terminal_columns(stream: Any = None) -> int:
    """The width of the terminal behind ``stream`` (stderr by default): ``COLUMNS`` if set, else
    what the terminal reports; 0 when neither says (unset size, or not a terminal)."""
    env = os.environ.get("COLUMNS", "")
    if env.isdigit() and int(env) > 0:
        return int(env)
    try:
        return os.get_terminal_size((stream or sys.stderr).fileno()).columns
    except (AttributeError, OSError, ValueError):
        return 0


def new_bar(**kwargs: Any) -> tqdm:
    """Every bar the commands draw: on stderr, only when it is a terminal (``disable=None``), as wide
    as the terminal and following its resizes; on a terminal whose size is unset, FALLBACK_COLUMNS
    wide (tqdm would otherwise draw nothing: a long conversion would look hung)."""
    if terminal_columns() > 0:
        return tqdm(disable=None, dynamic_ncols=True, file=sys.stderr, **kwargs)
    return tqdm(disable=None, ncols=FALLBACK_COLUMNS, nrows=FALLBACK_ROWS, file=sys.stderr, **kwargs)


@contextlib.contextmanager
def increment_bar(desc: str, *, leave: bool = False) -> Iterator[ProgressFn]:
    """A byte bar on stderr fed by ``progress(bytes_just_done, total)`` increments (verify, the Hub)."""
    bar = new_bar(total=0, unit="B", unit_scale=True, unit_divisor=1000, desc=desc, leave=leave)

    def update(n: int, total: int) -> None:
        if bar.total != total:
            bar.total = total
        bar.update(n)

    try:
        yield update
    finally:
        bar.close()


@contextlib.contextmanager
def progress_bar(desc: str, unit: str = "B") -> Iterator[ProgressFn]:
    """A tqdm bar on stderr (by default bytes of source processed, with rate and ETA) fed by a
    ``progress(done, total)`` callback."""
    bar = new_bar(total=0, unit=unit, unit_scale=True, unit_divisor=1000, desc=desc, leave=True)

    def update(done: int, total: int) -> None:
        if bar.total != total:
            bar.total = total
        bar.update(done - bar.n)

    try:
        yield update
    finally:
        bar.close()


def describe_plans(plans: Sequence[Plan], out_dir: pathlib.Path | None = None) -> str:
    lines = [f"{'variant':<8} {'file':<40} {'size GB':>9} {'bpw':>6} {'bpw q':>6}  types"]
    for p in plans:
        types = " ".join(f"{k}:{v}" for k, v in p.type_counts.items())
        path = printable(out_dir / p.file_name if out_dir is not None else p.file_name)
        lines.append(f"{p.variant.name:<8} {path:<40} {p.file_size / GB:>9.3f} {p.bits_per_weight:>6.3f} "
                     f"{p.bits_per_weight_quantized:>6.3f}  {types}")
    for p in plans:
        if p.fallbacks:
            lines.append(f"note: {p.variant.name}: {len(p.fallbacks)} tensors fall back to F16 (rows not a "
                         f"multiple of the block size): {', '.join(map(printable, p.fallbacks))}")
    return "\n".join(lines)


def describe_artifacts(records: Sequence[ArtifactRecord]) -> str:
    lines = []
    for r in records:
        counts: dict[str, int] = {}
        for t in r.tensors:
            counts[t.type] = counts.get(t.type, 0) + 1
        types = " ".join(f"{k}:{v}" for k, v in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))
        lines.append(f"{printable(r.path)}  {r.size / GB:.3f} GB  sha256 {r.sha256}  {types}")
    return "\n".join(lines)


# Seconds numba takes to compile one kernel on the 2-core development machine (quiet, cold cache;
# measured with `flux-gguf example` and `flux-gguf warmup` on an empty NUMBA_CACHE_DIR, see README Figures).
COMPILE_SECONDS_PER_KERNEL = 5


def compile_notice(missing: Sequence[str]) -> str:
    """What the first run of a new set of kernels says before compiling them: how many, about how
    long, that they are cached afterwards, and that ``flux-gguf warmup`` compiles every one at once."""
    seconds = COMPILE_SECONDS_PER_KERNEL * len(missing)
    return (f"compiling {len(missing)} quantization kernel{'s' if len(missing) != 1 else ''} this run needs "
            f"(about {seconds} s, cached for later runs; `flux-gguf warmup` compiles all of them at once): "
            f"{', '.join(missing)}")


def compile_kernels(missing: Sequence[str], *, leave: bool = False) -> None:
    """Compile the kernels ``quant_kernels.uncompiled_kernels`` named, one by one, with a bar whose
    elapsed time keeps moving while numba holds the main thread."""
    bar = new_bar(total=len(missing), desc="compiling", unit="kernel", leave=leave)
    stop = threading.Event()

    def tick() -> None:  # numba holds the main thread while it compiles; keep the elapsed time moving
        while not stop.wait(0.5):
            bar.refresh()

    ticker = threading.Thread(target=tick, name="flux-gguf-compile-ticker", daemon=True)
    ticker.start()
    try:
        for name in missing:
            bar.set_postfix_str(name, refresh=True)
            quant_kernels.compile_kernel(name)
            bar.update(1)
    finally:
        stop.set()
        ticker.join()
        bar.close()


def prepare_kernels(types: Iterable[str], *, imatrix: bool = False, sources: Iterable[str] = ()) -> None:
    """The library's ``before_quantize`` hook: if numba's cache lacks kernels for these storage types,
    say so once on stderr and compile them with a progress bar (refreshed while a kernel compiles),
    so the first run after an install never sits silent for 20 s. Silent when all are cached (ms)."""
    missing = quant_kernels.uncompiled_kernels(list(types), imatrix=imatrix, sources=list(sources))
    if not missing:
        return
    # tqdm.write: above any bar already on screen (the command's own progress bar is open)
    tqdm.write(compile_notice(missing), file=sys.stderr)
    compile_kernels(missing)
