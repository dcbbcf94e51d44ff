"""Walk a model's decoder layers one at a time over cached layer inputs: the one layer loop of tasa.

GPTQ/RTN quantization (quant.apply), the mixture criteria's Hessians (mixture.collect), the probes'
calibration and kept objective states (profile.probe) all run this loop::

    inputs = capture(model, arch, batches)        # per batch: what enters layer 0, and what the model
                                                  # passes every layer (masks, rotary embeddings ...)
    for index, layer in walk(arch, device):       # layer fetched onto the device, released after
        run_layer(layer, inputs, taps={...})      # a stage's hooks: Hessians, probes ...
        ... quantize the layer's linears in place ...
        run_layer(layer, inputs, advance=True)    # inputs now enter layer index + 1

Only one layer's inputs are held (per batch: (batch, seq, hidden)).  The keyword arguments of every
layer are recorded once, at capture, by running the model's own forward with each decoder layer
replaced by a recorder that stores what it is called with (no layer computes): models that give
layers different masks or rotary tables (sliding-window layers of Gemma-2/3, Qwen) get each layer's
own, and no per-architecture code is needed.  :func:`walk` is the single place that decides where a
layer lives while it is used (the large-model path streams layers through it).
"""
from __future__ import annotations

import hashlib
import shutil
import tempfile
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Callable, ContextManager, Iterator

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from tasa.cancel import cancel_point
from tasa.errors import TasaError
from tasa.models.arch import ModelArch
from tasa.numerics import all_finite
from tasa.plan import expert_container

_CACHE_KEYS = ("past_key_values", "past_key_value", "use_cache")


class StopForward(Exception):
    """Raised from a hook to end a forward pass once what is wanted is captured."""


class LayerInputs:
    """What enters decoder layer ``index``, per batch: the hidden states (batch, seq, hidden) and, for every
    layer, the keyword arguments the model passes it."""

    def __init__(self, hidden: list[torch.Tensor], kwargs: list[list[dict]]):
        self.hidden = hidden
        self.kwargs = kwargs  # [batch][layer] -> kwargs
        self.index = 0

    def __len__(self) -> int:
        return len(self.hidden)

    def call(self, b: int) -> tuple[torch.Tensor, dict]:
        """(hidden, kwargs) of batch ``b`` for the current layer."""
        return self.hidden[b], self.kwargs[b][self.index]


class KeptStates:
    """The hidden states entering the current layer, one per (objective, batch): held in memory, or,
    when ``spill_dir`` is given, written to safetensors files there and read back on use (for
    profiles whose kept states would not fit the RAM budget)."""

    def __init__(self, spill_dir: Path | None = None):
        self.dir = spill_dir
        self.mem: dict[tuple[str, int], torch.Tensor] = {}
        self.device: dict[tuple[str, int], torch.device] = {}
        if self.dir is not None:
            self.dir.mkdir(parents=True, exist_ok=True)

    def _path(self, key: tuple[str, int]) -> Path:
        return self.dir / f"{hashlib.sha1(key[0].encode()).hexdigest()[:12]}-{key[1]}.safetensors"

    def put(self, key: tuple[str, int], t: torch.Tensor) -> None:
        if self.dir is None:
            self.mem[key] = t
            return
        from safetensors.torch import save_file

        self.device[key] = t.device
        save_file({"h": t.detach().contiguous().cpu()}, str(self._path(key)))

    def get(self, key: tuple[str, int]) -> torch.Tensor:
        if self.dir is None:
            return self.mem[key]
        from safetensors.torch import load_file

        return load_file(str(self._path(key)))["h"].to(self.device[key])

    def close(self) -> None:
        self.mem.clear()
        if self.dir is not None:
            shutil.rmtree(self.dir, ignore_errors=True)


def layer_output(out) -> torch.Tensor:
    """The hidden states of a decoder layer's output (layers return a tuple in some transformers versions)."""
    return out[0] if isinstance(out, (tuple, list)) else out


@contextmanager
def layers_from(model: nn.Module, arch: ModelArch, start: int, stop: int | None = None,
                replace: list[nn.Module] | None = None):
    """Temporarily make the model's decoder-layer list ``layers[start:stop]`` (same modules, no copies), or
    ``replace``."""
    parent_path, _, attr = arch.spec.layers_path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    original = getattr(parent, attr)
    setattr(parent, attr, nn.ModuleList(replace if replace is not None else list(original)[start:stop]))
    try:
        yield
    finally:
        setattr(parent, attr, original)


