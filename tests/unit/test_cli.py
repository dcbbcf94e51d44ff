"""The CLI end to end on a tiny random model, and its one-line errors on bad input."""
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from tasa.artifacts import read_json
from tasa.cli import main
from tasa.profile.stats import kendall_tau
from tasa.quant.rtn import rtn_quantize


def run_cli(args, capsys):
    with pytest.raises(SystemExit) as exc:
        main(args)
    out = capsys.readouterr()
    return exc.value.code, out.out, out.err


def test_quantize_rtn_writes_loadable_model_and_plan(tiny_model_dir, tmp_path, capsys, data_dir):
    out_dir = tmp_path / "q"
    code, out, err = run_cli(["quantize", "--model", str(tiny_model_dir), "--method", "rtn", "--bits", "3",
                              "--group-size", "16", "--format", "fp", "--output-dir", str(out_dir), "--quiet"], capsys)
    assert code == 0, err
    assert "quantized 14 modules (rtn with --scale-search 16, 3 bits" in out and "(fp," in out
    plan = json.loads((out_dir / "plan.json").read_text())
    assert len(plan["modules"]) == 14 and plan["modules"]["model.layers.0.mlp.up_proj"]["bits"] == 3
    from transformers import AutoModelForCausalLM

    q = AutoModelForCausalLM.from_pretrained(out_dir)
    fp = load_file(tiny_model_dir / "model.safetensors")
    w = fp["model.layers.1.self_attn.v_proj.weight"]
    # the default quantizer searches 16 ranges per group (plain squared error for RTN)
    assert torch.equal(q.model.layers[1].self_attn.v_proj.weight, rtn_quantize(w, 3, 16, True, scale_search=16).weight)
    assert torch.equal(q.lm_head.weight, fp["lm_head.weight"])  # lm_head untouched
    summary = json.loads((out_dir / "quantize.json").read_text())
    assert summary["average_bits"] == 3 and summary["calib"] is None


def test_quantize_gptq_then_eval(tiny_model_dir, tmp_path, capsys, data_dir):
    out_dir = tmp_path / "q"
    code, out, err = run_cli(["quantize", "--model", str(tiny_model_dir), "--bits", "4", "--group-size", "32",
                              "--calib", "wikitext2:0.5,gsm8k:0.5", "--nsamples", "8", "--seqlen", "64",
                              "--output-dir", str(out_dir), "--quiet"], capsys)
    assert code == 0, err
    summary = json.loads((out_dir / "quantize.json").read_text())
    assert summary["calib_counts"] == {"wikitext2": 4, "gsm8k": 4}
    # recorded: the thread count and the exact calibration tokens the result depends on
    import hashlib

    from tasa.config import CalibSpec
    from tasa.data import build_calibration
    from tests.conftest import byte_tokenizer

    ids = build_calibration(byte_tokenizer(), CalibSpec.parse("wikitext2:0.5,gsm8k:0.5", nsamples=8, seqlen=64)).input_ids
    assert summary["calib_sha256"] == hashlib.sha256(ids.numpy().tobytes()).hexdigest()
    assert summary["threads"] == torch.get_num_threads()
    assert (summary["dtype"], summary["batch_size"]) == ("float32", 8)  # the CPU's default dtype, the default batch
    assert all(m["rel_error"] is not None and m["rel_error"] >= 0 for m in summary["modules"].values())
    res_file = tmp_path / "res.json"
    code, out, err = run_cli(["eval", "--model", str(out_dir), "--tasks", "wikitext2", "--limit", "3",
                              "--seqlen", "64", "--output", str(res_file), "--quiet"], capsys)
    assert code == 0, err
    assert "ppl" in out
    res = json.loads(res_file.read_text())
    assert res["results"]["wikitext2"]["windows"] == 3
    assert res["results"]["wikitext2"]["ppl"] > 1


def test_quantize_records_the_dtype_and_batch_size_it_computed_with(tiny_model_dir, tmp_path, capsys, data_dir):
    """A checkpoint quantized with the model in bfloat16, in 2-sequence batches, says so in quantize.json."""
    out_dir = tmp_path / "q"
    code, _, err = run_cli(["quantize", "--model", str(tiny_model_dir), "--bits", "4", "--group-size", "32",
                            "--calib", "wikitext2", "--nsamples", "4", "--seqlen", "32", "--dtype", "bfloat16",
                            "--batch-size", "2", "--output-dir", str(out_dir), "--quiet"], capsys)
    assert code == 0, err
    summary = json.loads((out_dir / "quantize.json").read_text())
    assert (summary["dtype"], summary["batch_size"]) == ("bfloat16", 2)


