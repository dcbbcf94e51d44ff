"""GGUF inputs converted one tensor at a time (issue 36): the same float checkpoint, config, generation config and
tokenizer as transformers' whole-model GGUF loading writes, for a dense LLaMA and a Qwen3-MoE (stacked experts
written back under their per-expert names), in bounded shards; a GGUF lacking a tensor the model needs is named."""
import json

import pytest
import torch

from tasa.errors import TasaError
from tasa.models.gguf_input import convert_gguf
from tests.unit.test_export_gguf import tiny_gguf, write_gguf

gguf = pytest.importorskip("gguf")


def _whole(path):
    """transformers' own GGUF loading, the whole model at once, saved as tasa saved it before."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    model.hf_quantizer = None
    del model.config.quantization_config
    return model


def _tiny_qwen3_moe(path):
    """A Qwen3-MoE GGUF (transformers reads no expert width from GGUF metadata: its default, 768, is used)."""
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    torch.manual_seed(0)
    cfg = Qwen3MoeConfig(vocab_size=260, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, head_dim=16, intermediate_size=128, moe_intermediate_size=768,
                         num_experts=4, num_experts_per_tok=2, max_position_embeddings=256, norm_topk_prob=True)
    model = Qwen3MoeForCausalLM(cfg).eval()
    return write_gguf(model, path, "qwen3moe", key_length=16)


@pytest.mark.parametrize("kind", ["llama", "qwen3moe"])
def test_streamed_conversion_writes_what_transformers_whole_loading_gives(tmp_path, kind):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = tiny_gguf(tmp_path / "tiny.gguf") if kind == "llama" else _tiny_qwen3_moe(tmp_path / "moe.gguf")
    out = tmp_path / "out"
    convert_gguf(src, out, max_shard_bytes=300_000)
    shards = sorted(out.glob("*.safetensors"))
    assert len(shards) > 1 and (out / "model.safetensors.index.json").is_file()  # bounded shards
    whole = _whole(src)
    got = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    want = whole.state_dict()
    assert sorted(got.state_dict()) == sorted(want)
    for k, v in got.state_dict().items():
        assert torch.equal(v, want[k]), k
    whole.save_pretrained(tmp_path / "old")
    AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name).save_pretrained(tmp_path / "old")
    for f in ("config.json", "generation_config.json", "tokenizer_config.json"):
        assert json.loads((out / f).read_text()) == json.loads((tmp_path / "old" / f).read_text()), f
    keys = set().union(*(load_file(s).keys() for s in shards))
    if kind == "qwen3moe":  # per-expert names, as the hub holds them and tasa's streamed reader reads them
        assert "model.layers.1.mlp.experts.3.down_proj.weight" in keys
        assert not any(k.endswith("gate_up_proj") for k in keys)
        from tasa.models import load

        streamed = load(str(out), stream=True).model  # reads the experts by those names, layer by layer
        ids = torch.randint(0, 256, (1, 12), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            torch.testing.assert_close(streamed(ids).logits, whole(ids).logits, rtol=0, atol=1e-5)
    else:
        assert keys == set(load_file(next((tmp_path / "old").glob("*.safetensors"))).keys())


def test_a_gguf_without_a_tensor_the_model_needs_is_named(tmp_path):
    src = tiny_gguf(tmp_path / "tiny.gguf")
    reader = gguf.GGUFReader(src)
    cut = gguf.GGUFWriter(tmp_path / "cut.gguf", "llama")
    from tasa.export.gguf import copy_metadata

    copy_metadata(reader, cut)
    for t in reader.tensors:
        if t.name != "blk.1.ffn_up.weight":
            cut.add_tensor(t.name, t.data, raw_dtype=t.tensor_type)
    cut.write_header_to_file()
    cut.write_kv_data_to_file()
    cut.write_tensors_to_file()
    cut.close()
    with pytest.raises(TasaError, match=r"cut.gguf: it holds no tensor for model.layers.1.mlp.up_proj.weight of LlamaForCausalLM"):
        convert_gguf(tmp_path / "cut.gguf", tmp_path / "out")
