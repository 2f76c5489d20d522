"""On-demand loading with least-frequently-used eviction."""
from __future__ import annotations

import numpy as np

from finemoe.policies.base import EvictionRank, Policy, PolicyContext, register_policy
from finemoe.policies.lru import SMALL, RecencyTracker


class FrequencyTracker:
    """Per-expert use counts over flat keys (one count per layer-iteration that used the expert),
    with recency as the tie-break; shared by every LFU-evicting policy."""

    def __init__(self, total: int) -> None:
        self.uses = np.zeros(total)                       # float64: exact for any count below 2**53
        self.uses_view = memoryview(self.uses)            # the same buffer, for scalar reads and writes
        self.recency = RecencyTracker(total)

    def touch(self, keys: np.ndarray) -> None:
        self.uses[keys] += 1
        self.recency.touch(keys)

    def touch_layer(self, base: int, experts: np.ndarray) -> None:
        """`touch(base + experts)`, in plain Python for a layer's few experts."""
        if experts.size > SMALL:
            return self.touch(base + experts)
        uses = self.uses_view
        for e in experts.tolist():
            uses[base + e] += 1
        self.recency.touch_layer(base, experts)

    def least_used(self, candidates: np.ndarray, n: int) -> np.ndarray:
        """The n candidates with the fewest uses; among equals the least recently used first."""
        order = np.lexsort((self.recency.last_used[candidates], self.uses[candidates]))
        return candidates[order[:n]]

    def rank(self) -> EvictionRank:
        """`least_used` as the cache's live eviction rank: uses, then last use, then slot."""
        return EvictionRank.of(self.uses, self.recency.last_used)


@register_policy
class LFUPolicy(Policy):
    name = "lfu"
    description = ("No prediction: a miss loads the expert on demand; the resident expert used in the fewest "
                   "layer-iterations so far (all requests, never decayed) is evicted, least recently used first "
                   "among equals. The classic frequency baseline.")

    def bind(self, ctx: PolicyContext) -> None:
        super().bind(ctx)
        self.freq = FrequencyTracker(ctx.geometry.total_experts)
        self.J = ctx.geometry.num_experts

    def on_access(self, layer: int, experts: np.ndarray, counts: np.ndarray) -> None:
        self.freq.touch_layer(layer * self.J, experts)

    def select_victims(self, candidates: np.ndarray, n: int, for_prefetch: bool) -> np.ndarray:
        return self.freq.least_used(candidates, n)

    def eviction_rank(self) -> EvictionRank:
        return self.freq.rank()
