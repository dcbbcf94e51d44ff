"""Probe engine on tiny random models: equal to a full forward with only the unit quantized; resumable."""
import copy
import dataclasses
import json

import pytest
import torch
import torch.nn.functional as F

from tasa.errors import TasaError
from tasa.models.arch import resolve
from tasa.profile import probe as probe_mod
from tasa.profile.objectives import build_objective, item_losses
from tasa.config import ProfileSpec
from tasa.models import walker as walker_mod
from tasa.models.walker import capture, run_layer
from tasa.profile.probe import ProbeStore, run_probes
from tasa.quant.rtn import rtn_quantize
from tests.conftest import tiny_llama


def _sum_nll(model, ids, first):
    """Summed NLL of ids[first:] given ids[:first], by a plain forward pass."""
    with torch.no_grad():
        logp = F.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].float(), -1)
    return -sum(float(logp[t - 1, ids[t]]) for t in range(first, len(ids)))


def _rtn_copy(model, modules, bits=2, group_size=16):
    """A copy of ``model`` with ``modules`` RTN-quantized (what a probe of them measures)."""
    q = copy.deepcopy(model)
    with torch.no_grad():
        for name in modules:
            lin = q.get_submodule(name)
            lin.weight.copy_(rtn_quantize(lin.weight, bits, group_size, True).weight)
    return q


def direct_item_losses(model, o):
    """Per-item losses computed from scratch: each row (or each prompt + choice) on its own."""
    out = []
    for r in range(o.n_items):
        mask = o.score_mask[r]
        ids = o.input_ids[r].tolist()
        pos = mask.nonzero().flatten().tolist()
        if o.kind == "nll":
            out.append(_sum_nll(model, ids[: pos[-1] + 1], pos[0]))
            continue
        ctx = ids[: pos[0]]
        lls = []
        for c in range(int(o.token_choice[r].max()) + 1):
            cont = [ids[t] for t in pos if o.token_choice[r, t] == c]
            lls.append(-_sum_nll(model, ctx + cont, len(ctx)))
        out.append(-float(torch.log_softmax(torch.tensor(lls, dtype=torch.float64), 0)[o.gold[r]]))
    return torch.tensor(out, dtype=torch.float64)


def test_objectives_score_only_answers(data_dir, tokenizer):
    wiki = build_objective("wikitext2", tokenizer, min_tokens=100, seqlen=32)
    assert wiki.kind == "nll" and wiki.input_ids.shape == (4, 32) and wiki.scored_tokens == 4 * 31 >= 100
    assert wiki.attend is None and torch.equal(wiki.pred_pos[0, 1:], torch.arange(31))
    gsm = build_objective("gsm8k", tokenizer, min_tokens=60)
    assert gsm.scored_tokens >= 60 and gsm.n_items == gsm.input_ids.shape[0]
    row = gsm.input_ids[0][gsm.score_mask[0]]
    assert tokenizer.decode(row.tolist()).startswith(" ") and "####" in tokenizer.decode(row.tolist())
    arc = build_objective("arc_easy", tokenizer, min_tokens=30)
    assert arc.kind == "choice" and arc.input_ids.shape[0] == arc.n_items  # choices packed after one prompt
    r = arc.score_mask[0].nonzero().flatten()
    first = [int(t) for t in r if t == r[0] or arc.token_choice[0, t] != arc.token_choice[0, t - 1]]
    assert all(int(arc.pred_pos[0, t]) == int(r[0]) - 1 for t in first)  # every choice continues the prompt
    assert not arc.attend[0, first[1], first[0]]  # the second choice cannot see the first
    with pytest.raises(TasaError, match="fewer than"):
        build_objective("arc_easy", tokenizer, min_tokens=10**6)


