"""Semantic and trajectory search over the map store, and the guiding row of their matches (compiled).

Semantic search: the cosine of each batch row's embedding with every stored embedding; the K best entries guide
layers 0..d-1. Trajectory search: after layer r has routed, the cosine of the row's observed probabilities of
layers 0..r (flattened) with the same prefix of every stored map; the K best entries guide layer r+d. The prefix
products are kept running (one [n, J] x [J, B] product per layer, `products`), and the stored prefix norms come
from the store, so a layer costs O(n*J*B). The products are BLAS calls in numpy; everything after them is here.

Options (the defaults are the paper's method with K = 4):
  neighbors K  each search keeps its K best entries; the guiding row is their rows' mean weighted by their
               non-negative similarities, the match score the best one's (`blend`; K = 1: the matched row)
  window W     the trajectory cosine covers only the last W routed layers (r-W+1..r), with the stored maps'
               norms over those layers
Shapes: n stored entries, B batch rows, J experts, E embedding size, K neighbours.
"""
from __future__ import annotations

from typing import Any
from collections.abc import Callable

import numpy as np
from finemoe.jit import njit
from finemoe.policies.finemoe.map_store import EPS32, MapStore, host_f32, norm_of, sum_of_squares


@njit
def best_entries(dots, norm, q_norm, k, idx, val):
    """cos[c] = dots[c] / max(norm[c] * q_norm, EPS) over the n = dots.size entries -> the K = min(k, n) best into
    idx [K] int64 / val [K] float32, best first, ties to the lower entry. Returns K. The cosines are computed in a
    loop of their own (its divisions pipeline), then ranked."""
    n = dots.shape[0]
    K = min(k, n)
    cos = np.empty(n, np.float32)                                                # [n]
    for c in range(n):
        d = norm[c] * q_norm
        if d < EPS32:
            d = EPS32
        cos[c] = dots[c] / d
    m = 0
    for c in range(n):
        v = cos[c]
        if m < K or v > val[m - 1]:
            pos = m if m < K else K - 1
            while pos > 0 and val[pos - 1] < v:
                val[pos] = val[pos - 1]
                idx[pos] = idx[pos - 1]
                pos -= 1
            val[pos] = v
            idx[pos] = c
            if m < K:
                m += 1
    return K


@njit
def semantic_match(dots, q, sem_norm, k, idx, val):
    """dots [n, B] = stored embeddings . q [B, E] (float32), sem_norm [n] theirs -> each row's K best entries into
    idx / val [k, B] (as `best_entries`). Returns K."""
    K = 0
    for b in range(q.shape[0]):
        K = best_entries(dots[:, b], sem_norm, norm_of(q[b]), k, idx[:, b], val[:, b])
    return K


@njit
def add_into(dst, src):
    """dst [n, B] += src [n, B] (float32, elementwise)."""
    for c in range(dst.shape[0]):
        for b in range(dst.shape[1]):
            dst[c, b] += src[c, b]


@njit
def trajectory_match(t, layer, q, dot):
    """Layer `layer` routed with q [B, J] float32, dot [n, B] its product with the stored maps' layer: the running
    prefix products and squared norms in `t` (a Trajectory) grow (or, with a window, become the last W layers'),
    then each row's K best entries by prefix cosine go into t.idx / t.val [k, B]. Returns K."""
    n, B = dot.shape
    W = t.recent_dots.shape[0]
    K = 0
    if W == 0:
        add_into(t.dots, dot)
        for b in range(B):
            t.q_sq[b] += sum_of_squares(q[b])
        norm = t.prefix_norm[:n, layer]                                          # [n] over layers 0..layer
    else:
        slot = layer % W
        t.recent_dots[slot] = dot
        for b in range(B):
            t.recent_sq[slot, b] = sum_of_squares(q[b])
        first = max(layer - W + 1, 0)                                            # the window: layers first..layer
        t.dots[:] = 0.0
        t.q_sq[:] = 0.0
        for r in range(first, layer + 1):                                        # oldest first
            add_into(t.dots, t.recent_dots[r % W])
            for b in range(B):
                t.q_sq[b] += t.recent_sq[r % W, b]
        if first > 0:
            norm = np.empty(n, np.float32)
            for c in range(n):
                norm[c] = np.sqrt(max(t.prefix_sq[c, layer] - t.prefix_sq[c, first - 1], np.float32(0.0)))
        else:
            norm = t.prefix_norm[:n, layer]
    for b in range(B):
        q_norm = np.float32(np.sqrt(max(t.q_sq[b], np.float32(0.0))))
        K = best_entries(t.dots[:, b], norm, q_norm, t.idx.shape[0], t.idx[:, b], t.val[:, b])
    return K


@njit
def blend(maps, layer, idx, val, K, row):
    """Guiding row [J] of `layer` from K matches idx / val [K]: the matches' rows weighted by max(score, 0) (equal
    weights when none is positive); K = 1 is the matched row itself. maps [L, C, J] float32."""
    J = row.size
    if K == 1:
        for j in range(J):
            row[j] = maps[layer, idx[0], j]
        return
    w = np.empty(K, np.float32)
    total = np.float32(0.0)
    for i in range(K):
        w[i] = max(val[i], np.float32(0.0))
        total += w[i]
    if total <= 0:
        total = np.float32(0.0)
        for i in range(K):
            w[i] += np.float32(1.0)
            total += w[i]
    for i in range(K):
        w[i] = w[i] / total
    for j in range(J):
        acc = np.float32(0.0)
        for i in range(K):
            acc += w[i] * maps[layer, idx[i], j]
        row[j] = acc


def products(store: MapStore, n: int, first: int, qs: np.ndarray) -> np.ndarray:
    """Layers first..first+D-1 of the n first stored maps . qs [D, B, J] float32 -> [D, n, B] float32: one batched
    BLAS product, per layer the same matrix product with the same strides whatever D is (so a whole iteration's
    products made in advance equal the per-layer ones to the last bit)."""
    D = qs.shape[0]
    return store.maps_np[first:first + D, :n] @ qs.swapaxes(1, 2)                # [D, n, J] @ [D, J, B]


def semantic_topk(store: MapStore, query: Any, k: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """query [B, E] -> (best entries [K, B] int64, cosines [K, B] float32), K = min(k, size). Store non-empty."""
    q = host_f32(query)                                                             # [B, E]
    n = store.size
    dots = store.sems_np[:n] @ q.T                                               # [n, B] BLAS
    idx, val = np.zeros((k, q.shape[0]), np.int64), np.zeros((k, q.shape[0]), np.float32)
    K = semantic_match(dots, q, store.sem_norm_np[:n], k, idx, val)
    return idx[:K], val[:K]


class SemanticMemo:
    """Semantic search results per key (a decode row's token id: its token embedding, hence its search result, is
    a function of the id) for one store version. Rows whose key was searched before skip the embedding and the
    [n, E] product; the memo is emptied whenever the store changes."""

    def __init__(self, store: MapStore, k: int = 1) -> None:
        self.store = store
        self.k = k
        self.version = -1
        self.table: dict = {}

    def search(self, keys: list | None, embed: Callable[[], Any]) -> tuple[np.ndarray, np.ndarray]:
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
        return (np.asarray([i for i, _ in found], np.int64).T.copy(),
                np.asarray([s for _, s in found], np.float32).T.copy())
