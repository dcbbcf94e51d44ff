"""compressed-tensors export (issue 37): tasa's packing and config against the compressed-tensors library's own
decompression, for every bit-width and both grids; a whole checkpoint loaded by transformers through the library;
refusals named."""
import dataclasses
import json

import pytest
import torch

from tasa.config import QuantSpec
from tasa.errors import TasaError
from tasa.export.compressed_tensors import dequantize_module, pack_dense, pack_result, quantization_config, unpack_dense
from tasa.plan import Plan
from tasa.quant.gptq import gptq_quantize
from tasa.quant.rtn import rtn_quantize
from tests.unit.test_export_gptq import export, mixed_plan, reference
from tests.conftest import tiny_llama

ct = pytest.importorskip("compressed_tensors", reason="compressed-tensors is installed by make test (the test extra)")


def _scheme(bits, sym, gs):
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    args = QuantizationArgs(num_bits=bits, type="int", symmetric=sym, strategy="group" if gs != -1 else "channel",
                            group_size=gs if gs != -1 else None)
    return QuantizationScheme(targets=["m"], weights=args)


@pytest.mark.parametrize("bits", range(2, 9))
def test_packing_is_the_librarys_bit_for_bit(bits):
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    gen = torch.Generator().manual_seed(bits)
    for cols in (32, 45, 96):  # whole and partial 32-code blocks
        codes = torch.randint(0, 1 << bits, (7, cols), generator=gen)
        signed = (codes - (1 << (bits - 1))).to(torch.int8)
        assert torch.equal(pack_dense(codes, bits), pack_to_int32(signed, bits))
        assert torch.equal(unpack_dense(pack_dense(codes, bits), bits, cols), codes)
        assert torch.equal(pack_dense(codes.t(), bits).t(), pack_to_int32(signed, bits, packed_dim=0))


@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("gs", [32, -1])
def test_the_librarys_decompression_equals_tasas_weights(bits, sym, gs):
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor

    gen = torch.Generator().manual_seed(bits * 10 + sym)
    w = torch.randn(48, 96, generator=gen)
    x = torch.randn(256, 96, generator=gen)
    for result in (rtn_quantize(w, bits, gs, sym),
                   gptq_quantize(w, 2 / 256 * x.t() @ x, QuantSpec(bits=bits, group_size=gs, sym=sym))):
        state = {k[2:]: v for k, v in pack_result("m", result, sym).items()}
        assert ("weight_zero_point" in state) == (not sym)
        ref = result.dequantize().float()
        assert torch.equal(dequantize_module(lambda s: state[s], "m", bits, sym, gs), ref)  # tasa's reader
        lib = PackedQuantizationCompressor.decompress(state, _scheme(bits, sym, gs))["weight"]
        assert lib.dtype == torch.float16 and torch.equal(lib, ref.half())  # the float16 scales' own arithmetic
    if sym:  # the signed-max grid's negative scales are stored as they are, and decompress so
        assert (state["weight_scale"] < 0).any()


def test_refusals_name_the_module_and_the_reason():
    r = rtn_quantize(torch.randn(8, 64), 4, 32, True)
    r.g_idx = torch.arange(64).flip(0) // 32  # act-order: groups not in column order
    with pytest.raises(TasaError, match="m: its groups are not consecutive columns"):
        pack_result("m", r, True)
    plan = Plan({"a": QuantSpec(bits=4, group_size=32, act_order=True)}, method="gptq")
    with pytest.raises(TasaError, match="a: act-order groups cannot be written as compressed-tensors"):
        quantization_config(plan, ["a"])


def test_config_groups_one_per_grid_with_exact_targets_and_ignores():
    plan = Plan({"l.0.q": QuantSpec(bits=4, group_size=32), "l.0.k": QuantSpec(bits=4, group_size=32),
                 "l.0.o": QuantSpec(bits=8, group_size=32, sym=False)}, method="gptq")
    cfg = quantization_config(plan, ["l.0.q", "l.0.k", "l.0.o", "l.0.v"], {"l.0.q.weight": "x.q.weight"})
    assert cfg["quant_method"] == "compressed-tensors" and cfg["format"] == "pack-quantized"
    groups = {tuple(g["targets"]): g["weights"] for g in cfg["config_groups"].values()}
    assert groups == {("l.0.k", "x.q"): {"num_bits": 4, "type": "int", "symmetric": True, "dynamic": False,
                                         "strategy": "group", "group_size": 32},
                      ("l.0.o",): {"num_bits": 8, "type": "int", "symmetric": False, "dynamic": False,
                                   "strategy": "group", "group_size": 32}}
    assert cfg["ignore"] == ["lm_head", "l.0.v"]
    from compressed_tensors.quantization import QuantizationConfig

    QuantizationConfig.model_validate(cfg)  # the library accepts it