def _corrupt(model_dir, key, value):
    tensors = load_file(model_dir / "model.safetensors")
    tensors[key][0, 0] = value
    save_file(tensors, model_dir / "model.safetensors", metadata={"format": "pt"})


BAD_INPUTS = [
    (["--model", "/nonexistent/model"], "model path not found"),
    (["--calib", "c4"], "unknown dataset 'c4'"),
    (["--calib", "gsm8k/test"], "used for evaluation"),
    (["--seqlen", "4096"], "exceeds the model's maximum"),
    (["--bits", "9"], "bits must be an integer from 2 to 8"),
    (["--group-size", "48"], "does not divide the input size 64"),
]


@pytest.mark.parametrize("extra,message", BAD_INPUTS)
def test_bad_input_one_line_nonzero_nothing_written(extra, message, tiny_model_dir, tmp_path, capsys, data_dir):
    out_dir = tmp_path / "out"
    args = ["quantize", "--model", str(tiny_model_dir), "--group-size", "16", "--nsamples", "4", "--seqlen", "32",
            "--output-dir", str(out_dir), "--quiet"]
    code, out, err = run_cli(args + extra, capsys)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("tasa: error: ") and message in lines[0], err
    assert not out_dir.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]  # no temporary leftovers


def test_nan_weights_rejected(tiny_model_dir, tmp_path, capsys, data_dir):
    _corrupt(tiny_model_dir, "model.layers.1.mlp.up_proj.weight", float("nan"))
    code, _, err = run_cli(["quantize", "--model", str(tiny_model_dir), "--method", "rtn", "--group-size", "16",
                            "--output-dir", str(tmp_path / "o")], capsys)
    assert code == 2 and "model.layers.1.mlp.up_proj.weight holds 1 NaN/infinite value(s)" in err


def test_missing_data_dir(tiny_model_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("TASA_DATA_DIR", str(tmp_path / "absent"))
    code, _, err = run_cli(["quantize", "--model", str(tiny_model_dir), "--group-size", "16",
                            "--output-dir", str(tmp_path / "o")], capsys)
    assert code == 2 and "TASA_DATA_DIR" in err


def test_unknown_architecture(tmp_path, capsys, data_dir):
    import transformers

    path = tmp_path / "gpt2"
    transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=1, n_embd=32, n_head=4, vocab_size=260,
                                                         n_positions=64)).save_pretrained(path)
    from tests.conftest import byte_tokenizer

    byte_tokenizer().save_pretrained(path)
    code, _, err = run_cli(["quantize", "--model", str(path), "--method", "rtn", "--output-dir",
                            str(tmp_path / "o")], capsys)
    assert code == 2 and "could not find decoder layers" in err


def test_existing_output_dir_needs_overwrite(tiny_model_dir, tmp_path, capsys, data_dir):
    out_dir = tmp_path / "o"
    out_dir.mkdir()
    (out_dir / "keep.txt").write_text("x")
    base = ["quantize", "--model", str(tiny_model_dir), "--method", "rtn", "--group-size", "16",
            "--output-dir", str(out_dir), "--quiet"]
    code, _, err = run_cli(base, capsys)
    assert code == 2 and "not empty; pass --overwrite" in err
    assert (out_dir / "keep.txt").exists()
    code, _, err = run_cli(base + ["--overwrite"], capsys)
    assert code == 0, err
    assert not (out_dir / "keep.txt").exists() and (out_dir / "plan.json").exists()


def test_eval_unknown_task_and_hub_offline(tiny_model_dir, capsys, monkeypatch):
    code, _, err = run_cli(["eval", "--model", str(tiny_model_dir), "--tasks", "hellaswag"], capsys)
    assert code == 2 and "unknown task 'hellaswag'" in err
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code, _, err = run_cli(["eval", "--model", "someorg/some-model"], capsys)
    assert code == 2 and "could not get 'someorg/some-model' from the Hugging Face hub" in err
    assert "--model PATH" in err


