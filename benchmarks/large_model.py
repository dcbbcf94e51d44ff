"""Models larger than memory (issue 36): tasa streams one decoder layer at a time.

    .venv/bin/python benchmarks/large_model.py                       # every row (the 8B ones take ~1 h)
    .venv/bin/python benchmarks/large_model.py --rows smollm2-in-memory,smollm2-streamed

Each row runs the `tasa` CLI in a child process and records its wall time and peak resident memory (the
child's ru_maxrss); rows are cached one record each under benchmarks/results/large_model/ (resumable).

- ``smollm2-in-memory`` / ``smollm2-streamed``: `tasa quantize` of SmolLM2-135M by `tasa run`'s committed
  plan (benchmarks/results/run/plan.json: 3/4 bits, GPTQ, group size 64) on gsm8k:0.5,arc_easy:0.5 (64 x 512
  tokens), with ``--stream off`` and ``--stream on``: the streamed checkpoint must be bitwise the in-memory
  one (sha256 of model.safetensors), at no more than 1.1x its time.
- ``llama3-8b-streamed``: a synthetic Llama-3-8B-shaped model (its real config: 32 layers, hidden 4096, GQA
  32/8 heads, intermediate 14336, vocab 128256; random bfloat16 weights written once by
  tasa.models.synthetic as 4 GiB shards, ~16 GB, with SmolLM2's tokenizer) quantized by a 3/4/8 plan (RTN,
  group size 128; layers 0 and 31 at 8 bits, the rest alternating 4 and 3 bits), float32 compute,
  ``--stream on``, ``--max-shard-size 256MB``.  Goal: peak RSS at most 0.3x the model's size on disk.
- ``llama3-8b-gptq-layer-streamed``: GPTQ's share of that budget: the same model and flags, GPTQ on layer 30
  only (3 bits; ``--allow-partial-plan``, the other layers written as float32) on WikiText-2 (8 x 256 tokens:
  enough to run every stage, not a quality setting): one 8B layer's Hessians (up to 14336 x 14336) and
  solves.  GPTQ of all 32 layers takes hours on this 2-core CPU (the solves, not the streaming).
- ``llama3-8b-in-memory``: the RTN command with ``--stream off``, under an address-space limit of 20 GiB
  (so that it fails instead of driving this 24 GiB machine out of memory): the in-memory path must load
  every weight (32 GB in float32) and cannot run here.
- ``llama3-8b-profile-streamed``: `tasa profile` of the synthetic model, streamed: layers 0 and 31 at 3 and 4
  bits on WikiText-2 (64 probe tokens; each probe of layer l streams layers l..31 from disk).
- ``llama3-8b-gptq-layer-streamed-bf16`` / ``llama3-8b-profile-streamed-bf16``: the GPTQ and profile rows
  computing in bfloat16 (``--dtype bfloat16``, the checkpoint's own dtype and a GPU's default): layers,
  embeddings and head are held at half the float32 size, while Hessians, GPTQ updates and probe scores stay
  float32.
- ``mixtral-8x7b-2l-rtn-streamed``: a synthetic Mixtral-8x7B-shaped model at full width (its real config: hidden
  4096, 8 experts of intermediate 14336, top-2, GQA 32/8, vocab 32000) cut to 2 decoder layers, written in the
  hub's per-expert layout (``block_sparse_moe.experts.{e}.w1``), quantized by a 3/4/8 plan (attention 8 bits,
  layer 0's experts 3, layer 1's 4; RTN, group size 128), streamed.  Checked: every expert quantized and
  stored under its hub name, routers kept in float, and the reported average bits equal to the parameter-
  weighted average computed here from the config, over the linears and over every decoder-layer weight.
- ``qwen3-moe-30b-2l-gptq-streamed``: the same for a Qwen3-30B-A3B-shaped model (hidden 2048, 128 experts of
  intermediate 768, top-8, GQA 32/4 with head size 128, vocab 151936), 2 layers, by the same kind of plan with
  GPTQ on WikiText-2 (8 x 256 tokens): each expert on the Hessian of the tokens routed to it; the tokens per
  expert and the experts no token reached (RTN fallback) are recorded.
- ``qwen3-moe-30b-2l-profile-gptq-streamed``: `tasa profile` of that Qwen3-MoE-shaped model with GPTQ probes
  (``--probe-quantizer gptq`` on WikiText-2, 8 x 256 tokens), module granularity (each layer's 128 routed experts
  one unit, tied), 3 and 4 bits, on WikiText-2 (64 probe tokens), streamed: each probe of a layer's experts
  quantizes its 384 expert linears, each on the Hessian of its own tokens.  Time, peak RSS and the costs (to check
  that a change to the probe path leaves them as they were).
- ``llama3-8b-eval-streamed-layer-major`` / ``...-batch-by-batch``: WikiText-2 perplexity of the synthetic 8B model,
  streamed (float32 compute; 8 windows of 128 tokens, one window a batch), layer-major (every window through a
  layer before the next layer is read: tasa's streamed evaluation) against batch by batch (the same code with a
  hidden-state budget of zero: every layer read again for every window, as a streamed model's own forward does):
  time, peak RSS, and the same NLL.
- ``llama3-8b-4l-gguf-convert-streamed`` / ``...-whole``: a GGUF input converted to tasa's float32 safetensors
  cache: the 8B shape cut to 4 layers (random bfloat16, ~3.8 GB; llama.cpp's converter writes its BF16 GGUF),
  converted one tensor at a time (tasa.models.gguf_input, what tasa does) against transformers' whole-model GGUF
  loading and save_pretrained (what tasa did before 2026-12-05): peak RSS, time, and the same tensors.
- ``llama3-8b-generate-streamed`` / ``...-offloaded``: greedy generation with a KV cache from the synthetic 8B model
  (bfloat16 compute; 4 WikiText-2 prompts of 64 tokens in one batch, 16 new tokens each, no stop string) by
  tasa.eval.lm.greedy_generate, the model layer-streamed by tasa (``load(stream=True)``: embeddings and head held,
  each decoder layer read when used) against the same model under accelerate's offloading (transformers
  ``device_map="auto"`` with ``max_memory`` 4 GiB of CPU memory, the rest offloaded to disk): load and
  generation time, forward passes, peak RSS, and whether the two generate the same tokens.  Each row reads the
  model's files once just before it, so both start from the same page cache.  Issue 36 asks which of the two a
  streamed evaluation's generation should use.
"""
from __future__ import annotations

