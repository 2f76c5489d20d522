"""The oracle's decisions as compiled functions (numba): when each key is next used, the Belady eviction order kept
current step by step for any batch, and the prefetch of what the rest of an iteration needs. `oracle_access` /
`oracle_routed` are the policy's `on_access` / `on_layer_routed` (base.LayerKernels), so the engine, the simulator's
per-layer path and its compiled loop decide alike. Steps: step(r, i, l) = base[r] + i * L + l (future.FutureIndex);
K = L * J flat keys. An iteration's on-trace rows are at steps bases[b] + layer; a key's distance is the fewest
steps from any of them to its next use, and the eviction rank orders keys by farthest distance first."""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

from finemoe.jit import njit


class Timeline(NamedTuple):
    """Every use of the trace, as two sorted code arrays (future.FutureIndex builds it)."""

    by_key: np.ndarray        # [E] int64 key * S1 + step of every use, sorted
    by_key_end: np.ndarray    # [E+1] int64 by_key + a sentinel no key matches
    by_step: np.ndarray       # [E] int64 step * K + key of the same uses, sorted
    next_by_step: np.ndarray  # [E] float64 the step of the same key's next use after each by_step use (inf: none)
    step_ptr: np.ndarray      # [S1+1] int64 first by_step index of each step
    S1: int                   # steps + 1
    K: int
    J: int


class Order(NamedTuple):
    """The Belady order the kernels keep, and the rank the cache reads (base.EvictionRank: primary and gate
    neg_next, limit `limit`). With rows at steps s_b = bases[b] + layer, neg_next[key] = -min_b(next use of key after
    s_b - (bases[b] - bases[0])) = -(the key's distance + step): ascending neg_next is descending distance."""

    layer: np.ndarray         # [1] int64 the iteration's current layer (-1: its start)
    step: np.ndarray          # [1] int64 the first row's step neg_next is at
    has_order: np.ndarray     # [1] bool neg_next is at `step` for the current rows (else it is recomputed)
    ranked: np.ndarray        # [1] bool the cache reads the rank: keep neg_next current
    horizon: np.ndarray       # [1] float64 steps to the farthest key of the last prefetch
    neg_next: np.ndarray      # [K] float64 (above; -inf for every key when no row is on the trace)
    limit: np.ndarray         # [1] float64 a prefetch evicts only keys with neg_next < limit


class Plan(NamedTuple):
    resident: np.ndarray      # [K] bool the cache's live residency
    L: int
    lookahead: int            # layers prefetched ahead
    prefetch: bool


class StepState(NamedTuple):
    """One iteration's state (the policy rebuilds it when the batch changes)."""

    order: Order
    timeline: Timeline
    plan: Plan
    bases: np.ndarray         # [B'] int64 the step of layer 0 of each on-trace row
    marks: np.ndarray         # [K] bool scratch of `needed_after`


@njit
def next_use(key, step, timeline):
    """The step at which `key` is next used, strictly after `step` (float64; inf: never)."""
    found = timeline.by_key_end[np.searchsorted(timeline.by_key, key * timeline.S1 + step, side="right")]
    return np.float64(found % timeline.S1) if found // timeline.S1 == key else np.inf


@njit
def refresh_limit(state):
    """A prefetch evicts only keys whose distance exceeds the horizon (that of the farthest key it fetches), i.e.
    neg_next < -(step + horizon); with no row on the trace every key is infinitely far (beyond any finite horizon)."""
    order = state.order
    if not (order.ranked[0] and order.has_order[0]):
        return
    if state.bases.size:
        order.limit[0] = -(np.float64(order.step[0]) + order.horizon[0])
    else:
        order.limit[0] = np.inf if order.horizon[0] < np.inf else -np.inf


@njit
def _neg_nearest(key, layer, bases, t):
    """neg_next of `key` with the rows at steps bases[b] + layer (see Order)."""
    best = np.inf
    for b in bases:
        best = min(best, next_use(key, b + layer, t) - np.float64(b - bases[0]))
    return -best


