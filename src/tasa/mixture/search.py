"""Calibration-mixture search: score every mixture of a grid, keep the best.

Token sets (all ``seqlen`` tokens per sequence, seeded):

- ``general``: ``nsamples`` windows of the general source (e.g. wikitext2 validation);
- one set per task source: ``nsamples`` windows of its calibration rows, **minus** the
  held-out rows (a seeded content-hash split, tasa.data.split_heldout);
- ``heldout``: ``heldout_samples`` windows of the held-out rows of the target sources
  (default: the task sources), shared equally among them.

Evaluation rows never enter any of them: sources resolve to calibration splits only.

Criteria (tasa.mixture.criteria):

- ``hessian-trace``: f(w) = tr(H_test H_w^-1) per linear input (damped), combined over
  inputs as the parameter-weighted mean of f / d (d the input size; 1 when every held-out
  Hessian equals the mixture's), the weight of an input being the number of weights of the
  linears reading it.  Lower is better.  With two sources, also the curve for other
  dampings and on a fine alpha grid (convexity, blow-up as alpha -> 0).
- ``grad-align``: the mean over decoder layers of the cosine between the mixture's
  loss gradient and the held-out gradient, from count sketches.  Higher is better.
- ``measured``: per grid point, GPTQ-quantize the model at ``measure_bits`` on that
  mixture and measure the mean NLL of the held-out windows.  Lower is better.  Each
  point is stored as it finishes (resumable).
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch

from tasa import schemas
from tasa.artifacts import fingerprint, read_json, write_json_atomic
from tasa.config import MIXTURE_CRITERIA, CalibSpec, MixtureSpec, QuantSpec, Runtime
from tasa.data import store
from tasa.data.calib import apportion, mix_sources, sample_source, split_heldout
from tasa.data.sources import resolve_calibration_source
from tasa.errors import TasaError
from tasa.mixture.criteria import is_convex, mixture_cosine, pencil_trace, simplex_grid, trace_direct
from tasa.quant.rtn import SYM_GRID

log = logging.getLogger(__name__)

SCHEMA = schemas.MIXTURE
CRITERIA = MIXTURE_CRITERIA
LOWER_IS_BETTER = {"hessian-trace": True, "grad-align": False, "measured": True}
DAMP_STUDY = (1e-4, 1e-3, 1e-2, 1e-1)
FINE_STEPS = 200
DEFAULT_RATIOS = (0.0, 0.125, 0.25, 0.5, 0.75, 0.875, 1.0)


def mixture_grid(n_task_sources: int, ratios: list[float] | None, step: float | None) -> list[tuple[float, ...]]:
    """Weights (general, task_1, .., task_K) of the mixtures to score.

    Without ``step``: one point per general share r in ``ratios`` (default DEFAULT_RATIOS), the task
    sources sharing 1 - r equally.  With ``step``: the whole simplex over all sources at that step.
    """
    if step is not None:
        if ratios is not None:
            raise TasaError("give either ratios (general shares, tasks sharing the rest equally) or a simplex step")
        return simplex_grid(n_task_sources + 1, step)
    ratios = DEFAULT_RATIOS if ratios is None else ratios
    if not ratios or any(not 0.0 <= r <= 1.0 for r in ratios):
        raise TasaError(f"ratios are general-text shares in [0, 1], got {ratios}")
    return [(float(r), *([(1.0 - float(r)) / n_task_sources] * n_task_sources))
            for r in sorted(set(ratios), reverse=True)]


def calib_string(names: list[str], weights: tuple[float, ...]) -> str:
    """The --calib spec of a mixture (zero shares dropped)."""
    return ",".join(f"{n}:{w:g}" for n, w in zip(names, weights) if w > 0)


def token_sets(tokenizer, general: str, tasks: list[str], targets: list[str], nsamples: int, seqlen: int,
               heldout_samples: int, heldout_fraction: float, seed: int):
    """The general, per-task calibration and held-out token sets, and the resolved calibration sources."""
    gen = resolve_calibration_source(general)
    calib_sources = [gen]
    split = {}
    for name in dict.fromkeys([*tasks, *targets]):
        split[name] = split_heldout(resolve_calibration_source(name), heldout_fraction, seed)
    calib_sources += [split[t][0] for t in tasks]
    sets = {"general": sample_source(tokenizer, gen, nsamples, seqlen, seed)}
    for t in tasks:
        sets[t] = sample_source(tokenizer, split[t][0], nsamples, seqlen, seed)
    held = [sample_source(tokenizer, split[t][1], n, seqlen, seed)
            for t, n in zip(targets, apportion([1.0] * len(targets), heldout_samples)) if n]
    sets["heldout"] = torch.cat(held)
    return sets, calib_sources


def _hessian_trace(model, arch, sets, names, grid, damp, damping_study, batch_size, device, progress) -> dict:
    from tasa.mixture.collect import collect_hessians

    two = all(w[1:] == (w[1],) * (len(w) - 1) for w in grid)  # a 1-D family: closed form in alpha
    alphas = [w[0] for w in grid]
    fine = [i / FINE_STEPS for i in range(FINE_STEPS + 1)]
    layer_vals: list[list[float]] = []
    layer_weight: list[float] = []
    study = {d: [0.0] * len(grid) for d in DAMP_STUDY} if two and damping_study else {}
    fine_vals = [0.0] * len(fine)
    inputs = []
    total_numel = sum(arch.numels().values())

    def on_layer(index, hessians, numel):
        vals = [0.0] * len(grid)
        lw = 0.0
        for inp, n in numel.items():
            hs = [hessians[s][inp] for s in names]
            h_test = hessians["heldout"][inp]
            d = h_test.shape[0]
            weight = n / total_numel
            if two:
                h_tasks = sum(hs[1:]) / (len(hs) - 1)
                pt = pencil_trace(hs[0], h_tasks, h_test, damp)
                f = (pt(alphas) / d).tolist()
                for j, v in enumerate((pt(fine) / d).tolist()):
                    fine_vals[j] += weight * v
                for dmp in study:
                    g = (pencil_trace(hs[0], h_tasks, h_test, dmp)(alphas) / d).tolist()
                    study[dmp] = [a + weight * b for a, b in zip(study[dmp], g)]
            else:
                f = [trace_direct(hs, h_test, w, damp) / d for w in grid]
            inputs.append({"input": inp, "layer": index, "dim": d, "numel": n, "values": f})
            vals = [a + weight * b for a, b in zip(vals, f)]
            lw += weight
        layer_vals.append([v / lw for v in vals])
        layer_weight.append(lw)

    collect_hessians(model, arch, {k: sets[k] for k in ("general", *names[1:], "heldout")}, batch_size, on_layer,
                     device=device, progress=progress)
    values = [sum(w * lv[j] for w, lv in zip(layer_weight, layer_vals)) for j in range(len(grid))]
    out = {"values": values, "per_layer": layer_vals, "inputs": inputs, "lower_is_better": True}
    if study:
        out["damping"] = {f"{d:g}": v for d, v in study.items()}
    if two:
        out["fine"] = {"alpha": fine, "values": fine_vals}
        out["convex"] = is_convex(fine_vals)
        out["blowup_ratio"] = fine_vals[0] / min(fine_vals)  # f(alpha = 0) over the minimum
    return out


def _grad_align(model, arch, sets, names, grid, sketch_dim, batch_size, seed, progress) -> dict:
    from tasa.mixture.collect import gradient_sketches

    keys = ["general", *names[1:], "heldout"]
    sk = gradient_sketches(model, arch, {k: sets[k] for k in keys}, batch_size, sketch_dim, seed, progress)
    stacked = torch.stack([sk[k] for k in keys], dim=1)  # (layers, K+1, k)
    grams = stacked @ stacked.transpose(1, 2)
    per_layer = [[mixture_cosine(grams[i], w) for w in grid] for i in range(grams.shape[0])]
    values = [sum(pl[j] for pl in per_layer) / len(per_layer) for j in range(len(grid))]
    return {"values": values, "per_layer": per_layer, "lower_is_better": False}


@dataclass(frozen=True)
class MeasuredPoint:
    """One measured grid point: GPTQ at ``bits`` (``group_size``) on ``calib_ids``, scored on ``heldout``."""

    calib_ids: torch.Tensor  # (nsamples, seqlen)
    heldout: torch.Tensor  # (windows, seqlen)
    bits: int
    group_size: int
    batch_size: int


def measure_point(lm, point: MeasuredPoint, progress: bool = False) -> float:
    """Quantize ``lm`` (a fresh model: changed in place) by ``point`` and return the mean NLL per held-out token."""
    from tasa.eval.perplexity import window_scores
    from tasa.models import resolve
    from tasa.plan import Plan
    from tasa.quant.apply import quantize_model

    arch = resolve(lm.model)
    plan = Plan.uniform([m.name for m in arch.modules], QuantSpec(bits=point.bits, group_size=point.group_size))
    quantize_model(lm.model, arch, plan, point.calib_ids, batch_size=point.batch_size, progress=progress)
    held = point.heldout
    return float(window_scores(lm.model, held, batch_size=point.batch_size, progress=False).nll.sum()) / (
        held.shape[0] * (held.shape[1] - 1))


# What measures points: given the points, yields (index, mean held-out NLL, seconds) as each finishes.
PointRunner = Callable[[list[MeasuredPoint]], Iterator[tuple[int, float, float]]]


def serial_points(load_model: Callable, progress: bool) -> PointRunner:
    """Points measured here, one after another, each on a fresh model from ``load_model``."""
    def run(points: list[MeasuredPoint]) -> Iterator[tuple[int, float, float]]:
        for i, point in enumerate(points):
            t0 = time.perf_counter()
            nll = measure_point(load_model(), point, progress)
            yield i, nll, time.perf_counter() - t0
    return run


def _measured(run_points: PointRunner, sets, calib_sources, grid, spec: MixtureSpec, group_size: int,
              batch_size: int, out_dir: Path | None, model_id: str, tokenizer) -> dict:
    """GPTQ at ``spec.measure_bits`` on each mixture of the grid, scored by the held-out NLL; each point is
    stored as it finishes under a fingerprint of everything it depends on, so a resumed search reuses only
    identical points.  The calibration of every point is drawn here; ``run_points`` measures them."""
    nsamples, seqlen, seed, bits = spec.nsamples, spec.seqlen, spec.seed, spec.measure_bits
    depends = {"model": model_id, "sources": [s.name for s in calib_sources],
               "bits": bits, "group_size": group_size, "grid": SYM_GRID, "nsamples": nsamples,
               "seqlen": seqlen, "seed": seed, "targets": spec.targets, "heldout_samples": spec.heldout_samples,
               "heldout_fraction": spec.heldout_fraction, "batch_size": batch_size, "data": store.fingerprint()}
    values: list[float | None] = [None] * len(grid)
    seconds: list[float | None] = [None] * len(grid)
    todo, points = [], []
    for j, w in enumerate(grid):
        rec = _stored_point(out_dir, w, fingerprint({**depends, "weights": list(w)}))
        if rec is not None:
            values[j], seconds[j] = rec["nll"], rec["seconds"]
            continue
        mix = CalibSpec(sources=tuple((s.name, x) for s, x in zip(calib_sources, w) if x > 0),
                        nsamples=nsamples, seqlen=seqlen, seed=seed)
        todo.append(j)
        points.append(MeasuredPoint(mix_sources(tokenizer, calib_sources, list(w), mix).input_ids, sets["heldout"],
                                    bits, group_size, batch_size))
    for i, nll, secs in run_points(points):
        j = todo[i]
        values[j], seconds[j] = nll, secs
        if out_dir is not None:
            write_json_atomic(_point_path(out_dir, grid[j]),
                              {"weights": list(grid[j]), "bits": bits, "group_size": group_size, "nll": nll,
                               "seconds": secs, "settings": fingerprint({**depends, "weights": list(grid[j])})})
    return {"values": values, "lower_is_better": True, "bits": bits, "group_size": group_size,
            "seconds_per_point": seconds}


def _point_path(out_dir: Path, w) -> Path:
    return out_dir / "measured" / ("-".join(f"{x:.6g}" for x in w) + ".json")


def _stored_point(out_dir: Path | None, w, settings: str) -> dict | None:
    if out_dir is None or not _point_path(out_dir, w).is_file():
        return None
    rec = read_json(_point_path(out_dir, w))
    return rec if rec.get("settings") == settings else None


def search(lm, load_model: Callable, spec: MixtureSpec, group_size: int, runtime: Runtime = Runtime(),
           out_dir: Path | None = None, run_points: PointRunner | None = None) -> dict:
    """Score every mixture of the grid by each criterion of ``spec``; the first criterion chooses.
    ``group_size``: the resolved group size of the measured criterion's GPTQ; ``load_model`` loads a fresh
    model for each of its points, measured here one after another unless ``run_points`` measures them
    (e.g. on a Ray cluster: tasa.distributed.points)."""
    from tasa.models import resolve

    general, tasks, criteria = spec.general, list(spec.tasks), list(spec.criteria)
    nsamples, seqlen, seed, damp = spec.nsamples, spec.seqlen, spec.seed, spec.damp
    batch_size, device, progress = runtime.batch_size, runtime.primary, runtime.progress
    if general in tasks:
        raise TasaError("give one or more distinct task sources, other than the general source")
    targets = list(spec.targets) if spec.targets else list(tasks)
    if spec.sketch_dim < 1:
        raise TasaError("--sketch-dim must be positive")
    QuantSpec(bits=spec.measure_bits, group_size=group_size, damp=damp)
    grid = mixture_grid(len(tasks), list(spec.ratios) if spec.ratios is not None else None, spec.grid_step)
    names = ["general", *tasks]
    t0 = time.perf_counter()
    sets, calib_sources = token_sets(lm.tokenizer, general, tasks, targets, nsamples, seqlen, spec.heldout_samples,
                                     spec.heldout_fraction, seed)
    arch = resolve(lm.model)
    results: dict = {}
    seconds: dict = {"token_sets": time.perf_counter() - t0}
    for crit in criteria:
        t = time.perf_counter()
        if crit == "hessian-trace":
            results[crit] = _hessian_trace(lm.model, arch, sets, names, grid, damp, spec.damping_study, batch_size,
                                           device, progress)
        elif crit == "grad-align":
            results[crit] = _grad_align(lm.model, arch, sets, names, grid, spec.sketch_dim, batch_size, seed, progress)
        else:
            results[crit] = _measured(run_points or serial_points(load_model, progress), sets, calib_sources, grid,
                                      spec, group_size, batch_size, out_dir, str(getattr(lm, "path", "")),
                                      lm.tokenizer)
        seconds[crit] = time.perf_counter() - t
        vals = results[crit]["values"]
        best = (min if LOWER_IS_BETTER[crit] else max)(range(len(grid)), key=lambda j: (vals[j], j))
        results[crit]["best"] = list(grid[best])
    chosen = results[criteria[0]]["best"]
    source_names = [general, *tasks]
    return {
        "schema": SCHEMA, "general": general, "tasks": tasks, "targets": targets, "criteria": criteria,
        "sources": source_names, "simplex": spec.grid_step is not None, "grid": [list(w) for w in grid],
        "results": results,
        "chosen": chosen, "calib": calib_string(source_names, tuple(chosen)),
        "nsamples": nsamples, "seqlen": seqlen, "heldout_samples": spec.heldout_samples,
        "heldout_fraction": spec.heldout_fraction, "damp": damp, "sketch_dim": spec.sketch_dim, "seed": seed,
        "seconds": {**seconds, "total": time.perf_counter() - t0},
    }
