"""tasa run: [mixture search ->] profile -> aggregate + allocate -> quantize (GPTQ) -> export -> evaluate ->
report, each stage recorded in stages.json under a hash of its inputs (tasa.stages)."""
from __future__ import annotations

import dataclasses
import gc
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from tasa.artifacts import write_json_atomic
from tasa.cancel import Overtime, deadline
from tasa.config import (BETTER_BF16_BATCH, BETTER_OPTIONS, GENERAL_TEXT, AllocationSpec, CalibSpec, EvalSpec,
                         ExportSpec, MixtureSpec, ProfileSpec, QuantizeSpec, QuantSpec, RunSpec, Runtime)
from tasa.data import resolve_calibration_source, store
from tasa.errors import TasaError
from tasa.models import resolve, streamer_of
from tasa.models.loading import parse_dtype
from tasa.numerics import native_bfloat16
from tasa.pipeline.allocate import allocate_bits
from tasa.pipeline.common import AUTO_GROUP_SIZES, check_new_dir, check_writable, model_of, validation_group_size
from tasa.pipeline.evaluate import evaluate
from tasa.pipeline.profile import profile
from tasa.pipeline.quantize import gguf_template, quantize
from tasa.pipeline.quantizer_choice import Candidate, Choice, choose, head_factor
from tasa.pipeline.search_mixture import search_mixture
from tasa.quant.rtn import SYM_GRID

log = logging.getLogger("tasa.pipeline")

DEFAULT_BITS = (3, 4, 8)  # tasa run's candidate bit-widths (those the target serves)


@dataclass(frozen=True)
class RunResult:
    """A finished run: its directory and run.json (calibration used, stages run, seconds, sizes, warnings,
    report path)."""

    output_dir: Path
    record: dict = field(repr=False)


class _SharedModel:
    """The one model a run loads, on first need (a run whose stages are all done loads nothing): full
    precision through the mixture search, profile and full-precision evaluation (each leaves the weights as
    they were), then quantized in place by the quantize stage, whose checkpoint holds bitwise the same weights.
    A run resumed after quantization loads the checkpoint instead."""

    def __init__(self, name: str, runtime: Runtime):
        self.name, self.runtime = name, runtime
        self.lm = None
        self.is_quantized = False

    def fp(self):
        if self.is_quantized:
            raise RuntimeError("the shared model is already quantized")
        if self.lm is None:
            self.lm, _ = model_of(self.name, self.runtime)
        return self.lm

    def in_dtype(self, dtype) -> None:
        """Cast the model's parameters to ``dtype`` for a quantizer that computes in it, as loading it in that
        dtype would (buffers such as rotary frequencies keep theirs; a streamed model then reads its layers in
        it)."""
        for p in self.fp().model.parameters():
            if p.is_floating_point() and p.dtype != dtype:
                p.data = p.data.to(dtype)

    def drop(self) -> None:
        """Forget the model (cast, or quantized in another dtype than the run's): the next stage loads it again,
        the checkpoint once quantized."""
        self.lm = None
        gc.collect()

    def quantized_in_memory(self) -> None:
        """The quantize stage ran on the shared model: in memory, it now holds the quantized weights; streamed,
        it dropped them layer by layer (the checkpoint is read instead)."""
        if streamer_of(self.lm.model) is None:
            self.is_quantized = True

    def quantized(self, checkpoint: Path):
        """The quantized model, named as its checkpoint (so records read the same either way)."""
        if self.is_quantized:
            return dataclasses.replace(self.lm, source=str(checkpoint), path=str(checkpoint))
        return str(checkpoint)


def _no_calibration_rows(task: str) -> str | None:
    """Why ``task`` cannot supply calibration rows to a mixture search, or None when it can."""
    try:
        kind = resolve_calibration_source(task).kind
    except TasaError as e:
        return f"cannot be a calibration source: {e}"
    return None if kind == "rows" else "is not a built-in dataset with calibration rows"


