"""Probes on a local Ray cluster against the serial path, and the cost model's speed-up at scale (issue 39).

    .venv/bin/python benchmarks/distributed.py                 # both parts
    .venv/bin/python benchmarks/distributed.py --part local    # the measured profile only

``local``: SmolLM2-135M's layer profile as `tasa run` makes it (wikitext2, gsm8k, arc_easy; 768 probe tokens;
RTN, bits 3/4/8, group size 64), made twice from scratch in benchmarks/.work/distributed: serially in this
process (torch's 2 threads), and on a local Ray cluster of 2 workers of 1 thread each (``--distributed ray``).
Rows: wall time of the probes, summed probe compute, the workers' start (each loads the model), the share of
the workers' time not spent in probes (scheduling, transfers, waiting for this process, the last probes'
imbalance), the largest cost difference, and whether the 3.5-bit plans allocated from the two profiles agree.

``simulate``: tasa.distributed.costmodel on Llama-3-8B and Llama-3-70B shapes (see docs/DISTRIBUTED.md): the
probe makespan of the task placement, of one pipeline over all workers, and of workers // S pipelines of the
fewest stages S whose weights fit an H200, at 1..64 workers, as speed-ups over one task worker.  Inputs:
SmolLM2-135M's costs measured here on one thread (a layer pass, the head with the scoring, quantizing a layer,
a layer's inputs put in Ray's object store and fetched by another process), scaled to each shape by FLOPs and
bytes; once as measured, once with transfers 100x dearer against compute (a GPU computes about two orders of
magnitude faster than these cores; its links do not move data that much faster).
"""
from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import time
from pathlib import Path

_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or '.').resolve() != _HERE]
sys.path.insert(0, str(_HERE.parent))
from benchmarks.common import RESULTS, WORK, row, write_results  # noqa: E402

BENCH = "distributed"
OBJECTIVES = ("wikitext2", "gsm8k", "arc_easy")
BITS = (3, 4, 8)
TOKENS = 768
BUDGET = 3.5


def _profile(out: Path, cluster) -> dict:
    import torch

    from tasa import pipeline
    from tasa.config import ProfileSpec, Runtime

    shutil.rmtree(out, ignore_errors=True)
    spec = ProfileSpec(objectives=OBJECTIVES, bits=BITS, group_size=64, probe_tokens=TOKENS)
    t = time.perf_counter()
    rec = pipeline.profile("smollm2-135m", out, spec, Runtime(progress=False, cluster=cluster), report=False).record
    rec["bench_wall"] = time.perf_counter() - t
    rec["torch_threads"] = torch.get_num_threads()
    rec["dir"] = str(out)
    return rec


def _plan(profile_dir: Path) -> dict:
    from tasa import pipeline
    from tasa.config import AllocationSpec

    out = profile_dir / "plan.json"
    pipeline.allocate_bits(profile_dir, out, AllocationSpec(budget=BUDGET, bits=BITS))
    return json.loads(out.read_text())["modules"]


def _max_rel_diff(a: dict, b: dict) -> float:
    import numpy as np

    return max(float(np.max(np.abs(np.array(b["costs"][o][k]["cost"]) - np.array(a["costs"][o][k]["cost"]))
                            / np.maximum(np.abs(np.array(a["costs"][o][k]["cost"])), 1e-12)))
               for o in a["costs"] for k in a["costs"][o])


