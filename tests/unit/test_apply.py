import pytest
import torch

from tasa.config import QuantSpec
from tasa.errors import TasaError
from tasa.models.arch import resolve
from tasa.plan import Plan
import tasa.quant.apply
from tasa.quant.apply import _relative_error, quantize_model
from tasa.quant.gptq import accumulate_hessian, gptq_quantize, make_empty_hessian
from tasa.quant.rtn import rtn_quantize
from tests.conftest import tiny_llama


def calib_ids(n=6, t=32, seed=0):
    return torch.randint(0, 256, (n, t), generator=torch.Generator().manual_seed(seed))


def test_rtn_plan_replaces_exactly_the_planned_weights():
    model = tiny_llama()
    arch = resolve(model)
    names = [m.name for m in arch.modules if m.layer == 1]
    before = {n: p.clone() for n, p in model.named_parameters()}
    spec = QuantSpec(bits=3, group_size=16, sym=False)
    rep = quantize_model(model, arch, Plan.uniform(names, spec, method="rtn"), progress=False)
    assert set(rep.modules) == set(names)
    for n, p in model.named_parameters():
        mod = n.rsplit(".", 1)[0]
        if mod in names:
            assert torch.equal(p, rtn_quantize(before[n], 3, 16, False).weight)
        else:
            assert torch.equal(p, before[n]), n


def test_gptq_layer0_qkv_uses_hessian_of_normed_embeddings():
    """The driver's first group must equal gptq_quantize on H = 2/n X^T X of layer 0's q/k/v input."""
    model = tiny_llama()
    arch = resolve(model)
    ids = calib_ids()
    with torch.no_grad():
        x = model.model.layers[0].input_layernorm(model.model.embed_tokens(ids))  # (n, T, d)
    h = make_empty_hessian(x.shape[-1])
    accumulate_hessian(h, 0, x)
    spec = QuantSpec(bits=3, group_size=16)
    w_q = model.model.layers[0].self_attn.q_proj.weight.detach().clone()
    expected = gptq_quantize(w_q, h, spec)
    got = {}
    quantize_model(model, arch, Plan.uniform([m.name for m in arch.modules], spec), ids, batch_size=6,
                   on_result=lambda name, r: got.setdefault(name, r), progress=False)
    assert torch.allclose(got["model.layers.0.self_attn.q_proj"].weight, expected.weight, atol=1e-6)
    assert torch.equal(model.model.layers[0].self_attn.q_proj.weight, got["model.layers.0.self_attn.q_proj"].weight)


def test_gptq_driver_deterministic_batch_invariant_and_better_than_rtn():
    ids = calib_ids(n=8, t=48)
    spec = QuantSpec(bits=3, group_size=16)
    results = []
    for bs in (8, 8, 3):
        model = tiny_llama()
        arch = resolve(model)
        quantize_model(model, arch, Plan.uniform([m.name for m in arch.modules], spec), ids, batch_size=bs,
                       progress=False)
        results.append({n: p.clone() for n, p in model.named_parameters()})
    for n in results[0]:
        assert torch.equal(results[0][n], results[1][n]), n  # deterministic
    # Batching changes only the float summation order of the Hessian, so in the first group only a few
    # codes at rounding ties may flip (later modules then see slightly different inputs, and GPTQ's
    # error propagation spreads such flips, so only the first group is compared element-wise).
    for n in ("q_proj", "k_proj", "v_proj"):
        key = f"model.layers.0.self_attn.{n}.weight"
        changed = (results[0][key] - results[2][key]).abs().gt(1e-6).float().mean().item()
        assert changed < 0.01, (n, changed)
    fp, gptq_model, rtn_model = tiny_llama(), tiny_llama(), tiny_llama()
    gptq_model.load_state_dict(results[0])
    arch = resolve(rtn_model)
    quantize_model(rtn_model, arch, Plan.uniform([m.name for m in arch.modules], spec, method="rtn"),
                   progress=False)
    test = calib_ids(n=4, t=48, seed=9)
    with torch.no_grad():
        ref = fp(test).logits
        err_gptq = (gptq_model(test).logits - ref).pow(2).mean()
        err_rtn = (rtn_model(test).logits - ref).pow(2).mean()
    assert err_gptq < err_rtn


