"""Plans from sensitivity profiles: budget honoured, metadata accounting, errors."""
import pytest

from tasa.allocate.plan import metadata_bits, plan_from_sensitivity, predicted_costs
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


def test_predicted_costs_add_single_layer_costs_and_place_the_plan_between_uniform_widths():
    s = profile(PPL, GSM)
    _, ppl = plan_from_sensitivity(s, 3.25, beta="ppl-only")  # layer 0 at 4 bits, the rest at 3
    w = ppl["predicted"]["wikitext2"]
    assert w["plan"] == pytest.approx(1.0 + 3 * 1.0)
    assert w["uniform"] == pytest.approx({3: 7.0, 4: 1.6, 8: 0.0})
    assert w["between"] == [3, 4] and w["gap_position"] == pytest.approx((4.0 - 1.6) / (7.0 - 1.6))
    g = ppl["predicted"]["gsm8k"]  # the plan spends its bit where math does not need it
    assert g["plan"] == pytest.approx(0.2 + 1 + 1 + 4) and g["gap_position"] == pytest.approx((6.2 - 1.6) / 5.4)
    # a plan at a profiled width has no position; one at 8 bits sits at uniform 8's cost
    at4 = predicted_costs(s, [4, 4, 4, 4])
    assert "gap_position" not in at4["gsm8k"] and at4["gsm8k"]["plan"] == pytest.approx(1.6)
    assert predicted_costs(s, [8, 8, 4, 4])["wikitext2"]["between"] == [4, 8]
    with pytest.raises(TasaError, match="3 bit-widths for a profile of 4 units"):
        predicted_costs(s, [3, 3, 3])


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
    with pytest.raises(TasaError, match=r"bit-width\(s\) 2 were not profiled; profiled: 3, 4, 8"):
        plan_from_sensitivity(s, 3.5, bits=[2, 4])
    with pytest.raises(TasaError, match=r"bit-width\(s\) 5 were not profiled"):  # never dropped silently
        plan_from_sensitivity(s, 3.5, bits=[4, 5, 8])
    with pytest.raises(TasaError, match=r"bit-width\(s\) 3 are not servable by vllm-gptq \(it serves 4, 8\)"):
        plan_from_sensitivity(s, 4.5, bits=[3, 4, 8], target="vllm-gptq")
    plan, summary = plan_from_sensitivity(s, 4.5, target="vllm-gptq")  # default candidates: the profiled ones it serves
    assert summary["candidates"] == [4, 8] and {q.bits for q in plan.modules.values()} <= {4, 8}
    with pytest.raises(TasaError, match=r"budget 2.5 bits per weight is infeasible: the lowest candidate, 3-bit"):
        plan_from_sensitivity(s, 2.5)
    with pytest.raises(TasaError, match=r"budget 3 bits per weight is infeasible: .*3.297 with scale/zero"):
        plan_from_sensitivity(s, 3.0, budget_includes_metadata=True)  # 3 + (16 + 3) / 64
    with pytest.raises(TasaError, match=r"budget 9 bits per weight is above the widest candidate, 8-bit"):
        plan_from_sensitivity(s, 9.0)
    with pytest.raises(TasaError, match="positive number"):
        plan_from_sensitivity(s, float("nan"))
    with pytest.raises(TasaError, match="layer-granularity"):
        plan_from_sensitivity({**s, "granularity": "head"}, 3.5)


def module_profile(cost_of):
    """Module profile of the 4 layers x modules a (1/8 of the layer) and b (7/8); a, b are one fusion group."""
    units = [{"name": f"m.{i}.{x}", "layer": i, "modules": [f"m.{i}.{x}"], "numel": 1024 if x == "a" else 7168}
             for i in range(4) for x in "ab"]
    costs = {b: [cost_of(u["name"], int(b)) for u in units] for b in ("3", "4", "8")}
    return {"schema": "tasa.sensitivity/1", "granularity": "module", "bits": [3, 4, 8], "group_size": 64,
            "sym": True, "units": units, "model": "tiny", "fusion_groups": [[f"m.{i}.a", f"m.{i}.b"] for i in range(4)],
            "costs": {k: {b: {"cost": c, "ci_low": c, "ci_high": c} for b, c in costs.items()}
                      for k in ("wikitext2", "gsm8k")}}


