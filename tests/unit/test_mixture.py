"""Calibration-mixture search: the criteria's math, the model adapters, held-out disjointness, the CLI."""
import json

import pytest
import torch
import torch.nn.functional as F

from tasa.cli import main
from tasa.data import split_heldout
from tasa.data.sources import TextSource, resolve_calibration_source
from tasa.errors import TasaError
from tasa.mixture.collect import collect_hessians, count_sketch, gradient_sketches
from tasa.mixture.criteria import (damped, is_convex, mixture_cosine, pencil_trace, simplex_grid,
                                   trace_direct)
from tasa.mixture.search import calib_string, mixture_grid
from tasa.models import resolve
from tests.conftest import tiny_llama


def spd(d, rank, seed, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rank, d, generator=g, dtype=torch.float64) * scale
    return x.T @ x / rank


# ---- closed form -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("damp", [1e-4, 1e-2, 0.3])
def test_closed_form_equals_direct_solve(damp):
    h_gen, h_task, h_test = spd(12, 40, 0), spd(12, 3, 1, 2.0), spd(12, 30, 2)
    pt = pencil_trace(h_gen, h_task, h_test, damp)
    alphas = [0.0, 0.1, 0.37, 0.5, 0.9, 1.0]
    closed = pt(alphas)
    for a, c in zip(alphas, closed):
        direct = trace_direct([h_gen, h_task], h_test, [a, 1 - a], damp)
        assert float(c) == pytest.approx(direct, rel=1e-9)


def test_closed_form_hand_example():
    # H_gen = I, H_task = diag(3, 1), H_test = I: damped A = (1 + d) I, B = diag(3 + 2d, 1 + 2d).
    d = 0.01
    pt = pencil_trace(torch.eye(2), torch.diag(torch.tensor([3.0, 1.0])), torch.eye(2), d)
    for a in (0.0, 0.25, 1.0):
        expect = sum(1 / (a * (1 + d) + (1 - a) * b) for b in (3 + 2 * d, 1 + 2 * d))
        assert float(pt([a])[0]) == pytest.approx(expect, rel=1e-12)


def test_damping_is_mean_diagonal():
    h = torch.diag(torch.tensor([1.0, 3.0]))
    assert torch.allclose(damped(h, 0.5), torch.diag(torch.tensor([2.0, 4.0])))


def test_convex_and_blows_up_on_rank_deficient_task_hessian():
    d = 16
    h_gen, h_test = spd(d, 200, 3), spd(d, 200, 4)
    h_task = spd(d, 2, 5)  # two similar sequences' worth: rank 2 of 16
    fine = [i / 200 for i in range(201)]
    at_zero = {}
    for damp in (1e-4, 1e-3, 1e-2, 1e-1):
        f = pencil_trace(h_gen, h_task, h_test, damp)(fine).tolist()
        assert is_convex(f)
        assert f[0] > 10 * min(f)  # the task-only end blows up
        at_zero[damp] = f[0]
    assert at_zero[1e-4] > at_zero[1e-3] > at_zero[1e-2] > at_zero[1e-1]  # and more so as damping vanishes
    assert at_zero[1e-4] > 100 * at_zero[1e-1]


def test_is_convex_detects_a_bump():
    assert is_convex([4.0, 1.0, 0.0, 1.0, 4.0])
    assert not is_convex([0.0, 2.0, 1.0, 3.0])


def test_three_sources_direct_matches_two_source_closed_form_on_an_edge():
    hs = [spd(8, 30, 10), spd(8, 3, 11), spd(8, 30, 12)]
    h_test = spd(8, 30, 13)
    # weight 0 on the third source reduces to the two-source pencil
    pt = pencil_trace(hs[0], hs[1], h_test, 0.01)
    assert trace_direct(hs, h_test, [0.25, 0.75, 0.0], 0.01) == pytest.approx(float(pt([0.25])[0]), rel=1e-9)


# ---- gradient alignment --------------------------------------------------------------------------------------

