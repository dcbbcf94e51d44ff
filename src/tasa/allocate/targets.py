"""The serving rules: what each inference engine serves from which checkpoint format, as data, and the check of
a plan against them.

A target constrains the allocation itself (candidate bit-widths, symmetric
grids, one bit-width per fusion group) and is checked again by the exporter,
which refuses a plan the target cannot serve and names the module and the rule.

| target | format | bits | grids | fusion groups |
| --- | --- | --- | --- | --- |
| ``gptqmodel`` | gptq | 2, 3, 4, 8 | symmetric or not | free |
| ``vllm`` | compressed-tensors | 2 to 8 | asymmetric only at 4 and 8 | tied |
| ``vllm-gptq`` | gptq | 4, 8 | symmetric | tied |
| ``sglang`` | gptq | 4, 8 | symmetric | tied |
| ``compressed-tensors`` | compressed-tensors | 2 to 8 | symmetric or not | free |

- ``gptqmodel``: with mixed bit-widths GPTQModel runs every module on its plain
  Torch kernel (``BACKEND.TORCH``), since its fast kernels take one bit-width per model.
- ``vllm``: vLLM's compressed-tensors path takes a scheme per module (its
  weight-only kernels serve 2 to 8 bits; asymmetric zero points at 4 and 8 bits
  only); ``vllm-gptq`` and ``sglang``: their GPTQ paths serve symmetric 4- and
  8-bit weights.  vLLM and SGLang fuse q/k/v and gate/up into one matmul each (and
  a layer's routed experts into one fused MoE), so the members of a fusion group
  share one grid; their group sizes are -1, 32, 64 or 128.
- ``compressed-tensors``: the format's own limits, for other loaders.

:func:`target_for` maps a target and an export format to the rules that apply (``vllm`` asked for a GPTQ
checkpoint is ``vllm-gptq``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

from tasa.config import QuantSpec
from tasa.errors import TasaError


@dataclass(frozen=True)
class Target:
    name: str
    bits: tuple[int, ...]
    sym_only: bool
    tie_fused: bool
    group_sizes: tuple[int, ...] | None  # None: any
    note: str
    format: str = "gptq"  # the checkpoint format the engine serves these weights from
    asym_bits: tuple[int, ...] | None = None  # asymmetric grids only at these bit-widths (None: at every one)


ENGINE_GROUPS = (-1, 32, 64, 128)
TARGETS: dict[str, Target] = {
    "gptqmodel": Target("gptqmodel", (2, 3, 4, 8), False, False, None,
                        "mixed bit-widths load on GPTQModel's Torch kernel: GPTQModel.load(path, "
                        "backend=BACKEND.TORCH)"),
    "vllm": Target("vllm", (2, 3, 4, 5, 6, 7, 8), False, True, ENGINE_GROUPS,
                   "vLLM's compressed-tensors path: a scheme per module, 2 to 8 bits, asymmetric only at 4/8, "
                   "q/k/v and gate/up fused", "compressed-tensors", (4, 8)),
    "vllm-gptq": Target("vllm-gptq", (4, 8), True, True, ENGINE_GROUPS,
                        "vLLM's GPTQ path: symmetric 4/8-bit, q/k/v and gate/up fused"),
    "sglang": Target("sglang", (4, 8), True, True, ENGINE_GROUPS,
                     "SGLang's GPTQ path: symmetric 4/8-bit, q/k/v and gate/up fused"),
    "compressed-tensors": Target("compressed-tensors", (2, 3, 4, 5, 6, 7, 8), False, False, None,
                                 "compressed-tensors pack-quantized: 2 to 8 bits, any grid", "compressed-tensors"),
}
# another format of a target's engine: its rules there
_BY_FORMAT = {("vllm", "gptq"): "vllm-gptq", ("vllm-gptq", "compressed-tensors"): "vllm",
              ("gptqmodel", "compressed-tensors"): "compressed-tensors", ("compressed-tensors", "gptq"): "gptqmodel"}


def get_target(name: str) -> Target:
    try:
        return TARGETS[name]
    except KeyError:
        raise TasaError(f"unknown target {name!r}; targets: {', '.join(TARGETS)}") from None


def target_for(name: str, export_format: str) -> Target:
    """The rules of target ``name`` for a checkpoint of ``export_format``; an error naming the formats the target's
    engine serves when it serves none of that format."""
    tgt = get_target(name)
    if tgt.format == export_format:
        return tgt
    other = _BY_FORMAT.get((name, export_format))
    if other is None:
        raise TasaError(f"{name} is served from {tgt.format} checkpoints, not {export_format} (use --format "
                        f"{tgt.format}, or another --target)")
    return TARGETS[other]


def target_bits(target: Target, candidates: Sequence[int]) -> list[int]:
    """The candidate bit-widths the target serves; an error when none is left."""
    keep = sorted(b for b in set(candidates) if b in target.bits)
    if not keep:
        raise TasaError(f"none of the bit-widths {sorted(set(candidates))} is servable by {target.name} "
                        f"(it serves {', '.join(map(str, target.bits))})")
    return keep


def violations(modules: Mapping[str, QuantSpec], target: Target, fusion_groups: Sequence[Sequence[str]]) -> list[str]:
    """Every way the per-module specs break the target's rules, one line each (empty: servable)."""
    out = []
    for name, s in modules.items():
        if s.bits not in target.bits:
            out.append(f"{name}: {s.bits}-bit, but {target.name} serves only "
                       f"{', '.join(map(str, target.bits))}-bit {target.format} weights")
        if target.sym_only and not s.sym:
            out.append(f"{name}: asymmetric grid, but {target.name} serves only symmetric GPTQ weights")
        elif not s.sym and target.asym_bits is not None and s.bits not in target.asym_bits:
            out.append(f"{name}: asymmetric {s.bits}-bit grid, but {target.name} serves asymmetric grids only at "
                       f"{', '.join(map(str, target.asym_bits))} bits")
        if target.group_sizes is not None and s.group_size not in target.group_sizes:
            out.append(f"{name}: group size {s.group_size}, but {target.name} serves group sizes "
                       f"{', '.join(map(str, target.group_sizes))}")
    if target.tie_fused:
        for group in fusion_groups:
            present = [m for m in group if m in modules]
            if present and len(present) != len(group):
                out.append(f"{', '.join(group)}: only {', '.join(present)} quantized, but {target.name} fuses "
                           "them into one matmul")
            specs = {(modules[m].bits, modules[m].group_size, modules[m].sym) for m in present}
            if len(specs) > 1:
                detail = ", ".join(f"{m.rsplit('.', 1)[-1]}={modules[m].bits}b" for m in present)
                out.append(f"{group[0].rsplit('.', 1)[0]}: fusion group with different grids ({detail}), but "
                           f"{target.name} fuses them into one matmul and needs one bit-width")
    return out


def check_servable(modules: Mapping[str, QuantSpec], target: Target, fusion_groups: Sequence[Sequence[str]]) -> None:
    bad = violations(modules, target, fusion_groups)
    if bad:
        more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
        raise TasaError(f"plan not servable by {target.name}: {bad[0]}{more}")