def test_help_explains_options(capsys):
    code, out, _ = run_cli(["quantize", "--help"], capsys)
    assert code == 0
    for flag in ("--bits", "--group-size", "--calib", "--nsamples", "--seqlen", "--output-dir", "--overwrite"):
        assert flag in out


def test_eval_tasks_with_reference_flips_and_kl(tiny_model_dir, tmp_path, capsys, data_dir):
    ref_file = tmp_path / "ref.json"
    code, out, err = run_cli(["eval", "--model", str(tiny_model_dir), "--tasks", "wikitext2,arc_easy,mmlu",
                              "--limit", "2", "--seqlen", "64", "--kl-topk", "300", "--log-samples",
                              "--output", str(ref_file), "--quiet"], capsys)
    assert code == 0, err
    ref = json.loads(ref_file.read_text())
    assert ref["results"]["arc_easy"]["n"] == 2 and ref["results"]["mmlu"]["n"] == 4
    assert len(ref["samples"]["arc_easy"]) == 2 and "lls" in ref["samples"]["arc_easy"][0]
    assert (tmp_path / "ref.topk.safetensors").is_file()
    for line in ("arc_easy   acc_norm", "mmlu       acc ", "wikitext2  ppl "):
        assert line in out
    # the model against itself: no flips, KL 0 (top-300 covers the whole 260-token vocabulary)
    res_file = tmp_path / "self.json"
    code, out, err = run_cli(["eval", "--model", str(tiny_model_dir), "--tasks", "wikitext2,arc_easy",
                              "--limit", "2", "--seqlen", "64", "--reference", str(ref_file),
                              "--output", str(res_file), "--quiet"], capsys)
    assert code == 0, err
    res = json.loads(res_file.read_text())["results"]
    assert res["wikitext2"]["kl"] == pytest.approx(0.0, abs=1e-5) and res["arc_easy"]["flip_rate"] == 0.0
    assert res["wikitext2"]["ref_topk_mass"] == pytest.approx(1.0, abs=1e-3)
    # a quantized model against the reference model itself (a model spec): KL > 0
    q_dir = tmp_path / "q"
    assert run_cli(["quantize", "--model", str(tiny_model_dir), "--method", "rtn", "--bits", "2", "--group-size",
                    "16", "--scale-search", "0", "--output-dir", str(q_dir), "--quiet"], capsys)[0] == 0
    code, out, err = run_cli(["eval", "--model", str(q_dir), "--tasks", "wikitext2,arc_easy", "--limit", "2",
                              "--seqlen", "64", "--reference", str(tiny_model_dir), "--quiet"], capsys)
    assert code == 0, err
    kl = [line for line in out.splitlines() if line.startswith("wikitext2  kl ")]
    assert kl and float(kl[0].split()[2]) > 1e-3  # a random tiny model is near-uniform: small but clearly > 0
    # a reference evaluated on other windows is refused
    code, out, err = run_cli(["eval", "--model", str(tiny_model_dir), "--tasks", "wikitext2", "--limit", "3",
                              "--seqlen", "64", "--reference", str(ref_file), "--quiet"], capsys)
    assert code == 2 and "use the same --limit and --seqlen" in err


@pytest.mark.parametrize("args, message", [
    (["--tasks", "hellaswag"], "unknown task 'hellaswag'"),
    (["--tasks", "arc_easy", "--limit", "100"], "--limit 100 exceeds the 8 rows of arc_easy"),
    (["--tasks", "arc_easy", "--apply-chat-template"], "no chat template"),
    (["--tasks", "arc_easy", "--reference", "missing.json"], "reference results not found"),
    (["--tasks", "arc_easy,arc_easy"], "listed twice"),
])
def test_eval_bad_input_one_line(tiny_model_dir, capsys, data_dir, args, message):
    code, out, err = run_cli(["eval", "--model", str(tiny_model_dir), "--quiet", *args], capsys)
    assert code == 2
    assert message in err and len(err.strip().splitlines()) == 1