def test_mixture_cosine_hand_example():
    g = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]], dtype=torch.float64)
    gram = g @ g.T
    assert mixture_cosine(gram, [0.5, 0.5]) == pytest.approx(1.0)
    assert mixture_cosine(gram, [1.0, 0.0]) == pytest.approx(2 ** -0.5)
    assert mixture_cosine(torch.zeros(3, 3), [0.5, 0.5]) == 0.0
    with pytest.raises(TasaError, match="does not match"):
        mixture_cosine(gram, [1.0, 0.0, 0.0])


def test_count_sketch_exact_when_it_fits_and_linear_in_slices():
    x = torch.randn(100, dtype=torch.float64)
    y = torch.randn(100, dtype=torch.float64)
    sx, sy = count_sketch(x, 128, 0, 7, 100), count_sketch(y, 128, 0, 7, 100)
    assert float(sx @ sy) == pytest.approx(float(x @ y), rel=1e-12)
    big = torch.randn(50_000, dtype=torch.float64)
    whole = count_sketch(big, 4096, 0, 3, 50_000)
    parts = count_sketch(big[:20_000], 4096, 0, 3, 50_000) + count_sketch(big[20_000:], 4096, 20_000, 3, 50_000)
    assert torch.allclose(whole, parts)


def test_count_sketch_preserves_inner_products():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(200_000, generator=g, dtype=torch.float64)
    b = 0.6 * a + 0.8 * torch.randn(200_000, generator=g, dtype=torch.float64)
    sa, sb = count_sketch(a, 1 << 14, 0, 1, a.numel()), count_sketch(b, 1 << 14, 0, 1, a.numel())
    exact = float(a @ b) / float(a.norm() * b.norm())
    approx = float(sa @ sb) / float(sa.norm() * sb.norm())
    assert exact == pytest.approx(0.6, abs=0.01)
    assert approx == pytest.approx(exact, abs=0.03)


def test_gradient_sketches_equal_autograd_gradients_when_exact():
    model = tiny_llama(layers=2, hidden=32).double()
    arch = resolve(model)
    ids = torch.randint(0, 260, (3, 12), generator=torch.Generator().manual_seed(0))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    k = max(sum(m.numel for m in arch.layer_modules(i)) for i in range(arch.num_layers))
    sk = gradient_sketches(model, arch, {"a": ids}, batch_size=2, k=k, progress=False)["a"]
    model.zero_grad()
    logits = model(input_ids=ids).logits
    F.cross_entropy(logits[:, :-1].reshape(-1, 260), ids[:, 1:].reshape(-1)).backward()
    for i in range(arch.num_layers):
        grads = torch.cat([arch.layers[i].get_submodule(m.local).weight.grad.reshape(-1)
                           for m in arch.layer_modules(i)])
        assert torch.allclose(sk[i, :grads.numel()], grads, rtol=1e-9, atol=1e-12)
    for n, p in model.named_parameters():
        assert torch.equal(p.detach(), before[n])
        assert p.requires_grad


def test_collect_hessians_match_a_hooked_forward():
    model = tiny_llama(layers=2, hidden=32)
    arch = resolve(model)
    ids = torch.randint(0, 260, (4, 10), generator=torch.Generator().manual_seed(1))
    got = {}

    def on_layer(index, hessians, numel):
        got[index] = ({k: v.clone() for k, v in hessians["x"].items()}, numel)

    collect_hessians(model, arch, {"x": ids}, batch_size=3, on_layer=on_layer, progress=False)
    xs = {}

    def keep(_m, args, name):
        xs[name] = args[0].reshape(-1, args[0].shape[-1])

    hooks = [arch.layers[i].get_submodule(m.local).register_forward_pre_hook(
        lambda _m, args, name=m.name: keep(_m, args, name))
        for i in range(arch.num_layers) for m in arch.layer_modules(i)]
    with torch.no_grad():
        model(input_ids=ids)
    for h in hooks:
        h.remove()
    for i in range(arch.num_layers):
        hs, numel = got[i]
        assert set(hs) == {f"model.layers.{i}.{x}" for x in
                           ("self_attn.q_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.down_proj")}
        q = f"model.layers.{i}.self_attn.q_proj"
        assert numel[q] == sum(m.numel for m in arch.layer_modules(i) if m.local.startswith("self_attn.")
                               and m.local != "self_attn.o_proj")
        for name, h in hs.items():
            x = xs[name]
            assert torch.allclose(h, 2 * x.T @ x / x.shape[0], rtol=1e-4, atol=1e-5)


