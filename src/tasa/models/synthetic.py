"""Random checkpoints of a real model's shape, written one tensor at a time: large-model checks without a download.

``synthetic_checkpoint(config, out_dir)`` writes a Hugging Face directory (config.json + safetensors shards)
for ``config`` (e.g. Llama-3-8B's: 32 layers, hidden 4096, vocab 128k, ~16 GB in bfloat16) with seeded
random weights, never holding more than one shard in memory: linear and embedding weights
N(0, ``std``), norm weights 1, biases 0.  The model computes nothing meaningful, but every stage of tasa
(loading, streaming, quantization, export, profiling) runs on it exactly as on the real model, with the
real shapes, memory and time (benchmarks/large_model.py, the streaming tests).  Mixture-of-experts
configs are written as their hub checkpoints are: one tensor per expert, under the checkpoint's names
(Mixtral's ``block_sparse_moe.experts.{e}.w1``; tasa.models.moe).
"""
from __future__ import annotations

from pathlib import Path

import torch

from tasa.artifacts import usual_modes
from tasa.export.writer import MAX_SHARD_BYTES, ShardWriter
from tasa.models.moe import unfuse_experts


def synthetic_checkpoint(config, out_dir: str | Path, dtype: torch.dtype = torch.bfloat16, seed: int = 0,
                         std: float = 0.02, max_shard_bytes: int = MAX_SHARD_BYTES) -> Path:
    """Write a random checkpoint of ``config`` (a transformers config) into ``out_dir``; returns it."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with init_empty_weights(include_buffers=False):
        skeleton = AutoModelForCausalLM.from_config(config, dtype=dtype)
    skeleton.tie_weights()
    names = unfuse_experts(skeleton)  # experts one tensor each, under the checkpoint's own names
    gen = torch.Generator().manual_seed(seed)
    writer = ShardWriter(out, max_shard_bytes)
    seen = set()
    for key, t in skeleton.state_dict(keep_vars=True).items():
        if id(t) in seen:  # tied: stored once, under its first name
            continue
        seen.add(id(t))
        leaf = key.rsplit(".", 1)[-1]
        if leaf == "bias":
            value = torch.zeros(t.shape, dtype=dtype)
        elif t.dim() == 1:  # norm weights
            value = torch.ones(t.shape, dtype=dtype)
        else:
            value = (torch.randn(t.shape, generator=gen) * std).to(dtype)
        writer.add({names.get(key, key): value})
    writer.close()
    config.dtype = dtype
    config.save_pretrained(out)
    usual_modes(out)  # safetensors creates owner-only files
    return out
