"""Plans from sensitivity profiles: budget honoured, metadata accounting, errors."""
import pytest

from tasa.allocate.plan import metadata_bits, plan_from_sensitivity
from tasa.errors import TasaError


def profile(costs_w, costs_g):
    units = [{"name": f"layer.{i}", "layer": i, "modules": [f"m.{i}.a", f"m.{i}.b"], "numel": 64 * 64 * 2}
             for i in range(4)]
    return {"schema": "tasa.sensitivity/1", "granularity": "layer", "bits": [3, 4, 8], "group_size": 64,
            "sym": True, "units": units, "model": "tiny",
            "costs": {k: {b: {"cost": c, "ci_low": c, "ci_high": c} for b, c in v.items()}
                      for k, v in (("wikitext2", costs_w), ("gsm8k", costs_g))}}


PPL = {"3": [4.0, 1.0, 1.0, 1.0], "4": [1.0, 0.2, 0.2, 0.2], "8": [0.0] * 4}  # layer 0 matters for ppl
GSM = {"3": [1.0, 1.0, 1.0, 4.0], "4": [0.2, 0.2, 0.2, 1.0], "8": [0.0] * 4}  # layer 3 matters for math


def test_ppl_only_and_task_only_protect_different_layers():
    s = profile(PPL, GSM)
    _, ppl = plan_from_sensitivity(s, 3.25, beta="ppl-only")
    _, task = plan_from_sensitivity(s, 3.25, beta="task-only")
    assert ppl["layer_bits"] == {"layer.0": 4, "layer.1": 3, "layer.2": 3, "layer.3": 3}
    assert task["layer_bits"] == {"layer.0": 3, "layer.1": 3, "layer.2": 3, "layer.3": 4}
    assert ppl["average_weight_bits"] == 3.25


def test_plan_modules_and_metadata_budget():
    s = profile(PPL, GSM)
    plan, summary = plan_from_sensitivity(s, 4.0, beta=0.5)
    assert len(plan) == 8 and plan["m.0.a"].bits == plan["m.0.b"].bits == summary["layer_bits"]["layer.0"]
    assert summary["effective_bits_with_metadata"] == pytest.approx(
        summary["average_weight_bits"] + sum(metadata_bits(b, 64) for b in summary["layer_bits"].values()) / 4)
    _, meta = plan_from_sensitivity(s, 4.0, beta=0.5, budget_includes_metadata=True)
    assert meta["effective_bits_with_metadata"] <= 4.0 < summary["effective_bits_with_metadata"]


def test_plan_errors():
    s = profile(PPL, GSM)
    with pytest.raises(TasaError, match="bit-width 2 was not profiled"):
        plan_from_sensitivity(s, 3.5, bits=[2, 4])
    with pytest.raises(TasaError, match="infeasible"):
        plan_from_sensitivity(s, 2.5)
    with pytest.raises(TasaError, match="layer-granularity"):
        plan_from_sensitivity({**s, "granularity": "module"}, 3.5)
