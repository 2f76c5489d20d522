"""moe-infinity's per-layer callbacks as compiled functions (base.LayerKernels): `eam_access` is `on_access`,
`eam_routed` is `on_layer_routed` of an iteration of one request whose matrix has counts. The policy calls them
too, so the engine, the simulator's per-layer path and its compiled decode loop decide alike."""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

from finemoe.jit import njit
from finemoe.policies.moe_infinity import matching
from finemoe.policies.moe_infinity.matching import StoredRows
from finemoe.policies.trackers import FrequencyState, RecencyState, touch_frequency


class Accessed(NamedTuple):
    """What `on_access` saw, for the layer's `on_layer_routed`."""

    experts: np.ndarray   # [J] int64, the first size[0] valid
    counts: np.ndarray    # [J] int64 their token counts
    layer: np.ndarray     # [1] int64 the layer; -1: nothing since the last routed layer
    size: np.ndarray      # [1] int64 how many experts


class AccessState(NamedTuple):
    frequency: FrequencyState
    accessed: Accessed


class RoutedState(NamedTuple):
    """One request's iteration (rebuilt by `on_iteration_start`)."""

    accessed: Accessed
    J: int
    eam: np.ndarray       # [K] float32 the request's activation matrix (token counts)
    dots: np.ndarray      # [C] float64 its running products with the stored rows
    stored: StoredRows
    distance: int         # layers prefetched ahead
    per_layer: int        # experts prefetched per layer
    taken: np.ndarray     # [J] bool scratch of `share_prefetch`
    gate: np.ndarray      # [K] float64 each key's usage share in the latest match (the eviction rank's gate)


@njit
def eam_access(layer, experts, counts, state):
    """`touch_frequency`, and remember which experts (with their token counts) the layer used for `eam_routed`."""
    touch_frequency(layer, experts, counts, state.frequency)
    acc = state.accessed
    for i in range(experts.size):
        acc.experts[i] = experts[i]
        acc.counts[i] = counts[i]
    acc.layer[0] = layer
    acc.size[0] = experts.size


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
    running products, matching.add_counts); its match's `share_prefetch` for the next layers. Returns how many."""
    acc, stored = state.accessed, state.stored
    n = acc.size[0]
    flat = acc.experts[:n] + layer * state.J
    matching.add_counts(flat, acc.counts[:n], state.eam, state.dots, stored.by_key, stored.size)
    acc.layer[0] = -1
    if layer + 1 >= stored.share.shape[1] or stored.size == 0:
        return 0
    best = matching.match(state.eam, state.dots, stored)
    share = stored.share[best]
    L, J = share.shape
    for target in range(L):
        for j in range(J):
            state.gate[target * J + j] = share[target, j]
    return share_prefetch(stored.share[best], layer, state.distance, state.per_layer, state.taken, keys, prio)


def warm_up() -> None:
    """Compile (or load from numba's disk cache) both steps with the types the policy passes."""
    L, J, C = 2, 3, 2
    one, ones = np.zeros(1, np.int64), np.ones(1, np.int64)
    frequency = FrequencyState(RecencyState(J, np.zeros(1), np.zeros(L * J)), np.zeros(L * J))
    accessed = Accessed(np.zeros(J, np.int64), np.zeros(J, np.int64), np.array([-1]), np.zeros(1, np.int64))
    eam_access(0, one, ones, AccessState(frequency, accessed))
    stored = StoredRows(np.ones((C, L * J), np.float32), np.ones((L * J, C)), np.ones((C, L, J), np.float32),
                        np.zeros(C, np.int64), C, 0.5)
    state = RoutedState(accessed, J, np.zeros(L * J, np.float32), np.zeros(C), stored, 1, 1, np.zeros(J, np.bool_),
                        np.zeros(L * J))
    f32 = np.zeros(0, np.float32)
    eam_routed(0, one, f32, f32, state, np.zeros(L * J, np.int64), np.zeros(L * J))
    matching.warm_up()
