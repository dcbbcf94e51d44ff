"""Fast sensitivity estimators from gradients, the kind existing tools use for generic loss.

- ``fisher`` (HAWQ-V2 / Fisher style, second order): one backward pass per
  objective on the full-precision model gives the empirical Fisher diagonal
  F = sum over batches of g^2 (g: the batch-mean gradient of the objective's
  loss); the cost of unit u at b bits is 1/2 * sum_u F * (W - Q_b(W))^2.
- ``autoscheme`` (AutoRound AutoScheme, first order): for each candidate
  bit-width b, RTN-quantize *all* units at b, run one forward and backward, and
  score u by sum_u |g * (W - Q_b(W))| with g the gradient at the quantized
  weights.

The loss is the objective's own per-item loss (the probes' cost), averaged over
items, so estimated and measured sensitivities rank the same quantity.
"""
from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Callable, ContextManager

import torch
import torch.nn as nn

from tasa.errors import TasaError
from tasa.models import compute_device, compute_dtype, streamer_of
from tasa.models.arch import ModelArch
from tasa.models.walker import layer_major_backward
from tasa.profile.objectives import Objective, item_losses
from tasa.profile.probe import Unit, head_is_plain, quant_swapped
from tasa.profile.scores import forward_token_nll, logits_token_nll
from tasa.quant.rtn import rtn_quantize

ESTIMATORS = ("fisher", "autoscheme")


@contextmanager
def _grads_on(model: nn.Module, names: list[str]):
    """Gradients for the named linears' weights only; everything else frozen; restored afterwards."""
    before = {n: p.requires_grad for n, p in model.named_parameters()}
    wanted = {f"{n}.weight" for n in names}
    try:
        for n, p in model.named_parameters():
            p.requires_grad_(n in wanted)
            p.grad = None
        yield
    finally:
        for n, p in model.named_parameters():
            p.requires_grad_(before[n])
            p.grad = None


def _loss(objective: Objective, rows: slice, nll: torch.Tensor) -> torch.Tensor:
    """The batch ``rows``' share of the objective's mean item loss, from its per-token NLL."""
    losses = item_losses(objective.subset(rows), nll.cpu())
    if objective.kind == "nll":  # per-token mean over the whole objective, this batch's share
        return losses.nll.sum() / objective.score_mask.sum()
    return losses.nll.sum() / objective.n_items


def _backward(model: nn.Module, objective: Objective, batch_tokens: int, plain_head: bool, on_batch=None) -> None:
    """Backward of the objective's mean item loss, one batch at a time (``on_batch`` after each)."""
    dtype, device = compute_dtype(model), compute_device(model)
    for rows in objective.row_slices(batch_tokens):
        nll = forward_token_nll(model, objective.batch(rows, dtype, device), plain_head)
        _loss(objective, rows, nll).backward()
        if on_batch is not None:
            on_batch()


def _fisher_cost(fisher: torch.Tensor, w: torch.Tensor, bits: int, group_size: int, sym: bool) -> float:
    """1/2 sum F (W - Q_b(W))^2 of one linear."""
    return 0.5 * float((fisher * (w - rtn_quantize(w, bits, group_size, sym).weight) ** 2).sum())


def _streamed_costs(model: nn.Module, arch: ModelArch, objective: Objective, batch_tokens: int,
                    fold: Callable[[torch.Tensor], torch.Tensor],
                    cost_of: Callable[[str, nn.Linear, torch.Tensor], object],
                    layer_context: Callable[[int, nn.Module], ContextManager] | None = None,
                    desc: str = "gradients") -> dict[str, object]:
    """{module: cost_of(local name, linear, sum over batches of fold(weight gradient))} of a model streamed from
    disk: the objective's batches backpropagated one decoder layer at a time
    (tasa.models.walker.layer_major_backward, ``layer_context`` around each resident layer), each layer's folded
    gradients summed over the batches and turned into its modules' costs while the layer is resident."""
    dtype, device = compute_dtype(model), compute_device(model)
    slices = objective.row_slices(batch_tokens)
    batches = [objective.batch(rows, dtype, device) for rows in slices]
    folded: dict[str, torch.Tensor] = {}
    costs: dict[str, object] = {}

    def loss_of(b: int, logits: torch.Tensor) -> torch.Tensor:
        return _loss(objective, slices[b], logits_token_nll(batches[b], logits))

    def on_grads(_i: int, _b: int, grads: dict[str, torch.Tensor]) -> None:
        for local, g in grads.items():
            folded[local] = folded[local] + fold(g) if local in folded else fold(g)

    def on_layer(i: int, layer: nn.Module) -> None:
        for m in arch.layer_modules(i):
            costs[m.name] = cost_of(m.local, layer.get_submodule(m.local), folded[m.local])
        folded.clear()

    layer_major_backward(model, [b.inputs for b in batches], loss_of, on_grads, on_layer, desc=desc,
                         layer_context=layer_context)
    return costs