def test_choice_item_losses_hand_example():
    from tasa.profile.objectives import Objective

    # one item, prompt of 1 token, choices of 1, 2 and 1 tokens (NLL 1, 1+1, 3), gold = choice 2
    mask = torch.tensor([[False, True, True, True, True]])
    obj = Objective("mc", "choice", torch.zeros(1, 5, dtype=torch.long), mask, torch.zeros(1, 5, dtype=torch.long),
                    token_choice=torch.tensor([[0, 0, 1, 1, 2]]), gold=torch.tensor([2]))
    losses = item_losses(obj, torch.tensor([[9.0, 1.0, 1.0, 1.0, 3.0]]))  # the unscored 9 is ignored
    lls = torch.tensor([-1.0, -2.0, -3.0], dtype=torch.float64)
    assert losses.nll[0].item() == pytest.approx(-(lls[2] - torch.logsumexp(lls, 0)).item())


def test_walker_inputs_equal_hidden_states(tokenizer):
    model = tiny_llama(layers=3)
    arch = resolve(model)
    ids = torch.randint(0, 250, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        hs = model(input_ids=ids, output_hidden_states=True).hidden_states
        inputs = capture(model, arch, [{"input_ids": ids}])
        assert torch.equal(inputs.hidden[0], hs[0])
        for layer in (1, 2):
            run_layer(arch.layers[layer - 1], inputs, advance=True)
            assert inputs.index == layer and torch.allclose(inputs.hidden[0], hs[layer], atol=1e-5)


@pytest.mark.parametrize("granularity", ["layer", "module"])
def test_probe_equals_full_forward_with_only_that_unit_quantized(data_dir, tokenizer, granularity):
    model = tiny_llama(layers=3)
    arch = resolve(model)
    objs = [build_objective("wikitext2", tokenizer, min_tokens=60, seqlen=32),
            build_objective("arc_easy", tokenizer, min_tokens=20)]
    res = run_probes(model, arch, objs, ProfileSpec(bits=(2, 4), group_size=16, granularity=granularity, batch_tokens=70), progress=False)
    for o in objs:
        assert torch.allclose(res.base[o.name].nll, direct_item_losses(model, o), atol=1e-4)
    checked = res.units if granularity == "layer" else res.units[::4]
    assert {u.layer for u in checked} == {0, 1, 2}  # every layer's probe is checked
    for unit in checked:
        q = _rtn_copy(model, unit.modules)
        for o in objs:
            assert torch.allclose(res.probes[(unit.name, 2)][o.name].nll, direct_item_losses(q, o), atol=1e-4)
    # weights are restored after every probe
    fresh = tiny_llama(layers=3)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), fresh.state_dict().values()))


@pytest.mark.parametrize("granularity", ["layer", "module"])
def test_gptq_probe_equals_gptq_of_only_that_unit_then_a_full_forward(data_dir, tokenizer, granularity):
    from tasa.config import QuantSpec
    from tasa.plan import Plan
    from tasa.quant.apply import quantize_model

    model = tiny_llama(layers=3)
    arch = resolve(model)
    objs = [build_objective("wikitext2", tokenizer, min_tokens=60, seqlen=32)]
    calib = torch.randint(0, 250, (6, 24), generator=torch.Generator().manual_seed(1))
    res = run_probes(model, arch, objs, ProfileSpec(bits=(2,), group_size=16, granularity=granularity, batch_tokens=70), progress=False, calib_ids=calib, calib_batch=4)
    rtn = run_probes(model, arch, objs, ProfileSpec(bits=(2,), group_size=16, granularity=granularity, batch_tokens=70), progress=False)
    gap = 0.0
    checked = res.units if granularity == "layer" else res.units[::3]
    assert {u.layer for u in checked} == {0, 1, 2}  # every layer: the calibration states advance correctly
    for unit in checked:
        q = copy.deepcopy(model)  # GPTQ of the unit alone (Hessians of the full-precision model), then a plain forward
        plan = Plan.uniform(list(unit.modules), QuantSpec(bits=2, group_size=16, damp=0.01), method="gptq")
        quantize_model(q, resolve(q), plan, calib, batch_size=4, true_sequential=False, progress=False)
        got = res.probes[(unit.name, 2)]["wikitext2"].nll
        assert torch.allclose(got, direct_item_losses(q, objs[0]), atol=1e-4)
        gap = max(gap, float((got - rtn.probes[(unit.name, 2)]["wikitext2"].nll).abs().max()))
    assert gap > 1e-3  # not RTN's damage
    fresh = tiny_llama(layers=3)  # weights restored
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), fresh.state_dict().values()))


