"""Speculative prefetching, the mechanics shared by mixtral-offloading and promoe: apply a later layer's router to
the current layer's hidden states.

Both policies need the model (PolicyContext.route and LayerRouting.hidden), so they run in the engine
only; the trace simulator refuses them. Each prediction costs one small router mat-vec on the device
and one HOST SYNC (the predicted expert ids) per layer.
"""
from __future__ import annotations

import numpy as np
import torch

from finemoe.policies.base import EvictionRank, LayerRouting, Policy, PolicyContext, Prefetch
from finemoe.policies.trackers import RecencyTracker


class SpeculativePolicy(Policy):
    """Shared mechanics: predict the experts of layers `targets(l)` from layer l's hidden states with those
    layers' own routers, prefetch every token's predicted top-k (priority = summed router probability /
    distance), evict LRU."""

    needs_hidden_states = True
    stride = 1

    def bind(self, ctx: PolicyContext) -> None:
        super().bind(ctx)
        g = ctx.geometry
        self.L, self.J, self.k = g.num_layers, g.num_experts, g.top_k
        self.recency = RecencyTracker(g.total_experts, g.num_experts)

    def targets(self, layer: int) -> list[int]:
        """Layers predicted after `layer`: layer + stride, plus the ones no earlier layer covers."""
        first = layer + self.stride
        lo = layer + 1 if layer == 0 else first
        return [m for m in range(lo, first + 1) if m < self.L]

    def on_access(self, layer: int, experts: np.ndarray, counts: np.ndarray) -> None:
        self.recency.touch_layer(layer, experts)

    def on_layer_routed(self, routing: LayerRouting) -> Prefetch:
        if routing.hidden is None or self.ctx.route is None:
            return Prefetch.empty()
        rows = torch.from_numpy(np.flatnonzero(routing.token_rows >= 0)).to(routing.hidden.device)
        hidden = routing.hidden.index_select(0, rows)                       # [T', H] real tokens only
        keys, prios = [], []
        for m in self.targets(routing.layer):
            experts, mass = self._predict(m, hidden)
            keys.append(m * self.J + experts)
            prios.append(mass / (m - routing.layer))
        if not keys:
            return Prefetch.empty()
        return Prefetch(np.concatenate(keys), np.concatenate(prios))

    @torch.no_grad()
    def _predict(self, layer: int, hidden: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """Router of `layer` on `hidden` [T, H] -> (distinct predicted experts, summed probability of each)."""
        probs = self.ctx.route(layer, hidden)                               # [T, J] float32
        top_p, top_i = probs.topk(self.k, dim=-1)                           # [T, k]
        mass = torch.zeros(self.J, dtype=torch.float32, device=probs.device)
        mass.scatter_add_(0, top_i.reshape(-1), top_p.reshape(-1))          # [J]
        mass = mass.cpu().numpy()                                           # HOST SYNC: predicted experts
        experts = np.flatnonzero(mass > 0)
        return experts.astype(np.int64), mass[experts].astype(np.float64)

    def eviction_rank(self) -> EvictionRank:
        """LRU: last use, then slot."""
        return self.recency.rank()
