"""The main job, `make run`, measured: wall time, per-stage seconds, peak RSS, and the run's small records
committed, so every figure RESULTS.md gives for it can be read back from the repository.

    .venv/bin/python benchmarks/run.py                 # runs `tasa run` as `make run` does, in a fresh directory
    .venv/bin/python benchmarks/run.py --record DIR --time-log LOG --command "..." --note "..."
                                                       # records a run made elsewhere (e.g. `make run` on a fresh
                                                       # clone under /usr/bin/time -v, LOG its output)
    .venv/bin/python benchmarks/run.py --better        # the same run with the better quantizer the run report
                                                       # names (tasa.config.BETTER_QUANTIZER's options)
    .venv/bin/python benchmarks/run.py --better --calib wikitext2:0.75,gsm8k:0.125,arc_easy:0.125
                                                       # ... on a calibration given instead of searched (the one
                                                       # the run report suggests for learned rounding)

Writes benchmarks/results/run.json (schema of docs/RESULTS.md; one row, the quantized model, with the
evaluation metrics and per-stage seconds) and benchmarks/results/run/ (stages.json, run.json, plan.json,
quantize.json, sensitivity.json, mixture.json, eval-fp.json and eval-quant.json without per-item samples);
with --better, benchmarks/results/run-better.json and benchmarks/results/run-better/; with --calib, "-calib" is
added to the name (a given calibration skips the mixture search, so there is no mixture.json); --name NAME names
them instead.
"""
from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path

# benchmarks/ must not be on sys.path: benchmarks/profile.py would shadow the standard 'profile' module
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or '.').resolve() != _HERE]
sys.path.insert(0, str(_HERE.parent))
from benchmarks.common import RESULTS, ROOT, WORK, parse_time_log, row, write_results  # noqa: E402

from tasa import schemas  # noqa: E402
from tasa.artifacts import read_json, write_json_atomic  # noqa: E402
from tasa.config import BETTER_QUANTIZER  # noqa: E402

RUN_ARGS = ["--model", "smollm2-135m", "--tasks", "gsm8k,arc_easy", "--budget", "3.5"]  # make run's, and its
TIME_BUDGET = ["--time-budget", "15"]  # quantizer chosen in its 15 minutes (not with --better: that one is given)
FILES = {"stages.json": "stages.json", "run.json": "run.json", "plan.json": "plan.json",
         "model/quantize.json": "quantize.json", "profile/sensitivity.json": "sensitivity.json",
         "mixture/mixture.json": "mixture.json", "eval-fp.json": "eval-fp.json", "eval-quant.json": "eval-quant.json"}


def record(run_dir: Path, timing: dict, command: str, note: str, name: str = "run") -> Path:
    """Write RESULTS/NAME.json and the run's small records under RESULTS/NAME/."""
    records = RESULTS / name
    records.mkdir(parents=True, exist_ok=True)
    for src, dest in FILES.items():
        if src == "mixture/mixture.json" and not (run_dir / src).is_file():
            continue  # a run given --calib searches no mixture
        data = read_json(run_dir / src)
        data.pop("samples", None)  # per-item records: large, and not needed for any figure
        write_json_atomic(records / dest, data)
    stages = {k: v.to_dict() for k, v in schemas.stage_records(read_json(run_dir / "stages.json")).items()}
    fp, q = read_json(run_dir / "eval-fp.json")["results"], read_json(run_dir / "eval-quant.json")["results"]
    quant = read_json(run_dir / "model" / "quantize.json")
    metrics = {"wikitext2_ppl": q["wikitext2"]["ppl"], "wikitext2_kl": q["wikitext2"].get("kl"),
               "fp_wikitext2_ppl": fp["wikitext2"]["ppl"],
               "arc_easy_acc": q["arc_easy"]["acc"], "arc_easy_acc_norm": q["arc_easy"]["acc_norm"],
               "fp_arc_easy_acc": fp["arc_easy"]["acc"], "fp_arc_easy_acc_norm": fp["arc_easy"]["acc_norm"],
               "gsm8k_gold_nll": q["gsm8k"]["gold_nll"], "fp_gsm8k_gold_nll": fp["gsm8k"]["gold_nll"],
               "peak_rss_gb": timing["peak_rss_gb"], "wall_seconds": timing["wall_seconds"],
               "stage_seconds": {k: v.get("seconds") for k, v in stages.items()}}
    group_size = next(iter(read_json(run_dir / "plan.json")["modules"].values()))["group_size"]
    method = "tasa run (layer plan, GPTQ)"
    if quant.get("learned_rounding"):
        method = "tasa run (layer plan, GPTQ refined by learned rounding)"
    choice = read_json(run_dir / "run.json").get("quantizer_choice")
    if choice:
        method = method[:-1] + f", chosen under --time-budget {read_json(run_dir / 'run.json')['time_budget']:g})"
        metrics["quantizer_choice"] = choice
    rows = [row("tasa-run-3.5" + name[len("run"):], "tasa", method, quant["average_bits"], group_size,
                quant["calib"], metrics, timing["wall_seconds"])]
    return write_results(name, command, rows, extra={"note": note, "records": f"benchmarks/results/{name}/"})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--record", type=Path, help="an existing run directory to record instead of running")
    ap.add_argument("--time-log", type=Path, help="with --record: GNU time -v output of that run")
    ap.add_argument("--command", default=".venv/bin/python benchmarks/run.py")
    ap.add_argument("--note", default="")
    ap.add_argument("--better", action="store_true",
                    help="run (or record, named so) with the better quantizer's options, tasa.config.BETTER_QUANTIZER")
    ap.add_argument("--calib", help="calibration for `tasa run --calib` (default: make run's, the searched mixture)")
    ap.add_argument("--name", help="the record's name, RESULTS/NAME.json and RESULTS/NAME/ (default: run, with "
                                   "-better and -calib as above)")
    args = ap.parse_args()
    name = args.name or "run" + ("-better" if args.better else "") + ("-calib" if args.calib else "")
    extra = (BETTER_QUANTIZER[0].split() if args.better else TIME_BUDGET) + (["--calib", args.calib] if args.calib
                                                                            else [])
    if args.command == ap.get_default("command"):
        args.command += "".join([" --better" if args.better else "", f" --calib {args.calib}" if args.calib else ""])
    if args.record:
        if not args.time_log:
            raise SystemExit("--record needs --time-log")
        out = record(args.record, parse_time_log(args.time_log.read_text(errors="replace")), args.command, args.note,
                     name)
    else:
        run_dir = WORK / name
        shutil.rmtree(run_dir, ignore_errors=True)
        log = WORK / f"{name}-time.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "w") as f:
            subprocess.run(["/usr/bin/time", "-v", str(ROOT / ".venv" / "bin" / "tasa"), "run", *RUN_ARGS, *extra,
                            "--output-dir", str(run_dir), "--quiet"], stderr=f, check=True)
        out = record(run_dir, parse_time_log(log.read_text()), args.command, args.note, name)
    print(f"-> {out}")


if __name__ == "__main__":
    main()