def test_killed_run_resumes_to_the_same_result(data_dir, tokenizer, tmp_path, monkeypatch):
    model = tiny_llama(layers=3)
    arch = resolve(model)
    objs = [build_objective("wikitext2", tokenizer, min_tokens=60, seqlen=32)]
    settings = {"bits": [2, 4], "objectives": ["wikitext2"]}
    full = run_probes(model, arch, objs, ProfileSpec(bits=(2, 4), group_size=16), progress=False)

    real = probe_mod.quant_swapped
    calls = {"n": 0}

    def failing(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt  # killed during the 4th probe
        return real(*args, **kwargs)

    monkeypatch.setattr(probe_mod, "quant_swapped", failing)
    with pytest.raises(KeyboardInterrupt):
        run_probes(model, arch, objs, ProfileSpec(bits=(2, 4), group_size=16), store=ProbeStore(tmp_path, settings), progress=False)
    assert len(list((tmp_path / "probes").glob("*.json"))) == 3  # 3 probes, and the base apart
    assert (tmp_path / "probe_base.json").is_file()
    monkeypatch.setattr(probe_mod, "quant_swapped", real)
    layers_run = []  # the layers the kept inputs are carried through by the walk
    real_forward = probe_mod.forward_layer

    def forward(module, h, kwargs, layer):
        layers_run.append(layer)
        return real_forward(module, h, kwargs, layer)

    monkeypatch.setattr(probe_mod, "forward_layer", forward)
    spec = ProfileSpec(bits=(2, 4), group_size=16)
    resumed = run_probes(model, arch, objs, spec, store=ProbeStore(tmp_path, settings), progress=False)
    assert resumed.probes.keys() == full.probes.keys()
    stored = [json.loads(f.read_text())["seconds"] for f in (tmp_path / "probes").glob("*.json")]
    assert len(stored) == 6 and resumed.probe_seconds == pytest.approx(sum(stored))  # resumed probes counted
    assert sorted(set(layers_run)) == [0, 1]  # layer 2's probes needed layer 1's outputs
    # only layer 0's probes missing: the walk stops at layer 0 (its inputs carried through no layer)
    store = ProbeStore(tmp_path, settings)
    for u in (u for u in full.units if u.layer == 0):
        for b in (2, 4):
            store._path(f"{u.name}@{b}").unlink()
    layers_run.clear()
    first = run_probes(model, arch, objs, spec, store=store, progress=False)
    assert layers_run == []
    # everything stored: the results come back without a pass of the model
    monkeypatch.setattr(probe_mod, "capture", lambda *a, **k: pytest.fail("the model ran"))
    again = run_probes(model, arch, objs, spec, store=store, progress=False)
    assert again.units == full.units and again.placement is None  # nothing ran anywhere
    assert again.probe_seconds == pytest.approx(sum(json.loads(f.read_text())["seconds"]
                                                    for f in (tmp_path / "probes").glob("*.json")))
    for res in (resumed, first, again):
        assert torch.equal(res.base["wikitext2"].nll, full.base["wikitext2"].nll)
        for k in full.probes:
            assert torch.equal(res.probes[k]["wikitext2"].nll, full.probes[k]["wikitext2"].nll)
            assert torch.equal(res.probes[k]["wikitext2"].kl, full.probes[k]["wikitext2"].kl)
    with pytest.raises(TasaError, match="other settings"):
        ProbeStore(tmp_path, {"bits": [3], "objectives": ["wikitext2"]})


def test_estimators_match_their_definitions_on_a_tiny_model(data_dir, tokenizer):
    from tasa.profile.estimators import estimate
    from tasa.profile.probe import units

    model = tiny_llama(layers=2)
    arch = resolve(model)
    obj = build_objective("wikitext2", tokenizer, min_tokens=60, seqlen=32)
    us = units(arch, "layer")
    # reference: one full-batch backward of the mean per-token NLL
    names = [m.name for m in arch.modules]

    def grads(m):
        m.zero_grad()
        with torch.enable_grad():
            logits = m(input_ids=obj.input_ids).logits
            logp = F.log_softmax(logits[:, :-1].float(), -1)
            nll = -logp.gather(-1, obj.input_ids[:, 1:, None]).squeeze(-1) * obj.score_mask[:, 1:]
            (nll.sum() / obj.score_mask.sum()).backward()
        return {n: m.get_submodule(n).weight.grad.clone() for n in names}

    g = grads(model)
    est, _ = estimate(model, arch, [obj], us, (2,), "fisher", group_size=16, batch_tokens=10**4)
    for u, value in zip(us, est["wikitext2"]["2"]):
        want = sum(0.5 * float((g[n] ** 2 * (model.get_submodule(n).weight.detach() - rtn_quantize(
            model.get_submodule(n).weight.detach(), 2, 16, True).weight) ** 2).sum()) for n in u.modules)
        assert value == pytest.approx(want, rel=1e-4)
    q = copy.deepcopy(model)
    with torch.no_grad():
        for n in names:
            q.get_submodule(n).weight.copy_(rtn_quantize(q.get_submodule(n).weight, 2, 16, True).weight)
    gq = grads(q)
    est, _ = estimate(model, arch, [obj], us, (2,), "autoscheme", group_size=16, batch_tokens=40)
    for u, value in zip(us, est["wikitext2"]["2"]):
        want = sum(float((gq[n] * (model.get_submodule(n).weight - q.get_submodule(n).weight)).abs().sum().detach())
                   for n in u.modules)
        assert value == pytest.approx(want, rel=1e-4)
    assert all(p.grad is None for p in model.parameters())
    fresh = tiny_llama(layers=2)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), fresh.state_dict().values()))


