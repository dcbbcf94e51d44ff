"""Integration tests on the real embedded SmolLM2-135M (30 layers, hidden 576)."""
import math

import pytest
import torch

from tasa.config import CalibSpec, QuantSpec
from tasa.data import build_calibration, eval_texts
from tasa.eval.perplexity import perplexity
from tasa.models import load, resolve
from tasa.models.loading import cache_dir
from tasa.plan import Plan
from tasa.quant.apply import quantize_model
from tasa.quant.gptq import accumulate_hessian, gptq_quantize, make_empty_hessian
from tasa.quant.rtn import rtn_quantize

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def wiki_text():
    return "\n\n".join(eval_texts("wikitext2"))


@pytest.fixture(scope="module")
def smollm():
    load("smollm2-135m")  # first load may convert the GGUF file into the cache
    return load("smollm2-135m")


def test_embedded_model_loads_from_cache(smollm, monkeypatch):
    cfg = smollm.model.config
    assert (cfg.model_type, cfg.num_hidden_layers, cfg.hidden_size) == ("llama", 30, 576)
    assert smollm.path.startswith(str(cache_dir()))
    assert next(smollm.model.parameters()).dtype == torch.float32
    # a second load reads the float cache: the GGUF file is not dequantized again (its time: benchmarks/timings.py)
    from transformers import AutoModelForCausalLM

    real = AutoModelForCausalLM.from_pretrained

    def no_gguf(*args, **kwargs):
        assert "gguf_file" not in kwargs, "the GGUF file was converted again"
        return real(*args, **kwargs)

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", no_gguf)
    assert load("smollm2-135m").path == smollm.path


def test_walker_on_smollm2(smollm):
    arch = resolve(smollm.model)
    assert arch.source == "spec" and arch.num_layers == 30 and len(arch.modules) == 210
    assert len(arch.fusion_groups()) == 60
    assert sum(arch.numels().values()) == 30 * (576 * 576 * 2 + 576 * 192 * 2 + 576 * 1536 * 3)


def test_fp_perplexity_is_the_recorded_value(smollm, wiki_text):
    """Float32 on CPU is deterministic at a fixed thread count; other thread counts change summation order only."""
    r = perplexity(smollm.model, smollm.tokenizer, wiki_text, seqlen=512, limit=2, progress=False)
    assert r.tokens == 2 * 511
    assert r.nll == pytest.approx(3.340476795651908, rel=1e-5)  # recorded 2026-12-03 (2 windows of 512)
    assert r.ppl == pytest.approx(math.exp(r.nll), rel=1e-12)


def test_gptq_beats_rtn_on_a_real_layer(smollm):
    """||W X - Q X|| of GPTQ is at most RTN's on SmolLM2's layer-0 q/k/v and real calibration inputs."""
    calib = build_calibration(smollm.tokenizer, CalibSpec(nsamples=8, seqlen=256))
    layer = smollm.model.model.layers[0]
    with torch.no_grad():
        x = layer.input_layernorm(smollm.model.model.embed_tokens(calib.input_ids)).reshape(-1, 576)
    h = make_empty_hessian(576)
    accumulate_hessian(h, 0, x)
    for name in ("q_proj", "k_proj", "v_proj"):
        w = getattr(layer.self_attn, name).weight.detach()
        for bits in (3, 4):
            g = gptq_quantize(w, h, QuantSpec(bits=bits, group_size=64))
            r = rtn_quantize(w, bits, 64, True)
            assert (x @ (w - g.weight).t()).norm() < (x @ (w - r.weight).t()).norm(), (name, bits)


def test_gptq_w3_model_perplexity_below_rtn_w3(wiki_text):
    ppl = {}
    for method in ("rtn", "gptq"):
        lm = load("smollm2-135m")
        arch = resolve(lm.model)
        calib = build_calibration(lm.tokenizer, CalibSpec(nsamples=8, seqlen=128))
        plan = Plan.uniform([m.name for m in arch.modules], QuantSpec(bits=3, group_size=64), method=method)
        quantize_model(lm.model, arch, plan, calib.input_ids, batch_size=8, progress=False)
        ppl[method] = perplexity(lm.model, lm.tokenizer, wiki_text, seqlen=512, limit=2, progress=False).ppl
        del lm
    assert ppl["gptq"] < ppl["rtn"], ppl


def test_arc_easy_log_likelihoods_equal_lm_eval(smollm):
    """Per-choice log-likelihoods of the first ARC-Easy test rows, as lm-eval 0.4.13 computed them
    (benchmarks/peers/lmeval_run.py, float32, CPU), and the same acc/acc_norm decisions."""
    from tasa.eval.runner import run_task
    from tasa.eval.tasks import get_task

    lm_eval = [([-23.543302536010742, -34.062965393066406, -32.448570251464844, -29.223970413208008], 1.0, 1.0),
               ([-15.36277961730957, -16.443944931030273, -15.42611312866211, -21.408184051513672], 0.0, 0.0),
               ([-21.121482849121094, -25.087493896484375, -23.08160400390625, -20.192562103271484], 1.0, 1.0)]
    res = run_task(smollm.model, smollm.tokenizer, get_task("arc_easy"), limit=3, progress=False)
    for s, (lls, acc, acc_norm) in zip(res.samples, lm_eval):
        assert s["lls"] == pytest.approx(lls, abs=2e-3)
        assert (s["acc"], s["acc_norm"]) == (acc, acc_norm)


