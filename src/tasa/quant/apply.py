"""Apply a :class:`~tasa.plan.Plan` to a model, one decoder layer at a time.

Loop (the GPTQ "sequential" scheme, on the layer walker of tasa.models.walker)::

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

import copy
import logging
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn as nn

from tasa.cancel import cancel_point
from tasa.config import LEARN_STARTS, QuantSpec
from tasa.errors import TasaError
from tasa.models.arch import ModelArch
from tasa.models.streaming import compute_device, return_freed_memory
from tasa.models.walker import (LayerInputs, capture_ids, forward_layer, head_logits, input_groups, layer_device,
                                 move_outside_layers, parallel_steps, run_layer, walk)
from tasa.plan import Plan, expert_container
from tasa.quant.gptq import (accumulate_hessian, accumulate_shift, float_output_targets,
                             gptq_quantize_many, make_empty_hessian)
from tasa.quant.learned import LayerLearning, learn_layer, step_dtype
from tasa.quant.rtn import rtn_quantize_spec
from tasa.quantized import QuantResult

log = logging.getLogger(__name__)


@dataclass
class ModuleStats:
    bits: int
    group_size: int
    seconds: float
    rel_error: float | None  # tr(E H E^T) / tr(W H W^T) for GPTQ; None for RTN
    tokens: int | None = None  # calibration tokens that reached the module (GPTQ)
    fallback: str | None = None  # why the module was not quantized by the plan's method, if it was not


@dataclass
class QuantReport:
    modules: dict[str, ModuleStats] = field(default_factory=dict)
    seconds: float = 0.0
    layers: dict[int, LayerLearning] = field(default_factory=dict)  # learned rounding: each layer's losses


def layer_hessians(layer: nn.Module, inputs: LayerInputs, firsts: list[str], advance: bool = False,
                   counts: dict[str, int] | None = None) -> dict[str, torch.Tensor]:
    """H = 2/n X^T X of the input of each of ``firsts`` (local names, in execution order) over every batch of
    ``inputs``: one pass, which ends after the last of them unless ``advance`` (then the layer's outputs
    become the inputs of the next layer) or they include routed experts (whose call order follows the routing).
    ``counts``, when given, receives the number of tokens each input saw (0: a routed expert no token reached,
    whose H stays zero)."""
    state = {}
    for local in firsts:
        state[local] = [make_empty_hessian(layer.get_submodule(local).in_features, layer_device(layer)), 0]

    def tap(local):
        def fn(x):
            st = state[local]
            st[1] = accumulate_hessian(st[0], st[1], x)
        return fn

    routed = any(expert_container(local) is not None for local in firsts)
    run_layer(layer, inputs, {local: tap(local) for local in firsts},
              stop_after=None if advance or routed else firsts[-1], advance=advance)
    if counts is not None:
        counts.update({local: st[1] for local, st in state.items()})
    return {local: st[0] for local, st in state.items()}


def _relative_error(w: torch.Tensor, q: torch.Tensor, h: torch.Tensor) -> float:
    """tr(E H E^T) / tr(W H W^T), E = W - Q, taken a band of rows at a time (:data:`ERROR_BAND_BYTES` of each
    float32 temporary): over whole matrices the temporaries took 1.1 GB for one 4096 x 14336 projection."""
    num = torch.zeros((), dtype=torch.float64, device=h.device)
    den = torch.zeros_like(num)
    step = max(1, ERROR_BAND_BYTES // (4 * w.shape[1]))
    for r0 in range(0, w.shape[0], step):
        wf = w[r0:r0 + step].float()
        e = wf - q[r0:r0 + step].float()
        num += ((e @ h) * e).sum(dtype=torch.float64)
        den += ((wf @ h) * wf).sum(dtype=torch.float64)
    return float(num / den) if den > 0 else 0.0


ERROR_BAND_BYTES = 32 * 2**20


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
    on_layer: Callable[[int, nn.Module], None] | None = None,
    learn_iters: int = 0,
    learn_lr: float | None = None,
    learn_dtype: torch.dtype | None = None,
    seed: int = 0,
    float_targets: float = 0.0,
    learn_start: str = "rtn",
    learn_output_kl: bool = False,
) -> QuantReport:
    """Quantize ``model`` in place according to ``plan``.

    calib_ids: (nsamples, seqlen) token ids; required for GPTQ, ignored for RTN.  For GPTQ also a
               :class:`Calibration` holding them (e.g. spread over workers: tasa.distributed.calibration).
    on_result: called with (module name, QuantResult) for every quantized module,
               e.g. to stream packed tensors to an exporter.
    on_layer:  called with (index, layer) once a decoder layer is quantized, while its
               weights are resident (a streamed model drops them right after).
    learn_iters: not 0: the plan's grids with learned rounding (tasa.quant.learned; ``learn_iters`` steps of
               rate ``learn_lr`` per layer, batches in an order drawn from ``seed``, steps computed in
               ``learn_dtype``; None: tasa.quant.learned.step_dtype) instead of its method.
    float_targets: not 0: GPTQ with asymmetric calibration of strength ``float_targets`` (:class:`Calibration`).
    learn_start: where learned rounding starts: "rtn" (the plan's grid rounded to nearest, AutoRound's start) or
               "gptq": each layer is quantized by GPTQ (with ``float_targets``), then its result is refined by
               ``learn_iters`` steps against the float model's layer outputs (:meth:`Calibration.refine`).
    learn_output_kl: learned rounding of the last decoder layer minimises the KL divergence of the model's output
               distribution (its final norm and head) instead of the layer output's MSE (:func:`output_head`).
    """
    if learn_start not in LEARN_STARTS:
        raise TasaError(f"learned rounding starts from {' or '.join(LEARN_STARTS)}, got {learn_start!r}")
    if learn_output_kl and not learn_iters:
        raise TasaError("the output-KL objective is learned rounding's: give learn_iters (--learn-rounding STEPS)")
    refine = Refinement(learn_iters, learn_lr, learn_dtype, seed, learn_output_kl) \
        if learn_iters and learn_start == "gptq" else None
    if refine and isinstance(calib_ids, Calibration) and calib_ids.float_inputs is None:
        raise TasaError("learned rounding from GPTQ needs the float model's layer outputs, which this calibration "
                        "(distributed) does not hold: run it in one process")
    unknown = [n for n in plan.modules if n not in {m.name for m in arch.modules}]
    if unknown:
        raise TasaError(f"plan names modules the model does not have, e.g. {unknown[0]!r}")
    t0 = time.perf_counter()
    report = QuantReport()
    if device is None:
        device = compute_device(model)
    device = torch.device(device)
    with torch.no_grad():
        if learn_iters and not refine:
            if calib_ids is None:
                raise TasaError("learned rounding needs calibration data")
            _apply_learned(model, arch, plan, calib_ids, batch_size, device, report, on_result, progress, on_layer,
                           learn_iters, learn_lr, learn_dtype, seed, learn_output_kl)
        elif plan.method == "rtn" and not refine:
            _apply_rtn(arch, plan, device, report, on_result, progress, on_layer)
        else:
            if calib_ids is None:
                raise TasaError("GPTQ needs calibration data")
            move_outside_layers(model, arch, device)
            calib = calib_ids if isinstance(calib_ids, Calibration) else \
                Calibration(model, arch, calib_ids, batch_size, device, float_targets, float_stream=bool(refine))
            try:
                _apply_gptq(model, arch, plan, calib, device, true_sequential, report, on_result, progress, on_layer,
                            refine)
            finally:
                calib.close()
    report.seconds = time.perf_counter() - t0
    return report


def _store(module: nn.Linear, result: QuantResult) -> None:
    module.weight.data.copy_(result.weight.to(module.weight.dtype))


def _apply_rtn(arch, plan, device, report, on_result, progress, on_layer):
    for index, layer in walk(arch, device, "RTN layers", progress):
        for m in arch.layer_modules(index):
            if m.name not in plan:
                continue
            spec = plan[m.name]
            t = time.perf_counter()
            linear = layer.get_submodule(m.local)
            result = rtn_quantize_spec(linear.weight.data, spec)
            _store(linear, result)
            report.modules[m.name] = ModuleStats(spec.bits, spec.group_size, time.perf_counter() - t, None)
            if on_result:
                on_result(m.name, result)
        if on_layer:
            on_layer(index, layer)


def output_head(model: nn.Module, arch: ModelArch, index: int) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """For the last decoder layer (``index``), the model's logits of the hidden states leaving it (its final norm,
    head and logit processing, differentiable: tasa.models.walker.head_logits); None for any other layer."""
    if index != len(arch.layers) - 1:
        return None
    return lambda hidden: head_logits(model, arch, hidden, {}, grad=True)


@dataclass(frozen=True)
class Refinement:
    """Learned rounding from GPTQ's result (:meth:`Calibration.refine`): steps per layer, first step size (None:
    1 / steps), the steps' dtype (None: tasa.quant.learned.step_dtype), seed of the batch order, and whether the
    last layer learns the output distribution's KL (:func:`output_head`)."""

    iters: int
    lr: float | None = None
    dtype: torch.dtype | None = None
    seed: int = 0
    output_kl: bool = False