import hashlib
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or '.').resolve() != _HERE]
sys.path.insert(0, str(_HERE.parent))
from benchmarks.common import RESULTS, ROOT, cached, parse_or_work, recorded, row, write_results  # noqa: E402

BENCH = "large_model"
RECORDS = RESULTS / BENCH
ROWS = ["smollm2-in-memory", "smollm2-streamed", "llama3-8b-streamed", "llama3-8b-gptq-layer-streamed",
        "llama3-8b-in-memory", "llama3-8b-profile-streamed", "llama3-8b-gptq-layer-streamed-bf16",
        "llama3-8b-profile-streamed-bf16", "mixtral-8x7b-2l-rtn-streamed",
        "qwen3-moe-30b-2l-gptq-streamed", "qwen3-moe-30b-2l-profile-gptq-streamed",
        "llama3-8b-eval-streamed-batch-by-batch",
        "llama3-8b-eval-streamed-layer-major", "llama3-8b-4l-gguf-convert-whole", "llama3-8b-4l-gguf-convert-streamed",
        "llama3-8b-generate-streamed", "llama3-8b-generate-offloaded"]
TASA = [sys.executable, "-m", "tasa"]
AS_LIMIT = 20 * 2 ** 30
RUN_PLAN = RESULTS / "run" / "plan.json"


def llama3_8b_config():
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192,
                       rope_theta=500000.0, rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=0,
                       eos_token_id=0)


def synthetic_8b(work: Path) -> Path:
    """The synthetic model directory (written once)."""
    path = work / "llama3-8b-synthetic"
    if (path / "tokenizer_config.json").is_file():
        return path
    import torch
    from transformers import AutoTokenizer

    from tasa.models.loading import embedded_gguf_path, gguf_to_hf_dir
    from tasa.models.synthetic import synthetic_checkpoint

    shutil.rmtree(path, ignore_errors=True)
    synthetic_checkpoint(llama3_8b_config(), path, dtype=torch.bfloat16, max_shard_bytes=4 * 2 ** 30)
    AutoTokenizer.from_pretrained(gguf_to_hf_dir(embedded_gguf_path())).save_pretrained(path)
    return path


def mixtral_config():
    from transformers import MixtralConfig

    return MixtralConfig(vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=2,
                         num_attention_heads=32, num_key_value_heads=8, num_local_experts=8, num_experts_per_tok=2,
                         max_position_embeddings=32768, rope_theta=1e6, rms_norm_eps=1e-5, tie_word_embeddings=False,
                         bos_token_id=0, eos_token_id=0)


