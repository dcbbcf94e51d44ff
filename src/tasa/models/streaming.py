"""Models larger than memory: the skeleton on the meta device, a module's weights read when it is used.

:func:`streamed_model` builds a model from its config with every parameter on the meta device (buffers
computed at construction, e.g. rotary tables, stay real), and a :class:`Streamer` that owns the
weights (a :class:`tasa.models.weights.Weights` checkpoint, memory-mapped).  Units are the decoder
layers and every other module that holds parameters (embeddings, final norm, head).  A unit is
*resident* while its parameters are real tensors on the compute device, and on meta otherwise:

- :meth:`Streamer.fetch` / :meth:`Streamer.release` pin a decoder layer while a stage uses it (the
  layer walker, tasa.models.walker.walk, does this; a stage may change the resident weights, e.g.
  quantize them, and the change lasts until the release);
- any forward pass through a unit that is not resident fetches it before and releases it after
  (forward hooks), so the model's own forward (capture, evaluation, probes' tails) runs with one unit
  resident at a time besides the pinned ones.

Parameters shared between modules (tied input/output embeddings) are read once at load and stay
resident.  Each unit's floating-point weights are checked for NaN/Inf on their first fetch.  A large
embedding or head outside the layers stored in another float dtype than the model computes in is held
at the stored dtype and cast as it is used (:func:`_keep_stored`).
"""
from __future__ import annotations

import ctypes
import logging
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn as nn

from tasa.errors import TasaError
from tasa.models.placement import placement_of
from tasa.models.weights import Weights
from tasa.numerics import all_finite, nonfinite_count

log = logging.getLogger(__name__)


def _own_tensors(module: nn.Module, prefix: str) -> list[tuple[str, nn.Module, str, bool]]:
    """(checkpoint key, owning module, attribute, is_parameter) of every parameter and persistent buffer of
    ``module`` and its submodules."""
    out = []
    for name, mod in module.named_modules(prefix=prefix, remove_duplicate=False):
        for attr, p in mod._parameters.items():
            if p is not None:
                out.append((f"{name}.{attr}" if name else attr, mod, attr, True))
        for attr, b in mod._buffers.items():
            if b is not None and attr not in mod._non_persistent_buffers_set:
                out.append((f"{name}.{attr}" if name else attr, mod, attr, False))
    return out


