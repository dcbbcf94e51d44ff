"""Mixture-of-experts models (issue 36): fused transformers-5 experts become per-expert linears, each quantized
with the Hessian of the tokens routed to it; routers stay in full precision; checkpoints keep the hub layout;
streamed results equal the in-memory ones."""
import json
import logging
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tasa.config import CalibSpec, QuantizeSpec, Runtime
from tasa.errors import TasaError
from tasa.models import load, resolve
from tasa.models.moe import RoutedExperts, unfuse_experts
from tasa.models.walker import capture_ids, input_groups, parallel_steps, walk
from tasa.pipeline.quantize import quantize
from tasa.plan import Plan
from tasa.config import QuantSpec
from tasa.profile.probe import units
from tasa.quant.apply import quantize_model
from tests.conftest import byte_tokenizer

MOE = {
    "mixtral": ("MixtralConfig", dict(intermediate_size=96, num_local_experts=4, num_experts_per_tok=2)),
    "qwen3_moe": ("Qwen3MoeConfig", dict(intermediate_size=128, moe_intermediate_size=96, num_experts=4,
                                         num_experts_per_tok=2, head_dim=16)),
}


def tiny_moe(kind: str, seed: int = 0, layers: int = 2):
    import transformers

    cls, extra = MOE[kind]
    cfg = getattr(transformers, cls)(vocab_size=260, hidden_size=64, num_hidden_layers=layers, num_attention_heads=4,
                                     num_key_value_heads=2, max_position_embeddings=256, **extra)
    torch.manual_seed(seed)
    return transformers.AutoModelForCausalLM.from_config(cfg).eval()


@pytest.fixture(params=list(MOE))
def moe_dir(request, tmp_path) -> Path:
    model = tiny_moe(request.param)
    path = tmp_path / request.param
    model.save_pretrained(path, max_shard_size="60KB")
    byte_tokenizer().save_pretrained(path)
    return path


@pytest.mark.parametrize("kind", list(MOE))
def test_unfused_experts_compute_what_the_fused_ones_do(kind):
    model = tiny_moe(kind)
    fused = model.model.layers[0].mlp.experts
    gate_up, down = fused.gate_up_proj.detach().clone(), fused.down_proj.detach().clone()
    ids = torch.randint(0, 260, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(ids).logits
        unfuse_experts(model)
        out = model(ids).logits
    experts = model.model.layers[0].mlp.experts
    assert isinstance(experts, RoutedExperts) and len(experts) == 4
    i = down.shape[2]
    assert torch.equal(experts[2].gate_proj.weight, gate_up[2, :i])
    assert torch.equal(experts[2].up_proj.weight, gate_up[2, i:])
    assert torch.equal(experts[3].down_proj.weight, down[3])
    assert not any(p.dim() == 3 for p in model.parameters())
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)  # gate and up as two matmuls instead of one


@pytest.mark.parametrize("kind", list(MOE))
def test_every_expert_is_a_quantized_linear_and_the_router_is_not(kind):
    arch = resolve(tiny_moe(kind))
    locals_ = [m.local for m in arch.layer_modules(1)]
    assert locals_[:4] == ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"]
    assert locals_[4:] == [f"mlp.experts.{e}.{r}" for e in range(4) for r in ("gate_proj", "up_proj", "down_proj")]
    assert "mlp.gate" not in locals_  # the router (experts x hidden) stays in full precision
    assert arch.is_moe and arch.expert_groups(0) == [tuple(locals_[4:])]
    tied = arch.fusion_groups()
    assert ("model.layers.1." + "mlp.experts.0.gate_proj") in tied[-1] and len(tied[-1]) == 12
    assert len(tied) == 4  # q/k/v and all experts, per layer
    arch.tie_experts = False
    assert len(arch.fusion_groups()) == 2 * (1 + 4)  # q/k/v and each expert's gate/up
    # module-granularity probe units: the routed experts of a layer are one unit unless untied
    arch.tie_experts = True
    us = units(arch, "module")
    assert [u.name for u in us[:5]] == ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj",
                                        "model.layers.0.self_attn.v_proj", "model.layers.0.self_attn.o_proj",
                                        "model.layers.0.mlp.experts"]
    assert len(us) == 10 and len(us[4].modules) == 12
    arch.tie_experts = False
    assert len(units(arch, "module")) == 2 * 16


