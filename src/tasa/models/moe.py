"""Mixture-of-experts layers as plain linears: every routed expert an ``nn.Linear`` tasa quantizes.

transformers 5 stores the routed experts of a layer (Mixtral, Qwen2/3-MoE, OLMoE ...) as two fused 3-D
parameters of one module: ``gate_up_proj`` (experts, 2 x intermediate, hidden) and ``down_proj`` (experts,
hidden, intermediate), called as ``experts(hidden, top_k_index, top_k_weights)``.  A layer walker that
looks for ``nn.Linear`` would leave them in full precision.  :func:`unfuse_experts` replaces each such
module by :class:`RoutedExperts`, a list of per-expert MLPs (``{e}.gate_proj``, ``{e}.up_proj``,
``{e}.down_proj``) with the same call and the same computation (equal up to float rounding: gate and up
are two matmuls instead of one), so that

- every expert is a linear the walker finds, and its Hessian hooks see exactly the tokens routed to it;
- the router (``gate``: a parameter of experts x hidden, not an ``nn.Linear``) stays in full precision;
- names are those of the per-expert checkpoints on the hub (Qwen's ``mlp.experts.{e}.gate_proj``).

Checkpoints name tensors in their own layout (Mixtral's ``block_sparse_moe.experts.{e}.w1``);
:func:`checkpoint_names` asks transformers' own conversion table (the one ``save_pretrained`` reverts
with) which checkpoint key holds each of the model's tensors, so that streamed weights are read, and
exported checkpoints written, in the layout engines and transformers load.
"""
from __future__ import annotations

import logging

import torch
import torch.nn as nn

from tasa.errors import TasaError
from tasa.plan import ROLES

log = logging.getLogger(__name__)

FUSED = ("gate_up_proj", "down_proj")


class ExpertMLP(nn.Module):
    """One routed expert: down(act(gate(x)) * up(x))."""

    def __init__(self, hidden: int, intermediate: int, act_fn, dtype: torch.dtype, device):
        super().__init__()
        kw = {"bias": False, "dtype": dtype, "device": device}
        self.gate_proj = nn.Linear(hidden, intermediate, **kw)
        self.up_proj = nn.Linear(hidden, intermediate, **kw)
        self.down_proj = nn.Linear(intermediate, hidden, **kw)
        self.act_fn = act_fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class RoutedExperts(nn.ModuleList):
    """The routed experts of one layer, one :class:`ExpertMLP` each; called like transformers' fused experts
    (hidden (tokens, hidden), top_k_index and top_k_weights (tokens, k)) and computing what they compute, in the
    same order (an expert index equal to the number of experts is a masked slot and is skipped)."""

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
                ) -> torch.Tensor:
        out = torch.zeros_like(hidden_states)
        with torch.no_grad():
            mask = nn.functional.one_hot(top_k_index, num_classes=len(self) + 1).permute(2, 1, 0)
            hit = torch.greater(mask.sum(dim=(-1, -2)), 0).nonzero()
        for e in hit[:, 0].tolist():
            if e == len(self):
                continue
            pos, tokens = torch.where(mask[e])
            y = self[e](hidden_states[tokens]) * top_k_weights[tokens, pos, None]
            out.index_add_(0, tokens, y.to(out.dtype))
        return out


def is_fused(module: nn.Module) -> bool:
    """Whether ``module`` holds transformers-5 fused experts (3-D ``gate_up_proj`` and ``down_proj``)."""
    return all(isinstance(module._parameters.get(n), torch.Tensor) and module._parameters[n].dim() == 3
               for n in FUSED)


