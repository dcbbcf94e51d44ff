"""Model adapters for the mixture criteria: per-input Hessians and per-layer gradient sketches.

Hessians are collected the way GPTQ collects them, one decoder layer at a time on the layer
walker (tasa.models.walker): the hidden states of every token set enter layer 0, each layer
runs once per batch with a tap on the first linear of every input group (linears fed the
same tensor, e.g. q/k/v) accumulating ``H = 2/n X^T X``, and its outputs become the next
layer's inputs.
Only one layer's Hessians are alive at a time: ``on_layer`` turns them into what the
criterion keeps (a few vectors per input) before the next layer starts.

Gradients are those of the mean next-token loss of a token set with respect to the
linear weights of each decoder layer.  No second copy of the weights is held: as soon
as a weight's gradient of a batch exists it is folded into its layer's count sketch
(see :func:`count_sketch`) and dropped.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from tasa.errors import TasaError
from tasa.models import compute_device, streamer_of
from tasa.models.arch import ModelArch
from tasa.models.walker import capture_ids, input_groups, layer_major_backward, move_outside_layers, walk
from tasa.quant.apply import layer_hessians

_P = 2**31 - 1  # Mersenne prime for the sketch hashes


def count_sketch(flat: torch.Tensor, k: int, offset: int, seed: int, total: int) -> torch.Tensor:
    """The count sketch (k buckets) of a slice of a longer vector of length ``total``.

    ``flat`` holds entries ``offset .. offset + len - 1`` of the vector; sketching the
    slices of one vector and summing gives the sketch of the whole vector.  Each entry i
    goes to bucket h(i) with sign s(i) (seeded multiply-add hashes), so
    ``<sketch(x), sketch(y)>`` estimates ``<x, y>`` without bias.  When the whole vector
    fits (``total <= k``) the sketch is the vector itself, zero-padded: exact.
    """
    flat = flat.reshape(-1).double()
    if total <= k:
        out = torch.zeros(k, dtype=torch.float64, device=flat.device)
        out[offset:offset + flat.numel()] = flat
        return out
    g = torch.Generator().manual_seed(seed)
    a, b, c, d = (int(x) for x in torch.randint(1, _P, (4,), generator=g))
    idx = torch.arange(offset, offset + flat.numel(), dtype=torch.int64, device=flat.device)
    bucket = ((a * idx + b) % _P) % k
    sign = 1.0 - 2.0 * (((c * idx + d) % _P) & 1).double()
    return torch.zeros(k, dtype=torch.float64, device=flat.device).index_add_(0, bucket, flat * sign)


def collect_hessians(model: nn.Module, arch: ModelArch, token_sets: dict[str, torch.Tensor], batch_size: int,
                     on_layer: Callable[[int, dict[str, dict[str, torch.Tensor]], dict[str, int]], None],
                     device: torch.device | str = "cpu", progress: bool = True) -> None:
    """Call ``on_layer(layer, {set: {input: H}}, {input: numel of the linears reading it})`` for each layer.

    Inputs are named by the first linear module reading them (e.g. ``model.layers.3.self_attn.q_proj``).
    The model is not modified.
    """
    device = torch.device(device)
    with torch.no_grad():
        move_outside_layers(model, arch, device)
        inputs = {name: capture_ids(model, arch, ids, batch_size, device) for name, ids in token_sets.items()}
        first_set = next(iter(inputs.values()))
        for index, layer in walk(arch, device, "Hessians", progress):
            mods = {m.local: m for m in arch.layer_modules(index)}
            groups = input_groups(layer, list(mods), first_set)
            numel = {mods[g[0]].name: sum(mods[x].numel for x in g) for g in groups}
            hessians = {}
            for set_name, set_inputs in inputs.items():  # one pass per set: Hessians, and the next layer's inputs
                h = layer_hessians(layer, set_inputs, [g[0] for g in groups], advance=True)
                hessians[set_name] = {mods[local].name: v for local, v in h.items()}
            on_layer(index, hessians, numel)


def _check_token_set(name: str, ids: torch.Tensor) -> int:
    """The number of predicted tokens of token set ``name`` ((sequences, tokens >= 2) ids), or an error."""
    if ids.ndim != 2 or ids.shape[1] < 2:
        raise TasaError(f"token set {name!r} needs shape (sequences, tokens >= 2)")
    return ids.shape[0] * (ids.shape[1] - 1)


def _next_token_loss(logits: torch.Tensor, ids: torch.Tensor, n_tokens: int) -> torch.Tensor:
    """The batch's share of the set's mean next-token loss (float32 logits at least)."""
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1),
                           reduction="sum") / n_tokens


def _sketch_offsets(arch: ModelArch) -> dict[int, dict[str, tuple[int, int]]]:
    """Layer -> {local name: (offset, layer total)}: where each linear's weights sit in its layer's flattened
    gradient, in the layer's module order (the sketch hashes positions in it)."""
    offsets: dict[int, dict[str, tuple[int, int]]] = {}
    for i in range(arch.num_layers):
        total, off, offsets[i] = sum(m.numel for m in arch.layer_modules(i)), 0, {}
        for m in arch.layer_modules(i):
            offsets[i][m.local] = (off, total)
            off += m.numel
    return offsets


