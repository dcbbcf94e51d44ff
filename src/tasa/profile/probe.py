"""Measured sensitivity probes: quantize one unit, run only the layers from its own on.

For every objective the hidden states entering decoder layer ``l`` are computed
once (full precision) and kept; the probe of a unit of layer ``l`` (the whole
layer, or one linear module) at ``b`` bits quantizes that unit in place with
RTN, runs layers ``l..L-1`` plus the model's own final norm and head from the
kept states, scores the objective, and restores the weights.  The kept states
then advance one layer.  Cost: L(L+1)/2 layer passes per unit kind and
bit-width instead of L^2.

The tail runs through the model's own forward (its final norm, head, logit
soft-capping, per-layer attention masks) with the decoder-layer list
temporarily cut to ``layers[l:]`` and layer ``l``'s input replaced by the kept
state, so no per-architecture code is needed.

The probe quantizer is RTN (the unit's intrinsic sensitivity), or, given
calibration token ids, GPTQ: each module with the Hessian of its input in the
full-precision model on that calibration (the calibration's hidden states
advance layer by layer beside the objectives'), so the probe measures the
damage GPTQ leaves, which the final model will carry.

Every finished probe is written atomically to ``store_dir/probes/``; a killed
run resumes where it stopped and gives the same result.

What computes the probes is a runner: :class:`SerialProbes` here, or a distributed
one (tasa.distributed) running the same :class:`Scorer` on Ray workers while this
process walks the layers and keeps the store.  This file is longer than ~400 lines
because the probe engine's parts (units, the quantize-and-restore swap, kept states,
the probe store, the scorer, the serial runner, the walk) share its data and are
read together.
"""
from __future__ import annotations

import hashlib
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from tasa.artifacts import fingerprint, read_json, write_json_atomic
from tasa.errors import TasaError
from tasa.models import compute_device, compute_dtype
from tasa.models.arch import ModelArch
from tasa.profile.objectives import KL_TOPK, Batch, ItemLosses, Objective, item_losses
from tasa.eval.metrics import TokenScores
from tasa.profile.scores import forward_token_nll, forward_token_scores
from tasa.config import ProfileSpec, QuantSpec
from tasa.plan import expert_container
from tasa.models.walker import (KeptStates, capture, capture_ids, forward_layer, input_groups, run_layer, tail_from,
                               walk)
from tasa.quant.apply import layer_hessians
from tasa.quant.gptq import gptq_quantize_many
from tasa.quant.rtn import rtn_quantize


