"""Quantizer options one at a time (issue 38): the same plan, calibration and scoring, one option changed per row.

    .venv/bin/python benchmarks/quantizer_options.py [--rows NAME,...] [--seeds 0,1,2]

Plan: `tasa run`'s committed 3.5-bit plan of SmolLM2-135M (benchmarks/results/run/plan.json: 3 and 4 bits, group
size 64, symmetric); calibration: `tasa run`'s (gsm8k:0.5,arc_easy:0.5, 64 x 512 tokens, seed s); scoring: `tasa
eval` on the first 40 WikiText-2 test windows of 512 tokens with KL to the float model (its reference log-probs).
Rows: ``gptq`` (plain grid, ``--scale-search 0``), ``gptq-ss16`` (``--scale-search 16``), ``gptq-actorder`` (``--act-order``),
``gptq-actorder-static`` (with ``--static-groups``), the same with ``-ss16`` (and the search), ``learnedN-ss16`` (``--learn-rounding N`` from the searched
grid; steps in bfloat16 where the CPU has it, ``learnedNf32`` in float32).  ``learned128b2-ss16``: 128 steps of 2
sequences each (``--batch-size 2``), the tokens of 32 steps of 8.  ``...-ftA``: the default GPTQ with asymmetric
calibration (``--float-targets A``: each linear fitted to the float model's outputs from the quantized model's
inputs, GPTAQ's objective).  ``learned32mse-ss16`` was measured with
the plain-MSE objective tasa had first (kept for the record; the code no longer has it).  Each row's record lands in
benchmarks/results/quantizer_options.json as it finishes; a finished row is not run again.
"""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or '.').resolve() != _HERE]
sys.path.insert(0, str(_HERE.parent))
from benchmarks.common import RESULTS, WORK, row, write_results  # noqa: E402

BENCH = "quantizer_options"
PLAN = RESULTS / "run" / "plan.json"
CALIB, NSAMPLES, SEQLEN, WINDOWS = "gsm8k:0.5,arc_easy:0.5", 64, 512, 40
# Each row names every option whose default changed since the rows were first measured: act-order and static
# groups (on by default since 2026-12-04), asymmetric calibration (on since 2026-12-05).
OFF, PLAIN = ["--float-targets", "0"], ["--no-act-order", "--no-static-groups"]
ROWS = {"gptq": ["--scale-search", "0", *PLAIN, *OFF], "gptq-ss16": ["--scale-search", "16", *PLAIN, *OFF],
        "gptq-actorder": ["--scale-search", "0", "--act-order", "--no-static-groups", *OFF],
        "gptq-actorder-static": ["--scale-search", "0", "--act-order", "--static-groups", *OFF],
        "gptq-actorder-ss16": ["--scale-search", "16", "--act-order", "--no-static-groups", *OFF],
        "gptq-actorder-static-ss16": ["--scale-search", "16", "--act-order", "--static-groups", *OFF],
        "learned32f32-ss16": ["--scale-search", "16", "--learn-rounding", "32", "--learn-dtype", "float32"],
        "learned32-ss16": ["--scale-search", "16", "--learn-rounding", "32"],
        "learned128b2-ss16": ["--scale-search", "16", "--learn-rounding", "128", "--batch-size", "2"],
        "gptq-actorder-static-ss16-ft1": ["--scale-search", "16", "--act-order", "--static-groups",
                                          "--float-targets", "1"],
        "gptq-actorder-static-ss16-ft025": ["--scale-search", "16", "--act-order", "--static-groups",
                                            "--float-targets", "0.25"]}


def measure(name: str, seed: int, work: Path) -> dict:
    out = work / f"{name}-s{seed}"
    t0 = time.perf_counter()
    if not (out / "quantize.json").is_file():
        subprocess.run([sys.executable, "-m", "tasa", "quantize", "--model", "smollm2-135m", "--plan", str(PLAN),
                        "--calib", CALIB, "--nsamples", str(NSAMPLES), "--seqlen", str(SEQLEN), "--seed", str(seed),
                        *ROWS[name], "--format", "fp", "--quiet", "--overwrite", "--output-dir", str(out)], check=True)
    wall = time.perf_counter() - t0
    rec = json.loads((out / "quantize.json").read_text())
    scores = work / f"eval-{name}-s{seed}.json"
    subprocess.run([sys.executable, "-m", "tasa", "eval", "--model", str(out), "--tasks", "wikitext2", "--limit",
                    str(WINDOWS), "--reference", "smollm2-135m", "--quiet", "--output", str(scores)], check=True)
    w = json.loads(scores.read_text())["results"]["wikitext2"]
    return row(f"{name}-s{seed}", "tasa", name, rec["average_bits"], 64,
               f"{CALIB} ({NSAMPLES} x {SEQLEN}, seed {seed})",
               {"wikitext2_ppl": w["ppl"], "wikitext2_kl": w.get("kl"), "quantize_seconds": rec["seconds"]["quantize"],
                "options": ROWS[name]}, wall)


def main() -> None:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", default=",".join(ROWS))
    ap.add_argument("--seeds", default="0")
    args = ap.parse_args()
    work = WORK / BENCH
    work.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{BENCH}.json"
    done = {r["name"]: r for r in json.loads(path.read_text())["rows"]} if path.is_file() else {}
    for seed in (int(s) for s in args.seeds.split(",")):
        for name in args.rows.split(","):
            if f"{name}-s{seed}" in done:
                continue
            done[f"{name}-s{seed}"] = measure(name, seed, work)
            print(json.dumps(done[f"{name}-s{seed}"]), flush=True)
            write_results(BENCH, ".venv/bin/python benchmarks/quantizer_options.py " + " ".join(sys.argv[1:]),
                          list(done.values()))


if __name__ == "__main__":
    main()