def return_freed_memory() -> None:
    """Give the heap's free memory back to the system (glibc's malloc_trim).  After a large block is freed,
    glibc serves later large allocations from its heap, whose free fragments stay resident: streaming the 12
    layers of a 200M-parameter model held ~37 MB more per layer without this (tests/unit/test_streaming.py).
    No effect off glibc."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _owns_memory(t: torch.Tensor) -> bool:
    """Whether ``t``'s memory came from torch's allocator (a cast, dequantized or quantized copy) rather than from
    outside it (a tensor read from safetensors at its stored dtype views the file's memory map, given back by
    unmapping).  Only storages torch allocated itself are resizable."""
    return t.untyped_storage().resizable()


KEEP_STORED_BYTES = 256 * 2**20  # an embedding or head outside the layers this large (at the compute dtype) is read
# at its stored dtype and cast a band of rows at a time (:func:`_keep_stored`)
HEAD_BAND_BYTES = 64 * 2**20  # of the head's weight cast at once


def _keep_stored(unit: "_Unit", weights: Weights, source_key) -> None:
    """Read ``unit``'s weight at the checkpoint's dtype when the unit is an embedding or a bias-free linear head
    outside the decoder layers of at least :data:`KEEP_STORED_BYTES` at the model's dtype and stored in another
    float dtype (a bfloat16 checkpoint computed in float32): a Llama-3 head, 128256 x 4096, is then 1.05 GB of the
    checkpoint's memory map instead of 2.1 GB converted (plus the map's pages while converting).  The embedding casts
    the rows it looked up (the same values as looking them up in the converted table); the head computes its output
    a band of :data:`HEAD_BAND_BYTES` of rows at a time, each band cast to the model's dtype first (the same products;
    tests/unit/test_streaming.py)."""
    mod = unit.module
    if type(mod) not in (nn.Embedding, nn.Linear) or getattr(mod, "bias", None) is not None:  # (subclasses, e.g.
        return  # Gemma's scaled embedding, may compute in the weight's dtype)
    key = f"{unit.name}.weight"
    if key not in {t[0] for t in unit.tensors}:
        return
    model_dtype, stored = mod.weight.dtype, weights.stored_dtype(source_key(key))
    if stored == model_dtype or not stored.is_floating_point or \
            mod.weight.numel() * model_dtype.itemsize < KEEP_STORED_BYTES:
        return
    unit.kept[key] = model_dtype
    if isinstance(mod, nn.Embedding):
        mod.register_forward_hook(lambda _m, _a, out: out.to(model_dtype))
    else:
        mod.forward = lambda input, m=mod: _banded_linear(input, m.weight, model_dtype)


def _banded_linear(x: torch.Tensor, weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """x W^T with W cast to ``dtype`` a band of rows at a time (see :func:`_keep_stored`); differentiable in x."""
    if weight.dtype == dtype:
        return torch.nn.functional.linear(x, weight)
    rows = max(1, HEAD_BAND_BYTES // (weight.shape[1] * dtype.itemsize))
    out = x.new_empty((*x.shape[:-1], weight.shape[0]))
    for r0 in range(0, weight.shape[0], rows):
        out[..., r0:r0 + rows] = torch.nn.functional.linear(x, weight[r0:r0 + rows].to(dtype))
    return out


class _Unit:
    def __init__(self, name: str, module: nn.Module, tensors: list):
        self.name, self.module, self.tensors = name, module, tensors
        self.resident = False
        self.pinned = False
        self.checked = False
        self.device: torch.device | None = None  # where it is read to (None: the streamer's device)
        self.kept: dict[str, torch.dtype] = {}  # key -> the model's dtype, of weights read at their stored dtype


class Streamer:
    """Fetches and releases the weights of a meta-device model's units from ``weights`` (see the module
    docstring)."""

    def __init__(self, model: nn.Module, weights: Weights, layers_path: str, device: str | torch.device = "cpu"):
        self.model, self.weights = model, weights
        self.device = torch.device(device)
        self.layers_path = layers_path
        self.names = dict(getattr(model, "tasa_checkpoint_names", {}))  # model key -> checkpoint key (moe.py)
        shared = self._shared_parameters()
        layers = model.get_submodule(layers_path)
        self.layers = [_Unit(f"{layers_path}.{i}", layer, _own_tensors(layer, f"{layers_path}.{i}"))
                       for i, layer in enumerate(layers)]
        self.others: list[_Unit] = []
        for name, mod in model.named_modules():
            if name == layers_path or name.startswith(layers_path + ".") or not mod._parameters:
                continue
            tensors = [t for t in _own_tensors(mod, name) if t[0] not in shared and "." not in t[0][len(name) + 1:]]
            if tensors:
                self.others.append(_Unit(name, mod, tensors))
        missing = [t[0] for u in self.layers + self.others for t in u.tensors if self.source_key(t[0]) not in weights]
        if missing:
            raise TasaError(f"{weights.path}: the checkpoint has no tensor {missing[0]!r} (and {len(missing) - 1} "
                            "more) of the model's own names; streaming reads a checkpoint in the model's layout "
                            "(load it without --stream)")
        for unit in self.others:
            _keep_stored(unit, weights, self.source_key)
        for unit in self.layers + self.others:
            unit.module.register_forward_pre_hook(lambda _m, _a, u=unit: self._enter(u))
            unit.module.register_forward_hook(lambda _m, _a, _o, u=unit: self._leave(u))
        self._load_shared(shared)

    def source_key(self, key: str) -> str:
        """The checkpoint key holding the model's tensor ``key``: its own name, or the one the model's conversion
        table gives it (Mixtral's experts.{e}.w1 for experts.{e}.gate_proj)."""
        return key if key in self.weights else self.names.get(key, key)

    def _shared_parameters(self) -> set[str]:
        """Keys of parameters that several modules hold (tied weights): resident for the model's lifetime."""
        by_id: dict[int, list[str]] = {}
        for key, p in self.model.named_parameters(remove_duplicate=False):
            by_id.setdefault(id(p), []).append(key)
        return {k for keys in by_id.values() if len(keys) > 1 for k in keys}

    def _load_shared(self, shared: set[str]) -> None:
        groups: dict[int, list[str]] = {}
        params = dict(self.model.named_parameters(remove_duplicate=False))
        for key in shared:
            groups.setdefault(id(params[key]), []).append(key)
        for keys in groups.values():
            source = next((k for k in sorted(keys) if self.source_key(k) in self.weights), None)
            if source is None:
                raise TasaError(f"{self.weights.path}: none of the tied tensors {sorted(keys)} is in the checkpoint")
            value = self._read(source, params[source])
            tied = nn.Parameter(value, requires_grad=False)
            for key in keys:
                owner, _, attr = key.rpartition(".")
                self.model.get_submodule(owner)._parameters[attr] = tied

    def _read(self, key: str, like: torch.Tensor, device: torch.device | None = None,
              dtype: torch.dtype | None = None) -> torch.Tensor:
        """Tensor ``key`` shaped as ``like``, in ``like``'s dtype (or ``dtype``), on ``device``."""
        source = self.source_key(key)
        t = self.weights.get(source, dtype=(dtype or like.dtype) if like.is_floating_point() else None,
                             device=device or self.device)
        if tuple(t.shape) != tuple(like.shape):
            raise TasaError(f"{self.weights.path}: tensor {source} has shape {tuple(t.shape)}, the model expects "
                            f"{tuple(like.shape)}")
        return t

    def _materialize(self, unit: _Unit) -> None:
        for key, mod, attr, is_param in unit.tensors:
            current = mod._parameters[attr] if is_param else mod._buffers[attr]
            stored = self.weights.stored_dtype(self.source_key(key)) if key in unit.kept else None
            value = self._read(key, current, unit.device, stored)
            if not unit.checked and not all_finite(value):
                bad = nonfinite_count(value)
                raise TasaError(f"{key} holds {bad} NaN/infinite value(s); refusing to use it")
            if is_param:
                mod._parameters[attr] = nn.Parameter(value, requires_grad=False)
            else:
                mod._buffers[attr] = value
        unit.checked = True
        unit.resident = True

    def _dematerialize(self, unit: _Unit, trim: bool) -> None:
        """Put ``unit`` back on meta; ``trim``: give the heap's free memory back even if the unit's own tensors
        held none (a stage that pinned it may have left its working memory there)."""
        owned = False  # any tensor with memory of its own (not a view of the memory-mapped checkpoint)
        for key, mod, attr, is_param in unit.tensors:
            current = mod._parameters[attr] if is_param else mod._buffers[attr]
            owned |= current.device.type == "cpu" and _owns_memory(current)
            empty = torch.empty(current.shape, dtype=unit.kept.get(key, current.dtype), device="meta")
            if is_param:
                mod._parameters[attr] = nn.Parameter(empty, requires_grad=False)
            else:
                mod._buffers[attr] = empty
        unit.resident = False
        if trim or owned:  # a forward pass through views of the mapping frees no heap memory worth a trim
            return_freed_memory()  # (1.5-3 ms each: 5-8% of a streamed 1B model's decode step)

    def _enter(self, unit: _Unit) -> None:
        if not unit.resident:
            self._materialize(unit)

    def _leave(self, unit: _Unit) -> None:
        if unit.resident and not unit.pinned:
            self._dematerialize(unit, trim=False)

    def _pin(self, unit: _Unit) -> None:
        self._enter(unit)
        unit.pinned = True

    def _unpin(self, unit: _Unit) -> None:
        unit.pinned = False
        if unit.resident:
            self._dematerialize(unit, trim=True)

    def place(self, devices: list[torch.device]) -> None:
        """Read decoder layer ``i`` onto ``devices[i]`` from now on (tasa.models.placement), the buffers it holds
        (made at construction) moved there now."""
        for unit, device in zip(self.layers, devices):
            unit.device = torch.device(device)
            for mod in unit.module.modules():
                for key, b in mod._buffers.items():
                    if b is not None and b.device.type != "meta":
                        mod._buffers[key] = b.to(device)

    def fetch(self, index: int, device: str | torch.device | None = None) -> nn.Module:
        """Decoder layer ``index`` with its weights on the compute device (or, for a model spread over several
        devices, :meth:`place`, on its own), pinned until :meth:`release`."""
        if device is not None and self.layers[index].device is None:
            self.device = torch.device(device)
        self._pin(self.layers[index])
        return self.layers[index].module

    def release(self, index: int) -> None:
        """Drop decoder layer ``index``'s weights (and any change made to them while it was pinned)."""
        self._unpin(self.layers[index])

    def hold_outside(self) -> None:
        """Keep every unit outside the decoder layers (embeddings, final norm, head) resident from now on (a
        pipeline stage that runs many passes, each of which would read them again)."""
        for unit in self.others:
            self._pin(unit)

    @contextmanager
    def outside_held(self):
        """Within the block, every unit outside the decoder layers (embeddings, final norm, head) stays resident:
        read once for a layer-major pass's many batches."""
        pinned = [u for u in self.others if not u.pinned]
        for unit in pinned:
            self._pin(unit)
        try:
            yield
        finally:
            for unit in pinned:
                self._unpin(unit)

    @contextmanager
    def held(self, module: nn.Module):
        """Within the block, ``module`` (a unit: a decoder layer, the head ...) stays resident, read once for
        several calls (e.g. the head applied chunk by chunk)."""
        unit = next((u for u in self.layers + self.others if u.module is module), None)
        if unit is None or unit.pinned:
            yield
            return
        self._pin(unit)
        try:
            yield
        finally:
            self._unpin(unit)

    def resident_bytes(self) -> int:
        """Bytes of the model's tensors currently held (not on meta)."""
        seen, total = set(), 0
        for t in list(self.model.parameters()) + list(self.model.buffers()):
            if t.device.type != "meta" and id(t) not in seen:
                seen.add(id(t))
                total += t.numel() * t.element_size()
        return total


def streamed_model(path: str | Path, config, dtype: torch.dtype, device: str | torch.device,
                   trust_remote_code: bool = False) -> nn.Module:
    """The model of ``config`` on the meta device, its weights streamed from directory ``path`` (see the module
    docstring); ``model.tasa_streamer`` is its :class:`Streamer`."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    from tasa.models.arch import resolve
    from tasa.models.weights import open_weights

    weights = open_weights(path)
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # GPTQ checkpoints read as float (dequantized per linear)
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)
    model.tie_weights()
    model.eval()
    layers_path = resolve(model).spec.layers_path
    model.tasa_streamer = Streamer(model, weights, layers_path, device)
    for mod in model.modules():  # buffers made at construction (rotary tables) compute where the layers do
        for key, b in mod._buffers.items():
            if b is not None and b.device.type != "meta":
                mod._buffers[key] = b.to(device)
    log.info("streaming %s: %d decoder layers read from disk one at a time", path, len(model.tasa_streamer.layers))
    return model


def streamer_of(model: nn.Module) -> Streamer | None:
    return getattr(model, "tasa_streamer", None)


@contextmanager
def held(model: nn.Module, module: nn.Module):
    """:meth:`Streamer.held` for a streamed model; nothing to do for one in memory."""
    streamer = streamer_of(model)
    if streamer is None:
        yield
    else:
        with streamer.held(module):
            yield


def compute_device(model: nn.Module) -> torch.device:
    """Where the model computes: its streamer's device for a streamed model, else where its weights are; for a model
    spread over several devices, the primary (tasa.models.placement)."""
    placement = placement_of(model)
    if placement is not None:
        return placement.primary
    streamer = streamer_of(model)
    return streamer.device if streamer is not None else next(model.parameters()).device


def compute_dtype(model: nn.Module) -> torch.dtype:
    """The dtype of the model's floating-point weights (a streamed model's are cast to it as they are read)."""
    return next(p.dtype for p in model.parameters() if p.is_floating_point())