def test_checkpoint_names_follow_the_hub_layout_both_ways(tmp_path):
    model = tiny_moe("mixtral")
    names = unfuse_experts(model)
    assert names["model.layers.1.mlp.experts.2.gate_proj.weight"] == "model.layers.1.block_sparse_moe.experts.2.w1.weight"
    assert names["model.layers.1.mlp.experts.2.up_proj.weight"] == "model.layers.1.block_sparse_moe.experts.2.w3.weight"
    assert names["model.layers.1.mlp.experts.2.down_proj.weight"] == "model.layers.1.block_sparse_moe.experts.2.w2.weight"
    assert names["model.layers.0.mlp.gate.weight"] == "model.layers.0.block_sparse_moe.gate.weight"
    assert "model.layers.0.self_attn.q_proj.weight" not in names  # unchanged names are not listed
    assert unfuse_experts(tiny_moe("qwen3_moe")) == {}  # Qwen's hub checkpoints already name experts so


def test_parallel_experts_share_one_hessian_pass_in_sequential_steps():
    model = tiny_moe("qwen3_moe")
    arch = resolve(model)
    ids = torch.randint(0, 260, (4, 32), generator=torch.Generator().manual_seed(0))
    inputs = capture_ids(model, arch, ids, 2, torch.device("cpu"))
    for index, layer in walk(arch, torch.device("cpu")):
        groups = input_groups(layer, [m.local for m in arch.layer_modules(index)], inputs)
        steps = parallel_steps(groups)
        assert [[g[0] for g in step] for step in steps[:2]] == [["self_attn.q_proj"], ["self_attn.o_proj"]]
        assert sorted(g[0] for g in steps[2]) == [f"mlp.experts.{e}.gate_proj" for e in range(4)]
        assert all(g[1].endswith("up_proj") for g in steps[2])
        assert sorted(g[0] for g in steps[3]) == [f"mlp.experts.{e}.down_proj" for e in range(4)]
        break


def test_an_expert_no_token_reaches_falls_back_to_rtn_and_is_reported(caplog):
    from tasa.quant.rtn import rtn_quantize

    model = tiny_moe("mixtral")
    arch = resolve(model)
    ids = torch.randint(0, 260, (4, 32), generator=torch.Generator().manual_seed(0))
    for layer in model.model.layers:  # routers that never pick expert 3 (its slot goes to expert 2)
        route = layer.mlp.gate.forward
        layer.mlp.gate.forward = lambda h, route=route: (lambda out: (out[0], out[1], out[2].clamp(max=2)))(route(h))
    before = model.model.layers[1].mlp.experts[3].down_proj.weight.detach().clone()
    plan = Plan.uniform([m.name for m in arch.modules], QuantSpec(bits=4, group_size=32), method="gptq")
    with caplog.at_level(logging.WARNING):
        report = quantize_model(model, arch, plan, ids, batch_size=2, progress=False)
    silent = report.modules["model.layers.1.mlp.experts.3.down_proj"]
    assert silent.tokens == 0 and silent.fallback == "rtn: no calibration token reached it" and silent.rel_error is None
    assert torch.equal(model.model.layers[1].mlp.experts[3].down_proj.weight,
                       rtn_quantize(before, 4, 32, True).weight)  # RTN on the same grid, not zeros
    reached = report.modules["model.layers.1.mlp.experts.0.down_proj"]
    assert reached.tokens > 0 and reached.fallback is None and reached.rel_error is not None
    assert "experts.3.down_proj: no calibration token reached it" in caplog.text
    # every expert is counted: tokens of the gate/up inputs add up to top-k x the tokens, over the experts
    per_layer = sum(report.modules[f"model.layers.0.mlp.experts.{e}.gate_proj"].tokens for e in range(4))
    assert per_layer == 2 * ids.numel()