class Calibration:
    """The calibration's inputs of the current decoder layer, held here, and what GPTQ asks of them: which linears
    share an input, the Hessians of some inputs, the layer's quantized modules, and the step to the next layer.
    tasa.distributed.calibration holds them on several workers instead (data-parallel Hessians).

    ``float_targets`` (alpha, 0: off): asymmetric calibration (GPTAQ / GPTQ v2).  A second stream of inputs, the
    float model's, is advanced by a float copy of each layer; each input's Hessian comes with C = 2/n (X_f - X)^T X
    (:meth:`shift`), and GPTQ approximates tasa.quant.gptq.float_output_weights, so that each linear reproduces the
    float model's outputs from the quantized model's inputs rather than its own float outputs from them.  Routed
    experts, whose tokens differ between the two streams, keep the plain objective."""

    float_targets: float = 0.0  # (subclasses that hold the inputs elsewhere calibrate plainly ...
    float_inputs: LayerInputs | None = None  # ... and hold no float stream)

    def __init__(self, model: nn.Module, arch: ModelArch, calib_ids: torch.Tensor, batch_size: int,
                 device: torch.device, float_targets: float = 0.0, float_stream: bool = False):
        self.inputs = capture_ids(model, arch, calib_ids, batch_size, device)
        self.model, self.arch = model, arch  # (the final norm and head, for refine's output-KL objective)
        self.float_targets = float_targets
        self.float_inputs = LayerInputs(list(self.inputs.hidden), self.inputs.kwargs) \
            if float_targets or float_stream else None  # float_stream: for :meth:`refine` alone
        self.float_outputs: list[torch.Tensor] | None = None  # the float layer's, once :meth:`refine` computed them
        self.float_layer: nn.Module | None = None
        self.float_firsts: list[str] = []  # the first linear of each input group of the layer (routed experts aside)
        self.float_held: dict[str, list[torch.Tensor]] = {}  # the float inputs of some of them, batch by batch
        self.shifts: dict[str, torch.Tensor] = {}
        self.refined = False  # :meth:`refine` has advanced the inputs past the current layer
        self.float_advanced = False  # the float stream is past the current layer (float_outputs: its inputs now)

    def begin(self, layer: nn.Module) -> None:
        """A new decoder layer, not yet quantized: with the float stream, keep a float copy of it."""
        if self.float_inputs is not None:
            self.float_layer = copy.deepcopy(layer)

    def groups(self, layer: nn.Module, locals_: list[str]) -> list[list[str]]:
        groups = input_groups(layer, locals_, self.inputs)
        if self.float_targets:
            self.float_firsts = [g[0] for g in groups if expert_container(g[0]) is None]
        return groups

    def hessians(self, layer: nn.Module, firsts: list[str], counts: dict[str, int]) -> dict[str, torch.Tensor]:
        if not self.float_targets or any(expert_container(local) is not None for local in firsts):
            return layer_hessians(layer, self.inputs, firsts, counts=counts)
        device = layer_device(layer)
        state = {local: [make_empty_hessian(layer.get_submodule(local).in_features, device),
                         make_empty_hessian(layer.get_submodule(local).in_features, device), 0] for local in firsts}
        held = self._held_float_inputs(layer, firsts)
        for b in range(len(self.inputs)):  # each batch's float inputs (held, or through the float layer now)
            floats = {local: held[local][b] for local in firsts} if held else self._float_batch(firsts, b)

            def tap(local):
                def fn(x):
                    st = state[local]
                    accumulate_shift(st[1], st[2], x, floats[local])
                    st[2] = accumulate_hessian(st[0], st[2], x)
                return fn
            run_layer(layer, _batch(self.inputs, b), {local: tap(local) for local in firsts}, stop_after=firsts[-1])
        for local in firsts:
            self.float_held.pop(local, None)
        counts.update({local: st[2] for local, st in state.items()})
        self.shifts.update({local: st[1] for local, st in state.items()})
        return {local: st[0] for local, st in state.items()}

    def _held_float_inputs(self, layer: nn.Module, firsts: list[str]) -> dict[str, list[torch.Tensor]] | None:
        """The float model's inputs of ``firsts``, batch by batch, held: on the layer's first call, one pass of the
        float layer gathers the inputs of every linear group of the layer (held until their Hessians are taken) if
        they fit :data:`FLOAT_INPUTS_BYTES`; None when they do not (:meth:`_float_batch` then, per call)."""
        if not all(local in self.float_held for local in firsts):
            if self.float_advanced:  # every group's were gathered by the one pass that advanced the stream
                raise RuntimeError(f"float inputs of {firsts} asked for after the float stream advanced")
            rest = [local for local in self.float_firsts if local not in self.float_held]
            tokens = sum(h.numel() // h.shape[-1] for h in self.float_inputs.hidden)
            size = tokens * self.float_inputs.hidden[0].element_size() * sum(
                layer.get_submodule(local).in_features for local in rest)
            if not set(firsts) <= set(rest) or size > FLOAT_INPUTS_BYTES:
                return None
            gathered: dict[str, list[torch.Tensor]] = {local: [] for local in rest}
            # the whole float layer, not only up to the last input: the float stream advances with this pass (its
            # outputs, :meth:`refine`'s targets, replace its inputs, which nothing reads again: the layer need not
            # run again in :meth:`refine` or :meth:`advance`)
            run_layer(self.float_layer, self.float_inputs, {local: gathered[local].append for local in rest},
                      advance=True)
            self.float_held.update(gathered)
            self.float_outputs, self.float_advanced = self.float_inputs.hidden, True
            self.float_layer = None  # nothing runs it again: freed before GPTQ's solves (0.9 GB of an 8B layer)
        return {local: self.float_held[local] for local in firsts}

    def _float_batch(self, firsts: list[str], b: int) -> dict[str, torch.Tensor]:
        """The float model's inputs of ``firsts`` on batch ``b``: the float layer run up to the last of them."""
        floats: dict[str, torch.Tensor] = {}
        run_layer(self.float_layer, _batch(self.float_inputs, b),
                  {local: (lambda x, local=local: floats.__setitem__(local, x)) for local in firsts},
                  stop_after=firsts[-1])
        return floats

    def shift(self, local: str) -> torch.Tensor | None:
        """C of input ``local`` from the last :meth:`hessians` (None: plain calibration), handed over once."""
        return self.shifts.pop(local, None) if self.float_targets else None

    def quantized(self, layer: nn.Module, locals_: list[str]) -> None:
        """``locals_`` of ``layer`` now hold their quantized weights (here: the same modules; nothing to do)."""

    def refine(self, layer: nn.Module, index: int, specs: dict[str, QuantSpec], starts: dict[str, QuantResult],
               refine: Refinement) -> tuple[dict[str, QuantResult], LayerLearning]:
        """Learned rounding from ``starts`` (GPTQ's results of ``layer``'s linears ``specs``): the offsets and
        scale factors that bring the layer, fed the quantized model's inputs, closest to the float layer's outputs
        on the float model's inputs (tasa.quant.learned.learn_layer), kept only if they beat the start."""
        if self.float_outputs is None:
            self.float_outputs = [forward_layer(self.float_layer, *self.float_inputs.call(b), index)
                                  for b in range(len(self.float_inputs))]
        out = learn_layer(layer, specs, self.inputs, self.float_outputs, refine.iters, refine.lr, refine.seed + index,
                          autocast=step_dtype(layer_device(layer), next(layer.parameters()).dtype,
                                              refine.dtype), starts=starts,
                          head=output_head(self.model, self.arch, index) if refine.output_kl else None, advance=True)
        self.refined = True  # the learning's keep decision left the layer's outputs in self.inputs
        return out

    def advance(self, layer: nn.Module) -> None:
        if not self.refined:
            run_layer(layer, self.inputs, advance=True)
        self.refined = False
        if self.float_inputs is not None:
            if self.float_advanced:  # by the pass that gathered the float inputs (:meth:`_held_float_inputs`)
                pass
            elif self.float_outputs is not None:  # computed by refine: the float stream's next inputs
                self.float_inputs.hidden = self.float_outputs
                self.float_inputs.index += 1
            else:
                run_layer(self.float_layer, self.float_inputs, advance=True)
            self.float_layer, self.float_outputs, self.float_advanced = None, None, False
            self.float_held.clear()

    def close(self) -> None:
        self.inputs = self.float_inputs = self.float_layer = self.float_outputs = self.model = None
        self.float_held = {}


def _batch(inputs: LayerInputs, b: int) -> LayerInputs:
    """Batch ``b`` of ``inputs`` alone, at the same layer."""
    one = LayerInputs([inputs.hidden[b]], [inputs.kwargs[b]])
    one.index = inputs.index
    return one


def _apply_gptq(model, arch, plan, calib: Calibration, device, true_sequential, report, on_result, progress,
                on_layer, refine: Refinement | None = None):
    """GPTQ layer by layer; ``refine``: each layer's results then refined (:meth:`Calibration.refine`), and handed
    to ``on_result`` once refined."""
    for index, layer in walk(arch, device, "GPTQ layers", progress):
        planned = [m for m in arch.layer_modules(index) if m.name in plan]
        by_local = {m.local: m for m in planned}
        results: dict[str, QuantResult] = {}
        calib.begin(layer)
        if planned:
            groups = calib.groups(layer, [m.local for m in planned])
            hessians, counts = {}, {}
            if not true_sequential:
                hessians = calib.hessians(layer, [g[0] for g in groups], counts)
            for step in parallel_steps(groups):
                for chunk in _chunks(step, layer):
                    if true_sequential:
                        hessians = calib.hessians(layer, [g[0] for g in chunk], counts)
                    plain: list[tuple[str, torch.Tensor, int]] = []  # quantized together, below
                    for group in chunk:
                        h, n = hessians.pop(group[0]), counts[group[0]]
                        targets = _float_output_targets(layer, group, by_local, plan, h, n, calib.shift(group[0]),
                                                        calib.float_targets)
                        if not targets:  # (a layer's routed experts: batched, each on its own Hessian)
                            plain += [(local, h, n) for local in group]
                            continue
                        _gptq_linears(layer, [(local, h, n) for local in group], targets, by_local, plan, report,
                                      None if refine else on_result, results if refine else None)
                        _trim_after(h)
                        del h, targets
                    if plain:
                        _gptq_linears(layer, plain, {}, by_local, plan, report, None if refine else on_result,
                                      results if refine else None)
                        _trim_after(max((entry[1] for entry in plain), key=torch.Tensor.numel))
                        del plain
                    calib.quantized(layer, [local for group in chunk for local in group])
            if refine:
                t = time.perf_counter()
                results, report.layers[index] = calib.refine(
                    layer, index, {local: plan[m.name] for local, m in by_local.items()}, results, refine)
                seconds = (time.perf_counter() - t) / len(planned)
                for local, m in by_local.items():
                    _store(layer.get_submodule(local), results[local])
                    report.modules[m.name].seconds += seconds
                    if on_result:
                        on_result(m.name, results[local])
        calib.advance(layer)
        if on_layer:
            on_layer(index, layer)


def _apply_learned(model, arch, plan, calib_ids, batch_size, device, report, on_result, progress, on_layer,
                   iters, lr, dtype, seed, output_kl=False):
    """Learned rounding layer by layer: each layer's targets are the float layer's outputs on the float
    model's inputs (a second stream of layer inputs, advanced by the float layer before it is quantized)."""
    move_outside_layers(model, arch, device)
    inputs = capture_ids(model, arch, calib_ids, batch_size, device)
    fp_inputs = LayerInputs(list(inputs.hidden), inputs.kwargs)
    for index, layer in walk(arch, device, "learned-rounding layers", progress):
        targets = [forward_layer(layer, *fp_inputs.call(b), index) for b in range(len(fp_inputs))]
        planned = {m.local: m for m in arch.layer_modules(index) if m.name in plan}
        if planned:
            squares = {local: [torch.zeros(layer.get_submodule(local).in_features, device=layer_device(layer)), 0]
                       for local in planned}

            def tap(local):
                def fn(x):
                    x = x.reshape(-1, x.shape[-1]).float()
                    squares[local][0] += (x * x).sum(0)
                    squares[local][1] += x.shape[0]
                return fn

            run_layer(layer, inputs, {local: tap(local) for local in planned})
            t = time.perf_counter()
            results, learning = learn_layer(layer, {local: plan[m.name] for local, m in planned.items()}, inputs,
                                            targets, iters, lr, seed + index,
                                            {local: s / max(n, 1) for local, (s, n) in squares.items()},
                                            autocast=step_dtype(layer_device(layer), next(layer.parameters()).dtype,
                                                                dtype),
                                            head=output_head(model, arch, index) if output_kl else None,
                                            advance=True)
            report.layers[index] = learning
            seconds = (time.perf_counter() - t) / len(planned)
            for local, m in planned.items():
                _store(layer.get_submodule(local), results[local])
                spec = plan[m.name]
                report.modules[m.name] = ModuleStats(spec.bits, spec.group_size, seconds, None,
                                                     squares[local][1])
                if on_result:
                    on_result(m.name, results[local])
        else:
            run_layer(layer, inputs, advance=True)
        fp_inputs.hidden = targets
        fp_inputs.index += 1
        if on_layer:
            on_layer(index, layer)


TRIM_AFTER_BYTES = 64 * 2**20  # the heap is trimmed after an input group whose H is this large (d_in >= 4096): 1.5
# ms to 15 ms a trim, 2% of SmolLM2's GPTQ time if done after every group
RESULTS_TRIM_BYTES = 64 * 2**20  # and after results of that many float32 bytes were dropped: batches of experts'
# working memory and results, freed between the checkpoint's packed tensors, left the heap 2.7 GB larger by the end
# of a Qwen3-30B-A3B-shaped layer's 256 gate/up projections (8.0 GB at the peak instead of 5.3)
FLOAT_INPUTS_BYTES = 2 * 2**30  # float-model inputs of a layer's linears held at once (asymmetric calibration)
HESSIAN_BYTES_PER_PASS = 4 * 2**30  # Hessians gathered in one pass over a layer's inputs, at most (routed experts)


def _chunks(step: list[list[str]], layer: nn.Module) -> list[list[list[str]]]:
    """The groups of a step in passes whose float32 Hessians fit :data:`HESSIAN_BYTES_PER_PASS` (one group per
    pass at least): the down projections of a Mixtral-sized layer's 8 experts alone would take 6.6 GB."""
    out: list[list[list[str]]] = [[]]
    held = 0
    for group in step:
        size = 4 * layer.get_submodule(group[0]).in_features ** 2
        if out[-1] and held + size > HESSIAN_BYTES_PER_PASS:
            out.append([])
            held = 0
        out[-1].append(group)
        held += size
    return out


def _float_output_targets(layer: nn.Module, group: list[str], modules: dict, plan: Plan, h: torch.Tensor, tokens: int,
                          shift: torch.Tensor | None, alpha: float) -> dict[str, tuple[torch.Tensor, float]]:
    """Asymmetric calibration (:class:`Calibration`): the weights GPTQ approximates for each linear of an input
    ``group`` (tasa.quant.gptq.float_output_targets of C = ``shift``), with the seconds each took, {local: (weights,
    seconds)}; empty under plain calibration or for a routed expert no token reached.  C, a (d_in, d_in) matrix
    like H, is released (the caller passes its last reference) once the products W C are taken, before the solve
    and before GPTQ's: 0.8 GB less at the peak of a 14336-wide down projection's."""
    if shift is None or not tokens:
        return {}
    t = time.perf_counter()
    by_damp: dict[float, list[str]] = {}
    for local in group:
        by_damp.setdefault(plan[modules[local].name].damp, []).append(local)
    weights = {local: layer.get_submodule(local).weight.data for local in group}
    products = {local: weights[local].float() @ shift.float() for local in group}
    del shift
    out = {}
    for damp, locals_ in by_damp.items():
        targets = float_output_targets([weights[local] for local in locals_], h,
                                       [products.pop(local) for local in locals_], alpha, damp)
        out.update(zip(locals_, targets))
    seconds = (time.perf_counter() - t) / len(group)
    return {local: (out[local], seconds) for local in group}


def _gptq_linears(layer: nn.Module, entries: list[tuple[str, torch.Tensor, int]],
                  targets: dict[str, tuple[torch.Tensor, float]], modules: dict, plan: Plan, report: QuantReport,
                  on_result, kept: dict[str, QuantResult] | None) -> None:
    """GPTQ of planned linears of ``layer``, in place: ``entries`` (local name, Hessian, calibration tokens) each;
    the same Hessian tensor for linears fed the same input (factorised once), and those of one shape and spec
    quantized as a batch (tasa.quant.gptq.gptq_quantize_many).  A routed expert no token reached is rounded to
    nearest on the same grid instead, and reported so.  ``targets`` (asymmetric calibration:
    :func:`_float_output_targets`' weights and seconds, by local name; each popped once done): GPTQ of those
    weights instead of the linear's own (the relative error is then measured against them).  ``kept``: each result
    is kept there (for learned rounding); otherwise dropped once stored and handed to ``on_result`` (an 8B layer's
    are 0.8 GB by down_proj's)."""
    names = [modules[local].name for local, *_ in entries]
    weights = [targets[local][0] if local in targets else layer.get_submodule(local).weight.data
               for local, _, _ in entries]
    freed = 0  # bytes of results dropped since the heap was last trimmed
    for i, result, seconds in gptq_quantize_many(weights, [h for _, h, _ in entries],
                                                 [plan[name] for name in names], names, keep_rounded=kept is not None):
        cancel_point()
        local, h, tokens = entries[i]
        name, spec = names[i], plan[names[i]]
        target_seconds = targets.pop(local)[1] if local in targets else 0.0
        t = time.perf_counter()
        err = _relative_error(weights[i], result.weight, h) if tokens else None
        weights[i] = None  # (read by GPTQ only when its batch is formed: a target is freed once its result is done)
        _store(layer.get_submodule(local), result)
        report.modules[name] = ModuleStats(spec.bits, spec.group_size,
                                           target_seconds + seconds + time.perf_counter() - t, err,
                                           tokens, None if tokens else "rtn: no calibration token reached it")
        if on_result:
            on_result(name, result)
        if kept is not None:
            kept[local] = result
        freed += 0 if kept is not None else result.weight.numel() * 4
        del result
        if freed >= RESULTS_TRIM_BYTES:  # (what glibc keeps of the batches' working memory, results and packing)
            return_freed_memory()
            freed = 0


def _trim_after(h: torch.Tensor) -> None:
    """After an input group whose H is wide, return to the system what glibc would keep of its H, targets and
    working memory."""
    if h.numel() * h.element_size() >= TRIM_AFTER_BYTES:
        return_freed_memory()