def test_profile_with_gptq_probes_records_its_calibration(tiny_model_dir, tmp_path, capsys, data_dir):
    base = ["profile", "--model", str(tiny_model_dir), "--objectives", "wikitext2", "--bits", "2,4", "--group-size",
            "16", "--probe-tokens", "40", "--probe-seqlen", "32", "--quiet", "--probe-quantizer", "gptq"]
    code, out, err = run_cli(base + ["--calib", "wikitext2:0.5,gsm8k:0.5", "--nsamples", "4", "--seqlen", "24",
                                     "--output-dir", str(tmp_path / "g")], capsys)
    assert code == 0, err
    s = json.loads((tmp_path / "g" / "sensitivity.json").read_text())
    assert (s["probe_quantizer"], s["calib"], s["nsamples"], s["calib_seqlen"]) == \
        ("gptq", "wikitext2:0.5,gsm8k:0.5", 4, 24)
    code, _, err = run_cli(base + ["--calib", "wikitext2", "--nsamples", "4", "--seqlen", "24",
                                   "--output-dir", str(tmp_path / "g")], capsys)  # same directory, other calibration
    assert code == 2 and "other settings (calib)" in err
    code, _, err = run_cli(base + ["--output-dir", str(tmp_path / "h")], capsys)
    assert code == 2 and "GPTQ probes need calibration data (--calib)" in err and len(err.strip().splitlines()) == 1
    code, _, err = run_cli(base + ["--calib", "wikitext2", "--estimator", "fisher", "--output-dir", str(tmp_path / "i")],
                           capsys)
    assert code == 2 and "cannot be combined with an estimator" in err


def test_profile_writes_sensitivity_and_resumes(tiny_model_dir, tmp_path, capsys, data_dir):
    out_dir = tmp_path / "prof"
    args = ["profile", "--model", str(tiny_model_dir), "--objectives", "wikitext2,arc_easy", "--bits", "2,4",
            "--group-size", "16", "--probe-tokens", "40", "--probe-seqlen", "32", "--output-dir", str(out_dir), "--quiet"]
    code, out, err = run_cli(args, capsys)
    assert code == 0, err
    s = json.loads((out_dir / "sensitivity.json").read_text())
    assert s["schema"] == "tasa.sensitivity/1" and s["granularity"] == "layer" and len(s["units"]) == 2
    c = s["costs"]["wikitext2"]["2"]
    assert len(c["cost"]) == 2 and all(lo <= x <= hi for x, lo, hi in zip(c["cost"], c["ci_low"], c["ci_high"]))
    assert s["objectives"]["arc_easy"]["kind"] == "choice" and s["objectives"]["wikitext2"]["scored_tokens"] >= 40
    report = (out_dir / "report.md").read_text()
    tau = kendall_tau(s["costs"]["wikitext2"]["4"]["cost"], s["costs"]["arc_easy"]["4"]["cost"])
    assert f"| wikitext2 | 1.00 | {tau:.2f} |" in report and "| wikitext2 | arc_easy |" in report
    t = s["objective_taus"]["4"]["wikitext2|arc_easy"]
    assert t["tau"] == pytest.approx(tau) and t["ci_low"] <= t["ci_high"] and "tau(wikitext2, arc_easy) =" in report
    assert (out_dir / "heatmap_2.png").stat().st_size > 1000 and "<table>" in (out_dir / "report.html").read_text()
    code, out2, err = run_cli(args, capsys)  # every probe is on disk: the re-run reads them back
    assert code == 0 and json.loads((out_dir / "sensitivity.json").read_text())["costs"] == s["costs"]
    probes = sorted((out_dir / "probes").glob("*.json"))
    code, _, err = run_cli(args[:-3] + ["--bits", "2", "--output-dir", str(out_dir), "--quiet"], capsys)
    assert code == 0, err  # another bit-width set: the probes are stored per unit and width, and reused
    sub = json.loads((out_dir / "sensitivity.json").read_text())
    assert sub["bits"] == [2] and sub["costs"]["wikitext2"]["2"]["cost"] == s["costs"]["wikitext2"]["2"]["cost"]
    assert sorted((out_dir / "probes").glob("*.json")) == probes
    code, _, err = run_cli(args[:-3] + ["--probe-seqlen", "16", "--output-dir", str(out_dir), "--quiet"], capsys)
    assert code == 2 and "other settings (seqlen)" in err
    settings = json.loads((out_dir / "probe_settings.json").read_text())
    assert settings["grid"] == "signed-max"
    settings.pop("grid")  # probes made before the signed-max grid: never mixed into a profile made after it
    (out_dir / "probe_settings.json").write_text(json.dumps(settings))
    code, _, err = run_cli(args, capsys)
    assert code == 2 and "other settings (grid)" in err and len(err.strip().splitlines()) == 1
    code, out, err = run_cli(args[:-3] + ["--compare-estimators", "--output-dir", str(tmp_path / "est"), "--quiet"],
                             capsys)
    est = read_json(tmp_path / "est" / "sensitivity.json")
    e = est["estimators"]
    assert set(e) == {"fisher", "autoscheme"}
    for name, objective in (("fisher", "arc_easy"), ("autoscheme", "wikitext2")):  # tau against the probes' costs
        assert e[name]["tau_vs_measured"][objective]["2"] == pytest.approx(
            kendall_tau(e[name]["costs"][objective]["2"], est["costs"][objective]["2"]["cost"]), nan_ok=True)
    assert "| fisher | wikitext2 | 2 |" in (tmp_path / "est" / "report.md").read_text()
    code, out, err = run_cli(args[:-3] + ["--estimator", "fisher", "--output-dir", str(tmp_path / "f"), "--quiet"],
                             capsys)
    f = json.loads((tmp_path / "f" / "sensitivity.json").read_text())
    assert code == 0 and f["method"] == "fisher" and f["costs"]["wikitext2"]["4"]["cost"] == \
        e["fisher"]["costs"]["wikitext2"]["4"]
    code, _, err = run_cli(["profile", "--model", str(tiny_model_dir), "--bits", "9", "--output-dir",
                            str(tmp_path / "x"), "--quiet"], capsys)
    assert code == 2 and "bits" in err


