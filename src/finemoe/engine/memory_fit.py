"""Device memory sizing: `--expert-budget auto`, and refusing a budget that does not fit, before any weight moves.

One `MemoryPlan` per device of `--devices` (one device without it). The device memory finemoe may use is what was
free before it placed anything: `torch.cuda.mem_get_info` plus what the model already holds on that device (a
checkpoint's non-expert weights are placed by the loader), or `EngineConfig.device_free_bytes` when given (tests
inject it: one figure for every device, or one per device). Taken from it, in order, on each device:
  non-expert weights  every parameter and buffer outside the routed experts, in the serving dtype, of the decoder
                      layers the device holds (experts/placement.py `layer_devices`: all of them on the first under
                      `primary`, its own range under `split`); the embeddings, final norm and head on the first;
  KV cache            max_model_len x max_batch_size tokens for every attention layer the device holds (linear-
                      attention layers keep a small fixed state, not counted), times the static caches the fast
                      path keeps (engine/paths.py MAX_STATIC_SHAPES; one on the dynamic path);
  CUDA graphs         GRAPH_RESERVE_BYTES on the first device when decode steps are captured (a stated reserve, not
                      a measurement; never under `split`, which decodes eagerly: engine/paths.py);
  staging slots       with several devices, one layer's experts on each device that computes MoE layers
                      (experts/multi_device.py's peer-copy landing slots); with --expert-transfer packed, the
                      packed copies' staging buffers (experts/packed_transport.py STAGING, each at most an expert);
  safety margin       MARGIN_FRACTION of the free figure plus MARGIN_BYTES, for activations and allocator slack.
A device that holds no layer (the others under `primary`) reserves only the margin. `tightest` combines the plans of
several placements (`--non-expert-placement auto` plans for both): on each device the one that leaves the least, so
whichever is chosen fits. What remains on each device is its room for expert slots; auto takes it all (capped at
every expert once, the last devices giving slots up first, experts/placement.py `capped`), an explicit budget (per
device) must fit every device's room. Without a device figure (the CPU, nothing injected) there is nothing to fit:
auto means every expert, and explicit budgets are not checked.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from finemoe.experts.packed_transport import STAGING as PACKED_STAGING
from torch import nn

from finemoe.config import EngineConfig, fmt_bytes, parse_budget
from finemoe.engine.paths import MAX_STATIC_SHAPES
from finemoe.errors import BudgetTooSmallError, ConfigError
from finemoe.experts.placement import capped
from finemoe.models.adapters import ExpertGeometry, MoELayer, decoder_layers

GRAPH_RESERVE_BYTES = 512 * 2**20
MARGIN_FRACTION = 0.05
MARGIN_BYTES = 256 * 2**20


@dataclass(frozen=True)
class MemoryPlan:
    """Where one device's memory goes, in bytes; `for_experts` is what is left for its expert slots."""

    device: str
    free: int
    non_expert: int
    kv: int
    graphs: int
    staging: int
    margin: int
    max_model_len: int
    batch: int
    kv_caches: int

    @property
    def for_experts(self) -> int:
        return self.free - self.non_expert - self.kv - self.graphs - self.staging - self.margin

    def describe(self) -> str:
        left = f"{fmt_bytes(max(self.for_experts, 0))} = free {fmt_bytes(self.free)}"
        if not (self.non_expert or self.kv or self.graphs or self.staging):
            return f"{left} - margin {fmt_bytes(self.margin)}"
        staging = f" - staging slots {fmt_bytes(self.staging)}" if self.staging else ""
        return (f"{left} - non-expert weights {fmt_bytes(self.non_expert)} - KV cache {fmt_bytes(self.kv)} "
                f"({self.kv_caches} x max_model_len {self.max_model_len} x batch {self.batch}) - CUDA graphs "
                f"{fmt_bytes(self.graphs)}{staging} - margin {fmt_bytes(self.margin)}")


def describe_all(plans: list[MemoryPlan]) -> str:
    """One device: its plan; several: each device's, named."""
    if len(plans) == 1:
        return plans[0].describe()
    return "; ".join(f"{p.device}: {p.describe()}" for p in plans)


def is_auto(budget) -> bool:
    return isinstance(budget, str) and budget.strip().lower() == "auto"


