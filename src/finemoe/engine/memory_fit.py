"""Device memory sizing: `--expert-budget auto`, and refusing a budget that does not fit, before any weight moves.

The device memory finemoe may use is what was free before it placed anything: `torch.cuda.mem_get_info` plus what
the model already holds on the device (a checkpoint's non-expert weights are placed by the loader), or
`EngineConfig.device_free_bytes` when given (tests inject it). Taken from it, in order:
  non-expert weights  every parameter and buffer outside the routed experts, in the serving dtype;
  KV cache            max_model_len x max_batch_size tokens for every attention layer (linear-attention layers keep
                      a small fixed state, not counted), times the static caches the fast path keeps
                      (engine/paths.py MAX_STATIC_SHAPES; one on the dynamic path);
  CUDA graphs         GRAPH_RESERVE_BYTES when decode steps are captured (a stated reserve, not a measurement);
  safety margin       MARGIN_FRACTION of the free figure plus MARGIN_BYTES, for activations and allocator slack.
What remains is the auto budget (capped at all expert bytes). Without a device figure (the CPU, nothing injected)
there is nothing to fit: auto means every expert, and explicit budgets are not checked.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from finemoe.config import EngineConfig, fmt_bytes, parse_budget
from finemoe.engine.paths import MAX_STATIC_SHAPES
from finemoe.errors import BudgetTooSmallError, ConfigError
from finemoe.models.adapters import ExpertGeometry, MoELayer

GRAPH_RESERVE_BYTES = 512 * 2**20
MARGIN_FRACTION = 0.05
MARGIN_BYTES = 256 * 2**20


@dataclass(frozen=True)
class MemoryPlan:
    """Where the device memory goes, in bytes; `for_experts` is what is left for the expert cache."""

    free: int
    non_expert: int
    kv: int
    graphs: int
    margin: int
    max_model_len: int
    batch: int
    kv_caches: int

    @property
    def for_experts(self) -> int:
        return self.free - self.non_expert - self.kv - self.graphs - self.margin

    def describe(self) -> str:
        return (f"{fmt_bytes(max(self.for_experts, 0))} = free {fmt_bytes(self.free)} - non-expert weights "
                f"{fmt_bytes(self.non_expert)} - KV cache {fmt_bytes(self.kv)} ({self.kv_caches} x max_model_len "
                f"{self.max_model_len} x batch {self.batch}) - CUDA graphs {fmt_bytes(self.graphs)} - margin "
                f"{fmt_bytes(self.margin)}")


def is_auto(budget) -> bool:
    return isinstance(budget, str) and budget.strip().lower() == "auto"


def kv_bytes_per_token(config, dtype: torch.dtype) -> int:
    """KV-cache bytes one token takes over all attention layers (keys and values, every key/value head)."""
    text = config.get_text_config()
    types = getattr(text, "layer_types", None) or ["full_attention"] * int(text.num_hidden_layers)
    attention_layers = sum(1 for t in types if "attention" in str(t) and "linear" not in str(t))
    if getattr(text, "kv_lora_rank", None):   # MLA: transformers caches the decompressed per-head keys and values
        heads, k_dim, v_dim = text.num_attention_heads, text.qk_nope_head_dim + text.qk_rope_head_dim, text.v_head_dim
    else:
        heads = getattr(text, "num_key_value_heads", None) or text.num_attention_heads
        k_dim = v_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    return attention_layers * int(heads) * int(k_dim + v_dim) * dtype.itemsize


def non_expert_bytes(model: nn.Module, layers: list[MoELayer], dtype: torch.dtype) -> int:
    """Bytes of every parameter and buffer outside the routed experts, floating ones in `dtype`."""
    experts = {id(t) for layer in layers for t in [*layer.experts.parameters(), *layer.experts.buffers()]}
    total = 0
    for t in [*model.parameters(), *model.buffers()]:
        if id(t) not in experts:
            total += t.numel() * (dtype.itemsize if t.is_floating_point() else t.element_size())
    return total


def _on_device(model: nn.Module, device: torch.device) -> int:
    return sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()]
               if t.device.type == device.type)


def plan(model: nn.Module, layers: list[MoELayer], cfg: EngineConfig, device: torch.device,
         max_model_len: int) -> MemoryPlan | None:
    """The device memory plan, or None where there is no device figure (CPU, nothing injected)."""
    if cfg.device_free_bytes is not None:
        free = int(cfg.device_free_bytes)
    elif device.type == "cuda":
        free = int(torch.cuda.mem_get_info(device)[0]) + _on_device(model, device)
    else:
        return None
    dtype = cfg.torch_dtype()
    caches = MAX_STATIC_SHAPES if cfg.fast_path else 1
    kv = kv_bytes_per_token(model.config, dtype) * max_model_len * cfg.max_batch_size * caches
    graphs = GRAPH_RESERVE_BYTES if cfg.cuda_graphs and device.type == "cuda" else 0
    return MemoryPlan(free, non_expert_bytes(model, layers, dtype), kv, graphs,
                      int(free * MARGIN_FRACTION) + MARGIN_BYTES, max_model_len, cfg.max_batch_size, caches)


@dataclass(frozen=True)
class BudgetChoice:
    """The budget the engine starts with, and the line that says how auto chose it (None when not auto)."""

    budget: int | str | float | None
    note: str | None = None


def resolve_budget(cfg: EngineConfig, geometry: ExpertGeometry, memory: MemoryPlan | None) -> BudgetChoice:
    """Auto becomes bytes (all experts where there is no device figure); an explicit budget is checked against the
    plan. A one-line error with the numbers when it cannot fit."""
    if is_auto(cfg.expert_budget) or (cfg.expert_budget is None and memory is not None):
        if memory is None:
            return BudgetChoice(geometry.total_bytes, "expert budget auto: no device memory to fit (CPU): all experts")
        left = memory.for_experts
        if left < geometry.min_budget_bytes:
            raise BudgetTooSmallError(
                f"expert budget auto: {memory.describe()}, but one layer's top-k needs "
                f"{fmt_bytes(geometry.min_budget_bytes)}: lower --max-model-len or --max-batch-size, "
                "or use a device with more free memory")
        budget = min(left, geometry.total_bytes)
        slots = budget // geometry.expert_bytes
        return BudgetChoice(budget, f"expert budget auto: {slots} of {geometry.total_experts} experts "
                                    f"({100 * slots / geometry.total_experts:.0f}%), {memory.describe()}")
    if memory is None or cfg.expert_budget is None:
        return BudgetChoice(cfg.expert_budget)
    wanted = min(parse_budget(cfg.expert_budget, geometry.total_bytes), geometry.total_bytes)
    wanted -= wanted % geometry.expert_bytes
    if wanted > memory.for_experts:
        raise ConfigError(f"expert budget {cfg.expert_budget} ({fmt_bytes(wanted)} of slots) does not fit: "
                          f"{memory.describe()}: pass --expert-budget auto or {fmt_bytes(max(memory.for_experts, 0))}"
                          " or less, or lower --max-model-len or --max-batch-size")
    return BudgetChoice(cfg.expert_budget)