def test_profile_allocate_quantize_by_plan(tiny_model_dir, tmp_path, capsys, data_dir):
    prof = tmp_path / "prof"
    assert run_cli(["profile", "--model", str(tiny_model_dir), "--objectives", "wikitext2,gsm8k", "--bits", "2,4",
                    "--group-size", "16", "--probe-tokens", "40", "--probe-seqlen", "32", "--output-dir", str(prof),
                    "--quiet"], capsys)[0] == 0
    plan_file = tmp_path / "plan.json"
    code, out, err = run_cli(["allocate", "--sensitivity", str(prof), "--budget", "3", "--beta", "task-only",
                              "--method", "rtn", "--output", str(plan_file)], capsys)
    assert code == 0, err
    plan = json.loads(plan_file.read_text())
    bits = [s["bits"] for s in plan["modules"].values()]
    assert sorted(set(bits)) == [2, 4] and sum(bits) / len(bits) == 3  # equal-size layers: one at 2, one at 4
    assert "bits per layer:" in out and "average weight bits 3.0000" in out
    assert "additive prediction (layer plan): 0 = uniform 4-bit, 1 = uniform 2-bit: wikitext2 " in out
    q_dir = tmp_path / "q"
    code, out, err = run_cli(["quantize", "--model", str(tiny_model_dir), "--plan", str(plan_file),
                              "--output-dir", str(q_dir), "--quiet"], capsys)
    assert code == 0, err
    written = json.loads((q_dir / "plan.json").read_text())["modules"]
    assert {k: v["bits"] for k, v in written.items()} == {k: v["bits"] for k, v in plan["modules"].items()}
    assert json.loads((q_dir / "quantize.json").read_text())["average_bits"] == 3
    code, _, err = run_cli(["allocate", "--sensitivity", str(prof), "--budget", "1.5", "--output",
                            str(tmp_path / "p2.json")], capsys)
    assert code == 2 and "infeasible" in err


def _small_run(model_dir, out_dir) -> list[str]:
    """A `tasa run` on the tiny model that takes seconds: budget 3 over bits 2/4, one task, a fixed calibration."""
    return ["run", "--model", str(model_dir), "--tasks", "gsm8k", "--budget", "3", "--bits", "2,4",
            "--group-size", "16", "--probe-tokens", "40", "--nsamples", "4", "--seqlen", "32", "--eval-limit", "2",
            "--eval-windows", "1", "--calib", "wikitext2:0.5,gsm8k:0.5", "--output-dir", str(out_dir), "--quiet"]