def test_a_layer_subset_gives_the_same_probes(data_dir, tokenizer):
    model = tiny_llama(layers=3)
    arch = resolve(model)
    objs = [build_objective("wikitext2", tokenizer, min_tokens=60, seqlen=32)]
    full = run_probes(model, arch, objs, ProfileSpec(bits=(2,), group_size=16, granularity="module"), progress=False)
    part = run_probes(model, arch, objs, ProfileSpec(bits=(2,), group_size=16, granularity="module", layers=[1]), progress=False)
    assert {u.layer for u in part.units} == {1} and len(part.probes) == 7
    for key, losses in part.probes.items():
        assert torch.allclose(losses["wikitext2"].nll, full.probes[key]["wikitext2"].nll, atol=1e-6)
    with pytest.raises(TasaError, match="out of range"):
        run_probes(model, arch, objs, ProfileSpec(bits=(2,), group_size=16, layers=[3]), progress=False)


def test_a_small_logits_budget_shrinks_batches_without_changing_results(data_dir, tokenizer):
    model = tiny_llama(layers=2)
    arch = resolve(model)
    objs = [build_objective("wikitext2", tokenizer, min_tokens=60, seqlen=32)]
    big = run_probes(model, arch, objs, ProfileSpec(bits=(2,), group_size=16, batch_tokens=256), progress=False)
    tiny = run_probes(model, arch, objs, ProfileSpec(bits=(2,), group_size=16, batch_tokens=256), max_logits_gb=1e-9, progress=False)
    for key in big.probes:
        assert torch.allclose(big.probes[key]["wikitext2"].nll, tiny.probes[key]["wikitext2"].nll, atol=1e-5)


