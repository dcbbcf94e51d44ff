"""The bad inputs a new user hit (docs/ERRORS.md lists each with its error line): every one ends in one
`tasa: error:` line and exit 2, checked before any expensive work, with nothing half-written.

`no_work` (tests/conftest.py) makes model loading, the mixture search and quantization fail loudly, so a check
that runs too late shows up as a wrong message rather than passing."""
import json
import os
import stat

import pytest
import torch
from safetensors.torch import load_file, save_file

from tasa.cli import main
from tests.conftest import byte_tokenizer, tiny_llama


def run_cli(args, capsys):
    with pytest.raises(SystemExit) as exc:
        main(args)
    out = capsys.readouterr()
    return exc.value.code, out.out, out.err


def expect_error(args, message, capsys):
    code, _, err = run_cli(args, capsys)
    lines = err.strip().splitlines()
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("tasa: error: "), err
    assert message in lines[0], lines[0]
    return lines[0]


def plan_file(tmp_path, layers: int, drop: tuple[str, ...] = (), name="plan.json"):
    from tasa.config import QuantSpec
    from tasa.models.arch import resolve
    from tasa.plan import Plan

    plan = Plan({m.name: QuantSpec(bits=4, group_size=16) for m in resolve(tiny_llama(layers=layers)).modules
                 if m.name not in drop}, method="rtn")
    path = tmp_path / name
    plan.save(path)
    return path


def quantize_args(model_dir, out, *extra):
    return ["quantize", "--model", str(model_dir), "--method", "rtn", "--output-dir", str(out), "--quiet", *extra]


def test_a_target_its_engine_does_not_serve_from_the_format_is_refused_before_loading(tiny_model_dir, tmp_path,
                                                                                      capsys, no_work):
    out = tmp_path / "q"
    expect_error(quantize_args(tiny_model_dir, out, "--target", "sglang", "--format", "compressed-tensors"),
                 "sglang is served from gptq checkpoints, not compressed-tensors (use --format gptq, or another "
                 "--target)", capsys)
    assert not out.exists()


def test_gguf_export_of_a_model_not_read_from_gguf_is_refused_before_loading(tiny_model_dir, tmp_path, capsys,
                                                                            no_work, monkeypatch):
    monkeypatch.delenv("LLAMA_CPP_DIR", raising=False)
    out = tmp_path / "q"
    expect_error(quantize_args(tiny_model_dir, out, "--bits", "4", "--group-size", "32", "--target", "llama.cpp"),
                 "GGUF export takes the metadata, tokenizer and unquantized tensors from a GGUF of the model: pass "
                 "--gguf-template FILE", capsys)
    assert not out.exists()


def test_a_negative_scale_search_is_refused_before_loading(tiny_model_dir, tmp_path, capsys, no_work):
    out = tmp_path / "q"
    expect_error(quantize_args(tiny_model_dir, out, "--scale-search", "-3"),
                 "scale search takes 0 to 1000 candidate ranges, got -3", capsys)
    assert not out.exists()


# ---- plans that do not cover the model ----