def test_true_sequential_changes_later_groups_only():
    ids = calib_ids()
    spec = QuantSpec(bits=2, group_size=16)
    out = []
    for ts in (True, False):
        model = tiny_llama()
        arch = resolve(model)
        quantize_model(model, arch, Plan.uniform([m.name for m in arch.modules], spec), ids, true_sequential=ts,
                       progress=False)
        out.append(model)
    l0 = [m.model.layers[0] for m in out]
    assert torch.equal(l0[0].self_attn.q_proj.weight, l0[1].self_attn.q_proj.weight)  # first group: same input
    assert not torch.equal(l0[0].mlp.down_proj.weight, l0[1].mlp.down_proj.weight)  # sees quantized predecessors


def test_plan_with_unknown_module_and_missing_calibration():
    model = tiny_llama()
    arch = resolve(model)
    with pytest.raises(TasaError, match="does not have"):
        quantize_model(model, arch, Plan.uniform(["model.layers.9.mlp.up_proj"], QuantSpec()), calib_ids())
    with pytest.raises(TasaError, match="needs calibration"):
        quantize_model(model, arch, Plan.uniform([arch.modules[0].name], QuantSpec()), None)


def test_float_targets_change_only_what_sees_quantized_inputs_and_fit_the_float_outputs_better():
    """Asymmetric calibration: layer 0's q/k/v see the embeddings in both streams (C = 0): the same codes as plain
    GPTQ; everything after sees quantized predecessors and is fitted to the float model's outputs instead.  On a
    held-out batch the last layer's output is nearer the float model's (2-bit, where the drift is large).  The
    option's refusals name why."""
    from tasa.config import QuantizeSpec
    from tasa.models.walker import capture_ids, run_layer

    ids, test = calib_ids(n=16, t=48), calib_ids(n=4, t=48, seed=9)
    spec = QuantSpec(bits=2, group_size=16)
    out = {}
    for alpha in (0.0, 1.0):
        model = tiny_llama()
        arch = resolve(model)
        quantize_model(model, arch, Plan.uniform([m.name for m in arch.modules], spec), ids, batch_size=4,
                       progress=False, float_targets=alpha)
        out[alpha] = model
    plain, fitted = (out[a].model.layers for a in (0.0, 1.0))
    for n in ("q_proj", "k_proj", "v_proj"):
        assert torch.equal(getattr(plain[0].self_attn, n).weight, getattr(fitted[0].self_attn, n).weight)
    assert not torch.equal(plain[0].mlp.down_proj.weight, fitted[0].mlp.down_proj.weight)
    fp = tiny_llama()

    def last_hidden(model):
        arch = resolve(model)
        inputs = capture_ids(model, arch, test, 4, torch.device("cpu"))
        with torch.no_grad():
            for layer in arch.layers:
                run_layer(layer, inputs, advance=True)
        return inputs.hidden[0]

    want = last_hidden(fp)
    err = {a: float((last_hidden(m) - want).pow(2).mean()) for a, m in out.items()}
    assert err[1.0] < err[0.0]
    with pytest.raises(TasaError, match=r"--float-targets takes a strength in \[0, 1\]"):
        QuantizeSpec(float_targets=2.0)
    with pytest.raises(TasaError, match="--float-targets is a GPTQ option"):
        QuantizeSpec(float_targets=0.5, learn_rounding=8)


