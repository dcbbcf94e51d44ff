"""tasa quantize: load -> calibration tokens -> quantize (uniform spec or plan) -> export -> quantize.json.

The output is written to a temporary sibling directory and renamed into place, so a failed or killed run never
leaves a half-written model directory.
"""
from __future__ import annotations

import dataclasses
import hashlib
import logging
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from tasa.artifacts import usual_modes, write_json_atomic
from tasa.config import CalibSpec, ExportSpec, QuantizeSpec, QuantSpec, Runtime
from tasa.data import build_calibration, resolve_calibration_source, store
from tasa.errors import TasaError
from tasa.models import LoadedModel, resolve
from tasa.models.loading import resolve_source
from tasa.models.streaming import compute_dtype, held
from tasa.pipeline.common import (bits_summary, check_group_size, check_output_dir, check_plan_covers,
                                  clear_stale_temps, dtype_name, machine_info, model_of, now, peak_gpu_gb, publish_dir,
                                  resolve_group_size, temp_dir_for)
from tasa.plan import Plan
from tasa.quant.apply import quantize_model
from tasa.quant.learned import ASYM_TWO_LEVEL as LEARNED_ASYM_TWO_LEVEL, OBJECTIVE as LEARNED_OBJECTIVE
from tasa.quant.learned import OUTPUT_KL as LEARNED_OUTPUT_KL

log = logging.getLogger("tasa.pipeline")


@dataclass(frozen=True)
class QuantizeResult:
    """What tasa quantize wrote: the directory, and its quantize.json record (settings, calibration hash and
    counts, per-module errors, sizes, timings)."""

    output_dir: Path
    record: dict = field(repr=False)

    @property
    def average_bits(self) -> float:
        return self.record["average_bits"]

    @property
    def size_bytes(self) -> int:
        return self.record["size_bytes"]

    @property
    def seconds(self) -> dict:
        return self.record["seconds"]


def with_quantizer_options(plan: Plan, spec: QuantizeSpec) -> Plan:
    """``plan`` with the quantizer options of ``spec`` (scale search, act-order, static groups) on every module;
    its grids stay the plan's."""
    options = {k: v for k, v in (("scale_search", spec.scale_search), ("act_order", spec.act_order),
                                 ("static_groups", spec.static_groups)) if v}
    if not options:
        return plan
    return dataclasses.replace(plan, modules={n: dataclasses.replace(qs, **options) for n, qs in plan.modules.items()})


def _calibration(lm: LoadedModel, arch, calib_ids, spec: QuantizeSpec, runtime: Runtime):
    """GPTQ's calibration: the token ids (held here), or, with ``--distributed ray``, spread over Ray workers
    (data-parallel Hessians); learned rounding keeps its calibration here."""
    if runtime.cluster.backend is None or calib_ids is None:
        return calib_ids
    if not spec.runs_gptq:
        log.warning("--distributed spreads GPTQ's calibration; learned rounding runs here")
        return calib_ids
    if runtime.cluster.placement == "pipeline":
        raise TasaError("quantize spreads its calibration over workers that each hold the model: "
                        "--placement pipeline applies to profiling only")
    from tasa.distributed.calibration import RayCalibration
    from tasa.distributed.cluster import ModelSource

    return RayCalibration(runtime.cluster, ModelSource.of(lm, arch), calib_ids, runtime.batch_size)


