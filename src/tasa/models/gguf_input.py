"""A GGUF file as a float safetensors checkpoint, converted one tensor at a time.

tasa reads a GGUF model (llama.cpp's format, any GGML type per tensor) by converting it once into a cached
Hugging Face directory of float32 safetensors, which every verb then loads, whole or streamed layer by layer.
The conversion follows transformers' own GGUF loader (its config and tokenizer readers, its name map and tensor
processor: what it does to each tensor on loading, e.g. LLaMA's q/k row order, Qwen-MoE's stacked experts) but
never holds the model: the skeleton is built on the meta device, each tensor is dequantized by gguf-py from the
memory-mapped file, processed, and written into a bounded safetensors shard, so a 70B GGUF converts with one
shard and one tensor in memory (transformers' ``from_pretrained(gguf_file=...)`` materialises the whole model
in float32).  Tensors that several GGUF tensors fill (a fused gate/up of stacked experts) are written once all
their parts are in.  Checkpoint names are those ``save_pretrained`` writes (per-expert names for fused experts:
tasa.models.moe.checkpoint_names), so the directory loads in plain transformers and streams in tasa.
"""
from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from tasa.errors import TasaError

log = logging.getLogger(__name__)


def _fused_parts(key: str, tensor: torch.Tensor, fused: dict, names: dict[str, str]) -> dict[str, torch.Tensor]:
    """{checkpoint key: tensor} of the model tensor ``key``: itself, or for a fused-experts parameter its
    per-expert matrices under the names ``save_pretrained`` gives them."""
    owner, _, attr = key.rpartition(".")
    if owner not in fused:
        return {names.get(key, key): tensor}
    out = {}
    for e in range(tensor.shape[0]):
        if attr == "gate_up_proj":
            half = tensor.shape[1] // 2
            parts = {"gate_proj": tensor[e, :half], "up_proj": tensor[e, half:]}
        else:
            parts = {"down_proj": tensor[e]}
        for role, t in parts.items():
            local = f"{owner}.{e}.{role}.weight"
            out[names.get(local, local)] = t.contiguous()
    return out


def convert_gguf(gguf_path: Path, out_dir: Path, max_shard_bytes: int | None = None) -> None:
    """Write ``gguf_path`` as a float32 Hugging Face directory into ``out_dir`` (config, tokenizer, safetensors
    shards; see the module docstring).  Errors name the file and what failed."""
    import gguf
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from tasa.export.gguf import weights_map
    from tasa.export.writer import MAX_SHARD_BYTES, ShardWriter
    from tasa.models.moe import checkpoint_names, is_fused

    where, name = str(gguf_path.parent), gguf_path.name
    try:
        config = AutoConfig.from_pretrained(where, gguf_file=name)
        tokenizer = AutoTokenizer.from_pretrained(where, gguf_file=name)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        reader = gguf.GGUFReader(gguf_path)
        processor, mapping = weights_map(model, reader)
    except ImportError as e:
        raise TasaError(f"loading GGUF needs the 'gguf' and 'accelerate' packages: {e}") from None
    except TasaError:
        raise
    except Exception as e:  # transformers raises assorted errors on unsupported GGUF layouts
        raise TasaError(f"could not load GGUF file {gguf_path}: {e}") from None
    fused = {n: m for n, m in model.named_modules() if is_fused(m)}
    names = checkpoint_names(model, fused) if fused else {}
    expected = {k: tuple(t.shape) for k, t in model.state_dict().items()}
    remaining = Counter(mapping.values())  # model key -> GGUF tensors that fill it still to come
    parsed: dict = {"tensors": {}, "config": {}, "tokenizer": {}, "tokenizer_config": {}}
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    writer = ShardWriter(Path(out_dir), max_shard_bytes or MAX_SHARD_BYTES)
    written: set[str] = set()
    for t in tqdm(reader.tensors, desc=f"converting {name}", disable=not log.isEnabledFor(logging.INFO)):
        weights = gguf.quants.dequantize(t.data, t.tensor_type)
        result = processor.process(weights=weights, name=t.name, tensor_key_mapping=mapping,
                                   parsed_parameters=parsed)
        if result.name in mapping:  # a copy only of a view of the memory-mapped file (F32 tensors dequantize so)
            w = result.weights
            own = w.flags.writeable and not np.shares_memory(w, t.data)
            parsed["tensors"][mapping[result.name]] = torch.from_numpy(w if own else np.copy(w))
        # the model tensor it fills: by its name, or (a fused parameter the processor fills in place, e.g. stacked
        # experts, whose model key has no ".weight") by its name without the suffix
        key = mapping.get(t.name, mapping.get(t.name.rsplit(".", 1)[0]))
        if key is None:
            log.info("%s: tensor %s has no place in %s; skipped", name, t.name, type(model).__name__)
            continue
        remaining[key] -= 1
        if remaining[key] or key not in parsed["tensors"]:
            continue
        tensor = parsed["tensors"].pop(key).float()
        if key in expected and tuple(tensor.shape) != expected[key]:
            tensor = tensor.reshape(expected[key]) if tensor.numel() == int(np.prod(expected[key])) else tensor
        if key not in expected or tuple(tensor.shape) != expected[key]:
            raise TasaError(f"could not load GGUF file {gguf_path}: {t.name} gives {key} of shape "
                            f"{tuple(tensor.shape)}, the model expects {expected.get(key)}")
        writer.add(_fused_parts(key, tensor, fused, names))
        written.add(key)
    tied = {k for k in expected if k not in written and _tied_to_written(model, k, written)}
    missing = sorted(set(expected) - written - tied)
    if missing:
        raise TasaError(f"could not load GGUF file {gguf_path}: it holds no tensor for {missing[0]}"
                        + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
                        + f" of {type(model).__name__}, the model transformers reads it as (a layout its GGUF "
                        "loader does not support: load the Hugging Face checkpoint instead)")
    writer.close()
    config.architectures = [type(model).__name__]  # as save_pretrained records them
    config.dtype = torch.float32
    config.save_pretrained(out_dir)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


def _tied_to_written(model, key: str, written: set[str]) -> bool:
    """Whether the model's tensor ``key`` shares its storage with a tensor already written (tied embeddings)."""
    params = dict(model.named_parameters(remove_duplicate=False))
    if key not in params:
        return False
    return any(params[key] is params[other] for other in written if other in params)
