"""GPTQ checkpoint export: exact round trip through tasa's loader, the config, refusals; GPTQModel load."""
import json
import subprocess
from pathlib import Path

import pytest
import torch

from tasa.config import QuantSpec
from tasa.errors import TasaError
from tasa.models.arch import resolve
from tasa.plan import Plan
from tests.conftest import byte_tokenizer, tiny_llama

ROOT = Path(__file__).resolve().parents[2]
MIXED = {"self_attn.q_proj": 4, "self_attn.k_proj": 4, "self_attn.v_proj": 4, "self_attn.o_proj": 8,
         "mlp.gate_proj": 3, "mlp.up_proj": 3, "mlp.down_proj": 2}


def mixed_plan(model, method="rtn", sym=True, skip=()):
    arch = resolve(model)
    return Plan({m.name: QuantSpec(bits=MIXED[m.local] if m.layer == 0 else 4, group_size=32, sym=sym)
                 for m in arch.modules if m.local not in skip}, method=method, meta={"target": "gptqmodel"})


def export(tmp_path, plan, name="ckpt", target=None, export_format="gptq", allow_ragged_groups=False,
           allow_partial_plan=False):
    from tasa.config import ExportSpec, QuantizeSpec, Runtime
    from tasa.pipeline import quantize

    src = tmp_path / "src"
    if not src.exists():
        tiny_llama(layers=2, hidden=64).save_pretrained(src)
        byte_tokenizer().save_pretrained(src)
    plan_file = tmp_path / f"{name}.plan.json"
    plan.save(plan_file)
    out = tmp_path / name
    res = quantize(str(src), out, QuantizeSpec(allow_ragged_groups=allow_ragged_groups, scale_search=0),  # plain grids
                   plan=plan_file, export=ExportSpec(export_format, target), runtime=Runtime(progress=False),
                   allow_partial_plan=allow_partial_plan)
    return out, res.record


def reference(plan):
    """The float model quantized in memory by the same plan (what tasa evaluates)."""
    from tasa.quant.apply import quantize_model

    model = tiny_llama(layers=2, hidden=64)
    quantize_model(model, resolve(model), plan, progress=False)
    return model


