"""Which probe cost ranks SmolLM2-135M's layers steadily from few tokens?  (issue 35: `tasa run`'s profile)

    .venv/bin/python benchmarks/profile_cost.py                    # 768 probe tokens per objective (tasa run's)
    .venv/bin/python benchmarks/profile_cost.py --probe-tokens 384 768

For each probe-token count, one layer profile as `tasa run` makes it (RTN, signed-max grid, group size 64,
bits 3/4/8, probe windows of 128, seed 0; objectives wikitext2, gsm8k, arc_easy), cached under
benchmarks/.work/profile_cost (resumable).  Every probe keeps each item's summed token NLL, summed token KL
from full precision (top 256 + tail bucket) and, for ARC-Easy, the choice log-likelihoods, so one profile
scores every cost form:

- text objectives (wikitext2, gsm8k gold solutions): ``kl`` (per-token KL of the next-token distribution,
  the default since 2026-12-04) and ``nll`` (increase of per-token NLL, the cost before);
- ARC-Easy: ``kl`` (KL of the distribution over the choices, the default), ``gold``, and ``token-kl`` (the
  per-token KL of the next-token distribution on the choices' tokens, summed per item).

Per objective, cost form and bit-width: the split-half rank stability (Kendall tau between the layer rankings
of two random item halves, mean of 20 splits; tasa warns below 0.5) and the Kendall tau against the
4,096-token profile of the paper table (benchmarks/results/paper_table/layer-sensitivity.json: ``nll`` text
costs, choice ``kl``), i.e. whether the cheap ranking is the ranking a large sample gives.

Also writes, per probe-token count, the layer profile under three cost settings as sensitivity records
(benchmarks/results/profile_cost/sensitivity-TOKENS-SETTING.json; costs only), which benchmarks/allocation.py
allocates and quantizes (rows tasa-pTOKENS-SETTING): ``kl`` (text token KL, ARC choice KL: tasa's default since
2026-12-04), ``nll`` (text NLL increase, ARC choice KL: the default before) and ``token-kl`` (token KL for
every objective, ARC on its choice tokens).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or '.').resolve() != _HERE]
sys.path.insert(0, str(_HERE.parent))
from benchmarks.common import RESULTS, ROOT, WORK, row, write_results  # noqa: E402

BENCH = "profile_cost"
REFERENCE = RESULTS / "paper_table" / "layer-sensitivity.json"
OBJECTIVES = ("wikitext2", "gsm8k", "arc_easy")
BITS = (3, 4, 8)
FORMS = {"nll": ("kl", "nll"), "choice": ("kl", "gold", "token-kl")}
SETTINGS = {"kl": {"nll": "kl", "choice": "kl"}, "nll": {"nll": "nll", "choice": "kl"},
            "token-kl": {"nll": "kl", "choice": "token-kl"}}  # cost form per objective kind
RECORDS = RESULTS / BENCH


def profile(tokens: int):
    """The probes of one profile (objectives, results, wall seconds of this call)."""
    from tasa.config import ProfileSpec
    from tasa.models import load, resolve
    from tasa.profile.objectives import build_objective
    from tasa.profile.probe import ProbeStore, run_probes

    lm = load("smollm2-135m")
    arch = resolve(lm.model)
    spec = ProfileSpec(objectives=OBJECTIVES, bits=BITS, group_size=64, probe_tokens=tokens, probe_seqlen=128)
    objs = [build_objective(o, lm.tokenizer, min_tokens=tokens, seqlen=128, seed=0, max_length=lm.max_length)
            for o in OBJECTIVES]
    settings = {"model": "smollm2-135m", "objectives": list(OBJECTIVES), "bits": list(BITS), "group_size": 64,
                "probe_tokens": tokens, "seqlen": 128, "seed": 0, "probe_scores": "nll+kl"}
    t0 = time.perf_counter()
    res = run_probes(lm.model, arch, objs, spec, store=ProbeStore(WORK / BENCH / str(tokens), settings))
    return objs, res, time.perf_counter() - t0, arch


def _form(res, o, form: str, bits: int) -> tuple[float, list[float]]:
    """Split-half stability and per-unit costs of objective ``o`` scored by cost ``form``."""
    from tasa.profile.sensitivity import sensitivities

    variant = dataclasses.replace(o, **({"token_cost": form} if o.kind == "nll" else {"choice_cost": form}))
    costs, stability, _ = sensitivities(res, [variant], (bits,))
    return stability[o.name][str(bits)], costs[o.name][str(bits)]["cost"]


def write_sensitivity(path: Path, res, objs, arch, forms: dict, tokens: int) -> None:
    """A sensitivity record (tasa.schemas.Sensitivity; costs without intervals) of the probes, each objective
    scored by ``forms[its kind]``."""
    from tasa import schemas
    from tasa.artifacts import write_json_atomic

    numels = arch.numels()
    units = [schemas.ProfileUnit(u.name, u.layer, u.modules, sum(numels[m] for m in u.modules)) for u in res.units]
    costs = {o.name: {str(b): {"cost": [float(c) for c in _form(res, o, forms[o.kind], b)[1]]} for b in BITS}
             for o in objs}
    rec = schemas.Sensitivity(granularity="layer", bits=list(BITS), group_size=64, units=units, costs=costs,
                              model="smollm2-135m", fusion_groups=[tuple(g) for g in arch.fusion_groups()],
                              extra={"probe_tokens": tokens, "cost_forms": forms,
                                     "note": "written by benchmarks/profile_cost.py"})
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, rec.to_dict())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--probe-tokens", type=int, nargs="+", default=[768])
    args = ap.parse_args()
    from tasa.profile.stats import kendall_tau

    ref = json.loads(REFERENCE.read_text())
    rows = []
    for tokens in args.probe_tokens:
        objs, res, wall, arch = profile(tokens)
        for setting, forms in SETTINGS.items():
            write_sensitivity(RECORDS / f"sensitivity-{tokens}-{setting}.json", res, objs, arch, forms, tokens)
        processed = {o.name: int(sum(int(m.nonzero().max()) + 1 for m in o.score_mask)) for o in objs}
        for o in objs:
            for form in FORMS[o.kind]:
                for b in BITS:
                    stability, cost = _form(res, o, form, b)
                    m = {"split_half_stability": stability,
                         "tau_vs_4096_token_profile": kendall_tau(cost, ref["costs"][o.name][str(b)]["cost"]),
                         "items": o.n_items, "scored_tokens": o.scored_tokens, "processed_tokens": processed[o.name],
                         "probe_tokens": tokens}
                    rows.append(row(f"{o.name}-{form}-w{b}-{tokens}tok", "tasa", f"rtn-layer-probe/{form}", b, 64,
                                    None, m, res.probe_seconds))
                    print(rows[-1]["name"], json.dumps(m))
        print(f"{tokens} probe tokens: probes {res.probe_seconds:.0f} s (this call {wall:.0f} s); processed tokens "
              f"{processed}")
    cmd = ".venv/bin/python benchmarks/profile_cost.py --probe-tokens " + " ".join(map(str, args.probe_tokens))
    out = write_results(BENCH, cmd, rows, {"reference": str(REFERENCE.relative_to(ROOT))})
    print(f"written {out}")


if __name__ == "__main__":
    main()
