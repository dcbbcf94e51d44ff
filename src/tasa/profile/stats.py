"""Rank statistics for sensitivity profiles: pure functions over per-unit scores.

- :func:`kendall_tau`: Kendall's tau-b (ties handled), scipy's implementation;
- :func:`top_k_overlap`: how many of the K most sensitive units two objectives share;
- :func:`bootstrap_ci`: percentile interval of a mean (or a ratio of sums) over items, resampling items;
- :func:`split_half_tau`: rank stability of a profile, tau between the rankings from
  two random halves of the items (averaged over repeats).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
from scipy import stats


def kendall_tau(a: Sequence[float], b: Sequence[float]) -> float:
    """Kendall's tau-b between two score vectors (1: same order, -1: reversed, ~0: unrelated)."""
    if len(a) != len(b):
        raise ValueError(f"score vectors differ in length ({len(a)} vs {len(b)})")
    if len(a) < 2:
        raise ValueError("Kendall's tau needs at least two units")
    tau = stats.kendalltau(np.asarray(a, dtype=float), np.asarray(b, dtype=float)).statistic
    return float("nan") if tau is None else float(tau)


def top_k(scores: Sequence[float], k: int) -> list[int]:
    """Indices of the k largest scores, largest first; ties keep the lower index first."""
    if not 1 <= k <= len(scores):
        raise ValueError(f"k must be in 1..{len(scores)}, got {k}")
    order = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
    return order[:k]


def top_k_overlap(a: Sequence[float], b: Sequence[float], k: int) -> int:
    """Size of the intersection of the top-k units of two score vectors."""
    return len(set(top_k(a, k)) & set(top_k(b, k)))


def bootstrap_ci(values: np.ndarray, weights: np.ndarray | None = None, n_boot: int = 1000, level: float = 0.95,
                 seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of sum(values) / sum(weights) over items (axis 0) resampled together;
    without weights, of the mean."""
    values = np.asarray(values, dtype=float)
    weights = np.ones_like(values) if weights is None else np.asarray(weights, dtype=float)
    n = values.shape[0]
    if n < 2:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, n, size=(n_boot, n))
    stats_ = values[idx].sum(axis=1) / weights[idx].sum(axis=1)
    lo, hi = np.quantile(stats_, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


def split_half_tau(item_costs: np.ndarray, repeats: int = 20, seed: int = 0) -> float:
    """Mean Kendall tau between unit rankings computed on two random halves of the items.

    ``item_costs``: (n_items, n_units) per-item degradation of each unit.  Near 1:
    the sample ranks units reliably; near 0: the ranking is noise.
    """
    item_costs = np.asarray(item_costs, dtype=float)
    n = item_costs.shape[0]
    if n < 4 or item_costs.shape[1] < 2:
        return float("nan")
    rng = np.random.default_rng(seed)
    taus = []
    for _ in range(repeats):
        perm = rng.permutation(n)
        a = item_costs[perm[: n // 2]].mean(axis=0)
        b = item_costs[perm[n // 2:]].mean(axis=0)
        taus.append(kendall_tau(a, b))
    return float(np.nanmean(taus))