def test_intra_layer_split_keeps_each_layers_total_and_ties_fusion_groups():
    # a is 10x as sensitive as b: a 4-bit layer (32768 bits) is best as a=8 (8192) + b=3 (21504) = 29696 bits,
    # cost 0 + 1 instead of 10 * 0.3 + 0.3 at 4/4; a=8 with b=4 would need 36864 bits, over the layer's total
    mods = module_profile(lambda name, b: (10.0 if name.endswith("a") else 1.0) * {3: 1.0, 4: 0.3, 8: 0.0}[b])
    layer = profile(PPL, GSM)
    plan, s = plan_from_sensitivity(layer, 3.5, beta=0.5, module_sens=mods)
    split = {i: (plan[f"m.{i}.a"].bits, plan[f"m.{i}.b"].bits) for i in range(4)}
    for i, (a, b) in split.items():
        assert (a * 1024 + b * 7168) / 8192 <= s["layer_bits"][f"layer.{i}"] + 1e-9
    assert (8, 3) in split.values() and s["intra_layer"] and not s["tie_fused"]
    assert s["average_weight_bits"] <= 3.5
    tied, st = plan_from_sensitivity(layer, 3.5, beta=0.5, module_sens=mods, tie_fused=True)
    assert all(tied[f"m.{i}.a"].bits == tied[f"m.{i}.b"].bits for i in range(4)) and st["tie_fused"]
    assert st["average_weight_bits"] <= 3.5
    with pytest.raises(TasaError, match="module-granularity"):
        plan_from_sensitivity(layer, 3.5, module_sens=layer)
    with pytest.raises(TasaError, match="no costs for m.3.b"):
        plan_from_sensitivity(layer, 3.5, module_sens={**mods, "units": mods["units"][:-1]})


def test_module_profile_allocates_over_all_modules_of_the_model():
    # every a (1/8 of its layer) costs 1.0 at 3 bits, every b 0.1; 4 bits cost nothing.  The 0.5 extra bit per
    # weight of 3.5 bits (16384 bits) buys 4 bits for all four a's (4096) and one b (7168), not two b's:
    # cost 3 x 0.1.  Per layer (layer costs 1.1 each) only two layers can go to 4 bits: cost 2.2.
    mods = module_profile(lambda name, b: {3: 1.0 if name.endswith("a") else 0.1, 4: 0.0, 8: 0.0}[b])
    plan, s = plan_from_sensitivity(mods, 3.5, bits=[3, 4], beta=0.5)
    assert all(plan[f"m.{i}.a"].bits == 4 for i in range(4))
    assert sorted(plan[f"m.{i}.b"].bits for i in range(4)) == [3, 3, 3, 4]
    assert s["granularity"] == "module" and s["cost"] == pytest.approx(3 * 0.1 / 0.55)  # normalised by the mean
    assert s["predicted"]["gsm8k"]["plan"] == pytest.approx(0.3) and s["average_weight_bits"] <= 3.5
    assert s["layer_bits"]["layer.0"] in (3.125, 4.0) and len(s["layer_bits"]) == 4
    tied, st = plan_from_sensitivity(mods, 3.5, bits=[3, 4], beta=0.5, tie_fused=True)  # a, b fused: per layer
    assert all(tied[f"m.{i}.a"].bits == tied[f"m.{i}.b"].bits for i in range(4))
    assert sorted(st["layer_bits"].values()) == [3, 3, 4, 4] and st["predicted"]["gsm8k"]["plan"] == pytest.approx(2.2)
    with pytest.raises(TasaError, match="allocated over its modules directly"):
        plan_from_sensitivity(mods, 3.5, module_sens=mods)
    with pytest.raises(TasaError, match="fusion groups"):
        plan_from_sensitivity({**mods, "fusion_groups": []}, 3.5, tie_fused=True)