# ---- grids, held-out rows ---------------------------------------------------------------------------------

def test_grids():
    assert mixture_grid(1, None, None)[0] == (1.0, 0.0) and len(mixture_grid(1, None, None)) == 7
    assert mixture_grid(1, [0.5, 0.0, 0.5], None) == [(0.5, 0.5), (0.0, 1.0)]
    assert mixture_grid(2, [0.5], None) == [(0.5, 0.25, 0.25)]
    grid = simplex_grid(3, 0.5)
    assert len(grid) == 6 and all(abs(sum(w) - 1) < 1e-12 for w in grid)
    assert mixture_grid(2, None, 0.25) == simplex_grid(3, 0.25)
    with pytest.raises(TasaError, match="either ratios"):
        mixture_grid(2, [0.5], 0.25)
    with pytest.raises(TasaError, match="divide 1"):
        simplex_grid(2, 0.3)
    with pytest.raises(TasaError, match=r"\[0, 1\]"):
        mixture_grid(1, [1.5], None)
    assert calib_string(["wikitext2", "gsm8k"], (0.75, 0.25)) == "wikitext2:0.75,gsm8k:0.25"
    assert calib_string(["wikitext2", "gsm8k"], (1.0, 0.0)) == "wikitext2:1"


def test_heldout_split_is_disjoint_deterministic_and_by_content(data_dir):
    src = resolve_calibration_source("gsm8k")
    calib, held = split_heldout(src, 0.25, seed=0)
    c, h = calib.load(), held.load()
    assert set(c).isdisjoint(h) and len(c) + len(h) == len(src.load())
    assert 0.1 < len(h) / len(src.load()) < 0.4
    assert held.load() == h and split_heldout(src, 0.25, seed=1)[1].load() != h
    test_rows = [json.loads(x) for x in (data_dir / "gsm8k" / "test.jsonl").read_text().splitlines()]
    assert not {f"Question: {r['question']}\nAnswer: {r['answer']}" for r in test_rows} & (set(c) | set(h))
    dup = TextSource("d", "rows", lambda: ["same row"] * 5 + [f"row {i}" for i in range(50)])
    for part in split_heldout(dup, 0.5, 0):
        rows = part.load()
        assert rows.count("same row") in (0, 5)
    with pytest.raises(TasaError, match="one document"):
        split_heldout(resolve_calibration_source("wikitext2"), 0.2, 0)
    with pytest.raises(TasaError, match="fraction"):
        split_heldout(src, 1.0, 0)


# ---- end to end ----------------------------------------------------------------------------------------------

def run_cli(args, capsys):
    with pytest.raises(SystemExit) as exc:
        main(args)
    out = capsys.readouterr()
    return exc.value.code, out.out, out.err