def quantize(model: str | LoadedModel, output_dir: str | Path, spec: QuantizeSpec = QuantizeSpec(),
             calib: CalibSpec | None = CalibSpec(), plan: str | Path | None = None,
             export: ExportSpec = ExportSpec(), runtime: Runtime = Runtime(), overwrite: bool = False,
             allow_partial_plan: bool = False, after_layer: Callable[[int], None] | None = None) -> QuantizeResult:
    """Quantize every decoder-layer linear of ``model`` by ``spec`` (or by ``plan``, a plan.json) and write it.

    ``calib``: the GPTQ calibration (unused by RTN).  A plan must name exactly the model's quantizable linears;
    ``allow_partial_plan`` keeps the linears it leaves out in full precision, and the record's ``average_bits``
    then counts them at their stored bits.

    ``export.format``: ``gptq``, a packed GPTQ checkpoint (see tasa.export.gptq), or ``compressed-tensors``
    (tasa.export.compressed_tensors), that must be servable by ``export.target`` (default: the plan's target,
    else gptqmodel; its rules for that format, tasa.allocate.targets.target_for; no format: the one the target
    is served from); or ``fp``, the dequantized float model
    (loadable by plain transformers).  Either way the directory also holds the tokenizer, ``plan.json`` and
    ``quantize.json``.
    ``gguf``: one GGUF file for llama.cpp, its metadata, tokenizer and float tensors from a GGUF of the model
    (the file it was read from, ``export.gguf_template``, or llama.cpp's converter in ``export.llama_cpp``; see
    tasa.export.gguf_source).
    ``after_layer``: called with each decoder layer's index once it is quantized and written (an exception it
    raises stops the quantization and leaves ``output_dir`` as it was).
    """
    from tasa.allocate.targets import get_target, target_for
    from tasa.export import gguf_source

    out = check_output_dir(output_dir, overwrite)
    clear_stale_temps(out)
    plan_obj = Plan.load(plan) if plan is not None else None
    method = plan_obj.method if plan_obj is not None else spec.method
    if spec.float_targets and method != "gptq":
        raise TasaError("--float-targets is a GPTQ option, and the plan's method is RTN")
    spec.check_distributed(runtime.cluster.backend is not None)
    spec = spec.resolved(method, runtime.cluster.backend is not None)
    needs_calib = method == "gptq" or spec.learn_rounding
    calib_spec = calib if needs_calib else None
    if needs_calib and calib_spec is None:
        raise TasaError(f"{'learned rounding' if spec.learn_rounding else 'GPTQ'} needs calibration data")
    if calib_spec is not None:  # fail on bad sources before the (slow) model load
        for name, _ in calib_spec.sources:
            resolve_calibration_source(name)
    target = export.target or (plan_obj.meta.get("target") if plan_obj is not None else None) or "gptqmodel"
    # the format the target's engine serves, when none is asked
    export = dataclasses.replace(export, target=target, format=export.format or get_target(target).format)
    if export.format != "fp":
        target_for(target, export.format)  # a target/format mismatch: now
    template = gguf_template(model, export) if export.format == "gguf" else None  # before the load
    t0 = time.perf_counter()
    with gguf_source.materialized(template, lambda: _hf_dir(model), lambda: temp_dir_for(out)) as template:
        return _quantize(model, out, spec, calib_spec, plan_obj, export, runtime, allow_partial_plan, template, t0,
                         after_layer)


