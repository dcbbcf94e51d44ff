"""Sensitivity profiling on SmolLM2-135M: measured probes, fast estimators, the Perplexity Illusion.

    .venv/bin/python benchmarks/profile.py     # resumable: probes kept in benchmarks/.work/profile

Work (issue 5): layer granularity, RTN bits 3/4/8, group size 64, objectives wikitext2
(log-perplexity on validation windows), gsm8k (gold-solution NLL on train rows) and arc_easy
(-log p(gold | choices) on train/validation rows), at least 4,096 scored tokens each; both
gradient estimators compared with the probes. Module granularity is timed on three layers
(0, 15, 29) at 3 bits and extrapolated to all 30 layers x 3 bit-widths from the measured
per-probe time. Each part runs in a fresh process.
"""
from __future__ import annotations

import json
import resource
import sys
from pathlib import Path

# benchmarks/ must not be on sys.path: benchmarks/profile.py would shadow the standard 'profile' module
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or '.').resolve() != _HERE]
sys.path.insert(0, str(_HERE.parent))
from benchmarks.common import parse_or_work, cached, row, run_json, write_results  # noqa: E402

BENCH = "profile"
OBJECTIVES = ["wikitext2", "gsm8k", "arc_easy"]
BITS = (3, 4, 8)
GROUP = 64
TOKENS = 4096
MODULE_LAYERS = [0, 15, 29]


def worker(part: str, work: Path) -> dict:
    from tasa.pipeline import profile

    from tasa.config import ProfileSpec, Runtime

    quiet = Runtime(progress=False)
    if part == "layer":
        s = profile("smollm2-135m", work / "layer", ProfileSpec(objectives=tuple(OBJECTIVES), bits=BITS,
                    granularity="layer", group_size=GROUP, probe_tokens=TOKENS, compare_estimators=True),
                    quiet).record
    else:
        s = profile("smollm2-135m", work / "module", ProfileSpec(objectives=tuple(OBJECTIVES), bits=(3,),
                    granularity="module", group_size=GROUP, probe_tokens=TOKENS, layers=MODULE_LAYERS), quiet,
                    report=False).record
    s["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return {k: v for k, v in s.items() if k not in ("machine",)}


def main() -> None:
    args, work = parse_or_work(__doc__, BENCH, worker)
    from tasa.profile.stats import top_k

    work.mkdir(parents=True, exist_ok=True)
    layer = cached(work / "layer.json", lambda: run_json([sys.executable, __file__, "--worker", "layer"],
                                                         log=work / "logs" / "layer.log"))
    module = cached(work / "module.json", lambda: run_json([sys.executable, __file__, "--worker", "module"],
                                                           log=work / "logs" / "module.log"))
    n_layer_probes = len(layer["units"]) * len(BITS)
    per_probe = layer["seconds"]["sensitivity"] / n_layer_probes
    module_per_probe = module["seconds"]["sensitivity"] / len(module["units"])
    module_full = module_per_probe * 7 * 30 * len(BITS)
    rows = []
    tops = {}
    for b in map(str, BITS):
        m = {f"tau_{k.replace('|', '_vs_')}": v["tau"] for k, v in layer["objective_taus"][b].items()}
        m.update({f"tau_{k.replace('|', '_vs_')}_ci": [v["ci_low"], v["ci_high"]]
                  for k, v in layer["objective_taus"][b].items()})
        m["split_half_stability"] = layer["stability"]
        m["peak_rss_gb"] = layer["peak_rss_gb"]
        tops[b] = {o: top_k(layer["costs"][o][b]["cost"], 8) for o in OBJECTIVES}
        m["top8_layers"] = tops[b]
        rows.append(row(f"measured-layer-w{b}", "tasa", "rtn-probe", int(b), GROUP, None, m,
                        layer["seconds"]["sensitivity"]))
    for est, e in layer["estimators"].items():
        m = {f"tau_vs_measured_{o}_w{b}": t for o, per_bits in e["tau_vs_measured"].items()
             for b, t in per_bits.items()}
        m["cost_ratio_vs_measured"] = e["cost_ratio"]
        rows.append(row(f"{est}-layer", "tasa", est, None, GROUP, None, m, e["seconds"]))
    rows.append(row("measured-module-w3-3layers", "tasa", "rtn-probe", 3, GROUP, None,
                    {"probes": len(module["units"]), "seconds_per_probe": module_per_probe,
                     "extrapolated_full_module_profile_seconds": module_full,
                     "layer_profile_seconds_per_probe": per_probe, "peak_rss_gb": module["peak_rss_gb"]},
                    module["seconds"]["sensitivity"]))
    out = write_results(BENCH, ".venv/bin/python benchmarks/profile.py", rows,
                        {"settings": {"objectives": OBJECTIVES, "bits": list(BITS), "group_size": GROUP,
                                      "probe_tokens": TOKENS, "objective_items": layer["objectives"],
                                      "module_layers": MODULE_LAYERS},
                         "layer_profile_seconds_total": layer["seconds"]["total"], "warnings": layer["warnings"],
                         "report": "benchmarks/.work/profile/layer/report.md"})
    for r in rows:
        print(r["name"], json.dumps(r["metrics"])[:400], f"{r['seconds']:.0f}s")
    print(f"written {out}")


if __name__ == "__main__":
    main()
