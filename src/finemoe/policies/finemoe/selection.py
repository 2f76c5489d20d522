"""How many experts to prefetch (delta selection), their priorities, and the eviction score.

All host-side numpy, vectorized over batch rows and experts.
"""
from __future__ import annotations

import numpy as np

from finemoe.policies.base import Prefetch


def delta_select(rows: np.ndarray, scores: np.ndarray, top_k: int) -> np.ndarray:
    """rows [B, J] guiding probabilities, scores [B] match similarities -> mask [B, J] of chosen experts.

    delta = clip(1 - score, 0, 1); per row, the smallest set of most probable experts whose
    probabilities sum to at least delta, never fewer than top_k (and never more than J).
    """
    B, J = rows.shape
    delta = np.clip(1.0 - scores.astype(np.float64), 0.0, 1.0)                   # [B]
    order = np.argsort(-rows, axis=1, kind="stable")                             # [B, J]
    csum = np.cumsum(np.take_along_axis(rows, order, axis=1), axis=1)            # [B, J]
    need = (csum < delta[:, None]).sum(1) + 1                                    # [B] smallest n with csum >= delta
    need = np.clip(np.maximum(need, top_k), 0, J)
    chosen_sorted = np.arange(J)[None, :] < need[:, None]                        # [B, J] in sorted order
    mask = np.zeros((B, J), dtype=bool)
    np.put_along_axis(mask, order, chosen_sorted, axis=1)
    return mask


def layer_prefetch(layer: int, layer_now: int, rows: np.ndarray, mask: np.ndarray, num_experts: int) -> Prefetch:
    """Union of the rows' chosen experts of `layer`; priority p / (layer - layer_now), p the highest
    guiding probability of the expert over the batch rows. layer_now = -1 before layer 0 runs."""
    p = np.where(mask, rows, -1.0).max(0)                                        # [J]
    experts = np.flatnonzero(mask.any(0))
    dist = float(max(layer - layer_now, 1))
    return Prefetch(layer * num_experts + experts, p[experts].astype(np.float64) / dist)


def merge(prefetches: list[Prefetch]) -> Prefetch:
    if not prefetches:
        return Prefetch.empty()
    if len(prefetches) == 1:
        return prefetches[0]
    return Prefetch(np.concatenate([p.keys for p in prefetches]), np.concatenate([p.priority for p in prefetches]))


EVICTION_RULES = ("pfreq", "lru", "lfu")


class EvictionScores:
    """Per-expert p (latest guiding probability) and freq (use count). Victim order by `rule`:
    pfreq (FineMoE) lowest p*freq; lfu lowest freq; lru least recently used. Ties go to the least
    recently used."""

    def __init__(self, total: int, rule: str = "pfreq") -> None:
        self.rule = rule
        self.p = np.zeros(total)
        self.freq = np.zeros(total)
        self.last_used = np.full(total, -1.0)
        self.clock = 0.0

    def guide(self, layer: int, row_p: np.ndarray) -> None:
        """Layer `layer` was guided; row_p [J] is each expert's guiding probability (max over batch rows)."""
        J = row_p.size
        self.p[layer * J:(layer + 1) * J] = row_p

    def used(self, keys: np.ndarray) -> None:
        self.clock += 1.0
        self.freq[keys] += 1.0
        self.last_used[keys] = self.clock

    def victims(self, candidates: np.ndarray, n: int) -> np.ndarray:
        if self.rule == "lru":
            return candidates[np.argsort(self.last_used[candidates], kind="stable")[:n]]
        score = self.freq[candidates] if self.rule == "lfu" else self.p[candidates] * self.freq[candidates]
        order = np.lexsort((self.last_used[candidates], score))                  # primary: score, then recency
        return candidates[order[:n]]
