"""GPTQ's calibration spread over Ray workers: data-parallel Hessians (the scheme of llm-compressor's
distributed GPTQ).

The calibration sequences are cut into one contiguous shard per worker.  Each worker loads the model, captures
its shard's inputs of the first decoder layer and, layer by layer, does what this process asks of them: the
Hessians H_i = 2/n_i X_i^T X_i of some linears' inputs over its shard (tasa.quant.apply.layer_hessians), which
this process merges into the Hessian of all tokens (tasa.quant.gptq.merge_hessians) before the GPTQ step; the
quantized weights of those linears, which this process sends back; and the step to the next layer, each worker
running its shard through the quantized layer.  Activations never leave the workers: only Hessians (d x d per
input) and quantized weights travel.  The merged Hessian equals the single-process one up to summation order.

A calibration worker's shard state cannot be rebuilt by a restart (it holds that shard's inputs of the current
layer, which depend on every layer quantized before), so a worker that dies ends the run with one line; the
checkpoint is written only at the end, so nothing half-made is left.
"""
from __future__ import annotations

import os

import torch
import torch.nn as nn

from tasa.config import Cluster
from tasa.distributed.cluster import connect, get, worker_count
from tasa.distributed.probes import ModelSource
from tasa.quant.apply import Calibration
from tasa.quant.gptq import merge_hessians


class CalibWorker:
    """A Ray actor: the model and one shard of the calibration, advanced layer by layer."""

    def __init__(self, model: ModelSource, threads: int, shard: torch.Tensor, batch_size: int):
        torch.set_num_threads(threads)
        from tasa.models import compute_device, load, resolve
        from tasa.models.walker import capture_ids, move_outside_layers

        lm = load(model.source, dtype=model.dtype, device="cuda" if model.gpu else "cpu", stream=model.stream)
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
        remote = ray.remote(CalibWorker).options(num_cpus=0 if model.gpu else cluster.threads,
                                                 num_gpus=1 if model.gpu else 0, max_restarts=0, max_task_retries=0)
        self.workers = [remote.remote(model, cluster.threads, shard.contiguous(), batch_size)
                        for shard in torch.tensor_split(calib_ids, n)]
        self.pids = get(ray, [w.pid.remote() for w in self.workers])

    def groups(self, layer: nn.Module, locals_: list[str]) -> list[list[str]]:
        return get(self.ray, self.workers[0].groups.remote(locals_))

    def hessians(self, layer: nn.Module, firsts: list[str], counts: dict[str, int]) -> dict[str, torch.Tensor]:
        parts = get(self.ray, [w.hessians.remote(firsts) for w in self.workers])
        device = next(layer.parameters()).device
        out = {}
        for local in firsts:
            h, counts[local] = merge_hessians([p[local] for p in parts])
            out[local] = h.to(device)
        return out

    def quantized(self, layer: nn.Module, locals_: list[str]) -> None:
        weights = self.ray.put({local: layer.get_submodule(local).weight.detach().cpu() for local in locals_})
        get(self.ray, [w.set_weights.remote(weights) for w in self.workers])

    def advance(self, layer: nn.Module) -> None:
        get(self.ray, [w.advance.remote() for w in self.workers])

    def close(self) -> None:
        for w in self.workers:
            self.ray.kill(w)
        self.workers = []
