"""Which multiple-choice probe objective ranks SmolLM2-135M's layers reliably on ARC-Easy?

    .venv/bin/python benchmarks/arc_objective.py     # the probes are cached in benchmarks/.work/arc_objective

Probes every decoder layer with RTN at 3 and 4 bits (group size 64) on 472 ARC-Easy train/validation
items (8,208 scored choice tokens, seed 0) and keeps every item's choice log-likelihoods, then compares
three per-item costs by their split-half rank stability (Kendall tau between the layer rankings of two
random item halves, mean of 20 splits), on all items and on a random half (237 items, the sample of a
4,096-token profile):

- gold: increase of -log p(gold | choices) (tasa's choice cost before 2026-11-24);
- kl: KL(full precision || probe) of the distribution over the choices (the default since);
- gold-likelihood: increase of the gold choice's summed token NLL (a perplexity-like cost).

Also the Kendall tau of each with the wikitext2 / gsm8k costs of benchmarks/profile.py.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or '.').resolve() != _HERE]
sys.path.insert(0, str(_HERE.parent))
from benchmarks.common import ROOT, WORK, cached, row, write_results  # noqa: E402

BENCH = "arc_objective"
TOKENS = 8192
BITS = (3, 4)
PROFILE = WORK / "profile" / "layer" / "sensitivity.json"


def probe_lls() -> dict:
    """Per-item choice log-likelihoods of the full-precision model and of every layer probe."""
    import torch
    import torch.nn.functional as F

    from tasa.models import load, resolve
    from tasa.profile.objectives import build_objective
    from tasa.models.walker import capture, forward_layer
    from tasa.profile.probe import objective_batches, quant_swapped, tail_token_nll

    lm = load("smollm2-135m")
    arch, m = resolve(lm.model), lm.model
    o = build_objective("arc_easy", lm.tokenizer, TOKENS, 128, 0, lm.max_length)
    batches = objective_batches(m, [o], 512)["arc_easy"]
    captured = capture(m, arch, [b.inputs for b in batches])
    hidden = captured.hidden

    def lls(layer: int) -> list:
        toks = [tail_token_nll(m, arch, b, layer, h) for b, h in zip(batches, hidden)]
        w = o.input_ids.shape[1]
        t = torch.cat([F.pad(x, (0, w - x.shape[1])) for x in toks]).double() * o.score_mask
        nc = int(o.token_choice.max()) + 1
        ll = -torch.zeros((o.n_items, nc), dtype=torch.float64).scatter_add_(1, o.token_choice, t)
        present = torch.zeros((o.n_items, nc), dtype=torch.float64).scatter_add_(
            1, o.token_choice, o.score_mask.double()) > 0
        return ll.masked_fill(~present, float("-inf")).tolist()

    out = {"base": lls(0), "gold": o.gold.tolist(), "items": o.n_items, "scored_tokens": o.scored_tokens,
           "probes": {}}
    t0 = time.perf_counter()  # probes only
    for layer in range(arch.num_layers):
        for b in BITS:
            with quant_swapped(m, tuple(x.name for x in arch.layer_modules(layer)), b, 64, True):
                out["probes"][f"{layer}@{b}"] = lls(layer)
        if layer < arch.num_layers - 1:
            with torch.no_grad():
                hidden = [forward_layer(arch.layers[layer], h, kw[layer], layer)
                          for h, kw in zip(hidden, captured.kwargs)]
    out["seconds"] = time.perf_counter() - t0
    return out


def main() -> None:
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()
    import numpy as np
    import torch

    from tasa.profile.objectives import choice_kl
    from tasa.profile.stats import kendall_tau, split_half_tau

    work = WORK / BENCH
    work.mkdir(parents=True, exist_ok=True)
    d = cached(work / "lls.json", probe_lls)
    base, gold = torch.tensor(d["base"]), torch.tensor(d["gold"])
    n = base.shape[0]
    idx = torch.arange(n)
    base_logp = torch.log_softmax(base, 1)
    half = np.random.default_rng(0).permutation(n)[: n // 2]
    prof = json.loads(PROFILE.read_text()) if PROFILE.is_file() else None
    rows = []
    for b in BITS:
        per = {"gold": [], "kl": [], "gold-likelihood": []}
        for layer in range(len(d["probes"]) // len(BITS)):
            ll = torch.tensor(d["probes"][f"{layer}@{b}"])
            logp = torch.log_softmax(ll, 1)
            per["gold"].append((base_logp[idx, gold] - logp[idx, gold]).numpy())
            per["kl"].append(choice_kl(base_logp, logp).numpy())
            per["gold-likelihood"].append((base[idx, gold] - ll[idx, gold]).numpy())
        for cost, cols in per.items():
            mat = np.stack(cols, 1)
            m = {"split_half_stability_all_items": split_half_tau(mat),
                 "split_half_stability_half_items": split_half_tau(mat[half]),
                 "items": n, "half_items": len(half), "scored_tokens": d["scored_tokens"]}
            if prof is not None:
                for other in ("wikitext2", "gsm8k"):
                    m[f"tau_vs_{other}"] = kendall_tau(mat.mean(0), prof["costs"][other][str(b)]["cost"])
            rows.append(row(f"arc_easy-{cost}-w{b}", "tasa", f"rtn-probe/{cost}", b, 64, None, m, d["seconds"]))
    out = write_results(BENCH, ".venv/bin/python benchmarks/arc_objective.py", rows,
                        {"profile": str(PROFILE.relative_to(ROOT))})
    for r in rows:
        print(r["name"], json.dumps(r["metrics"]))
    print(f"written {out}")


if __name__ == "__main__":
    main()
