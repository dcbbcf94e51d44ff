"""From sensitivity profiles to a quantization plan: aggregate, allocate per layer, split within layers.

1. Inter-layer: the layer profile's costs are aggregated (see
   :mod:`tasa.allocate.aggregate`) and one bit-width per layer is chosen by the
   exact DP under the model-wide budget.  Given a module profile instead, the
   same DP chooses one bit-width per module (per fusion group when tied) over
   the whole model: the finest granularity, no per-layer totals.
2. Intra-layer (with a module profile): each layer's bits are split among its
   modules, by the same DP on the module costs, under that layer's own total
   (its parameter count times its bit-width, metadata included when the budget
   includes it), so the model-wide budget still holds.  Modules of a fusion
   group (q/k/v, gate/up) can be tied to one bit-width: they then form a single
   unit whose cost is the sum of theirs.  Without a module profile every module
   takes its layer's bit-width.

The target (see :mod:`tasa.allocate.targets`) restricts the candidates, forces
symmetric grids and ties fusion groups where its engine needs it.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Mapping, Sequence

from tasa.allocate.aggregate import aggregate
from tasa.allocate.dp import allocate
from tasa.allocate.targets import Target, check_servable, get_target, target_bits
from tasa import schemas
from tasa.schemas import Sensitivity
from tasa.errors import TasaError
from tasa.plan import Plan

SCALE_BITS = 16  # fp16 scale per group; the zero point takes `bits` more


def metadata_bits(bits: int, group_size: int, in_features: int | None = None) -> float:
    """Scale and zero-point storage per weight: (16 + bits) per group."""
    g = group_size if group_size > 0 else (in_features or 1)
    return (SCALE_BITS + bits) / g


def check_budget(budget: float, bits: Sequence[int], group_size: int | None = None,
                 includes_metadata: bool = False) -> None:
    """Refuse a budget the candidate bit-widths cannot meet, or one above the widest (every unit at the widest).

    With ``includes_metadata`` the budget also pays each group's scale and zero point (needs ``group_size``)."""
    if not isinstance(budget, (int, float)) or not math.isfinite(budget) or budget <= 0:
        raise TasaError(f"the budget must be a positive number of bits per weight, got {budget!r}")
    per_weight = {b: b + (metadata_bits(b, group_size) if includes_metadata and group_size else 0.0) for b in bits}
    lo, hi = min(per_weight, key=per_weight.get), max(per_weight, key=per_weight.get)
    what = " with scale/zero storage" if includes_metadata and group_size else ""
    if budget < per_weight[lo] - 1e-9:
        raise TasaError(f"budget {budget:g} bits per weight is infeasible: the lowest candidate, {lo}-bit, needs "
                        f"{per_weight[lo]:.4g}{what} (candidates: {', '.join(map(str, sorted(bits)))})")
    if budget > per_weight[hi] + 1e-9:
        raise TasaError(f"budget {budget:g} bits per weight is above the widest candidate, {hi}-bit "
                        f"({per_weight[hi]:.4g}{what}): every unit would get {hi} bits; give a budget of at most "
                        f"{per_weight[hi]:.4g} or add wider candidates")


def candidate_bits(tgt, requested: Sequence[int] | None, profiled: Sequence[int]) -> list[int]:
    """The bit-widths to allocate over: the requested ones (each must be profiled and servable by the target), or
    the profiled ones the target serves."""
    profiled = sorted({int(b) for b in profiled})
    if requested is None:
        return target_bits(tgt, profiled)
    requested = sorted({int(b) for b in requested})
    unprofiled = [b for b in requested if b not in profiled]
    if unprofiled:
        raise TasaError(f"bit-width(s) {', '.join(map(str, unprofiled))} were not profiled; profiled: "
                        f"{', '.join(map(str, profiled))} (profile them with tasa profile --bits)")
    unservable = [b for b in requested if b not in tgt.bits]
    if unservable:
        raise TasaError(f"bit-width(s) {', '.join(map(str, unservable))} are not servable by {tgt.name} "
                        f"(it serves {', '.join(map(str, tgt.bits))})")
    return requested


