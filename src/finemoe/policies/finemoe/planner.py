"""One iteration's plans: semantic guides at its start, a trajectory guide after every routed layer, the observed
expert maps at its end. Each guide is made, applied to the eviction p and turned into the callback's prefetch in one
compiled call (`begin_layers`, `observe_layer`); `routed_step` is the same call as base.LayerKernels' `routed`, for
the simulator's compiled decode loop. Any batch size, every option.

Layer coverage (d = prefetch distance, L layers):
  both        semantic guides layers 0..d-1, trajectory after layer r guides layer r+d (all layers)
  semantic    semantic guides every layer
  trajectory  layers 0..d-1 unguided; trajectory guides layers d..L-1
"""
from __future__ import annotations

from typing import Any, NamedTuple
from collections.abc import Callable

import numpy as np

from finemoe.jit import njit
from finemoe.policies.base import Prefetch
from finemoe.policies.finemoe.admission import cap
from finemoe.policies.finemoe.eviction import Scores, guided, observed
from finemoe.policies.finemoe.map_store import MapStore
from finemoe.policies.finemoe.search import (SemanticMemo, add_into, blend, products, semantic_topk,
                                             trajectory_match)
from finemoe.policies.finemoe.selection import Selection, layer_union

SEARCH_MODES = ("both", "semantic", "trajectory")


class Trajectory(NamedTuple):
    """The running trajectory search of B rows against the n stored entries (search.trajectory_match)."""

    dots: np.ndarray          # [n, B] float32 prefix products (with a window: the window's)
    q_sq: np.ndarray          # [B] float32 the rows' squared norms over the same layers
    recent_dots: np.ndarray   # [W, n, B] float32 the last W layers' products (W = 0: no window)
    recent_sq: np.ndarray     # [W, B] float32 and squared norms
    idx: np.ndarray           # [k, B] int64 each row's best entries (semantic or trajectory), best first
    val: np.ndarray           # [k, B] float32 and their similarities
    prefix_sq: np.ndarray     # [C, L] float32 the store's prefix squared norms
    prefix_norm: np.ndarray   # [C, L] float32 and norms


class Iteration(NamedTuple):
    """Everything `observe_layer` / `begin_layers` read and write during one iteration."""

    observed: np.ndarray      # [B, L, J] float32 the rows' routing so far (the maps learned at the end)
    seen: np.ndarray          # [1] int64 layers routed so far
    traj: Trajectory
    maps: np.ndarray          # [L, C, J] float32 the store's maps
    distance: int             # d
    tracking: bool            # a trajectory search runs (a non-empty store, search != semantic)
    keep_dots: bool           # the full maps' products are kept past layer L-d-1 (for the store's RDY)
    select: Selection
    max_prefetch: int         # 0: no cap
    resident: np.ndarray      # [L*J] bool the cache's live residency
    scores: Scores            # the eviction state a guide updates
    rows: np.ndarray          # [B, J] float32 scratch: the guiding rows of one layer
    row_scores: np.ndarray    # [B] float32 scratch: their match similarities
    taken: np.ndarray         # [J] bool scratch
    order: np.ndarray         # [J] int64 scratch
    best_p: np.ndarray        # [J] float32 scratch
    row_p: np.ndarray         # [J] float32 scratch


@njit
def _guide(st, layer, layer_now, K, keys, prio, m):
    """The plan for `layer` from each row's K matches in st.traj.idx / val: its guiding rows (blend), the union of
    the rows' choices appended to keys / prio from m, the layer's eviction p set. Returns the new length."""
    for b in range(st.rows.shape[0]):
        blend(st.maps, layer, st.traj.idx[:, b], st.traj.val[:, b], K, st.rows[b])
        st.row_scores[b] = st.traj.val[0, b]
    n = layer_union(st.rows, st.row_scores, st.select, layer, layer_now, st.taken, st.order, st.best_p, st.row_p,
                    keys[m:], prio[m:])
    guided(st.scores, layer, st.row_p)
    return m + n


