"""One iteration's search: semantic guides at its start, a trajectory guide after every routed layer,
and the observed expert maps at its end. Array math through search.py's backend; no engine state.
A batch of one row on a host float32 store (the decode case) takes compiled kernels (row_kernels.py) that
make the same plans as the array path in one call per guide."""
from __future__ import annotations

from typing import Any, Callable

import numpy as np

from finemoe.policies.base import Prefetch
from finemoe.policies.finemoe import row_kernels as rk
from finemoe.policies.finemoe import step_kernels as sk
from finemoe.policies.finemoe.map_store import MapStore
from finemoe.policies.finemoe.arrays import HOST
from finemoe.policies.finemoe.search import Guide, SemanticMemo, TrajectorySearch, blend, semantic_topk
from finemoe.policies.finemoe.selection import LayerPlan, Selection

SEARCH_MODES = ("both", "semantic", "trajectory")
_NO_DOT = np.zeros(0, np.float32)                  # [0] a layer that multiplies nothing
_NO_IDS = np.zeros(0, np.int64)                    # [0] routed_step does not read top-k ids


class IterationPlanner:
    """Layer coverage (d = prefetch distance, L layers):
      both        semantic guides layers 0..d-1, trajectory after layer r guides layer r+d (all layers)
      semantic    semantic guides every layer
      trajectory  layers 0..d-1 unguided; trajectory guides layers d..L-1
    `neighbors` K: each search keeps its K best entries and blends their rows (search.blend); `window` W > 0:
    the trajectory cosine covers the last W routed layers only.
    """

    def __init__(self, store: MapStore, batch: int, distance: int, mode: str, neighbors: int = 1,
                 window: int = 0, keep_map_dots: bool = False) -> None:
        self.store = store
        self.L, self.J = store.spec.num_layers, store.spec.num_experts
        self.d = distance
        self.mode = mode
        self.batch = batch
        self.k = neighbors
        self.observed = np.zeros((batch, self.L, self.J), dtype=np.float32)      # [B, L, J] host
        self._seen = np.zeros(1, np.int64)                                      # [1] layers observed (kernels add)
        self.empty = store.size == 0
        self.trajectory = None if self.empty or mode == "semantic" else TrajectorySearch(store, batch, window)
        # the full maps' products with the stored ones, for the RDY of a store that will replace an entry
        self.keep_dots = keep_map_dots and self.trajectory is not None and window == 0 and store.full
        self.version = store.version
        self.one_row = batch == 1 and window == 0 and store.compiled         # the compiled path applies
        self._idx, self._val = np.zeros(neighbors, np.int64), np.zeros(neighbors, np.float32)    # [K] matches
        self._experts, self._keys = np.zeros(self.J, np.int64), np.zeros(self.J, np.int64)   # [J] a plan's choice
        self._p = np.zeros(self.J)                                              # [J] and its probabilities
        self._row = np.zeros(self.J, np.float32)                                # [J] an applied plan's guiding row
        self._out_keys = np.zeros(self.L * self.J, np.int64)                    # [L*J] applied plans' prefetch
        self._out_prio = np.zeros(self.L * self.J)
        self._state: tuple | None = None                                        # routed_state, built once

    @property
    def seen(self) -> int:
        return int(self._seen[0])

    def begin(self, sem: Any | Callable[[], Any], memo: SemanticMemo | None = None,
              keys: list | None = None) -> list[Guide]:
        """sem [B, E] (or a callable making it, called only if needed) -> guides for the first layers
        (semantic search; through `memo` for rows with `keys`)."""
        idx, score, last = self._semantic(sem, memo, keys)
        return [blend(self.store, idx, score, layer) for layer in range(last)]           # idx, score [K, B]

    def observe(self, layer: int, probs: Any) -> Guide | None:
        """Layer `layer` routed with per-row probabilities probs [B, J] (host: torch or numpy) -> the guide
        for layer + d."""
        probs, target = self._routed(layer, probs)
        if target is None:
            return None
        idx, score = self.trajectory.observe_topk(layer, probs, self.k)                 # [K, B] each
        return blend(self.store, idx, score, target)

    def begin_plans(self, sem: Any | Callable[[], Any], select: Selection, memo: SemanticMemo | None = None,
                    keys: list | None = None) -> list[LayerPlan]:
        """`begin`'s guides as plans (`select`)."""
        if not self.compiled(select):
            return select.plan(self.begin(sem, memo, keys))
        K, last = self._semantic_match(sem, memo, keys)
        return [self._plan_row(layer, K, select) for layer in range(last)]

    def observe_plan(self, layer: int, probs: Any, select: Selection) -> LayerPlan | None:
        """`observe`'s guide as a plan (`select`)."""
        if not self.compiled(select):
            guide = self.observe(layer, probs)
            return None if guide is None else select.plan([guide])[0]
        q, target = self._routed(layer, probs)                                   # q [1, J]
        if target is None:
            return None
        tr = self.trajectory
        dot = tr.product(layer, q)                                               # [n, 1]
        K = rk.trajectory_step(dot[:, 0], tr.dots[:, 0], q[0], tr.q_sq, tr.prefix_norm[:, layer], self.k,
                               self._idx, self._val)
        return self._plan_row(target, K, select)

    def begin_applied(self, sem: Any | Callable[[], Any], select: Selection, guide: tuple,
                      memo: SemanticMemo | None = None, keys: list | None = None) -> Prefetch:
        """`begin_plans` applied at once, in one compiled call (needs `compiled(select)`): each plan's layer gets
        its eviction p (`guide` = EvictionScores.guide_arrays()), and the result is the plans' prefetch
        (priority p / (layer + 1)), in layer order."""
        K, last = self._semantic_match(sem, memo, keys)
        if last == 0:
            return Prefetch.empty()
        n = rk.guided_rows(self.store.array("maps", HOST), last, self._idx, self._val, K, select.top_k, select.delta,
                           self._row, self._experts, self._out_keys, self._out_prio, *guide)
        return self._prefetch(n)

    def observe_applied(self, layer: int, probs: Any, select: Selection, guide: tuple) -> Prefetch:
        """`observe_plan`'s plan applied at once, in one compiled call after the store product (needs
        `compiled(select)`): the guided layer's eviction p set (`guide`, as in `begin_applied`), and its
        prefetch (priority p / (target - layer)) returned; empty when this layer guides none."""
        q = HOST.query(probs)                                                    # [1, J]
        dot = self.trajectory.product(layer, q)[:, 0] if self._multiplies(layer) else _NO_DOT      # [n]
        n = sk.routed_step(layer, _NO_IDS, q[0], dot, self.routed_state(select, guide), self._out_keys,
                           self._out_prio)
        return self._prefetch(n)

    def _multiplies(self, layer: int) -> bool:
        """Whether layer `layer`'s routing is multiplied with the store (a trajectory guide, or the kept products)."""
        return self.trajectory is not None and (layer + self.d < self.L or self.keep_dots)

    def products(self, probs: np.ndarray) -> np.ndarray:
        """probs [L, J] float32, one row's routing of a whole iteration -> [L, n] float32: every layer's
        `trajectory.product` in one call (TrajectorySearch.products: the same bits), for `routed_step`'s dot;
        the rows of layers that multiply nothing (`_multiplies`) stay zero ([L, 0] without a trajectory)."""
        if self.trajectory is None:
            return np.zeros((self.L, 0), np.float32)
        used = self.L if self.keep_dots else max(self.L - self.d, 0)                  # layers that multiply
        if used == self.L:
            return self.trajectory.products(0, probs[:, None, :])[:, :, 0]            # [L, n]
        out = np.zeros((self.L, self.trajectory.n), np.float32)
        if used:
            out[:used] = self.trajectory.products(0, probs[:used, None, :])[:, :, 0]   # [used, n]
        return out

    def routed_state(self, select: Selection, guide: tuple) -> tuple:
        """step_kernels.routed_step's state for this iteration's one row (needs `compiled(select)`): (observed
        [L, J], seen [1], d, L, tracking, keep_dots, dots [n], q_sq [1], prefix_norm [C, L], K, idx, val, maps
        [L, C, J], top_k, delta, row [J], experts [J], p, score, freq, rescore)."""
        if self._state is None:
            tr = self.trajectory
            tracking = tr is not None
            dots, q_sq = (tr.dots[:, 0], tr.q_sq) if tracking else (_NO_DOT, np.zeros(1, np.float32))
            self._state = (self.observed[0], self._seen, self.d, self.L, tracking, bool(self.keep_dots), dots, q_sq,
                           self.store.array("prefix_norm", HOST), self.k, self._idx, self._val,
                           self.store.array("maps", HOST), select.top_k, bool(select.delta), self._row, self._experts,
                           *guide)
        return self._state

    def _prefetch(self, n: int) -> Prefetch:
        """The first n applied keys and priorities, copied (the buffers are reused by the next call)."""
        return Prefetch(self._out_keys[:n].copy(), self._out_prio[:n].copy()) if n else Prefetch.empty()

    def compiled(self, select: Selection) -> bool:
        """One row on a host float32 store, no floor: the compiled kernels make this guide's plan."""
        return self.one_row and select.floor == 0.0

    def _semantic(self, sem: Any | Callable[[], Any], memo: SemanticMemo | None,
                  keys: list | None) -> tuple[Any, Any, int]:
        """The semantic search -> (entries [K, B], scores [K, B], how many first layers it guides: 0 if none)."""
        if self.empty or self.mode == "trajectory":
            return None, None, 0
        embed = sem if callable(sem) else (lambda: sem)
        idx, score = memo.search(keys, embed) if memo is not None else semantic_topk(self.store, embed(), self.k)
        return idx, score, (self.L if self.mode == "semantic" else min(self.d, self.L))

    def _semantic_match(self, sem: Any | Callable[[], Any], memo: SemanticMemo | None,
                        keys: list | None) -> tuple[int, int]:
        """One row's semantic search into _idx / _val -> (K matches, how many first layers they guide: 0 if none)."""
        idx, score, last = self._semantic(sem, memo, keys)
        if last == 0:
            return 0, 0
        K = idx.shape[0]                                                          # idx, score [K, 1]
        self._idx[:K], self._val[:K] = idx[:, 0], score[:, 0]
        return K, last

    def _routed(self, layer: int, probs: Any) -> tuple[np.ndarray, int | None]:
        """Record layer `layer`'s probabilities [B, J] -> (them as float32 numpy, the layer they guide, or None
        when none: then only the running products grow, if kept)."""
        probs = HOST.query(probs)                                                # [B, J] float32 numpy
        self.observed[:, layer] = probs
        self._seen[0] += 1
        target = layer + self.d
        if self.trajectory is None or target >= self.L:
            if self.keep_dots:
                self.trajectory.accumulate(layer, probs)
            return probs, None
        return probs, target

    def _plan_row(self, layer: int, K: int, select: Selection) -> LayerPlan:
        """The plan for `layer` from the K matches in _idx / _val (one row: blend, then delta choice)."""
        row = np.empty(self.J, np.float32)                   # [J] new: a deferred plan may be read later
        n = rk.plan_row(self.store.array("maps", HOST), layer, self._idx, self._val, K, select.top_k, select.delta,
                        row, self._experts, self._keys, self._p)
        return LayerPlan(layer, self._keys[:n].copy(), self._p[:n].copy(), row)

    def map_dots(self) -> Any | None:
        """[n, B] each row's full map . every stored map, when kept (`keep_map_dots`), every layer was observed
        and the store has not changed since the iteration began; else None."""
        if not self.keep_dots or self.seen < self.L or self.store.version != self.version:
            return None
        return self.trajectory.dots

    def complete_maps(self) -> np.ndarray | None:
        """The iteration's maps [B, L*J] (host float32 numpy) once every layer was observed, else None."""
        if self.seen < self.L:
            return None
        return self.observed.reshape(self.batch, self.L * self.J)
