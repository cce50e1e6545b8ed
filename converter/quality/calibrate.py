"""Collect an importance matrix (imatrix) by running the FLUX transformer through diffusers.

For every Linear whose weight a recipe quantizes (2-D, not one of the kept ``img_in``/``txt_in``/
``time_in``/``vector_in``/``guidance_in``/``final_layer`` tensors), a forward pre-hook adds the
sum of ``x_c**2`` over every token of its input into one float64 vector per BFL weight, on the
device, and counts the tokens (llama.cpp's ``in_sum2`` and ``counts``). Each call reduces its input
in float32 (``vector_norm(..., dtype=float32)``: no upcast copy of the activations) and adds that
partial sum into the float64 vector, so memory is one vector per tensor whatever the run length.

diffusers splits fused BFL weights (``qkv`` into to_q/to_k/to_v, ``single_blocks.N.linear1`` into
to_q/to_k/to_v + proj_mlp); all parts see the same input, so only the first part is hooked and the
input is counted once (the mapping is converter.diffusers_names.diffusers_parts).

Inputs, in increasing realism: seeded probes shaped as the model family's pipeline calls (FLUX.1
Kontext's or FLUX.2's; a smoke default: random inputs say little about real activations), a safetensors file of saved transformer inputs (any pipeline's
real inputs, captured with :func:`capture_transformer_inputs`; FLUX.2's Flux2Pipeline too), or
the real Kontext pipeline run on the user's prompts and images, collecting at every denoising
step (FLUX.1 only).
"""
from __future__ import annotations

import contextlib
import math
import os
import pathlib
import stat
import tempfile
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator, Mapping, Sequence

import numpy as np

from converter.detect import detect_model
from converter.diffusers_names import bfl_name_for, diffusers_parts, part_rows
from converter.errors import CalibrationError, FluxGGUFError, SourceError
from converter.layout import CONTEXT_DIM, FLUX1, FLUX2, VEC_DIM, FluxGeometry, bfl_tensor_shapes, is_kept_unquantized
from converter.hub.source import is_hub_spec, open_any_source
from converter.safetensors_io import SafetensorsFile
from manifests.hashing import partial_path

from .diffusers_model import (
    check_loadable,
    compute_dtype,
    geometry_from_shapes,
    load_gguf_transformer,
    release_memory,
    require_diffusers,
    resolve_device,
    transformer_class_name,
    transformer_config,
    write_transformer_config,
)
from .distributed import Ranks
from .probes import ProbeSpec, make_kontext_probe, make_probe

if TYPE_CHECKING:
    import torch

    from converter.imatrix import Imatrix

ProgressFn = Callable[[int, int], None]  # (samples done, samples total)
LogFn = Callable[[str], None]

DEFAULT_PROBES = 4
SMOKE_NOTE = ("seeded random probes: a smoke default, not a calibration set; "
              "use --inputs or --pipeline for real activations")
# Keys of FluxTransformer2DModel.forward an inputs file holds ("guidance" only for models that embed it).
INPUT_KEYS = ("hidden_states", "encoder_hidden_states", "pooled_projections", "timestep", "guidance",
              "img_ids", "txt_ids")
# Flux2Transformer2DModel.forward's: no pooled vector; ids have 4 axes (T, H, W, L).
FLUX2_INPUT_KEYS = ("hidden_states", "encoder_hidden_states", "timestep", "guidance", "img_ids", "txt_ids")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def quantized_weight_names(shapes: Mapping[str, tuple[int, ...]]) -> list[str]:
    """The weights a recipe quantizes (and so the imatrix must cover): 2-D and not kept as they are."""
    return [n for n, s in shapes.items() if len(s) == 2 and not is_kept_unquantized(n)]


# --------------------------------------------------------------------------- the collector


