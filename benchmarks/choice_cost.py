"""Which multiple-choice probe cost predicts the task-relevant layer ranking from few items? (issue 35)

    .venv/bin/python benchmarks/choice_cost.py [--bits 3,4]    # probes kept in benchmarks/.work/choice_cost

`tasa profile` of SmolLM2-135M on ARC-Easy alone, 8,192 scored choice tokens (472 train/validation items, seed 0),
every decoder layer probed with RTN at each bit-width (group size 64): the probes keep every item's choice
log-likelihoods and the per-token KL on its choices' tokens.  Two per-item costs:

- kl: KL(full precision || probe) of the distribution over the choices (what decides the answers);
- token-kl: the mean per-token KL of the next-token distribution on the choices' tokens.

For k = 49 (the items of `tasa run`'s 768-token profile), 98 and 160, over 200 random draws of k items: Kendall tau
between each cost's layer ranking on the k items and the kl ranking on the *other* 472 - k items (held-out
truth: how well a k-item profile predicts the answer-distribution damage), and each cost's split-half stability
(tasa's own statistic, 20 random halves) on the k items.  Also both on the 49 items `tasa run`'s 768-token
profile draws (rows are taken in one seeded order until the token budget is met, so they are among the 472;
found by their tokens, as objectives order items by length).
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or '.').resolve() != _HERE]
sys.path.insert(0, str(_HERE.parent))
from benchmarks.common import WORK, row, write_results  # noqa: E402

BENCH = "choice_cost"
TOKENS = 8192
SIZES = (49, 98, 160)
DRAWS = 200


def _rows(obj) -> list[tuple]:
    """Each item's tokens up to its last scored one (its last choice's end: padding dropped), to find one
    objective's items in another's."""
    return [tuple(ids[: int(mask.nonzero().max()) + 1].tolist()) for ids, mask in zip(obj.input_ids, obj.score_mask)]


def probe_costs(out: Path, bits: tuple[int, ...]) -> tuple[dict, float, list[int]]:
    """{bits: (kl (items, layers), token-kl (items, layers))} from the profile in ``out`` (made or resumed now by
    the tasa CLI), the profile's probe seconds, and the indices of `tasa run`'s 49 items among them."""
    import numpy as np

    from tasa.artifacts import read_json
    from tasa.config import ProfileSpec, Runtime
    from tasa.models import resolve
    from tasa.pipeline.common import model_of
    from tasa.profile.objectives import build_objective, choice_kl
    from tasa.profile.probe import ProbeStore, run_probes

    subprocess.run([sys.executable, "-m", "tasa", "profile", "--model", "smollm2-135m", "--objectives", "arc_easy",
                    "--probe-tokens", str(TOKENS), "--bits", ",".join(map(str, bits)), "--group-size", "64",
                    "--quiet", "--output-dir", str(out)], check=True)
    seconds = read_json(out / "sensitivity.json")["seconds"]["sensitivity"]
    lm, _ = model_of("smollm2-135m", Runtime(progress=False))
    spec = ProfileSpec(objectives=("arc_easy",), bits=bits, group_size=64, probe_tokens=TOKENS)
    obj = build_objective("arc_easy", lm.tokenizer, min_tokens=TOKENS, seqlen=spec.probe_seqlen, seed=0,
                          max_length=lm.max_length, choice_cost="kl")
    res = run_probes(lm.model, resolve(lm.model), [obj], spec,  # every probe read back from the store
                     store=ProbeStore(out, read_json(out / "probe_settings.json")), progress=False)
    where = {r: i for i, r in enumerate(_rows(obj))}
    run_items = [where[r] for r in _rows(build_objective("arc_easy", lm.tokenizer, min_tokens=768,
                                                          seqlen=spec.probe_seqlen, seed=0, max_length=lm.max_length))]
    base = res.base["arc_easy"].choice_logp
    costs = {}
    for b in bits:
        probes = [res.probes[(u.name, b)]["arc_easy"] for u in res.units]
        costs[b] = (np.stack([choice_kl(base, p.choice_logp).numpy() for p in probes], 1),
                    np.stack([p.kl.numpy() for p in probes], 1))  # per-item sums: a mean per token over items
    return costs, seconds, run_items


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bits", default="3,4")
    args = ap.parse_args()
    import numpy as np

    from tasa.profile.stats import kendall_tau, split_half_tau

    bits = tuple(int(b) for b in args.bits.split(","))
    t0 = time.perf_counter()
    costs, probe_seconds, run_items = probe_costs(WORK / BENCH, bits)
    rows = []
    for b in bits:
        kl, tok = costs[b]
        n = kl.shape[0]
        ranked = {"kl": kl, "token-kl": tok}  # a cost's ranking on items idx: the sum over them (tokens: the same)
        for k in SIZES:
            rng = np.random.default_rng(0)
            taus = {c: [] for c in ranked}
            stab = {c: [] for c in ranked}
            for draw in range(DRAWS):
                perm = rng.permutation(n)
                sample, rest = perm[:k], perm[k:]
                truth = kl[rest].mean(0)
                for c, m in ranked.items():
                    taus[c].append(kendall_tau(m[sample].sum(0), truth))
                    if draw < 20:  # split-half stability: tasa's statistic, on fewer draws (it repeats 20 halves)
                        stab[c].append(split_half_tau(m[sample], seed=draw))
            for c in ranked:
                rows.append(row(f"arc_easy-{c}-w{b}-{k}items", "tasa", f"rtn-probe/{c}", b, 64, None, {
                    "items": k, "heldout_items": n - k, "draws": DRAWS,
                    "tau_vs_heldout_kl_mean": float(np.mean(taus[c])), "tau_vs_heldout_kl_sd": float(np.std(taus[c])),
                    "split_half_stability_mean": float(np.mean(stab[c]))}, None))
        first = np.array(run_items)
        rest = np.setdiff1d(np.arange(n), first)
        for c, m in ranked.items():
            rows.append(row(f"arc_easy-{c}-w{b}-run-items", "tasa", f"rtn-probe/{c}", b, 64, None, {
                "items": len(first), "heldout_items": len(rest),
                "tau_vs_heldout_kl": kendall_tau(m[first].sum(0), kl[rest].mean(0)),
                "split_half_stability": split_half_tau(m[first]),
                "split_half_stability_all_items": split_half_tau(m),
                "tau_vs_kl_all_items": kendall_tau(m.sum(0), kl.mean(0))}, probe_seconds))
    out = write_results(BENCH, ".venv/bin/python benchmarks/choice_cost.py " + " ".join(sys.argv[1:]), rows,
                        {"items": int(costs[bits[0]][0].shape[0]), "probe_tokens": TOKENS,
                         "analysis_seconds": time.perf_counter() - t0})
    for r in rows:
        print(r["name"], {k: round(v, 3) if isinstance(v, float) else v for k, v in r["metrics"].items()})
    print(f"written {out}")


if __name__ == "__main__":
    main()