def gradient_sketches(model: nn.Module, arch: ModelArch, token_sets: dict[str, torch.Tensor], batch_size: int,
                      k: int, seed: int = 0, progress: bool = True) -> dict[str, torch.Tensor]:
    """Per token set, a (layers, k) count sketch of the mean-loss gradient of each layer's linear weights."""
    if streamer_of(model) is not None:
        return _streamed_gradient_sketches(model, arch, token_sets, batch_size, k, seed, progress)
    offsets = {id(arch.layers[i].get_submodule(local).weight): (i, *where)  # id(param) -> (layer, offset, total)
               for i, per_layer in _sketch_offsets(arch).items() for local, where in per_layer.items()}
    wanted = set(offsets)
    saved = {n: p.requires_grad for n, p in model.named_parameters()}
    out: dict[str, torch.Tensor] = {}
    current: dict[str, torch.Tensor] = {}

    def fold(p: torch.Tensor) -> None:
        i, off, total = offsets[id(p)]
        current["s"][i] += count_sketch(p.grad, k, off, seed * 1_000_003 + i, total).cpu()  # (p on a GPU)
        p.grad = None

    handles = []
    try:
        for p in model.parameters():
            p.requires_grad_(id(p) in wanted)
            if id(p) in wanted:
                handles.append(p.register_post_accumulate_grad_hook(fold))
        for name, ids in token_sets.items():
            n_tokens = _check_token_set(name, ids)
            current["s"] = torch.zeros(arch.num_layers, k, dtype=torch.float64)
            dev = compute_device(model)
            for start in tqdm(range(0, ids.shape[0], batch_size), desc=f"gradients {name}", disable=not progress):
                batch = ids[start:start + batch_size].to(dev)
                loss = _next_token_loss(model(input_ids=batch, use_cache=False).logits, batch, n_tokens)
                loss.backward()
                del loss
            out[name] = current["s"]
    finally:
        for h in handles:
            h.remove()
        for n, p in model.named_parameters():
            p.requires_grad_(saved[n])
            p.grad = None
    return out


def _streamed_gradient_sketches(model: nn.Module, arch: ModelArch, token_sets: dict[str, torch.Tensor],
                                batch_size: int, k: int, seed: int, progress: bool) -> dict[str, torch.Tensor]:
    """:func:`gradient_sketches` of a model streamed from disk: the backward runs one decoder layer at a time
    (tasa.models.walker.layer_major_backward); each layer's weight gradients of each batch are folded into its
    sketch as they come, in the whole-model order of the weights."""
    offsets = _sketch_offsets(arch)
    out: dict[str, torch.Tensor] = {}
    for name, ids in token_sets.items():
        n_tokens = _check_token_set(name, ids)
        sketch = torch.zeros(arch.num_layers, k, dtype=torch.float64)
        batches = [{"input_ids": ids[s:s + batch_size]} for s in range(0, ids.shape[0], batch_size)]

        def fold(i: int, _b: int, grads: dict[str, torch.Tensor]) -> None:
            for local, g in grads.items():
                off, total = offsets[i][local]
                sketch[i] += count_sketch(g.cpu(), k, off, seed * 1_000_003 + i, total)

        layer_major_backward(model, batches, lambda b, logits: _next_token_loss(
            logits, batches[b]["input_ids"].to(logits.device), n_tokens), fold, progress=progress,
            desc=f"gradients {name}")
        out[name] = sketch
    return out