def qwen3_moe_config():
    from transformers import Qwen3MoeConfig

    return Qwen3MoeConfig(vocab_size=151936, hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768,
                          num_hidden_layers=2, num_attention_heads=32, num_key_value_heads=4, head_dim=128,
                          num_experts=128, num_experts_per_tok=8, norm_topk_prob=True, max_position_embeddings=40960,
                          rope_theta=1e6, rms_norm_eps=1e-6, tie_word_embeddings=False, bos_token_id=0,
                          eos_token_id=0)


MOE = {"mixtral-8x7b-2l-rtn-streamed": ("mixtral-8x7b-2l-synthetic", mixtral_config, "rtn"),
       "qwen3-moe-30b-2l-gptq-streamed": ("qwen3-moe-30b-2l-synthetic", qwen3_moe_config, "gptq")}


def synthetic_dir(work: Path, name: str, config, tokenizer_of: str = "smollm2-135m") -> Path:
    """A synthetic model directory of ``config`` with the tokenizer of ``tokenizer_of`` (an embedded model's name or
    a GGUF file; written once)."""
    path = work / name
    if (path / "tokenizer_config.json").is_file():
        return path
    import torch
    from transformers import AutoTokenizer

    from tasa.models.loading import embedded_gguf_path, gguf_to_hf_dir
    from tasa.models.synthetic import synthetic_checkpoint

    shutil.rmtree(path, ignore_errors=True)
    synthetic_checkpoint(config, path, dtype=torch.bfloat16, max_shard_bytes=4 * 2 ** 30)
    gguf = embedded_gguf_path(tokenizer_of) if tokenizer_of == "smollm2-135m" else Path(tokenizer_of)
    AutoTokenizer.from_pretrained(gguf_to_hf_dir(gguf)).save_pretrained(path)
    return path


