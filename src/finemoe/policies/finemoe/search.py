"""Semantic and trajectory search over a map store, in torch on the store's device.

Semantic search: cosine of each batch row's embedding with every stored embedding; the best entry
guides layers 0..d-1. Trajectory search: after layer r has routed, the cosine of the row's observed
probabilities of layers 0..r (flattened) with the same prefix of every stored map; the best entry
guides layer r+d. The prefix dot products are kept running (one [C, J] x [J, B] product per layer),
and prefix norms come from the store's `prefix_sq`, so each layer costs O(C*J*B), not O(C*l*J*B).

Two extensions (options of the policy; the defaults are the paper's method):
  neighbors K > 1  the K best entries guide together: the guiding row is their mean weighted by their
                   (non-negative) similarities, the match score is the best one's (`blend`)
  window W > 0     the trajectory cosine covers only the last W routed layers (r-W+1..r), not 0..r
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from finemoe.policies.finemoe.map_store import EPS, MapStore


@dataclass
class Guide:
    """The stored maps chosen for one target layer: `rows` [B, J] guiding probabilities, `scores` [B]
    (cosine similarity of the match), both float32 on the store's device."""

    layer: int
    rows: torch.Tensor
    scores: torch.Tensor


def _best(sim: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """sim [n, B] -> (entries [K, B] int64, similarities [K, B]), best first; K = min(k, n). K = 1 is `max`
    (the first index among ties), so one neighbour reproduces the single-best search exactly."""
    if k == 1:
        score, idx = sim.max(0)
        return idx[None], score[None]
    score, idx = sim.topk(min(k, sim.shape[0]), dim=0)
    return idx, score


def semantic_topk(store: MapStore, query: torch.Tensor, k: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """query [B, E] -> (best entries [K, B] int64, cosines [K, B] float32). Store must be non-empty."""
    n = store.size
    q = query.to(store.device, torch.float32)
    dots = store.sems[:n].float() @ q.T                                          # [n, B]
    cos = dots / (store.sem_norm[:n, None] * q.norm(dim=1)[None, :]).clamp_min(EPS)
    return _best(cos, k)


def semantic_search(store: MapStore, query: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
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

    def search(self, keys: list | None, embed: Callable[[], torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
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
        found = [table[k] for k in keys]                                         # per row: K entries, K scores
        return (torch.tensor([i for i, _ in found], dtype=torch.int64, device=self.store.device).T,
                torch.tensor([s for _, s in found], dtype=torch.float32, device=self.store.device).T)


def map_rows(store: MapStore, entries: torch.Tensor, layer: int) -> torch.Tensor:
    """Layer `layer` of stored maps `entries` [B] -> [B, J] float32."""
    return store.maps[layer, entries].float()


def blend(store: MapStore, entries: torch.Tensor, scores: torch.Tensor, layer: int) -> Guide:
    """The guide for `layer` from K matches per row, entries/scores [K, B]: rows [B, J] = the matches'
    layer rows averaged with weights max(score, 0) (equal weights if all are <= 0); score = the best
    match's. With K = 1 this is the matched map's row itself."""
    if entries.shape[0] == 1:
        return Guide(layer, map_rows(store, entries[0], layer), scores[0])
    rows = store.maps[layer, entries].float()                                    # [K, B, J]
    w = scores.clamp_min(0.0)                                                    # [K, B]
    w = torch.where(w.sum(0, keepdim=True) > 0, w, torch.ones_like(w))
    w = w / w.sum(0, keepdim=True)
    return Guide(layer, (w[..., None] * rows).sum(0), scores[0])                 # [B, J]


class TrajectorySearch:
    """Running prefix cosine of B current trajectories against every stored map (one iteration).
    `window` W > 0 limits the cosine to the last W routed layers. The store must not change while this
    object is in use."""

    def __init__(self, store: MapStore, batch: int, window: int = 0) -> None:
        self.store = store
        self.n = store.size
        self.window = window
        self.dots = torch.zeros((self.n, batch), dtype=torch.float32, device=store.device)   # [n, B]
        self.q_sq = torch.zeros(batch, dtype=torch.float32, device=store.device)            # [B]
        self.recent: list[tuple[torch.Tensor, torch.Tensor]] = []   # window: per layer ([n, B] dots, [B] q_sq)

    def observe(self, layer: int, probs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer `layer`'s probabilities [B, J] -> (best entry [B], prefix cosine [B]) over layers 0..layer."""
        idx, score = self.observe_topk(layer, probs, 1)
        return idx[0], score[0]

    def observe_topk(self, layer: int, probs: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer `layer`'s probabilities [B, J] -> (best entries [K, B], cosines [K, B]) over layers 0..layer
        (or the last `window` of them)."""
        q = probs.to(self.store.device, torch.float32)
        seg = self.store.maps[layer, : self.n].float()                           # [n, J] contiguous
        dot, q_sq = seg @ q.T, (q * q).sum(1)                                    # [n, B], [B]
        stored_sq = self.store.prefix_sq[: self.n, layer]                        # [n]
        if self.window > 0:
            self.recent = (self.recent + [(dot, q_sq)])[-self.window:]
            self.dots = torch.stack([d for d, _ in self.recent]).sum(0)
            self.q_sq = torch.stack([s for _, s in self.recent]).sum(0)
            first = layer - len(self.recent)                                     # last layer outside the window
            if first >= 0:
                stored_sq = stored_sq - self.store.prefix_sq[: self.n, first]
        else:
            self.dots += dot
            self.q_sq += q_sq
        denom = stored_sq.clamp_min(0.0).sqrt()[:, None] * self.q_sq.sqrt()[None, :]
        return _best(self.dots / denom.clamp_min(EPS), k)
