"""One iteration's search: semantic guides at its start, a trajectory guide after every routed layer,
and the observed expert maps at its end. Array math through search.py's backend; no engine state."""
from __future__ import annotations

from typing import Any, Callable

import numpy as np
import torch

from finemoe.policies.finemoe.map_store import MapStore
from finemoe.policies.finemoe.arrays import HOST
from finemoe.policies.finemoe.search import Guide, SemanticMemo, TrajectorySearch, blend, semantic_topk

SEARCH_MODES = ("both", "semantic", "trajectory")


class IterationPlanner:
    """Layer coverage (d = prefetch distance, L layers):
      both        semantic guides layers 0..d-1, trajectory after layer r guides layer r+d (all layers)
      semantic    semantic guides every layer
      trajectory  layers 0..d-1 unguided; trajectory guides layers d..L-1
    `neighbors` K: each search keeps its K best entries and blends their rows (search.blend); `window` W > 0:
    the trajectory cosine covers the last W routed layers only.
    """

    def __init__(self, store: MapStore, batch: int, distance: int, mode: str, neighbors: int = 1,
                 window: int = 0) -> None:
        self.store = store
        self.L, self.J = store.spec.num_layers, store.spec.num_experts
        self.d = distance
        self.mode = mode
        self.batch = batch
        self.k = neighbors
        self.observed = np.zeros((batch, self.L, self.J), dtype=np.float32)      # [B, L, J] host
        self.seen = 0
        self.empty = store.size == 0
        self.trajectory = None if self.empty or mode == "semantic" else TrajectorySearch(store, batch, window)

    def begin(self, sem: Any | Callable[[], Any], memo: SemanticMemo | None = None,
              keys: list | None = None) -> list[Guide]:
        """sem [B, E] (or a callable making it, called only if needed) -> guides for the first layers
        (semantic search; through `memo` for rows with `keys`)."""
        if self.empty or self.mode == "trajectory":
            return []
        embed = sem if callable(sem) else (lambda: sem)
        idx, score = memo.search(keys, embed) if memo is not None else semantic_topk(self.store, embed(), self.k)
        last = self.L if self.mode == "semantic" else min(self.d, self.L)
        return [blend(self.store, idx, score, layer) for layer in range(last)]           # idx, score [K, B]

    def observe(self, layer: int, probs: Any) -> Guide | None:
        """Layer `layer` routed with per-row probabilities probs [B, J] (host: torch or numpy) -> the guide
        for layer + d."""
        probs = HOST.query(probs)                                                # [B, J] float32 numpy
        self.observed[:, layer] = probs
        self.seen += 1
        target = layer + self.d
        if self.trajectory is None or target >= self.L:
            return None
        idx, score = self.trajectory.observe_topk(layer, probs, self.k)                 # [K, B] each
        return blend(self.store, idx, score, target)

    def complete_maps(self) -> torch.Tensor | None:
        """The iteration's maps [B, L*J] (host float32) once every layer was observed, else None."""
        if self.seen < self.L:
            return None
        return torch.from_numpy(self.observed.reshape(self.batch, self.L * self.J))