def test_plan_of_a_smaller_model_is_refused_naming_the_unplanned(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "q"
    line = expect_error(quantize_args(tiny_model_dir, out, "--plan", str(plan_file(tmp_path, 1))),
                        "the plan leaves 7 of the model's 14 quantizable linears unplanned "
                        "(model.layers.1.self_attn.q_proj, model.layers.1.self_attn.k_proj, "
                        "model.layers.1.self_attn.v_proj, model.layers.1.self_attn.o_proj and 3 more); "
                        "pass --allow-partial-plan", capsys)
    assert not out.exists() and line


def test_plan_of_a_larger_model_is_refused_naming_the_extra(tiny_model_dir, tmp_path, capsys):
    expect_error(quantize_args(tiny_model_dir, tmp_path / "q", "--plan", str(plan_file(tmp_path, 3))),
                 "the plan names 7 module(s) that are not quantizable linears of this model "
                 "(model.layers.2.self_attn.q_proj", capsys)


def test_plan_missing_one_module_is_refused(tiny_model_dir, tmp_path, capsys):
    path = plan_file(tmp_path, 2, drop=("model.layers.1.mlp.down_proj",))
    expect_error(quantize_args(tiny_model_dir, tmp_path / "q", "--plan", str(path)),
                 "the plan leaves 1 of the model's 14 quantizable linears unplanned (model.layers.1.mlp.down_proj)",
                 capsys)


def test_partial_plan_with_opt_in_is_counted_honestly(tiny_model_dir, tmp_path, capsys):
    path = plan_file(tmp_path, 2, drop=("model.layers.1.mlp.down_proj",))
    out = tmp_path / "q"
    code, stdout, err = run_cli(quantize_args(tiny_model_dir, out, "--plan", str(path), "--allow-partial-plan",
                                              "--format", "fp"), capsys)
    assert code == 0, err
    s = json.loads((out / "quantize.json").read_text())
    # 13 linears at 4 bits, down_proj (128 x 64 of 14 x ... weights) at float32's 32 bits
    sizes = {"q": 64 * 64, "k": 32 * 64, "v": 32 * 64, "o": 64 * 64, "gate": 128 * 64, "up": 128 * 64, "down": 64 * 128}
    total = 2 * sum(sizes.values())
    assert s["average_bits"] == pytest.approx((4 * (total - sizes["down"]) + 32 * sizes["down"]) / total)
    assert s["planned_average_bits"] == 4 and s["unquantized_modules"] == ["model.layers.1.mlp.down_proj"]
    assert "1 linears left out of the plan stay at 32 bits" in stdout


@pytest.mark.parametrize("content,message", [
    ("[1, 2]", "a plan is a JSON object with 'version' and 'modules', not a list"),
    ('{"version": 1}', "'modules' must map module names to quantization specs"),
    ('{"version": 1, "modules": {"model.layers.0.self_attn.q_proj": 4}}',
     "module 'model.layers.0.self_attn.q_proj' has spec 4; expected an object"),
    ('{"version": 1, "modules": {"m": {"bits": "4"}}}', "module 'm': bits must be an integer from 2 to 8"),
    ('{"version": 1, "modules": {"m": {"bits": 4, "colour": 1}}}', "module 'm': unknown QuantSpec fields"),
    ("{not json", "is not valid JSON"),
])
def test_malformed_plan_json(content, message, tiny_model_dir, tmp_path, capsys, no_work):
    path = tmp_path / "plan.json"
    path.write_text(content)
    expect_error(quantize_args(tiny_model_dir, tmp_path / "q", "--plan", str(path)), message, capsys)


# ---- damaged model files, NaN weights ----

@pytest.mark.parametrize("stream", ["off", "auto", "on"])
def test_truncated_safetensors_on_eval(tiny_model_dir, capsys, stream):
    f = tiny_model_dir / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    # in memory, transformers reads the file; to decide or to stream, tasa reads the shards' headers first
    message = (f"could not load model from {tiny_model_dir}: SafetensorError" if stream == "off" else
               f"could not read weights {f}: ")
    expect_error(["eval", "--model", str(tiny_model_dir), "--tasks", "wikitext2", "--limit", "1", "--stream", stream],
                 message, capsys)


@pytest.mark.parametrize("stream", ["off", "on"])
def test_garbage_header_safetensors_on_eval(tiny_model_dir, capsys, stream):
    f = tiny_model_dir / "model.safetensors"
    f.write_bytes((64).to_bytes(8, "little") + b"{" * 64 + f.read_bytes()[72:])
    expect_error(["eval", "--model", str(tiny_model_dir), "--tasks", "wikitext2", "--limit", "1", "--stream", stream],
                 "SafetensorError" if stream == "off" else f"could not read weights {f}: ", capsys)


@pytest.mark.parametrize("verb", ["eval", "quantize", "profile"])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_weights_refused_on_load_for_every_verb(verb, value, tiny_model_dir, tmp_path, capsys):
    tensors = load_file(tiny_model_dir / "model.safetensors")
    tensors["model.layers.1.mlp.up_proj.weight"][0, 0] = value
    save_file(tensors, tiny_model_dir / "model.safetensors", metadata={"format": "pt"})
    args = {"eval": ["eval", "--model", str(tiny_model_dir), "--tasks", "wikitext2", "--limit", "1"],
            "quantize": quantize_args(tiny_model_dir, tmp_path / "q"),
            "profile": ["profile", "--model", str(tiny_model_dir), "--objectives", "wikitext2",
                        "--output-dir", str(tmp_path / "p")]}[verb]
    expect_error(args, "model.layers.1.mlp.up_proj.weight holds 1 NaN/infinite value(s); refusing to use it", capsys)


# ---- output paths ----

def test_output_naming_a_directory_eval(tiny_model_dir, tmp_path, capsys, no_work):
    expect_error(["eval", "--model", str(tiny_model_dir), "--tasks", "wikitext2", "--output", str(tmp_path)],
                 f"--output {tmp_path} is a directory", capsys)


def test_output_naming_a_directory_allocate(tmp_path, capsys):
    sens = sensitivity_file(tmp_path)
    expect_error(["allocate", "--sensitivity", str(sens), "--budget", "3.5", "--output", str(tmp_path)],
                 f"--output {tmp_path} is a directory", capsys)


def test_unwritable_output_dir_fails_before_quantizing(tiny_model_dir, tmp_path, capsys, no_work):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    expect_error(quantize_args(tiny_model_dir, blocker / "out"), f"cannot write {blocker / 'out'}: ", capsys)


@pytest.mark.skipif(os.geteuid() != 0, reason="a read-only /proc needs no permissions to set up")
def test_output_dir_on_a_read_only_filesystem(tiny_model_dir, capsys, no_work):
    expect_error(quantize_args(tiny_model_dir, "/proc/tasa-out"), "cannot write /proc/tasa-out", capsys)


def test_outputs_have_the_usual_modes(tiny_model_dir, tmp_path, capsys, data_dir):
    old = os.umask(0o022)
    try:
        out = tmp_path / "q"
        code, _, err = run_cli(quantize_args(tiny_model_dir, out, "--group-size", "16"), capsys)
        assert code == 0, err
        res = tmp_path / "r" / "eval.json"
        code, _, err = run_cli(["eval", "--model", str(out), "--tasks", "wikitext2", "--limit", "1", "--seqlen",
                                "32", "--output", str(res), "--quiet"], capsys)
        assert code == 0, err
    finally:
        os.umask(old)
    assert stat.S_IMODE(out.stat().st_mode) == 0o755
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in [*out.iterdir(), res]}
    assert {"model.safetensors", "config.json", "plan.json", "quantize.json", "eval.json"} <= set(modes)
    assert {n: m for n, m in modes.items() if m != 0o644} == {}


