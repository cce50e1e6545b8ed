"""read -> plan -> quantize -> write on small synthetic FLUX checkpoints."""
from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
from gguf import GGUFReader

import quant_kernels
from converter.errors import ModelDetectionError, OutputError, PlanError
from converter.layout import FluxGeometry
from converter.pipeline import convert, default_name
from converter.sources import Source, open_source
from converter.synthetic import write_synthetic_flux

GEO = FluxGeometry(double_blocks=1, single_blocks=1, hidden=256)
VARIANTS = ["Q4_K_M", "Q8_0", "Q3_K_S", "BF16"]


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    return write_synthetic_flux(tmp_path_factory.mktemp("src") / "tiny.safetensors", GEO, seed=1)


def files_in(d):
    return sorted(p.name for p in d.iterdir())


def tensor_bytes(path):
    r = GGUFReader(path)
    return {t.name: (t.tensor_type.name, bytes(t.data.reshape(-1).view(np.uint8))) for t in r.tensors}


def test_one_pass_equals_separate_runs_byte_for_byte(src, tmp_path):
    together = convert(src, tmp_path / "together", VARIANTS)
    assert [r.path.name for r in together] == [f"tiny-{v}.gguf" for v in VARIANTS]
    for v, rec in zip(VARIANTS, together):
        [alone] = convert(src, tmp_path / v, [v])
        assert alone.sha256 == rec.sha256
        assert (tmp_path / v / f"tiny-{v}.gguf").read_bytes() == rec.path.read_bytes()
    assert files_in(tmp_path / "together") == sorted(f"tiny-{v}.gguf" for v in VARIANTS)


def test_records_match_the_bytes_on_disk(src, tmp_path):
    [rec] = convert(src, tmp_path, ["Q4_K_M"], name="named")
    raw = rec.path.read_bytes()
    assert rec.path == tmp_path / "named-Q4_K_M.gguf"
    assert (rec.size, rec.sha256, rec.variant, rec.file_type) == (len(raw), hashlib.sha256(raw).hexdigest(), "Q4_K_M", 15)
    for t in rec.tensors:
        assert hashlib.sha256(raw[t.offset:t.offset + t.nbytes]).hexdigest() == t.sha256
    r = GGUFReader(rec.path)
    assert r.fields["general.name"].contents() == "named"
    assert r.fields["flux_gguf.model_family"].contents() == "flux-dev"
    assert json.loads(r.fields["flux_gguf.source"].contents()) == [{"file": "tiny.safetensors", "size": src.stat().st_size}]
    json.dumps(rec.to_dict())


@pytest.mark.parametrize("variant", ["Q4_K_M", "Q8_0", "Q2_K"])
def test_tensors_equal_quant_kernels_of_the_upcast_source(src, source_bf16, tmp_path, variant):
    [rec] = convert(src, tmp_path, [variant])
    stored = tensor_bytes(rec.path)
    with open_source(src) as s:
        for name, info in s.tensors.items():
            qtype, data = stored[name]
            x = s.read(name)
            rows = x.reshape(1, -1) if x.ndim == 1 else x
            assert data == quant_kernels.quantize(rows, qtype).tobytes(), name
            if name == "img_in.weight" or x.ndim == 1:
                assert qtype == "F32"
            elif name.startswith(("txt_in.", "final_layer.")):
                assert qtype == "BF16"
                assert data == source_bf16[name], name  # kept tensors: the source's own bits


@pytest.fixture(scope="module")
def source_bf16(src):
    """The source's raw BF16 bytes per tensor, read by safetensors itself (not by our reader)."""
    import torch
    from safetensors.torch import load_file

    return {k: v.view(torch.int16).numpy().tobytes() for k, v in load_file(src).items()}


def test_fp8_source_keeps_kept_tensors_as_exact_bf16(tmp_path):
    src = write_synthetic_flux(tmp_path / "fp8.safetensors", GEO, dtype="F8_E4M3", seed=2)
    [rec] = convert(src, tmp_path / "out", ["Q8_0"])
    stored = tensor_bytes(rec.path)
    with open_source(src) as s:
        x = s.read("txt_in.weight")
    qtype, data = stored["txt_in.weight"]
    assert qtype == "BF16"
    decoded = quant_kernels.bfloat16_bits_to_f32(np.frombuffer(data, np.uint16)).reshape(x.shape)
    np.testing.assert_array_equal(decoded, x)  # every E4M3 value is a BF16 value


def test_each_tensor_is_read_once_and_transformed_before_quantizing(src, tmp_path, monkeypatch):
    reads: list[str] = []
    original = Source.read
    original_raw = Source.read_raw_into

    def counting_read(self, name, out):
        reads.append(name)
        return original_raw(self, name, out)

    monkeypatch.setattr(Source, "read_raw_into", counting_read)
    seen: list[tuple[str, tuple, np.dtype]] = []

    def transform(name, x):
        seen.append((name, x.shape, x.dtype))
        return x * 2 if name == "double_blocks.0.img_mlp.0.weight" else x

    recs = convert(src, tmp_path, ["Q4_K_M", "Q6_K", "F16"], tensor_transform=transform)
    with open_source(src) as s:
        names = list(s.tensors)
        w = original(s, "double_blocks.0.img_mlp.0.weight")
    assert reads == names  # once each, in order, for three variants
    assert [n for n, _, _ in seen] == names and {d for _, _, d in seen} == {np.dtype(np.float32)}
    for rec in recs:
        t = next(t for t in rec.tensors if t.name == "double_blocks.0.img_mlp.0.weight")
        expect = quant_kernels.quantize(w * 2, t.type).tobytes()
        raw = rec.path.read_bytes()[t.offset:t.offset + t.nbytes]
        assert raw == expect


