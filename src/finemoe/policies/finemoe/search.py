"""Semantic and trajectory search over a map store: numpy on views of a host store, torch on a device
store (arrays.py), the math written once.

Semantic search: cosine of each batch row's embedding with every stored embedding; the best entry
guides layers 0..d-1. Trajectory search: after layer r has routed, the cosine of the row's observed
probabilities of layers 0..r (flattened) with the same prefix of every stored map; the best entry
guides layer r+d. The prefix dot products are kept running (one [C, J] x [J, B] product per layer),
and prefix norms come from the store's `prefix_norm` (the root of `prefix_sq`), so each layer costs
O(C*J*B), not O(C*l*J*B).

Two extensions (options of the policy; the defaults are the paper's method):
  neighbors K > 1  the K best entries guide together: the guiding row is their mean weighted by their
                   (non-negative) similarities, the match score is the best one's (`blend`)
  window W > 0     the trajectory cosine covers only the last W routed layers (r-W+1..r), not 0..r
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from finemoe.policies.finemoe import row_kernels as rk
from finemoe.policies.finemoe.arrays import HOST, ops_for
from finemoe.policies.finemoe.map_store import EPS, MapStore


@dataclass
class Guide:
    """The stored maps chosen for one target layer: `rows` [B, J] guiding probabilities, `scores` [B]
    (cosine similarity of the match), both float32 arrays of the store's backend (numpy for a host store)."""

    layer: int
    rows: Any
    scores: Any


def semantic_topk(store: MapStore, query: Any, k: int = 1) -> tuple[Any, Any]:
    """query [B, E] -> (best entries [K, B] int64, cosines [K, B] float32). Store must be non-empty."""
    xp, n = ops_for(store.device), store.size
    q = xp.query(query)                                                          # [B, E]
    dots = xp.f32(store.array("sems", xp)[:n]) @ q.T                             # [n, B]
    if xp is HOST and q.shape[0] == 1:                                           # one row: compiled, same result
        idx, val = np.zeros(k, np.int64), np.zeros(k, np.float32)
        K = rk.semantic_step(dots[:, 0], q[0], store.array("sem_norm", xp)[:n], k, idx, val)
        return idx[:K, None], val[:K, None]
    q_norm = xp.sqrt_clip((q * q).sum(1), 0.0)                                   # [B]
    cos = dots / xp.maximum(store.array("sem_norm", xp)[:n, None] * q_norm[None, :], EPS)
    return xp.best(cos, k)


def semantic_search(store: MapStore, query: Any) -> tuple[Any, Any]:
    """query [B, E] -> (best entry [B] int64, cosine [B] float32). Store must be non-empty."""
    idx, score = semantic_topk(store, query, 1)
    return idx[0], score[0]


class SemanticMemo:
    """Semantic search results per key (a decode row's token id: its token embedding, hence its search
    result, is a function of the id) for one store version. Rows whose key was searched before skip the
    embedding and the [C, E] product; the memo is emptied whenever the store changes."""

    def __init__(self, store: MapStore, k: int = 1) -> None:
        self.store = store
        self.k = k
        self.version = -1
        self.table: dict = {}

    def search(self, keys: list | None, embed: Callable[[], Any]) -> tuple[Any, Any]:
        """keys [B] (or None: no memo) and a callable making the embeddings [B, E] -> like `semantic_topk`."""
        if keys is None:
            return semantic_topk(self.store, embed(), self.k)
        if self.version != self.store.version:
            self.table.clear()
            self.version = self.store.version
        table = self.table
        missing = [b for b, k in enumerate(keys) if k not in table]
        if missing:
            sem = embed()
            idx, score = semantic_topk(self.store, sem if len(missing) == len(keys) else sem[missing], self.k)
            for b, i, s in zip(missing, idx.T.tolist(), score.T.tolist()):
                table[keys[b]] = (i, s)
            if len(missing) == len(keys):   # every row searched now: the result as it is (the same values)
                return idx, score
        found = [table[k] for k in keys]                                         # per row: K entries, K scores
        xp = ops_for(self.store.device)
        return xp.indices([i for i, _ in found]).T, xp.values([s for _, s in found]).T


def map_rows(store: MapStore, entries: Any, layer: int) -> Any:
    """Layer `layer` of stored maps `entries` [B] -> [B, J] float32."""
    xp = ops_for(store.device)
    return xp.f32(store.array("maps", xp)[layer][xp.ids(entries)])