def _quantize(model, out: Path, spec: QuantizeSpec, calib_spec: CalibSpec | None, plan_obj: Plan | None,
              export: ExportSpec, runtime: Runtime, allow_partial_plan: bool, template, t0: float,
              after_layer: Callable[[int], None] | None = None) -> QuantizeResult:
    """quantize() once its arguments are checked (and a GGUF export's template is at hand)."""
    from tasa.allocate.targets import check_servable, target_for
    from tasa.export.formats import open_export

    method = plan_obj.method if plan_obj is not None else spec.method
    target = export.target
    rules = target_for(target, export.format) if export.format != "fp" else None
    lm, model = model_of(model, runtime)
    arch = resolve(lm.model)
    if plan_obj is not None:
        _check_plan(plan_obj, arch, spec, allow_partial_plan)
        the_plan = with_quantizer_options(plan_obj, spec)
    else:
        qspec = spec.quant_spec(resolve_group_size(arch, spec.group_size, spec.allow_ragged_groups))

        def on_target_grid(width: int) -> QuantSpec:
            """The target's one grid at this bit-width (llama.cpp: for this input width), the quantizer's options
            on it."""
            grid = rules.grid(qspec.bits, qspec.sym, width) if rules is not None else None
            return qspec if grid is None else dataclasses.replace(
                grid, damp=qspec.damp, block_size=qspec.block_size, scale_search=qspec.scale_search,
                act_order=qspec.act_order, static_groups=qspec.static_groups)
        the_plan = Plan({m.name: on_target_grid(m.in_features) for m in arch.modules}, method=method,
                        meta={"model": model})
    if spec.learn_rounding and any(qs.super_group and not qs.sym for qs in the_plan.modules.values()):
        raise TasaError(LEARNED_ASYM_TWO_LEVEL)  # before any work
    if export.w8a8:
        the_plan = _w8a8_plan(the_plan, export)
    if rules is not None:
        try:
            check_servable(the_plan.modules, rules, arch.fusion_groups(),
                           {m.name: m.in_features for m in arch.modules})
        except TasaError as e:
            raise TasaError(f"{e}; or write a float model with --format fp") from None
    # the format's part, made now: it refuses what the format cannot write before any work
    exporter = open_export(export.format, the_plan, lm, arch, target, _float_dtype(export.float_dtype, lm),
                           export.w8a8, template, lambda module: held(lm.model, module))
    calib_ids, calib_counts = None, {}
    if calib_spec is not None:
        cal = build_calibration(lm.tokenizer, calib_spec, lm.max_length)
        calib_ids, calib_counts = cal.input_ids, cal.counts
    calib = _calibration(lm, arch, calib_ids, spec, runtime)
    t_load = time.perf_counter() - t0
    tmp = temp_dir_for(out)
    try:
        # the checkpoint is written as the layers finish (a streamed model holds one layer at a time)
        writer = exporter.writer(tmp, lm, arch, export.max_shard_bytes)
        packed: dict = {}
        packer = exporter.packer

        def on_layer(index: int, layer) -> None:
            writer.add_layer(index, layer, packed)
            packed.clear()
            if after_layer:
                after_layer(index)
        report = quantize_model(lm.model, arch, the_plan, calib, batch_size=runtime.batch_size,
                                device=runtime.primary, true_sequential=spec.true_sequential,
                                on_result=(lambda n, r: packed.update(packer(n, r))) if packer else None,
                                progress=runtime.progress,
                                on_layer=on_layer,
                                learn_iters=spec.learn_rounding, learn_lr=spec.learn_lr,
                                learn_dtype=None if spec.learn_dtype == "auto" else getattr(torch, spec.learn_dtype),
                                seed=calib_spec.seed if calib_spec else 0, float_targets=spec.float_targets,
                                learn_start=spec.learn_start, learn_output_kl=spec.learn_output_kl)
        record = {
            "model": model,
            "method": method,
            "quantizer": dataclasses.replace(spec, method=method).quantizer,
            # the one grid of a uniform quantization (None for a plan, or where the target's grid varies by width)
            "quant_spec": (the_plan.modules[arch.modules[0].name].to_dict()
                           if plan_obj is None and len(set(the_plan.modules.values())) == 1 else None),
            "plan_bits": sorted({qs.bits for qs in the_plan.modules.values()}),
            "calib": calib_spec.describe() if calib_spec else None,
            "calib_counts": calib_counts,
            # what the result also depends on: the exact calibration tokens, and the CPU thread count (it changes
            # the summation order of the Hessians and GPTQ updates; see README "Reproducibility")
            "calib_sha256": (hashlib.sha256(calib_ids.numpy().tobytes()).hexdigest() if calib_ids is not None
                             else None),
            "threads": torch.get_num_threads(),
            # the model's dtype while it was quantized (its forward passes; Hessians are summed and GPTQ and grids
            # computed in float32, a bfloat16 model's Hessians from bfloat16 products on a CPU with native bfloat16)
            # and the sequences per forward batch (learned rounding's steps take one batch each)
            "dtype": dtype_name(lm.model), "batch_size": runtime.batch_size,
            # data-parallel Hessians (--distributed ray): the shards' Hessians are merged, summed in another order
            **({"calibration_workers": calib.n} if hasattr(calib, "n") else {}),
            "nsamples": calib_spec.nsamples if calib_spec else None,
            "seqlen": calib_spec.seqlen if calib_spec else None,
            "seed": calib_spec.seed if calib_spec else 0,
            "data": store.fingerprint(),
            **bits_summary(the_plan, arch, dtype_name(lm.model)),
            "format": export.format,
            **({"w8a8": sorted(n for n, qs in the_plan.modules.items() if qs.bits == 8)} if export.w8a8 else {}),
            "target": target if export.format != "fp" else None,
            "streamed": arch.streamer is not None,
            "seconds": {"load_and_data": t_load, "quantize": report.seconds},
            "peak_gpu_gb": peak_gpu_gb(runtime.devices),
            "modules": {n: s.__dict__ for n, s in report.modules.items()},
            **({"learned_rounding": {"steps": spec.learn_rounding, "lr": spec.learn_lr or 1 / spec.learn_rounding,
                                     "start": spec.learn_start, "objective": LEARNED_OBJECTIVE,
                                     **({"last_layer_objective": LEARNED_OUTPUT_KL} if spec.learn_output_kl else {}),
                                     "step_dtype": next(iter(report.layers.values())).step_dtype if report.layers
                                     else None, "layers": {i: dataclasses.asdict(x) for i, x in report.layers.items()}}}
               if spec.learn_rounding else {}),
            "machine": machine_info(),
            "date": now(),
        }
        writer.finish()
        extra = exporter.finish(tmp, writer, lm)
        record["size_bytes"] = sum(f.stat().st_size for f in tmp.iterdir() if f.suffix in (".safetensors", ".gguf"))
        planned = sum(n for name, n in arch.numels().items() if name in the_plan.modules)
        record.update(_sizes(record["size_bytes"], writer.packed_bytes, planned, lm.model, exporter.float_dtype,
                             export.format))
        record.update(extra)
        the_plan.save(tmp / "plan.json")
        write_json_atomic(tmp / "quantize.json", record)
        usual_modes(tmp)  # mkdtemp and safetensors create owner-only modes
        publish_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return QuantizeResult(out, record)


