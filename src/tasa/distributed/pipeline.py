"""Sensitivity probes on a Ray cluster whose workers cannot each hold the model: the pipeline placement.

The decoder layers are cut into contiguous slices, one per worker (a stage), balanced by the work that passes
through them (tasa.distributed.costmodel.balanced_slices: layer j is run by every probe of layers 0..j, so later
stages get fewer layers).  A stage loads the model streamed (tasa.models.streaming) and keeps only its own layers
and the parts outside the layers resident.  A probe of a unit in layer l starts at the stage holding l: it
quantizes the unit, runs the rest of that stage's slice from layer l's full-precision inputs (put in the object
store by this process, as in the task placement), and its activations flow through every later stage, the last
of which runs the head and scores.  Every probe is submitted as such a chain of actor calls at once, so many are
in flight and every stage stays busy; a stage serves its calls in order.  Every probe runs the last layer and
the head on the last stage, which bounds what one pipeline gains (tasa.distributed.costmodel); with
``--stages S`` the W workers form W // S pipelines of S stages, each probe going to the pipeline with the
fewest in flight: use the fewest stages whose slices fit a worker.

A stage runs its layers through the model's own forward (tasa.models.walker.slice_output), the operations of
the serial path's tail, so the probes equal the task placement's to float tolerance.  A stage that dies is
restarted by Ray and its calls retried; one that died past its restarts ends the run with one line (there is
no other holder of its layers); the probe store keeps every finished probe for a resumed run.
"""
from __future__ import annotations

import time

from tasa.config import Cluster, ProfileSpec
from tasa.distributed.cluster import ModelSource, actor_class, get, ready, to_device
from tasa.distributed.costmodel import ProbeCosts, balanced_slices
from tasa.distributed.probes import ModelWorker, RayProbes, _Setup
from tasa.errors import TasaError
from tasa.profile.probe import ProbeJob


class StageWorker(ModelWorker):
    """A Ray actor holding decoder layers ``start..stop-1`` (the last stage: and the head)."""

    def __init__(self, model: ModelSource, setup: _Setup, start: int, stop: int):
        super().__init__(model, setup, range(start, stop))
        self.start, self.stop = start, stop
        self.last = stop == self.scorer.arch.num_layers

    def _run(self, layer: int, hidden: dict, keep_reference: bool) -> dict:
        """The stage's slice from ``layer`` on every batch: the hidden states leaving it (CPU), or, on the last
        stage, the token scores."""
        from tasa.models.walker import slice_output

        sc = self.scorer
        if self.last:
            return {k: sc.batch_scores(k, layer, h, keep_reference) for k, h in hidden.items()}
        return {k: slice_output(sc.model, sc.arch, sc.batches[k[0]][k[1]].inputs, layer, self.stop, h).cpu()
                for k, h in hidden.items()}

    def _finish(self, job: ProbeJob | None, out: dict, seconds: float):
        if not self.last:
            return out, seconds
        if job is None:  # the full-precision pass: token scores with their top-k
            return to_device(out, "cpu"), seconds
        return self.scorer.losses(out), seconds

    def begin(self, job: ProbeJob | None, spec: ProfileSpec, layer_refs: list, references: list):
        """The probe ``job`` (None: the full-precision pass from layer 0) on this stage, from its layer's kept
        inputs: (activations for the next stage, or the losses; compute seconds so far)."""
        layer = 0 if job is None else job.unit.layer
        self._inputs(layer, layer_refs, references)
        t = time.perf_counter()
        if job is None:
            out = self._run(0, self.states, keep_reference=True)
        else:
            with self.scorer.swapped(job.unit, job.bits, spec, self.hessians):
                out = self._run(layer, self.states, keep_reference=False)
        return self._finish(job, out, time.perf_counter() - t)

    def carry(self, job: ProbeJob | None, previous: tuple, references: list):
        """The probe's activations from the stage before through this one (``previous``: its output)."""
        self._references(references)
        hidden, seconds = previous
        t = time.perf_counter()
        out = self._run(self.start, to_device(hidden, self.device), keep_reference=job is None)
        return self._finish(job, out, seconds + time.perf_counter() - t)


