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

import torch
import torch.nn as nn

from tasa.artifacts import write_json_atomic
from tasa.errors import TasaError
from tasa.export.pack import PACKABLE_BITS, pack_cols, pack_rows, unpack_cols, unpack_rows
from tasa.plan import Plan
from tasa.quantized import QuantResult

SUFFIXES = ("qweight", "qzeros", "scales", "g_idx")
README = """# GPTQ checkpoint written by tasa

Format: GPTQ (`checkpoint_format: gptq`, int32 packing, fp16 scales, zero points stored minus one).
Per-module bit-widths are in `quantize_config.json` under `dynamic` (regex -> overrides); modules
without an entry use the default `bits`/`group_size`.

- GPTQModel: `GPTQModel.load(path, backend=BACKEND.TORCH, dtype=torch.float16)` (mixed bit-widths
  run on its Torch kernel; on CPU it needs fp16/bf16 activations).
- vLLM / SGLang: `--quantization gptq` for plans made with `--target vllm` / `--target sglang`.
- tasa: `tasa eval --model path` dequantizes on load.
- Plain transformers/optimum loading ignores `dynamic` and would read every module at the
  default bit-width: do not load a mixed-precision checkpoint that way.
"""


def _grid_key(spec) -> tuple:
    return (spec.bits, spec.group_size, spec.sym, spec.act_order and not spec.static_groups)


def quantize_config(plan: Plan, all_linears: list[str], numels: dict[str, int], tool: str, target: str = "gptqmodel",
                    checkpoint_format: str = "gptq") -> dict:
    """quantize_config.json for ``plan``: default grid = the one holding most weights, overrides for the rest."""
    if not plan.modules:
        raise TasaError("the plan quantizes no module; nothing to export")
    weight_of = Counter()
    for name, spec in plan.modules.items():
        weight_of[_grid_key(spec)] += numels[name]
    bits, group, sym, desc_act = max(weight_of, key=lambda k: (weight_of[k], k))
    dynamic = {}
    for name in all_linears:
        if name not in plan.modules:
            dynamic[f"-:^{re.escape(name)}$"] = {}
            continue
        b, g, s, d = _grid_key(plan.modules[name])
        over = {k: v for k, v, default in (("bits", b, bits), ("group_size", g, group), ("sym", s, sym),
                                            ("desc_act", d, desc_act)) if v != default}
        if over:
            dynamic[f"+:^{re.escape(name)}$"] = over
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


def float_tensors(model: nn.Module, quantized: set[str]) -> dict[str, torch.Tensor]:
    """The model's tensors other than quantized weights, each stored once (tied weights share storage)."""
    out, seen = {}, set()
    for key, t in model.state_dict().items():
        if key.endswith(".weight") and key[: -len(".weight")] in quantized:
            continue
        ptr = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
        if ptr in seen:
            continue
        seen.add(ptr)
        out[key] = t.detach().cpu().contiguous()
    return out


def write_checkpoint(out_dir: Path, model: nn.Module, tokenizer, packed: dict[str, torch.Tensor], qcfg: dict,
                     max_shard_size: str = "4GB") -> list[str]:
    """Write safetensors shard(s), config.json with ``quantization_config``, quantize_config.json, the tokenizer
    and a README into ``out_dir`` (an empty, fresh directory).  Returns the weight file names."""
    from huggingface_hub import split_torch_state_dict_into_shards
    from safetensors.torch import save_file

    quantized = {k.rsplit(".", 1)[0] for k in packed}
    tensors = {**float_tensors(model, quantized), **packed}
    split = split_torch_state_dict_into_shards(tensors, max_shard_size=max_shard_size)
    for filename, keys in split.filename_to_tensors.items():
        save_file({k: tensors[k] for k in keys}, str(out_dir / filename), metadata={"format": "pt"})
    if split.is_sharded:
        write_json_atomic(out_dir / "model.safetensors.index.json",
                          {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in tensors.values())},
                           "weight_map": split.tensor_to_filename})
    config = model.config.to_dict()
    config["quantization_config"] = qcfg
    write_json_atomic(out_dir / "config.json", config)
    write_json_atomic(out_dir / "quantize_config.json", qcfg)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(out_dir)
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)
    (out_dir / "README.md").write_text(README)
    return list(split.filename_to_tensors)


def is_gptq_dir(path: Path) -> bool:
    cfg = path / "config.json"
    if not cfg.is_file():
        return False
    qc = json.loads(cfg.read_text()).get("quantization_config") or {}
    return str(qc.get("quant_method", "")).lower() == "gptq"


def _module_grid(qcfg: dict, name: str) -> tuple[int, bool] | None:
    """(bits, skipped) of module ``name`` by the config's default and its first matching ``dynamic`` rule."""
    for pattern, over in (qcfg.get("dynamic") or {}).items():
        negative = pattern.startswith("-:")
        raw = pattern[2:] if pattern.startswith(("-:", "+:")) else pattern
        if re.match(raw, name):
            return (int(over.get("bits", qcfg["bits"])), negative)
    return (int(qcfg["bits"]), False)


def dequantized_state_dict(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """Every tensor of a GPTQ checkpoint directory, quantized linears dequantized to float32 ``weight``s.

    Reads ``checkpoint_format`` gptq (zero points stored minus one) and gptq_v2."""
    from safetensors import safe_open

    qcfg = json.loads((path / "config.json").read_text())["quantization_config"]
    fmt = qcfg.get("checkpoint_format", "gptq")
    if fmt not in ("gptq", "gptq_v2"):
        raise TasaError(f"{path}: GPTQ checkpoint format {fmt!r} is not supported (gptq, gptq_v2)")
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise TasaError(f"{path} holds no .safetensors weights")
    raw: dict[str, torch.Tensor] = {}
    for f in files:
        with safe_open(str(f), "pt") as st:
            for k in st.keys():
                raw[k] = st.get_tensor(k)
    out = {}
    names = sorted({k[: -len(".qweight")] for k in raw if k.endswith(".qweight")})
    for name in names:
        bits, _ = _module_grid(qcfg, name)
        scales = raw.pop(f"{name}.scales").float()
        g_idx = raw.pop(f"{name}.g_idx").long()
        qweight, qzeros = raw.pop(f"{name}.qweight"), raw.pop(f"{name}.qzeros")
        k, n = g_idx.numel(), scales.shape[1]
        try:
            codes = unpack_rows(qweight, bits, k)
            zeros = unpack_cols(qzeros, bits, n) + (1 if fmt == "gptq" else 0)
        except TasaError as e:
            raise TasaError(f"{path}: {name} does not unpack as {bits}-bit: {e}") from None
        out[f"{name}.weight"] = (scales[g_idx] * (codes - zeros[g_idx]).float()).t().contiguous()
    out.update(raw)
    return out, qcfg
