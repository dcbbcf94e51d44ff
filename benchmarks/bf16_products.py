"""Do the bfloat16 products of GPTQ's Hessians (tasa.quant.gptq, on a CPU that computes bfloat16 natively) change
the bfloat16 variant's time?  `tasa quantize` of `make run`'s plan with tasa.config.BETTER_QUANTIZER_BF16 (the model
in bfloat16, 2-sequence batches), stopped after its first LAYERS decoder layers (quantize's ``after_layer`` hook),
with the products in bfloat16 and forced to float32 (tasa.numerics._cpu_bfloat16 patched to False), alternated in
fresh processes, ROUNDS times each.

    .venv/bin/python benchmarks/bf16_products.py [--layers 3] [--rounds 2]

Writes benchmarks/results/bf16_products.json: per run, the seconds from the quantize call to each layer's end
(model already loaded; calibration built inside), and per mode the mean seconds per layer after the first.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or '.').resolve() != _HERE]
sys.path.insert(0, str(_HERE.parent))
from benchmarks.common import RESULTS, ROOT, WORK, row, write_results  # noqa: E402

PLAN = RESULTS / "run-better" / "plan.json"
CALIB, NSAMPLES, SEQLEN = "gsm8k:0.5,arc_easy:0.5", 64, 512  # make run's, as benchmarks/run_quantizer.py
MODES = ("bfloat16", "float32")

CHILD = """
import json, sys, time
mode, layers, out, plan = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
import tasa.numerics as numerics
if mode == "float32":
    numerics._cpu_bfloat16 = lambda: False
from tasa.config import BETTER_QUANTIZER_BF16, CalibSpec, Runtime
from tasa.cli import build_parser
from tasa.pipeline.common import model_of
from tasa.pipeline.quantize import quantize
from tasa.config import QuantizeSpec
a = build_parser().parse_args(["quantize", "--model", "m", "--output-dir", "o", *BETTER_QUANTIZER_BF16[0].split()])
spec = QuantizeSpec(learn_rounding=a.learn_rounding, learn_start=a.learn_start, learn_output_kl=a.learn_output_kl)
rt = Runtime(dtype=a.dtype, batch_size=a.batch_size, progress=False)
lm, _ = model_of("smollm2-135m", rt)
class Stop(BaseException):
    pass
ends = []
t = time.perf_counter()
def after(i):
    ends.append(time.perf_counter() - t)
    if len(ends) == layers:
        raise Stop
try:
    quantize(lm, out, spec, CalibSpec.parse(%r, nsamples=%d, seqlen=%d, seed=0), plan=plan, runtime=rt,
             overwrite=True, after_layer=after)
except Stop:
    pass
print(json.dumps({"mode": mode, "native": numerics.native_bfloat16("cpu"), "layer_ends": ends}))
""" % (CALIB, NSAMPLES, SEQLEN)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    runs = []
    for r in range(args.rounds):
        for mode in MODES:
            out = WORK / "bf16_products" / mode
            p = subprocess.run([sys.executable, "-c", CHILD, mode, str(args.layers), str(out), str(PLAN)],
                               capture_output=True, text=True, cwd=ROOT, check=True)
            runs.append(json.loads(p.stdout.strip().splitlines()[-1]))
            print(runs[-1])
    rows = []
    for mode in MODES:
        mine = [x for x in runs if x["mode"] == mode]
        per_layer = statistics.mean((x["layer_ends"][-1] - x["layer_ends"][0]) / (args.layers - 1) for x in mine)
        rows.append(row(f"better-bf16-{mode}-products", "tasa",
                        f"BETTER_QUANTIZER_BF16, Hessian products in {mode}, first {args.layers} layers", 3.5, 64,
                        CALIB, {"seconds_per_layer_after_the_first": per_layer,
                                "layer_ends": [x["layer_ends"] for x in mine]}, per_layer))
    cmd = f".venv/bin/python benchmarks/bf16_products.py --layers {args.layers} --rounds {args.rounds}"
    print("->", write_results("bf16_products", cmd, rows, extra={"runs_in_order": runs}))


if __name__ == "__main__":
    main()
