"""Architecture adapters: where each MoE family keeps its router and its routed experts.

transformers v5 gives every supported family the same shape: a decoder layer's `mlp`
holds a router (`gate` or `router`, whose forward returns `(logits, top_k_weights,
top_k_index)`) and an `experts` module decorated with `@use_experts_implementation`
(3-D weight tensors whose first dimension is the expert). So an adapter is a few facts,
not a copy of the model file.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from finemoe.errors import UnsupportedModelError


@dataclass(frozen=True)
class MoEFamily:
    """Facts about one architecture family. `router_attr` is the router's attribute on the MoE block;
    `shared_attr` (documentation only) names the always-resident shared expert, if any."""

    name: str
    model_types: tuple[str, ...]
    router_attr: str
    shared_attr: str | None = None


FAMILIES: tuple[MoEFamily, ...] = (
    MoEFamily("Qwen2-MoE (Qwen1.5-MoE)", ("qwen2_moe",), "gate", "shared_expert"),
    MoEFamily("Qwen3-MoE", ("qwen3_moe",), "gate"),
    MoEFamily("Mixtral", ("mixtral",), "gate"),
    MoEFamily("PhiMoE (Phi-3.5-MoE)", ("phimoe",), "router"),
    MoEFamily("OLMoE", ("olmoe",), "gate"),
    MoEFamily("DeepSeek-V2", ("deepseek_v2",), "gate", "shared_experts"),
    MoEFamily("GPT-OSS", ("gpt_oss",), "router"),
)
_BY_TYPE = {t: f for f in FAMILIES for t in f.model_types}


def supported_model_types() -> list[str]:
    return sorted(_BY_TYPE)


def family_for(config) -> MoEFamily:
    """The adapter for a transformers config, or an error naming the architecture and the supported ones."""
    model_type = getattr(config, "model_type", None)
    if model_type not in _BY_TYPE:
        arch = ", ".join(getattr(config, "architectures", None) or []) or "unknown"
        raise UnsupportedModelError(
            f"model type {model_type!r} (architectures: {arch}) is not supported by finemoe. "
            f"Supported model types: {', '.join(supported_model_types())}.")
    return _BY_TYPE[model_type]


@dataclass
class MoELayer:
    """One MoE layer. `index` counts MoE layers only (0..L-1); `decoder_index` is the transformer block."""

    index: int
    decoder_index: int
    router: nn.Module
    experts: nn.Module


@dataclass(frozen=True)
class ExpertGeometry:
    """Shape facts every policy and the cache need. Expert keys are flat: key = layer * num_experts + expert."""

    num_layers: int
    num_experts: int
    top_k: int
    expert_bytes: int                      # bytes of one routed expert (all its tensors)
    param_shapes: dict[str, tuple[int, ...]]  # per-expert shape of each expert tensor
    dtype: torch.dtype

    @property
    def total_experts(self) -> int:
        return self.num_layers * self.num_experts

    @property
    def total_bytes(self) -> int:
        return self.total_experts * self.expert_bytes

    @property
    def min_budget_bytes(self) -> int:
        return self.top_k * self.expert_bytes


def _decoder_layers(model: nn.Module) -> nn.ModuleList:
    base = getattr(model, "model", model)
    layers = getattr(base, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise UnsupportedModelError(f"{type(model).__name__} has no `model.layers`; finemoe cannot find its MoE blocks")
    return layers


def expert_tensor_names(experts: nn.Module) -> list[str]:
    """Names of the routed-expert tensors (3-D params/buffers plus their per-expert biases)."""
    n = experts.num_experts
    names = [k for k, p in experts.named_parameters(recurse=False) if p.dim() >= 2 and p.shape[0] == n]
    if not names:
        raise UnsupportedModelError(f"{type(experts).__name__} holds no per-expert weight tensors")
    return names


def find_moe_layers(model: nn.Module) -> list[MoELayer]:
    family = family_for(model.config)
    found: list[MoELayer] = []
    for i, layer in enumerate(_decoder_layers(model)):
        block = getattr(layer, "mlp", None)
        experts = getattr(block, "experts", None) if block is not None else None
        if experts is None:
            continue  # dense layer (e.g. DeepSeek-V2's first_k_dense_replace)
        router = getattr(block, family.router_attr, None)
        if router is None:
            raise UnsupportedModelError(f"{family.name}: layer {i} has experts but no `{family.router_attr}` router")
        found.append(MoELayer(len(found), i, router, experts))
    if not found:
        raise UnsupportedModelError(f"{type(model).__name__} has no MoE layers")
    return found


def geometry_of(model: nn.Module, layers: list[MoELayer]) -> ExpertGeometry:
    experts = layers[0].experts
    shapes: dict[str, tuple[int, ...]] = {}
    nbytes = 0
    dtype = None
    for name in expert_tensor_names(experts):
        t = getattr(experts, name)
        shapes[name] = tuple(t.shape[1:])
        nbytes += t[0].numel() * t.element_size()
        dtype = dtype or t.dtype
    top_k = int(model.config.num_experts_per_tok)
    return ExpertGeometry(len(layers), int(experts.num_experts), top_k, nbytes, shapes, dtype)