class ImatrixCollector:
    """Forward pre-hooks accumulating sum x^2 per input column for the BFL weights in ``names``.

    The sums of the sample being run go into one flat float64 block (every weight's columns, in
    ``names`` order); :meth:`end_sample` adds the block into the running total, and
    :meth:`take_block` hands it out as a vector instead (for the ranks to exchange; every rank then
    adds every rank's vector with :meth:`add_block`, in global sample order). The total is thus
    ``((s_0 + s_1) + s_2) + ...`` over the samples' float64 sums whatever the number of processes.
    Within a sample (one transformer call, or one prompt's denoising steps) each call's float32
    reduction is added into the block in call order. Use as a context manager (the hooks are
    removed on exit); :meth:`imatrix` returns the result and fails naming every weight that saw
    no input.
    """

    def __init__(self, model: Any, names: Iterable[str]) -> None:
        import torch

        self.names = list(names)
        wanted = set(self.names)
        self._handles: list[Any] = []
        modules: dict[str, Any] = {}
        arch = FLUX2 if type(model).__name__ == "Flux2Transformer2DModel" else FLUX1
        for module_name, module in model.named_modules():
            if not isinstance(module, torch.nn.Linear):
                continue
            hit = bfl_name_for(f"{module_name}.weight", arch)
            if hit is None or hit[0] not in wanted or hit[1] != 0:  # a shared input: the first part counts it
                continue
            modules[hit[0]] = module
        missing = [n for n in self.names if n not in modules]
        if missing:
            raise CalibrationError(_listing("the model has no Linear layer for", missing))
        widths = [int(modules[n].in_features) for n in self.names]
        self._offsets = [sum(widths[:k]) for k in range(len(widths) + 1)]
        device = modules[self.names[0]].weight.device if self.names else "cpu"
        self._block = torch.zeros(self._offsets[-1], dtype=torch.float64, device=device)
        self._total = torch.zeros_like(self._block)
        self._block_counts = [0] * len(self.names)
        self._counts = [0] * len(self.names)
        for k, n in enumerate(self.names):
            self._handles.append(modules[n].register_forward_pre_hook(self._hook(k)))

    def _hook(self, k: int) -> Callable[..., None]:
        import torch

        view = self._block[self._offsets[k]:self._offsets[k + 1]]

        def hook(_module: Any, args: tuple[Any, ...]) -> None:
            x = args[0]
            dims = tuple(range(x.dim() - 1))
            view.add_(torch.linalg.vector_norm(x, 2, dim=dims, dtype=torch.float32).square_())
            self._block_counts[k] += x.numel() // x.shape[-1]

        return hook

    @property
    def block_size(self) -> int:
        """Length of the vectors :meth:`take_block` returns: status, tokens, calls, counts, sums."""
        return 3 + len(self.names) + self._offsets[-1]

    def take_block(self, status: int, tokens: int = 0, calls: int = 0) -> torch.Tensor:
        """The current sample as one float64 vector ``[status, tokens, calls, counts..., sums...]``
        (counts are integers far below 2^53, exact in float64); the block starts afresh."""
        import torch

        head = torch.tensor([status, tokens, calls, *self._block_counts], dtype=torch.float64,
                            device=self._block.device)
        vector = torch.cat([head, self._block])
        self._block.zero_()
        self._block_counts = [0] * len(self.names)
        return vector

    def add_block(self, vector: torch.Tensor) -> None:
        """Add a sample's vector from :meth:`take_block` (this rank's or another's) into the total."""
        n = len(self.names)
        counts = vector[3:3 + n].tolist()
        self._counts = [c + int(v) for c, v in zip(self._counts, counts)]
        self._total.add_(vector[3 + n:])

    def end_sample(self) -> None:
        """Add the current sample into the total (one process: what a rank does with its own block)."""
        self.add_block(self.take_block(1))

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def __enter__(self) -> ImatrixCollector:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def imatrix(self, datasets: Sequence[str], chunk_count: int, chunk_size: int) -> Imatrix:
        """The collected sums as an :class:`converter.imatrix.Imatrix` (float32 in_sum2 per weight);
        a sample still open (calls since the last :meth:`end_sample`) is added first."""
        from converter.imatrix import Imatrix, ImatrixEntry

        if any(self._block_counts):
            self.end_sample()
        missing = [n for n, c in zip(self.names, self._counts) if c == 0]
        if missing:
            raise CalibrationError(_listing("no input reached", missing))
        total = self._total.cpu().numpy()
        entries = {}
        for k, n in enumerate(self.names):
            s = total[self._offsets[k]:self._offsets[k + 1]]
            if not np.isfinite(s).all():
                raise CalibrationError(f"the inputs of {n} hold NaN or inf; the transformer's activations overflow")
            entries[n] = ImatrixEntry(in_sum2=s.astype(np.float32), count=float(self._counts[k]))
        return Imatrix(entries=entries, datasets=list(datasets), chunk_count=chunk_count, chunk_size=chunk_size)


def _listing(what: str, names: Sequence[str]) -> str:
    shown = ", ".join(names[:5])
    more = f" (and {len(names) - 5} more)" if len(names) > 5 else ""
    return f"{what} {len(names)} quantized weight(s): {shown}{more}"


# --------------------------------------------------------------------------- loading the model


def diffusers_state_dict(tensors: Mapping[str, np.ndarray], device: str, dtype: torch.dtype,
                         arch: str = FLUX1) -> dict[str, Any]:
    """BFL tensors (float32 numpy) -> diffusers keys as torch tensors: the inverse of our naming table."""
    import torch

    out: dict[str, Any] = {}
    for name, x in tensors.items():
        mapping = diffusers_parts(name, arch)
        if mapping is None:
            raise CalibrationError(f"tensor {name} is not part of a {'FLUX.2' if arch == FLUX2 else 'FLUX.1'} transformer")
        t = torch.from_numpy(np.ascontiguousarray(x))
        if mapping.swap_halves:
            half = t.shape[0] // 2
            t = torch.cat([t[half:], t[:half]])
        rows = part_rows(name, t.shape[0], arch) if len(mapping.parts) > 1 else (t.shape[0],)
        for key, piece in zip(mapping.parts, torch.split(t, list(rows)), strict=True):
            out[key] = piece.to(device=device, dtype=dtype).contiguous()
    return out


def build_transformer(geometry: FluxGeometry, read: Callable[[str], np.ndarray], device: str,
                      dtype: torch.dtype | None = None) -> Any:
    """A diffusers FluxTransformer2DModel (FLUX.2: Flux2Transformer2DModel) of any geometry, weights
    from ``read(BFL name)`` (float32).

    Built on the meta device and filled tensor by tensor on ``device``: host memory holds one
    tensor at a time. Unlike from_single_file this loads any hidden size (small test models).
    """
    import torch

    diffusers = require_diffusers()
    dtype = dtype or compute_dtype(device)
    config = {k: v for k, v in transformer_config(geometry).items() if k != "_class_name"}
    with torch.device("meta"):
        model = getattr(diffusers, transformer_class_name(geometry))(**config)
    state: dict[str, Any] = {}
    for name in bfl_tensor_shapes(geometry):
        state.update(diffusers_state_dict({name: read(name)}, device, dtype, geometry.arch))
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval().requires_grad_(False)


