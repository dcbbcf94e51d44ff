"""GPTQ checkpoints: write one from quantization results, read one back as float weights.

Layout (AutoGPTQ / GPTQModel ``checkpoint_format: gptq``, loadable by
GPTQModel, vLLM and SGLang): for every quantized linear ``NAME`` the tensors
``NAME.qweight``, ``NAME.qzeros``, ``NAME.scales``, ``NAME.g_idx`` (see
:mod:`tasa.export.pack`) replace ``NAME.weight``; every other tensor is kept
as it is in the model.  ``quantize_config.json`` (and ``quantization_config``
in ``config.json``) hold the most common grid as the default and a ``dynamic``
override for every module that differs (``+:^name$``), and a negative rule
(``-:^name$``) for linears left in full precision.

Plain transformers/optimum loading ignores ``dynamic`` and would read every
module with the default bit-width: load mixed-precision checkpoints with
GPTQModel (or vLLM/SGLang for their targets), or with tasa.
"""
from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn

from tasa.errors import TasaError
from tasa.export.writer import MAX_SHARD_BYTES, CheckpointWriter, checkpoint_key, write_config_files
from tasa.export.pack import PACKABLE_BITS, pack_cols, pack_rows, unpack_cols, unpack_rows
from tasa.plan import Plan
from tasa.quantized import QuantResult

GPTQ_SUFFIXES = ("qweight", "qzeros", "scales", "g_idx")
README = """# GPTQ checkpoint written by tasa

Format: GPTQ (`checkpoint_format: gptq`, int32 packing, fp16 scales, zero points stored minus one).
Per-module bit-widths are in `quantize_config.json` under `dynamic` (regex -> overrides); modules
without an entry use the default `bits`/`group_size`.

- GPTQModel: `GPTQModel.load(path, backend=BACKEND.TORCH, dtype=torch.float16)` (mixed bit-widths
  run on its Torch kernel; on CPU it needs fp16/bf16 activations).
- vLLM / SGLang: `--quantization gptq` for plans made with `--target vllm-gptq` / `--target sglang` (vLLM
  serves mixes of 3 bits and more from compressed-tensors checkpoints: `--target vllm`).
- tasa: `tasa eval --model path` dequantizes on load.
- Plain transformers/optimum loading ignores `dynamic` and would read every module at the
  default bit-width: do not load a mixed-precision checkpoint that way.
"""


def _grid_key(spec) -> tuple:
    return (spec.bits, spec.group_size, spec.sym, spec.act_order and not spec.static_groups)


def quantize_config(plan: Plan, all_linears: list[str], numels: dict[str, int], tool: str, target: str = "gptqmodel",
                    checkpoint_format: str = "gptq", names: dict[str, str] | None = None) -> dict:
    """quantize_config.json for ``plan``: default grid = the one holding most weights, overrides for the rest
    (named as the checkpoint names the modules: ``names``, {model tensor key: checkpoint key} where they differ,
    see tasa.export.writer.checkpoint_key)."""
    if not plan.modules:
        raise TasaError("the plan quantizes no module; nothing to export")
    weight_of = Counter()
    for name, spec in plan.modules.items():
        weight_of[_grid_key(spec)] += numels[name]
    bits, group, sym, desc_act = max(weight_of, key=lambda k: (weight_of[k], k))
    dynamic = {}
    for name in all_linears:
        stored = checkpoint_key(names or {}, f"{name}.weight")[: -len(".weight")]
        if name not in plan.modules:
            dynamic[f"-:^{re.escape(stored)}$"] = {}
            continue
        b, g, s, d = _grid_key(plan.modules[name])
        over = {k: v for k, v, default in (("bits", b, bits), ("group_size", g, group), ("sym", s, sym),
                                            ("desc_act", d, desc_act)) if v != default}
        if over:
            dynamic[f"+:^{re.escape(stored)}$"] = over
    cfg = {"bits": bits, "group_size": group, "desc_act": desc_act, "sym": sym, "lm_head": False,
           "quant_method": "gptq", "checkpoint_format": checkpoint_format, "pack_dtype": "int32",
           "meta": {"quantizer": [tool], "target": target}}
    if dynamic:
        cfg["dynamic"] = dynamic
    return cfg


def checkpoint_format(plan: Plan) -> str:
    """``gptq`` (zero points stored minus one) for symmetric plans; ``gptq_v2`` (stored as they are) when a grid
    is asymmetric, since an asymmetric zero point can be 0, which the v1 convention cannot store."""
    return "gptq" if all(s.sym for s in plan.modules.values()) else "gptq_v2"


