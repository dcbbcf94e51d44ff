"""Sensitivity probes on a Ray cluster, placed as tasks over workers that each hold the whole model.

This process walks the decoder layers as the serial profile does (tasa.profile.probe.run_probes): it computes
the full-precision inputs of each layer once, puts them (and, for GPTQ probes, the layer's Hessians) in Ray's
object store, and submits that layer's probes, (unit, bit-width) pairs, to a pool of workers, one per device
(a GPU, or ``threads`` CPU cores).  Each worker loads the model itself (from the same source: its files must
be reachable from every node), keeps the inputs of the layer it last probed, and runs the same
:class:`tasa.profile.probe.Scorer` as the serial path, so a probe's losses differ from the serial ones only by
summation order (thread counts differ).  Finished probes are written to the probe store here, as they arrive;
a worker that dies is restarted by Ray and its probes retried, and a run killed as a whole resumes from the
store.  At most as many layers' inputs are in flight as ``max_state_gb`` holds (two at least).
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass

import torch

from tasa.config import Cluster, ProfileSpec
from tasa.distributed.cluster import ActorPool, ModelSource, connect, to_device, worker_count
from tasa.profile.objectives import Objective
from tasa.profile.probe import ProbeJob, Scorer, StateKey, objective_batches


@dataclass
class _Setup:
    """What every worker needs besides the model, put in the object store once."""

    objectives: list[Objective]
    batch_tokens: int
    max_logits_gb: float
    plain_head: bool
    threads: int


class ModelWorker:
    """What every probe worker holds: the model, loaded once (``layers``: only those decoder layers stay
    resident, for a pipeline stage of a streamed model), the objectives' batches, the KL references and the
    inputs (and Hessians) of the layer it last probed."""

    def __init__(self, model: ModelSource, setup: _Setup, layers: range | None = None):
        torch.set_num_threads(setup.threads)
        from tasa.models import compute_device, resolve

        lm = model.load()
        arch = resolve(lm.model)
        arch.tie_experts = model.tie_experts
        self.device = compute_device(lm.model)
        if arch.streamer is not None and layers is not None:  # a stage: its layers and the rest stay resident
            for i in layers:
                arch.streamer.fetch(i, self.device)
            arch.streamer.hold_outside()
        batches = objective_batches(lm.model, setup.objectives, setup.batch_tokens, setup.max_logits_gb)
        self.scorer = Scorer(lm.model, arch, setup.objectives, batches, setup.plain_head)
        self.layer: int | None = None
        self.states: dict = {}
        self.hessians = None

    def pid(self) -> int:
        return os.getpid()

    def _references(self, references: list) -> None:
        """Fetch the KL references (``references``: their object ref, once the full-precision pass is done) once."""
        import ray

        if references and not self.scorer.refs:
            self.scorer.refs = to_device(ray.get(references[0]), self.device)

    def _inputs(self, layer: int, layer_refs: list, references: list) -> None:
        """Fetch the KL references once, and ``layer``'s inputs and Hessians when the layer changes."""
        import ray

        self._references(references)
        if self.layer != layer:
            states, hessians = ray.get(layer_refs)
            self.states, self.hessians = to_device(states, self.device), to_device(hessians, self.device)
            self.layer = layer


class ProbeWorker(ModelWorker):
    """A Ray actor of the task placement: the whole model; probes one (unit, bit-width) per call."""

    def reference(self, keys: list[StateKey], box: list) -> dict:
        """The full-precision pass of the batches ``keys`` from layer 0's inputs (``box``: their object ref):
        token scores with the top-k log-probs, on the CPU."""
        import ray

        states = ray.get(box[0])
        return {k: to_device(self.scorer.batch_scores(k, 0, states[k].to(self.device), keep_reference=True), "cpu")
                for k in keys}

    def probe(self, job: ProbeJob, spec: ProfileSpec, layer_refs: list, references: list) -> tuple[dict, float]:
        """The job's losses and compute seconds; ``layer_refs`` holds the object refs of its layer's inputs and
        Hessians, ``references`` that of the KL references (nested in lists, so that this worker fetches them once
        per layer and once, not once per probe; a restarted worker fetches them again)."""
        from tasa.models.walker import resident

        self._inputs(job.unit.layer, layer_refs, references)
        t = time.perf_counter()
        with resident(self.scorer.arch, job.unit.layer, self.device):
            losses = self.scorer.probe(job.unit, job.bits, spec, self.states.__getitem__, self.hessians)
        return losses, time.perf_counter() - t


