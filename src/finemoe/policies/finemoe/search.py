"""Semantic and trajectory search over a map store, in torch on the store's device.

Semantic search: cosine of each batch row's embedding with every stored embedding; the best entry
guides layers 0..d-1. Trajectory search: after layer r has routed, the cosine of the row's observed
probabilities of layers 0..r (flattened) with the same prefix of every stored map; the best entry
guides layer r+d. The prefix dot products are kept running (one [C, J] x [J, B] product per layer),
and prefix norms come from the store's `prefix_sq`, so each layer costs O(C*J*B), not O(C*l*J*B).
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


def semantic_search(store: MapStore, query: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """query [B, E] -> (best entry [B] int64, cosine [B] float32). Store must be non-empty."""
    n = store.size
    q = query.to(store.device, torch.float32)
    dots = store.sems[:n].float() @ q.T                                          # [n, B]
    cos = dots / (store.sem_norm[:n, None] * q.norm(dim=1)[None, :]).clamp_min(EPS)
    score, idx = cos.max(0)
    return idx, score


class SemanticMemo:
    """Semantic search results per key (a decode row's token id: its token embedding, hence its search
    result, is a function of the id) for one store version. Rows whose key was searched before skip the
    embedding and the [C, E] product; the memo is emptied whenever the store changes."""

    def __init__(self, store: MapStore) -> None:
        self.store = store
        self.version = -1
        self.table: dict = {}

    def search(self, keys: list | None, embed: Callable[[], torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """keys [B] (or None: no memo) and a callable making the embeddings [B, E] -> like `semantic_search`."""
        if keys is None:
            return semantic_search(self.store, embed())
        if self.version != self.store.version:
            self.table.clear()
            self.version = self.store.version
        table = self.table
        missing = [b for b, k in enumerate(keys) if k not in table]
        if missing:
            sem = embed()
            idx, score = semantic_search(self.store, sem if len(missing) == len(keys) else sem[missing])
            for b, i, s in zip(missing, idx.tolist(), score.tolist()):
                table[keys[b]] = (i, s)
        found = [table[k] for k in keys]
        return (torch.tensor([i for i, _ in found], dtype=torch.int64, device=self.store.device),
                torch.tensor([s for _, s in found], dtype=torch.float32, device=self.store.device))


def map_rows(store: MapStore, entries: torch.Tensor, layer: int) -> torch.Tensor:
    """Layer `layer` of stored maps `entries` [B] -> [B, J] float32."""
    return store.maps[layer, entries].float()


class TrajectorySearch:
    """Running prefix cosine of B current trajectories against every stored map (one iteration).
    The store must not change while this object is in use."""

    def __init__(self, store: MapStore, batch: int) -> None:
        self.store = store
        self.n = store.size
        self.dots = torch.zeros((self.n, batch), dtype=torch.float32, device=store.device)   # [n, B]
        self.q_sq = torch.zeros(batch, dtype=torch.float32, device=store.device)            # [B]

    def observe(self, layer: int, probs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer `layer`'s probabilities [B, J] -> (best entry [B], prefix cosine [B]) over layers 0..layer."""
        q = probs.to(self.store.device, torch.float32)
        seg = self.store.maps[layer, : self.n].float()                           # [n, J] contiguous
        self.dots += seg @ q.T                                                   # [n, B]
        self.q_sq += (q * q).sum(1)
        denom = self.store.prefix_sq[: self.n, layer].sqrt()[:, None] * self.q_sq.sqrt()[None, :]
        score, idx = (self.dots / denom.clamp_min(EPS)).max(0)
        return idx, score