@njit
def _admit(st, keys, prio, n):
    return cap(keys, prio, n, st.resident, st.max_prefetch) if st.max_prefetch > 0 else n


@njit
def begin_layers(st, K, last, keys, prio):
    """Iteration start, each row's K semantic matches in st.traj.idx / val: plans for layers 0..last-1 (priority
    p / (layer + 1)), their prefetch into keys / prio [L*J]. Returns how many."""
    m = 0
    for layer in range(last):
        m = _guide(st, layer, -1, K, keys, prio, m)
    return _admit(st, keys, prio, m)


@njit
def observe_layer(st, layer, q, dot, keys, prio):
    """Layer `layer` routed with the rows' probabilities q [B, J] float32; dot [n, B] float32 = the store's layer
    maps . q (read when this layer multiplies, `IterationPlanner.multiplies`). Records q; with a trajectory, for a
    layer that guides layer + d, the search and that layer's plan (prefetch into keys / prio, returns how many);
    for a later layer, only the kept products grow."""
    B = q.shape[0]
    for b in range(B):
        st.observed[b, layer] = q[b]
    st.seen[0] += 1
    observed(st.scores, layer, q)
    if not st.tracking:
        return 0
    target = layer + st.distance
    if target >= st.observed.shape[1]:
        if st.keep_dots:
            add_into(st.traj.dots, dot)
        return 0
    K = trajectory_match(st.traj, layer, q, dot)
    return _admit(st, keys, prio, _guide(st, target, layer, K, keys, prio, 0))


@njit
def routed_step(layer, top_k, q, dot, st, keys, prio):
    """base.LayerKernels' `routed` for one row: `observe_layer` with q [J], dot [n] (top_k is not read)."""
    return observe_layer(st, layer, q.reshape((1, q.size)), dot.reshape((dot.size, 1)), keys, prio)