def pack_result(name: str, result: QuantResult, fmt: str = "gptq") -> dict[str, torch.Tensor]:
    """The four GPTQ tensors of one quantized linear in checkpoint format ``fmt`` (gptq or gptq_v2)."""
    if result.bits not in PACKABLE_BITS:
        raise TasaError(f"{name}: {result.bits}-bit weights cannot be stored in a GPTQ checkpoint "
                        f"(it packs {', '.join(map(str, PACKABLE_BITS))} bits)")
    zeros = result.zeros.round().to(torch.int64) - (1 if fmt == "gptq" else 0)
    if int(zeros.min()) < 0:
        raise TasaError(f"{name}: a group has zero point 0, which checkpoint format gptq cannot store; use gptq_v2")
    return {f"{name}.qweight": pack_rows(result.codes.t().to(torch.int64).cpu(), result.bits),
            f"{name}.qzeros": pack_cols(zeros.t().cpu(), result.bits),
            f"{name}.scales": result.scales.t().contiguous().to(torch.float16).cpu(),
            f"{name}.g_idx": result.g_idx.to(torch.int32).cpu()}


def write_checkpoint(out_dir: Path, model: nn.Module, tokenizer, packed: dict[str, torch.Tensor], qcfg: dict,
                     layers_path: str, max_shard_bytes: int = MAX_SHARD_BYTES) -> list[str]:
    """Write a quantized in-memory model (``packed``: the GPTQ tensors of its quantized linears) into ``out_dir``
    (an empty, fresh directory): weight shards (tasa.export.writer), config.json with ``quantization_config``,
    quantize_config.json, the tokenizer and a README.  Returns the weight file names."""
    writer = CheckpointWriter(out_dir, model, layers_path, max_shard_bytes)
    for index, layer in enumerate(model.get_submodule(layers_path)):
        prefix = f"{layers_path}.{index}."
        writer.add_layer(index, layer, {k: v for k, v in packed.items() if k.startswith(prefix)})
    names = writer.finish()
    write_config_files(out_dir, model, tokenizer, qcfg, README)
    return names


def quantized_format(path: Path) -> str | None:
    """``gptq`` or ``compressed-tensors`` for a checkpoint directory of that quantization method, else None."""
    cfg = path / "config.json"
    if not cfg.is_file():
        return None
    qc = json.loads(cfg.read_text()).get("quantization_config") or {}
    method = str(qc.get("quant_method", "")).lower()
    return method if method in ("gptq", "compressed-tensors") else None



def _module_grid(qcfg: dict, name: str) -> tuple[int, bool] | None:
    """(bits, skipped) of module ``name`` by the config's default and its first matching ``dynamic`` rule."""
    for pattern, over in (qcfg.get("dynamic") or {}).items():
        negative = pattern.startswith("-:")
        raw = pattern[2:] if pattern.startswith(("-:", "+:")) else pattern
        if re.match(raw, name):
            return (int(over.get("bits", qcfg["bits"])), negative)
    return (int(qcfg["bits"]), False)


def gptq_config(path: Path) -> dict:
    """The ``quantization_config`` of GPTQ checkpoint ``path``, its checkpoint format checked."""
    qcfg = json.loads((path / "config.json").read_text())["quantization_config"]
    fmt = qcfg.get("checkpoint_format", "gptq")
    if fmt not in ("gptq", "gptq_v2"):
        raise TasaError(f"{path}: GPTQ checkpoint format {fmt!r} is not supported (gptq, gptq_v2)")
    return qcfg


def dequantize_module(get: Callable[[str], torch.Tensor], name: str, qcfg: dict, path: Path) -> torch.Tensor:
    """The float32 weight (out, in) of quantized linear ``name``, from its four GPTQ tensors (``get(suffix)``)
    and the checkpoint's ``quantization_config`` (its bit-width by the default and ``dynamic`` rules)."""
    bits, _ = _module_grid(qcfg, name)
    fmt = qcfg.get("checkpoint_format", "gptq")
    scales = get("scales").float()
    g_idx = get("g_idx").long()
    k, n = g_idx.numel(), scales.shape[1]
    try:
        codes = unpack_rows(get("qweight"), bits, k)
        zeros = unpack_cols(get("qzeros"), bits, n) + (1 if fmt == "gptq" else 0)
    except TasaError as e:
        raise TasaError(f"{path}: {name} does not unpack as {bits}-bit: {e}") from None
    return (scales[g_idx] * (codes - zeros[g_idx]).float()).t().contiguous()
