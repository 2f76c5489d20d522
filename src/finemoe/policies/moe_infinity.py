"""MoE-Infinity-style prefetching: request-level expert activation matrices matched against past requests."""
from __future__ import annotations

import json
import os

import numpy as np
from finemoe.storage import save_atomic
from safetensors import safe_open
from safetensors.numpy import save_file

from finemoe.errors import ConfigError
from finemoe.policies.base import (IterationInfo, LayerRouting, Policy, PolicyContext, Prefetch, RequestInfo,
                                   VictimOrder, register_policy)
from finemoe.policies.lfu import FrequencyTracker

COLLECTION_VERSION = 1


class ActivationCollection:
    """Up to `capacity` expert activation matrices (EAMs) of past requests, flattened to [L*J] counts.
    Full: the oldest is replaced (ring). Rows are kept unit-normalised so a match is one mat-vec."""

    def __init__(self, num_layers: int, num_experts: int, capacity: int) -> None:
        self.L, self.J, self.capacity = num_layers, num_experts, capacity
        self.unit = np.zeros((capacity, num_layers * num_experts), np.float32)   # [C, L*J]
        self.size = 0
        self.next = 0

    def add(self, eam: np.ndarray) -> None:
        norm = float(np.linalg.norm(eam))
        if norm == 0.0:
            return
        self.unit[self.next] = eam / norm
        self.next = (self.next + 1) % self.capacity
        self.size = min(self.size + 1, self.capacity)

    def match(self, eams: np.ndarray) -> np.ndarray | None:
        """eams [B, L*J] -> the most cosine-similar stored matrix per row [B, L*J]; an all-zero row (a new
        request) gets the collection's mean. None while the collection is empty."""
        if self.size == 0:
            return None
        stored = self.unit[:self.size]
        best = np.argmax(eams @ stored.T, axis=1)                       # [B]  (norm of eams cancels)
        out = stored[best]
        fresh = ~eams.any(axis=1)
        if fresh.any():
            out[fresh] = stored.mean(axis=0)
        return out

    def save(self, path: str) -> None:
        """Atomic: write a temp file next to `path`, then rename over it."""
        meta = {"version": COLLECTION_VERSION, "num_layers": self.L, "num_experts": self.J, "next": self.next}
        unit = np.ascontiguousarray(self.unit[:self.size])
        save_atomic(lambda tmp: save_file({"unit": unit}, tmp,
                                          metadata={"finemoe_eam_collection": json.dumps(meta)}), path)

    def load(self, path: str) -> None:
        try:
            with safe_open(path, framework="numpy") as f:
                meta = json.loads((f.metadata() or {})["finemoe_eam_collection"])
                unit = f.get_tensor("unit")
        except Exception as e:
            raise ConfigError(f"moe-infinity: cannot read activation collection {path!r}: {e}; delete it to start "
                              "an empty one") from None
        if (meta["num_layers"], meta["num_experts"]) != (self.L, self.J) or meta["version"] != COLLECTION_VERSION:
            raise ConfigError(f"moe-infinity: collection {path!r} is for {meta['num_layers']} layers x "
                              f"{meta['num_experts']} experts (version {meta['version']}); this model has {self.L} x "
                              f"{self.J}: pass another collection path")
        keep = unit[-self.capacity:]
        self.size = keep.shape[0]
        self.unit[:self.size] = keep
        self.next = meta["next"] % self.capacity if self.size == self.capacity else self.size


