"""GGUF export (issue 37): every GGML type tasa writes decodes, by gguf-py's own dequantization, to exactly tasa's
weights; the two-level (K-quant) grid; llama.cpp's serving rules; a whole tiny GGUF model quantized, written and
read back by transformers' GGUF loader equal to tasa's dequantized model, its metadata and tokenizer carried."""
import json

import numpy as np
import pytest
import torch

from tasa.allocate.targets import LLAMA_CPP_ASYM_GRIDS, LLAMA_CPP_GRIDS, TARGETS, check_servable, violations
from tasa.config import CalibSpec, ExportSpec, QuantizeSpec, QuantSpec, Runtime
from tasa.errors import TasaError
from tasa.export.gguf import encode, ggml_type
from tasa.quant.gptq import accumulate_hessian, gptq_quantize, make_empty_hessian
from tasa.quant.rtn import rtn_quantize
from tests.conftest import tiny_llama

gguf = pytest.importorskip("gguf")
TYPES = {t: (g, bpw) for table in (LLAMA_CPP_GRIDS, LLAMA_CPP_ASYM_GRIDS) for _, (g, t, bpw) in table.items()}


def _weight(seed: int, rows: int = 6, cols: int = 512) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g) * 0.02
    w[1, :48] = 0  # all-zero groups (and, for the K types, a group whose integer scale is 0)
    w[2, 256:] *= 1e-3  # a super-block far smaller than the row's others
    return w


