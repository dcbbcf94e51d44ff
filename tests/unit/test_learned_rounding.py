"""Learned rounding (issue 38, 1c; tasa.quant.learned): it starts exactly at RTN on the (searched) grid, lowers
the layer's reconstruction error on its own calibration, never raises it, keeps every code on the grid, and its
checkpoints are the ordinary packed formats."""
import json
import os
import shutil

import pytest
import torch

from tasa.config import QuantizeSpec, QuantSpec
from tasa.errors import TasaError
from tasa.models.arch import resolve
from tasa.models.walker import capture_ids, forward_layer
from tasa.plan import Plan
from tasa.quant.apply import quantize_model
from tasa.quant.learned import LearnedGrid, learn_layer, output_kl, token_normalized_mse
from tasa.quant.rtn import fp16_scale, rtn_quantize_spec
from tests.conftest import tiny_llama
from tests.unit.test_bad_inputs import expect_error, quantize_args, run_cli

SPECS = [QuantSpec(bits=3, group_size=16), QuantSpec(bits=4, group_size=16, sym=False),
         QuantSpec(bits=2, group_size=24, sym=False), QuantSpec(bits=3, group_size=16, super_group=64),
         QuantSpec(bits=3, group_size=16, scale_search=8), QuantSpec(bits=4, group_size=-1, sym=False, scale_search=8)]


@pytest.mark.parametrize("spec", SPECS, ids=str)
def test_the_start_is_rtn_on_the_searched_grid(spec):
    w = torch.randn(24, 64, generator=torch.Generator().manual_seed(3))
    weights = torch.rand(64, generator=torch.Generator().manual_seed(4)) + 0.1
    got = LearnedGrid(w, spec, weights).result()
    want = rtn_quantize_spec(w, spec, weights)
    assert torch.equal(got.codes, want.codes) and torch.equal(got.zeros, want.zeros)
    assert torch.allclose(got.scales, want.scales, rtol=2e-3)  # the same fp16 value, or its neighbour
    assert torch.equal(got.weight, got.dequantize())


@pytest.mark.parametrize("spec", SPECS, ids=str)
def test_contiguous_groups_compute_what_the_per_column_gather_does(spec):
    """Contiguous groups of equal width are computed on a (rows, groups, width) view, other layouts by gathering
    each column's group: the same weight and codes bit for bit (a two-level grid's empty group included), the
    same gradients, and an act-order group index keeps the gather."""
    gen = torch.Generator().manual_seed(5)
    cols = 192  # a multiple of every spec's group and super-group
    w = torch.randn(24, cols, generator=gen)
    w[3, :16] = 0  # an all-zero group: a zero scale in the two-level grid
    outs = []
    for contiguous in (True, False):
        grid = LearnedGrid(w, spec, torch.rand(cols, generator=torch.Generator().manual_seed(4)) + 0.1)
        assert grid.width is not None and (not spec.super_group or bool((grid.scales == 0).any()))
        if not contiguous:
            grid.width = None
        torch.manual_seed(6)
        grid.offsets.uniform_(-0.5, 0.5)
        for c in grid.clip:
            c.uniform_(0.5, 1.0)
        params = [p.requires_grad_(True) for p in grid.parameters()]
        q = grid.weight()
        grads = torch.autograd.grad((q * torch.linspace(-1, 1, q.numel()).view_as(q)).sum(), params,
                                    allow_unused=True)
        for p in params:
            p.requires_grad_(False)
        outs.append((q.detach(), grid.result(), grads))
    (q1, r1, g1), (q2, r2, g2) = outs
    assert torch.equal(q1, q2) and torch.equal(r1.codes, r2.codes) and torch.equal(r1.weight, r2.weight)
    assert torch.equal(g1[0], g2[0])  # the offsets' gradient: elementwise, bit for bit
    for a, b in zip(g1[1:], g2[1:]):  # the clipping's: the same sums over each group, in another order
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-4) and a.abs().sum() > 0
    if spec.group_size != -1:
        permuted = rtn_quantize_spec(w, spec)
        permuted.g_idx = permuted.g_idx[torch.randperm(cols, generator=gen)]
        permuted.rounded = w
        assert LearnedGrid(w, spec, start=permuted).width is None


def test_the_loss_weighs_every_tokens_relative_error_alike():
    target = torch.tensor([[[3.0, 4.0], [300.0, 400.0]]])  # a token 100 times the other's norm
    small, large = target.clone(), target.clone()
    small[0, 0, 0] += 0.5  # relative error 0.1 on the small token
    large[0, 1, 0] += 50.0  # ... and on the large one
    assert token_normalized_mse(small, target).item() == pytest.approx(0.01 / 2)
    assert token_normalized_mse(large, target).item() == pytest.approx(0.01 / 2)
    assert torch.nn.functional.mse_loss(large, target) > 9999 * torch.nn.functional.mse_loss(small, target)