def test_progress_reports_source_bytes(src, tmp_path):
    calls: list[tuple[int, int]] = []
    convert(src, tmp_path, ["Q4_K_M"], progress=lambda done, total: calls.append((done, total)))
    with open_source(src) as s:
        total = sum(t.nbytes for t in s.tensors.values())
    assert calls[0] == (0, total) and calls[-1] == (total, total)
    assert all(b[0] >= a[0] for a, b in zip(calls, calls[1:]))
    assert len(calls) == len(s.tensors) + 1


def fail_on(nth: int, exc: BaseException):
    count = {"n": 0}

    def transform(name, x):
        count["n"] += 1
        if count["n"] == nth:
            raise exc
        return x

    return transform


def test_exception_mid_conversion_leaves_no_files(src, tmp_path):
    with pytest.raises(OutputError) as e:
        convert(src, tmp_path, ["Q4_K_M", "Q8_0"], tensor_transform=fail_on(20, RuntimeError("boom")))
    with open_source(src) as s:
        name = list(s.tensors)[19]
    assert str(e.value) == (f"{tmp_path / 'tiny-Q4_K_M.gguf'}, {tmp_path / 'tiny-Q8_0.gguf'} were not written: "
                            f"tensor {name}: RuntimeError: boom")
    assert files_in(tmp_path) == []


def test_keyboard_interrupt_leaves_no_files(src, tmp_path):
    with pytest.raises(OutputError) as e:
        convert(src, tmp_path, ["Q4_K_S"], tensor_transform=fail_on(5, KeyboardInterrupt()))
    assert str(e.value).startswith(f"{tmp_path / 'tiny-Q4_K_S.gguf'} was not written: tensor ")
    assert str(e.value).endswith(": interrupted")
    assert isinstance(e.value.__cause__, KeyboardInterrupt)
    assert files_in(tmp_path) == []


def test_non_finite_weights_name_the_tensor(src, tmp_path):
    def poison(name, x):
        if name == "single_blocks.0.linear2.weight":
            x = x.copy()
            x[3, 7] = np.nan
        return x

    with pytest.raises(OutputError) as e:
        convert(src, tmp_path, ["Q4_K_M"], tensor_transform=poison)
    assert str(e.value) == (
        f"{tmp_path / 'tiny-Q4_K_M.gguf'} was not written: tensor single_blocks.0.linear2.weight: "
        "input holds 1 non-finite value (NaN or inf); first at row 3, column 7 (nan)"
    )
    assert files_in(tmp_path) == []


def test_transform_must_keep_the_shape(src, tmp_path):
    with pytest.raises(OutputError, match=r"tensor img_in\.weight: got shape \(64, 256\), expected \(256, 64\)$"):
        convert(src, tmp_path, ["Q8_0"], tensor_transform=lambda n, x: x.T if n == "img_in.weight" else x)
    assert files_in(tmp_path) == []


def test_unwritable_output_dir(src, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(OutputError) as e:
        convert(src, blocker / "out", ["Q8_0"])
    assert str(e.value) == f"{blocker / 'out' / 'tiny-Q8_0.gguf'} was not written: cannot create {blocker / 'out'}: Not a directory"


def test_bad_arguments_fail_before_reading(tmp_path):
    missing = tmp_path / "nope.safetensors"
    with pytest.raises(PlanError, match="^unknown variant 'Q9'"):
        convert(missing, tmp_path, ["Q9"])
    with pytest.raises(PlanError, match="^override 'x\\(=Q8_0': bad regular expression"):
        convert(missing, tmp_path, ["Q8_0"], overrides=["x(=Q8_0"])
    with pytest.raises(PlanError, match="^threads must be between 1 and"):
        convert(missing, tmp_path, ["Q8_0"], threads=0)


def test_threads_are_restored(src, tmp_path):
    before = quant_kernels.get_threads()
    convert(src, tmp_path, ["Q8_0"], threads=1)
    assert quant_kernels.get_threads() == before


def test_missing_tensor_is_refused(tmp_path):
    from safetensors.numpy import save_file

    with open_source(write_synthetic_flux(tmp_path / "full.safetensors", GEO, dtype="F32")) as s:
        tensors = {n: s.read(n) for n in s.tensors if n != "double_blocks.0.txt_mlp.2.weight"}
    save_file(tensors, tmp_path / "cut.safetensors")
    with pytest.raises(ModelDetectionError, match="is missing double_blocks.0.txt_mlp.2.weight"):
        convert(tmp_path / "cut.safetensors", tmp_path / "out", ["Q8_0"])
    assert not (tmp_path / "out").exists()


def test_diffusers_folder_gives_the_same_tensors_as_the_bfl_file(src, tmp_path):
    folder = write_synthetic_flux(tmp_path / "model", GEO, layout="diffusers", seed=1)
    [a] = convert(src, tmp_path / "a", ["Q4_K_M"])
    [b] = convert(folder, tmp_path / "b", ["Q4_K_M"])
    assert b.path.name == "model-Q4_K_M.gguf"
    assert [(t.name, t.type, t.sha256) for t in a.tensors] == [(t.name, t.type, t.sha256) for t in b.tensors]


def test_default_name(tmp_path):
    (tmp_path / "kontext" / "transformer").mkdir(parents=True)
    assert default_name(tmp_path / "flux1-kontext-dev.safetensors") == "flux1-kontext-dev"
    assert default_name(tmp_path / "kontext") == "kontext"
    assert default_name(tmp_path / "kontext" / "transformer") == "kontext"
