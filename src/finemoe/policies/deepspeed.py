"""DeepSpeed-style expert-agnostic offloading: layer-wise on-demand loads, a layer-granular LRU cache."""
from __future__ import annotations


import numpy as np

from finemoe.jit import njit
from finemoe.policies import trackers
from finemoe.policies.base import EvictionRank, LayerKernels, Policy, PolicyContext, register_policy


@njit
def touch_layer(layer, experts, counts, state):
    """Expert-agnostic LRU over trackers.RecencyState: the layer, and so each of its keys, last used now (whichever
    experts it routed to)."""
    state.clock[0] += 1.0
    for key in range(layer * state.J, (layer + 1) * state.J):
        state.last_used[key] = state.clock[0]


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
        self.state = trackers.RecencyState(g.num_experts, np.zeros(1), np.full(g.total_experts, -1.0))
        self.kernels = trackers.access_only(touch_layer, self.state, g.num_layers)
        trackers.warm_up()                                     # compiled (or loaded) now, not in the first request
        one = np.zeros(1, np.int64)
        touch_layer(0, one, one, trackers.RecencyState(1, np.zeros(1), np.zeros(1)))

    def on_access(self, layer: int, experts: np.ndarray, counts: np.ndarray) -> None:
        touch_layer(layer, experts, counts, self.state)

    def decode_kernels(self, probs: np.ndarray | None) -> LayerKernels:
        return self.kernels

    def eviction_rank(self) -> EvictionRank:
        """The least recently used layer first (each key's layer's last use), lowest key first within it."""
        last_used = self.state.last_used
        return EvictionRank.of(last_used, np.arange(last_used.size, dtype=np.float64))
