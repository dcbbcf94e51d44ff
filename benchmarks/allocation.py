"""Mixed-precision allocation on SmolLM2-135M (group size 64): does task-aware allocation pay?

    .venv/bin/python benchmarks/allocation.py      # resumable: one committed record per row

Rows (all GPTQ, symmetric, group size 64, calibration wikitext2:0.5,gsm8k:0.5, 64 x 512 tokens, seed 0):
at 3.5 average bits, uniform W3 and W4 around it, a naive split (first half of the layers 4-bit, second
half 3-bit), and the exact DP allocation over {3, 4, 8} from the committed layer profile of the paper
table (benchmarks/results/paper_table/layer-sensitivity.json: wikitext2 / gsm8k / arc_easy, 4,096 scored
tokens each, KL cost for ARC-Easy) for beta = 0.5 and 1 (ppl-only) (0, 0.25 and 0.75 on request); on
request, at 4.25 bits a vLLM-servable plan (target vllm: {4, 8}, q/k/v and gate/up tied, beta 0.5) and
uniform W8; and on request rows tasa-pTOKENS-SETTING (e.g. tasa-p768-kl): beta 0.5 over {3, 4, 8} from a
profile of benchmarks/profile_cost.py (TOKENS probe tokens, SETTING its cost forms), to compare the plans
that cheap profiles give.  Every row is evaluated on held-out test rows: wikitext2 perplexity and KL divergence to the
full-precision model (top-256 log-probs) on the first 30 windows of 512 tokens, ARC-Easy (first 300) and
ARC-Challenge (first 200) accuracy (zero-shot), GSM8K gold-solution NLL (first 150, zero-shot, as
profiled).  The beta = 0.5 row is also exported as a GPTQ checkpoint and loaded in GPTQModel 7.6.0 (TORCH
backend, fp16): the max |logit difference| to tasa's dequantized model is reported.

Each row's record (scores, plan bits, calibration sha256, thread count: a few KB) is written atomically to
benchmarks/results/allocation/ and committed; the calibration tokens and the FP reference log-probs are
re-derived in benchmarks/.work/allocation.
"""
from __future__ import annotations

import hashlib
import json
import re
import resource
import sys
import time
from pathlib import Path

_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or '.').resolve() != _HERE]
sys.path.insert(0, str(_HERE.parent))
from benchmarks.common import (GPTQMODEL_REQS, parse_or_work, RESULTS, ROOT, cached, peer_venv, recorded,  # noqa: E402
                               row, run_json, score_model, wikitext2, write_results)

BENCH = "allocation"
GROUP = 64
CALIB = "wikitext2:0.5,gsm8k:0.5"
NSAMPLES, SEQLEN = 64, 512
BUDGET, VLLM_BUDGET = 3.5, 4.25
BETAS = (0.0, 0.25, 0.5, 0.75, 1.0)
LIMITS = {"wikitext2": 30, "arc_easy": 300, "arc_challenge": 200, "gsm8k": 150}
PROFILE = RESULTS / "paper_table" / "layer-sensitivity.json"  # the paper table's committed layer profile
RECORDS = RESULTS / BENCH
# the rows measured by default (about 6 CPU-minutes of GPTQ and scoring each on an idle 2-core machine); --rows
# also takes tasa-beta0, tasa-beta0.25, tasa-beta0.75, uniform-w8, vllm-4.25 and tasa-pTOKENS-SETTING
ROWS = ["fp", "uniform-w3", "uniform-w4", "naive-3.5", "tasa-beta0.5", "tasa-beta1"]


def split_nsamples(name: str) -> tuple[str, int]:
    """Row name -> (plan row, calibration samples): "tasa-beta0.5-n128" -> ("tasa-beta0.5", 128)."""
    m = re.fullmatch(r"(.+)-n([0-9]+)", name)
    return (m.group(1), int(m.group(2))) if m else (name, NSAMPLES)


def calib_file(work: Path, nsamples: int) -> Path:
    return work / ("calib.pt" if nsamples == NSAMPLES else f"calib-n{nsamples}.pt")


def ensure_calib(work: Path, nsamples: int) -> str:
    """The calibration tokens of ``nsamples`` windows (built once), and their sha256."""
    import torch

    path = calib_file(work, nsamples)
    if not path.is_file():
        from tasa.config import CalibSpec
        from tasa.data import build_calibration
        from tasa.models import load

        lm = load("smollm2-135m")
        cal = build_calibration(lm.tokenizer, CalibSpec.parse(CALIB, nsamples=nsamples, seqlen=SEQLEN, seed=0))
        torch.save(cal.input_ids, path)
    return calib_sha256(torch.load(path, weights_only=True))


