"""Generic MoE discovery: where a model keeps its routed experts and their router, with no per-family adapter.

transformers v5 MoE models share one shape. Each decoder layer's MoE block holds an experts module whose class is
decorated with `@use_experts_implementation` (transformers.integrations.moe): its forward dispatches through
`ALL_EXPERTS_FUNCTIONS`, its weights are tensors whose first dimension is the expert, and it has `num_experts`.
Next to it, the block's router (attribute `gate` or `router`) maps hidden states [T, H] to
`(logits [T, J], top_k_weights [T, k], top_k_index [T, k])`. finemoe needs exactly these facts, so it finds them
by walking the module tree and checks each one by probing the router once on a zero input.

A model that breaks one of them cannot be offloaded and gets an UnsupportedModelError naming its architecture
and the broken fact (e.g. a router that needs more inputs than the hidden states, extra zero-compute experts,
per-expert weights held outside the experts module). No family is unusual enough today to need an adapter.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from finemoe.errors import UnsupportedModelError

ROUTER_NAMES = ("gate", "router")   # transformers v5's names for the router next to `experts`


@dataclass
class MoELayer:
    """One MoE layer. `index` counts MoE layers only (0..L-1); `decoder_index` is the transformer block;
    `path` is the experts module's qualified name in the model (the loader's device map keys on it)."""

    index: int
    decoder_index: int
    router: nn.Module
    experts: nn.Module
    path: str = ""
    top_k: int = 0


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


def architecture_of(config) -> str:
    """'model type 'x' (XForCausalLM)': how errors name a checkpoint's architecture."""
    arch = ", ".join(getattr(config, "architectures", None) or []) or "no architectures listed"
    return f"model type {getattr(config, 'model_type', None)!r} ({arch})"


def _unsupported(model: nn.Module, reason: str) -> UnsupportedModelError:
    return UnsupportedModelError(f"{architecture_of(model.config)} cannot be offloaded by finemoe: {reason}")


def is_experts_module(module: nn.Module) -> bool:
    """True for an instance of a class decorated with transformers' `@use_experts_implementation` (the decorator
    wraps `forward` and sets the layout flags the experts functions read)."""
    return hasattr(type(module).forward, "__wrapped__") and _decorated(module)