def test_float_targets_held_float_inputs_equal_the_per_call_float_passes(monkeypatch):
    """The float layer's inputs of all of a layer's linear groups, gathered in one pass and held, give the same
    weights as running the float layer up to each group's linear per call (FLOAT_INPUTS_BYTES 0 forces that), in
    fewer float-layer passes (the gathering pass advances the float stream too); the held inputs are gone once the
    layer is done."""
    import tasa.quant.apply as apply_mod

    ids = calib_ids(n=8, t=32)
    spec = QuantSpec(bits=2, group_size=16)
    weights, passes, real = {}, {}, apply_mod.run_layer
    for budget in (apply_mod.FLOAT_INPUTS_BYTES, 0):
        monkeypatch.setattr(apply_mod, "FLOAT_INPUTS_BYTES", budget)
        calls = []

        def counting(layer, inputs, *a, calls=calls, **k):
            calls.append(layer)
            return real(layer, inputs, *a, **k)
        monkeypatch.setattr(apply_mod, "run_layer", counting)
        model = tiny_llama()
        arch = resolve(model)
        calib = apply_mod.Calibration(model, arch, ids, 4, torch.device("cpu"), 0.5)
        layers = []
        real_begin = calib.begin

        def begin(layer):
            real_begin(layer)
            layers.append(calib.float_layer)
        calib.begin = begin
        quantize_model(model, arch, Plan.uniform([m.name for m in arch.modules], spec), calib, progress=False,
                       float_targets=0.5)
        assert calib.float_held == {}
        weights[budget] = {n: p.clone() for n, p in model.named_parameters()}
        passes[budget] = sum(1 for c in calls if any(c is f for f in layers))
    held, per_call = weights
    assert all(torch.equal(weights[held][n], weights[per_call][n]) for n in weights[held])
    # per layer: one gathering pass that also advances the float stream, against one pass per input group (4) per
    # batch (2) + the advance
    assert passes[held] == 2 * 1 and passes[per_call] == 2 * (4 * 2 + 1)


def test_float_targets_refused_before_loading_with_rtn_plans_and_distributed(tmp_path, tiny_model_dir):
    from tasa.config import Cluster, QuantizeSpec, Runtime
    from tasa.pipeline.quantize import quantize

    spec = QuantizeSpec(bits=4, group_size=32, float_targets=0.5)
    Plan({}, method="rtn").save(tmp_path / "rtn.json")
    with pytest.raises(TasaError, match="--float-targets is a GPTQ option, and the plan's method is RTN"):
        quantize(str(tmp_path / "no-such-model"), tmp_path / "a", spec, plan=tmp_path / "rtn.json")
    with pytest.raises(TasaError, match="--float-targets keeps the float model's inputs .* not run with --distributed"):
        quantize(str(tmp_path / "no-such-model"), tmp_path / "b", spec,
                 runtime=Runtime(cluster=Cluster(backend="ray")))
    from tasa.config import RunSpec
    from tasa.pipeline.run import run

    run_spec = RunSpec(tasks=("gsm8k",), budget=3.5, float_targets=0.5)
    assert run_spec.quantize_spec().float_targets == 0.5  # tasa run's quantize stage takes it
    with pytest.raises(TasaError, match="--float-targets keeps the float model's inputs .* not run with --distributed"):
        run(str(tmp_path / "no-such-model"), tmp_path / "c", run_spec, Runtime(cluster=Cluster(backend="ray")))