def test_gsm8k_five_shot_generation_and_gold_nll(smollm):
    from tasa.eval.runner import run_task
    from tasa.eval.tasks import get_task

    res = run_task(smollm.model, smollm.tokenizer, get_task("gsm8k"), limit=2, batch_size=2, progress=False)
    assert res.metrics["n"] == 2
    assert all(s["response"].strip() and "Question:" not in s["response"] for s in res.samples)
    # nats per gold-solution token in the 5-shot context, recorded 2026-12-03
    assert res.metrics["gold_nll"] == pytest.approx(1.4784611693216025, rel=1e-5)
    assert res.metrics["gold_tokens"] == 109


def test_hessian_trace_mixture_curve_on_smollm2(smollm, tmp_path):
    """On the real model, with a task sample far smaller than the down_proj input (1,536), the closed-form
    Hessian-trace curve is convex and blows up towards task-only calibration."""
    from tasa.config import MixtureSpec, Runtime
    from tasa.mixture.search import search

    spec = MixtureSpec(tasks=("gsm8k",), criteria=("hessian-trace",), ratios=(0, 0.5, 1), nsamples=4, seqlen=128,
                       heldout_samples=4, damping_study=False)
    s = search(smollm, None, spec, 64, Runtime(batch_size=4, progress=False))
    ht = s["results"]["hessian-trace"]
    assert ht["convex"] and ht["blowup_ratio"] > 2
    assert len(ht["per_layer"]) == 30 and len(ht["inputs"]) == 120
    values = dict(zip((w[0] for w in s["grid"]), ht["values"]))
    assert values[0.0] > values[0.5] and s["calib"] != "gsm8k:1"


def test_a_gguf_sources_float_tensors_are_exported_in_float16(smollm, tmp_path):
    """SmolLM2 comes from a GGUF file: its tied 49152 x 576 embedding and its norms are written in float16, the
    GGUF's own float type, not in the float32 it is computed in (which made the 4-bit checkpoint 3x larger)."""
    from safetensors import safe_open

    from tasa.config import ExportSpec, QuantizeSpec, Runtime
    from tasa.pipeline import quantize

    assert smollm.source_dtype == torch.float16
    res = quantize(smollm, tmp_path / "q", QuantizeSpec(method="rtn", bits=4, group_size=64), export=ExportSpec(),
                   runtime=Runtime(progress=False))
    with safe_open(str(res.output_dir / "model.safetensors"), "pt") as f:
        assert f.get_slice("model.embed_tokens.weight").get_dtype() == "F16"
        assert f.get_slice("model.norm.weight").get_dtype() == "F16"
    r = res.record
    assert r["float_dtype"] == "float16"
    embed = 49152 * 576
    assert r["float_bytes"] == pytest.approx(2 * embed, rel=0.02)  # the embedding is nearly all of it
    assert 4.0 < r["bits_per_weight_linears"] < 4.6  # 4 bits plus fp16 scales and packed zeros per 64
    assert r["size_bytes"] == pytest.approx(r["packed_bytes"] + 2 * embed, rel=0.01)  # in float32: +113 MB


def test_a_hugging_face_model_exported_to_gguf_through_llama_cpps_converter(smollm, tmp_path, llama_cpp_dir):
    """SmolLM2 as a Hugging Face directory, exported to GGUF with llama.cpp's own converter making the template:
    the quantized tensors are the bytes the export from its GGUF file holds, the tokenizer and chat template the
    same, the float tensors the same values in the converter's 16-bit type, and the template is gone."""
    import gguf
    import numpy as np

    from tasa.config import ExportSpec, QuantizeSpec, Runtime
    from tasa.pipeline import quantize

    spec = QuantizeSpec(method="rtn", bits=4, group_size=32)
    via = quantize(smollm.path, tmp_path / "hf", spec, runtime=Runtime(progress=False),
                   export=ExportSpec(format="gguf", target="llama.cpp", llama_cpp=str(llama_cpp_dir)))
    own = quantize("smollm2-135m", tmp_path / "gguf", spec, runtime=Runtime(progress=False),
                   export=ExportSpec(format="gguf", target="llama.cpp"))
    a, b = (gguf.GGUFReader(r.output_dir / "model.gguf") for r in (via, own))
    ta, tb = ({t.name: t for t in r.tensors} for r in (a, b))
    assert sorted(ta) == sorted(tb)
    quantized = [n for n, t in tb.items() if t.tensor_type.name == "Q4_0"]
    assert len(quantized) == 210
    for name, t in tb.items():
        if name in quantized:
            assert ta[name].tensor_type.name == "Q4_0" and np.array_equal(ta[name].data, t.data), name
        else:  # the converter's 16-bit copy (norms: float32) of what the GGUF source holds
            assert ta[name].tensor_type.name in ("F16", "BF16", "F32"), name
            want = gguf.quants.dequantize(t.data, t.tensor_type)
            got = gguf.quants.dequantize(ta[name].data, ta[name].tensor_type)
            np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-4 * np.abs(want).max(), err_msg=name)
    for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.chat_template",
                "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id", "llama.block_count"):
        assert a.fields[key].contents() == b.fields[key].contents(), key
    assert a.fields["tokenizer.ggml.pre"].contents() == "smollm"
    assert "convert_hf_to_gguf.py" in via.record["gguf_template"]
    assert not list(tmp_path.glob(".hf.tmp-*"))  # the converted template was removed
