"""Per-expert use trackers shared by the on-demand baselines (lru, lfu, moe-infinity, mixtral-offloading, promoe):
last use (recency), visits of the layer since the last use (cycle: lru's default) and use counts (frequency) over
flat keys (key = layer * J + expert, K = L * J), updated by
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


class CycleState(NamedTuple):
    """`touch_cycle`'s arrays: J, L, clock [1] float64 (ticks once per touched layer), visits [L] float64 (each
    layer's visits so far), and per key (K = L * J):
    last_visit [K] float64 = its layer's visit count at its last use (-1: never used);
    stale [K] float64 = minus the visits of its layer since its last use that did not use it (-inf: never used);
    ahead [K] float64 = minus the clock tick of its layer's next visit, expected L ticks after the last one.
    All three change only when the key's layer runs: keys of other layers keep their order as the clock advances."""

    J: int
    L: int
    clock: np.ndarray
    visits: np.ndarray
    last_visit: np.ndarray
    stale: np.ndarray
    ahead: np.ndarray


@njit
def touch_cycle(layer, experts, counts, state):
    """One tick of the clock, one more visit of `layer`, and its keys re-ranked: `experts` [n] (ids within `layer`)
    used at this visit, the others one visit staler; decode visits the layers in order, cyclically, so this layer
    runs next L ticks from now."""
    state.clock[0] += 1.0
    J = state.J
    base = layer * J
    state.visits[layer] += 1.0
    v = state.visits[layer]
    for e in experts:
        state.last_visit[base + e] = v
    nxt = -(state.clock[0] + state.L)
    for j in range(J):
        w = state.last_visit[base + j]
        state.stale[base + j] = -np.inf if w < 0 else w - v
        state.ahead[base + j] = nxt


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


class CycleTracker:
    """LRU counted in visits of the expert's layer (lru's default order): evict the expert whose layer has run most
    often without it since its last use, and among equals the one whose layer runs farthest ahead. Decode visits the
    layers in order, cyclically, so plain LRU's least recently used expert belongs to the layer that runs soonest:
    when a batch step needs more distinct experts than the cache holds, LRU evicts exactly what the next layers
    need and never hits. Here every key used in its layer's last visit ties on `stale`, and the farthest next visit
    goes first, which does not cycle; when the cache holds more than a step needs, it is close to LRU with Belady's
    choice among equals."""

    def __init__(self, total: int, num_experts: int) -> None:
        L = total // num_experts
        self.stale = np.full(total, -np.inf)
        self.ahead = np.zeros(total)
        self.state = CycleState(num_experts, L, np.zeros(1), np.zeros(L), np.full(total, -1.0), self.stale, self.ahead)
        warm_up()

    def touch_layer(self, layer: int, experts: np.ndarray) -> None:
        """`experts` [n] int64 (ids within `layer`) used now; the keys of `layer` re-ranked."""
        touch_cycle(layer, experts, experts, self.state)

    def rank(self) -> EvictionRank:
        """The most visits unused first, then the farthest next visit, then slot."""
        return EvictionRank.of(self.stale, self.ahead)


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
    touch_cycle(0, one, one, CycleState(2, 1, np.zeros(1), np.zeros(1), np.full(2, -1.0), np.zeros(2), np.zeros(2)))
    no_prefetch(0, one, f32, f32, (), one, np.zeros(1))