def moe_layout(config) -> dict:
    """The linears of a (meta) model of ``config`` as tasa resolves them: {module name: numel}, the decoder-layer
    weights, and the checkpoint names tasa maps them to."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    from tasa.models.arch import resolve

    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config)
    arch = resolve(model)
    return {"numels": arch.numels(), "layer_weights": sum(p.numel() for p in arch.layers.parameters()),
            "names": dict(model.tasa_checkpoint_names)}


def plan_moe(numels: dict[str, int], out: Path, method: str) -> Path:
    """Attention at 8 bits, layer 0's routed experts at 3, layer 1's at 4 (group size 128)."""
    from tasa.config import QuantSpec
    from tasa.plan import Plan

    modules = {}
    for name in numels:
        bits = 8 if ".self_attn." in name else (3 if ".layers.0." in name else 4)
        modules[name] = QuantSpec(bits=bits, group_size=128)
    Plan(modules, method=method).save(out)
    return out


def moe_worker(name: str, work: Path, device: str = "cpu", dtype: str = "float32",
               tokenizer_of: str = "smollm2-135m") -> dict:
    import statistics

    from safetensors import safe_open

    from tasa.plan import Plan

    dirname, config_fn, method = MOE[name]
    config = config_fn()
    model = synthetic_dir(work, dirname, config, tokenizer_of)
    layout = moe_layout(config)
    numels = layout["numels"]
    plan_path = plan_moe(numels, work / f"plan-{name}.json", method)
    plan = Plan.load(plan_path)
    out = work / name
    shutil.rmtree(out, ignore_errors=True)
    extra = ["--calib", "wikitext2", "--nsamples", "8", "--seqlen", "256"] if method == "gptq" else []
    r = measured([*TASA, "quantize", "--model", str(model), "--plan", str(plan_path), *extra, "--stream", "on",
                  "--device", device, "--dtype", dtype,
                  "--max-shard-size", "256MB", "--quiet", "--output-dir", str(out)], work / "logs" / f"{name}.log")
    if r["returncode"] != 0:
        raise RuntimeError(f"{name} failed: {r['last_line']}")
    rec = json.loads((out / "quantize.json").read_text())
    keys: set[str] = set()
    for f in out.glob("*.safetensors"):
        with safe_open(str(f), "pt") as handle:
            keys.update(handle.keys())
    source: set[str] = set()
    for f in model.glob("*.safetensors"):
        with safe_open(str(f), "pt") as handle:
            source.update(handle.keys())
    expert_keys = sorted(k for k in source if ".experts." in k)
    stored = [k[: -len(".weight")] for k in expert_keys]
    routers = sorted(k for k in source if k.endswith(".gate.weight") and ".experts." not in k)
    n_linear = sum(numels.values())
    expected = sum(numels[m] * plan.modules[m].bits for m in numels) / n_linear
    float_bits = 32 if dtype == "float32" else 16  # unplanned weights (routers, norms) count at the compute dtype
    expected_all = (expected * n_linear + float_bits * (layout["layer_weights"] - n_linear)) / layout["layer_weights"]
    gate_tokens = [s["tokens"] for n, s in rec["modules"].items() if ".experts." in n and n.endswith("gate_proj")
                   and s.get("tokens") is not None]
    size = disk_bytes(model)
    per_layer = layout["layer_weights"] / config.num_hidden_layers
    result = {**r, "model_disk_gb": size / 1e9, "layer_float32_gb": per_layer * 4 / 1e9,
              "layer_bfloat16_gb": per_layer * 2 / 1e9, "peak_rss_over_disk": r["peak_rss_gb"] * 2 ** 30 / size,
              "experts": config.num_hidden_layers * (getattr(config, "num_local_experts", None) or config.num_experts),
              "expert_linears_in_checkpoint": len(expert_keys),
              "expert_linears_quantized": sum(1 for n in rec["modules"] if ".experts." in n),
              "every_expert_packed_under_its_hub_name": all(f"{k}.qweight" in keys and f"{k}.weight" not in keys
                                                            for k in stored),
              "routers_kept_float": bool(routers) and all(k in keys for k in routers),
              "bits": rec["average_bits"], "expected_bits": expected,
              "layer_weights_average_bits": rec["layer_weights_average_bits"],
              "expected_layer_weights_average_bits": expected_all,
              "bits_match": abs(rec["average_bits"] - expected) < 1e-9
              and abs(rec["layer_weights_average_bits"] - expected_all) < 1e-9,
              "quantize_seconds": rec["seconds"]["quantize"], "checkpoint_gb": disk_bytes(out) / 1e9,
              "peak_gpu_gb": rec.get("peak_gpu_gb")}
    if method == "gptq":
        result.update(rtn_fallbacks=sum(1 for s in rec["modules"].values() if s.get("fallback")),
                      tokens_per_expert_min=min(gate_tokens), tokens_per_expert_median=statistics.median(gate_tokens),
                      tokens_per_expert_max=max(gate_tokens), calibration_tokens=8 * 256,
                      routed_assignments_per_layer=sum(gate_tokens) / config.num_hidden_layers)
    shutil.rmtree(out)
    return result


def moe_profile_worker(name: str, work: Path) -> dict:
    """The MoE profile row (module docstring)."""
    config = qwen3_moe_config()
    model = synthetic_dir(work, MOE["qwen3-moe-30b-2l-gptq-streamed"][0], config)
    out = work / name
    shutil.rmtree(out, ignore_errors=True)
    r = measured([*TASA, "profile", "--model", str(model), "--objectives", "wikitext2", "--bits", "3,4",
                  "--granularity", "module", "--probe-quantizer", "gptq", "--calib", "wikitext2", "--nsamples", "8",
                  "--seqlen", "256", "--probe-tokens", "64", "--probe-seqlen", "64", "--group-size", "128",
                  "--stream", "on", "--quiet", "--output-dir", str(out)], work / "logs" / f"{name}.log")
    if r["returncode"] != 0:
        raise RuntimeError(f"{name} failed: {r['last_line']}")
    sens = json.loads((out / "sensitivity.json").read_text())
    size = disk_bytes(model)
    per_layer = moe_layout(config)["layer_weights"] / config.num_hidden_layers
    shutil.rmtree(out)
    return {**r, "model_disk_gb": size / 1e9, "layer_float32_gb": per_layer * 4 / 1e9,
            "peak_rss_over_disk": r["peak_rss_gb"] * 2 ** 30 / size, "units": [u["name"] for u in sens["units"]],
            "sensitivity_seconds": sens["seconds"]["sensitivity"], "costs": sens["costs"]["wikitext2"]}


def plan_348(path: Path, out: Path, method: str, layers: list[int] | None = None) -> Path:
    """A 3/4/8 plan over every linear of the synthetic model (layers 0 and 31 at 8 bits, the rest alternating 4
    and 3), or over ``layers`` only."""
    from tasa.config import QuantSpec
    from tasa.plan import Plan

    cfg = llama3_8b_config()
    locals_ = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
               "mlp.up_proj", "mlp.down_proj")
    modules = {}
    for i in layers if layers is not None else range(cfg.num_hidden_layers):
        bits = 8 if i in (0, cfg.num_hidden_layers - 1) else (4 if i % 2 else 3)
        for local in locals_:
            modules[f"model.layers.{i}.{local}"] = QuantSpec(bits=bits, group_size=128)
    Plan(modules, method=method, meta={"model": str(path)}).save(out)
    return out


def measured(cmd: list[str], log: Path, as_limit: int | None = None) -> dict:
    """Run ``cmd``; its exit status, wall seconds, peak RSS (GB) and last stderr line."""
    log.parent.mkdir(parents=True, exist_ok=True)

    def limit():
        if as_limit is not None:
            resource.setrlimit(resource.RLIMIT_AS, (as_limit, as_limit))

    t0 = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, preexec_fn=limit, cwd=ROOT,
                                env={**os.environ, "PYTHONPATH": os.pathsep.join(
                                    filter(None, [str(ROOT / "src"), os.environ.get("PYTHONPATH")]))})
        _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - t0
    lines = [x for x in log.read_text().splitlines() if x.strip() and "it/s]" not in x and "s/it]" not in x]
    return {"returncode": os.waitstatus_to_exitcode(status), "seconds": seconds,
            "peak_rss_gb": usage.ru_maxrss / 2 ** 20, "last_line": lines[-1][-300:] if lines else ""}


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            h.update(chunk)
    return h.hexdigest()


def disk_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.glob("*.safetensors"))


EVAL_SCRIPT = r"""
import functools, json, sys, time
import importlib
P = importlib.import_module("tasa.eval.perplexity")  # (tasa.eval exports a function of that name)
from tasa.data import eval_texts
from tasa.models import load
path, mode, out = sys.argv[1:4]
if mode == "batch-by-batch":  # one window per layer-major pass: every layer read again for every window
    P.forward_logits = functools.partial(P.forward_logits, max_bytes=0)
