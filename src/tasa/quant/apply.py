"""Apply a :class:`~tasa.plan.Plan` to a model, one decoder layer at a time.

Loop (the GPTQ "sequential" scheme)::

    X_0 = inputs of decoder layer 0 for every calibration sequence
    for layer l:
        for each input group of l (linears fed the same tensor, e.g. q/k/v),
                in execution order:
            run l on X_l up to that group's input, accumulate H = 2/n X^T X
            quantize every planned linear of the group (GPTQ or RTN) in place
        X_{l+1} = l(X_l)            # with the quantized weights

Only one layer's inputs (and its Hessians) are held; quantized weights replace
the float ones in place, so no second copy of the model ever exists.  Later
groups of a layer see the already-quantized earlier groups
(``true_sequential``), as GPTQ and GPTQModel do.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from tasa.errors import TasaError
from tasa.models.arch import ModelArch
from tasa.plan import Plan
from tasa.quant.gptq import accumulate_hessian, gptq_quantize, make_empty_hessian
from tasa.quant.rtn import QuantResult, rtn_quantize

log = logging.getLogger(__name__)


class _StopForward(Exception):
    """Raised from a hook to end a forward pass once the wanted inputs are captured."""


@dataclass
class ModuleStats:
    bits: int
    group_size: int
    seconds: float
    rel_error: float | None  # tr(E H E^T) / tr(W H W^T) for GPTQ; None for RTN


@dataclass
class QuantReport:
    modules: dict[str, ModuleStats] = field(default_factory=dict)
    seconds: float = 0.0


def layer_output(out):
    """The hidden states of a decoder layer's output (layers return a tuple in some transformers versions)."""
    return out[0] if isinstance(out, (tuple, list)) else out