# ---- budgets and bit-widths ----

def sensitivity_file(tmp_path):
    from tests.unit.test_allocate_plan import GSM, PPL, profile

    path = tmp_path / "sensitivity.json"
    path.write_text(json.dumps(profile(PPL, GSM)))
    return path


@pytest.mark.parametrize("extra,message", [
    (["--budget", "9.0"], "budget 9 bits per weight is above the widest candidate, 8-bit"),
    (["--budget", "2.0"], "budget 2 bits per weight is infeasible: the lowest candidate, 3-bit, needs 3"),
    (["--budget", "3.5", "--bits", "4,5,8"], "bit-width(s) 5 were not profiled; profiled: 3, 4, 8"),
    (["--budget", "4.5", "--bits", "3,4,8", "--target", "vllm-gptq"], "bit-width(s) 3 are not servable by vllm-gptq"),
    (["--budget", "4.5", "--bits", "3,4,5,8", "--target", "vllm"], "bit-width(s) 5 were not profiled"),
    (["--budget", "nan"], "the budget must be a positive number"),
])
def test_allocate_budget_and_bits(extra, message, tmp_path, capsys):
    out = tmp_path / "plan.json"
    expect_error(["allocate", "--sensitivity", str(sensitivity_file(tmp_path)), "--output", str(out), *extra],
                 message, capsys)
    assert not out.exists()


@pytest.mark.parametrize("extra,message", [
    (["--budget", "2.0"], "budget 2 bits per weight is infeasible: the lowest candidate, 3-bit, needs 3"),
    (["--budget", "3.5", "--bits", "3,4,5,8"], "bit-width(s) 5 are not servable by gptqmodel"),
    (["--budget", "3.5", "--target", "vllm-gptq"], "budget 3.5 bits per weight is infeasible: the lowest candidate, 4-bit"),
    (["--budget", "3.5", "--target", "vllm", "--format", "gptq"],
     "budget 3.5 bits per weight is infeasible: the lowest candidate, 4-bit"),  # vLLM's GPTQ path: 4/8 bits
    (["--budget", "4", "--target", "llama.cpp", "--llama-cpp", "/nonexistent"],  # a GGUF export without template
     "--llama-cpp /nonexistent has no convert_hf_to_gguf.py"),
])
def test_run_refuses_infeasible_budgets_before_any_work(extra, message, tiny_model_dir, tmp_path, capsys, no_work):
    out = tmp_path / "run"
    expect_error(["run", "--model", str(tiny_model_dir), "--tasks", "gsm8k", "--output-dir", str(out), *extra],
                 message, capsys)


# ---- the group size on a model whose hidden size is not a multiple of 128 ----

