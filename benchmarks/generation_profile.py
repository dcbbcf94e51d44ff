"""Where a streamed model's generation time goes (issue 36): tasa streamed, tasa in memory, accelerate offloading.

    .venv/bin/python benchmarks/generation_profile.py     # ~3 min on 2 cores; the model kept in benchmarks/.work

A 1B-parameter Llama-shaped synthetic model (16 layers, hidden 2048, GQA 16/4, the 128k vocabulary; random
bfloat16 weights, 2 GB, written once as sharded safetensors with SmolLM2's tokenizer) generates 16 tokens greedily
for 4 WikiText-2 prompts of 64 tokens in one batch, twice per mode, each mode in its own process after the shards
were read once (the same page cache): ``streamed`` (tasa's layer streaming), ``memory`` (tasa's in-memory load) and
``offloaded`` (transformers + accelerate, ``device_map="auto"`` with ``max_memory`` 1 GiB). Per run: the total, the
prompt pass and the mean decode pass (forward pre-hook times), the streamer's time in reading, releasing and
trimming (streamed only), and a digest of the generated text (the same in every mode and run).  Smaller than
large_model.py's 8B rows, so that each module's time can be looked at; they are the figures to compare.
"""
from __future__ import annotations

import collections
import hashlib
import json
import subprocess
import sys
import time
from pathlib import Path

_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or '.').resolve() != _HERE]
sys.path.insert(0, str(_HERE.parent))
from benchmarks.common import WORK, row, write_results  # noqa: E402
from benchmarks.large_model import (NEW_TOKENS, PROMPTS, generation_model, generation_prompts,  # noqa: E402
                                    read_shards, synthetic_dir)

BENCH = "generation_profile"
MODES = ("streamed", "memory", "offloaded")
MODEL = WORK / BENCH / "llama-1b"  # written once by synthetic_dir


def llama_1b_config():
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                       num_attention_heads=16, num_key_value_heads=4, max_position_embeddings=8192,
                       rope_theta=500000.0, tie_word_embeddings=False, bos_token_id=0, eos_token_id=0)


def measure(mode: str) -> list[dict]:
    """Two generations in this process, by ``mode``."""
    import tasa.models.streaming as streaming
    from tasa.eval.lm import greedy_generate

    timers: collections.Counter = collections.Counter()

    def timed(owner, name):
        f = getattr(owner, name)

        def wrapper(*a, **k):
            t0 = time.perf_counter()
            try:
                return f(*a, **k)
            finally:
                timers[name] += time.perf_counter() - t0
        setattr(owner, name, wrapper)

    if mode == "streamed":
        for owner, name in ((streaming.Streamer, "_materialize"), (streaming.Streamer, "_dematerialize"),
                            (streaming, "_return_freed_memory")):
            timed(owner, name)
    model, tok = generation_model(MODEL, mode, WORK / BENCH / "offload", "1GiB")
    prompts = generation_prompts(tok)
    starts: list[float] = []
    model.register_forward_pre_hook(lambda m, a: starts.append(time.perf_counter()))
    out = []
    for _ in range(2):
        starts.clear()
        timers.clear()
        t0 = time.perf_counter()
        texts_out = greedy_generate(model, tok, prompts, until=[], max_new_tokens=NEW_TOKENS, batch_size=PROMPTS,
                                    progress=False)
        total = time.perf_counter() - t0
        passes = [b - a for a, b in zip(starts, starts[1:])]
        out.append({"generate_s": total, "prompt_pass_s": passes[0],
                    "decode_pass_mean_s": sum(passes[1:]) / len(passes[1:]),
                    **{f"{k.strip('_')}_s": v for k, v in timers.items()},
                    "outputs_sha256": hashlib.sha256(json.dumps(texts_out).encode()).hexdigest()})
    return out


def main() -> None:
    if sys.argv[1:2] == ["--mode"]:
        print(json.dumps(measure(sys.argv[2])))
        return
    synthetic_dir(MODEL.parent, MODEL.name, llama_1b_config())
    rows = []
    for mode in MODES:
        read_shards(MODEL)  # the same page cache for every mode
        proc = subprocess.run([sys.executable, __file__, "--mode", mode], capture_output=True, text=True)
        if proc.returncode:
            sys.exit(f"generation_profile: {mode} failed:\n{proc.stderr[-2000:]}")
        for i, m in enumerate(json.loads(proc.stdout.strip().splitlines()[-1])):
            rows.append(row(f"llama-1b-generate-{mode}-run{i}", "accelerate" if mode == "offloaded" else "tasa",
                            mode, 16, None, None, m, m["generate_s"]))
            print(rows[-1]["name"], {k: v if isinstance(v, str) else round(v, 3) for k, v in m.items()}, flush=True)
    print(write_results(BENCH, ".venv/bin/python benchmarks/generation_profile.py", rows))


if __name__ == "__main__":
    main()