class _StandIn(nn.Module):
    """Stands in for a decoder layer in the model's own forward; attribute reads the model's forward makes on its
    layers (e.g. ``attention_type``) go to the real layer."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        object.__setattr__(self, "_layer", layer)  # not a submodule: never moved, never in state_dict

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(object.__getattribute__(self, "_layer"), name)


class _Recorder(_StandIn):
    """Stands in for decoder layer ``index`` during capture: records its call, computes nothing."""

    def __init__(self, layer: nn.Module, index: int, sink: dict, last: bool):
        super().__init__(layer)
        self.index, self.sink, self.last = index, sink, last

    def forward(self, *args, **kwargs):
        hidden = args[0] if args else kwargs.pop("hidden_states")
        if len(args) > 1:
            raise TasaError(f"decoder layer {self.index} is called with {len(args)} positional arguments; "
                            "only the hidden states are supported positionally")
        if self.index == 0:
            self.sink["hidden"] = hidden
        self.sink["kwargs"].append({k: v for k, v in kwargs.items() if k not in _CACHE_KEYS})
        if self.last:
            raise StopForward
        return hidden


def capture(model: nn.Module, arch: ModelArch, batches: list[dict]) -> LayerInputs:
    """What enters decoder layer 0 for each of ``batches`` (the model's forward kwargs, e.g. ``input_ids``
    and ``attention_mask``, already on the model's device), with every layer's keyword arguments."""
    hidden, kwargs = [], []
    for inputs in batches:
        sink: dict = {"kwargs": []}
        n = arch.num_layers
        recorders = [_Recorder(arch.layers[i], i, sink, i == n - 1) for i in range(n)]
        with layers_from(model, arch, 0, replace=recorders), torch.no_grad():
            try:
                model(**inputs, use_cache=False)
            except StopForward:
                pass
        if len(sink["kwargs"]) != n:
            raise TasaError(f"the model's forward pass called {len(sink['kwargs'])} of its {n} decoder layers; "
                            "unsupported model layout")
        hidden.append(sink["hidden"])
        kwargs.append(sink["kwargs"])
    return LayerInputs(hidden, kwargs)


def capture_ids(model: nn.Module, arch: ModelArch, input_ids: torch.Tensor, batch_size: int,
                device: torch.device) -> LayerInputs:
    """:func:`capture` of (n, seq) token ids, ``batch_size`` sequences at a time."""
    return capture(model, arch, [{"input_ids": input_ids[s:s + batch_size].to(device)}
                                 for s in range(0, input_ids.shape[0], batch_size)])


def move_outside_layers(model: nn.Module, arch: ModelArch, device: torch.device) -> None:
    """Move every parameter and buffer not inside a decoder layer to ``device`` (a streamed model's units are
    fetched there from now on)."""
    if arch.streamer is not None:
        arch.streamer.device = torch.device(device)
    prefix = arch.spec.layers_path
    for name, mod in model.named_modules():
        if name == prefix or name.startswith(prefix + "."):
            continue
        for key, p in mod._parameters.items():
            if p is not None and p.device != device and p.device.type != "meta":
                p.data = p.data.to(device)
        for key, b in mod._buffers.items():
            if b is not None and b.device != device and b.device.type != "meta":
                mod._buffers[key] = b.to(device)


@contextmanager
def resident(arch: ModelArch, index: int, device: torch.device) -> Iterator[nn.Module]:
    """Decoder layer ``index`` on ``device`` for the duration of the block, then back where it lives: moved
    there and back in memory, or, for a streamed model, read from disk and dropped after (with any change made
    to it).  A model spread over several devices (tasa.models.placement): the layer's own device instead."""
    device = arch.layer_device(index, device)
    if arch.streamer is not None:
        layer = arch.streamer.fetch(index, device)
        try:
            yield layer
        finally:
            arch.streamer.release(index)
        return
    layer = arch.layers[index]
    home = next(layer.parameters()).device
    layer.to(device)
    try:
        yield layer
    finally:
        layer.to(home)


def layer_device(layer: nn.Module) -> torch.device:
    """Where a resident decoder layer computes: its weights' device (on a model spread over several devices, not
    necessarily where its inputs are held: tasa.models.placement moves them in and its outputs back)."""
    return next(layer.parameters()).device


def walk(arch: ModelArch, device: torch.device, desc: str = "layers", progress: bool = False,
         ) -> Iterator[tuple[int, nn.Module]]:
    """Each decoder layer in order, :func:`resident` on ``device`` while the caller uses it."""
    for index in tqdm(range(arch.num_layers), desc=desc, disable=not progress):
        with resident(arch, index, device) as layer:
            yield index, layer


def forward_layer(layer: nn.Module, hidden: torch.Tensor, kwargs: dict, index: int) -> torch.Tensor:
    """The layer's output hidden states; NaN/Inf activations are an error."""
    out = layer_output(layer(hidden, **kwargs))
    if not all_finite(out):
        raise TasaError(f"decoder layer {index} produced NaN/Inf activations")
    return out


def run_layer(layer: nn.Module, inputs: LayerInputs, taps: dict[str, Callable[[torch.Tensor], None]] | None = None,
              stop_after: str | None = None, advance: bool = False) -> None:
    """Run ``layer`` on every batch of ``inputs``; ``taps[local name]`` sees the input of that linear.

    ``stop_after``: end each batch's pass right after that module's tap (nothing after it is computed);
    ``advance``: the layer's outputs replace the inputs, which then enter the next layer."""
    if advance and stop_after is not None:
        raise ValueError("a pass that stops early has no output to advance with")
    handles = []
    for local, fn in (taps or {}).items():
        def hook(_m, args, fn=fn, stop=local == stop_after):
            fn(args[0])
            if stop:
                raise StopForward
        handles.append(layer.get_submodule(local).register_forward_pre_hook(hook))
    try:
        for b in range(len(inputs)):
            cancel_point()
            hidden, kwargs = inputs.call(b)
            if stop_after is not None:
                try:
                    layer(hidden, **kwargs)
                except StopForward:
                    pass
            else:
                out = forward_layer(layer, hidden, kwargs, inputs.index)
                if advance:
                    inputs.hidden[b] = out
    finally:
        for h in handles:
            h.remove()
    if advance:
        inputs.index += 1


def input_groups(layer: nn.Module, locals_: list[str], inputs: LayerInputs) -> list[list[str]]:
    """Group linears by identical input tensor, ordered by first call, by running the first batch."""
    # Inputs are kept referenced until grouping is done: a freed tensor's memory
    # could otherwise be reused by a later, different input at the same address.
    calls: list[tuple[str, torch.Tensor]] = []
    handles = []
    for local in locals_:
        def hook(_m, args, local=local):
            calls.append((local, args[0]))
        handles.append(layer.get_submodule(local).register_forward_pre_hook(hook))
    try:
        hidden, kwargs = inputs.call(0)
        layer(hidden, **kwargs)
    finally:
        for h in handles:
            h.remove()
    missing = set(locals_) - {c[0] for c in calls}
    not_experts = sorted(m for m in missing if expert_container(m) is None)
    if not_experts:
        raise TasaError(f"linear modules {not_experts} were never called in the layer's forward pass")
    groups: dict[tuple, list[str]] = {}
    for local, x in calls:
        members = groups.setdefault((x.data_ptr(), tuple(x.shape), x.stride()), [])
        if local not in members:
            members.append(local)
    for local in locals_:  # routed experts the first batch sent no token to: grouped as their siblings are
        if local in missing:
            container, expert, role = local.rsplit(".", 2)
            groups.setdefault((container, expert, role == "down_proj"), []).append(local)
    return list(groups.values())


def parallel_steps(groups: list[list[str]]) -> list[list[list[str]]]:
    """Input groups (:func:`input_groups`) in sequential steps: the same input group of every routed expert of
    a layer (all experts' gate/up, then all experts' down) is one step, since no expert's input depends on
    another's weights, so their Hessians are gathered in one pass; any other group is a step of its own."""
    steps: dict[tuple, list[list[str]]] = {}
    for i, group in enumerate(groups):
        container = expert_container(group[0])
        key = (container, group[0].rsplit(".", 1)[1] == "down_proj") if container is not None else (i,)
        steps.setdefault(key, []).append(group)
    return list(steps.values())


def _replace_input(hidden: torch.Tensor):
    def hook(_m, args, kwargs):
        if args:
            return (hidden, *args[1:]), kwargs
        kwargs["hidden_states"] = hidden
        return args, kwargs
    return hook


def slice_output(model: nn.Module, arch: ModelArch, inputs: dict, start: int, stop: int,
                 hidden: torch.Tensor) -> torch.Tensor:
    """What leaves decoder layer ``stop - 1`` when layers ``start..stop-1`` run from ``hidden`` (what enters
    layer ``start``) in the model's own forward over ``inputs`` (its masks and rotary tables): one stage of a
    pipeline over the layers, in the same operations as :func:`tail_from`'s pass through them."""
    out = {}

    def grab(_m, _a, output):
        out["hidden"] = layer_output(output)
        raise StopForward

    before = arch.layers[start].register_forward_pre_hook(_replace_input(hidden), with_kwargs=True)
    after = arch.layers[stop - 1].register_forward_hook(grab)
    try:
        with layers_from(model, arch, start, stop), torch.no_grad():
            try:
                model(**inputs, use_cache=False)
            except StopForward:
                pass
    finally:
        before.remove()
        after.remove()
    return out["hidden"]


@contextmanager
def tail_from(model: nn.Module, arch: ModelArch, start: int, hidden: torch.Tensor):
    """Within the block, the model's own forward runs only layers ``start..L-1``, from ``hidden`` (what
    enters layer ``start``) instead of its embeddings' output, then its final norm and head: a forward
    pass of the model's tail with the model's own masks, rotary tables and logit processing."""
    handle = arch.layers[start].register_forward_pre_hook(_replace_input(hidden), with_kwargs=True)
    try:
        with layers_from(model, arch, start):
            yield
    finally:
        handle.remove()


class _Emit(_StandIn):
    """Stands in for all the decoder layers when only the model's final norm and head are wanted: whatever it is
    given, it returns ``hidden`` (what leaves the last layer)."""

    def __init__(self, layer: nn.Module, hidden: torch.Tensor):
        super().__init__(layer)
        object.__setattr__(self, "_hidden", hidden)

    def forward(self, *args, **kwargs):
        return object.__getattribute__(self, "_hidden")


def head_logits(model: nn.Module, arch: ModelArch, hidden: torch.Tensor, inputs: dict,
                grad: bool = False) -> torch.Tensor:
    """The model's logits when ``hidden`` leaves its last decoder layer on ``inputs`` (their attention mask):
    the model's own forward with its layers replaced by :class:`_Emit` (its final norm, head and any logit
    processing; embeddings not read).  ``grad``: differentiable in ``hidden``."""
    kwargs = {k: v for k, v in inputs.items() if k != "input_ids"}
    with layers_from(model, arch, 0, replace=[_Emit(arch.layers[-1], hidden)]), \
            (nullcontext() if grad else torch.no_grad()):
        return model(inputs_embeds=torch.zeros_like(hidden), use_cache=False, **kwargs).logits


LAYER_MAJOR_BYTES = 4 * 2 ** 30  # hidden states a layer-major pass holds at once (more batches: several passes)


def token_state_bytes(model: nn.Module) -> tuple[int, int]:
    """(KV-cache bytes one token keeps over all decoder layers, working bytes one token needs inside one layer's
    forward) of ``model``, estimated from its text config: keys and values of ``num_key_value_heads`` (else every
    head) of ``head_dim`` (else hidden / heads) per layer; the residual stream, attention output and MLP
    intermediates of one layer.  An upper bound for models that cache less (sliding windows, latent attention)."""
    from tasa.models.streaming import compute_dtype

    cfg = model.config.get_text_config()
    heads = cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    itemsize = compute_dtype(model).itemsize
    inner = getattr(cfg, "intermediate_size", None) or 4 * cfg.hidden_size
    return (2 * cfg.num_hidden_layers * kv_heads * head_dim * itemsize,
            (4 * cfg.hidden_size + 3 * inner) * itemsize)


def forward_logits(model: nn.Module, batches: list[dict], progress: bool = False, desc: str = "layers",
                   max_bytes: int = LAYER_MAJOR_BYTES) -> Iterator[tuple[int, torch.Tensor]]:
    """(index, logits) of each of ``batches`` (the model's forward kwargs: ``input_ids``, ``attention_mask``), in
    order.  A model in memory runs its forward batch by batch.  A streamed model runs *layer-major*: every batch
    through decoder layer 0, then every batch through layer 1 ..., so each layer is read once per pass instead of
    once per batch (batch by batch, a 70B model would be read from disk for every batch); the batches' hidden
    states are held meanwhile, up to ``max_bytes`` (more: several passes).  The same computation, in another
    order: equal to the batch-by-batch logits up to float rounding."""
    from tasa.models.arch import resolve
    from tasa.models.streaming import compute_device, compute_dtype, streamer_of

    device = compute_device(model)
    on_device = [{k: v.to(device) if torch.is_tensor(v) else v for k, v in b.items()} for b in batches]
    streamer = streamer_of(model)
    if streamer is None:
        for i, b in enumerate(on_device):
            with torch.no_grad():  # (no grad mode held across the yields: the caller's code runs between them)
                logits = model(**b, use_cache=False).logits
            yield i, logits
        return
    arch = resolve(model)
    width = model.config.get_text_config().hidden_size * compute_dtype(model).itemsize
    start = 0
    while start < len(on_device):
        stop, held_bytes = start, 0
        while stop < len(on_device) and (stop == start or held_bytes + on_device[stop]["input_ids"].numel() * width
                                          <= max_bytes):
            held_bytes += on_device[stop]["input_ids"].numel() * width
            stop += 1
        chunk = on_device[start:stop]
        with streamer.outside_held():  # embeddings, norm and head read once for the chunk
            with torch.no_grad():
                inputs = capture(model, arch, chunk)
                for _index, layer in walk(arch, device, desc=desc, progress=progress):
                    run_layer(layer, inputs, advance=True)
            for b, batch in enumerate(chunk):
                hidden, inputs.hidden[b] = inputs.hidden[b], None
                yield start + b, head_logits(model, arch, hidden, batch)
        start = stop


def layer_major_backward(model: nn.Module, batches: list[dict], loss_of: Callable[[int, torch.Tensor], torch.Tensor],
                         on_grads: Callable[[int, int, dict[str, torch.Tensor]], None],
                         on_layer: Callable[[int, nn.Module], None] | None = None, progress: bool = False,
                         desc: str = "gradients", max_bytes: int = LAYER_MAJOR_BYTES,
                         layer_context: Callable[[int, nn.Module], ContextManager] | None = None) -> None:
    """Backpropagate ``loss_of(b, logits)`` of each of ``batches`` (the model's forward kwargs) one decoder layer at
    a time, for a model streamed from disk (never whole in memory): every batch through layer 0, 1 ... with each
    layer's inputs kept (spilled to a temporary directory past ``max_bytes``), the loss's gradient at the last
    hidden states through the model's own final norm and head, then from the last layer down, each layer read once
    more and run again on its kept inputs to carry the gradient to its inputs.  ``on_grads(layer, b, {local name:
    gradient})`` gets the gradient of batch ``b``'s loss with respect to the weight of each of the layer's linears
    (tasa.models.arch's modules), as a whole-model backward would give it (up to float rounding); then
    ``on_layer(layer, module)``, the layer still resident.  ``layer_context(layer, module)``: entered each time a
    layer is resident, in both passes, around everything done with it (e.g. its linears quantized in place and
    restored on exit: the gradient is then the one at the changed weights)."""
    from tasa.models.arch import resolve
    from tasa.models.streaming import compute_device, compute_dtype, streamer_of

    arch, device, streamer = resolve(model), compute_device(model), streamer_of(model)
    context = layer_context or (lambda _index, _layer: nullcontext())
    on_device = [{k: v.to(device) if torch.is_tensor(v) else v for k, v in b.items()} for b in batches]
    width = model.config.get_text_config().hidden_size * compute_dtype(model).itemsize
    kept_bytes = sum(b["input_ids"].numel() for b in on_device) * width * arch.num_layers
    kept = KeptStates(Path(tempfile.mkdtemp(prefix="tasa-states-")) if kept_bytes > max_bytes else None)
    try:
        with streamer.outside_held() if streamer is not None else nullcontext():
            with torch.no_grad():
                inputs = capture(model, arch, on_device)
                for index, layer in walk(arch, device, desc=f"{desc}: forward", progress=progress):
                    for b in range(len(inputs)):
                        kept.put((str(index), b), inputs.hidden[b])
                    with context(index, layer):
                        run_layer(layer, inputs, advance=True)
            grads = []
            for b, batch in enumerate(on_device):
                hidden = inputs.hidden[b].detach().requires_grad_()
                inputs.hidden[b] = None
                grads.append(torch.autograd.grad(loss_of(b, head_logits(model, arch, hidden, batch, grad=True)),
                                                 hidden)[0])
        for index in tqdm(reversed(range(arch.num_layers)), total=arch.num_layers, desc=f"{desc}: backward",
                          disable=not progress):
            with resident(arch, index, device) as layer, context(index, layer):
                weights = {m.local: layer.get_submodule(m.local).weight for m in arch.layer_modules(index)}
                before = {local: w.requires_grad for local, w in weights.items()}
                try:
                    for w in weights.values():
                        w.requires_grad_(True)
                    for b in range(len(on_device)):
                        x = kept.get((str(index), b)).detach().requires_grad_()
                        out = forward_layer(layer, x, inputs.kwargs[b][index], index)
                        got = torch.autograd.grad(out, [x, *weights.values()], grad_outputs=grads[b],
                                                  allow_unused=True)  # a routed expert no token of b reached
                        grads[b] = got[0]
                        on_grads(index, b, {local: torch.zeros_like(w) if g is None else g
                                            for (local, w), g in zip(weights.items(), got[1:])})
                    if on_layer is not None:
                        with torch.no_grad():
                            on_layer(index, layer)
                finally:
                    for local, w in weights.items():
                        w.requires_grad_(before[local])
    finally:
        kept.close()