def _layer_case(layers=2, n=8, t=24):
    model = tiny_llama(layers=layers)
    arch = resolve(model)
    ids = torch.randint(0, 256, (n, t), generator=torch.Generator().manual_seed(0))
    inputs = capture_ids(model, arch, ids, 4, torch.device("cpu"))
    layer = arch.layers[0]
    with torch.no_grad():
        targets = [forward_layer(layer, *inputs.call(b), 0) for b in range(len(inputs))]
    locals_ = [m.local for m in arch.layer_modules(0)]
    return model, arch, layer, inputs, targets, locals_


def _loss(layer, inputs, targets, weights):
    with torch.no_grad():
        outs = [torch.func.functional_call(layer, weights, (h,), kw) for h, kw in
                (inputs.call(b) for b in range(len(inputs)))]
    outs = [o[0] if isinstance(o, tuple) else o for o in outs]
    return sum(float(token_normalized_mse(o, t)) for o, t in zip(outs, targets)) / len(outs)


@pytest.mark.parametrize("spec", [QuantSpec(bits=2, group_size=16), QuantSpec(bits=3, group_size=16, sym=False),
                                  QuantSpec(bits=2, group_size=16, super_group=64)], ids=str)
def test_learning_lowers_the_layers_error_on_its_calibration_and_stays_on_the_grid(spec):
    model, arch, layer, inputs, targets, locals_ = _layer_case()
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    specs = {local: spec for local in locals_}
    results, learning = learn_layer(layer, specs, inputs, targets, iters=40, seed=0)
    assert all(torch.equal(v, before[k]) for k, v in layer.state_dict().items())  # the layer is not changed
    rtn = {f"{local}.weight": rtn_quantize_spec(layer.get_submodule(local).weight, spec).weight for local in locals_}
    learned = {f"{local}.weight": results[local].weight for local in locals_}
    assert learning.kept and learning.loss_learned < 0.9 * learning.loss_start
    assert learning.loss_start == pytest.approx(_loss(layer, inputs, targets, rtn), rel=1e-5)
    assert learning.loss_learned == pytest.approx(_loss(layer, inputs, targets, learned), rel=1e-5)
    for local, r in results.items():
        assert r.codes.dtype == torch.uint8 and int(r.codes.max()) <= 2**spec.bits - 1
        assert torch.equal(r.weight, r.dequantize())
        if spec.super_group:  # the two-level grid's scales are RTN's, integers times the super-scales
            assert torch.equal(r.scales, rtn_quantize_spec(layer.get_submodule(local).weight, spec).scales)
        else:
            assert torch.equal(r.scales, fp16_scale(r.scales))
        if spec.sym:
            assert torch.all(r.zeros == 2 ** (spec.bits - 1))
        else:
            assert torch.all((r.zeros >= 0) & (r.zeros <= 2**spec.bits - 1) & (r.zeros == r.zeros.round()))


def test_bfloat16_steps_learn_too_and_are_chosen_only_for_float32_layers():
    from tasa.quant.learned import step_dtype

    _, _, layer, inputs, targets, locals_ = _layer_case()
    _, learning = learn_layer(layer, {local: QuantSpec(bits=2, group_size=16) for local in locals_}, inputs, targets,
                              iters=40, autocast=torch.bfloat16)
    assert learning.kept and learning.loss_learned < 0.9 * learning.loss_start and learning.step_dtype == "bfloat16"
    assert step_dtype(torch.device("cpu"), torch.bfloat16) is None and step_dtype(torch.device("cpu"),
                                                                                   torch.float16) is None
    assert step_dtype(torch.device("cpu"), torch.float32, torch.float32) is None  # asked for: the layer's own
    assert step_dtype(torch.device("cpu"), torch.float32, torch.bfloat16) == torch.bfloat16


@pytest.mark.parametrize("native", [True, False, None])
def test_a_float32_layer_learns_in_bfloat16_exactly_where_the_cpu_computes_it_natively(monkeypatch, request, native):
    """What oneDNN reports decides: bfloat16 steps on a CPU with native bfloat16, the layer's own float32 on one
    without it and on a torch build without oneDNN (None: the query raises)."""
    from tasa.numerics import _cpu_bfloat16, native_bfloat16
    from tasa.quant.learned import step_dtype

    def query():
        if native is None:
            raise RuntimeError("no oneDNN in this build")
        return native

    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", query)
    _cpu_bfloat16.cache_clear()  # (asked once a process)
    request.addfinalizer(_cpu_bfloat16.cache_clear)
    assert native_bfloat16("cpu") is bool(native)
    assert step_dtype(torch.device("cpu"), torch.float32) == (torch.bfloat16 if native else None)


def test_learning_that_cannot_help_keeps_the_start():
    """Targets that RTN's own weights produce: the start's loss is 0, so nothing learned is kept."""
    _, _, layer, inputs, _, locals_ = _layer_case()
    spec = QuantSpec(bits=3, group_size=16)
    rtn = {f"{local}.weight": rtn_quantize_spec(layer.get_submodule(local).weight, spec).weight for local in locals_}
    with torch.no_grad():
        targets = [torch.func.functional_call(layer, rtn, (h,), kw) for h, kw in
                   (inputs.call(b) for b in range(len(inputs)))]
    targets = [t[0] if isinstance(t, tuple) else t for t in targets]
    results, learning = learn_layer(layer, {local: spec for local in locals_}, inputs, targets, iters=5)
    assert not learning.kept and learning.loss == learning.loss_start == 0
    assert all(torch.equal(results[local].weight, rtn[f"{local}.weight"]) for local in locals_)