def _check_profile(sens: Sensitivity, granularity: str, flag: str) -> None:
    if sens.granularity != granularity:
        raise TasaError(f"{flag} needs a {granularity}-granularity profile (tasa profile --granularity {granularity})")


def _fusion_groups(sens: Sensitivity) -> list[tuple[str, ...]]:
    groups = list(sens.fusion_groups)
    if not groups:
        raise TasaError("tying fusion groups needs them in the module profile; re-run tasa profile")
    return groups


def _combined_costs(sens: Sensitivity, bits: Sequence[int], beta, task_weights) -> list[dict[int, float]]:
    available = sens.bits
    missing = [b for b in bits if b not in available]
    if missing:
        raise TasaError(f"bit-width {missing[0]} was not profiled; profiled: {', '.join(map(str, available))}")
    point = {obj: {b: v["cost"] for b, v in per_bits.items()} for obj, per_bits in sens.costs.items()}
    combined = aggregate(point, beta=beta, task_weights=task_weights)
    return [{b: combined[str(b)][i] for b in bits} for i in range(len(sens.units))]


def predicted_costs(sens: "dict | Sensitivity", unit_bits: Sequence[int]) -> dict[str, dict]:
    """What a profile predicts for a plan (one bit-width per profiled unit: layer or module), objective by
    objective, if single-unit costs add up: the plan's summed cost, uniform's at every profiled bit-width,
    and - for a plan whose average weight bits lie strictly between two profiled widths lo < avg < hi - its
    position on the way from uniform hi (0) to uniform lo (1).  Raw costs (the objective's own units),
    before normalisation."""
    sens = schemas.sensitivity(sens)
    if len(unit_bits) != len(sens.units):
        raise TasaError(f"{len(unit_bits)} bit-widths for a profile of {len(sens.units)} units")
    widths = sorted(sens.bits)
    sizes = sens.sizes
    avg = sum(n * b for n, b in zip(sizes, unit_bits)) / sum(sizes)
    below = [b for b in widths if b < avg]
    above = [b for b in widths if b > avg]
    at_width = any(abs(avg - b) < 1e-9 for b in widths)
    out = {}
    for obj, per_bits in sens.costs.items():
        cost = {int(b): v["cost"] for b, v in per_bits.items()}
        plan = sum(cost[b][i] for i, b in enumerate(unit_bits))
        uniform = {b: sum(cost[b]) for b in widths}
        entry = {"plan": plan, "uniform": uniform}
        if below and above and not at_width and uniform[below[-1]] != uniform[above[0]]:
            entry["gap_position"] = (plan - uniform[above[0]]) / (uniform[below[-1]] - uniform[above[0]])
            entry["between"] = [below[-1], above[0]]
        out[obj] = entry
    return out


def _tied(names: Sequence[str], tie_groups: Sequence[Sequence[str]]) -> list[list[int]]:
    """Allocation units over single-module units ``names``: each tie group present is one unit (in the
    group's order), every other module its own unit."""
    index = {n: i for i, n in enumerate(names)}
    out: list[list[int]] = []
    seen: set[str] = set()
    for g in tie_groups:
        members = [m for m in g if m in index]
        if members:
            out.append([index[m] for m in members])
            seen.update(members)
    return out + [[index[n]] for n in names if n not in seen]


def _metadata(tgt: Target, bits: int, group_size: int) -> float:
    """Scale storage per weight: the target's own figure where it states one (a GGML type's block scales), else
    the group grid's."""
    if tgt.bits_per_weight is not None and bits in tgt.bits_per_weight:
        return tgt.bits_per_weight[bits] - bits
    return metadata_bits(bits, group_size)


def _fitting(units: Sequence, bits: Sequence[int], tgt: Target, sym: bool) -> list[set[int]]:
    """Per unit, the candidate bit-widths the target serves for its modules' input widths on the profile's grid
    (llama.cpp's K types need multiples of 256); an error naming a unit none fits."""
    out = [{b for b in bits if tgt.fits(b, u.in_features, sym)} for u in units]
    for u, ok in zip(units, out):
        if not ok:
            raise TasaError(f"{u.name}: none of the bit-widths {', '.join(map(str, bits))} is servable by "
                            f"{tgt.name} for input widths {', '.join(map(str, sorted(set(u.in_features))))}")
    return out


