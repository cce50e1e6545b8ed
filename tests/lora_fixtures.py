"""One ground-truth LoRA delta, written in every FLUX LoRA format (test helper, never imported by code).

The truth is a set of low-rank parts per BFL module (A, B, alpha, row range), seeded, with every
value rounded to bfloat16 and every alpha/rank a power of two, so each format and each dtype can
store it exactly, even after folding alpha into B or fusing split parts. The writers follow the
format descriptions (lora.md, diffusers' lora_conversion_utils.py, ComfyUI) and share no code with
converter/, so a mapping bug cannot cancel itself out.
"""
from __future__ import annotations

import collections
import json
import pathlib
from dataclasses import dataclass

import numpy as np
import torch
from safetensors.torch import save_file

from converter.layout import FluxGeometry, bfl_tensor_shapes

GEO = FluxGeometry(double_blocks=1, single_blocks=1, hidden=256)


@dataclass
class TruthPart:
    a: np.ndarray  # [r, in]
    b: np.ndarray  # [rows, r]
    alpha: float | None  # None: scale 1
    rows: tuple[int, int] | None  # None: every row

    @property
    def scale(self) -> float:
        return 1.0 if self.alpha is None else self.alpha / self.a.shape[0]


Truth = dict[str, list[TruthPart]]  # BFL module -> parts


def _bf16(x: np.ndarray) -> np.ndarray:
    return torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).bfloat16().float().numpy()


def _factors(rng: np.random.Generator, rank: int, n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray]:
    a = _bf16(rng.standard_normal((rank, n_in)) * 0.1)
    b = _bf16(rng.standard_normal((n_out, rank)) * 0.1)
    return a, b


def base_shapes(geo: FluxGeometry = GEO) -> dict[str, tuple[int, ...]]:
    return bfl_tensor_shapes(geo)


def make_truth(geo: FluxGeometry = GEO, seed: int = 0, *, xlabs: bool = False) -> Truth:
    """Parts for every linear module (XLabs: only what XLabs can express).

    img qkv and linear1 are split-native (independent q/k/v/mlp parts of different ranks and
    alphas); txt qkv is one fused part; final_layer modules get alpha 2x rank; the rest cycle
    through alpha None / 2x / 0.5x / 1x rank.
    """
    rng = np.random.default_rng(seed)
    h = geo.hidden
    shapes = bfl_tensor_shapes(geo)
    truth: Truth = {}
    alphas = (None, 8.0, 2.0, 4.0)  # rank 4: scale 1, 2, 0.5, 1
    if xlabs:
        for i in range(geo.double_blocks):
            for m in ("img_attn.qkv", "img_attn.proj", "txt_attn.qkv", "txt_attn.proj"):
                out, n_in = shapes[f"double_blocks.{i}.{m}.weight"]
                truth[f"double_blocks.{i}.{m}"] = [TruthPart(*_factors(rng, 4, n_in, out), None, None)]
        for i in range(geo.single_blocks):
            truth[f"single_blocks.{i}.linear1"] = [TruthPart(*_factors(rng, 4, h, 3 * h), None, (0, 3 * h))]
            out, n_in = shapes[f"single_blocks.{i}.linear2.weight"]
            truth[f"single_blocks.{i}.linear2"] = [TruthPart(*_factors(rng, 4, n_in, out), None, None)]
        return truth
    k = 0
    for name, shape in shapes.items():
        if not name.endswith(".weight") or len(shape) != 2:
            continue
        module = name[: -len(".weight")]
        out, n_in = shape
        if module.endswith("img_attn.qkv"):
            spec = ((4, 8.0, (0, h)), (2, None, (h, 2 * h)), (4, 2.0, (2 * h, 3 * h)))
        elif module.endswith("linear1"):
            spec = ((4, 8.0, (0, h)), (4, None, (h, 2 * h)), (4, 2.0, (2 * h, 3 * h)), (8, 4.0, (3 * h, 7 * h)))
        elif module.startswith("final_layer."):  # alpha that matters: diffusers' kohya reader drops it
            spec = ((4, 8.0, None),)
        else:
            spec = ((4, alphas[k % 4], None),)
            k += 1
        parts = []
        for rank, alpha, rows in spec:
            n_out = out if rows is None else rows[1] - rows[0]
            parts.append(TruthPart(*_factors(rng, rank, n_in, n_out), alpha, rows))
        truth[module] = parts
    return truth


