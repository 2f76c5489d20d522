"""DeepSpeed-style expert-agnostic offloading: layer-wise on-demand loads, a layer-granular LRU cache."""
from __future__ import annotations

import numpy as np

from finemoe.policies import layer_kernels as lk
from finemoe.policies.base import EvictionRank, LayerKernels, Policy, PolicyContext, register_policy


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
        g = ctx.geometry
        self.layer_last_used = np.full(g.num_layers, -1.0)
        self.key_clock = np.full(g.total_experts, -1.0)      # [L*J] its layer's last use (the eviction rank)
        self.clock = np.zeros(1)                               # [1] ticks once per layer
        self.state = (g.num_experts, self.clock, self.layer_last_used, self.key_clock)   # layer_kernels.touch_layer
        self.kernels = LayerKernels(lk.touch_layer, self.state, lk.no_prefetch, (),
                                    np.zeros((g.num_layers, 0), np.float32))
        lk.warm_up()                                           # compiled (or loaded) now, not in the first request

    def on_access(self, layer: int, experts: np.ndarray, counts: np.ndarray) -> None:
        lk.touch_layer(layer, experts, counts, self.state)

    def decode_kernels(self, probs: np.ndarray | None) -> LayerKernels:
        return self.kernels

    def select_victims(self, candidates: np.ndarray, n: int, for_prefetch: bool) -> np.ndarray:
        layer_of = candidates // self.ctx.geometry.num_experts
        order = np.lexsort((candidates, self.layer_last_used[layer_of]))
        return candidates[order[:n]]

    def eviction_rank(self) -> EvictionRank:
        """`select_victims` as live arrays: the key's layer's last use, then the key."""
        return EvictionRank.of(self.key_clock, np.arange(self.key_clock.size, dtype=np.float64))
