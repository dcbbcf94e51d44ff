"""Task evaluation cross-check: tasa vs lm-eval 0.4.13 on SmolLM2-135M (full precision), same run.

    .venv/bin/python benchmarks/eval_crosscheck.py      # resumable; rows cached in benchmarks/.work/eval_crosscheck

Work (issue 4): first 500 test rows of arc_easy and arc_challenge (0-shot, lm-eval's default),
first 100 test rows of gsm8k (5-shot, greedy, at most 256 new tokens). Both tools read the same
local files (lm-eval through its own task YAMLs, with only the dataset swapped for the local JSON;
see peers/lmeval_run.py) and the same float32 model directory, batch size 8, on the CPU. Each row
runs in a fresh process; "seconds" is the process's whole evaluation (model and data loading
included) as measured inside it.
"""
from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

# benchmarks/ must not be on sys.path: benchmarks/profile.py would shadow the standard 'profile' module
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or '.').resolve() != _HERE]
sys.path.insert(0, str(_HERE.parent))
from benchmarks.common import WORK, cached, peer_venv, row, run_json, write_results  # noqa: E402

BENCH = "eval_crosscheck"
WORKLOAD = {"arc_easy": (500, 0), "arc_challenge": (500, 0), "gsm8k": (100, 5)}  # task -> (limit, shots)
BATCH = 8
PEER_REQS = ["torch==2.13.0", "transformers==5.23.0", "lm-eval[hf]==0.4.13"]


def tasa_worker(task: str, model_dir: str) -> dict:
    t0 = time.perf_counter()
    from tasa.eval.runner import run_task
    from tasa.eval.tasks import get_task
    from tasa.models import load

    limit, shots = WORKLOAD[task]
    lm = load(model_dir)
    # the same work as lm-eval: no gold-solution NLL pass on top of generation
    res = run_task(lm.model, lm.tokenizer, get_task(task), limit=limit, num_fewshot=shots, batch_size=BATCH,
                   gold_nll=False, progress=False)
    seconds = time.perf_counter() - t0
    if task == "gsm8k":
        items = [{"doc_id": s["doc"], "strict-match": s["strict_match"], "flexible-extract": s["flexible_extract"],
                  "response": s["response"]} for s in res.samples]
    else:
        items = [{"doc_id": s["doc"], "acc": s["acc"], "acc_norm": s["acc_norm"], "lls": s["lls"]}
                 for s in res.samples]
    return {"results": res.metrics, "items": items, "seconds_total": seconds,
            "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


def compare(task: str, t: dict, l: dict) -> dict:
    ti, li = t["items"], l["items"]
    assert [x["doc_id"] for x in ti] == [x["doc_id"] for x in li], "item order differs"
    keys = ("strict-match", "flexible-extract") if task == "gsm8k" else ("acc", "acc_norm")
    out = {"n": len(ti), "time_tasa_over_lmeval": t["seconds_total"] / l["seconds_total"]}
    for k in keys:
        a = sum(x[k] for x in ti) / len(ti)
        b = sum(x[k] for x in li) / len(li)
        out[f"{k}_diff_points"] = 100 * (a - b)
        out[f"{k}_item_agreement"] = sum(x[k] == y[k] for x, y in zip(ti, li)) / len(ti)
    if task == "gsm8k":
        out["identical_responses"] = sum(x["response"] == y["response"] for x, y in zip(ti, li)) / len(ti)
    else:
        out["max_abs_ll_diff"] = max(abs(a - b) for x, y in zip(ti, li) for a, b in zip(x["lls"], y["lls"]))
    return out


def metrics_of(task: str, r: dict) -> dict:
    items = r["items"]
    if task == "gsm8k":
        m = {"gsm8k_strict_match": sum(x["strict-match"] for x in items) / len(items),
             "gsm8k_flexible_extract": sum(x["flexible-extract"] for x in items) / len(items)}
    else:
        m = {f"{task}_acc": sum(x["acc"] for x in items) / len(items),
             f"{task}_acc_norm": sum(x["acc_norm"] for x in items) / len(items)}
    m["n"] = len(items)
    if "peak_rss_gb" in r:
        m["peak_rss_gb"] = r["peak_rss_gb"]
    return m


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", default=",".join(WORKLOAD), help="comma-separated subset of tasks")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--model-dir", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(tasa_worker(args.worker, args.model_dir)))
        return

    from tasa.data import store
    from tasa.models import load
    from tasa.models.loading import cache_dir

    work = WORK / BENCH
    work.mkdir(parents=True, exist_ok=True)
    model_dir = load("smollm2-135m").path  # the float32 safetensors directory both tools read
    tasks = args.tasks.split(",")
    rows, comparisons, results = [], {}, {}
    for task in tasks:
        limit, shots = WORKLOAD[task]
        print(f"[{BENCH}] {task}: tasa ...", flush=True)
        t = cached(work / "rows" / f"tasa-{task}.json",
                   lambda task=task: run_json([sys.executable, __file__, "--worker", task, "--model-dir", model_dir],
                                              log=work / "logs" / f"tasa-{task}.log"))
        print(f"[{BENCH}] {task}: lm-eval ...", flush=True)

        def peer(task=task, limit=limit, shots=shots):
            py = peer_venv("lmeval", PEER_REQS)
            cmd = [str(py), str(Path(__file__).parent / "peers" / "lmeval_run.py"), "--model", model_dir,
                   "--task", task, "--limit", str(limit), "--num-fewshot", str(shots), "--batch-size", str(BATCH),
                   "--data-dir", str(store.plain_dir(cache_dir())), "--work", str(work / "lmeval-tasks")]
            t0 = time.perf_counter()
            r = run_json(["/usr/bin/time", "-f", "%M", *cmd], log=work / "logs" / f"lmeval-{task}.log")
            r["seconds_wall"] = time.perf_counter() - t0
            return r

        l = cached(work / "rows" / f"lmeval-{task}.json", peer)
        peak = _peak_from_log(work / "logs" / f"lmeval-{task}.log")
        if peak is not None:
            l["peak_rss_gb"] = peak
        comparisons[task] = compare(task, t, l)
        print(f"[{BENCH}] {task}: {json.dumps(comparisons[task])}", flush=True)
        calib = None
        rows.append(row(f"tasa-{task}", "tasa", "fp", 32, None, calib, metrics_of(task, t), t["seconds_total"]))
        rows.append(row(f"lmeval-{task}", "lm-eval 0.4.13", "fp", 32, None, calib, metrics_of(task, l),
                        l["seconds_total"]))
        results[task] = (t, l)
    out = write_results(BENCH, ".venv/bin/python benchmarks/eval_crosscheck.py", rows,
                        {"settings": {"model": "smollm2-135m (float32)", "workload": {
                            k: {"limit": v[0], "num_fewshot": v[1]} for k, v in WORKLOAD.items()},
                            "batch_size": BATCH, "device": "cpu", "peer": "lm-eval[hf]==0.4.13"},
                         "comparison": comparisons})
    for r in rows:
        print(f"{r['name']:22} {json.dumps(r['metrics'])} {r['seconds']:.1f}s")
    print(f"written {out}")


def _peak_from_log(log: Path) -> float | None:
    """Peak RSS printed by /usr/bin/time -f %M (KiB) as the last stderr line of the worker log."""
    try:
        last = log.read_text().strip().splitlines()[-1]
        return int(last) / 2**20
    except (OSError, ValueError, IndexError):
        return None


if __name__ == "__main__":
    main()