def dense_truth(truth: Truth, shapes) -> dict[str, np.ndarray]:
    """float64 delta per BFL weight at strength 1."""
    out = {}
    for module, parts in truth.items():
        name = f"{module}.weight"
        d = np.zeros(shapes[name], dtype=np.float64)
        for p in parts:
            r0, r1 = p.rows or (0, d.shape[0])
            d[r0:r1] += p.scale * (p.b.astype(np.float64) @ p.a.astype(np.float64))
        out[name] = d
    return out


def dense_canonical(lora, shapes) -> dict[str, np.ndarray]:
    """float64 delta per BFL tensor of a CanonicalLora (low-rank parts + full deltas), strength 1."""
    out: dict[str, np.ndarray] = {}
    for module, parts in lora.modules.items():
        name = f"{module}.weight"
        d = out.setdefault(name, np.zeros(shapes[name], dtype=np.float64))
        for p in parts:
            r0, r1 = p.rows or (0, d.shape[0])
            d[r0:r1] += p.scale * (p.b.astype(np.float64) @ p.a.astype(np.float64))
    for name, value in lora.full_deltas.items():
        out[name] = out.get(name, 0) + value.astype(np.float64)
    return out


# ---- BFL module -> diffusers modules (written independently of converter/lora_formats.py) ----

def diffusers_targets(module: str, hidden: int) -> list[tuple[str, tuple[int, int] | None, bool]]:
    """[(diffusers module, rows of the BFL tensor or None, B halves swapped)]."""
    h = hidden
    parts = module.split(".")
    if parts[0] == "double_blocks":
        i, rest = parts[1], ".".join(parts[2:])
        tb = f"transformer_blocks.{i}"
        if rest in ("img_attn.qkv", "txt_attn.qkv"):
            names = ("to_q", "to_k", "to_v") if rest.startswith("img") else ("add_q_proj", "add_k_proj", "add_v_proj")
            return [(f"{tb}.attn.{n}", (j * h, (j + 1) * h), False) for j, n in enumerate(names)]
        simple = {
            "img_mod.lin": "norm1.linear", "txt_mod.lin": "norm1_context.linear",
            "img_attn.proj": "attn.to_out.0", "txt_attn.proj": "attn.to_add_out",
            "img_mlp.0": "ff.net.0.proj", "img_mlp.2": "ff.net.2",
            "txt_mlp.0": "ff_context.net.0.proj", "txt_mlp.2": "ff_context.net.2",
        }
        return [(f"{tb}.{simple[rest]}", None, False)]
    if parts[0] == "single_blocks":
        i, rest = parts[1], ".".join(parts[2:])
        stb = f"single_transformer_blocks.{i}"
        if rest == "linear1":
            return [(f"{stb}.attn.to_q", (0, h), False), (f"{stb}.attn.to_k", (h, 2 * h), False),
                    (f"{stb}.attn.to_v", (2 * h, 3 * h), False), (f"{stb}.proj_mlp", (3 * h, 7 * h), False)]
        return [(f"{stb}.{ {'linear2': 'proj_out', 'modulation.lin': 'norm.linear'}[rest] }", None, False)]
    top = {
        "img_in": "x_embedder", "txt_in": "context_embedder",
        "time_in.in_layer": "time_text_embed.timestep_embedder.linear_1",
        "time_in.out_layer": "time_text_embed.timestep_embedder.linear_2",
        "vector_in.in_layer": "time_text_embed.text_embedder.linear_1",
        "vector_in.out_layer": "time_text_embed.text_embedder.linear_2",
        "guidance_in.in_layer": "time_text_embed.guidance_embedder.linear_1",
        "guidance_in.out_layer": "time_text_embed.guidance_embedder.linear_2",
        "final_layer.linear": "proj_out", "final_layer.adaLN_modulation.1": "norm_out.linear",
    }
    return [(top[module], None, module == "final_layer.adaLN_modulation.1")]


def _swap(x: np.ndarray) -> np.ndarray:
    half = x.shape[0] // 2
    return np.concatenate([x[half:], x[:half]])


