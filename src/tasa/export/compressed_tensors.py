"""compressed-tensors checkpoints (the format llm-compressor writes and vLLM serves), ``pack-quantized``.

Per quantized linear ``NAME`` the checkpoint holds::

    NAME.weight_packed       int32 (out, ceil(in * bits / 32))   signed codes q + 2^(bits-1), a dense bit stream
                                                                 per row (32 codes fill exactly ``bits`` words)
    NAME.weight_scale        float16 (out, groups)               one scale per group of ``group_size`` inputs
    NAME.weight_zero_point   int32 (ceil(out * bits / 32), groups)   asymmetric grids only: zp + 2^(bits-1),
                                                                 packed the same way along the output dimension
    NAME.weight_shape        int64 (2,)                          (out, in)

and ``weight = scale * (q - zp)`` with ``q`` in [-2^(bits-1), 2^(bits-1) - 1] (compressed-tensors 0.20's
layout; its own decompression is checked against tasa's in tests/unit/test_export_compressed_tensors.py).
tasa's codes are unsigned (``code`` in [0, 2^bits - 1], ``weight = scale * (code - zero)``), so
``q = code - 2^(bits-1)`` and ``zp = zero - 2^(bits-1)``: on tasa's symmetric grid the zero is 2^(bits-1)
and ``zp`` is 0, which is what a symmetric scheme means there.  The symmetric grid's scales are negative
where a group's largest-magnitude weight is positive (the signed-max convention maps it onto the extra
negative code); the format stores them as they are: ``-s * -q`` cannot be written with positive scales,
because ``-q`` leaves the code range at q = -2^(bits-1).  Scales are float16, tasa's grids' own values
(``tasa.quant.rtn``), so storing them is exact.

``quantization_config`` gives one config group per distinct grid (bits, group size, symmetry), whose
``targets`` are the exact names of its modules (checkpoint names), and ``ignore`` lists every linear left
in full precision.

W8A8 (``w8a8``: the 8-bit modules of a plan, on a per-channel symmetric grid): such a module is stored
``int-quantized``, as llm-compressor writes its W8A8-int8 schemes and vLLM's int8 kernels read them::

    NAME.weight          int8 (out, in)        q = code - 128
    NAME.weight_scale    float16 (out, 1)      one scale per output channel (negative where tasa's is)

and its config group also declares ``input_activations``: int8, symmetric, per token, dynamic (the engine
quantizes each token's activations on the fly; nothing is calibrated).  A checkpoint holding both kinds has
the format ``mixed-precision`` and a ``format`` per config group.
"""
from __future__ import annotations

import math
import re
from collections import defaultdict

import torch

from tasa.errors import TasaError
from tasa.export.writer import checkpoint_key
from tasa.plan import Plan
from tasa.quantized import QuantResult

SUFFIXES = ("weight_packed", "weight_scale", "weight_zero_point", "weight_shape")
CT_BITS = tuple(range(2, 9))
PACKED, INT = "pack-quantized", "int-quantized"
W8A8_ACTIVATIONS = {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "token", "dynamic": True}