def objective_batches(model: nn.Module, objectives: list[Objective], batch_tokens: int,
                      max_logits_gb: float = 2.0) -> dict[str, list[Batch]]:
    """Each objective's rows in forward batches (see :meth:`Objective.row_slices`), on the model's device."""
    dtype, device = compute_dtype(model), compute_device(model)
    max_scored = max(1, int(max_logits_gb * 2**30 // (model.get_output_embeddings().weight.shape[0] * 8)))
    return {o.name: [o.batch(r, dtype, device) for r in o.row_slices(batch_tokens, max_scored)]
            for o in objectives}


def head_is_plain(model: nn.Module, batch: Batch) -> bool:
    """Whether the model's logits are just its output embedding applied to the final hidden state
    (no soft-capping or scaling after it), judged on ``batch``."""
    with torch.no_grad():
        fast = forward_token_nll(model, batch, plain_head=True)
        own = forward_token_nll(model, batch, plain_head=False)
    return bool(torch.allclose(fast, own, atol=1e-3, rtol=1e-4))


def tail_token_scores(model: nn.Module, arch: ModelArch, batch: Batch, layer: int, hidden: torch.Tensor,
                      plain_head: bool = True, topk: int = 0,
                      reference: tuple[torch.Tensor, torch.Tensor] | None = None) -> TokenScores:
    """:func:`forward_token_scores`, running only layers ``layer..L-1`` from ``hidden``."""
    with tail_from(model, arch, layer, hidden), torch.no_grad():
        return forward_token_scores(model, batch, plain_head, topk, reference)


def tail_token_nll(model: nn.Module, arch: ModelArch, batch: Batch, layer: int, hidden: torch.Tensor,
                   plain_head: bool = True) -> torch.Tensor:
    """:func:`forward_token_nll`, running only layers ``layer..L-1`` from ``hidden``."""
    return tail_token_scores(model, arch, batch, layer, hidden, plain_head).nll


@dataclass
class Unit:
    """What one probe quantizes: a whole layer or one module of it."""

    name: str  # "layer.7" or the module's full name
    layer: int
    modules: tuple[str, ...]  # full module names


def check_granularity(granularity: str) -> None:
    if granularity not in ("layer", "module"):
        raise TasaError(f"granularity must be 'layer' or 'module', got {granularity!r}")


def units(arch: ModelArch, granularity: str, layers: list[int] | None = None) -> list[Unit]:
    """The probe units (of ``layers`` only, when given) in layer order: whole layers, or modules (the routed
    experts of a layer one unit when ``arch.tie_experts``)."""
    check_granularity(granularity)
    if layers is not None:
        bad = [i for i in layers if not 0 <= i < arch.num_layers]
        if bad:
            raise TasaError(f"layer {bad[0]} out of range; the model has layers 0..{arch.num_layers - 1}")
    if granularity == "layer":
        out = [Unit(f"layer.{i}", i, tuple(m.name for m in arch.layer_modules(i))) for i in range(arch.num_layers)]
    else:
        out = []
        for i in range(arch.num_layers):
            prefix = f"{arch.spec.layers_path}.{i}."
            tied = {local: group for group in arch.expert_groups(i) for local in group} if arch.tie_experts else {}
            for m in arch.layer_modules(i):
                group = tied.get(m.local)
                if group is None:
                    out.append(Unit(m.name, i, (m.name,)))
                elif m.local == group[0]:  # the routed experts of the layer: one unit, probed together
                    out.append(Unit(prefix + expert_container(m.local), i, tuple(prefix + n for n in group)))
    return out if layers is None else [u for u in out if u.layer in set(layers)]


@contextmanager
def quant_swapped(model: nn.Module, module_names: tuple[str, ...], bits: int, group_size: int, sym: bool,
                  hessians: dict[str, torch.Tensor] | None = None, damp: float = 0.01):
    """Quantize the named linears in place for the duration of the block, then restore them exactly:
    RTN, or GPTQ with ``hessians[name]`` (2/n X^T X of the module's input) when given.

    GPTQ quantizes the unit's linears as :func:`gptq_quantize_many` does: linears fed the same input (q/k/v,
    gate/up of a layer) share one factorisation of their Hessian, and a layer's routed experts run as batches;
    each weight is what :func:`gptq_quantize` gives it alone.

    Yields {name: original weight}."""
    saved = {}
    try:
        with torch.no_grad():
            lins = [model.get_submodule(name) for name in module_names]
            for name, lin in zip(module_names, lins):
                saved[name] = lin.weight.detach().clone()
            if hessians is None:
                for lin in lins:
                    lin.weight.copy_(rtn_quantize(lin.weight.detach(), bits, group_size, sym).weight
                                     .to(lin.weight.dtype))
            else:
                spec = QuantSpec(bits=bits, group_size=group_size, sym=sym, damp=damp)
                for i, q, _ in gptq_quantize_many([saved[name] for name in module_names],
                                                  [hessians[name] for name in module_names],
                                                  [spec] * len(lins), list(module_names)):
                    lins[i].weight.copy_(q.weight.to(lins[i].weight.dtype))
                    del q
        yield saved
    finally:
        with torch.no_grad():
            for name, w in saved.items():
                model.get_submodule(name).weight.copy_(w)


def state_bytes(model: nn.Module, batches: dict[str, list[Batch]]) -> int:
    """Bytes of the hidden states kept for every batch (padded tokens x hidden size x element size)."""
    emb = model.get_input_embeddings()
    per_token = emb.weight.shape[1] * emb.weight.element_size()
    return sum(b.inputs["input_ids"].numel() * per_token for bs in batches.values() for b in bs)


class ProbeStore:
    """Finished probes as one JSON file each under ``root/probes``, tied to a settings fingerprint."""

    def __init__(self, root: str | Path, settings: dict):
        self.root = Path(root)
        self.dir = self.root / "probes"
        self.dir.mkdir(parents=True, exist_ok=True)
        fp_file = self.root / "probe_settings.json"
        if fp_file.is_file():
            old = read_json(fp_file)
            if fingerprint(old) != fingerprint(settings):  # the one fingerprint of tasa's resumable artifacts
                changed = sorted(k for k in set(old) | set(settings) if old.get(k) != settings.get(k))
                raise TasaError(f"{self.root} holds probes made with other settings ({', '.join(changed)}); "
                                "use another output directory or --overwrite")
        else:
            write_json_atomic(fp_file, settings)

    def _path(self, key: str) -> Path:
        return self.dir / (hashlib.sha1(key.encode()).hexdigest()[:16] + ".json")

    def get(self, key: str) -> dict | None:
        p = self._path(key)
        if not p.is_file():
            return None
        rec = read_json(p)
        return rec if rec.get("key") == key else None

    def put(self, key: str, value: dict) -> None:
        write_json_atomic(self._path(key), {"key": key, **value})

    def get_base(self) -> dict[str, ItemLosses] | None:
        """The full-precision pass's losses, when an earlier run kept them."""
        p = self.root / "probe_base.json"
        return _losses_from(read_json(p)["losses"]) if p.is_file() else None

    def put_base(self, losses: dict[str, ItemLosses]) -> None:
        write_json_atomic(self.root / "probe_base.json", {"losses": _losses_record(losses)})


@dataclass
class ProbeResults:
    """Per-item losses of the full-precision model and of every probe, per objective."""

    base: dict[str, ItemLosses]
    probes: dict[tuple[str, int], dict[str, ItemLosses]]  # (unit name, bits) -> objective -> losses
    units: list[Unit]
    seconds: float  # wall time of this call
    probe_seconds: float = 0.0  # compute of all probes, also those resumed from an earlier run
    placement: dict | None = None  # where the probes ran: the runner's info()


def _losses_record(losses: dict[str, ItemLosses]) -> dict:
    return {k: {"nll": v.nll.tolist(), "tokens": v.tokens.tolist(),
                **({} if v.choice_logp is None else {"choice_logp": v.choice_logp.tolist()}),
                **({} if v.kl is None else {"kl": v.kl.tolist()})}
            for k, v in losses.items()}


def _losses_from(rec: dict) -> dict[str, ItemLosses]:
    def opt(v: dict, key: str) -> torch.Tensor | None:
        return torch.tensor(v[key], dtype=torch.float64) if key in v else None

    return {k: ItemLosses(torch.tensor(v["nll"], dtype=torch.float64), torch.tensor(v["tokens"], dtype=torch.float64),
                          opt(v, "choice_logp"), opt(v, "kl"))
            for k, v in rec.items()}


class _Calibration:
    """The calibration's inputs of the current decoder layer (full precision) and, computed on first use,
    the Hessian of every linear's input in that layer."""

    def __init__(self, model: nn.Module, arch: ModelArch, calib_ids: torch.Tensor, batch_size: int):
        self.arch = arch
        self.inputs = capture_ids(model, arch, calib_ids, batch_size, compute_device(model))
        self._hessians: dict[str, torch.Tensor] | None = None

    def hessians(self) -> dict[str, torch.Tensor]:
        if self._hessians is None:
            index = self.inputs.index
            layer = self.arch.layers[index]
            mods = {m.local: m.name for m in self.arch.layer_modules(index)}
            with torch.no_grad():
                groups = input_groups(layer, list(mods), self.inputs)
                h = layer_hessians(layer, self.inputs, [g[0] for g in groups])
            self._hessians = {mods[local]: h[g[0]] for g in groups for local in g}
        return self._hessians

    def advance(self) -> None:
        with torch.no_grad():
            run_layer(self.arch.layers[self.inputs.index], self.inputs, advance=True)
        self._hessians = None


StateKey = tuple[str, int]  # (objective name, batch index)


class Scorer:
    """Scores every objective from the inputs kept for one decoder layer, with a unit quantized or not: the
    one probe computation of the serial profile and of every distributed worker (tasa.distributed)."""

    def __init__(self, model: nn.Module, arch: ModelArch, objectives: list[Objective],
                 batches: dict[str, list[Batch]], plain_head: bool):
        self.model, self.arch, self.objectives, self.batches, self.plain = model, arch, objectives, batches, plain_head
        # the full-precision top-k log-probs of every scored token, per batch (from :meth:`base`): every probe also
        # measures the token KL (the cost of text objectives by default; kept for every objective, so one profile
        # serves every cost form)
        self.refs: dict[StateKey, tuple[torch.Tensor, torch.Tensor]] = {}

    def state_keys(self) -> list[StateKey]:
        return [(o.name, i) for o in self.objectives for i in range(len(self.batches[o.name]))]

    def batch_scores(self, key: StateKey, layer: int, state: torch.Tensor,
                     keep_reference: bool = False) -> TokenScores:
        """One batch's token scores, running layers ``layer..L-1`` from ``state``; with ``keep_reference`` also
        its top-k log-probs (the full-precision pass), else its KL from the kept references."""
        return tail_token_scores(self.model, self.arch, self.batches[key[0]][key[1]], layer, state, self.plain,
                                 topk=KL_TOPK if keep_reference else 0, reference=self.refs.get(key))

    def keep_references(self, scores: dict[StateKey, TokenScores]) -> None:
        self.refs.update({k: (sc.topk[0], sc.topk[1].int()) for k, sc in scores.items()})

    def losses(self, scores: dict[StateKey, TokenScores], keep_reference: bool = False) -> dict[str, ItemLosses]:
        """Every objective's per-item losses from its batches' token scores (no KL in the full-precision pass)."""
        out = {}
        for o in self.objectives:
            keys = [(o.name, i) for i in range(len(self.batches[o.name]))]
            width = o.input_ids.shape[1]

            def cat(ts):
                return torch.cat([F.pad(t, (0, width - t.shape[1])) for t in ts]).cpu()

            out[o.name] = item_losses(o, cat([scores[k].nll for k in keys]),
                                      None if keep_reference else cat([scores[k].kl for k in keys]))
        return out

    def score(self, layer: int, states: Callable[[StateKey], torch.Tensor],
              keep_reference: bool = False) -> dict[str, ItemLosses]:
        """Per-item losses of every objective, running layers ``layer..L-1`` from ``states((objective, batch))``;
        ``keep_reference`` keeps the top-k log-probs as the KL references (the full-precision pass)."""
        scores = {k: self.batch_scores(k, layer, states(k), keep_reference) for k in self.state_keys()}
        if keep_reference:
            self.keep_references(scores)
        return self.losses(scores, keep_reference)

    def swapped(self, unit: Unit, bits: int, spec: ProfileSpec, hessians: dict[str, torch.Tensor] | None = None):
        """Within the block, ``unit`` quantized at ``bits`` as ``spec`` says (RTN, or GPTQ on ``hessians``)."""
        return quant_swapped(self.model, unit.modules, bits, spec.group_size, spec.sym, hessians, spec.damp)

    def probe(self, unit: Unit, bits: int, spec: ProfileSpec, states: Callable[[StateKey], torch.Tensor],
              hessians: dict[str, torch.Tensor] | None = None) -> dict[str, ItemLosses]:
        """The losses with ``unit`` quantized at ``bits`` (RTN, or GPTQ on ``hessians``), weights restored after."""
        with self.swapped(unit, bits, spec, hessians):
            return self.score(unit.layer, states)


@dataclass(frozen=True)
class ProbeJob:
    key: str  # "unit@bits", the probe store's key
    unit: Unit
    bits: int


class SerialProbes:
    """Runs each probe when it is submitted, in this process, on the kept inputs of the current layer."""

    def __init__(self, scorer: Scorer, spec: ProfileSpec):
        self.scorer, self.spec = scorer, spec
        self.done: list[tuple[str, dict[str, ItemLosses], float]] = []

    def base(self, states: "KeptStates") -> dict[str, ItemLosses]:
        """The full-precision pass from layer 0's inputs: the base losses, and the scorer's KL references."""
        return self.scorer.score(0, states.get, keep_reference=True)

    def start_layer(self, layer: int, states: "KeptStates", calib: _Calibration | None) -> None:
        self.states, self.calib = states, calib

    def submit(self, job: ProbeJob) -> None:
        t = time.perf_counter()
        hessians = self.calib.hessians() if self.calib is not None else None
        losses = self.scorer.probe(job.unit, job.bits, self.spec, self.states.get, hessians)
        self.done.append((job.key, losses, time.perf_counter() - t))

    def finished(self, wait: bool = False) -> list[tuple[str, dict[str, ItemLosses], float]]:
        """The probes finished since the last call: (key, losses, compute seconds); with ``wait``, one at least
        unless none is left to finish."""
        out, self.done = self.done, []
        return out

    def info(self) -> dict:
        return {"backend": "serial", "threads": torch.get_num_threads()}

    def close(self) -> None:
        pass


def run_probes(model: nn.Module, arch: ModelArch, objectives: list[Objective], spec: ProfileSpec,
               store: ProbeStore | None = None, calib_ids: torch.Tensor | None = None, calib_batch: int = 8,
               max_logits_gb: float = 2.0, progress: bool = True, runner=None) -> ProbeResults:
    """Measure every unit (of ``spec.layers``, default all) at every bit-width of ``spec`` on every objective.

    Probes quantize with RTN (``spec.group_size``, which must be resolved, and ``spec.sym``), or with GPTQ
    (dampening ``spec.damp``) on the Hessians of ``calib_ids`` ((n, seqlen) token ids, run ``calib_batch``
    sequences at a time) when given.

    A batch holds at most ``spec.batch_tokens`` padded tokens, and at most as many
    scored tokens as keep their float32 logits within ``max_logits_gb``.  The
    kept layer inputs take padded tokens x hidden size elements per objective;
    past ``spec.max_state_gb`` they are spilled to disk (under the store's directory,
    or a temporary one) and read back batch by batch.

    ``runner``: what computes the full-precision pass and the probes, given the :class:`Scorer` and ``spec``;
    default :class:`SerialProbes`, here and now.  The store keeps the full-precision pass too: when it holds every
    probe and that pass, nothing runs (``placement`` None).  A distributed runner
    (tasa.distributed) computes them elsewhere while this process walks the layers and keeps the store.
    """
    if spec.group_size is None:
        raise ValueError("run_probes needs a resolved group size")
    t0 = time.perf_counter()
    plan_units = units(arch, spec.granularity, spec.layers)
    jobs = [ProbeJob(f"{u.name}@{b}", u, b) for u in plan_units for b in spec.bits]  # in the results' order
    stored = {}  # key -> (losses, compute seconds) of the probes an earlier run finished, read once
    if store is not None:
        for job in jobs:
            if (rec := store.get(job.key)) is not None:
                stored[job.key] = (_losses_from(rec["losses"]), float(rec.get("seconds", 0.0)))
    missing = [job for job in jobs if job.key not in stored]
    # everything stored, the full-precision pass too: no pass of the model
    if not missing and store is not None and (kept_base := store.get_base()) is not None:
        return ProbeResults(kept_base, {(j.unit.name, j.bits): stored[j.key][0] for j in jobs},
                            plan_units, time.perf_counter() - t0, sum(secs for _, secs in stored.values()))
    batches = objective_batches(model, objectives, spec.batch_tokens, max_logits_gb)
    scorer = Scorer(model, arch, objectives, batches, head_is_plain(model, batches[objectives[0].name][0]))
    spill = None
    if state_bytes(model, batches) > spec.max_state_gb * 2**30:
        spill = (store.root / "kept-states") if store else Path(tempfile.mkdtemp(prefix="tasa-states-"))
    hidden = KeptStates(spill)
    probes: dict = {}
    probe_seconds = 0.0  # measured compute of every probe, including those recorded by an earlier run
    bar = tqdm(total=len(jobs), desc=f"probes ({spec.granularity})", disable=not progress)

    def record(key: str, losses: dict[str, ItemLosses], secs: float, stored: bool = False) -> None:
        nonlocal probe_seconds
        probe_seconds += secs
        if store and not stored:
            store.put(key, {"losses": _losses_record(losses), "seconds": secs})
        probes[key] = losses
        bar.update(1)

    run = None
    try:
        calib = None if calib_ids is None else _Calibration(model, arch, calib_ids, calib_batch)
        layer_kwargs = {}  # objective -> [batch][layer] -> the keyword arguments the model passes that layer
        for o in objectives:
            captured = capture(model, arch, [b.inputs for b in batches[o.name]])
            layer_kwargs[o.name] = captured.kwargs
            for i, h in enumerate(captured.hidden):
                hidden.put((o.name, i), h)
            del captured
        for key, (losses, secs) in stored.items():
            record(key, losses, secs, stored=True)
        run = runner(scorer, spec) if runner is not None and missing else SerialProbes(scorer, spec)
        base = run.base(hidden)  # it also sets the KL references of the probes still to run
        if store is not None:
            store.put_base(base)
        last = max((j.unit.layer for j in missing), default=-1)  # the layers are walked only as far as a probe is left
        for layer, module in walk(arch, compute_device(model)):  # resident while probed (a streamed model's too)
            if layer > last:
                break
            todo = [j for j in missing if j.unit.layer == layer]
            if todo:
                run.start_layer(layer, hidden, calib)
                for job in todo:
                    run.submit(job)
                    for key, losses, secs in run.finished():  # stored as soon as done: a kill loses little
                        record(key, losses, secs)
            if layer < last:
                if calib is not None:
                    calib.advance()
                with torch.no_grad():
                    for o in objectives:
                        for i in range(len(batches[o.name])):
                            hidden.put((o.name, i), forward_layer(module, hidden.get((o.name, i)),
                                                                  layer_kwargs[o.name][i][layer], layer))
        while done := run.finished(wait=True):  # the rest, stored as they finish
            for key, losses, secs in done:
                record(key, losses, secs)
        bar.close()
        ordered = {(j.unit.name, j.bits): probes[j.key] for j in jobs}
        return ProbeResults(base, ordered, plan_units, time.perf_counter() - t0, probe_seconds, run.info())
    finally:
        if run is not None:
            run.close()
        hidden.close()
