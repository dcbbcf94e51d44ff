"""tasa's GPTQ reader and writer against checkpoints GPTQModel 7.6.0 wrote (tests/fixtures/gptqmodel, made by
tools/make_gptqmodel_fixtures.py): symmetric and asymmetric grids at 2, 3, 4 and 8 bits, act-order g_idx, and
a mixed `dynamic` one with per-module bits, group sizes and a skipped module.  No peer is needed at test time.

- reader: tasa dequantizes every linear exactly as GPTQModel's TORCH kernel does (float16, bit for bit);
- writer: from the codes, zero points, scales and g_idx read out of GPTQModel's tensors, tasa packs qweight,
  qzeros, scales and g_idx bit for bit as GPTQModel did.
"""
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tasa.export.gptq import _module_grid, pack_result
from tasa.models.weights import open_weights
from tasa.export.pack import unpack_cols, unpack_rows
from tasa.quantized import QuantResult

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "gptqmodel"
NAMES = sorted(p.name for p in FIXTURES.iterdir() if p.is_dir())
LINEARS = [f"model.layers.0.{m}" for m in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                           "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")]


def test_the_fixtures_cover_what_they_claim():
    assert set(NAMES) == {"sym2", "sym3", "sym4", "sym8", "asym2", "asym3", "asym4", "asym8", "sym4_act_order",
                          "asym3_act_order", "mixed_dynamic"}
    for name in NAMES:
        qc = json.loads((FIXTURES / name / "quantize_config.json").read_text())
        assert qc["meta"]["quantizer"] == ["gptqmodel:7.6.0"] and qc["checkpoint_format"] == "gptq"
        assert qc["sym"] == (not name.startswith("asym")) and qc["desc_act"] == name.endswith("act_order")
    act = load_file(FIXTURES / "sym4_act_order" / "model.safetensors")["model.layers.0.mlp.down_proj.g_idx"]
    assert act.tolist() != sorted(act.tolist())  # a real act-order permutation of the groups


def grid(name: str, module: str) -> tuple[int, int, bool]:
    """(bits, group size, skipped) of a module by the fixture's config and its dynamic rules."""
    qc = json.loads((FIXTURES / name / "quantize_config.json").read_text())
    bits, skipped = _module_grid(qc, module)
    group = qc["group_size"]
    for pattern, over in (qc.get("dynamic") or {}).items():
        if pattern.startswith("+:") and __import__("re").match(pattern[2:], module):
            group = over.get("group_size", group)
            break
    return bits, group, skipped


@pytest.mark.parametrize("name", NAMES)
def test_reader_reproduces_gptqmodels_dequantized_weights_exactly(name):
    weights = open_weights(FIXTURES / name)
    state = {k: weights.get(k) for k in weights.keys()}
    expected = load_file(FIXTURES / name / "gptqmodel_dequantized.safetensors")
    assert set(expected) == {f"{m}.weight" for m in LINEARS}
    for key, want in expected.items():
        got = state[key].to(torch.float16)
        assert torch.equal(got, want), f"{name}: {key} differs in {(got != want).sum().item()} entries"


def test_mixed_dynamic_rules_are_read_per_module():
    assert [grid("mixed_dynamic", m)[:1] + grid("mixed_dynamic", m)[2:] for m in LINEARS] == [
        (4, False), (4, False), (3, False), (4, True), (8, False), (8, False), (2, False)]
    tensors = load_file(FIXTURES / "mixed_dynamic" / "model.safetensors")
    assert "model.layers.0.self_attn.o_proj.weight" in tensors  # skipped: kept as a float weight
    assert tensors["model.layers.0.mlp.down_proj.scales"].shape == (2, 64)  # group size 64 over 128 inputs


@pytest.mark.parametrize("name", NAMES)
def test_writer_packs_gptqmodels_codes_bit_for_bit(name):
    tensors = load_file(FIXTURES / name / "model.safetensors")
    fmt = json.loads((FIXTURES / name / "quantize_config.json").read_text())["checkpoint_format"]
    for module in LINEARS:
        bits, group, skipped = grid(name, module)
        if skipped:
            continue
        qweight, qzeros = tensors[f"{module}.qweight"], tensors[f"{module}.qzeros"]
        scales, g_idx = tensors[f"{module}.scales"], tensors[f"{module}.g_idx"]
        k, n = g_idx.numel(), scales.shape[1]
        codes = unpack_rows(qweight, bits, k).t()  # (out, in)
        stored = unpack_cols(qzeros, bits, n).t()  # (out, groups), as stored (zero point minus one for v1)
        zeros = (stored + 1) % (1 << bits)
        result = QuantResult(weight=torch.empty(0), codes=codes.to(torch.uint8), scales=scales.t().float(),
                             zeros=zeros.float(), g_idx=g_idx, bits=bits, group_size=group)
        packed = pack_result(module, result, fmt)
        for suffix, original in (("qweight", qweight), ("qzeros", qzeros), ("scales", scales), ("g_idx", g_idx)):
            mine = packed[f"{module}.{suffix}"]
            assert mine.dtype == original.dtype and torch.equal(mine, original), f"{name}: {module}.{suffix}"