def test_a_mixed_checkpoint_loads_in_transformers_through_the_library(tmp_path):
    """transformers' compressed-tensors loader (the library's schemes and decompression) reads every module at its
    planned grid and gives tasa's weights and logits.  (Its ``dequantize=True`` shortcut is not used: transformers
    5.23 applies the first config group's scheme to every dense module there, wrong for mixed checkpoints.)"""
    from compressed_tensors.compressors.base import decompress_module
    from transformers import AutoModelForCausalLM

    from tasa.models import load

    model = tiny_llama(layers=2, hidden=64)
    plan = mixed_plan(model, sym=True)
    out, record = export(tmp_path, plan, export_format="compressed-tensors")
    cfg = json.loads((out / "config.json").read_text())["quantization_config"]
    assert cfg["quant_method"] == "compressed-tensors" and len(cfg["config_groups"]) == 4  # 2, 3, 4, 8 bits
    assert record["format"] == "compressed-tensors" and not (out / "quantize_config.json").exists()
    lib = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    mine = load(str(out)).model  # tasa's own reader of the format
    ref = reference(plan)
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(0))
    for name, spec in plan.modules.items():
        module = lib.get_submodule(name)
        w = module.quantization_scheme.weights
        assert (w.num_bits, w.symmetric, w.group_size) == (spec.bits, spec.sym, spec.group_size), name
        decompress_module(module)
        assert torch.equal(module.weight, ref.get_submodule(name).weight), name
        assert torch.equal(mine.get_submodule(name).weight, ref.get_submodule(name).weight), name
    fresh = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)  # decompressed by its forward hook
    with torch.no_grad():
        assert torch.equal(fresh(ids).logits, ref(ids).logits)


def test_an_asymmetric_mixed_checkpoint_decompresses_in_the_library_to_tasas_weights(tmp_path):
    """Asymmetric grids: the library matches every module to its config group and decompresses the packed zero
    points to tasa's weights.  (transformers 5.23 cannot load asymmetric group-wise pack-quantized checkpoints,
    the library's own included: it makes the zero point's parameter unpacked, (out, groups), and refuses the
    packed tensor.)"""
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationConfig, apply_quantization_config
    from safetensors.torch import load_file

    model = tiny_llama(layers=2, hidden=64)
    plan = mixed_plan(model, sym=False)
    out, _ = export(tmp_path, plan, export_format="compressed-tensors")
    cfg = QuantizationConfig.model_validate(json.loads((out / "config.json").read_text())["quantization_config"])
    skeleton = tiny_llama(layers=2, hidden=64)
    apply_quantization_config(skeleton, cfg)
    tensors = load_file(out / "model.safetensors")
    ref = reference(plan)
    for name, spec in plan.modules.items():
        scheme = skeleton.get_submodule(name).quantization_scheme
        assert (scheme.weights.num_bits, scheme.weights.symmetric) == (spec.bits, False), name
        state = {k[len(name) + 1:]: v for k, v in tensors.items() if k.startswith(name + ".")}
        assert "weight_zero_point" in state
        weight = PackedQuantizationCompressor.decompress(state, scheme)["weight"]
        assert torch.equal(weight, ref.get_submodule(name).weight.half()), name