def test_vllm_gptq_target_allocates_over_4_and_8_with_ties_and_refuses_the_rest():
    layer = profile(PPL, GSM)
    plan, s = plan_from_sensitivity(layer, 5.0, beta=0.5, target="vllm-gptq")
    assert set(s["candidates"]) == {4, 8} and {q.bits for q in plan.modules.values()} <= {4, 8}
    assert s["average_weight_bits"] <= 5.0 and plan.meta["target"] == "vllm-gptq"
    with pytest.raises(TasaError, match=r"bit-width\(s\) 3 are not servable by vllm-gptq"):
        plan_from_sensitivity(layer, 3.5, bits=[3], target="vllm-gptq")
    with pytest.raises(TasaError, match="symmetric"):
        plan_from_sensitivity({**layer, "sym": False}, 5.0, target="vllm-gptq")
    with pytest.raises(TasaError, match="cannot be untied"):
        plan_from_sensitivity(layer, 5.0, target="vllm-gptq", tie_fused=False)
    with pytest.raises(TasaError, match="unknown target"):
        plan_from_sensitivity(layer, 5.0, target="tgi")


def test_servability_rules_name_module_and_rule():
    from tasa.allocate.targets import TARGETS, check_servable, violations
    from tasa.config import QuantSpec

    mods = {"l.0.q": QuantSpec(bits=4, group_size=64), "l.0.k": QuantSpec(bits=8, group_size=64),
            "l.0.v": QuantSpec(bits=4, group_size=64), "l.0.o": QuantSpec(bits=3, group_size=64, sym=False)}
    groups = [("l.0.q", "l.0.k", "l.0.v")]
    assert violations(mods, TARGETS["gptqmodel"], groups) == []
    bad = violations(mods, TARGETS["vllm-gptq"], groups)
    assert any(v.startswith("l.0.o: 3-bit") for v in bad) and any("l.0.o: asymmetric" in v for v in bad)
    assert any("fusion group with different grids (q=4b, k=8b, v=4b)" in v for v in bad)
    with pytest.raises(TasaError, match=r"not servable by vllm-gptq: l\.0: fusion group"):
        check_servable({k: v for k, v in mods.items() if k != "l.0.o"}, TARGETS["vllm-gptq"], groups)
    # vLLM's compressed-tensors path: 3 bits are fine, asymmetric 3 bits are not, the fusion group still ties
    bad = violations(mods, TARGETS["vllm"], groups)
    assert bad[0] == "l.0.o: asymmetric 3-bit grid, but vllm serves asymmetric grids only at 4, 8 bits"
    assert len(bad) == 2 and "fusion group with different grids" in bad[1]
    assert violations({"l.0.o": QuantSpec(bits=8, group_size=64, sym=False)}, TARGETS["vllm"], []) == []
    assert violations({"l.0.q": QuantSpec(bits=4, group_size=48)}, TARGETS["sglang"], [])[0].startswith(
        "l.0.q: group size 48")


def test_a_record_of_another_schema_is_refused():
    from tasa.allocate.plan import plan_from_sensitivity
    from tasa.errors import TasaError

    with pytest.raises(TasaError, match=r"the sensitivity profile is not a tasa.sensitivity/1 record \(schema "
                                        r"'tasa.mixture/1'\)"):
        plan_from_sensitivity({"schema": "tasa.mixture/1"}, 3.5)


def _without(record, bits):
    """The profile ``record`` with bit-width ``bits`` dropped (as if never probed)."""
    out = {**record, "bits": [b for b in record["bits"] if b != bits]}
    out["costs"] = {o: {b: v for b, v in per.items() if b != str(bits)} for o, per in record["costs"].items()}
    return out