@contextlib.contextmanager
def open_transformer(path: str | os.PathLike[str], device: str) -> Iterator[tuple[Any, FluxGeometry, str]]:
    """(model, geometry, kind) for a checkpoint (file or diffusers folder, any dtype convert reads, or an
    ``hf://`` repo streamed by range requests) or a GGUF."""
    if not is_hub_spec(path) and pathlib.Path(path).suffix == ".gguf":
        path = pathlib.Path(path)
        from .validate import gguf_shapes, open_gguf

        geometry = geometry_from_shapes(gguf_shapes(open_gguf(path)), str(path))
        check_loadable(geometry)
        with tempfile.TemporaryDirectory(prefix="flux-gguf-config-") as tmp:
            model = load_gguf_transformer(path, write_transformer_config(geometry, tmp), device)
        try:
            yield model, geometry, "gguf"
        finally:
            del model
            release_memory(device)
        return
    try:
        with open_any_source(path) as source:
            geometry = detect_model(source).geometry
            model = build_transformer(geometry, source.read, device)
    except CalibrationError:
        raise
    except FluxGGUFError as exc:  # SourceError / ModelDetectionError keep their message
        raise CalibrationError(str(exc)) from exc
    try:
        yield model, geometry, "source"
    finally:
        del model
        release_memory(device)


def source_geometry(path: str | os.PathLike[str]) -> FluxGeometry:
    """The geometry of a checkpoint, ``hf://`` repo or GGUF, from its header alone (nothing is loaded)."""
    if not is_hub_spec(path) and pathlib.Path(path).suffix == ".gguf":
        from .validate import gguf_shapes, open_gguf

        return geometry_from_shapes(gguf_shapes(open_gguf(pathlib.Path(path))), str(path))
    try:
        with open_any_source(path) as source:
            return detect_model(source).geometry
    except FluxGGUFError as exc:
        raise CalibrationError(str(exc)) from exc


# --------------------------------------------------------------------------- inputs


@dataclass(frozen=True)
class Sample:
    """One transformer call's keyword arguments (torch tensors on the device)."""

    kwargs: dict[str, Any]
    tokens: int  # image + text tokens, times the batch


def probe_sample(i: int, count: int, spec: ProbeSpec, device: str, dtype: Any, guidance_embeds: bool,
                 geometry: FluxGeometry | None = None) -> Sample:
    """Probe ``i`` of ``count``: seed ``spec.seed + i``, timestep ``(i + 1) / (count + 1)`` (a pure
    function of the index, so any process can make any probe). ``geometry``: the model's (its
    family's probe: FLUX.2's for a FLUX.2 model); None: FLUX.1 Kontext's."""
    s = ProbeSpec(height=spec.height, width=spec.width, text_tokens=spec.text_tokens, seed=spec.seed + i,
                  timestep=(i + 1) / (count + 1), guidance=spec.guidance, context_image=spec.context_image)
    p = make_probe(s, geometry) if geometry is not None else make_kontext_probe(s)
    return Sample(p.transformer_kwargs(device, dtype, guidance_embeds=guidance_embeds), s.image_tokens + s.text_tokens)


def probe_samples(count: int, spec: ProbeSpec, device: str, dtype: Any, guidance_embeds: bool,
                  geometry: FluxGeometry | None = None) -> Iterator[Sample]:
    """``count`` seeded probes: seeds spec.seed, spec.seed + 1, ...; timesteps spread over (0, 1)."""
    for i in range(count):
        yield probe_sample(i, count, spec, device, dtype, guidance_embeds, geometry)


def probes_dataset(count: int, spec: ProbeSpec) -> str:
    return (f"probes:seed={spec.seed}..{spec.seed + count - 1},{spec.width}x{spec.height},"
            f"text={spec.text_tokens} (smoke default, not a calibration set)")


MAX_IMAGE_TOKENS = 32768
"""Image tokens per sample an inputs file may hold: two 2048x2048 latents (the target and Kontext's
context image; 1024x1024 makes 2 x 4096)."""
MAX_TEXT_TOKENS = 512
"""T5 tokens per sample: the longest ``max_sequence_length`` the FLUX pipelines accept."""
_INPUT_DTYPES = {"F32": 4, "F16": 2, "BF16": 2}  # safetensors dtype -> bytes per value
_BATCHED = ("hidden_states", "encoder_hidden_states", "pooled_projections", "timestep", "guidance")


def _finite(raw: np.ndarray, dtype: str) -> bool:
    """Whether every value of little-endian ``raw`` bytes (uint8) is finite, without upcasting."""
    if dtype == "F32":
        return bool(np.isfinite(raw.view("<f4")).all())
    if dtype == "F16":
        return bool(np.isfinite(raw.view("<f2")).all())
    exponent = raw.view("<u2") & np.uint16(0x7F80)  # BF16: an all-ones exponent is inf or NaN
    return not bool((exponent == 0x7F80).any())


