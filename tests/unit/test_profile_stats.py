"""Rank statistics on hand examples."""
import math

import numpy as np
import pytest

from tasa.profile.stats import bootstrap_ci, kendall_tau, split_half_tau, top_k, top_k_overlap


def test_kendall_tau_hand_examples():
    assert kendall_tau([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert kendall_tau([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    # one discordant pair of 6: (6 - 2*1) / 6
    assert kendall_tau([1, 2, 3, 4], [1, 2, 4, 3]) == pytest.approx(4 / 6)
    # tau-b with a tie in b: concordant 2, discordant 0, ties in b 1 -> 2 / sqrt(3 * 2)
    assert kendall_tau([1, 2, 3], [1, 2, 2]) == pytest.approx(2 / math.sqrt(6))
    with pytest.raises(ValueError):
        kendall_tau([1, 2], [1])


def test_top_k_and_overlap():
    # the paper's LLaMA-3-8B example: top-8 ppl and math layers share {20, 31}
    ppl = {1, 3, 6, 16, 18, 20, 21, 31}
    math_ = {2, 10, 11, 12, 13, 14, 20, 31}
    a = [1.0 if i in ppl else 0.0 for i in range(32)]
    b = [1.0 if i in math_ else 0.0 for i in range(32)]
    assert set(top_k(a, 8)) == ppl and top_k_overlap(a, b, 8) == 2
    assert top_k([0.5, 0.9, 0.9, 0.1], 2) == [1, 2]
    with pytest.raises(ValueError):
        top_k([1.0], 2)


def test_bootstrap_ci_covers_the_mean_and_shrinks_with_n():
    rng = np.random.default_rng(1)
    small = rng.normal(1.0, 1.0, 20)
    large = rng.normal(1.0, 1.0, 2000)
    lo_s, hi_s = bootstrap_ci(small)
    lo_l, hi_l = bootstrap_ci(large)
    assert lo_s < small.mean() < hi_s and lo_l < large.mean() < hi_l
    assert hi_l - lo_l < (hi_s - lo_s) / 4
    assert bootstrap_ci(small, seed=3) == bootstrap_ci(small, seed=3)


def test_split_half_tau_separates_signal_from_noise():
    rng = np.random.default_rng(0)
    signal = np.arange(10.0)[None, :] + rng.normal(0, 0.5, (200, 10))
    noise = rng.normal(0, 1.0, (200, 10))
    assert split_half_tau(signal) > 0.9
    assert abs(split_half_tau(noise)) < 0.3


def test_bootstrap_ci_of_a_ratio_of_sums():
    tokens = np.array([10.0, 30.0, 20.0, 40.0])
    lo, hi = bootstrap_ci(2.5 * tokens, tokens)  # every item has the same per-token value
    assert lo == pytest.approx(2.5) and hi == pytest.approx(2.5)
    lo, hi = bootstrap_ci(np.array([1.0, 9.0, 2.0, 8.0]), tokens)
    assert lo < 20.0 / 100.0 < hi