def _allocate_units(costs: list[dict[int, float]], sizes: list[int], groups: list[list[int]], budget: float,
                    group_size: int, include_metadata: bool, tgt: Target,
                    allowed: list[set[int]]) -> tuple[list[int], float]:
    """The DP over ``groups`` of units (costs summed, sizes summed; a group's choices are those ``allowed`` for
    every member): one bit-width per unit, and the cost."""
    g_costs = [{b: sum(costs[i][b] for i in grp) for b in costs[grp[0]] if all(b in allowed[i] for i in grp)}
               for grp in groups]
    g_sizes = [sum(sizes[i] for i in grp) for grp in groups]
    extra = [{b: _metadata(tgt, b, group_size) for b in c} for c in g_costs] if include_metadata else None
    result = allocate(g_costs, g_sizes, budget, extra)
    unit_bits = [0] * len(costs)
    for grp, b in zip(groups, result.bits):
        for i in grp:
            unit_bits[i] = b
    return unit_bits, result.cost


def plan_from_sensitivity(sens: "dict | Sensitivity", budget: float, bits: Sequence[int] | None = None,
                          beta: float | str = 0.5, task_weights: Mapping[str, float] | None = None,
                          budget_includes_metadata: bool = False, method: str = "gptq", target: str = "gptqmodel",
                          module_sens: "dict | Sensitivity | None" = None,
                          tie_fused: bool | None = None) -> tuple[Plan, dict]:
    """Bit-widths minimising the aggregated cost under ``budget`` for ``target``: per layer from a layer
    profile (split within layers by ``module_sens`` when given), or per module over the whole model from a
    module profile.  Returns the plan and a summary.

    ``tie_fused``: one bit-width per fusion group within a layer (default: what the target needs)."""
    sens = schemas.sensitivity(sens)
    granularity = sens.granularity
    _check_profile(sens, "module" if granularity == "module" else "layer", "inter-layer allocation")
    if granularity == "module" and module_sens is not None:
        raise TasaError("a module profile is allocated over its modules directly: give it alone, "
                        "or a layer profile with the module profile for the intra-layer split")
    tgt = get_target(target)
    tie = tgt.tie_fused if tie_fused is None else bool(tie_fused)
    if tgt.tie_fused and not tie:
        raise TasaError(f"{tgt.name} fuses q/k/v and gate/up into one matmul: their bits cannot be untied")
    sym = sens.sym
    if tgt.sym_only and not sym:
        raise TasaError(f"the profile used asymmetric grids, but {tgt.name} serves only symmetric GPTQ weights")
    if not sym and tgt.asym_bits is not None and tgt.grids is None:  # an asymmetric profile: only the widths it
        tgt = dataclasses.replace(tgt, bits=tuple(b for b in tgt.bits if b in tgt.asym_bits))  # serves asymmetric
    # (a target of fixed grids, llama.cpp, serves the others on its symmetric grid: Target.grid)
    bits = candidate_bits(tgt, bits or None, sens.bits)
    g = sens.group_size
    check_budget(budget, bits, g, budget_includes_metadata)
    units = sens.units
    costs = _combined_costs(sens, bits, beta, task_weights)
    ties = _fusion_groups(sens) if granularity == "module" and tie else []
    unit_bits, cost = _allocate_units(costs, sens.sizes, _tied([u.modules[0] for u in units], ties), budget, g,
                                      budget_includes_metadata, tgt, _fitting(units, bits, tgt, sym))
    module_bits = {m: b for u, b in zip(units, unit_bits) for m in u.modules}
    numel = {m: u.numel / len(u.modules) for u in units for m in u.modules}  # refined below; bits shared in a unit
    if module_sens is not None:
        module_sens = schemas.sensitivity(module_sens, "the module profile")
        _check_profile(module_sens, "module", "intra-layer allocation")
        if module_sens.model != sens.model or module_sens.group_size != g:
            raise TasaError("the module profile is of another model or group size than the layer profile")
        mod_units = module_sens.units
        missing = sorted(set(module_bits) - {m for u in mod_units for m in u.modules})
        if missing:
            raise TasaError(f"the module profile has no costs for {missing[0]} (profile every layer's modules)")
        mod_costs = _combined_costs(module_sens, target_bits(tgt, bits), beta, task_weights)
        ties = _fusion_groups(module_sens) if tie else []
        numel = {m: u.numel / len(u.modules) for u in mod_units for m in u.modules}  # a unit's modules share its bits
        for u, b in zip(units, unit_bits):  # each layer's modules share its total: the DP under that total
            members = [i for i, mu in enumerate(mod_units) if mu.layer == u.layer]
            split, _ = _allocate_units([mod_costs[i] for i in members], [mod_units[i].numel for i in members],
                                       _tied([mod_units[i].modules[0] for i in members], ties),
                                       b + (_metadata(tgt, b, g) if budget_includes_metadata else 0.0), g,
                                       budget_includes_metadata, tgt,
                                       _fitting([mod_units[i] for i in members], bits, tgt, sym))
            module_bits.update({m: x for i, x in zip(members, split) for m in mod_units[i].modules})
    widths = {m: w for u in (*units, *(module_sens.units if module_sens is not None else ()))
              if u.in_features for m, w in zip(u.modules, u.in_features)}
    # a module's grid: the target's at its bits (llama.cpp, asymmetric: a K type where its width takes one)
    modules = {m: tgt.spec(b, g, sym, widths.get(m)) for m, b in module_bits.items()}
    check_servable(modules, tgt, sens.fusion_groups, widths)
    total = sum(numel.values())
    weight_bits = sum(numel[m] * b for m, b in module_bits.items()) / total
    effective = sum(numel[m] * (b + _metadata(tgt, b, g)) for m, b in module_bits.items()) / total
    layers: dict[int, list[str]] = {}
    for u in units:
        layers.setdefault(u.layer, []).extend(u.modules)
    summary = {"budget": budget, "budget_includes_metadata": budget_includes_metadata, "beta": beta,
               "task_weights": dict(task_weights or {}), "candidates": bits, "target": tgt.name,
               "tie_fused": tie, "granularity": granularity, "intra_layer": module_sens is not None, "cost": cost,
               "average_weight_bits": weight_bits, "effective_bits_with_metadata": effective,
               "predicted": predicted_costs(sens, unit_bits),
               "layer_bits": {f"layer.{i}": sum(numel[m] * module_bits[m] for m in ms) / sum(numel[m] for m in ms)
                              for i, ms in layers.items()},
               "module_bits": module_bits, "objectives": list(sens.costs), "model": sens.model}
    plan = Plan(modules, method=method, meta={"allocation": summary, "target": tgt.name})
    return plan, summary


