"""DeepSpeed-style expert-agnostic offloading: layer-wise on-demand loads, a layer-granular LRU cache."""
from __future__ import annotations

from bisect import insort

import numpy as np

from finemoe.policies.base import Policy, PolicyContext, VictimOrder, register_policy


class LayerRecencyOrder(VictimOrder):
    """deepspeed's victims kept incrementally: layers from least to most recently used (never-used layers
    first, lowest index first), and within a layer its occupied keys, lowest first."""

    def __init__(self, num_layers: int, num_experts: int, layers_by_recency: list[int]) -> None:
        self.J = num_experts
        self.layers = layers_by_recency                      # live list the policy reorders on access
        self.keys: list[list[int]] = [[] for _ in range(num_layers)]   # [L] sorted occupied keys per layer
        self.slot_of: list[int] = []

    def attach(self, key_of: list[int], slot_of: list[int]) -> None:
        self.slot_of = slot_of
        for key in key_of:
            if key >= 0:
                insort(self.keys[key // self.J], key)

    def placed(self, slot: int, key: int, old: int) -> None:
        if old >= 0:
            self.keys[old // self.J].remove(old)
        insort(self.keys[key // self.J], key)

    def victims(self, n: int, for_prefetch: bool, blocked: set[int]) -> list[int]:
        out: list[int] = []
        slot_of = self.slot_of
        for layer in self.layers:
            for key in self.keys[layer]:
                slot = slot_of[key]
                if slot not in blocked:
                    out.append(slot)
                    if len(out) == n:
                        return out
        return out


@register_policy
class DeepSpeedPolicy(Policy):
    name = "deepspeed"
    description = (
        "Follows DeepSpeed-MoE / ZeRO-Inference offloading (Rajbhandari et al. 2022; Aminabadi et al. 2022): "
        "parameters are fetched layer by layer when the layer runs, with no knowledge of which experts will be "
        "routed and no prediction. Expert-agnostic cache: recency is kept per layer, not per expert, so victims "
        "come from the least recently used layer (lowest expert id first). Not expressible here: DeepSpeed moves "
        "a layer's whole parameter partition (all experts) per fetch and overlaps the next layer's fetch with "
        "compute; our engine moves only the routed experts, on demand, one expert per copy.")

    def bind(self, ctx: PolicyContext) -> None:
        super().bind(ctx)
        self.layer_last_used = np.full(ctx.geometry.num_layers, -1.0)
        self.layers_by_recency = list(range(ctx.geometry.num_layers))   # least recently used first
        self.clock = 0.0

    def on_access(self, layer: int, experts: np.ndarray, counts: np.ndarray) -> None:
        self.clock += 1.0
        self.layer_last_used[layer] = self.clock
        self.layers_by_recency.remove(layer)
        self.layers_by_recency.append(layer)

    def select_victims(self, candidates: np.ndarray, n: int, for_prefetch: bool) -> np.ndarray:
        layer_of = candidates // self.ctx.geometry.num_experts
        order = np.lexsort((candidates, self.layer_last_used[layer_of]))
        return candidates[order[:n]]

    def victim_order(self) -> VictimOrder:
        g = self.ctx.geometry
        return LayerRecencyOrder(g.num_layers, g.num_experts, self.layers_by_recency)