def test_a_layers_experts_are_quantized_as_a_batch_with_what_one_at_a_time_gives(monkeypatch):
    """GPTQ of a layer's routed experts runs as batches (tasa.quant.gptq.gptq_quantize_many: the 4 gate, the 4 up,
    then the 4 down projections, each expert on the Hessian of its own tokens), and q/k/v share one factorisation of
    their Hessian, as gate/up do: the model is bit for bit the one quantized a linear at a time (a batch budget of
    one byte), every module's report the same but for its seconds."""
    import tasa.quant.gptq as gptq

    ids = torch.randint(0, 260, (4, 32), generator=torch.Generator().manual_seed(0))
    runs = {}
    for budget in (1, gptq.GPTQ_BATCH_BYTES):
        monkeypatch.setattr(gptq, "GPTQ_BATCH_BYTES", budget)
        batches, factored = [], []
        run, factor = gptq._gptq_batch, gptq._inverse_cholesky
        monkeypatch.setattr(gptq, "_gptq_batch", lambda w, *a, run=run: batches.append(len(w)) or run(w, *a))
        monkeypatch.setattr(gptq, "_inverse_cholesky",
                            lambda p, *a, factor=factor: factored.append(p(None).shape[0]) or factor(p, *a))
        model = tiny_moe("qwen3_moe")
        arch = resolve(model)
        plan = Plan.uniform([m.name for m in arch.modules], QuantSpec(bits=3, group_size=32, act_order=True,
                                                                      static_groups=True, scale_search=4),
                            method="gptq")
        report = quantize_model(model, arch, plan, ids, batch_size=2, progress=False)
        runs[budget] = (model.state_dict(), report, batches, factored)
        monkeypatch.undo()
    (one, one_report, one_batches, one_factored), (many, report, batches, factored) = runs.values()
    silent = [n for n, st in report.modules.items() if st.fallback]
    # per layer, Hessians: q/k/v's, o's, each expert's gate/up and down (experts a token reached)
    groups = 2 * (1 + 1 + 4 + 4) - sum(n.endswith(("gate_proj", "down_proj")) for n in silent)
    assert set(one_batches) == set(one_factored) == {1} and len(one_factored) == sum(factored) == groups
    # per layer, batches: q, then k and v alone (another shape, the same Hessian), o; the 4 gates, 4 ups, 4 downs
    assert batches[:5] == [1, 1, 1, 1, 4 - sum(".layers.0." in n and n.endswith("gate_proj") for n in silent)]
    assert factored[:3] == [1, 1, 4 - sum(".layers.0." in n and n.endswith("gate_proj") for n in silent)]
    assert all(torch.equal(one[k], many[k]) for k in one)
    for name, st in report.modules.items():
        other = one_report.modules[name]
        assert (st.bits, st.rel_error, st.tokens, st.fallback) == (other.bits, other.rel_error, other.tokens,
                                                                   other.fallback)