def kv_bytes_per_layer(config, dtype: torch.dtype) -> np.ndarray:
    """KV-cache bytes one token takes in each decoder layer [num_hidden_layers] (keys and values, every key/value
    head; 0 for a linear-attention layer)."""
    text = config.get_text_config()
    types = getattr(text, "layer_types", None) or ["full_attention"] * int(text.num_hidden_layers)
    attention = np.array([("attention" in str(t) and "linear" not in str(t)) for t in types], np.int64)
    if getattr(text, "kv_lora_rank", None):   # MLA: transformers caches the decompressed per-head keys and values
        heads, k_dim, v_dim = text.num_attention_heads, text.qk_nope_head_dim + text.qk_rope_head_dim, text.v_head_dim
    else:
        heads = getattr(text, "num_key_value_heads", None) or text.num_attention_heads
        k_dim = v_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    return attention * int(heads) * int(k_dim + v_dim) * dtype.itemsize


def non_expert_bytes(model: nn.Module, layers: list[MoELayer], dtype: torch.dtype) -> int:
    """Bytes of every parameter and buffer outside the routed experts, floating ones in `dtype`."""
    experts = {id(t) for layer in layers for t in [*layer.experts.parameters(), *layer.experts.buffers()]}
    total = 0
    for t in [*model.parameters(), *model.buffers()]:
        if id(t) not in experts:
            total += t.numel() * (dtype.itemsize if t.is_floating_point() else t.element_size())
    return total


@dataclass(frozen=True)
class LayerSizes:
    """Bytes each decoder layer puts on the device that holds it, and what stays on the first device."""

    weights: np.ndarray    # int64 [n] non-expert weights of each decoder layer
    kv: np.ndarray         # int64 [n] KV cache of each decoder layer (max_model_len x batch x static caches)
    shared: int            # non-expert weights outside the decoder layers (embeddings, final norm, head)

    @property
    def per_layer(self) -> np.ndarray:
        return self.weights + self.kv


def layer_sizes(model: nn.Module, layers: list[MoELayer], cfg: EngineConfig, max_model_len: int) -> LayerSizes:
    """The model's `LayerSizes` for this configuration's dtype, KV length, batch and static caches."""
    dtype = cfg.torch_dtype()
    experts = {id(t) for layer in layers for t in [*layer.experts.parameters(), *layer.experts.buffers()]}

    def nbytes(module: nn.Module) -> int:
        return sum(t.numel() * (dtype.itemsize if t.is_floating_point() else t.element_size())
                   for t in [*module.parameters(), *module.buffers()] if id(t) not in experts)

    decoders = decoder_layers(model)
    weights = np.array([nbytes(m) for m in decoders], np.int64)
    caches = MAX_STATIC_SHAPES if cfg.fast_path else 1
    per_token = kv_bytes_per_layer(model.config, dtype)[:len(decoders)]
    kv = np.zeros(len(decoders), np.int64)
    kv[:per_token.size] = per_token * max_model_len * cfg.max_batch_size * caches
    return LayerSizes(weights, kv, non_expert_bytes(model, layers, dtype) - int(weights.sum()))


def _on_device(model: nn.Module, device: torch.device) -> int:
    """Bytes the model holds on `device` (a CUDA device without an index is the current one)."""
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()] if t.device == device)


def free_figures(model: nn.Module, cfg: EngineConfig, devices: list[torch.device]) -> list[int] | None:
    """Each device's free figure: injected (`device_free_bytes`), measured on CUDA, or None (CPU, nothing given)."""
    given = cfg.device_free_bytes
    if given is not None:
        return [int(given)] * len(devices) if isinstance(given, int) else [int(f) for f in given]
    if devices[0].type != "cuda":
        return None
    return [int(torch.cuda.mem_get_info(d)[0]) + _on_device(model, d) for d in devices]


def plan(model: nn.Module, layers: list[MoELayer], cfg: EngineConfig, geometry: ExpertGeometry,
         devices: list[torch.device], max_model_len: int, free: list[int] | None,
         layer_device: np.ndarray | None = None) -> list[MemoryPlan] | None:
    """One plan per device (see the module docstring), or None where there is no figure (`free` None).
    free [D]: `free_figures`; layer_device [decoder layers]: the device of each (placement.layer_devices; None:
    every layer on the first, `primary`)."""
    if free is None:
        return None
    D, sizes = len(devices), layer_sizes(model, layers, cfg, max_model_len)
    layer_device = np.zeros(sizes.weights.size, np.int64) if layer_device is None else np.asarray(layer_device)
    weights = np.bincount(layer_device, sizes.weights, minlength=D).astype(np.int64)
    weights[0] += sizes.shared
    kv = np.bincount(layer_device, sizes.kv, minlength=D).astype(np.int64)
    graphs = np.zeros(D, np.int64)
    graphs[0] = GRAPH_RESERVE_BYTES if cfg.cuda_graphs and devices[0].type == "cuda" and not layer_device.any() else 0
    computes = np.bincount(layer_device[[layer.decoder_index for layer in layers]], minlength=D) > 0
    staging = np.where(computes & (D > 1), geometry.num_experts * geometry.expert_bytes, 0)
    if cfg.expert_transfer == "packed":     # one device: the packed copies' staging buffers (a bound: plain bytes)
        staging[0] += PACKED_STAGING * geometry.expert_bytes
    caches = MAX_STATIC_SHAPES if cfg.fast_path else 1
    return [MemoryPlan(str(dev), f, int(weights[d]), int(kv[d]), int(graphs[d]), int(staging[d]),
                       int(f * MARGIN_FRACTION) + MARGIN_BYTES, max_model_len, cfg.max_batch_size, caches)
            for d, (dev, f) in enumerate(zip(devices, free))]


