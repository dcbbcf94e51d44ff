"""Learned rounding: SignRound (Cheng et al., 2023; the method of Intel's AutoRound) for one decoder layer.

Every planned linear of the layer keeps its grid (group size, bits, symmetric or not, two-level scales) and
learns, per weight, a rounding offset V in [-1/2, 1/2] and, per group, a clipping factor c in [1/2, 1] of the
group's range (one for a symmetric grid, one for each end of an asymmetric one; none for a two-level grid,
whose scales stay those of RTN)::

    scale = grid scale of the range shrunk by c        (tasa.quant.rtn's grids: sym signed-max, asym min/max)
    codes = clamp(round(W / scale + V) + zero, 0, maxq)
    W_hat = scale * (codes - zero)

V and c minimise the squared error between the layer's output with every W_hat, fed the *quantized* model's
inputs of the layer, and the float layer's output on the *float* model's inputs (AutoRound's default
objective, GPTAQ's asymmetric calibration: the layer also corrects the error its inputs carry), each token's
error divided by its float output's mean square (:func:`token_normalized_mse`).  Plain MSE is what AutoRound
minimises; on SmolLM2-135M it is the wrong measure: from layer 11 on, the first token of every sequence carries
a hidden state 180 times the median norm (an attention sink), 98% of all the squared output, so plain MSE
spends the learning on that one token (docs/RESULTS.md, issue 38).  The descent
is signed (p -= lr_t * sign(dL/dp), lr_t falling linearly from ``lr`` to 0; round has a straight-through
gradient), one calibration batch a step, in a seeded order.  Start: V = 0 and c from the grid search of
``spec.scale_search`` weighted by the inputs' mean squares (c = 1 without it), i.e. RTN.  The learned
parameters are kept only if they lower the loss over every calibration batch; otherwise the start is kept, so
the layer's reconstruction error on its calibration never rises.

With a ``head`` (the model's final norm and head, for its last decoder layer: ``--learn-output-kl``) the loss is
instead the KL divergence of the model's next-token distribution, the float model's against the quantized one's
(:func:`output_kl`): what the quantized model is finally scored on, where the hidden states' MSE weighs every
direction alike, also those the head ignores.  Each step draws whole sequences of its batch, about HEAD_TOKENS
tokens (the head's logits of a whole batch are several times a layer's work); the keep decision sees every token.

A large linear's grid in each step and the divergence of a head's logits run compiled (:class:`_Fused`:
torch.compile fuses their chains of elementwise operations, which eager PyTorch runs as a pass over memory each):
equal to the eager computation up to float32 summation order, eager where compiling fails.

Pure functions over a layer and its cached inputs; the loop over layers is tasa.quant.apply's.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import time
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn

from tasa.cancel import cancel_point
from tasa.config import QuantSpec
from tasa.errors import TasaError
from tasa.models.walker import LayerInputs, layer_output
from tasa.numerics import all_finite, native_bfloat16
from tasa.quant.rtn import fp16_scale, rtn_quantize_spec
from tasa.quantized import QuantResult

log = logging.getLogger(__name__)

OBJECTIVE = "token-normalized MSE of the layer output, quantized inputs against the float model's"  # records
ASYM_TWO_LEVEL = ("learned rounding does not take asymmetric two-level grids (llama.cpp's Q2_K, Q4_K, Q5_K); "
                  "quantize them with GPTQ (without --learn-rounding)")
CLIP_MIN = 0.5  # the narrowest range a group's clipping may reach (as tasa.quant.rtn.search_grid's)
HEAD_TOKENS = 1024  # about as many tokens (whole sequences) one output-KL step, or one chunk of the keep decision's
# loss, computes: 2 of the paper table's batches' 8 sequences of 512
OUTPUT_KL = "KL divergence of the model's next-token distribution, float against quantized"  # the last layer's


def step_dtype(device: torch.device, dtype: torch.dtype, asked: torch.dtype | None = None) -> torch.dtype | None:
    """The learning steps' autocast dtype for a layer of ``dtype`` on ``device``: ``asked`` when given (None where
    it is the layer's own); else bfloat16 for a float32 layer where the hardware computes it natively (a CUDA GPU
    that supports it; a CPU with AVX512-BF16 or AMX, as oneDNN reports): 27% less time on this project's 2-core
    EPYC at equal quality, and sign descent needs only the gradients' signs; None (the layer's own dtype)
    elsewhere, and for a half-precision layer."""
    if asked is not None:
        return None if asked == dtype else asked
    if dtype != torch.float32:
        return None
    return torch.bfloat16 if native_bfloat16(device) else None


def token_normalized_mse(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """mean over tokens of ||out_t - target_t||^2 / ||target_t||^2: every token's relative error counts alike,
    whatever its norm (the next layer's RMSNorm sees each token at its own scale)."""
    out, target = out.float(), target.float()
    err = (out - target).pow(2).sum(-1)
    return (err / target.pow(2).sum(-1).clamp_min(1e-12)).mean()


def _output_kl(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.kl_div(torch.log_softmax(logits.float(), -1), torch.log_softmax(target.float(), -1),
                                      reduction="batchmean", log_target=True)


class _Fused:
    """``fn`` compiled by torch.compile (on first use) for inputs of at least ``min_numel`` elements, eager for
    smaller ones: the learning steps' memory-bound chains of elementwise operations and reductions, which the
    compiler fuses into a few passes over memory (equal to eager up to float32 summation order).  Where compiling
    fails (no C++ compiler for inductor on a CPU, an unsupported device) it says so once and runs eagerly;
    TORCH_COMPILE_DISABLE=1 makes it eager too."""

    def __init__(self, fn: Callable[..., torch.Tensor], min_numel: int):
        self.fn, self.min_numel = fn, min_numel
        self.compiled: Callable[..., torch.Tensor] | None = None
        self.failed = False

    def __call__(self, first: torch.Tensor, *args) -> torch.Tensor:
        if first.numel() < self.min_numel or self.failed:
            return self.fn(first, *args)
        if self.compiled is None:
            self.compiled = torch.compile(self.fn)
        try:
            return self.compiled(first, *args)
        except Exception as e:  # noqa: BLE001 - any compiler failure: the eager computation is the same
            self.failed = True
            text = str(e).strip()
            log.warning("%s runs unfused (torch.compile failed: %s)", self.fn.__name__.strip("_"),
                        text.splitlines()[0][:200] if text else type(e).__name__)
            return self.fn(first, *args)


# the head's logits of a step or keep-decision chunk (1,024 x 49,152 on SmolLM2), where most of the output-KL
# layer's time went (benchmarks/fused_steps.py)
_fused_output_kl = _Fused(_output_kl, 2**24)


def output_kl(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """mean over tokens (rows) of KL(softmax(target) || softmax(logits)), in float32 (:class:`_Fused` for a
    head's logits over a vocabulary)."""
    return _fused_output_kl(logits, target)


def _round_ste(x: torch.Tensor) -> torch.Tensor:
    """round(x) forward, identity backward."""
    return x + (torch.round(x) - x).detach()


def _grid_weight(w: torch.Tensor, offsets: torch.Tensor, base: torch.Tensor, clip: torch.Tensor,
                 zeros: torch.Tensor, maxq: torch.Tensor) -> torch.Tensor:
    """:meth:`LearnedGrid.weight` of a grid of contiguous groups whose scales are ``base * clip`` (symmetric, or
    refining a start): values and offsets (rows, groups, width), the rest (rows, groups), the largest code a
    0-dimensional tensor (as a Python number, torch 2.13's compiled kernel gave a 4-bit grid wrong weights after a
    3-bit one); rounding straight-through.  (rows, groups * width)."""
    scale, zero = (base * clip)[:, :, None], zeros[:, :, None]
    codes = torch.clamp(_round_ste(w / scale + offsets) + zero, torch.zeros_like(maxq), maxq)
    return (scale * (codes - zero)).reshape(w.shape[0], -1)


# a linear's weight in each learning step (SmolLM2's smallest linear has 110,592 weights)
_fused_grid_weight = _Fused(_grid_weight, 2**16)


class LearnedGrid:
    """One linear's weight on its grid with learnable rounding offsets and clipping factors.

    ``start`` (GPTQ's result on the same grid, holding the values it rounded, QuantResult.rounded): refine it
    instead of rounding the weight: those values R take the weight's place (codes = clamp(round(R / scale + V) +
    zero): at a given scale the offsets move each code by at most one step), the grid is the start's (group
    index, zero points; a two-level grid's scales kept) and each group's scale is multiplied by a learned factor
    in [CLIP_MIN, 2 - CLIP_MIN].  At V = 0 and factor 1 the weight is ``start``'s exactly.  Asymmetric two-level
    grids are refused either way."""

    def __init__(self, weight: torch.Tensor, spec: QuantSpec, input_weights: torch.Tensor | None = None,
                 start: QuantResult | None = None):
        if spec.super_group and not spec.sym:
            raise TasaError(ASYM_TWO_LEVEL)
        self.spec, self.dtype = spec, weight.dtype
        self.maxq = 2**spec.bits - 1
        self.refining = start is not None
        if self.refining and start.rounded is None:
            raise TasaError("learned rounding from a quantizer's result needs the values it rounded "
                            "(tasa.quant.gptq.gptq_quantize with keep_rounded)")
        self.w = (weight if start is None else start.rounded).detach().float()
        if start is None:
            start = rtn_quantize_spec(weight, spec, input_weights)  # the (searched) grid: where learning starts
        self.g_idx, self.super_scales = start.g_idx, start.super_scales
        self.g = start.g_idx.long()
        cols, groups = self.w.shape[1], start.scales.shape[1]
        # contiguous groups of equal width (the group index in column order: no act-order, or act-order with static
        # groups, tasa's default): the steps view the weight as (rows, groups, width) and broadcast each group's
        # scale, instead of gathering it per column (whose backward, an index_put, took 15% of a step on SmolLM2)
        width = cols // groups
        self.width = width if width * groups == cols and torch.equal(
            self.g, torch.arange(cols, device=self.g.device) // width) else None
        self.offsets = torch.zeros_like(self.w)  # V
        self.clip: list[torch.Tensor] = []
        if spec.super_group:  # the two-level grid's scales are integers times a super-scale: kept as the start's
            self.scales, self.zeros = start.scales, start.zeros
            return
        if self.refining:  # the start's scales times a learned factor
            self.base, self.zeros = start.scales.float(), start.zeros.float()
            self.clip = [torch.ones_like(self.base)]
            return
        plain = start if not spec.scale_search else rtn_quantize_spec(weight, dataclasses.replace(spec,
                                                                                                  scale_search=0))
        ratio = torch.where(plain.scales != 0, start.scales / plain.scales, torch.ones_like(plain.scales))
        ratio = ratio.clamp(CLIP_MIN, 1.0)
        if spec.sym:
            self.base, self.zeros = plain.scales, plain.zeros  # scale = base * c; zero fixed at the middle
            self.clip = [ratio.clone()]
        else:
            rows, n = plain.scales.shape
            idx = self.g.expand(rows, -1)
            zeros = torch.zeros(rows, n, device=self.w.device)
            lo = zeros.scatter_reduce(1, idx, self.w, "amin", include_self=True)
            hi = zeros.scatter_reduce(1, idx, self.w, "amax", include_self=True)  # both hold 0
            empty = (lo == 0) & (hi == 0)
            self.lo, self.hi = torch.where(empty, -1.0, lo), torch.where(empty, 1.0, hi)
            self.clip = [ratio.clone(), ratio.clone()]  # of the low and the high end

    @functools.cached_property
    def base_nonzero(self) -> bool:
        """Every group's base scale is not 0 (nor is its scale then: the clipping factors are at least CLIP_MIN)."""
        return bool((self.base != 0).all())

    def parameters(self) -> list[torch.Tensor]:
        return [self.offsets, *self.clip]

    def clamp_(self) -> None:
        self.offsets.clamp_(-0.5, 0.5)
        for c in self.clip:
            c.clamp_(CLIP_MIN, 2 - CLIP_MIN if self.refining else 1.0)

    def _grid(self, ste: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """(scales, zeros), each (rows, groups); scales rounded to fp16 unless ``ste`` (training)."""
        if not self.clip:
            return self.scales, self.zeros
        rnd = _round_ste if ste else torch.round
        if self.spec.sym or self.refining:
            scale = self.base * self.clip[0]
            return (scale if ste else fp16_scale(scale)), self.zeros
        lo, hi = self.lo * self.clip[0], self.hi * self.clip[1]
        scale = (hi - lo) / self.maxq
        scale = scale if ste else fp16_scale(scale)
        return scale, torch.clamp(rnd(-lo / scale), 0, self.maxq)

    def _per_column(self, t: torch.Tensor) -> torch.Tensor:
        """A per-group tensor (rows, groups) spread over the columns: broadcastable against :meth:`_columns`."""
        return t[:, :, None] if self.width else t[:, self.g]

    def _columns(self, t: torch.Tensor) -> torch.Tensor:
        """A (rows, cols) tensor in :meth:`_per_column`'s layout ((rows, groups, width) for contiguous groups)."""
        return t.reshape(t.shape[0], -1, self.width) if self.width else t

    def _codes(self, scale: torch.Tensor, zero: torch.Tensor, ste: bool) -> torch.Tensor:
        """The integer codes, in :meth:`_columns`' layout."""
        empty = scale == 0  # a two-level grid's zero scale: every code of the group is the zero point
        s, z = self._per_column(torch.where(empty, 1.0, scale)), self._per_column(zero)
        codes = torch.clamp((_round_ste if ste else torch.round)(self._columns(self.w) / s
                                                                 + self._columns(self.offsets)) + z, 0, self.maxq)
        return torch.where(self._per_column(empty), z, codes) if bool(empty.any()) else codes

    def weight(self) -> torch.Tensor:
        """The dequantized weight, differentiable in the offsets and clipping factors (float32)."""
        if self.width and self.clip and (self.spec.sym or self.refining) and self.base_nonzero:
            return _fused_grid_weight(self._columns(self.w), self._columns(self.offsets), self.base, self.clip[0],
                                      self.zeros, torch.tensor(float(self.maxq), device=self.w.device))
        scale, zero = self._grid(ste=True)
        q = self._per_column(scale) * (self._codes(scale, zero, ste=True) - self._per_column(zero))
        return q.reshape(self.w.shape)

    def result(self) -> QuantResult:
        """The weight as tasa's quantizers give it: fp16 scales, integer codes on the grid."""
        with torch.no_grad():
            scale, zero = self._grid(ste=False)
            codes = self._codes(scale, zero, ste=False).reshape(self.w.shape)
            res = QuantResult(torch.empty(0), codes.to(torch.uint8), scale.float().clone(), zero.float().clone(),
                              self.g_idx, self.spec.bits, self.spec.group_size, self.super_scales)
            res.weight = res.dequantize().to(self.dtype)
        return res


@dataclass
class LayerLearning:
    """What learning did to one layer: the loss over all its calibration batches at the start (RTN on the
    searched grid) and after the last step, and whether the learned parameters were kept."""

    loss_start: float
    loss_learned: float
    kept: bool
    steps: int
    seconds: float = 0.0
    step_dtype: str | None = None  # the steps' autocast dtype, if any
    objective: str = "mse"  # what the losses measure: "mse" (token_normalized_mse) or "output-kl" (output_kl)

    @property
    def loss(self) -> float:
        return self.loss_learned if self.kept else self.loss_start


def learn_layer(layer: nn.Module, specs: dict[str, QuantSpec], inputs: LayerInputs, targets: list[torch.Tensor],
                iters: int, lr: float | None = None, seed: int = 0,
                input_weights: dict[str, torch.Tensor] | None = None,
                autocast: torch.dtype | None = None,
                starts: dict[str, QuantResult] | None = None,
                head: Callable[[torch.Tensor], torch.Tensor] | None = None,
                head_tokens: int = HEAD_TOKENS, advance: bool = False,
                ) -> tuple[dict[str, QuantResult], LayerLearning]:
    """Learn the rounding of the linears ``specs`` (local names) of ``layer`` so that ``layer`` on ``inputs``
    (what the quantized model feeds it, per batch) reproduces ``targets`` (the float layer's outputs on the float
    model's inputs, per batch), in ``iters`` signed-gradient steps of learning rate ``lr`` (default 1 / iters).
    ``autocast``: the steps' matrix products in this dtype (:func:`step_dtype`); the losses that decide what is
    kept are computed in the layer's own.  ``starts``: each linear's result to refine (:class:`LearnedGrid`) instead
    of its rounding; the losses are then measured against it (the weights of those linears are not read).
    ``head``: the model's logits of (sequences, tokens, hidden) states leaving ``layer`` (its last decoder layer):
    the loss is then :func:`output_kl` of the logits of the batch's sequences, ``head_tokens // seqlen`` of them (at
    least one) a step, drawn from ``seed``, and all of them, as many at a time, for the keep decision.  The layer's
    own weights are not changed.  ``advance``: ``inputs`` then hold the layer's outputs with the kept weights (the
    next layer's inputs, as tasa.models.walker.run_layer's ``advance`` leaves them, NaN/Inf an error), taken from the
    keep decision's pass, which computes them anyway: no further pass over the layer.  Returns each linear's
    QuantResult and the losses."""
    t0 = time.perf_counter()
    input_weights, starts = input_weights or {}, starts or {}
    grids = {local: LearnedGrid(layer.get_submodule(local).weight.data, spec, input_weights.get(local),
                                starts.get(local))
             for local, spec in specs.items()}
    params = [p for g in grids.values() for p in g.parameters()]
    lr = 1.0 / iters if lr is None else lr
    dtype, layer_device = next(layer.parameters()).dtype, next(layer.parameters()).device
    gen = torch.Generator().manual_seed(seed)

    def loss_of(b: int, weights: dict[str, torch.Tensor]) -> torch.Tensor:
        """A step's loss on batch ``b`` (with the output KL, on ``head_tokens`` worth of its sequences)."""
        hidden, kwargs = inputs.call(b)
        out = layer_output(torch.func.functional_call(layer, weights, (hidden,), kwargs))
        if head is None:
            return token_normalized_mse(out, targets[b])
        pick = torch.randperm(out.shape[0], generator=gen)[:max(1, head_tokens // out.shape[1])].to(out.device)
        with torch.no_grad():
            want = head(targets[b][pick])
        return output_kl(head(out[pick]).flatten(0, -2), want.flatten(0, -2))

    def totals(*weight_sets: dict[str, torch.Tensor]) -> tuple[list[float], list[list[torch.Tensor]]]:
        """The mean loss over every batch (every token) of each set of weights, in one pass (the float model's
        logits of a chunk are computed once for all the sets), and, with ``advance``, each set's outputs (the last
        set's in ``inputs.hidden``, whose batches this pass is the last to read)."""
        sums = [0.0] * len(weight_sets)
        kept_outs: list[list[torch.Tensor]] = [[] for _ in weight_sets]
        with torch.no_grad():
            for b in range(len(inputs)):
                hidden, kwargs = inputs.call(b)
                outs = [layer_output(torch.func.functional_call(layer, w, (hidden,), kwargs)) for w in weight_sets]
                if advance:
                    for held, out in zip(kept_outs, outs):
                        held.append(out)
                    inputs.hidden[b] = outs[-1]
                if head is None:
                    losses = [token_normalized_mse(out, targets[b]) for out in outs]
                else:  # whole sequences (their own positions) a chunk
                    per, n = max(1, head_tokens // outs[0].shape[1]), outs[0].shape[0]
                    losses = [0.0] * len(outs)
                    for s in range(0, n, per):
                        want = head(targets[b][s:s + per]).flatten(0, -2)
                        for i, out in enumerate(outs):
                            losses[i] += output_kl(head(out[s:s + per]).flatten(0, -2), want) * out[s:s + per].shape[0]
                    losses = [x / n for x in losses]
                sums = [t + float(x) for t, x in zip(sums, losses)]
        return [t / len(inputs) for t in sums], kept_outs

    def stored() -> dict[str, torch.Tensor]:
        """The weights as they would be stored (fp16 scales), in the layer's dtype."""
        return {f"{local}.weight": g.result().weight.to(dtype) for local, g in grids.items()}

    start_state, start_weights = [p.clone() for p in params], stored()
    order: list[int] = []
    trainable = [p.requires_grad_(True) for p in params]
    was = [p.requires_grad for p in layer.parameters()]
    layer.requires_grad_(False)
    try:
        for step in range(iters):
            cancel_point()
            if not order:
                order = torch.randperm(len(inputs), generator=gen).tolist()
            with torch.enable_grad(), (torch.autocast(layer_device.type, dtype=autocast) if autocast
                                       else contextlib.nullcontext()):
                loss = loss_of(order.pop(), {f"{local}.weight": g.weight().to(dtype) for local, g in grids.items()})
                grads = torch.autograd.grad(loss, trainable)
            rate = lr * (1 - step / iters)
            with torch.no_grad():
                for p, g in zip(trainable, grads):
                    p.sub_(rate * torch.sign(g))
                for grid in grids.values():
                    grid.clamp_()
    finally:
        for p, w in zip(layer.parameters(), was):
            p.requires_grad_(w)
        for p in params:
            p.requires_grad_(False)
    (loss_start, loss_learned), (start_outs, learned_outs) = totals(start_weights, stored())
    kept = loss_learned < loss_start
    if not kept:
        with torch.no_grad():
            for p, s in zip(params, start_state):
                p.copy_(s)
    if advance:
        inputs.hidden[:] = learned_outs if kept else start_outs
        for out in inputs.hidden:
            if not all_finite(out):
                raise TasaError(f"decoder layer {inputs.index} produced NaN/Inf activations")
        inputs.index += 1
    results = {local: g.result() for local, g in grids.items()}
    return results, LayerLearning(loss_start, loss_learned, kept, iters, time.perf_counter() - t0,
                                  str(autocast).replace("torch.", "") if autocast else None,
                                  "mse" if head is None else "output-kl")