def capture_layer0_inputs(model: nn.Module, arch: ModelArch, input_ids: torch.Tensor, batch_size: int,
                          device: torch.device) -> list[tuple[torch.Tensor, dict]]:
    """Hidden states and keyword arguments entering decoder layer 0, per batch."""
    captured: list[tuple[torch.Tensor, dict]] = []

    def grab(_module, args, kwargs):
        hidden = args[0] if args else kwargs.pop("hidden_states")
        kwargs = {k: v for k, v in kwargs.items() if k not in ("past_key_values", "past_key_value", "use_cache")}
        captured.append((hidden, kwargs))
        raise _StopForward

    handle = arch.layers[0].register_forward_pre_hook(grab, with_kwargs=True)
    try:
        for start in range(0, input_ids.shape[0], batch_size):
            batch = input_ids[start:start + batch_size].to(device)
            try:
                model(input_ids=batch, use_cache=False)
            except _StopForward:
                pass
    finally:
        handle.remove()
    if len(captured) != -(-input_ids.shape[0] // batch_size):
        raise TasaError("decoder layer 0 was not reached by the forward pass; unsupported model layout")
    return captured


def input_groups(layer: nn.Module, locals_: list[str], sample: tuple[torch.Tensor, dict]) -> list[list[str]]:
    """Group linears by identical input tensor, ordered by first call, by running one batch."""
    # Inputs are kept referenced until grouping is done: a freed tensor's memory
    # could otherwise be reused by a later, different input at the same address.
    calls: list[tuple[str, torch.Tensor]] = []
    handles = []
    for local in locals_:
        def hook(_m, args, local=local):
            calls.append((local, args[0]))
        handles.append(layer.get_submodule(local).register_forward_pre_hook(hook))
    try:
        layer(sample[0], **sample[1])
    finally:
        for h in handles:
            h.remove()
    missing = set(locals_) - {c[0] for c in calls}
    if missing:
        raise TasaError(f"linear modules {sorted(missing)} were never called in the layer's forward pass")
    groups: dict[tuple, list[str]] = {}
    for local, x in calls:
        members = groups.setdefault((x.data_ptr(), tuple(x.shape), x.stride()), [])
        if local not in members:
            members.append(local)
    return list(groups.values())


def collect_hessian(layer: nn.Module, first: str, batches: list[tuple[torch.Tensor, dict]]) -> torch.Tensor:
    """H = 2/n X^T X of the input of ``first``, running each batch only up to that module."""
    mod = layer.get_submodule(first)
    state = {"h": make_empty_hessian(mod.in_features, mod.weight.device), "n": 0}

    def hook(_m, args):
        state["n"] = accumulate_hessian(state["h"], state["n"], args[0])
        raise _StopForward

    handle = mod.register_forward_pre_hook(hook)
    try:
        for hidden, kwargs in batches:
            try:
                layer(hidden, **kwargs)
            except _StopForward:
                pass
    finally:
        handle.remove()
    return state["h"]


def _relative_error(w: torch.Tensor, q: torch.Tensor, h: torch.Tensor) -> float:
    e = (w.float() - q.float())
    num = torch.einsum("ij,jk,ik->", e, h, e)
    den = torch.einsum("ij,jk,ik->", w.float(), h, w.float())
    return float(num / den) if den > 0 else 0.0


def quantize_model(
    model: nn.Module,
    arch: ModelArch,
    plan: Plan,
    calib_ids: torch.Tensor | None = None,
    batch_size: int = 8,
    device: str | torch.device | None = None,
    true_sequential: bool = True,
    on_result: Callable[[str, QuantResult], None] | None = None,
    progress: bool = True,
) -> QuantReport:
    """Quantize ``model`` in place according to ``plan``.

    calib_ids: (nsamples, seqlen) token ids; required for GPTQ, ignored for RTN.
    on_result: called with (module name, QuantResult) for every quantized module,
               e.g. to stream packed tensors to an exporter.
    """
    unknown = [n for n in plan.modules if n not in {m.name for m in arch.modules}]
    if unknown:
        raise TasaError(f"plan names modules the model does not have, e.g. {unknown[0]!r}")
    t0 = time.perf_counter()
    report = QuantReport()
    device = torch.device(device) if device is not None else next(model.parameters()).device
    with torch.no_grad():
        if plan.method == "rtn":
            _apply_rtn(arch, plan, report, on_result, progress)
        else:
            if calib_ids is None:
                raise TasaError("GPTQ needs calibration data")
            _apply_gptq(model, arch, plan, calib_ids, batch_size, device, true_sequential, report, on_result,
                        progress)
    report.seconds = time.perf_counter() - t0
    return report


def _store(module: nn.Linear, result: QuantResult) -> None:
    module.weight.data.copy_(result.weight.to(module.weight.dtype))


def _apply_rtn(arch, plan, report, on_result, progress):
    for m in tqdm(arch.modules, desc="RTN", disable=not progress):
        if m.name not in plan:
            continue
        spec = plan[m.name]
        t = time.perf_counter()
        linear = arch.layers[m.layer].get_submodule(m.local)
        result = rtn_quantize(linear.weight.data, spec.bits, spec.group_size, spec.sym)
        _store(linear, result)
        report.modules[m.name] = ModuleStats(spec.bits, spec.group_size, time.perf_counter() - t, None)
        if on_result:
            on_result(m.name, result)


def move_outside_layers(model: nn.Module, arch: ModelArch, device: torch.device) -> None:
    """Move every parameter and buffer not inside a decoder layer to ``device``."""
    prefix = arch.spec.layers_path
    for name, mod in model.named_modules():
        if name == prefix or name.startswith(prefix + "."):
            continue
        for key, p in mod._parameters.items():
            if p is not None and p.device != device:
                p.data = p.data.to(device)
        for key, b in mod._buffers.items():
            if b is not None and b.device != device:
                mod._buffers[key] = b.to(device)


def _apply_gptq(model, arch, plan, calib_ids, batch_size, device, true_sequential, report, on_result, progress):
    move_outside_layers(model, arch, device)
    batches = capture_layer0_inputs(model, arch, calib_ids, batch_size, device)
    for index in tqdm(range(arch.num_layers), desc="GPTQ layers", disable=not progress):
        layer = arch.layers[index]
        home = next(layer.parameters()).device
        layer.to(device)
        planned = [m for m in arch.layer_modules(index) if m.name in plan]
        by_local = {m.local: m for m in planned}
        if planned:
            groups = input_groups(layer, [m.local for m in planned], batches[0])
            if not true_sequential:
                hessians = {g[0]: collect_hessian(layer, g[0], batches) for g in groups}
            for group in groups:
                h = hessians[group[0]] if not true_sequential else collect_hessian(layer, group[0], batches)
                for local in group:
                    m = by_local[local]
                    spec = plan[m.name]
                    linear = layer.get_submodule(local)
                    t = time.perf_counter()
                    result = gptq_quantize(linear.weight.data, h, spec, name=m.name)
                    err = _relative_error(linear.weight.data, result.weight, h)
                    _store(linear, result)
                    report.modules[m.name] = ModuleStats(spec.bits, spec.group_size, time.perf_counter() - t, err)
                    if on_result:
                        on_result(m.name, result)
                del h
        for b, (hidden, kwargs) in enumerate(batches):
            out = layer_output(layer(hidden, **kwargs))
            if not torch.isfinite(out).all():
                raise TasaError(f"decoder layer {index} produced NaN/Inf activations")
            batches[b] = (out, kwargs)
        layer.to(home)