def test_automatic_group_size_divides_every_input_size(tmp_path, capsys, data_dir):
    model_dir = tmp_path / "m96"
    tiny_llama(hidden=96).save_pretrained(model_dir)  # inputs 96 and 192: 128 and 64 do not divide 96
    byte_tokenizer().save_pretrained(model_dir)
    out = tmp_path / "q"
    code, stdout, err = run_cli(quantize_args(model_dir, out, "--format", "fp"), capsys)
    assert code == 0, err
    assert "group size 32 (auto)" in stdout
    assert json.loads((out / "quantize.json").read_text())["quant_spec"]["group_size"] == 32


def test_no_automatic_group_size_for_odd_input_sizes(tmp_path, capsys, data_dir):
    from transformers import LlamaConfig, LlamaForCausalLM

    model_dir = tmp_path / "odd"
    LlamaForCausalLM(LlamaConfig(vocab_size=260, hidden_size=72, intermediate_size=136, num_hidden_layers=1,
                                 num_attention_heads=4, num_key_value_heads=2)).save_pretrained(model_dir)
    byte_tokenizer().save_pretrained(model_dir)
    expect_error(quantize_args(model_dir, tmp_path / "q"),
                 "no group size of 128, 64, 32, 16 divides every input size (72, 136); pass --group-size", capsys)


# ---- JSON holds only finite numbers ----

def test_json_results_are_strict_json_with_non_finite_values_listed(tiny_model_dir, tmp_path, capsys, data_dir):
    res = tmp_path / "eval.json"
    code, _, err = run_cli(["eval", "--model", str(tiny_model_dir), "--tasks", "arc_easy", "--limit", "1",
                            "--output", str(res), "--quiet"], capsys)
    assert code == 0, err

    def refuse(token):
        raise AssertionError(f"non-standard JSON constant {token}")

    data = json.loads(res.read_text(), parse_constant=refuse)  # NaN/Infinity would fail here
    stderr_paths = [e["path"] for e in data["non_finite"]["values"]]
    assert ["results", "arc_easy", "acc_stderr"] in stderr_paths  # the standard error of one item
    assert data["results"]["arc_easy"]["acc_stderr"] is None
    from tasa.artifacts import read_json

    assert torch.isnan(torch.tensor(read_json(res)["results"]["arc_easy"]["acc_stderr"]))


def test_run_refuses_an_eval_limit_beyond_the_test_rows_before_any_work(tiny_model_dir, tmp_path, capsys, data_dir,
                                                                        no_work):
    expect_error(["run", "--model", str(tiny_model_dir), "--tasks", "arc_easy", "--budget", "3.5", "--calib",
                  "wikitext2", "--output-dir", str(tmp_path / "run")],
                 "--eval-limit 50 exceeds the 8 rows of arc_easy", capsys)
    assert not (tmp_path / "run").exists()


def test_run_budget_check_with_metadata_and_per_channel_groups_is_not_refused(tiny_model_dir, tmp_path, no_work):
    """Per-channel groups: metadata per weight depends on the input sizes, so the early bound skips it (the
    allocation checks it exactly): the run proceeds to its first expensive step."""
    with pytest.raises(AssertionError, match="expensive work started"):
        main(["run", "--model", str(tiny_model_dir), "--tasks", "gsm8k", "--budget", "3.5", "--group-size", "-1",
              "--budget-includes-metadata", "--calib", "wikitext2", "--output-dir", str(tmp_path / "run")])


def test_run_budget_check_counts_metadata_of_the_given_group_size(tiny_model_dir, tmp_path, capsys, no_work):
    expect_error(["run", "--model", str(tiny_model_dir), "--tasks", "gsm8k", "--budget", "3.2", "--group-size", "16",
                  "--budget-includes-metadata", "--output-dir", str(tmp_path / "run")],
                 "budget 3.2 bits per weight is infeasible: the lowest candidate, 3-bit, needs 4.188 with scale/zero",
                 capsys)


@pytest.mark.parametrize("device, message", [
    ("cuda:0,cpu", "--device: a list of devices names CUDA devices only (cuda:0,cuda:1), got 'cuda:0,cpu'"),
    ("cuda,cuda:0", "--device cuda,cuda:0: a device is named twice"),
])
def test_a_bad_device_list_is_refused_before_loading(tiny_model_dir, tmp_path, capsys, no_work, device, message):
    out = tmp_path / "q"
    expect_error(quantize_args(tiny_model_dir, out, "--device", device), message, capsys)
    assert not out.exists()