def blend(store: MapStore, entries: Any, scores: Any, layer: int) -> Guide:
    """The guide for `layer` from K matches per row, entries/scores [K, B]: rows [B, J] = the matches'
    layer rows averaged with weights max(score, 0) (equal weights if all are <= 0); score = the best
    match's. With K = 1 this is the matched map's row itself."""
    xp = ops_for(store.device)
    if entries.shape[0] == 1:
        return Guide(layer, map_rows(store, entries[0], layer), xp.query(scores[0]))
    rows = map_rows(store, entries, layer)                                       # [K, B, J]
    w = xp.maximum(xp.query(scores), 0.0)                                        # [K, B]
    w = w + xp.f32(w.sum(0) <= 0)[None, :]              # a row with no positive match: equal weights (all 1)
    w = w / w.sum(0)[None, :]
    return Guide(layer, (w[..., None] * rows).sum(0), xp.query(scores[0]))       # [B, J]


class TrajectorySearch:
    """Running prefix cosine of B current trajectories against every stored map (one iteration).
    `window` W > 0 limits the cosine to the last W routed layers. The store must not change while this
    object is in use."""

    def __init__(self, store: MapStore, batch: int, window: int = 0) -> None:
        self.store = store
        self.xp = ops_for(store.device)
        self.maps = store.array("maps", self.xp)                                 # [L, C, J]
        self.prefix_sq = store.array("prefix_sq", self.xp)                       # [C, L]
        self.prefix_norm = store.array("prefix_norm", self.xp)                   # [C, L]
        self.n = store.size
        self.window = window
        self.dots = self.xp.zeros((self.n, batch))                               # [n, B]
        self.q_sq = self.xp.zeros((batch,))                                      # [B]
        self.recent: list = []   # window: per layer ([n, B] dots, [B] q_sq)

    def product(self, layer: int, q: Any) -> Any:
        """The stored maps' layer `layer` . q [B, J] float32 -> [n, B]: `products` of that one layer, the call every
        path (array, compiled, accumulate, a whole iteration's in advance) makes, so their sums agree to the last
        bit."""
        return self.products(layer, q[None])[0]

    def products(self, first: int, qs: Any) -> Any:
        """Layers first..first+D-1 of the stored maps . qs [D, B, J] float32 -> [D, n, B]: one batched BLAS
        product, per layer the same matrix product with the same strides whatever D is."""
        D = qs.shape[0]
        return self.xp.f32(self.maps[first:first + D, : self.n]) @ qs.swapaxes(1, 2)   # [D, n, J] @ [D, J, B]

    def accumulate(self, layer: int, probs: Any) -> None:
        """Layer `layer` routed with probabilities [B, J] but guides no later layer (window 0): only the running
        products grow, so that after the last layer `dots` holds the full maps' products (the store's RDY)."""
        self.dots += self.product(layer, self.xp.query(probs))                      # [n, B]

    def observe(self, layer: int, probs: Any) -> tuple[Any, Any]:
        """Layer `layer`'s probabilities [B, J] -> (best entry [B], prefix cosine [B]) over layers 0..layer."""
        idx, score = self.observe_topk(layer, probs, 1)
        return idx[0], score[0]

    def observe_topk(self, layer: int, probs: Any, k: int) -> tuple[Any, Any]:
        """Layer `layer`'s probabilities [B, J] -> (best entries [K, B], cosines [K, B]) over layers 0..layer
        (or the last `window` of them)."""
        xp = self.xp
        q = xp.query(probs)                                                      # [B, J]
        dot, q_sq = self.product(layer, q), (q * q).sum(1)                       # [n, B], [B]
        stored_norm = self.prefix_norm[: self.n, layer]                          # [n]
        if self.window > 0:
            self.recent = (self.recent + [(dot, q_sq)])[-self.window:]
            self.dots = sum(d for d, _ in self.recent)
            self.q_sq = sum(s for _, s in self.recent)
            first = layer - len(self.recent)                                     # last layer outside the window
            if first >= 0:
                stored_norm = xp.sqrt_clip(self.prefix_sq[: self.n, layer] - self.prefix_sq[: self.n, first], 0.0)
        else:
            self.dots += dot
            self.q_sq += q_sq
        denom = stored_norm[:, None] * xp.sqrt_clip(self.q_sq, 0.0)[None, :]
        return xp.best(self.dots / xp.maximum(denom, EPS), k)
