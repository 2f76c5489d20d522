"""Per-expert use trackers shared by the on-demand baselines (lru, lfu, moe-infinity, mixtral-offloading, promoe):
last use (recency) and use counts (frequency) over flat keys (key = layer * J + expert, K = L * J), updated by
compiled layer steps (numba) that the policies' `on_access` and the simulator's compiled decode loop both call."""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

from finemoe.jit import njit
from finemoe.policies.base import EvictionRank, LayerKernels


class RecencyState(NamedTuple):
    """`touch_recency`'s arrays. clock [1] float64 ticks once per touched layer; last_used [K] float64 (-1: never)."""

    J: int
    clock: np.ndarray
    last_used: np.ndarray


class FrequencyState(NamedTuple):
    """`touch_frequency`'s arrays: recency, and uses [K] float64 (one per layer-iteration; exact below 2**53)."""

    recency: RecencyState
    uses: np.ndarray


@njit
def touch_recency(layer, experts, counts, state):
    """LRU: one tick of the clock, the keys of `experts` [n] int64 (ids within `layer`) last used now."""
    state.clock[0] += 1.0
    base = layer * state.J
    for e in experts:
        state.last_used[base + e] = state.clock[0]


@njit
def touch_frequency(layer, experts, counts, state):
    """LFU: each key of `experts` [n] (distinct ids within `layer`) used once more, and `touch_recency`."""
    base = layer * state.recency.J
    for e in experts:
        state.uses[base + e] += 1.0
    touch_recency(layer, experts, counts, state.recency)


class NextVisitState(NamedTuple):
    """`touch_next_visit`'s arrays: recency, and ahead [K] float64 = minus the number of layers after the current one
    before each key's layer runs again (decode visits the layers in order, cyclically): the farthest, first."""

    recency: RecencyState
    L: int
    ahead: np.ndarray


@njit
def touch_next_visit(layer, experts, counts, state):
    """`touch_recency`, and every key's distance to its layer's next visit after `layer`: keys of `layer` itself are
    L - 1 layers away (their next use is the next iteration's), those of layer + 1 are 0 away."""
    touch_recency(layer, experts, counts, state.recency)
    J, L = state.recency.J, state.L
    for m in range(L):
        d = -float((m - layer - 1) % L)
        for j in range(J):
            state.ahead[m * J + j] = d


@njit
def no_prefetch(layer, top_k, probs, aux, state, keys, prio):
    """The routed step (LayerKernels.routed) of a policy that predicts nothing."""
    return 0


def access_only(access, access_state, num_layers: int) -> LayerKernels:
    """The compiled callbacks of a policy that only tracks use (`access`) and predicts nothing."""
    return LayerKernels(access, access_state, no_prefetch, (), np.zeros((num_layers, 0), np.float32))


class RecencyTracker:
    """Per-expert last-use clock over flat keys; the eviction order of every LRU-evicting policy."""

    def __init__(self, total: int, num_experts: int) -> None:
        self.last_used = np.full(total, -1.0)
        self.clock = np.zeros(1)
        self.state = RecencyState(num_experts, self.clock, self.last_used)
        warm_up()                                           # compiled (or loaded) now, not in the first request

    def rank(self) -> EvictionRank:
        """The least recently used first (last-use clock, then slot), as the cache's live eviction rank."""
        return EvictionRank.of(self.last_used)

    def touch_layer(self, layer: int, experts: np.ndarray) -> None:
        """`experts` [n] int64 (ids within `layer`) used now."""
        touch_recency(layer, experts, experts, self.state)


class NextVisitTracker:
    """Recency plus each key's distance to its layer's next visit: evict the expert whose layer runs farthest ahead,
    then the least recently used. Under the cyclic layer order of decode this is Belady's choice among layers, and it
    does not cycle when a step needs more distinct experts than the cache holds (where LRU evicts exactly the experts
    the next layers need)."""

    def __init__(self, total: int, num_experts: int) -> None:
        self.recency = RecencyTracker(total, num_experts)
        self.ahead = np.zeros(total)
        self.state = NextVisitState(self.recency.state, total // num_experts, self.ahead)

    def touch_layer(self, layer: int, experts: np.ndarray) -> None:
        """`experts` [n] int64 (ids within `layer`) used now; every key's distance from `layer` updated."""
        touch_next_visit(layer, experts, experts, self.state)

    def rank(self) -> EvictionRank:
        """The farthest next visit first, then the least recently used, then slot."""
        return EvictionRank.of(self.ahead, self.recency.last_used)


class FrequencyTracker:
    """Per-expert use counts over flat keys (one count per layer-iteration that used the expert), with recency as
    the tie-break; the eviction order of every LFU-evicting policy."""

    def __init__(self, total: int, num_experts: int) -> None:
        self.uses = np.zeros(total)
        self.recency = RecencyTracker(total, num_experts)
        self.state = FrequencyState(self.recency.state, self.uses)

    def touch_layer(self, layer: int, experts: np.ndarray) -> None:
        """`experts` [n] int64 (distinct ids within `layer`) used once more, now."""
        touch_frequency(layer, experts, experts, self.state)

    def rank(self, gate: np.ndarray | None = None) -> EvictionRank:
        """The fewest uses first, then the least recently used, then slot, as the cache's live eviction rank
        (gate: the policy's value of holding each key, default the use counts)."""
        return EvictionRank.of(self.uses, self.recency.last_used, gate)


def warm_up() -> None:
    """Compile (or load from numba's disk cache) every kernel with the types the trackers pass."""
    one, f32 = np.zeros(1, np.int64), np.zeros(0, np.float32)
    recency = RecencyState(2, np.zeros(1), np.zeros(2))
    touch_recency(0, one, one, recency)
    touch_frequency(0, one, one, FrequencyState(recency, np.zeros(2)))
    touch_next_visit(0, one, one, NextVisitState(recency, 1, np.zeros(2)))
    no_prefetch(0, one, f32, f32, (), one, np.zeros(1))
