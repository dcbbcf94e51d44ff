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

import torch.nn as nn

from tasa.errors import TasaError
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

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def layer_modules(self, index: int) -> list[LayerModule]:
        return [m for m in self.modules if m.layer == index]

    def fusion_groups(self) -> list[tuple[str, ...]]:
        """Fusion groups as full module names, for every layer."""
        out = []
        for i in range(self.num_layers):
            prefix = f"{self.spec.layers_path}.{i}."
            out.extend(tuple(prefix + n for n in group) for group in self.spec.fusion_groups)
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
        if not isinstance(mod, nn.ModuleList) or len(mod) == 0:
            continue
        classes = {type(child) for child in mod}
        if len(classes) != 1:
            continue
        if not any(isinstance(m, nn.Linear) for m in mod[0].modules()):
            continue
        if len(mod) > best_len:
            best, best_len = name, len(mod)
    return best


def discover_spec(model: nn.Module) -> ArchSpec:
    """Infer an ArchSpec for an architecture tasa has no declarative spec for."""
    path = _find_layer_list(model)
    if path is None:
        kinds = sorted({type(m).__name__ for m in model.modules() if isinstance(m, nn.ModuleList)})
        raise TasaError(
            f"could not find decoder layers in {type(model).__name__}: no nn.ModuleList of identical blocks "
            f"containing nn.Linear modules (module lists seen: {kinds or 'none'})"
        )
    first = _get_path(model, path)[0]
    linears = tuple(n for n, m in first.named_modules() if isinstance(m, nn.Linear))
    groups = []
    for pattern in _FUSION_PATTERNS:
        by_parent: dict[str, list[str]] = {}
        for n in linears:
            parent, _, leaf = n.rpartition(".")
            if leaf in pattern:
                by_parent.setdefault(parent, []).append(n)
        groups.extend(tuple(g) for g in by_parent.values() if len(g) == len(pattern))
    return ArchSpec(path, linears, tuple(groups))


UNCOVERED_SHARE = 1 / 32  # a weight holding this share of its layer's parameters must be quantized


def _check_coverage(model_type: str, spec: ArchSpec, layers: nn.ModuleList) -> None:
    """Refuse a layout whose decoder layers hold a large weight matrix that is not one of the quantized linears
    (e.g. mixture-of-experts blocks storing every expert in one 3-D parameter): it would otherwise stay in full
    precision unnoticed.  Small matrices (routers of experts: experts x hidden) stay in full precision."""
    layer = layers[0]
    covered = {f"{local}.weight" for local in spec.linears}
    total = sum(p.numel() for p in layer.parameters())
    for name, p in layer.named_parameters():
        if p.dim() >= 2 and name not in covered and p.numel() >= UNCOVERED_SHARE * total:
            raise TasaError(f"{model_type}: {spec.layers_path}.0.{name} {tuple(p.shape)} holds "
                            f"{p.numel() / total:.0%} of a decoder layer's weights but is not an nn.Linear tasa "
                            "quantizes (fused expert weights are not supported yet); refusing to leave it in "
                            "full precision")


def resolve(model: nn.Module) -> ModelArch:
    """Resolve the model's decoder layers and quantizable linears.

    Raises TasaError naming what was not found when the layout does not match.
    """
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
        for local in spec.linears:
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
    return ModelArch(model_type, spec, layers, modules, source, streamer_of(model))