def _hessian(cols: int, seed: int) -> torch.Tensor:
    """From correlated inputs, as a layer's are (GPTQ gains little on white ones)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(4 * cols, cols // 8, generator=g) @ torch.randn(cols // 8, cols, generator=g)
    x += 0.3 * torch.randn(4 * cols, cols, generator=g)
    h = make_empty_hessian(cols)
    accumulate_hessian(h, 0, x)
    return h


@pytest.mark.parametrize("type_name", sorted(TYPES))
@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_every_type_decodes_to_tasas_weights_exactly(type_name, method):
    spec, bpw = TYPES[type_name]
    w = _weight(len(type_name) + spec.bits)
    if method == "rtn":
        r = rtn_quantize(w, spec.bits, spec.group_size, spec.sym, spec.super_group, spec.scale_bits)
    else:
        r = gptq_quantize(w, _hessian(w.shape[1], 1), spec)
    assert ggml_type(spec) == type_name
    data = encode(r, type_name)
    assert data.dtype == np.uint8 and data.shape == (w.shape[0], w.shape[1] * bpw / 8)  # bits per weight, honest
    back = gguf.quants.dequantize(data, gguf.GGMLQuantizationType[type_name])
    assert np.array_equal(back.astype(np.float32), r.weight.numpy())
    order = np.array([3, 0, 5, 1, 4, 2])  # GGUF row i = tasa row order[i] (llama.cpp's q/k row permutation)
    back = gguf.quants.dequantize(encode(r, type_name, order), gguf.GGMLQuantizationType[type_name])
    assert np.array_equal(back.astype(np.float32), r.weight.numpy()[order])


@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_two_level_grid_is_a_super_scale_times_integers(method):
    spec = QuantSpec(bits=3, group_size=16, super_group=256, scale_bits=6)
    w = _weight(7)
    r = (rtn_quantize(w, 3, 16, True, 256, 6) if method == "rtn" else gptq_quantize(w, _hessian(512, 2), spec))
    k = r.scales / r.super_scales.repeat_interleave(16, dim=1)
    assert torch.equal(k, k.round()) and k.min() >= -32 and k.max() <= 31
    assert torch.equal(r.super_scales, r.super_scales.half().float())  # fp16 super-scales
    assert int(r.codes.max()) <= 7 and torch.equal(r.dequantize(), r.weight)
    assert torch.all(r.weight[1, :16] == 0)  # an all-zero group stays zero (k = 0 or its codes at the zero point)
    assert (k == -32).any(dim=1).all()  # each row's largest group scale sits on the grid's end


@pytest.mark.parametrize("method", ["rtn", "gptq"])
@pytest.mark.parametrize("bits,group,scale_bits", [(4, 32, 6), (2, 16, 4)])
def test_asymmetric_two_level_grid_is_super_scales_and_mins_times_unsigned_integers(method, bits, group, scale_bits):
    spec = QuantSpec(bits=bits, group_size=group, sym=False, super_group=256, scale_bits=scale_bits)
    w = _weight(8)
    r = rtn_quantize(w, bits, group, False, 256, scale_bits) if method == "rtn" else gptq_quantize(
        w, _hessian(512, 4), spec)
    top = 2 ** scale_bits - 1
    for per_group, super_ in ((r.scales, r.super_scales), (r.mins, r.super_mins)):
        k = per_group / super_.repeat_interleave(256 // group, dim=1)
        assert torch.equal(k, k.round()) and k.min() >= 0 and k.max() <= top
        assert (k == top).any(dim=1).all() or per_group is r.mins  # each row's largest scale on the grid's end
        assert torch.equal(super_, super_.half().float()) and (super_ > 0).all()
    assert int(r.codes.max()) <= 2 ** bits - 1 and torch.equal(r.dequantize(), r.weight)
    assert torch.equal(r.zeros, torch.zeros_like(r.zeros))
    assert torch.all(r.weight[1, :32] == 0)  # an all-zero group stays zero: its min and its codes are 0
    assert (r.weight - w).abs().max() < 2.2 * (r.scales.max() / 2 + 1e-9)  # within about half a step, clipping aside


@pytest.mark.parametrize("sym,bits,group,scale_bits", [(True, 3, 16, 6), (False, 4, 32, 6)])
def test_gptq_on_the_two_level_grid_lowers_the_weighted_error(sym, bits, group, scale_bits):
    spec = QuantSpec(bits=bits, group_size=group, sym=sym, super_group=256, scale_bits=scale_bits)
    w, h = _weight(9), _hessian(512, 3)
    err = lambda q: torch.trace((q - w) @ h @ (q - w).T).item()  # noqa: E731
    rtn = rtn_quantize(w, bits, group, sym, 256, scale_bits).weight
    assert err(gptq_quantize(w, h, spec).weight) < 0.8 * err(rtn)


def test_bad_two_level_specs_are_refused():
    with pytest.raises(TasaError, match="several groups"):
        QuantSpec(bits=3, group_size=16, super_group=16)
    from tasa.quant.learned import LearnedGrid
    with pytest.raises(TasaError, match="learned rounding does not take asymmetric two-level grids"):
        LearnedGrid(torch.randn(4, 256), QuantSpec(bits=4, group_size=32, sym=False, super_group=256))
    with pytest.raises(TasaError, match="multiple of the 256-column super-group"):
        rtn_quantize(torch.randn(4, 320), 3, 16, True, 256, 6)
    assert "super_group" not in QuantSpec(bits=4).to_dict()  # one-level plans: unchanged files


def test_llama_cpp_rules_name_the_module_and_the_rule():
    tgt = TARGETS["llama.cpp"]
    assert tgt.format == "gguf" and tgt.spec(4, 64) == QuantSpec(bits=4, group_size=32)
    ok = {"a": tgt.spec(3, 64), "b": tgt.spec(8, 64)}
    assert violations(ok, tgt, (), {"a": 512, "b": 64}) == []
    bad = violations({"a": QuantSpec(bits=4, group_size=64)}, tgt, ())
    assert bad == ["a: 4-bit grid with groups of 64, but llama.cpp serves 4 bits only on the grid groups of 32, "
                   "symmetric (allocate with --target llama.cpp)"]
    assert violations({"a": tgt.spec(3, 64)}, tgt, (), {"a": 576}) == [
        "a: 576 input features, but its 3-bit grid needs a multiple of 256"]
    with pytest.raises(TasaError, match="7-bit, but llama.cpp serves only 2, 3, 4, 5, 6, 8-bit gguf"):
        check_servable({"a": QuantSpec(bits=7, group_size=32)}, tgt, ())
    with pytest.raises(TasaError, match="a: symmetric 2-bit grid, but llama.cpp serves 2 bits only on an asymmetric "
                                        r"grid \(--asym\)"):
        check_servable({"a": QuantSpec(bits=2, group_size=32)}, tgt, ())
    with pytest.raises(TasaError, match="no GGUF type"):
        ggml_type(QuantSpec(bits=4, group_size=128))
    # asymmetric: Q2_K, Q4_K, Q5_K; the other bit-widths of an asymmetric plan on the symmetric types
    asym = {b: tgt.spec(b, 64, sym=False) for b in (2, 3, 4, 5, 6, 8)}
    assert [ggml_type(asym[b]) for b in sorted(asym)] == ["Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q8_0"]
    assert violations({"a": QuantSpec(bits=4, group_size=32, sym=False)}, tgt, ()) == [
        "a: 4-bit asymmetric grid with groups of 32, but llama.cpp serves 4 bits only on the grid groups of 32 in "
        "super-groups of 256 with 6-bit group scales, asymmetric (allocate with --target llama.cpp)"]
    assert violations({"a": asym[4]}, tgt, (), {"a": 576}) == [
        "a: 576 input features, but its 4-bit grid needs a multiple of 256"]
    # a width no K type takes: the symmetric type (Q4_0) where there is one, unservable at 2 bits (Q2_K only)
    assert ggml_type(tgt.spec(4, 64, False, 576)) == "Q4_0" and ggml_type(tgt.spec(4, 64, False, 512)) == "Q4_K"
    assert tgt.fits(4, [576, 512], sym=False) and tgt.fits(2, [512], sym=False) and not tgt.fits(2, [576], False)


# ---- a whole model: a tiny GGUF source, quantized by tasa, written as GGUF, read back by transformers ----------

def tiny_gguf(path, seed: int = 0, hidden: int = 128):
    """A tiny random LLaMA (hidden 128, MLP 256: the down projection can take the K types) as a GGUF file with a
    byte-level BPE tokenizer, written by gguf-py the way llama.cpp's converter lays LLaMA out (q/k rows
    permuted)."""
    return write_gguf(tiny_llama(seed=seed, hidden=hidden), path, "llama")


def write_gguf(model, path, arch: str, key_length: int | None = None):
    """``model`` (LLaMA, or a transformers-5 mixture of experts: Mixtral as llama.cpp's ``llama``, Qwen3-MoE as
    ``qwen3moe``) as a float32 GGUF laid out as llama.cpp's converter does it: q/k rows permuted for ``llama``, a
    layer's routed experts one (experts, rows, columns) tensor per projection, the router ``ffn_gate_inp``."""
    from tokenizers.pre_tokenizers import ByteLevel

    cfg = model.config
    w = gguf.GGUFWriter(path, arch)
    w.add_name(f"tiny-{arch}")
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_freq_base(10000.0)
    w.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    if key_length:
        w.add_key_length(key_length)
        w.add_value_length(key_length)
    experts = getattr(cfg, "num_local_experts", None) or getattr(cfg, "num_experts", None)
    if experts:
        w.add_expert_count(experts)
        w.add_expert_used_count(cfg.num_experts_per_tok)
    tokens = sorted(ByteLevel.alphabet()) + ["<s>", "</s>", "<unk>", "<pad>"]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([1] * 256 + [3] * 4)
    w.add_token_scores([0.0] * len(tokens))
    w.add_token_merges([])
    w.add_bos_token_id(256)
    w.add_eos_token_id(257)
    w.add_chat_template("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    names = gguf.get_tensor_name_map(next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch),
                                     cfg.num_hidden_layers)
    for key, t in model.state_dict().items():
        a = t.numpy()
        if key.endswith("experts.gate_up_proj"):  # (experts, 2 x intermediate, hidden): gate rows, then up rows
            half = a.shape[1] // 2
            for role, part in (("gate_proj", a[:, :half]), ("up_proj", a[:, half:])):
                w.add_tensor(names.get_name(key.replace("gate_up_proj", role)) + ".weight", np.ascontiguousarray(part))
            continue
        stem, suffix = key.rsplit(".", 1) if key.endswith(".weight") else (key, "")
        name = names.get_name(stem) + (f".{suffix}" if suffix else ".weight")
        if arch == "llama" and (".attn_q." in name or ".attn_k." in name):  # llama.cpp's convert_hf_to_gguf permute
            heads = cfg.num_attention_heads if ".attn_q." in name else cfg.num_key_value_heads
            a = a.reshape(heads, 2, a.shape[0] // heads // 2, *a.shape[1:]).swapaxes(1, 2).reshape(a.shape)
        w.add_tensor(name, np.ascontiguousarray(a))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _mixed_plan(path, model_path):
    """Every GGUF type: attention 4/5/8 bits, gate/up 4, down 3 in layer 0 and 6 in layer 1."""
    from tasa.models import load, resolve
    from tasa.plan import Plan

    arch = resolve(load(str(model_path)).model)
    tgt = TARGETS["llama.cpp"]
    bits = {"q_proj": 4, "k_proj": 8, "v_proj": 5, "o_proj": 4, "gate_proj": 4, "up_proj": 8}
    modules = {m.name: tgt.spec(bits.get(m.local.split(".")[-1]) or (3 if m.layer == 0 else 6), 0)
               for m in arch.modules}
    Plan(modules, method="rtn", meta={"target": "llama.cpp"}).save(path)
    return path


def _fields(path):
    reader = gguf.GGUFReader(path)
    return {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}, reader


def _assert_gguf_is_the_float_export(gguf_dir, fp_dir):
    """transformers' reading of ``gguf_dir``/model.gguf has exactly the tensors of the float export in ``fp_dir``."""
    from transformers import AutoModelForCausalLM

    got = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file="model.gguf", dtype=torch.float32).state_dict()
    want = AutoModelForCausalLM.from_pretrained(fp_dir, dtype=torch.float32).state_dict()
    assert sorted(got) == sorted(want)
    for k in want:
        assert torch.equal(got[k], want[k]), k


