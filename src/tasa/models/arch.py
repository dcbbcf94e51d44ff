"""Architecture walker: find decoder layers, their linear modules and fusion groups.

No per-model drivers.  A small declarative :class:`ArchSpec` per model family
names where the decoder layers live, which linears they hold (in execution
order) and which of them inference engines fuse (and so require to share a
bit-width).  Any other model goes through :func:`discover_spec`, which finds
the decoder-layer list and the ``nn.Linear`` modules in it, and infers fusion
groups from the usual projection names.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from tasa.errors import TasaError
from tasa.models.moe import RoutedExperts, is_router, unfuse_experts
from tasa.models.placement import placement_of
from tasa.plan import expert_container
from tasa.models.streaming import streamer_of

_ATTN_QKV = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
_MLP_GATE_UP = ("mlp.gate_proj", "mlp.up_proj")
_LLAMA_LIKE = _ATTN_QKV + ("self_attn.o_proj",) + _MLP_GATE_UP + ("mlp.down_proj",)


@dataclass(frozen=True)
class ArchSpec:
    """Where the decoder layers are and what is inside each of them.

    layers_path:   dotted attribute path of the ``nn.ModuleList`` of decoder layers.
    linears:       names of the quantizable linear modules, relative to a layer.
    fusion_groups: tuples of linear names that engines fuse into one matmul.

    Router gates (``gate``, ``router``, ``*_gate`` linears of mixture-of-experts layers) are never quantized.
    """

    layers_path: str
    linears: tuple[str, ...]
    fusion_groups: tuple[tuple[str, ...], ...] = ()


_LLAMA_SPEC = ArchSpec("model.layers", _LLAMA_LIKE, (_ATTN_QKV, _MLP_GATE_UP))

SPECS: dict[str, ArchSpec] = {
    "llama": _LLAMA_SPEC,
    "mistral": _LLAMA_SPEC,
    "qwen2": _LLAMA_SPEC,
    "qwen3": _LLAMA_SPEC,
    "gemma": _LLAMA_SPEC,
    "gemma2": _LLAMA_SPEC,
    # phi3 already fuses q/k/v and gate/up into single linears.
    "phi3": ArchSpec("model.layers", ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj")),
}

# Name patterns engines fuse, used for architectures without a spec.
_FUSION_PATTERNS = (
    ("q_proj", "k_proj", "v_proj"),
    ("gate_proj", "up_proj"),
    ("w1", "w3"),
)


@dataclass(frozen=True)
class LayerModule:
    """One quantizable linear: its full module name, layer index and name within the layer."""

    name: str
    layer: int
    local: str
    in_features: int
    out_features: int

    @property
    def numel(self) -> int:
        return self.in_features * self.out_features


@dataclass
class ModelArch:
    """An ArchSpec resolved against a model instance."""

    model_type: str
    spec: ArchSpec
    layers: nn.ModuleList
    modules: list[LayerModule]
    source: str  # "spec" or "discovered"
    streamer: object | None = None  # tasa.models.streaming.Streamer of a streamed model, else None
    tie_experts: bool = True  # the routed experts of a layer share one bit-width (a fusion group each)
    placement: object | None = None  # tasa.models.placement.Placement of a model spread over several devices

    def layer_device(self, index: int, device: torch.device) -> torch.device:
        """Where decoder layer ``index`` computes: its placed device, else ``device`` (the one compute device)."""
        return self.placement.layers[index] if self.placement is not None else device

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def layer_modules(self, index: int) -> list[LayerModule]:
        return [m for m in self.modules if m.layer == index]

    def expert_groups(self, index: int) -> list[tuple[str, ...]]:
        """Local names of the routed-expert linears of layer ``index``, one tuple per expert list (mixture-of-
        experts layers; empty for dense ones)."""
        by_container: dict[str, list[str]] = {}
        for m in self.layer_modules(index):
            container = expert_container(m.local)
            if container is not None:
                by_container.setdefault(container, []).append(m.local)
        return [tuple(v) for v in by_container.values()]

    @property
    def is_moe(self) -> bool:
        return any(expert_container(m.local) is not None for m in self.modules)

    def fusion_groups(self) -> list[tuple[str, ...]]:
        """Groups of linears that must share one bit-width, as full module names, for every layer: what engines
        fuse (q/k/v, gate/up) and, with ``tie_experts``, all routed experts of a layer (overlapping groups
        merged into one)."""
        out = []
        for i in range(self.num_layers):
            present = {m.local for m in self.layer_modules(i)}
            groups = [g for g in self.spec.fusion_groups if all(n in present for n in g)]
            if self.tie_experts:
                groups += self.expert_groups(i)
            prefix = f"{self.spec.layers_path}.{i}."
            out.extend(tuple(prefix + n for n in g) for g in _merge(groups))
        return out

    def numels(self) -> dict[str, int]:
        return {m.name: m.numel for m in self.modules}


def _get_path(root: nn.Module, path: str) -> nn.Module | None:
    obj = root
    for part in path.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def _find_layer_list(model: nn.Module) -> str | None:
    """Dotted path of the longest ModuleList of same-class blocks that contain nn.Linear."""
    best, best_len = None, 0
    for name, mod in model.named_modules():
        if not isinstance(mod, nn.ModuleList) or isinstance(mod, RoutedExperts) or len(mod) == 0:
            continue
        classes = {type(child) for child in mod}
        if len(classes) != 1:
            continue
        if not any(isinstance(m, nn.Linear) for m in mod[0].modules()):
            continue
        if len(mod) > best_len:
            best, best_len = name, len(mod)
    return best


def _merge(groups: list[tuple[str, ...]]) -> list[tuple[str, ...]]:
    """Groups sharing a member merged into one (members in first-seen order)."""
    merged: list[list[str]] = []
    for g in groups:
        hits = [m for m in merged if set(m) & set(g)]
        target = hits[0] if hits else []
        if not hits:
            merged.append(target)
        for other in hits[1:]:
            target.extend(n for n in other if n not in target)
            merged.remove(other)
        target.extend(n for n in g if n not in target)
    return [tuple(m) for m in merged]


def _linears(layer: nn.Module) -> tuple[str, ...]:
    """Local names of a layer's quantizable linears: every ``nn.Linear`` but router gates."""
    return tuple(n for n, m in layer.named_modules() if isinstance(m, nn.Linear) and not is_router(n))