def test_head_nll_equals_log_softmax():
    from tasa.profile.scores import head_nll

    model = tiny_llama(layers=1)
    hidden = torch.randn(7, 64)
    targets = torch.randint(0, 260, (7,))
    with torch.no_grad():
        logp = F.log_softmax(model.lm_head(hidden), -1)
        got = head_nll(model, hidden, targets, chunk=3)  # 7 positions = 3 + 3 + 1: a ragged last chunk
    assert torch.allclose(got, -logp[torch.arange(7), targets], atol=1e-5)


def _direct_token_kl(fp, q, o):
    """Per-item summed KL(fp || q) over fp's top KL_TOPK tokens and one tail bucket, from plain forwards."""
    from tasa.eval.metrics import topk_kl
    from tasa.profile.objectives import KL_TOPK

    out = []
    for r in range(o.n_items):
        pos = o.score_mask[r].nonzero().flatten()
        ids = o.input_ids[r: r + 1, : int(pos[-1]) + 1]
        with torch.no_grad():
            lp, lq = (F.log_softmax(m(input_ids=ids).logits[0].float(), -1)[pos - 1] for m in (fp, q))
        top = lp.topk(KL_TOPK, dim=-1)
        out.append(float(topk_kl(top.values, top.indices, lq).double().sum()))
    return torch.tensor(out, dtype=torch.float64)


def test_token_kl_probes_equal_plain_forwards(data_dir, tokenizer):
    """Text objectives score a probe by the KL of its next-token distributions from full precision (over the
    reference's top 256 tokens and a tail bucket): equal to plain forwards of both models, per item; the
    sensitivity cost is the mean per-token KL; --token-cost nll keeps the NLL increase."""
    from tasa.profile.sensitivity import sensitivities

    model = tiny_llama(layers=3)
    arch = resolve(model)
    objs = [build_objective("wikitext2", tokenizer, min_tokens=60, seqlen=32),
            build_objective("gsm8k", tokenizer, min_tokens=40)]
    assert all(o.token_kl for o in objs)
    res = run_probes(model, arch, objs, ProfileSpec(bits=(2,), group_size=16, batch_tokens=64), progress=False)
    assert all(res.base[o.name].kl is None for o in objs)
    unit = res.units[1]
    q = _rtn_copy(model, unit.modules)
    for o in objs:
        got = res.probes[(unit.name, 2)][o.name].kl
        want = _direct_token_kl(model, q, o)
        assert (got >= 0).all() and float(got.sum()) > 0
        assert torch.allclose(got, want, rtol=1e-3, atol=1e-5)
    arc = [build_objective("arc_easy", tokenizer, min_tokens=20)]  # choice objectives keep the token KL too
    res_arc = run_probes(model, arch, arc, ProfileSpec(bits=(2,), group_size=16), progress=False)
    kl_arc = res_arc.probes[(unit.name, 2)]["arc_easy"].kl
    assert kl_arc.shape == (arc[0].n_items,) and (kl_arc >= 0).all() and float(kl_arc.sum()) > 0
    arc_tok = [dataclasses.replace(arc[0], choice_cost="token-kl")]
    assert arc_tok[0].token_kl and not arc[0].token_kl
    got = sensitivities(res_arc, arc_tok, (2,))[0]["arc_easy"]["2"]["cost"]
    scored = float(arc[0].score_mask.sum())
    assert got == pytest.approx([float(res_arc.probes[(u.name, 2)]["arc_easy"].kl.sum()) / scored
                                 for u in res_arc.units])
    costs, stability, _ = sensitivities(res, objs, (2,))
    kls = [res.probes[(u.name, 2)]["gsm8k"].kl for u in res.units]
    tokens = float(res.base["gsm8k"].tokens.sum())
    assert costs["gsm8k"]["2"]["cost"] == pytest.approx([float(k.sum()) / tokens for k in kls])
    nll_objs = [build_objective("gsm8k", tokenizer, min_tokens=40, token_cost="nll")]
    assert not nll_objs[0].token_kl
    res_nll = run_probes(model, arch, nll_objs, ProfileSpec(bits=(2,), group_size=16, batch_tokens=64),
                         progress=False)
    assert res_nll.probes[(unit.name, 2)]["gsm8k"].kl is not None  # measured alike: only the cost differs
    nll_cost = sensitivities(res_nll, nll_objs, (2,))[0]["gsm8k"]["2"]["cost"]
    want = [float((res_nll.probes[(u.name, 2)]["gsm8k"].nll - res_nll.base["gsm8k"].nll).sum()) / tokens
            for u in res.units]
    assert nll_cost == pytest.approx(want)
    with pytest.raises(TasaError, match="token cost"):
        build_objective("gsm8k", tokenizer, min_tokens=40, token_cost="gold")