@njit
def sync_order(layer, state):
    """Bring neg_next to the rows' steps at `layer` (when ranked). When every row moved one step on, only the keys
    used at the rows' new steps change; any other move recomputes every key from the timeline."""
    order, t, bases = state.order, state.timeline, state.bases
    if not order.ranked[0]:
        return
    if bases.size == 0:                             # no row on the trace: no key is ever needed again
        if not order.has_order[0]:
            order.neg_next[:] = -np.inf
            order.has_order[0] = True
        refresh_limit(state)
        return
    step = bases[0] + layer
    if order.has_order[0] and step == order.step[0]:
        return
    if order.has_order[0] and step == order.step[0] + 1 and bases.size == 1:
        for i in range(t.step_ptr[step], t.step_ptr[step + 1]):
            order.neg_next[t.by_step[i] % t.K] = -t.next_by_step[i]
    elif order.has_order[0] and step == order.step[0] + 1:
        for b in bases:
            for i in range(t.step_ptr[b + layer], t.step_ptr[b + layer + 1]):
                key = t.by_step[i] % t.K
                order.neg_next[key] = _neg_nearest(key, layer, bases, t)
    else:
        for key in range(order.neg_next.size):
            order.neg_next[key] = _neg_nearest(key, layer, bases, t)
    order.step[0] = step
    order.has_order[0] = True
    refresh_limit(state)


@njit
def needed_after(layer, state, keys, prio):
    """After `layer` (-1: the iteration's start): the absent keys any on-trace row needs in layers
    layer+1 .. layer+lookahead into keys / prio (priority -distance: the sooner, the higher), ascending (which is
    need order); horizon = the farthest distance (0: none). Returns how many."""
    t, plan, bases, horizon = state.timeline, state.plan, state.bases, state.order.horizon
    if not plan.prefetch:
        return 0
    last = min(layer + plan.lookahead, plan.L - 1)
    m, far = 0, 0.0
    if last > layer and bases.size == 1:            # one row: its uses, in order
        b = bases[0]
        for i in range(t.step_ptr[b + layer + 1], t.step_ptr[b + last + 1]):
            key = t.by_step[i] % t.K
            if not plan.resident[key]:
                dist = np.float64(t.by_step[i] // t.K - b - layer)
                keys[m], prio[m] = key, -dist
                far = max(far, dist)
                m += 1
    elif last > layer and bases.size > 1:           # the union of the rows' uses (a key's layer fixes its distance)
        marks = state.marks
        for b in bases:
            for i in range(t.step_ptr[b + layer + 1], t.step_ptr[b + last + 1]):
                marks[t.by_step[i] % t.K] = True
        for key in range((layer + 1) * t.J, (last + 1) * t.J):
            if marks[key]:
                marks[key] = False
                if not plan.resident[key]:
                    dist = np.float64(key // t.J - layer)
                    keys[m], prio[m] = key, -dist
                    far = max(far, dist)
                    m += 1
    horizon[0] = far
    return m


@njit
def oracle_access(layer, experts, counts, state):
    """The rows are at `layer`: the Belady order follows (experts and counts are the trace's own)."""
    state.order.layer[0] = layer
    sync_order(layer, state)


@njit
def oracle_routed(layer, top_k, probs, aux, state, keys, prio):
    """After `layer` of the rows: the order follows, and `needed_after`. Returns how many."""
    state.order.layer[0] = layer
    sync_order(layer, state)
    m = needed_after(layer, state, keys, prio)
    refresh_limit(state)
    return m


def warm_up() -> None:
    """Compile (or load from numba's disk cache) every kernel with the types the policy passes."""
    K, S1 = 4, 9
    i64 = np.zeros(1, np.int64)
    timeline = Timeline(i64, np.array([0, K * S1], np.int64), i64, np.zeros(1), np.zeros(S1 + 1, np.int64), S1, K, 2)
    order = Order(np.zeros(1, np.int64), np.zeros(1, np.int64), np.zeros(1, np.bool_), np.ones(1, np.bool_),
                  np.zeros(1), np.zeros(K), np.array([np.inf]))
    state = StepState(order, timeline, Plan(np.zeros(K, np.bool_), 2, 2, True), i64, np.zeros(K, np.bool_))
    f32 = np.zeros(0, np.float32)
    for bases in (i64, np.zeros(2, np.int64)):
        state = state._replace(bases=bases)
        oracle_access(0, i64, i64, state)
        oracle_routed(0, i64, f32, f32, state, np.zeros(K, np.int64), np.zeros(K))
