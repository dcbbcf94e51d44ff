"""GPTQ's calibration spread over Ray workers: data-parallel Hessians (the scheme of llm-compressor's
distributed GPTQ).

The calibration sequences are cut into one contiguous shard per worker.  Each worker loads the model, captures
its shard's inputs of the first decoder layer and, layer by layer, does what this process asks of them: the
Hessians H_i = 2/n_i X_i^T X_i of some linears' inputs over its shard (tasa.quant.apply.layer_hessians), which
this process merges into the Hessian of all tokens (tasa.quant.gptq.merge_hessians) before the GPTQ step; the
quantized weights of those linears, which this process sends back; and the step to the next layer, each worker
running its shard through the quantized layer.  Activations never leave the workers: only Hessians (d x d per
input) and quantized weights travel.  The merged Hessian equals the single-process one up to summation order.

A worker that dies is replaced by a new one that loads the model, captures its shard again and replays it
through every layer quantized so far (their quantized weights stay in the object store for that: as much as
the quantized part of the model in float, which Ray spills to disk past its memory), then the call is made
again: the same operations on the same shard, so the checkpoint equals that of an uninterrupted run.
"""
from __future__ import annotations

import logging
import os

import torch
import torch.nn as nn

from tasa.config import Cluster
from tasa.distributed.cluster import RESTARTS, connect, get, worker_count
from tasa.errors import TasaError
from tasa.distributed.cluster import ModelSource
from tasa.quant.apply import Calibration
from tasa.quant.gptq import merge_hessians

log = logging.getLogger("tasa.distributed")


class CalibWorker:
    """A Ray actor: the model and one shard of the calibration, advanced layer by layer."""

    def __init__(self, model: ModelSource, threads: int, shard: torch.Tensor, batch_size: int):
        torch.set_num_threads(threads)
        from tasa.models import compute_device, resolve
        from tasa.models.walker import capture_ids, move_outside_layers

        lm = model.load()
        self.arch = resolve(lm.model)
        self.device = compute_device(lm.model)
        move_outside_layers(lm.model, self.arch, self.device)
        self.inputs = capture_ids(lm.model, self.arch, shard, batch_size, self.device)
        self.held: int | None = None

    def pid(self) -> int:
        return os.getpid()

    def _layer(self) -> nn.Module:
        """The current decoder layer on the device (a streamed model's: read once, kept until :meth:`advance`)."""
        index = self.inputs.index
        if self.arch.streamer is not None:
            if self.held != index:
                self.arch.streamer.fetch(index, self.device)
                self.held = index
            return self.arch.layers[index]
        return self.arch.layers[index].to(self.device)

    def groups(self, locals_: list[str]) -> list[list[str]]:
        from tasa.models.walker import input_groups

        with torch.no_grad():
            return input_groups(self._layer(), locals_, self.inputs)

    def hessians(self, firsts: list[str]) -> dict:
        """{local: (H over this shard, its token count)}, on the CPU."""
        from tasa.quant.apply import layer_hessians

        counts: dict = {}
        with torch.no_grad():
            h = layer_hessians(self._layer(), self.inputs, firsts, counts=counts)
        return {local: (h[local].cpu(), counts[local]) for local in firsts}

    def set_weights(self, weights: dict) -> None:
        layer = self._layer()
        with torch.no_grad():
            for local, w in weights.items():
                layer.get_submodule(local).weight.copy_(w)

    def advance(self) -> None:
        from tasa.models.walker import run_layer

        layer = self._layer()
        with torch.no_grad():
            run_layer(layer, self.inputs, advance=True)
        if self.arch.streamer is not None:
            self.arch.streamer.release(self.held)
            self.held = None


class RayCalibration(Calibration):
    """:class:`tasa.quant.apply.Calibration` with the inputs on Ray workers, one shard each (see the module
    docstring)."""

    def __init__(self, cluster: Cluster, model: ModelSource, calib_ids: torch.Tensor, batch_size: int):
        ray = connect(cluster)
        self.ray = ray
        n = self.n = min(worker_count(ray, cluster, model.gpu), calib_ids.shape[0])
        self.remote = ray.remote(CalibWorker).options(num_cpus=0 if model.gpu else cluster.threads,
                                                      num_gpus=1 if model.gpu else 0, max_restarts=0)
        self.args = [(model, cluster.threads, shard.contiguous(), batch_size)
                     for shard in torch.tensor_split(calib_ids, n)]
        self.workers = [self.remote.remote(*a) for a in self.args]
        self.history: list[list] = [[]]  # per layer so far: the object refs of its quantized weights, as sent
        self.replaced = 0
        self.pids = self._call(range(n), "pid")

    def _call(self, which, method: str, *args) -> list:
        """``method(*args)`` on the workers ``which``; one that died is replaced by a new worker that replays the
        layers quantized so far on its shard (:meth:`_replace`), and asked again."""
        refs = {i: getattr(self.workers[i], method).remote(*args) for i in which}
        out = []
        for i, ref in refs.items():
            for attempt in range(RESTARTS + 1):
                try:
                    out.append(self.ray.get(ref))
                    break
                except self.ray.exceptions.RayActorError:
                    if attempt == RESTARTS:
                        raise TasaError(f"calibration worker {i} died {RESTARTS + 1} times; see the Ray logs") from None
                    log.warning("calibration worker %d died; a new one replays its shard through the %d layer(s) "
                                "quantized so far", i, len(self.history) - 1)
                    self._replace(i)
                    ref = getattr(self.workers[i], method).remote(*args)
                except self.ray.exceptions.RayTaskError:
                    get(self.ray, ref)  # the work's own error, in one line
        return out

    def _replace(self, i: int) -> None:
        """A new worker for shard ``i``, brought to where the others are: every finished layer's quantized weights
        and the step through it, then the current layer's weights quantized so far."""
        w = self.remote.remote(*self.args[i])
        calls = []
        for layer, sent in enumerate(self.history):
            calls += [w.set_weights.remote(ref) for ref in sent]
            if layer < len(self.history) - 1:
                calls.append(w.advance.remote())
        get(self.ray, calls)
        self.workers[i] = w
        self.replaced += 1

    def groups(self, layer: nn.Module, locals_: list[str]) -> list[list[str]]:
        return self._call([0], "groups", locals_)[0]

    def hessians(self, layer: nn.Module, firsts: list[str], counts: dict[str, int]) -> dict[str, torch.Tensor]:
        parts = self._call(range(self.n), "hessians", firsts)
        device = next(layer.parameters()).device
        out = {}
        for local in firsts:
            h, counts[local] = merge_hessians([p[local] for p in parts])
            out[local] = h.to(device)
        return out

    def quantized(self, layer: nn.Module, locals_: list[str]) -> None:
        weights = self.ray.put({local: layer.get_submodule(local).weight.detach().cpu() for local in locals_})
        self.history[-1].append(weights)
        self._call(range(self.n), "set_weights", weights)

    def advance(self, layer: nn.Module) -> None:
        self._call(range(self.n), "advance")
        self.history.append([])

    def close(self) -> None:
        for w in self.workers:
            self.ray.kill(w)
        self.workers, self.history = [], [[]]
