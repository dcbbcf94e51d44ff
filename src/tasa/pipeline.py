"""Stages wired together; every CLI verb is one function here.

Current stages: load -> calibration data -> quantize (uniform plan) -> write
model directory; and evaluate (perplexity, tasks, comparison with a reference).  Outputs are written to a
temporary sibling directory and renamed into place, so a failed or killed run
never leaves a half-written model directory.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import platform
import shutil
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from tasa import __version__
from tasa.artifacts import read_json, usual_modes, write_bytes_atomic, write_json_atomic
from tasa.config import CalibSpec, QuantSpec
from tasa.data import build_calibration, eval_texts, resolve_calibration_source, store
from tasa.errors import TasaError
from tasa.eval.perplexity import perplexity
from tasa.models import load, resolve
from tasa.models.arch import ModelArch
from tasa.plan import Plan
from tasa.quant.apply import quantize_model
from tasa.quant.rtn import SYM_GRID

log = logging.getLogger(__name__)

DEFAULT_BITS = (3, 4, 8)  # tasa run's candidate bit-widths (those the target serves)


def check_output_dir(output_dir: str | Path, overwrite: bool) -> Path:
    """An output directory that can be written (checked now, before any expensive work)."""
    out = Path(output_dir)
    if out.exists() and not out.is_dir():
        raise TasaError(f"output path {out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise TasaError(f"output directory {out} is not empty; pass --overwrite to replace it")
    _check_writable(out.parent, out)
    return out


def check_output_file(output: str | Path, flag: str = "--output") -> Path:
    """An output file path that can be written: not a directory, in a directory that can be written."""
    path = Path(output)
    if path.is_dir():
        raise TasaError(f"{flag} {path} is a directory; give a file name, e.g. {path / 'results.json'}")
    _check_writable(path.parent, path)
    return path


def _check_writable(directory: Path, what: Path) -> None:
    """Create ``directory`` if needed and prove it writable by creating and removing a file there."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=directory, prefix=".tasa-write-check-")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise TasaError(f"cannot write {what}: {e.strerror or e} ({directory})") from None


def check_group_size(arch: ModelArch, group_size: int, allow_ragged: bool) -> None:
    """GPTQ checkpoints and engines need the group size to divide every input size."""
    if group_size == -1 or allow_ragged:
        return
    for m in arch.modules:
        if m.in_features % group_size:
            raise TasaError(
                f"group size {group_size} does not divide the input size {m.in_features} of {m.name}; "
                f"choose a divisor (e.g. {_largest_pow2_divisor(m.in_features, group_size)}) or --allow-ragged-groups"
            )


AUTO_GROUP_SIZES = (128, 64, 32, 16)


def resolve_group_size(arch: ModelArch, group_size: int | None, allow_ragged: bool = False) -> int:
    """``group_size`` checked against every input size; ``None`` (auto) chooses the largest of 128, 64, 32, 16
    that divides every input size (SmolLM2's hidden size 576 gives 64) and logs the choice."""
    if group_size is not None:
        check_group_size(arch, group_size, allow_ragged)
        return group_size
    for g in AUTO_GROUP_SIZES:
        if all(m.in_features % g == 0 for m in arch.modules):
            odd = next((m for m in arch.modules if m.in_features % AUTO_GROUP_SIZES[0]), None)
            log.info("group size: auto -> %d%s", g, f" ({AUTO_GROUP_SIZES[0]} does not divide {odd.in_features}, "
                     f"the input size of {odd.name})" if odd else "")
            return g
    sizes = sorted({m.in_features for m in arch.modules})
    raise TasaError(f"no group size of {', '.join(map(str, AUTO_GROUP_SIZES))} divides every input size "
                    f"({', '.join(map(str, sizes[:6]))}); pass --group-size (-1: one group per output channel)")


def _validation_group_size(group_size: int | None) -> int:
    """A stand-in for checking a spec before the model (and so the automatic group size) is known."""
    return -1 if group_size is None else group_size


def _largest_pow2_divisor(n: int, below: int) -> int:
    g = 1
    while g * 2 <= below and n % (g * 2) == 0:
        g *= 2
    return g


def check_plan_covers(plan: Plan, arch: ModelArch, allow_partial: bool) -> None:
    """A plan names exactly the model's quantizable linears; left-out ones only with ``allow_partial``."""
    missing, extra = plan.coverage(m.name for m in arch.modules)

    def listed(names: list[str]) -> str:
        return ", ".join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")

    if extra:
        raise TasaError(f"the plan names {len(extra)} module(s) that are not quantizable linears of this model "
                        f"({listed(extra)}); was it made for another model?")
    if missing and not allow_partial:
        raise TasaError(f"the plan leaves {len(missing)} of the model's {len(arch.modules)} quantizable linears "
                        f"unplanned ({listed(missing)}); pass --allow-partial-plan to keep them in full precision")


