"""Calibration-mixture search on SmolLM2-135M: do the training-free criteria predict post-quantization quality?

    .venv/bin/python benchmarks/mixture.py      # resumable: every part cached in benchmarks/.work/mixture

For each target task (gsm8k, arc_easy) and general share r in 0, 1/8, 1/4, 1/2, 3/4, 7/8, 1 of the calibration
mixture wikitext2:r,TASK:1-r:

- criteria: `tasa search-mixture` (hessian-trace and grad-align; 64 x 512 tokens per source, 32 held-out task
  windows split off the task's calibration rows, damping 0.01, count sketch 65,536 per layer);
- measured: the model GPTQ-quantized on that mixture (64 x 512 tokens, seed 0, group size 64) at W3 and with the
  3.5-bit task-aware plan of benchmarks/allocation.py (beta 0.5), evaluated on held-out test rows: GSM8K
  gold-solution NLL (first 150, zero-shot), ARC-Easy accuracy and the KL divergence of its answer distribution
  from the full-precision model's (first 300, zero-shot), WikiText-2 perplexity (first 20 windows of 512).

Single-domain failure cases ride along: every quantized model is evaluated on all three, so GSM8K-only calibration
is also scored on ARC-Easy and vice versa, and an MBPP-only (code) calibration is scored on both.

Calibration-seed replicates (rows ``...-s1``, ``...-s2``: other calibration windows, same mixture) measure how much
one GPTQ W3 point moves with the calibration sample alone, the yardstick for the differences between ratios.

Reported per target and configuration: Kendall tau between each criterion and the measured quality over the grid
(sign-adjusted so that +1 means the criterion orders the ratios exactly as quality does), the ratio each criterion
chooses, the measured best, whether the choice is within one grid step, and the costs.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or '.').resolve() != _HERE]
sys.path.insert(0, str(_HERE.parent))
from benchmarks.common import parse_or_work, ROOT, WORK, cached, row, run_json, write_results  # noqa: E402

BENCH = "mixture"
GROUP = 64
RATIOS = (0.0, 0.125, 0.25, 0.5, 0.75, 0.875, 1.0)
TARGETS = ("gsm8k", "arc_easy")
NSAMPLES, SEQLEN = 64, 512
SEARCH_NSAMPLES = 64  # the same calibration size as the quantized points
LIMITS = {"wikitext2": 20, "arc_easy": 300, "gsm8k": 150}
PROFILE = WORK / "profile-gold" / "layer" / "sensitivity.json"  # the gold-cost profile (see docs/RESULTS.md)
FIGURE = ROOT / "docs" / "figures" / "mixture.png"
QUALITY = {"gsm8k": "gsm8k_gold_nll", "arc_easy": "arc_easy_choice_kl"}  # lower is better
# calibration-seed replicates of one grid point: how far apart must two ratios be to differ beyond sampling noise?
SEED_REPLICATES = ("gsm8k-r0.5-w3-s1", "gsm8k-r0.5-w3-s2", "gsm8k-r0-w3-s1", "gsm8k-r0-w3-s2")


def point_name(target: str, ratio: float, config: str) -> str:
    return f"{target}-r{ratio:g}-{config}"


def all_points() -> list[str]:
    pts = [point_name(t, r, c) for c in ("w3", "plan3.5") for t in TARGETS for r in RATIOS]
    return ["fp", *pts, "mbpp-r0-w3", "mbpp-r0-plan3.5", *SEED_REPLICATES]


def parse_point(name: str) -> tuple[str, float, str, int]:
    """``TARGET-rRATIO-CONFIG[-sSEED]`` -> (target, general share, config, calibration seed)."""
    parts = name.split("-")
    seed = int(parts.pop()[1:]) if len(parts) == 4 else 0
    target, r, config = parts
    return target, float(r[1:]), config, seed


def _calib(name: str) -> str:
    target, r, _, _ = parse_point(name)
    if target == "mbpp":
        return "mbpp"
    parts = [("wikitext2", r), (target, 1 - r)]
    return ",".join(f"{n}:{w:g}" for n, w in parts if w > 0)


def evaluate(lm, fp_items: list | None) -> tuple[dict, list]:
    import torch

    from tasa.data import eval_texts
    from tasa.eval.perplexity import perplexity
    from tasa.eval.runner import run_task
    from tasa.eval.tasks import get_task

    m = {"wikitext2_ppl": perplexity(lm.model, lm.tokenizer, "\n\n".join(eval_texts("wikitext2")), seqlen=SEQLEN,
                                     limit=LIMITS["wikitext2"], progress=False).ppl}
    g = run_task(lm.model, lm.tokenizer, get_task("gsm8k"), limit=LIMITS["gsm8k"], num_fewshot=0, generate=False,
                 progress=False)
    m["gsm8k_gold_nll"] = g.metrics["gold_nll"]
    a = run_task(lm.model, lm.tokenizer, get_task("arc_easy"), limit=LIMITS["arc_easy"], num_fewshot=0,
                 progress=False)
    m["arc_easy_acc"], m["arc_easy_acc_norm"] = a.metrics["acc"], a.metrics["acc_norm"]
    items = [s["lls"] for s in a.samples]
    golds = [s["gold"] for s in a.samples]
    logp = [torch.tensor(x, dtype=torch.float64).log_softmax(0) for x in items]
    m["arc_easy_choice_nll"] = float(sum(-lp[gd] for lp, gd in zip(logp, golds)) / len(logp))
    if fp_items is not None:
        ref = [torch.tensor(x, dtype=torch.float64).log_softmax(0) for x in fp_items]
        m["arc_easy_choice_kl"] = float(sum((r.exp() * (r - lp)).sum() for r, lp in zip(ref, logp)) / len(logp))
    return m, items


def plan_35(arch):
    from tasa.allocate.plan import plan_from_sensitivity

    return plan_from_sensitivity(json.loads(PROFILE.read_text()), 3.5, bits=[3, 4, 8], beta=0.5)[0]


def worker(name: str, work: Path) -> dict:
    import torch

    from tasa.config import CalibSpec, QuantSpec
    from tasa.data import build_calibration
    from tasa.models import load, resolve
    from tasa.plan import Plan
    from tasa.quant.apply import quantize_model

    torch.manual_seed(0)
    lm = load("smollm2-135m")
    if name == "fp":
        m, items = evaluate(lm, None)
        return {"metrics": m, "seconds": None, "arc_items": items}
    if name.startswith("search-"):
        from tasa.pipeline import search_mixture

        target = name[len("search-"):]
        from tasa.config import MixtureSpec, Runtime

        s = search_mixture("smollm2-135m", work / name, MixtureSpec(
            general="wikitext2", tasks=(target,), criteria=("hessian-trace", "grad-align"), ratios=tuple(RATIOS),
            nsamples=SEARCH_NSAMPLES, seqlen=SEQLEN, group_size=GROUP), Runtime(batch_size=8, progress=False)).record
        return {k: s[k] for k in ("grid", "results", "calib", "seconds")}
    fp = json.loads((work / "fp.json").read_text())
    arch = resolve(lm.model)
    _, _, config, seed = parse_point(name)
    plan = (Plan.uniform([m.name for m in arch.modules], QuantSpec(bits=3, group_size=GROUP)) if config == "w3"
            else plan_35(arch))
    calib = _calib(name)
    cal = build_calibration(lm.tokenizer, CalibSpec.parse(calib, nsamples=NSAMPLES, seqlen=SEQLEN, seed=seed))
    t0 = time.perf_counter()
    quantize_model(lm.model, arch, plan, cal.input_ids, batch_size=8, progress=False)
    seconds = time.perf_counter() - t0
    m, _ = evaluate(lm, fp["arc_items"])
    return {"metrics": m, "seconds": seconds, "bits": plan.average_bits(arch.numels()), "calib": calib, "seed": seed}


def _tau(x: list[float], y: list[float]) -> float:
    from tasa.profile.stats import kendall_tau

    return kendall_tau(x, y)


def analyse(points: dict, searches: dict) -> dict:
    """Per target and configuration: criterion vs measured quality over the ratio grid."""
    out = {}
    for target in TARGETS:
        s = searches[target]
        alphas = [w[0] for w in s["grid"]]
        for config in ("w3", "plan3.5"):
            names = [point_name(target, a, config) for a in alphas]
            if not all(n in points for n in names):
                continue
            quality = [points[n]["metrics"][QUALITY[target]] for n in names]  # lower is better
            best_j = min(range(len(alphas)), key=lambda j: quality[j])
            entry = {"quality_metric": QUALITY[target], "alphas": alphas, "quality": quality,
                     "measured_best": alphas[best_j], "criteria": {}}
            ordered = sorted(alphas)
            for crit, r in s["results"].items():
                v = r["values"]
                # +1: the criterion's "better" order equals the measured quality's "better" order
                tau = _tau(v, quality) if r["lower_is_better"] else _tau([-x for x in v], quality)
                chosen = r["best"][0]
                steps = abs(ordered.index(chosen) - ordered.index(alphas[best_j]))
                entry["criteria"][crit] = {"tau_vs_quality": tau, "chosen": chosen, "grid_steps_from_best": steps,
                                           "within_one_step": steps <= 1,
                                           # how much worse the chosen ratio's model is than the best one's
                                           "regret": quality[alphas.index(chosen)] - quality[best_j],
                                           "seconds": s["seconds"][crit]}
            out[f"{target}/{config}"] = entry
    return out


def same_point(name: str, work: Path) -> dict | None:
    """A finished point with the same calibration, configuration and seed (the general-only r=1 point is one
    model for every target), reused instead of quantizing the same model twice."""
    if name == "fp" or name.startswith("search-"):
        return None
    _, _, config, seed = parse_point(name)
    for other in all_points():
        f = work / f"{other}.json"
        if other != name and other != "fp" and f.is_file():
            _, _, c, sd = parse_point(other)
            if (c, sd, _calib(other)) == (config, seed, _calib(name)):
                return json.loads(f.read_text())
    return None


def seed_noise(points: dict) -> dict:
    """Per replicated grid point: the quality metrics of every calibration seed measured so far, with their
    sample standard deviation, and the standard deviation pooled over the replicated points."""
    import statistics

    out = {}
    for rep in SEED_REPLICATES:
        target, r, config, _ = parse_point(rep)
        base = point_name(target, r, config)
        names = [base] + [n for n in SEED_REPLICATES if n.startswith(base + "-s")]
        have = [n for n in names if n in points]
        if len(have) > 1 and base not in out:
            out[base] = {k: {"values": {n: points[n]["metrics"][k] for n in have},
                             "sd": statistics.stdev(points[n]["metrics"][k] for n in have)}
                         for k in ("gsm8k_gold_nll", "arc_easy_choice_kl", "wikitext2_ppl")}
    if out:
        out["pooled_sd"] = {k: statistics.fmean(e[k]["sd"] ** 2 for e in out.values()) ** 0.5
                            for k in ("gsm8k_gold_nll", "arc_easy_choice_kl", "wikitext2_ppl")}
    return out


def figure(points: dict, searches: dict, noise: dict, path: Path) -> Path:
    """Per target: both criteria and the measured quality (W3 and the 3.5-bit plan) against the general share,
    with the pooled calibration-seed standard deviation as error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from tasa.report.common import save_figure

    fig, axes = plt.subplots(len(searches), 3, figsize=(12, 3.3 * len(searches)), squeeze=False)
    for ax_row, (target, s) in zip(axes, searches.items()):
        alphas = [w[0] for w in s["grid"]]
        for ax, crit in zip(ax_row, ("hessian-trace", "grad-align")):
            r = s["results"][crit]
            ax.plot(alphas, r["values"], marker="o")
            ax.axvline(r["best"][0], color="#cc3311", linestyle="--", linewidth=1)
            ax.set_title(f"{target}: {crit} ({'lower' if r['lower_is_better'] else 'higher'} is better)",
                         fontsize=9)
            ax.set_xlabel("general share r (wikitext2)")
        ax = ax_row[2]
        sd = noise.get("pooled_sd", {}).get(QUALITY[target])
        for config, colour in (("w3", "#0077bb"), ("plan3.5", "#ee7733")):
            have = [a for a in alphas if point_name(target, a, config) in points]
            if have:
                q = [points[point_name(target, a, config)]["metrics"][QUALITY[target]] for a in have]
                ax.errorbar(have, q, yerr=sd, marker="o", capsize=3, color=colour, label=config)
        ax.set_title(f"{target}: measured {QUALITY[target]} (lower is better)", fontsize=9)
        ax.set_xlabel("general share r (wikitext2)")
        ax.legend(fontsize=8)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_figure(fig, path)
    return path


