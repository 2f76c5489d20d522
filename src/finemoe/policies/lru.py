"""On-demand loading with least-recently-used eviction: the simplest offloading baseline."""
from __future__ import annotations

import numpy as np

from finemoe.policies.base import EvictionRank, Policy, PolicyContext, register_policy


SMALL = 16   # up to this many keys, per-key Python beats numpy's per-call overhead


class RecencyTracker:
    """Per-expert last-use clock over flat keys; shared by every LRU-evicting policy."""

    def __init__(self, total: int) -> None:
        self.last_used = np.full(total, -1.0)
        self.last_used_view = memoryview(self.last_used)   # the same buffer, for scalar reads and writes
        self.clock = 0.0

    def rank(self) -> EvictionRank:
        """`oldest` as the cache's live eviction rank: last-use clock, then slot."""
        return EvictionRank.of(self.last_used)

    def touch(self, keys: np.ndarray) -> None:
        self.clock += 1.0
        self.last_used[keys] = self.clock

    def touch_layer(self, base: int, experts: np.ndarray) -> None:
        """`touch(base + experts)`, in plain Python for a layer's few experts."""
        if experts.size > SMALL:
            return self.touch(base + experts)
        self.clock += 1.0
        last_used, clock = self.last_used_view, self.clock
        for e in experts.tolist():
            last_used[base + e] = clock

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
        self.recency = RecencyTracker(ctx.geometry.total_experts)
        self.J = ctx.geometry.num_experts

    def on_access(self, layer: int, experts: np.ndarray, counts: np.ndarray) -> None:
        self.recency.touch_layer(layer * self.J, experts)

    def select_victims(self, candidates: np.ndarray, n: int, for_prefetch: bool) -> np.ndarray:
        return self.recency.oldest(candidates, n)

    def eviction_rank(self) -> EvictionRank:
        return self.recency.rank()