def _pattern_groups(linears: tuple[str, ...]) -> list[tuple[str, ...]]:
    groups = []
    for pattern in _FUSION_PATTERNS:
        by_parent: dict[str, list[str]] = {}
        for n in linears:
            parent, _, leaf = n.rpartition(".")
            if leaf in pattern:
                by_parent.setdefault(parent, []).append(n)
        groups.extend(tuple(g) for g in by_parent.values() if len(g) == len(pattern))
    return groups


def discover_spec(model: nn.Module) -> ArchSpec:
    """Infer an ArchSpec for an architecture tasa has no declarative spec for: the linears (router gates
    excepted) and fusion groups of every decoder layer (layers may differ: dense and expert layers)."""
    path = _find_layer_list(model)
    if path is None:
        kinds = sorted({type(m).__name__ for m in model.modules() if isinstance(m, nn.ModuleList)})
        raise TasaError(
            f"could not find decoder layers in {type(model).__name__}: no nn.ModuleList of identical blocks "
            f"containing nn.Linear modules (module lists seen: {kinds or 'none'})"
        )
    linears: list[str] = []
    for layer in _get_path(model, path):
        linears.extend(n for n in _linears(layer) if n not in linears)
    return ArchSpec(path, tuple(linears), tuple(_pattern_groups(tuple(linears))))


UNCOVERED_SHARE = 1 / 32  # a weight holding this share of its layer's parameters must be quantized


def _check_coverage(model_type: str, spec: ArchSpec, layers: nn.ModuleList) -> None:
    """Refuse a layout whose decoder layers hold a large weight matrix that is not one of the quantized linears
    (e.g. mixture-of-experts blocks storing every expert in one 3-D parameter): it would otherwise stay in full
    precision unnoticed.  Small matrices (routers of experts: experts x hidden) stay in full precision."""
    covered = {f"{local}.weight" for local in spec.linears}
    for i, layer in enumerate(layers):
        total = sum(p.numel() for p in layer.parameters())
        for name, p in layer.named_parameters():
            if p.dim() >= 2 and name not in covered and p.numel() >= UNCOVERED_SHARE * total:
                raise TasaError(f"{model_type}: {spec.layers_path}.{i}.{name} {tuple(p.shape)} holds "
                                f"{p.numel() / total:.0%} of a decoder layer's weights but is not an nn.Linear tasa "
                                "quantizes; refusing to leave it in full precision")


def resolve(model: nn.Module) -> ModelArch:
    """Resolve the model's decoder layers and quantizable linears.

    Raises TasaError naming what was not found when the layout does not match.
    """
    unfuse_experts(model)
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None) or type(model).__name__
    spec = SPECS.get(model_type)
    source = "spec"
    if spec is None:
        spec = discover_spec(model)
        source = "discovered"
    layers = _get_path(model, spec.layers_path)
    if not isinstance(layers, nn.ModuleList):
        raise TasaError(f"{model_type}: decoder layers not found at '{spec.layers_path}'")
    modules = []
    for i, layer in enumerate(layers):
        own = set(_linears(layer)) if source == "discovered" else None
        for local in spec.linears:
            if own is not None and local not in own:
                continue  # a discovered layout whose layers differ (dense and expert layers)
            mod = _get_path(layer, local)
            if not isinstance(mod, nn.Linear):
                raise TasaError(
                    f"{model_type}: layer {i} has no nn.Linear '{local}' "
                    f"(found {type(mod).__name__ if mod is not None else 'nothing'})"
                )
            modules.append(LayerModule(f"{spec.layers_path}.{i}.{local}", i, local, mod.in_features, mod.out_features))
    if not modules:
        raise TasaError(f"{model_type}: decoder layers at '{spec.layers_path}' contain no nn.Linear modules")
    _check_coverage(model_type, spec, layers)
    return ModelArch(model_type, spec, layers, modules, source, streamer_of(model),
                     placement=placement_of(model))
