"""A checkpoint's tensors, read one at a time: the weight side of streamed models (tasa.models.streaming).

:func:`open_weights` opens a model directory's ``*.safetensors`` (one file or the shards of
``model.safetensors.index.json``), memory-mapped by safetensors: a tensor is read from disk when asked
for, and nothing else of the checkpoint is held in memory.  A GPTQ checkpoint (tasa's or any
``checkpoint_format: gptq`` / ``gptq_v2``) presents each quantized linear as its dequantized ``weight``,
unpacked from ``qweight`` / ``qzeros`` / ``scales`` / ``g_idx`` when that weight is read, and so does a
compressed-tensors ``pack-quantized`` checkpoint from ``weight_packed`` / ``weight_scale`` / ...: a
quantized model streams one layer at a time like a float one.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from tasa.errors import TasaError
from tasa.export.compressed_tensors import SUFFIXES as CT_SUFFIXES
from tasa.export.compressed_tensors import dequantize_module as ct_dequantize
from tasa.export.compressed_tensors import module_grid as ct_module_grid
from tasa.export.gptq import GPTQ_SUFFIXES, dequantize_module, gptq_config, quantized_format

_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool}


class Weights:
    """Named tensors of a safetensors checkpoint directory, each read from disk on :meth:`get`."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        index = self.path / "model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            files = sorted(set(weight_map.values()))
        else:
            files = sorted(p.name for p in self.path.glob("*.safetensors"))
        if not files:
            raise TasaError(f"{self.path} holds no .safetensors weights")
        self._file_of: dict[str, str] = {}
        self._meta: dict[str, tuple[str, tuple[int, ...]]] = {}  # key -> (safetensors dtype, shape)
        for name in files:
            with self._open(name) as handle:
                for key in handle.keys():
                    self._file_of[key] = name
                    sl = handle.get_slice(key)
                    self._meta[key] = (sl.get_dtype(), tuple(sl.get_shape()))

    def _open(self, name: str):
        # Opened per read, not kept: safetensors memory-maps the file while it is open, and every page read
        # through the map would count in the process's resident memory until it is closed.
        try:
            return safe_open(str(self.path / name), "pt")
        except (OSError, SafetensorError) as e:
            raise TasaError(f"could not read weights {self.path / name}: {e}") from None

    def keys(self) -> list[str]:
        return list(self._file_of)

    def __contains__(self, key: str) -> bool:
        return key in self._file_of

    def raw(self, key: str) -> torch.Tensor:
        """Tensor ``key`` as stored."""
        if key not in self._file_of:
            raise TasaError(f"{self.path}: no tensor {key!r} in the checkpoint")
        with self._open(self._file_of[key]) as handle:
            return handle.get_tensor(key)

    def stored_dtype(self, key: str) -> torch.dtype:
        return _DTYPES.get(self._meta[key][0], torch.float32)

    def shape(self, key: str) -> tuple[int, ...]:
        return self._meta[key][1]

    def get(self, key: str, dtype: torch.dtype | None = None, device: str | torch.device = "cpu") -> torch.Tensor:
        """Tensor ``key`` (floating-point ones cast to ``dtype`` when given) on ``device``."""
        t = self.raw(key)
        if dtype is not None and t.is_floating_point():
            t = t.to(dtype)
        return t.to(device)

    def nbytes(self, dtype: torch.dtype | None = None) -> int:
        """Bytes of every tensor, floating-point ones counted at ``dtype`` (as stored without it)."""
        total = 0
        for key in self.keys():  # a GPTQ checkpoint: its linears as the float weights they read as
            stored = self.stored_dtype(key)
            size = (dtype if dtype is not None and stored.is_floating_point else stored).itemsize
            total += size * math.prod(self.shape(key))
        return total


