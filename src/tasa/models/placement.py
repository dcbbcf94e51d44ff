"""Several GPUs in one process: a model's decoder layers spread over them in contiguous runs.

``--device cuda:0,cuda:1`` holds a model whose weights exceed one GPU's memory but not the GPUs' together
(70B in bfloat16, 141 GB, on two 80 GB GPUs): :func:`spread` splits the decoder layers into one contiguous run per
device, balanced by bytes, the first device also holding everything outside the layers (embeddings, final norm,
head).  That first device is the *primary*: the hidden states between layers, the layer inputs a stage keeps, the
logits and every objective live there, as on one device.  A layer placed on another device gets its inputs moved
there by a forward pre-hook and returns its outputs to the primary by a forward hook (per batch, one copy of its
hidden states each way; a layer on the primary moves nothing), so every stage runs unchanged: the layer walker's
passes, GPTQ and learned rounding (each layer's Hessians, GPTQ and learning on its own device), the model's own
forward for evaluation, generation (the KV cache of a layer stays on its device) and the probes' tails.

Layers compute one after another, as on one device: several GPUs add memory, not speed.  A streamed model
(tasa.models.streaming) reads each layer onto its device the same way, one layer resident at a time.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn as nn

_SKIP_KEYS = ["past_key_values", "past_key_value"]  # the KV cache object stays as it is (its layers' own devices)


def spread(sizes: Sequence[int], parts: int, first_extra: int = 0) -> list[int]:
    """The run (0 .. parts-1) of each layer when layers of ``sizes`` bytes, in order, are cut into
    ``min(parts, len(sizes))`` non-empty contiguous runs with the largest run's bytes as small as possible, the first
    run also carrying ``first_extra`` bytes (what lives outside the layers on the primary device).  Exact (dynamic
    programming over the cut points); among equally good cuts, the earliest."""
    n = len(sizes)
    if parts < 1:
        raise ValueError(f"parts must be at least 1, got {parts}")
    k_max = min(parts, n)
    if n == 0:
        return []
    prefix = [0]
    for s in sizes:
        prefix.append(prefix[-1] + int(s))
    inf = float("inf")
    # best[k][i]: the smallest largest-run bytes of layers[:i] cut into k runs; cut[k][i]: where the last run starts
    best = [[inf] * (n + 1) for _ in range(k_max + 1)]
    cut = [[0] * (n + 1) for _ in range(k_max + 1)]
    for i in range(1, n + 1):
        best[1][i] = prefix[i] + first_extra
    for k in range(2, k_max + 1):
        for i in range(k, n + 1):
            for j in range(k - 1, i):
                value = max(best[k - 1][j], prefix[i] - prefix[j])
                if value < best[k][i]:
                    best[k][i], cut[k][i] = value, j
    runs, i = [0] * n, n
    for k in range(k_max, 1, -1):
        j = cut[k][i]
        for layer in range(j, i):
            runs[layer] = k - 1
        i = j
    return runs


@dataclass(frozen=True)
class Placement:
    """Where a model computes on several devices: ``primary`` (everything outside the decoder layers, and the
    hidden states between them) and ``layers[i]``, the device of decoder layer ``i``."""

    primary: torch.device
    layers: tuple[torch.device, ...]

    @property
    def devices(self) -> list[torch.device]:
        return list(dict.fromkeys((self.primary, *self.layers)))


def plan_placement(layer_bytes: Sequence[int], outside_bytes: int, devices: Sequence[str]) -> Placement:
    """The :class:`Placement` of layers of ``layer_bytes`` over ``devices`` (the first is the primary, which also
    holds ``outside_bytes``): :func:`spread`."""
    targets = [torch.device(d) for d in devices]
    runs = spread(layer_bytes, len(targets), outside_bytes)
    return Placement(targets[0], tuple(targets[r] for r in runs))


def _tensor_bytes(tensors) -> int:
    seen, total = set(), 0
    for t in tensors:
        if id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total


def model_placement(model: nn.Module, layers: nn.ModuleList, devices: Sequence[str]) -> Placement:
    """:func:`plan_placement` of ``model``'s decoder ``layers`` by their parameters' bytes (on
    the meta device too: a streamed model's skeleton)."""
    inside = {id(p) for p in layers.parameters()}
    outside = [p for p in model.parameters() if id(p) not in inside]
    return plan_placement([_tensor_bytes(layer.parameters()) for layer in layers], _tensor_bytes(outside), devices)


def send_to_device(obj, device: torch.device, skip_keys: list[str]):
    """accelerate's recursive move of the tensors in ``obj`` (imported on first use: not at tasa's start-up, which
    reads :func:`placement_of`)."""
    from accelerate.utils import send_to_device as move

    return move(obj, device, skip_keys=skip_keys)


def _inputs_to(device: torch.device):
    def hook(_module, args, kwargs):
        return (send_to_device(args, device, skip_keys=_SKIP_KEYS),
                send_to_device(kwargs, device, skip_keys=_SKIP_KEYS))
    return hook


def _outputs_to(device: torch.device):
    def hook(_module, _args, output):
        return send_to_device(output, device, skip_keys=_SKIP_KEYS)
    return hook


def install(model: nn.Module, layers: nn.ModuleList, placement: Placement) -> None:
    """Record ``placement`` on ``model`` (``model.tasa_placement``) and give each decoder layer placed off the
    primary the hooks that move its inputs to its device and its outputs back (see the module docstring).  Moves no
    weight: an in-memory model's are moved by :func:`place`, a streamed model's read onto the layer's device."""
    if len(placement.layers) != len(layers):
        raise ValueError(f"placement of {len(placement.layers)} layers for a model of {len(layers)}")
    for layer, device in zip(layers, placement.layers):
        if device != placement.primary:
            layer.register_forward_pre_hook(_inputs_to(device), with_kwargs=True)
            layer.register_forward_hook(_outputs_to(placement.primary))
    model.tasa_placement = placement


def place(model: nn.Module, arch, devices: Sequence[str]) -> Placement:
    """Spread an in-memory model of :class:`tasa.models.arch.ModelArch` ``arch`` over ``devices``
    (:func:`model_placement`): every decoder layer moved to its device, everything else to the primary, and the
    hooks of :func:`install`."""
    from tasa.models.walker import move_outside_layers

    placement = model_placement(model, arch.layers, devices)
    move_outside_layers(model, arch, placement.primary)
    for layer, device in zip(arch.layers, placement.layers):
        layer.to(device)
    install(model, arch.layers, placement)
    return placement


def placement_of(model: nn.Module) -> Placement | None:
    """The model's :class:`Placement` over several devices, or None (one device)."""
    return getattr(model, "tasa_placement", None)
