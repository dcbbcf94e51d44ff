"""A Ray cluster and a pool of actors, each owning one device, that run submitted calls and survive workers dying.

Ray is imported only here (and only when asked for): ``tasa[distributed]`` installs it.  The pool keeps at most
``depth`` calls in flight per actor (so an actor never waits on the driver), hands a call whose actor died to
another one, and restarts dead actors through Ray (``max_restarts``; their pending calls are retried by Ray,
``max_task_retries``).  Errors raised by the work itself come back as one-line TasaErrors.
"""
from __future__ import annotations

import logging
import os
from collections import deque
import dataclasses
from dataclasses import dataclass
from typing import Any

import torch

from tasa.config import Cluster
from tasa.errors import TasaError

log = logging.getLogger("tasa.distributed")

RESTARTS = 3  # Ray restarts of an actor whose process died, and retries of the calls it held


@dataclass(frozen=True)
class ModelSource:
    """How a worker loads the model the driver holds: what ``tasa.models.load`` is given, and the unit layout."""

    source: str
    dtype: str
    gpu: bool
    stream: bool
    tie_experts: bool

    @classmethod
    def of(cls, lm, arch, stream: bool = False, tie_experts: bool = True) -> "ModelSource":
        """How workers load ``lm`` (loaded here): from the same source (a local path made absolute: workers may
        start elsewhere), at its dtype, on GPUs when it is on one; streamed when ``stream`` or when it is here."""
        from pathlib import Path

        from tasa.models import compute_device, compute_dtype

        where = Path(lm.source)
        return cls(str(where.resolve()) if where.exists() else lm.source,
                   str(compute_dtype(lm.model)).replace("torch.", ""), gpu=compute_device(lm.model).type == "cuda",
                   stream=stream or arch.streamer is not None, tie_experts=tie_experts)

    def load(self):
        """The model, loaded in a worker as this source says (a LoadedModel)."""
        from tasa.models import load

        return load(self.source, dtype=self.dtype, device="cuda" if self.gpu else "cpu", stream=self.stream)


def to_device(x, device):
    """``x`` (tensors, in dicts, tuples, lists and dataclasses) on ``device``."""
    if isinstance(x, torch.Tensor):
        return x.to(device)
    if dataclasses.is_dataclass(x) and not isinstance(x, type):
        return dataclasses.replace(x, **{f.name: to_device(getattr(x, f.name), device) for f in dataclasses.fields(x)})
    if isinstance(x, dict):
        return {k: to_device(v, device) for k, v in x.items()}
    if isinstance(x, (tuple, list)):
        return type(x)(to_device(v, device) for v in x)
    return x


def ray_module():
    """The ``ray`` module, or a one-line error saying how to install it."""
    try:
        import ray
    except ImportError:
        raise TasaError("--distributed ray needs Ray: pip install 'tasa[distributed]'") from None
    return ray


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def connect(cluster: Cluster):
    """Ray, connected to ``cluster.address`` (or RAY_ADDRESS), else to a local instance started now (all of this
    machine's cores); a process already connected stays with its cluster."""
    ray = ray_module()
    if ray.is_initialized():
        return ray
    kwargs = dict(include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING)
    address = cluster.address or os.environ.get("RAY_ADDRESS")
    try:
        ray.init(address=address, **kwargs)
    except Exception as e:  # unreachable head, version mismatch: one line
        raise TasaError(f"could not connect to the Ray cluster at {address or 'a new local instance'}: "
                        f"{_first_line(e)}") from None
    return ray


def worker_count(ray, cluster: Cluster, gpu: bool) -> int:
    """``cluster.workers``, else one per GPU (``gpu``) or per ``threads`` CPU cores of the cluster; an error when
    the cluster cannot hold that many."""
    res = ray.cluster_resources()
    have = int(res.get("GPU", 0)) if gpu else int(res.get("CPU", 0)) // cluster.threads
    if have < 1:
        raise TasaError(f"the Ray cluster has no {'GPU' if gpu else f'{cluster.threads} free CPU cores'} for a "
                        "worker")
    n = cluster.workers or have
    if n > have:
        raise TasaError(f"--workers {n}: the Ray cluster holds {have} worker(s) of "
                        f"{'one GPU' if gpu else f'{cluster.threads} CPU core(s)'}")
    return n