def tightest(plans: list[list[MemoryPlan] | None]) -> list[MemoryPlan] | None:
    """The plans of several placements combined: on each device, the one that leaves the least room for experts."""
    if plans[0] is None:
        return None
    return [min(per_device, key=lambda p: p.for_experts) for per_device in zip(*plans)]


def slot_room(plans: list[MemoryPlan] | None, geometry: ExpertGeometry) -> np.ndarray | None:
    """Expert slots each device's plan leaves room for [D], or None without a plan."""
    if plans is None:
        return None
    return np.array([max(p.for_experts, 0) // geometry.expert_bytes for p in plans], np.int64)


@dataclass(frozen=True)
class BudgetChoice:
    """The budget the engine starts with, and the line that says how auto chose it (None when not auto)."""

    budget: int | str | float | None
    note: str | None = None


def resolve_budget(cfg: EngineConfig, geometry: ExpertGeometry, plans: list[MemoryPlan] | None) -> BudgetChoice:
    """Auto becomes bytes per device (all experts where there is no device figure; with several devices the most
    any device takes: each holds what its room allows, `slot_room`); an explicit budget is checked against every
    device's plan. A one-line error with the numbers when it cannot fit."""
    if is_auto(cfg.expert_budget) or (cfg.expert_budget is None and plans is not None):
        if plans is None:
            return BudgetChoice(geometry.total_bytes, "expert budget auto: no device memory to fit (CPU): all experts")
        for p in plans[1:]:
            if p.non_expert and p.for_experts < 0:
                raise ConfigError(f"{p.device} cannot hold its decoder layers: {p.describe()}: free memory on it, "
                                  "lower --max-model-len or --max-batch-size, or pass --non-expert-placement primary")
        slots = capped(slot_room(plans, geometry), geometry.total_experts)     # [D]
        left = plans[0].for_experts if len(plans) == 1 else int(slots.max()) * geometry.expert_bytes
        if left < geometry.min_budget_bytes:
            raise BudgetTooSmallError(
                f"expert budget auto: {describe_all(plans)}, but one layer's top-k needs "
                f"{fmt_bytes(geometry.min_budget_bytes)}: lower --max-model-len or --max-batch-size, "
                "or use a device with more free memory")
        total = int(slots.sum())
        split = "" if len(plans) == 1 else " over " + " + ".join(f"{p.device} {n}" for p, n in zip(plans, slots))
        return BudgetChoice(min(left, geometry.total_bytes),
                            f"expert budget auto: {total} of {geometry.total_experts} experts "
                            f"({100 * total / geometry.total_experts:.0f}%){split}, {describe_all(plans)}")
    if plans is None or cfg.expert_budget is None:
        return BudgetChoice(cfg.expert_budget)
    wanted = min(parse_budget(cfg.expert_budget, geometry.total_bytes), geometry.total_bytes) // geometry.expert_bytes
    need = capped(np.full(len(plans), wanted, np.int64), geometry.total_experts)     # slots per device [D]
    room = slot_room(plans, geometry)
    if (need > room).any():
        short = "; ".join(f"{p.device} needs {n} slots ({fmt_bytes(n * geometry.expert_bytes)}), has room for "
                          f"{r}: {p.describe()}" for p, n, r in zip(plans, need, room) if n > r)
        fits = fmt_bytes(int(room.min()) * geometry.expert_bytes)
        raise ConfigError(f"expert budget {cfg.expert_budget} ({fmt_bytes(wanted * geometry.expert_bytes)} of slots"
                          f"{'' if len(plans) == 1 else ' per device'}) does not fit: {short}: pass --expert-budget "
                          f"auto or {fits} or less, or lower --max-model-len or --max-batch-size")
    return BudgetChoice(cfg.expert_budget)