@pytest.mark.parametrize("helps", [True, False], ids=["kept", "start kept"])
def test_advancing_leaves_the_outputs_of_the_kept_weights_as_the_next_layers_inputs(helps):
    """learn_layer(advance=True) takes the next layer's inputs from its keep decision's pass: bit for bit what a
    pass of the layer holding the kept weights gives (tasa.models.walker.run_layer), whether the learned weights
    or the start are kept; the inputs' layer index moves on."""
    from tasa.models.walker import LayerInputs, run_layer

    _, _, layer, inputs, targets, locals_ = _layer_case()
    spec = QuantSpec(bits=2, group_size=16)
    if not helps:  # targets RTN's own weights produce: the start is kept
        rtn = {f"{local}.weight": rtn_quantize_spec(layer.get_submodule(local).weight, spec).weight
               for local in locals_}
        with torch.no_grad():
            targets = [torch.func.functional_call(layer, rtn, (h,), kw) for h, kw in
                       (inputs.call(b) for b in range(len(inputs)))]
        targets = [t[0] if isinstance(t, tuple) else t for t in targets]
    ahead = LayerInputs(list(inputs.hidden), inputs.kwargs)
    ahead.index = inputs.index
    results, learning = learn_layer(layer, {local: spec for local in locals_}, ahead, targets, iters=20, seed=0,
                                    advance=True)
    assert learning.kept == helps and ahead.index == inputs.index + 1
    for local, r in results.items():
        layer.get_submodule(local).weight.data.copy_(r.weight)
    with torch.no_grad():
        run_layer(layer, inputs, advance=True)
    assert len(ahead) == len(inputs) and all(torch.equal(a, b) for a, b in zip(ahead.hidden, inputs.hidden))


def test_refining_gptq_runs_each_layer_once_after_learning():
    """learn_start gptq with the float stream: per layer, one float-layer pass gathers the float inputs and
    advances that stream (the refinement's targets), and no pass of the quantized layer follows the learning's
    keep decision (its outputs are the next inputs).  Counted in calls of the layer (the float copies included:
    a deep copy keeps the hook), per layer with 2 batches: grouping 1, Hessians 4 input groups x 2 batches,
    the float gathering pass 2, learning 4 steps, the keep decision 2 weight sets x 2 batches: 19 (it was 23: the
    refinement's float pass and the quantized layer's pass after it, 2 each)."""
    model = tiny_llama()
    arch = resolve(model)
    ids = torch.randint(0, 256, (8, 24), generator=torch.Generator().manual_seed(1))
    calls = [0] * arch.num_layers
    for i, layer in enumerate(arch.layers):
        layer.register_forward_pre_hook(lambda *_, i=i: calls.__setitem__(i, calls[i] + 1))
    quantize_model(model, arch, Plan.uniform([m.name for m in arch.modules], QuantSpec(bits=2, group_size=16)),
                   ids, batch_size=4, progress=False, learn_iters=4, learn_start="gptq", float_targets=0.25)
    assert calls == [19] * arch.num_layers


def test_a_bfloat16_model_refines_gptq_and_holds_the_results_rounded():
    """`tasa quantize --dtype bfloat16` with the better quantizer: the forward passes in bfloat16, GPTQ and the
    grids in float32; each result's codes and scales dequantize to its weight rounded to bfloat16 (the layer's
    dtype), which the model holds; the steps run in the layer's own dtype, and every layer's loss is finite and
    never rises."""
    model = tiny_llama().to(torch.bfloat16)
    arch = resolve(model)
    ids = torch.randint(0, 256, (8, 24), generator=torch.Generator().manual_seed(1))
    got = {}
    rep = quantize_model(model, arch, Plan.uniform([m.name for m in arch.modules], QuantSpec(bits=3, group_size=16)),
                         ids, batch_size=4, progress=False, learn_iters=4, learn_start="gptq", float_targets=0.25,
                         learn_output_kl=True, on_result=lambda n, r: got.setdefault(n, r))
    assert set(got) == {m.name for m in arch.modules} and set(rep.layers) == {0, 1}
    for m in arch.modules:
        r = got[m.name]
        assert r.weight.dtype == torch.bfloat16 and torch.equal(r.weight, r.dequantize().to(torch.bfloat16))
        assert torch.equal(model.get_submodule(m.name).weight, r.weight)
    assert all(x.step_dtype is None and x.loss <= x.loss_start < float("inf") for x in rep.layers.values())
    assert rep.layers[1].objective == "output-kl"