def _calibration(spec: RunSpec, warnings: list[str]) -> str:
    """The run's calibration: ``spec.calib``, or "auto" / GENERAL_TEXT when it is None (with a warning saying why)."""
    if spec.calib not in (None, "auto"):
        return spec.calib
    problem = next(((t, p) for t in spec.tasks if (p := _no_calibration_rows(t))), None)
    if problem and spec.calib == "auto":
        raise TasaError(f"--calib auto calibrates on the tasks' own rows; task {problem[0]!r} {problem[1]}"
                        " (pass --calib explicitly)")
    if problem:
        warnings.append(f"calibration: task {problem[0]!r} {problem[1]}, so no mixture is searched; "
                        f"calibrating on {GENERAL_TEXT} (pass --calib to choose)")
        log.warning(warnings[-1])
    return GENERAL_TEXT if problem else "auto"


def _check_run_dir(out: Path) -> None:
    check_new_dir(out)
    if out.is_dir() and any(out.iterdir()) and not (out / "stages.json").is_file():
        raise TasaError(f"output directory {out} is not empty and holds no tasa run")
    check_writable(out, out)


def _profile_needed_bits(lm, out: Path, spec: ProfileSpec, allocation: AllocationSpec,
                         runtime: Runtime) -> tuple:
    """Profile only the bit-widths an optimal plan under ``allocation`` can use: first the candidates up to the
    smallest one at or above the budget, then any other the allocation could still choose (by the zero-cost
    bound of tasa.allocate.plan.unprofiled_bits_used), until none is left.  Probes already measured are reused.
    Returns the profile and the candidates left unprofiled."""
    from tasa.allocate.plan import unprofiled_bits_used

    bits = sorted(spec.bits)
    above = [b for b in bits if b >= allocation.budget]
    todo = [b for b in bits if b <= (above[0] if above else bits[-1])]
    while True:
        s = profile(lm, out, dataclasses.replace(spec, bits=tuple(todo)), runtime, restart_if_changed=True)
        more = unprofiled_bits_used(s.record, allocation.budget, bits, beta=allocation.beta,
                                    task_weights=allocation.weights,
                                    budget_includes_metadata=allocation.budget_includes_metadata,
                                    target=allocation.target)
        if not more:
            skipped = [b for b in bits if b not in todo]
            if skipped:
                log.info("bit-width(s) %s not profiled: no plan under the budget can use them (zero-cost bound)",
                         ", ".join(map(str, skipped)))
            return s, skipped
        todo = sorted({*todo, *more})


def quantize_runtime(runtime: Runtime) -> Runtime:
    """The quantize stage's runtime: the profile's placement settings (--placement, --stages) do not apply to it;
    with --distributed its calibration is spread in shards over workers that each load the model (streamed when
    this process streams it)."""
    if runtime.cluster.backend is None:
        return runtime
    return dataclasses.replace(runtime, cluster=dataclasses.replace(runtime.cluster, placement="auto", stages=None))