def test_search_mixture_cli_all_criteria_and_resume(tiny_model_dir, tmp_path, capsys, data_dir, monkeypatch):
    out_dir = tmp_path / "mix"
    args = ["search-mixture", "--model", str(tiny_model_dir), "--task", "gsm8k", "--ratios", "0,0.5,1",
            "--criterion", "hessian-trace,grad-align,measured", "--nsamples", "4", "--seqlen", "32",
            "--heldout-samples", "2", "--group-size", "16", "--sketch-dim", "512", "--output-dir", str(out_dir),
            "--quiet"]
    code, out, err = run_cli(args, capsys)
    assert code == 0, err
    s = json.loads((out_dir / "mixture.json").read_text())
    assert s["schema"] == "tasa.mixture/1" and s["grid"] == [[1.0, 0.0], [0.5, 0.5], [0.0, 1.0]]
    ht = s["results"]["hessian-trace"]
    assert len(ht["values"]) == 3 and len(ht["per_layer"]) == 2 and ht["convex"]
    assert all(v > 0 for v in ht["values"]) and set(ht["damping"]) == {"0.0001", "0.001", "0.01", "0.1"}
    ga = s["results"]["grad-align"]
    assert len(ga["per_layer"]) == 2  # one cosine curve per decoder layer; the criterion is their mean
    assert ga["values"] == pytest.approx([sum(layer[j] for layer in ga["per_layer"]) / 2 for j in range(3)])
    assert s["results"]["measured"]["bits"] == 3
    best = s["results"]["hessian-trace"]["best"]
    assert ht["values"][s["grid"].index(best)] == min(ht["values"])
    assert s["calib"] == calib_string(["wikitext2", "gsm8k"], tuple(best))
    assert f"--calib {s['calib']}" in out
    assert (out_dir / "report.md").is_file() and (out_dir / "criteria.png").is_file()
    assert len(list((out_dir / "measured").glob("*.json"))) == 3

    # measured points resume from disk: a rerun quantizes nothing
    def boom(*a, **k):
        raise AssertionError("quantized again")
    monkeypatch.setattr("tasa.quant.apply.quantize_model", boom)
    code, out, err = run_cli([*args[:8], "measured", *args[9:]], capsys)
    assert code == 0, err
    again = json.loads((out_dir / "mixture.json").read_text())
    assert again["results"]["measured"]["values"] == s["results"]["measured"]["values"]
    # a point measured on other calibration settings (here the seed) is measured again, never reused
    calls = []
    monkeypatch.setattr("tasa.quant.apply.quantize_model", lambda *a, **k: calls.append(1))
    code, out, err = run_cli([*args[:8], "measured", *args[9:], "--seed", "1"], capsys)
    assert code == 0 and len(calls) == 3, err


def test_search_mixture_two_task_sources(tiny_model_dir, tmp_path, capsys, data_dir):
    common = ["search-mixture", "--model", str(tiny_model_dir), "--task", "gsm8k,arc_easy", "--criterion",
              "hessian-trace", "--nsamples", "2", "--seqlen", "32", "--heldout-samples", "2", "--quiet"]
    code, out, err = run_cli([*common, "--grid-step", "0.5", "--output-dir", str(tmp_path / "m")], capsys)
    assert code == 0, err
    s = json.loads((tmp_path / "m" / "mixture.json").read_text())
    assert len(s["grid"]) == 6 and s["targets"] == ["gsm8k", "arc_easy"] and s["simplex"]
    assert "damping" not in s["results"]["hessian-trace"]
    # tasks sharing the non-general part equally: a 1-D family with the closed form, which equals the simplex
    # values at the same points
    code, out, err = run_cli([*common, "--ratios", "1,0.5,0", "--output-dir", str(tmp_path / "r")], capsys)
    assert code == 0, err
    r = json.loads((tmp_path / "r" / "mixture.json").read_text())
    assert r["grid"] == [[1.0, 0.0, 0.0], [0.5, 0.25, 0.25], [0.0, 0.5, 0.5]] and "damping" in r["results"]["hessian-trace"]
    code, out, err = run_cli([*common, "--ratios", "1,0.5,0", "--no-damping-study", "--output-dir",
                              str(tmp_path / "n")], capsys)
    assert code == 0, err
    n = json.loads((tmp_path / "n" / "mixture.json").read_text())["results"]["hessian-trace"]
    assert "damping" not in n and n["values"] == r["results"]["hessian-trace"]["values"]
    for j, w in ((0, [1.0, 0.0, 0.0]), (2, [0.0, 0.5, 0.5])):
        assert r["results"]["hessian-trace"]["values"][j] == pytest.approx(
            s["results"]["hessian-trace"]["values"][s["grid"].index(w)], rel=1e-6)
    assert r["calib"].count(":") in (1, 3)


@pytest.mark.parametrize("extra, message", [
    (["--task", "gsm8k", "--criterion", "magic"], "criteria are"),
    (["--task", "gsm8k", "--ratios", "0,x"], "--ratios must be"),
    (["--task", "gsm8k", "--ratios", "2"], "general-text shares"),
    (["--task", "wikitext2"], "other than the general"),
    (["--task", "gsm8k", "--heldout-sources", "wikitext2"], "one document"),
    (["--task", "gsm8k/test"], "used for evaluation"),
])
def test_search_mixture_bad_input_one_line(extra, message, tiny_model_dir, tmp_path, capsys, data_dir):
    code, out, err = run_cli(["search-mixture", "--model", str(tiny_model_dir), "--nsamples", "2", "--seqlen",
                              "32", "--output-dir", str(tmp_path / "m"), "--quiet", *extra], capsys)
    assert code == 2 and message in err and err.count("\n") == 1