def _quantize(plan_spec, iters, seed=0):
    model = tiny_llama()
    arch = resolve(model)
    ids = torch.randint(0, 256, (8, 24), generator=torch.Generator().manual_seed(1))
    got = {}
    rep = quantize_model(model, arch, Plan.uniform([m.name for m in arch.modules], plan_spec), ids, batch_size=4,
                         on_result=lambda n, r: got.setdefault(n, r), progress=False, learn_iters=iters, seed=seed)
    return model, arch, got, rep


def test_the_driver_learns_every_layer_deterministically():
    spec = QuantSpec(bits=2, group_size=16)
    model, arch, got, rep = _quantize(spec, 10)
    assert set(got) == {m.name for m in arch.modules} and set(rep.layers) == {0, 1}
    assert all(x.loss <= x.loss_start for x in rep.layers.values()) and any(x.kept for x in rep.layers.values())
    for m in arch.modules:  # the model holds the results
        assert torch.equal(model.get_submodule(m.name).weight, got[m.name].weight)
    model2, _, got2, _ = _quantize(spec, 10)
    assert all(torch.equal(got[n].codes, got2[n].codes) for n in got)
    _, _, got3, _ = _quantize(spec, 10, seed=5)  # another batch order: another result
    assert any(not torch.equal(got[n].codes, got3[n].codes) for n in got)


@pytest.mark.parametrize("spec", [QuantSpec(bits=3, group_size=16, act_order=True, static_groups=True),
                                  QuantSpec(bits=4, group_size=16, sym=False),
                                  QuantSpec(bits=3, group_size=16, super_group=64)], ids=str)
def test_refining_a_gptq_result_starts_exactly_at_it_and_never_raises_the_layers_error(spec):
    """Learned rounding from GPTQ's result (learn_start gptq): GPTQ keeps the values it rounded without changing
    its result; at the start the grid is GPTQ's result exactly (act-order's group index, two-level scales,
    asymmetric zeros kept); learning lowers the layer's error on its calibration against the start's, keeps the
    start's zero points, and its offsets move each code by at most one step at the learned scale."""
    from tasa.quant.gptq import gptq_quantize

    _, _, layer, inputs, targets, locals_ = _layer_case()
    starts = {}
    for local in locals_:  # GPTQ on a random positive definite Hessian: any result on the grid will do
        w = layer.get_submodule(local).weight.data
        h = torch.randn(w.shape[1], w.shape[1] * 2, generator=torch.Generator().manual_seed(7))
        plain = gptq_quantize(w, h @ h.T, spec)
        starts[local] = gptq_quantize(w, h @ h.T, spec, keep_rounded=True)
        assert plain.rounded is None and torch.equal(plain.codes, starts[local].codes)
        assert starts[local].rounded.shape == w.shape
        with pytest.raises(TasaError, match="needs the values it rounded"):
            LearnedGrid(w, spec, start=plain)
    for local, start in starts.items():
        got = LearnedGrid(layer.get_submodule(local).weight.data, spec, start=start).result()
        assert torch.equal(got.codes, start.codes) and torch.equal(got.weight, start.weight.to(got.weight.dtype))
        assert torch.equal(got.g_idx, start.g_idx) and torch.equal(got.zeros, start.zeros.float())
    results, learning = learn_layer(layer, {local: spec for local in locals_}, inputs, targets, iters=40,
                                    starts=starts)
    start_weights = {f"{local}.weight": starts[local].weight for local in locals_}
    assert learning.loss_start == pytest.approx(_loss(layer, inputs, targets, start_weights), rel=1e-5)
    assert learning.kept and learning.loss_learned < learning.loss_start
    for local, r in results.items():
        assert torch.equal(r.weight, r.dequantize()) and torch.equal(r.zeros, starts[local].zeros.float())
        assert torch.equal(r.g_idx, starts[local].g_idx)
        s, z = r.scales[:, r.g_idx.long()], r.zeros[:, r.g_idx.long()]
        nearest = torch.clamp(torch.round(starts[local].rounded / torch.where(s == 0, 1.0, s)) + z, 0, 2**spec.bits - 1)
        assert int((r.codes.float() - nearest).abs().max()) <= 1
    assert any(not torch.equal(r.codes, starts[local].codes) for local, r in results.items())