def run(model: str, output_dir: str | Path, spec: RunSpec, runtime: Runtime = Runtime()) -> RunResult:
    """The whole method on ``model``, resumable.

    ``spec.calib="auto"`` first chooses the calibration mixture of wikitext2 and the tasks by
    ``spec.mixture_criterion`` (see :func:`search_mixture`; ``search_samples`` x ``seqlen`` tokens per source and
    held out).
    ``probe_quantizer``: ``rtn`` profiles with RTN probes (the method's default); ``gptq`` with probes that
    GPTQ-quantize their layer on the run's calibration.  ``granularity``: ``layer`` profiles and allocates whole
    decoder layers (the method's default); ``module`` probes every linear module and allocates over all of them
    at once (7x the probes).

    Every stage writes its artifact into ``output_dir`` and is recorded in ``stages.json`` under a hash of its
    inputs (see tasa.stages): a rerun skips finished stages, a killed run resumes at the unfinished one.  The
    objectives profiled are wikitext2 (perplexity) and the tasks; evaluation covers the same on held-out test
    rows: the first ``eval_limit`` rows of each task, zero-shot (as profiled), and ``eval_windows`` wikitext2
    windows.
    """
    from tasa.allocate.plan import candidate_bits, check_budget
    from tasa.allocate.targets import get_target, target_for
    from tasa.eval.tasks import get_task
    from tasa.report.run_report import write_run_report
    from tasa.stages import Stages, stage_key as _key

    tasks = list(spec.tasks)
    spec.quantize_spec().check_distributed(runtime.cluster.backend is not None)
    for t in tasks:  # bad names and specs, and too few test rows, fail before any work
        get_task(t).select(spec.eval_limit, "--eval-limit")
    run_warnings: list[str] = []
    calib = _calibration(spec, run_warnings)
    fmt = spec.export_format or get_target(spec.target).format
    tgt = get_target(spec.target) if fmt == "fp" else target_for(spec.target, fmt)  # fp: served by none
    export = ExportSpec(fmt, tgt.name, gguf_template=spec.gguf_template, llama_cpp=spec.llama_cpp)
    if fmt == "gguf":
        gguf_template(model, export)  # a Hugging Face model without a way to its GGUF template: now
    bits = tuple(candidate_bits(tgt, None, DEFAULT_BITS) if spec.bits is None
                 else candidate_bits(tgt, spec.bits, spec.bits))
    for b in bits:
        QuantSpec(bits=b, group_size=validation_group_size(spec.group_size))  # bits in range, a valid group size
    # before the mixture search and profile; the metadata bound uses the smallest per-weight metadata the group
    # size allows (auto: 128's; per channel: none, it depends on the input sizes); allocation checks it exactly
    g = spec.group_size
    check_budget(spec.budget, bits, AUTO_GROUP_SIZES[0] if g is None else (g if g > 0 else None),
                 spec.budget_includes_metadata)
    out = Path(output_dir)
    _check_run_dir(out)
    stages = Stages(out)
    shared = _SharedModel(model, runtime)
    objectives = [GENERAL_TEXT, *tasks]
    data_fp = store.fingerprint()  # where the built-in rows come from: part of every stage's inputs
    model_in = {"model": model, "data": data_fp, "dtype": runtime.dtype}

    if calib == "auto":
        m_in = {**model_in, "tasks": tasks, "criterion": spec.mixture_criterion, "search_samples": spec.search_samples,
                "seqlen": spec.seqlen, "seed": spec.seed, "group_size": spec.group_size,
                **({"grid": SYM_GRID} if spec.mixture_criterion == "measured" else {})}  # only it quantizes
        m_spec = MixtureSpec(general=GENERAL_TEXT, tasks=tuple(tasks), criteria=(spec.mixture_criterion,),
                             nsamples=spec.search_samples, heldout_samples=spec.search_samples, seqlen=spec.seqlen,
                             group_size=spec.group_size, seed=spec.seed)
        calib = stages.run("mixture", m_in, lambda: {
            "calib": search_mixture(shared.fp(), out / "mixture", m_spec, runtime).calib})["calib"]
    calib_spec = CalibSpec.parse(calib, nsamples=spec.nsamples, seqlen=spec.seqlen, seed=spec.seed)
    gptq = ({"calib": calib, "nsamples": spec.nsamples, "calib_seqlen": spec.seqlen}
            if spec.probe_quantizer == "gptq" else {})
    a_spec = AllocationSpec(budget=spec.budget, bits=bits, beta=spec.beta, task_weights=spec.task_weights,
                            budget_includes_metadata=spec.budget_includes_metadata, target=tgt.name)
    allocation = {"budget": spec.budget, "bits": sorted(bits), "beta": spec.beta, "task_weights": a_spec.weights,
                  "target": tgt.name, "budget_includes_metadata": spec.budget_includes_metadata}
    p_in = {**model_in, "objectives": objectives, "bits": sorted(bits), "group_size": spec.group_size,
            "probe_tokens": spec.probe_tokens, "seed": spec.seed, "choice_cost": spec.choice_cost,
            "token_cost": spec.token_cost, "grid": SYM_GRID,
            **({"probe_quantizer": "gptq", **gptq} if gptq else {}),  # GPTQ settings only then: RTN keys stay
            **({"granularity": "module"} if spec.granularity == "module" else {}),  # so do layer-granularity keys
            **({"tie_experts": False} if not spec.tie_experts else {}),
            "allocation": allocation}  # which bit-widths need probes depends on it (see _profile_needed_bits)
    p_spec = ProfileSpec(objectives=tuple(objectives), bits=bits, granularity=spec.granularity,
                         group_size=spec.group_size, probe_tokens=spec.probe_tokens, seed=spec.seed,
                         choice_cost=spec.choice_cost, token_cost=spec.token_cost,
                         probe_quantizer=spec.probe_quantizer, tie_experts=spec.tie_experts,
                         calib=calib_spec if gptq else None)

    def do_profile():
        s, skipped = _profile_needed_bits(shared.fp(), out / "profile", p_spec, a_spec, runtime)
        return {"sensitivity": str(out / "profile" / "sensitivity.json"), "warnings": s.warnings,
                "profiled_bits": s.record["bits"], "skipped_bits": skipped}

    prof = stages.run("profile", p_in, do_profile)
    a_spec = dataclasses.replace(a_spec, bits=tuple(prof.get("profiled_bits", bits)))
    a_in = {"profile": _key(p_in), **allocation}
    stages.run("allocate", a_in, lambda: allocate_bits(prof["sensitivity"], out / "plan.json", a_spec).summary)
    # its asymmetric calibration settled (the default depends on where it runs)
    q_spec = spec.quantize_spec().resolved("gptq", quantize_runtime(runtime).cluster.backend is not None)
    q_in = {"allocate": _key(a_in), "data": data_fp, "calib": calib, "nsamples": spec.nsamples,
            "seqlen": spec.seqlen, "seed": spec.seed, "grid": SYM_GRID,
            **({"scale_search": spec.scale_search} if spec.scale_search else {}),  # runs without them keep their key
            **({"act_order": spec.act_order, "static_groups": spec.static_groups}
               if spec.act_order or spec.static_groups else {}),
            **({"learn_rounding": spec.learn_rounding, "learn_lr": spec.learn_lr, "learn_dtype": spec.learn_dtype}
               if spec.learn_rounding else {}),
            **({"learn_start": spec.learn_start} if spec.learn_start != "rtn" else {}),  # earlier runs keep their key
            **({"learn_output_kl": True} if spec.learn_output_kl else {}),
            **({"float_targets": q_spec.float_targets} if q_spec.float_targets else {}),
            **({"gguf_template": spec.gguf_template} if spec.gguf_template else {}),
            **({"time_budget": spec.time_budget} if spec.time_budget is not None else {})}

    e_common = {"tasks": objectives, "limit": spec.eval_limit, "windows": spec.eval_windows, "num_fewshot": 0,
                "generate": spec.generate, "seqlen": spec.seqlen}
    e_spec = EvalSpec(tasks=tuple(objectives), limit=spec.eval_limit, windows=spec.eval_windows, num_fewshot=0,
                      seqlen=spec.seqlen, generate=spec.generate)
    fp_in = {**model_in, **e_common}
    # the full-precision evaluation comes before quantization, which changes the shared model in place
    stages.run("eval_fp", fp_in, lambda: evaluate(
        shared.fp(), dataclasses.replace(e_spec, log_samples=True), output=out / "eval-fp.json",
        runtime=runtime).results)

    def quantize_by(chosen: _Quantizer, after_layer=None):
        q_runtime = quantize_runtime(runtime)
        if chosen.batch_size:
            q_runtime = dataclasses.replace(q_runtime, batch_size=chosen.batch_size)
        return quantize(shared.fp(), out / "model", chosen.spec, calib_spec, plan=out / "plan.json", export=export,
                        runtime=q_runtime, overwrite=True, after_layer=after_layer)

    def do_quantize():
        choice = None
        chosen = _Quantizer(q_spec)
        if spec.time_budget is not None:
            done = stages.seconds()
            spent = sum(done.get(k, 0.0) for k in ("mixture", "profile", "allocate", "eval_fp"))
            # the quantized model's evaluation takes about the full-precision one's time: kept for it
            left = spec.time_budget * 60 - spent - done.get("eval_fp", 0.0)
            choice = _choose_quantizer(shared, spec, quantize_runtime(runtime), left, quantize_by)
            chosen = choice.candidate.spec
            log.info("quantizer: %s", choice.describe())
        if chosen.dtype is not None:
            shared.in_dtype(chosen.dtype)
        q = quantize_by(chosen)
        if chosen.dtype is None:
            shared.quantized_in_memory()
        else:  # the quantized model is evaluated from its checkpoint, in the run's dtype
            shared.drop()
        return {"average_bits": q.average_bits, "size_bytes": q.size_bytes, "seconds": q.seconds,
                "quantizer": q.record["quantizer"], "dtype": q.record["dtype"],
                **({"choice": {"chosen": choice.candidate.name, "seconds_left": choice.seconds_left,
                               "trials": choice.trials, "describe": choice.describe()}} if choice else {})}

    quant = stages.run("quantize", q_in, do_quantize)
    stages.run("eval_quant", {"quantize": _key(q_in), "eval_fp": _key(fp_in), **e_common}, lambda: evaluate(
        shared.quantized(out / "model"), e_spec, output=out / "eval-quant.json", reference=str(out / "eval-fp.json"),
        runtime=runtime).results)
    summary = {"model": model, "tasks": tasks, "calib": calib, "eval_limit": spec.eval_limit,
               "quantizer": quant.get("quantizer", q_spec.quantizer), "device": runtime.device,
               **({"quantize_dtype": quant["dtype"]} if "dtype" in quant else {}),
               **({"quantizer_choice": quant["choice"]} if "choice" in quant else {}),
               **({"time_budget": spec.time_budget} if spec.time_budget is not None else {}),
               "dtype": str(parse_dtype(runtime.dtype, runtime.device)).replace("torch.", ""),
               "bfloat16_native": native_bfloat16(runtime.primary),
               "eval_windows": spec.eval_windows, "seqlen": spec.seqlen, "nsamples": spec.nsamples, "seed": spec.seed,
               "probe_tokens": spec.probe_tokens, "profiled_bits": prof.get("profiled_bits"),
               "skipped_bits": prof.get("skipped_bits", []), "warnings": run_warnings + prof["warnings"],
               "sizes": _sizes(out / "model"), "seconds": stages.seconds(), "ran": stages.ran, "output_dir": str(out)}
    summary["report"] = str(write_run_report(out, summary))
    write_json_atomic(out / "run.json", summary)
    return RunResult(out, summary)