lm = load(path, stream=True)
t0 = time.perf_counter()
r = P.perplexity(lm.model, lm.tokenizer, "\n\n".join(eval_texts("wikitext2")), seqlen=128, limit=8, batch_size=1,
                 progress=False)
json.dump({"nll": r.nll, "windows": r.windows, "eval_seconds": time.perf_counter() - t0}, open(out, "w"))
"""


def eval_worker(name: str, work: Path) -> dict:
    """The two streamed-evaluation rows (module docstring)."""
    model = synthetic_8b(work)
    mode = name.rsplit("streamed-", 1)[1]
    out = work / f"{name}.json"
    r = measured([sys.executable, "-c", EVAL_SCRIPT, str(model), mode, str(out)], work / "logs" / f"{name}.log")
    if r["returncode"] != 0:
        raise RuntimeError(f"{name} failed: {r['last_line']}")
    return {**r, **json.loads(out.read_text()), "model_disk_gb": disk_bytes(model) / 1e9, "seqlen": 128}


GENERATE_SCRIPT = r"""
import hashlib, json, sys, time
from benchmarks.large_model import NEW_TOKENS, PROMPT_TOKENS, PROMPTS, generation_model, generation_prompts
from tasa.eval.lm import greedy_generate
path, mode, offload, cpu_memory, out = sys.argv[1:6]
t0 = time.perf_counter()
model, tok = generation_model(path, mode, offload, cpu_memory)
load_seconds = time.perf_counter() - t0
placement = sorted({str(d) for d in getattr(model, "hf_device_map", {}).values()})
prompts = generation_prompts(tok)
passes = []
model.register_forward_pre_hook(lambda m, a: passes.append(1))
t0 = time.perf_counter()
outs = greedy_generate(model, tok, prompts, until=[], max_new_tokens=NEW_TOKENS, batch_size=PROMPTS, progress=False)
seconds = time.perf_counter() - t0
json.dump({"load_seconds": load_seconds, "generate_seconds": seconds, "forward_passes": len(passes),
           "seconds_per_pass": seconds / len(passes), "prompts": PROMPTS, "prompt_tokens": PROMPT_TOKENS,
           "new_tokens": NEW_TOKENS, "placement": placement,
           "outputs_sha256": hashlib.sha256(json.dumps(outs).encode()).hexdigest()}, open(out, "w"))
