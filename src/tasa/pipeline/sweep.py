"""tasa sweep: several plans from one profile (budgets x betas), each quantized and evaluated -> sweep.json.

Every plan is allocated here, as tasa allocate does (written to OUTPUT_DIR/plans/), then quantized in memory
on a fresh model by GPTQ with the quantizer options, on one calibration drawn once, and evaluated; with
``--distributed ray`` the plans are Ray tasks, one device each (tasa.distributed.tasks).  Each finished point
is written to OUTPUT_DIR/points/ under a fingerprint of everything it depends on, so a killed sweep resumes
and a point made with other settings is measured again.
"""
from __future__ import annotations

import dataclasses
import hashlib
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from tasa.artifacts import fingerprint, read_json, write_json_atomic
from tasa.config import EvalSpec, QuantizeSpec, Runtime, SweepSpec
from tasa.data import build_calibration, store
from tasa.models import LoadedModel, resolve
from tasa.pipeline.allocate import allocate_bits
from tasa.pipeline.common import check_new_dir, machine_info, model_of, now
from tasa.plan import Plan


@dataclass(frozen=True)
class PlanJob:
    """One plan of a sweep: quantized by GPTQ on ``calib_ids``, evaluated by ``evaluation``."""

    plan: Plan
    calib_ids: torch.Tensor
    quantize: QuantizeSpec
    evaluation: EvalSpec
    batch_size: int


def run_plan(lm: LoadedModel, job: PlanJob) -> dict:
    """Quantize ``lm`` (a fresh model: changed in place) by ``job`` and evaluate it: {"results", "quantize"}."""
    from tasa.pipeline.evaluate import evaluate
    from tasa.pipeline.quantize import with_quantizer_options
    from tasa.quant.apply import quantize_model

    arch = resolve(lm.model)
    plan = with_quantizer_options(job.plan, job.quantize)
    report = quantize_model(lm.model, arch, plan, job.calib_ids if plan.method == "gptq" else None,
                            batch_size=job.batch_size, true_sequential=job.quantize.true_sequential, progress=False,
                            float_targets=job.quantize.float_strength(plan.method))
    ev = evaluate(lm, job.evaluation, runtime=Runtime(device=str(next(lm.model.parameters()).device),
                                                      batch_size=job.batch_size, progress=False))
    return {"results": ev.record["results"], "quantize_seconds": report.seconds}


@dataclass(frozen=True)
class SweepResult:
    output_dir: Path
    record: dict = field(repr=False)


def sweep(model: str | LoadedModel, sensitivity: str | Path, output_dir: str | Path, spec: SweepSpec,
          runtime: Runtime = Runtime()) -> SweepResult:
    """Allocate, quantize and evaluate every plan of ``spec`` from the profile ``sensitivity``; writes
    ``sweep.json``: per plan its allocation (budget, beta, average bits, bits per layer), the evaluation's
    results and its seconds."""
    out = check_new_dir(output_dir)
    t0 = time.perf_counter()
    plans, summaries = {}, {}
    for key, allocation in spec.allocations():  # a bad profile or an infeasible budget fails before the model loads
        path = out / "plans" / f"{key}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        summaries[key] = allocate_bits(sensitivity, path, allocation).summary
        plans[key] = Plan.load(path)
    lm, name = model_of(model, runtime)
    calib_ids = build_calibration(lm.tokenizer, spec.calib, lm.max_length).input_ids
    depends = {"model": name, "calib": spec.calib.describe(), "nsamples": spec.calib.nsamples,
               "seqlen": spec.calib.seqlen, "seed": spec.calib.seed,
               "calib_sha256": hashlib.sha256(calib_ids.numpy().tobytes()).hexdigest(),
               "quantize": dataclasses.asdict(spec.quantize), "evaluation": dataclasses.asdict(spec.evaluation),
               "batch_size": runtime.batch_size, "data": store.fingerprint()}
    points: dict[str, dict] = {}
    todo = []
    for key, plan in plans.items():
        settings = fingerprint({**depends, "plan": plan.to_dict()})
        path = out / "points" / f"{key}.json"
        rec = read_json(path) if path.is_file() else None
        if rec is not None and rec.get("settings") == settings:
            points[key] = rec
        else:
            todo.append((key, settings))
    jobs = [PlanJob(plans[k], calib_ids, spec.quantize, spec.evaluation, runtime.batch_size) for k, _ in todo]
    run_jobs = _runner(lm, runtime)
    del lm  # the plans load fresh models: this one (when loaded here) is not kept beside them
    for i, result, secs in run_jobs(jobs):
        key, settings = todo[i]
        points[key] = {"plan": key, **result, "seconds": secs, "settings": settings}
        write_json_atomic(out / "points" / f"{key}.json", points[key])
    rows = [{"plan": key, "budget": a.budget, "beta": a.beta, "average_bits": summaries[key]["average_weight_bits"],
             "layer_bits": summaries[key].get("layer_bits"), "results": points[key]["results"],
             "seconds": points[key]["seconds"]} for key, a in spec.allocations()]
    record = {"model": name, "sensitivity": str(sensitivity), "calib": spec.calib.describe(),
              "quantize": dataclasses.asdict(spec.quantize), "evaluation": dataclasses.asdict(spec.evaluation),
              "rows": rows, "measured_this_run": len(jobs),
              "placement": "ray" if runtime.cluster.backend else "serial",
              "seconds": time.perf_counter() - t0, "machine": machine_info(), "date": now()}
    write_json_atomic(out / "sweep.json", record)
    return SweepResult(out, record)


def _runner(lm: LoadedModel, runtime: Runtime):
    """What runs the plans: here, one after another on a fresh model each; or Ray tasks (--distributed ray)."""
    if runtime.cluster.backend is not None:
        from tasa.distributed.cluster import ModelSource
        from tasa.distributed.tasks import ray_map

        return ray_map(runtime.cluster, ModelSource.of(lm, resolve(lm.model)), run_plan, "plans", runtime.progress)

    source = lm.source

    def serial(jobs):
        for i, job in enumerate(tqdm(jobs, desc="plans", disable=not runtime.progress)):
            t = time.perf_counter()
            yield i, run_plan(model_of(source, runtime)[0], job), time.perf_counter() - t
    return serial
