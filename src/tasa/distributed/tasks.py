"""Independent jobs that each need a fresh model, as Ray tasks: the measured mixture search's grid points and
the plans of a sweep.

A job is a module-level function ``fn(lm, job)`` of a freshly loaded model (changed in place) and a picklable
job; each task loads the model from its source (its files must be reachable from every node), runs it on one
device, and returns the result with its seconds.  Tasks see this process's data settings (TASA_DATA_DIR,
TASA_DATA_SOURCE), so one that reads datasets (a sweep's evaluation) reads the same rows.  Ray retries a task whose worker died; the caller stores each
result as it arrives, so a run killed as a whole resumes.
"""
from __future__ import annotations

import os
import time
from typing import Any, Callable, Iterator

import torch
from tqdm.auto import tqdm

from tasa.config import Cluster
from tasa.distributed.cluster import RESTARTS, connect, get
from tasa.distributed.cluster import ModelSource


def _run(fn: Callable, model: ModelSource, job: Any, threads: int) -> tuple[Any, float]:
    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    return fn(model.load(), job), time.perf_counter() - t0


DATA_ENV = ("TASA_DATA_DIR", "TASA_DATA_SOURCE")  # where tasa reads its datasets (tasa.data.store)


def data_env() -> dict[str, str]:
    """This process's data settings, for tasks that read datasets themselves (a sweep's evaluations): they then
    read the rows this process would (a TASA_DATA_DIR must be reachable at the same path on every node)."""
    return {k: os.environ[k] for k in DATA_ENV if k in os.environ}


def ray_map(cluster: Cluster, model: ModelSource, fn: Callable, desc: str = "jobs", progress: bool = True,
            ) -> Callable[[list], Iterator[tuple[int, Any, float]]]:
    """A function of jobs that runs ``fn(fresh model, job)`` for all of them at once on the cluster's devices
    and yields (index, result, seconds) as each finishes."""
    def run(jobs: list) -> Iterator[tuple[int, Any, float]]:
        if not jobs:
            return
        ray = connect(cluster)
        task = ray.remote(_run).options(num_cpus=0 if model.gpu else cluster.threads,
                                        num_gpus=1 if model.gpu else 0, max_retries=RESTARTS,
                                        runtime_env={"env_vars": data_env()})
        refs = {task.remote(fn, model, job, cluster.threads): i for i, job in enumerate(jobs)}
        with tqdm(total=len(jobs), desc=f"{desc} (ray)", disable=not progress) as bar:
            while refs:
                ready, _ = ray.wait(list(refs), num_returns=1)
                for ref in ready:
                    result, secs = get(ray, ref)
                    bar.update(1)
                    yield refs.pop(ref), result, secs
    return run