def test_run_with_calib_auto_searches_first_and_caches(tiny_model_dir, tmp_path, capsys, data_dir):
    out_dir = tmp_path / "run"
    args = ["run", "--model", str(tiny_model_dir), "--tasks", "gsm8k", "--budget", "3", "--bits", "2,4",
            "--group-size", "16", "--probe-tokens", "40", "--nsamples", "4", "--seqlen", "32", "--eval-limit", "2",
            "--eval-windows", "2", "--output-dir", str(out_dir), "--quiet"]  # no --calib: auto is the default
    code, out, err = run_cli(args, capsys)
    assert code == 0, err
    assert "stages run: mixture, profile, allocate" in out
    mix = json.loads((out_dir / "mixture" / "mixture.json").read_text())
    assert mix["criteria"] == ["grad-align"]  # the default criterion
    assert mix["results"]["grad-align"]["best"] == mix["grid"][
        max(range(len(mix["grid"])), key=lambda j: mix["results"]["grad-align"]["values"][j])]
    stages = json.loads((out_dir / "stages.json").read_text())["stages"]
    assert stages["quantize"]["inputs"]["calib"] == mix["calib"] and f"calibration {mix['calib']}" in out
    assert json.loads((out_dir / "run.json").read_text())["calib"] == mix["calib"]
    assert "## Calibration mixture" in (out_dir / "report.md").read_text()
    code, out, err = run_cli(args, capsys)
    assert code == 0 and "stages run: none" in out


def test_run_calib_auto_needs_task_sources(tiny_model_dir, tmp_path, capsys, data_dir):
    (tmp_path / "rows.jsonl").write_text(json.dumps({"question": "1+1?", "solution": "2"}) + "\n")
    spec = tmp_path / "t.json"
    spec.write_text(json.dumps({"kind": "gold_nll", "data": "rows.jsonl", "prompt": "{question}",
                                "target": "{solution}"}))
    code, out, err = run_cli(["run", "--model", str(tiny_model_dir), "--tasks", str(spec), "--budget", "3",
                              "--seqlen", "32", "--eval-limit", "1", "--calib", "auto", "--output-dir", str(tmp_path / "r")], capsys)
    assert code == 2 and "--calib auto calibrates on the tasks' own rows" in err and err.count("\n") == 1


def test_run_default_calib_falls_back_to_wikitext2_for_tasks_without_rows(tiny_model_dir, tmp_path, capsys,
                                                                          data_dir, monkeypatch, caplog):
    import importlib

    run_module = importlib.import_module("tasa.pipeline.run")
    rows = "".join(json.dumps({"question": f"What is {i} plus one?", "solution": f"{i} plus one is {i + 1}."})
                   + "\n" for i in range(12))
    (tmp_path / "rows.jsonl").write_text(rows)
    (tmp_path / "probe.jsonl").write_text(rows)
    spec = tmp_path / "t.json"
    spec.write_text(json.dumps({"kind": "gold_nll", "data": "rows.jsonl", "fewshot_data": "probe.jsonl",
                                "prompt": "{question}", "target": "{solution}"}))
    seen = {}

    def stop(model, output_dir, spec, calib, **k):  # the calibration reaching the quantize stage is all it needs
        seen["calib"] = calib.describe()
        raise KeyboardInterrupt

    monkeypatch.setattr(run_module, "quantize", stop)
    code, out, err = run_cli(["run", "--model", str(tiny_model_dir), "--tasks", str(spec), "--budget", "3",
                              "--bits", "2,4", "--group-size", "16", "--probe-tokens", "20", "--seqlen", "32",
                              "--eval-limit", "2", "--eval-windows", "1", "--output-dir", str(tmp_path / "r"),
                              "--quiet"], capsys)
    assert code == 130 and seen["calib"] == "wikitext2:1" and not (tmp_path / "r" / "mixture").exists(), err
    assert any(f"calibration: task {str(spec)!r} is not a built-in dataset with calibration rows" in r.getMessage()
               for r in caplog.records)