@register_policy
class MoEInfinityPolicy(Policy):
    name = "moe-infinity"
    description = (
        "Follows MoE-Infinity (Xue et al., 2024): each request keeps an expert activation matrix (per layer, "
        "how many of its tokens each expert served so far). After every layer the matrix is matched (cosine) "
        "against a collection of past requests' matrices (capacity 1000, oldest replaced; loaded from and "
        "atomically saved to `collection`, and learnt online at each request end); the best match's most used "
        "experts of the next `prefetch_distance` layers are prefetched, priority = usage share / distance. "
        "Eviction is LFU over all requests. Simplified: MoE-Infinity's own cache priority and its multi-GPU "
        "I/O are not modelled.")
    needs_router_probs = False

    def __init__(self, collection: str | None = None, capacity: int = 1000, learn: bool = True,
                 prefetch_distance: int = 2, per_layer: int | None = None) -> None:
        if capacity < 1 or prefetch_distance < 1 or (per_layer is not None and per_layer < 1):
            raise ConfigError("moe-infinity: capacity, prefetch_distance and per_layer must be >= 1")
        self.path, self.capacity, self.learn = collection, int(capacity), bool(learn)
        self.distance, self.per_layer = int(prefetch_distance), per_layer

    def bind(self, ctx: PolicyContext) -> None:
        super().bind(ctx)
        g = ctx.geometry
        self.L, self.J = g.num_layers, g.num_experts
        self.per_layer = self.per_layer or g.top_k
        self.freq = FrequencyTracker(g.total_experts)
        self.collection = ActivationCollection(self.L, self.J, self.capacity)
        if self.path and os.path.exists(self.path):
            self.collection.load(self.path)
        self.eams: dict[str, np.ndarray] = {}
        self.batch_eam = np.zeros((0, self.L * self.J), np.float32)     # [B, L*J] rows of this iteration
        self.rows: list[str] = []

    # ---- request lifecycle ---------------------------------------------------------------------
    def on_request_start(self, req: RequestInfo) -> None:
        self.eams[req.request_id] = np.zeros(self.L * self.J, np.float32)

    def on_request_end(self, req: RequestInfo) -> None:
        eam = self.eams.pop(req.request_id, None)
        if eam is not None and self.learn:
            self.collection.add(eam)

    def on_iteration_start(self, it: IterationInfo) -> Prefetch:
        self.rows = list(it.request_ids)
        zero = np.zeros(self.L * self.J, np.float32)
        self.batch_eam = np.stack([self.eams.get(r, zero) for r in self.rows]) if self.rows else self.batch_eam[:0]
        return self._prefetch_after(-1)

    def on_iteration_end(self, it: IterationInfo) -> None:
        for b, r in enumerate(self.rows):
            if r in self.eams:
                self.eams[r] = self.batch_eam[b]

    # ---- per layer -----------------------------------------------------------------------------
    def on_access(self, layer: int, experts: np.ndarray, counts: np.ndarray) -> None:
        self.freq.touch_layer(layer * self.J, experts)

    def on_layer_routed(self, routing: LayerRouting) -> Prefetch:
        topk = routing.top_k.cpu().numpy()                                # [T, k] (already synced by the runtime)
        B, J = self.batch_eam.shape[0], self.J
        if B:
            rows = np.repeat(routing.token_rows, topk.shape[1])           # [T*k]
            valid = rows >= 0
            counts = np.bincount(rows[valid] * J + topk.reshape(-1)[valid], minlength=B * J)   # [B*J] exact ints
            self.batch_eam[:, routing.layer * J:(routing.layer + 1) * J] += counts.reshape(B, J)
        return self._prefetch_after(routing.layer)

    def _prefetch_after(self, layer: int) -> Prefetch:
        first, end = layer + 1, min(layer + 1 + self.distance, self.L)
        if end <= first or self.batch_eam.shape[0] == 0:
            return Prefetch.empty()
        matched = self.collection.match(self.batch_eam)                    # [B, L*J] or None
        if matched is None:
            return Prefetch.empty()
        targets = np.arange(first, end)
        use = matched.reshape(-1, self.L, self.J)[:, first:end]            # [B, D, J]
        share = use / np.maximum(use.sum(axis=2, keepdims=True), 1e-12)    # per-layer usage share
        share = share[0] if share.shape[0] == 1 else share.max(axis=0)     # [D, J] union over the batch
        top = (-share).argsort(axis=1, kind="stable")[:, :self.per_layer]  # [D, n]
        score = share[targets[:, None] - first, top]
        dist = (targets - layer)[:, None].astype(np.float64)
        keep = score > 0
        keys = (targets[:, None] * self.J + top)[keep]
        return Prefetch(keys.astype(np.int64), (score / dist)[keep])

    def select_victims(self, candidates: np.ndarray, n: int, for_prefetch: bool) -> np.ndarray:
        return self.freq.least_used(candidates, n)

    def victim_order(self) -> VictimOrder:
        return self.freq.order()

    def state_dict(self) -> dict:
        return {"collection": self.collection.unit[:self.collection.size].copy()}

    def save(self) -> bool:
        if not (self.path and self.learn):
            return False
        self.collection.save(self.path)
        return True

    def close(self) -> None:
        self.save()