@pytest.mark.parametrize("seed", range(30))
def test_unprofiled_widths_the_bound_rules_out_cannot_improve_the_plan(seed):
    """When the zero-cost bound says an unprofiled width cannot be used, the plan over the profiled widths is
    optimal over all of them, whatever the unprofiled costs are; when it says one can, it names it."""
    import random

    from tasa.allocate.plan import unprofiled_bits_used

    rng = random.Random(seed)
    c3 = [rng.uniform(0.5, 4.0) for _ in range(4)]
    c4 = [c * rng.uniform(0.05, 0.6) for c in c3]
    c8 = [c * rng.uniform(0.0, 0.2) for c in c4]
    w = {"3": c3, "4": c4, "8": c8}
    g = {"3": [rng.uniform(0.5, 4.0) for _ in range(4)]}
    g["4"] = [c * rng.uniform(0.05, 0.6) for c in g["3"]]
    g["8"] = [c * rng.uniform(0.0, 0.2) for c in g["4"]]
    full = profile(w, g)
    budget = rng.choice([3.25, 3.5, 3.75, 4.0, 5.0, 6.0])
    used = unprofiled_bits_used(_without(full, 8), budget, [3, 4, 8])
    _, best = plan_from_sensitivity(full, budget)
    if not used:
        _, restricted = plan_from_sensitivity(_without(full, 8), budget, bits=[3, 4])
        assert restricted["cost"] == pytest.approx(best["cost"], rel=1e-12, abs=1e-12)
    else:
        assert used == [8]
    if 8 in best["module_bits"].values():  # a plan that needs 8 bits is never missed
        assert used == [8]
    assert unprofiled_bits_used(full, budget, [3, 4, 8]) == []  # nothing unprofiled


def test_unprofiled_width_bound_examples():
    from tasa.allocate.plan import unprofiled_bits_used

    partial = _without(profile(PPL, GSM), 8)
    assert unprofiled_bits_used(partial, 3.5, [3, 4, 8]) == []  # 4 bits for half the layers fits; 8 costs 4 more
    assert unprofiled_bits_used(partial, 6.0, [3, 4, 8]) == [8]  # above 4 bits only 8 can spend the budget
    with pytest.raises(TasaError, match="lowest candidate"):
        unprofiled_bits_used(_without(profile(PPL, GSM), 3), 3.5, [3, 4, 8])


def test_a_unit_of_several_modules_gives_each_of_them_its_bits():
    # a mixture-of-experts layer at module granularity: attention "a" (1/8 of the layer) and one unit holding
    # both routed experts (7/8).  The same costs as the intra-layer test above: a 4-bit layer becomes a=8 plus
    # both experts at 3 bits, the experts never split.
    units = []
    for i in range(4):
        units.append({"name": f"m.{i}.a", "layer": i, "modules": [f"m.{i}.a"], "numel": 1024})
        units.append({"name": f"m.{i}.experts", "layer": i, "modules": [f"m.{i}.e0", f"m.{i}.e1"], "numel": 7168})
    cost = {3: 1.0, 4: 0.3, 8: 0.0}
    costs = {b: [(10.0 if u["name"].endswith("a") else 1.0) * cost[int(b)] for u in units] for b in ("3", "4", "8")}
    mods = {"schema": "tasa.sensitivity/1", "granularity": "module", "bits": [3, 4, 8], "group_size": 64, "sym": True,
            "units": units, "model": "tiny", "fusion_groups": [[f"m.{i}.e0", f"m.{i}.e1"] for i in range(4)],
            "costs": {k: {b: {"cost": c, "ci_low": c, "ci_high": c} for b, c in costs.items()}
                      for k in ("wikitext2", "gsm8k")}}
    layer = profile(PPL, GSM)
    layer["units"] = [{**u, "modules": [f"m.{u['layer']}.a", f"m.{u['layer']}.e0", f"m.{u['layer']}.e1"],
                       "numel": 8192} for u in layer["units"]]
    plan, s = plan_from_sensitivity(layer, 3.5, beta=0.5, module_sens=mods)
    assert set(plan.modules) == {f"m.{i}.{x}" for i in range(4) for x in ("a", "e0", "e1")}
    for i in range(4):
        assert plan[f"m.{i}.e0"].bits == plan[f"m.{i}.e1"].bits
        total = plan[f"m.{i}.a"].bits * 1024 + plan[f"m.{i}.e0"].bits * 7168
        assert total / 8192 <= s["layer_bits"][f"layer.{i}"] + 1e-9
    assert any((plan[f"m.{i}.a"].bits, plan[f"m.{i}.e0"].bits) == (8, 3) for i in range(4))
    assert s["average_weight_bits"] <= 3.5
    assert s["average_weight_bits"] == pytest.approx(
        sum(plan[f"m.{i}.a"].bits * 1024 + plan[f"m.{i}.e0"].bits * 7168 for i in range(4)) / (4 * 8192))
    whole, ws = plan_from_sensitivity(mods, 3.5, beta=0.5)  # the module profile alone, over the whole model
    assert all(whole[f"m.{i}.e0"].bits == whole[f"m.{i}.e1"].bits for i in range(4)) and ws["average_weight_bits"] <= 3.5