class RayProbes:
    """The runner of :func:`tasa.profile.probe.run_probes` on a Ray pool (see the module docstring)."""

    def __init__(self, scorer: Scorer, spec: ProfileSpec, cluster: Cluster, model: ModelSource,
                 max_logits_gb: float = 2.0):
        ray = connect(cluster)
        self.ray, self.spec, self.scorer = ray, spec, scorer
        self.gpu, self.threads = model.gpu, cluster.threads
        t = time.perf_counter()
        # held here for the workers' life: a restarted worker is built from it again
        self.setup = ray.put(_Setup(scorer.objectives, spec.batch_tokens, max_logits_gb, scorer.plain,
                                    cluster.threads))
        self.pool = self._start(cluster, model, worker_count(ray, cluster, model.gpu))
        self.ready_at = time.perf_counter()
        self.start_seconds = self.ready_at - t
        self.layers: dict[int, list] = {}  # layer -> [object refs of its inputs and Hessians, probes pending]
        self.max_layers = 2
        self._done: list = []  # probes finished while waiting for room, not yet handed back
        self.references: list = []  # [object ref of the KL references], once the full-precision pass is done

    def _start(self, cluster: Cluster, model: ModelSource, workers: int):
        """The workers, started (each loads the model): a pool taking whole probes."""
        return ActorPool(self.ray, ProbeWorker, (model, self.setup), workers, model.gpu, cluster.threads)

    def base(self, states) -> dict:
        """The full-precision pass, its batches spread over the workers (largest first, to the least loaded);
        the KL references it yields are kept here and put in the object store for the probes."""
        keys = sorted(self.scorer.state_keys(), key=lambda k: -self.scorer.batches[k[0]][k[1]].score_mask.numel())
        shares: list[list] = [[] for _ in self.pool.live()]
        load = [0] * len(shares)
        for k in keys:
            i = load.index(min(load))
            shares[i].append(k)
            load[i] += self.scorer.batches[k[0]][k[1]].score_mask.numel()
        box = [self.ray.put({k: states.get(k).cpu() for k in keys})]
        for share in shares:
            if share:
                self.pool.submit("reference", (share, box), None)
        scores = {}
        for _, part in self.pool.results(wait=True):
            scores.update(part)
        scores = to_device(scores, states.get(keys[0]).device)
        self.scorer.keep_references(scores)
        self.references = [self.ray.put(to_device(self.scorer.refs, "cpu"))]
        return self.scorer.losses(scores, keep_reference=True)

    def start_layer(self, layer: int, states, calib) -> None:
        """Put ``layer``'s inputs (and Hessians) in the object store, after waiting until fewer than
        ``max_layers`` layers are in flight."""
        self._release()
        while len(self.layers) >= self.max_layers:
            self._done.extend(self._collect(at_least=1))
            self._release()
        snapshot = {k: states.get(k).cpu() for k in self.scorer.state_keys()}
        hessians = None if calib is None else to_device(calib.hessians(), "cpu")
        self.layers[layer] = [[self.ray.put(snapshot), self.ray.put(hessians)], 0]
        if len(self.layers) == 1:  # the budget in layers, from the first one's size
            size = sum(t.numel() * t.element_size() for t in snapshot.values())
            self.max_layers = max(2, int(self.spec.max_state_gb * 2**30 // max(size, 1)))

    def submit(self, job: ProbeJob) -> None:
        entry = self.layers[job.unit.layer]
        entry[1] += 1
        self.pool.submit("probe", (job, self.spec, entry[0], self.references), job)

    def _collect(self, at_least: int = 0) -> list:
        out = []
        for job, (losses, secs) in self.pool.results(at_least=at_least):
            self.layers[job.unit.layer][1] -= 1
            out.append((job.key, losses, secs))
        return out

    def _release(self) -> None:
        """Drop the object refs of the layers whose probes are all done: their inputs leave the object store."""
        for layer in [k for k, (_, pending) in self.layers.items() if pending == 0]:
            del self.layers[layer]

    def finished(self, wait: bool = False) -> list:
        """As :meth:`tasa.profile.probe.SerialProbes.finished`: with ``wait``, one probe at least."""
        out = self._done + self._collect(at_least=1 if wait and not self._done else 0)
        self._done = []
        return out

    def info(self) -> dict:
        """The placement, for the records: workers, their threads or GPUs, nodes, the pool's start time (workers
        loading the model) and the wall time since (the probes)."""
        return {"backend": "ray", "placement": "task", "workers": len(self.pool.actors), "gpu": self.gpu,
                "threads": None if self.gpu else self.threads, "nodes": len(self.ray.nodes()),
                "start_seconds": self.start_seconds, "probe_wall_seconds": time.perf_counter() - self.ready_at}

    def close(self) -> None:
        self.pool.close()