def bits_summary(plan: Plan, arch: ModelArch, dtype: str) -> dict:
    """Average weight bits over every quantizable linear (unplanned ones at their stored dtype's bits) and over
    the planned ones alone, with the unplanned modules named."""
    numels = arch.numels()
    stored = torch.finfo(getattr(torch, dtype)).bits
    unplanned = [n for n in numels if n not in plan.modules]
    total = sum(numels.values())
    bits = sum(numels[n] * (plan.modules[n].bits if n in plan.modules else stored) for n in numels) / total
    return {"average_bits": bits, "planned_average_bits": plan.average_bits(numels),
            "unquantized_modules": unplanned, "unquantized_bits": stored if unplanned else None}


def _dtype_name(model) -> str:
    return str(next(model.parameters()).dtype).replace("torch.", "")


def machine_info() -> dict:
    return {"platform": platform.platform(), "cpu_count": os.cpu_count(), "torch": torch.__version__,
            "tasa": __version__, "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


def _publish_dir(tmp: Path, out: Path) -> None:
    """Move a finished temporary directory into place, replacing ``out`` if present."""
    if out.exists():
        trash = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, trash)
        os.replace(tmp, out)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(tmp, out)


def quantize(
    model: str,
    output_dir: str | Path,
    method: str = "gptq",
    bits: int = 4,
    group_size: int | None = None,
    sym: bool = True,
    act_order: bool = False,
    static_groups: bool = False,
    damp: float = 0.01,
    calib: str = "wikitext2",
    nsamples: int = 128,
    seqlen: int = 512,
    seed: int = 0,
    batch_size: int = 8,
    device: str = "cpu",
    dtype: str | None = None,
    true_sequential: bool = True,
    allow_ragged_groups: bool = False,
    overwrite: bool = False,
    plan: str | Path | None = None,
    export_format: str = "gptq",
    target: str | None = None,
    progress: bool = True,
    allow_partial_plan: bool = False,
) -> dict:
    """Quantize every decoder-layer linear of ``model`` uniformly (or by ``plan``, a plan.json) and write it.

    A plan must name exactly the model's quantizable linears; ``allow_partial_plan`` keeps the linears it
    leaves out in full precision, and the summary's ``average_bits`` then counts them at their stored bits.

    ``export_format``: ``gptq``, a packed GPTQ checkpoint (see tasa.export.gptq) that must be servable by
    ``target`` (default: the plan's target, else gptqmodel); or ``fp``, the dequantized float model
    (loadable by plain transformers).  Either way the directory also holds the tokenizer, ``plan.json`` and
    ``quantize.json`` (settings, calibration counts, per-module errors, sizes, timings).
    """
    from tasa.allocate.targets import check_servable, get_target
    from tasa.export.gptq import checkpoint_format, pack_result, quantize_config, write_checkpoint

    if export_format not in ("gptq", "fp"):
        raise TasaError(f"export format must be gptq or fp, got {export_format!r}")
    out = check_output_dir(output_dir, overwrite)
    spec_kw = dict(bits=bits, sym=sym, act_order=act_order, static_groups=static_groups, damp=damp)
    QuantSpec(group_size=_validation_group_size(group_size), **spec_kw)  # bad settings fail before the load
    plan_obj = Plan.load(plan) if plan is not None else None
    if plan_obj is not None:
        method = plan_obj.method
    calib_spec = CalibSpec.parse(calib, nsamples=nsamples, seqlen=seqlen, seed=seed) if method == "gptq" else None
    if calib_spec is not None:  # fail on bad sources before the (slow) model load
        for name, _ in calib_spec.sources:
            resolve_calibration_source(name)
    t0 = time.perf_counter()
    lm = load(model, dtype=dtype, device=device)
    arch = resolve(lm.model)
    if plan_obj is None:
        spec = QuantSpec(group_size=resolve_group_size(arch, group_size, allow_ragged_groups), **spec_kw)
    if plan_obj is not None:
        plan = plan_obj
        check_plan_covers(plan, arch, allow_partial_plan)
        for qs in plan.modules.values():
            check_group_size(arch, qs.group_size, allow_ragged_groups)
    else:
        plan = Plan.uniform([m.name for m in arch.modules], spec, method=method, model=model)
    target = target or plan.meta.get("target", "gptqmodel")
    packed: dict = {}

    def on_result(name, result):
        packed.update(pack_result(name, result, fmt))

    if export_format == "gptq":
        try:
            check_servable(plan.modules, get_target(target), arch.fusion_groups())
        except TasaError as e:
            raise TasaError(f"{e}; or write a float model with --format fp") from None
        fmt = checkpoint_format(plan)
    calib_ids, calib_counts = None, {}
    if calib_spec is not None:
        cal = build_calibration(lm.tokenizer, calib_spec, lm.max_length)
        calib_ids, calib_counts = cal.input_ids, cal.counts
    t_load = time.perf_counter() - t0
    report = quantize_model(lm.model, arch, plan, calib_ids, batch_size=batch_size, device=device,
                            true_sequential=true_sequential, on_result=on_result if export_format == "gptq" else None,
                            progress=progress)
    summary = {
        "model": model,
        "method": method,
        "quant_spec": spec.to_dict() if plan_obj is None else None,
        "plan_bits": sorted({qs.bits for qs in plan.modules.values()}),
        "calib": calib_spec.describe() if calib_spec else None,
        "calib_counts": calib_counts,
        # what the result also depends on: the exact calibration tokens, and the CPU thread count (it changes the
        # summation order of the Hessians and GPTQ updates; see README "Reproducibility")
        "calib_sha256": (hashlib.sha256(calib_ids.numpy().tobytes()).hexdigest() if calib_ids is not None
                         else None),
        "threads": torch.get_num_threads(),
        "nsamples": nsamples if calib_spec else None,
        "seqlen": seqlen if calib_spec else None,
        "seed": seed,
        "data": store.fingerprint(),
        **bits_summary(plan, arch, _dtype_name(lm.model)),
        "format": export_format,
        "target": target if export_format == "gptq" else None,
        "seconds": {"load_and_data": t_load, "quantize": report.seconds},
        "modules": {n: s.__dict__ for n, s in report.modules.items()},
        "machine": machine_info(),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))
    try:
        if export_format == "gptq":
            qcfg = quantize_config(plan, [m.name for m in arch.modules], arch.numels(), f"tasa:{__version__}",
                                   target, checkpoint_format(plan))
            write_checkpoint(tmp, lm.model, lm.tokenizer, packed, qcfg)
        else:
            lm.model.save_pretrained(tmp)
            lm.tokenizer.save_pretrained(tmp)
        summary["size_bytes"] = sum(f.stat().st_size for f in tmp.glob("*.safetensors"))
        plan.save(tmp / "plan.json")
        write_json_atomic(tmp / "quantize.json", summary)
        usual_modes(tmp)  # mkdtemp and safetensors create owner-only modes
        _publish_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    summary["output_dir"] = str(out)
    return summary


