"""Exact bit allocation under an average-bits budget: a multiple-choice knapsack solved by DP.

Choose one bit-width b_i from ``choices`` for every unit i (a layer, or a tied
group of modules) to minimise sum_i cost_i(b_i) subject to

    sum_i size_i * bits_i(b_i) <= budget * sum_i size_i

where ``bits_i(b)`` is b, or b plus the unit's per-weight metadata when the
budget includes scale/zero storage.  Weights are scaled to integers (by a
common unit), so the constraint is checked exactly; the DP keeps, after each
unit, the Pareto frontier of (used weight, cost) pairs and backtracks from the
cheapest feasible end state.  Ties in cost go to the allocation using fewer
bits, then to the lexicographically smallest bit vector (deterministic).
"""
from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction
from math import gcd
from typing import Sequence

from tasa.errors import TasaError


@dataclass(frozen=True)
class Allocation:
    bits: tuple[int, ...]  # chosen bit-width per unit
    cost: float
    average_bits: float  # size-weighted average of the budgeted bits per weight


def _as_fraction(x: float) -> Fraction:
    return Fraction(x).limit_denominator(10**6)


def allocate(costs: Sequence[dict[int, float]], sizes: Sequence[int], budget: float,
             extra_bits: Sequence[dict[int, float]] | None = None) -> Allocation:
    """Exact minimum-cost choice per unit with the size-weighted average bits at most ``budget``.

    ``costs[i]`` maps each candidate bit-width of unit i to its cost; ``sizes[i]``
    is its number of weights; ``extra_bits[i][b]`` optional metadata bits per
    weight counted against the budget (e.g. (16 + b) / group_size).
    """
    n = len(costs)
    if n == 0:
        raise TasaError("nothing to allocate: no units")
    if len(sizes) != n or (extra_bits is not None and len(extra_bits) != n):
        raise TasaError("one size (and one metadata table) per unit is needed")
    if any(s <= 0 for s in sizes):
        raise TasaError("unit sizes must be positive")
    if any(not c for c in costs):
        raise TasaError("every unit needs at least one candidate bit-width")
    # budgeted bits per weight of each (unit, choice), as exact fractions, scaled to integers
    per_weight = [{b: _as_fraction(b + (extra_bits[i][b] if extra_bits is not None else 0.0)) for b in costs[i]}
                  for i in range(n)]
    denom = 1
    for table in per_weight:
        for f in table.values():
            denom = denom * f.denominator // gcd(denom, f.denominator)
    unit = 0
    for s in sizes:
        unit = gcd(unit, s)
    weights = [{b: int(f * denom) * (sizes[i] // unit) for b, f in per_weight[i].items()} for i in range(n)]
    capacity = int(_as_fraction(budget) * denom * (sum(sizes) // unit))
    # rest_min[i]: the least weight units i.. can take, to prune states that cannot finish within budget
    rest_min = [0] * (n + 1)
    for i in range(n - 1, -1, -1):
        rest_min[i] = rest_min[i + 1] + min(weights[i].values())
    if rest_min[0] > capacity:
        lowest = sum(sizes[i] * float(min(per_weight[i].values())) for i in range(n)) / sum(sizes)
        raise TasaError(f"budget {budget:g} bits per weight is infeasible: even the lowest candidates need "
                        f"{lowest:.4f}")
    # frontier: (used weight, cost, bits chosen so far), kept Pareto-minimal in (weight, cost)
    frontier: list[tuple[int, float, tuple[int, ...]]] = [(0, 0.0, ())]
    for i in range(n):
        options = sorted(costs[i])
        cand = []
        for w0, c0, path in frontier:
            for b in options:
                w = w0 + weights[i][b]
                if w + rest_min[i + 1] > capacity:
                    continue
                cand.append((w, c0 + float(costs[i][b]), path + (b,)))
        cand.sort(key=lambda t: (t[1], t[0], t[2]))  # cost, then used weight, then bits
        frontier = []
        best_w = None
        for w, c, path in cand:  # keep entries that use strictly less weight than every cheaper one
            if best_w is None or w < best_w:
                frontier.append((w, c, path))
                best_w = w
    w, c, path = min(frontier, key=lambda t: (t[1], t[0], t[2]))
    avg = sum(sizes[i] * float(per_weight[i][b]) for i, b in enumerate(path)) / sum(sizes)
    return Allocation(path, c, avg)