def test_soft_capped_logits_use_the_models_own_head(data_dir, tokenizer):
    """A model whose logits are not the plain output-embedding map (Gemma-2 soft-capping) is detected and
    scored through its own head, and the probes still equal full forwards."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    from tasa.profile.probe import head_is_plain, objective_batches

    torch.manual_seed(0)
    cfg = Gemma2Config(vocab_size=260, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=2, num_key_value_heads=1, head_dim=16, final_logit_softcapping=0.5,
                       max_position_embeddings=256)
    model = Gemma2ForCausalLM(cfg).eval()
    arch = resolve(model)
    objs = [build_objective("wikitext2", tokenizer, min_tokens=40, seqlen=32)]
    assert not head_is_plain(model, objective_batches(model, objs, 256)["wikitext2"][0])
    res = run_probes(model, arch, objs, ProfileSpec(bits=(2,), group_size=16), progress=False)
    assert torch.allclose(res.base["wikitext2"].nll, direct_item_losses(model, objs[0]), atol=1e-4)
    q = _rtn_copy(model, res.units[1].modules)
    assert torch.allclose(res.probes[(res.units[1].name, 2)]["wikitext2"].nll, direct_item_losses(q, objs[0]),
                          atol=1e-4)
    assert head_is_plain(tiny_llama(layers=1), objective_batches(tiny_llama(layers=1), objs, 256)["wikitext2"][0])


def test_row_slices_respect_the_token_budget(data_dir, tokenizer):
    o = build_objective("gsm8k", tokenizer, min_tokens=400)
    lengths = [int(m.nonzero().max()) + 1 for m in o.score_mask]
    for budget in (1, 300, 700, 10**6):
        slices = o.row_slices(budget)
        assert [i for s in slices for i in range(s.start, s.stop)] == list(range(o.n_items))  # all rows, in order
        for s in slices:
            assert s.stop - s.start == 1 or (s.stop - s.start) * max(lengths[s]) <= budget
    assert len(o.row_slices(10**6)) == 1 and len(o.row_slices(1)) == o.n_items
    assert all(s.stop - s.start == 1 for s in o.row_slices(10**6, max_scored=1))
    with pytest.raises(TasaError, match="positive"):
        o.row_slices(0)


def test_choice_kl_hand_example_and_sensitivity(data_dir, tokenizer, tmp_path, monkeypatch):
    from tasa.profile.objectives import choice_kl
    from tasa.profile.sensitivity import sensitivities

    base = torch.log(torch.tensor([[0.5, 0.5, 0.0], [0.25, 0.75, 0.0]], dtype=torch.float64))
    probe = torch.log(torch.tensor([[0.25, 0.75, 0.0], [0.25, 0.75, 0.0]], dtype=torch.float64))
    want = 0.5 * torch.log(torch.tensor(0.5 / 0.25)) + 0.5 * torch.log(torch.tensor(0.5 / 0.75))
    assert torch.allclose(choice_kl(base, probe), torch.tensor([want.item(), 0.0], dtype=torch.float64))

    model = tiny_llama(layers=2)
    arch = resolve(model)
    kl_obj = build_objective("arc_easy", tokenizer, min_tokens=20)
    gold_obj = build_objective("arc_easy", tokenizer, min_tokens=20, choice_cost="gold")
    assert kl_obj.choice_cost == "kl" and kl_obj.subset(slice(0, 2)).choice_cost == "kl"
    store = ProbeStore(tmp_path, {"objectives": ["arc_easy"]})
    run_probes(model, arch, [kl_obj], ProfileSpec(bits=(2,), group_size=16), store=store, progress=False)
    res = run_probes(model, arch, [kl_obj], ProfileSpec(bits=(2,), group_size=16), store=store, progress=False)  # read back
    kl_costs = sensitivities(res, [kl_obj], (2,))[0]["arc_easy"]["2"]["cost"]
    gold_costs = sensitivities(res, [gold_obj], (2,))[0]["arc_easy"]["2"]["cost"]
    for j, unit in enumerate(res.units):
        p = res.probes[(unit.name, 2)]["arc_easy"]
        assert kl_costs[j] == pytest.approx(float(choice_kl(res.base["arc_easy"].choice_logp, p.choice_logp).mean()))
        assert kl_costs[j] >= 0
        assert gold_costs[j] == pytest.approx(float((p.nll - res.base["arc_easy"].nll).mean()))
    with pytest.raises(TasaError, match="choice cost"):
        build_objective("arc_easy", tokenizer, min_tokens=20, choice_cost="margin")
    # auto: token-kl on fewer than AUTO_CHOICE_ITEMS items (a cheap profile), kl from there on
    import tasa.profile.objectives as objectives

    few = build_objective("arc_easy", tokenizer, min_tokens=200, choice_cost="auto")
    assert 2 <= few.n_items < objectives.AUTO_CHOICE_ITEMS and few.choice_cost == "token-kl" and few.token_kl
    monkeypatch.setattr(objectives, "AUTO_CHOICE_ITEMS", few.n_items)  # as many items as the threshold: kl
    assert build_objective("arc_easy", tokenizer, min_tokens=200, choice_cost="auto").choice_cost == "kl"
    assert build_objective("arc_easy", tokenizer, min_tokens=20, choice_cost="auto").choice_cost == "token-kl"


def test_kept_states_spill_to_disk_past_the_ram_budget(data_dir, tokenizer, tmp_path, monkeypatch):
    model = tiny_llama(layers=3)
    arch = resolve(model)
    objs = [build_objective("wikitext2", tokenizer, min_tokens=60, seqlen=32),
            build_objective("arc_easy", tokenizer, min_tokens=20)]
    batches = probe_mod.objective_batches(model, objs, 70)
    assert probe_mod.state_bytes(model, batches) == sum(b.inputs["input_ids"].numel() for bs in batches.values()
                                                        for b in bs) * 64 * 4
    in_memory = run_probes(model, arch, objs, ProfileSpec(bits=(2,), group_size=16, batch_tokens=70), progress=False)
    seen = []
    real_put = walker_mod.KeptStates.put

    def put(self, key, t):
        seen.append(self.dir)
        real_put(self, key, t)
        assert self.dir is None or self._path(key).is_file()

    monkeypatch.setattr(walker_mod.KeptStates, "put", put)
    store = ProbeStore(tmp_path, {"x": 1})
    spilled = run_probes(model, arch, objs, ProfileSpec(bits=(2,), group_size=16, batch_tokens=70, max_state_gb=0.0), store=store, progress=False)
    assert seen and all(d == tmp_path / "kept-states" for d in seen)
    assert not (tmp_path / "kept-states").exists()  # removed when done
    for k in in_memory.probes:
        for o in objs:
            assert torch.equal(spilled.probes[k][o.name].nll, in_memory.probes[k][o.name].nll)
