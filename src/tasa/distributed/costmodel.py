"""How long a layer profile takes on W workers: the task and pipeline placements of tasa.distributed, simulated
from per-layer costs (pure arithmetic; benchmarks/distributed.py feeds it measured and shape-scaled costs).

A profile of L layers with P probes per layer (units x bit-widths) costs, in a probe of layer l: quantizing
its unit (``quant``), running layers l..L-1 (``layer`` each) and the head with the scoring (``head``).
Before any probe the full-precision pass (L layers and the head) gives the KL references; the inputs of
layer l+1 are then computed from layer l's (one layer pass each, ``layer``).

- serial: one process does all of it; no transfer.
- task placement (``task_makespan``): the workers share the full-precision pass (its batches split evenly);
  this process then computes the inputs layer by layer and puts each layer's inputs in the object store
  (``put``); W workers, each holding the whole model, take probes in layer order as they come free (Ray's
  queue), fetching a layer's inputs (``transfer``) the first time they probe it.
- pipeline placement (``pipeline_makespan``): W stages, each holding a contiguous slice of layers (balanced by
  the work that passes through them, see :func:`balanced_slices`); the full-precision pass leaves every stage
  the inputs of its own layers; a probe of layer l starts at its stage, runs the rest of that slice, and
  its activations (``transfer`` each hop) flow through every later stage to the head on the last one.  Stages
  serve probes in order, one at a time (a permutation flow shop: exact for first-in first-out stages).  Every
  probe runs the last layer and the head on the last stage, which bounds one pipeline's speed-up (about 6x for
  Llama-3-8B's shape however many stages); W workers are better used as W / S pipelines of the fewest stages S
  whose slices fit a worker (``replicas``), each taking every (W / S)-th probe.
"""
from __future__ import annotations

import heapq
from dataclasses import dataclass


@dataclass(frozen=True)
class ProbeCosts:
    """Seconds of one profile's parts on one worker (all objectives' probe tokens together)."""

    layers: int
    probes_per_layer: int
    layer: float  # one decoder layer's forward pass
    head: float  # final norm, head and scoring
    quant: float = 0.0  # quantizing one probe's unit
    transfer: float = 0.0  # one layer's inputs (or a probe's activations) from one process to another
    put: float = 0.0  # this process putting one layer's inputs in the object store

    def probe(self, layer: int) -> float:
        return self.quant + (self.layers - layer) * self.layer + self.head

    @property
    def base(self) -> float:
        """The full-precision pass (KL references)."""
        return self.layers * self.layer + self.head


def serial_seconds(c: ProbeCosts) -> float:
    """One process: the full-precision pass, every probe, and L-1 layer passes advancing the inputs."""
    return c.base + sum(c.probes_per_layer * c.probe(l) for l in range(c.layers)) + (c.layers - 1) * c.layer


def task_makespan(c: ProbeCosts, workers: int) -> float:
    """Task placement on ``workers`` workers holding the whole model (see the module docstring)."""
    if workers < 1:
        raise ValueError("workers must be positive")
    free = [(0.0, w) for w in range(workers)]  # (time the worker is free, worker)
    heapq.heapify(free)
    last_layer = [-1] * workers
    # the full-precision pass, its batches spread over the workers (a put here, a fetch there); then this process
    # computes the inputs of each layer (a put and a layer pass each)
    ready = c.put + c.transfer + c.base / workers
    end = 0.0
    for layer in range(c.layers):
        ready += c.put
        for _ in range(c.probes_per_layer):
            t, w = heapq.heappop(free)
            start = max(t, ready)
            if last_layer[w] != layer:
                start += c.transfer
                last_layer[w] = layer
            done = start + c.probe(layer)
            end = max(end, done)
            heapq.heappush(free, (done, w))
        ready += c.layer
    return end


def balanced_slices(c: ProbeCosts, stages: int) -> list[tuple[int, int]]:
    """Contiguous [start, stop) layer slices for ``stages`` stages minimising the largest stage's work: layer j
    is run by every probe of layers 0..j (P (j+1) layer passes); the last stage also runs every head."""
    if not 1 <= stages <= c.layers:
        raise ValueError(f"stages must be in 1..{c.layers}")
    work = [c.probes_per_layer * (j + 1) * c.layer + c.probes_per_layer * c.quant for j in range(c.layers)]
    total_probes = c.layers * c.probes_per_layer
    # exact linear partition by dynamic programming: best[k][j] = min over the last cut i of max(best[k-1][i],
    # work[i:j]); O(stages * layers^2), tiny here
    prefix = [0.0]
    for w in work:
        prefix.append(prefix[-1] + w)
    inf = float("inf")
    best = [[inf] * (c.layers + 1) for _ in range(stages + 1)]
    cut = [[0] * (c.layers + 1) for _ in range(stages + 1)]
    best[0][0] = 0.0
    for k in range(1, stages + 1):
        for j in range(k, c.layers + 1):
            for i in range(k - 1, j):
                load = prefix[j] - prefix[i] + (total_probes * c.head if j == c.layers else 0.0)
                v = max(best[k - 1][i], load)
                if v < best[k][j]:
                    best[k][j], cut[k][j] = v, i
    out, j = [], c.layers
    for k in range(stages, 0, -1):
        out.append((cut[k][j], j))
        j = cut[k][j]
    return out[::-1]


def pipeline_makespan(c: ProbeCosts, stages: int, slices: list[tuple[int, int]] | None = None,
                      replicas: int = 1) -> float:
    """Pipeline placement: ``replicas`` pipelines of ``stages`` stages each (``slices``: default
    :func:`balanced_slices`), probes submitted in layer order to the pipeline with the fewest so far."""
    slices = slices or balanced_slices(c, stages)
    if len(slices) != stages or slices[0][0] != 0 or slices[-1][1] != c.layers or \
            any(a[1] != b[0] for a, b in zip(slices, slices[1:])):
        raise ValueError("slices must cover the layers contiguously, one per stage")
    if replicas < 1:
        raise ValueError("replicas must be positive")
    # the full-precision pass through one pipeline (each stage keeps its layers' inputs), hops included; the
    # other pipelines wait for its KL references
    fp = sum((b - a) * c.layer for a, b in slices) + c.head + (stages - 1) * c.transfer
    free = [[fp] * stages for _ in range(replicas)]
    end = fp
    n = 0
    for layer in range(c.layers):
        owner = next(s for s, (a, b) in enumerate(slices) if a <= layer < b)
        for _ in range(c.probes_per_layer):
            line = free[n % replicas]
            n += 1
            t = fp
            for s in range(owner, stages):
                a, b = slices[s]
                work = (b - max(a, layer)) * c.layer + (c.quant if s == owner else 0.0) + \
                    (c.head if s == stages - 1 else 0.0)
                arrive = t + (c.transfer if s > owner else 0.0)
                t = max(line[s], arrive) + work
                line[s] = t
            end = max(end, t)
    return end