class InputsFile:
    """A checked inputs file (see :func:`read_inputs_file`): its header in memory, its values read
    one sample at a time, so memory holds one sample whatever the file's length."""

    def __init__(self, path: pathlib.Path, file: SafetensorsFile) -> None:
        self.path, self._file = path, file
        self.shapes: dict[str, tuple[int, ...]] = {k: t.shape for k, t in file.tensors.items()}
        self.dtypes: dict[str, str] = {k: t.dtype for k, t in file.tensors.items()}
        self.samples, self.image_tokens = self.shapes["hidden_states"][:2]
        self.text_tokens = self.shapes["encoder_hidden_states"][1]

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> InputsFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _raw(self, key: str, first: int, count: int) -> np.ndarray:
        out = np.empty(count * _INPUT_DTYPES[self.dtypes[key]], dtype=np.uint8)
        try:
            self._file.read_raw_into(key, first, out)
        except SourceError as exc:
            raise CalibrationError(str(exc)) from None
        return out

    def _row(self, key: str, i: int) -> np.ndarray:
        """Sample ``i`` of a batched key (all of an unbatched one), as raw bytes."""
        shape = self.shapes[key]
        if key not in _BATCHED:
            return self._raw(key, 0, math.prod(shape))
        per = math.prod(shape[1:])
        return self._raw(key, i * per, per)

    def check_values(self) -> None:
        """Every value finite: read once, a sample at a time (no upcast copy)."""
        for key in self.shapes:
            rows = self.samples if key in _BATCHED else 1
            for i in range(rows):
                if not _finite(self._row(key, i), self.dtypes[key]):
                    raise CalibrationError(f"{self.path}: {key} must hold finite floating-point values")

    def tensor(self, key: str) -> torch.Tensor:
        """One key's values, all samples (a library convenience; collection reads a sample at a time)."""
        import torch

        raw = self._raw(key, 0, math.prod(self.shapes[key]))
        return torch.from_numpy(raw).view(_torch_dtype(self.dtypes[key])).reshape(self.shapes[key])

    def sample(self, i: int, device: str, dtype: Any) -> Sample:
        """Sample ``i`` as the transformer's keyword arguments (ids and guidance stay float32, as the
        pipeline keeps them)."""
        import torch

        kw = {}
        for key, shape in self.shapes.items():
            t = torch.from_numpy(self._row(key, i)).view(_torch_dtype(self.dtypes[key]))
            t = t.reshape((1, *shape[1:]) if key in _BATCHED else shape)
            kw[key] = t.to(device, torch.float32 if key in ("img_ids", "txt_ids", "guidance") else dtype)
        return Sample(kw, self.image_tokens + self.text_tokens)


def _torch_dtype(dtype: str) -> Any:
    import torch

    return {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}[dtype]


def read_inputs_file(path: str | os.PathLike[str], geometry: FluxGeometry | None = None) -> InputsFile:
    """Saved transformer inputs, checked from the header against the model (or, without
    ``geometry``, against everything but the model) and then for finite values; a one-line error
    for wrong keys, dtypes or shapes. Nothing is allocated from the header's shapes before they
    are checked: they must fit the file's bytes (the header may not lie about them) and
    :data:`MAX_IMAGE_TOKENS` / :data:`MAX_TEXT_TOKENS` per sample. A symbolic link is followed (as
    for sources); what it names must be a regular file.

    Keys follow ``FluxTransformer2DModel.forward``: hidden_states [S, T_img, C], encoder_hidden_states
    [S, T_txt, 4096], pooled_projections [S, 768], timestep [S], guidance [S] (models with guidance
    embedding only), img_ids [T_img, 3], txt_ids [T_txt, 3]; F32, F16 or BF16. A FLUX.2 file follows
    ``Flux2Transformer2DModel.forward``: no pooled_projections, encoder_hidden_states [S, T_txt, the
    model's text width], img_ids [T_img, 4], txt_ids [T_txt, 4] (without ``geometry``, a file of 4-axis
    ids and no pooled vector is taken for one).
    """
    path = pathlib.Path(path)
    try:
        st = path.stat()
    except FileNotFoundError:
        raise CalibrationError(f"{path}: no such inputs file") from None
    except OSError as exc:
        raise CalibrationError(f"{path}: cannot read ({exc.strerror or exc})") from None
    if not stat.S_ISREG(st.st_mode):
        raise CalibrationError(f"{path}: not a regular file (a FIFO, device or socket cannot be an inputs file)")
    try:
        file = SafetensorsFile(path)  # opened O_NONBLOCK and fstat-ed; data ranges checked against the file
    except SourceError as exc:
        text = str(exc).removeprefix(f"{path}: ")
        raise CalibrationError(f"{path}: not a readable safetensors file ({text})") from None
    try:
        _check_inputs_header(path, {k: t.shape for k, t in file.tensors.items()},
                             {k: t.dtype for k, t in file.tensors.items()}, geometry)
        inputs = InputsFile(path, file)
        inputs.check_values()
    except BaseException:
        file.close()
        raise
    return inputs


def check_inputs_model(inputs: InputsFile, geometry: FluxGeometry) -> None:
    """What :func:`read_inputs_file` without ``geometry`` left out: the keys and channels the model needs."""
    _check_inputs_header(inputs.path, inputs.shapes, inputs.dtypes, geometry)


