"""The `finemoe` experts implementation, registered through transformers' public ExpertsInterface.

transformers v5 MoE blocks call `experts(hidden_states, top_k_index, top_k_weights)`, and the
`@use_experts_implementation` decorator dispatches that call to the function registered under
`config._experts_implementation`. We register `finemoe` there: the function finds the layer's
offload executor (attached to the experts module as `finemoe_layer`) and hands it the call.

The math itself is transformers' own: the executor runs the implementation the unmodified model
would have used (`grouped_mm`, or `eager` where grouped_mm cannot dispatch) on a `SlotExperts`
view whose weights are the device slot pools and whose expert ids are slot ids. Same kernels,
same reduction order: outputs are identical to the unmodified model's.
"""
from __future__ import annotations

import torch
from torch import nn
from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

IMPLEMENTATION = "finemoe"


def finemoe_experts_forward(self: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                            top_k_weights: torch.Tensor) -> torch.Tensor:
    executor = getattr(self, "finemoe_layer", None)
    if executor is None:
        raise RuntimeError(f"{type(self).__name__} uses experts_implementation='{IMPLEMENTATION}' but no finemoe "
                           "engine is attached to it; build the model through finemoe.Engine")
    return executor(hidden_states, top_k_index, top_k_weights)


ALL_EXPERTS_FUNCTIONS.register(IMPLEMENTATION, finemoe_experts_forward)


class SlotExperts:
    """Duck-typed stand-in for an experts module: the module's attributes, but expert tensors are the
    slot pools [N, ...] and `num_experts` is N, so transformers' experts functions index slots."""

    def __init__(self, module: nn.Module, pools: dict[str, torch.Tensor]) -> None:
        object.__setattr__(self, "_module", module)
        object.__setattr__(self, "_pools", pools)
        object.__setattr__(self, "num_experts", next(iter(pools.values())).shape[0])
        object.__setattr__(self, "_is_expert_parallel", False)

    def __getattr__(self, name: str):
        pools = object.__getattribute__(self, "_pools")
        if name in pools:
            return pools[name]
        return getattr(object.__getattribute__(self, "_module"), name)


def eager_compute_fn(experts: nn.Module):
    """The experts module's own eager forward (transformers' per-expert loop), undecorated: the host CPU path
    of a missed expert runs it over a host view of the layer (engine/cpu_misses.py)."""
    original = type(experts).forward
    return getattr(original, "__wrapped__", original)


def reference_compute_fn(model: nn.Module, experts: nn.Module):
    """The experts function the unmodified model would run (resolved before we switch implementation)."""
    impl = model.get_correct_experts_implementation(None)
    eager = eager_compute_fn(experts)
    if impl == "eager":
        return impl, eager
    return impl, ALL_EXPERTS_FUNCTIONS.get_interface(impl, eager)


def activate(model: nn.Module, experts_modules: list[nn.Module]) -> None:
    """Switch the model to the finemoe implementation and assert it is the one every MoE layer will run.
    transformers falls back silently on some paths; we refuse to start instead."""
    model.set_experts_implementation(IMPLEMENTATION)
    if model.config._experts_implementation != IMPLEMENTATION:
        raise RuntimeError(f"transformers kept experts_implementation={model.config._experts_implementation!r}; "
                           f"finemoe needs {IMPLEMENTATION!r}")
    fn = ALL_EXPERTS_FUNCTIONS.get_interface(IMPLEMENTATION, None)
    if fn is not finemoe_experts_forward:
        raise RuntimeError("the finemoe experts implementation is not registered in transformers' ExpertsInterface")
    for m in experts_modules:
        impl = getattr(getattr(m, "config", None), "_experts_implementation", None)
        if impl != IMPLEMENTATION:
            raise RuntimeError(f"{type(m).__name__} would run experts_implementation={impl!r}, not {IMPLEMENTATION!r}")