def main() -> None:
    args, work = parse_or_work(__doc__, BENCH, worker, [*(f"search-{t}" for t in TARGETS), *all_points()])
    if not PROFILE.is_file():
        raise SystemExit(f"{PROFILE} is missing: run benchmarks/profile.py first (the 3.5-bit plan needs it)")
    work.mkdir(parents=True, exist_ok=True)
    names = args.rows.split(",")
    if any(n != "fp" and not n.startswith("search-") for n in names) and "fp" not in names \
            and not (work / "fp.json").is_file():
        names.insert(0, "fp")
    results = {}
    for name in names:
        print(f"[{BENCH}] {name} ...", flush=True)
        twin = same_point(name, work)
        results[name] = cached(work / f"{name}.json", lambda n=name, t=twin: dict(t) if t else run_json(
            [sys.executable, __file__, "--worker", n], log=work / "logs" / f"{n}.log"))
        if "metrics" in results[name]:
            print(f"  {json.dumps(results[name]['metrics'])}", flush=True)
    # everything finished so far, this invocation's or earlier ones'
    done = {p.stem: json.loads(p.read_text()) for p in work.glob("*.json")}
    searches = {t: done[f"search-{t}"] for t in TARGETS if f"search-{t}" in done}
    points = {n: r for n, r in done.items() if not n.startswith("search-")}
    rows = []
    for name in all_points():
        if name not in points:
            continue
        r = points[name]
        rows.append(row(name, "tasa" if name != "fp" else "none", "fp" if name == "fp" else "gptq",
                        r.get("bits"), GROUP, r.get("calib"), r["metrics"], r["seconds"]))
    analysis = analyse(points, searches) if searches else {}
    noise = seed_noise(points)
    if searches:
        print(f"figure {figure(points, searches, noise, FIGURE)}")
    criteria = {t: {"grid": s["grid"], "calib": s["calib"], "seconds": s["seconds"],
                    **{c: {k: v for k, v in r.items() if k in ("values", "per_layer", "best", "damping", "fine",
                                                               "convex", "blowup_ratio", "lower_is_better")}
                       for c, r in s["results"].items()}} for t, s in searches.items()}
    out = write_results(BENCH, ".venv/bin/python benchmarks/mixture.py", rows,
                        {"settings": {"ratios": RATIOS, "nsamples_quantize": NSAMPLES,
                                      "nsamples_search": SEARCH_NSAMPLES, "seqlen": SEQLEN, "group_size": GROUP,
                                      "eval_limits": LIMITS, "quality": QUALITY,
                                      "profile": str(PROFILE.relative_to(ROOT))},
                         "criteria": criteria, "analysis": analysis, "seed_noise": noise})
    for key, e in analysis.items():
        crit = ", ".join(f"{c}: tau {v['tau_vs_quality']:+.2f}, chose {v['chosen']:g}"
                         for c, v in e["criteria"].items())
        print(f"{key}: measured best {e['measured_best']:g} ({e['quality_metric']}); {crit}")
    print(f"written {out}")


if __name__ == "__main__":
    main()