def unprofiled_bits_used(sens: "dict | Sensitivity", budget: float, bits: Sequence[int], **allocation) -> list[int]:
    """The bit-widths of ``bits`` that ``sens`` lacks and an optimal plan under ``budget`` might use: those the
    plan uses when every unprofiled width costs 0 for every unit (``allocation``: plan_from_sensitivity's
    keywords).

    Aggregated costs are never negative (the normalisation clips them; it scales by the lowest width, which must
    be profiled), so 0 bounds every unprofiled cost from below.  If the plan under that bound uses none of the
    unprofiled widths, its cost is the same under the true costs and no plan can cost less under them: it is an
    optimal plan over all of ``bits``, and those widths need no probes.  Otherwise the widths it uses are
    returned (probe them, and ask again)."""
    sens = schemas.sensitivity(sens)
    missing = sorted({int(b) for b in bits} - set(sens.bits))
    if not missing:
        return []
    if min(bits) not in sens.bits:
        raise TasaError(f"the lowest candidate bit-width ({min(bits)}) must be profiled: it scales the costs")
    zero = {"cost": [0.0] * len(sens.units)}  # allocation reads the costs only
    bound = dataclasses.replace(sens, bits=sorted([*sens.bits, *missing]),
                                costs={o: {**per, **{str(b): zero for b in missing}} for o, per in sens.costs.items()})
    _, summary = plan_from_sensitivity(bound, budget, bits=sorted(bits), **allocation)
    return sorted({b for b in summary["module_bits"].values() if b in missing})
