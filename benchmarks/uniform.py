"""Uniform quantization on SmolLM2-135M: tasa vs GPTQModel 7.6.0, side by side in one run.

    .venv/bin/python benchmarks/uniform.py            # resumable; rows cached in benchmarks/.work/uniform

Settings (issue 3): group size 64 (hidden 576 is not a multiple of 128), 128 x 512-token
WikiText-2 validation calibration built once by tasa (seed 0) and fed identically to
GPTQModel, symmetric grid, no act-order, damp 0.01, true-sequential, batch 8; perplexity
on the first 40 test windows of 512 tokens, evaluated by the same tasa code for every row
(GPTQModel's packed weights are dequantized back to float by GPTQModel itself).
Each row runs in a fresh subprocess so its wall time and peak RSS are its own.
"""
from __future__ import annotations

import json
import math
import resource
import sys
import time
from pathlib import Path

# benchmarks/ must not be on sys.path: benchmarks/profile.py would shadow the standard 'profile' module
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or '.').resolve() != _HERE]
sys.path.insert(0, str(_HERE.parent))
from benchmarks.common import (GPTQMODEL_REQS, parse_or_work, cached, load_linear_weights, peer_venv,  # noqa: E402
                               row, run_json, write_results)

BENCH = "uniform"
GROUP = 64
NSAMPLES, SEQLEN, SEED = 128, 512, 0
EVAL_WINDOWS = 40
DAMP = 0.01
BATCH = 8
ROWS = ["fp", "tasa-rtn-w3", "tasa-rtn-w4", "tasa-gptq-w3", "tasa-gptq-w4", "tasa-gptq-w8",
        "gptqmodel-w3", "gptqmodel-w4"]
# Extra calibration seeds for the GPTQ rows (row name suffix -sN), to tell differences from seed noise.
SEED_ROWS = [f"{tool}-w{b}-s{s}" for s in (1, 2) for b in (3, 4) for tool in ("tasa-gptq", "gptqmodel")]


def parse_row(name: str) -> tuple[str, str, int, int]:
    """'tasa-gptq-w3-s1' -> (tool, method, bits, seed)."""
    parts = name.split("-")
    seed = int(parts.pop()[1:]) if parts[-1].startswith("s") else SEED
    if parts[0] == "fp":
        return "none", "fp", 32, seed
    if parts[0] == "gptqmodel":
        return "gptqmodel", "gptq", int(parts[1][1:]), seed
    return "tasa", parts[1], int(parts[2][1:]), seed


def calib_file(work: Path, seed: int) -> Path:
    return work / ("calib.pt" if seed == SEED else f"calib-s{seed}.pt")


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def eval_ppl(lm) -> dict:
    from tasa.data import eval_texts
    from tasa.eval.perplexity import perplexity

    r = perplexity(lm.model, lm.tokenizer, "\n\n".join(eval_texts("wikitext2")), seqlen=SEQLEN, limit=EVAL_WINDOWS,
                   progress=False)
    return {"wikitext2_ppl": r.ppl, "eval_windows": r.windows}


def worker(name: str, work: Path) -> dict:
    """Run one row in this (fresh) process; print its JSON."""
    import torch

    from tasa.config import QuantSpec
    from tasa.models import load, resolve
    from tasa.plan import Plan
    from tasa.quant.apply import quantize_model

    torch.manual_seed(0)
    lm = load("smollm2-135m")
    arch = resolve(lm.model)
    seconds = None
    tool, method, bits, seed = parse_row(name)
    if tool == "tasa":
        plan = Plan.uniform([m.name for m in arch.modules], QuantSpec(bits=bits, group_size=GROUP, damp=DAMP),
                            method=method)
        calib = torch.load(calib_file(work, seed), weights_only=True) if method == "gptq" else None
        t0 = time.perf_counter()
        quantize_model(lm.model, arch, plan, calib, batch_size=BATCH, progress=False)
        seconds = time.perf_counter() - t0
        peak_quant = peak_rss_gb()
    elif tool == "gptqmodel":
        load_linear_weights(lm, arch, work / f"{name}.safetensors")
        peak_quant = None
    else:
        peak_quant = None
    metrics = eval_ppl(lm)
    metrics["peak_rss_gb"] = peak_quant if peak_quant is not None else peak_rss_gb()
    return {"metrics": metrics, "seconds": seconds}


