import math

import pytest
import torch

from tasa.errors import TasaError
from tasa.eval.perplexity import eval_windows, perplexity
from tests.conftest import random_text, tiny_llama


def test_perplexity_matches_direct_loss_and_is_batch_invariant(tokenizer):
    model = tiny_llama()
    text = random_text(400, 3)
    windows = eval_windows(tokenizer, text, 32, limit=5)
    with torch.no_grad():
        losses = [model(w[None], labels=w[None]).loss.item() for w in windows]  # mean over 31 predictions
    expected = math.exp(sum(losses) / len(losses))
    r1 = perplexity(model, tokenizer, text, seqlen=32, limit=5, batch_size=1, progress=False)
    r3 = perplexity(model, tokenizer, text, seqlen=32, limit=5, batch_size=3, progress=False)
    assert r1.ppl == pytest.approx(expected, rel=1e-5)
    assert r3.ppl == pytest.approx(r1.ppl, rel=1e-5)
    assert (r1.windows, r1.tokens) == (5, 5 * 31)


def test_windows_are_non_overlapping_and_tail_dropped(tokenizer):
    text = "abcdefghij" * 10  # 100 byte tokens
    w = eval_windows(tokenizer, text, 30)
    assert w.shape == (3, 30)
    ids = tokenizer(text, add_special_tokens=False).input_ids
    assert w.flatten().tolist() == ids[:90]


def test_perplexity_errors(tokenizer):
    model = tiny_llama(max_pos=64)
    with pytest.raises(TasaError, match="fewer than one window"):
        perplexity(model, tokenizer, "short", seqlen=32, progress=False)
    with pytest.raises(TasaError, match="exceeds the model's maximum"):
        perplexity(model, tokenizer, random_text(200, 1), seqlen=128, progress=False)
    with pytest.raises(TasaError, match="--limit must be positive"):
        perplexity(model, tokenizer, random_text(200, 1), seqlen=32, limit=0, progress=False)
