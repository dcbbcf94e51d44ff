"""tasa sweep on a tiny random model: one plan per budget x beta, allocated as tasa allocate does, quantized on
a fresh model and evaluated; resumable; clear errors on bad input."""
import json

import pytest

from tasa import pipeline
from tasa.cli import main
from tasa.config import AllocationSpec, CalibSpec, EvalSpec, ProfileSpec, QuantizeSpec, Runtime, SweepSpec
from tasa.errors import TasaError
from tasa.plan import Plan


@pytest.fixture
def profiled(tiny_model_dir, data_dir, tmp_path):
    spec = ProfileSpec(objectives=("wikitext2", "arc_easy"), bits=(2, 4), group_size=16, probe_tokens=60,
                       probe_seqlen=32)
    pipeline.profile(str(tiny_model_dir), tmp_path / "profile", spec, Runtime(progress=False), report=False)
    return tiny_model_dir, tmp_path / "profile"


def _spec(**kw):
    return SweepSpec(**{"budgets": (2.5, 3.5), "betas": (0.5,), "calib": CalibSpec(nsamples=4, seqlen=32),
                        "quantize": QuantizeSpec(scale_search=0),
                        "evaluation": EvalSpec(tasks=("wikitext2", "arc_easy"), limit=4, windows=2, seqlen=32,
                                               generate=False), **kw})


def test_sweep_plans_are_allocated_quantized_and_evaluated(profiled, tmp_path, monkeypatch):
    model_dir, profile_dir = profiled
    r = pipeline.sweep(str(model_dir), profile_dir, tmp_path / "sweep", _spec(), Runtime(progress=False)).record
    assert [row["plan"] for row in r["rows"]] == ["b2.5-beta0.5", "b3.5-beta0.5"] and r["measured_this_run"] == 2
    for row in r["rows"]:
        assert row["average_bits"] <= row["budget"] + 1e-9
        assert set(row["results"]) == {"wikitext2", "arc_easy"} and row["results"]["wikitext2"]["ppl"] > 1
        assert row["results"]["arc_easy"]["n"] == 4
        # the plan is the one tasa allocate writes
        pipeline.allocate_bits(profile_dir, tmp_path / "direct.json", AllocationSpec(budget=row["budget"], beta=0.5))
        assert Plan.load(tmp_path / "sweep" / "plans" / f"{row['plan']}.json").modules == \
            Plan.load(tmp_path / "direct.json").modules
    assert r["rows"][0]["results"] != r["rows"][1]["results"]  # 2.5 bits mixes 2 and 4; 3.5 bits more 4-bit layers
    # resumed: nothing is quantized again; another budget is measured, the others reused
    monkeypatch.setattr("tasa.quant.apply.quantize_model", lambda *a, **k: (_ for _ in ()).throw(AssertionError))
    again = pipeline.sweep(str(model_dir), profile_dir, tmp_path / "sweep", _spec(), Runtime(progress=False)).record
    assert again["measured_this_run"] == 0 and again["rows"][0]["results"] == r["rows"][0]["results"]
    with pytest.raises(AssertionError):
        pipeline.sweep(str(model_dir), profile_dir, tmp_path / "sweep", _spec(budgets=(2.5, 3.0)),
                       Runtime(progress=False))


def test_sweep_cli_and_bad_input(profiled, tmp_path, capsys):
    model_dir, profile_dir = profiled
    common = ["sweep", "--model", str(model_dir), "--sensitivity", str(profile_dir), "--calib", "wikitext2",
              "--nsamples", "4", "--seqlen", "32", "--tasks", "wikitext2", "--eval-windows", "2", "--quiet",
              "--output-dir", str(tmp_path / "s")]
    with pytest.raises(SystemExit) as e:
        main([*common, "--budgets", "3,3.5", "--betas", "0.5,ppl-only"])
    out = capsys.readouterr().out
    assert e.value.code == 0 and "b3-beta0.5:" in out and "b3.5-betappl-only:" in out and "4 plans" in out
    assert len(json.loads((tmp_path / "s" / "sweep.json").read_text())["rows"]) == 4
    for bad, message in ((["--budgets", "3,x"], "--budgets are numbers"),
                         (["--budgets", "3,3"], "budgets: 3.0 is listed twice"),
                         (["--budgets", "1"], "budget"),
                         (["--budgets", "3", "--betas", "2"], "beta")):
        with pytest.raises(SystemExit) as e:
            main([*common, *bad])
        assert e.value.code == 2 and message in capsys.readouterr().err
    with pytest.raises(TasaError, match="learned rounding"):
        _spec(quantize=QuantizeSpec(learn_rounding=4))


def test_an_infeasible_budget_fails_before_the_model_loads(profiled, tmp_path, no_work):
    model_dir, profile_dir = profiled
    with pytest.raises(TasaError, match="infeasible"):
        pipeline.sweep(str(model_dir), profile_dir, tmp_path / "sweep", _spec(budgets=(3.0, 1.0)),
                       Runtime(progress=False))
