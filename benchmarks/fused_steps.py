"""Fused learning steps (tasa.quant.learned._Fused), measured: the fastest option at issue 38's KL goal, quantized
with and without torch.compile in the same run, one after the other on an otherwise idle machine.

    .venv/bin/python benchmarks/fused_steps.py [--seed 0]

Row: the paper table's ``tasa+gk128b2-3.5-mix75`` (TASA's 3.5-bit plan; GPTQ with act-order, static groups,
``--scale-search 16``, ``--float-targets 0.25``, then 128 steps of learned rounding a layer in 2-sequence batches,
the last layer on the output distribution's KL; three quarters WikiText-2 calibration), quantized and scored by
benchmarks/paper_table.py's own worker (same calibration tokens, same scoring: KL to FP and perplexity on 40
WikiText-2 windows, ARC, GSM8K gold NLL).  ``eager``: the worker with TORCH_COMPILE_DISABLE=1 (tasa before the
fusion: every score should equal the paper table's record of the row to the last digit, which the row's
``matches_record`` checks);
``fused``: as tasa runs by default.  Writes benchmarks/results/fused_steps.json after each variant; a finished
variant is not run again.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or '.').resolve() != _HERE]
sys.path.insert(0, str(_HERE.parent))
from benchmarks.common import RESULTS, WORK, read_json, row, run_json, write_results  # noqa: E402

BENCH = "fused_steps"
ROW = "tasa+gk128b2-3.5-mix75"
VARIANTS = {"eager": {"TORCH_COMPILE_DISABLE": "1"}, "fused": {}}


def main() -> None:
    from benchmarks import paper_table as pt

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seed", type=int, default=0, help="calibration seed of the row (default 0)")
    args = ap.parse_args()
    name = pt.with_seed(ROW, args.seed)
    work = WORK / pt.BENCH
    p = pt.parse(name)
    out = RESULTS / f"{BENCH}.json"
    done = {r["name"]: r for r in read_json(out)["rows"]} if out.is_file() else {}
    recorded = pt.RECORDS / f"{name}.json"
    record = read_json(recorded) if recorded.is_file() else None
    rows = []
    for variant, env in VARIANTS.items():
        key = f"{name}-{variant}"
        if key not in done:  # its inputs (made once in .work) only when it runs
            pt.build_calib(work, p["calib"], p["seed"])
            pt.fp_reference(work)
            r = run_json([sys.executable, str(_HERE / "paper_table.py"), "--worker", name], env=env,
                         log=WORK / BENCH / f"{key}.log")
            learning = r.get("learning", {})
            metrics = dict(r["metrics"], peak_rss_gb=r["peak_rss_gb"],
                           layers_kept=sum(bool(v["kept"]) for v in learning.values()),
                           last_layer_seconds=learning[max(learning, key=int)]["seconds"] if learning else None,
                           learning_seconds=sum(v["seconds"] for v in learning.values()))
            if record is not None:
                metrics["matches_record"] = all(metrics.get(k) == v for k, v in record["metrics"].items())
            done[key] = row(key, "tasa", f"{variant}: {p['quantizer']} quantizer options", r["bits"], pt.GROUP,
                            pt.CALIBS[p["calib"]], metrics, r["seconds"])
        rows.append(done[key])
        extra = {"row": name, "variants": {k: v or "default" for k, v in VARIANTS.items()}}
        if len(rows) == len(VARIANTS):
            extra["fused_over_eager_seconds"] = rows[1]["seconds"] / rows[0]["seconds"]
        write_results(BENCH, f".venv/bin/python benchmarks/fused_steps.py --seed {args.seed}", list(rows), extra)
        print(f"{key}: {r_summary(done[key])}", flush=True)


def r_summary(r: dict) -> str:
    m = r["metrics"]
    return (f"KL {m['wikitext2_kl']:.4f} ppl {m['wikitext2_ppl']:.2f} NLL {m['gsm8k_gold_nll']:.3f} "
            f"in {r['seconds']:.0f} s (learning {m['learning_seconds']:.0f} s, last layer {m['last_layer_seconds']:.0f} s)")


if __name__ == "__main__":
    main()