def pack_dense(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack non-negative integers below 2^bits, (rows, cols), into int32 words along the columns: element ``i`` of
    a row starts at bit ``i * bits`` of the row's little-endian bit stream (32 elements fill ``bits`` words)."""
    if not 1 <= bits <= 8:
        raise TasaError(f"cannot pack {bits}-bit values")
    v = values.to(torch.int64)
    if v.numel() and (int(v.min()) < 0 or int(v.max()) >= 1 << bits):
        raise TasaError(f"values outside [0, {(1 << bits) - 1}] cannot be packed as {bits}-bit")
    rows, cols = v.shape
    padded = math.ceil(cols / 32) * 32
    v = torch.nn.functional.pad(v, (0, padded - cols)).reshape(rows, padded // 32, 32)
    words = torch.zeros(rows, padded // 32, bits + 1, dtype=torch.int64)
    for i in range(32):
        start = i * bits
        word, offset = divmod(start, 32)
        words[:, :, word] += (v[:, :, i] << offset) & 0xFFFFFFFF
        if offset + bits > 32:
            words[:, :, word + 1] += v[:, :, i] >> (32 - offset)
    words = words[:, :, :bits].reshape(rows, -1)[:, : math.ceil(cols * bits / 32)]
    return torch.where(words >= 1 << 31, words - (1 << 32), words).to(torch.int32)


def unpack_dense(packed: torch.Tensor, bits: int, cols: int) -> torch.Tensor:
    """Inverse of :func:`pack_dense`: (rows, cols) int64 values."""
    w = packed.to(torch.int64) & 0xFFFFFFFF
    rows = w.shape[0]
    groups = math.ceil(cols / 32)
    w = torch.nn.functional.pad(w, (0, groups * bits - w.shape[1])).reshape(rows, groups, bits)
    w = torch.cat([w, torch.zeros(rows, groups, 1, dtype=torch.int64)], dim=2)
    out = torch.empty(rows, groups, 32, dtype=torch.int64)
    mask = (1 << bits) - 1
    for i in range(32):
        word, offset = divmod(i * bits, 32)
        value = w[:, :, word] >> offset
        if offset + bits > 32:
            value = value | (w[:, :, word + 1] << (32 - offset))
        out[:, :, i] = value & mask
    return out.reshape(rows, -1)[:, :cols]


def _check(name: str, result: QuantResult) -> None:
    if result.bits not in CT_BITS:
        raise TasaError(f"{name}: {result.bits}-bit weights cannot be stored as compressed-tensors pack-quantized "
                        f"(it packs {CT_BITS[0]} to {CT_BITS[-1]} bits)")
    groups = result.scales.shape[1]
    cols = result.codes.shape[1]
    size = cols if groups == 1 else result.group_size
    expected = torch.arange(cols, device=result.g_idx.device) // size
    if not torch.equal(result.g_idx.long(), expected):
        raise TasaError(f"{name}: its groups are not consecutive columns (act-order): compressed-tensors export "
                        "needs groups in column order (quantize without act-order, or export --format gptq)")


def w8a8_ok(spec) -> str | None:
    """Why a module's grid cannot be written as W8A8 (None: it can)."""
    if spec.bits != 8:
        return f"{spec.bits}-bit"
    if not spec.sym or spec.group_size != -1:
        return "W8A8 weights are 8-bit symmetric per output channel"
    return None


def pack_result(name: str, result: QuantResult, sym: bool, w8a8: bool = False) -> dict[str, torch.Tensor]:
    """The compressed-tensors tensors of one quantized linear (see the module docstring); ``w8a8``: the
    int-quantized form of an 8-bit per-channel symmetric grid."""
    _check(name, result)
    if w8a8:
        if result.bits != 8 or not sym or result.scales.shape[1] != 1:
            raise TasaError(f"{name}: W8A8 stores 8-bit symmetric per-channel weights, not this "
                            f"{result.bits}-bit grid of {result.scales.shape[1]} group(s)")
        return {f"{name}.weight": (result.codes.cpu().to(torch.int16) - 128).to(torch.int8),
                f"{name}.weight_scale": result.scales.cpu().to(torch.float16)}
    half = 1 << (result.bits - 1)
    out = {f"{name}.weight_packed": pack_dense(result.codes.cpu(), result.bits),
           f"{name}.weight_scale": result.scales.cpu().to(torch.float16),
           f"{name}.weight_shape": torch.tensor(list(result.codes.shape), dtype=torch.int64)}
    zeros = result.zeros.cpu().round().to(torch.int64)
    if sym:
        if not torch.all(zeros == half):
            raise TasaError(f"{name}: a symmetric grid whose zero point is not {half}")
    else:
        out[f"{name}.weight_zero_point"] = pack_dense(zeros.t(), result.bits).t().contiguous()
    return out


def dequantize_module(get, name: str, bits: int, sym: bool, group_size: int, fmt: str = PACKED) -> torch.Tensor:
    """The float32 weight (out, in) of module ``name`` from its tensors (``get(suffix)``), stored as ``fmt``."""
    if fmt == INT:  # int8 codes, one scale per output channel
        return get("weight").float() * get("weight_scale").float()
    out, cols = (int(x) for x in get("weight_shape"))
    half = 1 << (bits - 1)
    q = unpack_dense(get("weight_packed"), bits, cols) - half
    scale = get("weight_scale").float()
    if sym:
        zp = torch.zeros_like(scale)
    else:
        zp = unpack_dense(get("weight_zero_point").t(), bits, out).t().float() - half
    size = cols if group_size in (-1, None) else group_size
    g = torch.arange(cols) // size
    return scale[:, g] * (q.float() - zp[:, g])


def quantization_config(plan: Plan, all_linears: list[str], names: dict[str, str] | None = None,
                        w8a8: bool = False) -> dict:
    """``quantization_config`` (config.json) for ``plan``: a config group per grid, its modules as exact targets
    (their checkpoint names: ``names``, see tasa.export.writer.checkpoint_key), every other linear ignored;
    ``w8a8``: the 8-bit modules as W8A8 (each must be on a per-channel symmetric grid)."""
    if not plan.modules:
        raise TasaError("the plan quantizes no module; nothing to export")
    by_grid: dict[tuple, list[str]] = defaultdict(list)
    for name, spec in plan.modules.items():
        if spec.act_order and not spec.static_groups:
            raise TasaError(f"{name}: act-order groups cannot be written as compressed-tensors (export --format gptq)")
        int8 = w8a8 and spec.bits == 8
        if int8 and (why := w8a8_ok(spec)):
            raise TasaError(f"{name}: {why}, not groups of {spec.group_size}")
        by_grid[(spec.bits, spec.group_size, spec.sym, int8)].append(name)
    stored = {n: checkpoint_key(names or {}, f"{n}.weight")[: -len(".weight")] for n in all_linears}
    groups = {}
    for i, ((bits, gs, sym, int8), members) in enumerate(sorted(by_grid.items())):
        weights = {"num_bits": bits, "type": "int", "symmetric": sym, "dynamic": False,
                   "strategy": "channel" if gs == -1 else "group"}
        if gs != -1:
            weights["group_size"] = gs
        groups[f"group_{i}"] = {"targets": sorted(stored[n] for n in members), "weights": weights,
                                "input_activations": dict(W8A8_ACTIVATIONS) if int8 else None,
                                "output_activations": None, "format": INT if int8 else PACKED}
    formats = {g["format"] for g in groups.values()}
    ignore = sorted(stored[n] for n in all_linears if n not in plan.modules)
    return {"quant_method": "compressed-tensors", "format": formats.pop() if len(formats) == 1 else "mixed-precision",
            "quantization_status": "compressed", "config_groups": groups, "ignore": ["lm_head", *ignore],
            "kv_cache_scheme": None, "global_compression_ratio": None}


def module_grid(qcfg: dict, name: str) -> tuple[int, bool, int, str] | None:
    """(bits, symmetric, group size, format) of checkpoint module ``name`` by ``qcfg``'s config groups, else
    None."""
    for group in qcfg.get("config_groups", {}).values():
        for target in group.get("targets", []):
            hit = re.match(target[3:], name) if target.startswith("re:") else target == name
            if hit:
                w = group["weights"]
                return (int(w["num_bits"]), bool(w.get("symmetric", True)), int(w.get("group_size") or -1),
                        group.get("format") or qcfg.get("format") or PACKED)
    return None


README = """# Quantized by tasa: compressed-tensors (pack-quantized)

Weight-only integer quantization in the format llm-compressor writes: per linear, `weight_packed` (int32,
codes packed densely along the input dimension), `weight_scale` (float16 per group), `weight_zero_point`
(asymmetric grids only) and `weight_shape`. `config.json`'s `quantization_config` has one config group
per grid (bits, group size, symmetry) targeting its modules by exact name; `ignore` lists the linears
kept in float. Symmetric grids may store negative scales (tasa's signed-max grid).

Load it with:
- vLLM: `vllm serve DIR` (compressed-tensors: 2 to 8 bits per module on GPUs; its CPU backend runs 4-bit
  weight-only layers);
- transformers with the compressed-tensors library (`AutoModelForCausalLM.from_pretrained(DIR)`);
- tasa: `tasa eval --model DIR` dequantizes on load.
"""