def test_the_driver_refines_gptq_layer_by_layer():
    """quantize_model(learn_start="gptq"): each layer quantized by GPTQ, then refined against the float model's
    layer outputs; every layer's kept loss is at most GPTQ's, the model and on_result hold the refined results,
    and with no steps nothing is refined (GPTQ's result)."""
    model = tiny_llama()
    arch = resolve(model)
    names = [m.name for m in arch.modules]
    ids = torch.randint(0, 256, (8, 24), generator=torch.Generator().manual_seed(1))
    plan = Plan.uniform(names, QuantSpec(bits=2, group_size=16))

    def run(iters, float_targets=0.0):
        m = tiny_llama()
        got = {}
        rep = quantize_model(m, resolve(m), plan, ids, batch_size=4, on_result=lambda n, r: got.setdefault(n, r),
                             progress=False, learn_iters=iters, learn_start="gptq", float_targets=float_targets)
        return m, got, rep

    gptq_model, gptq_got, gptq_rep = run(0)
    assert not gptq_rep.layers
    for float_targets in (0.0, 0.25):
        refined, got, rep = run(10, float_targets)
        assert set(got) == set(names) and set(rep.layers) == {0, 1}
        assert all(x.loss <= x.loss_start for x in rep.layers.values()) and any(x.kept for x in rep.layers.values())
        for n in names:
            assert torch.equal(refined.get_submodule(n).weight, got[n].weight)
        if float_targets == 0.0:  # layer 0 starts from the same GPTQ result (inputs equal in both runs)
            assert rep.layers[0].loss_start == pytest.approx(_loss(
                resolve(model).layers[0], *_first_layer_case(model, ids), {
                    f"{m.local}.weight": gptq_got[m.name].weight for m in arch.layer_modules(0)}), rel=1e-5)
    with pytest.raises(TasaError, match="starts from rtn or gptq"):
        quantize_model(tiny_llama(), arch, plan, ids, progress=False, learn_iters=2, learn_start="awq")


def _first_layer_case(model, ids):
    """(inputs, float targets) of layer 0 of ``model`` on ``ids``, batches of 4."""
    arch = resolve(model)
    inputs = capture_ids(model, arch, ids, 4, torch.device("cpu"))
    with torch.no_grad():
        targets = [forward_layer(arch.layers[0], *inputs.call(b), 0) for b in range(len(inputs))]
    return inputs, targets


def test_learned_rounding_needs_calibration_and_valid_settings():
    model = tiny_llama()
    with pytest.raises(TasaError, match="learned rounding needs calibration data"):
        quantize_model(model, resolve(model), Plan.uniform([m.name for m in resolve(model).modules], QuantSpec(),
                                                           method="rtn"), progress=False, learn_iters=3)
    with pytest.raises(TasaError, match="--learn-rounding takes 0 to 100000 steps"):
        QuantizeSpec(learn_rounding=-1)
    with pytest.raises(TasaError, match="--learn-lr must be in"):
        QuantizeSpec(learn_rounding=5, learn_lr=0)
    assert QuantizeSpec(learn_rounding=5, scale_search=16).quantizer == \
        "learned rounding (5 steps per layer) with --scale-search 16"


def test_learning_from_gptq_is_a_gptq_option_with_its_asymmetric_calibration():
    """--learn-start gptq needs learned rounding and GPTQ; GPTQ's options (asymmetric calibration by default)
    apply to its start; the record's quantizer names them; --distributed is refused (no float stream there)."""
    with pytest.raises(TasaError, match="--learn-start gptq refines GPTQ's result by learned rounding"):
        QuantizeSpec(learn_start="gptq")
    with pytest.raises(TasaError, match="--learn-start gptq refines"):
        QuantizeSpec(method="rtn", learn_rounding=4, learn_start="gptq")
    with pytest.raises(TasaError, match="--learn-start must be 'rtn' or 'gptq', got 'awq'"):
        QuantizeSpec(learn_rounding=4, learn_start="awq")
    with pytest.raises(TasaError, match="--float-targets is a GPTQ option"):
        QuantizeSpec(learn_rounding=4, float_targets=0.5)  # from RTN: learned rounding targets the float model
    spec = QuantizeSpec(learn_rounding=4, learn_start="gptq")
    assert spec.float_strength() == 0.25 and spec.float_strength(distributed=True) == 0.0
    assert QuantizeSpec(learn_rounding=4).float_strength() == 0.0
    assert spec.resolved().quantizer == ("learned rounding (4 steps per layer) from GPTQ with --act-order "
                                         "--static-groups --scale-search 16 --float-targets 0.25")
    spec.check_distributed(False)
    with pytest.raises(TasaError, match="--learn-start gptq keeps the float model's inputs .* --distributed"):
        spec.check_distributed(True)


def test_a_bad_learning_rate_is_refused_before_loading(tiny_model_dir, tmp_path, capsys, no_work):
    expect_error(quantize_args(tiny_model_dir, tmp_path / "q", "--learn-rounding", "4", "--learn-lr", "2"),
                 "--learn-lr must be in (0, 1], got 2.0", capsys)


def _cli_quantize(model_dir, out, fmt, capsys, *extra):
    code, _, err = run_cli(["quantize", "--model", str(model_dir), "--bits", "3", "--group-size", "16", "--asym",
                            "--learn-rounding", "6", "--scale-search", "4", "--format", fmt, "--calib", "wikitext2",
                            "--nsamples", "8", "--seqlen", "32", "--output-dir", str(out), "--quiet", *extra], capsys)
    assert code == 0, err
    return json.loads((out / "quantize.json").read_text())


