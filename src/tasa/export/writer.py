"""Checkpoints written as the layers finish: safetensors shards of bounded size, then the index and configs.

A quantization walks the decoder layers once; :class:`CheckpointWriter` takes each layer's tensors as soon
as the layer is done (its packed GPTQ tensors, or its dequantized float weights, and everything else it
holds: norms, biases, linears left in float) and writes a shard whenever the tensors it holds pass
``max_shard_bytes``, so a model larger than memory is exported with one layer and one shard in memory.
The tensors outside the decoder layers (embeddings, final norm, head) come last, read from the model (or,
for a streamed model, from its checkpoint one at a time).

Shards are serialised by safetensors (``metadata={"format": "pt"}``); one shard is ``model.safetensors``,
several are ``model-0000i-of-0000n.safetensors`` with ``model.safetensors.index.json``, as transformers
writes them.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn as nn

from tasa.artifacts import write_json_atomic

MAX_SHARD_BYTES = 2 ** 30  # 1 GiB: a streamed export holds at most one shard (plus one tensor) in memory


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


class ShardWriter:
    """Safetensors shards of at most ``max_shard_bytes`` (a larger tensor gets a shard of its own)."""

    def __init__(self, out_dir: Path, max_shard_bytes: int = MAX_SHARD_BYTES):
        self.out_dir, self.max_shard_bytes = Path(out_dir), max_shard_bytes
        self._held: dict[str, torch.Tensor] = {}
        self._held_bytes = 0
        self._files: list[tuple[str, list[str]]] = []
        self.total_bytes = 0
        self._keys: set[str] = set()

    def add(self, tensors: dict[str, torch.Tensor]) -> None:
        for key, t in tensors.items():
            if key in self._keys:
                raise ValueError(f"tensor {key} written twice")
            self._keys.add(key)
            t = t.detach().to("cpu").contiguous()
            if self._held and self._held_bytes + _nbytes(t) > self.max_shard_bytes:
                self._flush()
            self._held[key] = t
            self._held_bytes += _nbytes(t)
            self.total_bytes += _nbytes(t)

    def _flush(self) -> None:
        from safetensors.torch import save_file

        name = f".shard-{len(self._files):05d}.safetensors"
        save_file(self._held, str(self.out_dir / name), metadata={"format": "pt"})
        self._files.append((name, list(self._held)))
        self._held, self._held_bytes = {}, 0

    def close(self) -> list[str]:
        """Write the last shard, name the shards, and write the index when there are several; the file names."""
        if self._held or not self._files:
            self._flush()
        n = len(self._files)
        names = (["model.safetensors"] if n == 1 else
                 [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)])
        weight_map = {}
        for (tmp, keys), final in zip(self._files, names):
            os.replace(self.out_dir / tmp, self.out_dir / final)
            weight_map.update({k: final for k in keys})
        if n > 1:
            write_json_atomic(self.out_dir / "model.safetensors.index.json",
                              {"metadata": {"total_size": self.total_bytes}, "weight_map": dict(sorted(weight_map.items()))})
        return names


def checkpoint_key(names: dict[str, str], key: str) -> str:
    """The checkpoint key of the model's tensor ``key`` given ``names`` ({model key: checkpoint key} where they
    differ): its own, the renamed one, or for a tensor ``NAME.SUFFIX`` written in place of a renamed
    ``NAME.weight`` (a quantized linear's qweight, scales ...), the checkpoint's ``NAME`` with that suffix."""
    if key in names:
        return names[key]
    base, _, suffix = key.rpartition(".")
    renamed = names.get(f"{base}.weight")
    return f"{renamed[: -len('.weight')]}.{suffix}" if renamed is not None else key


class CheckpointWriter:
    """The weights of a model being quantized, written layer by layer into ``out_dir`` (see the module
    docstring)."""

    def __init__(self, out_dir: Path, model: nn.Module, layers_path: str, max_shard_bytes: int = MAX_SHARD_BYTES,
                 float_dtype: torch.dtype | None = None):
        self.model, self.layers_path = model, layers_path
        self.shards = ShardWriter(out_dir, max_shard_bytes)
        self.float_dtype = float_dtype  # the model's own float tensors are written in it (None: as they are)
        self.packed_bytes = 0  # bytes of the packed linears' tensors; the rest is float tensors

    def _dtype(self, t: torch.Tensor) -> torch.dtype:
        """The dtype ``t`` is written in."""
        return self.float_dtype if self.float_dtype is not None and t.is_floating_point() else t.dtype

    def _float(self, t: torch.Tensor) -> torch.Tensor:
        return t.to(self._dtype(t))

    def add_layer(self, index: int, layer: nn.Module, packed: dict[str, torch.Tensor]) -> None:
        """Decoder layer ``index`` (its weights resident): ``packed`` (the GPTQ tensors of its quantized linears,
        whose float weights are then left out) and every other tensor it holds."""
        prefix = f"{self.layers_path}.{index}."
        quantized = {k.rsplit(".", 1)[0] for k in packed}
        own = {prefix + k: self._float(t) for k, t in layer.state_dict().items()
               if not (k.endswith(".weight") and prefix + k[: -len(".weight")] in quantized)}
        self.packed_bytes += sum(_nbytes(t) for t in packed.values())
        self.shards.add({self._name(k): t for k, t in {**own, **packed}.items()})

    def _name(self, key: str) -> str:
        """The checkpoint's name for the model's tensor ``key``: :func:`checkpoint_key` by the names the model
        records (``tasa_checkpoint_names``, set by tasa.models.moe for layouts whose checkpoints name experts
        their own way)."""
        return checkpoint_key(getattr(self.model, "tasa_checkpoint_names", {}), key)

    def finish(self) -> list[str]:
        """Every tensor outside the decoder layers, each stored once (tied weights share storage), then the
        shards' names and index; returns the weight file names."""
        streamer = getattr(self.model, "tasa_streamer", None)
        seen = set()
        for key, t in self.model.state_dict(keep_vars=True).items():
            if key.startswith(self.layers_path + "."):
                continue
            if t.device.type == "meta":  # a streamed unit: read it from the checkpoint now, in the dtype written
                # (a 128k x 4096 head in the checkpoint's bfloat16 is then not also converted to 2.1 GB of float32)
                t = streamer.weights.get(streamer.source_key(key), dtype=self._dtype(t)
                                         if t.is_floating_point() else None)
            else:
                ptr = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
                if ptr in seen:
                    continue
                seen.add(ptr)
            self.shards.add({self._name(key): self._float(t)})
        return self.shards.close()


def write_config_files(out_dir: Path, model: nn.Module, tokenizer, quantization_config: dict | None,
                       readme: str | None = None, float_dtype: torch.dtype | None = None) -> None:
    """config.json (with ``quantization_config`` when given, and then, for GPTQ, quantize_config.json too), the generation
    config, the tokenizer and a README."""
    config = model.config.to_dict()
    if float_dtype is not None:  # what the float tensors were written in: loaders build the model in it
        config["dtype"] = str(float_dtype).replace("torch.", "")
    if quantization_config is not None:
        config["quantization_config"] = quantization_config
        if quantization_config.get("quant_method") == "gptq":
            write_json_atomic(out_dir / "quantize_config.json", quantization_config)
    write_json_atomic(out_dir / "config.json", config)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(out_dir)
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)
    if readme is not None:
        (out_dir / "README.md").write_text(readme)