class PackedWeights(Weights):
    """A quantized checkpoint whose packed linears read as dequantized float ``NAME.weight`` tensors: each linear
    is stored as the tensors ``NAME.SUFFIX`` for :attr:`suffixes`, and :attr:`marker` (one of them) says which
    linears are packed."""

    suffixes: tuple[str, ...] = ()
    optional: tuple[str, ...] = ()
    marker: str = ""

    def __init__(self, path: str | Path):
        super().__init__(path)
        self.quantized = {k[: -len(self.marker) - 1] for k in self._file_of if k.endswith("." + self.marker)}
        for name in self.quantized:
            missing = [s for s in self.suffixes if s not in self.optional and f"{name}.{s}" not in self._file_of]
            if missing:
                raise TasaError(f"{self.path}: {name} lacks its {', '.join(missing)} tensor(s)")

    def _quantized(self, key: str) -> str | None:
        """The quantized linear whose (dequantized) weight ``key`` names, else None."""
        name = key[: -len(".weight")] if key.endswith(".weight") else None
        return name if name in self.quantized else None

    def _packed(self, name: str):
        """``get(suffix)``: the stored tensor ``NAME.SUFFIX`` of packed linear ``name``."""
        return lambda suffix: Weights.raw(self, f"{name}.{suffix}")

    def keys(self) -> list[str]:
        plain = [k for k in self._file_of if k.rsplit(".", 1)[0] not in self.quantized
                 or k.rsplit(".", 1)[1] not in self.suffixes]
        return plain + [f"{n}.weight" for n in sorted(self.quantized)]

    def __contains__(self, key: str) -> bool:
        return key in self._file_of or self._quantized(key) is not None

    def raw(self, key: str) -> torch.Tensor:
        name = self._quantized(key)
        return self.dequantize(name) if name is not None else super().raw(key)

    def dequantize(self, name: str) -> torch.Tensor:
        raise NotImplementedError

    def stored_dtype(self, key: str) -> torch.dtype:
        return torch.float32 if self._quantized(key) is not None else super().stored_dtype(key)


class GptqWeights(PackedWeights):
    """A GPTQ checkpoint (tasa's, GPTQModel's, any ``checkpoint_format`` gptq / gptq_v2)."""

    suffixes, marker = GPTQ_SUFFIXES, "qweight"

    def __init__(self, path: str | Path):
        super().__init__(path)
        self.qcfg = gptq_config(self.path)

    def dequantize(self, name: str) -> torch.Tensor:
        return dequantize_module(self._packed(name), name, self.qcfg, self.path)

    def shape(self, key: str) -> tuple[int, ...]:
        name = self._quantized(key)
        if name is None:
            return super().shape(key)
        return (Weights.shape(self, f"{name}.scales")[1], Weights.shape(self, f"{name}.g_idx")[0])  # (out, in)


class CompressedTensorsWeights(PackedWeights):
    """A compressed-tensors checkpoint of integer weights (tasa's, llm-compressor's): ``pack-quantized``
    weight-only linears, ``int-quantized`` ones (W8A8: int8 weights per output channel), or both
    (``mixed-precision``)."""

    suffixes, optional, marker = CT_SUFFIXES, ("weight_zero_point",), "weight_packed"
    FORMATS = ("pack-quantized", "int-quantized", "mixed-precision")

    def __init__(self, path: str | Path):
        super().__init__(path)
        self.qcfg = json.loads((self.path / "config.json").read_text())["quantization_config"]
        if self.qcfg.get("format") not in self.FORMATS:
            raise TasaError(f"{self.path}: compressed-tensors format {self.qcfg.get('format')!r} is not supported "
                            f"({', '.join(self.FORMATS)})")
        # int-quantized linears: an integer NAME.weight beside its NAME.weight_scale
        self.int8 = {k[: -len(".weight_scale")] for k in self._file_of if k.endswith(".weight_scale")
                     and k[: -len(".weight_scale")] not in self.quantized and k[: -len("_scale")] in self._file_of
                     and not Weights.stored_dtype(self, k[: -len("_scale")]).is_floating_point}
        self.quantized |= self.int8
        for name in self.quantized:
            if ct_module_grid(self.qcfg, name) is None:
                raise TasaError(f"{self.path}: no config group of quantization_config targets {name}")

    def keys(self) -> list[str]:
        return list(dict.fromkeys(super().keys()))  # an int-quantized NAME.weight is stored under its own name

    def dequantize(self, name: str) -> torch.Tensor:
        bits, sym, group_size, fmt = ct_module_grid(self.qcfg, name)
        return ct_dequantize(self._packed(name), name, bits, sym, group_size, fmt)

    def shape(self, key: str) -> tuple[int, ...]:
        name = self._quantized(key)
        if name is None:
            return super().shape(key)
        if name in self.int8:
            return Weights.shape(self, key)
        return tuple(int(x) for x in Weights.raw(self, f"{name}.weight_shape"))


def open_weights(path: str | Path) -> Weights:
    """The tensors of model directory ``path``: dequantizing GPTQ and compressed-tensors checkpoints, as stored
    otherwise."""
    path = Path(path)
    kind = quantized_format(path)
    return {"gptq": GptqWeights, "compressed-tensors": CompressedTensorsWeights}.get(kind, Weights)(path)
