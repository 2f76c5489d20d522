"""On-demand loading with least-recently-used eviction: the simplest offloading baseline."""
from __future__ import annotations

import numpy as np

from finemoe.policies import layer_kernels as lk
from finemoe.policies.base import EvictionRank, LayerKernels, Policy, PolicyContext, register_policy


class RecencyTracker:
    """Per-expert last-use clock over flat keys; shared by every LRU-evicting policy. `touch_layer` is the compiled
    layer_kernels.touch_recency over `state`."""

    def __init__(self, total: int, num_experts: int) -> None:
        self.last_used = np.full(total, -1.0)
        self.clock = np.zeros(1)                            # [1] ticks once per touched layer
        self.state = (num_experts, self.clock, self.last_used)
        lk.warm_up()                                        # compiled (or loaded) now, not in the first request

    def rank(self) -> EvictionRank:
        """`oldest` as the cache's live eviction rank: last-use clock, then slot."""
        return EvictionRank.of(self.last_used)

    def touch(self, keys: np.ndarray) -> None:
        self.clock[0] += 1.0
        self.last_used[keys] = self.clock[0]

    def touch_layer(self, layer: int, experts: np.ndarray) -> None:
        """`experts` [n] int64 (ids within `layer`) used now."""
        lk.touch_recency(layer, experts, experts, self.state)

    def oldest(self, candidates: np.ndarray, n: int) -> np.ndarray:
        order = self.last_used[candidates].argsort(kind="stable")
        return candidates[order[:n]]


@register_policy
class LRUPolicy(Policy):
    name = "lru"
    description = ("No prediction: a miss loads the expert on demand; the least recently used "
                   "resident expert is evicted. The classic cache baseline.")

    def bind(self, ctx: PolicyContext) -> None:
        super().bind(ctx)
        self.recency = RecencyTracker(ctx.geometry.total_experts, ctx.geometry.num_experts)
        self.kernels = LayerKernels(lk.touch_recency, self.recency.state, lk.no_prefetch, (),
                                    np.zeros((ctx.geometry.num_layers, 0), np.float32))

    def on_access(self, layer: int, experts: np.ndarray, counts: np.ndarray) -> None:
        self.recency.touch_layer(layer, experts)

    def decode_kernels(self, probs: np.ndarray | None) -> LayerKernels:
        return self.kernels

    def select_victims(self, candidates: np.ndarray, n: int, for_prefetch: bool) -> np.ndarray:
        return self.recency.oldest(candidates, n)

    def eviction_rank(self) -> EvictionRank:
        return self.recency.rank()
