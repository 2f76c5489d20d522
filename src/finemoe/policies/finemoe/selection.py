"""How many experts to prefetch (delta selection), their priorities, and the eviction score.

All host-side numpy, vectorized over batch rows and experts.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from finemoe.policies.base import EvictionRank, Prefetch
from finemoe.policies.finemoe import row_kernels
from finemoe.policies.finemoe.arrays import ranked_top_k, to_host
from finemoe.policies.finemoe.search import Guide


def delta_select(rows: np.ndarray, scores: np.ndarray, top_k: int) -> np.ndarray:
    """rows [B, J] guiding probabilities, scores [B] match similarities -> mask [B, J] of chosen experts.

    delta = clip(1 - score, 0, 1); per row, the smallest set of most probable experts whose
    probabilities sum to at least delta, never fewer than top_k (and never more than J).
    """
    B, J = rows.shape
    delta = np.clip(1.0 - scores.astype(np.float64), 0.0, 1.0)                   # [B]
    order = np.argsort(-rows, axis=1, kind="stable")                             # [B, J]
    b = np.arange(B)[:, None]                                                    # [B, 1]
    csum = np.cumsum(rows[b, order], axis=1)                                     # [B, J] sorted cumulative mass
    need = (csum < delta[:, None]).sum(1) + 1                                    # [B] smallest n with csum >= delta
    need = np.minimum(np.maximum(need, top_k), J)
    mask = np.zeros((B, J), dtype=bool)
    mask[b, order] = np.arange(J)[None, :] < need[:, None]                       # chosen in sorted order -> [B, J]
    return mask


@dataclass
class LayerPlan:
    """One guided layer's chosen experts, computed wherever the search runs (worker or inline):
    flat `keys` [n] int64, `p` [n] float64 the highest guiding probability of each over the batch rows,
    `row_p` [J] every expert's highest guiding probability (the eviction score's p)."""

    layer: int
    keys: np.ndarray
    p: np.ndarray
    row_p: np.ndarray

    def prefetch(self, layer_now: int) -> Prefetch:
        """Priority p / (layer - layer_now); layer_now = -1 before layer 0 runs."""
        return Prefetch(self.keys, self.p / float(max(self.layer - layer_now, 1)))


def plan_layer(layer: int, rows: np.ndarray, mask: np.ndarray, num_experts: int) -> LayerPlan:
    """Union of the rows' chosen experts (mask [B, J]) of `layer`, each at its highest guiding probability."""
    p = np.where(mask, rows, -1.0).max(0)                                        # [J]
    experts = np.flatnonzero(mask.any(0))
    return LayerPlan(layer, layer * num_experts + experts, p[experts].astype(np.float64), rows.max(0))


def top_k_if_enough(row: np.ndarray, score: float, top_k: int) -> np.ndarray | None:
    """`delta_select` for one row [J] (float32) in its usual case: when the row's top_k most probable experts
    already hold mass >= delta, the choice is exactly them -> their ids ascending [top_k]; otherwise (or on a
    tie at the cut, which the general path breaks by index) None. The same choice and the same float32
    prefix sums as `delta_select`, in a few scalar steps instead of a sort and a cumsum over J."""
    if top_k >= row.size or (best := ranked_top_k(row, top_k)) is None:
        return None
    top, ranked = best                                  # best first, ties: lower id
    mass = np.float32(ranked[0])
    for v in ranked[1:]:                                # cumsum order, in float32
        mass = np.float32(mass + np.float32(v))
    delta = min(max(1.0 - float(score), 0.0), 1.0)
    return np.sort(np.asarray(top, dtype=np.int64)) if not float(mass) < delta else None


def plan_layers(layers: list[int], rows: np.ndarray, scores: np.ndarray, top_k: int, delta: bool,
                floor: float = 0.0) -> list[LayerPlan]:
    """G guided layers at once: rows [G, B, J] guiding probabilities, scores [G, B] match similarities ->
    one LayerPlan per layer (delta selection, or exactly top-k when `delta` is False), one vectorized pass.
    `floor` > 0 drops the experts beyond each row's top-k whose guiding probability is below it.
    A single row (B = 1, no floor) whose top-k covers delta takes `top_k_if_enough` (the usual decode case)."""
    G, B, J = rows.shape
    plans: list[LayerPlan | None] = [None] * G
    if B == 1 and floor == 0.0:
        for g, layer in enumerate(layers):
            experts = top_k_if_enough(rows[g, 0], float(scores[g, 0]) if delta else 1.0, top_k)
            if experts is not None:
                plans[g] = LayerPlan(layer, layer * J + experts, rows[g, 0, experts].astype(np.float64),
                                     rows[g, 0])                # row_p: a view (read once into the scores)
    rest = [g for g in range(G) if plans[g] is None]
    if rest:
        sub = rows[rest]                                                         # [G', B, J]
        flat = sub.reshape(len(rest) * B, J)
        s = scores[rest].reshape(-1) if delta else np.ones(len(rest) * B, dtype=scores.dtype)
        mask = delta_select(flat, s, top_k)                                      # [G'*B, J]
        if floor > 0.0:
            mask &= (flat >= floor) | delta_select(flat, np.ones(len(rest) * B), top_k)
        mask = mask.reshape(len(rest), B, J)
        for i, g in enumerate(rest):
            plans[g] = plan_layer(layers[g], rows[g], mask[i], J)
    return plans