def _load_reference(reference: str, tasks: list[str], **kw) -> dict:
    """A reference run: a results JSON written with --log-samples, or a model spec evaluated here."""
    if reference.endswith(".json"):
        path = Path(reference)
        if not path.is_file():
            raise TasaError(f"reference results not found: {path}")
        ref = read_json(path)
        if "samples" not in ref:
            raise TasaError(f"{path} has no per-item records; write it with --log-samples")
        topk_path = path.with_suffix(".topk.safetensors")
        if "wikitext2" in tasks:
            if not topk_path.is_file():
                raise TasaError(f"{path} has no top-k log-probs ({topk_path.name}) for the KL divergence; "
                                "evaluate the reference with --tasks wikitext2 --log-samples")
            from safetensors.torch import load_file

            ref["_topk"] = load_file(str(topk_path))
        return ref
    log.info("evaluating the reference model %s", reference)
    return evaluate(reference, tasks, log_samples=True, **kw)


def evaluate(
    model: str,
    tasks: list[str] | tuple[str, ...] = ("wikitext2",),
    limit: int | None = None,
    num_fewshot: int | None = None,
    seqlen: int = 512,
    batch_size: int = 8,
    device: str = "cpu",
    dtype: str | None = None,
    output: str | Path | None = None,
    log_samples: bool = False,
    reference: str | None = None,
    kl_topk: int = 256,
    apply_chat_template: bool = False,
    generate: bool = True,
    prefix_cache: bool = True,
    windows: int | None = None,
    progress: bool = True,
) -> dict:
    """Evaluate ``model`` on ``tasks`` (built-in names or task spec files); returns the results dict.

    ``limit``: first rows per task; ``windows``: wikitext2 windows (default: ``limit``).

    With ``reference`` (a model spec, or a results JSON written with
    ``log_samples``) each task also reports flip rates against it and
    wikitext2 the mean KL divergence from it.  ``output`` writes the JSON
    (and, with ``log_samples`` and wikitext2, ``<output>.topk.safetensors``
    holding the top-``kl_topk`` log-probs a later run compares against).
    """
    from tasa.eval.runner import add_flips, run_task
    from tasa.eval.tasks import get_task

    tasks = list(tasks)
    if not tasks:
        raise TasaError("no tasks given")
    if len(set(tasks)) != len(tasks):
        raise TasaError("a task is listed twice")
    if batch_size < 1:
        raise TasaError(f"--batch-size must be positive, got {batch_size}")
    task_objs = {t: get_task(t) for t in tasks if t != "wikitext2"}  # bad names and specs fail before loading
    for t in task_objs.values():
        t.select(limit)  # reads the rows: missing files and a too-large --limit fail early
    if output is not None:
        check_output_file(output)
    ref = None
    if reference is not None:
        ref = _load_reference(reference, tasks, limit=limit, windows=windows, num_fewshot=num_fewshot, seqlen=seqlen,
                              batch_size=batch_size, device=device, dtype=dtype, kl_topk=kl_topk,
                              apply_chat_template=apply_chat_template, generate=generate,
                              prefix_cache=prefix_cache, progress=progress)
    t0 = time.perf_counter()
    lm = load(model, dtype=dtype, device=device)
    results: dict = {"model": model,
                     "config": {"tasks": tasks, "limit": limit, "windows": windows, "num_fewshot": num_fewshot,
                                "seqlen": seqlen,
                                "batch_size": batch_size, "device": device,
                                "dtype": _dtype_name(lm.model),
                                "apply_chat_template": apply_chat_template, "generate": generate,
                                "reference": reference, "data": store.fingerprint()},
                     "results": {}, "machine": machine_info(),
                     "date": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    samples: dict = {}
    topk = None
    for name in tasks:
        if name == "wikitext2":
            text = "\n\n".join(eval_texts("wikitext2"))
            ref_topk = ref.get("_topk") if ref else None
            r = perplexity(lm.model, lm.tokenizer, text, seqlen=seqlen, limit=windows if windows is not None else limit,
                           batch_size=batch_size,
                           progress=progress, topk=kl_topk if log_samples else 0, reference=ref_topk)
            m = {"ppl": r.ppl, "nll": r.nll, "windows": r.windows, "tokens": r.tokens}
            if r.kl is not None:
                m.update({"kl": r.kl, "kl_stderr": r.kl_stderr, "ref_topk_mass": r.ref_topk_mass})
            m["seconds"] = r.seconds
            results["results"]["wikitext2"] = m
            topk = r.topk
            continue
        task = task_objs[name]
        res = run_task(lm.model, lm.tokenizer, task, limit=limit, num_fewshot=num_fewshot, batch_size=batch_size,
                       chat_template=apply_chat_template, generate=generate, prefix_cache=prefix_cache,
                       progress=progress)
        if ref is not None:
            if name not in ref.get("samples", {}):
                raise TasaError(f"the reference has no records of task {name}")
            add_flips(res, task, ref["samples"][name])
        results["results"][res.task] = res.metrics
        samples[res.task] = res.samples
    results["seconds"] = time.perf_counter() - t0
    if log_samples:
        results["samples"] = samples
    if output:
        write_json_atomic(output, results)
        if log_samples and topk is not None:
            from safetensors.torch import save

            write_bytes_atomic(Path(output).with_suffix(".topk.safetensors"),
                               save({k: v.contiguous() for k, v in topk.items()}))
    if log_samples and topk is not None:
        results["_topk"] = topk  # in memory only, for a run that uses this one as its reference
    return results


def _check_probe_quantizer(probe_quantizer: str) -> None:
    if probe_quantizer not in ("rtn", "gptq"):
        raise TasaError(f"probe quantizer must be rtn or gptq, got {probe_quantizer!r}")


def profile(
    model: str,
    output_dir: str | Path,
    objectives: list[str] | tuple[str, ...] = ("wikitext2", "gsm8k", "arc_easy"),
    bits: tuple[int, ...] = (3, 4, 8),
    granularity: str = "layer",
    group_size: int | None = None,
    sym: bool = True,
    probe_tokens: int = 4096,
    seqlen: int = 128,
    seed: int = 0,
    batch_tokens: int = 512,
    device: str = "cpu",
    dtype: str | None = None,
    overwrite: bool = False,
    method: str = "measured",
    compare_estimators: bool = False,
    layers: list[int] | None = None,
    report: bool = True,
    top_k: int = 8,
    choice_cost: str = "kl",
    max_state_gb: float = 4.0,
    progress: bool = True,
    probe_quantizer: str = "rtn",
    calib: str | None = None,
    nsamples: int = 128,
    calib_seqlen: int = 512,
    damp: float = 0.01,
) -> dict:
    """Measured (or estimated) layer or module sensitivity on each objective; writes ``sensitivity.json``.

    ``output_dir`` also holds every finished probe: running the same command
    again after a kill resumes; other settings in the same directory need
    ``overwrite``.  With ``report``, also report.md/.html and PNG plots
    (Kendall tau between objectives, top-``top_k`` overlap).

    ``method``: ``measured`` (RTN probes), or a gradient estimator, ``fisher`` or
    ``autoscheme`` (see tasa.profile.estimators), whose costs then stand in for
    the probes'.  ``compare_estimators`` (with ``measured``) also runs both
    estimators and records their Kendall tau against the probes and their cost.
    ``layers`` restricts the units to those layers (e.g. to time module probes).
    ``choice_cost``: how multiple-choice objectives score a probe, ``kl`` (the
    divergence of the answer distribution from full precision) or ``gold`` (the
    increase of -log p(gold | choices)); see tasa.profile.objectives.
    ``max_state_gb``: RAM budget for the kept layer inputs; past it they are spilled
    to ``output_dir/kept-states`` (removed when done).
    ``probe_quantizer``: ``rtn`` (the unit's intrinsic sensitivity, the method's
    default) or ``gptq`` (the damage GPTQ leaves: each probe GPTQ-quantizes its unit
    with Hessians from ``nsamples`` x ``calib_seqlen`` tokens of the calibration
    ``calib``, dampening ``damp``; measured probes only).
    """
    from tasa.profile.estimators import ESTIMATORS, estimate
    from tasa.profile.objectives import build_objective
    from tasa.profile.probe import ProbeStore, run_probes, units
    from tasa.profile.sensitivity import SCHEMA, objective_taus, sensitivities
    from tasa.profile.stats import kendall_tau

    if method not in ("measured", *ESTIMATORS):
        raise TasaError(f"method must be measured, {' or '.join(ESTIMATORS)}; got {method!r}")
    if max_state_gb < 0:
        raise TasaError(f"--max-state-gb must be non-negative, got {max_state_gb}")
    objectives = list(objectives)
    if not objectives or len(set(objectives)) != len(objectives):
        raise TasaError("give one or more distinct objectives")
    bits = tuple(sorted(set(int(b) for b in bits)))
    for b in bits:
        QuantSpec(bits=b, group_size=_validation_group_size(group_size), sym=sym, damp=damp)  # bits, dampening
    _check_probe_quantizer(probe_quantizer)
    if probe_quantizer == "gptq":
        if method != "measured":
            raise TasaError("GPTQ probes are measured probes: they cannot be combined with an estimator method")
        if calib is None:
            raise TasaError("GPTQ probes need calibration data (--calib)")
        calib_spec = CalibSpec.parse(calib, nsamples=nsamples, seqlen=calib_seqlen, seed=seed)
    out = Path(output_dir)
    if out.exists() and not out.is_dir():
        raise TasaError(f"output path {out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()):
        if overwrite:
            shutil.rmtree(out)
        elif not (out / "probe_settings.json").is_file():
            raise TasaError(f"output directory {out} is not empty and holds no probes; pass --overwrite")
    _check_writable(out.parent, out)
    t0 = time.perf_counter()
    lm = load(model, dtype=dtype, device=device)
    arch = resolve(lm.model)
    group_size = resolve_group_size(arch, group_size)
    objs = [build_objective(name, lm.tokenizer, min_tokens=probe_tokens, seqlen=seqlen, seed=seed,
                            max_length=lm.max_length, choice_cost=choice_cost) for name in objectives]
    settings = {"model": model, "objectives": objectives, "bits": list(bits), "granularity": granularity,
                "group_size": group_size, "sym": sym, "grid": SYM_GRID, "probe_tokens": probe_tokens, "seqlen": seqlen,
                "seed": seed, "dtype": _dtype_name(lm.model), "method": method,
                "layers": sorted(set(layers)) if layers is not None else None}
    calib_ids = None
    if store.data_source() != "package" or store.override_dir() is not None:
        settings["data"] = store.fingerprint()  # the package copy holds the rows earlier profiles used
    if probe_quantizer == "gptq":  # recorded only then, so RTN profiles keep their fingerprint
        settings.update(probe_quantizer="gptq", calib=calib, nsamples=nsamples, calib_seqlen=calib_seqlen, damp=damp)
        calib_ids = build_calibration(lm.tokenizer, calib_spec, lm.max_length).input_ids
    plan_units = units(arch, granularity, layers)
    estimators: dict = {}
    warnings: list[str] = []
    stability: dict = {}
    if method == "measured":
        probe_store = ProbeStore(out, settings)
        res = run_probes(lm.model, arch, objs, bits=bits, group_size=group_size, sym=sym, granularity=granularity,
                         batch_tokens=batch_tokens, store=probe_store, layers=layers, max_state_gb=max_state_gb,
                         progress=progress, calib_ids=calib_ids, damp=damp)
        costs, stability, warnings = sensitivities(res, objs, bits, seed=seed)
        taus = objective_taus(res, objs, bits, seed=seed) if len(objs) > 1 else {}
        base = {o.name: res.base[o.name].cost() for o in objs}
        probe_seconds = res.probe_seconds
        for w in warnings:
            log.warning(w)
        for est in ESTIMATORS if compare_estimators else ():
            est_costs, secs = estimate(lm.model, arch, objs, plan_units, bits, est, group_size, sym, batch_tokens)
            estimators[est] = {"seconds": secs, "cost_ratio": secs / probe_seconds if probe_seconds else None,
                               "costs": est_costs,
                               "tau_vs_measured": {o: {b: kendall_tau(est_costs[o][b], costs[o][b]["cost"])
                                                       for b in est_costs[o]} for o in est_costs}}
    else:
        out.mkdir(parents=True, exist_ok=True)
        est_costs, probe_seconds = estimate(lm.model, arch, objs, plan_units, bits, method, group_size, sym,
                                            batch_tokens)
        costs = {o: {b: {"cost": c, "ci_low": [float("nan")] * len(c), "ci_high": [float("nan")] * len(c)}
                     for b, c in per_bits.items()} for o, per_bits in est_costs.items()}
        stability = {o: {b: float("nan") for b in per_bits} for o, per_bits in est_costs.items()}
        taus = {}
        base = {}
    numels = arch.numels()
    summary = {
        "schema": SCHEMA,
        **settings,
        "choice_cost": choice_cost,
        "objectives": {o.name: {"kind": o.kind, "items": o.n_items, "scored_tokens": o.scored_tokens,
                                "base": base.get(o.name)} for o in objs},
        "units": [{"name": u.name, "layer": u.layer, "modules": list(u.modules),
                   "numel": sum(numels[m] for m in u.modules)} for u in plan_units],
        "fusion_groups": [list(g) for g in arch.fusion_groups()],
        "costs": costs,
        "stability": stability,
        "objective_taus": taus,
        "estimators": estimators,
        "warnings": warnings,
        "seconds": {"total": time.perf_counter() - t0, "sensitivity": probe_seconds,
                    **({"probe_wall_this_run": res.seconds} if method == "measured" else {})},
        "machine": machine_info(),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    write_json_atomic(out / "sensitivity.json", summary)
    if report:
        from tasa.report.profile_report import write_report

        write_report(out / "sensitivity.json", k=top_k)
    summary["output_dir"] = str(out)
    return summary


def _read_profile(path: str | Path) -> tuple[dict, Path]:
    path = Path(path)
    if path.is_dir():
        path = path / "sensitivity.json"
    if not path.is_file():
        raise TasaError(f"sensitivity file not found: {path}")
    try:
        return read_json(path), path
    except json.JSONDecodeError as e:
        raise TasaError(f"{path} is not valid JSON: {e}") from None


def allocate_bits(
    sensitivity: str | Path,
    budget: float,
    output: str | Path,
    bits: tuple[int, ...] | None = None,
    beta: float | str = 0.5,
    task_weights: dict[str, float] | None = None,
    budget_includes_metadata: bool = False,
    method: str = "gptq",
    target: str = "gptqmodel",
    module_sensitivity: str | Path | None = None,
    tie_fused: bool | None = None,
) -> dict:
    """Aggregate a layer profile, allocate bits per layer under ``budget`` exactly (and split them within layers
    by a module profile), for ``target``; write plan.json."""
    from tasa.allocate.plan import plan_from_sensitivity

    check_output_file(output)
    sens, path = _read_profile(sensitivity)
    module_sens = _read_profile(module_sensitivity)[0] if module_sensitivity is not None else None
    plan, summary = plan_from_sensitivity(sens, budget, bits=bits, beta=beta, task_weights=task_weights,
                                          budget_includes_metadata=budget_includes_metadata, method=method,
                                          target=target, module_sens=module_sens, tie_fused=tie_fused)
    plan.meta["sensitivity"] = str(path)
    plan.save(output)
    summary["output"] = str(output)
    return summary


def search_mixture(
    model: str,
    output_dir: str | Path,
    general: str = "wikitext2",
    tasks: list[str] | tuple[str, ...] = ("gsm8k",),
    targets: list[str] | None = None,
    criteria: list[str] | tuple[str, ...] = ("grad-align",),
    ratios: list[float] | None = None,
    grid_step: float | None = None,
    nsamples: int = 128,
    seqlen: int = 512,
    heldout_samples: int = 32,
    heldout_fraction: float = 0.2,
    damp: float = 0.01,
    damping_study: bool = True,
    sketch_dim: int = 1 << 16,
    measure_bits: int = 3,
    group_size: int | None = None,
    batch_size: int = 4,
    seed: int = 0,
    device: str = "cpu",
    dtype: str | None = None,
    report: bool = True,
    progress: bool = True,
) -> dict:
    """Score calibration mixtures of ``general`` and ``tasks`` by training-free criteria (or measured GPTQ
    quality on held-out task rows) and choose one; writes ``mixture.json`` (and a report) in ``output_dir``.

    The first of ``criteria`` chooses; the others are computed alongside for comparison.  See
    tasa.mixture.search for the token sets and the criteria.  ``ratios`` are general-text shares (default
    0, 1/8, 1/4, 1/2, 3/4, 7/8, 1), the task sources sharing the rest equally; with ``grid_step`` the grid is
    the simplex over all sources instead.
    Measured points are stored as they finish, so a killed search resumes.
    """
    from tasa.mixture.search import search

    tasks = list(tasks)
    out = Path(output_dir)
    if out.exists() and not out.is_dir():
        raise TasaError(f"output path {out} exists and is not a directory")
    _check_writable(out.parent, out)
    t0 = time.perf_counter()
    lm = load(model, dtype=dtype, device=device)
    if lm.max_length is not None and seqlen > lm.max_length:
        raise TasaError(f"seqlen {seqlen} exceeds the model's maximum context of {lm.max_length} tokens")
    group_size = resolve_group_size(resolve(lm.model), group_size)
    s = search(lm, lambda: load(model, dtype=dtype, device=device), general, tasks, targets=targets,
               criteria=criteria, ratios=list(ratios) if ratios is not None else None, grid_step=grid_step,
               nsamples=nsamples, seqlen=seqlen, heldout_samples=heldout_samples,
               heldout_fraction=heldout_fraction, damp=damp, damping_study=damping_study, sketch_dim=sketch_dim,
               measure_bits=measure_bits,
               group_size=group_size, batch_size=batch_size, seed=seed, device=device, out_dir=out,
               progress=progress)
    s.update({"model": model, "dtype": _dtype_name(lm.model), "machine": machine_info(),
              "date": datetime.now(timezone.utc).isoformat(timespec="seconds")})
    s["seconds"]["with_loading"] = time.perf_counter() - t0
    write_json_atomic(out / "mixture.json", s)
    if report:
        from tasa.report.mixture_report import write_report

        write_report(out / "mixture.json")
    s["output_dir"] = str(out)
    return s


def run(
    model: str,
    tasks: list[str] | tuple[str, ...],
    budget: float,
    output_dir: str | Path,
    calib: str | None = None,
    mixture_criterion: str = "grad-align",
    bits: tuple[int, ...] | None = None,
    beta: float | str = 0.5,
    task_weights: dict[str, float] | None = None,
    budget_includes_metadata: bool = False,
    target: str = "gptqmodel",
    group_size: int | None = None,
    probe_tokens: int = 768,
    choice_cost: str = "kl",
    probe_quantizer: str = "rtn",
    granularity: str = "layer",
    nsamples: int = 64,
    seqlen: int = 512,
    seed: int = 0,
    eval_limit: int = 100,
    eval_windows: int = 40,
    generate: bool = False,
    batch_size: int = 8,
    device: str = "cpu",
    dtype: str | None = None,
    progress: bool = True,
) -> dict:
    """[mixture search ->] profile -> aggregate + allocate -> quantize (GPTQ) -> export -> evaluate -> report.

    ``calib="auto"`` first chooses the calibration mixture of wikitext2 and the tasks by
    ``mixture_criterion`` (see :func:`search_mixture`; ``nsamples`` x ``seqlen`` tokens per source).
    ``calib=None`` (the default) means ``"auto"`` when every task is a built-in dataset with
    calibration rows, else plain wikitext2, with a warning saying so.

    ``probe_quantizer``: ``rtn`` profiles with RTN probes (the method's default); ``gptq`` with probes that
    GPTQ-quantize their layer on the run's calibration (``nsamples`` x ``seqlen``; see :func:`profile`).
    ``granularity``: ``layer`` profiles and allocates whole decoder layers (the method's default); ``module``
    probes every linear module and allocates over all of them at once (7x the probes).

    Every stage writes its artifact into ``output_dir`` and is recorded in
    ``stages.json`` under a hash of its inputs (see tasa.stages): a rerun skips
    finished stages, a killed run resumes at the unfinished one.  The
    objectives profiled are wikitext2 (perplexity) and ``tasks``; evaluation
    covers the same on held-out test rows: the first ``eval_limit`` rows of each
    task, zero-shot (as profiled), and ``eval_windows`` wikitext2 windows.
    """
    from tasa.eval.tasks import get_task
    from tasa.report.run_report import write_run_report
    from tasa.stages import Stages, stage_key as _key

    tasks = list(tasks)
    if not tasks or "wikitext2" in tasks or len(set(tasks)) != len(tasks):
        raise TasaError("give one or more distinct tasks (wikitext2 perplexity is always profiled and evaluated)")
    for t in tasks:
        get_task(t)  # bad names and specs fail before any work
    run_warnings = []
    if calib in (None, "auto"):
        problem = next(((t, p) for t in tasks if (p := _no_calibration_rows(t))), None)
        if problem and calib == "auto":
            raise TasaError(f"--calib auto calibrates on the tasks' own rows; task {problem[0]!r} {problem[1]}"
                            " (pass --calib explicitly)")
        if problem:
            run_warnings.append(f"calibration: task {problem[0]!r} {problem[1]}, so no mixture is searched; "
                                "calibrating on wikitext2 (pass --calib to choose)")
            log.warning(run_warnings[-1])
        calib = "wikitext2" if problem else "auto"
    else:
        CalibSpec.parse(calib, nsamples=nsamples, seqlen=seqlen, seed=seed)
    from tasa.profile.probe import check_granularity

    _check_probe_quantizer(probe_quantizer)
    check_granularity(granularity)  # before the mixture search, not after it
    from tasa.allocate.plan import candidate_bits, check_budget
    from tasa.allocate.targets import get_target

    tgt = get_target(target)
    bits = tuple(candidate_bits(tgt, None, DEFAULT_BITS) if bits is None else candidate_bits(tgt, bits, bits))
    for b in bits:
        QuantSpec(bits=b, group_size=_validation_group_size(group_size))  # bits in range, a valid group size
    # before the mixture search and profile; the metadata bound uses the smallest per-weight metadata the group
    # size allows (auto: 128's; per channel: none, it depends on the input sizes); allocation checks it exactly
    metadata_group = AUTO_GROUP_SIZES[0] if group_size is None else (group_size if group_size > 0 else None)
    check_budget(budget, bits, metadata_group, budget_includes_metadata)
    if eval_limit < 1 or eval_windows < 1:
        raise TasaError(f"--eval-limit and --eval-windows must be positive, got {eval_limit}, {eval_windows}")
    out = Path(output_dir)
    if out.exists() and not out.is_dir():
        raise TasaError(f"output path {out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not (out / "stages.json").is_file():
        raise TasaError(f"output directory {out} is not empty and holds no tasa run")
    _check_writable(out, out)
    stages = Stages(out)
    objectives = ["wikitext2", *tasks]
    data_fp = store.fingerprint()  # where the built-in rows come from: part of every stage's inputs

    if calib == "auto":
        m_in = {"model": model, "data": data_fp, "tasks": tasks, "criterion": mixture_criterion, "nsamples": nsamples,
                "seqlen": seqlen, "seed": seed, "dtype": dtype, "group_size": group_size,
                **({"grid": SYM_GRID} if mixture_criterion == "measured" else {})}  # only it quantizes
        calib = stages.run("mixture", m_in, lambda: {"calib": search_mixture(
            model, out / "mixture", general="wikitext2", tasks=tasks, criteria=(mixture_criterion,),
            nsamples=nsamples, seqlen=seqlen, group_size=group_size, seed=seed, device=device, dtype=dtype,
            progress=progress)["calib"]})["calib"]
    gptq = {"calib": calib, "nsamples": nsamples, "calib_seqlen": seqlen} if probe_quantizer == "gptq" else {}
    p_in = {"model": model, "data": data_fp, "objectives": objectives, "bits": sorted(bits), "group_size": group_size,
            "probe_tokens": probe_tokens, "seed": seed, "dtype": dtype, "choice_cost": choice_cost, "grid": SYM_GRID,
            **({"probe_quantizer": "gptq", **gptq} if gptq else {}),  # GPTQ settings only then: RTN keys stay
            **({"granularity": "module"} if granularity == "module" else {})}  # so do layer-granularity keys
    changed = stages.previous_key("profile") not in (None, _key(p_in))  # other settings: start the probes over

    def do_profile():
        s = profile(model, out / "profile", objectives=objectives, bits=tuple(bits), group_size=group_size,
                    probe_tokens=probe_tokens, seed=seed, device=device, dtype=dtype, overwrite=changed,
                    choice_cost=choice_cost, progress=progress, probe_quantizer=probe_quantizer,
                    granularity=granularity, **gptq)
        return {"sensitivity": str(out / "profile" / "sensitivity.json"), "warnings": s["warnings"]}

    prof = stages.run("profile", p_in, do_profile)
    a_in = {"profile": _key(p_in), "budget": budget, "bits": sorted(bits), "beta": beta,
            "task_weights": task_weights, "target": target, "budget_includes_metadata": budget_includes_metadata}
    stages.run("allocate", a_in, lambda: allocate_bits(
        prof["sensitivity"], budget, out / "plan.json", bits=tuple(bits), beta=beta, task_weights=task_weights,
        budget_includes_metadata=budget_includes_metadata, target=target))
    q_in = {"allocate": _key(a_in), "data": data_fp, "calib": calib, "nsamples": nsamples, "seqlen": seqlen, "seed": seed,
            "grid": SYM_GRID}

    def do_quantize():
        s = quantize(model, out / "model", calib=calib, nsamples=nsamples, seqlen=seqlen, seed=seed,
                     batch_size=batch_size, device=device, dtype=dtype, overwrite=True, plan=out / "plan.json",
                     export_format="gptq", target=target, progress=progress)
        return {"average_bits": s["average_bits"], "size_bytes": s["size_bytes"], "seconds": s["seconds"]}

    stages.run("quantize", q_in, do_quantize)
    e_common = {"tasks": objectives, "limit": eval_limit, "windows": eval_windows, "num_fewshot": 0,
                "generate": generate, "seqlen": seqlen}
    fp_in = {"model": model, "data": data_fp, "dtype": dtype, **e_common}
    stages.run("eval_fp", fp_in, lambda: evaluate(
        model, objectives, limit=eval_limit, windows=eval_windows, num_fewshot=0, seqlen=seqlen,
        batch_size=batch_size, device=device, dtype=dtype, output=out / "eval-fp.json", log_samples=True, generate=generate, progress=progress)["results"])
    stages.run("eval_quant", {"quantize": _key(q_in), "eval_fp": _key(fp_in), **e_common}, lambda: evaluate(
        str(out / "model"), objectives, limit=eval_limit, windows=eval_windows, num_fewshot=0, seqlen=seqlen,
        batch_size=batch_size, device=device, dtype=dtype,
        output=out / "eval-quant.json", reference=str(out / "eval-fp.json"), generate=generate,
        progress=progress)["results"])
    summary = {"model": model, "tasks": tasks, "calib": calib, "eval_limit": eval_limit,
               "eval_windows": eval_windows, "seqlen": seqlen,
               "probe_tokens": probe_tokens, "warnings": run_warnings + prof["warnings"],
               "sizes": _sizes(out / "model"), "seconds": stages.seconds(), "ran": stages.ran, "output_dir": str(out)}
    summary["report"] = str(write_run_report(out, summary))
    write_json_atomic(out / "run.json", summary)
    return summary


def _no_calibration_rows(task: str) -> str | None:
    """Why ``task`` cannot supply calibration rows to a mixture search, or None when it can."""
    try:
        kind = resolve_calibration_source(task).kind
    except TasaError as e:
        return f"cannot be a calibration source: {e}"
    return None if kind == "rows" else "is not a built-in dataset with calibration rows"


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
