"""tasa profile: per-layer (or per-module) sensitivity on several objectives -> sensitivity.json (+ report)."""
from __future__ import annotations

import dataclasses
import functools
import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from tasa import schemas
from tasa.artifacts import fingerprint, read_json, write_json_atomic
from tasa.config import ProfileSpec, Runtime
from tasa.data import build_calibration, store
from tasa.errors import TasaError
from tasa.models import LoadedModel, resolve
from tasa.pipeline.common import (check_new_dir, dtype_name, machine_info, model_of, now, resolve_group_size,
                                  validation_group_size)
from tasa.quant.rtn import SYM_GRID

log = logging.getLogger("tasa.pipeline")


@dataclass(frozen=True)
class ProfileResult:
    """A finished profile: its directory and the sensitivity.json record (settings, units, costs per objective
    and bit-width with intervals, split-half stability, objective rank agreement, warnings, timings)."""

    output_dir: Path
    record: dict = field(repr=False)

    @property
    def warnings(self) -> list[str]:
        return self.record["warnings"]


def _prepare_dir(out: Path, overwrite: bool) -> None:
    """A profile directory: new, holding probes of an earlier run (resumed), or cleared with ``overwrite``."""
    check_new_dir(out)
    if out.is_dir() and any(out.iterdir()):
        if overwrite:
            shutil.rmtree(out)
        elif not (out / "probe_settings.json").is_file():
            raise TasaError(f"output directory {out} is not empty and holds no probes; pass --overwrite")


def _runner(lm: LoadedModel, arch, spec: ProfileSpec, runtime: Runtime):
    """What runs the probes: None (here, serially), or Ray workers loading the same model: each all of it (task
    placement) or a slice of its layers (pipeline placement; ``auto``: when this process streams the model)."""
    cluster = runtime.cluster
    if cluster.backend is None:
        return None
    from tasa.distributed.pipeline import RayPipeline
    from tasa.distributed.cluster import ModelSource
    from tasa.distributed.probes import RayProbes

    pipeline = cluster.placement == "pipeline" or (cluster.placement == "auto" and arch.streamer is not None)
    source = ModelSource.of(lm, arch, stream=pipeline, tie_experts=spec.tie_experts)
    return functools.partial(RayPipeline if pipeline else RayProbes, cluster=cluster, model=source)