class _FirstLayerDone(Exception):
    """A quantizer's trial has quantized its first decoder layer."""


@dataclass(frozen=True)
class _Quantizer:
    """A quantizer of the run's plan: its options, and the model's dtype and the batch size while it quantizes
    (None: the run's)."""

    spec: QuantizeSpec
    dtype: object = None
    batch_size: int | None = None

    def name(self) -> str:
        """As a choice names it: the spec's quantizer, and the dtype and batch size it runs in."""
        name = self.spec.quantizer
        if self.dtype is not None:
            name += f", the model in {str(self.dtype).replace('torch.', '')}"
        if self.batch_size:
            name += f", {self.batch_size}-sequence batches"
        return name


def _choose_quantizer(shared: _SharedModel, spec: RunSpec, runtime: Runtime, seconds_left: float,
                      quantize_by) -> Choice:
    """The run's quantizer under its time budget (tasa.pipeline.quantizer_choice), best first: the better one
    (config.BETTER_OPTIONS) in the run's dtype; on a CPU that computes bfloat16 natively, for a float32 model, the
    same in bfloat16 in 2-sequence batches (config.BETTER_QUANTIZER_BF16, AutoRound's quality in less time); else
    the default.  Not the better ones with --distributed calibration (one process holds both streams).  Each but
    the default is tried on the first decoder layer; ``quantize_by(quantizer, after_layer)`` quantizes the run's
    plan.  A model cast for a trial is loaded again if its quantizer is not chosen."""
    distributed = runtime.cluster.backend is not None
    default = _Quantizer(spec.quantize_spec().resolved("gptq", distributed))
    candidates = [Candidate(default.name(), default)]
    lm = shared.fp()
    arch = resolve(lm.model)  # cast in place for a trial, the model keeps its modules
    dtype = next(lm.model.parameters()).dtype
    if not distributed:
        better = dataclasses.replace(spec.quantize_spec(), **BETTER_OPTIONS).resolved("gptq")
        head = lm.model.get_output_embeddings()
        layer = sum(arch.numels()[m.name] for m in arch.layer_modules(0))
        factor = head_factor(layer, head.weight.numel()) if better.learn_output_kl and head is not None else 1.0
        fast = []
        if native_bfloat16(runtime.primary) and str(runtime.device) == "cpu" and dtype == torch.float32:
            fast = [_Quantizer(better, torch.bfloat16, BETTER_BF16_BATCH)]
        candidates[:0] = [Candidate(q.name(), q, factor) for q in [_Quantizer(better), *fast]]

    def trial(c: Candidate, seconds: float) -> tuple[float, bool]:
        def stop(index: int) -> None:
            raise _FirstLayerDone

        t = time.perf_counter()
        if c.spec.dtype is not None:
            shared.in_dtype(c.spec.dtype)
        # a streamed model's layer is read again from disk; one in memory is put back as it was
        saved = None if arch.streamer is not None else \
            {k: v.detach().clone() for k, v in arch.layers[0].state_dict().items()}
        try:
            with deadline(seconds - (time.perf_counter() - t)):
                try:
                    quantize_by(c.spec, stop)
                except _FirstLayerDone:
                    pass
            return time.perf_counter() - t, True
        except Overtime:
            return time.perf_counter() - t, False
        finally:
            if saved is not None:
                arch.layers[0].load_state_dict(saved)

    choice = choose(candidates, seconds_left, arch.num_layers, trial)
    if choice.candidate.spec.dtype is None and next(lm.model.parameters()).dtype != dtype:
        shared.drop()  # cast for a trial: the chosen quantizer reads the model as the run loads it
    return choice


def _sizes(model_dir: Path) -> dict:
    """Bytes of the quantized linears at fp16, packed in the checkpoint, and of the whole checkpoint."""
    from safetensors import safe_open

    packed = fp16 = total = 0
    shapes = {}
    for f in model_dir.glob("*.safetensors"):
        total += f.stat().st_size
        with safe_open(str(f), "pt") as st:
            shapes.update({k: st.get_slice(k).get_shape() for k in st.keys()})
    for k, shape in shapes.items():
        if k.endswith((".qweight", ".qzeros", ".scales", ".g_idx")):
            packed += math.prod(shape) * (2 if k.endswith(".scales") else 4)
        if k.endswith(".g_idx"):  # in_features x out_features weights of 2 bytes at fp16
            fp16 += shape[0] * shapes[k[: -len(".g_idx")] + ".scales"][1] * 2
    return {"linears_fp16_bytes": fp16, "linears_packed_bytes": packed, "checkpoint_bytes": total}