def test_tiny_gguf_model_round_trips_through_transformers(tmp_path, monkeypatch):
    from tasa.pipeline.quantize import quantize

    monkeypatch.setenv("TASA_CACHE_DIR", str(tmp_path / "cache"))
    src = tiny_gguf(tmp_path / "tiny.gguf")
    plan = _mixed_plan(tmp_path / "plan.json", src)
    out = quantize(str(src), tmp_path / "q", plan=plan, export=ExportSpec(format="gguf")).output_dir
    fp = quantize(str(src), tmp_path / "fp", plan=plan,
                  export=ExportSpec(format="fp", float_dtype="float32")).output_dir
    _assert_gguf_is_the_float_export(out, fp)
    fields, reader = _fields(out / "model.gguf")
    src_fields, src_reader = _fields(src)
    assert {k: v for k, v in fields.items() if k not in ("general.file_type", "general.quantized_by")} == {
        k: v for k, v in src_fields.items() if k != "general.file_type"}  # metadata, tokenizer, template carried
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert types["blk.0.ffn_down.weight"] == "Q3_K" and types["blk.1.ffn_down.weight"] == "Q6_K"
    assert types["blk.0.attn_q.weight"] == "Q4_0" and types["blk.1.attn_k.weight"] == "Q8_0"
    assert types["blk.0.attn_v.weight"] == "Q5_0"
    raw = {t.name: t.data for t in src_reader.tensors}
    for t in reader.tensors:  # the tensors tasa does not quantize: the source's bytes
        if types[t.name] == "F32":
            assert np.array_equal(t.data, raw[t.name]), t.name
    record = json.loads((out / "quantize.json").read_text())
    assert record["gguf_types"] == {k: v for k, v in types.items() if v != "F32"}
    assert record["size_bytes"] == (out / "model.gguf").stat().st_size
    lines = (out / "llama-quantize-tensor-types.txt").read_text().split()
    assert "blk\\.0\\.ffn_down\\.weight=q3_k" in lines and len(lines) == 14
    again = quantize(str(out), tmp_path / "again", QuantizeSpec(method="rtn", bits=4), export=ExportSpec(format="fp"))
    assert again.record["model"] == str(out)  # a GGUF export's directory loads as a model


