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

import torch
import torch.nn as nn

from tasa.errors import TasaError
from tasa.models import compute_device, compute_dtype, streamer_of
from tasa.models.arch import ModelArch
from tasa.profile.objectives import Objective, item_losses
from tasa.profile.probe import Unit, head_is_plain, quant_swapped
from tasa.profile.scores import forward_token_nll
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


def _backward(model: nn.Module, objective: Objective, batch_tokens: int, plain_head: bool, on_batch=None) -> None:
    """Backward of the objective's mean item loss, one batch at a time (``on_batch`` after each)."""
    dtype, device = compute_dtype(model), compute_device(model)
    for rows in objective.row_slices(batch_tokens):
        nll = forward_token_nll(model, objective.batch(rows, dtype, device), plain_head)
        losses = item_losses(objective.subset(rows), nll.cpu())
        if objective.kind == "nll":  # per-token mean over the whole objective, this batch's share
            loss = losses.nll.sum() / objective.score_mask.sum()
        else:
            loss = losses.nll.sum() / objective.n_items
        loss.backward()
        if on_batch is not None:
            on_batch()


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
        raise TasaError("the gradient estimators need every weight in memory; profile a streamed model with "
                        "measured probes (--estimator measured)")
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
                    per_module = {n: 0.5 * float((fisher[n] * (w.detach() - rtn_quantize(
                        w.detach(), b, group_size, sym).weight) ** 2).sum()) for n, w in params.items()}
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
