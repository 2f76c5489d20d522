"""FineMoE's eviction score: per expert key (layer * J + expert) its latest guiding probability p, its use count
freq, the decaying mean ema of its observed router probability and its last use; the victim order is the lowest
rule value first, ties to the least recently used:
  pfreq  p * freq (the paper)     lfu  freq     lru  last use     ema  ema     ema+p  ema + p
`score` [L*J] holds each key's rule value, updated (compiled, `used` / `guided` / `observed`) wherever its inputs
change, so `EvictionRank.of(score, last_used)` is the cache's live eviction order (`EvictionScores.rank`).
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

from finemoe.jit import njit
from finemoe.policies.base import EvictionRank

EVICTION_RULES = ("pfreq", "lru", "lfu", "ema", "ema+p")
PFREQ, LRU, LFU, EMA, EMA_P = range(5)


class Scores(NamedTuple):
    """The eviction state, all float64 [L*J] but `clock` [1] (uses so far); for lru `score` is `last_used`."""

    p: np.ndarray
    freq: np.ndarray
    ema: np.ndarray
    last_used: np.ndarray
    score: np.ndarray
    clock: np.ndarray
    num_experts: int      # J
    rule: int             # index in EVICTION_RULES
    decay: float          # ema factor per observed routing


@njit
def _rescore(s, key):
    """score[key] = the rule's value of `key` (lru: `score` is `last_used` itself)."""
    if s.rule == PFREQ:
        s.score[key] = s.p[key] * s.freq[key]
    elif s.rule == LFU:
        s.score[key] = s.freq[key]
    elif s.rule == EMA:
        s.score[key] = s.ema[key]
    elif s.rule == EMA_P:
        s.score[key] = s.ema[key] + s.p[key]


@njit
def used(s, layer, experts):
    """Layer `layer` used `experts` [n] (distinct ids within the layer): clock += 1, their freq += 1, their last
    use = clock."""
    s.clock[0] += 1.0
    now = s.clock[0]
    for i in range(experts.size):
        key = layer * s.num_experts + experts[i]
        s.freq[key] += 1.0
        s.last_used[key] = now
        _rescore(s, key)


@njit
def guided(s, layer, row_p):
    """Layer `layer` was guided: p of its keys := row_p [J] (each expert's highest guiding probability)."""
    base = layer * s.num_experts
    for j in range(row_p.size):
        s.p[base + j] = row_p[j]
        _rescore(s, base + j)


@njit
def observed(s, layer, probs):
    """Layer `layer` routed with probs [B, J] float32: ema := decay * ema + (1 - decay) * (max over rows), only
    for the ema rules (no other rule reads it)."""
    if s.rule != EMA and s.rule != EMA_P:
        return
    base = layer * s.num_experts
    keep, take = s.decay, np.float32(1.0 - s.decay)
    for j in range(probs.shape[1]):
        top = probs[0, j]
        for b in range(1, probs.shape[0]):
            top = max(top, probs[b, j])
        key = base + j
        s.ema[key] *= keep
        s.ema[key] += take * top
        _rescore(s, key)


@njit
def use_layer(layer, experts, counts, s):
    """base.LayerKernels' `access`: `used` (counts are not read)."""
    used(s, layer, experts)


class EvictionScores:
    """The eviction state of one policy instance (`state`) and its order (`rank`)."""

    def __init__(self, total: int, num_experts: int, rule: str = "pfreq", decay: float = 0.5,
                 cold_p: float = 0.0) -> None:
        last_used = np.full(total, -1.0)
        self.state = Scores(np.zeros(total), np.zeros(total), np.zeros(total), last_used,
                            last_used if rule == "lru" else np.zeros(total), np.zeros(1), num_experts,
                            EVICTION_RULES.index(rule), decay)
        # the lowest rule value first, ties to the least recently used; the gate is the latest guiding probability
        # p: with cold_p (admission.py) a prefetch displaces only keys whose p is below it, and under the idle issue
        # rule (experts/prefetch_issue.py) only keys whose p is below the prefetched expert's own p
        self.rank = EvictionRank.of(self.state.score, None if rule == "lru" else last_used, self.state.p,
                                    np.array([cold_p if cold_p > 0.0 else np.inf]))


def warm_up() -> None:
    """Compile (or load from numba's disk cache) the updates with the types the policy passes."""
    s = EvictionScores(6, 3).state
    use_layer(1, np.zeros(1, np.int64), np.ones(1, np.int64), s)
    guided(s, 1, np.zeros(3, np.float32))
    observed(s, 1, np.zeros((1, 3), np.float32))
