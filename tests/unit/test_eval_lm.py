"""Log-likelihood and generation engine on a tiny random model: equal to a direct forward pass."""
import pytest
import torch
import torch.nn.functional as F

from tasa.errors import TasaError
from tasa.eval.lm import dense_head_input, encode_pair, greedy_generate, loglikelihoods
from tests.conftest import tiny_llama

REQUESTS = [
    ("Question: what is a cat?\nAnswer:", " a mat"),
    ("Question: what is a cat?\nAnswer:", " the river runs"),
    ("Question: what is a cat?\nAnswer:", " a"),
    ("Q: apples\nA:", " seven twelve"),
    ("", "hello there"),  # empty context -> EOS
    ("trailing space ", "moves"),
    ("x", "y"),  # one-token context: an empty cache prefix
]


def direct(model, tok, context, continuation):
    ctx, cont = encode_pair(tok, context, continuation)
    ids = torch.tensor([ctx + cont])
    with torch.no_grad():
        logp = F.log_softmax(model(ids).logits[0, :-1].float(), -1)
    tgt = torch.tensor(cont)
    return float(logp[len(ctx) - 1:].gather(-1, tgt[:, None]).sum()), bool((logp[len(ctx) - 1:].argmax(-1) == tgt).all())


def test_encode_pair_moves_trailing_whitespace_and_uses_eos_for_empty_context(tokenizer):
    ctx, cont = encode_pair(tokenizer, "ab ", "c")
    assert tokenizer.decode(ctx) == "ab" and tokenizer.decode(cont) == " c"
    ctx, cont = encode_pair(tokenizer, "", "hi")
    assert ctx == [tokenizer.eos_token_id] and tokenizer.decode(cont) == "hi"


@pytest.mark.parametrize("prefix_cache", [True, False])
@pytest.mark.parametrize("batch_size", [1, 3, 16])
def test_loglikelihoods_equal_direct_forward(tokenizer, prefix_cache, batch_size):
    model = tiny_llama()
    expected = [direct(model, tokenizer, c, x) for c, x in REQUESTS]
    got = loglikelihoods(model, tokenizer, REQUESTS, batch_size, prefix_cache=prefix_cache, progress=False)
    for r, (lp, greedy), (c, x) in zip(got, expected, REQUESTS):
        assert r.logprob == pytest.approx(lp, abs=1e-4)
        assert r.is_greedy == greedy
        assert r.tokens == len(encode_pair(tokenizer, c, x)[1])


def test_loglikelihoods_truncate_long_requests_on_the_left(tokenizer):
    model = tiny_llama(max_pos=32)
    ctx, cont = "w" * 50, " end"
    (r,) = loglikelihoods(model, tokenizer, [(ctx, cont)], progress=False)
    c, x = encode_pair(tokenizer, ctx, cont)
    whole = (c + x)[-33:]
    with torch.no_grad():
        logp = F.log_softmax(model(torch.tensor([whole[:-1]])).logits[0].float(), -1)
    want = float(logp[-len(x):].gather(-1, torch.tensor(x)[:, None]).sum())
    assert r.logprob == pytest.approx(want, abs=1e-4)


def test_loglikelihood_errors(tokenizer):
    model = tiny_llama()
    with pytest.raises(TasaError, match="batch size"):
        loglikelihoods(model, tokenizer, REQUESTS, 0, progress=False)
    with pytest.raises(TasaError, match="encodes to no tokens"):
        loglikelihoods(model, tokenizer, [("abc", "")], progress=False)


def test_greedy_generation_batched_equals_unbatched_and_matches_manual_argmax(tokenizer):
    model = tiny_llama(seed=3)
    contexts = ["the cat sat", "questions about apples and oranges", "seven"]
    one = greedy_generate(model, tokenizer, contexts, [], max_new_tokens=6, batch_size=1, progress=False)
    many = greedy_generate(model, tokenizer, contexts, [], max_new_tokens=6, batch_size=3, progress=False)
    assert one == many
    ids = tokenizer(contexts[1], add_special_tokens=False).input_ids
    with torch.no_grad():
        for _ in range(6):
            nxt = int(model(torch.tensor([ids])).logits[0, -1].argmax())
            if nxt == tokenizer.eos_token_id:
                break
            ids.append(nxt)
    n_ctx = len(tokenizer(contexts[1], add_special_tokens=False).input_ids)
    assert one[1] == tokenizer.decode(ids[n_ctx:], skip_special_tokens=True)