def test_run_with_gptq_probes_profiles_on_the_run_calibration(tiny_model_dir, tmp_path, capsys, data_dir):
    out_dir = tmp_path / "run"
    args = _small_run(tiny_model_dir, out_dir)
    code, out, err = run_cli(args + ["--probe-quantizer", "gptq"], capsys)
    assert code == 0, err
    s = json.loads((out_dir / "profile" / "sensitivity.json").read_text())
    assert (s["probe_quantizer"], s["calib"], s["nsamples"], s["calib_seqlen"]) == \
        ("gptq", "wikitext2:0.5,gsm8k:0.5", 4, 32)
    code, out, err = run_cli(args + ["--probe-quantizer", "gptq"], capsys)
    assert code == 0 and "stages run: none" in out, out + err
    # RTN probes are another profile: it and everything after rerun; the RTN profile records no calibration
    code, out, err = run_cli(args, capsys)
    assert code == 0 and "stages run: profile, allocate, quantize, eval_quant" in out, out + err
    assert "probe_quantizer" not in json.loads((out_dir / "profile" / "sensitivity.json").read_text())
    code, _, err = run_cli(args + ["--probe-quantizer", "awq"], capsys)
    assert code == 2 and "--probe-quantizer" in err


def test_run_at_module_granularity_profiles_and_allocates_every_module(tiny_model_dir, tmp_path, capsys, data_dir):
    from transformers import AutoModelForCausalLM

    from tasa.models.arch import resolve

    out_dir = tmp_path / "run"
    args = _small_run(tiny_model_dir, out_dir)
    code, out, err = run_cli(args + ["--granularity", "module"], capsys)
    assert code == 0, err
    arch = resolve(AutoModelForCausalLM.from_pretrained(tiny_model_dir))
    s = json.loads((out_dir / "profile" / "sensitivity.json").read_text())
    assert s["granularity"] == "module"
    assert [u["modules"] for u in s["units"]] == [[m.name] for m in arch.modules]
    plan = json.loads((out_dir / "plan.json").read_text())
    assert plan["meta"]["allocation"]["granularity"] == "module"
    numels = {m.name: m.numel for m in arch.modules}
    assert set(plan["modules"]) == set(numels)
    used = sum(numels[k] * v["bits"] for k, v in plan["modules"].items())
    assert used <= 3 * sum(numels.values())  # the budget holds over the modules
    report = (out_dir / "report.md").read_text()
    assert "Measured module sensitivities" in report and "If single-module costs added up" in report
    assert (out_dir / "model" / "quantize_config.json").is_file()
    code, out, err = run_cli(args + ["--granularity", "module"], capsys)
    assert code == 0 and "stages run: none" in out, out + err
    # layer granularity is another profile: the probes start over and the plan is per layer again
    code, out, err = run_cli(args, capsys)
    assert code == 0 and "stages run: profile, allocate, quantize, eval_quant" in out, out + err
    assert json.loads((out_dir / "profile" / "sensitivity.json").read_text())["granularity"] == "layer"
    assert "Measured layer sensitivities" in (out_dir / "report.md").read_text()
    code, _, err = run_cli(args + ["--granularity", "head"], capsys)
    assert code == 2 and "--granularity" in err
    from tasa.config import RunSpec  # the Python API refuses it too, before any stage runs
    from tasa.errors import TasaError

    with pytest.raises(TasaError, match="granularity must be 'layer' or 'module', got 'head'"):
        RunSpec(tasks=("gsm8k",), budget=3, granularity="head")