class IterationPlanner:
    """One iteration's search state over a store that stays fixed until the iteration ends (`learn` happens after).
    `neighbors` K: each search keeps its K best entries; `window` W > 0: the trajectory cosine covers the last W
    routed layers only; `keep_map_dots`: keep the full maps' products for the store's RDY (learning)."""

    def __init__(self, store: MapStore, batch: int, distance: int, mode: str, neighbors: int, window: int,
                 keep_map_dots: bool, select: Selection, max_prefetch: int, resident: np.ndarray,
                 scores: Scores) -> None:
        spec = store.spec
        L, J, n = spec.num_layers, spec.num_experts, store.size
        self.store, self.L, self.J, self.n, self.batch, self.mode = store, L, J, n, batch, mode
        self.version = store.version
        tracking = n > 0 and mode != "semantic"
        keep = keep_map_dots and tracking and window == 0 and store.full
        W = min(window, L) if tracking else 0
        f32 = np.float32
        traj = Trajectory(np.zeros((n, batch), f32), np.zeros(batch, f32), np.zeros((W, n, batch), f32),
                          np.zeros((W, batch), f32), np.zeros((neighbors, batch), np.int64),
                          np.zeros((neighbors, batch), f32), store.prefix_sq_np, store.prefix_norm_np)
        self.state = Iteration(np.zeros((batch, L, J), f32), np.zeros(1, np.int64), traj, store.maps_np, distance,
                               tracking, keep, select, max_prefetch, resident, scores, np.zeros((batch, J), f32),
                               np.zeros(batch, f32), np.zeros(J, np.bool_), np.zeros(J, np.int64),
                               np.zeros(J, f32), np.zeros(J, f32))
        self._keys, self._prio = np.zeros(L * J, np.int64), np.zeros(L * J)    # [L*J] a callback's prefetch
        self._no_dot = np.zeros((0, batch), f32)

    def begin(self, sem: Callable[[], Any], memo: SemanticMemo | None = None, keys: list | None = None) -> Prefetch:
        """Iteration start: the semantic search (embeddings [B, E] from `sem()`, called only if needed; through
        `memo` for rows with `keys`) guides the first layers -> their prefetch."""
        if self.n == 0 or self.mode == "trajectory":
            return Prefetch.empty()
        k = self.state.traj.idx.shape[0]
        idx, score = memo.search(keys, sem) if memo is not None else semantic_topk(self.store, sem(), k)
        K = idx.shape[0]                                                          # idx, score [K, B]
        self.state.traj.idx[:K], self.state.traj.val[:K] = idx, score
        last = self.L if self.mode == "semantic" else min(self.state.distance, self.L)
        return self._prefetch(begin_layers(self.state, K, last, self._keys, self._prio))

    def observe(self, layer: int, probs: np.ndarray) -> Prefetch:
        """Layer `layer` routed with the rows' probabilities probs [B, J] float32 -> the prefetch of the layer it
        guides (empty when none)."""
        q = np.ascontiguousarray(probs, dtype=np.float32)
        dot = products(self.store, self.n, layer, q[None])[0] if self.multiplies(layer) else self._no_dot
        return self._prefetch(observe_layer(self.state, layer, q, dot, self._keys, self._prio))

    def multiplies(self, layer: int) -> bool:
        """Whether layer `layer`'s routing is multiplied with the store (a trajectory guide, or the kept products)."""
        st = self.state
        return st.tracking and (layer + st.distance < self.L or st.keep_dots)

    def products(self, probs: np.ndarray) -> np.ndarray:
        """probs [L, J] float32, one row's routing of a whole iteration -> [L, n] float32: every layer's product
        `observe` would make, in one call (the same bits), as `routed_step`'s dot; the rows of layers that multiply
        nothing stay zero ([L, 0] without a trajectory)."""
        if not self.state.tracking:
            return np.zeros((self.L, 0), np.float32)
        used = sum(self.multiplies(layer) for layer in range(self.L))               # the first `used` layers
        out = np.zeros((self.L, self.n), np.float32)
        if used:
            out[:used] = products(self.store, self.n, 0, probs[:used, None, :])[:, :, 0]   # [used, n]
        return out

    def _prefetch(self, n: int) -> Prefetch:
        """The first n keys and priorities, copied (the buffers are reused by the next call)."""
        return Prefetch.take(self._keys, self._prio, n)

    @property
    def seen(self) -> int:
        return int(self.state.seen[0])

    def map_dots(self) -> np.ndarray | None:
        """[n, B] each row's full map . every stored map, when kept (`keep_map_dots`), every layer was observed and
        the store has not changed since the iteration began; else None."""
        if not self.state.keep_dots or self.seen < self.L or self.store.version != self.version:
            return None
        return self.state.traj.dots

    def complete_maps(self) -> np.ndarray | None:
        """The iteration's maps [B, L*J] float32 once every layer was observed, else None."""
        if self.seen < self.L:
            return None
        return self.state.observed.reshape(self.batch, self.L * self.J)


def warm_up() -> None:
    """Compile (or load from numba's disk cache) the kernels with the types the policy passes."""
    from finemoe.policies.finemoe.eviction import EvictionScores
    from finemoe.policies.finemoe.map_store import StoreSpec
    store = MapStore(StoreSpec("warm-up", 2, 3, 2, "token", 1, 2))
    for _ in range(3):
        store.add(np.ones(6, np.float32), np.ones(2, np.float32))
    for batch, window in ((1, 0), (2, 1)):
        planner = IterationPlanner(store, batch, 1, "both", 2, window, True, Selection(1), 1, np.zeros(6, bool),
                                   EvictionScores(6, 3).state)
        planner.begin(lambda b=batch: np.ones((b, 2), np.float32))
        for layer in range(2):
            planner.observe(layer, np.ones((batch, 3), np.float32))
    planner = IterationPlanner(store, 1, 1, "both", 2, 0, True, Selection(1), 0, np.zeros(6, bool),
                               EvictionScores(6, 3).state)
    aux = planner.products(np.ones((2, 3), np.float32))
    routed_step(0, np.zeros(1, np.int64), np.ones((2, 3), np.float32)[0], aux[0], planner.state,
                planner._keys, planner._prio)
