"""On-demand loading with least-recently-used eviction: the simplest offloading baseline."""
from __future__ import annotations

import numpy as np

from finemoe.errors import ConfigError
from finemoe.policies import trackers
from finemoe.policies.base import EvictionRank, LayerKernels, Policy, PolicyContext, register_policy
from finemoe.policies.trackers import NextVisitTracker, RecencyTracker

ORDERS = ("recency", "next_visit")


@register_policy
class LRUPolicy(Policy):
    name = "lru"
    description = ("No prediction: a miss loads the expert on demand; the least recently used "
                   "resident expert is evicted. The classic cache baseline. Option order=next_visit evicts "
                   "the expert whose layer runs farthest ahead first, then the least recently used: it does not "
                   "cycle when a batch step needs more distinct experts than the cache holds.")

    def __init__(self, order: str = "recency") -> None:
        if order not in ORDERS:
            raise ConfigError(f"lru: order {order!r} is not one of {', '.join(ORDERS)}")
        self.order = order

    def bind(self, ctx: PolicyContext) -> None:
        super().bind(ctx)
        g = ctx.geometry
        if self.order == "next_visit":
            self.recency = NextVisitTracker(g.total_experts, g.num_experts)
            self.kernels = trackers.access_only(trackers.touch_next_visit, self.recency.state, g.num_layers)
        else:
            self.recency = RecencyTracker(g.total_experts, g.num_experts)
            self.kernels = trackers.access_only(trackers.touch_recency, self.recency.state, g.num_layers)

    def on_access(self, layer: int, experts: np.ndarray, counts: np.ndarray) -> None:
        self.recency.touch_layer(layer, experts)

    def decode_kernels(self, probs: np.ndarray | None) -> LayerKernels:
        return self.kernels

    def eviction_rank(self) -> EvictionRank:
        return self.recency.rank()
