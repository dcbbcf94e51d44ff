"""GPU check (issue 36): the same tasa commands on the CPU and on a CUDA GPU, compared.

    .venv/bin/python benchmarks/gpu_check.py                          # needs a CUDA GPU; ~10 min on a 16-core host
    .venv/bin/python benchmarks/gpu_check.py --devices cpu,cpu --small  # the plumbing only, on any machine
    .venv/bin/python benchmarks/gpu_check.py --cut-gguf DIR/smollm2-cut.gguf  # a SmolLM2 small enough to carry
    python3 benchmarks/gpu_check.py --model DIR/smollm2-cut.gguf --layers-8b 2   # on a lent GPU machine

Every command runs the `tasa` CLI in a child process (wall time, peak RSS), once per device, both in float32
so that they compute the same thing (``--dtype float32``; a GPU's default is bfloat16, timed in its own rows):

- ``smollm2-profile``: `tasa profile` of SmolLM2-135M (WikiText-2 and ARC-Easy, RTN 3 and 4 bits, group size 64,
  256 probe tokens), then `tasa allocate` at 3.5 bits from it: the plans must be the same.
- ``smollm2-profile-ray`` (issue 39): the same profile with ``--distributed ray`` (a local Ray instance; one
  worker per GPU on a GPU device, per core on the CPU): its plan and costs against the serial profile's on
  the same device (``same_plan_as_serial``, ``max_abs_cost_difference_vs_serial``), and its time.
- ``smollm2-search-mixture``: `tasa search-mixture` of SmolLM2-135M (WikiText-2 and GSM8K, ratios 0, 0.25, 0.5,
  0.75, 1; hessian-trace and grad-align): the chosen ratio must be the same, each criterion's values within 1%.
- ``smollm2-quantize``: `tasa quantize` by `tasa run`'s committed plan (benchmarks/results/run/plan.json: GPTQ
  3/4 bits) on gsm8k:0.5,arc_easy:0.5 (64 x 512 tokens): each module's GPTQ relative error
  tr(E H E^T) / tr(W H W^T) must agree within 1% (relative) between the devices.
- ``smollm2-eval``: `tasa eval` of that checkpoint on WikiText-2 (20 windows): perplexity within 0.5%.
- ``smollm2-quantize-better`` / ``smollm2-eval-better`` (issue 38): the same plan with the better quantizer the
  run report names (tasa.config.BETTER_QUANTIZER: learned rounding from GPTQ, the last layer on the output
  distribution; bfloat16 steps where the device has them): its time on each device, and its perplexity (learned
  rounding follows the gradients' signs, so the devices may round a few weights apart: reported, not a tolerance).
- ``llama3-8b-4l-gptq``: a synthetic Llama-3-8B-shaped model (its real config cut to 4 layers; random bfloat16
  weights, benchmarks/large_model.py's generator) quantized by the 3/4/8 plan with GPTQ, streamed, on
  WikiText-2 (8 x 256): per-module relative errors within 1%, and the time.
- ``vllm-*`` rows (GPU only, issue 37; needs vLLM installed): what vLLM's CPU build refuses, on its GPU kernels:
  the 3/4-bit plan and a {3, 4, 8} plan as compressed-tensors, uniform 8-bit as compressed-tensors and GPTQ, each
  scored by vLLM and by tasa's reader on 8 WikiText-2 windows (perplexity within 1%).
- ``*-bf16`` rows (GPU only): the quantize commands at the GPU's default dtype, bfloat16 (Hessians and GPTQ
  updates stay float32), for time and memory.
- ``*-multi-gpu`` rows (two or more GPUs only): every float32 command again with ``--device cuda:0,cuda:1`` (the
  decoder layers spread over both, tasa.models.placement), checked against the one-GPU rows by the same tolerances,
  with the largest peak memory of either GPU.

``--model`` replaces SmolLM2-135M (a lent GPU machine takes at most 64 MiB of files, and SmolLM2's GGUF is 94 MiB:
``--cut-gguf`` writes its layers 0, 27, 28 and 29 with a Q4_1 embedding, 27 MiB; both devices load the same file, so
only agreement is measured, not quality). Then `tasa quantize` follows the plan the reference device allocated.
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
from benchmarks.common import RESULTS, WORK, machine, row, write_json_atomic, write_results  # noqa: E402
from benchmarks.large_model import TASA, llama3_8b_config, measured, plan_348  # noqa: E402

BENCH = "gpu"
RUN_PLAN = RESULTS / "run" / "plan.json"
ERROR_TOLERANCE = 0.01  # relative, per module
PPL_TOLERANCE = 0.005


CUT_LAYERS = [0, 27, 28, 29]


def settings(small: bool, layers_8b: int | None) -> dict:
    return {"probe_tokens": "64" if small else "256", "nsamples": "4" if small else "64",
            "seqlen": "128" if small else "512", "windows": "2" if small else "20",
            "layers_8b": layers_8b or (1 if small else 4), "small": small}


def cut_gguf(src: Path, dst: Path, keep: list[int]) -> Path:
    """A GGUF of ``src``'s decoder layers ``keep`` (renumbered 0..), small enough to travel to a lent GPU machine.

    Metadata and tokenizer are copied, layer tensors byte for byte; the token embedding is re-quantized to Q4_1 (the
    CPU and the GPU load the same file, so only its size matters here, not its fidelity)."""
    import gguf

    if dst.is_file():
        return dst
    from tasa.export.gguf import copy_metadata

    reader = gguf.GGUFReader(src)
    arch = reader.fields["general.architecture"].contents()
    writer = gguf.GGUFWriter(dst, arch)
    copy_metadata(reader, writer, {f"{arch}.block_count": len(keep)})
    for t in reader.tensors:
        name = t.name
        if name.startswith("blk."):
            _, index, rest = name.split(".", 2)
            if int(index) not in keep:
                continue
            name = f"blk.{keep.index(int(index))}.{rest}"
        if name == "token_embd.weight" and t.tensor_type != gguf.GGMLQuantizationType.Q4_1:
            data = gguf.quants.quantize(gguf.quants.dequantize(t.data, t.tensor_type), gguf.GGMLQuantizationType.Q4_1)
            writer.add_tensor(name, data, raw_dtype=gguf.GGMLQuantizationType.Q4_1)
        else:
            writer.add_tensor(name, t.data, raw_dtype=t.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return dst


def tasa(work: Path, name: str, args: list[str]) -> dict:
    quiet = ["--quiet"] if args[0] != "allocate" else []  # allocate prints a few lines, no progress bars
    r = measured([*TASA, *args, *quiet], work / "logs" / f"{name}.log")
    if r["returncode"] != 0:
        raise RuntimeError(f"{name} failed: {r['last_line']}")
    return r


def synthetic_8b_layers(work: Path, layers: int, small: bool, tokenizer_of: str) -> tuple[Path, Path]:
    """The 8B-shaped model cut to ``layers`` layers (``small``: also narrowed 8x, to check the script), with the
    tokenizer of ``tokenizer_of`` (an embedded model's name or a GGUF file), and its 3/4/8 plan."""
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
        gguf = embedded_gguf_path(tokenizer_of) if tokenizer_of == "smollm2-135m" else Path(tokenizer_of)
        AutoTokenizer.from_pretrained(gguf_to_hf_dir(gguf)).save_pretrained(path)
    return path, plan_348(path, work / f"plan-8b-{layers}l.json", "gptq", layers=list(range(layers)))


def fixed_plan(model: str, out: Path) -> Path:
    """The plan the smollm2-quantize rows follow: `tasa run`'s committed plan for SmolLM2-135M; for another model
    (``--model``) a fixed one, 3 bits in even layers and 4 in odd ones (group size 64), so that every device
    quantizes by the same plan whatever its profile gives."""
    if model == "smollm2-135m":
        return RUN_PLAN
    from tasa.config import QuantSpec
    from tasa.models.arch import resolve
    from tasa.models.loading import load
    from tasa.plan import Plan

    lm = load(model, device="cpu")
    arch = resolve(lm.model)
    modules = {m.name: QuantSpec(bits=3 if m.layer % 2 == 0 else 4, group_size=64) for m in arch.modules}
    Plan(modules, method="gptq", meta={"model": model}).save(out)
    return out


def run_device(work: Path, device: str, tag: str, s: dict, model: str, dtype: str = "float32") -> dict:
    """Every command on ``device``; {command: measurements}, or {command: {"error": its last line}} for one that
    failed (the others still run)."""
    out: dict[str, dict] = {}
    d = work / tag
    shutil.rmtree(d, ignore_errors=True)
    dev = ["--device", device, "--dtype", dtype]

    def attempt(cmd: str, fn) -> None:
        try:
            out[cmd] = fn()
        except RuntimeError as e:
            out[cmd] = {"error": str(e)}
            print(f"{tag}: {e}", file=sys.stderr)

    def profile(name: str = "profile", extra: tuple[str, ...] = ()) -> dict:
        r = tasa(work, f"{tag}-{name}", ["profile", "--model", model, "--objectives", "wikitext2,arc_easy",
                                         "--bits", "3,4", "--group-size", "64", "--probe-tokens", s["probe_tokens"],
                                         *dev, *extra, "--output-dir", str(d / name)])
        tasa(work, f"{tag}-allocate-{name}", ["allocate", "--sensitivity", str(d / name / "sensitivity.json"),
                                              "--budget", "3.5", "--output", str(d / f"plan-{name}.json")])
        rec = json.loads((d / name / "sensitivity.json").read_text())
        return {**r, "plan": json.loads((d / f"plan-{name}.json").read_text())["modules"], "costs": rec["costs"],
                "placement": rec.get("placement")}

    def profile_ray() -> dict:  # issue 39: the Ray path on this device's workers (one per GPU), as the serial one
        r = profile("profile-ray", ("--distributed", "ray"))
        serial = out.get("smollm2-profile", {})
        if "plan" in serial:
            r["same_plan_as_serial"] = r["plan"] == serial["plan"]
            r["max_abs_cost_difference_vs_serial"] = max(
                abs(a - b) for o in serial["costs"] for k in serial["costs"][o]
                for a, b in zip(r["costs"][o][k]["cost"], serial["costs"][o][k]["cost"]))
        return r

    def quantize(name: str, args: list[str], q: Path) -> dict:
        r = tasa(work, name, ["quantize", *args, *dev, "--output-dir", str(q)])
        rec = json.loads((q / "quantize.json").read_text())
        return {**r, "rel_error": {n: m["rel_error"] for n, m in rec["modules"].items()},
                "quantize_seconds": rec["seconds"]["quantize"], "bits": rec["average_bits"],
                "peak_gpu_gb": rec.get("peak_gpu_gb")}

    def evaluate(q: str = "quantized") -> dict:
        r = tasa(work, f"{tag}-eval-{q}", ["eval", "--model", str(d / q), "--tasks", "wikitext2",
                                           "--limit", s["windows"], *dev, "--output", str(d / f"eval-{q}.json")])
        return {**r, "wikitext2_ppl": json.loads((d / f"eval-{q}.json").read_text())["results"]["wikitext2"]["ppl"]}

    def search_mixture() -> dict:
        r = tasa(work, f"{tag}-search-mixture", ["search-mixture", "--model", model, "--task", "gsm8k", "--criterion",
                                                 "hessian-trace,grad-align", "--ratios", "0,0.25,0.5,0.75,1",
                                                 "--nsamples", s["nsamples"], "--seqlen", s["seqlen"],
                                                 "--group-size", "64", *dev, "--output-dir", str(d / "mixture")])
        rec = json.loads((d / "mixture" / "mixture.json").read_text())
        return {**r, "chosen": rec["chosen"], "criteria_values": {c: v["values"] for c, v in rec["results"].items()}}

    if dtype == "float32":
        attempt("smollm2-profile", profile)
        attempt("smollm2-profile-ray", profile_ray)
        attempt("smollm2-search-mixture", search_mixture)
    smollm2 = ["--model", model, "--plan", str(work / "plan-smollm2.json" if model != "smollm2-135m" else RUN_PLAN),
               "--calib", "gsm8k:0.5,arc_easy:0.5", "--nsamples", s["nsamples"], "--seqlen", s["seqlen"]]
    attempt("smollm2-quantize", lambda: quantize(f"{tag}-quantize", smollm2, d / "quantized"))
    if dtype == "float32" and "error" not in out["smollm2-quantize"]:
        attempt("smollm2-eval", evaluate)
    if dtype == "float32":  # the better quantizer (issue 38): its time on each device, and what it scores
        from tasa.config import BETTER_QUANTIZER

        better = [*smollm2, *BETTER_QUANTIZER[0].split()]
        attempt("smollm2-quantize-better", lambda: quantize(f"{tag}-better", better, d / "better"))
        if "error" not in out["smollm2-quantize-better"]:
            attempt("smollm2-eval-better", lambda: evaluate("better"))
    big, plan = synthetic_8b_layers(work, s["layers_8b"], s["small"], model)
    attempt(f"llama3-8b-{s['layers_8b']}l-gptq", lambda: quantize(f"{tag}-8b", [
        "--model", str(big), "--plan", str(plan), "--calib", "wikitext2", "--nsamples", "8", "--seqlen", "256",
        "--stream", "on"], d / "q8b"))
    shutil.rmtree(d / "q8b", ignore_errors=True)
    return out


def run_moe(work: Path, device: str, model: str) -> dict:
    """The Qwen3-MoE-shaped 2-layer GPTQ row of benchmarks/large_model.py on ``device`` in bfloat16."""
    from benchmarks.large_model import moe_worker

    try:
        return {"qwen3-moe-30b-2l-gptq": moe_worker("qwen3-moe-30b-2l-gptq-streamed", work, device, "bfloat16",
                                                    model)}
    except RuntimeError as e:
        return {"qwen3-moe-30b-2l-gptq": {"error": str(e)}}


VLLM_WINDOWS = 8


def plan_3_4_8(plan: Path, out: Path) -> Path:
    """``plan`` (3 and 4 bits by layer) with its first and last layers at 8 bits: a {3, 4, 8} mix for vLLM."""
    from tasa.config import QuantSpec
    from tasa.plan import Plan

    p = Plan.load(plan)
    layers = sorted({int(n.split(".layers.")[1].split(".")[0]) for n in p.modules})
    ends = {layers[0], layers[-1]}
    modules = {n: QuantSpec(bits=8, group_size=q.group_size) if int(n.split(".layers.")[1].split(".")[0]) in ends
               else q for n, q in p.modules.items()}
    Plan(modules, method=p.method, meta={**p.meta, "derived_from": str(plan)}).save(out)
    return out


def run_vllm(work: Path, model: str, plan: Path) -> dict:
    """Issue 37: what vLLM's CPU build refuses (3- and 8-bit weight-only layers), served by its GPU kernels: tasa's
    3/4-bit plan and a {3, 4, 8} plan as compressed-tensors (``--target vllm``), uniform 8-bit as compressed-tensors
    and as GPTQ (``--target vllm-gptq``); each checkpoint's first 8 WikiText-2 windows of 512 tokens scored by vLLM
    (bfloat16, prompt log-probabilities; benchmarks/engines.py's script) and by tasa's reader (float32): perplexity
    ratio (goal: within 1%) and per-token differences.  Needs vLLM installed in this Python."""
    import importlib.util
    import subprocess

    if importlib.util.find_spec("vllm") is None:
        return {"vllm": {"error": "vllm is not installed in this Python (pip install vllm where a registry is "
                                  "reachable, then run --phases vllm)"}}
    from benchmarks.engines import VLLM_SCRIPT, compare as compare_logprobs, last_line, tasa_logprobs
    from tasa.data import eval_texts
    from tasa.models import load

    d = work / "vllm"
    d.mkdir(parents=True, exist_ok=True)
    tok = load(model, device="cpu").tokenizer
    ids = tok("\n\n".join(eval_texts("wikitext2")), return_tensors="pt").input_ids[0]
    wins = [ids[i * 512:(i + 1) * 512].tolist() for i in range(VLLM_WINDOWS)]
    (d / "windows.json").write_text(json.dumps(wins))
    (d / "score.py").write_text(VLLM_SCRIPT)
    checkpoints = {"ct-plan-3-4": (["--plan", str(plan)], "vllm", "compressed-tensors"),
                   "ct-plan-3-4-8": (["--plan", str(plan_3_4_8(plan, d / "plan-3-4-8.json"))], "vllm",
                                     "compressed-tensors"),
                   "ct-w8": (["--bits", "8", "--group-size", "64"], "vllm", "compressed-tensors"),
                   "gptq-w8": (["--bits", "8", "--group-size", "64"], "vllm-gptq", "gptq")}
    out: dict[str, dict] = {}
    for name, (how, target, fmt) in checkpoints.items():
        q = d / name
        try:
            r = tasa(work, f"vllm-{name}", ["quantize", "--model", model, *how, "--calib", "wikitext2", "--nsamples",
                                            "16", "--seqlen", "512", "--target", target, "--format", fmt,
                                            "--output-dir", str(q)])
        except RuntimeError as e:
            out[f"vllm-{name}"] = {"error": str(e)}
            continue
        res = subprocess.run([sys.executable, str(d / "score.py"), str(q), str(d / "windows.json"),
                              str(d / f"{name}.json")], capture_output=True, text=True)
        m = {"quantize_seconds": r["seconds"], "bits": json.loads((q / "quantize.json").read_text())["average_bits"]}
        if res.returncode != 0:
            m.update(loaded=False, error=last_line(res.stderr))
        else:
            m.update(loaded=True, **compare_logprobs(json.loads((d / f"{name}.json").read_text()),
                                                     tasa_logprobs(q, wins, "float32")))
            m["ppl_within_1pct"] = abs(m["ppl_ratio"] - 1) <= 0.01
        out[f"vllm-{name}"] = m
        print(json.dumps({name: m}), flush=True)
    return out


def compare(cpu: dict, gpu: dict) -> dict:
    """The GPU's results against the CPU's, command by command (those that ran on both)."""
    out: dict[str, dict] = {}
    for cmd, g in gpu.items():
        c = cpu.get(cmd)
        if c is None or "error" in c or "error" in g:
            continue
        m: dict = {"time_ratio_vs_cpu": g["seconds"] / c["seconds"]}
        if "plan" in g:
            m["same_plan"] = g["plan"] == c["plan"]
        if "rel_error" in g:
            m["quantize_time_ratio_vs_cpu"] = g["quantize_seconds"] / c["quantize_seconds"]
            diffs = {n: abs(g["rel_error"][n] - e) / e for n, e in c["rel_error"].items() if e}
            if diffs:  # GPTQ's (learned rounding records none)
                worst = max(diffs, key=diffs.get)
                m.update(max_rel_error_difference=diffs[worst], worst_module=worst,
                         rel_errors_within_tolerance=diffs[worst] <= ERROR_TOLERANCE)
        if "criteria_values" in g:
            m["same_chosen_mixture"] = g["chosen"] == c["chosen"]
            worst = max(abs(a - b) / max(abs(b), 1e-12) for k, v in c["criteria_values"].items()
                        for a, b in zip(g["criteria_values"][k], v))
            m.update(max_criterion_relative_difference=worst, criteria_within_tolerance=worst <= ERROR_TOLERANCE)
        if "wikitext2_ppl" in g:
            d = abs(g["wikitext2_ppl"] - c["wikitext2_ppl"]) / c["wikitext2_ppl"]
            m.update(ppl_relative_difference=d, ppl_within_tolerance=d <= PPL_TOLERANCE)
        out[cmd] = m
    return out


PHASES = ("prepare", "reference", "test", "test-bf16", "moe", "vllm", "multi-gpu", "report")
MULTI_GPU = "cuda:0,cuda:1"


def save(work: Path, ref: str, test: str, small: bool, model: str) -> Path:
    """Every finished phase's results (work/raw-PHASE.json) as benchmarks/results/gpu.json, rewritten after each
    phase, so that a run cut short by its time limit still leaves what it measured."""
    results = {p: json.loads((work / f"raw-{p}.json").read_text()) for p in PHASES[1:-1]
               if (work / f"raw-{p}.json").is_file()}
    checks = compare(results.get("reference", {}), results.get("test", {}))
    multi_checks = compare(results.get("test", {}), results.get("multi-gpu", {}))
    rows = []
    for which, r_all in results.items():
        device = {"reference": ref, "multi-gpu": MULTI_GPU}.get(which, test)
        for cmd, r in r_all.items():
            metrics = {k: v for k, v in r.items() if k not in ("seconds", "plan", "costs", "rel_error", "last_line",
                                                               "returncode", "criteria_values")}
            metrics["device"] = device
            metrics["dtype"] = "bfloat16" if which in ("test-bf16", "moe", "vllm") else "float32"
            if which == "test":
                metrics.update(checks.get(cmd, {}))
            if which == "multi-gpu":  # against the one-GPU row ("vs_cpu" there: vs one GPU)
                metrics.update({k.replace("_vs_cpu", "_vs_one_gpu"): v for k, v in multi_checks.get(cmd, {}).items()})
            rows.append(row(f"{cmd}-{which}", "tasa", cmd.split("-")[-1], r.get("bits"),
                            128 if "8b" in cmd or "moe" in cmd else 64, None, metrics, r.get("seconds")))
    gpu = None
    if test.startswith("cuda"):
        import torch

        gpu = torch.cuda.get_device_name(torch.device(test))
    return write_results(BENCH + ("-small" if small else ""), "python benchmarks/gpu_check.py "
                         + " ".join(sys.argv[1:]), rows,
                         {"devices": [ref, test], "gpu": gpu, "host": machine(), "small": small, "model": model,
                          "tolerances": {"rel_error": ERROR_TOLERANCE, "ppl": PPL_TOLERANCE}, "checks": checks,
                          "multi_gpu_checks": multi_checks,
                          "phases_done": sorted(results)})


def main() -> None:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--devices", default="cpu,cuda", help="reference device, device under test (default: cpu,cuda)")
    ap.add_argument("--small", action="store_true", help="tiny settings: check the script, not the devices")
    ap.add_argument("--model", default="smollm2-135m", help="the model of the smollm2-* rows (default: smollm2-135m)")
    ap.add_argument("--layers-8b", type=int, help="layers of the Llama-3-8B shape (default: 4; --small: 1)")
    ap.add_argument("--phases", default=",".join(PHASES),
                    help=f"which of {','.join(PHASES)} to run (default: all, in that order; 'moe' and 'vllm' on a GPU only). "
                    "After 'prepare', 'reference' and the GPU phases may run at once, in two processes; 'report' "
                    "only rewrites the results")
    ap.add_argument("--cut-gguf", type=Path, metavar="OUT", help="write SmolLM2-135M's layers "
                    f"{CUT_LAYERS} to OUT (a GGUF that travels to a lent GPU machine) and exit")
    args = ap.parse_args()
    if args.cut_gguf:
        from tasa.models.loading import embedded_gguf_path

        print(cut_gguf(embedded_gguf_path(), args.cut_gguf, CUT_LAYERS))
        return
    ref, test = args.devices.split(",")
    phases = args.phases.split(",")
    if unknown := set(phases) - set(PHASES):
        raise SystemExit(f"unknown phases {sorted(unknown)}: choose from {','.join(PHASES)}")
    if test.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise SystemExit("no CUDA device here: run this on a machine with a GPU (or --devices cpu,cpu --small)")
    s = settings(args.small, args.layers_8b)
    work = WORK / BENCH
    model = args.model if args.model == "smollm2-135m" else str(Path(args.model).resolve())
    out = None
    for phase in phases:
        if phase == "prepare":
            fixed_plan(model, work / "plan-smollm2.json")
            synthetic_8b_layers(work, s["layers_8b"], s["small"], model)
            continue
        if phase in ("test-bf16", "moe", "vllm", "multi-gpu") and not test.startswith("cuda"):
            continue
        if phase == "multi-gpu":
            import torch

            if torch.cuda.device_count() < 2:
                print(f"multi-gpu skipped: {torch.cuda.device_count()} GPU here", flush=True)
                continue
        if phase == "report":
            out = save(work, ref, test, args.small, model)
            continue
        if phase == "moe":
            raw = run_moe(work, test, model)
        elif phase == "vllm":
            raw = run_vllm(work, model, fixed_plan(model, work / "plan-smollm2.json"))
        elif phase == "multi-gpu":
            raw = run_device(work, MULTI_GPU, phase, s, model)
        else:
            device, dtype = (ref, "float32") if phase == "reference" else (test, "float32" if phase == "test"
                                                                           else "bfloat16")
            raw = run_device(work, device, phase, s, model, dtype)
        write_json_atomic(work / f"raw-{phase}.json", raw)
        out = save(work, ref, test, args.small, model)
        print(f"{phase} done: {out}", flush=True)
    if out:
        print(json.dumps(json.loads(out.read_text())["checks"], indent=1))


if __name__ == "__main__":
    main()