def _streamed_fisher(model: nn.Module, arch: ModelArch, objective: Objective, bits: tuple[int, ...],
                     group_size: int, sym: bool, batch_tokens: int) -> dict[int, dict[str, float]]:
    """{bits: {module: Fisher cost}} of a streamed model: each layer's Fisher diagonal (squared per-batch
    gradients, summed) turned into its modules' costs at every bit-width."""
    per_module = _streamed_costs(
        model, arch, objective, batch_tokens, lambda g: g ** 2,
        lambda _local, lin, fisher: {b: _fisher_cost(fisher, lin.weight, b, group_size, sym) for b in bits},
        desc=f"Fisher {objective.name}")
    return {b: {name: c[b] for name, c in per_module.items()} for b in bits}


def _streamed_autoscheme(model: nn.Module, arch: ModelArch, objective: Objective, bits: int, group_size: int,
                         sym: bool, batch_tokens: int) -> dict[str, float]:
    """{module: AutoScheme cost at ``bits``} of a streamed model: every layer's linears RTN-quantized in place
    while it is resident (both passes, so the gradient is the one at the quantized weights of the whole model),
    the batches' gradients summed, each module scored by sum |g * (W - Q_b(W))| against its original weights."""
    originals: dict[str, torch.Tensor] = {}

    @contextmanager
    def quantized(index: int, layer: nn.Module):
        with quant_swapped(layer, tuple(m.local for m in arch.layer_modules(index)), bits, group_size,
                           sym) as saved:
            originals.update(saved)
            try:
                yield
            finally:
                originals.clear()

    return _streamed_costs(
        model, arch, objective, batch_tokens, lambda g: g,
        lambda local, lin, g: float((g * (originals[local] - lin.weight)).abs().sum()),
        layer_context=quantized, desc=f"AutoScheme {objective.name} {bits}-bit")


def estimate(model: nn.Module, arch: ModelArch, objectives: list[Objective], plan_units: list[Unit],
             bits: tuple[int, ...], method: str, group_size: int = 64, sym: bool = True,
             batch_tokens: int = 512) -> tuple[dict, float]:
    """Estimated costs[objective][bits] (list in unit order) and the seconds it took."""
    if method not in ESTIMATORS:
        raise TasaError(f"estimator must be one of {', '.join(ESTIMATORS)}, got {method!r}")
    t0 = time.perf_counter()
    names = [m.name for m in arch.modules]
    costs: dict = {o.name: {} for o in objectives}
    if streamer_of(model) is not None:
        for o in objectives:
            per_bits = (_streamed_fisher(model, arch, o, bits, group_size, sym, batch_tokens) if method == "fisher"
                        else {b: _streamed_autoscheme(model, arch, o, b, group_size, sym, batch_tokens) for b in bits})
            for b in bits:
                costs[o.name][str(b)] = [sum(per_bits[b][m] for m in u.modules) for u in plan_units]
        return costs, time.perf_counter() - t0
    first = objectives[0].batch(objectives[0].row_slices(batch_tokens)[0], compute_dtype(model), compute_device(model))
    plain = head_is_plain(model, first)
    with _grads_on(model, names):
        params = {n: model.get_submodule(n).weight for n in names}
        if method == "fisher":
            for o in objectives:
                fisher = {n: torch.zeros_like(w) for n, w in params.items()}

                def accumulate():
                    for n, w in params.items():
                        fisher[n] += w.grad.detach() ** 2
                        w.grad = None

                _backward(model, o, batch_tokens, plain, accumulate)
                for b in bits:
                    per_module = {n: _fisher_cost(fisher[n], w.detach(), b, group_size, sym)
                                  for n, w in params.items()}
                    costs[o.name][str(b)] = [sum(per_module[m] for m in u.modules) for u in plan_units]
        else:
            for b in bits:
                with quant_swapped(model, tuple(names), b, group_size, sym) as originals:
                    for o in objectives:
                        for w in params.values():
                            w.grad = None
                        _backward(model, o, batch_tokens, plain)
                        per_module = {n: float((params[n].grad * (originals[n] - params[n].detach())).abs().sum())
                                      for n in names}
                        costs[o.name][str(b)] = [sum(per_module[m] for m in u.modules) for u in plan_units]
    return costs, time.perf_counter() - t0