def plan_for(name: str, arch):
    from tasa.allocate.plan import plan_from_sensitivity
    from tasa.config import QuantSpec
    from tasa.plan import Plan

    names = [m.name for m in arch.modules]
    if name.startswith("uniform-w"):
        return Plan.uniform(names, QuantSpec(bits=int(name[9:]), group_size=GROUP), target="gptqmodel")
    if name == "naive-3.5":
        half = arch.num_layers // 2
        return Plan({m.name: QuantSpec(bits=4 if m.layer < half else 3, group_size=GROUP) for m in arch.modules})
    if name.startswith("tasa-p"):  # tasa-pTOKENS-SETTING: beta 0.5 from a benchmarks/profile_cost.py profile
        tokens, setting = name[len("tasa-p"):].split("-", 1)
        sens = json.loads((RESULTS / "profile_cost" / f"sensitivity-{tokens}-{setting}.json").read_text())
        return plan_from_sensitivity(sens, BUDGET, bits=[3, 4, 8], beta=0.5)[0]
    sens = json.loads(PROFILE.read_text())
    if name == "vllm-4.25":
        return plan_from_sensitivity(sens, VLLM_BUDGET, bits=[4, 8], beta=0.5, target="vllm")[0]
    return plan_from_sensitivity(sens, BUDGET, bits=[3, 4, 8], beta=float(name[len("tasa-beta"):]))[0]


def calib_sha256(ids) -> str:
    return hashlib.sha256(ids.numpy().tobytes()).hexdigest()


def gptqmodel_check(lm, arch, plan, packed: dict, work: Path) -> float:
    """Export the quantized model, load it in GPTQModel, return the max |logit difference| on 2 x 64 tokens."""
    import shutil

    import torch

    from tasa import __version__
    from tasa.export.gptq import checkpoint_format, quantize_config, write_checkpoint

    out = work / "ckpt-beta0.5"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    qcfg = quantize_config(plan, [m.name for m in arch.modules], arch.numels(), f"tasa:{__version__}",
                           "gptqmodel", checkpoint_format(plan))
    write_checkpoint(out, lm.model, lm.tokenizer, packed, qcfg, arch.spec.layers_path)
    ids = torch.randint(0, lm.model.config.vocab_size, (2, 64), generator=torch.Generator().manual_seed(0))
    made = ROOT / ".venv-gptqmodel" / "bin" / "python"  # `make test`'s GPTQModel 7.6.0 environment, if present
    python = made if (made.parent.parent / ".installed").is_file() else peer_venv("gptqmodel", GPTQMODEL_REQS)
    peer = run_json([str(python), str(ROOT / "tests" / "peers" / "gptqmodel_logits.py"),
                     str(out), json.dumps(ids.tolist())], env={"GPTQMODEL_CPU_WORKERS": "2"})
    if peer["bits"] != {n: s.bits for n, s in plan.modules.items()}:
        raise RuntimeError("GPTQModel read other bit-widths than the plan's")
    with torch.no_grad():
        ref = lm.model(input_ids=ids).logits
    return float((torch.tensor(peer["logits"]) - ref).abs().max())