def _check_layout(name: str, module: nn.Module) -> tuple[int, int, int]:
    """(experts, hidden, intermediate) of a fused-experts module in the plain layout; anything else is refused."""
    gate_up, down = module.gate_up_proj, module.down_proj
    e, two_i, h = gate_up.shape
    odd = [f for f in ("has_bias", "is_transposed", "has_post_expert_norm") if getattr(module, f, False)]
    if getattr(module, "is_concatenated", True) is False:
        odd.append("is_concatenated=False")
    extra = [n for n, p in module.named_parameters() if n not in FUSED]
    if odd or extra or two_i % 2 or tuple(down.shape) != (e, h, two_i // 2) or not hasattr(module, "act_fn"):
        raise TasaError(f"{name} ({type(module).__name__}): fused experts in a layout tasa does not unfuse "
                        f"(gate_up_proj {tuple(gate_up.shape)}, down_proj {tuple(down.shape)}"
                        f"{', ' + ', '.join(odd + extra) if odd or extra else ''}); refusing to leave them in full "
                        "precision")
    return e, h, two_i // 2


def checkpoint_names(model: nn.Module, fused: dict[str, nn.Module]) -> dict[str, str]:
    """{model tensor key after unfusing: checkpoint key} where the two differ, from transformers' own conversion
    table for the model (what ``save_pretrained`` writes and ``from_pretrained`` reads).

    Asked by reverting a stand-in state dict: every tensor of the model is replaced by integer codes, one per
    tensor tasa will hold (a fused expert tensor by a small (experts, parts, 1) grid of codes, one per expert
    and part), and each checkpoint key transformers produces carries the code of the tensor it holds."""
    try:
        from transformers.core_model_loading import revert_weight_conversion
    except ImportError:  # a transformers without conversion tables keeps the model's own names
        return {}
    keys: list[str] = []
    state: dict[str, torch.Tensor] = {}

    def codes(names: list[str], shape: tuple[int, ...]) -> torch.Tensor:
        start = len(keys)
        keys.extend(names)
        return torch.arange(start, len(keys), dtype=torch.int64).reshape(shape)

    fused_keys = {f"{f}.{p}" for f in fused for p in FUSED}
    for key, _ in list(model.named_parameters()) + list(model.named_buffers()):
        if key not in fused_keys:
            state[key] = codes([key], (1,))
    for name, module in fused.items():
        e = module.gate_up_proj.shape[0]
        state[f"{name}.gate_up_proj"] = codes([f"{name}.{i}.{r}.weight" for i in range(e) for r in ROLES[:2]],
                                              (e, 2, 1))
        state[f"{name}.down_proj"] = codes([f"{name}.{i}.down_proj.weight" for i in range(e)], (e, 1, 1))
    try:
        reverted = revert_weight_conversion(model, state)
    except Exception as e:  # noqa: BLE001 - a conversion tasa cannot follow
        raise TasaError(f"{type(model).__name__}: could not map its tensors to checkpoint names ({e})") from None
    names: dict[str, str] = {}
    for ckpt_key, value in reverted.items():
        if value.numel() != 1:
            raise TasaError(f"{type(model).__name__}: {ckpt_key} would hold several of the model's tensors "
                            f"({tuple(value.shape)}); a checkpoint layout tasa cannot map")
        names[keys[int(value.flatten()[0])]] = ckpt_key
    missing = [k for k in keys if k not in names]
    if missing:
        raise TasaError(f"{type(model).__name__}: no checkpoint name for {missing[0]}")
    return {k: v for k, v in names.items() if k != v}


def unfuse_experts(model: nn.Module) -> dict[str, str]:
    """Replace every fused-experts module of ``model`` by :class:`RoutedExperts` (in place; weights copied expert by
    expert and the fused tensors dropped layer by layer, so no second copy of the model is held; on the meta
    device nothing is allocated).  Returns :func:`checkpoint_names` (also kept as ``model.tasa_checkpoint_names``);
    a model without fused experts is left as it is (its checkpoint names are still recorded)."""
    fused = {name: m for name, m in model.named_modules() if is_fused(m)}
    if not fused and hasattr(model, "tasa_checkpoint_names"):
        return model.tasa_checkpoint_names
    layouts = {name: _check_layout(name, m) for name, m in fused.items()}
    names = checkpoint_names(model, fused)
    for name in list(fused):  # popped, so that each fused module is freed once replaced
        module = fused.pop(name)
        e, h, i = layouts[name]
        gate_up, down = module.gate_up_proj, module.down_proj
        experts = RoutedExperts([ExpertMLP(h, i, module.act_fn, gate_up.dtype, gate_up.device) for _ in range(e)])
        if gate_up.device.type != "meta":
            with torch.no_grad():
                for x, expert in enumerate(experts):
                    expert.gate_proj.weight.copy_(gate_up[x, :i])
                    expert.up_proj.weight.copy_(gate_up[x, i:])
                    expert.down_proj.weight.copy_(down[x])
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, attr, experts)
        del gate_up, down, module
    if fused:
        log.info("unfused the routed experts of %d layer(s) into per-expert linears", len(fused))
    model.tasa_checkpoint_names = names
    return names


def model_names(model: nn.Module) -> dict[str, str]:
    """{checkpoint key: model tensor key} for the keys the model's conversion table renames."""
    return {v: k for k, v in getattr(model, "tasa_checkpoint_names", {}).items()}


def is_router(local: str) -> bool:
    """Whether a linear's name is that of a router gate (``gate``, ``router``, ``*_gate``: Mixtral's and
    DeepSeek's routers, Qwen2-MoE's shared-expert gate): those stay in full precision."""
    leaf = local.rsplit(".", 1)[-1]
    return leaf in ("gate", "router") or leaf.endswith("_gate")