"""
PROMPTS, PROMPT_TOKENS, NEW_TOKENS = 4, 64, 16  # the generation rows: one batch of WikiText-2 prompts, greedy


def generation_model(path, mode: str, offload, cpu_memory: str):
    """(model, tokenizer) of the bfloat16 model at ``path`` for a generation row: ``streamed`` (tasa's layer
    streaming), ``memory`` (tasa's in-memory load) or ``offloaded`` (transformers + accelerate, ``device_map="auto"``
    within ``cpu_memory``, the rest offloaded to the folder ``offload``)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tasa.models import load

    if mode == "offloaded":
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16, device_map="auto",
                                                     max_memory={"cpu": cpu_memory}, offload_folder=str(offload))
        return model, AutoTokenizer.from_pretrained(path)
    lm = load(str(path), dtype="bfloat16", stream=mode == "streamed")
    return lm.model, lm.tokenizer


def generation_prompts(tok) -> list[str]:
    """The first PROMPTS WikiText-2 test texts of at least PROMPT_TOKENS tokens, cut to that many."""
    from tasa.data import eval_texts

    texts = [t for t in eval_texts("wikitext2") if len(tok(t).input_ids) >= PROMPT_TOKENS][:PROMPTS]
    return [tok.decode(tok(t).input_ids[:PROMPT_TOKENS]) for t in texts]


def read_shards(model: Path) -> None:
    """Read every safetensors shard of ``model`` once, in 64 MiB pieces: timed rows then start from the same page
    cache."""
    for shard in sorted(model.glob("*.safetensors")):
        with open(shard, "rb") as f:
            while f.read(1 << 26):
                pass


def generate_worker(name: str, work: Path) -> dict:
    """The two generation rows (module docstring)."""
    model = synthetic_8b(work)
    mode = name.rsplit("-", 1)[1]
    out, offload = work / f"{name}.json", work / f"{name}-offload"
    shutil.rmtree(offload, ignore_errors=True)
    read_shards(model)  # both rows start from the same page cache: the model read once just before (it fits in RAM)
    r = measured([sys.executable, "-c", GENERATE_SCRIPT, str(model), mode, str(offload), "4GiB", str(out)],
                 work / "logs" / f"{name}.log")
    offloaded_gb = sum(p.stat().st_size for p in offload.rglob("*") if p.is_file()) / 1e9 if offload.exists() else 0
    shutil.rmtree(offload, ignore_errors=True)
    if r["returncode"] != 0:
        raise RuntimeError(f"{name} failed: {r['last_line']}")
    return {**r, **json.loads(out.read_text()), "model_disk_gb": disk_bytes(model) / 1e9,
            "offload_folder_gb": offloaded_gb, "compute_dtype": "bfloat16"}


CONVERT_WHOLE = r"""
import sys, torch
from transformers import AutoModelForCausalLM
src, out = sys.argv[1:3]
model = AutoModelForCausalLM.from_pretrained(src.rsplit("/", 1)[0], gguf_file=src.rsplit("/", 1)[1], dtype=torch.float32)
model.hf_quantizer = None
del model.config.quantization_config
model.save_pretrained(out)
"""
CONVERT_STREAMED = r"""
import sys
from pathlib import Path
from tasa.models.gguf_input import convert_gguf
convert_gguf(Path(sys.argv[1]), Path(sys.argv[2]))
"""


def gguf_input(work: Path) -> Path:
    """The 8B shape cut to 4 layers as a BF16 GGUF by llama.cpp's converter (written once)."""
    import torch

    from tasa.export.gguf_source import convert
    from tasa.models.synthetic import synthetic_checkpoint
    from tools.fetch_llama_cpp import fetch

    out = work / "llama3-8b-4l.gguf"
    if out.is_file():
        return out
    hf = work / "llama3-8b-4l-synthetic"
    cfg = llama3_8b_config()
    cfg.num_hidden_layers = 4
    cfg.architectures = ["LlamaForCausalLM"]  # what llama.cpp's converter dispatches on
    shutil.rmtree(hf, ignore_errors=True)
    synthetic_checkpoint(cfg, hf, dtype=torch.bfloat16, max_shard_bytes=2 ** 30)
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(synthetic_8b(work)).save_pretrained(hf)
    convert(hf, out, fetch(ROOT / "benchmarks" / ".work" / "llama-src", everything=True))
    shutil.rmtree(hf)
    return out