def main() -> None:
    args, work = parse_or_work(__doc__, BENCH, worker, ROWS + SEED_ROWS)

    import torch

    from tasa.config import CalibSpec
    from tasa.data import build_calibration
    from tasa.models import load

    work.mkdir(parents=True, exist_ok=True)
    lm = load("smollm2-135m")
    fp_dir = lm.path
    names = args.rows.split(",")
    for seed in sorted({parse_row(n)[3] for n in names}):
        if not calib_file(work, seed).is_file():
            cal = build_calibration(lm.tokenizer, CalibSpec(nsamples=NSAMPLES, seqlen=SEQLEN, seed=seed))
            torch.save(cal.input_ids, calib_file(work, seed))
    del lm

    results = {}
    for name in names:
        print(f"[{BENCH}] {name} ...", flush=True)
        tool, method, bits, seed = parse_row(name)
        if tool == "gptqmodel":

            def quantize_peer(bits=bits, name=name, seed=seed):
                py = peer_venv("gptqmodel", GPTQMODEL_REQS)
                return run_json([str(py), str(Path(__file__).parent / "peers" / "gptqmodel_quantize.py"),
                                 "--model-dir", fp_dir, "--calib", str(calib_file(work, seed)), "--bits", str(bits),
                                 "--group-size", str(GROUP), "--damp", str(DAMP), "--batch-size", str(BATCH),
                                 "--out", str(work / f"{name}.safetensors")],
                                env={"GPTQMODEL_CPU_WORKERS": "2", "GPTQ_TORCH_CACHE_WEIGHTS": "1"},
                                log=work / "logs" / f"{name}-quantize.log")

            q = cached(work / "rows" / f"{name}-quantize.json", quantize_peer)
            r = cached(work / "rows" / f"{name}.json",
                       lambda name=name: run_json([sys.executable, __file__, "--worker", name]))
            r["seconds"] = q["seconds"]
            r["metrics"]["peak_rss_gb"] = q["peak_rss_gb"]
        else:
            r = cached(work / "rows" / f"{name}.json",
                       lambda name=name: run_json([sys.executable, __file__, "--worker", name]))
        results[name] = r
        print(f"[{BENCH}] {name}: {json.dumps(r)}", flush=True)

    rows = []
    for name, r in results.items():
        tool, method, bits, seed = parse_row(name)
        if method == "fp":
            rows.append(row(name, tool, method, bits, None, None, r["metrics"], None))
            continue
        calib = None if method == "rtn" else f"wikitext2-validation {NSAMPLES}x{SEQLEN} seed {seed}"
        rows.append(row(name, tool, method, bits, GROUP, calib, r["metrics"], r["seconds"]))
    ratios = {}
    for b in (3, 4):
        per_seed = []
        for suffix in ("", "-s1", "-s2"):
            t, g = results.get(f"tasa-gptq-w{b}{suffix}"), results.get(f"gptqmodel-w{b}{suffix}")
            if t and g:
                r = {"ppl_tasa_over_gptqmodel": t["metrics"]["wikitext2_ppl"] / g["metrics"]["wikitext2_ppl"]}
                if not suffix:  # timings: the seed-0 rows, run back to back on an otherwise idle machine
                    r["time_tasa_over_gptqmodel"] = t["seconds"] / g["seconds"]
                ratios[f"w{b}{suffix}"] = r
                per_seed.append(r["ppl_tasa_over_gptqmodel"])
        if len(per_seed) > 1:
            ratios[f"w{b}-geomean-over-seeds"] = {
                "ppl_tasa_over_gptqmodel": math.exp(sum(math.log(x) for x in per_seed) / len(per_seed)),
                "seeds": len(per_seed)}
    out = write_results(BENCH, ".venv/bin/python benchmarks/uniform.py", rows,
                        {"settings": {"group_size": GROUP, "nsamples": NSAMPLES, "seqlen": SEQLEN, "seed": SEED,
                                      "damp": DAMP, "sym": True, "act_order": False, "true_sequential": True,
                                      "batch_size": BATCH, "eval_windows": EVAL_WINDOWS,
                                      "peer": "gptqmodel==7.6.0, GPTQMODEL_CPU_WORKERS=2, offload_to_disk=False, "
                                              "act_group_aware=False"},
                         "ratios": ratios})
    print(f"{'name':16} {'bits':>4} {'ppl':>9} {'seconds':>8} {'peak GB':>8}")
    for r in rows:
        m = r["metrics"]
        s = f"{r['seconds']:.0f}" if r["seconds"] else "-"
        print(f"{r['name']:16} {r['bits']:>4} {m['wikitext2_ppl']:9.3f} {s:>8} {m['peak_rss_gb']:8.2f}")
    print("ratios:", json.dumps(ratios))
    print(f"written {out}")


if __name__ == "__main__":
    main()
