"""Scoring functions on hand-made examples (lm-eval 0.4.x semantics)."""
import math

import pytest
import torch

from tasa.eval.metrics import (argmax_first, exact_match, flips, generation_scores, mean_stderr, multiple_choice,
                               ratio_stderr, regex_extract, topk_kl)
from tasa.eval.tasks import GSM8K_FLEXIBLE, GSM8K_IGNORE, GSM8K_STRICT

GSM8K_PATTERNS = {"strict_match": (GSM8K_STRICT, 0), "flexible_extract": (GSM8K_FLEXIBLE, -1)}


def test_acc_and_acc_norm_divide_by_choice_characters():
    # raw: choice 1 wins (-4); per character: -5/1, -4/6, -9/2 -> choice 1 still; gold 0
    r = multiple_choice([-5.0, -4.0, -9.0], ["a", "bbbbbb", "cc"], gold=0)
    assert (r["acc"], r["acc_norm"], r["pred"], r["pred_norm"]) == (0.0, 0.0, 1, 1)
    assert r["gold_logprob"] == -5.0 and r["margin"] == -1.0
    # length normalisation flips the decision: -6/12 = -0.5 beats -2/2 = -1
    r = multiple_choice([-2.0, -6.0], ["ab", "abcdefghijkl"], gold=1)
    assert (r["acc"], r["acc_norm"], r["margin"]) == (0.0, 1.0, -4.0)


def test_ties_go_to_the_first_choice():
    assert argmax_first([1.0, 3.0, 3.0]) == 1
    assert multiple_choice([-1.0, -1.0], ["x", "y"], gold=1)["acc"] == 0.0
    with pytest.raises(ValueError):
        multiple_choice([-1.0], ["x", "y"], gold=0)
    with pytest.raises(ValueError):
        multiple_choice([-1.0, -2.0], ["x", "y"], gold=2)


def test_gsm8k_strict_and_flexible_extraction():
    gold = "She has 3 + 4 = <<3+4=7>>7 apples.\n#### 1,007"
    r = generation_scores("She has 7 apples.\n#### 1,007\n\n", gold, GSM8K_PATTERNS, GSM8K_IGNORE)
    assert (r["strict_match"], r["strict_match_answer"]) == (1.0, "1,007")
    assert r["flexible_extract"] == 1.0 and r["flexible_extract_answer"] == "1,007"
    # no "#### ": strict fails, flexible takes the last number
    r = generation_scores("So the total is $1007.", gold, GSM8K_PATTERNS, GSM8K_IGNORE)
    assert (r["strict_match"], r["strict_match_answer"]) == (0.0, "[invalid]")
    assert (r["flexible_extract"], r["flexible_extract_answer"]) == (1.0, "$1007.")
    r = generation_scores("The answer is 5 or 12", "#### 5", GSM8K_PATTERNS, GSM8K_IGNORE)
    assert r["flexible_extract_answer"] == "12" and r["flexible_extract"] == 0.0
    assert regex_extract("no digits here", GSM8K_FLEXIBLE, -1) == "[invalid]"
    assert regex_extract("#### -3.5", GSM8K_STRICT) == "-3.5"


def test_exact_match_normalisation():
    assert exact_match("1,000.", "#### 1000", GSM8K_IGNORE) == 1.0
    assert exact_match("$18", "Janet ...\n#### 18", GSM8K_IGNORE) == 1.0
    assert exact_match("18.5", "#### 18", GSM8K_IGNORE) == 0.0
    assert exact_match("Paris", "paris") == 1.0
    assert exact_match("Paris", "paris", ignore_case=False) == 0.0


def test_mean_and_ratio_standard_errors():
    m, se = mean_stderr([1.0, 0.0, 1.0, 0.0])
    assert m == 0.5 and se == pytest.approx(math.sqrt((4 * 0.25 / 3) / 4))
    assert math.isnan(mean_stderr([1.0])[1]) and math.isnan(mean_stderr([])[0])
    r, se = ratio_stderr([2.0, 6.0], [1.0, 3.0])  # both items have per-token 2.0 -> no spread
    assert r == 2.0 and se == pytest.approx(0.0)
    r, se = ratio_stderr([1.0, 9.0], [1.0, 3.0])
    assert r == 2.5 and se > 0


def test_flips_count_both_directions():
    f = flips([1, 1, 0, 0, 1], [1, 0, 1, 0, 0])
    assert f == {"flip_rate": 0.6, "flips_correct_to_wrong": 2, "flips_wrong_to_correct": 1}
    with pytest.raises(ValueError):
        flips([1], [1, 0])


def test_topk_kl_exact_with_full_vocab_and_a_lower_bound_otherwise():
    g = torch.Generator().manual_seed(0)
    p = torch.log_softmax(torch.randn(5, 50, generator=g) * 2, -1)
    q = torch.log_softmax(torch.randn(5, 50, generator=g) * 2, -1)
    exact = (p.exp() * (p - q)).sum(-1)
    v, i = p.topk(50, -1)
    assert torch.allclose(topk_kl(v, i, q), exact, atol=1e-5)
    v, i = p.topk(8, -1)
    approx = topk_kl(v, i, q)
    assert (approx <= exact + 1e-5).all() and (approx > 0).all()
    v, i = p.topk(8, -1)
    assert torch.allclose(topk_kl(v, i, p), torch.zeros(5), atol=1e-5)
