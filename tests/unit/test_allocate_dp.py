"""Exact allocation: equals brute force, honours the budget, fails clearly when infeasible."""
import itertools
import random

import pytest

from tasa.allocate.dp import allocate
from tasa.errors import TasaError


def brute(costs, sizes, budget, extra=None):
    best = None
    for combo in itertools.product(*[sorted(c) for c in costs]):
        bits = sum(s * (b + (extra[i][b] if extra else 0)) for i, (s, b) in enumerate(zip(sizes, combo)))
        if bits > budget * sum(sizes) + 1e-9:
            continue
        cost = sum(c[b] for c, b in zip(costs, combo))
        key = (cost, bits, combo)
        if best is None or key < best:
            best = key
    return best


@pytest.mark.parametrize("seed", range(60))
def test_dp_equals_brute_force_on_random_instances(seed):
    rng = random.Random(seed)
    n = rng.randint(1, 8)
    choices = [3, 4, 8]
    sizes = [rng.choice([576 * 576, 576 * 1536, 576 * 192, 1000]) for _ in range(n)]
    integer = seed % 2 == 0  # integer costs create ties
    costs = [{b: (rng.randint(0, 5) if integer else rng.random()) / (b if not integer else 1) for b in choices}
             for _ in range(n)]
    budget = rng.choice([3.0, 3.25, 3.5, 4.0, 4.5, 6.0])
    want = brute(costs, sizes, budget)
    got = allocate(costs, sizes, budget)
    assert want is not None
    assert got.cost == pytest.approx(want[0])
    assert sum(c[b] for c, b in zip(costs, got.bits)) == pytest.approx(want[0])
    assert got.average_bits <= budget + 1e-12  # never over budget
    if integer:  # ties broken by fewer bits, then the smallest bit vector
        assert got.bits == want[2]


def test_budget_with_metadata_and_monotonicity():
    rng = random.Random(1)
    costs = [{3: rng.random() * 3, 4: rng.random(), 8: 0.0} for _ in range(6)]
    sizes = [64 * 64] * 6
    extra = [{b: (16 + b) / 64 for b in (3, 4, 8)} for _ in range(6)]
    plain = allocate(costs, sizes, 4.0)
    meta = allocate(costs, sizes, 4.0, extra)
    assert meta.average_bits <= 4.0 and meta.cost >= plain.cost
    assert brute(costs, sizes, 4.0, extra)[0] == pytest.approx(meta.cost)
    last = float("inf")
    for budget in (3.0, 3.5, 4.0, 5.0, 8.0):
        a = allocate(costs, sizes, budget)
        assert a.cost <= last + 1e-12 and a.average_bits <= budget
        last = a.cost
    assert allocate(costs, sizes, 8.0).bits == (8,) * 6


def test_infeasible_and_bad_input():
    with pytest.raises(TasaError, match="infeasible: even the lowest candidates need 3.0000"):
        allocate([{3: 1.0, 4: 0.0}], [10], 2.9)
    with pytest.raises(TasaError, match="no units"):
        allocate([], [], 4)
    with pytest.raises(TasaError, match="one size"):
        allocate([{3: 1.0}], [1, 2], 4)


def test_eighty_equal_layers_equal_a_table_dp_over_total_bits():
    """80 equal-size layers, candidates 2/3/4/8 at 3.5 bits: with equal sizes the budget is a count of bits (280),
    so a plain table DP over (layer, bits used) is an independent exact reference for the frontier DP.
    (Its time at a 70B model's size is measured by benchmarks/timings.py, not asserted here.)"""
    rng = random.Random(0)
    costs = [{b: rng.random() / b for b in (2, 3, 4, 8)} for _ in range(80)]
    a = allocate(costs, [218_103_808] * 80, 3.5)
    assert a.average_bits <= 3.5
    inf = float("inf")
    table = [0.0] + [inf] * 280  # table[u]: least cost of the layers so far using exactly u bits
    for c in costs:
        nxt = [inf] * 281
        for used, cost in enumerate(table):
            if cost < inf:
                for b, x in c.items():
                    if used + b <= 280:
                        nxt[used + b] = min(nxt[used + b], cost + x)
        table = nxt
    assert a.cost == pytest.approx(min(table), rel=1e-12)
    assert sum(c[b] for c, b in zip(costs, a.bits)) == pytest.approx(a.cost, rel=1e-12)
