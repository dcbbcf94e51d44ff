import pytest
import torch

from tasa.models.arch import resolve
from tasa.models.walker import capture, capture_ids, input_groups, run_layer, walk
from tests.conftest import tiny_llama


def sliding_qwen3():
    """A tiny Qwen3 whose layers get different masks: sliding window 4 on layers 0 and 2, full attention on 1."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(0)
    cfg = Qwen3Config(vocab_size=260, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256,
                      use_sliding_window=True, sliding_window=4, max_window_layers=0,
                      layer_types=["sliding_attention", "full_attention", "sliding_attention"])
    return Qwen3ForCausalLM(cfg).eval()


def test_walking_a_model_with_per_layer_masks_reproduces_its_hidden_states():
    model = sliding_qwen3()
    arch = resolve(model)
    ids = torch.randint(0, 250, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        hs = model(input_ids=ids, output_hidden_states=True).hidden_states
        inputs = capture(model, arch, [{"input_ids": ids}])
        kw = inputs.kwargs[0]
        assert kw[0]["attention_mask"] is not None and kw[1]["attention_mask"] is None  # each layer its own mask
        assert torch.equal(inputs.hidden[0], hs[0])
        for layer in (0, 1):
            run_layer(arch.layers[layer], inputs, advance=True)
            assert torch.equal(inputs.hidden[0], hs[layer + 1]), layer
        # what a walker reusing layer 0's arguments for every layer would get wrong: the full-attention layer
        wrong = arch.layers[1](hs[1], **kw[0])
        assert (wrong - hs[2]).abs().max() > 1e-2


def test_run_layer_taps_see_module_inputs_and_stop_after_ends_the_pass():
    model = tiny_llama()
    arch = resolve(model)
    ids = torch.randint(0, 250, (5, 16), generator=torch.Generator().manual_seed(1))
    inputs = capture_ids(model, arch, ids, batch_size=2, device=torch.device("cpu"))
    assert [h.shape[0] for h in inputs.hidden] == [2, 2, 1]
    layer = arch.layers[0]
    with torch.no_grad():
        expected = layer.input_layernorm(torch.cat(inputs.hidden))
        seen = {"q": [], "down": []}
        run_layer(layer, inputs, {"self_attn.q_proj": seen["q"].append, "mlp.down_proj": seen["down"].append},
                  stop_after="self_attn.q_proj")
        assert torch.equal(torch.cat(seen["q"]), expected) and seen["down"] == []  # nothing ran past q_proj
        before = [h.clone() for h in inputs.hidden]
        run_layer(layer, inputs, {"mlp.down_proj": seen["down"].append})
        assert len(seen["down"]) == 3 and inputs.index == 0  # a pass without advance leaves the inputs
        assert all(torch.equal(a, b) for a, b in zip(before, inputs.hidden))
        run_layer(layer, inputs, advance=True)
        assert inputs.index == 1 and not torch.equal(inputs.hidden[0], before[0])
    with pytest.raises(ValueError, match="stops early"):
        run_layer(layer, inputs, {"self_attn.q_proj": print}, stop_after="self_attn.q_proj", advance=True)


def test_walk_yields_every_layer_in_order_and_input_groups_follow_execution():
    model = tiny_llama(layers=3)
    arch = resolve(model)
    inputs = capture_ids(model, arch, torch.randint(0, 250, (2, 8)), batch_size=2, device=torch.device("cpu"))
    seen = []
    with torch.no_grad():
        for index, layer in walk(arch, torch.device("cpu")):
            assert layer is arch.layers[index]
            groups = input_groups(layer, [m.local for m in arch.layer_modules(index)], inputs)
            seen.append(index)
            run_layer(layer, inputs, advance=True)
    assert seen == [0, 1, 2] and inputs.index == 3
    assert groups == [["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], ["self_attn.o_proj"],
                      ["mlp.gate_proj", "mlp.up_proj"], ["mlp.down_proj"]]


def test_a_layer_producing_nan_is_an_error():
    from tasa.errors import TasaError

    model = tiny_llama()
    arch = resolve(model)
    inputs = capture_ids(model, arch, torch.randint(0, 250, (2, 8)), batch_size=2, device=torch.device("cpu"))
    with torch.no_grad():
        arch.layers[0].mlp.down_proj.weight[0, 0] = float("nan")
        with pytest.raises(TasaError, match="decoder layer 0 produced NaN/Inf"):
            run_layer(arch.layers[0], inputs, advance=True)