def test_run_end_to_end_caches_stages_and_resumes(tiny_model_dir, tmp_path, capsys, data_dir, monkeypatch):
    import importlib

    from transformers import AutoModelForCausalLM

    from tasa.models.arch import resolve

    run_module = importlib.import_module("tasa.pipeline.run")
    out_dir = tmp_path / "run"
    args = ["run", "--model", str(tiny_model_dir), "--tasks", "gsm8k,arc_easy", "--budget", "3", "--bits", "2,4",
            "--group-size", "16", "--probe-tokens", "40", "--nsamples", "4", "--seqlen", "32", "--eval-limit", "3", "--eval-windows", "2",
            "--calib", "wikitext2:0.5,gsm8k:0.5", "--output-dir", str(out_dir), "--quiet"]
    code, out, err = run_cli(args, capsys)
    assert code == 0, err
    assert "stages run: profile, allocate, eval_fp, quantize, eval_quant" in out
    for f in ("plan.json", "plan.png", "report.md", "report.html", "eval-fp.json", "eval-quant.json", "run.json",
              "profile/sensitivity.json", "model/quantize_config.json", "stages.json"):
        assert (out_dir / f).is_file(), f
    plan = json.loads((out_dir / "plan.json").read_text())
    assert sorted({m["bits"] for m in plan["modules"].values()}) == [2, 4]
    report = (out_dir / "report.md").read_text()
    assert "## Plan" in report and "| gsm8k | gold-solution NLL" in report and "| wikitext2 | KL" in report
    took = json.loads((out_dir / "run.json").read_text())["seconds"]["quantize"]
    assert (f"made by gptq with --act-order --static-groups --scale-search 16 --float-targets 0.25 in {took:.0f} s."
            in report)  # the default quantizer, and the better one with its estimated time here
    from tasa.config import BETTER_QUANTIZER
    from tasa.numerics import native_bfloat16

    flags, ratio = BETTER_QUANTIZER
    assert f"`{flags}` (learned rounding) leaves less error: about {ratio:g}x" in report
    assert f"about {ratio * took:.0f} s for this run" in report
    run_json = json.loads((out_dir / "run.json").read_text())
    assert (run_json["device"], run_json["dtype"], run_json["bfloat16_native"]) == ("cpu", "float32",
                                                                                     native_bfloat16("cpu"))
    assert ("learns with the model in bfloat16" in report) is native_bfloat16("cpu")  # named where this CPU has it
    assert f"`tasa quantize --model {tiny_model_dir} --plan {out_dir}/plan.json --calib " in report
    assert "no general text" not in report  # its calibration has wikitext2
    pred = json.loads((out_dir / "plan.json").read_text())["meta"]["allocation"]["predicted"]
    assert f"from uniform 4-bit (0) to uniform 2-bit (1): wikitext2 {pred['wikitext2']['gap_position']:.2f}, " \
           f"gsm8k {pred['gsm8k']['gap_position']:.2f}" in report
    q = json.loads((out_dir / "eval-quant.json").read_text())["results"]
    assert q["arc_easy"]["flip_rate"] >= 0 and q["wikitext2"]["kl"] > 0
    assert q["wikitext2"]["windows"] == 2 and json.loads((out_dir / "eval-fp.json").read_text())["config"][
        "num_fewshot"] == 0
    sizes = json.loads((out_dir / "run.json").read_text())["sizes"]
    fp16 = sum(m.numel * 2 for m in resolve(AutoModelForCausalLM.from_pretrained(tiny_model_dir)).modules)
    assert sizes["linears_fp16_bytes"] == fp16 and 0 < sizes["linears_packed_bytes"] < fp16
    assert sizes["checkpoint_bytes"] == sum(f.stat().st_size for f in (out_dir / "model").glob("*.safetensors"))
    before = json.loads((out_dir / "stages.json").read_text())
    code, out, err = run_cli(args, capsys)  # nothing changed: every stage is skipped
    assert code == 0 and "stages run: none" in out
    assert json.loads((out_dir / "stages.json").read_text()) == before
    # a new budget redoes allocation and everything after it, and the profile stage (which widths need probes
    # depends on the budget) reusing every probe, not the full-precision evaluation; a failure during quantization
    # leaves those recorded, and the next run resumes there
    real = run_module.quantize
    monkeypatch.setattr(run_module, "quantize", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt))
    code, out, err = run_cli(args[:5] + ["--budget", "4"] + args[7:], capsys)
    assert code == 130 and "interrupted" in err
    monkeypatch.setattr(run_module, "quantize", real)
    code, out, err = run_cli(args[:5] + ["--budget", "4"] + args[7:], capsys)
    assert code == 0 and "stages run: quantize, eval_quant" in out, out + err
    assert json.loads((out_dir / "plan.json").read_text())["meta"]["allocation"]["budget"] == 4
    # other profile settings: the probes start over in the same directory, and everything after reruns
    code, out, err = run_cli(args[:5] + ["--budget", "4"] + args[7:] + ["--probe-tokens", "60"], capsys)
    assert code == 0 and "stages run: profile, allocate, quantize, eval_quant" in out, out + err
    assert json.loads((out_dir / "profile" / "sensitivity.json").read_text())["probe_tokens"] == 60
    code, out, err = run_cli(args[:4] + ["wikitext2"] + args[5:], capsys)
    assert code == 2 and "wikitext2 perplexity is always profiled" in err