@pytest.mark.parametrize("granularity", ["layer", "module"])
def test_gptq_probes_quantize_a_layers_experts_as_batches_with_what_one_at_a_time_gives(monkeypatch, data_dir,
                                                                                       tokenizer, granularity):
    """A GPTQ probe of a unit holding a layer's routed experts (the tied experts unit, or the whole layer) runs them
    as batches, as quantization does: every probe's losses are exactly those of GPTQ a linear at a time."""
    import tasa.quant.gptq as gptq
    from tasa.config import ProfileSpec
    from tasa.profile.objectives import build_objective
    from tasa.profile.probe import run_probes

    calib = torch.randint(0, 260, (4, 32), generator=torch.Generator().manual_seed(0))
    objs = [build_objective("wikitext2", tokenizer, min_tokens=60, seqlen=32)]
    runs = {}
    for budget in (1, gptq.GPTQ_BATCH_BYTES):
        with monkeypatch.context() as patch:  # (not undo(): data_dir's environment stays)
            patch.setattr(gptq, "GPTQ_BATCH_BYTES", budget)
            batches = []
            run = gptq._gptq_batch
            patch.setattr(gptq, "_gptq_batch", lambda w, *a, run=run: batches.append(len(w)) or run(w, *a))
            model = tiny_moe("qwen3_moe")
            res = run_probes(model, resolve(model), objs, ProfileSpec(bits=(2, 4), group_size=32,
                                                                      granularity=granularity, batch_tokens=70),
                             progress=False, calib_ids=calib, calib_batch=2)
            runs[budget] = (res, batches, model.state_dict())
    (one, one_batches, _), (many, batches, weights) = runs.values()
    assert set(one_batches) == {1} and max(batches) == 4  # the 4 gate, up or down projections of a layer at once
    assert one.probes.keys() == many.probes.keys() and len(many.probes) == 2 * (2 if granularity == "layer" else 10)
    for key, losses in many.probes.items():
        assert torch.equal(losses["wikitext2"].nll, one.probes[key]["wikitext2"].nll), key
        assert torch.equal(losses["wikitext2"].kl, one.probes[key]["wikitext2"].kl), key
    fresh = tiny_moe("qwen3_moe")
    resolve(fresh)  # its experts unfused, as the probed model's are
    assert weights.keys() == fresh.state_dict().keys()  # weights restored after every probe
    assert all(torch.equal(weights[k], v) for k, v in fresh.state_dict().items())


@pytest.mark.parametrize("method", ["gptq", "rtn"])
def test_streamed_moe_quantization_writes_the_in_memory_checkpoint_in_the_hub_layout(moe_dir, tmp_path, data_dir,
                                                                                     method):
    spec = QuantizeSpec(method=method, bits=4, group_size=32)
    calib = CalibSpec.parse("wikitext2", nsamples=4, seqlen=64)
    outs = {s: quantize(str(moe_dir), tmp_path / f"q-{s}", spec, calib, runtime=Runtime(stream=s, progress=False))
            for s in ("off", "on")}
    a, b = (load_file(outs[s].output_dir / "model.safetensors") for s in ("off", "on"))
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
    hub = set(load_file(next(moe_dir.glob("*.safetensors"))).keys()) | {
        k for f in moe_dir.glob("*.safetensors") for k in load_file(f)}
    for name in [k[: -len(".weight")] for k in hub if ".experts." in k]:  # every expert, packed under its hub name
        assert f"{name}.qweight" in a and f"{name}.weight" not in a
    router = next(k for k in hub if k.endswith("gate.weight") and "experts" not in k)
    assert router in a and a[router].dtype == torch.float32  # kept as a float tensor
    record = outs["off"].record
    assert record["average_bits"] == 4.0
    n_linear = sum(load(str(moe_dir)).model.get_submodule(n).weight.numel() for n in record["modules"])
    layer_weights = record["layer_weights"]
    assert record["layer_weights_average_bits"] == pytest.approx((4 * n_linear + 32 * (layer_weights - n_linear))
                                                                 / layer_weights)
    # the checkpoint loads back (dequantized) with every expert
    back = load(str(outs["off"].output_dir))
    arch = resolve(back.model)
    assert len(arch.modules) == 2 * 16


def test_a_fused_expert_layout_tasa_cannot_unfuse_is_refused():
    model = tiny_moe("qwen3_moe")
    experts = model.model.layers[0].mlp.experts
    experts.has_bias = True  # e.g. gpt-oss's experts carry biases tasa would drop
    with pytest.raises(TasaError, match=r"model\.layers\.0\.mlp\.experts \(Qwen3MoeExperts\): fused experts in a "
                                        r"layout tasa does not unfuse .*has_bias"):
        resolve(model)


