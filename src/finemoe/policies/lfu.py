"""On-demand loading with least-frequently-used eviction."""
from __future__ import annotations

import numpy as np

from finemoe.policies import layer_kernels as lk
from finemoe.policies.base import EvictionRank, LayerKernels, Policy, PolicyContext, register_policy
from finemoe.policies.lru import RecencyTracker


class FrequencyTracker:
    """Per-expert use counts over flat keys (one count per layer-iteration that used the expert),
    with recency as the tie-break; shared by every LFU-evicting policy. `touch_layer` is the compiled
    layer_kernels.touch_frequency over `state`."""

    def __init__(self, total: int, num_experts: int) -> None:
        self.uses = np.zeros(total)                       # float64: exact for any count below 2**53
        self.recency = RecencyTracker(total, num_experts)
        self.state = (*self.recency.state, self.uses)

    def touch(self, keys: np.ndarray) -> None:
        self.uses[keys] += 1
        self.recency.touch(keys)

    def touch_layer(self, layer: int, experts: np.ndarray) -> None:
        """`experts` [n] int64 (distinct ids within `layer`) used once more, now."""
        lk.touch_frequency(layer, experts, experts, self.state)

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
        self.freq = FrequencyTracker(ctx.geometry.total_experts, ctx.geometry.num_experts)
        self.kernels = LayerKernels(lk.touch_frequency, self.freq.state, lk.no_prefetch, (),
                                    np.zeros((ctx.geometry.num_layers, 0), np.float32))

    def on_access(self, layer: int, experts: np.ndarray, counts: np.ndarray) -> None:
        self.freq.touch_layer(layer, experts)

    def decode_kernels(self, probs: np.ndarray | None) -> LayerKernels:
        return self.kernels

    def select_victims(self, candidates: np.ndarray, n: int, for_prefetch: bool) -> np.ndarray:
        return self.freq.least_used(candidates, n)

    def eviction_rank(self) -> EvictionRank:
        return self.freq.rank()
