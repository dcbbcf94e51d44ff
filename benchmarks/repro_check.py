"""Does the paper table's seed-0 `tasa-3.5-task` record (2026-12-01: WikiText-2 ppl 52.86) reproduce?

    .venv/bin/python benchmarks/repro_check.py     # resumable: one record per row in results/repro_check/

Quantizes SmolLM2-135M, each row in a fresh process with its own CPU thread count (suffix -t1 / -t2), with
GPTQ on `gsm8k:0.5,arc_easy:0.5`, 128 x 512 tokens, seed 0, group size 64:
- `cli-path`: TASA's 3.5-bit plan (allocated from the committed layer-sensitivity.json, beta 0.5, bits 3/4/8),
  calibration built as `tasa quantize` builds it (with the model's maximum length);
- `bench-path`: the same plan, calibration built as benchmarks/paper_table.py builds it (torch seed 0, no
  maximum length);
- `gptq-w4-task`: uniform W4 on the same calibration, against its own 2026-12-01 record (39.18).
Each row records the calibration tokens' sha256, a sha256 over every quantized weight, the thread count and
the perplexity on the first 40 WikiText-2 test windows of 512 (the paper table's).  Rows at 1 and 2 threads
tell whether the thread count explains the difference to the records.  Writes
benchmarks/results/repro_check.json.
"""
from __future__ import annotations

import hashlib
import json
import sys
import time
from pathlib import Path

# benchmarks/ must not be on sys.path: benchmarks/profile.py would shadow the standard 'profile' module
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or '.').resolve() != _HERE]
sys.path.insert(0, str(_HERE.parent))
from benchmarks.common import RESULTS, cached, parse_or_work, recorded, row, run_json, write_results  # noqa: E402

import torch  # noqa: E402

from tasa.allocate.plan import plan_from_sensitivity  # noqa: E402
from tasa.artifacts import read_json  # noqa: E402
from tasa.config import CalibSpec, QuantSpec  # noqa: E402
from tasa.data import build_calibration, eval_texts  # noqa: E402
from tasa.eval.perplexity import perplexity  # noqa: E402
from tasa.models import load, resolve  # noqa: E402
from tasa.plan import Plan  # noqa: E402
from tasa.quant.apply import quantize_model  # noqa: E402

CALIB = "gsm8k:0.5,arc_easy:0.5"
RECORDS = RESULTS / "paper_table"
OWN = RESULTS / "repro_check"  # this benchmark's row records (committed)
RECORDED = {"cli-path": "tasa-3.5-task", "bench-path": "tasa-3.5-task", "gptq-w4-task": "gptq-w4-task"}
ROWS = ["cli-path-t2", "bench-path-t2", "gptq-w4-task-t2", "cli-path-t1", "gptq-w4-task-t1"]


def measure(name: str, plan_of, with_max_length: bool, text: str) -> dict:
    torch.manual_seed(0)
    lm = load("smollm2-135m")
    arch = resolve(lm.model)
    spec = CalibSpec.parse(CALIB, nsamples=128, seqlen=512, seed=0)
    cal = build_calibration(lm.tokenizer, spec, lm.max_length if with_max_length else None)
    plan = plan_of([m.name for m in arch.modules])
    t0 = time.perf_counter()
    quantize_model(lm.model, arch, plan, cal.input_ids, batch_size=8, progress=False)
    seconds = time.perf_counter() - t0
    weights = hashlib.sha256()
    for m in arch.modules:
        weights.update(arch.layers[m.layer].get_submodule(m.local).weight.detach().numpy().tobytes())
    ppl = perplexity(lm.model, lm.tokenizer, text, seqlen=512, limit=40, progress=False).ppl
    out = {"wikitext2_ppl": ppl, "calib_sha256": hashlib.sha256(cal.input_ids.numpy().tobytes()).hexdigest(),
           "weights_sha256": weights.hexdigest(), "threads": torch.get_num_threads(),
           "bits": plan.average_bits(arch.numels()), "seconds": seconds}
    print(name, json.dumps(out), file=sys.stderr, flush=True)
    return out


def worker(name: str, work: Path) -> dict:
    base, threads = name.rsplit("-t", 1)
    torch.set_num_threads(int(threads))
    text = "\n\n".join(eval_texts("wikitext2"))
    if base == "gptq-w4-task":
        return measure(name, lambda names: Plan.uniform(names, QuantSpec(bits=4, group_size=64, damp=0.01)), True, text)
    tasa_plan, _ = plan_from_sensitivity(read_json(RECORDS / "layer-sensitivity.json"), 3.5, bits=[3, 4, 8], beta=0.5)
    return measure(name, lambda names: tasa_plan, base == "cli-path", text)


def main() -> None:
    args, work = parse_or_work(__doc__, "repro_check", worker, ROWS)
    measured = {name: cached(OWN / f"{name}.json", lambda n=name: run_json([sys.executable, __file__, "--worker", n]))
                for name in args.rows.split(",")}
    rows = []
    for name, r in recorded(OWN, ROWS, measured).items():
        base = name.rsplit("-t", 1)[0]
        metrics = {k: v for k, v in r.items() if k not in ("bits", "seconds")}
        metrics["recorded_2026_12_01_wikitext2_ppl"] = read_json(RECORDS / f"{RECORDED[base]}.json")["metrics"]["wikitext2_ppl"]
        rows.append(row(name, "tasa", "gptq", r["bits"], 64, CALIB, metrics, r["seconds"]))
        print(name, json.dumps(metrics), flush=True)
    out = write_results("repro_check", ".venv/bin/python benchmarks/repro_check.py", rows)
    print(f"-> {out}")


if __name__ == "__main__":
    main()
