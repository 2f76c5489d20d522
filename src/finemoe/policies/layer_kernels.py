"""The baseline policies' per-layer callbacks as compiled functions (base.LayerKernels): `on_access` and
`on_layer_routed` of lru, lfu, deepspeed, moe-infinity and oracle over their own arrays. The policies' Python
callbacks call these same functions, and the simulator's compiled decode loop calls them directly, so both paths
decide alike. Flat keys: key = layer * J + expert; K = L * J.

State tuples (built by the policies, see there):
  touch_recency:   (J, clock [1], last_used [K])                                      RecencyTracker.state
  touch_frequency: (J, clock [1], last_used [K], uses [K])                            FrequencyTracker.state
  touch_layer:     (J, clock [1], layer_last_used [L], key_clock [K])                 deepspeed
  eam_access:      (frequency state, accessed)        accessed = (keys [J] int64, counts [J] int64, meta [2] int64:
                                                      layer, how many; layer -1: none)
  eam_routed:      (accessed, J, eam [K] f32, dots [C] f64, by_key [K, C] f64, unit [C, K] f32, size, keep,
                    near [C] int64, share [C, L, J] f32, distance, per_layer, taken [J] bool)      moe_infinity
  oracle_access / oracle_routed: OraclePolicy.step_state (see oracle_step)
"""
from __future__ import annotations

import numpy as np

from finemoe.jit import njit
from finemoe.policies import kernels


@njit
def touch_recency(layer, experts, counts, state):
    """LRU: one tick of the clock, the keys of `experts` [n] (ids within `layer`) last used now."""
    J, clock, last_used = state
    clock[0] += 1.0
    base = layer * J
    for e in experts:
        last_used[base + e] = clock[0]


@njit
def touch_frequency(layer, experts, counts, state):
    """LFU: each key of `experts` used once more (one use per layer-iteration), and `touch_recency`."""
    J, clock, last_used, uses = state
    base = layer * J
    for e in experts:
        uses[base + e] += 1.0
    touch_recency(layer, experts, counts, (J, clock, last_used))


@njit
def touch_layer(layer, experts, counts, state):
    """Expert-agnostic LRU: the layer, and so each of its keys, last used now."""
    J, clock, layer_last_used, key_clock = state
    clock[0] += 1.0
    layer_last_used[layer] = clock[0]
    for key in range(layer * J, (layer + 1) * J):
        key_clock[key] = clock[0]


@njit
def no_prefetch(layer, top_k, probs, aux, state, keys, prio):
    """The routed step of a policy that predicts nothing."""
    return 0


# ---- moe-infinity ------------------------------------------------------------------------------------------------
@njit
def eam_access(layer, experts, counts, state):
    """`touch_frequency`, and remember which experts (with their token counts) the layer used for `eam_routed`."""
    frequency, (acc_keys, acc_counts, meta) = state
    touch_frequency(layer, experts, counts, frequency)
    for i in range(experts.size):
        acc_keys[i] = experts[i]
        acc_counts[i] = counts[i]
    meta[0] = layer
    meta[1] = experts.size


@njit
def share_prefetch(share, layer, distance, per_layer, taken, keys, prio):
    """share [L, J] float32 usage share of a matched matrix -> the `per_layer` most used experts (stable: lower id
    first among equals; unused ones left out) of each of layers layer+1 .. layer+distance, layer by layer, into
    keys / prio (priority = share / distance). Returns how many."""
    L, J = share.shape
    n = 0
    for target in range(layer + 1, min(layer + 1 + distance, L)):
        row = share[target]
        taken[:] = False
        for _ in range(min(per_layer, J)):
            best = -1
            for j in range(J):
                if not taken[j] and (best < 0 or row[j] > row[best]):
                    best = j
            taken[best] = True
            if row[best] > 0:
                keys[n] = target * J + best
                prio[n] = np.float64(row[best]) / np.float64(target - layer)
                n += 1
    return n


@njit
def eam_routed(layer, top_k, probs, aux, state, keys, prio):
    """One request, not fresh: the experts `eam_access` recorded for `layer` join its activation matrix (and its
    products with the collection, kernels.add_counts); the best-matching stored matrix's (ActivationCollection.best)
    `share_prefetch` for the next layers. Returns how many."""
    ((acc_keys, acc_counts, meta), J, eam, dots, by_key, unit, size, keep, near, share, distance, per_layer,
     taken) = state
    n = meta[1]
    flat = acc_keys[:n] + layer * J
    kernels.add_counts(flat, acc_counts[:n], eam, dots, by_key, size)
    meta[0] = -1
    L = share.shape[1]
    if layer + 1 >= L or size == 0:
        return 0
    best, m = kernels.near_best(dots[:size], keep, near)
    if m > 1:                                         # a near tie: the defining products decide
        best = kernels.exact_best(eam, unit, near, m)
    return share_prefetch(share[best], layer, distance, per_layer, taken, keys, prio)


def warm_up() -> None:
    """Compile (or load from numba's disk cache) every function with the types the policies pass."""
    L, J, C = 2, 3, 2
    one, ones, clock = np.zeros(1, np.int64), np.ones(1, np.int64), np.zeros(1)
    recency = (J, clock, np.zeros(L * J))
    touch_recency(0, one, ones, recency)
    frequency = (*recency, np.zeros(L * J))
    touch_frequency(0, one, ones, frequency)
    touch_layer(0, one, ones, (J, clock, np.zeros(L), np.zeros(L * J)))
    keys, prio, f32 = np.zeros(L * J, np.int64), np.zeros(L * J), np.zeros(0, np.float32)
    no_prefetch(0, one, f32, f32, (), keys, prio)
    accessed = (np.zeros(J, np.int64), np.zeros(J, np.int64), np.array([-1, 0]))
    eam_access(0, one, ones, (frequency, accessed))
    eam_routed(0, one, f32, f32, (accessed, J, np.zeros(L * J, np.float32), np.zeros(C), np.ones((L * J, C)),
                                  np.ones((C, L * J), np.float32), C, 0.5, np.zeros(C, np.int64),
                                  np.ones((C, L, J), np.float32), 1, 1, np.zeros(J, np.bool_)), keys, prio)