def test_run_probes_only_the_bit_widths_a_plan_can_use(tiny_model_dir, tmp_path, capsys, data_dir):
    """At 3 bits over {2, 4, 8} no plan can afford 8 bits where 4 would do (zero-cost bound): 8 is not probed, and
    the plan is allocated over {2, 4}; at 6 bits the plan needs 8, which is then probed (2 and 4 reused)."""
    out_dir = tmp_path / "run"
    args = ["run", "--model", str(tiny_model_dir), "--tasks", "gsm8k", "--budget", "3", "--bits", "2,4,8",
            "--group-size", "16", "--probe-tokens", "40", "--nsamples", "4", "--seqlen", "32", "--eval-limit", "2",
            "--eval-windows", "1", "--calib", "wikitext2", "--output-dir", str(out_dir), "--quiet"]
    code, out, err = run_cli(args, capsys)
    assert code == 0, err
    record = json.loads((out_dir / "run.json").read_text())
    assert record["profiled_bits"] == [2, 4] and record["skipped_bits"] == [8]
    sens = json.loads((out_dir / "profile" / "sensitivity.json").read_text())
    assert sens["bits"] == [2, 4] and set(sens["costs"]["gsm8k"]) == {"2", "4"}
    assert json.loads((out_dir / "plan.json").read_text())["meta"]["allocation"]["candidates"] == [2, 4]
    probes = {p.name: p.stat().st_mtime_ns for p in (out_dir / "profile" / "probes").glob("*.json")}
    code, out, err = run_cli(args[:5] + ["--budget", "6"] + args[7:], capsys)
    assert code == 0, err
    record = json.loads((out_dir / "run.json").read_text())
    assert record["profiled_bits"] == [2, 4, 8] and record["skipped_bits"] == []
    assert 8 in {m["bits"] for m in json.loads((out_dir / "plan.json").read_text())["modules"].values()}
    after = {p.name: p.stat().st_mtime_ns for p in (out_dir / "profile" / "probes").glob("*.json")}
    assert len(after) == len(probes) * 3 // 2 and all(after[k] == v for k, v in probes.items())  # reused


# Flags of the same name whose default or help differs between verbs, and why.  Every other flag used by several
# verbs has one default and one help text (tasa.cli's parent parsers).
FLAG_EXCEPTIONS = {
    "--output-dir": "what each verb writes there (required: no default)",
    "--output": "what each verb writes there (required or optional file: no default)",
    "--bits": "quantize takes one bit-width; profile, run, allocate and sweep a list of candidates",
    "--tasks": "eval and sweep evaluate them (default wikitext2); run protects them (required)",
    "--calib": "quantize and sweep calibrate on it (default wikitext2); run searches it (auto); profile needs it "
               "for GPTQ probes only",
    "--nsamples": "quantize calibrates GPTQ on 128 sequences (GPTQ's usual count), run on 64 to keep make run "
                  "within 15 minutes on 2 cores (on SmolLM2, 128 scored no better than 64: docs/RESULTS.md, "
                  "calibration size), and sweep as run does, plan after plan; search-mixture counts sequences per "
                  "source (128)",
    "--probe-tokens": "profile is the analysis tool (rankings and their agreement reported): 4096 per objective; "
                      "run allocates from 768, whose plan scored level with the 4096-token profile's "
                      "(docs/RESULTS.md, allocation benchmark)",
}


def test_a_flag_shared_by_verbs_has_one_default_and_one_help():
    import argparse
    import collections

    from tasa.cli import build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    seen = collections.defaultdict(dict)
    for verb, parser in sub.choices.items():
        for action in parser._actions:
            for flag in action.option_strings:
                if flag.startswith("--") and flag != "--help":
                    seen[flag][verb] = (repr(action.default), action.help)
    shared = {flag: per for flag, per in seen.items() if len(per) > 1}
    assert {"--model", "--group-size", "--seqlen", "--seed", "--batch-size", "--target", "--beta"} <= set(shared)
    differing = sorted(flag for flag, per in shared.items() if len(set(per.values())) > 1)
    assert differing == sorted(FLAG_EXCEPTIONS)
