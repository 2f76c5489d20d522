"""On-demand loading with least-recently-used eviction: the simplest offloading baseline."""
from __future__ import annotations

import numpy as np

from finemoe.policies import trackers
from finemoe.policies.base import EvictionRank, LayerKernels, Policy, PolicyContext, register_policy
from finemoe.policies.trackers import RecencyTracker


@register_policy
class LRUPolicy(Policy):
    name = "lru"
    description = ("No prediction: a miss loads the expert on demand; the least recently used "
                   "resident expert is evicted. The classic cache baseline.")

    def bind(self, ctx: PolicyContext) -> None:
        super().bind(ctx)
        self.recency = RecencyTracker(ctx.geometry.total_experts, ctx.geometry.num_experts)
        self.kernels = trackers.access_only(trackers.touch_recency, self.recency.state, ctx.geometry.num_layers)

    def on_access(self, layer: int, experts: np.ndarray, counts: np.ndarray) -> None:
        self.recency.touch_layer(layer, experts)

    def decode_kernels(self, probs: np.ndarray | None) -> LayerKernels:
        return self.kernels

    def eviction_rank(self) -> EvictionRank:
        return self.recency.rank()
