"""On-demand loading with least-frequently-used eviction."""
from __future__ import annotations

import numpy as np

from finemoe.policies import trackers
from finemoe.policies.base import EvictionRank, LayerKernels, Policy, PolicyContext, register_policy
from finemoe.policies.trackers import FrequencyTracker


@register_policy
class LFUPolicy(Policy):
    name = "lfu"
    description = ("No prediction: a miss loads the expert on demand; the resident expert used in the fewest "
                   "layer-iterations so far (all requests, never decayed) is evicted, least recently used first "
                   "among equals. The classic frequency baseline.")

    def bind(self, ctx: PolicyContext) -> None:
        super().bind(ctx)
        self.freq = FrequencyTracker(ctx.geometry.total_experts, ctx.geometry.num_experts)
        self.kernels = trackers.access_only(trackers.touch_frequency, self.freq.state, ctx.geometry.num_layers)

    def on_access(self, layer: int, experts: np.ndarray, counts: np.ndarray) -> None:
        self.freq.touch_layer(layer, experts)

    def decode_kernels(self, probs: np.ndarray | None) -> LayerKernels:
        return self.kernels

    def eviction_rank(self) -> EvictionRank:
        return self.freq.rank()