def profile(model: str | LoadedModel, output_dir: str | Path, spec: ProfileSpec = ProfileSpec(),
            runtime: Runtime = Runtime(), overwrite: bool = False, report: bool = True, top_k: int = 8,
            restart_if_changed: bool = False) -> ProfileResult:
    """Measured (or estimated) layer or module sensitivity on each objective; writes ``sensitivity.json``.

    ``output_dir`` also holds every finished probe: running the same command again after a kill resumes, and so
    does one at other bit-widths (the probes already measured are reused); other settings in the same directory
    need ``overwrite``, or ``restart_if_changed`` (start over only if the probes were made with other settings).
    With ``report``, also report.md/.html and PNG plots (Kendall tau between objectives, top-``top_k`` overlap).

    ``spec.estimator``: ``measured`` (probes), or a gradient estimator, ``fisher`` or ``autoscheme`` (see
    tasa.profile.estimators), whose costs then stand in for the probes'; ``compare_estimators`` (with
    ``measured``) also runs both estimators and records their Kendall tau against the probes and their cost.
    ``choice_cost``: how multiple-choice objectives score a probe, ``auto``, ``kl``, ``gold`` or ``token-kl``
    (each objective's in the record's ``objectives``); ``token_cost``: how text
    objectives do, ``kl`` or ``nll`` (see tasa.profile.objectives).  ``max_state_gb``: RAM budget for the kept
    layer inputs; past it they are spilled to ``output_dir/kept-states`` (removed when done).  ``probe_quantizer``:
    ``rtn`` (the unit's intrinsic sensitivity, the method's default) or ``gptq`` (the damage GPTQ leaves: each
    probe GPTQ-quantizes its unit with Hessians from the calibration ``spec.calib``).
    """
    from tasa.profile.estimators import ESTIMATORS, estimate
    from tasa.profile.objectives import build_objective
    from tasa.profile.probe import ProbeStore, run_probes, units
    from tasa.profile.sensitivity import SCHEMA, objective_taus, sensitivities
    from tasa.profile.stats import kendall_tau

    validation_group_size(spec.group_size)
    out = Path(output_dir)
    _prepare_dir(out, overwrite)
    t0 = time.perf_counter()
    lm, model = model_of(model, runtime)
    arch = resolve(lm.model)
    spec = dataclasses.replace(spec, group_size=resolve_group_size(arch, spec.group_size))
    objs = [build_objective(name, lm.tokenizer, min_tokens=spec.probe_tokens, seqlen=spec.probe_seqlen,
                            seed=spec.seed, max_length=lm.max_length, choice_cost=spec.choice_cost,
                            token_cost=spec.token_cost)
            for name in spec.objectives]
    # the probe-store fingerprint: the keys and names of profiles made before the specs existed are kept
    settings = {"model": model, "objectives": list(spec.objectives), "bits": list(spec.bits),
                "granularity": spec.granularity, "group_size": spec.group_size, "sym": spec.sym, "grid": SYM_GRID,
                "probe_tokens": spec.probe_tokens, "seqlen": spec.probe_seqlen, "seed": spec.seed,
                "dtype": dtype_name(lm.model), "method": spec.estimator,  # recorded as "method" (earlier records)
                "layers": sorted(set(spec.layers)) if spec.layers is not None else None,
                "probe_scores": "nll+kl"}  # probes hold the token KL since 2026-12-04: earlier stores lack it
    calib_ids = None
    if store.data_source() != "package" or store.override_dir() is not None:
        settings["data"] = store.fingerprint()  # the package copy holds the rows earlier profiles used
    if spec.probe_quantizer == "gptq":  # recorded only then, so RTN profiles keep their fingerprint
        settings.update(probe_quantizer="gptq", calib=spec.calib.describe(), nsamples=spec.calib.nsamples,
                        calib_seqlen=spec.calib.seqlen, damp=spec.damp)
        calib_ids = build_calibration(lm.tokenizer, spec.calib, lm.max_length).input_ids
    arch.tie_experts = spec.tie_experts
    if arch.is_moe and not spec.tie_experts:
        settings["tie_experts"] = False  # recorded only then, so dense models keep their fingerprint
    plan_units = units(arch, spec.granularity, spec.layers)
    if runtime.cluster.backend is not None and spec.estimator != "measured":
        log.warning("--distributed spreads measured probes; the %s estimator runs here", spec.estimator)
    estimators: dict = {}
    warnings: list[str] = []
    placement = None
    if spec.estimator == "measured":
        # a probe is stored under its unit and bit-width: a profile at more (or fewer) bit-widths reuses it
        probe_settings = {k: v for k, v in settings.items() if k != "bits"}
        if restart_if_changed and (out / "probe_settings.json").is_file() \
                and fingerprint(read_json(out / "probe_settings.json")) != fingerprint(probe_settings):
            shutil.rmtree(out)
        res = run_probes(lm.model, arch, objs, spec, store=ProbeStore(out, probe_settings), calib_ids=calib_ids,
                         progress=runtime.progress, runner=_runner(lm, arch, spec, runtime))
        costs, stability, warnings = sensitivities(res, objs, spec.bits, seed=spec.seed)
        taus = objective_taus(res, objs, spec.bits, seed=spec.seed) if len(objs) > 1 else {}
        base = {o.name: res.base[o.name].cost() for o in objs}
        probe_seconds, placement = res.probe_seconds, res.placement
        for w in warnings:
            log.warning(w)
        for est in ESTIMATORS if spec.compare_estimators else ():
            est_costs, secs = estimate(lm.model, arch, objs, plan_units, spec.bits, est, spec.group_size, spec.sym,
                                       spec.batch_tokens)
            estimators[est] = {"seconds": secs, "cost_ratio": secs / probe_seconds if probe_seconds else None,
                               "costs": est_costs,
                               "tau_vs_measured": {o: {b: kendall_tau(est_costs[o][b], costs[o][b]["cost"])
                                                       for b in est_costs[o]} for o in est_costs}}
    else:
        out.mkdir(parents=True, exist_ok=True)
        est_costs, probe_seconds = estimate(lm.model, arch, objs, plan_units, spec.bits, spec.estimator,
                                            spec.group_size, spec.sym, spec.batch_tokens)
        costs = {o: {b: {"cost": c, "ci_low": [float("nan")] * len(c), "ci_high": [float("nan")] * len(c)}
                     for b, c in per_bits.items()} for o, per_bits in est_costs.items()}
        stability = {o: {b: float("nan") for b in per_bits} for o, per_bits in est_costs.items()}
        taus, base = {}, {}
    numels = arch.numels()
    widths = {m.name: m.in_features for m in arch.modules}  # what grids with super-groups need (llama.cpp's K types)
    record = {
        "schema": SCHEMA,
        **settings,
        "choice_cost": spec.choice_cost,
        "objectives": {o.name: {"kind": o.kind, "items": o.n_items, "scored_tokens": o.scored_tokens,
                                "cost": o.choice_cost if o.kind == "choice" else o.token_cost,  # auto resolved
                                "base": base.get(o.name)} for o in objs},
        "units": [{"name": u.name, "layer": u.layer, "modules": list(u.modules),
                   "numel": sum(numels[m] for m in u.modules), "in_features": [widths[m] for m in u.modules]}
                  for u in plan_units],
        "fusion_groups": [list(g) for g in arch.fusion_groups()],
        "costs": costs,
        "stability": stability,
        "objective_taus": taus,
        "estimators": estimators,
        **({"placement": placement} if placement else {}),
        "warnings": warnings,
        "seconds": {"total": time.perf_counter() - t0, "sensitivity": probe_seconds,
                    **({"probe_wall_this_run": res.seconds} if spec.estimator == "measured" else {})},
        "machine": machine_info(),
        "date": now(),
    }
    record = schemas.Sensitivity.from_dict(record).to_dict()  # the typed record is what is written
    write_json_atomic(out / "sensitivity.json", record)
    if report:
        from tasa.report.profile_report import write_report

        write_report(out / "sensitivity.json", k=top_k)
    return ProfileResult(out, record)
