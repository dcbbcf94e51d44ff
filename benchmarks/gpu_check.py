"""GPU check (issue 36): the same tasa commands on the CPU and on a CUDA GPU, compared.

    .venv/bin/python benchmarks/gpu_check.py                          # needs a CUDA GPU; ~10 min on a 16-core host
    .venv/bin/python benchmarks/gpu_check.py --devices cpu,cpu --small  # the plumbing only, on any machine

Every command runs the `tasa` CLI in a child process (wall time, peak RSS), once per device, both in float32
so that they compute the same thing (``--dtype float32``; a GPU's default is bfloat16, timed in its own rows):

- ``smollm2-profile``: `tasa profile` of SmolLM2-135M (WikiText-2 and ARC-Easy, RTN 3 and 4 bits, group size 64,
  256 probe tokens), then `tasa allocate` at 3.5 bits from it: the plans must be the same.
- ``smollm2-quantize``: `tasa quantize` by `tasa run`'s committed plan (benchmarks/results/run/plan.json: GPTQ
  3/4 bits) on gsm8k:0.5,arc_easy:0.5 (64 x 512 tokens): each module's GPTQ relative error
  tr(E H E^T) / tr(W H W^T) must agree within 1% (relative) between the devices.
- ``smollm2-eval``: `tasa eval` of that checkpoint on WikiText-2 (20 windows): perplexity within 0.5%.
- ``llama3-8b-4l-gptq``: a synthetic Llama-3-8B-shaped model (its real config cut to 4 layers; random bfloat16
  weights, benchmarks/large_model.py's generator) quantized by the 3/4/8 plan with GPTQ, streamed, on
  WikiText-2 (8 x 256): per-module relative errors within 1%, and the time.
- ``*-bf16`` rows (GPU only): the quantize commands at the GPU's default dtype, bfloat16 (Hessians and GPTQ
  updates stay float32), for time and memory.

``--small`` shrinks every setting (and uses 1 layer of the 8B shape, narrowed 8x) to check the script itself.  Writes
benchmarks/results/gpu.json: one row per command and device, with the comparisons in the GPU rows' metrics.
"""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or '.').resolve() != _HERE]
sys.path.insert(0, str(_HERE.parent))
from benchmarks.common import RESULTS, WORK, machine, row, write_results  # noqa: E402
from benchmarks.large_model import TASA, llama3_8b_config, measured, plan_348  # noqa: E402

BENCH = "gpu"
RUN_PLAN = RESULTS / "run" / "plan.json"
ERROR_TOLERANCE = 0.01  # relative, per module
PPL_TOLERANCE = 0.005


def settings(small: bool) -> dict:
    return {"probe_tokens": "64" if small else "256", "nsamples": "4" if small else "64",
            "seqlen": "128" if small else "512", "windows": "2" if small else "20", "layers_8b": 1 if small else 4,
            "small": small}


def tasa(work: Path, name: str, args: list[str]) -> dict:
    quiet = ["--quiet"] if args[0] != "allocate" else []  # allocate prints a few lines, no progress bars
    r = measured([*TASA, *args, *quiet], work / "logs" / f"{name}.log")
    if r["returncode"] != 0:
        raise RuntimeError(f"{name} failed: {r['last_line']}")
    return r


def synthetic_8b_layers(work: Path, layers: int, small: bool) -> Path:
    """The 8B-shaped model cut to ``layers`` layers (``small``: also narrowed 8x, to check the script)."""
    import torch
    from transformers import AutoTokenizer

    from tasa.models.loading import embedded_gguf_path, gguf_to_hf_dir
    from tasa.models.synthetic import synthetic_checkpoint

    path = work / f"llama3-8b-{layers}l{'-narrow' if small else ''}-synthetic"
    if not (path / "tokenizer_config.json").is_file():
        cfg = llama3_8b_config()
        cfg.num_hidden_layers = layers
        if small:
            cfg.hidden_size, cfg.intermediate_size, cfg.num_attention_heads, cfg.num_key_value_heads = 512, 1792, 4, 1
        synthetic_checkpoint(cfg, path, dtype=torch.bfloat16, max_shard_bytes=2 ** 30)
        AutoTokenizer.from_pretrained(gguf_to_hf_dir(embedded_gguf_path())).save_pretrained(path)
    return path