def test_gguf_export_needs_a_gguf_source_and_gguf_grids(tmp_path, tiny_model_dir, monkeypatch):
    from tasa.pipeline.quantize import quantize

    monkeypatch.setenv("TASA_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("LLAMA_CPP_DIR", raising=False)
    with pytest.raises(TasaError, match="pass --gguf-template FILE .* or --llama-cpp DIR"):
        quantize(str(tiny_model_dir), tmp_path / "a", QuantizeSpec(method="rtn", bits=4, group_size=32),
                 export=ExportSpec(format="gguf", target="llama.cpp"))
    monkeypatch.setenv("LLAMA_CPP_DIR", str(tmp_path))
    with pytest.raises(TasaError, match=r"\$LLAMA_CPP_DIR .* has no convert_hf_to_gguf.py"):
        quantize(str(tiny_model_dir), tmp_path / "a", QuantizeSpec(method="rtn", bits=4, group_size=32),
                 export=ExportSpec(format="gguf", target="llama.cpp"))
    with pytest.raises(TasaError, match="--gguf-template nothing.gguf: no such .gguf file"):
        quantize(str(tiny_model_dir), tmp_path / "a", QuantizeSpec(method="rtn", bits=4, group_size=32),
                 export=ExportSpec(format="gguf", target="llama.cpp", gguf_template="nothing.gguf"))
    src = tiny_gguf(tmp_path / "tiny.gguf")
    with pytest.raises(TasaError, match="128 input features, but its 3-bit grid needs a multiple of 256"):
        quantize(str(src), tmp_path / "b", QuantizeSpec(method="rtn", bits=3, group_size=16),
                 export=ExportSpec(format="gguf", target="llama.cpp"))
    out = quantize(str(src), tmp_path / "c", QuantizeSpec(method="rtn", bits=4, group_size=128),
                   export=ExportSpec(target="llama.cpp"))  # the target's format and its one 4-bit grid: Q4_0
    assert set(json.loads((out.output_dir / "quantize.json").read_text())["gguf_types"].values()) == {"Q4_0"}


# ---- a Hugging Face model exported to GGUF: its metadata and float tensors from a GGUF of the same model ---------

def _hf_dir_of(gguf_file, tmp_path):
    """The tiny GGUF model as a Hugging Face directory (safetensors, config, tokenizer)."""
    from tasa.models import load

    lm = load(str(gguf_file))
    out = tmp_path / f"hf-{gguf_file.stem}"
    lm.model.save_pretrained(out)
    lm.tokenizer.save_pretrained(out)
    return out


def test_hf_model_with_a_gguf_template_writes_the_same_file_as_the_gguf_source(tmp_path, monkeypatch):
    from tasa.pipeline.quantize import quantize

    monkeypatch.setenv("TASA_CACHE_DIR", str(tmp_path / "cache"))
    src = tiny_gguf(tmp_path / "tiny.gguf")
    hf = _hf_dir_of(src, tmp_path)
    plan = _mixed_plan(tmp_path / "plan.json", src)
    from_gguf = quantize(str(src), tmp_path / "a", plan=plan, export=ExportSpec(format="gguf"))
    from_hf = quantize(str(hf), tmp_path / "b", plan=plan, export=ExportSpec(format="gguf", gguf_template=str(src)))
    assert (from_hf.output_dir / "model.gguf").read_bytes() == (from_gguf.output_dir / "model.gguf").read_bytes()
    streamed = quantize(str(hf), tmp_path / "s", plan=plan, runtime=Runtime(stream="on"),
                        export=ExportSpec(format="gguf", gguf_template=str(src)))  # the template checked, streamed
    assert streamed.record["streamed"]
    assert (streamed.output_dir / "model.gguf").read_bytes() == (from_gguf.output_dir / "model.gguf").read_bytes()
    assert from_hf.record["gguf_template"] == "tiny.gguf"
    assert "from tiny.gguf" in (from_hf.output_dir / "README.md").read_text()


def test_a_gguf_template_of_another_model_is_refused_naming_the_tensor(tmp_path, monkeypatch):
    from tasa.pipeline.quantize import quantize

    monkeypatch.setenv("TASA_CACHE_DIR", str(tmp_path / "cache"))
    hf = _hf_dir_of(tiny_gguf(tmp_path / "tiny.gguf"), tmp_path)
    q4 = QuantizeSpec(method="rtn", bits=4, group_size=32)
    other = tiny_gguf(tmp_path / "other-seed.gguf", seed=1)  # same shapes, other weights (norms: all ones in both)
    with pytest.raises(TasaError, match="other-seed.gguf is not this model's GGUF: output.weight differs from "
                                        "lm_head.weight"):
        quantize(str(hf), tmp_path / "c", q4, export=ExportSpec(format="gguf", target="llama.cpp",
                                                                gguf_template=str(other)))
    narrow = tiny_gguf(tmp_path / "narrow.gguf", hidden=64)
    with pytest.raises(TasaError, match="narrow.gguf is not this model's GGUF: output.weight is 260 x 64, "
                                        "lm_head 260 x 128"):
        quantize(str(hf), tmp_path / "c", q4, export=ExportSpec(format="gguf", target="llama.cpp",
                                                                gguf_template=str(narrow)))
    assert not list(tmp_path.glob(".c.tmp-*"))  # nothing left behind


def test_a_failing_converter_is_reported_in_one_line_and_leaves_nothing(tmp_path, monkeypatch, tiny_model_dir):
    from tasa.pipeline.quantize import quantize

    monkeypatch.setenv("TASA_CACHE_DIR", str(tmp_path / "cache"))
    fake = tmp_path / "llama.cpp"
    fake.mkdir()
    (fake / "convert_hf_to_gguf.py").write_text(
        "import sys\nprint('INFO: loading', file=sys.stderr)\n"
        "print('NotImplementedError: BPE pre-tokenizer was not recognized', file=sys.stderr)\nsys.exit(1)\n")
    with pytest.raises(TasaError, match=f"llama.cpp's convert_hf_to_gguf.py could not convert {tiny_model_dir}: "
                                        "NotImplementedError: BPE pre-tokenizer was not recognized"):
        quantize(str(tiny_model_dir), tmp_path / "d", QuantizeSpec(method="rtn", bits=4, group_size=32),
                 export=ExportSpec(format="gguf", target="llama.cpp", llama_cpp=str(fake)))
    assert not list(tmp_path.glob(".d.tmp-*"))


def test_asymmetric_k_types_through_the_pipeline_read_back_by_transformers(tmp_path, monkeypatch, data_dir):
    """--asym on llama.cpp: the down projections (256 inputs) on Q4_K, the others (128) on Q4_0; a plan with Q2_K
    and Q5_K; GPTQ on the asymmetric two-level grid; transformers' GGUF loader reads tasa's weights exactly."""
    from tasa.models import load, resolve
    from tasa.pipeline.quantize import quantize
    from tasa.plan import Plan

    monkeypatch.setenv("TASA_CACHE_DIR", str(tmp_path / "cache"))
    src = tiny_gguf(tmp_path / "tiny.gguf")
    q4 = QuantizeSpec(method="rtn", bits=4, sym=False, group_size=32)
    out = quantize(str(src), tmp_path / "u", q4, calib=None, export=ExportSpec(target="llama.cpp"))
    types = out.record["gguf_types"]
    assert {t for n, t in types.items() if "ffn_down" in n} == {"Q4_K"}
    assert {t for n, t in types.items() if "ffn_down" not in n} == {"Q4_0"}
    assert out.record["quant_spec"] is None and out.record["plan_bits"] == [4]  # two grids: no one quant_spec
    arch = resolve(load(str(src)).model)
    tgt = TARGETS["llama.cpp"]
    modules = {m.name: tgt.spec((2 if m.layer == 0 else 5) if "down_proj" in m.name else 8, 0, False,
                                m.in_features) for m in arch.modules}
    Plan(modules, method="gptq", meta={"target": "llama.cpp"}).save(tmp_path / "plan.json")
    calib = CalibSpec.parse("wikitext2", nsamples=4, seqlen=32)
    got_dir = quantize(str(src), tmp_path / "k", plan=tmp_path / "plan.json", calib=calib,
                       export=ExportSpec(format="gguf")).output_dir
    fp_dir = quantize(str(src), tmp_path / "fp", plan=tmp_path / "plan.json", calib=calib,
                      export=ExportSpec(format="fp", float_dtype="float32")).output_dir
    types = json.loads((got_dir / "quantize.json").read_text())["gguf_types"]
    assert types["blk.0.ffn_down.weight"] == "Q2_K" and types["blk.1.ffn_down.weight"] == "Q5_K"
    assert types["blk.0.attn_q.weight"] == "Q8_0"
    _assert_gguf_is_the_float_export(got_dir, fp_dir)


@pytest.mark.parametrize("start,output_kl", [("gptq", True), ("rtn", False)])
def test_learned_rounding_on_llama_cpp_grids_is_what_the_gguf_holds(tmp_path, monkeypatch, data_dir, start, output_kl):
    """Learned rounding on llama.cpp's symmetric grids, Q3_K (two-level) and Q6_K down projections, Q4_0 elsewhere:
    from GPTQ with the last layer on the output KL (the better quantizer) and from RTN.  The GGUF holds exactly the
    weights of the same quantization exported as float.  (On this random model GPTQ's 4-bit result is not beaten in
    a few steps, so only the start from RTN is asked to keep what it learned.)"""
    from tasa.models import load, resolve
    from tasa.pipeline.quantize import quantize
    from tasa.plan import Plan

    monkeypatch.setenv("TASA_CACHE_DIR", str(tmp_path / "cache"))
    src = tiny_gguf(tmp_path / "tiny.gguf")
    arch = resolve(load(str(src)).model)
    tgt = TARGETS["llama.cpp"]
    modules = {m.name: tgt.spec((3 if m.layer == 0 else 6) if "down_proj" in m.name else 4, 0) for m in arch.modules}
    Plan(modules, method="gptq", meta={"target": "llama.cpp"}).save(tmp_path / "plan.json")
    spec = QuantizeSpec(learn_rounding=16, learn_start=start, learn_output_kl=output_kl)

    def run(name, fmt):
        return quantize(str(src), tmp_path / name, spec, plan=tmp_path / "plan.json",
                        calib=CalibSpec.parse("wikitext2", nsamples=4, seqlen=32),
                        export=ExportSpec(format=fmt, **({"float_dtype": "float32"} if fmt == "fp" else {})))

    got, fp = run("k", "gguf"), run("fp", "fp")
    quantizer = got.record["quantizer"]
    assert quantizer.startswith("learned rounding (16 steps per layer)") and ("from GPTQ" in quantizer) == (start == "gptq")
    assert {v for k, v in got.record["gguf_types"].items() if "ffn_down" in k} == {"Q3_K", "Q6_K"}
    learned = got.record["learned_rounding"]
    assert learned["layers"] == {i: {**x, "seconds": learned["layers"][i]["seconds"]}  # the same learning, bar time
                                 for i, x in fp.record["learned_rounding"]["layers"].items()}
    assert (learned.get("last_layer_objective") is not None) == output_kl
    assert start == "gptq" or any(x["kept"] for x in learned["layers"].values())
    _assert_gguf_is_the_float_export(got.output_dir, fp.output_dir)


# ---- mixture of experts: a layer's routed experts of one projection are one 3-D GGUF tensor of one type ----------

@pytest.mark.parametrize("kind,arch", [("mixtral", "llama"), ("qwen3_moe", "qwen3moe")])
def test_moe_experts_are_stacked_into_one_tensor_per_projection_of_one_type(tmp_path, monkeypatch, data_dir, kind,
                                                                            arch):
    """A tiny Mixtral (llama.cpp's ``llama``) and Qwen3-MoE with a GGUF template: each layer's experts written as
    ``ffn_{gate,up,down}_exps`` (experts, rows, columns) at the layer's type, gguf-py's dequantization of every
    expert equal to tasa's weights; streamed, the same bytes; experts of one projection on two grids refused by the
    rules (at allocation and export)."""
    from tasa.models import load, resolve
    from tasa.pipeline.quantize import quantize
    from tasa.plan import Plan
    from tests.conftest import byte_tokenizer
    from tests.unit.test_moe import tiny_moe

    monkeypatch.setenv("TASA_CACHE_DIR", str(tmp_path / "cache"))
    model = tiny_moe(kind)
    hf = tmp_path / kind
    model.save_pretrained(hf)
    byte_tokenizer().save_pretrained(hf)
    template = write_gguf(model, tmp_path / f"{kind}.gguf", arch)
    arch_ = resolve(load(str(hf)).model)
    tgt = TARGETS["llama.cpp"]
    modules = {m.name: tgt.spec(8 if "self_attn" in m.name else (4 if m.layer == 0 else 8), 0) for m in arch_.modules}
    Plan(modules, method="gptq", meta={"target": "llama.cpp"}).save(tmp_path / "plan.json")
    calib = CalibSpec.parse("wikitext2", nsamples=4, seqlen=32)
    export = ExportSpec(format="gguf", gguf_template=str(template))
    got = quantize(str(hf), tmp_path / "q", plan=tmp_path / "plan.json", calib=calib, export=export)
    fp = quantize(str(hf), tmp_path / "fp", plan=tmp_path / "plan.json", calib=calib,
                  export=ExportSpec(format="fp", float_dtype="float32"))
    reader = gguf.GGUFReader(got.output_dir / "model.gguf")
    tensors = {t.name: t for t in reader.tensors}
    assert tensors["blk.0.ffn_gate_exps.weight"].tensor_type.name == "Q4_0"
    assert tensors["blk.1.ffn_down_exps.weight"].tensor_type.name == "Q8_0"
    assert tensors["blk.0.ffn_gate_inp.weight"].tensor_type.name == "F32"  # the router: the template's own
    assert not any(".experts." in n or n.startswith("blk.0.ffn_gate.") for n in tensors)
    want = load(str(fp.output_dir)).model
    for layer in range(2):
        for role, short in (("gate_proj", "gate"), ("up_proj", "up"), ("down_proj", "down")):
            t = tensors[f"blk.{layer}.ffn_{short}_exps.weight"]
            deq = gguf.quants.dequantize(t.data, t.tensor_type).reshape(4, *t.data.shape[1:-1], -1)
            for e in range(4):
                ref = want.get_submodule(f"model.layers.{layer}.mlp.experts.{e}.{role}").weight
                assert np.array_equal(deq[e], ref.detach().numpy()), (layer, role, e)
    assert got.record["gguf_types"]["blk.1.ffn_up_exps.weight"] == "Q8_0"
    streamed = quantize(str(hf), tmp_path / "s", plan=tmp_path / "plan.json", calib=calib, export=export,
                        runtime=Runtime(stream="on"))
    assert (streamed.output_dir / "model.gguf").read_bytes() == (got.output_dir / "model.gguf").read_bytes()

    mixed = dict(modules)
    mixed["model.layers.0.mlp.experts.1.up_proj"] = tgt.spec(8, 0)
    rule = r"model.layers.0.mlp.experts.\*.up_proj: routed experts on different grids \(4-bit, 8-bit\), but llama.cpp"
    with pytest.raises(TasaError, match=rule):
        check_servable(mixed, tgt, [])
    Plan(mixed, method="rtn", meta={"target": "llama.cpp"}).save(tmp_path / "mixed.json")
    with pytest.raises(TasaError, match=rule):
        quantize(str(hf), tmp_path / "m", plan=tmp_path / "mixed.json", export=export)
    assert not (tmp_path / "m").exists()


def test_an_expert_stack_quantized_in_part_is_refused_naming_the_tensor():
    from tasa.export.gguf import TensorMap, plan_types

    spec = TARGETS["llama.cpp"].spec(4, 0)
    names = {f"model.layers.0.mlp.experts.{e}.up_proj": "blk.0.ffn_up_exps.weight" for e in range(3)}
    tmap = TensorMap(names, dict.fromkeys(names), {m: e for e, m in enumerate(names)})
    assert set(plan_types({m: spec for m in names}, tmap, "src.gguf").values()) == {"Q4_0"}
    with pytest.raises(TasaError, match=r"blk.0.ffn_up_exps.weight: llama.cpp stores the 3 routed experts of this "
                                        r"projection as one tensor of one type, but the plan gives them Q4_0, "
                                        r"unquantized"):
        plan_types({m: spec for m in list(names)[:2]}, tmap, "src.gguf")