def local() -> list[dict]:
    import ray

    from tasa.config import Cluster

    work = WORK / BENCH
    runs = {"serial-2threads": _profile(work / "serial", Cluster())}
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        for placement in ("task", "pipeline"):
            runs[f"ray-{placement}-2workers-1thread"] = _profile(work / placement,
                                                                 Cluster("ray", workers=2, placement=placement))
    finally:
        ray.shutdown()
    serial = runs["serial-2threads"]
    serial_plan = _plan(work / "serial")
    rows = []
    for name, rec in runs.items():
        place = rec["placement"]
        workers = place.get("workers", 1)
        compute = rec["seconds"]["sensitivity"]
        wall = place.get("probe_wall_seconds", rec["seconds"]["probe_wall_this_run"])
        metrics = {"probe_wall_seconds": round(wall, 2), "probe_compute_seconds": round(compute, 2),
                   "profile_seconds": round(rec["seconds"]["total"], 2),
                   "worker_start_seconds": round(place.get("start_seconds", 0.0), 2),
                   "workers": workers, "threads_per_worker": place.get("threads", rec["torch_threads"]),
                   "probes": len(rec["units"]) * len(BITS)}
        if place["backend"] == "ray":
            metrics.update(placement=place["placement"], slices=place.get("slices"),
                           worker_idle_share=round(1 - compute / (workers * wall), 4),
                           probe_wall_ratio_vs_serial=round(wall / rows[0]["metrics"]["probe_wall_seconds"], 3),
                           profile_ratio_vs_serial=round(rec["seconds"]["total"] / serial["seconds"]["total"], 3),
                           max_rel_cost_diff_vs_serial=_max_rel_diff(serial, rec),
                           same_plan_as_serial=_plan(Path(rec["dir"])) == serial_plan)
        rows.append(row(name, "tasa", "profile-rtn", None, 64, f"{TOKENS} probe tokens x 3 objectives", metrics,
                        round(rec["bench_wall"], 2)))
    return rows


# decoder shapes (the models' config.json): layers, hidden, MLP width, attention heads, KV heads, head dim, vocab
SHAPES = {"smollm2-135m": (30, 576, 1536, 9, 3, 64, 49152),
          "llama-3-8b": (32, 4096, 14336, 32, 8, 128, 128256),
          "llama-3-70b": (80, 8192, 28672, 64, 8, 128, 128256)}
WORKERS = (1, 2, 4, 8, 16, 32, 64)
DEVICE_GB, USABLE = 141.0, 0.8  # an H200, of which weights may take 80% (the rest: activations, kept inputs)
TRANSFER_SCALES = (1, 100)  # transfers as measured here, and 100x dearer against compute (a GPU's compute is
# two orders of magnitude faster than these CPU cores; its links are not)


def layer_params(shape) -> int:
    _, h, inter, heads, kv, hd, _ = shape
    return h * heads * hd * 2 + h * kv * hd * 2 + 3 * h * inter


def unit_costs() -> dict:
    """SmolLM2-135M's costs on one thread here, on the probe rows of the local profile: a decoder-layer pass,
    the head with the scoring, quantizing a layer (RTN, 3 bits), and a layer's inputs put in Ray's object store
    and fetched by another process."""
    import ray
    import torch

    from tasa.config import ProfileSpec
    from tasa.models import load, resolve
    from tasa.models.walker import capture, forward_layer
    from tasa.profile.objectives import build_objective
    from tasa.profile.probe import Scorer, head_is_plain, objective_batches, quant_swapped, state_bytes

    torch.set_num_threads(1)
    spec = ProfileSpec(objectives=OBJECTIVES, bits=BITS, group_size=64, probe_tokens=TOKENS)
    lm = load("smollm2-135m")
    arch = resolve(lm.model)
    objs = [build_objective(n, lm.tokenizer, min_tokens=TOKENS, seqlen=spec.probe_seqlen, seed=0,
                            max_length=lm.max_length) for n in OBJECTIVES]
    batches = objective_batches(lm.model, objs, spec.batch_tokens)
    scorer = Scorer(lm.model, arch, objs, batches, head_is_plain(lm.model, batches[OBJECTIVES[0]][0]))
    states, kwargs = {}, {}
    for o in objs:
        cap = capture(lm.model, arch, [b.inputs for b in batches[o.name]])
        for i, h in enumerate(cap.hidden):
            states[(o.name, i)], kwargs[(o.name, i)] = h, cap.kwargs[i]

    def timed(fn, reps=3):
        best = float("inf")
        for _ in range(reps):
            t = time.perf_counter()
            fn()
            best = min(best, time.perf_counter() - t)
        return best

    last = arch.num_layers - 1
    with torch.no_grad():
        layer = timed(lambda: [forward_layer(arch.layers[0], h, kwargs[k][0], 0) for k, h in states.items()])
        tail = timed(lambda: scorer.score(last, lambda k: states[k], keep_reference=True))
    quant = timed(lambda: quant_swapped(lm.model, tuple(m.name for m in arch.layer_modules(0)), 3, 64, True)
                  .__enter__())
    cpu = {k: v.contiguous() for k, v in states.items()}
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        fetch = ray.remote(lambda box: sum(t.numel() for t in ray.get(box[0]).values()))
        ray.get(fetch.remote([ray.put({})]))  # a worker started
        put = timed(lambda: ray.put(cpu))
        ref = [ray.put(cpu)]
        empty = [ray.put({})]
        transfer = timed(lambda: ray.get(fetch.remote(ref))) - timed(lambda: ray.get(fetch.remote(empty)))
    finally:
        ray.shutdown()
    return {"layer": layer, "head": max(tail - layer, 0.0), "quant": quant, "put": put, "transfer": max(transfer, 0.0),
            "state_bytes": state_bytes(lm.model, batches), "threads": 1}