def run_device(work: Path, device: str, tag: str, s: dict, dtype: str = "float32") -> dict:
    """Every command on ``device``; {command: measurements}."""
    out: dict[str, dict] = {}
    d = work / tag
    shutil.rmtree(d, ignore_errors=True)
    dev = ["--device", device, "--dtype", dtype]
    if dtype == "float32":
        r = tasa(work, f"{tag}-profile", ["profile", "--model", "smollm2-135m", "--objectives", "wikitext2,arc_easy",
                                          "--bits", "3,4", "--group-size", "64", "--probe-tokens", s["probe_tokens"],
                                          *dev, "--output-dir", str(d / "profile")])
        tasa(work, f"{tag}-allocate", ["allocate", "--sensitivity", str(d / "profile" / "sensitivity.json"),
                                       "--budget", "3.5", "--output", str(d / "plan.json")])
        out["smollm2-profile"] = {**r, "plan": json.loads((d / "plan.json").read_text())["modules"],
                                  "costs": json.loads((d / "profile" / "sensitivity.json").read_text())["costs"]}
    r = tasa(work, f"{tag}-quantize", ["quantize", "--model", "smollm2-135m", "--plan", str(RUN_PLAN), "--calib",
                                       "gsm8k:0.5,arc_easy:0.5", "--nsamples", s["nsamples"], "--seqlen", s["seqlen"],
                                       *dev, "--output-dir", str(d / "quantized")])
    rec = json.loads((d / "quantized" / "quantize.json").read_text())
    out["smollm2-quantize"] = {**r, "rel_error": {n: m["rel_error"] for n, m in rec["modules"].items()},
                               "quantize_seconds": rec["seconds"]["quantize"], "bits": rec["average_bits"]}
    if dtype == "float32":
        r = tasa(work, f"{tag}-eval", ["eval", "--model", str(d / "quantized"), "--tasks", "wikitext2",
                                       "--limit", s["windows"], *dev, "--output", str(d / "eval.json")])
        out["smollm2-eval"] = {**r, "wikitext2_ppl": json.loads((d / "eval.json").read_text())["results"]
                               ["wikitext2"]["ppl"]}
    model = synthetic_8b_layers(work, s["layers_8b"], s["small"])
    plan = plan_348(model, work / f"plan-8b-{s['layers_8b']}l.json", "gptq", layers=list(range(s["layers_8b"])))
    r = tasa(work, f"{tag}-8b", ["quantize", "--model", str(model), "--plan", str(plan), "--calib", "wikitext2",
                                 "--nsamples", "8", "--seqlen", "256", "--stream", "on", *dev,
                                 "--output-dir", str(d / "q8b")])
    rec = json.loads((d / "q8b" / "quantize.json").read_text())
    out["llama3-8b-4l-gptq"] = {**r, "rel_error": {n: m["rel_error"] for n, m in rec["modules"].items()},
                                "quantize_seconds": rec["seconds"]["quantize"], "bits": rec["average_bits"]}
    shutil.rmtree(d / "q8b")
    return out


def compare(cpu: dict, gpu: dict) -> dict:
    """The GPU's results against the CPU's, command by command."""
    out: dict[str, dict] = {}
    for cmd, g in gpu.items():
        c = cpu.get(cmd)
        if c is None:
            continue
        m: dict = {"time_ratio_vs_cpu": g["seconds"] / c["seconds"]}
        if "plan" in g:
            m["same_plan"] = g["plan"] == c["plan"]
        if "rel_error" in g:
            diffs = {n: abs(g["rel_error"][n] - e) / e for n, e in c["rel_error"].items() if e}
            worst = max(diffs, key=diffs.get)
            m.update(max_rel_error_difference=diffs[worst], worst_module=worst,
                     rel_errors_within_tolerance=diffs[worst] <= ERROR_TOLERANCE,
                     quantize_time_ratio_vs_cpu=g["quantize_seconds"] / c["quantize_seconds"])
        if "wikitext2_ppl" in g:
            d = abs(g["wikitext2_ppl"] - c["wikitext2_ppl"]) / c["wikitext2_ppl"]
            m.update(ppl_relative_difference=d, ppl_within_tolerance=d <= PPL_TOLERANCE)
        out[cmd] = m
    return out


def main() -> None:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--devices", default="cpu,cuda", help="reference device, device under test (default: cpu,cuda)")
    ap.add_argument("--small", action="store_true", help="tiny settings: check the script, not the devices")
    args = ap.parse_args()
    ref, test = args.devices.split(",")
    if test.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise SystemExit("no CUDA device here: run this on a machine with a GPU (or --devices cpu,cpu --small)")
    s = settings(args.small)
    work = WORK / BENCH
    results = {"reference": run_device(work, ref, "ref", s), "test": run_device(work, test, "test", s)}
    if test.startswith("cuda"):
        results["test-bf16"] = run_device(work, test, "test-bf16", s, dtype="bfloat16")
    checks = compare(results["reference"], results["test"])
    rows = []
    for which, device in (("reference", ref), ("test", test), ("test-bf16", test)):
        for cmd, r in results.get(which, {}).items():
            metrics = {k: v for k, v in r.items() if k not in ("seconds", "plan", "costs", "rel_error", "last_line",
                                                               "returncode")}
            metrics["device"] = device
            metrics["dtype"] = "bfloat16" if which == "test-bf16" else "float32"
            if which == "test":
                metrics.update(checks.get(cmd, {}))
            rows.append(row(f"{cmd}-{which}", "tasa", cmd.split("-")[-1], r.get("bits"),
                            128 if "8b" in cmd else 64, None, metrics, r["seconds"]))
    gpu = None
    if test.startswith("cuda"):
        import torch

        gpu = torch.cuda.get_device_name(torch.device(test))
    out = write_results(BENCH + ("-small" if args.small else ""), ".venv/bin/python benchmarks/gpu_check.py "
                        + " ".join(sys.argv[1:]), rows,
                        {"devices": [ref, test], "gpu": gpu, "host": machine(), "small": args.small,
                         "tolerances": {"rel_error": ERROR_TOLERANCE, "ppl": PPL_TOLERANCE}, "checks": checks})
    print(json.dumps(checks, indent=1))
    print(f"written {out}")


if __name__ == "__main__":
    main()