def _inputs_family(shapes: Mapping[str, tuple[int, ...]], geometry: FluxGeometry | None) -> str:
    """FLUX.2 for a FLUX.2 model; without one, for a file of 4-axis ids and no pooled vector."""
    if geometry is not None:
        return geometry.arch
    ids = shapes.get("img_ids", ())
    return FLUX2 if "pooled_projections" not in shapes and len(ids) == 2 and ids[1] == 4 else FLUX1


def _check_inputs_header(path: pathlib.Path, shapes: Mapping[str, tuple[int, ...]], dtypes: Mapping[str, str],
                         geometry: FluxGeometry | None) -> None:
    flux2 = _inputs_family(shapes, geometry) == FLUX2
    guidance = geometry.guidance if geometry is not None else "guidance" in shapes
    keys = FLUX2_INPUT_KEYS if flux2 else INPUT_KEYS
    required = [k for k in keys if k != "guidance" or guidance]
    forward = "Flux2Transformer2DModel.forward" if flux2 else "FluxTransformer2DModel.forward"
    missing = [k for k in required if k not in shapes]
    if missing:
        raise CalibrationError(f"{path}: missing key(s) {', '.join(missing)}; an inputs file holds "
                               f"{', '.join(required)} (the arguments of {forward})")
    extra = sorted(k for k in shapes if k not in required)
    if extra:
        raise CalibrationError(f"{path}: unexpected key(s) {', '.join(extra)}; expected exactly {', '.join(required)}")
    for key in required:
        if dtypes[key] not in _INPUT_DTYPES:
            raise CalibrationError(f"{path}: {key} is {dtypes[key]}; expected {', '.join(_INPUT_DTYPES)}")
    hs = list(shapes["hidden_states"])
    channels = geometry.img_in_channels if geometry is not None else hs[2] if len(hs) == 3 else "channels"
    if len(hs) != 3 or hs[0] < 1 or hs[2] != channels or hs[2] < 1:
        raise CalibrationError(f"{path}: hidden_states has shape {hs}; expected [samples, image tokens, {channels}]")
    s, t_img = hs[0], hs[1]
    if not 1 <= t_img <= MAX_IMAGE_TOKENS:
        raise CalibrationError(f"{path}: hidden_states holds {t_img} image tokens per sample; 1 to "
                               f"{MAX_IMAGE_TOKENS} are accepted (two 2048x2048 latents)")
    enc = list(shapes["encoder_hidden_states"])
    text_dim: Any = CONTEXT_DIM
    if flux2:  # the model's text width; without a model, any
        text_dim = geometry.context_dim if geometry is not None else enc[2] if len(enc) == 3 and enc[2] >= 1 else "text width"
    if len(enc) != 3 or enc[1] < 1:
        raise CalibrationError(f"{path}: encoder_hidden_states has shape {enc}; expected "
                               f"[{s}, text tokens, {text_dim}]")
    t_txt = enc[1]
    if t_txt > MAX_TEXT_TOKENS:
        raise CalibrationError(f"{path}: encoder_hidden_states holds {t_txt} text tokens per sample; at most "
                               f"{MAX_TEXT_TOKENS} are accepted (the FLUX pipelines' longest max_sequence_length)")
    axes = 4 if flux2 else 3
    expected = {
        "encoder_hidden_states": [s, t_txt, text_dim],
        "timestep": [s],
        "guidance": [s],
        "img_ids": [t_img, axes],
        "txt_ids": [t_txt, axes],
    }
    if not flux2:
        expected["pooled_projections"] = [s, VEC_DIM]
    for key, want in expected.items():
        if key in shapes and list(shapes[key]) != want:
            raise CalibrationError(f"{path}: {key} has shape {list(shapes[key])}; expected {want} "
                                   f"(hidden_states holds {s} samples of {t_img} image tokens)")


def file_samples(inputs: InputsFile, device: str, dtype: Any) -> Iterator[Sample]:
    """One sample per row of an inputs file, read when it is needed."""
    for i in range(inputs.samples):
        yield inputs.sample(i, device, dtype)


