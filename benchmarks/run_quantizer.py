"""What the run report's quantizer estimates rest on: `tasa quantize` on `tasa run`'s own plan and calibration
with the default quantizer and with each better option the report names (tasa.config.BETTER_QUANTIZER, and
BETTER_QUANTIZER_BF16 for a CPU that computes bfloat16 natively), one after the other in fresh processes on one
machine, nothing else running; each option's quantize time over the default's in this run is the ratio the report
multiplies its run's quantize time by.

    .venv/bin/python benchmarks/run_quantizer.py [--rows default,better,better-bf16]

Plan: the committed `make run` plan (benchmarks/results/run-better/plan.json: SmolLM2-135M, 3.5 bits, group size
64); calibration as `tasa run` quantizes it: the mixture it searched (gsm8k:0.5,arc_easy:0.5), 64 x 512 tokens,
seed 0.  Writes benchmarks/results/run_quantizer.json after each row, with every row measured before (a finished
row is not run again; ``--rows`` runs some and keeps the others; ``--results``: another record).  Seconds are
`tasa quantize`'s own quantize stage (its quantize.json), wall seconds and peak RSS the whole process's (GNU time).
"""
from __future__ import annotations

import argparse
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or '.').resolve() != _HERE]
sys.path.insert(0, str(_HERE.parent))
from benchmarks.common import (RESULTS, ROOT, WORK, chosen_rows, parse_time_log, read_json, row,  # noqa: E402
                               write_results)

from tasa.config import BETTER_QUANTIZER, BETTER_QUANTIZER_BF16  # noqa: E402

BENCH = "run_quantizer"
PLAN = RESULTS / "run-better" / "plan.json"
CALIB, NSAMPLES, SEQLEN = "gsm8k:0.5,arc_easy:0.5", 64, 512  # what `make run` searched and quantizes with
OPTIONS = {"default": "", "better": BETTER_QUANTIZER[0], "better-bf16": BETTER_QUANTIZER_BF16[0]}


def quantize(name: str, flags: str) -> dict:
    """`tasa quantize` of the plan with ``flags`` in a fresh process; its quantize.json and GNU time's summary."""
    out, log = WORK / BENCH / name, WORK / BENCH / f"{name}-time.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    cmd = ["/usr/bin/time", "-v", str(ROOT / ".venv" / "bin" / "tasa"), "quantize", "--model", "smollm2-135m",
           "--plan", str(PLAN), "--calib", CALIB, "--nsamples", str(NSAMPLES), "--seqlen", str(SEQLEN),
           "--output-dir", str(out), "--overwrite", "--quiet", *flags.split()]
    with open(log, "w") as f:
        subprocess.run(cmd, stderr=f, check=True)
    return {**read_json(out / "quantize.json"), **parse_time_log(log.read_text(errors="replace"))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", default=",".join(OPTIONS), help=f"some of {','.join(OPTIONS)} (default: all)")
    ap.add_argument("--results", type=Path, default=RESULTS / f"{BENCH}.json",
                    help="the record to write and resume (default: benchmarks/results/run_quantizer.json); another "
                         "one measures the rows again, in a run of their own")
    args = ap.parse_args()
    wanted = chosen_rows(args.rows, OPTIONS)
    path = args.results
    done = {r["name"]: r for r in read_json(path)["rows"]} if path.is_file() else {}
    command = " ".join([".venv/bin/python", "benchmarks/run_quantizer.py", *sys.argv[1:]])
    group_size, = {m["group_size"] for m in read_json(PLAN)["modules"].values()}  # the plan's one group size
    for name in [n for n in OPTIONS if n in wanted and n not in done]:
        started = datetime.now(timezone.utc).isoformat(timespec="seconds")
        q = quantize(name, OPTIONS[name])
        metrics = {"quantize_seconds": q["seconds"]["quantize"], "wall_seconds": q["wall_seconds"],
                   "peak_rss_gb": q["peak_rss_gb"]}
        done[name] = dict(row(name, "tasa", f"{q['quantizer']} ({OPTIONS[name] or 'tasa quantize defaults'})",
                              q["average_bits"], group_size, q["calib"], metrics, q["seconds"]["quantize"]),
                          started=started, flags=OPTIONS[name])
        rows = [done[n] for n in OPTIONS if n in done]
        base = done.get("default")
        ratios = {r["name"]: r["seconds"] / base["seconds"] for r in rows} if base else {}
        write_results(BENCH, command, rows, {"over_default": ratios}, path=path)
        print(f"{name}: quantized in {q['seconds']['quantize']:.0f} s", flush=True)


if __name__ == "__main__":
    main()