def actor_class(ray, cls: type, gpu: bool, threads: int):
    """``cls`` as a Ray actor owning one GPU or ``threads`` CPU cores, restarted when its process dies (and the
    calls it held retried)."""
    return ray.remote(cls).options(num_cpus=0 if gpu else threads, num_gpus=1 if gpu else 0,
                                   max_restarts=RESTARTS, max_task_retries=RESTARTS)


def get(ray, refs):
    """``ray.get``, with the errors of the work (its own message) and of dead actors as one-line TasaErrors."""
    try:
        return ray.get(refs)
    except ray.exceptions.RayTaskError as e:
        cause = e.cause if getattr(e, "cause", None) is not None else e
        raise TasaError(f"a Ray worker failed: {_first_line(cause)}") from None
    except ray.exceptions.RayActorError as e:
        raise TasaError(f"a Ray worker could not start or died: {_first_line(e)}") from None


def ready(ray, refs: list, block: bool) -> list:
    """The refs of ``refs`` finished now; with ``block``, one at least (waiting for it) unless ``refs`` is empty."""
    if not refs:
        return []
    done, _ = ray.wait(refs, num_returns=len(refs), timeout=0)
    if done or not block:
        return done
    return ray.wait(refs, num_returns=1)[0]


@dataclass
class _Call:
    method: str
    args: tuple
    tag: Any  # the caller's handle for the result


class ActorPool:
    """``n`` actors of ``cls(*init_args)`` (each ``threads`` CPU cores, or one GPU), running calls submitted in
    order, ``depth`` at a time per actor.  :meth:`results` yields (tag, value) as calls finish."""

    def __init__(self, ray, cls: type, init_args: tuple, n: int, gpu: bool, threads: int, depth: int = 2):
        self.ray = ray
        remote = actor_class(ray, cls, gpu, threads)
        self.actors = [remote.remote(*init_args) for _ in range(n)]
        self.depth = depth
        self.queue: deque[_Call] = deque()
        self.running: dict = {}  # ObjectRef -> (call, actor index)
        self.load = [0] * n
        self.dead: set[int] = set()
        self.pids = self.call_all("pid")  # waits for every actor to start: a load error shows here, once

    def call_all(self, method: str) -> list:
        """``method()`` on every live actor, now (between submitted calls)."""
        return get(self.ray, [getattr(self.actors[i], method).remote() for i in self.live()])

    def live(self) -> list[int]:
        return [i for i in range(len(self.actors)) if i not in self.dead]

    def submit(self, method: str, args: tuple, tag: Any) -> None:
        self.queue.append(_Call(method, args, tag))
        self._dispatch()

    def _dispatch(self) -> None:
        while self.queue:
            live = self.live()
            if not live:
                raise TasaError("every Ray worker died; see the Ray logs (ray logs, or /tmp/ray/session_latest)")
            i = min(live, key=lambda j: self.load[j])
            if self.load[i] >= self.depth:
                return
            call = self.queue.popleft()
            ref = getattr(self.actors[i], call.method).remote(*call.args)
            self.running[ref] = (call, i)
            self.load[i] += 1

    def results(self, wait: bool = False, at_least: int = 0) -> list[tuple[Any, Any]]:
        """(tag, value) of the calls finished now: of ``at_least`` calls at least (or all there are), waiting
        for them; with ``wait``, of every call submitted."""
        out: list = []
        while self.running:
            done = ready(self.ray, list(self.running), block=wait or len(out) < at_least)
            if not done:
                break
            for ref in done:
                call, i = self.running.pop(ref)
                self.load[i] -= 1
                try:
                    out.append((call.tag, self.ray.get(ref)))
                except self.ray.exceptions.RayActorError:  # died past its restarts: its work goes elsewhere
                    log.warning("Ray worker %d died past its %d restarts; its work goes to the others", i, RESTARTS)
                    self.dead.add(i)
                    self.queue.appendleft(call)
                except self.ray.exceptions.RayTaskError:
                    get(self.ray, ref)  # raises the work's own error, in one line
            self._dispatch()
        return out

    def close(self) -> None:
        for a in self.actors:
            self.ray.kill(a)
        self.actors, self.running = [], {}