def simulate(costs: dict) -> dict:
    """The cost model on each shape, from SmolLM2's measured costs scaled by FLOPs (a layer pass and quantizing:
    its linears' parameters; the head: vocab x hidden) and bytes (the inputs: hidden size), same probe tokens."""
    from tasa.distributed.costmodel import ProbeCosts, pipeline_makespan, serial_seconds, task_makespan

    base = SHAPES["smollm2-135m"]
    out = {}
    for name, shape in SHAPES.items():
        flops = layer_params(shape) / layer_params(base)
        head = shape[6] * shape[1] / (base[6] * base[1])
        size = shape[1] / base[1]
        for scale in TRANSFER_SCALES:
            c = ProbeCosts(layers=shape[0], probes_per_layer=len(BITS), layer=costs["layer"] * flops,
                           head=costs["head"] * head, quant=costs["quant"] * flops,
                           transfer=costs["transfer"] * size * scale, put=costs["put"] * size * scale)
            one = task_makespan(c, 1)
            weights = shape[0] * layer_params(shape) * 2 / 1e9
            fit = math.ceil(weights / (DEVICE_GB * USABLE))  # fewest stages whose slices fit one device
            out[f"{name}-transfer-x{scale}"] = {
                "costs": {k: getattr(c, k) for k in ("layers", "probes_per_layer", "layer", "head", "quant",
                                                     "transfer", "put")},
                "serial_seconds": serial_seconds(c), "task_seconds_1": one,
                "weights_gb_bf16": round(weights, 1), "task_fits_one_device": fit == 1, "fewest_stages": fit,
                "task_speedup": {w: round(one / task_makespan(c, w), 3) for w in WORKERS},
                "one_pipeline_speedup": {w: round(one / pipeline_makespan(c, min(w, c.layers)), 3)
                                         for w in WORKERS},
                "pipelines_of_fewest_stages_speedup": {w: round(one / pipeline_makespan(c, fit, replicas=w // fit), 3)
                                                       for w in WORKERS if w >= fit}}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--part", choices=["local", "simulate", "all"], default="all")
    args = ap.parse_args()
    path = RESULTS / f"{BENCH}.json"
    old = json.loads(path.read_text()) if path.is_file() else {"rows": []}
    rows = {r["name"]: r for r in old["rows"]}
    extra = {k: v for k, v in old.items() if k not in ("benchmark", "date", "machine", "command", "rows")}
    if args.part in ("local", "all"):
        rows.update({r["name"]: r for r in local()})
    if args.part in ("simulate", "all"):
        extra["unit_costs"] = unit_costs()
        extra["simulation"] = simulate(extra["unit_costs"])
    write_results(BENCH, "python benchmarks/distributed.py " + " ".join(sys.argv[1:]), list(rows.values()), extra)
    print(json.dumps(list(rows.values()), indent=1))


if __name__ == "__main__":
    main()
