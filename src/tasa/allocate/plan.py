"""From a sensitivity profile to a quantization plan: aggregate, allocate per layer, expand to modules."""
from __future__ import annotations

from typing import Mapping, Sequence

from tasa.allocate.aggregate import aggregate
from tasa.allocate.dp import allocate
from tasa.config import QuantSpec
from tasa.errors import TasaError
from tasa.plan import Plan

SCALE_BITS = 16  # fp16 scale per group; the zero point takes `bits` more


def metadata_bits(bits: int, group_size: int, in_features: int | None = None) -> float:
    """Scale and zero-point storage per weight: (16 + bits) per group."""
    g = group_size if group_size > 0 else (in_features or 1)
    return (SCALE_BITS + bits) / g


def plan_from_sensitivity(sens: dict, budget: float, bits: Sequence[int] | None = None, beta: float | str = 0.5,
                          task_weights: Mapping[str, float] | None = None, budget_includes_metadata: bool = False,
                          method: str = "gptq") -> tuple[Plan, dict]:
    """Per-layer bit-widths minimising the aggregated cost under ``budget``; returns the plan and a summary."""
    if sens.get("schema") != "tasa.sensitivity/1":
        raise TasaError(f"not a tasa sensitivity profile (schema {sens.get('schema')!r})")
    if sens["granularity"] != "layer":
        raise TasaError("inter-layer allocation needs a layer-granularity profile (tasa profile --granularity layer)")
    available = [int(b) for b in sens["bits"]]
    bits = sorted(set(int(b) for b in (bits or available)))
    missing = [b for b in bits if b not in available]
    if missing:
        raise TasaError(f"bit-width {missing[0]} was not profiled; profiled: {', '.join(map(str, available))}")
    point = {obj: {b: v["cost"] for b, v in per_bits.items()} for obj, per_bits in sens["costs"].items()}
    combined = aggregate(point, beta=beta, task_weights=task_weights)
    units = sens["units"]
    g = int(sens["group_size"])
    costs = [{b: combined[str(b)][i] for b in bits} for i in range(len(units))]
    sizes = [int(u["numel"]) for u in units]
    extra = [{b: metadata_bits(b, g) for b in bits} for _ in units] if budget_includes_metadata else None
    result = allocate(costs, sizes, budget, extra)
    spec_of = {b: QuantSpec(bits=b, group_size=g, sym=bool(sens.get("sym", True))) for b in bits}
    modules = {m: spec_of[b] for u, b in zip(units, result.bits) for m in u["modules"]}
    weight_bits = sum(s * b for s, b in zip(sizes, result.bits)) / sum(sizes)
    effective = sum(s * (b + metadata_bits(b, g)) for s, b in zip(sizes, result.bits)) / sum(sizes)
    summary = {"budget": budget, "budget_includes_metadata": budget_includes_metadata, "beta": beta,
               "task_weights": dict(task_weights or {}), "candidates": bits, "cost": result.cost,
               "average_weight_bits": weight_bits, "effective_bits_with_metadata": effective,
               "layer_bits": {u["name"]: b for u, b in zip(units, result.bits)},
               "objectives": list(sens["costs"]), "model": sens.get("model")}
    plan = Plan(modules, method=method, meta={"allocation": summary})
    return plan, summary