def same_tensors(a: Path, b: Path) -> bool:
    """Whether two safetensors directories hold the same tensors (read one at a time)."""
    from safetensors import safe_open

    def index(d: Path) -> dict[str, Path]:
        out = {}
        for f in d.glob("*.safetensors"):
            with safe_open(str(f), "pt") as h:
                out.update({k: f for k in h.keys()})
        return out

    ia, ib = index(a), index(b)
    if set(ia) != set(ib):
        return False
    for k in ia:
        with safe_open(str(ia[k]), "pt") as ha, safe_open(str(ib[k]), "pt") as hb:
            if not ha.get_tensor(k).equal(hb.get_tensor(k)):
                return False
    return True


def convert_worker(name: str, work: Path) -> dict:
    """The two GGUF-conversion rows (module docstring); the streamed row compares its output with the whole one's."""
    src = gguf_input(work)
    out = work / f"{name}-out"
    shutil.rmtree(out, ignore_errors=True)
    script = CONVERT_STREAMED if name.endswith("streamed") else CONVERT_WHOLE
    r = measured([sys.executable, "-c", script, str(src), str(out)], work / "logs" / f"{name}.log")
    if r["returncode"] != 0:
        raise RuntimeError(f"{name} failed: {r['last_line']}")
    result = {**r, "gguf_gb": src.stat().st_size / 1e9, "output_gb": disk_bytes(out) / 1e9}
    whole = work / "llama3-8b-4l-gguf-convert-whole-out"
    if name.endswith("streamed") and whole.is_dir():
        result["same_tensors_as_whole"] = same_tensors(out, whole)
        shutil.rmtree(whole)
    if name.endswith("streamed"):
        shutil.rmtree(out)
    return result


def worker(name: str, work: Path) -> dict:
    if name in MOE:
        return moe_worker(name, work)
    if name == "qwen3-moe-30b-2l-profile-gptq-streamed":
        return moe_profile_worker(name, work)
    if "-gguf-convert-" in name:
        return convert_worker(name, work)
    if name.startswith("llama3-8b-eval-"):
        return eval_worker(name, work)
    if name.startswith("llama3-8b-generate-"):
        return generate_worker(name, work)
    out = work / name
    shutil.rmtree(out, ignore_errors=True)
    if name.startswith("smollm2-"):
        stream = "off" if name == "smollm2-in-memory" else "on"
        r = measured([*TASA, "quantize", "--model", "smollm2-135m", "--plan", str(RUN_PLAN), "--calib",
                      "gsm8k:0.5,arc_easy:0.5", "--nsamples", "64", "--seqlen", "512", "--stream", stream,
                      "--quiet", "--output-dir", str(out)], work / "logs" / f"{name}.log")
        if r["returncode"] != 0:
            raise RuntimeError(f"{name} failed: {r['last_line']}")
        rec = json.loads((out / "quantize.json").read_text())
        return {**r, "checkpoint_sha256": sha256(out / "model.safetensors"), "streamed": rec["streamed"],
                "bits": rec["average_bits"], "quantize_seconds": rec["seconds"]["quantize"]}
    model = synthetic_8b(work)
    size = disk_bytes(model)
    cfg = llama3_8b_config()
    h, kv, inter = cfg.hidden_size, cfg.num_key_value_heads * cfg.hidden_size // cfg.num_attention_heads, \
        cfg.intermediate_size
    layer_params = 2 * h * h + 2 * h * kv + 3 * h * inter + 2 * h  # q, o; k, v; gate, up, down; two norms
    info = {"model_disk_gb": size / 1e9, "layer_float32_gb": layer_params * 4 / 1e9,
            "layer_bfloat16_gb": layer_params * 2 / 1e9,
            "compute_dtype": "bfloat16" if name.endswith("-bf16") else "float32"}
    dtype = ["--dtype", "bfloat16"] if name.endswith("-bf16") else []
    if name.startswith("llama3-8b-profile-streamed"):
        r = measured([*TASA, "profile", "--model", str(model), "--objectives", "wikitext2", "--bits", "3,4",
                      "--layers", "0,31", "--probe-tokens", "64", "--probe-seqlen", "64", "--group-size", "128",
                      "--stream", "on", *dtype, "--quiet", "--output-dir", str(out)], work / "logs" / f"{name}.log")
        if r["returncode"] != 0:
            raise RuntimeError(f"{name} failed: {r['last_line']}")
        sens = json.loads((out / "sensitivity.json").read_text())
        return {**r, **info, "peak_rss_over_disk": r["peak_rss_gb"] * 2 ** 30 / size,
                "costs": sens["costs"]["wikitext2"]}
    stream = "off" if name == "llama3-8b-in-memory" else "on"
    extra: list[str] = []
    if name.startswith("llama3-8b-gptq-layer-streamed"):  # GPTQ's peak: one layer's Hessians, solves (30 = 3 bits)
        plan = plan_348(model, work / "plan-gptq-layer30.json", "gptq", layers=[30])
        extra = ["--allow-partial-plan", "--calib", "wikitext2", "--nsamples", "8", "--seqlen", "256", *dtype]
    else:
        plan = plan_348(model, work / "plan-348-rtn.json", "rtn")
    r = measured([*TASA, "quantize", "--model", str(model), "--plan", str(plan), *extra, "--stream", stream,
                  "--max-shard-size", "256MB", "--quiet", "--output-dir", str(out)], work / "logs" / f"{name}.log",
                 as_limit=AS_LIMIT if stream == "off" else None)
    result = {**r, **info, "peak_rss_over_disk": r["peak_rss_gb"] * 2 ** 30 / size}
    if r["returncode"] == 0:
        rec = json.loads((out / "quantize.json").read_text())
        result.update(bits=rec["average_bits"], streamed=rec["streamed"], checkpoint_gb=disk_bytes(out) / 1e9,
                      quantize_seconds=rec["seconds"]["quantize"], shards=len(list(out.glob("*.safetensors"))),
                      quantized_modules=len(rec["modules"]))
        shutil.rmtree(out)  # 4-30 GB; the record keeps what was measured
    elif stream == "on":
        raise RuntimeError(f"{name} failed: {r['last_line']}")
    return result


