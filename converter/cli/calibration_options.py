"""What ``imatrix`` and ``sensitivity`` share: the calibration inputs options (one decorator) and how a
command runs as one of torchrun's ranks (rank 0 reports and writes; any rank's failure is one line)."""
from __future__ import annotations

import contextlib
import functools
import pathlib
from dataclasses import dataclass
from typing import Any, Callable, Iterator, TypeVar

import click

from converter.errors import CalibrationError
from converter.quality.probes import ProbeSpec

from .output import printable, progress_bar
from .validate import _DEVICE, _log

F = TypeVar("F", bound=Callable[..., Any])

_OPTIONS = [
    click.option("--inputs", "inputs_file", type=click.Path(path_type=pathlib.Path, dir_okay=False), default=None,
                 help="Saved transformer inputs (safetensors; keys named like FluxTransformer2DModel.forward's "
                      "arguments)."),
    click.option("--pipeline", "pipeline_dir", type=click.Path(path_type=pathlib.Path, file_okay=False), default=None,
                 help="Local FLUX.1 Kontext diffusers pipeline folder: calibrate while it renders --prompts."),
    click.option("--prompts", "prompts_file", type=click.Path(path_type=pathlib.Path, dir_okay=False), default=None,
                 help="With --pipeline: a text file, one prompt per line."),
    click.option("--images", "images_dir", type=click.Path(path_type=pathlib.Path, file_okay=False), default=None,
                 help="With --pipeline: folder of input images; prompt i edits image i (cycling)."),
    click.option("--steps", type=click.IntRange(1), default=28, show_default=True,
                 help="With --pipeline: denoising steps per prompt (every step is a calibration sample)."),
    click.option("--guidance", type=float, default=2.5, show_default=True, help="With --pipeline: guidance scale."),
    click.option("--height", type=click.IntRange(16), default=None,
                 help="Probe height in pixels (default 512), or the render height with --pipeline (default: "
                      "automatic)."),
    click.option("--width", type=click.IntRange(16), default=None,
                 help="Probe width in pixels (default 512), or the render width with --pipeline (default: "
                      "automatic)."),
    click.option("--probes", type=click.IntRange(1), default=4, show_default=True,
                 help="Without --inputs/--pipeline: how many seeded probes (a smoke default, not a calibration set)."),
    click.option("--text-tokens", type=click.IntRange(1), default=512, show_default=True,
                 help="Text tokens of each probe (T5 for FLUX.1)."),
    click.option("--seed", type=int, default=0, show_default=True, help="First probe seed, or the render seed."),
    click.option("--device", type=_DEVICE, default=None,
                 help="Where the transformer runs (default: cuda if available; under torchrun, GPU LOCAL_RANK)."),
]
_NAMES = ("inputs_file", "pipeline_dir", "prompts_file", "images_dir", "steps", "guidance", "height", "width",
          "probes", "text_tokens", "seed", "device")


@dataclass(frozen=True)
class CalibrationInputs:
    """The inputs options of one command, checked: seeded probes, an inputs file, or a pipeline run."""

    inputs_file: pathlib.Path | None
    pipeline_dir: pathlib.Path | None
    prompts_file: pathlib.Path | None
    images_dir: pathlib.Path | None
    steps: int
    guidance: float
    height: int | None
    width: int | None
    probes: int
    text_tokens: int
    seed: int
    device: str | None

    def __post_init__(self) -> None:
        given = [flag for flag, value in (("--prompts", self.prompts_file), ("--images", self.images_dir))
                 if value is not None]
        if self.pipeline_dir is None and given:
            raise CalibrationError(f"{given[0]} needs --pipeline")
        if self.pipeline_dir is not None and self.inputs_file is not None:
            raise CalibrationError("--inputs and --pipeline exclude each other")
        if self.pipeline_dir is not None and self.prompts_file is None:
            raise CalibrationError("--pipeline needs --prompts")
        if (self.height is None) != (self.width is None):
            raise CalibrationError("give both --height and --width, or neither")

    @property
    def probe(self) -> ProbeSpec:
        return ProbeSpec(height=self.height or 512, width=self.width or 512, text_tokens=self.text_tokens,
                         seed=self.seed)

    def pipeline_spec(self) -> Any:
        """The pipeline run (a converter.quality.calibrate.PipelineSpec), or None without --pipeline."""
        from converter.quality.calibrate import PipelineSpec

        if self.pipeline_dir is None or self.prompts_file is None:
            return None
        return PipelineSpec(self.pipeline_dir, self.prompts_file, **self.pipeline_kwargs())

    def pipeline_kwargs(self) -> dict[str, Any]:
        """The keyword arguments of the library's pipeline runs (collect_imatrix_pipeline, measure_sensitivity)."""
        return {"images_dir": self.images_dir, "steps": self.steps, "guidance": self.guidance,
                "height": self.height, "width": self.width, "seed": self.seed}


def calibration_inputs(fn: F) -> F:
    """Add the inputs options; the command receives them as one ``calibration`` argument."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        kwargs["calibration"] = CalibrationInputs(**{k: kwargs.pop(k) for k in _NAMES})
        return fn(*args, **kwargs)

    for option in reversed(_OPTIONS):
        wrapper = option(wrapper)
    return wrapper  # type: ignore[return-value]


def as_rank(fn: F) -> F:
    """Run a command as one of torchrun's ranks: ranks other than 0 print nothing and exit 1 on any
    failure (rank 0 prints the one ``Error:`` line, naming the failing rank when it is another)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from converter.quality.distributed import ranks_from_environment

        try:
            return fn(*args, **kwargs)
        except Exception:
            try:
                rank = ranks_from_environment()[0]
            except CalibrationError:
                rank = 0  # the variables are wrong: every process says so
            if rank != 0:
                raise click.exceptions.Exit(1) from None
            raise

    return wrapper  # type: ignore[return-value]


@contextlib.contextmanager
def rank_progress(main: bool, desc: str, unit: str) -> Iterator[Callable[[int, int], None] | None]:
    """A progress bar on rank 0; None elsewhere."""
    if not main:
        yield None
        return
    with progress_bar(desc, unit=unit) as progress:
        yield progress


def rank_log(main: bool) -> Callable[[str], None]:
    """Messages on stderr from rank 0 (escaped: they name files, whose names come from anywhere)."""

    def log(message: str) -> None:
        if main:
            _log(printable(message))

    return log