def test_export_round_trips_exactly_through_tasas_loader(tmp_path):
    from tasa.models import load

    plan = mixed_plan(tiny_llama(layers=2, hidden=64))
    out, s = export(tmp_path, plan)
    files = sorted(p.name for p in out.iterdir())
    assert {"config.json", "quantize_config.json", "model.safetensors", "plan.json", "README.md"} <= set(files)
    assert s["format"] == "gptq" and s["size_bytes"] > 0
    from safetensors import safe_open

    with safe_open(str(out / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
        assert f.get_tensor("model.layers.0.mlp.down_proj.qweight").dtype == torch.int32
        assert f.get_tensor("model.layers.0.mlp.down_proj.qweight").shape == (128 * 2 // 32, 64)
        assert f.get_tensor("model.layers.0.self_attn.q_proj.scales").dtype == torch.float16
        assert f.get_tensor("model.layers.0.self_attn.q_proj.g_idx").dtype == torch.int32
    assert "model.layers.0.mlp.down_proj.weight" not in keys and "model.embed_tokens.weight" in keys
    loaded = load(str(out)).model
    ref = reference(plan)
    for (k, a), (k2, b) in zip(sorted(loaded.state_dict().items()), sorted(ref.state_dict().items())):
        assert k == k2 and torch.equal(a, b), k
    ids = torch.randint(0, 260, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, ref(input_ids=ids).logits)


def test_quantize_config_default_and_dynamic_overrides(tmp_path):
    model = tiny_llama(layers=2, hidden=64)
    plan = mixed_plan(model, skip=("mlp.down_proj",))
    with pytest.raises(TasaError, match=r"the plan leaves 2 of the model's 14 quantizable linears unplanned "
                                        r"\(model.layers.0.mlp.down_proj, model.layers.1.mlp.down_proj\); pass "
                                        r"--allow-partial-plan"):
        export(tmp_path, plan, name="refused")
    out, s = export(tmp_path, plan, allow_partial_plan=True)
    # honest sizes: the two float32 down_proj (128 x 64 each) count at 32 bits among all 14 linears
    numels = {m.name: m.in_features * m.out_features for m in resolve(model).modules}
    planned = sum(numels[n] * q.bits for n, q in plan.modules.items())
    assert s["unquantized_modules"] == ["model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"]
    assert s["unquantized_bits"] == 32
    assert s["average_bits"] == pytest.approx((planned + 32 * 2 * 128 * 64) / sum(numels.values()))
    assert s["planned_average_bits"] == pytest.approx(planned / sum(numels[n] for n in plan.modules))
    qc = json.loads((out / "quantize_config.json").read_text())
    assert json.loads((out / "config.json").read_text())["quantization_config"] == qc
    assert (qc["bits"], qc["group_size"], qc["sym"], qc["desc_act"]) == (4, 32, True, False)
    assert qc["checkpoint_format"] == "gptq" and qc["quant_method"] == "gptq"
    dyn = qc["dynamic"]
    assert dyn[r"+:^model\.layers\.0\.self_attn\.o_proj$"] == {"bits": 8}
    assert dyn[r"+:^model\.layers\.0\.mlp\.gate_proj$"] == {"bits": 3}
    assert r"+:^model\.layers\.0\.self_attn\.q_proj$" not in dyn  # the default needs no override
    assert dyn[r"-:^model\.layers\.1\.mlp\.down_proj$"] == {}  # left in full precision
    from tasa.models import load

    ref = reference(plan)
    loaded = load(str(out)).model
    assert torch.equal(loaded.model.layers[1].mlp.down_proj.weight, ref.model.layers[1].mlp.down_proj.weight)


def test_asymmetric_plans_use_gptq_v2_and_round_trip(tmp_path):
    from tasa.models import load

    plan = mixed_plan(tiny_llama(layers=2, hidden=64), sym=False)
    out, _ = export(tmp_path, plan)
    assert json.loads((out / "quantize_config.json").read_text())["checkpoint_format"] == "gptq_v2"
    ref = reference(plan)
    assert all(torch.equal(a, b) for a, b in zip(load(str(out)).model.state_dict().values(), ref.state_dict().values()))


def test_unservable_plans_are_refused_before_quantizing(tmp_path):
    model = tiny_llama(layers=2, hidden=64)
    with pytest.raises(TasaError, match=r"not servable by vllm-gptq: model\.layers\.0\.mlp\.gate_proj: 3-bit, "
                                        r"but vllm-gptq serves only 4, 8-bit gptq weights"):
        export(tmp_path, mixed_plan(model), target="vllm")  # vLLM asked for GPTQ: its GPTQ path's rules
    with pytest.raises(TasaError, match=r"not servable by vllm: model\.layers\.0\.mlp\.gate_proj: asymmetric "
                                        r"3-bit grid, but vllm serves asymmetric grids only at 4, 8 bits \(and 2 more\)"):
        export(tmp_path, mixed_plan(model, sym=False), name="ct-asym", target="vllm", export_format=None)
    out, s = export(tmp_path, mixed_plan(model), name="ct", target="vllm", export_format=None)
    assert s["format"] == "compressed-tensors" and s["target"] == "vllm"  # the format vLLM serves mixes from
    five = Plan({m.name: QuantSpec(bits=5, group_size=32) for m in resolve(model).modules}, method="rtn")
    with pytest.raises(TasaError, match="5-bit.*--format fp"):
        export(tmp_path, five, name="five")
    out, s = export(tmp_path, five, name="five-fp", export_format="fp")
    assert s["format"] == "fp" and (out / "model.safetensors").is_file()


def test_gptqmodel_loads_the_mixed_checkpoint_with_matching_logits(tmp_path, gptqmodel_python):
    plan = mixed_plan(tiny_llama(layers=2, hidden=64))
    out, _ = export(tmp_path, plan)
    ids = torch.randint(0, 260, (2, 12), generator=torch.Generator().manual_seed(0))
    proc = subprocess.run([str(gptqmodel_python), str(ROOT / "tests" / "peers" / "gptqmodel_logits.py"), str(out),
                           json.dumps(ids.tolist())], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    want = {n: s.bits for n, s in plan.modules.items()}
    assert got["bits"] == want  # GPTQModel read every module's bit-width from 'dynamic'
    with torch.no_grad():
        ref = reference(plan)(input_ids=ids).logits
    diff = (torch.tensor(got["logits"]) - ref).abs().max().item()
    print(f"max |logits(GPTQModel fp16) - logits(tasa)| = {diff:.2e}")
    assert diff < 5e-3 * max(1.0, ref.abs().max().item())


def test_ragged_groups_round_trip(tmp_path):
    """Group size 48 on 64 and 128 input features: the last group of each row is shorter (g_idx says so)."""
    from safetensors import safe_open

    from tasa.models import load

    model = tiny_llama(layers=2, hidden=64)
    plan = Plan({m.name: QuantSpec(bits=[2, 3, 4, 8][m.layer * 2 % 4 + (m.local == "mlp.down_proj")], group_size=48)
                 for m in resolve(model).modules}, method="rtn")
    out, _ = export(tmp_path, plan, allow_ragged_groups=True)
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        g = f.get_tensor("model.layers.0.mlp.down_proj.g_idx")
        assert g.tolist() == [0] * 48 + [1] * 48 + [2] * 32
        assert f.get_tensor("model.layers.0.mlp.down_proj.scales").shape == (3, 64)
    ref = reference(plan)
    assert all(torch.equal(a, b) for a, b in zip(load(str(out)).model.state_dict().values(), ref.state_dict().values()))


@pytest.mark.parametrize("export_format", ["gptq", "compressed-tensors"])
def test_float_tensors_are_written_in_the_sources_half_dtype(tmp_path, export_format, data_dir):
    """A bfloat16 checkpoint quantized in float32: embeddings, head and norms are written in bfloat16 (auto), the
    packed linears are the same bytes as with --float-dtype float32, and the sizes say what each part takes."""
    from safetensors.torch import load_file

    from tasa.config import ExportSpec, QuantizeSpec, Runtime
    from tasa.models import load
    from tasa.pipeline import quantize

    src = tmp_path / "bf16"
    tiny_llama(layers=2, hidden=64).to(torch.bfloat16).save_pretrained(src)
    byte_tokenizer().save_pretrained(src)
    assert load(str(src)).source_dtype == torch.bfloat16
    outs = {d: quantize(str(src), tmp_path / d, QuantizeSpec(method="rtn", bits=4, group_size=32),
                        export=ExportSpec(export_format, float_dtype=d), runtime=Runtime(progress=False))
            for d in ("auto", "float32")}
    half, full = (load_file(outs[d].output_dir / "model.safetensors") for d in ("auto", "float32"))
    assert half["model.embed_tokens.weight"].dtype == torch.bfloat16
    assert half["model.layers.0.input_layernorm.weight"].dtype == torch.bfloat16
    assert full["model.embed_tokens.weight"].dtype == torch.float32
    assert torch.equal(half["model.embed_tokens.weight"], full["model.embed_tokens.weight"].to(torch.bfloat16))
    packed = [k for k in full if k.endswith((".qweight", ".scales", ".weight_packed", ".weight_scale"))]
    assert packed and all(torch.equal(half[k], full[k]) for k in packed)
    a, b = (outs[d].record for d in ("auto", "float32"))
    assert json.loads((outs["auto"].output_dir / "config.json").read_text())["dtype"] == "bfloat16"
    assert (a["float_dtype"], b["float_dtype"]) == ("bfloat16", "float32")
    assert a["packed_bytes"] == b["packed_bytes"] and a["size_bytes"] < b["size_bytes"]
    assert a["bits_per_weight_linears"] == pytest.approx(8 * a["packed_bytes"] / sum(
        resolve(tiny_llama(layers=2, hidden=64)).numels().values()))
    assert a["bits_per_weight_all"] < b["bits_per_weight_all"]
    assert load(str(outs["auto"].output_dir)).model(torch.tensor([[1, 2, 3]])).logits.isfinite().all()