def worker(name: str, work: Path) -> dict:
    import torch

    from tasa.allocate.plan import metadata_bits
    from tasa.export.gptq import pack_result
    from tasa.models import load, resolve
    from tasa.quant.apply import quantize_model

    torch.manual_seed(0)
    lm = load("smollm2-135m")
    arch = resolve(lm.model)
    if name == "fp-reference":  # the FP top-256 log-probs alone (lost with .work; the FP row's record is kept)
        return {"wikitext2_ppl": wikitext2(lm, work, None, LIMITS, SEQLEN).ppl}
    if name == "fp":
        return {"metrics": score_model(lm, work, None, LIMITS, SEQLEN), "seconds": None, "plan": None}
    from safetensors.torch import load_file

    ref = load_file(str(work / "fp.topk.safetensors"))
    base, nsamples = split_nsamples(name)  # the GPTQModel check: the committed beta = 0.5 row only
    plan = plan_for(base, arch)
    calib = torch.load(calib_file(work, nsamples), weights_only=True)
    packed: dict = {}
    t0 = time.perf_counter()
    quantize_model(lm.model, arch, plan, calib, batch_size=8, progress=False,
                   on_result=lambda n, r: packed.update(pack_result(n, r)) if name == "tasa-beta0.5" else None)
    seconds = time.perf_counter() - t0
    metrics = score_model(lm, work, ref, LIMITS, SEQLEN)
    numels = arch.numels()
    total = sum(numels.values())
    metrics["effective_bits_with_metadata"] = sum(
        numels[n] * (s.bits + metadata_bits(s.bits, s.group_size)) for n, s in plan.modules.items()) / total
    metrics["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    if name == "tasa-beta0.5":
        metrics["gptqmodel_logits_max_abs_diff"] = gptqmodel_check(lm, arch, plan, packed, work)
    layer_bits = [sum(numels[m.name] * plan[m.name].bits for m in arch.layer_modules(i))
                  / sum(numels[m.name] for m in arch.layer_modules(i)) for i in range(arch.num_layers)]
    return {"metrics": metrics, "seconds": seconds, "bits": plan.average_bits(numels), "layer_bits": layer_bits,
            "calib_sha256": calib_sha256(calib), "threads": torch.get_num_threads()}


def normalisation_study() -> dict:
    """The effect of normalising objectives (no quantization): plans with and without it, per beta."""
    from tasa.allocate.aggregate import aggregate
    from tasa.allocate.dp import allocate

    sens = json.loads(PROFILE.read_text())
    costs = {o: {b: c["cost"] for b, c in per_bits.items() if int(b) in (3, 4, 8)} for o, per_bits in sens["costs"].items()}
    sizes = [int(u["numel"]) for u in sens["units"]]
    scale = {o: sum(max(0.0, x) for x in per_bits["3"]) / len(per_bits["3"]) for o, per_bits in costs.items()}
    out = {"mean_cost_at_3_bits": scale, "plans": {}}
    for beta in BETAS:
        for norm in (True, False):
            table = aggregate(costs, beta=beta, normalize=norm)
            per_unit = [{int(b): table[b][i] for b in table} for i in range(len(sizes))]
            bits = allocate(per_unit, sizes, BUDGET).bits
            out["plans"][f"beta{beta:g}-{'normalised' if norm else 'raw'}"] = "".join(str(b) for b in bits)
    return out


def main() -> None:
    args, work = parse_or_work(__doc__, BENCH, worker, ROWS)
    from tasa.artifacts import read_json

    work.mkdir(parents=True, exist_ok=True)
    sizes = {split_nsamples(p.stem)[1] for p in RECORDS.glob("*.json")} | {
        split_nsamples(n)[1] for n in args.rows.split(",")}
    shas = {n: ensure_calib(work, n) for n in sorted(sizes)}
    sha = shas[NSAMPLES]
    stale = [p.name for p in RECORDS.glob("*.json")
             if read_json(p).get("calib_sha256", shas[split_nsamples(p.stem)[1]]) != shas[split_nsamples(p.stem)[1]]]
    if stale:
        raise SystemExit(f"{', '.join(stale)} in {RECORDS} were measured on other calibration tokens than "
                         f"{work / 'calib.pt'}: remove them to measure again")
    if (RECORDS / "fp.json").is_file() and not (work / "fp.topk.safetensors").is_file():
        run_json([sys.executable, __file__, "--worker", "fp-reference"], log=work / "logs" / "fp-reference.log")
    results = {}
    for name in args.rows.split(","):
        print(f"[{BENCH}] {name} ...", flush=True)
        results[name] = cached(RECORDS / f"{name}.json", lambda n=name: run_json(
            [sys.executable, __file__, "--worker", n], log=work / "logs" / f"{n}.log"))
        print(f"  {json.dumps(results[name]['metrics'])}", flush=True)
    rows = []
    for name, r in recorded(RECORDS, ROWS, results).items():
        bits = None if name == "fp" else r["bits"]
        method = "fp" if name == "fp" else "gptq"
        rows.append(row(name, "tasa" if name != "fp" else "none", method, bits, GROUP,
                        None if name == "fp" else f"{CALIB} ({split_nsamples(name)[1]} x {SEQLEN})", {**r["metrics"], **({"layer_bits": r["layer_bits"]}
                                                                              if r.get("layer_bits") else {})},
                        r["seconds"]))
    out = write_results(BENCH, ".venv/bin/python benchmarks/allocation.py", rows,
                        {"settings": {"calib": CALIB, "nsamples": NSAMPLES, "seqlen": SEQLEN, "group_size": GROUP,
                                      "budget": BUDGET, "vllm_budget": VLLM_BUDGET, "eval_limits": LIMITS,
                                      "profile": str(PROFILE.relative_to(ROOT)), "calib_sha256": sha},
                         "normalisation": normalisation_study()})
    for r in rows:
        print(r["name"], r["bits"], json.dumps({k: v for k, v in r["metrics"].items() if k != "layer_bits"}))
    print(f"written {out}")


if __name__ == "__main__":
    main()
