import pytest
import torch
import torch.nn as nn
import transformers

from tasa.errors import TasaError
from tasa.models.arch import SPECS, resolve

SMALL = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64)

FAMILIES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "mistral": ("MistralConfig", "MistralForCausalLM", {}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {"head_dim": 8}),
    "gemma": ("GemmaConfig", "GemmaForCausalLM", {"head_dim": 8}),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", {"head_dim": 8}),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", {"pad_token_id": 0}),
}


def build(family: str) -> nn.Module:
    cfg_name, cls_name, extra = FAMILIES[family]
    cfg = getattr(transformers, cfg_name)(**SMALL, **extra)
    torch.manual_seed(0)
    return getattr(transformers, cls_name)(cfg)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_walker_finds_layers_linears_and_fusion_groups(family):
    model = build(family)
    arch = resolve(model)
    assert arch.source == "spec" and arch.model_type == family
    assert arch.num_layers == 2
    per_layer = len(SPECS[family].linears)
    assert len(arch.modules) == 2 * per_layer
    names = {n for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    assert {m.name for m in arch.modules} == names - {"lm_head"}  # lm_head (and embeddings) excluded
    for m in arch.modules:
        lin = model.get_submodule(m.name)
        assert (m.in_features, m.out_features) == (lin.in_features, lin.out_features)
    groups = arch.fusion_groups()
    if family == "phi3":
        assert groups == []  # q/k/v and gate/up are already single fused linears
        assert "model.layers.1.self_attn.qkv_proj" in names
    else:
        assert ("model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.k_proj",
                "model.layers.1.self_attn.v_proj") in groups
        assert ("model.layers.0.mlp.gate_proj", "model.layers.0.mlp.up_proj") in groups
        assert len(groups) == 4


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = nn.ModuleDict({"q_proj": nn.Linear(8, 8), "k_proj": nn.Linear(8, 8), "v_proj": nn.Linear(8, 8)})
        self.ffn = nn.ModuleDict({"w1": nn.Linear(8, 16), "w3": nn.Linear(8, 16), "w2": nn.Linear(16, 8)})


class Custom(nn.Module):
    def __init__(self, n=3):
        super().__init__()
        self.embed = nn.Embedding(10, 8)
        self.heads = nn.ModuleList([nn.Linear(8, 2), nn.Conv1d(1, 1, 1)])  # mixed: not decoder layers
        self.backbone = nn.Module()
        self.backbone.blocks = nn.ModuleList([Block() for _ in range(n)])
        self.out = nn.Linear(8, 10)


def test_generic_fallback_discovers_blocks_and_fusion_by_name():
    arch = resolve(Custom())
    assert arch.source == "discovered"
    assert arch.spec.layers_path == "backbone.blocks"
    assert arch.num_layers == 3
    assert arch.spec.linears == ("attn.q_proj", "attn.k_proj", "attn.v_proj", "ffn.w1", "ffn.w3", "ffn.w2")
    assert arch.spec.fusion_groups == (("attn.q_proj", "attn.k_proj", "attn.v_proj"), ("ffn.w1", "ffn.w3"))
    assert "out" not in {m.name for m in arch.modules}


def test_gpt2_conv1d_layout_gives_clear_error():
    cfg = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=64, n_positions=32)
    with pytest.raises(TasaError, match="could not find decoder layers.*nn.Linear"):
        resolve(transformers.GPT2LMHeadModel(cfg))


def test_spec_mismatch_names_missing_module():
    model = build("llama")
    model.model.layers[1].mlp.down_proj = nn.Identity()
    with pytest.raises(TasaError, match="layer 1 has no nn.Linear 'mlp.down_proj'"):
        resolve(model)


def test_numels_and_layer_modules():
    arch = resolve(build("llama"))
    numels = arch.numels()
    assert numels["model.layers.0.mlp.down_proj"] == 64 * 32
    assert [m.local for m in arch.layer_modules(1)] == list(SPECS["llama"].linears)


def test_a_large_weight_the_walker_does_not_cover_is_refused_by_name():
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**SMALL))
    for layer in model.model.layers:  # e.g. a fused-expert tensor of a layout tasa does not know
        layer.mlp.register_parameter("packed_experts", nn.Parameter(torch.zeros(4, 64, 32)))
    with pytest.raises(TasaError, match=r"model\.layers\.0\.mlp\.packed_experts \(4, 64, 32\) holds \d+% "
                                        r"of a decoder layer's weights but is not an nn.Linear"):
        resolve(model)