def single_lora(module: str, parts: list[TruthPart], hidden: int, *, fold: bool):
    """One (A, B, alpha) for a BFL-named format: fused stack/block-diagonal when split."""
    if len(parts) == 1 and parts[0].rows is None:
        p = parts[0]
        return (p.a, p.b * p.scale, None) if fold else (p.a, p.b, p.alpha)
    total = 3 * hidden if module.endswith("qkv") else 7 * hidden
    rank = sum(p.a.shape[0] for p in parts)
    a = np.concatenate([p.a for p in parts])
    b = np.zeros((total, rank), dtype=np.float32)
    c = 0
    for p in parts:
        r0, r1 = p.rows
        b[r0:r1, c:c + p.a.shape[0]] = p.b * p.scale
        c += p.a.shape[0]
    return a, b, None if fold else float(rank)


def split_loras(module: str, parts: list[TruthPart], hidden: int):
    """[(diffusers module, A, B, alpha)] for a diffusers-named format."""
    out = []
    for dname, rows, swap in diffusers_targets(module, hidden):
        if rows is None:
            (p,) = parts
            out.append((dname, p.a, _swap(p.b) if swap else p.b, p.alpha))
            continue
        exact = [p for p in parts if p.rows == rows]
        if exact:
            p = exact[0]
            out.append((dname, p.a, p.b, p.alpha))
        elif len(parts) == 1 and parts[0].rows is None:  # fused part: copy A, split B by rows
            p = parts[0]
            out.append((dname, p.a, p.b[rows[0]:rows[1]], p.alpha))
    return out


def _save(path: pathlib.Path, tensors: dict[str, np.ndarray], metadata: dict | None = None, dtype=torch.float32):
    sd = {k: torch.from_numpy(np.array(v, dtype=np.float32)).to(dtype) for k, v in tensors.items()}  # copies: no shared memory
    save_file(sd, str(path), metadata=metadata)
    return path


TE_KOHYA = ("lora_te1_text_model_encoder_layers_0_self_attn_q_proj", "lora_te3_encoder_block_0_layer_0_SelfAttention_q")


def _te_tensors(names) -> dict[str, np.ndarray]:
    out = {}
    for n in names:
        out[f"{n}.lora_down.weight"] = np.full((2, 8), 0.5, np.float32)
        out[f"{n}.lora_up.weight"] = np.full((8, 2), 0.5, np.float32)
        out[f"{n}.alpha"] = np.array(2.0, np.float32)
    return out


def write_kohya(path, truth: Truth, geo: FluxGeometry = GEO, *, te: bool = False, dtype=torch.float32, extra=None):
    t = {}
    for module, parts in truth.items():
        a, b, alpha = single_lora(module, parts, geo.hidden, fold=False)
        name = "lora_unet_" + module.replace(".", "_")
        t[f"{name}.lora_down.weight"], t[f"{name}.lora_up.weight"] = a, b
        if alpha is not None:  # missing alpha means alpha = rank
            t[f"{name}.alpha"] = np.array(alpha, np.float32)
    if te:
        t.update(_te_tensors(TE_KOHYA))
    t.update(extra or {})
    return _save(pathlib.Path(path), t, {"ss_network_module": "networks.lora_flux"}, dtype)


def write_comfyui(path, truth: Truth, geo: FluxGeometry = GEO, *, ab: bool = False):
    down, up = ("lora_A.weight", "lora_B.weight") if ab else ("lora_down.weight", "lora_up.weight")
    t = {}
    for module, parts in truth.items():
        a, b, alpha = single_lora(module, parts, geo.hidden, fold=False)
        name = f"diffusion_model.{module}"
        t[f"{name}.{down}"], t[f"{name}.{up}"] = a, b
        t[f"{name}.alpha"] = np.array(0.0 if alpha is None else alpha, np.float32)  # 0 means alpha = rank
    return _save(pathlib.Path(path), t)


def _bfl_named(truth: Truth, geo: FluxGeometry, prefix: str) -> dict[str, np.ndarray]:
    t = {}
    for module, parts in truth.items():
        a, b, _ = single_lora(module, parts, geo.hidden, fold=True)
        t[f"{prefix}{module}.lora_A.weight"], t[f"{prefix}{module}.lora_B.weight"] = a, b
    return t


def write_bfl(path, truth: Truth, geo: FluxGeometry = GEO, *, biases=None, norms=None):
    """Bare BFL names (lora_A/lora_B); ``biases`` {module: [out]} and ``norms`` {tensor: value} make it a control LoRA."""
    t = _bfl_named(truth, geo, "")
    for module, bias in (biases or {}).items():
        t[f"{module}.lora_B.bias"] = bias
    t.update(norms or {})
    return _save(pathlib.Path(path), t)