def test_w8a8_modules_are_int_quantized_and_the_library_decompresses_them_to_tasas_weights(tmp_path):
    """--w8a8: the plan's 8-bit modules quantized per output channel and stored int-quantized (int8 weight, scale
    per channel, dynamic per-token int8 activations declared), the rest pack-quantized, one mixed-precision
    checkpoint; the library's decompression and tasa's reader both give the weights tasa quantized."""
    from compressed_tensors.compressors.naive_quantized.base import IntQuantizationCompressor
    from compressed_tensors.quantization import QuantizationConfig, apply_quantization_config
    from safetensors.torch import load_file

    from tasa.config import ExportSpec, QuantizeSpec, Runtime
    from tasa.models import load
    from tasa.pipeline import quantize
    from tests.conftest import byte_tokenizer

    model = tiny_llama(layers=2, hidden=64)
    plan = mixed_plan(model, sym=True)  # 2, 3, 4 and 8 bits, groups of 32
    src = tmp_path / "src"
    model.save_pretrained(src)
    byte_tokenizer().save_pretrained(src)
    plan.save(tmp_path / "plan.json")
    res = quantize(str(src), tmp_path / "w8a8", QuantizeSpec(scale_search=0), plan=tmp_path / "plan.json",
                   export=ExportSpec("compressed-tensors", "compressed-tensors", w8a8=True),
                   runtime=Runtime(progress=False))
    out = res.output_dir
    eight = sorted(n for n, s in plan.modules.items() if s.bits == 8)
    assert res.record["w8a8"] == eight and eight
    raw = json.loads((out / "config.json").read_text())["quantization_config"]
    assert raw["format"] == "mixed-precision"
    int_groups = [g for g in raw["config_groups"].values() if g["format"] == "int-quantized"]
    assert len(int_groups) == 1 and sorted(int_groups[0]["targets"]) == eight
    assert int_groups[0]["weights"]["strategy"] == "channel" and int_groups[0]["input_activations"]["dynamic"]
    cfg = QuantizationConfig.model_validate(raw)
    skeleton = tiny_llama(layers=2, hidden=64)
    apply_quantization_config(skeleton, cfg)
    tensors = load_file(out / "model.safetensors")
    per_channel = dataclasses.replace(plan, modules={n: dataclasses.replace(s, group_size=-1) if s.bits == 8 else s
                                                     for n, s in plan.modules.items()})
    ref = reference(per_channel)
    mine = load(str(out)).model
    for name in eight:
        state = {k[len(name) + 1:]: v for k, v in tensors.items() if k.startswith(name + ".")}
        assert state["weight"].dtype == torch.int8 and state["weight_scale"].shape == (state["weight"].shape[0], 1)
        scheme = skeleton.get_submodule(name).quantization_scheme
        assert scheme.input_activations.num_bits == 8 and scheme.input_activations.dynamic
        lib = IntQuantizationCompressor.decompress(state, scheme)["weight"]
        assert torch.equal(lib.float(), ref.get_submodule(name).weight.half().float()), name
    for name in plan.modules:
        assert torch.equal(mine.get_submodule(name).weight, ref.get_submodule(name).weight), name


def test_w8a8_refusals(tmp_path):
    from tasa.config import ExportSpec

    with pytest.raises(TasaError, match="--w8a8 is a compressed-tensors scheme, not one of gptq checkpoints"):
        ExportSpec("gptq", w8a8=True)
    plan = Plan({"m": QuantSpec(bits=8, group_size=32)})
    with pytest.raises(TasaError, match="m: W8A8 weights are 8-bit symmetric per output channel, not groups of 32"):
        quantization_config(plan, ["m"], w8a8=True)
    r = rtn_quantize(torch.randn(4, 64), 8, 32, True)
    with pytest.raises(TasaError, match="m: W8A8 stores 8-bit symmetric per-channel weights, not this 8-bit grid "
                                        "of 2 group"):
        pack_result("m", r, True, w8a8=True)
    from tasa.config import QuantizeSpec, Runtime
    from tasa.pipeline import quantize
    from tests.conftest import byte_tokenizer

    src = tmp_path / "src"
    tiny_llama(layers=2, hidden=64).save_pretrained(src)
    byte_tokenizer().save_pretrained(src)
    with pytest.raises(TasaError, match="--w8a8 writes the plan's 8-bit modules as W8A8, but it has none"):
        quantize(str(src), tmp_path / "q", QuantizeSpec(method="rtn", bits=4, group_size=32),
                 export=ExportSpec("compressed-tensors", "vllm", w8a8=True), runtime=Runtime(progress=False))
    with pytest.raises(TasaError, match="W8A8 weights are symmetric; this 8-bit grid is asymmetric"):
        quantize(str(src), tmp_path / "q", QuantizeSpec(method="rtn", bits=8, group_size=32, sym=False),
                 export=ExportSpec("compressed-tensors", "vllm", w8a8=True), runtime=Runtime(progress=False))
    assert not (tmp_path / "q").exists()