@pytest.mark.parametrize("granularity", ["layer", "module"])
def test_a_streamed_moe_run_gives_the_in_memory_runs_profile_plan_checkpoint_and_scores(tmp_path, data_dir,
                                                                                       granularity):
    from tests.unit.test_streaming import run_in_memory_and_streamed, same_scores

    model = tmp_path / "m"
    tiny_moe("mixtral").save_pretrained(model, max_shard_size="60KB")
    byte_tokenizer().save_pretrained(model)
    off, on = run_in_memory_and_streamed(model, tmp_path, "--granularity", granularity)
    sens = [json.loads((d / "profile" / "sensitivity.json").read_text()) for d in (off, on)]
    assert sens[0]["costs"] == sens[1]["costs"]
    plan = json.loads((off / "plan.json").read_text())["modules"]
    assert plan == json.loads((on / "plan.json").read_text())["modules"]
    assert len(plan) == 2 * (4 + 12)  # every expert planned
    for layer in range(2):  # the routed experts of a layer share one bit-width (tied by default)
        assert len({plan[f"model.layers.{layer}.mlp.experts.{e}.{r}"]["bits"] for e in range(4)
                    for r in ("gate_proj", "up_proj", "down_proj")}) == 1
    if granularity == "module":
        units_ = [u["name"] for u in sens[0]["units"]]
        assert units_[4] == "model.layers.0.mlp.experts" and len(units_) == 10
        assert {b["bits"] for b in plan.values()} == {2, 4}  # the budget splits between units
    ckpt = [p for p in on.rglob("model.safetensors")]
    assert len(ckpt) == 1 and ckpt[0].read_bytes() == (off / ckpt[0].relative_to(on)).read_bytes()
    same_scores(off, on)


def test_shared_experts_are_their_own_units_and_their_gate_stays_float():
    import transformers

    cfg = transformers.Qwen2MoeConfig(vocab_size=260, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, moe_intermediate_size=32, shared_expert_intermediate_size=96,
                                      num_experts=4, num_experts_per_tok=2, max_position_embeddings=256)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    ids = torch.randint(0, 260, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(ids).logits
        arch = resolve(model)
        torch.testing.assert_close(model(ids).logits, ref, rtol=0, atol=1e-5)
    locals_ = [m.local for m in arch.layer_modules(0)]
    assert {"mlp.shared_expert.gate_proj", "mlp.shared_expert.up_proj", "mlp.shared_expert.down_proj"} <= set(locals_)
    assert "mlp.shared_expert_gate" not in locals_ and "mlp.gate" not in locals_  # routers: full precision
    assert len(arch.expert_groups(0)[0]) == 12 and not any("shared" in n for n in arch.expert_groups(0)[0])
    names = [u.name for u in units(arch, "module") if u.layer == 0]
    assert names[4:] == ["model.layers.0.mlp.experts", "model.layers.0.mlp.shared_expert.gate_proj",
                         "model.layers.0.mlp.shared_expert.up_proj", "model.layers.0.mlp.shared_expert.down_proj"]


def test_a_compressed_tensors_export_of_experts_targets_their_hub_names(moe_dir, tmp_path, data_dir):
    from tasa.config import ExportSpec

    spec = QuantizeSpec(method="rtn", bits=4, group_size=32)
    outs = {s: quantize(str(moe_dir), tmp_path / f"ct-{s}", spec, None, export=ExportSpec("compressed-tensors"),
                        runtime=Runtime(stream=s, progress=False)) for s in ("off", "on")}
    a, b = (load_file(outs[s].output_dir / "model.safetensors") for s in ("off", "on"))
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
    cfg = json.loads((outs["off"].output_dir / "config.json").read_text())["quantization_config"]
    (group,) = cfg["config_groups"].values()
    experts = [t for t in group["targets"] if ".experts." in t]
    assert len(experts) == 2 * 12 and all(f"{t}.weight_packed" in a for t in group["targets"])
    if "mixtral" in moe_dir.name:
        assert "model.layers.0.block_sparse_moe.experts.3.w2" in experts
    back = load(str(outs["off"].output_dir))  # tasa reads it back, dequantized, every expert included
    assert len(resolve(back.model).modules) == 2 * 16
