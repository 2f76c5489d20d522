"""On-demand loading with least-recently-used eviction: the simplest offloading baseline. Recency is counted in
cycles over the layers (trackers.CycleTracker), so a batch step larger than the cache does not make it cycle;
order=recency is the classic per-use LRU."""
from __future__ import annotations

import numpy as np

from finemoe.errors import ConfigError
from finemoe.policies import trackers
from finemoe.policies.base import EvictionRank, LayerKernels, Policy, PolicyContext, register_policy
from finemoe.policies.trackers import CycleTracker, RecencyTracker

ORDERS = ("cycle", "recency")


@register_policy
class LRUPolicy(Policy):
    name = "lru"
    description = ("No prediction: a miss loads the expert on demand; the least recently used resident expert is "
                   "evicted, recency counted in decode steps (visits of its layer), the expert whose layer runs "
                   "farthest ahead first among equals: it does not cycle when a batch step needs more distinct "
                   "experts than the cache holds. Option order=recency: the classic LRU (the last use's time).")

    def __init__(self, order: str = "cycle") -> None:
        if order not in ORDERS:
            raise ConfigError(f"lru: order {order!r} is not one of {', '.join(ORDERS)}")
        self.order = order

    def bind(self, ctx: PolicyContext) -> None:
        super().bind(ctx)
        g = ctx.geometry
        if self.order == "cycle":
            self.recency = CycleTracker(g.total_experts, g.num_experts)
            self.kernels = trackers.access_only(trackers.touch_cycle, self.recency.state, g.num_layers)
        else:
            self.recency = RecencyTracker(g.total_experts, g.num_experts)
            self.kernels = trackers.access_only(trackers.touch_recency, self.recency.state, g.num_layers)

    def on_access(self, layer: int, experts: np.ndarray, counts: np.ndarray) -> None:
        self.recency.touch_layer(layer, experts)

    def decode_kernels(self, probs: np.ndarray | None) -> LayerKernels:
        return self.kernels

    def eviction_rank(self) -> EvictionRank:
        return self.recency.rank()