def main() -> None:
    args, work = parse_or_work(__doc__, BENCH, worker, ROWS)
    results = {}
    for name in args.rows.split(","):
        print(f"[{BENCH}] {name} ...", flush=True)
        results[name] = cached(RECORDS / f"{name}.json", lambda n=name: worker(n, work))
        print(f"  {json.dumps({k: v for k, v in results[name].items() if k != 'costs'})}", flush=True)
    results = recorded(RECORDS, ROWS, results)
    rows = []
    for name, r in results.items():
        metrics = {k: v for k, v in r.items() if k not in ("seconds",)}
        if name == "smollm2-streamed" and "smollm2-in-memory" in results:
            ref = results["smollm2-in-memory"]
            metrics["same_checkpoint_as_in_memory"] = r["checkpoint_sha256"] == ref["checkpoint_sha256"]
            metrics["time_ratio_vs_in_memory"] = r["seconds"] / ref["seconds"]
            metrics["quantize_time_ratio_vs_in_memory"] = r["quantize_seconds"] / ref["quantize_seconds"]
        other = "llama3-8b-eval-streamed-batch-by-batch"
        if name == "llama3-8b-eval-streamed-layer-major" and other in results:
            metrics["eval_time_ratio_vs_batch_by_batch"] = r["eval_seconds"] / results[other]["eval_seconds"]
            metrics["same_nll_as_batch_by_batch"] = abs(r["nll"] - results[other]["nll"]) <= 1e-5 * abs(r["nll"])
        other = "llama3-8b-generate-offloaded"
        if name == "llama3-8b-generate-streamed" and other in results:
            metrics["generate_time_ratio_vs_offloaded"] = r["generate_seconds"] / results[other]["generate_seconds"]
            metrics["same_outputs_as_offloaded"] = r["outputs_sha256"] == results[other]["outputs_sha256"]
        if name.startswith("llama3-8b-generate-"):
            rows.append(row(name, "accelerate" if name.endswith("offloaded") else "tasa", "generate", None, None,
                            None, metrics, r["seconds"]))
            continue
        if name.startswith("llama3-8b-eval-") or "-gguf-convert-" in name:
            rows.append(row(name, "tasa" if not name.endswith("whole") else "transformers", name.split("-")[-2]
                            if "convert" in name else "eval", None, None, None, metrics, r["seconds"]))
            continue
        calib = ("gsm8k:0.5,arc_easy:0.5 (64 x 512)" if name.startswith("smollm2") else
                 None if name in MOE and MOE[name][2] == "rtn" or name.startswith("llama3-8b-profile")
                 else "wikitext2 (8 x 256)")
        rows.append(row(name, "tasa", "quantize" if "profile" not in name else "profile", r.get("bits"),
                        64 if name.startswith("smollm2") else 128, calib, metrics, r["seconds"]))
    out = write_results(BENCH, ".venv/bin/python benchmarks/large_model.py", rows)
    print(f"written {out}")


if __name__ == "__main__":
    main()