@pytest.mark.parametrize("fmt", ["gptq", "compressed-tensors"])
def test_the_cli_writes_the_usual_checkpoint_and_records_the_learning(fmt, tiny_model_dir, tmp_path, capsys,
                                                                      data_dir):
    """The packed checkpoint reads back (tasa's readers: bit for bit GPTQModel's, test_gptqmodel_fixtures) to
    the float export of the same run, and the record says what made it."""
    from tasa.models.weights import open_weights

    rec = _cli_quantize(tiny_model_dir, tmp_path / "q", fmt, capsys)
    assert rec["quantizer"] == "learned rounding (6 steps per layer) with --scale-search 4"
    assert rec["learned_rounding"]["steps"] == 6 and set(rec["learned_rounding"]["layers"]) == {"0", "1"}
    from tasa.quant.learned import step_dtype

    auto = step_dtype(torch.device("cpu"), torch.float32)  # the default, --learn-dtype auto
    assert rec["learned_rounding"]["step_dtype"] == (None if auto is None else "bfloat16")
    assert rec["calib_counts"] == {"wikitext2": 8}
    _cli_quantize(tiny_model_dir, tmp_path / "fp", "fp", capsys)
    f32 = _cli_quantize(tiny_model_dir, tmp_path / "fp32", "fp", capsys, "--learn-dtype", "float32")
    assert f32["learned_rounding"]["step_dtype"] is None
    packed, floats = open_weights(tmp_path / "q"), open_weights(tmp_path / "fp")
    names = [m.name for m in resolve(tiny_llama()).modules]
    for name in names:
        want = floats.get(f"{name}.weight", torch.float32)
        assert torch.allclose(packed.get(f"{name}.weight", torch.float32), want, atol=1e-3 * want.abs().max()), name


@pytest.mark.parametrize("options, quantizer", [
    (["--learn-rounding", "6"], "learned rounding (6 steps per layer) with --scale-search 16"),
    (["--learn-rounding", "6", "--learn-start", "gptq"],
     "learned rounding (6 steps per layer) from GPTQ with --act-order --static-groups --scale-search 16 "
     "--float-targets 0.25"),
    ([], "gptq with --act-order --static-groups --scale-search 16 --float-targets 0.25"),  # the default
    (["--float-targets", "1", "--no-act-order"], "gptq with --static-groups --scale-search 16 --float-targets 1")])