def write_fal_kontext(path, truth: Truth, geo: FluxGeometry = GEO):
    return _save(pathlib.Path(path), _bfl_named(truth, geo, "base_model.model."))


def write_xlabs(path, truth: Truth, geo: FluxGeometry = GEO, *, prefix: str = ""):
    names = {"img_attn.qkv": "qkv_lora1", "img_attn.proj": "proj_lora1", "txt_attn.qkv": "qkv_lora2",
             "txt_attn.proj": "proj_lora2", "linear1": "qkv_lora", "linear2": "proj_lora"}
    t = {}
    for module, (p,) in truth.items():
        block, i, rest = module.split(".", 2)
        name = f"{prefix}{block}.{i}.processor.{names[rest]}"
        t[f"{name}.down.weight"], t[f"{name}.up.weight"] = p.a, p.b * p.scale
    return _save(pathlib.Path(path), t)


def _peft_metadata(entries) -> dict[str, str]:
    """A pipeline-style (``transformer.``-prefixed) PEFT LoraConfig, as diffusers saves it."""
    ranks = {n: a.shape[0] for n, a, _, _ in entries}
    alphas = {n: (float(a.shape[0]) if alpha is None else alpha) for n, a, _, alpha in entries}
    r = collections.Counter(ranks.values()).most_common(1)[0][0]
    lora_alpha = collections.Counter(alphas.values()).most_common(1)[0][0]
    cfg = {
        "r": r, "lora_alpha": lora_alpha, "target_modules": sorted(ranks),
        "rank_pattern": {f"^{n}": v for n, v in ranks.items() if v != r},
        "alpha_pattern": {f"^{n}": v for n, v in alphas.items() if v != lora_alpha},
        "lora_dropout": 0.0, "use_dora": False, "lora_bias": False, "init_lora_weights": True,
    }
    return {"lora_adapter_metadata": json.dumps({f"transformer.{k}": v for k, v in cfg.items()}), "format": "pt"}


def write_diffusers(path, truth: Truth, geo: FluxGeometry = GEO, *, alpha: str = "metadata", te: bool = False,
                    biases=None, norms=None):
    """``transformer.``-prefixed PEFT keys; alpha as PEFT metadata, ``.alpha`` keys, or folded into B."""
    entries = [e for module, parts in truth.items() for e in split_loras(module, parts, geo.hidden)]
    t = {}
    for name, a, b, al in entries:
        scale = 1.0 if al is None else al / a.shape[0]
        t[f"transformer.{name}.lora_A.weight"] = a
        t[f"transformer.{name}.lora_B.weight"] = b * scale if alpha == "fold" else b
        if alpha == "keys" and al is not None:
            t[f"transformer.{name}.alpha"] = np.array(al, np.float32)
    for name, bias in (biases or {}).items():
        t[f"transformer.{name}.lora_B.bias"] = bias
    t.update(norms or {})
    if te:
        t["text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight"] = np.ones((2, 8), np.float32)
        t["text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_B.weight"] = np.ones((8, 2), np.float32)
    return _save(pathlib.Path(path), t, _peft_metadata(entries) if alpha == "metadata" else None)


def write_onetrainer(path, truth: Truth, geo: FluxGeometry = GEO):
    t = {}
    for module, parts in truth.items():
        for name, a, b, alpha in split_loras(module, parts, geo.hidden):
            key = "lora_transformer_" + name.replace(".", "_")
            t[f"{key}.lora_down.weight"], t[f"{key}.lora_up.weight"] = a, b
            t[f"{key}.alpha"] = np.array(a.shape[0] if alpha is None else alpha, np.float32)
    return _save(pathlib.Path(path), t)


def write_raw(path, tensors: dict[str, np.ndarray], metadata=None):
    """Any tensors, for error cases."""
    return _save(pathlib.Path(path), tensors, metadata)


def random_base(shapes, seed: int = 0) -> dict[str, np.ndarray]:
    """float32 base weights for every tensor of ``shapes`` (small geometries only)."""
    rng = np.random.default_rng(seed)
    return {n: (rng.standard_normal(s) * 0.05).astype(np.float32) for n, s in shapes.items()}