class _Chains:
    """The pipelines (each a list of stages), and the probes in flight through them: what :class:`RayProbes`
    reads results from."""

    def __init__(self, ray, lines: list[list], slices: list[tuple[int, int]]):
        self.ray, self.lines, self.slices = ray, lines, slices
        self.actors = [a for line in lines for a in line]
        self.load = [0] * len(lines)
        self.running: dict = {}  # the last call of a chain -> (its tag, its pipeline)
        self.pids = get(ray, [a.pid.remote() for a in self.actors])

    def call_all(self, method: str) -> list:
        return get(self.ray, [getattr(a, method).remote() for a in self.actors])

    def chain(self, job: ProbeJob | None, spec: ProfileSpec, layer_refs: list, references: list, line: int = 0):
        """The probe (None: the full-precision pass) as calls through pipeline ``line``; its last call's ref."""
        layer = 0 if job is None else job.unit.layer
        owner = next(i for i, (a, b) in enumerate(self.slices) if a <= layer < b)
        stages = self.lines[line]
        ref = stages[owner].begin.remote(job, spec, layer_refs, references)
        for stage in stages[owner + 1:]:
            ref = stage.carry.remote(job, ref, references)
        return ref

    def submit(self, job: ProbeJob, spec: ProfileSpec, layer_refs: list, references: list) -> None:
        line = self.load.index(min(self.load))  # the pipeline with the fewest probes in flight
        self.running[self.chain(job, spec, layer_refs, references, line)] = (job, line)
        self.load[line] += 1

    def results(self, at_least: int = 0) -> list:
        out: list = []
        while self.running:
            done = ready(self.ray, list(self.running), block=len(out) < at_least)
            if not done:
                break
            for ref in done:
                job, line = self.running.pop(ref)
                self.load[line] -= 1
                out.append((job, get(self.ray, ref)))
        return out

    def close(self) -> None:
        for a in self.actors:
            self.ray.kill(a)
        self.actors, self.lines, self.running = [], [], {}


class RayPipeline(RayProbes):
    """The runner of :func:`tasa.profile.probe.run_probes` on Ray stages (see the module docstring)."""

    def _start(self, cluster: Cluster, model: ModelSource, workers: int) -> _Chains:
        """workers // stages pipelines of stages holding balanced slices of the layers."""
        arch = self.scorer.arch
        stages = min(cluster.stages or workers, arch.num_layers)
        if stages > workers:
            raise TasaError(f"--stages {stages}: the Ray cluster holds {workers} worker(s)")
        # relative costs suffice to balance the slices: a layer pass and the head in proportion to their FLOPs per
        # token (the head: vocab x hidden; on SmolLM2-135M 8x a layer, measured 7x; on Llama-3-8B 2.4x)
        numels = arch.numels()
        per_layer = sum(numels[m.name] for m in arch.layer_modules(0))
        head = self.scorer.model.get_output_embeddings().weight.numel() / per_layer
        self.slices = balanced_slices(ProbeCosts(layers=arch.num_layers, probes_per_layer=1, layer=1.0, head=head),
                                      stages)
        remote = actor_class(self.ray, StageWorker, model.gpu, cluster.threads)
        lines = [[remote.remote(model, self.setup, a, b) for a, b in self.slices] for _ in range(workers // stages)]
        return _Chains(self.ray, lines, self.slices)

    def base(self, states) -> dict:
        """The full-precision pass through the stages; the KL references it yields are kept here and put in the
        object store for the probes (the last stage fetches them again if it is restarted)."""
        keys = self.scorer.state_keys()
        box = [self.ray.put({k: states.get(k).cpu() for k in keys}), self.ray.put(None)]
        scores, _ = get(self.ray, self.pool.chain(None, self.spec, box, []))
        scores = to_device(scores, states.get(keys[0]).device)
        self.scorer.keep_references(scores)
        self.references = [self.ray.put(to_device(self.scorer.refs, "cpu"))]
        return self.scorer.losses(scores, keep_reference=True)

    def submit(self, job: ProbeJob) -> None:
        entry = self.layers[job.unit.layer]
        entry[1] += 1
        self.pool.submit(job, self.spec, entry[0], self.references)

    def info(self) -> dict:
        return {**super().info(), "placement": "pipeline", "slices": [list(s) for s in self.slices],
                "pipelines": len(self.pool.lines)}