@contextlib.contextmanager
def capture_transformer_inputs(transformer: Any) -> Iterator[list[dict[str, Any]]]:
    """Record the keyword arguments of every call of ``transformer`` (e.g. ``pipe.transformer``).

    ::

        with capture_transformer_inputs(pipe.transformer) as calls:
            pipe(image=image, prompt="make it snow", num_inference_steps=28)
        write_inputs_file(calls, "inputs.safetensors")   # then: flux-gguf imatrix SRC --inputs inputs.safetensors
    """
    calls: list[dict[str, Any]] = []

    def grab(_module: Any, _args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        calls.append({k: v.detach().to("cpu", copy=True) for k, v in kwargs.items()
                      if k in INPUT_KEYS and v is not None})

    handle = transformer.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        yield calls
    finally:
        handle.remove()


def write_inputs_file(calls: Sequence[Mapping[str, Any]], path: str | os.PathLike[str]) -> pathlib.Path:
    """Stack captured calls (same token counts) into an inputs file; written under a hidden unique partial name and renamed."""
    import torch
    from safetensors.torch import save_file

    if not calls:
        raise CalibrationError(f"{path}: no transformer calls were captured")
    batched = ("hidden_states", "encoder_hidden_states", "pooled_projections", "timestep", "guidance")
    keys = [k for k in INPUT_KEYS if k in calls[0]]
    out: dict[str, Any] = {}
    try:
        for k in keys:
            if k in batched:
                out[k] = torch.cat([c[k].reshape(-1, *c[k].shape[1:]) if c[k].dim() else c[k].reshape(1)
                                    for c in calls]).contiguous()
            else:  # Flux2Pipeline's ids are int64: float32 holds them exactly, and inputs files are float
                ids = calls[0][k]
                out[k] = (ids[0] if ids.dim() == 3 else ids).to(torch.float32).contiguous()
    except (RuntimeError, KeyError) as exc:
        raise CalibrationError(f"{path}: captured calls differ in shape and cannot be stacked ({_first_line(exc)}); "
                               "capture one resolution per file") from None
    path = pathlib.Path(path)
    tmp = partial_path(path)  # unique to this call: a user's PATH.partial is never touched
    try:
        save_file(out, str(tmp))
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def read_prompts(path: str | os.PathLike[str]) -> list[str]:
    """One prompt per line; blank lines and lines starting with # are skipped."""
    path = pathlib.Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise CalibrationError(f"{path}: no such prompts file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise CalibrationError(f"{path}: cannot read the prompts file ({exc})") from None
    prompts = [ln.strip() for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]
    if not prompts:
        raise CalibrationError(f"{path}: the prompts file is empty; expected one prompt per line")
    return prompts


def list_images(folder: str | os.PathLike[str]) -> list[pathlib.Path]:
    folder = pathlib.Path(folder)
    if not folder.is_dir():
        raise CalibrationError(f"{folder}: no such image folder")
    images = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not images:
        raise CalibrationError(f"{folder}: holds no image ({', '.join(IMAGE_SUFFIXES)})")
    return images


# --------------------------------------------------------------------------- collecting


@dataclass(frozen=True)
class CollectionReport:
    """What a collection run did (the --json summary, with the imatrix itself)."""

    imatrix: Imatrix
    inputs: str  # "probes", "file" or "pipeline"
    datasets: tuple[str, ...]
    samples: int
    tokens: int
    seconds: float
    device: str
    model: str  # "source" or "gguf"
    smoke: bool = False
    notes: tuple[str, ...] = field(default_factory=tuple)
    load_seconds: float = 0.0  # of ``seconds``: loading the transformer (and pipeline)
    ranks: int = 1  # processes that shared the samples

    def to_dict(self) -> dict[str, Any]:
        counts = [e.count for e in self.imatrix.entries.values()]
        return {
            "tensors": len(self.imatrix.entries),
            "samples": self.samples,
            "tokens": self.tokens,
            "inputs": self.inputs,
            "datasets": list(self.datasets),
            "smoke_default": self.smoke,
            "seconds": self.seconds,
            "load_seconds": self.load_seconds,
            "seconds_per_sample": (self.seconds - self.load_seconds) / self.samples if self.samples else None,
            "device": self.device,
            "model": self.model,
            "ranks": self.ranks,
            "min_count": min(counts) if counts else 0,
            "max_count": max(counts) if counts else 0,
            "notes": list(self.notes),
        }


def _collect_rounds(ranks: Ranks, collector: ImatrixCollector, total: int,
                    run_one: Callable[[int], tuple[int, int]], progress: ProgressFn | None,
                    progress_total: int | None = None) -> tuple[int, int, int]:
    """Run global samples ``0..total-1`` spread over the ranks (:meth:`Ranks.rounds`); after each
    round every rank holds every rank's sample vector and adds them in global sample order, so the
    total is the same on every rank and for any number of ranks. ``run_one(i)`` runs sample ``i``
    and returns its (tokens, transformer calls). A sample that raises is carried to every rank
    (:meth:`Ranks.agree`). Returns (samples, calls, tokens); progress counts calls, on rank 0."""
    import torch

    samples = calls = tokens = 0
    with torch.inference_mode():
        for i in ranks.rounds(total):
            status, error, n_tokens, n_calls = 0, None, 0, 0
            if i is not None:
                try:
                    n_tokens, n_calls = run_one(i)
                    status = 1
                except Exception as exc:  # noqa: BLE001 - every rank learns of it below
                    status, error = 2, exc
            rows = ranks.all_gather(collector.take_block(status, n_tokens, n_calls))
            statuses = [int(s) for s in rows[:, 0].tolist()]
            if 2 in statuses:
                ranks.agree(error)
            for row, s in zip(rows, statuses):
                if s == 1:
                    collector.add_block(row)
                    samples += 1
                    tokens += int(row[1].item())
                    calls += int(row[2].item())
            if progress and ranks.main:
                progress(calls, progress_total or total)
    return samples, calls, tokens


def _single(device: str | None) -> Ranks:
    return Ranks(device=resolve_device(device))


def collect_imatrix(
    source: str | os.PathLike[str],
    *,
    inputs: str | os.PathLike[str] | None = None,
    probes: int = DEFAULT_PROBES,
    probe: ProbeSpec = ProbeSpec(height=512, width=512),
    device: str | None = None,
    progress: ProgressFn | None = None,
    log: LogFn | None = None,
    ranks: Ranks | None = None,
) -> CollectionReport:
    """Collect on the seeded probes (default) or on the saved transformer inputs in ``inputs``.

    ``ranks`` (from :func:`converter.quality.distributed.open_ranks`): this process's share of
    the samples (global index ``i`` runs on rank ``i mod world``; its device is ``ranks.device``);
    every rank returns the same report, with the imatrix of all the samples."""
    say = log or (lambda _msg: None)
    if inputs is None and probes < 1:
        raise CalibrationError(f"need at least one probe, got {probes}")
    require_diffusers()
    ranks = ranks or _single(device)
    dev = ranks.device
    start = time.perf_counter()
    # the inputs file is checked (header, then values) before the model is loaded: a bad one fails in
    # seconds, not after a minute of loading 24 GB; only what needs the model waits for it
    with contextlib.ExitStack() as stack:
        with ranks.step():
            saved = stack.enter_context(read_inputs_file(inputs)) if inputs is not None else None
        with ranks.step():
            model, geometry, kind = stack.enter_context(open_transformer(source, dev))
            names = quantized_weight_names(bfl_tensor_shapes(geometry))
            dtype = compute_dtype(dev)
            if saved is not None:
                check_inputs_model(saved, geometry)
            collector = stack.enter_context(ImatrixCollector(model, names))
        loaded = time.perf_counter() - start
        ranks.same((probes, 0, 0) if saved is None else (saved.samples, saved.image_tokens, saved.text_tokens),
                   "(samples, image tokens, text tokens)")
        if saved is None:
            say(f"collecting on {probes} seeded random probes (a smoke default, not a calibration set)")
            datasets = (probes_dataset(probes, probe),)
            total, chunk = probes, probe.image_tokens + probe.text_tokens

            def sample(i: int) -> Sample:
                return probe_sample(i, probes, probe, dev, dtype, geometry.guidance, geometry)
        else:
            total, chunk = saved.samples, saved.image_tokens + saved.text_tokens
            datasets = (pathlib.Path(inputs).name,)
            say(f"collecting on {total} saved inputs from {inputs}")

            def sample(i: int) -> Sample:
                return saved.sample(i, dev, dtype)

        def run_one(i: int) -> tuple[int, int]:
            s = sample(i)
            model(**s.kwargs, return_dict=False)
            return s.tokens, 1

        done, _calls, tokens = _collect_rounds(ranks, collector, total, run_one, progress)
        with ranks.step():
            im = collector.imatrix(datasets, done, chunk)
    return CollectionReport(imatrix=im, inputs="probes" if inputs is None else "file", datasets=datasets,
                            samples=done, tokens=tokens, seconds=time.perf_counter() - start, device=dev,
                            model=kind, smoke=inputs is None, notes=(SMOKE_NOTE,) if inputs is None else (),
                            load_seconds=loaded, ranks=ranks.world)


def collect_with_pipeline(
    pipe: Any,
    prompts: Sequence[str],
    *,
    images: Sequence[Any] = (),
    steps: int = 28,
    guidance: float = 2.5,
    height: int | None = None,
    width: int | None = None,
    seed: int = 0,
    max_sequence_length: int = 512,
    dataset: str = "pipeline",
    progress: ProgressFn | None = None,
    ranks: Ranks | None = None,
    capture: list[dict[str, Any]] | None = None,
) -> tuple[Imatrix, int, int]:
    """Run ``pipe`` (a FluxKontextPipeline) on every prompt (prompt ``i`` with image ``i mod
    len(images)``, if any, and seed ``seed + i``), collecting at every denoising step; with
    ``ranks``, prompt ``i`` runs on rank ``i mod world``. Returns (imatrix, transformer calls, tokens).

    ``capture``: a list that receives every transformer call's inputs of this rank (on the CPU), in
    call order (what ``sensitivity --pipeline`` replays)."""
    if not prompts:
        raise CalibrationError("no prompts to run the pipeline on")
    if steps < 1:
        raise CalibrationError(f"--steps must be at least 1, got {steps}")
    if (height is None) != (width is None):
        raise CalibrationError("give both --height and --width, or neither")
    import torch

    ranks = ranks or Ranks()
    transformer = pipe.transformer
    geometry = geometry_from_shapes(_bfl_shapes_of(transformer), "the pipeline's transformer")
    names = quantized_weight_names(bfl_tensor_shapes(geometry))
    calls = [0, 0]  # this sample's transformer calls, tokens

    def count(_module: Any, _args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        hs, enc = kwargs["hidden_states"], kwargs["encoder_hidden_states"]
        calls[0] += 1
        calls[1] += int(hs.shape[0] * (hs.shape[1] + enc.shape[1]))

    size: dict[str, Any] = {}
    if height is not None and width is not None:
        size = {"height": height, "width": width, "max_area": height * width, "_auto_resize": False}

    def run_one(i: int) -> tuple[int, int]:
        calls[0] = calls[1] = 0
        image = images[i % len(images)] if images else None
        pipe(image=image, prompt=prompts[i], num_inference_steps=steps, guidance_scale=guidance,
             generator=torch.Generator(device="cpu").manual_seed(seed + i),
             max_sequence_length=max_sequence_length, output_type="latent", **size)
        return calls[1], calls[0]

    with contextlib.ExitStack() as stack:
        stack.callback(transformer.register_forward_pre_hook(count, with_kwargs=True).remove)
        captured = stack.enter_context(capture_transformer_inputs(transformer)) if capture is not None else None
        with ranks.step():
            collector = stack.enter_context(ImatrixCollector(transformer, names))
        _samples, n_calls, tokens = _collect_rounds(ranks, collector, len(prompts), run_one, progress,
                                                    progress_total=len(prompts) * steps)
        with ranks.step():
            im = collector.imatrix([dataset], n_calls, tokens // max(n_calls, 1))
        if capture is not None and captured is not None:
            capture.extend(captured)
    return im, n_calls, tokens


@dataclass(frozen=True)
class PipelineSpec:
    """A pipeline run to calibrate on: the Kontext pipeline folder and what it renders."""

    pipeline_dir: pathlib.Path
    prompts_file: pathlib.Path
    images_dir: pathlib.Path | None = None
    steps: int = 28
    guidance: float = 2.5
    height: int | None = None
    width: int | None = None
    seed: int = 0
    max_sequence_length: int = 512


def collect_imatrix_pipeline(
    source: str | os.PathLike[str],
    pipeline_dir: str | os.PathLike[str],
    prompts_file: str | os.PathLike[str],
    *,
    images_dir: str | os.PathLike[str] | None = None,
    steps: int = 28,
    guidance: float = 2.5,
    height: int | None = None,
    width: int | None = None,
    seed: int = 0,
    max_sequence_length: int = 512,
    device: str | None = None,
    progress: ProgressFn | None = None,
    log: LogFn | None = None,
    ranks: Ranks | None = None,
) -> CollectionReport:
    """The real Kontext pipeline from ``pipeline_dir`` around the transformer ``source`` (checkpoint or
    GGUF); with ``ranks``, every rank loads the pipeline and renders its share of the prompts."""
    from .pipeline_check import _check_pipeline_dir, _load_image, load_pipeline, refuse_flux2_pipeline

    say = log or (lambda _msg: None)
    ranks = ranks or _single(device)
    dev = ranks.device
    with ranks.step():
        prompts = read_prompts(prompts_file)
        images = [_load_image(p) for p in list_images(images_dir)] if images_dir is not None else []
        if steps < 1:
            raise CalibrationError(f"--steps must be at least 1, got {steps}")
        if (height is None) != (width is None):
            raise CalibrationError("give both --height and --width, or neither")
        _check_pipeline_dir(pathlib.Path(pipeline_dir))
        refuse_flux2_pipeline(source_geometry(source))  # from the header: before loading gigabytes
        require_diffusers()
    start = time.perf_counter()
    dataset = pipeline_dataset(prompts_file, images_dir)
    with contextlib.ExitStack() as stack:
        with ranks.step():
            model, _geometry, kind = stack.enter_context(open_transformer(source, dev))
            say(f"loading the pipeline from {pipeline_dir}")
            pipe = load_pipeline(pathlib.Path(pipeline_dir), model, dev)
        loaded = time.perf_counter() - start
        ranks.same((len(prompts), len(images)), "(prompts, images)")
        say(f"running {len(prompts)} prompt(s) x {steps} steps")
        try:
            im, calls, tokens = collect_with_pipeline(
                pipe, prompts, images=images, steps=steps, guidance=guidance, height=height, width=width, seed=seed,
                max_sequence_length=max_sequence_length, dataset=dataset, progress=progress, ranks=ranks)
        finally:
            pipe.transformer = None
            del pipe
    return CollectionReport(imatrix=im, inputs="pipeline", datasets=(dataset,), samples=calls, tokens=tokens,
                            seconds=time.perf_counter() - start, device=dev, model=kind, load_seconds=loaded,
                            ranks=ranks.world)


def _bfl_shapes_of(transformer: Any) -> dict[str, tuple[int, ...]]:
    """BFL shapes of a diffusers transformer's config (weights may be quantized: use the config);
    a Flux2Transformer2DModel's are FLUX.2's (128 channels, its text width)."""
    return bfl_tensor_shapes(geometry_of_model(transformer))


def geometry_of_model(transformer: Any) -> FluxGeometry:
    """The FLUX geometry of a diffusers FluxTransformer2DModel or Flux2Transformer2DModel, from its config."""
    c = transformer.config
    flux2 = {"arch": FLUX2, "context_dim": int(c.joint_attention_dim)} \
        if type(transformer).__name__ == "Flux2Transformer2DModel" else {}
    return FluxGeometry(double_blocks=c.num_layers, single_blocks=c.num_single_layers,
                        hidden=c.num_attention_heads * c.attention_head_dim,
                        img_in_channels=c.in_channels, guidance=bool(c.guidance_embeds), **flux2)


def pipeline_dataset(prompts_file: str | os.PathLike[str], images_dir: str | os.PathLike[str] | None) -> str:
    """The dataset name a pipeline run records: ``prompts.txt`` or ``prompts.txt+images``."""
    return pathlib.Path(prompts_file).name + (f"+{pathlib.Path(images_dir).name}" if images_dir else "")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


__all__ = [
    "CollectionReport",
    "ImatrixCollector",
    "PipelineSpec",
    "build_transformer",
    "capture_transformer_inputs",
    "collect_imatrix",
    "collect_imatrix_pipeline",
    "collect_with_pipeline",
    "quantized_weight_names",
    "read_inputs_file",
    "read_prompts",
    "write_inputs_file",
]