def test_gptqmodel_loads_each_quantizers_checkpoint_with_matching_logits(tiny_model_dir, tmp_path, capsys, data_dir,
                                                                          gptqmodel_python, options, quantizer):
    """Learned rounding, the default GPTQ (act-order, static groups, scale search, asymmetric calibration) and
    another mix of options all write checkpoints GPTQModel 7.6.0 loads and computes as tasa reads them."""
    import subprocess

    from tasa.models import load
    from tests.unit.test_export_gptq import ROOT

    out = tmp_path / "q"
    code, _, err = run_cli(["quantize", "--model", str(tiny_model_dir), "--bits", "3", "--group-size", "32",
                            *options, "--format", "gptq", "--calib", "wikitext2", "--nsamples", "8",
                            "--seqlen", "32", "--output-dir", str(out), "--quiet"], capsys)
    assert code == 0, err
    assert json.loads((out / "quantize.json").read_text())["quantizer"] == quantizer
    ids = torch.randint(0, 260, (2, 12), generator=torch.Generator().manual_seed(0))
    proc = subprocess.run([str(gptqmodel_python), str(ROOT / "tests" / "peers" / "gptqmodel_logits.py"), str(out),
                           json.dumps(ids.tolist())], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert set(got["bits"].values()) == {3}
    with torch.no_grad():
        ref = load(str(out)).model(input_ids=ids).logits
    assert (torch.tensor(got["logits"]) - ref).abs().max().item() < 5e-3 * max(1.0, ref.abs().max().item())


def test_the_output_kl_is_the_mean_kl_of_the_next_token_distributions():
    g = torch.Generator().manual_seed(0)
    logits, target = torch.randn(5, 11, generator=g), torch.randn(5, 11, generator=g)
    p, q = torch.softmax(target, -1), torch.softmax(logits, -1)
    want = float((p * (p.log() - q.log())).sum(-1).mean())
    assert float(output_kl(logits, target)) == pytest.approx(want, rel=1e-6)
    assert float(output_kl(logits + torch.randn(5, 1, generator=g), target)) == pytest.approx(want, rel=1e-5)
    assert float(output_kl(target, target)) == pytest.approx(0.0, abs=1e-7) and want > 0


# torch.compile's CPU backend (inductor) builds C++: with a compiler the fused kernels must run compiled, without
# one they must fall back (and still compute the same)
_COMPILES = bool(shutil.which(os.environ.get("CXX", "g++")))


@pytest.mark.parametrize("start", ["rtn", "gptq"])
def test_a_large_linears_fused_grid_is_the_eager_grid(start):
    """From 2**16 weights a linear's grid runs compiled (tasa.quant.learned._Fused): the same weight bit for bit
    as the general computation (symmetric, and refining GPTQ's result), the same gradients up to summation
    order, whatever the bits and shapes that come one after another in one process (with the largest code a
    Python number, torch 2.13's compiled kernel gave 4-bit grids wrong weights after a 3-bit one)."""
    from tasa.quant import learned
    from tasa.quant.gptq import gptq_quantize

    gen = torch.Generator().manual_seed(11)
    for bits, rows, cols in [(3, 256, 512), (4, 256, 512), (4, 128, 1024), (3, 128, 1024), (2, 256, 512)]:
        spec = QuantSpec(bits=bits, group_size=64)
        w = torch.randn(rows, cols, generator=gen)
        x = torch.randn(cols, 2 * cols, generator=gen)
        first = gptq_quantize(w, x @ x.T, spec, keep_rounded=True) if start == "gptq" else None
        outs = []
        for fused in (True, False):
            grid = LearnedGrid(w, spec, start=first)
            assert grid.width == 64 and grid.base_nonzero
            if not fused:
                grid.__dict__["base_nonzero"] = False  # the general computation
            torch.manual_seed(12)
            grid.offsets.uniform_(-0.5, 0.5)
            grid.clip[0].uniform_(0.5, 1.5 if first is not None else 1.0)
            params = [p.requires_grad_(True) for p in grid.parameters()]
            with torch.autocast("cpu", dtype=torch.bfloat16):  # as the steps run
                q = grid.weight()
            grads = torch.autograd.grad((q * torch.linspace(-1, 1, q.numel()).view_as(q)).sum(), params)
            outs.append((q.detach(), grads))
        assert learned._fused_grid_weight.compiled is not None
        assert learned._fused_grid_weight.failed is not _COMPILES
        (q1, g1), (q2, g2) = outs
        assert torch.equal(q1, q2), (bits, rows, cols)
        torch.testing.assert_close(g1[0], g2[0], rtol=0, atol=0)  # the offsets': elementwise
        torch.testing.assert_close(g1[1], g2[1], rtol=1e-5, atol=1e-5)  # the clipping's: sums over each group
        assert g1[1].abs().sum() > 0


def test_a_heads_output_kl_runs_fused_and_equals_the_eager_one():
    """From 2**24 logits (a head's, over a vocabulary) output_kl runs compiled: the same divergence and gradient
    as the eager computation up to float32 summation order, in bfloat16 logits as in float32."""
    from tasa.quant import learned

    gen = torch.Generator().manual_seed(13)
    target = torch.randn(256, 65536, generator=gen) * 3
    for dtype in (torch.float32, torch.bfloat16):
        logits = (target * 0.8 + torch.randn(256, 65536, generator=gen)).to(dtype).requires_grad_(True)
        got = output_kl(logits, target.to(dtype))
        (g_got,) = torch.autograd.grad(got, logits)
        want = learned._output_kl(logits, target.to(dtype))
        (g_want,) = torch.autograd.grad(want, logits)
        assert learned._fused_output_kl.compiled is not None and learned._fused_output_kl.failed is not _COMPILES
        assert float(got.detach()) == pytest.approx(float(want.detach()), rel=1e-5) and float(want.detach()) > 0.1
        tol = 1e-5 if dtype == torch.float32 else 2 ** -7  # bfloat16 gradients: one step of its 8-bit mantissa
        torch.testing.assert_close(g_got.float(), g_want.float(), rtol=tol, atol=1e-9)


def test_a_compiler_failure_falls_back_to_the_eager_computation_and_says_so_once(monkeypatch, caplog):
    from tasa.quant import learned

    calls = []

    def broken(fn):
        def run(*args):
            calls.append(args)
            raise RuntimeError("InductorError: CppCompileError: no C++ compiler\nand a long log")
        return run

    monkeypatch.setattr(learned.torch, "compile", broken)
    fused = learned._Fused(learned._output_kl, 10)
    logits, target = torch.randn(4, 8), torch.randn(4, 8)
    small = learned._Fused(learned._output_kl, 100)
    assert float(small(logits, target)) == float(learned._output_kl(logits, target)) and small.compiled is None
    with caplog.at_level("WARNING", logger="tasa.quant.learned"):
        assert float(fused(logits, target)) == float(learned._output_kl(logits, target))
        assert float(fused(logits, target)) == float(learned._output_kl(logits, target))
    assert fused.failed and len(calls) == 1
    assert [r.getMessage() for r in caplog.records] == [
        "output_kl runs unfused (torch.compile failed: InductorError: CppCompileError: no C++ compiler)"]


def _output_kl_of(model, ids, weights, batch=4):
    """The model's output KL on ``ids`` with ``weights`` (name -> tensor) in place of its own, against itself,
    averaged over batches of ``batch`` sequences."""
    import copy

    quantized = copy.deepcopy(model)
    with torch.no_grad():
        for name, w in weights.items():
            quantized.get_submodule(name).weight.copy_(w)
        kls = [output_kl(quantized(input_ids=ids[s:s + batch]).logits.flatten(0, 1),
                         model(input_ids=ids[s:s + batch]).logits.flatten(0, 1)) for s in range(0, len(ids), batch)]
    return sum(float(k) for k in kls) / len(kls)


@pytest.mark.parametrize("head_tokens", [1024, 48])  # every sequence of a batch in a step; two, in chunks of two
def test_the_last_layer_learns_the_models_output_distribution(head_tokens):
    """With the model's head, learned rounding of the last decoder layer measures and lowers the KL divergence of
    the model's next-token distribution: its losses are exactly the quantized model's output KL to the float
    model on the calibration (chunked or not), and learning lowers it, on the grid."""
    from tasa.quant.apply import output_head

    model = tiny_llama(layers=1)
    arch = resolve(model)
    ids = torch.randint(0, 256, (8, 24), generator=torch.Generator().manual_seed(0))
    inputs = capture_ids(model, arch, ids, 4, torch.device("cpu"))
    layer = arch.layers[0]
    with torch.no_grad():
        targets = [forward_layer(layer, *inputs.call(b), 0) for b in range(len(inputs))]
    spec = QuantSpec(bits=2, group_size=16)
    locals_ = [m.local for m in arch.layer_modules(0)]
    assert output_head(model, arch, 1) is None  # not the last layer: no head
    results, learning = learn_layer(layer, {local: spec for local in locals_}, inputs, targets, iters=40, seed=0,
                                    head=output_head(model, arch, 0), head_tokens=head_tokens)
    rtn = {m.name: rtn_quantize_spec(layer.get_submodule(m.local).weight, spec).weight for m in arch.layer_modules(0)}
    learned = {m.name: results[m.local].weight for m in arch.layer_modules(0)}
    assert learning.objective == "output-kl"
    assert learning.loss_start == pytest.approx(_output_kl_of(model, ids, rtn), rel=1e-4)
    assert learning.loss_learned == pytest.approx(_output_kl_of(model, ids, learned), rel=1e-4)
    assert learning.kept and learning.loss_learned < 0.9 * learning.loss_start
    for r in results.values():
        assert torch.equal(r.weight, r.dequantize()) and int(r.codes.max()) <= 3


@pytest.mark.parametrize("start", ["rtn", "gptq"])
def test_the_driver_puts_only_the_last_layer_on_the_output_kl(start):
    """quantize_model(learn_output_kl=True): the last layer's kept loss is the quantized model's output KL on the
    calibration (its inputs the quantized model's); the other layers keep the layer-output objective; without
    learned rounding the option is refused."""
    model = tiny_llama()
    arch = resolve(model)
    names = [m.name for m in arch.modules]
    ids = torch.randint(0, 256, (8, 24), generator=torch.Generator().manual_seed(1))
    plan = Plan.uniform(names, QuantSpec(bits=2, group_size=16))
    import copy

    quantized = copy.deepcopy(model)
    got = {}
    rep = quantize_model(quantized, resolve(quantized), plan, ids, batch_size=4, progress=False, learn_iters=10,
                         learn_start=start, learn_output_kl=True, on_result=lambda n, r: got.setdefault(n, r))
    assert [rep.layers[i].objective for i in (0, 1)] == ["mse", "output-kl"]
    assert rep.layers[1].loss == pytest.approx(_output_kl_of(model, ids, {n: r.weight for n, r in got.items()}),
                                               rel=1e-4)
    with pytest.raises(TasaError, match="the output-KL objective is learned rounding's"):
        quantize_model(tiny_llama(), arch, plan, ids, progress=False, learn_output_kl=True)


def test_the_output_kl_option_needs_learned_rounding(tiny_model_dir, tmp_path, capsys, no_work):
    with pytest.raises(TasaError, match="--learn-output-kl is an objective of learned rounding"):
        QuantizeSpec(learn_output_kl=True)
    assert QuantizeSpec(learn_rounding=4, learn_start="gptq", learn_output_kl=True).resolved().quantizer == (
        "learned rounding (4 steps per layer) from GPTQ with --act-order --static-groups --scale-search 16 "
        "--float-targets 0.25 --learn-output-kl")
    expect_error(quantize_args(tiny_model_dir, tmp_path / "q", "--learn-output-kl"),
                 "--learn-output-kl is an objective of learned rounding: give --learn-rounding STEPS", capsys)
    from tasa.config import RunSpec

    assert RunSpec(tasks=("gsm8k",), budget=3.5, learn_rounding=4, learn_output_kl=True).quantize_spec().learn_output_kl
    expect_error(["run", "--model", str(tiny_model_dir), "--tasks", "gsm8k", "--budget", "3.5", "--output-dir",
                  str(tmp_path / "r"), "--learn-output-kl"],
                 "--learn-output-kl is an objective of learned rounding", capsys)


def test_the_cli_records_the_last_layers_objective(tiny_model_dir, tmp_path, capsys, data_dir):
    rec = _cli_quantize(tiny_model_dir, tmp_path / "q", "gptq", capsys, "--learn-output-kl")
    learned = rec["learned_rounding"]
    assert learned["last_layer_objective"].startswith("KL divergence of the model's next-token distribution")
    assert [learned["layers"][i]["objective"] for i in ("0", "1")] == ["mse", "output-kl"]
    assert rec["quantizer"].endswith("--learn-output-kl")