@dataclass(frozen=True)
class Selection:
    """How a guide becomes a plan: delta selection (or exactly top-k when `delta` is False), never fewer than
    `top_k` experts; `floor` > 0 drops the experts beyond each row's top-k guided below it."""

    top_k: int
    delta: bool = True
    floor: float = 0.0

    def plan(self, guides: list[Guide]) -> list[LayerPlan]:
        """Guides -> chosen experts per guided layer (one vectorized selection for all of them)."""
        if not guides:
            return []
        rows = np.stack([to_host(g.rows) for g in guides])                    # [G, B, J]
        scores = np.stack([to_host(g.scores) for g in guides])                # [G, B]
        return plan_layers([g.layer for g in guides], rows, scores, self.top_k, self.delta, self.floor)


def layer_prefetch(layer: int, layer_now: int, rows: np.ndarray, mask: np.ndarray, num_experts: int) -> Prefetch:
    """Union of the rows' chosen experts of `layer`; priority p / (layer - layer_now), p the highest
    guiding probability of the expert over the batch rows. layer_now = -1 before layer 0 runs."""
    return plan_layer(layer, rows, mask, num_experts).prefetch(layer_now)


def merge(prefetches: list[Prefetch]) -> Prefetch:
    if not prefetches:
        return Prefetch.empty()
    if len(prefetches) == 1:
        return prefetches[0]
    return Prefetch(np.concatenate([p.keys for p in prefetches]), np.concatenate([p.priority for p in prefetches]))


EVICTION_RULES = ("pfreq", "lru", "lfu", "ema", "ema+p")


class EvictionScores:
    """Per-expert p (latest guiding probability), freq (use count) and ema (decaying mean of the expert's
    observed router probability, max over batch rows, updated when its layer routes). Victim order by
    `rule`: pfreq (FineMoE) lowest p*freq; lfu lowest freq; lru least recently used; ema lowest ema;
    ema+p lowest ema + p. Ties go to the least recently used. `score` [L*J] holds each key's rule value,
    updated where its inputs change, so `rank` (score, then last use) is the cache's live eviction order."""

    def __init__(self, total: int, rule: str = "pfreq", decay: float = 0.5) -> None:
        self.rule = rule
        self.decay = decay
        self.p = np.zeros(total)
        self.freq = np.zeros(total)
        self.ema = np.zeros(total)
        self.last_used = np.full(total, -1.0)
        self._clock = np.zeros(1)                  # [1] uses so far (an array: compiled callers advance it)
        self.score = self.last_used if rule == "lru" else np.zeros(total)
        self._rescore_used = {"pfreq": 1, "lfu": 2}.get(rule, 0)      # what a use changes in `score`
        self.rank = EvictionRank.of(self.score, None if rule == "lru" else self.last_used)

    def _rescore(self, at: slice | np.ndarray) -> None:
        """score[at] = the rule's value of those keys (elementwise: the same floats `victims` computes)."""
        if self.rule == "pfreq":
            self.score[at] = self.p[at] * self.freq[at]
        elif self.rule == "lfu":
            self.score[at] = self.freq[at]
        elif self.rule == "ema":
            self.score[at] = self.ema[at]
        elif self.rule == "ema+p":
            self.score[at] = self.ema[at] + self.p[at]

    def guide(self, layer: int, row_p: np.ndarray) -> None:
        """Layer `layer` was guided; row_p [J] is each expert's guiding probability (max over batch rows)."""
        J = row_p.size
        at = slice(layer * J, (layer + 1) * J)
        self.p[at] = row_p
        if self.rule in ("pfreq", "ema+p"):
            self._rescore(at)

    def observed(self, layer: int, row_p: np.ndarray) -> None:
        """Layer `layer` routed; row_p [J] is each expert's router probability (max over batch rows)."""
        J = row_p.size
        at = slice(layer * J, (layer + 1) * J)
        seg = self.ema[at]
        seg *= self.decay
        seg += (1.0 - self.decay) * row_p
        if self.rule.startswith("ema"):
            self._rescore(at)

    def guide_arrays(self) -> tuple | None:
        """`guide` for compiled callers (row_kernels.guided_row): (p, score, freq, rescore), rescore 1 when a guide
        rescores (pfreq), 0 when it does not (lru, lfu); None for the ema rules (their `observed` is not compiled)."""
        if self.rule.startswith("ema"):
            return None
        return self.p, self.score, self.freq, int(self.rule == "pfreq")

    @property
    def clock(self) -> float:
        return float(self._clock[0])

    def used(self, keys: np.ndarray) -> None:
        """keys [n] int64, distinct (one compiled call)."""
        row_kernels.use_keys(keys, self._clock, self.freq, self.last_used, self.p, self.score, self._rescore_used)

    def access_state(self, num_experts: int) -> tuple:
        """`used` for compiled callers (step_kernels.use_layer): (J, clock, freq, last_used, p, score, rescore)."""
        return num_experts, self._clock, self.freq, self.last_used, self.p, self.score, self._rescore_used

    def victims(self, candidates: np.ndarray, n: int) -> np.ndarray:
        if self.rule == "lru":
            return candidates[np.argsort(self.last_used[candidates], kind="stable")[:n]]
        score = {"lfu": lambda c: self.freq[c], "pfreq": lambda c: self.p[c] * self.freq[c],
                 "ema": lambda c: self.ema[c], "ema+p": lambda c: self.ema[c] + self.p[c]}[self.rule](candidates)
        order = np.lexsort((self.last_used[candidates], score))                  # primary: score, then recency
        return candidates[order[:n]]
