"""``convert --target-size/--target-bpw``: the allocator on the full FLUX.1 layout (a sparse file:
a real header, nothing read) with a seeded synthetic sensitivity document, and the CLI's errors."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
from click.testing import CliRunner

from converter.cli import main
from converter.errors import PlanError, SensitivityError, TargetRangeError
from converter.layout import FluxGeometry, bfl_tensor_shapes, is_kept_unquantized
from converter.pipeline import KV_TARGET, plan_source, plan_source_target
from converter.recipes import (
    Option,
    allocate,
    bpw_budget,
    parse_sensitivity,
    parse_size,
    size_budget,
)
from converter.safetensors_io import encode_header
from converter.sources import open_source
from sensitivity_fixtures import sensitivity_doc

# Published file sizes (GB) the issue targets; Q2_K's 4.024 is the all-Q2_K file itself, which the
# mix's larger header (its per-tensor record, ~12 KB) cannot reach: 4.03 instead.
PUBLISHED = {"Q2_K": 4.03, "Q3_K_S": 5.23, "Q3_K_M": 5.37, "Q4_K_S": 6.80, "Q4_K_M": 6.93, "Q5_K_M": 8.42}
def sparse_source(path, geometry=FluxGeometry()):
    shapes = bfl_tensor_shapes(geometry)
    header = encode_header([(n, "BF16", s) for n, s in shapes.items()], {"format": "pt"})
    with open(path, "wb") as f:
        f.write(header)
        f.truncate(len(header) + sum(math.prod(s) * 2 for s in shapes.values()))
    return path


@pytest.fixture(scope="module")
def full(tmp_path_factory):
    d = tmp_path_factory.mktemp("target")
    src = sparse_source(d / "flux1-kontext-dev.safetensors")
    (d / "s.json").write_text(json.dumps(sensitivity_doc()))
    return d, src, parse_sensitivity(sensitivity_doc(), str(d / "s.json"), "ab" * 32)


def static_prediction(plan, sens):
    return sum(sens.errors[e.name][e.qtype] for e in plan.entries if e.name in sens.errors)


@pytest.mark.parametrize("variant", sorted(PUBLISHED))
def test_mix_stays_within_the_budget_and_beats_the_static_recipe(full, variant):
    _, src, sens = full
    with open_source(src) as source:
        static = plan_source(source, [variant])[0]
        budget = int(PUBLISHED[variant] * 1e9)
        mix = plan_source_target(source, sens, size_budget(f"{PUBLISHED[variant]}GB"))
        at_static = plan_source_target(source, sens, size_budget(str(max(static.file_size, budget))))
    assert budget * 0.995 <= mix.plan.file_size <= budget
    assert at_static.plan.file_size <= max(static.file_size, budget)
    # the static recipe is one feasible point at its own size: the mix must do at least as well
    assert at_static.predicted_error <= static_prediction(static, sens)
    assert math.isclose(at_static.predicted_error, sum(sens.errors[n][t] for n, t in at_static.types.items()))


def test_fixed_rules_hold_and_the_choice_is_recorded(full):
    _, src, sens = full
    with open_source(src) as source:
        mix = plan_source_target(source, sens, size_budget("5.37GB"), mix_name="Q3_K_A")
    plan = mix.plan
    assert plan.file_name == "flux1-kontext-dev-Q3_K_A.gguf"
    for e in plan.entries:
        if len(e.shape) == 1 or e.name == "img_in.weight":
            assert e.qtype == "F32", e.name
        elif is_kept_unquantized(e.name):
            assert (e.qtype, e.rule) == ("BF16", "kept"), e.name
        else:
            assert e.rule == "target" and e.qtype == mix.types[e.name]
    kv = {k.key: k.value for k in plan.kv}
    assert kv["flux_gguf.recipe"] == "Q3_K_A"
    doc = json.loads(kv[KV_TARGET])
    assert doc["types"] == dict(sorted(mix.types.items()))
    assert doc["sensitivity"] == {"file": "s.json", "sha256": "ab" * 32}
    assert doc["budget"] == {"kind": "size", "value": 5.37e9, "text": "5.37GB"}
    assert float(doc["predicted_rel_l2"]) == pytest.approx(math.sqrt(mix.predicted_error), rel=1e-5)
    # general.file_type: llama.cpp's "mostly X" of the type holding most parameters
    params = {}
    for e in plan.entries:
        if e.rule == "target":
            params[e.qtype] = params.get(e.qtype, 0) + e.n_params
    top = max(params, key=params.get)
    assert kv["general.file_type"] == {"Q2_K": 10, "Q3_K": 11, "Q4_K": 14, "Q5_K": 16, "Q6_K": 18, "Q8_0": 7}[top]


def test_choice_is_deterministic_and_ignores_the_file_order(full):
    _, src, sens = full
    reordered = parse_sensitivity(sensitivity_doc(reverse=True), sens.file, sens.sha256)
    with open_source(src) as source:
        a = plan_source_target(source, sens, size_budget("6.0GB"))
        b = plan_source_target(source, sens, size_budget("6.0GB"))
        c = plan_source_target(source, reordered, size_budget("6.0GB"))
    assert a.plan == b.plan == c.plan


def test_more_bytes_never_predict_more_error(full):
    _, src, sens = full
    with open_source(src) as source:
        errors = [plan_source_target(source, sens, size_budget(f"{gb}GB")).predicted_error
                  for gb in (4.1, 4.5, 5.0, 5.5, 6.5, 8.0, 10.0, 13.0)]
    assert errors == sorted(errors, reverse=True)


def test_budget_holds_with_an_imatrix_at_the_low_end(full):
    """The imatrix KVs are in the header only when some tensor is a K-quant: the header bound
    must carry them (a mix at the all-Q2_K end once came out 192 bytes over)."""
    from imatrix_fixtures import synthetic_imatrix

    _, src, sens = full
    im = synthetic_imatrix(src)
    with open_source(src) as source:
        with pytest.raises(TargetRangeError) as e:
            plan_source_target(source, sens, size_budget("1GB"), imatrix=im)
        for extra in (64, 200, 5000, 10**6):
            budget = int(e.value.low) + extra
            mix = plan_source_target(source, sens, size_budget(str(budget)), imatrix=im)
            assert mix.plan.file_size <= budget
            assert any(k.key == "quantize.imatrix.file" for k in mix.plan.kv)


def test_bpw_budget(full):
    _, src, sens = full
    with open_source(src) as source:
        mix = plan_source_target(source, sens, bpw_budget("4.5"))
    assert 4.5 * 0.995 <= mix.plan.bits_per_weight <= 4.5


def test_budget_outside_the_reachable_range_states_it(full):
    _, src, sens = full
    with open_source(src) as source:
        with pytest.raises(PlanError, match=r"^target size 1GB \(1000000000 bytes\) is outside the reachable range "
                                            r"4\.024-23\.809 GB \(\d+-\d+ bytes\) for this source$"):
            plan_source_target(source, sens, size_budget("1GB"))
        with pytest.raises(TargetRangeError, match="outside the reachable range") as e:
            plan_source_target(source, sens, size_budget("30GB"))
        # the range in bytes does not depend on how the budget is written: both ends, typed back
        # exactly as the error gave them, are accepted, and the files stay within them
        low, high = int(e.value.low), int(e.value.high)
        for text in (str(low), f"{low} B", str(high)):
            mix = plan_source_target(source, sens, size_budget(text))
            assert mix.reachable == (low, high)
            assert mix.plan.file_size <= int(parse_size(text))
        assert plan_source_target(source, sens, size_budget(str(low))).plan.file_size > low - 256
        with pytest.raises(TargetRangeError) as short:
            plan_source_target(source, sens, size_budget(str(low - 1)))
        assert (short.value.low, short.value.high) == (low, high)
        with pytest.raises(PlanError, match=r"^target 1bpw is outside the reachable range 2\.\d{3}-16\.\d{3} bits"):
            plan_source_target(source, sens, bpw_budget("1"))


def test_types_whose_block_does_not_divide_a_row_are_never_offered(tmp_path):
    geo = FluxGeometry(double_blocks=1, single_blocks=1, hidden=384)  # 384 columns: no K-quant fits
    src = sparse_source(tmp_path / "flux.safetensors", geo)
    doc = sensitivity_doc(geo)
    for t in doc["tensors"].values():  # tempt the allocator: K-quants free of error where they cannot go
        t["predicted"].update({"Q2_K": 0.0, "Q4_K": 0.0})
    sens = parse_sensitivity(doc)
    with open_source(src) as source:
        q4 = plan_source(source, ["Q4_K_S"])[0]  # F16 fallbacks on the 384-wide tensors
        mix = plan_source_target(source, sens, size_budget(str(q4.file_size)))
    assert q4.fallbacks
    for e in mix.plan.entries:
        if e.rule == "target":
            assert e.shape[-1] % 256 == 0 or e.qtype in ("Q8_0", "BF16"), (e.name, e.qtype)


def test_allocator_takes_the_best_step_per_byte():
    options = {
        "a": [Option("Q2_K", 10, 100.0), Option("Q4_K", 20, 10.0), Option("BF16", 40, 0.0)],
        "b": [Option("Q2_K", 10, 5.0), Option("Q4_K", 20, 1.0), Option("BF16", 40, 0.0)],
    }
    assert {k: o.qtype for k, o in allocate(options, 30).items()} == {"a": "Q4_K", "b": "Q2_K"}
    assert {k: o.qtype for k, o in allocate(options, 20).items()} == {"a": "Q2_K", "b": "Q2_K"}
    assert {k: o.qtype for k, o in allocate(options, 80).items()} == {"a": "BF16", "b": "BF16"}
    # exhaustive check on small random problems: never over capacity, never worse than the best
    # single-type choice that fits
    rng = np.random.default_rng(1)
    for _ in range(50):
        opts = {f"t{i}": [Option(q, int(c), float(e)) for q, c, e in
                          zip(("Q2_K", "Q3_K", "Q4_K", "Q8_0"), np.cumsum(rng.integers(1, 9, 4)),
                              sorted(rng.uniform(0, 10, 4), reverse=True))] for i in range(6)}
        cap = int(rng.integers(sum(o[0].cost for o in opts.values()), sum(o[-1].cost for o in opts.values()) + 1))
        got = allocate(opts, cap)
        assert sum(o.cost for o in got.values()) <= cap
        for k in range(4):
            if sum(o[k].cost for o in opts.values()) <= cap:
                assert sum(o.error for o in got.values()) <= sum(o[k].error for o in opts.values()) + 1e-12


@pytest.mark.parametrize("text, value", [("5.37GB", 5_370_000_000), ("5GiB", 5 << 30), ("123", 123),
                                         ("1.5 MB", 1_500_000)])
def test_parse_size(text, value):
    assert parse_size(text) == value


def test_sensitivity_for_another_model_is_refused(full, tmp_path):
    _, src, _ = full
    small = sensitivity_doc(FluxGeometry(double_blocks=1, single_blocks=1, hidden=256))
    with open_source(src) as source:
        with pytest.raises(SensitivityError, match=r"^small\.json: tensor double_blocks\.0\.img_mod\.lin\.weight has "
                                                   r"shape \[1536, 256\] there, \[18432, 3072\] in the source; it "
                                                   r"was measured on another model$"):
            plan_source_target(source, parse_sensitivity(small, "small.json"), size_budget("6GB"))
        missing = sensitivity_doc()
        del missing["tensors"]["single_blocks.7.linear2.weight"]
        with pytest.raises(SensitivityError, match=r"^m\.json: has no entry for tensor single_blocks\.7\.linear2\."
                                                   r"weight; was it measured on another model\?$"):
            plan_source_target(source, parse_sensitivity(missing, "m.json"), size_budget("6GB"))


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.mark.parametrize("extra, message", [
    (["--variant", "Q4_K_M", "--target-size", "6GB"],
     "--target-size/--target-bpw choose every tensor's type; give no --variant with them"),
    (["--target-size", "6GB"], "--target-size/--target-bpw need --sensitivity FILE (from flux-gguf sensitivity)"),
    (["--target-size", "6GB", "--target-bpw", "4"], "--target-size and --target-bpw exclude each other"),
    (["--target-size", "six", "--sensitivity", "S"], "target size 'six': expected a number of bytes with an optional "
                                                    "unit (B, KB, MB, GB, TB, KiB, MiB, GiB, TiB), e.g. 5.37GB"),
    ([], "give --variant (e.g. --variant Q4_K_M) or --target-size/--target-bpw"),
    (["--target-size", "1GB", "--sensitivity", "S"], "target size 1GB (1000000000 bytes) is outside the reachable range"),
    (["--target-size", "6GB", "--sensitivity", "S", "--mix-name", "Q4_K_M"],
     "mix name 'Q4_K_M' is a fixed variant's name; choose another (e.g. Q3_K_A)"),
])
def test_cli_errors_are_one_line(full, tmp_path, extra, message):
    d, src, _ = full
    extra = [str(d / "s.json") if a == "S" else a for a in extra]
    r = run("convert", src, "-o", tmp_path / "out", "--dry-run", *extra)
    assert r.exit_code == 1
    assert r.output.startswith(f"Error: {message}") and r.output.count("\n") == 1, r.output
    assert not (tmp_path / "out").exists()


def test_cli_bad_sensitivity_file(full, tmp_path):
    _, src, _ = full
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    r = run("convert", src, "-o", tmp_path / "out", "--target-size", "6GB", "--sensitivity", bad, "--dry-run")
    assert r.exit_code == 1 and r.output.startswith(f"Error: {bad}: not JSON (") and r.output.count("\n") == 1
    bad.write_text(json.dumps({"format": "flux-gguf-sensitivity", "version": 1,
                               "tensors": {"x.weight": {"shape": [2, 2], "predicted": {"Q4_K": -1}}}}))
    r = run("convert", src, "-o", tmp_path / "out", "--target-size", "6GB", "--sensitivity", bad, "--dry-run")
    assert r.output == (f"Error: {bad}: tensor x.weight: predicted error for Q4_K must be a finite number >= 0, "
                        "got -1\n")


def test_cli_dry_run_prints_the_block_table(full, tmp_path):
    d, src, _ = full
    r = run("convert", src, "-o", tmp_path / "out", "--target-size", "5.37GB", "--sensitivity", d / "s.json",
            "--dry-run", "--mix-name", "Q3_K_A")
    assert r.exit_code == 0, r.output
    lines = r.output.splitlines()
    assert lines[1].startswith("Q3_K_A ") and "flux1-kontext-dev-Q3_K_A.gguf" in lines[1]
    assert lines[2].startswith("target 5.37GB (reachable ") and "predicted output rel-L2" in lines[2]
    blocks = [ln.split()[0] for ln in lines[3:]]
    assert blocks == [f"double_blocks.{i}" for i in range(19)] + [f"single_blocks.{i}" for i in range(38)]
    assert "img_attn.qkv=" in lines[3] and "linear1=" in lines[-1]
    assert not (tmp_path / "out").exists()
    r = run("convert", src, "-o", tmp_path / "out", "--target-bpw", "4.5", "--sensitivity", d / "s.json",
            "--dry-run", "--json")
    out = json.loads(r.stdout)
    assert out["target"]["budget"]["kind"] == "bpw" and out["plans"][0]["bits_per_weight"] <= 4.5


@pytest.mark.parametrize("kind", ["fifo", "huge"])
def test_hostile_sensitivity_files_fail_at_once(full, tmp_path, kind):
    """A FIFO is refused, not waited on; a huge file is refused unread (child: timeout, memory cap)."""
    import os
    import resource
    import subprocess
    import sys
    from pathlib import Path

    _, src, _ = full
    bad = tmp_path / "s.json"
    if kind == "fifo":
        os.mkfifo(bad)
    else:
        with open(bad, "wb") as f:
            f.truncate(1 << 40)  # sparse: 1 TiB of holes

    def cap() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (2 << 30, 2 << 30))

    env = dict(os.environ, PYTHONPATH=str(Path(__file__).parents[2]))
    proc = subprocess.run([sys.executable, "-c", "from converter.cli import main; main()", "convert", str(src),
                           "-o", str(tmp_path / "out"), "--target-size", "6GB", "--sensitivity", str(bad)],
                          capture_output=True, text=True, timeout=120, env=env, preexec_fn=cap)
    assert proc.returncode == 1 and proc.stdout == ""
    assert proc.stderr.startswith(f"Error: {bad}: ") and proc.stderr.count("\n") == 1, proc.stderr
    if kind == "huge":
        assert proc.stderr == f"Error: {bad}: larger than {64 << 20} bytes; not a sensitivity file\n"
    assert not (tmp_path / "out").exists()
