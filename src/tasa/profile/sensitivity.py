"""From probe losses to sensitivities: costs, intervals, rank stability, and the versioned JSON.

The cost of unit u at b bits on objective k is its damage against the
full-precision model: for ``nll`` objectives (log-perplexity, gold-solution
NLL) the mean per-token KL divergence of the next-token distribution from full
precision (``kl``) or the increase of the per-token NLL (``nll``); for
``choice`` objectives the mean KL divergence of the distribution over choices
from full precision (``kl``), the increase of the mean -log p(gold | choices)
(``gold``), or the mean per-token KL on the choices' tokens (``token-kl``).
Each cost has a 95 % paired bootstrap interval over items; each objective and
bit-width a split-half rank stability (Kendall tau between the unit rankings
of two random halves of the items), with a warning below 0.5.
"""
from __future__ import annotations

import numpy as np

from tasa import schemas
from tasa.errors import TasaError
from tasa.profile.objectives import Objective, choice_kl
from tasa.profile.probe import ProbeResults
from tasa.profile.stats import bootstrap_ci, split_half_tau

SCHEMA = schemas.SENSITIVITY
UNSTABLE_TAU = 0.5


def _item_diffs(results: ProbeResults, objective: Objective, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-item degradation of every unit, (items, units), and the items' token counts."""
    base = results.base[objective.name]
    probes = [results.probes[(u.name, bits)][objective.name] for u in results.units]
    if objective.kind == "choice" and objective.choice_cost == "kl":
        if base.choice_logp is None or any(p.choice_logp is None for p in probes):
            raise TasaError(f"{objective.name}: the recorded probes hold no choice log-likelihoods (made by an "
                            "older tasa); re-run the profile with --overwrite, or use --choice-cost gold")
        diff = np.stack([choice_kl(base.choice_logp, p.choice_logp).numpy() for p in probes], axis=1)
    elif objective.token_kl:
        if any(p.kl is None for p in probes):
            raise TasaError(f"{objective.name}: the recorded probes hold no token KL (made by an older tasa); "
                            "re-run the profile with --overwrite")
        diff = np.stack([p.kl.numpy() for p in probes], axis=1)
        return diff, objective.score_mask.sum(1).double().numpy()  # a mean per scored token
    else:
        diff = np.stack([p.nll.numpy() - base.nll.numpy() for p in probes], axis=1)
    return diff, base.tokens.numpy()


def sensitivities(results: ProbeResults, objectives: list[Objective], bits: tuple[int, ...],
                  n_boot: int = 1000, seed: int = 0) -> tuple[dict, dict, list[str]]:
    """costs[objective][bits] = {"cost": [...], "ci_low": [...], "ci_high": [...]} in unit order,
    stability[objective][bits] = split-half tau, and warnings."""
    costs: dict = {}
    stability: dict = {}
    warnings: list[str] = []
    for o in objectives:
        costs[o.name], stability[o.name] = {}, {}
        for b in bits:
            diff, tokens = _item_diffs(results, o, b)
            cis = [bootstrap_ci(diff[:, j], tokens, n_boot=n_boot, seed=seed)
                   for j in range(diff.shape[1])]
            costs[o.name][str(b)] = {"cost": [float(x) for x in diff.sum(0) / tokens.sum()],
                                     "ci_low": [c[0] for c in cis], "ci_high": [c[1] for c in cis]}
            tau = split_half_tau(diff, seed=seed)
            stability[o.name][str(b)] = tau
            if not tau >= UNSTABLE_TAU:
                warnings.append(f"{o.name} at {b} bits: split-half rank stability {tau:.2f} < {UNSTABLE_TAU}; "
                                f"{o.n_items} items are too few to rank units reliably (raise --probe-tokens)")
    return costs, stability, warnings


def objective_taus(results: ProbeResults, objectives: list[Objective], bits: tuple[int, ...], n_boot: int = 200,
                   level: float = 0.95, seed: int = 0) -> dict:
    """Kendall tau between every pair of objectives' unit rankings, with a bootstrap interval.

    Each replicate resamples every objective's items (independently: objectives
    use different rows), recomputes all unit costs and the tau.
    """
    from itertools import combinations

    from tasa.profile.stats import kendall_tau

    rng = np.random.default_rng(seed)
    out: dict = {}
    for b in bits:
        mats = {o.name: _item_diffs(results, o, b) for o in objectives}
        point = {o: mats[o][0].sum(0) / mats[o][1].sum() for o in mats}
        boots: dict = {o: [] for o in mats}
        for _ in range(n_boot):
            for o, (diff, tok) in mats.items():
                idx = rng.integers(0, diff.shape[0], diff.shape[0])
                boots[o].append(diff[idx].sum(0) / tok[idx].sum())
        out[str(b)] = {}
        for a, c in combinations(list(mats), 2):
            taus = [kendall_tau(x, y) for x, y in zip(boots[a], boots[c])]
            lo, hi = np.nanquantile(taus, [(1 - level) / 2, (1 + level) / 2])
            out[str(b)][f"{a}|{c}"] = {"tau": kendall_tau(point[a], point[c]), "ci_low": float(lo),
                                       "ci_high": float(hi)}
    return out
