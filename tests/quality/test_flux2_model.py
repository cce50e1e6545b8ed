"""FLUX.2 through diffusers' Flux2Transformer2DModel: built from a source (imatrix, sensitivity), loaded
from our GGUF (validate, bench), and the imatrix collector hooking every quantized weight.

Synthetic weights (converter.synthetic): the numbers compared are exact equalities, not quality figures.
"""
from __future__ import annotations

import json

import pytest
import torch

from converter.layout import FLUX2, bfl_tensor_shapes, flux2_geometry
from converter.pipeline import convert
from converter.quality.calibrate import ImatrixCollector, build_transformer, open_transformer, quantized_weight_names
from converter.quality.diffusers_model import check_loadable, geometry_from_shapes, transformer_config
from converter.sources import open_source
from converter.synthetic import write_synthetic_flux

GEO = flux2_geometry("flux2-klein-4b", hidden=256)


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    return write_synthetic_flux(tmp_path_factory.mktemp("f2") / "klein.safetensors", GEO, seed=5)


def _kwargs(geo, tokens=16, text=8):
    gen = torch.Generator().manual_seed(1)
    return dict(hidden_states=torch.randn(1, tokens, 128, generator=gen),
                encoder_hidden_states=torch.randn(1, text, geo.context_dim, generator=gen),
                timestep=torch.tensor([0.5]), img_ids=torch.zeros(tokens, 4), txt_ids=torch.zeros(text, 4),
                return_dict=False)


def test_geometry_config_and_loadability():
    assert geometry_from_shapes(bfl_tensor_shapes(GEO), "x") == GEO
    cfg = transformer_config(GEO)
    assert cfg["_class_name"] == "Flux2Transformer2DModel"
    assert (cfg["joint_attention_dim"], cfg["num_layers"], cfg["num_single_layers"], cfg["guidance_embeds"]) == (
        7680, 5, 20, False)
    check_loadable(GEO)  # diffusers' FLUX.2 converter has no hidden-size limit


def test_built_model_equals_diffusers_own_loading(src, tmp_path):
    import diffusers

    (tmp_path / "config.json").write_text(json.dumps(transformer_config(GEO)))
    ref = diffusers.Flux2Transformer2DModel.from_single_file(str(src), config=str(tmp_path), local_files_only=True,
                                                             torch_dtype=torch.float32)
    with open_source(src) as s:
        model = build_transformer(GEO, s.read, "cpu")
    assert type(model).__name__ == "Flux2Transformer2DModel"
    with torch.inference_mode():
        assert torch.equal(model(**_kwargs(GEO))[0], ref(**_kwargs(GEO))[0])


def test_imatrix_collector_hooks_every_quantized_weight(src):
    names = quantized_weight_names(bfl_tensor_shapes(GEO))
    assert len(names) == 5 * 8 + 20 * 2 + 3
    assert "double_stream_modulation_img.lin.weight" in names and "single_blocks.19.linear1.weight" in names
    with open_source(src) as s:
        model = build_transformer(GEO, s.read, "cpu")
    with ImatrixCollector(model, names) as c, torch.inference_mode():
        model(**_kwargs(GEO))
        im = c.imatrix(["synthetic"], 1, 24)
    assert set(im.entries) == set(names)
    shapes = bfl_tensor_shapes(GEO)
    for n, e in im.entries.items():
        assert e.in_sum2.shape == (shapes[n][1],) and e.count > 0 and (e.in_sum2 > 0).all(), n


def test_open_transformer_reads_a_flux2_gguf_and_source(src, tmp_path):
    [rec] = convert(src, tmp_path, ["BF16"])
    outs = []
    for path in (rec.path, src):
        with open_transformer(path, "cpu") as (model, geo, kind):
            assert geo == GEO and geo.arch == FLUX2
            with torch.inference_mode():
                outs.append((kind, model(**_kwargs(GEO))[0]))
    assert [k for k, _ in outs] == ["gguf", "source"]
    assert torch.equal(outs[0][1], outs[1][1])


def test_a_flux1_probe_is_refused_by_a_flux2_model_in_one_line(src):
    from converter.errors import ValidationError
    from converter.quality.diffusers_model import run_probe
    from converter.quality.probes import make_kontext_probe

    with open_source(src) as s:
        model = build_transformer(GEO, s.read, "cpu")
    with pytest.raises(ValidationError) as e:
        run_probe(model, make_kontext_probe(), "cpu")
    assert str(e.value) == ("the probe is FLUX.1's but the model is FLUX.2; "
                            "build it with make_probe(spec, geometry) for this model")
