"""Aggregation of per-objective sensitivities into one cost table (the paper's MOA step).

Normalisation (documented choice): each objective's costs are divided by that
objective's mean cost over all units at its lowest candidate bit-width, after
clipping negative costs (a probe that *improved* an objective measures noise,
not a benefit) to zero.  A unit of 1.0 then means "as damaging as an average
unit at the lowest bit-width, for this objective"; relative differences between
bit-widths and units within an objective are kept, and objectives measured in
different units (nats per token, -log p over choices) become comparable.

Combination: cost = beta * ppl_cost + (1 - beta) * sum_k w_k * task_cost_k / sum_k w_k,
where ppl is the ``wikitext2`` objective and the tasks are all others (weights
``w_k`` default 1).  Presets: ``ppl-only`` (beta = 1), ``task-only`` (beta = 0).
"""
from __future__ import annotations

from typing import Mapping, Sequence

from tasa.errors import TasaError

PPL_OBJECTIVE = "wikitext2"
PRESETS = {"ppl-only": 1.0, "task-only": 0.0}


def normalise(costs: Mapping[str, Sequence[float]]) -> dict[str, list[float]]:
    """One objective's costs by bit-width (``{bits: [cost per unit]}``) scaled as documented above."""
    if not costs:
        raise TasaError("no bit-widths to normalise")
    lowest = min(costs, key=lambda b: int(b))
    clipped = {b: [max(0.0, float(c)) for c in v] for b, v in costs.items()}
    scale = sum(clipped[lowest]) / len(clipped[lowest])
    if scale <= 0:
        return {b: [0.0] * len(v) for b, v in clipped.items()}
    return {b: [c / scale for c in v] for b, v in clipped.items()}


def aggregate(costs: Mapping[str, Mapping[str, Sequence[float]]], beta: float | str = 0.5,
              task_weights: Mapping[str, float] | None = None, normalize: bool = True) -> dict[str, list[float]]:
    """Combine ``costs[objective][bits] = [per unit]`` into ``{bits: [per unit]}``."""
    if isinstance(beta, str):
        if beta not in PRESETS:
            raise TasaError(f"unknown preset {beta!r}; presets: {', '.join(PRESETS)} or a number in [0, 1]")
        beta = PRESETS[beta]
    if not 0.0 <= beta <= 1.0:
        raise TasaError(f"beta must be in [0, 1], got {beta}")
    tables = {k: (normalise(v) if normalize else {b: list(map(float, c)) for b, c in v.items()})
              for k, v in costs.items()}
    tasks = [k for k in tables if k != PPL_OBJECTIVE]
    weights = {k: float((task_weights or {}).get(k, 1.0)) for k in tasks}
    unknown = set(task_weights or {}) - set(tasks)
    if unknown:
        raise TasaError(f"task weights name objectives that were not profiled: {', '.join(sorted(unknown))}")
    if beta > 0 and PPL_OBJECTIVE not in tables:
        raise TasaError(f"beta > 0 weights perplexity, but the profile has no {PPL_OBJECTIVE} objective")
    if beta < 1 and (not tasks or sum(weights.values()) <= 0):
        raise TasaError("beta < 1 weights task objectives, but the profile has none (or all weights are 0)")
    bit_sets = {tuple(sorted(t)) for t in tables.values()}
    if len(bit_sets) != 1:
        raise TasaError("objectives were profiled at different bit-widths")
    out = {}
    for b in next(iter(bit_sets)):
        n = len(next(iter(tables.values()))[b])
        total = [0.0] * n
        for k, t in tables.items():
            w = beta if k == PPL_OBJECTIVE else (1 - beta) * weights[k] / sum(weights.values())
            if w:
                total = [x + w * y for x, y in zip(total, t[b])]
        out[b] = total
    return out