def test_the_vllm_target_allocates_over_3_4_8_through_compressed_tensors():
    from tasa.allocate.targets import target_for

    layer = profile(PPL, GSM)
    plan, s = plan_from_sensitivity(layer, 3.5, beta=0.5, target="vllm")
    assert s["candidates"] == [3, 4, 8] and {q.bits for q in plan.modules.values()} == {3, 4}
    asym = {**layer, "sym": False}  # an asymmetric profile: only the widths vLLM serves asymmetric
    _, a = plan_from_sensitivity(asym, 5.0, beta=0.5, target="vllm")
    assert a["candidates"] == [4, 8]
    with pytest.raises(TasaError, match=r"bit-width\(s\) 3 are not servable by vllm \(it serves 4, 8\)"):
        plan_from_sensitivity(asym, 3.5, bits=[3, 4], target="vllm")
    assert target_for("vllm", "compressed-tensors").name == "vllm"
    assert target_for("vllm", "gptq").name == "vllm-gptq"  # vLLM asked for a GPTQ checkpoint: its GPTQ rules
    assert target_for("gptqmodel", "compressed-tensors").name == "compressed-tensors"
    with pytest.raises(TasaError, match="sglang is served from gptq checkpoints, not compressed-tensors"):
        target_for("sglang", "compressed-tensors")


def test_the_llama_cpp_target_allocates_on_its_grids_where_the_widths_allow_and_counts_block_scales():
    """Module b is 512 wide (Q3_K holds it), module a 576 (it does not): 3 bits go to b modules only; every spec is
    its GGML type's grid; with the metadata budget a bit-width costs its type's bits per weight."""
    from tasa.allocate.targets import LLAMA_CPP_GRIDS

    sens = module_profile(lambda name, b: {3: 2.0, 4: 1.0, 8: 0.0}[b] * (1 if name.endswith("b") else 1.5))
    for u in sens["units"]:
        u["in_features"] = [576 if u["name"].endswith("a") else 512]
    plan, summary = plan_from_sensitivity(sens, 3.6, target="llama.cpp", beta=0.0)
    assert {n: s.bits for n, s in plan.modules.items() if s.bits == 3} and all(
        n.endswith(".b") for n, s in plan.modules.items() if s.bits == 3)
    assert all(s == LLAMA_CPP_GRIDS[s.bits][0] for s in plan.modules.values())
    assert summary["average_weight_bits"] <= 3.6
    plan, summary = plan_from_sensitivity(sens, 4.2, target="llama.cpp", beta=0.0, budget_includes_metadata=True)
    bpw = {b: LLAMA_CPP_GRIDS[b][2] for b in (3, 4, 8)}
    sizes = {u["name"]: u["numel"] for u in sens["units"]}
    stored = sum(sizes[n] * bpw[s.bits] for n, s in plan.modules.items()) / sum(sizes.values())
    assert stored <= 4.2 and summary["effective_bits_with_metadata"] == pytest.approx(stored)
    for u in sens["units"]:
        u["in_features"] = [576]
    sens["bits"] = [3]
    for obj in sens["costs"].values():
        for b in ("4", "8"):
            del obj[b]
    with pytest.raises(TasaError, match=r"m.0.a: none of the bit-widths 3 is servable by llama.cpp for input widths "
                                        r"576"):
        plan_from_sensitivity(sens, 3.0, target="llama.cpp", bits=[3])
