"""Which experts of a guided layer to prefetch (compiled): delta selection per batch row, the union over rows.

delta = clip(1 - score, 0, 1), score the row's match similarity; the row's chosen experts are the smallest set of
its most probable ones (ties: lower id) whose float32 running mass reaches delta, never fewer than top-k
(`selection=topk`: delta 0, exactly top-k). `min_prefetch_prob` f > 0 drops the chosen experts beyond the top-k
whose guiding probability is below f. A layer's prefetch is the union over rows, each expert at its highest
guiding probability p, with priority p / (layer - layer_now) (layer_now = -1 before layer 0 runs).
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

from finemoe.jit import njit


class Selection(NamedTuple):
    """How a guiding row becomes chosen experts."""

    top_k: int
    delta: bool = True          # False: exactly top-k
    floor: float = 0.0          # min_prefetch_prob


@njit
def choose(row, score, sel, taken, order):
    """row [J] float32 non-negative guiding probabilities, score its match similarity -> taken [J] bool := the
    chosen experts (see the module doc); order [J] int64 scratch (the ranking). Returns how many are taken. Ranks
    only as far as the set reaches."""
    J = row.size
    delta = min(max(1.0 - np.float64(score), 0.0), 1.0) if sel.delta else 0.0
    taken[:] = False
    mass = np.float32(0.0)
    need = 0
    while need < J:
        best = -1
        for j in range(J):                                                       # the most probable left, lower id
            if not taken[j] and (best < 0 or row[j] > row[best]):
                best = j
        taken[best] = True
        order[need] = best
        mass += row[best]
        need += 1
        if mass >= delta and need >= sel.top_k:
            break
    kept = need
    for i in range(sel.top_k, need):                                             # beyond top-k, below the floor
        if row[order[i]] < sel.floor:
            taken[order[i]] = False
            kept -= 1
    return kept


@njit
def layer_union(rows, scores, sel, layer, layer_now, taken, order, best_p, row_p, keys, prio):
    """rows [B, J] float32 guiding rows of `layer`, scores [B] their match similarities -> every row's choice
    (`choose`), their union into keys [J] int64 (ascending flat keys layer * J + expert) with priorities
    best_p / max(layer - layer_now, 1) into prio [J] float64, best_p [J] float32 the highest guiding probability of
    a chosen expert over the rows; row_p [J] float32 := every expert's highest guiding probability (the eviction
    p). Returns how many keys."""
    B, J = rows.shape
    best_p[:] = -1.0
    for b in range(B):
        choose(rows[b], scores[b], sel, taken, order)
        for j in range(J):
            if taken[j] and rows[b, j] > best_p[j]:
                best_p[j] = rows[b, j]
            if b == 0 or rows[b, j] > row_p[j]:
                row_p[j] = rows[b, j]
    dist = np.float64(max(layer - layer_now, 1))
    n = 0
    for j in range(J):
        if best_p[j] >= 0:
            keys[n] = layer * J + j
            prio[n] = np.float64(best_p[j]) / dist
            n += 1
    return n