def _decorated(module: nn.Module) -> bool:
    """The layout flags `@use_experts_implementation`'s __init__ sets (transformers 5.17 and later)."""
    return all(hasattr(module, flag) for flag in ("has_gate", "is_transposed", "is_concatenated"))


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The model's decoder layers (`model.layers`), in order; refused in one line when it has none."""
    base = getattr(model, "model", model)
    layers = getattr(base, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise _unsupported(model, f"{type(model).__name__} has no `model.layers` list of decoder layers")
    return layers


def expert_tensor_names(experts: nn.Module) -> list[str]:
    """Names of the routed-expert tensors (3-D weights plus their per-expert biases)."""
    n = experts.num_experts
    names = [k for k, p in experts.named_parameters(recurse=False) if p.dim() >= 2 and p.shape[0] == n]
    if not names:
        raise UnsupportedModelError(f"{type(experts).__name__} holds no per-expert weight tensors")
    return names


def _check_experts(model: nn.Module, experts: nn.Module, where: str) -> None:
    """Every weight of the experts module must be one of its own per-expert tensors: the host store takes exactly
    those, and the slot pools stand in for exactly those."""
    n = getattr(experts, "num_experts", None)
    if not isinstance(n, int):
        raise _unsupported(model, f"{where}: {type(experts).__name__} has no integer `num_experts`")
    own = {k for k, p in experts.named_parameters(recurse=False) if p.dim() >= 2 and p.shape[0] == n}
    if not own:
        raise _unsupported(model, f"{where}: {type(experts).__name__} holds no per-expert weight tensors")
    for name, t in [*experts.named_parameters(), *experts.named_buffers()]:
        if name not in own:
            raise _unsupported(model, f"{where}: {type(experts).__name__} holds {name} {tuple(t.shape)}, which is not "
                                      "a per-expert tensor of the experts module itself")


def _router_of(model: nn.Module, block: nn.Module, where: str) -> nn.Module:
    for name in ROUTER_NAMES:
        router = getattr(block, name, None)
        if isinstance(router, nn.Module):
            return router
    raise _unsupported(model, f"{where}: {type(block).__name__} has experts but no router named "
                              f"{' or '.join(ROUTER_NAMES)}")


@torch.no_grad()
def _probe_top_k(model: nn.Module, router: nn.Module, num_experts: int, where: str) -> int:
    """Call the router on zero hidden states [2, H] (on its own device, meta included) and check the output
    contract: (logits [2, J], weights [2, k], index [2, k]). Returns k."""
    hidden_size = int(model.config.get_text_config().hidden_size)
    param = next(router.parameters(), None)
    device, dtype = (param.device, param.dtype) if param is not None else ("cpu", torch.float32)
    was_training = router.training
    router.eval()   # no training-time jitter: the probe draws no random numbers
    try:
        out = router(torch.zeros(2, hidden_size, device=device, dtype=dtype))
    except TypeError as e:
        why = " ".join(str(e).split())
        raise _unsupported(model, f"{where}: router {type(router).__name__} needs more than the hidden states "
                                  f"({why}); finemoe calls routers on hidden states alone") from None
    except (IndexError, RuntimeError) as e:   # e.g. a router that takes [batch, seq, H] and its own carried state
        why = " ".join(str(e).split())
        raise _unsupported(model, f"{where}: router {type(router).__name__} does not run on flat hidden states "
                                  f"[tokens, H] ({type(e).__name__}: {why}); finemoe calls routers on those "
                                  "alone") from None
    finally:
        router.train(was_training)
    if not (isinstance(out, tuple) and len(out) >= 3 and all(torch.is_tensor(o) for o in out[:3])):
        raise _unsupported(model, f"{where}: router {type(router).__name__} does not return "
                                  "(logits, top_k_weights, top_k_index)")
    logits, index = out[0], out[2]
    if not logits.is_floating_point() and index.is_floating_point():
        raise _unsupported(model, f"{where}: router {type(router).__name__} returns (top_k_index, top_k_weights, "
                                  "logits), this transformers release's order; finemoe reads (logits, top_k_weights, "
                                  "top_k_index), the order of newer releases: upgrade transformers")
    if tuple(logits.shape) != (2, num_experts):
        raise _unsupported(model, f"{where}: router {type(router).__name__} scores {logits.shape[-1]} choices for "
                                  f"{num_experts} routed experts (e.g. zero-compute experts)")
    return int(index.shape[-1])


def find_moe_layers(model: nn.Module) -> list[MoELayer]:
    """Every MoE layer of `model` in decoder order, each checked (see the module docstring); works on a meta
    skeleton too (the loader builds its device map from one before any weight is read)."""
    found: list[MoELayer] = []
    for i, layer in enumerate(decoder_layers(model)):
        modules = [(name, m) for name, m in layer.named_modules() if is_experts_module(m)]
        if not modules:
            continue  # dense layer (e.g. DeepSeek-V2's first_k_dense_replace)
        where = f"decoder layer {i}"
        if len(modules) > 1:
            raise _unsupported(model, f"{where} has {len(modules)} experts modules; finemoe expects one per layer")
        name, experts = modules[0]
        _check_experts(model, experts, where)
        block = layer.get_submodule(name.rpartition(".")[0]) if "." in name else layer
        router = _router_of(model, block, where)
        top_k = _probe_top_k(model, router, experts.num_experts, where)
        base = "model.layers" if getattr(model, "model", None) is not None else "layers"
        found.append(MoELayer(len(found), i, router, experts, f"{base}.{i}.{name}", top_k))
    if not found:
        overriding = {type(m).__name__ for m in model.modules() if _decorated(m)}
        if overriding:   # a subclass of a decorated class whose own forward does its math outside the interface
            raise _unsupported(model, f"{', '.join(sorted(overriding))} overrides the forward that "
                                      "@use_experts_implementation dispatches, so its experts run outside "
                                      "transformers' experts interface")
        raise _unsupported(model, "it has no MoE layer whose experts dispatch through transformers' experts "
                                  "interface (@use_experts_implementation)")
    return found


def geometry_of(model: nn.Module, layers: list[MoELayer]) -> ExpertGeometry:
    """The shared shape of every MoE layer; layers that differ (expert count, top-k, tensor shapes) are refused."""
    def shape_of(layer: MoELayer) -> tuple:
        tensors = [(n, tuple(getattr(layer.experts, n).shape)) for n in expert_tensor_names(layer.experts)]
        return layer.experts.num_experts, layer.top_k, tuple(tensors)

    first = shape_of(layers[0])
    for layer in layers[1:]:
        if shape_of(layer) != first:
            raise _unsupported(model, f"MoE layers differ in experts or top-k (decoder layer {layer.decoder_index} "
                                      f"vs {layers[0].decoder_index}); finemoe needs one expert shape")
    experts = layers[0].experts
    shapes: dict[str, tuple[int, ...]] = {}
    nbytes = 0
    dtype = None
    for name in expert_tensor_names(experts):
        t = getattr(experts, name)
        shapes[name] = tuple(t.shape[1:])
        nbytes += t[0].numel() * t.element_size()
        dtype = dtype or t.dtype
    return ExpertGeometry(len(layers), int(experts.num_experts), layers[0].top_k, nbytes, shapes, dtype)
