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
| ``llama.cpp`` | gguf | 2, 3, 4, 5, 6, 8 | its GGML types' grids: one symmetric per bit-width but 2, one asymmetric at 2, 4, 5 | free; a layer's experts of one projection tied |

- ``gptqmodel``: with mixed bit-widths GPTQModel runs every module on its plain
  Torch kernel (``BACKEND.TORCH``), since its fast kernels take one bit-width per model.
- ``vllm``: vLLM's compressed-tensors path takes a scheme per module (its
  weight-only kernels serve 2 to 8 bits; asymmetric zero points at 4 and 8 bits
  only); ``vllm-gptq`` and ``sglang``: their GPTQ paths serve symmetric 4- and
  8-bit weights.  vLLM and SGLang fuse q/k/v and gate/up into one matmul each (and
  a layer's routed experts into one fused MoE), so the members of a fusion group
  share one grid; their group sizes are -1, 32, 64 or 128.
- ``compressed-tensors``: the format's own limits, for other loaders.
- ``llama.cpp``: a GGML type per tensor (a layer's routed experts of one projection are one 3-D tensor, so they
  share one type: ``--tie-experts``, the default, ties them); tasa quantizes each bit-width on the grid of one type, so the GGUF holds
  its codes exactly (:data:`LLAMA_CPP_GRIDS`: Q3_K, Q4_0, Q5_0, Q6_K, Q8_0; asymmetric, for a plan made with
  ``--asym``, :data:`LLAMA_CPP_ASYM_GRIDS`: Q2_K, Q4_K, Q5_K, the other bit-widths of such a plan on the
  symmetric types).  The K types work on 256-column super-blocks, so they need input widths that are multiples of
  256 (checked where the widths are known).

:func:`target_for` maps a target and an export format to the rules that apply (``vllm`` asked for a GPTQ
checkpoint is ``vllm-gptq``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

from tasa.config import QuantSpec
from tasa.errors import TasaError
from tasa.plan import expert_container


# llama.cpp's types that hold a tasa grid exactly: bits -> (grid, GGML type, bits per weight with block scales)
LLAMA_CPP_GRIDS: dict[int, tuple[QuantSpec, str, float]] = {
    3: (QuantSpec(bits=3, group_size=16, super_group=256, scale_bits=6), "Q3_K", 3.4375),
    4: (QuantSpec(bits=4, group_size=32), "Q4_0", 4.5),
    5: (QuantSpec(bits=5, group_size=32), "Q5_0", 5.5),
    6: (QuantSpec(bits=6, group_size=16, super_group=256, scale_bits=8), "Q6_K", 6.5625),
    8: (QuantSpec(bits=8, group_size=32), "Q8_0", 8.5),
}
# ... and the asymmetric ones (scale * code - min; 16 or 32-column groups, unsigned 4-/6-bit scales and mins, fp16
# super-scale and super-min per 256 columns)
LLAMA_CPP_ASYM_GRIDS: dict[int, tuple[QuantSpec, str, float]] = {
    2: (QuantSpec(bits=2, group_size=16, sym=False, super_group=256, scale_bits=4), "Q2_K", 2.625),
    4: (QuantSpec(bits=4, group_size=32, sym=False, super_group=256, scale_bits=6), "Q4_K", 4.5),
    5: (QuantSpec(bits=5, group_size=32, sym=False, super_group=256, scale_bits=6), "Q5_K", 5.5),
}


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
    grids: Mapping[int, QuantSpec] | None = None  # the one (symmetric) grid served at each bit-width (None: any)
    bits_per_weight: Mapping[int, float] | None = None  # storage per weight, scales included (None: by the grid)
    asym_grids: Mapping[int, QuantSpec] | None = None  # with ``grids``: the asymmetric grid served at a bit-width
    stacked_experts: bool = False  # a layer's routed experts of one projection are one tensor: one grid

    def grid(self, bits: int, sym: bool = True, width: int | None = None) -> QuantSpec | None:
        """The one grid this target serves ``bits``-bit weights of ``width`` input features on (None: any width):
        asymmetric where asked, served and fitting the width, else the symmetric one; None where any grid is
        served, or none is."""
        if self.grids is None:
            return None
        asym = None if sym or self.asym_grids is None else self.asym_grids.get(bits)
        if asym is not None and (width is None or asym.fits_width(width) or bits not in self.grids):
            return asym
        return self.grids.get(bits)

    def fits(self, bits: int, in_features: Sequence[int] | None, sym: bool = True) -> bool:
        """Whether ``bits``-bit weights of modules with these input widths are servable (unknown widths: yes)."""
        if self.grids is None:
            return True
        if not in_features:
            return self.grid(bits, sym) is not None
        return all((g := self.grid(bits, sym, w)) is not None and g.fits_width(w) for w in in_features)

    def spec(self, bits: int, group_size: int, sym: bool = True, width: int | None = None) -> QuantSpec:
        """The grid a plan for this target quantizes ``bits``-bit modules of ``width`` inputs on."""
        if self.grids is None:
            return QuantSpec(bits=bits, group_size=group_size, sym=sym)
        grid = self.grid(bits, sym, width)
        if grid is None:
            raise TasaError(f"{self.name} serves {bits}-bit weights only on an asymmetric grid (--asym)")
        return grid


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
    "llama.cpp": Target("llama.cpp", tuple(sorted({*LLAMA_CPP_GRIDS, *LLAMA_CPP_ASYM_GRIDS})), False, False, None,
                        "llama.cpp: a GGUF with a GGML type per tensor (" + ", ".join(
                            f"{b}-bit {t}" for b, (_, t, _) in LLAMA_CPP_GRIDS.items()) + "; asymmetric: " + ", ".join(
                            f"{b}-bit {t}" for b, (_, t, _) in LLAMA_CPP_ASYM_GRIDS.items()) + ")", "gguf",
                        asym_bits=tuple(LLAMA_CPP_ASYM_GRIDS),
                        grids={b: g for b, (g, _, _) in LLAMA_CPP_GRIDS.items()},
                        bits_per_weight={b: bpw for table in (LLAMA_CPP_ASYM_GRIDS, LLAMA_CPP_GRIDS)
                                         for b, (_, _, bpw) in table.items()},
                        asym_grids={b: g for b, (g, _, _) in LLAMA_CPP_ASYM_GRIDS.items()}, stacked_experts=True),
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


def violations(modules: Mapping[str, QuantSpec], target: Target, fusion_groups: Sequence[Sequence[str]],
               widths: Mapping[str, int] | None = None) -> list[str]:
    """Every way the per-module specs break the target's rules, one line each (empty: servable); ``widths``
    (module: input features), where known, checks super-group grids."""
    out = []
    for name, s in modules.items():
        grid = target.grid(s.bits, s.sym)
        # act-order with static groups stores the grid in column order (no g_idx): the same layout as without
        if grid is not None and (s.group_size, s.super_group, s.scale_bits if s.super_group else None,
                                 s.sym, s.act_order and not s.static_groups) != (
                grid.group_size, grid.super_group, grid.scale_bits if grid.super_group else None, grid.sym, False):
            out.append(f"{name}: {s.bits}-bit {'' if s.sym else 'asymmetric '}grid with groups of {s.group_size}"
                       f"{f' in super-groups of {s.super_group}' if s.super_group else ''}, but {target.name} serves "
                       f"{s.bits} bits only on the grid {_grid_text(grid)} (allocate with --target {target.name})")
        elif grid is None and target.grids is not None and s.bits in target.bits and s.sym:
            out.append(f"{name}: symmetric {s.bits}-bit grid, but {target.name} serves {s.bits} bits only on an "
                       "asymmetric grid (--asym)")
        if widths is not None and name in widths and not s.fits_width(widths[name]):
            out.append(f"{name}: {widths[name]} input features, but its {s.bits}-bit grid needs a multiple of "
                       f"{s.super_group}")
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
    if target.stacked_experts:
        out += _mixed_expert_stacks(modules, target)
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


def _mixed_expert_stacks(modules: Mapping[str, QuantSpec], target: Target) -> list[str]:
    """One line per layer and projection whose routed experts (``...experts.{e}.{role}``) the plan puts on more
    than one grid."""
    stacks: dict[str, dict[str, QuantSpec]] = {}
    for name, s in modules.items():
        container = expert_container(name)
        if container is not None:
            stacks.setdefault(f"{container}.*.{name.rsplit('.', 1)[-1]}", {})[name] = s
    out = []
    for stack, members in sorted(stacks.items()):
        grids = sorted({(s.bits, s.sym) for s in members.values()})
        if len(grids) > 1:
            held = ", ".join(f"{b}-bit{'' if sym else ' asymmetric'}" for b, sym in grids)
            out.append(f"{stack}: routed experts on different grids ({held}), but {target.name} stores a layer's "
                       "experts of one projection as one tensor of one type (allocate with --tie-experts)")
    return out


def _grid_text(grid: QuantSpec) -> str:
    return (f"groups of {grid.group_size}" + (f" in super-groups of {grid.super_group} with {grid.scale_bits}-bit "
                                              "group scales" if grid.super_group else "")
            + (", symmetric" if grid.sym else ", asymmetric"))


def check_servable(modules: Mapping[str, QuantSpec], target: Target, fusion_groups: Sequence[Sequence[str]],
                   widths: Mapping[str, int] | None = None) -> None:
    bad = violations(modules, target, fusion_groups, widths)
    if bad:
        more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
        raise TasaError(f"plan not servable by {target.name}: {bad[0]}{more}")
