"""The oracle's per-layer callbacks of a one-row, on-trace iteration as compiled functions (base.LayerKernels):
`oracle_access` is `on_access`, `oracle_routed` is `on_layer_routed` (and the iteration start's prefetch, layer -1).
OraclePolicy calls them too, so the engine, the simulator's per-layer path and its compiled loop decide alike.

State (OraclePolicy.step_state, rebuilt each iteration): (order, needs, future, plan)
  order  = (pos [4] int64: LAYER, ORDER, HAS_ORDER, RANKED; horizon [1] float64; neg_next [K] float64: -(next use of
           each key after step ORDER) = the eviction rank; control [2] float64: the rank's (prefetch limit, valid))
  needs  = (base: step of layer 0; keys [n] int64 the iteration's uses, ascending (= layer order); layer_of [n]
           float64; next_use [n] float64 each use's key's next use after it; bounds [L+1] int64 first use per layer;
           prev_keys [m] int64, prev_next [m] float64: the step before `base`'s uses and their next uses)
  future = (by_key [E] int64: key * S1 + step of every use, sorted; by_key_end [E+1]: + a sentinel; S1)
  plan   = (resident [K] bool, L, lookahead, prefetch)
"""
from __future__ import annotations

import numpy as np

from finemoe.jit import njit
from finemoe.policies import kernels

LAYER, ORDER, HAS_ORDER, RANKED = 0, 1, 2, 3     # pos fields


@njit
def refresh_limit(pos, horizon, control):
    """A prefetch evicts only keys whose next use lies beyond ORDER + horizon (the farthest key it fetches)."""
    if pos[RANKED] and pos[HAS_ORDER]:
        control[0] = -(np.float64(pos[ORDER]) + horizon[0])


@njit
def sync_order(step, order, needs, future):
    """Bring neg_next to `step` (when ranked): one step on, only the keys used at that step change; any other move
    recomputes every key from the timeline (and makes the rank valid)."""
    pos, horizon, neg_next, control = order
    if not pos[RANKED] or (pos[HAS_ORDER] and step == pos[ORDER]):
        return
    base, keys, _, next_use, bounds, prev_keys, prev_next = needs
    if pos[HAS_ORDER] and step == pos[ORDER] + 1 and step >= base - 1:
        if step >= base:
            layer = step - base
            for i in range(bounds[layer], bounds[layer + 1]):
                neg_next[keys[i]] = -next_use[i]
        else:
            for i in range(prev_keys.size):
                neg_next[prev_keys[i]] = -prev_next[i]
    else:
        by_key, by_key_end, S1 = future
        for key in range(neg_next.size):
            found = by_key_end[np.searchsorted(by_key, key * S1 + step, side="right")]
            neg_next[key] = -np.float64(found % S1) if found // S1 == key else -np.inf
        control[1] = 1.0
    pos[ORDER] = step
    pos[HAS_ORDER] = 1
    refresh_limit(pos, horizon, control)


@njit
def oracle_access(layer, experts, counts, state):
    """The iteration is at `layer`: the Belady order follows (experts and counts are the trace's own)."""
    order, needs, future, plan = state
    order[0][LAYER] = layer
    sync_order(needs[0] + layer, order, needs, future)


@njit
def oracle_routed(layer, top_k, probs, aux, state, keys, prio):
    """After `layer` (-1: the iteration's start): the absent keys needed in layers layer+1 .. layer+lookahead into
    keys / prio (priority -distance: the sooner, the higher), in need order; horizon = the farthest distance.
    Returns how many."""
    order, needs, future, plan = state
    pos, horizon, _, control = order
    pos[LAYER] = layer
    sync_order(needs[0] + layer, order, needs, future)
    resident, L, lookahead, prefetch = plan
    m = 0
    if prefetch:
        last = min(layer + lookahead, L - 1)
        if last > layer:
            _, need_keys, layer_of, _, bounds, _, _ = needs
            m, far = kernels.absent_needs(need_keys, layer_of, bounds[layer + 1], bounds[last + 1], resident, layer,
                                          keys, prio)
            horizon[0] = far
        else:
            horizon[0] = 0.0
    refresh_limit(pos, horizon, control)
    return m


def warm_up() -> None:
    """Compile (or load from numba's disk cache) both with the types the policy passes."""
    L, J = 2, 2
    K = L * J
    i64, f64 = np.zeros(1, np.int64), np.zeros(1)
    order = (np.array([0, 0, 0, 1], np.int64), np.zeros(1), np.zeros(K), np.array([np.inf, 1.0]))
    needs = (0, i64, f64, f64, np.array([0, 1, 1], np.int64), i64[:0], f64[:0])
    future = (np.array([0], np.int64), np.array([0, K * 9], np.int64), 9)
    state = (order, needs, future, (np.zeros(K, np.bool_), L, L, True))
    oracle_access(0, i64, i64, state)
    oracle_routed(0, i64, np.zeros(0, np.float32), np.zeros(0, np.float32), state, np.zeros(K, np.int64),
                  np.zeros(K))