def test_generation_cuts_at_stop_strings(tokenizer):
    model = tiny_llama(seed=3)
    full = greedy_generate(model, tokenizer, ["the cat sat"], [], max_new_tokens=8, progress=False)[0]
    assert len(full) >= 3
    stop = full[2]
    cut = greedy_generate(model, tokenizer, ["the cat sat"], [stop], max_new_tokens=8, progress=False)[0]
    assert cut == full.split(stop)[0]
    with pytest.raises(TasaError, match="max new tokens"):
        greedy_generate(model, tokenizer, ["x"], [], max_new_tokens=0, progress=False)


def test_rows_that_stop_early_leave_the_batch_without_changing_the_others(tokenizer):
    model = tiny_llama(seed=3)
    contexts = ["the cat sat", "questions about apples and oranges", "seven", "rivers and mountains"]
    free = greedy_generate(model, tokenizer, contexts, [], max_new_tokens=10, batch_size=1, progress=False)
    stop = free[1][1]  # the second row stops after its first character; the others run on
    one = greedy_generate(model, tokenizer, contexts, [stop], max_new_tokens=10, batch_size=1, progress=False)
    many = greedy_generate(model, tokenizer, contexts, [stop], max_new_tokens=10, batch_size=4, progress=False)
    assert one == many == [f.split(stop)[0] for f in free]
    assert len(many[1]) == 1 and max(len(x) for x in many) > 1


def test_greedy_generation_equals_transformers_generate(tokenizer):
    model = tiny_llama(seed=5)
    ids = tokenizer("questions about apples", add_special_tokens=False, return_tensors="pt").input_ids
    ref = model.generate(ids, do_sample=False, max_new_tokens=8, pad_token_id=tokenizer.eos_token_id,
                         eos_token_id=None)
    want = tokenizer.decode(ref[0, ids.shape[1]:].tolist(), skip_special_tokens=True)
    got = greedy_generate(model, tokenizer, ["questions about apples"], [], max_new_tokens=8, progress=False)[0]
    assert got == want


def _dense(t):
    return list(t.stride()) == list(torch.empty(t.shape).stride())


def test_head_reads_a_dense_input_where_only_the_last_position_is_kept(tokenizer):
    """logits_to_keep=1 hands the head a strided view of the last position, which torch's CPU bfloat16 linear
    multiplies ~100x slower when the weight needs no gradient; generation and the prefix pass densify it."""
    model = tiny_llama(seed=3).to(torch.bfloat16).requires_grad_(False)
    seen = []
    model.lm_head.register_forward_hook(lambda m, a, o: seen.append(a[0]))  # after any pre-hook
    ids = torch.randint(0, 200, (3, 7))
    with torch.no_grad():
        plain = model(input_ids=ids, logits_to_keep=1).logits
        assert not _dense(seen[-1])  # the case at stake: batch stride 7 * hidden for one position
        with dense_head_input(model):
            densified = model(input_ids=ids, logits_to_keep=1).logits
        assert _dense(seen[-1]) and torch.equal(seen[-1], seen[-2])
        assert torch.equal(plain, densified)
        model(input_ids=ids, logits_to_keep=1)
    assert not _dense(seen[-1])  # the hook is removed on leaving
    seen.clear()
    contexts = ["the cat sat", "questions about apples and oranges", "seven"]
    greedy_generate(model, tokenizer, contexts, [], max_new_tokens=3, batch_size=3, progress=False)
    loglikelihoods(model, tokenizer, REQUESTS, batch_size=4, progress=False)
    assert seen and all(_dense(x) for x in seen)