def test_float_targets_default_where_gptq_runs_in_one_process(tmp_path, tiny_model_dir, data_dir):
    """Unless asked otherwise, GPTQ in one process calibrates asymmetrically at FLOAT_TARGETS; RTN, learned rounding
    and data-parallel calibration do not (and are not refused for it); an explicit 0 turns it off.  The record
    names the strength that made the checkpoint."""
    from safetensors.torch import load_file

    from tasa.config import FLOAT_TARGETS, CalibSpec, ExportSpec, QuantizeSpec
    from tasa.pipeline.quantize import quantize

    assert QuantizeSpec().float_strength() == FLOAT_TARGETS == 0.25
    assert QuantizeSpec().float_strength("rtn") == QuantizeSpec(method="rtn").float_strength() == 0.0
    assert QuantizeSpec(learn_rounding=4).float_strength() == 0.0
    assert QuantizeSpec().float_strength(distributed=True) == 0.0
    assert QuantizeSpec(float_targets=0.0).float_strength() == 0.0
    assert QuantizeSpec(float_targets=1.0).float_strength("gptq") == 1.0
    calib = CalibSpec.parse("wikitext2", nsamples=4, seqlen=32)
    weights = {}
    for name, spec in (("default", QuantizeSpec(bits=3, group_size=32)),
                       ("off", QuantizeSpec(bits=3, group_size=32, float_targets=0.0)),
                       ("rtn", QuantizeSpec(bits=3, group_size=32, method="rtn"))):
        r = quantize(str(tiny_model_dir), tmp_path / name, spec, calib, export=ExportSpec(format="fp"))
        assert r.record["quantizer"].endswith("--float-targets 0.25") == (name == "default")
        weights[name] = load_file(str(next((tmp_path / name).glob("*.safetensors"))))
    assert any(not torch.equal(weights["default"][k], weights["off"][k]) for k in weights["default"])


def test_relative_error_in_row_bands_equals_the_whole_matrix_trace(monkeypatch):
    """tr(E H E^T) / tr(W H W^T), taken a band of rows at a time, against the whole-matrix formula in float64; a
    weight orthogonal to H's range gives 0, not a division by zero."""
    gen = torch.Generator().manual_seed(1)
    w, q = torch.randn(13, 24, generator=gen), torch.randn(13, 24, generator=gen)
    x = torch.randn(40, 24, generator=gen)
    h = x.t() @ x
    e = (w - q).double()
    expected = float(torch.trace(e @ h.double() @ e.t()) / torch.trace(w.double() @ h.double() @ w.double().t()))
    for band_rows in (1, 5, 13, 100):
        monkeypatch.setattr(tasa.quant.apply, "ERROR_BAND_BYTES", 4 * 24 * band_rows)
        assert _relative_error(w, q, h) == pytest.approx(expected, rel=1e-5)
    assert _relative_error(w, q, torch.zeros(24, 24)) == 0.0


def test_the_heap_is_trimmed_after_wide_input_groups_only(monkeypatch):
    """After each input group whose H reaches TRIM_AFTER_BYTES (a 4096-wide input's: 64 MB) GPTQ hands the heap's
    free memory back; narrower groups skip the trim (its cost is 2% of SmolLM2's GPTQ time)."""
    model = tiny_llama(layers=1)
    arch = resolve(model)
    names = [m.name for m in arch.modules]
    trims = []
    monkeypatch.setattr(tasa.quant.apply, "return_freed_memory", lambda: trims.append(1))
    plan = Plan.uniform(names, QuantSpec(bits=4, group_size=16))
    quantize_model(model, arch, plan, calib_ids(), progress=False)
    assert trims == []
    monkeypatch.setattr(tasa.quant.apply, "TRIM_AFTER_BYTES", 4 * 128 * 128)  # the down projection's H (128 wide)
    model = tiny_llama(layers=1)
    quantize_model(model, resolve(model), plan, calib_ids(), progress=False)
    assert len(trims) == 1
    monkeypatch.setattr(tasa.quant.apply, "TRIM_AFTER_BYTES", 0)  # every group: q/k/v, o, gate/up, down
    model = tiny_llama(layers=1)
    quantize_model(model, resolve(model), plan, calib_ids(), progress=False)
    assert len(trims) == 1 + 4
    monkeypatch.setattr(tasa.quant.apply, "TRIM_AFTER_BYTES", 2**40)  # and after results of RESULTS_TRIM_BYTES
    monkeypatch.setattr(tasa.quant.apply, "RESULTS_TRIM_BYTES", 4 * (64 * 64 + 2 * 32 * 64))  # q/k/v's; o's
    model = tiny_llama(layers=1)
    quantize_model(model, resolve(model), plan, calib_ids(), progress=False)
    assert len(trims) == 5 + 4  # after v (q, k and v reach it), gate (o and gate), up and down (each alone)