def _w8a8_plan(plan: Plan, export: ExportSpec) -> Plan:
    """``plan`` with its 8-bit modules on the grid W8A8 stores: symmetric, one scale per output channel (the
    quantizer's options kept); an error when there is none or one is asymmetric."""
    if export.format != "compressed-tensors":
        raise TasaError(f"--w8a8 is a compressed-tensors scheme, not one of {export.format} checkpoints")
    eight = [n for n, qs in plan.modules.items() if qs.bits == 8]
    if not eight:
        raise TasaError("--w8a8 writes the plan's 8-bit modules as W8A8, but it has none")
    asym = [n for n in eight if not plan.modules[n].sym]
    if asym:
        raise TasaError(f"{asym[0]}: W8A8 weights are symmetric; this 8-bit grid is asymmetric")
    return dataclasses.replace(plan, modules={n: dataclasses.replace(qs, group_size=-1) if qs.bits == 8 else qs
                                              for n, qs in plan.modules.items()})


def _hf_dir(model: str | LoadedModel) -> Path:
    """The local Hugging Face directory of ``model`` (a hub id's downloaded snapshot), for llama.cpp's converter."""
    from tasa.models.loading import local_dir

    spec = model.path if isinstance(model, LoadedModel) else model
    return local_dir(*resolve_source(spec), spec)


def gguf_template(model: str | LoadedModel, export: ExportSpec):
    """Where a GGUF export of ``model`` takes its metadata, tokenizer and float tensors (tasa.export.gguf_source);
    an error saying how to give one when nothing does.  Cheap: before any load."""
    from tasa.export import gguf_source

    if isinstance(model, LoadedModel):
        source = model.gguf
    else:
        kind, where = resolve_source(model)
        source = Path(where) if kind == "gguf" else None
    return gguf_source.template_source(source, export.gguf_template, export.llama_cpp)


def _float_dtype(name: str, lm) -> torch.dtype | None:
    """The dtype export writes float tensors in (None: as computed): ``auto`` = the source's half dtype."""
    if name == "auto":
        half = lm.source_dtype in (torch.float16, torch.bfloat16)
        return lm.source_dtype if half and lm.source_dtype != compute_dtype(lm.model) else None
    return getattr(torch, name)


def _sizes(size_bytes: int, packed_bytes: int, planned: int, model, float_dtype, fmt: str) -> dict:
    """What the export takes: bytes and bits per weight of the checkpoint (over every weight), and of the packed
    linears alone (their codes, scales and zero points over their ``planned`` weights)."""
    params = sum(p.numel() for _, p in model.named_parameters())  # tied weights once
    out = {"float_dtype": str(float_dtype or compute_dtype(model)).replace("torch.", ""),
           "bits_per_weight_all": 8 * size_bytes / params}
    if fmt != "fp":
        out.update(packed_bytes=packed_bytes, bits_per_weight_linears=8 * packed_bytes / planned,
                   float_bytes=size_bytes - packed_bytes)
    return out


def _check_plan(plan: Plan, arch, spec: QuantizeSpec, allow_partial_plan: bool) -> None:
    """A plan names exactly the model's quantizable linears (or fewer, with ``allow_partial_plan``), each at a
    group size dividing its input size (unless ``spec.allow_ragged_groups``)."""
    check_plan_covers(plan, arch, allow_partial_plan)
    for qs in plan.modules.values():
        check_group_size(arch, qs.group_size, spec.allow_ragged_groups)
