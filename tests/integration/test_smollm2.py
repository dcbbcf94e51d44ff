"""Integration tests on the real embedded SmolLM2-135M (30 layers, hidden 576)."""
import math
import time

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
    t0 = time.perf_counter()
    lm = load("smollm2-135m")
    lm.load_seconds = time.perf_counter() - t0
    return lm


def test_embedded_model_loads_from_cache(smollm):
    cfg = smollm.model.config
    assert (cfg.model_type, cfg.num_hidden_layers, cfg.hidden_size) == ("llama", 30, 576)
    assert smollm.path.startswith(str(cache_dir()))
    assert next(smollm.model.parameters()).dtype == torch.float32
    assert smollm.load_seconds < 15  # cached float safetensors, no GGUF dequantization (~20 s)


def test_walker_on_smollm2(smollm):
    arch = resolve(smollm.model)
    assert arch.source == "spec" and arch.num_layers == 30 and len(arch.modules) == 210
    assert len(arch.fusion_groups()) == 60
    assert sum(arch.numels().values()) == 30 * (576 * 576 * 2 + 576 * 192 * 2 + 576 * 1536 * 3)


def test_fp_perplexity_in_expected_range(smollm, wiki_text):
    r = perplexity(smollm.model, smollm.tokenizer, wiki_text, seqlen=512, limit=2, progress=False)
    assert r.tokens == 2 * 511
    assert 10 < r.ppl < 60 and math.isfinite(r.nll)


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
